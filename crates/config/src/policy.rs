//! `[[policy]]` tables: which repositories are served only when signed by trusted keys.
//! The first table whose `repositories` match decides; none matching: no requirement. The key
//! files are read and checked by the cache's policy module (`check-config` does so too).

use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::validate_pattern;
use crate::values::{invalid, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    repositories: Vec<String>,
    require: String,
    #[serde(default)]
    keys: Vec<PathBuf>,
    identity: Option<String>,
}

/// What a `[[policy]]` requires of the manifests it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require {
    /// A cosign signature by one of the keys.
    Cosign,
    /// Nothing: an explicit exemption from a broader table below it.
    None,
}

/// One `[[policy]]`.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// `<upstream>/<repository glob>` patterns, as in `[auth]` (`*` within a path segment,
    /// `**` across).
    pub repositories: Vec<String>,
    /// What it requires.
    pub require: Require,
    /// PEM public keys (`require = "cosign"`).
    pub keys: Vec<PathBuf>,
    /// The `docker-reference` a signature's payload must name, when set.
    pub identity: Option<String>,
}

impl PolicyConfig {
    /// `"cosign"` or `"none"`, as written.
    pub(crate) fn require_text(&self) -> &'static str {
        match self.require {
            Require::Cosign => "cosign",
            Require::None => "none",
        }
    }
}

impl RawPolicy {
    /// Checks the table at `position` (1-based, as messages name it: `policy[1]`).
    pub(crate) fn validate(self, position: usize) -> Result<PolicyConfig, ConfigError> {
        let key = |field: &str| format!("policy[{position}].{field}");
        if self.repositories.is_empty() {
            return Err(invalid(
                key("repositories"),
                "[]",
                "name at least one <upstream>/<repository glob>",
            ));
        }
        for pattern in &self.repositories {
            validate_pattern(&key("repositories"), pattern)?;
        }
        let require = match self.require.as_str() {
            "cosign" => Require::Cosign,
            "none" => Require::None,
            other => return Err(invalid(
                key("require"),
                other,
                "expected \"cosign\" (a signature by one of the keys) or \"none\" (an exemption)",
            )),
        };
        match (require, self.keys.is_empty()) {
            (Require::Cosign, true) => {
                return Err(invalid(
                    key("keys"),
                    "[]",
                    "require = \"cosign\" needs at least one PEM public key (keyless signatures need a network the edge does not have)",
                ))
            }
            (Require::None, false) => {
                return Err(invalid(
                    key("keys"),
                    self.keys[0].display(),
                    "require = \"none\" verifies nothing: remove the keys",
                ))
            }
            _ => {}
        }
        for path in &self.keys {
            if !path.is_file() {
                return Err(invalid(key("keys"), path.display(), "no such file"));
            }
        }
        if let Some(identity) = &self.identity {
            if identity.trim().is_empty() || require == Require::None {
                return Err(invalid(
                    key("identity"),
                    identity,
                    "a docker reference (\"ghcr.io/my-org/app\") checked in cosign payloads",
                ));
            }
        }
        Ok(PolicyConfig {
            repositories: self.repositories,
            require,
            keys: self.keys,
            identity: self.identity,
        })
    }
}
