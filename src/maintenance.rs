//! Offline maintenance commands over a store: `verify` (re-hash everything, quarantine what is
//! corrupt, drop index entries that point nowhere), `gc` (temp files and orphan records) and
//! `ls` (what is cached). They open the storage as the server does (`store::open_store`, with
//! `backend = "s3"` the bucket behind the local tier) and judge index entries by every tier,
//! so an entry whose bytes only the bucket holds is kept. The index (sled) admits one process,
//! so while a server runs they do the file-level part and say that the index part was skipped.
//! Only `verify --repair` moves a corrupt index aside; the others report it and change nothing.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::config::Config;
use crate::oci::{manifest_digest, sniff_media_type, ImageWalk, MAX_MANIFEST_BYTES};
use crate::store::{open_index, open_store, Index, IndexAccess, ManifestRecord, Store, StoreError};

/// What `verify` found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Files re-hashed.
    pub checked: u64,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Files whose bytes did not match their digest (moved to `quarantine/`).
    pub corrupt: Vec<String>,
    /// Index entries dropped because their file is missing.
    pub dropped_entries: u64,
    /// Manifest records recreated from files (with `--repair`).
    pub rebuilt_manifests: u64,
    /// Why the index part did not run, if it did not.
    pub index_skipped: Option<String>,
    /// Whether the index database could not be read (left as it is; `--repair` rebuilds it).
    pub index_corrupt: bool,
}

impl VerifyReport {
    /// Whether everything was sound.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.dropped_entries == 0 && !self.index_corrupt
    }
}

/// Re-hashes every file in parallel (one thread per core) with a progress bar on stderr.
///
/// # Errors
/// [`StoreError`] when the store cannot be opened.
pub fn verify(config: &Config, repair: bool, progress: bool) -> Result<VerifyReport, StoreError> {
    let store = open_store(&config.storage)?;
    let access = if repair {
        IndexAccess::Repair
    } else {
        IndexAccess::Existing
    };
    // Opened first: a running server (which holds it) stops the command before any work.
    let index = match open_index(&config.storage, access) {
        Err(err) if !skips_index(&err) => return Err(err),
        opened => opened,
    };
    let mut files = Vec::new();
    let usage = store.scan(|blob| files.push((blob.namespace, blob.digest, blob.size)));
    let bar = if progress {
        indicatif::ProgressBar::new(usage.bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = AtomicU64::new(0);
    let corrupt = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index =
                    usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
                let Some((namespace, digest, size)) = files.get(index) else {
                    break;
                };
                // A file removed meanwhile (eviction by a running server) is not corruption.
                if let Ok(Some(false)) = store.verify(namespace, digest) {
                    corrupt.lock().push((namespace.clone(), *digest));
                }
                bar.inc(*size);
            });
        }
    });
    bar.finish_and_clear();
    let mut report = VerifyReport {
        checked: usage.files,
        bytes: usage.bytes,
        ..VerifyReport::default()
    };
    for (namespace, digest) in corrupt.into_inner() {
        match store.quarantine(&namespace, &digest) {
            Ok(moved) => tracing::warn!(%digest, to = %moved, "corrupt file quarantined"),
            Err(err) => {
                tracing::error!(%digest, error = %err, "could not quarantine a corrupt file")
            }
        }
        report
            .corrupt
            .push(format!("{}/{digest}", namespace.as_str()));
    }
    match index {
        Ok(index) => check_index(&store, &index, repair, &mut report)?,
        Err(err) if skips_index(&err) => {
            report.index_corrupt = matches!(err, StoreError::IndexCorrupt { .. });
            report.index_skipped = Some(err.to_string());
        }
        Err(err) => return Err(err),
    }
    Ok(report)
}

/// Whether a failure to open the index only means skipping the index part: the database is
/// missing or corrupt (not repairing). One a running server holds is an error: the command
/// would judge a store that changes under it.
fn skips_index(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::IndexMissing { .. } | StoreError::IndexCorrupt { .. }
    )
}

fn check_index(
    store: &Store,
    index: &Index,
    repair: bool,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    for (namespace, digest) in index.manifest_digests()? {
        if store.stat_anywhere(&namespace, &digest)?.is_none() {
            index.remove_manifest(&namespace, &digest)?;
            report.dropped_entries += 1;
        }
    }
    // Streamed: only the records to drop are kept (and the first error, which stops it).
    let mut gone = Vec::new();
    let mut failed = None;
    index.for_each_access(|entry| {
        let Some((namespace, digest)) = entry.blob().filter(|_| failed.is_none()) else {
            return;
        };
        match store.stat_anywhere(&namespace, &digest) {
            Ok(Some(_)) => {}
            Ok(None) => gone.push((namespace, digest)),
            Err(err) => failed = Some(err),
        }
    })?;
    if let Some(err) = failed {
        return Err(err);
    }
    index.remove_accesses(&gone)?;
    report.dropped_entries += gone.len() as u64;
    for (namespace, repo, tag, record) in index.tags()? {
        if store.stat_anywhere(&namespace, &record.digest)?.is_none() {
            index.remove_tag(&namespace, &repo, &tag)?;
            report.dropped_entries += 1;
        }
    }
    if repair {
        report.rebuilt_manifests = rebuild_manifests(store, index)?;
    }
    index.flush()
}

