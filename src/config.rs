//! Configuration: the TOML file is read into [`RawConfig`] (serde, unknown keys rejected), then
//! [`RawConfig::validate`] turns it into a [`Config`] of typed values that cannot be invalid.
//!
//! This module does no I/O beyond reading the files it is pointed at (the config itself and a
//! `password_file`). Error messages name the key and the offending value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

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

/// Why a configuration was rejected. `main` exits with status 64 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given on the command line.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid config: {0}")]
    Syntax(#[from] toml::de::Error),
    /// A key has a value that does not make sense.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        /// The dotted key, e.g. `upstream.docker.io.url`.
        key: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A secret string (a password or token) whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    pin: Vec<RawPin>,
    auth: Option<RawAuth>,
}

/// The pins file (`<storage>/pins.toml`) written by `regcache pin`.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinsFile {
    #[serde(default)]
    pin: Vec<RawPin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct RawPin {
    upstream: String,
    repository: String,
    reference: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    platforms: Vec<String>,
}

impl PinsFile {
    /// Where `regcache pin` keeps its pins.
    pub fn path(config: &Config) -> PathBuf {
        config.storage_path.join("pins.toml")
    }

    /// Reads the file; a missing file has no pins.
    ///
    /// # Errors
    /// [`ConfigError`] when it cannot be read or parsed.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(toml::from_str(&text)?),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the file atomically (temp file and rename).
    ///
    /// # Errors
    /// [`ConfigError::Read`] on I/O failure.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let io_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let text = toml::to_string(self)
            .map_err(|err| invalid("pins file", path.display(), err.to_string()))?;
        let temp = path.with_extension("toml.tmp");
        std::fs::write(&temp, text).map_err(io_error)?;
        std::fs::rename(&temp, path).map_err(io_error)
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
        self.pin.retain(|p| {
            !(p.upstream == pin.upstream
                && p.repository == pin.repository
                && p.reference == pin.reference)
        });
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

/// An image kept cached and never evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinConfig {
    /// Index of the upstream in [`Config::upstreams`].
    pub upstream: usize,
    /// The repository as the upstream knows it (`library/alpine`).
    pub repository: crate::oci::RepoName,
    /// A tag or digest.
    pub reference: crate::oci::Reference,
    /// `os/arch[/variant]` entries of an index to keep; empty keeps all.
    pub platforms: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    metrics_listen: Option<String>,
    status_page: Option<bool>,
    max_connections: Option<usize>,
    shutdown_timeout: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    rate_limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<PathBuf>,
    max_size: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    tag_ttl: Option<String>,
    max_stale: Option<String>,
    serve_stale_on_404: Option<bool>,
    negative_ttl: Option<String>,
    max_concurrent_fills: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    url: String,
    #[serde(default)]
    default: bool,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    offline: Option<bool>,
    breaker_threshold: Option<usize>,
    breaker_cooldown: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the HTTP listener binds.
    pub listen: SocketAddr,
    /// An extra listener serving only `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
    /// Whether `/` serves the HTML status page.
    pub status_page: bool,
    /// Connections accepted at once; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for in-flight requests and fills.
    pub shutdown_timeout: Duration,
    /// Root of the blob store and index.
    pub storage_path: PathBuf,
    /// The disk budget in bytes (`None`: unlimited).
    pub max_size: Option<u64>,
    /// Eviction starts above this fraction of `max_size`.
    pub high_watermark: f64,
    /// Eviction stops below this fraction of `max_size`.
    pub low_watermark: f64,
    /// How long a tag confirmed by the upstream is served without asking again.
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may be served when the upstream cannot be reached.
    pub max_stale: Duration,
    /// Whether a tag the upstream says is gone (404) is still served from the cache.
    pub serve_stale_on_404: bool,
    /// How long an upstream 404 for a tag is remembered (0: not at all).
    pub negative_ttl: Duration,
    /// Upstream fills running at once; more get `503` with `Retry-After`.
    pub max_concurrent_fills: usize,
    /// Log output format.
    pub log_format: LogFormat,
    /// Default log filter (`RUST_LOG` overrides it).
    pub log_level: String,
    /// The allow-list of registries, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Images kept cached.
    pub pins: Vec<PinConfig>,
    /// TLS on the main listener (`None`: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// How long a new connection may take to send its first complete request head.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept open.
    pub idle_timeout: Duration,
    /// Client authentication and grants (`None`: anyone who reaches the port may pull).
    pub auth: Option<AuthConfig>,
    /// Requests per second per client address on the main listener (`None`: no limit).
    pub rate_limit: Option<std::num::NonZeroU32>,
}

