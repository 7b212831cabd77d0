//! The store owns every byte: content-addressed blobs and manifests ([`Store`]) and the
//! manifest/tag index ([`Index`]).
//!
//! No other module opens, reads, writes, stats or removes a stored object or names a path
//! inside the store; nothing public here is a path or a file handle. The store hashes while it
//! writes and refuses to commit bytes that do not match their digest ([`BlobWriter`],
//! [`Store::put_verified`]), so "only verified bytes are stored" holds by construction.
//!
//! The seam for other media is [`BlobBackend`] (see `backend.rs`): [`LocalDisk`], or an
//! object store ([`S3Backend`]) behind a size-bounded local tier ([`Tier`]), behind the same
//! concrete [`Store`] that the cache holds.
//!
//! `store` knows nothing about upstreams' protocol, the cache's policies or HTTP. An upstream
//! is only a namespace here ([`Namespace`]), so content cached from one registry is never
//! served as another's.

mod backend;
mod blobs;
mod buffers;
mod index;
mod local;
mod open;
mod s3;
#[cfg(test)]
mod tests;
mod tier;
mod writer;

pub use backend::{BlobBackend, BlobRead, ListedBlob, Presigned, StagedId, StagedWrite};
pub use blobs::{Chunks, DigestCheck, Store, StoredBlob, Usage, READ_CHUNK};
pub use buffers::ConnectionShare;
pub use index::{
    AccessEntry, AccessRecord, Index, ManifestRecord, ReferrerRecord, SyncRecord, SyncedImage,
    TagRecord, MAX_BATCH,
};
pub use local::LocalDisk;
pub use open::{open_index, open_storage, open_store, IndexAccess};
pub use s3::S3Backend;
pub use tier::Tier;
pub use writer::{BlobWriter, Partial, PartialReader, VerifiedBlob, WriteState};

use regcache_oci::Digest;

/// A per-upstream namespace in the store: the upstream's configured name, which config
/// validation restricts to host characters, so it is safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    /// The namespace for a validated upstream name.
    pub fn new(upstream_name: &str) -> Self {
        Self(upstream_name.to_owned())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file (or backend) operation failed.
    #[error("{action} {object}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// What it was done to, for the operator.
        object: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Bytes to be stored are not the content of their digest; nothing was stored.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the bytes were to be stored under.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// The object store (S3) could not be reached or refused the request; nothing was stored.
    #[error("object store {store}: {action} {object}: {source}")]
    Unavailable {
        /// The bucket, as `s3://bucket/prefix`.
        store: String,
        /// What was being done.
        action: &'static str,
        /// What it was done to.
        object: String,
        /// The failure.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The index database another process (a running server) holds.
    #[error("the index database {path} is in use by a running regcache server{}; stop it, then run this command again", holder.map(|pid| format!(" (PID {pid})")).unwrap_or_default())]
    IndexLocked {
        /// The database's directory.
        path: String,
        /// The process holding it, when the system says (`/proc/locks`).
        holder: Option<u32>,
    },
    /// The index database cannot be read; a read-only command left it as it is.
    #[error("index database {path} is corrupt; `regcache verify --repair` moves it aside and rebuilds it")]
    IndexCorrupt {
        /// The database's directory.
        path: String,
    },
    /// There is no index database (nothing was ever cached here, or the path is wrong).
    #[error("no index database at {path}")]
    IndexMissing {
        /// Where it was looked for.
        path: String,
    },
    /// The index database failed.
    #[error("index database: {0}")]
    Index(#[from] sled::Error),
    /// An index record could not be decoded.
    #[error("index record {key}: {source}")]
    Record {
        /// The sled key, printable.
        key: String,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// The object store that could not be reached, for [`StoreError::Unavailable`].
    pub fn unavailable_store(&self) -> Option<&str> {
        match self {
            Self::Unavailable { store, .. } => Some(store),
            _ => None,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        object: impl std::fmt::Display,
    ) -> impl Fn(std::io::Error) -> Self {
        let object = object.to_string();
        move |source| Self::Io {
            action,
            object: object.clone(),
            source,
        }
    }
}
