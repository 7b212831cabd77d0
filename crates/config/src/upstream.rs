//! `[[upstream]]` tables: the allow-list of registries the cache pulls from.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::values::{duration, invalid, non_zero, size, value_or_file, ConfigError, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
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
    ratelimit_reserve: Option<u64>,
    max_bandwidth: Option<String>,
    serve_stale_on_denied: Option<bool>,
    #[serde(default)]
    tag_rule: Vec<RawTagRule>,
    credentials: Option<String>,
    client_auth_ttl: Option<String>,
    client_auth_offline_grace: Option<String>,
}

/// An `[[upstream.tag_rule]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTagRule {
    tags: String,
    ttl: String,
    max_stale: Option<String>,
}

/// How long tags matching a pattern stay fresh: `[[upstream.tag_rule]]`, the first match wins.
#[derive(Debug, Clone)]
pub struct TagRule {
    /// The pattern (unanchored unless written with `^`/`$`).
    pub tags: regex::Regex,
    /// Served without asking for this long after the upstream confirmed it; `None`: never
    /// revalidated once cached (`ttl = "never"`, for tags that never move).
    pub ttl: Option<Duration>,
    /// Past the TTL, served stale this long when the upstream cannot be asked (default
    /// `cache.max_stale`).
    pub max_stale: Option<Duration>,
}

impl TagRule {
    /// `"never"` or the TTL, as written in the example (`"30s"`).
    fn ttl_text(&self) -> String {
        self.ttl.map_or_else(
            || "never".to_owned(),
            |ttl| humantime::format_duration(ttl).to_string(),
        )
    }
}

/// `credentials = "client"`: the upstream is asked with each client's own credentials, and
/// decides what each client may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAuth {
    /// How long the upstream's confirmation of a client's access to a repository is trusted
    /// without asking again (`client_auth_ttl`).
    pub ttl: Duration,
    /// While the upstream cannot be asked, a client is still served a repository the upstream
    /// confirmed for it this recently (`client_auth_offline_grace`; 0: nothing).
    pub offline_grace: Duration,
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
    /// At or under this many requests left in the upstream's rate-limit window
    /// (`ratelimit-remaining`), cached tags are served without revalidation until it resets.
    pub ratelimit_reserve: u64,
    /// All blob fills from this upstream together stay under this many bytes a second; 0: no
    /// cap.
    pub max_bandwidth: u64,
    /// Whether a `401`/`403` on the revalidation of a cached tag serves the cached copy stale.
    pub serve_stale_on_denied: bool,
    /// Freshness by tag pattern, in order; the first match applies, none: `[cache]`'s.
    pub tag_rules: Vec<TagRule>,
    /// `Some` with `credentials = "client"`: no identity of its own, each client's.
    pub client_auth: Option<ClientAuth>,
}

impl UpstreamConfig {
    /// The first tag rule matching `tag`, with its position (1-based, as `check-config`
    /// and `regcache ls` name it).
    pub fn tag_rule(&self, tag: &str) -> Option<(usize, &TagRule)> {
        self.tag_rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.tags.is_match(tag))
            .map(|(index, rule)| (index + 1, rule))
    }

    /// Which freshness applies to `tag`, in words: `"tag_rule 1 (ttl never)"`, or
    /// `"cache.tag_ttl (1m)"` given `[cache]`'s TTL.
    pub fn freshness_of(&self, tag: &str, default_ttl: Duration) -> String {
        match self.tag_rule(tag) {
            Some((position, rule)) => format!("tag_rule {position} (ttl {})", rule.ttl_text()),
            None => format!(
                "cache.tag_ttl ({})",
                humantime::format_duration(default_ttl)
            ),
        }
    }
}

