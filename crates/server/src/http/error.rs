//! [`ApiError`]: the only place where domain errors become HTTP statuses and OCI error codes.
//! What an error is (whose fault, what kind of answer) is decided by its `class()` where it is
//! made; this module only maps the answer kind to a status, a code and a message.
//!
//! The client gets the external message in the OCI JSON error form; the internal cause is kept
//! for the request log line.

use http::{HeaderValue, StatusCode};
use serde::Serialize;

use super::body::{self, Body};
use regcache_cache::routing::ResolveError;
pub(crate) use regcache_cache::Origin;
use regcache_cache::{Answer, CacheError};
use regcache_oci::ParseError;

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

    /// Maps a cache error by its [`CacheError::class`]; `unknown_code` is `MANIFEST_UNKNOWN`
    /// or `BLOB_UNKNOWN`.
    pub(crate) fn from_cache(err: &CacheError, unknown_code: &'static str) -> Self {
        let class = err.class();
        let upstream = err.upstream().unwrap_or("(none)");
        let (status, code, message) = match (class.answer, err.root()) {
            (_, CacheError::AccessRefused { status, .. }) if *status == StatusCode::FORBIDDEN => (
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("upstream {upstream} denies this client access to the repository"),
            ),
            (_, CacheError::AccessRefused { .. }) => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                format!(
                    "upstream {upstream} refused this client's credentials for the repository; \
                     log in to regcache with credentials the upstream accepts"
                ),
            ),
            (_, CacheError::PolicyRefused { image, refusal }) => (
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("signature policy: {} ({image})", refusal.text()),
            ),
            (_, CacheError::AccessUnconfirmed { .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!(
                    "upstream {upstream} cannot be asked whether this client may read the \
                     repository (credentials = \"client\"), and it did not confirm it within \
                     client_auth_offline_grace"
                ),
            ),
            (answer, root) => match answer {
            Answer::Unknown if matches!(root, CacheError::NotCachedOffline { .. }) => (
                StatusCode::NOT_FOUND,
                unknown_code,
                format!("not cached, and upstream {upstream} is offline"),
            ),
            Answer::Unknown => (
                StatusCode::NOT_FOUND,
                unknown_code,
                format!("not found on upstream {upstream}"),
            ),
            Answer::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                format!(
                    "upstream {upstream} denied access; check the credentials configured for it"
                ),
            ),
            Answer::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                format!("upstream {upstream} is rate-limiting"),
            ),
            Answer::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                format!("upstream {upstream} is unavailable"),
            ),
            Answer::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                format!("upstream {upstream} timed out"),
            ),
            Answer::Paused => (
                StatusCode::SERVICE_UNAVAILABLE,
                "TOOMANYREQUESTS",
                format!(
                    "upstream {upstream} is rate-limiting regcache; not asked again until Retry-After"
                ),
            ),
            Answer::MarkedDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("upstream {upstream} is marked down after repeated failures"),
            ),
            Answer::Offline => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("upstream {upstream} is offline"),
            ),
            Answer::BadContent => (
                StatusCode::BAD_GATEWAY,
                "DIGEST_INVALID",
                "the upstream sent content that does not match its digest".to_owned(),
            ),
            Answer::TooLarge => (
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                format!("upstream {upstream} sent more than regcache accepts"),
            ),
            Answer::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "TOOMANYREQUESTS",
                "too many upstream fills in progress".to_owned(),
            ),
            Answer::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!(
                    "object store {} is unavailable",
                    err.object_store().unwrap_or("(unknown)")
                ),
            ),
            Answer::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error".to_owned(),
            ),
            },
        };
        Self {
            status,
            code,
            message,
            internal: Some(err.to_string()),
            origin: class.origin,
            retry_after: err.retry_after(),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use regcache_upstream::UpstreamError;

    #[track_caller]
    fn check(err: CacheError, status: u16, code: &str, origin: Origin, retry_after: Option<&str>) {
        let api = ApiError::from_cache(&err, "MANIFEST_UNKNOWN");
        assert_eq!(
            (
                api.status.as_u16(),
                api.code,
                api.origin,
                api.retry_after.as_deref()
            ),
            (status, code, origin, retry_after),
            "{err}"
        );
    }

    fn upstream(err: UpstreamError) -> CacheError {
        CacheError::Shared(Arc::new(CacheError::Upstream(Arc::new(err))))
    }

    #[test]
    fn each_answer_kind_maps_to_one_status_and_code() {
        let name = || "up.test".to_owned();
        check(
            upstream(UpstreamError::NotFound { upstream: name() }),
            404,
            "MANIFEST_UNKNOWN",
            Origin::Client,
            None,
        );
        check(
            upstream(UpstreamError::TooManyRequests {
                upstream: name(),
                retry_after: Some("7".to_owned()),
            }),
            429,
            "TOOMANYREQUESTS",
            Origin::Upstream,
            Some("7"),
        );
        check(
            upstream(UpstreamError::Paused {
                upstream: name(),
                retry_in: Duration::from_millis(29_100),
            }),
            503,
            "TOOMANYREQUESTS",
            Origin::Upstream,
            Some("30"),
        );
        check(
            upstream(UpstreamError::CircuitOpen {
                upstream: name(),
                retry_in: Duration::from_millis(200),
            }),
            503,
            "UNAVAILABLE",
            Origin::Upstream,
            Some("1"),
        );
        check(
            upstream(UpstreamError::Status {
                upstream: name(),
                status: StatusCode::INTERNAL_SERVER_ERROR,
            }),
            502,
            "UNAVAILABLE",
            Origin::Upstream,
            None,
        );
        check(
            CacheError::Busy,
            503,
            "TOOMANYREQUESTS",
            Origin::Overload,
            Some("1"),
        );
        check(
            CacheError::FillAborted,
            500,
            "UNKNOWN",
            Origin::Internal,
            None,
        );
        check(
            CacheError::NotCachedOffline { upstream: name() },
            404,
            "MANIFEST_UNKNOWN",
            Origin::Client,
            None,
        );
        let marked_down = ApiError::from_cache(
            &upstream(UpstreamError::CircuitOpen {
                upstream: name(),
                retry_in: Duration::from_secs(3),
            }),
            "BLOB_UNKNOWN",
        );
        assert!(
            marked_down.message.contains("up.test"),
            "{}",
            marked_down.message
        );
    }
}
