//! `regcache import`: loads an OCI image layout tar (written by `regcache export` or by
//! `skopeo copy … oci-archive:PATH:REF`) into the store.
//!
//! Every manifest and blob is verified against its digest as it is read, through
//! [`store_verified`]; the first bad entry stops the import and is named. Order of work:
//! (1) list the archive's entries (reading the tar headers, seeking past their data) and refuse
//! a truncated, sparse or oversized one (long-name and PAX entries are capped); (2) read
//! `index.json` and check every manifest the named images reach as a fill would (digest, a
//! manifest media type, `validate_manifest`), and every blob's declared size against
//! `cache.max_blob_size` and the storage budget; (3) load the blobs in archive order (the
//! archive's bytes of a blob already stored are still checked); (4) store the manifests, then
//! record tags and referrers, so that a manifest is never served before its blobs are in the
//! store. A refused archive leaves the store as it was: the blobs a failed load stored are
//! removed again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::archive::{blob_path, LayoutIndex, REF_NAME, WRAPPED_MEDIA_TYPE, WRAPPED_ROOT};
use super::entries::{entry_error, list_entries, open_entry, read_small, Span};
use super::{store_verified, AirgapError, Content, ImageRef};
use crate::cache::{Cache, Manifest};
use crate::config::Config;
use crate::oci::{
    declared_sizes, references, sniff_media_type, validate_manifest, Digest, MediaType, Reference,
};
use crate::routing::Resolver;
use crate::store::{DigestCheck, ManifestRecord, Namespace, Store, TagRecord, READ_CHUNK};

/// Arguments of `regcache import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The archive (an OCI image layout as a tar).
    pub archive: PathBuf,
}

/// What an import loaded.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ImportReport {
    /// Full references of the images (tags and digests) now served.
    pub images: Vec<String>,
    /// Manifests stored.
    pub manifests: usize,
    /// Blobs newly stored.
    pub blobs: usize,
    /// Blobs already in the store.
    pub blobs_present: usize,
    /// Bytes of newly stored blobs.
    pub bytes: u64,
    /// Images in `index.json` without an `org.opencontainers.image.ref.name`, not imported.
    pub unnamed: usize,
}

/// Hashes an entry's data and refuses it unless it is `digest`'s content. Stores nothing.
fn check_entry(mut reader: impl Read, digest: &Digest) -> Result<(), AirgapError> {
    let mut check = DigestCheck::default();
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => check.update(&buffer[..read]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(AirgapError::Read(err)),
        }
    }
    let actual = check.digest();
    if actual != *digest {
        return Err(AirgapError::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(())
}

/// Whether `media_type` names a manifest: one of the types regcache asks upstreams for, or
/// another `application/vnd.` type, as a fill takes it (`cache/manifest.rs`).
fn is_manifest_type(media_type: &MediaType) -> bool {
    MediaType::ALL_MANIFESTS.contains(&media_type.as_str())
        || media_type.as_str().starts_with("application/vnd.")
}

/// What a fill checks of a manifest ([`validate_manifest`] for a manifest type), and that an
/// index is not declared as an image manifest, nor an image manifest as an index.
fn check_manifest(bytes: &[u8], media_type: &MediaType) -> Result<(), String> {
    if !is_manifest_type(media_type) {
        return Err(format!(
            "declared as {media_type}, not a manifest media type"
        ));
    }
    validate_manifest(bytes, media_type).map_err(|e| format!("{e} (declared {media_type})"))?;
    let document: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|_| "not a JSON object".to_owned())?;
    let lists_blobs = ["config", "layers", "fsLayers"]
        .iter()
        .any(|member| document.contains_key(*member));
    let index_type = [MediaType::OCI_INDEX, MediaType::DOCKER_LIST].contains(&media_type.as_str());
    let image_type = media_type.is_schema1()
        || [MediaType::OCI_MANIFEST, MediaType::DOCKER_MANIFEST].contains(&media_type.as_str());
    if index_type && lists_blobs {
        return Err(format!(
            "declared as {media_type} (an index) but lists blobs"
        ));
    }
    if image_type && document.contains_key("manifests") {
        return Err(format!(
            "an index (it lists manifests) declared as {media_type}"
        ));
    }
    Ok(())
}

/// The archive's entries, by path.
struct Archive<'a> {
    path: &'a Path,
    entries: HashMap<String, Span>,
}

