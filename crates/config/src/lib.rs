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

mod cluster;
pub use cluster::{ClusterConfig, PeerSpec};

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

/// A secret given either as `<name>` or as `<name>_file` (the file's contents without
/// trailing line breaks), not both; errors name the key `<prefix><name>_file`.
fn value_or_file(
    prefix: &str,
    name: &str,
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    let file_key = || format!("{prefix}{name}_file");
    match (value, file) {
        (Some(_), Some(path)) => Err(invalid(
            file_key(),
            path.display(),
            format!("set {name} or {name}_file, not both"),
        )),
        (Some(value), None) => Ok(Some(Secret::new(value.to_owned()))),
        (None, Some(path)) => Ok(Some(Secret::new(
            std::fs::read_to_string(path)
                .map_err(|err| invalid(file_key(), path.display(), err.to_string()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ))),
        (None, None) => Ok(None),
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
    cluster: Option<cluster::RawCluster>,
}

/// A pin as written in `[[pin]]` or in the pins file (`cache::PinsFile`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPin {
    pub upstream: String,
    pub repository: String,
    pub reference: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
}

/// An image kept cached and never evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinConfig {
    /// Index of the upstream in [`Config::upstreams`].
    pub upstream: usize,
    /// The repository as the upstream knows it (`library/alpine`).
    pub repository: regcache_oci::RepoName,
    /// A tag or digest.
    pub reference: regcache_oci::Reference,
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
    send_timeout: Option<String>,
    rate_limit: Option<u32>,
    max_concurrent_streams: Option<u32>,
    response_buffer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<PathBuf>,
    max_size: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    backend: Option<String>,
    s3: Option<RawS3>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    prefix: Option<String>,
    path_style: Option<bool>,
    redirect: Option<bool>,
    redirect_ttl: Option<String>,
    timeout: Option<String>,
    credentials_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    tag_ttl: Option<String>,
    max_stale: Option<String>,
    serve_stale_on_404: Option<bool>,
    negative_ttl: Option<String>,
    max_concurrent_fills: Option<usize>,
    revalidate_timeout: Option<String>,
    stale_while_revalidate: Option<String>,
    max_blob_size: Option<String>,
    tag_list_max_bytes: Option<String>,
    tag_list_max_tags: Option<usize>,
    tag_list_ttl: Option<String>,
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
    #[serde(default)]
    token_realm_hosts: Vec<String>,
    allow_private_redirects: Option<bool>,
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
    /// How long a graceful shutdown waits for in-flight requests. Fills are not waited for: one
    /// cut by the exit leaves only staged bytes, which the next start discards.
    pub shutdown_timeout: Duration,
    /// Root of the blob store and index.
    pub storage_path: PathBuf,
    /// Where blobs live besides `storage_path`: nowhere (local), or an object store bucket
    /// behind a local tier under `storage_path`.
    pub storage_backend: StorageBackend,
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
    /// How long a client waits for a tag revalidation before the cached tag is served stale
    /// (the revalidation goes on in the background).
    pub revalidate_timeout: Duration,
    /// Past `tag_ttl`, how long a tag is served at once while it is revalidated in the
    /// background (RFC 5861); 0: off.
    pub stale_while_revalidate: Duration,
    /// The most body bytes read from an upstream for one repository's tag list, all pages
    /// together; what lies beyond is not read (the list is served as far as it fits).
    pub tag_list_max_bytes: usize,
    /// The most tags taken from an upstream for one repository's tag list.
    pub tag_list_max_tags: usize,
    /// How long an upstream's tag list is reused for later requests (0: only concurrent
    /// requests share it).
    pub tag_list_ttl: Duration,
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
    /// How long a response may wait for its client to take the next bytes before the
    /// connection is dropped, or its HTTP/2 stream reset (zero: no limit).
    pub send_timeout: Duration,
    /// HTTP/2 streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Bytes read for responses and not yet sent, across all connections; a response whose
    /// next chunk does not fit waits.
    pub response_buffer: usize,
    /// Client authentication and grants (`None`: anyone who reaches the port may pull).
    pub auth: Option<AuthConfig>,
    /// Requests per second per client address on the main listener (`None`: no limit).
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Replicas that ask each other for blobs (`None`: this replica is on its own).
    pub cluster: Option<ClusterConfig>,
}

/// `[storage] backend`.
#[derive(Debug, Clone, Default)]
pub enum StorageBackend {
    /// Blobs on the local disk only.
    #[default]
    Local,
    /// Blobs in an S3-compatible bucket, with a size-bounded local tier in front.
    S3(Box<S3Config>),
}

/// `[storage.s3]`: an S3-compatible bucket shared by replicas.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The endpoint (`None`: AWS for `region`).
    pub endpoint: Option<Url>,
    /// The region (signing; also picks the AWS endpoint).
    pub region: String,
    /// Object names start with this (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Whether blob GETs are answered `307` to a presigned URL of the bucket.
    pub redirect: bool,
    /// How long a presigned URL is valid.
    pub redirect_ttl: Duration,
    /// How long a request to the bucket may wait for its answer (connect included), or a
    /// download for its next bytes; a part upload gets 12 times as long.
    pub timeout: Duration,
    /// Access key id and secret (`None`: the environment's instance or web identity
    /// credentials, as the AWS SDKs find them).
    pub credentials: Option<(String, Secret)>,
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
    /// Hosts besides the upstream's own to which its credentials may go when its token
    /// challenge names them as the realm (the built-in entries for well-known registries are
    /// added by the client).
    pub token_realm_hosts: Vec<String>,
    /// Whether redirects may lead to loopback, link-local or private addresses. `None`: only
    /// when the upstream itself lives on such an address.
    pub allow_private_redirects: Option<bool>,
    /// The largest blob accepted from this upstream (`cache.max_blob_size`); a longer body is
    /// cut and its fill fails.
    pub max_blob_size: u64,
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

/// `server.response_buffer`: at least 1 MiB (a few chunks; less would serve one response at a
/// time), below 4 GiB. Default 32 MiB.
fn response_buffer(text: Option<&str>) -> Result<usize, ConfigError> {
    const KEY: &str = "server.response_buffer";
    let Some(text) = text else {
        return Ok(32 << 20);
    };
    let bytes = text
        .parse::<bytesize::ByteSize>()
        .map_err(|err| invalid(KEY, text, format!("expected a size like \"32MiB\": {err}")))?
        .as_u64();
    if !(1 << 20..4 << 30).contains(&bytes) {
        return Err(invalid(KEY, text, "must be at least 1MiB and below 4GiB"));
    }
    usize::try_from(bytes).map_err(|_| invalid(KEY, text, "too large for this machine"))
}

fn non_zero(key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(invalid(key, 0, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// `cache.tag_list_max_bytes`: a size of at least one byte, 16 MiB when absent.
fn tag_list_max_bytes(value: Option<&str>) -> Result<usize, ConfigError> {
    let key = "cache.tag_list_max_bytes";
    let Some(text) = value else {
        return Ok(16 << 20);
    };
    let size = text
        .parse::<bytesize::ByteSize>()
        .map_err(|err| invalid(key, text, format!("expected a size like \"16MiB\": {err}")))?
        .as_u64();
    match usize::try_from(size) {
        Ok(0) => Err(invalid(key, text, "must be at least 1 byte")),
        Ok(bytes) => Ok(bytes),
        Err(_) => Err(invalid(key, text, "too large for this machine")),
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
        let storage_backend =
            validate_storage_backend(self.storage.backend.as_deref(), self.storage.s3, |name| {
                std::env::var(name).ok()
            })?;
        let max_blob_size = match self.cache.max_blob_size.as_deref() {
            None => 64 << 30,
            Some(text) => text
                .parse::<bytesize::ByteSize>()
                .map_err(|err| {
                    invalid(
                        "cache.max_blob_size",
                        text,
                        format!("expected a size like \"64GiB\": {err}"),
                    )
                })?
                .as_u64(),
        };
        let upstreams = self
            .upstream
            .into_iter()
            .map(|raw| {
                let mut upstream = raw.validate()?;
                upstream.max_blob_size = max_blob_size;
                Ok(upstream)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        check_upstream_set(&upstreams)?;
        let cluster = self
            .cluster
            .map(|raw| raw.validate(|name| std::env::var(name).ok()))
            .transpose()?;
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
            storage_backend,
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
            revalidate_timeout: duration(
                "cache.revalidate_timeout",
                self.cache.revalidate_timeout.as_deref(),
                Duration::from_secs(2),
            )?,
            stale_while_revalidate: duration(
                "cache.stale_while_revalidate",
                self.cache.stale_while_revalidate.as_deref(),
                Duration::ZERO,
            )?,
            tag_list_max_bytes: tag_list_max_bytes(self.cache.tag_list_max_bytes.as_deref())?,
            tag_list_max_tags: non_zero(
                "cache.tag_list_max_tags",
                self.cache.tag_list_max_tags,
                100_000,
            )?,
            tag_list_ttl: duration(
                "cache.tag_list_ttl",
                self.cache.tag_list_ttl.as_deref(),
                Duration::from_secs(30),
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
            send_timeout: duration(
                "server.send_timeout",
                self.server.send_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            max_concurrent_streams: match self.server.max_concurrent_streams {
                Some(0) => {
                    return Err(invalid(
                        "server.max_concurrent_streams",
                        0,
                        "must be at least 1",
                    ))
                }
                Some(streams) => streams,
                None => 32,
            },
            response_buffer: response_buffer(self.server.response_buffer.as_deref())?,
            auth: self.auth.map(RawAuth::validate).transpose()?,
            cluster,
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

/// `[storage] backend` and `[storage.s3]`; `env` reads the credential variables.
fn validate_storage_backend(
    backend: Option<&str>,
    s3: Option<RawS3>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<StorageBackend, ConfigError> {
    match (backend.unwrap_or("local"), s3) {
        ("local", None) => Ok(StorageBackend::Local),
        ("local", Some(_)) => Err(invalid(
            "storage.backend",
            "local",
            "set backend = \"s3\" to use [storage.s3]",
        )),
        ("s3", None) => Err(invalid(
            "storage.backend",
            "s3",
            "needs a [storage.s3] table with at least bucket",
        )),
        ("s3", Some(raw)) => raw.validate(env).map(|s3| StorageBackend::S3(Box::new(s3))),
        (other, _) => Err(invalid(
            "storage.backend",
            other,
            "expected \"local\" or \"s3\"",
        )),
    }
}

impl RawS3 {
    fn validate(self, env: impl Fn(&str) -> Option<String>) -> Result<S3Config, ConfigError> {
        let bucket = self
            .bucket
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid("storage.s3.bucket", "", "required with backend = \"s3\""))?;
        if !bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        {
            return Err(invalid(
                "storage.s3.bucket",
                &bucket,
                "expected a bucket name (lower-case letters, digits, '-' and '.')",
            ));
        }
        let endpoint = match self.endpoint.as_deref() {
            None => None,
            Some(text) => {
                let url = Url::parse(text).map_err(|err| {
                    invalid("storage.s3.endpoint", text, format!("not a URL: {err}"))
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(invalid(
                        "storage.s3.endpoint",
                        text,
                        "expected an http(s) URL like \"https://s3.example.com\"",
                    ));
                }
                Some(url)
            }
        };
        let prefix = self.prefix.unwrap_or_default();
        let prefix = prefix.trim_matches('/').to_owned();
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|part| matches!(part, "" | "." | ".."))
        {
            return Err(invalid(
                "storage.s3.prefix",
                &prefix,
                "expected names separated by '/' (no empty, '.' or '..' parts)",
            ));
        }
        let credentials = match &self.credentials_file {
            Some(path) => Some(read_credentials_file(path)?),
            None => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(id), Some(secret)) => Some((id, Secret::new(secret))),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(invalid(
                        "AWS_SECRET_ACCESS_KEY",
                        "",
                        "must be set with AWS_ACCESS_KEY_ID",
                    ))
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "AWS_ACCESS_KEY_ID",
                        "",
                        "must be set with AWS_SECRET_ACCESS_KEY",
                    ))
                }
            },
        };
        let redirect_ttl = duration(
            "storage.s3.redirect_ttl",
            self.redirect_ttl.as_deref(),
            Duration::from_secs(600),
        )?;
        if redirect_ttl < Duration::from_secs(1)
            || redirect_ttl > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(invalid(
                "storage.s3.redirect_ttl",
                self.redirect_ttl.unwrap_or_default(),
                "expected between 1s and 7d (the S3 limit for presigned URLs)",
            ));
        }
        let timeout = duration(
            "storage.s3.timeout",
            self.timeout.as_deref(),
            Duration::from_secs(10),
        )?;
        if timeout.is_zero() {
            return Err(invalid("storage.s3.timeout", "0s", "must be positive"));
        }
        Ok(S3Config {
            timeout,
            bucket,
            endpoint,
            region: self.region.unwrap_or_else(|| "us-east-1".to_owned()),
            prefix,
            path_style: self.path_style.unwrap_or(false),
            redirect: self.redirect.unwrap_or(false),
            redirect_ttl,
            credentials,
        })
    }
}

/// `storage.s3.credentials_file`: `aws_access_key_id` and `aws_secret_access_key` as
/// `key = value` lines (an AWS shared credentials file with one profile, or an env file with
/// the `AWS_…` names); `#` comments and `[section]` lines are skipped.
fn read_credentials_file(path: &Path) -> Result<(String, Secret), ConfigError> {
    let key = "storage.s3.credentials_file";
    let text = std::fs::read_to_string(path)
        .map_err(|err| invalid(key, path.display(), err.to_string()))?;
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(invalid(
                key,
                path.display(),
                "expected `name = value` lines",
            ));
        };
        let value = value.trim().trim_matches('"').to_owned();
        match name.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(Secret::new(value)),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(invalid(
            key,
            path.display(),
            "needs both aws_access_key_id and aws_secret_access_key",
        )),
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
    pub fn validate(self, upstreams: &[UpstreamConfig]) -> Result<PinConfig, ConfigError> {
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
        let repository = regcache_oci::RepoName::parse(&self.repository)
            .map_err(|err| invalid("pin.repository", &self.repository, err.to_string()))?;
        let reference = regcache_oci::Reference::parse(&self.reference)
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
        let shown_url = redact_userinfo(&self.url);
        let mut url = Url::parse(&self.url)
            .map_err(|err| invalid(key("url"), &shown_url, err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                key("url"),
                &shown_url,
                "expected an http:// or https:// URL",
            ));
        }
        let url_credentials = take_userinfo(&mut url);
        if url_credentials.is_some() && (self.username.is_some() || self.password.is_some()) {
            return Err(invalid(
                key("url"),
                &shown_url,
                "give credentials in the url or as username/password, not both",
            ));
        }
        let password = value_or_file(
            &key(""),
            "password",
            self.password.as_deref(),
            self.password_file.as_deref(),
        )?;
        let credentials = match (self.username.clone(), password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => url_credentials,
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
            token_realm_hosts: self
                .token_realm_hosts
                .iter()
                .map(|host| {
                    let host = host.trim().to_ascii_lowercase();
                    if host.is_empty() || host.contains(['/', ':', '@', ' ']) {
                        return Err(invalid(
                            key("token_realm_hosts"),
                            &host,
                            "expected a host name like \"auth.example.com\"",
                        ));
                    }
                    Ok(host)
                })
                .collect::<Result<_, _>>()?,
            allow_private_redirects: self.allow_private_redirects,
            // Set from `cache.max_blob_size` by `RawConfig::validate`.
            max_blob_size: u64::MAX,
        })
    }
}

/// The URL with any `user:password@` replaced, for messages: a password written into an
/// upstream's url is never printed.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Removes `user:password@` from the URL and returns it as credentials (percent-decoded), so
/// that it goes only where credentials go and is never printed with the URL.
fn take_userinfo(url: &mut Url) -> Option<(String, Secret)> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = Secret::new(decode(url.password().unwrap_or_default()));
    // Both cannot fail for an http(s) URL with a host, checked before.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some((user, password))
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
    /// `auth.htpasswd`, read again on `SIGHUP` ([`load_htpasswd`]).
    pub htpasswd: Option<PathBuf>,
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
            Some(path) => load_htpasswd(path)?,
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
            htpasswd: self.htpasswd,
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

/// Reads an htpasswd file: its users and their bcrypt hashes.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `auth.htpasswd` when it cannot be read or has a line that
/// is not `user:<bcrypt hash>`.
pub fn load_htpasswd(path: &Path) -> Result<Vec<(String, Secret)>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| invalid("auth.htpasswd", path.display(), err.to_string()))?;
    parse_htpasswd(&text).map_err(|reason| invalid("auth.htpasswd", path.display(), reason))
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
        let text = include_str!("../../../config.toml.example");
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
    fn the_s3_backend_is_checked_and_its_secret_never_printed() {
        check_error("[storage]\nbackend = \"s3\"", "storage.backend");
        check_error("[storage]\nbackend = \"nfs\"", "storage.backend");
        check_error("[storage.s3]\nbucket = \"b\"", "storage.backend");
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nregion = \"x\"",
            "storage.s3.bucket",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"B_b\"",
            "storage.s3.bucket",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"ftp://x\"",
            "storage.s3.endpoint",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nprefix = \"a/../b\"",
            "storage.s3.prefix",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nredirect_ttl = \"30d\"",
            "storage.s3.redirect_ttl",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ntimeout = \"0s\"",
            "storage.s3.timeout",
        );
        check_error(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ncredentials_file = \"/nonexistent/creds\"",
            "storage.s3.credentials_file",
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id = AKID\naws_secret_access_key = s3cr3t-value\n",
        )
        .expect("write");
        let config = Config::parse(&format!(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:8333\"\nprefix = \"/cache/\"\npath_style = true\ncredentials_file = \"{}\"",
            file.display()
        ))
        .expect("valid");
        let StorageBackend::S3(s3) = &config.storage_backend else {
            panic!("expected the s3 backend");
        };
        assert_eq!(s3.prefix, "cache");
        assert_eq!(s3.region, "us-east-1");
        assert!(s3.path_style && !s3.redirect);
        let (id, secret) = s3.credentials.as_ref().expect("credentials");
        assert_eq!((id.as_str(), secret.expose()), ("AKID", "s3cr3t-value"));
        assert!(!format!("{config:?}").contains("s3cr3t"));
        std::fs::write(&file, "AWS_ACCESS_KEY_ID=AKID\n").expect("write");
        check_error(
            &format!(
                "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\ncredentials_file = \"{}\"",
                file.display()
            ),
            "needs both",
        );
        // The environment: both variables or neither.
        let raw = || RawS3 {
            bucket: Some("b".to_owned()),
            ..RawS3::default()
        };
        let only_id = |name: &str| (name == "AWS_ACCESS_KEY_ID").then(|| "AKID".to_owned());
        let message = raw().validate(only_id).expect_err("half").to_string();
        assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
        let both = |name: &str| Some(format!("{name}-value"));
        let s3 = raw().validate(both).expect("valid");
        assert_eq!(
            s3.credentials.map(|(id, _)| id).as_deref(),
            Some("AWS_ACCESS_KEY_ID-value")
        );
        assert!(raw()
            .validate(|_| None)
            .expect("valid")
            .credentials
            .is_none());
    }

    #[test]
    fn passwords_in_urls_become_credentials() {
        let config = Config::parse(
            "[[upstream]]\nname = \"a.io\"\nurl = \"https://robot:hunter%402@a.io/\"",
        )
        .expect("valid");
        let upstream = &config.upstreams[0];
        assert!(!format!("{config:?}").contains("hunter"));
        assert_eq!(upstream.url.as_str(), "https://a.io/");
        let (user, password) = upstream.credentials.as_ref().expect("taken from the url");
        assert_eq!((user.as_str(), password.expose()), ("robot", "hunter@2"));
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"https://u:hunter2@a.io:x/\"",
            "https://<redacted>@a.io:x/",
        );
        let message =
            Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"https://u:hunter2@a.io:x/\"")
                .expect_err("bad port")
                .to_string();
        assert!(!message.contains("hunter2"), "{message}");
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"https://u:p@a.io\"\nusername = \"v\"\npassword = \"q\"",
            "not both",
        );
    }

    #[test]
    fn tag_list_limits() {
        let default = Config::load(None).expect("the embedded default is valid");
        assert_eq!(default.tag_list_max_bytes, 16 << 20);
        assert_eq!(default.tag_list_max_tags, 100_000);
        assert_eq!(default.tag_list_ttl, Duration::from_secs(30));
        let config = Config::parse(
            "[cache]\ntag_list_max_bytes = \"1KiB\"\ntag_list_max_tags = 10\ntag_list_ttl = \"0s\"",
        )
        .expect("valid");
        assert_eq!(config.tag_list_max_bytes, 1024);
        assert_eq!(config.tag_list_max_tags, 10);
        assert_eq!(config.tag_list_ttl, Duration::ZERO);
        check_error(
            "[cache]\ntag_list_max_bytes = \"0B\"",
            "cache.tag_list_max_bytes",
        );
        check_error(
            "[cache]\ntag_list_max_bytes = \"lots\"",
            "cache.tag_list_max_bytes",
        );
        check_error("[cache]\ntag_list_max_tags = 0", "cache.tag_list_max_tags");
        check_error("[cache]\ntag_list_ttl = \"soon\"", "cache.tag_list_ttl");
    }

    #[test]
    fn hostile_upstream_limits() {
        let config = Config::parse(
            "[cache]\nmax_blob_size = \"1MiB\"\n[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ntoken_realm_hosts = [\"Auth.A.io\"]",
        )
        .expect("valid");
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.max_blob_size, 1024 * 1024);
        assert_eq!(upstream.token_realm_hosts, ["auth.a.io"]);
        assert_eq!(upstream.allow_private_redirects, None);
        let default = Config::load(None).expect("the embedded default is valid");
        assert_eq!(default.upstreams[0].max_blob_size, 64 << 30);
        check_error("[cache]\nmax_blob_size = \"huge\"", "cache.max_blob_size");
        check_error(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\ntoken_realm_hosts = [\"http://evil\"]",
            "upstream.a.io.token_realm_hosts",
        );
    }

    #[test]
    fn front_door_keys() {
        check_error("[server]\ntls_cert = \"/etc/hostname\"", "server.tls_cert");
        check_error("[server]\ntls_key = \"/nonexistent\"", "server.tls_key");
        check_error("[server]\nidle_timeout = \"long\"", "server.idle_timeout");
        check_error("[server]\nsend_timeout = \"-1s\"", "server.send_timeout");
        check_error(
            "[server]\nmax_concurrent_streams = 0",
            "server.max_concurrent_streams",
        );
        check_error(
            "[server]\nresponse_buffer = \"64KiB\"",
            "server.response_buffer",
        );
        check_error(
            "[server]\nresponse_buffer = \"lots\"",
            "server.response_buffer",
        );
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
