//! Pins: images kept cached and never evicted. [`Pins`] is the service (the pins in force and
//! what they protect); [`PinsFile`] is `<storage>/pins.toml`, runtime state written by
//! `regcache pin` and `regcache unpin` and re-read by the maintenance task of a running server.
//! It lives with the cache (which enforces pins), not in `config`, which only reads the
//! operator's file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};
use regcache_config::{ConfigError, PinConfig, RawPin, StorageConfig, UpstreamConfig};
use regcache_oci::{Digest, ImageWalk, Reference, MAX_MANIFEST_BYTES};
use regcache_store::{Index, Namespace, Store};

/// The pins added with `regcache pin`.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinsFile {
    #[serde(default)]
    pin: Vec<RawPin>,
}

/// Why the pins file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// The file (or a pin in it) is invalid: a configuration error.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The file or its directory could not be read or written.
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
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PinsError {
    let path = path.to_owned();
    move |source| PinsError::Io {
        action,
        path,
        source,
    }
}

impl PinsFile {
    /// Where `regcache pin` keeps its pins.
    pub fn path(storage: &StorageConfig) -> PathBuf {
        storage.path.join("pins.toml")
    }

    /// Reads the file; a missing file has no pins.
    ///
    /// # Errors
    /// [`PinsError::Io`] when it cannot be read, [`PinsError::Invalid`] when it cannot be
    /// parsed.
    pub fn read(path: &Path) -> Result<Self, PinsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(toml::from_str(&text).map_err(ConfigError::from)?),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(io_error("read", path)(source)),
        }
    }

    /// Writes the file atomically (temp file and rename), creating its directory.
    ///
    /// # Errors
    /// [`PinsError::Io`].
    pub fn write(&self, path: &Path) -> Result<(), PinsError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        }
        let text = toml::to_string(self).map_err(|err| {
            io_error("encode", path)(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
        })?;
        let temp = path.with_extension("toml.tmp");
        std::fs::write(&temp, text).map_err(io_error("write", &temp))?;
        std::fs::rename(&temp, path).map_err(io_error("rename", path))
    }

    /// Adds a pin (no duplicate); returns whether it was new.
    pub fn add(
        &mut self,
        upstream: &str,
        repository: &str,
        reference: &str,
        platforms: Vec<String>,
    ) -> bool {
        let pin = RawPin {
            upstream: upstream.to_owned(),
            repository: repository.to_owned(),
            reference: reference.to_owned(),
            platforms,
        };
        if self.pin.contains(&pin) {
            return false;
        }
        self.remove(upstream, repository, reference);
        self.pin.push(pin);
        true
    }

    /// Removes a pin; returns whether it was there.
    pub fn remove(&mut self, upstream: &str, repository: &str, reference: &str) -> bool {
        let before = self.pin.len();
        self.pin.retain(|p| {
            !(p.upstream == upstream && p.repository == repository && p.reference == reference)
        });
        self.pin.len() != before
    }

    /// Validates the pins against the configured upstreams.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the bad pin.
    pub fn validate(&self, upstreams: &[UpstreamConfig]) -> Result<Vec<PinConfig>, ConfigError> {
        self.pin
            .iter()
            .cloned()
            .map(|pin| pin.validate(upstreams))
            .collect()
    }
}

/// What the pins file looked like when last read: (modification time, length); `None` when it
/// is absent or was never read, both of which mean the configured pins alone.
type PinsStamp = Option<(Option<std::time::SystemTime>, u64)>;

/// The pins service: the pins in force (`[[pin]]` from the config plus `pins.toml`), re-read
/// when the file changes, and what they protect from eviction.
#[derive(Debug)]
pub(crate) struct Pins {
    configured: Vec<PinConfig>,
    current: RwLock<Vec<PinConfig>>,
    file: PathBuf,
    /// The file's (modification time, length) when last read.
    stamp: Mutex<PinsStamp>,
    /// For validating the file's pins.
    upstreams: Vec<UpstreamConfig>,
}

impl Pins {
    /// The configured pins, and `pins.toml` under `storage` (read by [`Pins::reload`]).
    pub(crate) fn new(
        configured: &[PinConfig],
        storage: &StorageConfig,
        upstreams: &[UpstreamConfig],
    ) -> Self {
        Self {
            configured: configured.to_vec(),
            current: RwLock::new(configured.to_vec()),
            file: PinsFile::path(storage),
            stamp: Mutex::new(None),
            upstreams: upstreams.to_vec(),
        }
    }

    /// The pins in force.
    pub(crate) fn current(&self) -> Vec<PinConfig> {
        self.current.read().clone()
    }

    /// Re-reads `pins.toml` (written by `regcache pin`) when its modification time or length
    /// changed since the last read; returns whether the pins changed. Blocking.
    pub(crate) fn reload(&self) -> bool {
        let stamp = std::fs::metadata(&self.file)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if std::mem::replace(&mut *self.stamp.lock(), stamp) == stamp {
            return false;
        }
        let from_file = PinsFile::read(&self.file)
            .and_then(|file| file.validate(&self.upstreams).map_err(PinsError::from));
        let from_file = match from_file {
            Ok(pins) => pins,
            Err(err) => {
                tracing::warn!(file = %self.file.display(), error = %err, "ignoring the pins file");
                return false;
            }
        };
        let mut all = self.configured.clone();
        all.extend(from_file);
        let mut current = self.current.write();
        let changed = *current != all;
        *current = all;
        changed
    }

    /// Every digest the pins protect: their manifests, children (for the chosen platforms)
    /// and blobs, as far as they are cached. Blocking (index and store reads).
    pub(crate) fn protected(
        &self,
        namespaces: &[Namespace],
        index: &Index,
        store: &Store,
    ) -> HashSet<(Namespace, Digest)> {
        let mut protected = HashSet::new();
        for pin in self.current() {
            let Some(namespace) = namespaces.get(pin.upstream) else {
                continue;
            };
            let root = match &pin.reference {
                Reference::Digest(digest) => Some(*digest),
                Reference::Tag(tag) => index
                    .tag(namespace, &pin.repository, tag)
                    .ok()
                    .flatten()
                    .map(|r| r.digest),
            };
            let Some(root) = root else {
                continue;
            };
            let mut walk = ImageWalk::new(root, &pin.platforms);
            while let Some(digest) = walk.next_manifest() {
                if let Ok(Some(bytes)) =
                    store.read_small_blocking(namespace, &digest, MAX_MANIFEST_BYTES)
                {
                    walk.read(&bytes);
                }
            }
            protected.extend(walk.manifests().iter().map(|d| (namespace.clone(), *d)));
            protected.extend(
                walk.into_blobs()
                    .into_iter()
                    .map(|d| (namespace.clone(), d)),
            );
        }
        protected
    }
}
