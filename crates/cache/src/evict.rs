//! The disk budget: access tracking, least-recently-used eviction between the high and low
//! watermarks, and pinned images that are never evicted (and are fetched when missing).
//!
//! Accesses are buffered in memory and written to the index in batches, so a cache hit costs a
//! map insert, not a database write. Removing a blob that a client is still reading is safe:
//! the store's readers keep their bytes (POSIX unlink semantics on the local disk); a fill in
//! progress is staged, out of eviction's reach.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{BlobBody, Cache, RangeRequest, Target};
use regcache_config::PinConfig;
use regcache_oci::{references, Digest, Reference, MAX_MANIFEST_BYTES};
use regcache_store::{AccessRecord, Namespace, Usage};

/// What the pins file looked like when last read: (modification time, length); `None` when it
/// is absent or was never read, both of which mean the configured pins alone.
pub(crate) type PinsStamp = Option<(Option<std::time::SystemTime>, u64)>;

/// How often buffered accesses are written, the budget checked and the pins file re-read.
/// Each is cheap: a batch write, an atomic compare, a small file read.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);

fn now_millis() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// Accesses not yet written to the index, and the signal that usage passed the high mark.
#[derive(Debug, Default)]
pub(crate) struct AccessLog {
    // A std mutex: one insert per blob request, never held across an await.
    pending: Mutex<HashMap<(Namespace, Digest), AccessRecord>>,
    over_budget: tokio::sync::Notify,
    /// The high watermark in bytes, when there is a budget.
    high: Option<f64>,
}

impl AccessLog {
    pub(crate) fn new(budget: Option<Budget>) -> Self {
        Self {
            high: budget.map(|b| b.high),
            ..Self::default()
        }
    }

    /// Notes that a blob was served or written.
    pub(crate) fn touch(&self, namespace: &Namespace, digest: &Digest, size: u64) {
        let record = AccessRecord {
            size,
            last_access: now_millis(),
        };
        let mut pending = self.pending.lock();
        pending.insert((namespace.clone(), *digest), record);
    }

    /// Wakes the maintenance task when `used` passed the high watermark.
    pub(crate) fn check_budget(&self, used: u64) {
        if self.high.is_some_and(|high| used as f64 > high) {
            self.over_budget.notify_one();
        }
    }
}

/// What one eviction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Files removed.
    pub files: u64,
    /// Bytes removed.
    pub bytes: u64,
}

impl Cache {
    /// Writes buffered accesses to the index.
    pub fn flush_access(&self) {
        let entries: Vec<_> = {
            let mut pending = self.access_log.pending.lock();
            pending.drain().map(|((ns, d), r)| (ns, d, r)).collect()
        };
        if let Err(err) = self.index.record_access(&entries) {
            tracing::warn!(error = %err, "could not record blob accesses");
        }
    }

    /// Walks the store at start: counts usage and gives every blob file without an access
    /// record one dated by its modification time (files written by an older version, or before
    /// the index was rebuilt). Blocking.
    pub fn register_existing_files(&self) -> Usage {
        let mut missing = Vec::new();
        let usage = self.store.scan(|blob| {
            let known = self
                .index
                .has_access(&blob.namespace, &blob.digest)
                .unwrap_or(true);
            if !known {
                let millis = blob
                    .modified
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let last_access = u64::try_from(millis).unwrap_or(u64::MAX);
                let record = AccessRecord {
                    size: blob.size,
                    last_access,
                };
                missing.push((blob.namespace, blob.digest, record));
            }
        });
        if let Err(err) = self.index.record_access(&missing) {
            tracing::warn!(error = %err, "could not record existing blobs");
        }
        usage
    }

    /// Every digest the configured pins protect: their manifests, children (for the chosen
    /// platforms) and blobs, as far as they are cached.
    fn pinned(&self) -> HashSet<(Namespace, Digest)> {
        let mut pinned = HashSet::new();
        let pins = self.pins.read().clone();
        for pin in &pins {
            let namespace = &self.namespaces[pin.upstream];
            let root = match &pin.reference {
                Reference::Digest(digest) => Some(*digest),
                Reference::Tag(tag) => self
                    .index
                    .tag(namespace, &pin.repository, tag)
                    .ok()
                    .flatten()
                    .map(|r| r.digest),
            };
            let mut queue: Vec<Digest> = root.into_iter().collect();
            while let Some(digest) = queue.pop() {
                if !pinned.insert((namespace.clone(), digest)) {
                    continue;
                }
                let Ok(Some(bytes)) =
                    self.store
                        .read_small_blocking(namespace, &digest, MAX_MANIFEST_BYTES)
                else {
                    continue;
                };
                let (children, blobs) = references(&bytes, &pin.platforms);
                queue.extend(children);
                for blob in blobs {
                    pinned.insert((namespace.clone(), blob));
                }
            }
        }
        pinned
    }