/// Human-readable or JSON log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// One upstream registry.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registry host clients name (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub name: String,
    /// Where requests go.
    pub url: Url,
    /// Whether un-prefixed requests go here.
    pub default: bool,
    /// Basic credentials, also used to obtain bearer tokens.
    pub credentials: Option<(String, Secret)>,
    /// Extra PEM CA certificates trusted for this upstream.
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence while reading an upstream response.
    pub idle_timeout: Duration,
    /// Never contact this upstream; serve only what is cached.
    pub offline: bool,
    /// Consecutive failures after which the upstream is marked down.
    pub breaker_threshold: u32,
    /// How long an upstream marked down is not asked.
    pub breaker_cooldown: Duration,
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

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Any [`ConfigError`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<RawConfig>(text)?.validate()
    }
}

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text).map_err(|err| {
            invalid(
                key,
                text,
                format!("not a duration like \"60s\" or \"7d\": {err}"),
            )
        }),
    }
}

fn non_zero(key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(invalid(key, 0, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

impl RawConfig {
    /// Checks every value and builds the typed [`Config`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.server.listen.as_deref().unwrap_or("0.0.0.0:5000");
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("server.listen", listen_text, "expected ADDRESS:PORT"))?;
        let metrics_listen = match self.server.metrics_listen.as_deref() {
            None => None,
            Some(text) => Some(
                text.parse()
                    .map_err(|_| invalid("server.metrics_listen", text, "expected ADDRESS:PORT"))?,
            ),
        };
        let max_size = match self.storage.max_size.as_deref() {
            None => None,
            Some(text) => Some(
                text.parse::<bytesize::ByteSize>()
                    .map_err(|err| {
                        invalid(
                            "storage.max_size",
                            text,
                            format!("expected a size like \"50GiB\": {err}"),
                        )
                    })?
                    .as_u64(),
            ),
        };
        let high_watermark = self.storage.high_watermark.unwrap_or(0.95);
        let low_watermark = self.storage.low_watermark.unwrap_or(0.85);
        for (key, value) in [
            ("storage.high_watermark", high_watermark),
            ("storage.low_watermark", low_watermark),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(invalid(key, value, "expected a fraction in (0, 1]"));
            }
        }
        if low_watermark >= high_watermark {
            return Err(invalid(
                "storage.low_watermark",
                low_watermark,
                "must be below storage.high_watermark",
            ));
        }
        let upstreams = self
            .upstream
            .into_iter()
            .map(RawUpstream::validate)
            .collect::<Result<Vec<_>, _>>()?;
        check_upstream_set(&upstreams)?;
        let pins = self
            .pin
            .into_iter()
            .map(|pin| pin.validate(&upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        let log_format = match self.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    other,
                    "expected \"text\" or \"json\"",
                ))
            }
        };
        Ok(Config {
            listen,
            metrics_listen,
            status_page: self.server.status_page.unwrap_or(true),
            max_size,
            high_watermark,
            low_watermark,
            max_connections: non_zero("server.max_connections", self.server.max_connections, 4096)?,
            shutdown_timeout: duration(
                "server.shutdown_timeout",
                self.server.shutdown_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            storage_path: self
                .storage
                .path
                .unwrap_or_else(|| PathBuf::from("./regcache-data")),
            tag_ttl: duration(
                "cache.tag_ttl",
                self.cache.tag_ttl.as_deref(),
                Duration::from_secs(60),
            )?,
            max_stale: duration(
                "cache.max_stale",
                self.cache.max_stale.as_deref(),
                Duration::from_secs(7 * 24 * 3600),
            )?,
            serve_stale_on_404: self.cache.serve_stale_on_404.unwrap_or(false),
            negative_ttl: duration(
                "cache.negative_ttl",
                self.cache.negative_ttl.as_deref(),
                Duration::ZERO,
            )?,
            max_concurrent_fills: non_zero(
                "cache.max_concurrent_fills",
                self.cache.max_concurrent_fills,
                256,
            )?,
            log_format,
            log_level: self.log.level.unwrap_or_else(|| "info".to_owned()),
            upstreams,
            pins,
            tls: validate_tls(&self.server)?,
            header_read_timeout: duration(
                "server.header_read_timeout",
                self.server.header_read_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            idle_timeout: duration(
                "server.idle_timeout",
                self.server.idle_timeout.as_deref(),
                Duration::from_secs(90),
            )?,
            auth: self.auth.map(RawAuth::validate).transpose()?,
            rate_limit: match self.server.rate_limit {
                None => None,
                Some(rate) => Some(std::num::NonZeroU32::new(rate).ok_or_else(|| {
                    invalid(
                        "server.rate_limit",
                        0,
                        "must be at least 1 (omit it for no limit)",
                    )
                })?),
            },
        })
    }
}

