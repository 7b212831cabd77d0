//! The `[storage]` table: where the store lives, its disk budget, and the object store bucket
//! behind it (`[storage.s3]`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::values::{duration, invalid, size, ConfigError, Secret};

/// `storage.index_cache` when absent. sled's resident memory is several times its cache
/// figure (about 4× while eviction writes): 16 MiB keeps a million-blob store's server near
/// 100 MiB after start-up and under 256 MiB while it evicts half of it.
const DEFAULT_INDEX_CACHE: u64 = 16 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStorage {
    path: Option<PathBuf>,
    max_size: Option<String>,
    index_cache: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    backend: Option<String>,
    s3: Option<RawS3>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawS3 {
    pub(crate) bucket: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) path_style: Option<bool>,
    pub(crate) redirect: Option<bool>,
    pub(crate) redirect_ttl: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) credentials_file: Option<PathBuf>,
}

/// The validated `[storage]` table.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Root of the blob store and index.
    pub path: PathBuf,
    /// Where blobs live besides `path`: nowhere (local), or an object store bucket behind a
    /// local tier under `path`.
    pub backend: StorageBackend,
    /// The disk budget in bytes (`None`: unlimited).
    pub max_size: Option<u64>,
    /// The index database's page cache in bytes (`storage.index_cache`, 16 MiB by default).
    pub index_cache: u64,
    /// Eviction starts above this fraction of `max_size`.
    pub high_watermark: f64,
    /// Eviction stops below this fraction of `max_size`.
    pub low_watermark: f64,
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

impl RawStorage {
    /// Checks every `[storage]` value; `env` reads the S3 credential variables.
    pub(crate) fn validate(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<StorageConfig, ConfigError> {
        let max_size = match self.max_size.as_deref() {
            None => None,
            Some(text) => Some(size("storage.max_size", text, "50GiB")?),
        };
        let high_watermark = self.high_watermark.unwrap_or(0.95);
        let low_watermark = self.low_watermark.unwrap_or(0.85);
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
        let index_cache = match self.index_cache.as_deref() {
            None => DEFAULT_INDEX_CACHE,
            Some(text) => {
                let bytes = size("storage.index_cache", text, "16MiB")?;
                if bytes < 1 << 20 {
                    return Err(invalid(
                        "storage.index_cache",
                        text,
                        "must be at least 1MiB",
                    ));
                }
                bytes
            }
        };
        Ok(StorageConfig {
            path: self
                .path
                .unwrap_or_else(|| PathBuf::from("./regcache-data")),
            index_cache,
            backend: validate_storage_backend(self.backend.as_deref(), self.s3, env)?,
            max_size,
            high_watermark,
            low_watermark,
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
    pub(crate) fn validate(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Config, ConfigError> {
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
