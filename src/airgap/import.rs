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
    /// TOML configuration file.
    #[arg(long, short, env = "REGCACHE_CONFIG")]
    pub config: Option<PathBuf>,
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

/// A manifest verified from the archive, waiting to be stored.
#[derive(Debug)]
struct Pending {
    namespace: Namespace,
    target_repo: crate::oci::RepoName,
    manifest: Manifest,
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

/// Imports the archive at `path` into `cache`'s store and index. Blocking.
///
/// # Errors
/// [`AirgapError::Entry`] naming the first bad entry; others for I/O and unknown upstreams.
pub fn import(
    cache: &Arc<Cache>,
    resolver: &Resolver,
    path: &Path,
) -> Result<ImportReport, AirgapError> {
    let entries = list_entries(path)?;
    let index_span = *entries
        .get("index.json")
        .ok_or_else(|| entry_error("index.json", "missing: not an OCI image layout"))?;
    let layout: LayoutIndex = serde_json::from_slice(&read_small(path, "index.json", index_span)?)
        .map_err(|e| entry_error("index.json", e))?;
    let mut report = ImportReport::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut seen: HashSet<(Namespace, Digest)> = HashSet::new();
    let mut blobs: BTreeMap<u64, (Namespace, Digest)> = BTreeMap::new();
    let mut tags = Vec::new();
    for descriptor in &layout.manifests {
        let Some(name) = descriptor.annotations.get(REF_NAME) else {
            // Without a name there is no upstream or repository to file it under.
            report.unnamed += 1;
            continue;
        };
        let image = ImageRef::parse(resolver, name).map_err(|e| entry_error("index.json", e))?;
        let namespace = Namespace::new(cache.upstreams()[image.target.upstream].name());
        let root = Digest::parse(&descriptor.digest).map_err(|e| entry_error("index.json", e))?;
        let media_type = MediaType::from_content_type(&descriptor.media_type);
        let mut queue = vec![(root, media_type, true)];
        while let Some((digest, media_type, required)) = queue.pop() {
            if !seen.insert((namespace.clone(), digest)) {
                continue;
            }
            let entry = blob_path(&digest);
            let Some(span) = entries.get(&entry).copied() else {
                // An index exported for some platforms lacks the others' manifests.
                if required {
                    return Err(entry_error(&entry, "missing from the archive"));
                }
                continue;
            };
            let bytes = read_small(path, &entry, span)?;
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
            let (children, layers) = references(&bytes, &[]);
            queue.extend(children.into_iter().map(|child| (child, None, false)));
            for layer in layers {
                let layer_entry = blob_path(&layer);
                match entries.get(&layer_entry) {
                    Some(span) => {
                        blobs.insert(span.offset, (namespace.clone(), layer));
                    }
                    // An archive written with `export --since` leaves out what an earlier
                    // one carried; that must be in the store already.
                    None if cache.store().contains(&namespace, &layer) => {
                        report.blobs_present += 1;
                    }
                    None => {
                        return Err(entry_error(
                            &layer_entry,
                            "missing from the archive and not in the store",
                        ))
                    }
                }
            }
            pending.push(Pending {
                namespace: namespace.clone(),
                target_repo: image.target.repo.clone(),
                manifest: Manifest {
                    digest,
                    media_type,
                    bytes: bytes.into(),
                },
            });
        }
        if let Reference::Tag(tag) = &image.reference {
            tags.push((
                namespace.clone(),
                image.target.repo.clone(),
                tag.clone(),
                root,
            ));
        }
        report.images.push(name.clone());
    }
    let store = cache.store();
    // Blobs in archive order, so the first bad one reported is the first in the archive.
    let mut loaded: HashSet<(Namespace, Digest)> = HashSet::new();
    for (offset, (namespace, digest)) in blobs {
        if !loaded.insert((namespace.clone(), digest)) {
            continue;
        }
        if store.contains(&namespace, &digest) {
            report.blobs_present += 1;
            continue;
        }
        let entry = blob_path(&digest);
        let span = entries
            .get(&entry)
            .copied()
            .unwrap_or(Span { offset, size: 0 });
        let reader = open_entry(path, span).map_err(|e| entry_error(&entry, e))?;
        let size = store_verified(store, &namespace, &digest, Content::Blob, reader)
            .map_err(|e| entry_error(&entry, e))?;
        report.blobs += 1;
        report.bytes += size;
    }
    for item in &pending {
        let manifest = &item.manifest;
        let content = Content::Manifest(&manifest.media_type);
        store_verified(
            store,
            &item.namespace,
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
            .put_manifest(&item.namespace, &manifest.digest, &record)?;
        cache.note_referrer(&item.namespace, &item.target_repo, manifest);
        report.manifests += 1;
    }
    for (namespace, repo, tag, digest) in tags {
        let record = TagRecord {
            digest,
            confirmed_at: SystemTime::now(),
        };
        cache.index().put_tag(&namespace, &repo, &tag, &record)?;
    }
    cache.index().flush()?;
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
        let cache = super::open_cache(config).map_err(|e| e.to_string())?;
        let resolver = super::resolver(config);
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
