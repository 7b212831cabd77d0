//! What every section shares: the error type, secrets, and parsers for the value forms the
//! file uses (durations like `"60s"`, sizes like `"32MiB"`, counts of at least one).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

pub(crate) fn invalid(
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
pub(crate) fn value_or_file(
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

/// A duration like `"60s"` or `"7d"`; `default` when absent.
pub(crate) fn duration(
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
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

/// A count of at least one; `default` when absent.
pub(crate) fn non_zero(
    key: &str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(invalid(key, 0, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// A size like `"16MiB"` in bytes; `example` shows the form in the message.
pub(crate) fn size(key: &str, text: &str, example: &str) -> Result<u64, ConfigError> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| {
            invalid(
                key,
                text,
                format!("expected a size like \"{example}\": {err}"),
            )
        })
}
