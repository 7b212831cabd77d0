//! Errors decided once: [`UpstreamError::class`] is the one place that says, for each kind of
//! upstream failure, whose fault it is, whether it may be retried, what it says about the
//! upstream's health (for the circuit breaker), whether a cached copy may be served instead,
//! its metric reason and what kind of answer the client gets. The retry loop, the breaker,
//! the freshness logic, the metrics and `http/error.rs` all read these answers.

use super::UpstreamError;

/// Whose failure it is; drives the log level (client: info, upstream and overload: warn,
/// internal: error) and the status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The request itself (bad input, or content that does not exist).
    Client,
    /// The upstream or the network to it.
    Upstream,
    /// A limit of ours was reached (too many fills at once); not a bug.
    Overload,
    /// Our own failure (store, bug).
    Internal,
}

/// What a failure says about the upstream's health, for the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (404, 401, 429, ...): it is up.
    Answered,
    /// It failed: connection error, timeout, 502/503/504. One failure per request.
    Failed,
    /// Another 5xx: the upstream's failure only on a repository it has answered before. A
    /// request the upstream never answered otherwise may have provoked the 5xx itself (a
    /// 255-character name makes Distribution answer 500), so a client cannot open the circuit
    /// for everyone.
    FailedUnlessProvoked,
    /// Says nothing (offline, circuit open, token realm trouble).
    Unknown,
}

/// The kind of answer the client gets; `http/error.rs` maps it to a status and an OCI code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 404, `MANIFEST_UNKNOWN` or `BLOB_UNKNOWN` by route.
    Unknown,
    /// 401 `UNAUTHORIZED`: the upstream refused our credentials.
    Unauthorized,
    /// 429 `TOOMANYREQUESTS`, with the upstream's `Retry-After`.
    RateLimited,
    /// 502 `UNAVAILABLE`: refused, reset, 5xx.
    BadGateway,
    /// 504 `UNAVAILABLE`: the connect or idle timeout passed.
    Timeout,
    /// 503 `TOOMANYREQUESTS` with `Retry-After`: the upstream is paused after its `429`.
    Paused,
    /// 503 `UNAVAILABLE` with `Retry-After`: marked down by the circuit breaker.
    MarkedDown,
    /// 503 `UNAVAILABLE`: configured offline.
    Offline,
    /// 502 `DIGEST_INVALID`: bytes that do not match their digest, or not a manifest.
    BadContent,
    /// 502 `MANIFEST_INVALID`: larger than regcache buffers.
    TooLarge,
    /// 503 `TOOMANYREQUESTS` with `Retry-After`: our fill limit.
    Busy,
    /// 503 `UNAVAILABLE` with `Retry-After`: the object store (`[storage.s3]`) cannot be
    /// reached.
    StoreUnavailable,
    /// 500 `UNKNOWN`.
    Internal,
}

/// Everything decided about one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    /// Whose failure.
    pub origin: Origin,
    /// What the client is told.
    pub answer: Answer,
    /// Whether an idempotent request may be sent again at once (with backoff).
    pub retryable: bool,
    /// What it says about the upstream's health.
    pub health: Health,
    /// Whether the upstream could not be asked, so that a cached tag may be served stale.
    pub unavailable: bool,
    /// The `reason` label of `regcache_upstream_errors_total`; `None` for answers about the
    /// content (404) and for configuration (offline).
    pub reason: Option<&'static str>,
}