    /// Evicts least-recently-used blobs when usage is above the high watermark, down to the
    /// low watermark. Pinned content is skipped. Blocking (file removals, index scan).
    pub fn evict_if_needed(&self) -> EvictionReport {
        let mut report = EvictionReport::default();
        let Some(budget) = self.budget else {
            return report;
        };
        let used = self.store.usage().bytes;
        if (used as f64) <= budget.high {
            return report;
        }
        self.flush_access();
        let mut candidates = match self.index.access_records() {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read access records; eviction skipped");
                return report;
            }
        };
        let pinned = self.pinned();
        candidates.retain(|(ns, digest, _)| !pinned.contains(&(ns.clone(), *digest)));
        candidates.sort_by_key(|(_, _, record)| record.last_access);
        let mut used = used;
        let mut evicted_manifests = HashSet::new();
        for (namespace, digest, _) in candidates {
            if (used as f64) <= budget.low {
                break;
            }
            match self.store.remove(&namespace, &digest) {
                Ok(removed) => {
                    let size = removed.unwrap_or(0);
                    let _ = self.index.remove_access(&namespace, &digest);
                    // An evicted manifest takes its index record and the tags pointing at it.
                    if self
                        .index
                        .manifest(&namespace, &digest)
                        .ok()
                        .flatten()
                        .is_some()
                    {
                        let _ = self.index.remove_manifest(&namespace, &digest);
                        evicted_manifests.insert((namespace.clone(), digest));
                    }
                    used = used.saturating_sub(size);
                    // A record whose blob was already gone frees nothing.
                    report.files += u64::from(removed.is_some());
                    report.bytes += size;
                }
                Err(err) => {
                    tracing::warn!(%digest, error = %err, "eviction could not remove a file")
                }
            }
        }
        if !evicted_manifests.is_empty() {
            for (namespace, repo, tag, record) in self.index.tags().unwrap_or_default() {
                if evicted_manifests.contains(&(namespace.clone(), record.digest)) {
                    let _ = self.index.remove_tag(&namespace, &repo, &tag);
                }
            }
        }
        self.metrics.evictions.inc_by(report.files);
        self.metrics.evicted_bytes.inc_by(report.bytes);
        tracing::info!(
            files = report.files,
            bytes = report.bytes,
            budget = budget.max,
            "evicted to stay under the storage budget"
        );
        report
    }

    /// Re-reads `pins.toml` (written by `regcache pin`) when its modification time or length
    /// changed since the last read; returns whether the pins changed. Blocking.
    fn reload_pins(&self) -> bool {
        let stamp = std::fs::metadata(&self.pins_file)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if std::mem::replace(&mut *self.pins_stamp.lock(), stamp) == stamp {
            return false;
        }
        let from_file = super::PinsFile::read(&self.pins_file).and_then(|file| {
            file.validate(&self.upstream_configs)
                .map_err(super::PinsError::from)
        });
        let from_file = match from_file {
            Ok(pins) => pins,
            Err(err) => {
                tracing::warn!(file = %self.pins_file.display(), error = %err, "ignoring the pins file");
                return false;
            }
        };
        let mut all = self.config_pins.clone();
        all.extend(from_file);
        let mut pins = self.pins.write();
        let changed = *pins != all;
        *pins = all;
        changed
    }

    /// Runs until `shutdown`: flushes accesses and enforces the budget every few seconds, or
    /// at once when a fill pushes usage past the high watermark; picks up new pins.
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
                () = self.access_log.over_budget.notified() => {}
            }
            // Access records, eviction and the pins file are disk work: off the async workers.
            let cache = Arc::clone(&self);
            let pins_changed = tokio::task::spawn_blocking(move || {
                cache.flush_access();
                cache.evict_if_needed();
                cache.reload_pins()
            })
            .await
            .unwrap_or(false);
            if pins_changed {
                tokio::spawn(Arc::clone(&self).prefetch_pins());
            }
        }
        self.flush_access();
    }

    /// Fetches every pinned image that is not fully cached. Best effort: failures are logged
    /// and retried at the next start.
    pub async fn prefetch_pins(self: Arc<Self>) {
        let cache = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || cache.reload_pins()).await;
        let pins = self.pins.read().clone();
        for pin in pins {
            let target = Target {
                upstream: pin.upstream,
                repo: pin.repository.clone(),
            };
            if let Err(err) = self.prefetch(&target, &pin).await {
                tracing::warn!(repo = %pin.repository, reference = %pin.reference, error = %err, "could not prefetch pinned image");
            }
        }
    }

    async fn prefetch(
        self: &Arc<Self>,
        target: &Target,
        pin: &PinConfig,
    ) -> Result<(), super::CacheError> {
        let root = self.manifest(target, &pin.reference, &[]).await?;
        let mut queue = vec![root.manifest];
        while let Some(manifest) = queue.pop() {
            let (children, blobs) = references(&manifest.bytes, &pin.platforms);
            for child in children {
                let answer = self
                    .manifest(target, &Reference::Digest(child), &[])
                    .await?;
                queue.push(answer.manifest);
            }
            for blob in blobs {
                if let Ok(mut answer) = self.blob(target, &blob, RangeRequest::Full).await? {
                    if let BlobBody::Filling(_) = answer.body {
                        while let Some(chunk) = answer.body.next_chunk().await {
                            chunk.map_err(|_| super::CacheError::FillAborted)?;
                        }
                    }
                }
            }
        }
        tracing::info!(repo = %pin.repository, reference = %pin.reference, "pinned image cached");
        Ok(())
    }
}

