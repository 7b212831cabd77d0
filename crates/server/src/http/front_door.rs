//! The front door: a tower layer ([`FrontDoor`]) that every request on the main listener
//! passes before routing when `[auth]` is configured, the token endpoint (`/auth/token`), and
//! the per-repository membership check the blob and manifest handlers call.
//!
//! A refusal is answered here with the OCI error body (`UNAUTHORIZED` 401 with a challenge when
//! no or bad credentials were given, `DENIED` 403 when the user is known but not granted) and
//! never reaches a handler, the cache or an upstream. Handlers never check a password.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::auth::{Authenticator, Identity, TOKEN_PATH};
use super::error::ApiError;
use super::route::{self, Route};
use super::{AppState, Body, Listener};
use regcache_cache::{DigestKind, Target};
use regcache_oci::Digest;

/// With authentication on, refuses (as unknown, like a registry does) a digest that does not
/// belong to the repository it is asked under, so a grant for one repository cannot read
/// another's content by digest. A digest belongs to a repository only when the upstream served
/// or confirmed it there (`cache/grant.rs`), never because a manifest of the repository names
/// it; so the blob route serves a manifest's bytes only under a repository the upstream
/// confirmed it for. Without `[auth]` every client may read everything anyway.
///
/// # Errors
/// `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN` 404, or the upstream's failure to answer.
pub(crate) async fn check_membership(
    state: &AppState,
    target: &Target,
    digest: &Digest,
    kind: DigestKind,
) -> Result<(), ApiError> {
    if state.auth.is_none() {
        return Ok(());
    }
    let code = match kind {
        DigestKind::Blob => "BLOB_UNKNOWN",
        DigestKind::Manifest => "MANIFEST_UNKNOWN",
    };
    let belongs = state
        .cache
        .belongs_to(target, digest, kind)
        .await
        .map_err(|err| ApiError::from_cache(&err, code))?;
    if belongs {
        return Ok(());
    }
    let mut err = ApiError::new(StatusCode::NOT_FOUND, code, "unknown to this repository");
    err.internal = Some(format!("{digest} does not belong to {}", target.repo));
    Err(err)
}

/// The tower layer in front of routing.
#[derive(Debug, Clone)]
pub(crate) struct FrontDoor {
    state: Arc<AppState>,
    listener: Listener,
    tls: bool,
}

/// Builds the layer for one listener; `tls` says which scheme derived realms get.
pub(crate) fn front_door(state: Arc<AppState>, listener: Listener, tls: bool) -> FrontDoor {
    FrontDoor {
        state,
        listener,
        tls,
    }
}

impl<S> tower::Layer<S> for FrontDoor {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            door: self.clone(),
        }
    }
}

/// A service behind the front door.
#[derive(Debug, Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    door: FrontDoor,
}

/// What the front door decided.
enum Verdict {
    /// Let the request through.
    Pass,
    /// Answer here.
    Answer(Response<Body>),
}

impl<S, B> tower::Service<Request<B>> for Guarded<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let door = self.door.clone();
        Box::pin(async move {
            // Checked on the head alone: the body stays untouched (and need not be `Sync`).
            let (mut head, body) = request.into_parts();
            match door.check(&mut head).await {
                Verdict::Pass => inner.call(Request::from_parts(head, body)).await,
                Verdict::Answer(response) => Ok(response),
            }
        })
    }
}

