//! [`Store`]: the only way into blob and manifest bytes, over a [`BlobBackend`].
//!
//! Reads come out as [`Chunks`] (256 KiB `Bytes` read straight into the buffer that is sent:
//! in place when the backend has the bytes in memory, [`BlobRead::read_in_memory`], else on a
//! blocking thread); writes go through [`Store::writer`] (see `writer.rs`) or, for
//! small objects, [`Store::put_verified`]; both refuse bytes that do not match their digest.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::backend::{BlobBackend, BlobRead, ListedBlob, Presigned};
use super::buffers::{Reserved, ResponseBudget, DEFAULT_RESPONSE_BUFFER};
use super::{LocalDisk, Namespace, StoreError};
use regcache_oci::{manifest_digest, sniff_media_type, Digest, MAX_MANIFEST_BYTES};

/// Bytes per chunk read for a response (and per read when verifying). With hyper's write queue
/// capped near one chunk (see `server.rs`), a connection holds about two chunks: 64 clients
/// stay within tens of MiB.
pub const READ_CHUNK: usize = 256 * 1024;

/// The blob store. See the module documentation of [`crate`].
#[derive(Debug)]
pub struct Store {
    pub(super) backend: Arc<dyn BlobBackend>,
    /// Bytes and objects committed: counted by [`Store::scan`] at start, then kept up to date
    /// by commits and removals.
    used_bytes: AtomicU64,
    files: AtomicU64,
    /// What every [`Chunks`] read for a response holds a share of.
    pub(super) response_budget: Arc<ResponseBudget>,
}

/// What the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes of verified objects.
    pub bytes: u64,
    /// Number of objects.
    pub files: u64,
}

/// Hashes bytes as they pass and checks the result against a digest: the one sha256 loop of
/// the crate (fills, direct streams, `verify`).
#[derive(Debug, Clone, Default)]
pub struct DigestCheck(Sha256);

impl DigestCheck {
    /// Hashes `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything hashed.
    pub fn digest(self) -> Digest {
        Digest::from_hasher(self.0)
    }

    /// Whether everything hashed is the content of `expected`.
    ///
    /// # Errors
    /// [`StoreError::DigestMismatch`].
    pub fn check(self, expected: &Digest) -> Result<(), StoreError> {
        let actual = self.digest();
        if actual == *expected {
            Ok(())
        } else {
            Err(StoreError::DigestMismatch {
                expected: *expected,
                actual,
            })
        }
    }
}

/// Whether `bytes` are the content of `digest`: their sha256, or for a signed schema1
/// manifest the digest of its payload.
pub(super) fn small_content_matches(bytes: &[u8], digest: &Digest) -> bool {
    Digest::of(bytes) == *digest
        || sniff_media_type(bytes)
            .filter(|m| m.is_schema1())
            .is_some_and(|media_type| manifest_digest(bytes, &media_type) == *digest)
}

/// Reads `size` bytes of `source` front to back in [`READ_CHUNK`] pieces, handing each to
/// `each`. Blocking.
pub(super) fn for_each_chunk(
    source: &mut dyn BlobRead,
    size: u64,
    read_error: &dyn Fn(std::io::Error) -> StoreError,
    mut each: impl FnMut(&Bytes) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut offset = 0;
    while offset < size {
        let len = usize::try_from(size - offset)
            .unwrap_or(READ_CHUNK)
            .min(READ_CHUNK);
        let chunk = source.read_at(offset, len).map_err(read_error)?;
        each(&chunk)?;
        offset += chunk.len() as u64;
    }
    Ok(())
}

