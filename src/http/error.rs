//! [`ApiError`]: the only place where domain errors become HTTP statuses and OCI error codes.
//!
//! The client gets the external message in the OCI JSON error form; the internal cause is kept
//! for the request log line.

use http::{HeaderValue, StatusCode};
use serde::Serialize;

use super::body::{self, Body};
use crate::cache::CacheError;
use crate::oci::ParseError;
use crate::routing::ResolveError;
use crate::upstream::UpstreamError;

/// Where a failure came from; drives the status class and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Client,
    Upstream,
    Internal,
}

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    /// An OCI distribution-spec error code.
    pub(crate) code: &'static str,
    /// What the client is told.
    pub(crate) message: String,
    /// For the log: what really happened.
    pub(crate) internal: Option<String>,
    pub(crate) origin: Origin,
    pub(crate) retry_after: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            internal: None,
            origin: if status.is_server_error() {
                Origin::Internal
            } else {
                Origin::Client
            },
            retry_after: None,
        }
    }

    fn upstream(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        cause: &dyn std::fmt::Display,
    ) -> Self {
        Self {
            internal: Some(cause.to_string()),
            origin: Origin::Upstream,
            ..Self::new(status, code, message)
        }
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
    }

    pub(crate) fn from_parse(err: &ParseError) -> Self {
        match err {
            ParseError::Name(_) => {
                Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", err.to_string())
            }
            ParseError::Tag(_) => {
                Self::new(StatusCode::BAD_REQUEST, "TAG_INVALID", err.to_string())
            }
            ParseError::Digest(_) => {
                Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", err.to_string())
            }
        }
    }

    pub(crate) fn from_resolve(err: &ResolveError) -> Self {
        match err {
            ResolveError::UnknownRegistry(registry) => Self::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("registry {registry:?} is not configured on this cache"),
            ),
            ResolveError::NoDefault => Self::new(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "no registry named in the path and no default upstream configured",
            ),
            ResolveError::Name(err) => Self::from_parse(err),
        }
    }

    /// Maps a cache error; `unknown_code` is `MANIFEST_UNKNOWN` or `BLOB_UNKNOWN`.
    pub(crate) fn from_cache(err: &CacheError, unknown_code: &'static str) -> Self {
        let cause: &dyn std::fmt::Display = err;
        match err.root() {
            CacheError::Upstream(upstream_err) => {
                Self::from_upstream(upstream_err, unknown_code, cause)
            }
            CacheError::DigestMismatch { .. } | CacheError::NotAManifest => Self::upstream(
                StatusCode::BAD_GATEWAY,
                "DIGEST_INVALID",
                "the upstream sent content that does not match its digest",
                cause,
            ),
            CacheError::NotCachedOffline { upstream } => Self::upstream(
                StatusCode::NOT_FOUND,
                unknown_code,
                format!("not cached, and upstream {upstream} is offline"),
                cause,
            ),
            CacheError::Busy => Self {
                retry_after: Some("1".to_owned()),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TOOMANYREQUESTS",
                    "too many upstream fills in progress",
                )
            },
            CacheError::Store(_) | CacheError::FillAborted | CacheError::Shared(_) => Self {
                internal: Some(cause.to_string()),
                ..Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "internal error",
                )
            },
        }
    }

    fn from_upstream(
        err: &UpstreamError,
        unknown_code: &'static str,
        cause: &dyn std::fmt::Display,
    ) -> Self {
        match err {
            UpstreamError::NotFound { upstream } => Self::upstream(
                StatusCode::NOT_FOUND,
                unknown_code,
                format!("not found on upstream {upstream}"),
                cause,
            ),
            UpstreamError::Denied { upstream, .. } => Self::upstream(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                format!(
                    "upstream {upstream} denied access; check the credentials configured for it"
                ),
                cause,
            ),
            UpstreamError::TooManyRequests {
                upstream,
                retry_after,
            } => Self {
                retry_after: retry_after.clone(),
                ..Self::upstream(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    format!("upstream {upstream} is rate-limiting"),
                    cause,
                )
            },
            UpstreamError::CircuitOpen { upstream, retry_in } => Self {
                // Rounded up: a client honouring it must not come back while still open.
                retry_after: Some(
                    (retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0))
                        .max(1)
                        .to_string(),
                ),
                ..Self::upstream(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    format!("upstream {upstream} is marked down after repeated failures"),
                    cause,
                )
            },
            UpstreamError::Offline { upstream } => Self::upstream(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("upstream {upstream} is offline"),
                cause,
            ),
            UpstreamError::Unreachable { upstream, source } if source.is_timeout() => {
                Self::upstream(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UNAVAILABLE",
                    format!("upstream {upstream} timed out"),
                    cause,
                )
            }
            UpstreamError::Unreachable { upstream, .. }
            | UpstreamError::Status { upstream, .. }
            | UpstreamError::Token { upstream, .. } => Self::upstream(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                format!("upstream {upstream} is unavailable"),
                cause,
            ),
            UpstreamError::TooLarge { upstream, limit } => Self::upstream(
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                format!("upstream {upstream} sent more than {limit} bytes"),
                cause,
            ),
        }
    }

    /// The response: OCI JSON body, `Retry-After` when known.
    pub(crate) fn into_response(self, head_only: bool) -> http::Response<Body> {
        let entry = ErrorEntry {
            code: self.code,
            message: &self.message,
        };
        let json = serde_json::to_vec(&ErrorBody { errors: [entry] }).unwrap_or_default();
        let len = json.len();
        let mut response = http::Response::new(if head_only {
            body::empty()
        } else {
            body::full(json)
        });
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Some(retry_after) = self
            .retry_after
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(http::header::RETRY_AFTER, retry_after);
        }
        response
    }
}
