//! `[[pin]]` tables: images kept cached and never evicted (also the form of `pins.toml`).

use serde::Deserialize;

use crate::upstream::UpstreamConfig;
use crate::values::{invalid, ConfigError};

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

/// Each entry is `os/arch` or `os/arch/variant`.
pub(crate) fn check_platforms(key: &str, platforms: &[String]) -> Result<(), ConfigError> {
    for platform in platforms {
        let parts = platform.split('/').count();
        if !(2..=3).contains(&parts) || platform.split('/').any(str::is_empty) {
            return Err(invalid(
                key,
                platform,
                "expected os/arch or os/arch/variant",
            ));
        }
    }
    Ok(())
}

impl RawPin {
    /// Checks a pin against the configured upstreams.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the bad key.
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
        check_platforms("pin.platforms", &self.platforms)?;
        Ok(PinConfig {
            upstream,
            repository,
            reference,
            platforms: self.platforms,
        })
    }
}
