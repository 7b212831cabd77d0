//! The `[cluster]` table: this replica's URL, its peers (URLs, or DNS names that resolve to
//! every replica, as a Kubernetes headless Service does) and the secret peers present to each
//! other. Validated here into a [`ClusterConfig`]; `regcache_cluster` uses it.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::values::{duration, invalid, value_or_file, ConfigError, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(rename = "self")]
    self_url: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    secret: Option<String>,
    secret_file: Option<std::path::PathBuf>,
    resolve_interval: Option<String>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    ca_file: Option<std::path::PathBuf>,
}

/// One `cluster.peers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// A replica's URL, as its member id (`http://10.0.0.7:5000`).
    Member(String),
    /// A DNS name whose addresses are the replicas, each at `port` with the scheme of
    /// `cluster.self`; resolved again every `resolve_interval`.
    Dns {
        /// The name (`regcache-peers.default.svc.cluster.local`).
        host: String,
        /// The port (from the entry, else from `cluster.self`).
        port: u16,
    },
}

/// Peers of a replicated deployment (the `[cluster]` table).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This replica's member id: `scheme://host:port`, the way the other replicas reach it.
    pub self_id: String,
    /// `http` or `https`: the scheme of every member found by DNS.
    pub scheme: String,
    /// The other replicas (`self` may be among them).
    pub peers: Vec<PeerSpec>,
    /// Presented by a replica asking a peer, checked by the peer (required with `[auth]`).
    pub secret: Option<Secret>,
    /// How often DNS peers are resolved again.
    pub resolve_interval: Duration,
    /// TCP (+ TLS) connect timeout towards a peer; past it, the replica fills on its own.
    pub connect_timeout: Duration,
    /// Longest silence while reading a peer's answer.
    pub idle_timeout: Duration,
    /// Extra PEM CA certificates trusted for `https://` peers.
    pub ca_file: Option<std::path::PathBuf>,
}

/// `scheme://host:port` of a URL (the port written out): how replicas name each other.
fn member_id(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", url.scheme()))
}

/// Replaces `${NAME}` with the environment variable `NAME` (read through `lookup`).
fn expand_env(
    key: &str,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| invalid(key, text, "unclosed ${"))?;
        let name = &after[..end];
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(invalid(
                key,
                text,
                format!("${{{name}}} is not a variable name"),
            ));
        }
        let value = lookup(name)
            .ok_or_else(|| invalid(key, text, format!("environment variable {name} is not set")))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An `http(s)://host[:port]` URL with nothing after the authority.
fn base_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text).map_err(|err| invalid(key, text, err.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(key, text, "expected an http:// or https:// URL"));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(invalid(
            key,
            text,
            "expected scheme://host:port only (no path, query or credentials)",
        ));
    }
    Ok(url)
}

