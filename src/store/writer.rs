//! Writing a blob: [`BlobWriter`] hashes while it writes, and only a [`VerifiedBlob`] (whose
//! digest matched) can be committed. [`Partial`] lets readers follow the bytes while they are
//! written.
//!
//! Writes go in 256 KiB batches, each hashed and appended on a blocking thread while the next
//! arrives from the network, so hashing, disk and network overlap on two cores.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::backend::{StagedId, StagedWrite};
use super::blobs::{Chunks, DigestCheck};
use super::{Namespace, Store, StoreError};
use crate::oci::Digest;

/// Bytes hashed and written per blocking call: large enough to amortise the thread hop, small
/// enough that followers see progress often and memory per writer stays small.
const WRITE_BATCH: usize = 256 * 1024;

/// A batch hashed and appended: the staged object and hash come back with its length.
type WrittenBatch = (Box<dyn StagedWrite>, DigestCheck, u64);

/// A blob being written under `(namespace, digest)`; nothing is visible until
/// [`BlobWriter::finish`] verified it and [`VerifiedBlob::commit`] committed it. Dropped
/// before that, the staged bytes are discarded.
#[derive(Debug)]
pub struct BlobWriter {
    store: Arc<Store>,
    namespace: Namespace,
    digest: Digest,
    partial: Partial,
    /// The staged object and hash while no batch is in flight.
    idle: Option<(Box<dyn StagedWrite>, DigestCheck)>,
    in_flight: Option<JoinHandle<Result<WrittenBatch, StoreError>>>,
    batch: BytesMut,
    /// Bytes appended (batches settled).
    written: u64,
}

fn aborted(err: tokio::task::JoinError) -> StoreError {
    StoreError::io("write", "a staged blob")(std::io::Error::other(err))
}

impl Store {
    /// Starts writing `digest`.
    ///
    /// # Errors
    /// [`StoreError::Io`] when nothing can be staged (disk full, read-only).
    pub fn writer(
        self: &Arc<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<BlobWriter, StoreError> {
        let staged = self.backend.stage()?;
        Ok(BlobWriter {
            store: Arc::clone(self),
            namespace: namespace.clone(),
            digest: *digest,
            partial: Partial {
                store: Arc::clone(self),
                id: staged.id().clone(),
                namespace: namespace.clone(),
                digest: *digest,
            },
            idle: Some((staged, DigestCheck::default())),
            in_flight: None,
            batch: BytesMut::with_capacity(WRITE_BATCH),
            written: 0,
        })
    }
}

impl BlobWriter {
    /// A handle for readers that follow the bytes being written.
    pub fn partial(&self) -> Partial {
        self.partial.clone()
    }

    /// Bytes appended so far (readable by followers; what a resumed download starts from
    /// after [`BlobWriter::settle`]).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `bytes` (batched).
    ///
    /// # Errors
    /// [`StoreError::Io`] from an earlier batch.
    ///
    /// # Cancel safety
    /// Not cancel safe; the fill task polls it to completion.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.batch.extend_from_slice(bytes);
        if self.batch.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Starts writing the batch (after the previous one is done).
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let data: Bytes = self.batch.split().freeze();
        let (mut staged, mut check) = self.wait_idle().await?;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            check.update(&data);
            staged.append(&data)?;
            Ok((staged, check, data.len() as u64))
        }));
        Ok(())
    }

    /// Waits for the batch in flight and takes the staged object and hash back.
    async fn wait_idle(&mut self) -> Result<(Box<dyn StagedWrite>, DigestCheck), StoreError> {
        let Some(handle) = self.in_flight.take() else {
            return self.idle.take().ok_or_else(|| {
                StoreError::io("write", "a staged blob")(std::io::Error::other(
                    "an earlier write failed",
                ))
            });
        };
        let (staged, check, len) = handle.await.map_err(aborted)??;
        self.written += len;
        Ok((staged, check))
    }

    /// Writes everything buffered and waits for it; returns [`BlobWriter::written`].
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub async fn settle(&mut self) -> Result<u64, StoreError> {
        self.flush().await?;
        let idle = self.wait_idle().await?;
        self.idle = Some(idle);
        Ok(self.written)
    }

    /// Writes what is left and checks the digest of everything written.
    ///
    /// # Errors
    /// [`StoreError::DigestMismatch`] (the staged bytes are discarded: nothing becomes
    /// visible); [`StoreError::Io`].
    pub async fn finish(mut self) -> Result<VerifiedBlob, StoreError> {
        self.flush().await?;
        let (staged, check) = self.wait_idle().await?;
        // On a mismatch, `staged` is dropped here, which discards it.
        check.check(&self.digest)?;
        Ok(VerifiedBlob {
            store: Arc::clone(&self.store),
            namespace: self.namespace.clone(),
            digest: self.digest,
            staged,
            len: self.written,
        })
    }
}

