//! [`Tier`]: a local disk in front of a shared bucket (`[storage] backend = "s3"`).
//!
//! - Writes go to both: the local staged file (which readers of a fill follow, as with the
//!   local backend) and the bucket's upload, part by part while the fill runs. A commit
//!   completes the bucket upload first, then the local file: a blob is never visible locally
//!   without being in the bucket, and in neither before the store verified its digest.
//! - Reads are local. A blob only the bucket has (another replica fetched it) is promoted:
//!   copied into the local tier while hashing, committed there only when it matches its
//!   digest, then served from the local file.
//! - Eviction (`storage.max_size`) removes local copies only; the bucket keeps every object
//!   (its size is the bucket's business: a lifecycle rule, or `regcache gc` on a replica).
//! - Readiness fails while the bucket has never answered since start (a misconfigured
//!   replica), but an outage after that is reported without failing it: every replica shares
//!   the bucket, and their local tiers still serve.
//! - `stage`, `stat` and `remove` touch only the local disk, so the store may call them from
//!   async code; everything that talks to the bucket runs on the store's blocking threads.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::backend::{BlobBackend, BlobRead, ListedBlob, Presigned, StagedId, StagedWrite};
use super::blobs::{for_each_chunk, small_content_matches, DigestCheck};
use super::{LocalDisk, Namespace, StoreError};
use regcache_oci::{Digest, MAX_MANIFEST_BYTES};

/// A local disk in front of a bucket. See the module documentation.
#[derive(Debug)]
pub struct Tier {
    local: LocalDisk,
    bucket: Arc<dyn BlobBackend>,
    /// One promotion per object at a time: concurrent readers of a bucket-only blob wait for
    /// the first one's copy instead of each downloading it.
    promoting: Mutex<Gates>,
    /// Whether the bucket has answered a readiness probe since start.
    reached: AtomicBool,
}

/// A lock per object being promoted.
type Gates = HashMap<(Namespace, Digest), Arc<Mutex<()>>>;

impl Tier {
    /// `local` in front of `bucket`.
    pub fn new(local: LocalDisk, bucket: Arc<dyn BlobBackend>) -> Self {
        Self {
            local,
            bucket,
            promoting: Mutex::default(),
            reached: AtomicBool::new(false),
        }
    }

    /// Copies `(namespace, digest)` from the bucket into the local tier, verified.
    fn copy_from_bucket(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let Some(mut source) = self.bucket.open(namespace, digest)? else {
            return Ok(None);
        };
        let read_error = StoreError::io("read from the bucket", digest);
        let size = source.size().map_err(&read_error)?;
        let mut staged = self.local.stage(namespace, digest)?;
        let mut check = DigestCheck::default();
        // A manifest may be schema1, whose digest covers its payload only: keep it whole.
        let mut small = (size <= MAX_MANIFEST_BYTES as u64).then(Vec::new);
        for_each_chunk(source.as_mut(), size, &read_error, |chunk| {
            check.update(chunk);
            if let Some(small) = &mut small {
                small.extend_from_slice(chunk);
            }
            staged.append(chunk)
        })?;
        let matches = check.digest() == *digest
            || small.is_some_and(|bytes| small_content_matches(&bytes, digest));
        if !matches {
            // Dropping `staged` discards it; the client's request goes on as a miss.
            tracing::error!(%digest, namespace = namespace.as_str(), "the bucket's object does not match its digest; not served");
            return Ok(None);
        }
        staged.commit(namespace, digest).map(Some)
    }
}

impl BlobBackend for Tier {
    fn stage(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Box<dyn StagedWrite>, StoreError> {
        Ok(Box::new(TierWrite {
            local: self.local.stage(namespace, digest)?,
            bucket: self.bucket.stage(namespace, digest)?,
        }))
    }

    fn open_staged(&self, id: &StagedId) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.local.open_staged(id)
    }

    fn open(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.local.open(namespace, digest)
    }

    fn stat(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.local.stat(namespace, digest)
    }

