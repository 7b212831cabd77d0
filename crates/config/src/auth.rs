//! The `[auth]` table: client authentication (htpasswd users, the token endpoint) and
//! per-repository grants.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::values::{duration, invalid, ConfigError, Secret};
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
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
pub(crate) fn validate_pattern(key: &str, pattern: &str) -> Result<(), ConfigError> {
    if !pattern.contains('/') {
        return Err(invalid(
            key,
            pattern,
            "expected <upstream>/<repository glob>, e.g. \"docker.io/library/*\"",
        ));
    }
    glob(pattern)
        .map(drop)
        .map_err(|err| invalid(key, pattern, err.to_string()))
}

/// A `<upstream>/<repository glob>` pattern: `*` stays within a path segment, `**` crosses.
fn glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
}

/// Compiles validated `<upstream>/<repository glob>` patterns (`[auth]`'s, `[[policy]]`'s)
/// into one matcher of `<upstream>/<repository>` names. Validation refused every pattern that
/// would not compile, so none is dropped.
pub fn repository_patterns(patterns: &[String]) -> globset::GlobSet {
    let mut builder = globset::GlobSetBuilder::new();
    for pattern in patterns {
        if let Ok(glob) = glob(pattern) {
            builder.add(glob);
        }
    }
    builder
        .build()
        .unwrap_or_else(|_| globset::GlobSet::empty())
}

impl RawAuth {
    /// Checks the `[auth]` table and reads the htpasswd file.
    pub(crate) fn validate(self) -> Result<AuthConfig, ConfigError> {
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
pub(crate) fn parse_htpasswd(text: &str) -> Result<Vec<(String, Secret)>, String> {
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
