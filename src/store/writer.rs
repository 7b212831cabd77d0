//! Writing a blob: [`BlobWriter`] hashes while it writes, and only a [`VerifiedBlob`] (whose
//! digest matched) can be committed. [`Partial`] lets readers follow the bytes while they are
//! written ([`PartialReader`]).
//!
//! Invariant: a [`PartialReader`] holds back the final byte of its range until the writer has
//! verified the digest, so no reader completes a body of unverified bytes; when the writer
//! fails or is dropped unverified, readers end with an error, never a clean end.
//!
//! Writes go in 256 KiB batches, each hashed and appended on a blocking thread while the next
//! arrives from the network, so hashing, disk and network overlap on two cores.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
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

/// How far a blob being written has got, as its readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    /// This many bytes are written and readable; the digest is not checked yet.
    Writing(u64),
    /// All bytes are written and the digest matched: readers may finish.
    Verified(u64),
    /// The writer failed or was dropped unverified.
    Failed,
}

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
    /// Tells the [`Partial`] readers how far they may read.
    state: watch::Sender<WriteState>,
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Dropped before `finish` verified it (failure, mismatch, abort): readers must fail.
        self.state.send_if_modified(|state| {
            let unverified = matches!(state, WriteState::Writing(_));
            if unverified {
                *state = WriteState::Failed;
            }
            unverified
        });
    }
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
        let staged = self.backend.stage(namespace, digest)?;
        let (state, progress) = watch::channel(WriteState::Writing(0));
        Ok(BlobWriter {
            store: Arc::clone(self),
            namespace: namespace.clone(),
            digest: *digest,
            partial: Partial {
                store: Arc::clone(self),
                id: staged.id().clone(),
                namespace: namespace.clone(),
                digest: *digest,
                progress,
            },
            idle: Some((staged, DigestCheck::default())),
            in_flight: None,
            batch: BytesMut::with_capacity(WRITE_BATCH),
            written: 0,
            state,
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
        self.state.send_replace(WriteState::Writing(self.written));
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
        // On a mismatch, `staged` is dropped here, which discards it, and dropping `self`
        // fails the readers.
        check.check(&self.digest)?;
        self.state.send_replace(WriteState::Verified(self.written));
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
    progress: watch::Receiver<WriteState>,
}

impl Partial {
    /// A reader of `[start, end)`; with `end` unknown (`None`), up to where the blob ends.
    pub fn reader(&self, start: u64, end: Option<u64>) -> PartialReader {
        PartialReader {
            progress: self.progress.clone(),
            partial: self.clone(),
            position: start,
            end,
            chunks: None,
        }
    }

    /// How far the writer has got.
    pub fn state(&self) -> WriteState {
        *self.progress.borrow()
    }
}

/// Reads a range of a blob being written, at its own pace, holding back the final byte until
/// the writer verified the digest.
#[derive(Debug)]
pub struct PartialReader {
    partial: Partial,
    progress: watch::Receiver<WriteState>,
    position: u64,
    end: Option<u64>,
    /// Opened on the first read.
    chunks: Option<Chunks>,
}

impl PartialReader {
    /// How far the writer has got.
    pub fn state(&self) -> WriteState {
        *self.progress.borrow()
    }

    /// How far the reader may read now, and whether that is the end of its range.
    fn limit(&mut self) -> std::io::Result<(u64, bool)> {
        match *self.progress.borrow_and_update() {
            WriteState::Failed => Err(std::io::Error::other("the blob being written failed")),
            WriteState::Verified(len) => Ok((self.end.map_or(len, |end| end.min(len)), true)),
            // Hold back the final byte of the range until the digest is verified.
            WriteState::Writing(written) => Ok((
                match self.end {
                    Some(end) => written.min(end.saturating_sub(1)),
                    None => written.saturating_sub(1),
                },
                false,
            )),
        }
    }

    /// The next chunk (up to [`READ_CHUNK`](super::READ_CHUNK) bytes), `None` at the end of
    /// the range.
    ///
    /// # Errors
    /// The read's failure; the writer's failure (never a clean end for unverified bytes).
    ///
    /// # Cancel safety
    /// Not cancel safe; poll it to completion from one body.
    pub async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            let (limit, done) = match self.limit() {
                Ok(limit) => limit,
                Err(err) => return Some(Err(err)),
            };
            if self.position < limit {
                let len = usize::try_from(limit - self.position)
                    .unwrap_or(super::READ_CHUNK)
                    .min(super::READ_CHUNK);
                return Some(self.read(len).await);
            }
            if done {
                return None;
            }
            if self.progress.changed().await.is_err()
                && matches!(*self.progress.borrow(), WriteState::Writing(_))
            {
                // Unreachable while the writer's drop publishes `Failed`; kept so that a
                // reader can never wait forever.
                return Some(Err(std::io::Error::other("the blob writer is gone")));
            }
        }
    }

    /// Reads exactly `len` bytes at the current position, which are known to be written.
    async fn read(&mut self, len: usize) -> std::io::Result<Bytes> {
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
