//! Configuration: the TOML file is read into [`RawConfig`] (serde, unknown keys rejected), then
//! [`RawConfig::validate`] turns it into a [`Config`] of typed values that cannot be invalid.
//!
//! One type and one file per table, each validated by its own function: [`ServerConfig`]
//! (`server.rs`), [`StorageConfig`] (`storage.rs`), [`CacheConfig`] (`cache.rs`),
//! [`UpstreamConfig`] (`upstream.rs`), [`AuthConfig`] (`auth.rs`), [`ClusterConfig`]
//! (`cluster.rs`), [`LogConfig`] (`log.rs`) and [`PinConfig`] (`pins.rs`). Each subsystem takes
//! only its section. Only the checks that span tables live here.
//!
//! This crate does no I/O beyond reading the files it is pointed at (the config itself, a
//! `password_file`, the htpasswd and credentials files). Error messages name the key and the
//! offending value.

use std::path::Path;

use serde::Deserialize;

mod auth;
mod cache;
mod cluster;
mod log;
mod pins;
mod policy;
mod server;
mod show;
mod storage;
mod sync;
#[cfg(test)]
mod tests;
mod upstream;
mod values;

pub use auth::{load_htpasswd, repository_patterns, AuthConfig, GrantConfig};
pub use cache::CacheConfig;
pub use cluster::{ClusterConfig, PeerSpec};
pub use log::{LogConfig, LogFormat};
pub use pins::{PinConfig, RawPin};
pub use policy::{PolicyConfig, Require};
pub use server::{ServerConfig, TlsConfig};
pub use storage::{S3Config, StorageBackend, StorageConfig};
pub use sync::SyncConfig;
pub use upstream::{ClientAuth, TagRule, UpstreamConfig};
pub use values::{ConfigError, Secret};

use values::invalid;

/// The configuration used when no file is given: a Docker Hub mirror on port 5000.
pub const DEFAULT_CONFIG: &str = r#"
[server]
listen = "0.0.0.0:5000"

[storage]
path = "./regcache-data"

[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
default = true
"#;

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    storage: storage::RawStorage,
    #[serde(default)]
    cache: cache::RawCache,
    #[serde(default)]
    log: log::RawLog,
    #[serde(default)]
    upstream: Vec<upstream::RawUpstream>,
    #[serde(default)]
    pin: Vec<RawPin>,
    #[serde(default)]
    sync: Vec<sync::RawSync>,
    #[serde(default)]
    policy: Vec<policy::RawPolicy>,
    auth: Option<auth::RawAuth>,
    cluster: Option<cluster::RawCluster>,
}

/// The validated configuration, one field per table of the file.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`: listeners, TLS, connection limits.
    pub server: ServerConfig,
    /// `[storage]`: where blobs and the index live, and the disk budget.
    pub storage: StorageConfig,
    /// `[cache]`: freshness, fills, tag lists.
    pub cache: CacheConfig,
    /// `[[upstream]]`: the allow-list of registries, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[auth]`: client authentication and grants (`None`: anyone who reaches the port may
    /// pull).
    pub auth: Option<AuthConfig>,
    /// `[cluster]`: replicas that ask each other for blobs (`None`: this replica is alone).
    pub cluster: Option<ClusterConfig>,
    /// `[log]`.
    pub log: LogConfig,
    /// `[[pin]]`: images kept cached.
    pub pins: Vec<PinConfig>,
    /// `[[sync]]`: tags kept mirrored on a schedule.
    pub syncs: Vec<SyncConfig>,
    /// `[[policy]]`: signature requirements, in order (the first match decides).
    pub policies: Vec<PolicyConfig>,
}

impl Config {
    /// Loads `path`, or the embedded default when `None`.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => DEFAULT_CONFIG.to_owned(),
        };
        Self::parse(&text)
    }

    /// What serving needs beyond a valid file: at least one `[[upstream]]` (without one every
    /// request would be refused). The maintenance commands, which read the store only, do not
    /// ask this.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `upstream`, with an example to add.
    pub fn check_serving(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstream",
                "",
                "no [[upstream]] is configured, so every pull would be refused: add one, e.g. \
                 [[upstream]] name = \"docker.io\" url = \"https://registry-1.docker.io\" \
                 default = true",
            ));
        }
        Ok(())
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<RawConfig>(text)?.validate()
    }
}

impl RawConfig {
    /// Checks every table, then what spans tables, and builds the typed [`Config`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let server = self.server.validate()?;
        let storage = self.storage.validate(env)?;
        let cache = self.cache.validate()?;
        let upstreams = self
            .upstream
            .into_iter()
            .map(|raw| raw.validate(cache.max_blob_size))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        upstream::check_upstream_set(&upstreams)?;
        if let Some(client) = upstreams.iter().find(|u| u.client_auth.is_some()) {
            if server.tls.is_none() {
                return Err(invalid(
                    format!("upstream.{}.credentials", client.name),
                    "client",
                    "requires [server.tls]: clients send regcache the passwords they use on \
                     the upstream",
                ));
            }
        }
        let cluster = self.cluster.map(|raw| raw.validate(env)).transpose()?;
        if self.auth.is_some() && cluster.as_ref().is_some_and(|c| c.secret.is_none()) {
            return Err(invalid(
                "cluster.secret",
                "",
                "required with [auth]: peers present it instead of a client's credentials",
            ));
        }
        let pins = self
            .pin
            .into_iter()
            .map(|pin| pin.validate(&upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        let syncs = self
            .sync
            .into_iter()
            .map(|rule| rule.validate(&upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        sync::check_sync_set(&syncs)?;
        let policies = self
            .policy
            .into_iter()
            .enumerate()
            .map(|(index, raw)| raw.validate(index + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            server,
            storage,
            cache,
            upstreams,
            auth: self.auth.map(auth::RawAuth::validate).transpose()?,
            cluster,
            log: self.log.validate()?,
            pins,
            syncs,
            policies,
        })
    }
}
