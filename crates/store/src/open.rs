//! Opening the storage a configuration describes: the one way every command (the server and
//! the maintenance and air-gap commands) gets a [`Store`] and its [`Index`], so that
//! `backend = "s3"` means the same bucket-backed store for all of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use regcache_config::{StorageBackend, StorageConfig};

use crate::index::OnCorrupt;
use crate::{Index, LocalDisk, S3Backend, Store, StoreError, Tier};

/// What a command may do with the index database it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexAccess {
    /// The server and the commands that fill the store (prefetch, import): a corrupt database
    /// is moved aside (one log line) and a new one started; manifests are re-indexed on use.
    Serve,
    /// Commands that must not change what they judge (`ls`, `verify` without `--repair`, `gc`,
    /// `export`): a missing or corrupt database is an error, and nothing is moved or created.
    Existing,
    /// `verify --repair`: a corrupt database is moved aside and rebuilt from the store.
    Repair,
}

/// Opens the blob store the configuration describes: the local disk, or with
/// `backend = "s3"` the local tier in front of the bucket.
///
/// # Errors
/// [`StoreError`] when the storage directory or the bucket client cannot be set up.
pub fn open_store(storage: &StorageConfig) -> Result<Store, StoreError> {
    Ok(match &storage.backend {
        StorageBackend::Local => Store::open_local(&storage.path)?,
        StorageBackend::S3(s3) => {
            let bucket = S3Backend::new(s3)?;
            tracing::debug!(bucket = bucket.name(), "blobs go to the object store");
            let local = LocalDisk::open(&storage.path)?;
            Store::new(Arc::new(Tier::new(local, Arc::new(bucket))))
        }
    })
}

/// Where the index database of a configuration lives.
fn index_path(storage: &StorageConfig) -> PathBuf {
    storage.path.join("index")
}

/// Opens the index database under the configured storage path, as `access` allows.
///
/// # Errors
/// [`StoreError::IndexMissing`] and [`StoreError::IndexCorrupt`] (with
/// [`IndexAccess::Existing`]); [`StoreError::IndexLocked`] when another process (a running
/// server) holds it; [`StoreError`] when even a fresh database cannot be created.
pub fn open_index(storage: &StorageConfig, access: IndexAccess) -> Result<Index, StoreError> {
    let path = index_path(storage);
    if access == IndexAccess::Existing && !path.exists() {
        return Err(StoreError::IndexMissing {
            path: path.display().to_string(),
        });
    }
    let on_corrupt = match access {
        IndexAccess::Existing => OnCorrupt::Refuse,
        IndexAccess::Serve | IndexAccess::Repair => OnCorrupt::MoveAside,
    };
    let (index, moved_aside) = Index::open(&path, on_corrupt, storage.index_cache)?;
    if let Some(aside) = moved_aside {
        log_moved_aside(&aside);
    }
    Ok(index)
}

fn log_moved_aside(aside: &Path) {
    tracing::warn!(
        moved_to = %aside.display(),
        "index database could not be opened; moved it aside and started a new one (cached content is re-indexed on use)"
    );
}

/// [`open_store`] and [`open_index`] together.
///
/// # Errors
/// As theirs.
pub fn open_storage(
    storage: &StorageConfig,
    access: IndexAccess,
) -> Result<(Store, Index), StoreError> {
    let store = open_store(storage)?;
    let index = open_index(storage, access)?;
    Ok((store, index))
}