    fn stat_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        match self.local.stat(namespace, digest)? {
            Some(size) => Ok(Some(size)),
            None => self.bucket.stat(namespace, digest),
        }
    }

    fn open_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        match self.local.open(namespace, digest)? {
            Some(source) => Ok(Some(source)),
            None => self.bucket.open(namespace, digest),
        }
    }

    fn remove(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.local.remove(namespace, digest)
    }

    fn quarantine(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(u64, String), StoreError> {
        self.local.quarantine(namespace, digest)
    }

    fn list(&self, visit: &mut dyn FnMut(ListedBlob)) {
        self.local.list(visit);
    }

    fn discard_staged(&self, age: Duration) -> Result<(usize, u64), StoreError> {
        self.local.discard_staged(age)
    }

    fn empty_trash(&self) -> Result<u64, StoreError> {
        self.local.empty_trash()
    }

    fn promote(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = (namespace.clone(), *digest);
        let gate = Arc::clone(self.promoting.lock().entry(key.clone()).or_default());
        let result = {
            let _one_at_a_time = gate.lock();
            if self.local.stat(namespace, digest)?.is_some() {
                // Promoted by the caller we waited for.
                Ok(Some(0))
            } else {
                self.copy_from_bucket(namespace, digest)
            }
        };
        self.promoting.lock().remove(&key);
        result
    }

    fn presigned_get(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Presigned>, StoreError> {
        self.bucket.presigned_get(namespace, digest)
    }

    fn check_ready(&self) -> Result<Option<String>, StoreError> {
        self.local.check_ready()?;
        match self.bucket.check_ready() {
            Ok(problem) => {
                self.reached.store(true, Ordering::Relaxed);
                Ok(problem)
            }
            // Every replica shares the bucket: failing readiness on an outage would take all
            // of them out of the load balancer, local tiers included. Reported instead.
            Err(err) if self.reached.load(Ordering::Relaxed) => Ok(Some(err.to_string())),
            // Never reached since start (wrong endpoint or credentials): not ready, so that a
            // rollout of a misconfigured replica stops.
            Err(err) => Err(err),
        }
    }
}

/// A blob staged on both tiers.
#[derive(Debug)]
struct TierWrite {
    local: Box<dyn StagedWrite>,
    bucket: Box<dyn StagedWrite>,
}

impl StagedWrite for TierWrite {
    /// The local staged file, which readers follow.
    fn id(&self) -> &StagedId {
        self.local.id()
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        // Local first: readers following the fill see the bytes while a part uploads.
        self.local.append(bytes)?;
        self.bucket.append(bytes)
    }

    fn commit(self: Box<Self>, namespace: &Namespace, digest: &Digest) -> Result<u64, StoreError> {
        let Self { local, bucket } = *self;
        // On failure `local` is dropped, which discards it: never local without the bucket.
        bucket.commit(namespace, digest)?;
        local.commit(namespace, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    /// A tier whose "bucket" is a second local disk, so that a test can look into it.
    fn tier() -> (tempfile::TempDir, Arc<LocalDisk>, Arc<Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let bucket = Arc::new(LocalDisk::open(&dir.path().join("bucket")).expect("bucket"));
        let local = LocalDisk::open(&dir.path().join("local")).expect("local");
        let tier = Tier::new(local, Arc::clone(&bucket) as Arc<dyn BlobBackend>);
        (dir, bucket, Arc::new(Store::new(Arc::new(tier))))
    }

    #[tokio::test]
    async fn commits_reach_the_bucket_eviction_keeps_them_and_reads_promote_them_verified() {
        let (_dir, bucket, store) = tier();
        let namespace = Namespace::new("registry.test");
        let bytes = vec![3u8; 600 * 1024];
        let digest = Digest::of(&bytes);
        let mut writer = store.writer(&namespace, &digest).expect("writer");
        writer.write(&bytes).await.expect("write");
        crate::tests::commit(writer).await;
        assert_eq!(
            bucket.stat(&namespace, &digest).expect("stat"),
            Some(600 * 1024)
        );
        assert_eq!(
            store.stat(&namespace, &digest).expect("stat"),
            Some(600 * 1024)
        );

        // Evicted locally: the bucket keeps it, and the next read brings it back.
        store.remove(&namespace, &digest).expect("remove");
        assert!(!store.contains(&namespace, &digest));
        assert!(bucket.stat(&namespace, &digest).expect("stat").is_some());
        let usage = store.usage().bytes;
        let opened = store.open(&namespace, &digest).await.expect("open");
        assert_eq!(opened.map(|blob| blob.size()), Some(600 * 1024));
        assert!(store.contains(&namespace, &digest));
        assert_eq!(store.usage().bytes, usage + 600 * 1024);

        // A bucket object that does not match its digest is never promoted.
        let rotten = Digest::of(b"what the name promises");
        let mut staged = bucket.stage(&namespace, &rotten).expect("stage");
        staged.append(b"something else").expect("append");
        staged.commit(&namespace, &rotten).expect("commit");
        assert!(store
            .open(&namespace, &rotten)
            .await
            .expect("open")
            .is_none());
        assert!(!store.contains(&namespace, &rotten));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_a_bucket_only_blob_promote_it_once() {
        let (_dir, _bucket, store) = tier();
        let namespace = Namespace::new("registry.test");
        let bytes = vec![9u8; 2 << 20];
        let digest = Digest::of(&bytes);
        store
            .put_verified(&namespace, &digest, &bytes)
            .expect("put");
        store.remove(&namespace, &digest).expect("evict locally");
        let before = store.usage();
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (store, namespace) = (Arc::clone(&store), namespace.clone());
                tokio::spawn(async move { store.open(&namespace, &digest).await })
            })
            .collect();
        for reader in readers {
            let opened = reader.await.expect("reader task").expect("open");
            assert_eq!(opened.map(|blob| blob.size()), Some(2 << 20));
        }
        let after = store.usage();
        assert_eq!(
            (after.bytes - before.bytes, after.files - before.files),
            (2 << 20, 1),
            "promoted more than once"
        );
    }

    #[tokio::test]
    async fn a_mismatch_reaches_neither_tier() {
        let (_dir, bucket, store) = tier();
        let namespace = Namespace::new("registry.test");
        let digest = Digest::of(b"expected");
        let mut writer = store.writer(&namespace, &digest).expect("writer");
        writer.write(b"unexpected").await.expect("write");
        assert!(writer.finish().await.is_err());
        assert!(!store.contains(&namespace, &digest));
        assert!(bucket.stat(&namespace, &digest).expect("stat").is_none());
        assert_eq!(
            store.discard_staged(Duration::ZERO).expect("discard"),
            (0, 0)
        );
    }
}
