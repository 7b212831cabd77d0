//! Writing a blob: [`BlobWriter`] hashes while it writes, and only a [`VerifiedBlob`] (whose
//! digest matched) can be committed. [`Partial`] lets readers follow the bytes while they are
//! written ([`PartialReader`]).
//!
//! Invariant: a [`PartialReader`] holds back the final byte of its range until the writer has
//! verified the digest, so no reader completes a body of unverified bytes; when the writer
//! fails or is dropped unverified, readers end with an error, never a clean end.
//!
//! Writes go in 256 KiB batches. A batch is handed to the readers the moment it is complete
//! (the [`Window`] of recent batches: a reader that keeps up never reads back from the staged
//! object), then hashed and appended on two blocking threads at once while the next batch
//! arrives from the network, so network, hashing, disk and the readers all overlap.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::backend::{BlobRead, StagedId, StagedWrite};
use super::blobs::{Chunks, DigestCheck};
use super::{Namespace, Store, StoreError};
use regcache_oci::Digest;

/// Bytes hashed and written per blocking call: large enough to amortise the thread hop, small
/// enough that followers see progress often and memory per writer stays small. Readers are
/// handed slices of these batches, so a batch is also what one slow reader can keep alive:
/// no larger than a read chunk ([`READ_CHUNK`](super::READ_CHUNK)), or memory per client
/// would grow (measured: 512 KiB batches took 64 clients from 60 to 75 MiB).
const WRITE_BATCH: usize = 256 * 1024;

/// Batches hashed and appended per blocking call: each call wakes two blocking threads, and
/// thread wake-ups were ~18 % of a cold pull's CPU in a profile, so four batches (1 MiB) go
/// together, while the readers still get every batch as it arrives. Measured on a 256 MiB
/// cold pull: 0.33–0.35 CPU s against 0.36–0.40 with two per call; 64 clients of one cold
/// blob peaked at 45–52 MiB (one series of each, same machine and hour).
const BATCHES_PER_CALL: usize = 4;

/// Batches kept in the [`Window`] once they are appended: enough for a reader a little behind
/// the network to keep reading from memory, small enough to bound memory per fill (with the
/// batches in flight and those waiting for the next call, about 2.5 MiB).
const WINDOW_BATCHES: usize = 2;

/// Batches being hashed and appended, on two blocking threads at once.
#[derive(Debug)]
struct InFlight {
    hash: JoinHandle<DigestCheck>,
    append: JoinHandle<Result<Box<dyn StagedWrite>, StoreError>>,
    len: u64,
}

/// The most recent batches, in order: the bytes in hand, shared with the readers. Every byte
/// before `start` is appended to the staged object; a batch leaves only once appended.
#[derive(Debug, Default)]
struct Window {
    /// The offset of the first byte of `batches[0]`.
    start: u64,
    batches: VecDeque<Bytes>,
}

impl Window {
    /// Up to `len` bytes at `position`, when the window holds that byte.
    fn slice(&self, position: u64, len: usize) -> Option<Bytes> {
        let mut batch_start = self.start;
        for batch in &self.batches {
            let batch_end = batch_start + batch.len() as u64;
            if position >= batch_start && position < batch_end {
                let from = usize::try_from(position - batch_start).ok()?;
                return Some(batch.slice(from..batch.len().min(from + len)));
            }
            batch_start = batch_end;
        }
        None
    }

    /// Lets go of the oldest batches that are appended, beyond [`WINDOW_BATCHES`]; adds the
    /// buffers that no reader holds any more to `spare`, for the next batches (a fresh buffer
    /// costs a page fault per 4 KiB).
    fn trim(&mut self, appended: u64, spare: &mut Vec<BytesMut>) {
        let mut end = self.start;
        let appended_batches = self
            .batches
            .iter()
            .take_while(|batch| {
                end += batch.len() as u64;
                end <= appended
            })
            .count();
        let excess = appended_batches.saturating_sub(WINDOW_BATCHES);
        for front in self.batches.drain(..excess) {
            self.start += front.len() as u64;
            if let Ok(buffer) = front.try_into_mut() {
                if spare.len() < BATCHES_PER_CALL {
                    spare.push(buffer);
                }
            }
        }
    }
}

/// How far a blob being written has got, as its readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    /// This many bytes are in hand and readable; the digest is not checked yet.
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
    in_flight: Option<InFlight>,
    batch: BytesMut,
    /// Bytes appended (batches settled).
    written: u64,
    /// Bytes handed to the readers (in the window or appended).
    received: u64,
    /// Batches handed to the readers, not yet hashed and appended.
    pending: Vec<Bytes>,
    /// Batch buffers back from the window, for the next batches.
    spare: Vec<BytesMut>,
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
    /// [`Store::writer`] on the blocking pool (staging creates a file or starts an upload).
    ///
    /// # Errors
    /// As [`Store::writer`].
    pub async fn stage_writer(
        self: &Arc<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<BlobWriter, StoreError> {
        let (store, namespace, digest) = (Arc::clone(self), namespace.clone(), *digest);
        crate::blobs::blocking(move || store.writer(&namespace, &digest)).await
    }

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
                window: Arc::new(Mutex::new(Window::default())),
            },
            idle: Some((staged, DigestCheck::default())),
            in_flight: None,
            batch: BytesMut::with_capacity(WRITE_BATCH),
            written: 0,
            received: 0,
            pending: Vec::with_capacity(BATCHES_PER_CALL),
            spare: Vec::with_capacity(BATCHES_PER_CALL),
            state,
        })
    }
}

