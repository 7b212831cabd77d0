//! Asking the owner replica for a blob: an ordinary pull-API `GET` of the blob with `ns=` naming
//! the upstream and the [`PEER_HEADER`] marking it as a peer request (the owner then fills from
//! its upstream and never forwards it again), a `Range` when resuming.

use std::time::Duration;

use futures_util::TryStreamExt as _;
use http::StatusCode;

use regcache_config::Secret;
use regcache_oci::{Digest, RepoName};
use regcache_upstream::{blob_extent, BlobResponse, UpstreamError};

/// The header that marks a request from a peer replica; its value is `cluster.secret` (or `1`
/// when there is none).
pub const PEER_HEADER: &str = "x-regcache-peer";

/// Why the owner did not answer with the blob.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Connection refused or broken, or a timeout.
    #[error("peer {peer} unreachable: {}", regcache_upstream::network_cause(.source))]
    Unreachable {
        /// The owner's member id.
        peer: String,
        /// The network failure.
        #[source]
        source: reqwest::Error,
    },
    /// The owner answered with another status.
    #[error("peer {peer} answered {status}")]
    Status {
        /// The owner's member id.
        peer: String,
        /// Its status.
        status: StatusCode,
    },
}

impl PeerError {
    /// The `reason` label of `regcache_cluster_peer_fallbacks_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { source, .. } if source.is_timeout() => "timeout",
            Self::Unreachable { source, .. } if source.is_connect() => "connect",
            Self::Unreachable { .. } => "broken",
            Self::Status { status, .. } if status.is_server_error() => "5xx",
            Self::Status { .. } => "status",
        }
    }
}

/// The HTTP client replicas use towards each other.
#[derive(Debug)]
pub struct PeerClient {
    http: reqwest::Client,
    marker: Secret,
}

impl PeerClient {
    /// # Errors
    /// A description when `ca_file` cannot be read or parsed, or the client cannot be built.
    pub(crate) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        secret: Option<&Secret>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        // Peers are configured: any address of theirs may be reached, through the same egress
        // decision as every other outbound request.
        let egress = regcache_upstream::egress::Egress::configured("cluster peers");
        let mut builder = reqwest::Client::builder()
            // Peers are on the cluster network: never through an HTTP proxy of the environment.
            .no_proxy()
            .redirect(egress.redirect_policy())
            .dns_resolver(std::sync::Arc::new(
                regcache_upstream::egress::GuardedResolver(egress),
            ))
            .connect_timeout(connect_timeout)
            .read_timeout(idle_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION"), " (peer)"));
        if let Some(path) = ca_file {
            builder = regcache_upstream::trust_pem_file(builder, path)
                .map_err(|err| format!("cluster.ca_file {err}"))?;
        }
        Ok(Self {
            http: builder.build().map_err(|err| err.to_string())?,
            marker: secret
                .cloned()
                .unwrap_or_else(|| Secret::new("1".to_owned())),
        })
    }

    /// `GET <peer>/v2/<repo>/blobs/<digest>?ns=<upstream>` from byte `offset`. A body that
    /// breaks ends in [`UpstreamError::Unreachable`] naming `<upstream> (via peer <peer>)`.
    ///
    /// # Errors
    /// [`PeerError`] for a network failure or any status but 200/206.
    pub async fn get_blob(
        &self,
        peer: &str,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobResponse, PeerError> {
        let unreachable = |source| PeerError::Unreachable {
            peer: peer.to_owned(),
            source,
        };
        let mut url = url::Url::parse(&format!("{peer}/v2/{}/blobs/{digest}", repo.as_str()))
            .map_err(|_| PeerError::Status {
                peer: peer.to_owned(),
                status: StatusCode::BAD_REQUEST,
            })?;
        url.query_pairs_mut().append_pair("ns", upstream);
        let mut request = self.http.get(url).header(PEER_HEADER, self.marker.expose());
        if offset > 0 {
            request = request.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        if !matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
            return Err(PeerError::Status {
                peer: peer.to_owned(),
                status,
            });
        }
        let (offset, total_size) = blob_extent(&response, offset);
        let via = format!("{upstream} (via peer {peer})");
        let body = response
            .bytes_stream()
            .map_err(move |source| UpstreamError::Unreachable {
                upstream: via.clone(),
                source,
            });
        Ok(BlobResponse {
            total_size,
            offset,
            body: Box::pin(body),
        })
    }
}
