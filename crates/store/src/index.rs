//! The persistent index (sled): tag → digest with the time the upstream last confirmed it,
//! digest → manifest media type, and the (repository, digest) memberships the upstream
//! confirmed.
//!
//! Records on disk are versioned JSON kept apart from domain types. The index only *describes*
//! the blob store: manifest bytes live in the content-addressed files, so a lost or corrupt
//! database is moved aside at start and rebuilt lazily from the files and the upstreams.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Namespace, StoreError};
use regcache_oci::{Digest, MediaType, RepoName, Tag};

mod records;

#[cfg(test)]
use records::parse_blob_key;
use records::{
    blob_key, decode_access, encode_access, parse_legacy_key, ManifestRecordV1, ReferrerRecordV1,
    TagRecordV1,
};
pub use records::{
    AccessEntry, AccessRecord, ManifestRecord, ReferrerRecord, SyncRecord, SyncedImage, TagRecord,
};

/// The most entries in one sled batch: a batch is built whole in memory before it is applied.
pub const MAX_BATCH: usize = 4096;

/// The index's page cache when none is configured (tests): `storage.index_cache`'s default.
#[cfg(test)]
const TEST_CACHE_BYTES: u64 = 64 << 20;

/// The sled database.
#[derive(Debug, Clone)]
pub struct Index {
    db: sled::Db,
    tags: sled::Tree,
    manifests: sled::Tree,
    /// Blob files' size and last access, for least-recently-used eviction, under compact keys
    /// ([`blob_key`]).
    access: sled::Tree,
    /// The access records of an index written before compact keys (`namespace\nsha256:<hex>`
    /// keys), while a command that may not migrate them (`ls`, `verify`, `gc`, `export`)
    /// still finds some: read and removed beside the compact ones. The server migrates them at
    /// open, and then this is `None`.
    legacy_access: Option<sled::Tree>,
}

/// The tree of compact access records.
const ACCESS_TREE: &str = "blob_access";
/// The tree of access records under text keys (before compact keys).
const LEGACY_ACCESS_TREE: &str = "access";

/// Splits a `namespace\n…` key.
fn split_key(key: &[u8]) -> Option<Vec<&str>> {
    Some(std::str::from_utf8(key).ok()?.split('\n').collect())
}

fn tag_key(namespace: &Namespace, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    format!(
        "{}\n{}\n{}",
        namespace.as_str(),
        repo.as_str(),
        tag.as_str()
    )
    .into_bytes()
}

fn manifest_key(namespace: &Namespace, digest: &Digest) -> Vec<u8> {
    format!("{}\n{digest}", namespace.as_str()).into_bytes()
}