fn check_upstream_set(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    for (index, upstream) in upstreams.iter().enumerate() {
        if upstreams[..index].iter().any(|u| u.name == upstream.name) {
            return Err(invalid("upstream.name", &upstream.name, "configured twice"));
        }
    }
    let defaults: Vec<&str> = upstreams
        .iter()
        .filter(|u| u.default)
        .map(|u| u.name.as_str())
        .collect();
    if defaults.len() > 1 {
        return Err(invalid(
            "upstream.default",
            defaults.join(", "),
            "only one upstream may be the default",
        ));
    }
    Ok(())
}

impl RawPin {
    fn validate(self, upstreams: &[UpstreamConfig]) -> Result<PinConfig, ConfigError> {
        let upstream = upstreams
            .iter()
            .position(|u| u.name == self.upstream)
            .ok_or_else(|| {
                invalid(
                    "pin.upstream",
                    &self.upstream,
                    "no [[upstream]] has this name",
                )
            })?;
        let repository = crate::oci::RepoName::parse(&self.repository)
            .map_err(|err| invalid("pin.repository", &self.repository, err.to_string()))?;
        let reference = crate::oci::Reference::parse(&self.reference)
            .map_err(|err| invalid("pin.reference", &self.reference, err.to_string()))?;
        for platform in &self.platforms {
            let parts = platform.split('/').count();
            if !(2..=3).contains(&parts) || platform.split('/').any(str::is_empty) {
                return Err(invalid(
                    "pin.platforms",
                    platform,
                    "expected os/arch or os/arch/variant",
                ));
            }
        }
        Ok(PinConfig {
            upstream,
            repository,
            reference,
            platforms: self.platforms,
        })
    }
}