/// Staged bytes whose digest matched; [`VerifiedBlob::commit`] makes them visible.
#[derive(Debug)]
pub struct VerifiedBlob {
    store: Arc<Store>,
    namespace: Namespace,
    digest: Digest,
    staged: Box<dyn StagedWrite>,
    len: u64,
}

impl VerifiedBlob {
    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes it durable and visible under its digest (fsync, rename, directory fsync on the
    /// local disk).
    ///
    /// # Errors
    /// [`StoreError::Io`]; the staged bytes are discarded.
    pub async fn commit(self) -> Result<(), StoreError> {
        let Self {
            store,
            namespace,
            digest,
            staged,
            ..
        } = self;
        let len = tokio::task::spawn_blocking(move || staged.commit(&namespace, &digest))
            .await
            .map_err(aborted)??;
        store.account_added(len);
        Ok(())
    }
}

/// The bytes of a blob being written, for readers that follow it.
#[derive(Debug, Clone)]
pub struct Partial {
    store: Arc<Store>,
    id: StagedId,
    namespace: Namespace,
    digest: Digest,
}

impl Partial {
    /// A reader from byte `start`.
    pub fn reader(&self, start: u64) -> PartialReader {
        PartialReader {
            partial: self.clone(),
            position: start,
            chunks: None,
        }
    }
}

/// Reads a blob being written. It reads only what its caller knows to be written; the
/// caller also holds back the final byte until the writer verified the digest (see
/// `cache/fill.rs`).
#[derive(Debug)]
pub struct PartialReader {
    partial: Partial,
    position: u64,
    /// Opened on the first read.
    chunks: Option<Chunks>,
}

impl PartialReader {
    /// Reads exactly `len` bytes at the current position. The caller must know they are
    /// written.
    ///
    /// # Errors
    /// The read's failure.
    ///
    /// # Cancel safety
    /// Not cancel safe; poll it to completion.
    pub async fn read(&mut self, len: usize) -> std::io::Result<Bytes> {
        if self.chunks.is_none() {
            let partial = self.partial.clone();
            let position = self.position;
            let source = tokio::task::spawn_blocking(move || {
                let backend = &partial.store.backend;
                // Committed just before the reader learnt of it: read the committed object.
                match backend.open_staged(&partial.id)? {
                    Some(source) => Ok(Some(source)),
                    None => backend.open(&partial.namespace, &partial.digest),
                }
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("the blob being written is gone"))?;
            self.chunks = Some(Chunks::new(source, position, u64::MAX));
        }
        let chunks = self
            .chunks
            .as_mut()
            .expect("opened just above when it was not open");
        let bytes = chunks.read(len).await?;
        self.position += bytes.len() as u64;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
        assert_eq!(store.usage(), super::super::Usage::default());
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
    async fn a_partial_reader_reads_what_is_written_then_the_committed_blob() {
        let (_dir, store) = open_store();
        let namespace = Namespace::new("registry.test");
        let bytes = blob(512 * 1024 + 10);
        let digest = Digest::of(&bytes);
        let mut writer = store.writer(&namespace, &digest).expect("writer");
        let partial = writer.partial();
        writer.write(&bytes[..300 * 1024]).await.expect("write");
        let written = writer.settle().await.expect("settle");
        assert_eq!(written, 300 * 1024);
        let mut early = partial.reader(0);
        let head = early.read(written as usize).await.expect("read");
        assert_eq!(&head[..], &bytes[..head.len()]);
        writer.write(&bytes[300 * 1024..]).await.expect("write");
        writer
            .finish()
            .await
            .expect("verified")
            .commit()
            .await
            .expect("commit");
        // The reader that opened the staged bytes keeps reading them; a reader that starts
        // after the commit reads the committed blob.
        let tail = early.read(bytes.len() - head.len()).await.expect("read on");
        assert_eq!(&tail[..], &bytes[head.len()..]);
        let mut late = partial.reader(10);
        let late_bytes = late.read(bytes.len() - 10).await.expect("read");
        assert_eq!(&late_bytes[..], &bytes[10..]);
    }
}
