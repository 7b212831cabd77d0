//! The `[log]` table.

use serde::Deserialize;

use crate::values::{invalid, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    format: Option<String>,
    level: Option<String>,
    events: Option<std::path::PathBuf>,
}

/// The validated `[log]` table.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Default filter (`RUST_LOG` overrides it).
    pub level: String,
    /// A file the server appends its typed events to, one JSON object per line
    /// (`regcache_metrics::Event`: listening, store counted, evicted, reloaded, imported).
    pub events: Option<std::path::PathBuf>,
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
        if self
            .events
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(invalid(
                "log.events",
                "",
                "expected the path of a file to append events to",
            ));
        }
        Ok(LogConfig {
            format,
            level: self.level.unwrap_or_else(|| "info".to_owned()),
            events: self.events,
        })
    }
}