impl Archive<'_> {
    /// Reads a manifest entry whole and checks it against `digest` (the schema1 rule
    /// included) and as a fill would ([`check_manifest`]). `Ok(None)` when the entry is absent.
    fn verified_manifest(
        &self,
        digest: Digest,
        media_type: Option<MediaType>,
    ) -> Result<Option<Manifest>, AirgapError> {
        let entry = blob_path(&digest);
        let Some(span) = self.entries.get(&entry).copied() else {
            return Ok(None);
        };
        let bytes = read_small(self.path, &entry, span)?;
        let media_type = media_type
            .or_else(|| sniff_media_type(&bytes))
            .ok_or_else(|| entry_error(&entry, "not a manifest regcache can identify"))?;
        let actual = crate::oci::manifest_digest(&bytes, &media_type);
        if actual != digest {
            return Err(entry_error(
                &entry,
                format!("digest mismatch: named {digest}, contents {actual}"),
            ));
        }
        check_manifest(&bytes, &media_type).map_err(|reason| entry_error(&entry, reason))?;
        Ok(Some(Manifest {
            digest,
            media_type,
            bytes: bytes.into(),
        }))
    }
}

/// The most manifest bytes one import holds in memory (they are verified before anything is
/// stored): thousands of images' worth.
const MAX_PLAN_MANIFEST_BYTES: usize = 256 * 1024 * 1024;

/// A blob entry to load, and the namespaces it goes into.
struct PlannedBlob {
    digest: Digest,
    span: Span,
    namespaces: Vec<Namespace>,
}

/// What an import will store, worked out (and the manifests verified) before anything is.
#[derive(Default)]
struct Plan {
    /// Verified manifests, with the namespace and repository they go under.
    manifests: Vec<(Namespace, crate::oci::RepoName, Manifest)>,
    /// Their bytes in all.
    manifest_bytes: usize,
    /// Blobs to load, by their data's offset in the archive.
    blobs: BTreeMap<u64, PlannedBlob>,
    /// Tags to record: namespace, repository, tag, manifest.
    tags: Vec<(Namespace, crate::oci::RepoName, crate::oci::Tag, Digest)>,
    seen: HashSet<(Namespace, Digest)>,
}

impl Plan {
    /// Adds the image `image` rooted at `root`: every manifest it reaches in the archive
    /// (children of an index exported for some platforms may be absent), and its blobs, which
    /// must be in the archive (within `cache.max_blob_size` and the size the manifest
    /// declares) or already in the store (`export --since`).
    fn add_image(
        &mut self,
        archive: &Archive<'_>,
        cache: &Cache,
        image: &ImageRef,
        root: Digest,
        media_type: Option<MediaType>,
        report: &mut ImportReport,
    ) -> Result<(), AirgapError> {
        let upstream = &cache.upstreams()[image.target.upstream];
        let namespace = Namespace::new(upstream.name());
        let max_blob_size = upstream.max_blob_size();
        let mut queue = vec![(root, media_type)];
        while let Some((digest, media_type)) = queue.pop() {
            if !self.seen.insert((namespace.clone(), digest)) {
                continue;
            }
            let Some(manifest) = archive.verified_manifest(digest, media_type)? else {
                if digest == root {
                    return Err(entry_error(&blob_path(&digest), "missing from the archive"));
                }
                continue;
            };
            self.manifest_bytes += manifest.bytes.len();
            if self.manifest_bytes > MAX_PLAN_MANIFEST_BYTES {
                return Err(entry_error(
                    &blob_path(&digest),
                    format!("the archive's manifests pass {MAX_PLAN_MANIFEST_BYTES} bytes"),
                ));
            }
            let (children, layers) = references(&manifest.bytes, &[]);
            let declared: HashMap<Digest, u64> =
                declared_sizes(&manifest.bytes).into_iter().collect();
            queue.extend(children.into_iter().map(|child| (child, None)));
            for layer in layers {
                let entry = blob_path(&layer);
                match archive.entries.get(&entry) {
                    Some(span) => {
                        if span.size > max_blob_size {
                            return Err(entry_error(
                                &entry,
                                format!(
                                    "{} bytes, more than cache.max_blob_size ({max_blob_size})",
                                    span.size
                                ),
                            ));
                        }
                        if let Some(size) = declared.get(&layer).filter(|s| **s != span.size) {
                            return Err(entry_error(
                                &entry,
                                format!("{} bytes, but {digest} declares {size}", span.size),
                            ));
                        }
                        let blob = self.blobs.entry(span.offset).or_insert(PlannedBlob {
                            digest: layer,
                            span: *span,
                            namespaces: Vec::new(),
                        });
                        if !blob.namespaces.contains(&namespace) {
                            blob.namespaces.push(namespace.clone());
                        }
                    }
                    None if cache.store().contains(&namespace, &layer) => {
                        report.blobs_present += 1;
                    }
                    None => {
                        return Err(entry_error(
                            &entry,
                            "missing from the archive and not in the store",
                        ))
                    }
                }
            }
            self.manifests
                .push((namespace.clone(), image.target.repo.clone(), manifest));
        }
        if let Reference::Tag(tag) = &image.reference {
            self.tags
                .push((namespace, image.target.repo.clone(), tag.clone(), root));
        }
        Ok(())
    }

