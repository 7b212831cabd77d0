//! Opening the storage a configuration describes: the one way every command (the server and
//! the maintenance and air-gap commands) gets a [`Store`] and its [`Index`].

use std::path::PathBuf;
use std::sync::Arc;

use regcache_config::{Config, StorageBackend};

use crate::{Index, LocalDisk, S3Backend, Store, StoreError, Tier};

/// Opens the store and index under the configured path (with `backend = "s3"`, the path
/// holds the index and the local tier in front of the bucket). A corrupt index is moved aside (one
/// log line) and the server starts with an empty one; manifests are rebuilt from the store.
///
/// # Errors
/// [`StoreError`] when the store, the bucket client or the index cannot be opened.
pub fn open_storage(config: &Config) -> Result<(Store, Index), StoreError> {
    let store = match &config.storage_backend {
        StorageBackend::Local => Store::open_local(&config.storage_path)?,
        StorageBackend::S3(s3) => {
            let bucket = S3Backend::new(s3)?;
            tracing::debug!(bucket = bucket.name(), "blobs go to the object store");
            let local = LocalDisk::open(&config.storage_path)?;
            Store::new(Arc::new(Tier::new(local, Arc::new(bucket))))
        }
    };
    let index_path: PathBuf = config.storage_path.join("index");
    let (index, moved_aside) = Index::open(&index_path)?;
    if let Some(aside) = moved_aside {
        tracing::warn!(
            moved_to = %aside.display(),
            "index database could not be opened; moved it aside and started a new one (cached content is re-indexed on use)"
        );
    }
    Ok((store, index))
}
