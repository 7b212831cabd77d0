//! Content-addressed files: `<root>/blobs/<namespace>/sha256/<2 hex>/<64 hex>`.
//!
//! Invariant: a file appears under its digest path only after its bytes were verified against
//! that digest, fsynced, and atomically renamed into place (with the directory fsynced). Temp
//! files live in `<root>/tmp/` and are removed on start, so a crash at any instant leaves only
//! verified files under `blobs/`. Paths are built only from [`Digest`] and [`Namespace`], so
//! path traversal is impossible by construction.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{Namespace, StoreError};
use crate::oci::Digest;

/// The content-addressed file store.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    temp_dir: PathBuf,
    /// Makes temp names unique within this process; the pid makes them unique across restarts.
    temp_counter: AtomicU64,
    /// Bytes and files under `blobs/`: counted by [`BlobStore::scan_usage`] at start, then
    /// kept up to date by commits and removals.
    used_bytes: AtomicU64,
    files: AtomicU64,
}

/// What the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes of verified files.
    pub bytes: u64,
    /// Number of files.
    pub files: u64,
}

/// A file being written; it becomes visible under its digest only through
/// [`BlobStore::commit`].
#[derive(Debug)]
pub struct TempBlob {
    /// Where the bytes are written; readers of an in-flight fill open this path.
    pub path: PathBuf,
    /// The open file.
    pub file: std::fs::File,
}

