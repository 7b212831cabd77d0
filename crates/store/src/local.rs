//! [`LocalDisk`]: the [`BlobBackend`] over a directory,
//! `<root>/blobs/<namespace>/sha256/<2 hex>/<64 hex>`.
//!
//! Invariant: a file appears under its digest path only through [`StagedWrite::commit`]: its
//! bytes are fsynced, atomically renamed into place and the directory fsynced. Staged files
//! live in `<root>/tmp/`; the server discards them at start, so a crash at any instant leaves
//! only committed files under `blobs/`. Paths are built only from [`Digest`] and
//! [`Namespace`], so path traversal is impossible by construction, and no path leaves this
//! module.
//!
//! Nothing stored is readable by other local users: files are created 0600 and directories
//! 0700 (umask can only take bits away), and `open` sets the root, `blobs/` and `tmp/` to 0700
//! whatever the umask or an older version left, so in an existing store with wider modes
//! nothing below the root can be reached by others either.

use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, FileExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::backend::{BlobBackend, BlobRead, ListedBlob, StagedId, StagedWrite};
use super::buffers::{self, ReadBuffers};
use super::{Namespace, StoreError};
use regcache_oci::Digest;

/// The mode of stored files: this user reads and writes them, nobody else.
const FILE_MODE: u32 = 0o600;
/// The mode of the store's directories.
const DIR_MODE: u32 = 0o700;
/// Threads unlinking the trash at once (each waits on the device).
const TRASH_THREADS: usize = 8;

/// Creates `dir` and any missing parents with [`DIR_MODE`].
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(StoreError::io("create", dir.display()))
}

/// Committed files under `blobs/`, staged ones under `tmp/`.
#[derive(Debug)]
pub struct LocalDisk {
    dirs: Arc<Dirs>,
    /// Makes staged names unique within this process; the pid makes them unique across
    /// restarts.
    staged_counter: AtomicU64,
    /// What stored bytes are read into, shared by every open file.
    buffers: Arc<ReadBuffers>,
    /// Whether the filesystem takes `RWF_NOWAIT` reads, shared by every open file: false
    /// once it refused one (tmpfs, some FUSE and NFS mounts), so no read asks again.
    nowait: Arc<AtomicBool>,
}

/// The directories, shared with the staged files (which commit into `blobs`).
#[derive(Debug)]
struct Dirs {
    blobs: PathBuf,
    temp: PathBuf,
    quarantine: PathBuf,
    /// Removed blobs waiting to be unlinked ([`BlobBackend::empty_trash`]).
    trash: PathBuf,
}

impl Dirs {
    fn blob_path(&self, namespace: &Namespace, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(namespace.as_str())
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    fn staged_path(&self, id: &StagedId) -> PathBuf {
        self.temp.join(&id.0)
    }
}

impl LocalDisk {
    /// Opens (creating) the directories under `root`. Staged files left by an earlier process
    /// are not touched: another process (a server) may own them.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directories cannot be created.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dirs = Dirs {
            blobs: root.join("blobs"),
            temp: root.join("tmp"),
            quarantine: root.join("quarantine"),
            trash: root.join("trash"),
        };
        for dir in [&dirs.blobs, &dirs.temp, &dirs.trash] {
            create_private_dir(dir)?;
        }
        for dir in [root, dirs.blobs.as_path(), dirs.temp.as_path()] {
            // Explicit, whatever the umask, and for stores made before modes were set. A root
            // this user does not own (a mounted volume) keeps its mode: warned, not fatal.
            let private = std::fs::Permissions::from_mode(DIR_MODE);
            if let Err(err) = std::fs::set_permissions(dir, private) {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot make a store directory private (mode 0700)");
            }
        }
        Ok(Self {
            dirs: Arc::new(dirs),
            staged_counter: AtomicU64::new(0),
            buffers: ReadBuffers::new(buffers::KEEP),
            nowait: Arc::new(AtomicBool::new(true)),
        })
    }
}

