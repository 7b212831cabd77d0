//! Unit tests of the store's writer and readers, through its public interface.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use regcache_oci::Digest;

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn open_store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open_local(dir.path()).expect("open"));
    (dir, store)
}

async fn read_all(store: &Arc<Store>, namespace: &Namespace, digest: &Digest) -> Vec<u8> {
    let stored = store
        .open(namespace, digest)
        .await
        .expect("open")
        .expect("stored");
    let size = stored.size();
    let mut chunks = stored.chunks(0, size);
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next_chunk().await {
        bytes.extend_from_slice(&chunk.expect("chunk"));
    }
    bytes
}

#[tokio::test]
async fn committed_bytes_appear_only_after_commit_and_read_back_whole() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let bytes = blob(700 * 1024);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    for piece in bytes.chunks(100_000) {
        writer.write(piece).await.expect("write");
    }
    let verified = writer.finish().await.expect("digest matches");
    assert_eq!(verified.len(), bytes.len() as u64);
    assert!(
        !store.contains(&namespace, &digest),
        "visible before commit"
    );
    verified.commit().await.expect("commit");
    assert!(store.contains(&namespace, &digest));
    assert!(!store.contains(&Namespace::new("other.test"), &digest));
    assert_eq!(read_all(&store, &namespace, &digest).await, bytes);
    assert_eq!(store.usage().bytes, bytes.len() as u64);
    assert_eq!(store.discard_staged(Duration::ZERO).expect("clean"), (0, 0));
}

#[tokio::test]
async fn a_writer_refuses_bytes_that_do_not_match_and_leaves_nothing() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let bytes = blob(300 * 1024);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    let mut wrong = bytes.clone();
    wrong[1000] ^= 1;
    writer.write(&wrong).await.expect("write");
    match writer.finish().await {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, digest);
            assert_eq!(actual, Digest::of(&wrong));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.contains(&namespace, &digest));
    assert_eq!(store.usage(), Usage::default());
    assert_eq!(
        store.discard_staged(Duration::ZERO).expect("clean"),
        (0, 0),
        "the staged bytes were left behind"
    );
}

#[tokio::test]
async fn a_dropped_writer_discards_its_staged_bytes() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let bytes = blob(600 * 1024);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    writer.write(&bytes).await.expect("write");
    writer.settle().await.expect("settle");
    drop(writer);
    assert!(!store.contains(&namespace, &digest));
    assert_eq!(store.discard_staged(Duration::ZERO).expect("clean"), (0, 0));
}

#[test]
fn put_verified_refuses_bytes_that_are_not_the_content_of_the_digest() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let digest = Digest::of(b"hello");
    let refused = store.put_verified(&namespace, &digest, b"hellO");
    assert!(matches!(refused, Err(StoreError::DigestMismatch { .. })));
    assert!(!store.contains(&namespace, &digest));
    store
        .put_verified(&namespace, &digest, b"hello")
        .expect("put");
    let small = store
        .read_small_blocking(&namespace, &digest, 100)
        .expect("read");
    assert_eq!(small.as_deref(), Some(&b"hello"[..]));
    let too_large = store
        .read_small_blocking(&namespace, &digest, 2)
        .expect("read");
    assert_eq!(too_large, None);
    assert_eq!(
        store.verify(&namespace, &digest).expect("verify"),
        Some(true)
    );
    assert_eq!(store.remove(&namespace, &digest).expect("remove"), Some(5));
    assert_eq!(store.verify(&namespace, &digest).expect("verify"), None);
}

#[tokio::test]
async fn a_partial_reader_holds_back_the_final_byte_until_the_digest_is_verified() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let bytes = blob(600 * 1024 + 7);
    let size = bytes.len() as u64;
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    let partial = writer.partial();
    writer.write(&bytes).await.expect("write");
    assert_eq!(writer.settle().await.expect("settle"), size);
    // Every byte is written, none verified yet.
    let mut reader = partial.reader(0, Some(size));
    let mut received = Vec::new();
    while received.len() as u64 + 1 < size {
        let chunk = reader.next_chunk().await.expect("more").expect("chunk");
        received.extend_from_slice(&chunk);
        assert!(
            (received.len() as u64) < size,
            "the final byte was read unverified"
        );
    }
    let waiting = tokio::spawn(async move {
        let last = reader.next_chunk().await;
        (last, reader.next_chunk().await)
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "the final byte did not wait");
    commit(writer).await;
    let (last, end) = waiting.await.expect("reader");
    received.extend_from_slice(&last.expect("the final byte").expect("read"));
    assert!(end.is_none());
    assert_eq!(received, bytes);
    // A reader that starts after the commit reads the committed blob.
    let mut late = partial.reader(10, None);
    let mut late_bytes = Vec::new();
    while let Some(chunk) = late.next_chunk().await {
        late_bytes.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(&late_bytes[..], &bytes[10..]);
}

#[tokio::test]
async fn partial_readers_end_with_an_error_when_the_writer_fails() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    let bytes = blob(300 * 1024);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    let partial = writer.partial();
    let mut wrong = bytes.clone();
    wrong[0] ^= 1;
    writer.write(&wrong).await.expect("write");
    writer.settle().await.expect("settle");
    let mut reader = partial.reader(0, None);
    let mut received = 0;
    while received + 1 < wrong.len() {
        received += reader
            .next_chunk()
            .await
            .expect("a chunk")
            .expect("read")
            .len();
    }
    assert_eq!(received, wrong.len() - 1, "all but the final byte");
    assert!(matches!(
        writer.finish().await,
        Err(StoreError::DigestMismatch { .. })
    ));
    assert_eq!(partial.state(), WriteState::Failed);
    let end = reader.next_chunk().await.expect("not a clean end");
    assert!(end.is_err());
}