impl BlobStore {
    /// Opens (creating) the store under `root`. The server then calls
    /// [`BlobStore::remove_temp_files`]; other commands must not, as a server may be running.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directories cannot be created.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let blobs = root.join("blobs");
        let temp_dir = root.join("tmp");
        std::fs::create_dir_all(&blobs).map_err(StoreError::io("create", &blobs))?;
        std::fs::create_dir_all(&temp_dir).map_err(StoreError::io("create", &temp_dir))?;
        Ok(Self {
            root: blobs,
            temp_dir,
            temp_counter: AtomicU64::new(0),
            used_bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
        })
    }

    /// Removes temp files a crashed or killed server left behind. Returns how many.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the temp directory cannot be listed.
    pub fn remove_temp_files(&self) -> Result<usize, StoreError> {
        let entries =
            std::fs::read_dir(&self.temp_dir).map_err(StoreError::io("list", &self.temp_dir))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
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

    /// Walks the store once, calls `visit` with each content file (namespace, digest, size,
    /// modification time), and adds what it finds to the usage counters. Blocking; the server
    /// runs it in the background after it starts listening, so start-up does not wait for it.
    /// A file committed while the walk runs may be counted twice; the figure is for budgets and
    /// dashboards, not accounting.
    pub fn scan(
        &self,
        mut visit: impl FnMut(Namespace, Digest, u64, std::time::SystemTime),
    ) -> Usage {
        let mut usage = Usage::default();
        let Ok(namespaces) = std::fs::read_dir(&self.root) else {
            return usage;
        };
        for namespace_dir in namespaces.flatten() {
            let namespace = Namespace::new(&namespace_dir.file_name().to_string_lossy());
            let Ok(prefixes) = std::fs::read_dir(namespace_dir.path().join("sha256")) else {
                continue;
            };
            for prefix in prefixes.flatten() {
                let Ok(files) = std::fs::read_dir(prefix.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let name = file.file_name();
                    let Ok(digest) = Digest::parse(&format!("sha256:{}", name.to_string_lossy()))
                    else {
                        continue;
                    };
                    let Ok(meta) = file.metadata() else { continue };
                    usage.files += 1;
                    usage.bytes += meta.len();
                    let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    visit(namespace.clone(), digest, meta.len(), modified);
                }
            }
        }
        self.used_bytes.fetch_add(usage.bytes, Ordering::Relaxed);
        self.files.fetch_add(usage.files, Ordering::Relaxed);
        usage
    }

    /// Moves a corrupt file out of the store into `<root>/quarantine/` for inspection.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn quarantine(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<PathBuf, StoreError> {
        let path = self.path(namespace, digest);
        let dir = self
            .root
            .parent()
            .map_or_else(|| self.root.join("quarantine"), |p| p.join("quarantine"));
        std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
        let target = dir.join(format!("{}-{}", namespace.as_str(), digest.hex()));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        std::fs::rename(&path, &target).map_err(StoreError::io("quarantine", &path))?;
        self.account_removed(len);
        Ok(target)
    }

    /// Removes temp files only if they are older than `age` (for `gc` while a server may run).
    pub fn remove_temp_files_older_than(&self, age: std::time::Duration) -> (usize, u64) {
        let mut removed = (0, 0);
        let Ok(entries) = std::fs::read_dir(&self.temp_dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|elapsed| elapsed >= age);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                removed.0 += 1;
                removed.1 += meta.len();
            }
        }
        removed
    }

    /// Where the verified bytes of `digest` live (whether or not they are there).
    pub fn path(&self, namespace: &Namespace, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(namespace.as_str())
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens the verified file for `digest`, or `None` when it is not cached.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub async fn open_blob(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<(tokio::fs::File, u64)>, StoreError> {
        let path = self.path(namespace, digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(StoreError::io("open", path)(err)),
        };
        let len = file
            .metadata()
            .await
            .map_err(StoreError::io("stat", &path))?
            .len();
        Ok(Some((file, len)))
    }

    /// Whether `digest` is cached.
    pub fn contains(&self, namespace: &Namespace, digest: &Digest) -> bool {
        self.path(namespace, digest).is_file()
    }

    /// Reads a small cached file whole (manifests), or `None` when it is absent or larger than
    /// `max_len`. The caller verifies the bytes.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub async fn read_small(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        max_len: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(namespace, digest);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.len() > max_len as u64 => return Ok(None),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(StoreError::io("stat", path)(err)),
        }
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(StoreError::io("read", path)(err)),
        }
    }

    /// Creates a new temp file.
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot be created.
    pub fn create_temp(&self) -> Result<TempBlob, StoreError> {
        let sequence = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .temp_dir
            .join(format!("{}-{sequence}.part", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io("create", &path))?;
        Ok(TempBlob { path, file })
    }

    /// Makes a temp file whose bytes the caller verified against `digest` visible under that
    /// digest: fsync, rename, fsync the directory. Blocking: call from a blocking context.
    ///
    /// # Errors
    /// [`StoreError::Io`]; the temp file is removed on failure.
    pub fn commit(
        &self,
        temp: TempBlob,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        let TempBlob { path, file } = temp;
        let result = self.commit_inner(&path, file, namespace, digest);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn commit_inner(
        &self,
        temp_path: &Path,
        file: std::fs::File,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        file.sync_all()
            .map_err(StoreError::io("fsync", temp_path))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(file);
        let final_path = self.path(namespace, digest);
        let dir = final_path
            .parent()
            .expect("a digest path always has a parent directory");
        std::fs::create_dir_all(dir).map_err(StoreError::io("create", dir))?;
        std::fs::rename(temp_path, &final_path).map_err(StoreError::io("rename", &final_path))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io("fsync", dir))?;
        self.used_bytes.fetch_add(len, Ordering::Relaxed);
        self.files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes small verified bytes (a manifest) under `digest`. Blocking.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn put_verified(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let mut temp = self.create_temp()?;
        if let Err(err) = temp.file.write_all(bytes) {
            let _ = std::fs::remove_file(&temp.path);
            return Err(StoreError::io("write", temp.path)(err));
        }
        self.commit(temp, namespace, digest)
    }

    /// Removes a cached file (eviction, or a corrupt manifest so that it is fetched again).
    /// One `unlink`: cheap enough to call from async code on these rare paths. Readers that
    /// have the file open keep reading.
    ///
    /// # Errors
    /// [`StoreError::Io`] for failures other than "not found".
    pub fn remove(&self, namespace: &Namespace, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(namespace, digest);
        let len = std::fs::metadata(&path).map(|m| m.len()).ok();
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::io("remove", path)(err))
            }
            Err(_) => Ok(()),
            Ok(()) => {
                self.account_removed(len.unwrap_or(0));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_makes_bytes_visible_only_under_their_digest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = BlobStore::open(dir.path()).expect("open");
        let namespace = Namespace::new("registry.test");
        let digest = Digest::of(b"hello");
        assert!(!store.contains(&namespace, &digest));
        store
            .put_verified(&namespace, &digest, b"hello")
            .expect("put");
        let bytes = store
            .read_small(&namespace, &digest, 100)
            .await
            .expect("read");
        assert_eq!(bytes.as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            store
                .read_small(&namespace, &digest, 2)
                .await
                .expect("read"),
            None
        );
        let other = Namespace::new("other.test");
        assert!(!store.contains(&other, &digest), "namespaces are separate");
    }

    #[test]
    fn leftover_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = BlobStore::open(dir.path()).expect("open");
        let temp = store.create_temp().expect("temp");
        let path = temp.path.clone();
        drop(temp);
        assert!(path.exists());
        drop(store);
        let store = BlobStore::open(dir.path()).expect("reopen");
        assert!(
            path.exists(),
            "open alone never deletes: a server may own the file"
        );
        assert_eq!(store.remove_temp_files().expect("clean"), 1);
        assert!(!path.exists());
    }
}