impl FrontDoor {
    /// Decides on `request`; a request let through carries the caller's [`Identity`] in its
    /// extensions (the status page shows only what that identity may pull).
    async fn check(&self, request: &mut Parts) -> Verdict {
        let Some(auth) = &self.state.auth else {
            return Verdict::Pass;
        };
        if self.listener == Listener::Admin {
            // The metrics listener serves only metrics and probes, on a private address.
            return Verdict::Pass;
        }
        let path = request.uri.path();
        if path == TOKEN_PATH {
            return Verdict::Answer(self.token_endpoint(auth, request).await);
        }
        let route = route::parse(path);
        if matches!(route, Route::Health | Route::Ready) {
            // Probes carry no credentials and reveal nothing.
            return Verdict::Pass;
        }
        if matches!(route, Route::Blob { .. }) {
            // A peer replica asking the owner of a blob: admitted by the cluster secret alone
            // (its client was admitted by that replica's front door).
            let cluster = self.state.cache.cluster();
            if cluster
                .is_some_and(|c| c.authenticates_peers() && c.is_peer_request(&request.headers))
            {
                return Verdict::Pass;
            }
        }
        let identity = match auth.authenticate(&request.headers).await {
            Ok(identity) => identity,
            Err(reason) => {
                return self.refuse(
                    request,
                    auth,
                    StatusCode::UNAUTHORIZED,
                    &format!("invalid credentials ({reason:?})"),
                    None,
                )
            }
        };
        request
            .extensions
            .insert(identity.clone().unwrap_or(Identity::Anonymous));
        match route {
            Route::Health | Route::Ready => Verdict::Pass,
            // The status page and metrics name repositories: any known user, nobody else.
            Route::Status | Route::Metrics => match identity {
                Some(Identity::User(_)) => Verdict::Pass,
                _ => self.refuse(request, auth, StatusCode::UNAUTHORIZED, "sign in", None),
            },
            // The version check: any valid credential, an anonymous token included. Without
            // one, the challenge starts the token flow.
            Route::Base => match identity {
                Some(_) => Verdict::Pass,
                None => self.refuse(
                    request,
                    auth,
                    StatusCode::UNAUTHORIZED,
                    "authentication required",
                    None,
                ),
            },
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => {
                let ns = request
                    .uri
                    .query()
                    .and_then(|q| super::handlers::query_param(q, "ns"));
                // An unknown registry or a bad name is refused by the handler, before any
                // upstream is contacted.
                let Ok(resolved) = self.state.resolver.resolve(ns.as_deref(), name) else {
                    return Verdict::Pass;
                };
                let upstream = self.state.cache.upstreams()[resolved.upstream].name();
                let identity = identity.unwrap_or(Identity::Anonymous);
                if auth.may_pull(&identity, upstream, resolved.repo.as_str()) {
                    return Verdict::Pass;
                }
                match identity {
                    Identity::Anonymous => self.refuse(
                        request,
                        auth,
                        StatusCode::UNAUTHORIZED,
                        "authentication required",
                        Some(name),
                    ),
                    Identity::User(_) => self.refuse(
                        request,
                        auth,
                        StatusCode::FORBIDDEN,
                        "access to this repository is not granted",
                        Some(name),
                    ),
                }
            }
            // Refused by the handlers anyway (read-only cache), whoever asks.
            Route::Upload | Route::Catalog | Route::NotFound => Verdict::Pass,
        }
    }

    /// `GET /auth/token`: a token for the Basic credentials given, or an anonymous one. A
    /// bearer token is exchanged too (clients refresh that way), for one that expires no later.
    async fn token_endpoint(&self, auth: &Authenticator, request: &Parts) -> Response<Body> {
        if request.method != Method::GET {
            let err = ApiError::unsupported("the token endpoint answers GET");
            return err.into_response(request.method == Method::HEAD);
        }
        let (identity, not_after) = match auth.authenticate_until(&request.headers).await {
            Ok(Some(found)) => found,
            Ok(None) => (Identity::Anonymous, None),
            Err(_) => {
                let mut response = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "invalid credentials",
                )
                .into_response(false);
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"regcache\""),
                );
                self.log_refusal(request, StatusCode::UNAUTHORIZED, "invalid credentials");
                return response;
            }
        };
        let Some((token, expires_in)) = auth.issue(&identity, not_after) else {
            let err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "tokens cannot be issued; use Basic credentials",
            );
            return err.into_response(false);
        };
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
        .to_string();
        let mut response = Response::new(super::body::full(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// A 401 (with a challenge) or 403 in the OCI error form.
    fn refuse(
        &self,
        request: &Parts,
        auth: &Authenticator,
        status: StatusCode,
        message: &str,
        repository: Option<&str>,
    ) -> Verdict {
        let code = if status == StatusCode::FORBIDDEN {
            "DENIED"
        } else {
            "UNAUTHORIZED"
        };
        let external = if status == StatusCode::FORBIDDEN {
            message
        } else {
            "authentication required"
        };
        let mut response =
            ApiError::new(status, code, external).into_response(request.method == Method::HEAD);
        let headers = response.headers_mut();
        headers.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        if status == StatusCode::UNAUTHORIZED {
            let route = route::parse(request.uri.path());
            let challenge = if matches!(route, Route::Status | Route::Metrics) {
                // Browsers and Prometheus speak Basic, not the token flow.
                "Basic realm=\"regcache\"".to_owned()
            } else {
                let mut challenge = format!(
                    "Bearer realm=\"{}\",service=\"{}\"",
                    auth.realm(request, self.tls),
                    auth.service()
                );
                if let Some(repository) = repository {
                    challenge.push_str(&format!(",scope=\"repository:{repository}:pull\""));
                }
                challenge
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        self.log_refusal(request, status, message);
        Verdict::Answer(response)
    }

    fn log_refusal(&self, request: &Parts, status: StatusCode, reason: &str) {
        let kind = route::parse(request.uri.path()).kind();
        self.state
            .metrics
            .http_requests
            .with_label_values(&[kind, request.method.as_str(), "4xx"])
            .inc();
        tracing::info!(
            method = %request.method,
            path = %request.uri.path(),
            status = status.as_u16(),
            reason,
            "request refused"
        );
    }
}