/// `NotFound` becomes `None`.
fn found<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

impl LocalDisk {
    fn open_file(&self, path: &Path) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        let file =
            found(std::fs::File::open(path)).map_err(StoreError::io("open", path.display()))?;
        Ok(file.map(|file| {
            Box::new(FileRead {
                file,
                buffers: Arc::clone(&self.buffers),
                nowait: Arc::clone(&self.nowait),
            }) as Box<dyn BlobRead>
        }))
    }
}

impl BlobBackend for LocalDisk {
    fn stage(
        &self,
        _namespace: &Namespace,
        _digest: &Digest,
    ) -> Result<Box<dyn StagedWrite>, StoreError> {
        let sequence = self.staged_counter.fetch_add(1, Ordering::Relaxed);
        let id = StagedId(format!("{}-{sequence}.part", std::process::id()));
        let path = self.dirs.staged_path(&id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(StoreError::io("create", path.display()))?;
        Ok(Box::new(StagedFile {
            dirs: Arc::clone(&self.dirs),
            id,
            path,
            file,
            committed: false,
        }))
    }

    fn open_staged(&self, id: &StagedId) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.open_file(&self.dirs.staged_path(id))
    }

    fn open(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        self.open_file(&self.dirs.blob_path(namespace, digest))
    }

    fn stat(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.dirs.blob_path(namespace, digest);
        let meta =
            found(std::fs::metadata(&path)).map_err(StoreError::io("stat", path.display()))?;
        Ok(meta.filter(std::fs::Metadata::is_file).map(|m| m.len()))
    }

    /// Moves the file into the trash, where [`BlobBackend::empty_trash`] unlinks it: a rename
    /// is a directory update, where an unlink also frees the blocks, and on a file system
    /// mounted with `discard` waits for the device (about 10 000 unlinks/s at best on the
    /// project's test machine, against 27 000 renames/s). Falls back to unlinking in place.
    fn remove(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.dirs.blob_path(namespace, digest);
        let Some(meta) =
            found(std::fs::metadata(&path)).map_err(StoreError::io("stat", path.display()))?
        else {
            return Ok(None);
        };
        // Spread over the blob layout's 256 prefixes: renames into one directory queue on
        // its lock, and each waits on a lookup in an ever larger directory.
        let hex = digest.hex();
        let bucket = self.dirs.trash.join(&hex[..2]);
        let trashed = bucket.join(format!("{}-{hex}", namespace.as_str()));
        let mut moved = std::fs::rename(&path, &trashed);
        if moved
            .as_ref()
            .is_err_and(|err| err.kind() == std::io::ErrorKind::NotFound)
            && create_private_dir(&bucket).is_ok()
        {
            moved = std::fs::rename(&path, &trashed);
        }
        if moved.is_ok() {
            return Ok(Some(meta.len()));
        }
        let removed =
            found(std::fs::remove_file(&path)).map_err(StoreError::io("remove", path.display()))?;
        Ok(removed.map(|()| meta.len()))
    }

