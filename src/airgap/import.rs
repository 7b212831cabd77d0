//! `regcache import`: loads an OCI image layout tar (written by `regcache export` or by
//! `skopeo copy … oci-archive:PATH:REF`) into the store.
//!
//! Every manifest and blob is verified against its digest as it is read, through
//! [`store_verified`]; the first bad entry stops the import and is named. Order of work:
//! (1) list the archive's entries (seeking past their data) and refuse a truncated one;
//! (2) read `index.json` and verify every manifest the named images reach; (3) load the blobs
//! in archive order; (4) store the manifests, then record tags and referrers, so that a
//! manifest is never served before its blobs are in the store. What was verified before a bad
//! entry may stay (it is correct, content-addressed data); nothing unverified is stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::archive::{blob_path, LayoutIndex, REF_NAME};
use super::{store_verified, AirgapError, Content, ImageRef};
use crate::cache::{Cache, Manifest};
use crate::config::Config;
use crate::oci::{references, sniff_media_type, Digest, MediaType, Reference, MAX_MANIFEST_BYTES};
use crate::routing::Resolver;
use crate::store::{ManifestRecord, Namespace, TagRecord};

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

/// Where an entry's data lies in the archive.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    offset: u64,
    size: u64,
}

fn entry_error(entry: &str, reason: impl std::fmt::Display) -> AirgapError {
    AirgapError::Entry {
        entry: entry.to_owned(),
        reason: reason.to_string(),
    }
}

/// Lists the archive's regular files, seeking past their data. A data span past the end of the
/// file (truncation) or an unreadable header is an error naming the entry.
pub(super) fn list_entries(path: &Path) -> Result<HashMap<String, Span>, AirgapError> {
    let open_err = |source| AirgapError::ReadList {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let file_len = file.metadata().map_err(open_err)?.len();
    let mut archive = tar::Archive::new(file);
    let mut entries = HashMap::new();
    let mut previous = String::from("(start of archive)");
    let iter = archive
        .entries_with_seek()
        .map_err(|e| entry_error(&previous, e))?;
    for entry in iter {
        let entry = entry.map_err(|e| entry_error(&format!("after {previous}"), e))?;
        let name = entry
            .path()
            .map_err(|e| entry_error(&format!("after {previous}"), e))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let span = Span {
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if span.offset.saturating_add(span.size) > file_len {
            return Err(entry_error(&name, "truncated: the archive ends inside it"));
        }
        if entry.header().entry_type().is_file() {
            entries.insert(name.clone(), span);
        }
        previous = name;
    }
    Ok(entries)
}

/// Reads an entry's data.
fn open_entry(path: &Path, span: Span) -> Result<impl Read, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(span.offset))?;
    Ok(file.take(span.size))
}

/// Reads a small entry whole (`index.json`, manifests).
fn read_small(path: &Path, name: &str, span: Span) -> Result<Vec<u8>, AirgapError> {
    if span.size > MAX_MANIFEST_BYTES as u64 {
        return Err(entry_error(name, "too large for a manifest"));
    }
    let mut bytes = Vec::new();
    open_entry(path, span)
        .and_then(|mut reader| reader.read_to_end(&mut bytes))
        .map_err(|e| entry_error(name, e))?;
    Ok(bytes)
}

/// The archive's entries, by path.
struct Archive<'a> {
    path: &'a Path,
    entries: HashMap<String, Span>,
}

impl Archive<'_> {
    /// Reads a manifest entry whole and checks it against `digest` (the schema1 rule
    /// included). `Ok(None)` when the entry is absent.
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
        Ok(Some(Manifest {
            digest,
            media_type,
            bytes: bytes.into(),
        }))
    }
}

/// What an import will store, worked out (and the manifests verified) before anything is.
#[derive(Default)]
struct Plan {
    /// Verified manifests, with the namespace and repository they go under.
    manifests: Vec<(Namespace, crate::oci::RepoName, Manifest)>,
    /// Blobs to load, by their data's offset in the archive.
    blobs: BTreeMap<u64, (Namespace, Digest)>,
    /// Tags to record: namespace, repository, tag, manifest.
    tags: Vec<(Namespace, crate::oci::RepoName, crate::oci::Tag, Digest)>,
    seen: HashSet<(Namespace, Digest)>,
}

impl Plan {
    /// Adds the image `image` rooted at `root`: every manifest it reaches in the archive
    /// (children of an index exported for some platforms may be absent), and its blobs, which
    /// must be in the archive or already in the store (`export --since`).
    fn add_image(
        &mut self,
        archive: &Archive<'_>,
        cache: &Cache,
        image: &ImageRef,
        root: Digest,
        media_type: Option<MediaType>,
        report: &mut ImportReport,
    ) -> Result<(), AirgapError> {
        let namespace = Namespace::new(cache.upstreams()[image.target.upstream].name());
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
            let (children, layers) = references(&manifest.bytes, &[]);
            queue.extend(children.into_iter().map(|child| (child, None)));
            for layer in layers {
                let entry = blob_path(&layer);
                match archive.entries.get(&entry) {
                    Some(span) => {
                        self.blobs.insert(span.offset, (namespace.clone(), layer));
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

    /// Loads the blobs in archive order (so the first bad one reported is the first in the
    /// archive), then the manifests, then tags and referrers.
    fn load(
        self,
        archive: &Archive<'_>,
        cache: &Cache,
        report: &mut ImportReport,
    ) -> Result<(), AirgapError> {
        let store = cache.store();
        let mut loaded = HashSet::new();
        for (offset, (namespace, digest)) in self.blobs {
            if !loaded.insert((namespace.clone(), digest)) {
                continue;
            }
            if store.contains(&namespace, &digest) {
                report.blobs_present += 1;
                continue;
            }
            let entry = blob_path(&digest);
            let span = archive
                .entries
                .get(&entry)
                .copied()
                .unwrap_or(Span { offset, size: 0 });
            let reader = open_entry(archive.path, span).map_err(|e| entry_error(&entry, e))?;
            let size = store_verified(store, &namespace, &digest, Content::Blob, reader)
                .map_err(|e| entry_error(&entry, e))?;
            report.blobs += 1;
            report.bytes += size;
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
}

/// Imports the archive at `path` into `cache`'s store and index. Blocking.
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
    let layout: LayoutIndex = serde_json::from_slice(&read_small(path, "index.json", index_span)?)
        .map_err(|e| entry_error("index.json", e))?;
    let mut report = ImportReport::default();
    let mut plan = Plan::default();
    for descriptor in &layout.manifests {
        let Some(name) = descriptor.annotations.get(REF_NAME) else {
            // Without a name there is no upstream or repository to file it under.
            report.unnamed += 1;
            continue;
        };
        let image = ImageRef::parse(resolver, name).map_err(|e| entry_error("index.json", e))?;
        let root = Digest::parse(&descriptor.digest).map_err(|e| entry_error("index.json", e))?;
        let media_type = MediaType::from_content_type(&descriptor.media_type);
        plan.add_image(&archive, cache, &image, root, media_type, &mut report)?;
        report.images.push(name.clone());
    }
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
        Reply::Progress { .. } | Reply::PrefetchDone { .. } => {}
    })
    .await
    .map_err(|err| format!("admin socket: {err}"))?;
    outcome
}