/// A registry host: `host` or `host:port`, lower-case letters, digits, `.`, `-`.
fn valid_registry_name(name: &str) -> bool {
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

impl RawUpstream {
    fn validate(self) -> Result<UpstreamConfig, ConfigError> {
        let key = |field: &str| format!("upstream.{}.{field}", self.name);
        if !valid_registry_name(&self.name) {
            return Err(invalid(
                "upstream.name",
                &self.name,
                "expected a registry host like \"docker.io\" or \"registry.local:5000\"",
            ));
        }
        let url =
            Url::parse(&self.url).map_err(|err| invalid(key("url"), &self.url, err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                key("url"),
                &self.url,
                "expected an http:// or https:// URL",
            ));
        }
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    key("password_file"),
                    self.password_file
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display(),
                    "set password or password_file, not both",
                ))
            }
            (Some(password), None) => Some(Secret::new(password.clone())),
            (None, Some(path)) => Some(Secret::new(
                std::fs::read_to_string(path)
                    .map_err(|err| invalid(key("password_file"), path.display(), err.to_string()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            )),
            (None, None) => None,
        };
        let credentials = match (self.username.clone(), password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            (Some(user), None) => {
                return Err(invalid(
                    key("username"),
                    user,
                    "needs password or password_file",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(key("password"), "<redacted>", "needs username"))
            }
        };
        if let Some(path) = &self.ca_file {
            if !path.is_file() {
                return Err(invalid(key("ca_file"), path.display(), "no such file"));
            }
        }
        Ok(UpstreamConfig {
            connect_timeout: duration(
                &key("connect_timeout"),
                self.connect_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            idle_timeout: duration(
                &key("idle_timeout"),
                self.idle_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            name: self.name.clone(),
            url,
            default: self.default,
            credentials,
            ca_file: self.ca_file,
            offline: self.offline.unwrap_or(false),
            breaker_threshold: u32::try_from(non_zero(
                &key("breaker_threshold"),
                self.breaker_threshold,
                5,
            )?)
            .unwrap_or(u32::MAX),
            breaker_cooldown: duration(
                &key("breaker_cooldown"),
                self.breaker_cooldown.as_deref(),
                Duration::from_secs(10),
            )?,
        })
    }
}

/// TLS settings of the main listener; the files are read at start and again on `SIGHUP`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
}

fn validate_tls(server: &RawServer) -> Result<Option<TlsConfig>, ConfigError> {
    let (cert, key) = match (&server.tls_cert, &server.tls_key) {
        (None, None) => {
            if let Some(ca) = &server.tls_client_ca {
                return Err(invalid(
                    "server.tls_client_ca",
                    ca.display(),
                    "needs server.tls_cert and server.tls_key",
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (Some(cert), None) => {
            return Err(invalid(
                "server.tls_cert",
                cert.display(),
                "needs server.tls_key",
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "server.tls_key",
                key.display(),
                "needs server.tls_cert",
            ))
        }
    };
    for (name, path) in [
        ("server.tls_cert", Some(&cert)),
        ("server.tls_key", Some(&key)),
        ("server.tls_client_ca", server.tls_client_ca.as_ref()),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(invalid(name, path.display(), "no such file"));
            }
        }
    }
    Ok(Some(TlsConfig {
        cert,
        key,
        client_ca: server.tls_client_ca.clone(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    htpasswd: Option<PathBuf>,
    token_ttl: Option<String>,
    realm: Option<String>,
    service: Option<String>,
    #[serde(default)]
    anonymous: Vec<String>,
    #[serde(default)]
    grant: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    users: Vec<String>,
    pull: Vec<String>,
}

/// Client authentication and per-repository grants (the `[auth]` table).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Users and their bcrypt hashes, from `auth.htpasswd`.
    pub users: Vec<(String, Secret)>,
    /// Lifetime of the tokens the cache's token endpoint issues.
    pub token_ttl: Duration,
    /// The token endpoint URL sent in challenges (`None`: derived from the request's host).
    pub realm: Option<String>,
    /// The `service` sent in challenges and expected in token requests.
    pub service: String,
    /// `<upstream>/<repository glob>` patterns anyone may pull without credentials.
    pub anonymous: Vec<String>,
    /// Who may pull what.
    pub grants: Vec<GrantConfig>,
}

/// One `[[auth.grant]]`: these users may pull repositories matching these patterns.
#[derive(Debug, Clone)]
pub struct GrantConfig {
    /// User names; `"*"` is any authenticated user.
    pub users: Vec<String>,
    /// `<upstream>/<repository glob>` patterns (`*` stays within a path segment, `**` does not).
    pub pull: Vec<String>,
}

/// Checks a `<upstream>/<repository glob>` pattern.
fn validate_pattern(key: &str, pattern: &str) -> Result<(), ConfigError> {
    if !pattern.contains('/') {
        return Err(invalid(
            key,
            pattern,
            "expected <upstream>/<repository glob>, e.g. \"docker.io/library/*\"",
        ));
    }
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(drop)
        .map_err(|err| invalid(key, pattern, err.to_string()))
}

impl RawAuth {
    fn validate(self) -> Result<AuthConfig, ConfigError> {
        let users = match &self.htpasswd {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| invalid("auth.htpasswd", path.display(), err.to_string()))?;
                parse_htpasswd(&text)
                    .map_err(|reason| invalid("auth.htpasswd", path.display(), reason))?
            }
        };
        for pattern in &self.anonymous {
            validate_pattern("auth.anonymous", pattern)?;
        }
        for grant in &self.grant {
            for pattern in &grant.pull {
                validate_pattern("auth.grant.pull", pattern)?;
            }
            if grant.users.is_empty() {
                return Err(invalid(
                    "auth.grant.users",
                    "[]",
                    "name at least one user, or \"*\"",
                ));
            }
        }
        if let Some(realm) = &self.realm {
            let url =
                Url::parse(realm).map_err(|err| invalid("auth.realm", realm, err.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    "auth.realm",
                    realm,
                    "expected an http:// or https:// URL",
                ));
            }
        }
        let token_ttl = duration(
            "auth.token_ttl",
            self.token_ttl.as_deref(),
            Duration::from_secs(300),
        )?;
        if token_ttl.is_zero() {
            return Err(invalid("auth.token_ttl", "0s", "must be longer than 0s"));
        }
        Ok(AuthConfig {
            users,
            token_ttl,
            realm: self.realm,
            service: self.service.unwrap_or_else(|| "regcache".to_owned()),
            anonymous: self.anonymous,
            grants: self
                .grant
                .into_iter()
                .map(|g| GrantConfig {
                    users: g.users,
                    pull: g.pull,
                })
                .collect(),
        })
    }
}

/// Parses `user:$2y$...` lines (bcrypt only; blank lines and `#` comments skipped).
fn parse_htpasswd(text: &str) -> Result<Vec<(String, Secret)>, String> {
    let mut users: Vec<(String, Secret)> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: expected user:hash", number + 1));
        };
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            return Err(format!(
                "line {}: user {user:?} has no bcrypt hash (create entries with `htpasswd -B`)",
                number + 1
            ));
        }
        if users.iter().any(|(u, _)| u == user) {
            return Err(format!("line {}: user {user:?} listed twice", number + 1));
        }
        users.push((user.to_owned(), Secret::new(hash.to_owned())));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_a_docker_hub_mirror() {
        let config = Config::load(None).expect("the embedded default is valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(config.upstreams.len(), 1);
        assert_eq!(config.upstreams[0].name, "docker.io");
        assert!(config.upstreams[0].default);
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../config.toml.example");
        let config = Config::parse(text).expect("config.toml.example is valid");
        assert!(!config.upstreams.is_empty());
    }

    #[track_caller]
    fn check_error(toml: &str, expected_fragment: &str) {
        let message = Config::parse(toml)
            .expect_err("config must be rejected")
            .to_string();
        assert!(message.contains(expected_fragment), "{message}");
    }

    #[test]
    fn bad_values_name_the_key() {
        check_error("[server]\nlisten = \"nowhere\"", "server.listen");
        check_error("[server]\nbogus = 1", "bogus");
        check_error("[storage]\nmax_size = \"lots\"", "storage.max_size");
        check_error("[storage]\nlow_watermark = 0.99", "storage.low_watermark");
        check_error("[cache]\ntag_ttl = \"soon\"", "cache.tag_ttl");
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"ftp://x\"",
            "upstream.a.io.url",
        );
        check_error(
            "[[upstream]]\nname = \"A B\"\nurl = \"http://x\"",
            "upstream.name",
        );
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ndefault = true\n[[upstream]]\nname = \"b.io\"\nurl = \"http://y\"\ndefault = true",
            "upstream.default",
        );
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nusername = \"u\"",
            "upstream.a.io.username",
        );
    }

    #[test]
    fn front_door_keys() {
        check_error("[server]\ntls_cert = \"/etc/hostname\"", "server.tls_cert");
        check_error("[server]\ntls_key = \"/nonexistent\"", "server.tls_key");
        check_error("[server]\nidle_timeout = \"long\"", "server.idle_timeout");
        check_error("[auth]\nanonymous = [\"alpine\"]", "auth.anonymous");
        check_error(
            "[auth]\n[[auth.grant]]\nusers = [\"*\"]\npull = [\"docker.io/[\"]",
            "auth.grant.pull",
        );
        check_error("[auth]\ntoken_ttl = \"0s\"", "auth.token_ttl");
        check_error("[auth]\nrealm = \"ftp://x\"", "auth.realm");
        let config = Config::parse(
            "[auth]\nanonymous = [\"docker.io/library/*\"]\n[[auth.grant]]\nusers = [\"*\"]\npull = [\"ghcr.io/**\"]",
        )
        .expect("valid");
        let auth = config.auth.expect("[auth] turns authentication on");
        assert_eq!(auth.token_ttl, Duration::from_secs(300));
        assert_eq!(auth.grants.len(), 1);
        assert!(Config::load(None).expect("default").auth.is_none());
    }

    #[test]
    fn htpasswd_takes_bcrypt_only() {
        let users = parse_htpasswd("# comment\n\nalice:$2y$05$abcdefghijklmnopqrstuu\n")
            .expect("bcrypt entries");
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].0, "alice");
        let err = parse_htpasswd("bob:{SHA}abc").expect_err("SHA1 is refused");
        assert!(err.contains("line 1") && err.contains("bob"), "{err}");
        assert!(parse_htpasswd("a:$2y$x\na:$2y$y").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let config = Config::parse(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\nusername = \"u\"\npassword = \"hunter2\"",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
