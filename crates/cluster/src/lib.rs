//! Cluster-wide single flight: replicas that know each other (`[cluster]`) route each blob miss
//! to one owner, picked by rendezvous hashing of (upstream, digest) over the members, so that the
//! upstream serves a blob once for the whole cluster.
//!
//! This module owns membership (static URLs and DNS names, `membership`), the owner choice
//! (`rendezvous`), the HTTP client towards peers and the peer marker (`peer`), remembering
//! peers that just failed, and the cluster metrics. It never touches the store or an upstream:
//! `cache/peer.rs` turns an owner's answer into a fill source, with the fallback to the
//! upstream, and the store verifies the bytes as for any fill.
//!
//! Manifests are not routed: tags revalidate per replica.

mod membership;
mod peer;
mod rendezvous;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use peer::{PeerClient, PeerError, PEER_HEADER};
pub use rendezvous::owner;

use membership::Membership;
use regcache_config::ClusterConfig;
use regcache_metrics::{ClusterMetrics, Metrics};
use regcache_oci::Digest;

/// How long a peer that failed is not asked (the replica fills on its own meanwhile), so that
/// a replica that died costs one connect timeout, not one per miss.
const PEER_COOLDOWN: Duration = Duration::from_secs(10);

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cluster peer client: {0}")]
pub struct ClusterBuildError(String);

/// This replica's view of the cluster.
#[derive(Debug)]
pub struct Cluster {
    membership: Arc<Membership>,
    client: peer::PeerClient,
    /// The SHA-256 of `cluster.secret`, which peer requests are checked against.
    secret_hash: Option<SecretHash>,
    resolve_interval: Duration,
    /// Peers that failed recently, until when they are not asked. A std mutex: held for map
    /// operations only.
    cooling: Mutex<HashMap<String, Instant>>,
    metrics: ClusterMetrics,
}

impl Cluster {
    /// Sets up membership and the peer client; registers the cluster metrics in `metrics`.
    ///
    /// # Errors
    /// [`ClusterBuildError`] when the HTTP client cannot be built (`cluster.ca_file`, TLS).
    pub fn new(config: &ClusterConfig, metrics: &Metrics) -> Result<Self, ClusterBuildError> {
        let membership = Arc::new(Membership::new(config));
        let metrics = ClusterMetrics::new(metrics);
        metrics
            .members
            .set(i64::try_from(membership.members().len()).unwrap_or(i64::MAX));
        Ok(Self {
            client: peer::PeerClient::new(
                config.connect_timeout,
                config.idle_timeout,
                config.secret.as_ref(),
                config.ca_file.as_deref(),
            )
            .map_err(ClusterBuildError)?,
            membership,
            secret_hash: config
                .secret
                .as_ref()
                .map(|secret| hash(secret.expose().as_bytes())),
            resolve_interval: config.resolve_interval,
            cooling: Mutex::default(),
            metrics,
        })
    }

    /// Keeps the members of DNS peers current until `shutdown` (returns at once without any).
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        if self.membership.has_names() {
            Arc::clone(&self.membership)
                .maintain(
                    self.resolve_interval,
                    self.metrics.members.clone(),
                    shutdown,
                )
                .await;
        }
    }

    /// This replica's member id.
    pub fn self_id(&self) -> &str {
        self.membership.self_id()
    }

    /// The members now (sorted; this replica included).
    pub fn members(&self) -> Arc<Vec<String>> {
        self.membership.members()
    }

    /// The metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// The owner of a blob when it is another replica that is not cooling down; `None` when
    /// this replica owns it. A peer cooling down after a failure counts as a fallback.
    pub fn remote_owner(&self, upstream: &str, digest: &Digest) -> Option<String> {
        let members = self.membership.members();
        let owner = owner(&members, upstream, digest)?;
        if owner == self.membership.self_id() {
            return None;
        }
        let mut cooling = self.cooling.lock();
        match cooling.get(owner) {
            Some(until) if *until > Instant::now() => {
                self.metrics
                    .peer_fallbacks
                    .with_label_values(&["cooldown"])
                    .inc();
                None
            }
            Some(_) => {
                cooling.remove(owner);
                Some(owner.to_owned())
            }
            None => Some(owner.to_owned()),
        }
    }

    /// Notes that `peer` failed: it is not asked for [`PEER_COOLDOWN`].
    pub fn peer_failed(&self, peer: &str, reason: &'static str) {
        self.metrics
            .peer_fallbacks
            .with_label_values(&[reason])
            .inc();
        self.metrics
            .peer_fetches
            .with_label_values(&["fallback"])
            .inc();
        let mut cooling = self.cooling.lock();
        cooling.insert(peer.to_owned(), Instant::now() + PEER_COOLDOWN);
    }

    /// The HTTP client towards peers.
    pub fn client(&self) -> &PeerClient {
        &self.client
    }

    /// Whether a request comes from a peer replica: it carries [`PEER_HEADER`] with the
    /// cluster secret (compared in constant time), or, when no secret is configured, at all.
    pub fn is_peer_request(&self, headers: &http::HeaderMap) -> bool {
        let Some(value) = headers.get(PEER_HEADER) else {
            return false;
        };
        match &self.secret_hash {
            None => true,
            Some(expected) => secret_matches(expected, value.as_bytes()),
        }
    }

    /// Whether peers prove who they are (a secret is configured): only then may a peer request
    /// pass `[auth]` without a client's credentials.
    pub fn authenticates_peers(&self) -> bool {
        self.secret_hash.is_some()
    }
}

