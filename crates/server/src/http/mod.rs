//! The HTTP layer: routes a request, calls the cache, builds the response, logs one line and
//! records metrics.
//!
//! Only `server` and `http` name hyper types. Handlers are thin; [`error::ApiError`] is the one
//! place where domain errors become statuses.

mod auth;
mod body;
mod client_login;
mod error;
mod front_door;
pub(crate) mod handlers;
mod history;
pub(crate) mod route;
mod status;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument as _;

pub(crate) use body::Body;
pub(crate) use front_door::front_door;
pub use handlers::AppState;

use regcache_cache::CachePhase;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Everything.
    Main,
    /// `/metrics`, `/healthz`, `/readyz` only.
    Admin,
}

/// The `429 TOOMANYREQUESTS` answer of the per-client rate limit, with `Retry-After`.
pub(crate) fn too_many_requests(
    head_only: bool,
    wait: std::time::Duration,
) -> http::Response<Body> {
    let mut err = error::ApiError::new(
        http::StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "too many requests from this address",
    );
    // Rounded up, at least one second: a client honouring it is then within its rate.
    err.retry_after = Some(
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            .max(1)
            .to_string(),
    );
    err.into_response(head_only)
}

/// Handles one request: a span with a request id that its upstream calls inherit, one log
/// line, metrics, and the status board.
pub(crate) async fn serve(
    state: Arc<AppState>,
    listener: Listener,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let request_id = format!(
        "{:x}",
        state.next_request_id.fetch_add(1, Ordering::Relaxed)
    );
    let span = tracing::info_span!("request", id = %request_id);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = route::parse(&path);
    let kind = route.kind();
    let reference = match &route {
        route::Route::Manifest { reference, .. } => Some((*reference).to_owned()),
        _ => None,
    };
    let outcome = if listener == Listener::Admin && !route.is_admin() {
        let err = error::ApiError::not_found();
        handlers::Outcome {
            response: err.into_response(method == http::Method::HEAD),
            phase: None,
            error: None,
            target: None,
        }
    } else {
        handlers::handle(&state, route, &request)
            .instrument(span.clone())
            .await
    };
    let mut response = outcome.response;
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    // The declared length, or the exact size of an in-memory body (status page, metrics).
    let bytes = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(response.body()).exact())
        .unwrap_or(0);
    let elapsed = started.elapsed();
    let metrics = &state.metrics;
    let status_class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics
        .http_requests
        .with_label_values(&[kind, method.as_str(), status_class])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[kind])
        .observe(elapsed.as_secs_f64());
    // Content that could not be served (not cached and the upstream offline, unknown, or
    // failing: 404 or 5xx) is a miss too, so that the hit ratio counts every answer.
    let unserved = (status == 404 || status >= 500).then_some(CachePhase::Miss);
    if matches!(kind, "manifest" | "blob") {
        if let Some(phase) = outcome.phase.or(unserved) {
            metrics
                .cache_results
                .with_label_values(&[kind, phase.as_str()])
                .inc();
        }
        if let Some(phase) = outcome.phase {
            let source = match phase {
                CachePhase::Miss | CachePhase::Coalesced => "upstream",
                _ => "cache",
            };
            let counter = metrics.served_bytes.with_label_values(&[source]);
            response = response.map(|body| body::counted(body, counter));
        }
    }
    if let Some((upstream, repo)) = &outcome.target {
        if method == http::Method::GET && status < 400 {
            state.board.record_bytes(upstream, repo, bytes);
        }
        if let Some(reference) = &reference {
            state
                .board
                .record_pull(upstream, repo, reference, status, outcome.phase);
        }
    }
    let cache = outcome.phase.map_or("-", CachePhase::as_str);
    let elapsed_ms = regcache_metrics::log_millis(elapsed);
    span.in_scope(|| match &outcome.error {
        Some((error::Origin::Internal, cause)) => {
            tracing::error!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        Some((error::Origin::Upstream | error::Origin::Overload, cause)) => {
            tracing::warn!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        Some((error::Origin::Client, cause)) => {
            tracing::info!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        None => tracing::info!(%method, %path, status, bytes, cache, elapsed_ms, "request"),
    });
    Ok(response)
}