impl BlobWriter {
    /// A handle for readers that follow the bytes being written.
    pub fn partial(&self) -> Partial {
        self.partial.clone()
    }

    /// Bytes appended so far (what a resumed download starts from after
    /// [`BlobWriter::settle`]; followers may read further, from the bytes in hand).
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
    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        // Batches of exactly WRITE_BATCH: a batch that outgrew its buffer would reallocate
        // it at twice the size, and readers keep whole buffers alive.
        while !bytes.is_empty() {
            // Below WRITE_BATCH here: a full batch is flushed (and replaced) just below.
            let room = WRITE_BATCH - self.batch.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.batch.extend_from_slice(now);
            bytes = rest;
            if self.batch.len() == WRITE_BATCH {
                self.flush(false).await?;
            }
        }
        Ok(())
    }

    /// Hands the batch to the readers; once [`BATCHES_PER_CALL`] are waiting, starts hashing
    /// and appending them (after the previous call is done).
    /// With `all`, also the last, partial batch and fewer than [`BATCHES_PER_CALL`].
    async fn flush(&mut self, all: bool) -> Result<(), StoreError> {
        if !self.batch.is_empty() {
            let next = match self.spare.pop() {
                Some(mut buffer) => {
                    buffer.clear();
                    buffer
                }
                None => BytesMut::with_capacity(WRITE_BATCH),
            };
            // The whole buffer moves to the readers (who share `data`), unshared with the next.
            let data: Bytes = std::mem::replace(&mut self.batch, next).freeze();
            self.partial.window.lock().batches.push_back(data.clone());
            self.received += data.len() as u64;
            self.state.send_replace(WriteState::Writing(self.received));
            self.pending.push(data);
        }
        if self.pending.is_empty() || (!all && self.pending.len() < BATCHES_PER_CALL) {
            return Ok(());
        }
        let (mut staged, mut check) = self.wait_idle().await?;
        let batches = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCHES_PER_CALL));
        let hashed = batches.clone();
        self.in_flight = Some(InFlight {
            hash: tokio::task::spawn_blocking(move || {
                for batch in &hashed {
                    check.update(batch);
                }
                check
            }),
            len: batches.iter().map(|batch| batch.len() as u64).sum(),
            append: tokio::task::spawn_blocking(move || {
                for batch in &batches {
                    staged.append(batch)?;
                }
                Ok(staged)
            }),
        });
        Ok(())
    }

    /// Waits for the batch in flight and takes the staged object and hash back.
    async fn wait_idle(&mut self) -> Result<(Box<dyn StagedWrite>, DigestCheck), StoreError> {
        let Some(InFlight { hash, append, len }) = self.in_flight.take() else {
            return self.idle.take().ok_or_else(|| {
                StoreError::io("write", "a staged blob")(std::io::Error::other(
                    "an earlier write failed",
                ))
            });
        };
        let (check, staged) = tokio::join!(hash, append);
        let (check, staged) = (check.map_err(aborted)?, staged.map_err(aborted)??);
        self.written += len;
        self.partial
            .window
            .lock()
            .trim(self.written, &mut self.spare);
        Ok((staged, check))
    }

    /// Writes everything buffered and waits for it; returns [`BlobWriter::written`].
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub async fn settle(&mut self) -> Result<u64, StoreError> {
        self.flush(true).await?;
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
        self.flush(true).await?;
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
    /// The writer's bytes in hand.
    window: Arc<Mutex<Window>>,
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

    /// Opens the staged object, or the committed one when the writer committed it just before
    /// the reader learnt of it.
    async fn open(&self) -> std::io::Result<Box<dyn BlobRead>> {
        let partial = self.clone();
        tokio::task::spawn_blocking(move || {
            let backend = &partial.store.backend;
            match backend.open_staged(&partial.id)? {
                Some(source) => Ok(Some(source)),
                None => backend.open(&partial.namespace, &partial.digest),
            }
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?
        .ok_or_else(|| std::io::Error::other("the blob being written is gone"))
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

    /// Reads up to `len` bytes at the current position, which are known to be in hand: from
    /// the writer's window when it still holds them, else from the staged (or committed)
    /// object, where everything before the window is. Either way the bytes hold a share of
    /// the response budget: a slice of the window keeps its whole batch alive.
    async fn read(&mut self, len: usize) -> std::io::Result<Bytes> {
        let reserved = self.partial.store.response_budget.reserve(len).await;
        let len = {
            let window = self.partial.window.lock();
            if let Some(bytes) = window.slice(self.position, len) {
                self.position += bytes.len() as u64;
                return Ok(reserved.attach(bytes));
            }
            // Before the window (a reader behind): read no further than its start, the bytes
            // after it may not be appended yet. Past it cannot happen: the window ends where
            // the bytes in hand end.
            usize::try_from(window.start.saturating_sub(self.position))
                .unwrap_or(len)
                .min(len)
        };
        if len == 0 {
            return Err(std::io::Error::other(
                "a blob being written: read past the bytes in hand",
            ));
        }
        let chunks = match &mut self.chunks {
            Some(chunks) => chunks,
            slot @ None => slot.insert(Chunks::new(
                self.partial.open().await?,
                0,
                u64::MAX,
                Arc::clone(&self.partial.store.response_budget),
            )),
        };
        // At this reader's own position: reads from the window moved it on meanwhile.
        let bytes = chunks.read_reserved(self.position, len, reserved).await?;
        self.position += bytes.len() as u64;
        Ok(bytes)
    }
}
