//! The on-disk store: content-addressed files ([`BlobStore`]) and the manifest/tag index
//! ([`Index`]).
//!
//! `store` knows nothing about upstreams' protocol, the cache's policies or HTTP: it is the
//! narrow interface that a future shared (S3-compatible) backend will implement. An upstream is
//! only a namespace here ([`Namespace`]), so content cached from one registry is never served
//! as another's.

mod blobs;
mod index;

pub use blobs::{BlobStore, TempBlob, Usage};
pub use index::{AccessRecord, Index, ManifestRecord, ReferrerRecord, TagRecord};

use std::path::PathBuf;

/// A per-upstream namespace in the store: the upstream's configured name, which config
/// validation restricts to host characters, so it is safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
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
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}