/// Everything `reader` yields until `count` bytes or its end.
async fn read_up_to(reader: &mut PartialReader, count: usize) -> Vec<u8> {
    let mut received = Vec::new();
    while received.len() < count {
        match reader.next_chunk().await {
            Some(chunk) => received.extend_from_slice(&chunk.expect("chunk")),
            None => break,
        }
    }
    received
}

#[tokio::test]
async fn a_reader_that_falls_behind_the_bytes_in_hand_reads_them_back_in_order() {
    let (_dir, store) = open_store();
    let namespace = Namespace::new("registry.test");
    // Many batches: the writer keeps only the last few in memory.
    let bytes = blob(6 * 1024 * 1024 + 7);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    let partial = writer.partial();
    let mut reader = partial.reader(0, None);
    let (first, second) = bytes.split_at(3 * 1024 * 1024);
    for piece in first.chunks(64 * 1024) {
        writer.write(piece).await.expect("write");
    }
    writer.settle().await.expect("settle");
    // Only the last two batches (512 KiB) are still in memory: this reads the file, then
    // memory.
    let mut received = read_up_to(&mut reader, 11 * 256 * 1024).await;
    // The writer runs far ahead of this reader: back to the staged file.
    for piece in second.chunks(64 * 1024) {
        writer.write(piece).await.expect("write");
    }
    writer.settle().await.expect("settle");
    let tail = tokio::spawn(async move { read_up_to(&mut reader, usize::MAX).await });
    commit(writer).await;
    received.extend_from_slice(&tail.await.expect("reader"));
    assert_eq!(received.len(), bytes.len());
    assert!(
        received == bytes,
        "the bytes read differ from the bytes written"
    );
}

/// Verifies and commits what `writer` wrote.
pub(super) async fn commit(writer: BlobWriter) {
    writer
        .finish()
        .await
        .expect("verified")
        .commit()
        .await
        .expect("commit");
}

/// A local disk whose appends wait until the test opens the gate: bytes that are in hand but
/// not on disk yet.
#[derive(Debug)]
struct GatedDisk {
    disk: LocalDisk,
    gate: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
}

#[derive(Debug)]
struct GatedWrite {
    staged: Box<dyn StagedWrite>,
    gate: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
}

impl StagedWrite for GatedWrite {
    fn id(&self) -> &StagedId {
        self.staged.id()
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let (open, opened) = &*self.gate;
        let mut guard = open.lock();
        opened.wait_while(&mut guard, |open| !*open);
        drop(guard);
        self.staged.append(bytes)
    }

    fn commit(self: Box<Self>, namespace: &Namespace, digest: &Digest) -> Result<u64, StoreError> {
        self.staged.commit(namespace, digest)
    }
}

impl BlobBackend for GatedDisk {
    fn stage(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Box<dyn StagedWrite>, StoreError> {
        Ok(Box::new(GatedWrite {
            staged: self.disk.stage(namespace, digest)?,
            gate: Arc::clone(&self.gate),
        }))
    }
    fn open_staged(&self, id: &StagedId) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.disk.open_staged(id)
    }
    fn open(&self, ns: &Namespace, d: &Digest) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.disk.open(ns, d)
    }
    fn stat(&self, ns: &Namespace, d: &Digest) -> Result<Option<u64>, StoreError> {
        self.disk.stat(ns, d)
    }
    fn remove(&self, ns: &Namespace, d: &Digest) -> Result<Option<u64>, StoreError> {
        self.disk.remove(ns, d)
    }
    fn quarantine(&self, ns: &Namespace, d: &Digest) -> Result<(u64, String), StoreError> {
        self.disk.quarantine(ns, d)
    }
    fn list(&self, visit: &mut dyn FnMut(ListedBlob)) {
        self.disk.list(visit);
    }
    fn discard_staged(&self, age: Duration) -> Result<(usize, u64), StoreError> {
        self.disk.discard_staged(age)
    }
}

#[tokio::test]
async fn a_reader_gets_the_bytes_in_hand_before_they_reach_the_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let disk = GatedDisk {
        disk: LocalDisk::open(dir.path()).expect("disk"),
        gate: Arc::clone(&gate),
    };
    let store = Arc::new(Store::new(Arc::new(disk)));
    let namespace = Namespace::new("registry.test");
    let bytes = blob(2 * 256 * 1024 + 5);
    let digest = Digest::of(&bytes);
    let mut writer = store.writer(&namespace, &digest).expect("writer");
    let mut reader = writer.partial().reader(0, Some(bytes.len() as u64));
    // One batch: handed to the readers, its append stuck at the disk.
    let writing = tokio::spawn(async move {
        writer.write(&bytes).await.expect("write");
        writer
    });
    let first = tokio::time::timeout(Duration::from_secs(10), read_up_to(&mut reader, 256 * 1024))
        .await
        .expect("the reader waited for the disk");
    assert_eq!(first, blob(256 * 1024), "the bytes in hand");
    {
        let (open, opened) = &*gate;
        *open.lock() = true;
        opened.notify_all();
    }
    commit(writing.await.expect("writer")).await;
    let rest = read_up_to(&mut reader, usize::MAX).await;
    assert_eq!(first.len() + rest.len(), 2 * 256 * 1024 + 5);
    assert!(store.contains(&namespace, &digest));
}
