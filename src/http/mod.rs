//! The HTTP layer: routes a request, calls the cache, builds the response, logs one line.
//!
//! Only `server` and `http` name hyper types. Handlers are thin; [`error::ApiError`] is the one
//! place where domain errors become statuses.

mod body;
mod error;
mod handlers;
pub(crate) mod route;

use std::sync::Arc;
use std::time::Instant;

pub(crate) use body::Body;
pub(crate) use handlers::AppState;

/// Handles one request, logging one line for it.
pub(crate) async fn serve(
    state: Arc<AppState>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let outcome = handlers::handle(&state, &request).await;
    let response = outcome.response;
    let status = response.status().as_u16();
    let bytes = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cache = outcome.phase.map_or("-", |p| p.as_str());
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match &outcome.error {
        Some((error::Origin::Internal, cause)) => {
            tracing::error!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        Some((error::Origin::Upstream, cause)) => {
            tracing::warn!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        Some((error::Origin::Client, cause)) => {
            tracing::info!(%method, %path, status, bytes, cache, elapsed_ms, error = %cause, "request")
        }
        None => tracing::info!(%method, %path, status, bytes, cache, elapsed_ms, "request"),
    }
    Ok(response)
}
