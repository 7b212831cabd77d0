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
    #[error("upstream {upstream} unreachable: {}", network_cause(.source))]
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
    /// The upstream answered `429` and is not asked again until its `Retry-After`.
    #[error("upstream {upstream} is rate-limiting; not asked again for {}s", retry_in.as_secs().max(1))]
    Paused {
        /// The upstream's name.
        upstream: String,
        /// Until the pause ends.
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

/// What went wrong on the network, in the words an operator acts on: "connection refused",
/// "timed out", "name not resolved", or else the innermost cause (a TLS failure reads as
/// rustls words it, e.g. "invalid peer certificate: UnknownIssuer") — not reqwest's
/// "error sending request for url (…)".
pub fn network_cause(err: &reqwest::Error) -> String {
    use std::error::Error as _;
    use std::io::ErrorKind;
    if err.is_timeout() {
        return "timed out".to_owned();
    }
    let mut innermost: &dyn std::error::Error = err;
    let mut io_kind = None;
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        innermost = cause;
        source = cause.source();
    }
    let detail = innermost.to_string();
    match io_kind {
        Some(ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
        Some(ErrorKind::TimedOut) => "timed out".to_owned(),
        Some(ErrorKind::ConnectionReset) => "connection reset by the upstream".to_owned(),
        _ if detail.contains("dns error")
            || detail.contains("failed to lookup address")
            || detail.contains("Name or service not known")
            || detail.contains("Temporary failure in name resolution") =>
        {
            format!("name not resolved ({detail})")
        }
        _ if err.is_connect() => format!("cannot connect: {detail}"),
        _ => detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_and_an_unknown_name_are_said_plainly() {
        // Nothing listens on the discard port here (the tests' dead upstream everywhere).
        let client = reqwest::Client::new();
        let refused = client
            .get("http://127.0.0.1:9/v2/")
            .send()
            .await
            .expect_err("nobody listens");
        let error = UpstreamError::Unreachable {
            upstream: "registry.test".to_owned(),
            source: refused,
        };
        assert_eq!(
            error.to_string(),
            "upstream registry.test unreachable: connection refused"
        );

        let unresolved = client
            .get("http://regcache-test.invalid/v2/")
            .send()
            .await
            .expect_err("an .invalid name never resolves");
        let cause = network_cause(&unresolved);
        assert!(cause.starts_with("name not resolved"), "{cause}");
    }
}