/// Recreates manifest records from the files that are manifests (tags return as clients ask
/// for them and the upstream confirms them).
fn rebuild_manifests(store: &Store, index: &Index) -> Result<u64, StoreError> {
    let mut small = Vec::new();
    store.scan(|blob| {
        if blob.size <= MAX_MANIFEST_BYTES as u64 {
            small.push((blob.namespace, blob.digest));
        }
    });
    let mut rebuilt = 0;
    for (namespace, digest) in small {
        if index.manifest(&namespace, &digest)?.is_some() {
            continue;
        }
        let Ok(Some(bytes)) = store.read_small_blocking(&namespace, &digest, MAX_MANIFEST_BYTES)
        else {
            continue;
        };
        let Some(media_type) = sniff_media_type(&bytes) else {
            continue;
        };
        if manifest_digest(&bytes, &media_type) == digest {
            index.put_manifest(&namespace, &digest, &ManifestRecord { media_type })?;
            rebuilt += 1;
        }
    }
    Ok(rebuilt)
}

/// What `gc` removed.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Temp files removed.
    pub temp_files: usize,
    /// Bytes they held.
    pub temp_bytes: u64,
    /// Removed blobs unlinked from the store's trash (left by an eviction cut short).
    pub trash_files: u64,
    /// Index entries whose file was gone.
    pub orphan_entries: u64,
    /// Why the index part did not run, if it did not.
    pub index_skipped: Option<String>,
}

/// Removes temp files (all of them when no server holds the index, otherwise only those
/// older than an hour) and index entries that point at missing files.
///
/// # Errors
/// [`StoreError`] when the store cannot be opened.
pub fn gc(config: &Config) -> Result<GcReport, StoreError> {
    let store = open_store(&config.storage)?;
    let mut report = GcReport::default();
    let index = match open_index(&config.storage, IndexAccess::Existing) {
        Ok(index) => Some(index),
        Err(err) if skips_index(&err) => {
            report.index_skipped = Some(err.to_string());
            None
        }
        Err(err) => return Err(err),
    };
    let min_age = if index.is_some() {
        Duration::ZERO
    } else {
        Duration::from_secs(3600)
    };
    (report.temp_files, report.temp_bytes) = store.discard_staged(min_age)?;
    report.trash_files = store.empty_trash()?;
    if let Some(index) = index {
        let mut verify = VerifyReport::default();
        check_index(&store, &index, false, &mut verify)?;
        report.orphan_entries = verify.dropped_entries;
    }
    Ok(report)
}

/// One cached tag, for `ls`.
#[derive(Debug, Serialize)]
pub struct ListedTag {
    /// The upstream's name.
    pub upstream: String,
    /// The repository on it.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// The manifest it pointed at when last confirmed.
    pub digest: String,
    /// Bytes of the manifest and every cached blob it references (children included).
    pub cached_bytes: u64,
    /// Last confirmation by the upstream, RFC 3339 in UTC to the second.
    pub confirmed_at: String,
    /// Latest access to any of its blobs, RFC 3339 in UTC to the second (`None`: never
    /// recorded).
    pub last_access: Option<String>,
    /// Which freshness applies: `tag_rule 1 (ttl never)`, `cache.tag_ttl (1m)` (`None` for
    /// an upstream no longer configured).
    pub freshness: Option<String>,
}

/// Lists cached tags. Needs the index, so not while a server runs; changes nothing (a corrupt
/// index is an error naming `verify --repair`).
///
/// # Errors
/// [`StoreError`]: the store cannot be opened, the index is missing, corrupt or in use.
pub fn list(config: &Config) -> Result<Vec<ListedTag>, StoreError> {
    let store = open_store(&config.storage)?;
    let index = open_index(&config.storage, IndexAccess::Existing)?;
    let mut listed = Vec::new();
    for (namespace, repo, tag, record) in index.tags()? {
        let mut cached_bytes = 0;
        let mut last_access = 0;
        let mut walk = ImageWalk::new(record.digest, &[]);
        while let Some(digest) = walk.next_manifest() {
            if index.manifest(&namespace, &digest).ok().flatten().is_some() {
                if let Ok(Some(bytes)) =
                    store.read_small_anywhere(&namespace, &digest, MAX_MANIFEST_BYTES)
                {
                    walk.read(&bytes);
                }
            }
        }
        let manifests = walk.manifests().to_vec();
        for digest in manifests.into_iter().chain(walk.into_blobs()) {
            let Ok(Some(size)) = store.stat_anywhere(&namespace, &digest) else {
                continue;
            };
            cached_bytes += size;
            let record = index.access(&namespace, &digest).ok().flatten();
            last_access = last_access.max(record.map_or(0, |r| r.last_access));
        }
        listed.push(ListedTag {
            upstream: namespace.as_str().to_owned(),
            repository: repo.to_string(),
            tag: tag.to_string(),
            digest: record.digest.to_string(),
            cached_bytes,
            confirmed_at: humantime::format_rfc3339_seconds(record.confirmed_at).to_string(),
            last_access: (last_access > 0).then(|| {
                let at = UNIX_EPOCH + Duration::from_millis(last_access);
                humantime::format_rfc3339_seconds(at).to_string()
            }),
            freshness: config
                .upstreams
                .iter()
                .find(|u| u.name == namespace.as_str())
                .map(|u| u.freshness_of(tag.as_str(), config.cache.tag_ttl)),
        });
    }
    listed.sort_by(|a, b| {
        (&a.upstream, &a.repository, &a.tag).cmp(&(&b.upstream, &b.repository, &b.tag))
    });
    Ok(listed)
}