/// Names are unique and at most one upstream is the default.
pub(crate) fn check_upstream_set(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
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
    /// Checks one `[[upstream]]`; `max_blob_size` is `cache.max_blob_size`.
    pub(crate) fn validate(self, max_blob_size: u64) -> Result<UpstreamConfig, ConfigError> {
        let key = |field: &str| format!("upstream.{}.{field}", self.name);
        if !valid_registry_name(&self.name) {
            return Err(invalid(
                "upstream.name",
                &self.name,
                "expected a registry host like \"docker.io\" or \"registry.local:5000\"",
            ));
        }
        let shown_url = redact_userinfo(&self.url);
        let mut url = Url::parse(&self.url).map_err(|err| {
            let reason = match err {
                url::ParseError::RelativeUrlWithoutBase => format!(
                    "has no scheme: write \"https://{shown_url}\" (or http:// for a registry \
                     without TLS)"
                ),
                other => other.to_string(),
            };
            invalid(key("url"), &shown_url, reason)
        })?;
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
        let client_auth = self.client_auth(&key)?;
        if client_auth.is_some() {
            if credentials.is_some() {
                return Err(invalid(
                    key("credentials"),
                    "client",
                    "an upstream asked with each client's credentials has none of its own: \
                     remove username/password (or the url's user:password@)",
                ));
            }
            if self.serve_stale_on_denied == Some(true) {
                return Err(invalid(
                    key("serve_stale_on_denied"),
                    "true",
                    "not with credentials = \"client\": there a 401/403 is the upstream's \
                     answer for that client",
                ));
            }
        }
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
            max_blob_size,
            ratelimit_reserve: self.ratelimit_reserve.unwrap_or(0),
            serve_stale_on_denied: self.serve_stale_on_denied.unwrap_or(false),
            tag_rules: self
                .tag_rule
                .iter()
                .enumerate()
                .map(|(index, raw)| raw.validate(&key(&format!("tag_rule[{}]", index + 1))))
                .collect::<Result<_, _>>()?,
            max_bandwidth: match self.max_bandwidth.as_deref() {
                None => 0,
                Some(text) => bandwidth(&key("max_bandwidth"), text)?,
            },
            client_auth,
        })
    }

    /// `credentials` (`"config"`, the default, or `"client"`) with its two durations.
    fn client_auth(&self, key: &dyn Fn(&str) -> String) -> Result<Option<ClientAuth>, ConfigError> {
        let client = match self.credentials.as_deref() {
            None | Some("config") => false,
            Some("client") => true,
            Some(other) => {
                return Err(invalid(
                    key("credentials"),
                    other,
                    "expected \"config\" (the upstream's own username/password, or none) or \
                     \"client\" (each client's own)",
                ))
            }
        };
        if !client {
            for (field, value) in [
                ("client_auth_ttl", &self.client_auth_ttl),
                ("client_auth_offline_grace", &self.client_auth_offline_grace),
            ] {
                if let Some(value) = value {
                    return Err(invalid(
                        key(field),
                        value,
                        "applies only with credentials = \"client\"",
                    ));
                }
            }
            return Ok(None);
        }
        let ttl = duration(
            &key("client_auth_ttl"),
            self.client_auth_ttl.as_deref(),
            Duration::from_secs(300),
        )?;
        if ttl.is_zero() {
            return Err(invalid(
                key("client_auth_ttl"),
                "0s",
                "must be at least 1s (each request would ask the upstream)",
            ));
        }
        Ok(Some(ClientAuth {
            ttl,
            offline_grace: duration(
                &key("client_auth_offline_grace"),
                self.client_auth_offline_grace.as_deref(),
                Duration::ZERO,
            )?,
        }))
    }
}

impl RawTagRule {
    /// Checks one rule; `key` is `upstream.<name>.tag_rule[<position>]`.
    fn validate(&self, key: &str) -> Result<TagRule, ConfigError> {
        let tags = regex::Regex::new(&self.tags)
            .map_err(|err| invalid(format!("{key}.tags"), &self.tags, err.to_string()))?;
        let ttl = match self.ttl.trim() {
            "never" => None,
            text => Some(duration(&format!("{key}.ttl"), Some(text), Duration::ZERO)?),
        };
        let max_stale = self
            .max_stale
            .as_deref()
            .map(|text| duration(&format!("{key}.max_stale"), Some(text), Duration::ZERO))
            .transpose()?;
        Ok(TagRule {
            tags,
            ttl,
            max_stale,
        })
    }
}

/// `"20MiB/s"` in bytes a second: at least 1 KiB/s, at most 4 GiB/s.
fn bandwidth(key: &str, text: &str) -> Result<u64, ConfigError> {
    let example = "20MiB/s";
    let Some(amount) = text.trim().strip_suffix("/s") else {
        return Err(invalid(
            key,
            text,
            format!("expected a rate like \"{example}\""),
        ));
    };
    let rate = size(key, amount.trim(), example)?;
    if !(1024..=u64::from(u32::MAX)).contains(&rate) {
        return Err(invalid(key, text, "must be between 1KiB/s and 4GiB/s"));
    }
    Ok(rate)
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