/// Reads `len` bytes at `offset` on a blocking thread; the source comes back with them.
async fn read_blocking(
    mut source: Box<dyn BlobRead>,
    offset: u64,
    len: usize,
) -> std::io::Result<(Box<dyn BlobRead>, Bytes)> {
    tokio::task::spawn_blocking(move || {
        let bytes = source.read_at(offset, len)?;
        Ok((source, bytes))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| StoreError::io("run", "a blocking store task")(std::io::Error::other(err)))?
}

impl Store {
    /// Opens (creating) a store on the local disk under `root`. The server then calls
    /// [`Store::discard_staged`]; other commands must not, as a server may be running.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directories cannot be created.
    pub fn open_local(root: &Path) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(LocalDisk::open(root)?)))
    }

    /// A store over `backend`.
    pub fn new(backend: Arc<dyn BlobBackend>) -> Self {
        Self {
            backend,
            used_bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            response_budget: ResponseBudget::new(DEFAULT_RESPONSE_BUFFER),
        }
    }

    /// The same store with `bytes` for chunks read and not yet sent (`server.response_buffer`,
    /// see [`ResponseBudget`]).
    #[must_use]
    pub fn with_response_buffer(mut self, bytes: usize) -> Self {
        self.response_budget = ResponseBudget::new(bytes);
        self
    }

    /// Bytes read for responses (or other readers of [`Chunks`]) and not yet dropped.
    pub fn response_buffer_held(&self) -> u64 {
        self.response_budget.held() as u64
    }

    pub(super) fn account_added(&self, len: u64) {
        self.used_bytes.fetch_add(len, Ordering::Relaxed);
        self.files.fetch_add(1, Ordering::Relaxed);
    }

    fn account_removed(&self, len: u64) {
        let saturating_sub = |by: u64| move |n: u64| Some(n.saturating_sub(by));
        // The closures never return None, so the updates cannot fail.
        let _ =
            self.used_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, saturating_sub(len));
        let _ = self
            .files
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, saturating_sub(1));
    }

    /// Current usage.
    pub fn usage(&self) -> Usage {
        Usage {
            bytes: self.used_bytes.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
        }
    }

    /// Walks the store once, calls `visit` with each object, and adds what it finds to the
    /// usage counters. Blocking; the server runs it in the background after it starts
    /// listening, so start-up does not wait for it. An object committed while the walk runs
    /// may be counted twice; the figure is for budgets and dashboards, not accounting.
    pub fn scan(&self, mut visit: impl FnMut(ListedBlob)) -> Usage {
        let mut usage = Usage::default();
        self.backend.list(&mut |blob| {
            usage.files += 1;
            usage.bytes += blob.size;
            visit(blob);
        });
        self.used_bytes.fetch_add(usage.bytes, Ordering::Relaxed);
        self.files.fetch_add(usage.files, Ordering::Relaxed);
        usage
    }

    /// Discards staged objects older than `age` (all with `Duration::ZERO`: only when no
    /// other process may be writing); returns how many and their bytes. Blocking.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the staging area cannot be listed.
    pub fn discard_staged(&self, age: Duration) -> Result<(usize, u64), StoreError> {
        self.backend.discard_staged(age)
    }

    /// Frees the space of removed objects the backend left for later (the local disk's
    /// trash); returns how many. Blocking.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the trash cannot be listed.
    pub fn empty_trash(&self) -> Result<u64, StoreError> {
        self.backend.empty_trash()
    }

    /// Whether new objects can be stored (readiness): a probe staged and discarded, and with an
    /// object store, the bucket answering (see [`BlobBackend::check_ready`]: `Ok(Some(_))`
    /// names a problem that does not fail readiness).
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot.
    pub async fn check_writable(self: &Arc<Self>) -> Result<Option<String>, StoreError> {
        let store = Arc::clone(self);
        blocking(move || store.backend.check_ready()).await
    }

    /// The size of `digest`, `None` when it is not stored. Blocking (one `stat`).
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub fn stat(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.backend.stat(namespace, digest)
    }

    /// The size of `digest` wherever the store keeps it for good (with an object store, the
    /// bucket when the local copy was evicted), `None` when no tier has it. Blocking, and may
    /// reach the network: for maintenance commands, which must not judge by the local tier.
    ///
    /// # Errors
    /// [`StoreError`] when a tier cannot answer (nothing may be concluded then).
    pub fn stat_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        self.backend.stat_anywhere(namespace, digest)
    }

    /// [`Store::contains`] on the blocking pool: never a `stat` on an async worker.
    pub async fn holds(self: &Arc<Self>, namespace: &Namespace, digest: &Digest) -> bool {
        let (store, namespace, digest) = (Arc::clone(self), namespace.clone(), *digest);
        blocking(move || Ok(store.contains(&namespace, &digest)))
            .await
            .unwrap_or(false)
    }

    /// Whether `digest` is stored. Blocking (one `stat`).
    pub fn contains(&self, namespace: &Namespace, digest: &Digest) -> bool {
        self.stat(namespace, digest).ok().flatten().is_some()
    }

    /// Opens a committed object, promoting it from a slower tier (the bucket) when only that
    /// has it. Blocking.
    fn open_object(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        if let Some(source) = self.backend.open(namespace, digest)? {
            return Ok(Some(source));
        }
        let Some(added) = self.backend.promote(namespace, digest)? else {
            return Ok(None);
        };
        if added > 0 {
            self.account_added(added);
        }
        self.backend.open(namespace, digest)
    }

    /// A short-lived URL from which a client may fetch `digest` directly (`redirect = true`
    /// with an object store); `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn presigned_get(
        self: &Arc<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Presigned>, StoreError> {
        let (store, namespace, digest) = (Arc::clone(self), namespace.clone(), *digest);
        blocking(move || store.backend.presigned_get(&namespace, &digest)).await
    }

    /// Opens `digest` for reading, or `None` when it is not stored.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub async fn open(
        self: &Arc<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<StoredBlob>, StoreError> {
        let (store, namespace, digest) = (Arc::clone(self), namespace.clone(), *digest);
        blocking(move || {
            let Some(source) = store.open_object(&namespace, &digest)? else {
                return Ok(None);
            };
            let size = source
                .size()
                .map_err(StoreError::io("stat", digest.hex()))?;
            Ok(Some(StoredBlob {
                source,
                size,
                budget: Arc::clone(&store.response_budget),
            }))
        })
        .await
    }

    /// Reads a small object whole (manifests), or `None` when it is absent or larger than
    /// `max_len`. Blocking.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub fn read_small_blocking(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        max_len: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let source = self.open_object(namespace, digest)?;
        read_small_from(source, digest, max_len)
    }

    /// [`Store::read_small_blocking`] wherever the store keeps the object, without copying
    /// it into a faster tier (read-only commands). Blocking; may reach the network.
    ///
    /// # Errors
    /// [`StoreError`] for failures other than "not found".
    pub fn read_small_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        max_len: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let source = self.backend.open_anywhere(namespace, digest)?;
        read_small_from(source, digest, max_len)
    }

    /// [`Store::read_small_blocking`] off the async threads. The caller verifies the bytes.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub async fn read_small(
        self: &Arc<Self>,
        namespace: &Namespace,
        digest: &Digest,
        max_len: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let (store, namespace, digest) = (Arc::clone(self), namespace.clone(), *digest);
        blocking(move || store.read_small_blocking(&namespace, &digest, max_len)).await
    }

    /// Stores small bytes (a manifest) under `digest`, after checking that they are its
    /// content (sha256, or the schema1 payload rule). Blocking.
    ///
    /// # Errors
    /// [`StoreError::DigestMismatch`] (nothing is stored); [`StoreError::Io`].
    pub fn put_verified(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        if !small_content_matches(bytes, digest) {
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual: Digest::of(bytes),
            });
        }
        let mut staged = self.backend.stage(namespace, digest)?;
        staged.append(bytes)?;
        let len = staged.commit(namespace, digest)?;
        self.account_added(len);
        Ok(())
    }

    /// Stores what `reader` yields under `digest`, hashing while writing; the bytes become
    /// visible only if they are its content. For bytes that do not come through a fill
    /// (`regcache import`). Blocking. Returns the size.
    ///
    /// # Errors
    /// [`StoreError::DigestMismatch`] (nothing is stored); [`StoreError::Io`], also for a
    /// failing `reader`.
    pub fn put_stream_verified(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        reader: &mut dyn std::io::Read,
    ) -> Result<u64, StoreError> {
        let mut staged = self.backend.stage(namespace, digest)?;
        let mut check = DigestCheck::default();
        let mut buffer = vec![0u8; READ_CHUNK];
        loop {
            let read = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(StoreError::io("read the source of", digest.hex())(err)),
            };
            check.update(&buffer[..read]);
            staged.append(&buffer[..read])?;
        }
        // Dropping `staged` on a mismatch discards it.
        check.check(digest)?;
        let len = staged.commit(namespace, digest)?;
        self.account_added(len);
        Ok(len)
    }

    /// Removes `digest` (eviction, or a corrupt manifest so that it is fetched again); returns
    /// the bytes freed, `None` when it was not stored. One `unlink` on the local disk: cheap
    /// enough to call from async code on these rare paths. Readers keep reading.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub fn remove(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let removed = self.backend.remove(namespace, digest)?;
        if let Some(len) = removed {
            self.account_removed(len);
        }
        Ok(removed)
    }

    /// Moves a corrupt object out of the store; returns where it went, for the operator.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn quarantine(&self, namespace: &Namespace, digest: &Digest) -> Result<String, StoreError> {
        let (len, moved_to) = self.backend.quarantine(namespace, digest)?;
        self.account_removed(len);
        Ok(moved_to)
    }

    /// Re-hashes `digest`: `Some(true)` when its bytes are its content (sha256, or the schema1
    /// payload rule), `None` when it is gone (evicted meanwhile is not corruption). Blocking.
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot be read.
    pub fn verify(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<bool>, StoreError> {
        let Some(mut source) = self.open_object(namespace, digest)? else {
            return Ok(None);
        };
        let io_error = StoreError::io("verify", digest.hex());
        let size = source.size().map_err(&io_error)?;
        let mut check = DigestCheck::default();
        for_each_chunk(source.as_mut(), size, &io_error, |chunk| {
            check.update(chunk);
            Ok(())
        })?;
        if check.digest() == *digest {
            return Ok(Some(true));
        }
        if size > MAX_MANIFEST_BYTES as u64 {
            return Ok(Some(false));
        }
        let bytes = source
            .read_at(0, usize::try_from(size).unwrap_or(usize::MAX))
            .map_err(&io_error)?;
        Ok(Some(small_content_matches(&bytes, digest)))
    }
}