    fn empty_trash(&self) -> Result<u64, StoreError> {
        let trash = &self.dirs.trash;
        let buckets = match found(std::fs::read_dir(trash)) {
            Ok(Some(buckets)) => parking_lot::Mutex::new(buckets),
            Ok(None) => return Ok(0),
            Err(err) => return Err(StoreError::io("list", trash.display())(err)),
        };
        let unlinked = AtomicU64::new(0);
        // Unlinks wait on the device (see `remove`): several threads, each emptying one prefix
        // directory at a time (listed as it goes: memory does not grow with the trash).
        std::thread::scope(|scope| {
            for _ in 0..TRASH_THREADS {
                scope.spawn(|| loop {
                    let next = buckets.lock().next();
                    let Some(bucket) = next else { break };
                    let Ok(bucket) = bucket else { continue };
                    let Ok(files) = std::fs::read_dir(bucket.path()) else {
                        // A file at the top (a store from before the prefixes): unlinked too.
                        if std::fs::remove_file(bucket.path()).is_ok() {
                            unlinked.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    };
                    for file in files.flatten() {
                        if std::fs::remove_file(file.path()).is_ok() {
                            unlinked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Ok(unlinked.into_inner())
    }

    fn quarantine(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(u64, String), StoreError> {
        let path = self.dirs.blob_path(namespace, digest);
        let dir = &self.dirs.quarantine;
        create_private_dir(dir)?;
        let target = dir.join(format!("{}-{}", namespace.as_str(), digest.hex()));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        std::fs::rename(&path, &target).map_err(StoreError::io("quarantine", path.display()))?;
        Ok((len, target.display().to_string()))
    }

    fn list(&self, visit: &mut dyn FnMut(ListedBlob)) {
        let Ok(namespaces) = std::fs::read_dir(&self.dirs.blobs) else {
            return;
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
                    visit(ListedBlob {
                        namespace: namespace.clone(),
                        digest,
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    });
                }
            }
        }
    }

    fn discard_staged(&self, age: Duration) -> Result<(usize, u64), StoreError> {
        let temp = &self.dirs.temp;
        let entries = std::fs::read_dir(temp).map_err(StoreError::io("list", temp.display()))?;
        let mut removed = (0, 0);
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let old = age.is_zero()
                || meta
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .is_some_and(|elapsed| elapsed >= age);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                removed.0 += 1;
                removed.1 += meta.len();
            }
        }
        Ok(removed)
    }
}

/// An open file, read by position into pooled buffers.
#[derive(Debug)]
struct FileRead {
    file: std::fs::File,
    buffers: Arc<ReadBuffers>,
    /// [`LocalDisk`]'s: whether `RWF_NOWAIT` reads are worth trying.
    nowait: Arc<AtomicBool>,
}

impl BlobRead for FileRead {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        // One `pread` straight into the buffer that gets sent.
        self.buffers.read(len, |buffer| {
            self.file.read_exact_at(buffer, offset).map_err(|err| {
                if err.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(err.kind(), "stored file is shorter than expected")
                } else {
                    err
                }
            })
        })
    }

    /// One `preadv2` with `RWF_NOWAIT`: the kernel copies from the page cache or answers
    /// `EAGAIN` at once instead of reading the device. Most reads of a cache find their
    /// bytes there, and then need no hop to a blocking thread and back (two thread wake-ups
    /// per chunk). A short read (part of the range not in memory, or the end of the file)
    /// counts as a miss: the blocking read does it whole, or reports the short file. A
    /// filesystem that refuses `RWF_NOWAIT` (`EOPNOTSUPP`, `EINVAL`) always will: it is not
    /// asked again, and every read goes to a blocking thread.
    fn read_in_memory(&mut self, offset: u64, len: usize) -> Option<Bytes> {
        if !self.nowait.load(Ordering::Relaxed) {
            return None;
        }
        self.buffers
            .read(len, |buffer| {
                let read = rustix::io::preadv2(
                    &self.file,
                    &mut [std::io::IoSliceMut::new(buffer)],
                    offset,
                    rustix::io::ReadWriteFlags::NOWAIT,
                )
                .inspect_err(|&errno| {
                    if errno == rustix::io::Errno::OPNOTSUPP || errno == rustix::io::Errno::INVAL {
                        self.nowait.store(false, Ordering::Relaxed);
                    }
                })?;
                if read == buffer.len() {
                    Ok(())
                } else {
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
            })
            .ok()
    }
}

/// A file in `tmp/`; removed on drop unless committed.
#[derive(Debug)]
struct StagedFile {
    dirs: Arc<Dirs>,
    id: StagedId,
    path: PathBuf,
    file: std::fs::File,
    /// Set once renamed into place: then dropping it leaves the file.
    committed: bool,
}

impl StagedWrite for StagedFile {
    fn id(&self) -> &StagedId {
        &self.id
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(bytes)
            .map_err(StoreError::io("write", self.path.display()))
    }

    fn commit(
        mut self: Box<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<u64, StoreError> {
        let len = commit_file(
            &self.path,
            &self.file,
            &self.dirs.blob_path(namespace, digest),
        )?;
        self.committed = true;
        Ok(len)
    }
}

/// fsync, rename into place, fsync the directory.
fn commit_file(temp: &Path, file: &std::fs::File, target: &Path) -> Result<u64, StoreError> {
    file.sync_all()
        .map_err(StoreError::io("fsync", temp.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let dir = target.parent().ok_or_else(|| StoreError::Io {
        action: "rename",
        object: target.display().to_string(),
        source: std::io::Error::other("a blob path has no parent directory"),
    })?;
    create_private_dir(dir)?;
    std::fs::rename(temp, target).map_err(StoreError::io("rename", target.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync", dir.display()))?;
    Ok(len)
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // Not committed: discard. One unlink, cheap enough on any thread; a reader that has the
        // file open keeps its bytes.
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_keeps_staged_files_left_behind_and_discard_staged_removes_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = LocalDisk::open(dir.path()).expect("open");
        // What a killed server leaves: a staged file nobody will commit.
        let leftover = disk.dirs.staged_path(&StagedId("1-0.part".to_owned()));
        std::fs::write(&leftover, b"partial").expect("write");
        drop(disk);
        let disk = LocalDisk::open(dir.path()).expect("reopen");
        assert!(
            leftover.exists(),
            "open alone never deletes: a server may own the file"
        );
        assert_eq!(
            disk.discard_staged(Duration::from_secs(3600))
                .expect("discard old"),
            (0, 0),
            "a fresh staged file may belong to a running server"
        );
        assert!(leftover.exists());
        assert_eq!(
            disk.discard_staged(Duration::ZERO).expect("discard"),
            (1, 7)
        );
        assert!(!leftover.exists());
    }

    #[test]
    fn a_commit_renames_into_the_digest_path_and_leaves_no_staged_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = LocalDisk::open(dir.path()).expect("open");
        let namespace = Namespace::new("registry.test");
        let digest = Digest::of(b"hello");
        let mut staged = disk.stage(&namespace, &digest).expect("stage");
        let id = staged.id().clone();
        staged.append(b"hello").expect("append");
        assert!(disk.open_staged(&id).expect("open staged").is_some());
        assert_eq!(staged.commit(&namespace, &digest).expect("commit"), 5);
        assert!(disk.open_staged(&id).expect("open staged").is_none());
        let path = disk.dirs.blob_path(&namespace, &digest);
        assert_eq!(std::fs::read(path).expect("committed file"), b"hello");
        let mut listed = Vec::new();
        disk.list(&mut |blob| listed.push((blob.namespace, blob.digest, blob.size)));
        assert_eq!(listed, vec![(namespace, digest, 5)]);
    }

    #[test]
    fn stored_files_and_directories_are_not_readable_by_others() {
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("store");
        // A store an older version made: world-readable directories.
        for sub in ["blobs", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).expect("create");
            std::fs::set_permissions(root.join(sub), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let disk = LocalDisk::open(&root).expect("open");
        for path in [root.clone(), root.join("blobs"), root.join("tmp")] {
            assert_eq!(mode(&path), 0o700, "{}", path.display());
        }
        let namespace = Namespace::new("registry.test");
        let digest = Digest::of(b"private");
        let mut staged = disk.stage(&namespace, &digest).expect("stage");
        assert_eq!(mode(&disk.dirs.staged_path(staged.id())), 0o600);
        staged.append(b"private").expect("append");
        staged.commit(&namespace, &digest).expect("commit");
        let path = disk.dirs.blob_path(&namespace, &digest);
        assert_eq!(mode(&path), 0o600);
        // Every directory made for it, up to `blobs/`.
        let mut parent = path.parent();
        while let Some(dir) = parent.filter(|dir| *dir != root) {
            assert_eq!(mode(dir) & 0o077, 0, "{}", dir.display());
            parent = dir.parent();
        }
        disk.quarantine(&namespace, &digest).expect("quarantine");
        assert_eq!(mode(&root.join("quarantine")) & 0o077, 0);
    }

    #[test]
    fn bytes_in_the_page_cache_are_read_without_waiting_and_evicted_ones_are_left_to_read_at() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = LocalDisk::open(dir.path()).expect("open");
        let namespace = Namespace::new("registry.test");
        let bytes: Vec<u8> = (0..600 * 1024).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&bytes);
        let mut staged = disk.stage(&namespace, &digest).expect("stage");
        staged.append(&bytes).expect("append");
        staged.commit(&namespace, &digest).expect("commit");
        let mut reader = disk
            .open(&namespace, &digest)
            .expect("open")
            .expect("stored");
        // Just written: in the page cache.
        let offset = 300 * 1024;
        let in_memory = reader.read_in_memory(offset as u64, 256 * 1024);
        if !disk.nowait.load(Ordering::Relaxed) {
            // The filesystem refuses RWF_NOWAIT reads (tmpfs, where every read goes to a
            // blocking thread, which never waits on a device either): that is remembered.
            assert!(in_memory.is_none());
            assert!(reader.read_in_memory(0, 256 * 1024).is_none());
            return;
        }
        let in_memory = in_memory.expect("just written bytes are in memory");
        assert_eq!(&in_memory[..], &bytes[offset..offset + 256 * 1024]);
        assert!(
            reader.read_in_memory(500 * 1024, 200 * 1024).is_none(),
            "a range past the end is not read in memory"
        );
        // Evicted (the committed file is clean, so the kernel drops its pages): no waiting for
        // the device on an async thread, the blocking read still gets the bytes.
        let path = disk.dirs.blob_path(&namespace, &digest);
        let file = std::fs::File::open(&path).expect("open file");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        assert!(reader.read_in_memory(0, 256 * 1024).is_none());
        let read = reader.read_at(0, 256 * 1024).expect("read_at");
        assert_eq!(&read[..], &bytes[..256 * 1024]);
    }

    #[test]
    fn once_the_filesystem_refused_nowait_reads_none_is_tried() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = LocalDisk::open(dir.path()).expect("open");
        let namespace = Namespace::new("registry.test");
        let digest = Digest::of(b"hello");
        let mut staged = disk.stage(&namespace, &digest).expect("stage");
        staged.append(b"hello").expect("append");
        staged.commit(&namespace, &digest).expect("commit");
        let mut reader = disk
            .open(&namespace, &digest)
            .expect("open")
            .expect("stored");
        // What a refusal (EOPNOTSUPP or EINVAL) leaves, on any filesystem.
        disk.nowait.store(false, Ordering::Relaxed);
        assert!(reader.read_in_memory(0, 5).is_none());
        assert_eq!(disk.buffers.spare(), 0, "no buffer was taken for it");
        assert_eq!(&reader.read_at(0, 5).expect("read_at")[..], b"hello");
    }

    #[test]
    fn a_small_object_read_to_be_kept_does_not_hold_a_pooled_buffer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Arc::new(LocalDisk::open(dir.path()).expect("open"));
        let store = crate::Store::new(Arc::clone(&disk) as Arc<dyn BlobBackend>);
        let namespace = Namespace::new("registry.test");
        let manifest = br#"{"schemaVersion":2}"#;
        let digest = Digest::of(manifest);
        store
            .put_verified(&namespace, &digest, manifest)
            .expect("put");
        let kept = store
            .read_small_blocking(&namespace, &digest, 1024)
            .expect("read")
            .expect("stored");
        assert_eq!(&kept[..], manifest);
        assert_eq!(
            disk.buffers.spare(),
            1,
            "the read's 256 KiB buffer is back in the pool while the bytes are kept"
        );
    }

    #[test]
    fn a_removed_blob_leaves_the_store_at_once_and_its_file_when_the_trash_is_emptied() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Arc::new(LocalDisk::open(dir.path()).expect("open"));
        let store = crate::Store::new(Arc::clone(&disk) as Arc<dyn BlobBackend>);
        let namespace = Namespace::new("registry.test");
        let blobs: Vec<Vec<u8>> = (0..20u8).map(|n| vec![n; 100 + usize::from(n)]).collect();
        for bytes in &blobs {
            store
                .put_verified(&namespace, &Digest::of(bytes), bytes)
                .expect("put");
        }
        let before = store.usage();
        let gone = Digest::of(&blobs[3]);
        let mut reader = disk.open(&namespace, &gone).expect("open").expect("stored");
        assert_eq!(store.remove(&namespace, &gone).expect("remove"), Some(103));
        assert_eq!(store.usage().bytes, before.bytes - 103);
        assert_eq!(store.usage().files, before.files - 1);
        assert!(disk.stat(&namespace, &gone).expect("stat").is_none());
        assert!(disk.open(&namespace, &gone).expect("open").is_none());
        assert_eq!(store.remove(&namespace, &gone).expect("remove"), None);
        let mut listed = 0;
        disk.list(&mut |_| listed += 1);
        assert_eq!(
            listed,
            blobs.len() - 1,
            "the trash is not part of the store"
        );
        let trashed = |digest: &Digest| {
            let hex = digest.hex();
            let name = format!("registry.test-{hex}");
            dir.path().join("trash").join(&hex[..2]).join(name)
        };
        assert!(trashed(&gone).is_file());

        for bytes in &blobs[5..] {
            store
                .remove(&namespace, &Digest::of(bytes))
                .expect("remove");
        }
        assert_eq!(store.empty_trash().expect("empty"), 16);
        assert!(!trashed(&gone).exists());
        for bytes in &blobs[5..] {
            assert!(!trashed(&Digest::of(bytes)).exists());
        }
        assert_eq!(
            &reader
                .read_at(0, 103)
                .expect("an open reader keeps its bytes")[..],
            &blobs[3][..]
        );
        for bytes in &blobs[..5] {
            let digest = Digest::of(bytes);
            let kept = disk.stat(&namespace, &digest).expect("stat");
            assert_eq!(kept.is_some(), digest != gone);
        }
        assert_eq!(store.empty_trash().expect("empty"), 0);
    }

    #[test]
    fn verify_finds_a_rotten_blob_and_quarantine_takes_it_out_of_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Arc::new(LocalDisk::open(dir.path()).expect("open"));
        let store = crate::Store::new(Arc::clone(&disk) as Arc<dyn BlobBackend>);
        let namespace = Namespace::new("registry.test");
        let bytes = vec![7u8; 300 * 1024];
        let digest = Digest::of(&bytes);
        store
            .put_verified(&namespace, &digest, &bytes)
            .expect("put");
        assert_eq!(
            store.verify(&namespace, &digest).expect("verify"),
            Some(true)
        );
        // Bit rot on disk, behind the store's back.
        let path = disk.dirs.blob_path(&namespace, &digest);
        let mut rotten = bytes.clone();
        rotten[200_000] ^= 0x10;
        std::fs::write(&path, &rotten).expect("rot");
        assert_eq!(
            store.verify(&namespace, &digest).expect("verify"),
            Some(false)
        );
        let moved_to = store.quarantine(&namespace, &digest).expect("quarantine");
        assert!(!store.contains(&namespace, &digest));
        assert_eq!(std::fs::read(&moved_to).expect("quarantined file"), rotten);
        assert_eq!(store.usage().bytes, 0);
        assert_eq!(store.verify(&namespace, &digest).expect("verify"), None);
    }
}