    /// Refuses a plan whose new bytes (blobs not stored yet, manifests) do not fit in the
    /// storage budget (`storage.max_size` × `high_watermark`), naming the entry that passes it.
    fn check_budget(&self, cache: &Cache) -> Result<(), AirgapError> {
        let Some(budget) = cache.storage_budget() else {
            return Ok(());
        };
        let mut total = self.manifest_bytes as u64;
        for blob in self.blobs.values() {
            for namespace in &blob.namespaces {
                if cache.store().contains(namespace, &blob.digest) {
                    continue;
                }
                total = total.saturating_add(blob.span.size);
                if total > budget {
                    return Err(entry_error(
                        &blob_path(&blob.digest),
                        format!(
                            "the import's new bytes pass the storage budget \
                             (storage.max_size × high_watermark: {budget} bytes)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Loads the blobs in archive order (so the first bad one reported is the first in the
    /// archive), then the manifests, then tags and referrers. When a blob fails, the blobs this
    /// import stored are removed again: a refused archive leaves the store as it was.
    fn load(
        self,
        archive: &Archive<'_>,
        cache: &Cache,
        report: &mut ImportReport,
    ) -> Result<(), AirgapError> {
        let store = cache.store();
        let mut stored = Vec::new();
        if let Err(err) = self.load_blobs(archive, store, report, &mut stored) {
            for (namespace, digest) in &stored {
                if let Err(remove) = store.remove(namespace, digest) {
                    tracing::warn!(%digest, error = %remove, "could not remove a blob of a refused import");
                }
            }
            // Their space back now, not at the next start or `gc`.
            if let Err(empty) = store.empty_trash() {
                tracing::warn!(error = %empty, "could not empty the store's trash");
            }
            return Err(err);
        }
        for (namespace, repo, manifest) in &self.manifests {
            let content = Content::Manifest(&manifest.media_type);
            store_verified(
                store,
                namespace,
                &manifest.digest,
                content,
                &manifest.bytes[..],
            )
            .map_err(|e| entry_error(&blob_path(&manifest.digest), e))?;
            let record = ManifestRecord {
                media_type: manifest.media_type.clone(),
            };
            cache
                .index()
                .put_manifest(namespace, &manifest.digest, &record)?;
            cache.note_referrer(namespace, repo, manifest);
            // The archive is the operator's copy of the upstream's word: the image's manifests
            // and the blobs it carries (or the store had) belong to its repository, so an
            // offline site with `[auth]` serves them by digest.
            let (_, blobs) = references(&manifest.bytes, &[]);
            for digest in std::iter::once(manifest.digest).chain(blobs) {
                if store.contains(namespace, &digest) {
                    cache
                        .index()
                        .put_membership(namespace, repo, &digest, SystemTime::now())?;
                }
            }
            report.manifests += 1;
        }
        for (namespace, repo, tag, digest) in self.tags {
            let record = TagRecord {
                digest,
                confirmed_at: SystemTime::now(),
            };
            cache.index().put_tag(&namespace, &repo, &tag, &record)?;
        }
        cache.index().flush()?;
        Ok(())
    }

    /// Stores the blobs not stored yet, verified while written, and records each in `stored`.
    /// A blob already stored is not written again, but the archive's bytes for it are still
    /// checked against its digest: a tampered archive is refused whatever the store holds.
    fn load_blobs(
        &self,
        archive: &Archive<'_>,
        store: &Store,
        report: &mut ImportReport,
        stored: &mut Vec<(Namespace, Digest)>,
    ) -> Result<(), AirgapError> {
        for blob in self.blobs.values() {
            let entry = blob_path(&blob.digest);
            for namespace in &blob.namespaces {
                let reader =
                    open_entry(archive.path, blob.span).map_err(|e| entry_error(&entry, e))?;
                if store.contains(namespace, &blob.digest) {
                    check_entry(reader, &blob.digest).map_err(|e| entry_error(&entry, e))?;
                    report.blobs_present += 1;
                    continue;
                }
                let size = store_verified(store, namespace, &blob.digest, Content::Blob, reader)
                    .map_err(|e| entry_error(&entry, e))?;
                stored.push((namespace.clone(), blob.digest));
                report.blobs += 1;
                report.bytes += size;
            }
        }
        Ok(())
    }
}

/// An image `index.json` names.
#[derive(Debug)]
pub(crate) struct NamedImage {
    /// The full reference, as written.
    pub(crate) name: String,
    /// Its upstream, repository and tag or digest.
    pub(crate) image: ImageRef,
    /// The manifest the name points at.
    pub(crate) root: Digest,
    /// The type `index.json` declares for it; `None` when it declares none.
    pub(crate) media_type: Option<MediaType>,
}

/// Parses `index.json`: the images it names (each resolved to a configured upstream) and how
/// many it lists without a name.
///
/// # Errors
/// [`AirgapError::Entry`] naming `index.json`: not JSON of an image layout, a name no upstream
/// takes, a bad digest or media type, or no named image at all (nothing to import).
pub(crate) fn named_images(
    resolver: &Resolver,
    bytes: &[u8],
) -> Result<(Vec<NamedImage>, usize), AirgapError> {
    let layout: LayoutIndex =
        serde_json::from_slice(bytes).map_err(|e| entry_error("index.json", e))?;
    let mut images = Vec::new();
    let mut unnamed = 0;
    for descriptor in &layout.manifests {
        let Some(name) = descriptor.annotations.get(REF_NAME) else {
            // Without a name there is no upstream or repository to file it under.
            unnamed += 1;
            continue;
        };
        let image = ImageRef::parse(resolver, name).map_err(|e| entry_error("index.json", e))?;
        // A wrapper (an export's stand-in for a Docker manifest or list) names its real root.
        let (root, declared) = match descriptor.annotations.get(WRAPPED_ROOT) {
            Some(root) => (
                root,
                descriptor
                    .annotations
                    .get(WRAPPED_MEDIA_TYPE)
                    .map_or("", String::as_str),
            ),
            None => (&descriptor.digest, descriptor.media_type.as_str()),
        };
        let root = Digest::parse(root).map_err(|e| entry_error("index.json", e))?;
        let media_type = match MediaType::from_content_type(declared) {
            Some(media_type) => Some(media_type),
            None if declared.is_empty() => None,
            None => {
                return Err(entry_error(
                    "index.json",
                    format!("{name}: media type {declared:?} is not a manifest media type"),
                ))
            }
        };
        images.push(NamedImage {
            name: name.clone(),
            image,
            root,
            media_type,
        });
    }
    if images.is_empty() {
        return Err(entry_error(
            "index.json",
            format!("names no image (no {REF_NAME} annotation): nothing to import"),
        ));
    }
    Ok((images, unnamed))
}

/// Imports the archive at `path` into `cache`'s store and index. Blocking. Everything is
/// checked (manifests, sizes, the storage budget) before anything is stored; a blob that fails
/// its digest while stored takes the blobs stored before it out again.
///
/// # Errors
/// [`AirgapError::Entry`] naming the first bad entry; others for I/O and unknown upstreams.
pub fn import(
    cache: &Arc<Cache>,
    resolver: &Resolver,
    path: &Path,
) -> Result<ImportReport, AirgapError> {
    let archive = Archive {
        path,
        entries: list_entries(path)?,
    };
    let index_span = *archive
        .entries
        .get("index.json")
        .ok_or_else(|| entry_error("index.json", "missing: not an OCI image layout"))?;
    let (images, unnamed) = named_images(resolver, &read_small(path, "index.json", index_span)?)?;
    let mut report = ImportReport {
        unnamed,
        ..ImportReport::default()
    };
    let mut plan = Plan::default();
    for named in images {
        plan.add_image(
            &archive,
            cache,
            &named.image,
            named.root,
            named.media_type,
            &mut report,
        )?;
        report.images.push(named.name);
    }
    plan.check_budget(cache)?;
    plan.load(&archive, cache, &mut report)?;
    Ok(report)
}

/// Prints what an import loaded.
pub fn print_report(report: &ImportReport) {
    println!(
        "imported {} images: {} manifests, {} blobs ({}), {} blobs already cached",
        report.images.len(),
        report.manifests,
        report.blobs,
        bytesize::ByteSize(report.bytes),
        report.blobs_present
    );
    for image in &report.images {
        println!("  {image}");
    }
    if report.unnamed > 0 {
        println!(
            "skipped {} images without an {REF_NAME} annotation (no upstream or repository to file them under)",
            report.unnamed
        );
    }
}

/// `regcache import` on the stopped store.
pub fn main(config: &Config, args: &ImportArgs) -> ExitCode {
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        if let Some(stream) = super::admin::connect(config).await {
            // The server opens the archive itself: give it a path that does not depend on
            // this process's working directory.
            let archive = std::path::absolute(&args.archive).map_err(|e| e.to_string())?;
            return remote(stream, archive).await;
        }
        let cache = super::open_cache(config, crate::store::IndexAccess::Serve)
            .map_err(|e| e.to_string())?;
        let resolver = crate::routing::Resolver::for_upstreams(&config.upstreams);
        let archive = args.archive.clone();
        tokio::task::spawn_blocking(move || import(&cache, &resolver, &archive))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(report) => {
            print_report(&report);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("regcache import: {}: {err}", args.archive.display());
            ExitCode::FAILURE
        }
    }
}

/// Runs the import inside the server that holds the store.
async fn remote(stream: tokio::net::UnixStream, archive: PathBuf) -> Result<ImportReport, String> {
    use super::admin::{exchange, Reply, Request};
    let mut outcome = Err("the server closed the admin connection early".to_owned());
    exchange(stream, &Request::Import { archive }, |reply| match reply {
        Reply::Imported { report } => outcome = Ok(report),
        Reply::Failed { message } => outcome = Err(message),
        Reply::Progress { .. } | Reply::PrefetchDone { .. } | Reply::Synced { .. } => {}
    })
    .await
    .map_err(|err| format!("admin socket: {err}"))?;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_checked_as_a_fill_checks_them() {
        #[track_caller]
        fn check(json: &str, declared: &str, expected: Result<(), &str>) {
            let media_type = MediaType::from_content_type(declared).expect("a media type");
            let result = check_manifest(json.as_bytes(), &media_type);
            match (result, expected) {
                (Ok(()), Ok(())) => {}
                (Err(reason), Err(part)) => assert!(reason.contains(part), "{reason}"),
                (result, expected) => panic!("{json} as {declared}: {result:?}, not {expected:?}"),
            }
        }
        let image = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let bare_index = r#"{"schemaVersion":2,"manifests":[]}"#;
        check(image, MediaType::OCI_MANIFEST, Ok(()));
        check(image, MediaType::DOCKER_MANIFEST, Ok(()));
        check(image, "application/vnd.example.artifact.v1+json", Ok(()));
        check(index, MediaType::OCI_INDEX, Ok(()));
        check(bare_index, MediaType::DOCKER_LIST, Ok(()));
        check(image, "text/html", Err("not a manifest media type"));
        check(image, "application/json", Err("not a manifest media type"));
        check(
            "<html></html>",
            MediaType::OCI_MANIFEST,
            Err("not a JSON object"),
        );
        check(
            "\u{1f}\u{8b}\u{8}\u{0}",
            MediaType::OCI_MANIFEST,
            Err("not a JSON object"),
        );
        check(index, MediaType::OCI_MANIFEST, Err("mediaType disagrees"));
        check(bare_index, MediaType::OCI_MANIFEST, Err("an index"));
        check(bare_index, MediaType::DOCKER_SCHEMA1, Err("an index"));
        check(image, MediaType::OCI_INDEX, Err("lists blobs"));
    }

    #[test]
    fn an_index_json_naming_nothing_is_refused() {
        let config = Config::parse(
            "[[upstream]]\nname = \"registry.test\"\nurl = \"https://registry.test\"\ndefault = true\n",
        )
        .expect("config");
        let resolver = Resolver::for_upstreams(&config.upstreams);
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let descriptor = |media_type: &str, name: Option<&str>| {
            let annotations = match name {
                Some(name) => serde_json::json!({ REF_NAME: name }),
                None => serde_json::json!({}),
            };
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": 2, "annotations": annotations})
        };
        let index = |descriptors: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": descriptors}))
                .expect("json")
        };
        let refused = |bytes: &[u8]| {
            named_images(&resolver, bytes)
                .expect_err("refused")
                .to_string()
        };
        assert!(refused(&index(vec![])).contains("names no image"));
        let unnamed = index(vec![descriptor(MediaType::OCI_MANIFEST, None)]);
        assert!(refused(&unnamed).contains("names no image"));
        let odd_type = index(vec![descriptor("not a type", Some("registry.test/a:v1"))]);
        assert!(refused(&odd_type).contains("not a manifest media type"));
        let named = index(vec![
            descriptor(MediaType::OCI_MANIFEST, Some("registry.test/a:v1")),
            descriptor(MediaType::OCI_MANIFEST, None),
        ]);
        let (images, unnamed) = named_images(&resolver, &named).expect("named");
        assert_eq!((images.len(), unnamed), (1, 1));
        assert_eq!(images[0].name, "registry.test/a:v1");
    }
}