impl UpstreamError {
    /// The one classification of this error; see the module doc.
    pub fn class(&self) -> ErrorClass {
        let upstream = |answer, retryable, health, unavailable, reason| ErrorClass {
            origin: Origin::Upstream,
            answer,
            retryable,
            health,
            unavailable,
            reason: Some(reason),
        };
        match self {
            Self::Offline { .. } => ErrorClass {
                origin: Origin::Client,
                answer: Answer::Offline,
                retryable: false,
                health: Health::Unknown,
                unavailable: true,
                reason: None,
            },
            Self::NotFound { .. } => ErrorClass {
                origin: Origin::Client,
                answer: Answer::Unknown,
                retryable: false,
                health: Health::Answered,
                unavailable: false,
                reason: None,
            },
            // A connect timeout already waited its full length: not retried, so that the time
            // to an answer stays one connect_timeout.
            Self::Unreachable { source, .. } if source.is_timeout() => {
                upstream(Answer::Timeout, false, Health::Failed, true, "timeout")
            }
            Self::Unreachable { source, .. } => upstream(
                Answer::BadGateway,
                source.is_connect(),
                Health::Failed,
                true,
                "connect",
            ),
            Self::Status { status, .. } if matches!(status.as_u16(), 502..=504) => {
                upstream(Answer::BadGateway, true, Health::Failed, true, "5xx")
            }
            Self::Status { status, .. } if status.is_server_error() => upstream(
                Answer::BadGateway,
                false,
                Health::FailedUnlessProvoked,
                true,
                "5xx",
            ),
            Self::Status { .. } => {
                upstream(Answer::BadGateway, false, Health::Answered, false, "4xx")
            }
            Self::Denied { .. } => {
                upstream(Answer::Unauthorized, false, Health::Answered, false, "4xx")
            }
            Self::TooLarge { .. } => {
                upstream(Answer::TooLarge, false, Health::Answered, false, "4xx")
            }
            Self::TooManyRequests { .. } => {
                upstream(Answer::RateLimited, false, Health::Answered, true, "429")
            }
            Self::CircuitOpen { .. } => upstream(
                Answer::MarkedDown,
                false,
                Health::Unknown,
                true,
                "circuit_open",
            ),
            Self::Paused { .. } => upstream(Answer::Paused, false, Health::Unknown, true, "paused"),
            Self::Token { .. } => {
                upstream(Answer::BadGateway, false, Health::Unknown, true, "token")
            }
        }
    }

    /// The upstream's configured name.
    pub fn upstream(&self) -> &str {
        match self {
            Self::Offline { upstream }
            | Self::Unreachable { upstream, .. }
            | Self::NotFound { upstream }
            | Self::Denied { upstream, .. }
            | Self::TooManyRequests { upstream, .. }
            | Self::Status { upstream, .. }
            | Self::TooLarge { upstream, .. }
            | Self::CircuitOpen { upstream, .. }
            | Self::Paused { upstream, .. }
            | Self::Token { upstream, .. } => upstream,
        }
    }

    /// The `Retry-After` to pass on: the upstream's for a 429, the rest of the cooldown (rounded
    /// up, so that a client honouring it does not come back while still open) for an open
    /// circuit.
    pub fn retry_after(&self) -> Option<String> {
        match self {
            Self::TooManyRequests { retry_after, .. } => retry_after.clone(),
            Self::CircuitOpen { retry_in, .. } | Self::Paused { retry_in, .. } => Some(
                (retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0))
                    .max(1)
                    .to_string(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    fn status(code: u16) -> UpstreamError {
        UpstreamError::Status {
            upstream: "u".to_owned(),
            status: StatusCode::from_u16(code).expect("valid status"),
        }
    }

    #[track_caller]
    fn check(err: UpstreamError, answer: Answer, retryable: bool, health: Health, stale: bool) {
        let class = err.class();
        assert_eq!(
            (
                class.answer,
                class.retryable,
                class.health,
                class.unavailable
            ),
            (answer, retryable, health, stale),
            "{err}"
        );
    }

    #[test]
    fn each_kind_is_decided_once() {
        use Answer::{BadGateway, MarkedDown, Offline, RateLimited, Unknown};
        use Health::{Answered, Failed, FailedUnlessProvoked};
        check(status(503), BadGateway, true, Failed, true);
        check(status(502), BadGateway, true, Failed, true);
        check(status(500), BadGateway, false, FailedUnlessProvoked, true);
        check(status(400), BadGateway, false, Answered, false);
        let named = |f: fn(String) -> UpstreamError| f("u".to_owned());
        check(
            named(|upstream| UpstreamError::NotFound { upstream }),
            Unknown,
            false,
            Answered,
            false,
        );
        check(
            named(|upstream| UpstreamError::TooManyRequests {
                upstream,
                retry_after: Some("7".to_owned()),
            }),
            RateLimited,
            false,
            Answered,
            true,
        );
        check(
            named(|upstream| UpstreamError::CircuitOpen {
                upstream,
                retry_in: Duration::from_millis(1500),
            }),
            MarkedDown,
            false,
            Health::Unknown,
            true,
        );
        check(
            named(|upstream| UpstreamError::Offline { upstream }),
            Offline,
            false,
            Health::Unknown,
            true,
        );
    }

    #[test]
    fn retry_after_is_passed_on_or_rounded_up() {
        let open = UpstreamError::CircuitOpen {
            upstream: "u".to_owned(),
            retry_in: Duration::from_millis(1500),
        };
        assert_eq!(open.retry_after().as_deref(), Some("2"));
        assert_eq!(open.upstream(), "u");
        assert_eq!(status(500).retry_after(), None);
    }
}