/// A SHA-256 hash of the cluster secret or of what a request presents; never printed.
struct SecretHash([u8; 32]);

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

fn hash(bytes: &[u8]) -> SecretHash {
    use sha2::Digest as _;
    SecretHash(sha2::Sha256::digest(bytes).into())
}

/// Compares the secret's hash with the hash of what was presented, in constant time: neither
/// the content nor the length of the secret leaks through timing.
fn secret_matches(expected: &SecretHash, presented: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(&expected.0, &hash(presented).0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(secret: Option<&str>) -> Cluster {
        let config =
            regcache_config::Config::parse(&format!(
            "[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5001\"]\n{}",
            secret.map(|s| format!("secret = \"{s}\"")).unwrap_or_default()
        ))
            .expect("valid")
            .cluster
            .expect("[cluster]");
        Cluster::new(&config, &regcache_metrics::Metrics::new()).expect("client")
    }

    #[test]
    fn peer_requests_need_the_secret_when_one_is_set() {
        let mut headers = http::HeaderMap::new();
        let with_secret = cluster(Some("0123456789abcdef0123"));
        assert!(!with_secret.is_peer_request(&headers));
        headers.insert(PEER_HEADER, http::HeaderValue::from_static("1"));
        assert!(!with_secret.is_peer_request(&headers));
        assert!(cluster(None).is_peer_request(&headers));
        headers.insert(
            PEER_HEADER,
            http::HeaderValue::from_static("0123456789abcdef0123"),
        );
        assert!(with_secret.is_peer_request(&headers));
    }

    #[test]
    fn metric_names_follow_conventions() {
        let metrics = regcache_metrics::Metrics::new();
        let config = regcache_config::Config::parse("[cluster]\nself = \"http://127.0.0.1:5000\"")
            .expect("valid")
            .cluster
            .expect("[cluster]");
        let _cluster = Cluster::new(&config, &metrics).expect("client");
        let text = String::from_utf8(metrics.encode()).expect("utf-8");
        assert!(text.contains("regcache_cluster_members 1"), "{text}");
        assert!(text.contains("regcache_cluster_peer_fetches_total{result=\"ok\"} 0"));
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE regcache_cluster_"))
        {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap_or_default(), parts.next());
            assert!(
                kind != Some("counter") || name.ends_with("_total"),
                "{name}"
            );
        }
    }

    #[test]
    fn a_failed_peer_cools_down() {
        let cluster = cluster(None);
        let digest = (0u32..)
            .map(|i| Digest::of(&i.to_be_bytes()))
            .find(|d| cluster.remote_owner("docker.io", d).is_some())
            .expect("the peer owns some blobs");
        let peer = cluster.remote_owner("docker.io", &digest).expect("remote");
        assert_eq!(peer, "http://127.0.0.1:5001");
        cluster.peer_failed(&peer, "connect");
        assert_eq!(cluster.remote_owner("docker.io", &digest), None);
    }
}
