//! What can go wrong asking an upstream. What each variant means for retries, the circuit
//! breaker, serving stale, metrics and the client is decided once, in `class.rs`.

use std::time::Duration;

use reqwest::StatusCode;

/// Why an upstream request failed. What each variant means for retries, the circuit breaker,
/// serving stale, metrics and the client is decided once, in [`UpstreamError::class`].
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream is configured offline; it is never contacted.
    #[error("upstream {upstream} is offline (configured)")]
    Offline {
        /// The upstream's name.
        upstream: String,
    },
    /// The connection could not be made, or broke, or timed out.
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable {
        /// The upstream's name.
        upstream: String,
        /// The network failure.
        #[source]
        source: reqwest::Error,
    },
    /// The upstream says the manifest, blob or repository does not exist.
    #[error("upstream {upstream} has no such content")]
    NotFound {
        /// The upstream's name.
        upstream: String,
    },
    /// The upstream refused our credentials (or we have none).
    #[error("upstream {upstream} denied access ({status})")]
    Denied {
        /// The upstream's name.
        upstream: String,
        /// 401 or 403.
        status: StatusCode,
    },
    /// The upstream is rate-limiting us.
    #[error("upstream {upstream} is rate-limiting (429)")]
    TooManyRequests {
        /// The upstream's name.
        upstream: String,
        /// Its `Retry-After`, passed on to the client.
        retry_after: Option<String>,
    },
    /// Any other unexpected status.
    #[error("upstream {upstream} answered {status}")]
    Status {
        /// The upstream's name.
        upstream: String,
        /// The status.
        status: StatusCode,
    },
    /// A manifest or listing was larger than regcache buffers, or a blob larger than
    /// `cache.max_blob_size` or its own `Content-Length`.
    #[error("upstream {upstream} sent more than {limit} bytes")]
    TooLarge {
        /// The upstream's name.
        upstream: String,
        /// The limit.
        limit: usize,
    },
    /// The upstream failed repeatedly and is not asked again until the cooldown passes.
    #[error("upstream {upstream} is marked down after repeated failures (retry in {retry_in:?})")]
    CircuitOpen {
        /// The upstream's name.
        upstream: String,
        /// Until the next probe.
        retry_in: Duration,
    },
    /// The token endpoint failed.
    #[error("upstream {upstream} token endpoint {realm} failed: {reason}")]
    Token {
        /// The upstream's name.
        upstream: String,
        /// The realm URL.
        realm: String,
        /// What went wrong.
        reason: String,
    },
}
