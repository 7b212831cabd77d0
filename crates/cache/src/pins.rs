//! The pins file, `<storage>/pins.toml`: runtime state written by `regcache pin` and
//! `regcache unpin`, re-read by the maintenance task of a running server. It lives with the
//! cache (which enforces pins), not in `config`, which only reads the operator's file.

use std::path::{Path, PathBuf};

use regcache_config::{ConfigError, PinConfig, RawPin, StorageConfig, UpstreamConfig};

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