impl RawCluster {
    pub(super) fn validate(
        self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ClusterConfig, ConfigError> {
        let Some(self_text) = self.self_url else {
            return Err(invalid(
                "cluster.self",
                "",
                "required: this replica's URL as its peers reach it, e.g. \"http://${POD_IP}:5000\"",
            ));
        };
        let expanded = expand_env("cluster.self", &self_text, lookup)?;
        let self_url = base_url("cluster.self", &expanded)?;
        let self_id = member_id(&self_url)
            .ok_or_else(|| invalid("cluster.self", &expanded, "no host or port"))?;
        let self_port = self_url.port_or_known_default().unwrap_or(80);
        let peers = self
            .peers
            .iter()
            .map(|peer| peer_spec(peer, self_port))
            .collect::<Result<Vec<_>, _>>()?;
        let secret = value_or_file(
            "cluster.",
            "secret",
            self.secret.as_deref(),
            self.secret_file.as_deref(),
        )?;
        if secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            return Err(invalid(
                "cluster.secret",
                "<redacted>",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            ));
        }
        let resolve_interval = duration(
            "cluster.resolve_interval",
            self.resolve_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        if resolve_interval.is_zero() {
            return Err(invalid(
                "cluster.resolve_interval",
                "0s",
                "must be longer than 0s",
            ));
        }
        Ok(ClusterConfig {
            self_id,
            scheme: self_url.scheme().to_owned(),
            peers,
            secret,
            resolve_interval,
            connect_timeout: duration(
                "cluster.connect_timeout",
                self.connect_timeout.as_deref(),
                Duration::from_secs(2),
            )?,
            idle_timeout: duration(
                "cluster.idle_timeout",
                self.idle_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            ca_file: match self.ca_file {
                Some(path) if !path.is_file() => {
                    return Err(invalid("cluster.ca_file", path.display(), "no such file"))
                }
                other => other,
            },
        })
    }
}

/// A URL (has `://`) or a DNS name with an optional port.
fn peer_spec(text: &str, default_port: u16) -> Result<PeerSpec, ConfigError> {
    if text.contains("://") {
        let url = base_url("cluster.peers", text)?;
        return member_id(&url)
            .map(PeerSpec::Member)
            .ok_or_else(|| invalid("cluster.peers", text, "no host or port"));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| invalid("cluster.peers", text, "expected host or host:port"))?,
        ),
        None => (text, default_port),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !host_ok {
        return Err(invalid(
            "cluster.peers",
            text,
            "expected a URL like \"http://10.0.0.7:5000\" or a DNS name like \"regcache-peers.default.svc.cluster.local\"",
        ));
    }
    Ok(PeerSpec::Dns {
        host: host.to_ascii_lowercase(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "POD_IP").then(|| "10.1.2.3".to_owned())
    }

    fn parse(toml_text: &str) -> Result<ClusterConfig, ConfigError> {
        toml::from_str::<RawCluster>(toml_text)
            .map_err(ConfigError::from)?
            .validate(env)
    }

    #[track_caller]
    fn check_error(toml_text: &str, fragment: &str) {
        let message = parse(toml_text).expect_err("must be rejected").to_string();
        assert!(message.contains(fragment), "{message}");
    }

    #[test]
    fn self_expands_the_environment_and_peers_take_urls_and_names() {
        let config = parse(
            "self = \"http://${POD_IP}:5000\"\npeers = [\"regcache-peers.ns.svc.cluster.local\", \"http://10.0.0.9\", \"other:6000\"]\nsecret = \"0123456789abcdef\"",
        )
        .expect("valid");
        assert_eq!(config.self_id, "http://10.1.2.3:5000");
        assert_eq!(
            config.peers,
            [
                PeerSpec::Dns {
                    host: "regcache-peers.ns.svc.cluster.local".into(),
                    port: 5000
                },
                PeerSpec::Member("http://10.0.0.9:80".into()),
                PeerSpec::Dns {
                    host: "other".into(),
                    port: 6000
                },
            ]
        );
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
        assert_eq!(config.resolve_interval, Duration::from_secs(10));
    }

    #[test]
    fn bad_values_name_the_key() {
        check_error("peers = []", "cluster.self");
        check_error("self = \"http://${NODE_IP}:5000\"", "NODE_IP is not set");
        check_error("self = \"http://${POD_IP:5000\"", "unclosed");
        check_error("self = \"ftp://x\"", "cluster.self");
        check_error("self = \"http://x:1/path\"", "cluster.self");
        check_error("self = \"http://x:1\"\npeers = [\"a b\"]", "cluster.peers");
        check_error("self = \"http://x:1\"\npeers = [\"a:xx\"]", "cluster.peers");
        check_error(
            "self = \"http://x:1\"\nsecret = \"short\"",
            "cluster.secret",
        );
        check_error(
            "self = \"http://x:1\"\nresolve_interval = \"0s\"",
            "cluster.resolve_interval",
        );
        check_error("self = \"http://x:1\"\nbogus = 1", "bogus");
        // Peers are never admitted unauthenticated.
        let message = crate::Config::parse("[auth]\n[cluster]\nself = \"http://x:1\"")
            .expect_err("[auth] without cluster.secret")
            .to_string();
        assert!(message.contains("cluster.secret"), "{message}");
        check_error(
            "self = \"http://x:1\"\nca_file = \"/nonexistent\"",
            "cluster.ca_file",
        );
    }
}
