//! The `[log]` table.

use serde::Deserialize;

use crate::values::{invalid, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

/// The validated `[log]` table.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Default filter (`RUST_LOG` overrides it).
    pub level: String,
}

/// Human-readable or JSON log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

impl RawLog {
    /// Checks the `[log]` table.
    pub(crate) fn validate(self) -> Result<LogConfig, ConfigError> {
        let format = match self.format.as_deref() {
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
        Ok(LogConfig {
            format,
            level: self.level.unwrap_or_else(|| "info".to_owned()),
        })
    }
}