/// A stored object, open for reading.
#[derive(Debug)]
pub struct StoredBlob {
    source: Box<dyn BlobRead>,
    size: u64,
    budget: Arc<ResponseBudget>,
}

impl StoredBlob {
    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its bytes `[start, end)` as chunks.
    pub fn chunks(self, start: u64, end: u64) -> Chunks {
        Chunks {
            source: Some(self.source),
            position: start,
            end: end.min(self.size),
            budget: self.budget,
        }
    }
}

/// A byte range of a stored object, read in [`READ_CHUNK`] pieces: the one chunked reader of
/// the crate (responses, and readers following a fill, see `writer.rs`).
#[derive(Debug)]
pub struct Chunks {
    /// `None` only while a read is in flight (or after a failed one).
    source: Option<Box<dyn BlobRead>>,
    position: u64,
    end: u64,
    /// Each chunk holds its share from before it is read until it is dropped.
    budget: Arc<ResponseBudget>,
}

impl Chunks {
    pub(super) fn new(
        source: Box<dyn BlobRead>,
        start: u64,
        end: u64,
        budget: Arc<ResponseBudget>,
    ) -> Self {
        Self {
            source: Some(source),
            position: start,
            end,
            budget,
        }
    }

    /// Reads exactly `len` bytes at `position`, wherever the chunks are and even past `end`:
    /// the reader of a growing object keeps its own position (see `writer.rs`). Waits for its
    /// share of the response budget first.
    pub(super) async fn read_at(&mut self, position: u64, len: usize) -> std::io::Result<Bytes> {
        let reserved = self.budget.reserve(len).await;
        self.read_reserved(position, len, reserved).await
    }

