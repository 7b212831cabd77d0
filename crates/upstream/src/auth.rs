//! Upstream authentication: `WWW-Authenticate` challenge parsing and bearer tokens cached per
//! scope until shortly before they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Basic realm="…"`
    Basic,
    /// `Bearer realm="…",service="…",scope="…"`
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value and drops the result: the fuzz target's entry point.
#[doc(hidden)]
pub fn fuzz_parse_challenge(value: &str) {
    let _ = parse_challenge(value);
}

/// Parses the first challenge of a `WWW-Authenticate` value. Parameters are `key=value` or
/// `key="quoted, value"`, comma separated.
pub(crate) fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

fn parse_params(input: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = input.trim_start();
    while let Some((key, after_key)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, after_value) = if let Some(quoted) = after_key.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((index, ch)) = chars.next() {
                match ch {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = index + 1;
                        break;
                    }
                    _ => value.push(ch),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after_key.find(',').unwrap_or(after_key.len());
            (after_key[..end].trim().to_owned(), &after_key[end..])
        };
        params.insert(key, value);
        rest = after_value
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    params
}

/// Token realm hosts of well-known registries whose token service is not on the registry's
/// own host. ghcr.io, quay.io, gcr.io, `*.pkg.dev`, ECR and ACR answer on their own host.
const BUILT_IN_REALM_HOSTS: &[(&str, &str)] = &[
    ("registry-1.docker.io", "auth.docker.io"),
    ("registry.docker.io", "auth.docker.io"),
    ("index.docker.io", "auth.docker.io"),
    ("docker.io", "auth.docker.io"),
    ("registry.gitlab.com", "gitlab.com"),
    ("nvcr.io", "authn.nvidia.com"),
    ("docker.elastic.co", "docker-auth.elastic.co"),
];

/// Where an upstream's credentials may be sent: its own host and the token realm hosts listed
/// for it, and never over plain HTTP when the upstream is HTTPS. A realm named by a `401`
/// elsewhere is asked for an anonymous token instead (the vulnerability class of containerd
/// CVE-2020-15157).
#[derive(Debug)]
pub(crate) struct CredentialScope {
    home_host: String,
    https_only: bool,
    realm_hosts: Vec<String>,
}

impl CredentialScope {
    /// The scope of an upstream at `base` with the configured `token_realm_hosts` (lower case).
    pub(crate) fn new(base: &url::Url, configured: &[String]) -> Self {
        let home_host = base.host_str().unwrap_or_default().to_ascii_lowercase();
        let mut realm_hosts = configured.to_vec();
        realm_hosts.extend(
            BUILT_IN_REALM_HOSTS
                .iter()
                .filter(|(registry, _)| *registry == home_host)
                .map(|(_, realm)| (*realm).to_owned()),
        );
        Self {
            home_host,
            https_only: base.scheme() == "https",
            realm_hosts,
        }
    }

    /// Whether credentials may be sent to `realm`.
    pub(crate) fn allows(&self, realm: &url::Url) -> bool {
        if self.https_only && realm.scheme() != "https" {
            return false;
        }
        let Some(host) = realm.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        host == self.home_host || self.realm_hosts.contains(&host)
    }
}

/// The token endpoint's answer (Docker uses `token`, OAuth2 `access_token`).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long it may be used. Tokens without `expires_in` last 60 s (the
    /// Docker token spec's default).
    pub(crate) fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token)?;
        Some((
            token,
            Duration::from_secs(self.expires_in.unwrap_or(60).max(1)),
        ))
    }
}

/// Bearer tokens by scope. A token is dropped a little before it expires so that a request
/// never goes out with a token that dies in flight.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    tokens: parking_lot::Mutex<HashMap<String, (String, Instant)>>,
}

/// Margin before expiry at which a token is no longer used.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Bound on cached scopes; past it, expired entries are dropped, then everything.
const MAX_SCOPES: usize = 10_000;

impl TokenCache {
    pub(crate) fn get(&self, scope: &str) -> Option<String> {
        // A std mutex: the critical section is a map lookup and never awaits.
        let tokens = self.tokens.lock();
        let (token, valid_until) = tokens.get(scope)?;
        (Instant::now() < *valid_until).then(|| token.clone())
    }

    pub(crate) fn insert(&self, scope: &str, token: String, lifetime: Duration) {
        let valid_for = lifetime.saturating_sub(EXPIRY_MARGIN.min(lifetime / 2));
        let mut tokens = self.tokens.lock();
        if tokens.len() >= MAX_SCOPES {
            let now = Instant::now();
            tokens.retain(|_, (_, until)| *until > now);
            if tokens.len() >= MAX_SCOPES {
                tokens.clear();
            }
        }
        tokens.insert(scope.to_owned(), (token, Instant::now() + valid_for));
    }

    pub(crate) fn remove(&self, scope: &str) {
        let mut tokens = self.tokens.lock();
        tokens.remove(scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(value: &str, expected: Option<Challenge>) {
        assert_eq!(parse_challenge(value), expected, "{value}");
    }

    #[test]
    fn challenges() {
        check(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }),
        );
        check(
            r#"bearer realm="http://127.0.0.1:1/token", scope="repository:a/b:pull,push""#,
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/token".into(),
                service: None,
                scope: Some("repository:a/b:pull,push".into()),
            }),
        );
        check(r#"Basic realm="registry""#, Some(Challenge::Basic));
        check("Bearer service=x", None);
        check("Negotiate abc", None);
    }

    #[test]
    fn credentials_stay_home() {
        let url = |text: &str| url::Url::parse(text).expect("test url");
        let hub = CredentialScope::new(&url("https://registry-1.docker.io"), &[]);
        assert!(hub.allows(&url("https://auth.docker.io/token")));
        assert!(hub.allows(&url("https://registry-1.docker.io/token")));
        assert!(!hub.allows(&url("http://auth.docker.io/token")));
        assert!(!hub.allows(&url("https://evil.example/token")));
        assert!(!hub.allows(&url("https://auth.docker.io.evil.example/token")));
        let private = CredentialScope::new(
            &url("http://registry.local:5000"),
            &["sso.local".to_owned()],
        );
        assert!(private.allows(&url("http://registry.local:5001/token")));
        assert!(private.allows(&url("https://sso.local/token")));
        assert!(!private.allows(&url("http://auth.docker.io/token")));
    }

    #[test]
    fn tokens_expire() {
        let cache = TokenCache::default();
        cache.insert("s", "t".into(), Duration::from_secs(300));
        assert_eq!(cache.get("s").as_deref(), Some("t"));
        cache.insert("short", "t".into(), Duration::from_millis(0));
        assert_eq!(cache.get("short"), None);
        cache.remove("s");
        assert_eq!(cache.get("s"), None);
    }
}