/// The process holding a lock on `file`, from `/proc/locks` (lines such as
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF`: the pid, then device:inode).
fn lock_holder(file: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(file).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pid, device_inode) = (fields.get(4)?, fields.get(5)?);
        let held = device_inode.rsplit(':').next()?.parse::<u64>().ok()?;
        (held == inode).then(|| pid.parse().ok()).flatten()
    })
}

/// What [`Index::open`] does with a database it cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnCorrupt {
    /// Move it aside and start a new one (the server).
    MoveAside,
    /// Leave it as it is and fail (read-only commands).
    Refuse,
}

/// The top level of a database directory as a read-only command found it: every entry, and the
/// bytes of its small files (sled's `conf`, snapshots of small databases).
#[derive(Debug)]
struct AsFound(Vec<(std::ffi::OsString, Option<Vec<u8>>)>);

impl AsFound {
    /// Files up to this size are kept to be put back.
    const SMALL: u64 = 1 << 20;

    fn read(dir: &Path) -> Self {
        let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
        Self(
            entries
                .map(|entry| {
                    let small = entry
                        .metadata()
                        .is_ok_and(|m| m.is_file() && m.len() <= Self::SMALL);
                    let bytes = small.then(|| std::fs::read(entry.path()).ok()).flatten();
                    (entry.file_name(), bytes)
                })
                .collect(),
        )
    }

    /// Removes what was added and rewrites small files that changed. Best effort: a failure is
    /// logged, the command fails anyway.
    fn restore(&self, dir: &Path) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !self.0.iter().any(|(name, _)| *name == entry.file_name()) {
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(err) = removed {
                    tracing::warn!(path = %path.display(), error = %err, "could not remove what opening the index added");
                }
            }
        }
        for (name, bytes) in &self.0 {
            let Some(bytes) = bytes else { continue };
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_ref() != Some(bytes) {
                if let Err(err) = std::fs::write(&path, bytes) {
                    tracing::warn!(path = %path.display(), error = %err, "could not put back what opening the index changed");
                }
            }
        }
    }
}

impl Index {
    /// Opens the database at `path`. If it cannot be opened (corrupt, or written by an
    /// incompatible version), then with [`OnCorrupt::MoveAside`] it is moved aside to
    /// `<path>.corrupt-<unix time>` and a fresh one is created (the returned path says where
    /// the old one went); with [`OnCorrupt::Refuse`] nothing is changed.
    ///
    /// # Errors
    /// [`StoreError::IndexLocked`] when another process holds it; [`StoreError::IndexCorrupt`]
    /// with [`OnCorrupt::Refuse`]; [`StoreError`] when even a fresh database cannot be created.
    pub(crate) fn open(
        path: &Path,
        on_corrupt: OnCorrupt,
        cache_bytes: u64,
    ) -> Result<(Self, Option<PathBuf>), StoreError> {
        // sled rewrites its `conf` file (and may add files) before it finds a database
        // unreadable: a refused open puts back what it found.
        let found = (on_corrupt == OnCorrupt::Refuse).then(|| AsFound::read(path));
        let opened = Self::open_at(path, cache_bytes);
        if let (Err(_), Some(found)) = (&opened, found) {
            found.restore(path);
        }
        match opened {
            Ok(mut index) => {
                if on_corrupt == OnCorrupt::MoveAside {
                    index.migrate_access()?;
                }
                Ok((index, None))
            }
            // sled takes an exclusive lock on its file: another process (a running server)
            // has it. sled reports that as an `Other` error naming the lock.
            Err(StoreError::Index(sled::Error::Io(err)))
                if err.kind() == std::io::ErrorKind::WouldBlock
                    || err.to_string().contains("could not acquire lock") =>
            {
                Err(StoreError::IndexLocked {
                    path: path.display().to_string(),
                    holder: lock_holder(&path.join("db")),
                })
            }
            // An I/O error is not corruption: permissions, a full disk. Moving the database
            // aside then would lose a healthy index, so that is reported instead.
            Err(StoreError::Index(sled::Error::Io(err)))
                if err.kind() != std::io::ErrorKind::InvalidData =>
            {
                Err(StoreError::Index(sled::Error::Io(err)))
            }
            Err(_) if on_corrupt == OnCorrupt::Refuse => Err(StoreError::IndexCorrupt {
                path: path.display().to_string(),
            }),
            Err(_) => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let aside = path.with_extension(format!("corrupt-{stamp}"));
                std::fs::rename(path, &aside)
                    .map_err(StoreError::io("move aside", path.display()))?;
                Ok((Self::open_at(path, cache_bytes)?, Some(aside)))
            }
        }
    }

    /// Opens sled with a page cache of `cache_bytes` (`storage.index_cache`; sled's own
    /// default is 1 GiB, which a large store fills).
    fn open_at(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()?;
        let tags = db.open_tree("tags")?;
        let manifests = db.open_tree("manifests")?;
        let access = db.open_tree(ACCESS_TREE)?;
        let legacy_access = if db
            .tree_names()
            .iter()
            .any(|name| &name[..] == LEGACY_ACCESS_TREE.as_bytes())
        {
            Some(db.open_tree(LEGACY_ACCESS_TREE)?)
        } else {
            None
        };
        // Reading one record of each tree surfaces corruption now rather than on a request.
        for tree in [&tags, &manifests, &access]
            .into_iter()
            .chain(&legacy_access)
        {
            if let Some(entry) = tree.iter().next() {
                entry?;
            }
        }
        Ok(Self {
            db,
            tags,
            manifests,
            access,
            legacy_access,
        })
    }

    /// Moves access records under text keys (an index written before compact keys) to compact
    /// keys, in bounded batches, and drops their tree. Each batch inserts and removes together,
    /// so a crash part-way leaves every record under one key or the other; the next open
    /// carries on.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    fn migrate_access(&mut self) -> Result<(), StoreError> {
        let Some(legacy) = self.legacy_access.take() else {
            return Ok(());
        };
        let mut moved = 0u64;
        loop {
            let mut compact = sled::Batch::default();
            let mut old = sled::Batch::default();
            let mut count = 0;
            for entry in legacy.iter().take(MAX_BATCH) {
                let (key, value) = entry?;
                if let Some((namespace, digest)) = parse_legacy_key(&key) {
                    compact.insert(blob_key(&namespace, &digest), value);
                }
                old.remove(key);
                count += 1;
            }
            if count == 0 {
                break;
            }
            // sled has no batch across trees: compact keys first, so that a crash between the
            // two leaves a record under both keys (read the same), never under none.
            self.access.apply_batch(compact)?;
            legacy.apply_batch(old)?;
            moved += count as u64;
        }
        self.db.drop_tree(LEGACY_ACCESS_TREE)?;
        if moved > 0 {
            tracing::info!(
                records = moved,
                "index access records moved to compact keys"
            );
        }
        Ok(())
    }

    /// The record of a tag, if any. An undecodable record reads as absent (it will be
    /// replaced by the next confirmation).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn tag(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        let Some(raw) = self.tags.get(tag_key(namespace, repo, tag))? else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<TagRecordV1>(&raw) else {
            return Ok(None);
        };
        let Ok(digest) = Digest::parse(&record.digest) else {
            return Ok(None);
        };
        Ok(Some(TagRecord {
            digest,
            confirmed_at: UNIX_EPOCH + Duration::from_millis(record.confirmed_unix_ms),
        }))
    }

    /// Records that the upstream confirmed `tag` → `record.digest`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_tag(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), StoreError> {
        let confirmed_unix_ms = record
            .confirmed_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let raw = serde_json::to_vec(&TagRecordV1 {
            v: 1,
            digest: record.digest.to_string(),
            confirmed_unix_ms: u64::try_from(confirmed_unix_ms).unwrap_or(u64::MAX),
        })
        .map_err(|source| StoreError::Record {
            key: format!("{repo}:{tag}"),
            source,
        })?;
        self.tags.insert(tag_key(namespace, repo, tag), raw)?;
        Ok(())
    }

    /// The record of a manifest, if any.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn manifest(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>, StoreError> {
        let Some(raw) = self.manifests.get(manifest_key(namespace, digest))? else {
            return Ok(None);
        };
        let record = serde_json::from_slice::<ManifestRecordV1>(&raw)
            .ok()
            .and_then(|r| MediaType::from_content_type(&r.media_type));
        Ok(record.map(|media_type| ManifestRecord { media_type }))
    }

    /// Records a manifest whose bytes were just committed to the blob store.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_manifest(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        record: &ManifestRecord,
    ) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(&ManifestRecordV1 {
            v: 1,
            media_type: record.media_type.to_string(),
        })
        .map_err(|source| StoreError::Record {
            key: digest.to_string(),
            source,
        })?;
        self.manifests
            .insert(manifest_key(namespace, digest), raw)?;
        Ok(())
    }

    /// Forgets a manifest whose bytes turned out to be missing or corrupt.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn remove_manifest(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        self.manifests.remove(manifest_key(namespace, digest))?;
        Ok(())
    }

    /// Records blob accesses, in sled batches of at most [`MAX_BATCH`] entries (a batch is
    /// held whole in memory until applied).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn record_access(
        &self,
        entries: &[(Namespace, Digest, AccessRecord)],
    ) -> Result<(), StoreError> {
        for chunk in entries.chunks(MAX_BATCH) {
            let mut batch = sled::Batch::default();
            for (namespace, digest, record) in chunk {
                batch.insert(blob_key(namespace, digest), &encode_access(*record)[..]);
            }
            self.access.apply_batch(batch)?;
        }
        Ok(())
    }

    /// A blob's access record, if any (undecodable: none).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn access(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<AccessRecord>, StoreError> {
        let mut raw = self.access.get(blob_key(namespace, digest))?;
        if let (None, Some(legacy)) = (&raw, &self.legacy_access) {
            raw = legacy.get(manifest_key(namespace, digest))?;
        }
        Ok(raw.and_then(|raw| decode_access(&raw)))
    }

    /// Whether a blob has an access record.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn has_access(&self, namespace: &Namespace, digest: &Digest) -> Result<bool, StoreError> {
        if self.access.contains_key(blob_key(namespace, digest))? {
            return Ok(true);
        }
        match &self.legacy_access {
            Some(legacy) => Ok(legacy.contains_key(manifest_key(namespace, digest))?),
            None => Ok(false),
        }
    }

    /// Visits every blob's access record, one at a time: memory does not grow with the store.
    /// Undecodable records are skipped; the blob's name is decoded only when the visitor asks.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn for_each_access(
        &self,
        mut visit: impl FnMut(AccessEntry<'_>),
    ) -> Result<(), StoreError> {
        let trees = std::iter::once((&self.access, false))
            .chain(self.legacy_access.iter().map(|tree| (tree, true)));
        for (tree, legacy) in trees {
            for entry in tree.iter() {
                let (key, value) = entry?;
                if let Some(record) = decode_access(&value) {
                    visit(AccessEntry {
                        record,
                        key: &key,
                        legacy,
                    });
                }
            }
        }
        Ok(())
    }

    /// Forgets a blob's access record (after eviction or when its file is gone).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn remove_access(&self, namespace: &Namespace, digest: &Digest) -> Result<(), StoreError> {
        self.remove_accesses(std::slice::from_ref(&(namespace.clone(), *digest)))
    }

    /// Forgets many blobs' access records, in sled batches of at most [`MAX_BATCH`].
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn remove_accesses(&self, blobs: &[(Namespace, Digest)]) -> Result<(), StoreError> {
        for chunk in blobs.chunks(MAX_BATCH) {
            let mut batch = sled::Batch::default();
            for (namespace, digest) in chunk {
                batch.remove(blob_key(namespace, digest));
            }
            self.access.apply_batch(batch)?;
            if let Some(legacy) = &self.legacy_access {
                let mut batch = sled::Batch::default();
                for (namespace, digest) in chunk {
                    batch.remove(manifest_key(namespace, digest));
                }
                legacy.apply_batch(batch)?;
            }
        }
        Ok(())
    }

    /// Every tag record: (namespace, repository, tag, record).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn tags(&self) -> Result<Vec<(Namespace, RepoName, Tag, TagRecord)>, StoreError> {
        let mut tags = Vec::new();
        for entry in self.tags.iter() {
            let (key, _) = entry?;
            let Some(parts) = split_key(&key) else {
                continue;
            };
            let [namespace, repo, tag] = parts.as_slice() else {
                continue;
            };
            let (Ok(repo), Ok(tag)) = (RepoName::parse(repo), Tag::parse(tag)) else {
                continue;
            };
            let namespace = Namespace::new(namespace);
            if let Some(record) = self.tag(&namespace, &repo, &tag)? {
                tags.push((namespace, repo, tag, record));
            }
        }
        Ok(tags)
    }

    /// Every manifest record's key.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn manifest_digests(&self) -> Result<Vec<(Namespace, Digest)>, StoreError> {
        let mut digests = Vec::new();
        for entry in self.manifests.iter() {
            let (key, _) = entry?;
            if let Some([namespace, digest]) = split_key(&key).as_deref() {
                if let Ok(digest) = Digest::parse(digest) {
                    digests.push((Namespace::new(namespace), digest));
                }
            }
        }
        Ok(digests)
    }

    /// Forgets a tag (its manifest is gone and cannot be rebuilt).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn remove_tag(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<(), StoreError> {
        self.tags.remove(tag_key(namespace, repo, tag))?;
        Ok(())
    }

    /// Number of manifest records (O(n) in sled; for the metrics scrape).
    pub fn manifest_count(&self) -> usize {
        self.manifests.len()
    }

    /// Whether the database answers reads (for `/readyz`).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn check(&self) -> Result<(), StoreError> {
        self.tags.get(b"\0readiness-probe")?;
        Ok(())
    }

    /// Forgets blobs' access records one at a time, without a batch: sled serialises batches,
    /// while single removals from several threads run at once (eviction splits its batches
    /// over threads, then flushes). Not atomic: a crash keeps some records, which is safe.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn forget_accesses(&self, blobs: &[(Namespace, Digest)]) -> Result<(), StoreError> {
        for (namespace, digest) in blobs {
            self.access.remove(blob_key(namespace, digest))?;
            if let Some(legacy) = &self.legacy_access {
                legacy.remove(manifest_key(namespace, digest))?;
            }
        }
        Ok(())
    }

    /// Writes everything to disk (at shutdown).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// `namespace\nrepository\nsubject\n`: the prefix of a subject's referrer keys.
fn subject_prefix(namespace: &Namespace, repo: &RepoName, subject: &Digest) -> Vec<u8> {
    format!("{}\n{}\n{subject}\n", namespace.as_str(), repo.as_str()).into_bytes()
}

impl Index {
    /// The referrers tree, opened on first use (sled keeps opened trees; this is a map
    /// lookup after the first call), so the struct and `open` stay as they are.
    fn referrers_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("referrers")?)
    }

    /// Records that the cached manifest `record.digest` of `repo` names `subject`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_referrer(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        subject: &Digest,
        record: &ReferrerRecord,
    ) -> Result<(), StoreError> {
        let mut key = subject_prefix(namespace, repo, subject);
        key.extend_from_slice(record.digest.to_string().as_bytes());
        let raw = serde_json::to_vec(&ReferrerRecordV1 {
            v: 1,
            media_type: record.media_type.to_string(),
            size: record.size,
            artifact_type: record.artifact_type.clone(),
            annotations: record.annotations.clone(),
        })
        .map_err(|source| StoreError::Record {
            key: record.digest.to_string(),
            source,
        })?;
        self.referrers_tree()?.insert(key, raw)?;
        Ok(())
    }

    /// The cached manifests of `repo` whose subject is `subject`. Undecodable records are
    /// skipped.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn referrers(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<ReferrerRecord>, StoreError> {
        let prefix = subject_prefix(namespace, repo, subject);
        let mut records = Vec::new();
        for entry in self.referrers_tree()?.scan_prefix(&prefix) {
            let (key, raw) = entry?;
            let digest = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(|text| Digest::parse(text).ok());
            let record = serde_json::from_slice::<ReferrerRecordV1>(&raw).ok();
            let (Some(digest), Some(record)) = (digest, record) else {
                continue;
            };
            let Some(media_type) = MediaType::from_content_type(&record.media_type) else {
                continue;
            };
            records.push(ReferrerRecord {
                digest,
                media_type,
                size: record.size,
                artifact_type: record.artifact_type,
                annotations: record.annotations,
            });
        }
        Ok(records)
    }

    /// The cached tags of one repository, in lexical (byte) order.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn repository_tags(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
    ) -> Result<Vec<Tag>, StoreError> {
        let prefix = format!("{}\n{}\n", namespace.as_str(), repo.as_str()).into_bytes();
        let mut tags = Vec::new();
        // sled iterates keys in byte order, which is the lexical order the API asks for.
        for entry in self.tags.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let tag = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(|text| Tag::parse(text).ok());
            tags.extend(tag);
        }
        Ok(tags)
    }
}

/// `namespace\nrepository\n` + the digest's 32 bytes: a membership key. Compact (one per
/// repository and digest the upstream confirmed) and unambiguous: names contain no `\n` and
/// the digest has a fixed length at the end.
fn membership_key(namespace: &Namespace, repo: &RepoName, digest: &Digest) -> Vec<u8> {
    let mut key = format!("{}\n{}\n", namespace.as_str(), repo.as_str()).into_bytes();
    let mut raw = [0u8; 32];
    // The hex of a parsed digest always decodes to 32 bytes.
    if hex::decode_to_slice(digest.hex(), &mut raw).is_err() {
        return format!("{}\n{}\n{digest}", namespace.as_str(), repo.as_str()).into_bytes();
    }
    key.extend_from_slice(&raw);
    key
}

impl Index {
    /// The memberships tree, opened on first use (as the referrers tree).
    fn memberships_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("memberships")?)
    }

    /// Records that the upstream served or confirmed `digest` under `repo` at `at`. The value
    /// is the time, 8 little-endian bytes of Unix milliseconds (kept for diagnostics; a
    /// membership does not expire: content by digest is immutable). An existing record is
    /// left alone, so confirming again costs a read, not a write.
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn put_membership(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        digest: &Digest,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let tree = self.memberships_tree()?;
        let key = membership_key(namespace, repo, digest);
        if tree.contains_key(&key)? {
            return Ok(());
        }
        let millis = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let millis = u64::try_from(millis).unwrap_or(u64::MAX);
        tree.insert(key, &millis.to_le_bytes()[..])?;
        Ok(())
    }

    /// Whether the upstream served or confirmed `digest` under `repo` (recorded by
    /// [`Index::put_membership`]).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn is_member(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        let key = membership_key(namespace, repo, digest);
        Ok(self.memberships_tree()?.contains_key(key)?)
    }
}

impl Index {
    fn sync_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("sync")?)
    }

    /// The state of the sync rule `name`, if it ever ran. An undecodable record reads as none
    /// (the rule runs again at once).
    ///
    /// # Errors
    /// [`StoreError::Index`].
    pub fn sync_state(&self, name: &str) -> Result<Option<SyncRecord>, StoreError> {
        let raw = self.sync_tree()?.get(name.as_bytes())?;
        Ok(raw.and_then(|raw| serde_json::from_slice(&raw).ok()))
    }

    /// Records the state of the sync rule `name`, durably (flushed).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_sync_state(&self, name: &str, record: &SyncRecord) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(record).map_err(|source| StoreError::Record {
            key: name.to_owned(),
            source,
        })?;
        let tree = self.sync_tree()?;
        tree.insert(name.as_bytes(), raw)?;
        tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
