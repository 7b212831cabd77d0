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
    /// The images each `[[sync]]` rule keeps, by rule name (set after each round).
    synced: RwLock<std::collections::BTreeMap<String, Vec<PinConfig>>>,
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
            synced: RwLock::default(),
        }
    }

    /// The pins in force: configured, from the file, and what sync rules keep.
    pub(crate) fn current(&self) -> Vec<PinConfig> {
        let mut pins = self.current.read().clone();
        pins.extend(self.synced.read().values().flatten().cloned());
        pins
    }

    /// Sets what the sync rule `rule` keeps (replacing what it kept before: a dropped image is
    /// unpinned, not deleted).
    pub(crate) fn set_synced(&self, rule: &str, pins: Vec<PinConfig>) {
        self.synced.write().insert(rule.to_owned(), pins);
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

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_config::Config;
    use regcache_oci::Tag;
    use regcache_store::{IndexAccess, TagRecord};

    /// A config with one upstream and the storage under `dir`.
    fn config(dir: &Path, pins: &str) -> Config {
        Config::parse(&format!(
            "[storage]\npath = {:?}\n[[upstream]]\nname = \"registry.test\"\n\
             url = \"http://127.0.0.1:9\"\ndefault = true\n{pins}",
            dir.display().to_string()
        ))
        .expect("config")
    }

    #[test]
    fn the_pins_file_is_read_again_only_when_it_changed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(
            dir.path(),
            "[[pin]]\nupstream = \"registry.test\"\nrepository = \"test/a\"\nreference = \"v1\"\n",
        );
        let pins = Pins::new(&config.pins, &config.storage, &config.upstreams);
        assert_eq!(pins.current().len(), 1, "the configured pin");
        assert!(!pins.reload(), "no file: nothing changed");

        let path = PinsFile::path(&config.storage);
        let mut file = PinsFile::default();
        assert!(file.add("registry.test", "test/b", "v2", Vec::new()));
        file.write(&path).expect("write the pins file");
        assert!(pins.reload(), "a new file is read");
        let current = pins.current();
        assert_eq!(current.len(), 2, "configured pins and the file's");
        assert_eq!(current[1].repository.as_str(), "test/b");
        assert!(!pins.reload(), "an unchanged file is not read again");

        // An invalid file is ignored: the pins in force stay.
        std::fs::write(
            &path,
            "[[pin]]\nupstream = \"nowhere.test\"\nrepository = \"x\"\nreference = \"v\"\n",
        )
        .expect("write");
        assert!(!pins.reload());
        assert_eq!(pins.current().len(), 2);

        std::fs::remove_file(&path).expect("remove");
        assert!(pins.reload(), "a removed file drops its pins");
        assert_eq!(pins.current().len(), 1);
    }

    #[test]
    fn a_pin_protects_its_image_as_far_as_it_is_cached_and_for_its_platforms_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(
            dir.path(),
            "[[pin]]\nupstream = \"registry.test\"\nrepository = \"test/a\"\nreference = \"v1\"\n\
             platforms = [\"linux/arm64\"]\n",
        );
        let (store, index) =
            regcache_store::open_storage(&config.storage, IndexAccess::Serve).expect("storage");
        let namespace = Namespace::new("registry.test");
        let put = |bytes: &[u8]| {
            let digest = Digest::of(bytes);
            store.put_verified(&namespace, &digest, bytes).expect("put");
            digest
        };
        let (config_blob, arm_layer, amd_layer) = (put(b"config"), put(b"arm"), put(b"amd"));
        let image = |layer: &Digest| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_blob}","size":6}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]}}"#
            )
        };
        let arm = put(image(&arm_layer).as_bytes());
        let amd = put(image(&amd_layer).as_bytes());
        let root = put(
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{arm}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{amd}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
            )
            .as_bytes(),
        );
        let pins = Pins::new(&config.pins, &config.storage, &config.upstreams);
        let repo = regcache_oci::RepoName::parse("test/a").expect("name");
        let namespaces = [namespace.clone()];
        assert!(
            pins.protected(&namespaces, &index, &store).is_empty(),
            "a tag not cached protects nothing"
        );
        let tag = Tag::parse("v1").expect("tag");
        let record = TagRecord {
            digest: root,
            confirmed_at: std::time::SystemTime::now(),
        };
        index
            .put_tag(&namespace, &repo, &tag, &record)
            .expect("tag");
        let protected = pins.protected(&namespaces, &index, &store);
        for digest in [root, arm, config_blob, arm_layer] {
            assert!(protected.contains(&(namespace.clone(), digest)), "{digest}");
        }
        for digest in [amd, amd_layer] {
            assert!(
                !protected.contains(&(namespace.clone(), digest)),
                "{digest} (amd64)"
            );
        }
    }
}
