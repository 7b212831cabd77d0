//! Upkeep of the disk budget: access tracking, and least-recently-used eviction between the
//! high and low watermarks (what pins protect is skipped; the cache asks [`crate::pins`]).
//!
//! Accesses are buffered in memory and written to the index in batches, so a cache hit costs a
//! map insert, not a database write. Removing a blob that a client is still reading is safe:
//! the store's readers keep their bytes (POSIX unlink semantics on the local disk); a fill in
//! progress is staged, out of eviction's reach.

use parking_lot::Mutex;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use regcache_config::StorageConfig;
use regcache_oci::Digest;
use regcache_store::{AccessRecord, Namespace, Usage, MAX_BATCH};

use crate::parts::Parts;

fn now_millis() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// Accesses not yet written to the index, and the signal that usage passed the high mark.
/// Shared with the fills, which note what they wrote.
#[derive(Debug, Default)]
pub(crate) struct AccessLog {
    // One insert per blob request, never held across an await.
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

/// Most eviction victims chosen per round: the oldest access records whose recorded sizes
/// cover the bytes to free, at most this many, kept in a bounded heap while every record
/// streams past (56 bytes each, 28 MiB; memory does not grow with the store, and half of a
/// million blobs goes in one round: one scan of the index, each of its pages rewritten once).
#[cfg(not(test))]
const EVICTION_ROUND: usize = 524_288;
/// Two in unit tests, so that a test's handful of blobs takes several rounds.
#[cfg(test)]
const EVICTION_ROUND: usize = 2;

/// Threads removing one round's victims' files at once.
const EVICTION_THREADS: usize = 4;

/// Threads forgetting one batch's records at once.
const INDEX_THREADS: usize = 2;

/// An eviction candidate; ordered by last access first (the heap keeps the oldest). 56 bytes
/// and no allocation of its own: the namespace is shared by every victim of that upstream.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Victim {
    last_access: u64,
    namespace: Arc<Namespace>,
    digest: Digest,
    size: u64,
}

/// What one round of eviction did.
#[derive(Debug, Default)]
struct RoundOutcome {
    /// Access records forgotten (their files removed, or already gone).
    forgotten: usize,
    /// Files removed.
    files: u64,
    /// Bytes they freed.
    bytes: u64,
    /// The evicted manifests (whose tags go too).
    manifests: Vec<(Namespace, Digest)>,
    /// The index error that stopped the round, if one did.
    failed: Option<regcache_store::StoreError>,
    /// Time spent forgetting records (manifest lookups, removals, flushes); the rest of the
    /// round waits on file removals. Where a round's time goes, for the debug log.
    index_time: std::time::Duration,
}

/// The budget in bytes at each watermark.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) max: u64,
    pub(crate) high: f64,
    pub(crate) low: f64,
}

/// The upkeep service: owns the access log and the budget; reads and removes through the
/// store and index handles it shares with the rest of the cache.
#[derive(Debug)]
pub(crate) struct Upkeep {
    parts: Arc<Parts>,
    budget: Option<Budget>,
    access: Arc<AccessLog>,
}

impl Upkeep {
    /// The budget of `[storage]` (`max_size` and the watermarks) over this store and index.
    pub(crate) fn new(storage: &StorageConfig, parts: Arc<Parts>) -> Self {
        let budget = storage.max_size.map(|max| Budget {
            max,
            high: max as f64 * storage.high_watermark,
            low: max as f64 * storage.low_watermark,
        });
        Self {
            parts,
            budget,
            access: Arc::new(AccessLog::new(budget)),
        }
    }

    /// The access log, shared with the services that serve (manifests, blobs) and the fills
    /// (which note what they wrote).
    pub(crate) fn access_log(&self) -> &Arc<AccessLog> {
        &self.access
    }

    /// The bytes the store may hold before eviction starts, when there is a budget.
    pub(crate) fn high_watermark(&self) -> Option<u64> {
        self.budget.map(|budget| budget.high as u64)
    }

    /// Resolves when a fill pushed usage past the high watermark.
    pub(crate) async fn over_budget(&self) {
        self.access.over_budget.notified().await;
    }

    /// Writes buffered accesses to the index.
    pub(crate) fn flush_access(&self) {
        let entries: Vec<_> = {
            let mut pending = self.access.pending.lock();
            pending.drain().map(|((ns, d), r)| (ns, d, r)).collect()
        };
        if let Err(err) = self.parts.index.record_access(&entries) {
            tracing::warn!(error = %err, "could not record blob accesses");
        }
    }

