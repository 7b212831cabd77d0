//! The seam between [`Store`](super::Store) and where bytes live: [`BlobBackend`].
//!
//! The store keeps every policy that does not depend on the medium (hashing while writing,
//! refusing a commit whose digest does not match, holding usage figures, chunked reads for
//! responses); a backend only moves bytes. [`LocalDisk`] (`super::local`) keeps them in a
//! directory; [`S3Backend`] (`super::s3`) in an object store bucket; [`Tier`] (`super::tier`)
//! owns a `LocalDisk` and an inner `Arc<dyn BlobBackend>` (the bucket): it stages and serves
//! locally, writes commits through to the bucket and promotes what only the bucket has.
//!
//! The methods are blocking: the store calls them on tokio's blocking threads, as local file
//! I/O must be. A network backend runs its requests there with `Handle::block_on`, so the
//! methods the store calls from async code (`stage`, `stat`, `remove`) must not touch the
//! network: the tier answers them from its local disk.
//!
//! [`LocalDisk`]: super::LocalDisk
//! [`S3Backend`]: super::S3Backend
//! [`Tier`]: super::Tier

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{Namespace, StoreError};
use regcache_oci::Digest;

/// Names a staged (being written, not yet visible) object within its backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StagedId(pub(super) String);

/// Where a client may fetch a committed object itself ([`BlobBackend::presigned_get`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presigned {
    /// A short-lived URL for `GET`.
    pub url: String,
    /// The object's size.
    pub size: u64,
}

/// A committed object found by [`BlobBackend::list`].
#[derive(Debug, Clone)]
pub struct ListedBlob {
    /// Its namespace.
    pub namespace: Namespace,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written (the Unix epoch when unknown).
    pub modified: SystemTime,
}

/// Random access to the bytes of one object (committed or staged).
pub trait BlobRead: Send + fmt::Debug {
    /// Its length now (a staged object may still grow).
    ///
    /// # Errors
    /// The backend's failure.
    fn size(&self) -> std::io::Result<u64>;

    /// Reads exactly `len` bytes at `offset`, into a buffer that is sent as is. The buffer may
    /// be pooled (shared with other reads once these bytes are dropped, and as large as a
    /// read chunk whatever `len`): callers send or hash the bytes and drop them, and copy what
    /// they keep.
    ///
    /// # Errors
    /// [`std::io::ErrorKind::UnexpectedEof`] when the object is shorter; the backend's failure.
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Bytes>;

    /// Reads exactly `len` bytes at `offset` only if that needs no waiting on a device (the
    /// bytes are in memory, e.g. the page cache); `None` otherwise, or on any failure: the
    /// caller then uses [`BlobRead::read_at`] on a blocking thread. Called from async code, so
    /// it must never block. By default it never can.
    fn read_in_memory(&mut self, _offset: u64, _len: usize) -> Option<Bytes> {
        None
    }
}

/// An object being written. It becomes visible only through [`StagedWrite::commit`]; dropped
/// without a commit, it is discarded.
pub trait StagedWrite: Send + fmt::Debug {
    /// Its id, for readers that follow it ([`BlobBackend::open_staged`]).
    fn id(&self) -> &StagedId;

    /// Appends bytes.
    ///
    /// # Errors
    /// [`StoreError::Io`] (disk full, I/O error).
    fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError>;

    /// Makes the bytes durable and visible under `(namespace, digest)`; returns their length.
    /// The store calls it only after it verified the digest.
    ///
    /// # Errors
    /// [`StoreError::Io`]; the staged object is gone either way.
    fn commit(self: Box<Self>, namespace: &Namespace, digest: &Digest) -> Result<u64, StoreError>;
}

/// Where blobs and manifests live. See the module documentation.
pub trait BlobBackend: Send + Sync + fmt::Debug {
    /// Starts a staged object that is meant to become `(namespace, digest)` (an object
    /// store uploads straight to that name, visible only when completed). Called from async
    /// code: no network.
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot be created (disk full, read-only).
    fn stage(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Box<dyn StagedWrite>, StoreError>;

    /// Opens a staged object for reading; `None` when it is gone (committed or discarded).
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn open_staged(&self, id: &StagedId) -> Result<Option<Box<dyn BlobRead>>, StoreError>;

    /// Opens a committed object; `None` when it is not there.
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn open(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError>;

    /// The size of a committed object; `None` when it is not there.
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn stat(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Removes a committed object from the store (it is no longer served; its space may be
    /// freed later, by [`BlobBackend::empty_trash`]); returns its size, `None` when it was not
    /// there. Readers that have it open keep reading.
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn remove(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Moves a committed object out of the store for inspection; returns its size and where
    /// it went, for the operator.
    ///
    /// # Errors
    /// The backend's failure.
    fn quarantine(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(u64, String), StoreError>;

    /// Calls `visit` with every committed object.
    fn list(&self, visit: &mut dyn FnMut(ListedBlob));

    /// The size of a committed object wherever the backend keeps it for good: for a tier, the
    /// bucket when the local copy was evicted. May reach the network: maintenance commands
    /// judge index entries by it, never by the fast tier alone.
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn stat_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        self.stat(namespace, digest)
    }

    /// Opens a committed object wherever it is kept for good, without copying it into a
    /// faster tier (read-only commands).
    ///
    /// # Errors
    /// The backend's failure other than "not found".
    fn open_anywhere(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.open(namespace, digest)
    }

    /// Copies a committed object that only a slower tier holds (the bucket) into the fast one,
    /// verified; returns the bytes it added (`Some(0)` when a concurrent caller promoted it),
    /// `None` when no tier has it (or its bytes did not match). Backends without tiers have
    /// nothing to promote.
    ///
    /// # Errors
    /// The slower tier's failure other than "not found" ([`StoreError::Unavailable`]).
    fn promote(&self, _namespace: &Namespace, _digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// A short-lived URL from which a client may GET a committed object directly (a presigned
    /// object store URL), with the object's size; `None` when the backend has none or the
    /// object is not there.
    ///
    /// # Errors
    /// The backend's failure.
    fn presigned_get(
        &self,
        _namespace: &Namespace,
        _digest: &Digest,
    ) -> Result<Option<Presigned>, StoreError> {
        Ok(None)
    }

    /// Whether the backend can serve and take new objects now (readiness): `Ok(None)`, or
    /// `Ok(Some(problem))` when it serves what it holds while a shared part (the bucket) is
    /// unreachable, which is reported without failing readiness. The default stages a probe
    /// and discards it.
    ///
    /// # Errors
    /// Why it cannot.
    fn check_ready(&self) -> Result<Option<String>, StoreError> {
        let probe = Digest::of(b"");
        self.stage(&Namespace::new("readyz"), &probe).map(|_| None)
    }

    /// Frees what [`BlobBackend::remove`] took out of the store but left for later (the local
    /// disk's trash); returns how many objects. Blocking; backends that free at once have
    /// nothing to do.
    ///
    /// # Errors
    /// The backend's failure to list them.
    fn empty_trash(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Discards staged objects older than `age` (all of them with `Duration::ZERO`) that a
    /// crashed or killed process left behind; returns how many and their bytes.
    ///
    /// # Errors
    /// The backend's failure to list them.
    fn discard_staged(&self, age: Duration) -> Result<(usize, u64), StoreError>;
}