    /// [`Chunks::read_at`] with the share already taken.
    pub(super) async fn read_reserved(
        &mut self,
        position: u64,
        len: usize,
        reserved: Reserved,
    ) -> std::io::Result<Bytes> {
        let mut source = self
            .source
            .take()
            .ok_or_else(|| std::io::Error::other("a previous read failed"))?;
        let (source, bytes) = match source.read_in_memory(position, len) {
            Some(bytes) => (source, bytes),
            None => read_blocking(source, position, len).await?,
        };
        self.source = Some(source);
        Ok(reserved.attach(bytes))
    }

    /// The next chunk, `None` at the end.
    ///
    /// # Errors
    /// The read's failure; a file shorter than its verified size (truncated under us).
    ///
    /// # Cancel safety
    /// Not cancel safe; poll it to completion from one body.
    pub async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.position >= self.end {
            return None;
        }
        let len = usize::try_from(self.end - self.position)
            .unwrap_or(READ_CHUNK)
            .min(READ_CHUNK);
        let read = self.read_at(self.position, len).await;
        if let Ok(bytes) = &read {
            self.position += bytes.len() as u64;
        }
        Some(read)
    }
}

/// Reads an opened small object whole; `None` when absent or larger than `max_len`.
fn read_small_from(
    source: Option<Box<dyn BlobRead>>,
    digest: &Digest,
    max_len: usize,
) -> Result<Option<Bytes>, StoreError> {
    let Some(mut source) = source else {
        return Ok(None);
    };
    let io_error = StoreError::io("read", digest.hex());
    let len = source.size().map_err(&io_error)?;
    if len > max_len as u64 {
        return Ok(None);
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // Copied out: a read may share a pooled 256 KiB buffer, and manifests are kept (the
    // hot layer weighs them by their own length).
    let bytes = source.read_at(0, len).map_err(io_error)?;
    Ok(Some(Bytes::copy_from_slice(&bytes)))
}