/// The budget in bytes at each watermark.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) max: u64,
    pub(crate) high: f64,
    pub(crate) low: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_removes_least_recently_used_blobs_down_to_the_low_mark_and_skips_pins() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 3000]).collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        // 10 KiB budget: eviction above 9216 bytes, down to 7168. The oldest blob is pinned.
        let config = regcache_config::Config::parse(&format!(
            "[storage]\npath = {:?}\nmax_size = \"10KiB\"\nhigh_watermark = 0.9\n\
             low_watermark = 0.7\n\
             [[upstream]]\nname = \"registry.test\"\nurl = \"http://127.0.0.1:9\"\n\
             default = true\n\
             [[pin]]\nupstream = \"registry.test\"\nrepository = \"test/a\"\n\
             reference = \"{}\"\n",
            dir.path().display().to_string(),
            digests[0]
        ))
        .expect("config");
        let (store, index) =
            regcache_store::open_storage(&config.storage, regcache_store::IndexAccess::Serve)
                .expect("storage");
        let namespace = Namespace::new("registry.test");
        let mut records = Vec::new();
        for (age, (bytes, digest)) in blobs.iter().zip(&digests).enumerate() {
            store.put_verified(&namespace, digest, bytes).expect("put");
            let record = AccessRecord {
                size: bytes.len() as u64,
                last_access: 1000 + age as u64,
            };
            records.push((namespace.clone(), *digest, record));
        }
        index.record_access(&records).expect("records");
        let cache = Cache::new(
            &config,
            store,
            index,
            Arc::new(regcache_metrics::Metrics::new()),
        )
        .expect("cache");
        let report = cache.evict_if_needed();
        assert_eq!(
            report,
            EvictionReport {
                files: 2,
                bytes: 6000
            }
        );
        let kept = |digest: &Digest| cache.store().contains(&namespace, digest);
        assert!(
            kept(&digests[0]),
            "the pinned (and oldest) blob was evicted"
        );
        assert!(!kept(&digests[1]), "the least recently used blob stayed");
        assert!(
            !kept(&digests[2]),
            "the next least recently used blob stayed"
        );
        assert!(kept(&digests[3]), "eviction went below the low watermark");
        assert_eq!(cache.store().usage().bytes, 6000);
        assert_eq!(
            cache.evict_if_needed(),
            EvictionReport::default(),
            "under budget"
        );
    }
}
