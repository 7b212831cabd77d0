//! The HTTP edge of regcache: listeners, TLS, the tower stack (activity, rate limit, front
//! door), routing of `/v2/...` paths, thin handlers and the one mapping from domain errors to
//! OCI JSON error responses.
//!
//! This is the only crate that names hyper request and response types. It calls the cache
//! (`regcache-cache`) and never the store or an upstream directly.

#![warn(clippy::unwrap_used)]

mod http;
mod server;

pub use http::{AppState, Listener};
pub use server::{accept_loop, reload_on_sighup, ListenerOptions, RateLimit, Tls, TlsError};

/// The route kind of a request path, as the router sees it (for the criterion benchmarks).
#[doc(hidden)]
pub fn route_kind(path: &str) -> &'static str {
    http::route::parse(path).kind()
}

/// Entry points of the server's parsers for the fuzz targets (`regcache::fuzzing`); not a
/// stable API.
#[doc(hidden)]
pub mod fuzz {
    /// Splits a request path as the router does.
    pub fn route(path: &str) {
        let parsed = crate::http::route::parse(path);
        let _ = (parsed.kind(), parsed.is_admin());
    }

    /// Parses a `Range` header value as the blob handler does.
    pub fn parse_range(value: &str) -> regcache_cache::RangeRequest {
        crate::http::handlers::parse_range(value)
    }
}