    /// Walks the store at start: counts usage and gives every blob file without an access
    /// record one dated by its modification time (files written by an older version, or before
    /// the index was rebuilt). Blocking.
    pub(crate) fn register_existing_files(&self) -> Usage {
        // Recorded in bounded batches as the walk goes: never a list of the whole store.
        let mut missing = Vec::with_capacity(MAX_BATCH);
        let flush = |missing: &mut Vec<_>| {
            if let Err(err) = self.parts.index.record_access(missing) {
                tracing::warn!(error = %err, "could not record existing blobs");
            }
            missing.clear();
        };
        let usage = self.parts.store.scan(|blob| {
            let known = self
                .parts
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
                if missing.len() >= MAX_BATCH {
                    flush(&mut missing);
                }
            }
        });
        flush(&mut missing);
        // Blobs an earlier process removed but did not get to unlink.
        self.empty_trash();
        usage
    }

    /// Evicts least-recently-used blobs when usage is above the high watermark, down to the
    /// low watermark. What `protected` returns (pinned images; asked only when eviction runs) is
    /// skipped. Blocking (file removals, index scan).
    pub(crate) fn evict_if_needed(
        &self,
        protected: impl FnOnce() -> HashSet<(Namespace, Digest)>,
    ) -> EvictionReport {
        let mut report = EvictionReport::default();
        let Some(budget) = self.budget else {
            return report;
        };
        let used = self.parts.store.usage().bytes;
        if (used as f64) <= budget.high {
            return report;
        }
        let started = Instant::now();
        self.flush_access();
        let protected = protected();
        let mut used = used;
        let mut evicted_manifests = HashSet::new();
        // Rounds of the oldest records (a bounded heap while every record streams past), until
        // the low watermark, or a round that forgets no record (nothing left, or nothing
        // removable).
        while (used as f64) > budget.low {
            let round = Instant::now();
            let excess = used as f64 - budget.low;
            let mut victims = match self.oldest(&protected, excess, EVICTION_ROUND) {
                Ok(victims) => victims,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read access records; eviction stopped");
                    break;
                }
            };
            // As many of the oldest as their recorded sizes say are needed, removed by a few
            // threads at once (file removals and index writes, not CPU); the next round
            // corrects for records whose size was off.
            let mut recorded = 0.0;
            let needed = victims
                .iter()
                .take_while(|victim| {
                    let more = recorded < excess;
                    recorded += victim.size as f64;
                    more
                })
                .count();
            // In key order: the keys are random, so in time order every batch would touch
            // pages all over the access tree (with a page cache much smaller than the tree,
            // reading most of them from disk again); in key order a batch stays on a few
            // neighbouring pages. (1 000 000 blobs: 49 µs a victim in the index before.)
            victims[..needed]
                .sort_unstable_by(|a, b| (&*a.namespace, a.digest).cmp(&(&*b.namespace, b.digest)));
            let chosen = round.elapsed();
            let outcome = self.evict_all(&victims[..needed]);
            tracing::debug!(
                victims = needed,
                choose_ms = regcache_metrics::log_millis(chosen),
                remove_ms = regcache_metrics::log_millis(round.elapsed() - chosen),
                index_ms = regcache_metrics::log_millis(outcome.index_time),
                "eviction round"
            );
            used = used.saturating_sub(outcome.bytes);
            report.files += outcome.files;
            report.bytes += outcome.bytes;
            evicted_manifests.extend(outcome.manifests);
            if let Some(err) = outcome.failed {
                tracing::warn!(error = %err, "eviction could not forget access records; eviction stopped");
                break;
            }
            if outcome.forgotten == 0 {
                break;
            }
        }
        if !evicted_manifests.is_empty() {
            for (namespace, repo, tag, record) in self.parts.index.tags().unwrap_or_default() {
                if evicted_manifests.contains(&(namespace.clone(), record.digest)) {
                    let _ = self.parts.index.remove_tag(&namespace, &repo, &tag);
                }
            }
        }
        self.parts.metrics.evictions.inc_by(report.files);
        self.parts.metrics.evicted_bytes.inc_by(report.bytes);
        tracing::info!(
            files = report.files,
            bytes = report.bytes,
            budget = budget.max,
            elapsed_ms = regcache_metrics::log_millis(started.elapsed()),
            "evicted to stay under the storage budget"
        );
        self.parts
            .metrics
            .events
            .emit(regcache_metrics::Event::Evicted {
                files: report.files,
                bytes: report.bytes,
            });
        self.empty_trash();
        report
    }

    /// Unlinks what eviction (or an earlier process) moved to the store's trash. Blocking.
    fn empty_trash(&self) {
        let started = Instant::now();
        match self.parts.store.empty_trash() {
            Ok(0) => {}
            Ok(files) => tracing::info!(
                files,
                elapsed_ms = regcache_metrics::log_millis(started.elapsed()),
                "freed the space of removed blobs"
            ),
            Err(err) => tracing::warn!(error = %err, "could not empty the store's trash"),
        }
    }

    /// The oldest access records not `protected` whose recorded sizes add up to `excess`
    /// bytes (at most `most` of them), oldest first, chosen in one pass over the
    /// index with a bounded heap. A record newer than the heap's newest, once the heap is
    /// full, is passed over on its time alone, without decoding its key.
    fn oldest(
        &self,
        protected: &HashSet<(Namespace, Digest)>,
        excess: f64,
        most: usize,
    ) -> Result<Vec<Victim>, regcache_store::StoreError> {
        let mut heap: BinaryHeap<Victim> = BinaryHeap::new();
        // The recorded bytes of the victims in the heap.
        let mut held = 0.0;
        // One per upstream: victims share them.
        let mut namespaces: Vec<Arc<Namespace>> = Vec::new();
        self.parts.index.for_each_access(|entry| {
            let record = entry.record;
            let full = heap.len() >= most || held >= excess;
            if full
                && heap
                    .peek()
                    .is_some_and(|newest| record.last_access >= newest.last_access)
            {
                return;
            }
            let Some(key) = entry.blob() else {
                return;
            };
            if protected.contains(&key) {
                return;
            }
            let namespace = match namespaces.iter().find(|known| ***known == key.0) {
                Some(known) => Arc::clone(known),
                None => {
                    let new = Arc::new(key.0);
                    namespaces.push(Arc::clone(&new));
                    new
                }
            };
            heap.push(Victim {
                last_access: record.last_access,
                namespace,
                digest: key.1,
                size: record.size,
            });
            held += record.size as f64;
            // The newest go while the rest still cover the excess (or are too many).
            while let Some(newest) = heap.peek() {
                let size = newest.size as f64;
                if heap.len() <= most && held - size < excess {
                    break;
                }
                held -= size;
                heap.pop();
            }
        })?;
        Ok(heap.into_sorted_vec())
    }

    /// Evicts `victims`, a batch at a time: their access records (and manifest records) are
    /// forgotten first (on [`INDEX_THREADS`] threads) and flushed, then their files removed on
    /// [`EVICTION_THREADS`] threads while the next batch's records are forgotten. Record
    /// first: a crash in between leaves a file without a record, which the next start's walk
    /// records again; never a record that says a blob is there when its file is gone.
    fn evict_all(&self, victims: &[Victim]) -> RoundOutcome {
        let (work, queue) = std::sync::mpsc::sync_channel::<&Victim>(MAX_BATCH);
        let queue = Mutex::new(queue);
        let (files, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let kept = Mutex::new(Vec::new());
        // Records are forgotten by INDEX_THREADS threads at once, a part of each batch each
        // (sled's tree takes concurrent writers; a sled batch would serialise them).
        let (parts, part_queue) = std::sync::mpsc::sync_channel::<&[Victim]>(INDEX_THREADS);
        let part_queue = Mutex::new(part_queue);
        let (done, forgotten_parts) = std::sync::mpsc::channel();
        let mut outcome = RoundOutcome::default();
        std::thread::scope(|scope| {
            for _ in 0..EVICTION_THREADS {
                scope.spawn(|| loop {
                    let next = queue.lock().recv();
                    let Ok(victim) = next else { break };
                    match self.remove_file(victim) {
                        Ok(Some(freed)) => {
                            files.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(freed, Ordering::Relaxed);
                        }
                        // Already gone: its record is forgotten, nothing freed.
                        Ok(None) => {}
                        Err(()) => kept.lock().push(victim),
                    }
                });
            }
            for _ in 0..INDEX_THREADS {
                let (part_queue, done) = (&part_queue, done.clone());
                scope.spawn(move || loop {
                    let next = part_queue.lock().recv();
                    let Ok(part) = next else { break };
                    if done.send(self.forget_records(part)).is_err() {
                        break;
                    }
                });
            }
            drop(done);
            'batches: for batch in victims.chunks(MAX_BATCH) {
                let forgetting = Instant::now();
                let mut sent = 0;
                for part in batch.chunks(batch.len().div_ceil(INDEX_THREADS)) {
                    if parts.send(part).is_ok() {
                        sent += 1;
                    }
                }
                let mut forgotten = Ok(());
                for _ in 0..sent {
                    // An index thread panicked: no file of this batch goes (the scope passes
                    // the panic on).
                    let Ok((manifests, result)) = forgotten_parts.recv() else {
                        break 'batches;
                    };
                    outcome.manifests.extend(manifests);
                    forgotten = forgotten.and(result);
                }
                // On disk before any file goes (sled otherwise writes every 500 ms): a crash
                // must not bring back records of removed files.
                let flushed = forgotten.and_then(|()| self.parts.index.flush());
                outcome.index_time += forgetting.elapsed();
                if let Err(err) = flushed {
                    outcome.failed = Some(err);
                    break;
                }
                outcome.forgotten += batch.len();
                for victim in batch {
                    if work.send(victim).is_err() {
                        break;
                    }
                }
            }
            drop((work, parts));
        });
        // A file that could not be removed is still in the store: its record goes back.
        let kept: Vec<_> = kept
            .into_inner()
            .into_iter()
            .map(|victim| {
                let record = AccessRecord {
                    size: victim.size,
                    last_access: victim.last_access,
                };
                (Namespace::clone(&victim.namespace), victim.digest, record)
            })
            .collect();
        outcome.forgotten -= kept.len();
        if let Err(err) = self.parts.index.record_access(&kept) {
            tracing::warn!(error = %err, "could not record again blobs eviction could not remove");
        }
        outcome.files = files.into_inner();
        outcome.bytes = bytes.into_inner();
        outcome
    }

    /// Forgets the records of `victims`: their access records, and the manifest records of
    /// those that are manifests (returned: their tags go after the round).
    fn forget_records(
        &self,
        victims: &[Victim],
    ) -> (
        Vec<(Namespace, Digest)>,
        Result<(), regcache_store::StoreError>,
    ) {
        let mut manifests = Vec::new();
        let mut blobs = Vec::with_capacity(victims.len());
        for victim in victims {
            let blob = (Namespace::clone(&victim.namespace), victim.digest);
            if self.forget_manifest(victim) {
                manifests.push(blob.clone());
            }
            blobs.push(blob);
        }
        (manifests, self.parts.index.forget_accesses(&blobs))
    }

    /// Forgets a victim's manifest record, if it is a manifest (its tags go after the round).
    fn forget_manifest(&self, victim: &Victim) -> bool {
        let (namespace, digest) = (&victim.namespace, &victim.digest);
        let manifest = self.parts.index.manifest(namespace, digest);
        if !matches!(manifest, Ok(Some(_))) {
            return false;
        }
        let _ = self.parts.index.remove_manifest(namespace, digest);
        true
    }

    /// Removes a victim's file: the bytes freed (`None`: it was already gone), or `Err` when
    /// the file could not be removed (logged).
    fn remove_file(&self, victim: &Victim) -> Result<Option<u64>, ()> {
        self.parts
            .store
            .remove(&victim.namespace, &victim.digest)
            .map_err(|err| {
                tracing::warn!(digest = %victim.digest, error = %err, "eviction could not remove a file");
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cache;

    /// A cache over a store under `dir` with `storage_lines` in `[storage]` (and `extra` TOML
    /// after the upstream), holding `blobs`, the n-th last accessed at 1000 + n; `lost` records
    /// (digest, last access) have no file. Returns the cache and the blobs' digests.
    fn cache_with(
        dir: &std::path::Path,
        storage_lines: &str,
        extra: &str,
        blobs: &[Vec<u8>],
        lost: &[(Digest, u64)],
    ) -> (Cache, Vec<Digest>) {
        let config = regcache_config::Config::parse(&format!(
            "[storage]\npath = {:?}\n{storage_lines}\n\
             [[upstream]]\nname = \"registry.test\"\nurl = \"http://127.0.0.1:9\"\n\
             default = true\n{extra}",
            dir.display().to_string()
        ))
        .expect("config");
        let (store, index) =
            regcache_store::open_storage(&config.storage, regcache_store::IndexAccess::Serve)
                .expect("storage");
        let namespace = Namespace::new("registry.test");
        let mut records: Vec<_> = lost
            .iter()
            .map(|(digest, last_access)| {
                let record = AccessRecord {
                    size: 1000,
                    last_access: *last_access,
                };
                (namespace.clone(), *digest, record)
            })
            .collect();
        let mut digests = Vec::new();
        for (age, bytes) in blobs.iter().enumerate() {
            let digest = Digest::of(bytes);
            store.put_verified(&namespace, &digest, bytes).expect("put");
            let record = AccessRecord {
                size: bytes.len() as u64,
                last_access: 1000 + age as u64,
            };
            records.push((namespace.clone(), digest, record));
            digests.push(digest);
        }
        index.record_access(&records).expect("records");
        let metrics = Arc::new(regcache_metrics::Metrics::new());
        let cache = Cache::new(&config, store, index, metrics).expect("cache");
        (cache, digests)
    }

    #[test]
    fn eviction_removes_least_recently_used_blobs_down_to_the_low_mark_and_skips_pins() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 3000]).collect();
        // 10 KiB budget: eviction above 9216 bytes, down to 7168. The oldest blob is pinned.
        let pin = format!(
            "[[pin]]\nupstream = \"registry.test\"\nrepository = \"test/a\"\n\
             reference = \"{}\"\n",
            Digest::of(&blobs[0])
        );
        let (cache, digests) = cache_with(
            dir.path(),
            "max_size = \"10KiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.7",
            &pin,
            &blobs,
            &[],
        );
        let namespace = Namespace::new("registry.test");
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

    #[test]
    fn eviction_takes_as_many_rounds_as_it_needs_oldest_first_and_forgets_records_of_lost_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 10 blobs of 1000 bytes; 8 KiB budget: eviction above 7373 bytes, down to 4096, so
        // six go, oldest first (three rounds of two here). The oldest record of all has no
        // file: it is forgotten and frees nothing.
        let blobs: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1000]).collect();
        let lost = Digest::of(b"lost");
        let (cache, digests) = cache_with(
            dir.path(),
            "max_size = \"8KiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.5",
            "",
            &blobs,
            &[(lost, 1)],
        );
        let namespace = Namespace::new("registry.test");
        let report = cache.evict_if_needed();
        assert_eq!(
            report,
            EvictionReport {
                files: 6,
                bytes: 6000
            }
        );
        for (i, digest) in digests.iter().enumerate() {
            assert_eq!(
                cache.store().contains(&namespace, digest),
                i >= 6,
                "blob {i} (older blobs go first)"
            );
        }
        assert!(
            !cache.index().has_access(&namespace, &lost).expect("index"),
            "the record of a lost file is forgotten"
        );
    }

    #[test]
    fn a_round_takes_the_oldest_records_that_cover_the_excess_in_one_pass() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs: Vec<Vec<u8>> = [1000, 500, 2000, 100, 3000]
            .iter()
            .enumerate()
            .map(|(i, &len)| vec![i as u8; len])
            .collect();
        let (cache, digests) = cache_with(dir.path(), "", "", &blobs, &[]);
        let chosen = |excess: f64, most: usize| -> Vec<Digest> {
            let victims = cache.upkeep.oldest(&HashSet::new(), excess, most);
            victims
                .expect("index")
                .iter()
                .map(|victim| victim.digest)
                .collect()
        };
        // 1000 + 500 + 2000 bytes are the fewest oldest that cover 2600.
        assert_eq!(chosen(2600.0, 100), digests[..3]);
        assert_eq!(chosen(1000.0, 100), digests[..1]);
        assert_eq!(
            chosen(1e9, 100),
            digests,
            "everything, when nothing covers it"
        );
        assert_eq!(chosen(2600.0, 2), digests[..2], "at most `most`");
        // The protected are passed over: 500 + 2000 + 100 then.
        let protected = HashSet::from([(Namespace::new("registry.test"), digests[0])]);
        let victims = cache.upkeep.oldest(&protected, 2600.0, 100);
        let victims: Vec<_> = victims.expect("index").iter().map(|v| v.digest).collect();
        assert_eq!(victims, digests[1..4]);
    }
}
