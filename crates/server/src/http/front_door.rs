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

use super::auth::{Authenticator, BadCredentials, Identity, TOKEN_PATH};
use super::client_login::{ClientLogins, Session};
use super::error::ApiError;
use super::route::{self, Route};
use super::{AppState, Body, Listener};
use regcache_cache::caller::{self, ClientCredentials};
use regcache_cache::{AccessProbe, CacheError, DigestKind, Target};
use regcache_oci::{Digest, Reference};

/// With authentication on, refuses (as unknown, like a registry does) a digest that does not
/// belong to the repository it is asked under, so a grant for one repository cannot read
/// another's content by digest. A digest belongs to a repository only when the upstream served
/// or confirmed it there (`cache/grant.rs`), never because a manifest of the repository names
/// it; so the blob route serves a manifest's bytes only under a repository the upstream
/// confirmed it for. The same for an upstream with `credentials = "client"`, whose clients
/// may read different repositories. Otherwise every client may read everything anyway.
///
/// # Errors
/// `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN` 404, or the upstream's failure to answer.
pub(crate) async fn check_membership(
    state: &AppState,
    target: &Target,
    digest: &Digest,
    kind: DigestKind,
) -> Result<(), ApiError> {
    if state.auth.is_none() && !state.cache.upstreams()[target.upstream].client_mode() {
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
    /// Whether an upstream has `credentials = "client"` (decided once, from the config).
    client_mode: bool,
}

/// Builds the layer for one listener; `tls` says which scheme derived realms get.
pub(crate) fn front_door(state: Arc<AppState>, listener: Listener, tls: bool) -> FrontDoor {
    let client_mode = state.cache.upstreams().iter().any(|u| u.client_mode());
    FrontDoor {
        state,
        listener,
        tls,
        client_mode,
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

/// A request let through to a `credentials = "client"` upstream.
struct ClientPass {
    /// On whose behalf it runs (`None`: anonymous).
    caller: Option<Arc<ClientCredentials>>,
    /// What a 401 answer gets: where to log in.
    challenge: Option<HeaderValue>,
}

/// What the front door decided.
enum Verdict {
    /// Let the request through; `Some` when it is for a `credentials = "client"` upstream.
    Pass(Option<ClientPass>),
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
                Verdict::Pass(None) => inner.call(Request::from_parts(head, body)).await,
                Verdict::Pass(Some(ClientPass { caller, challenge })) => {
                    let mut response =
                        caller::as_caller(caller, inner.call(Request::from_parts(head, body)))
                            .await?;
                    // A client of a `credentials = "client"` upstream told 401 (by the upstream,
                    // through the cache) is told where to log in.
                    if let Some(challenge) = challenge {
                        if response.status() == StatusCode::UNAUTHORIZED
                            && !response.headers().contains_key(header::WWW_AUTHENTICATE)
                        {
                            response
                                .headers_mut()
                                .insert(header::WWW_AUTHENTICATE, challenge);
                        }
                    }
                    Ok(response)
                }
                Verdict::Answer(response) => Ok(response),
            }
        })
    }
}

/// Who sent a request: the identity `[auth]` knows (`None`: no credentials at all), and the
/// credentials a `credentials = "client"` upstream is asked with.
type Caller = (Option<Identity>, Option<Arc<ClientCredentials>>);

impl FrontDoor {
    /// Decides on `request`; a request let through carries the caller's [`Identity`] in its
    /// extensions (the status page shows only what that identity may pull).
    async fn check(&self, request: &mut Parts) -> Verdict {
        let auth = self.state.auth.as_ref();
        let logins = self.state.client_logins.as_ref();
        if self.listener == Listener::Admin || (auth.is_none() && !self.client_mode) {
            // The metrics listener serves only metrics and probes, on a private address.
            return Verdict::Pass(None);
        }
        let path = request.uri.path();
        if path == TOKEN_PATH {
            let response = match (logins, auth) {
                (Some(logins), _) => self.client_token_endpoint(logins, auth, request).await,
                (None, Some(auth)) => self.token_endpoint(auth, request).await,
                (None, None) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "tokens cannot be issued",
                )
                .into_response(false),
            };
            return Verdict::Answer(response);
        }
        let route = route::parse(path);
        if matches!(route, Route::Health | Route::Ready) {
            // Probes carry no credentials and reveal nothing.
            return Verdict::Pass(None);
        }
        if matches!(route, Route::Blob { .. }) {
            // A peer replica asking the owner of a blob: admitted by the cluster secret alone
            // (its client was admitted by that replica's front door).
            let cluster = self.state.cache.cluster();
            if cluster
                .is_some_and(|c| c.authenticates_peers() && c.is_peer_request(&request.headers))
            {
                return Verdict::Pass(None);
            }
        }
        let (identity, caller) = match self.identify(auth, logins, &request.headers).await {
            Ok(found) => found,
            Err(reason) => {
                return self.refuse(
                    request,
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
            Route::Health | Route::Ready => Verdict::Pass(None),
            // The status page and metrics name repositories: with `[auth]`, any known user,
            // nobody else.
            Route::Status | Route::Metrics => match (auth, identity) {
                (None, _) | (Some(_), Some(Identity::User(_))) => Verdict::Pass(None),
                _ => self.refuse(request, StatusCode::UNAUTHORIZED, "sign in", None),
            },
            // The version check: any valid credential, an anonymous token included. Without
            // one, the challenge starts the token flow.
            Route::Base => match identity {
                Some(_) => Verdict::Pass(None),
                None => self.refuse(
                    request,
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
                let Ok(target) = self.state.resolver.resolve(ns.as_deref(), name) else {
                    return Verdict::Pass(None);
                };
                let target = Target::from(target);
                let upstream = &self.state.cache.upstreams()[target.upstream];
                let identity = identity.unwrap_or(Identity::Anonymous);
                if let Some(auth) = auth {
                    if !auth.may_pull(&identity, upstream.name(), target.repo.as_str()) {
                        return match identity {
                            Identity::Anonymous => self.refuse(
                                request,
                                StatusCode::UNAUTHORIZED,
                                "authentication required",
                                Some(name),
                            ),
                            Identity::User(_) => self.refuse(
                                request,
                                StatusCode::FORBIDDEN,
                                "access to this repository is not granted",
                                Some(name),
                            ),
                        };
                    }
                }
                if !upstream.client_mode() {
                    return Verdict::Pass(None);
                }
                // The upstream decides what this client reads (`cache/access.rs`), asked about
                // what the request names. A malformed reference or digest goes no further than
                // the handler, which refuses it before any upstream is contacted.
                let blob_digest;
                let probe = match route {
                    Route::Manifest { reference, .. } => {
                        if Reference::parse(reference).is_err() {
                            return Verdict::Pass(None);
                        }
                        AccessProbe::Manifest(reference)
                    }
                    Route::Blob { digest, .. } => {
                        let Ok(digest) = Digest::parse(digest) else {
                            return Verdict::Pass(None);
                        };
                        blob_digest = digest;
                        AccessProbe::Blob(&blob_digest)
                    }
                    _ => AccessProbe::Repository,
                };
                let checked = caller::as_caller(
                    caller.clone(),
                    self.state.cache.check_access(&target, probe),
                )
                .await;
                match checked {
                    Ok(()) => Verdict::Pass(Some(ClientPass {
                        caller,
                        challenge: HeaderValue::from_str(
                            &self.bearer_challenge(request, Some(name)),
                        )
                        .ok(),
                    })),
                    Err(err) => self.refuse_access(request, &err, &route, name),
                }
            }
            // Refused by the handlers anyway (read-only cache), whoever asks.
            Route::Upload | Route::Catalog | Route::NotFound => Verdict::Pass(None),
        }
    }

    /// Who sent `headers` (see [`Caller`]).
    async fn identify(
        &self,
        auth: Option<&Authenticator>,
        logins: Option<&ClientLogins>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, BadCredentials> {
        if let Some(logins) = logins {
            if let Some(session) = logins.session(headers).await {
                return Ok((Some(session.identity.clone()), session.caller.clone()));
            }
            if auth.is_none() && ClientLogins::has_bearer(headers) {
                // Expired, or from before a restart: the challenge gets a new one.
                return Err(BadCredentials::Token);
            }
        }
        let caller = match logins {
            Some(logins) => logins.basic_caller(headers)?,
            None => None,
        };
        let identity = match (auth, &caller) {
            (Some(auth), _) => auth.authenticate(headers).await?,
            (None, Some(caller)) => Some(Identity::User(caller.user().to_owned())),
            (None, None) if headers.contains_key(header::AUTHORIZATION) => {
                return Err(BadCredentials::Malformed)
            }
            (None, None) => None,
        };
        Ok((identity, caller))
    }

    /// The upstream's refusal of this client (or its silence), as the client's answer.
    fn refuse_access(
        &self,
        request: &Parts,
        err: &CacheError,
        route: &Route<'_>,
        name: &str,
    ) -> Verdict {
        let code = match route {
            Route::Blob { .. } => "BLOB_UNKNOWN",
            Route::Manifest { .. } => "MANIFEST_UNKNOWN",
            _ => "NAME_UNKNOWN",
        };
        let api = ApiError::from_cache(err, code);
        let status = api.status;
        let message = api.message.clone();
        let mut response = api.into_response(request.method == Method::HEAD);
        if status == StatusCode::UNAUTHORIZED {
            if let Ok(value) = HeaderValue::from_str(&self.bearer_challenge(request, Some(name))) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        self.log_refusal(request, status, &message);
        Verdict::Answer(response)
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
            Err(_) => return self.bad_credentials(request, "invalid credentials"),
        };
        token_response(auth.issue(&identity, not_after))
    }

    /// The token endpoint's 401 for credentials it does not take; `reason` is logged.
    fn bad_credentials(&self, request: &Parts, reason: &str) -> Response<Body> {
        self.log_refusal(request, StatusCode::UNAUTHORIZED, reason);
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
        response
    }

    /// `GET /auth/token` when an upstream has `credentials = "client"`: a token whose session
    /// holds the Basic credentials given (checked first against `[auth]` when it is on), or an
    /// anonymous one. Credentials are tried on the upstream's login before a token is handed
    /// out (that of the repositories named in `scope`, or the default upstream's for `docker
    /// login`): a refusal is a 401 here, so a wrong password fails the login.
    async fn client_token_endpoint(
        &self,
        logins: &ClientLogins,
        auth: Option<&Authenticator>,
        request: &Parts,
    ) -> Response<Body> {
        if request.method != Method::GET {
            let err = ApiError::unsupported("the token endpoint answers GET");
            return err.into_response(request.method == Method::HEAD);
        }
        // A token presented to refresh: the same session under a new token.
        let (identity, caller) = match logins.session(&request.headers).await {
            Some(session) => (session.identity.clone(), session.caller.clone()),
            None => match self.identify(auth, Some(logins), &request.headers).await {
                Ok((identity, caller)) => (identity.unwrap_or(Identity::Anonymous), caller),
                Err(_) => return self.bad_credentials(request, "invalid credentials"),
            },
        };
        if let Some(caller) = &caller {
            if let Err(reason) = self.try_upstream(caller, request).await {
                return self.bad_credentials(request, &reason);
            }
        }
        token_response(logins.issue(Session { identity, caller }).await)
    }

    /// Whether the upstreams in question accept `caller`'s login: those of the repositories
    /// named in `scope`, or the default upstream (`docker login`); `Err` says which refused,
    /// for the log. What each repository allows is the requests' business
    /// (`Cache::check_access`); an upstream that cannot be asked does not refuse here.
    async fn try_upstream(
        &self,
        caller: &Arc<ClientCredentials>,
        request: &Parts,
    ) -> Result<(), String> {
        let cache = &self.state.cache;
        let query = request.uri.query().unwrap_or("");
        let mut names: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == "scope")
            .flat_map(|(_, value)| {
                value
                    .split(' ')
                    .filter_map(|scope| scope.strip_prefix("repository:"))
                    .filter_map(|rest| rest.rsplit_once(':').map(|(name, _)| name.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if names.is_empty() {
            // Any name of the default upstream.
            names.push("library/login".to_owned());
        }
        let mut upstreams: Vec<Target> = names
            .iter()
            .filter_map(|name| self.state.resolver.resolve(None, name).ok())
            .map(Target::from)
            .collect();
        upstreams.sort_by_key(|target| target.upstream);
        upstreams.dedup_by_key(|target| target.upstream);
        caller::as_caller(Some(Arc::clone(caller)), async {
            for target in &upstreams {
                if let Err(err @ CacheError::AccessRefused { .. }) = cache.check_login(target).await
                {
                    return Err(err.to_string());
                }
            }
            Ok(())
        })
        .await
    }

    /// A 401 (with a challenge) or 403 in the OCI error form.
    fn refuse(
        &self,
        request: &Parts,
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
                self.bearer_challenge(request, repository)
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        self.log_refusal(request, status, message);
        Verdict::Answer(response)
    }

    /// `Bearer realm=…,service=…[,scope=repository:<name>:pull]`: where the token flow starts.
    fn bearer_challenge(&self, request: &Parts, repository: Option<&str>) -> String {
        let (realm, service) = match (&self.state.auth, &self.state.client_logins) {
            (Some(auth), _) => (auth.realm(request, self.tls), auth.service()),
            (None, Some(logins)) => (
                super::auth::realm(logins.realm.as_deref(), request, self.tls),
                logins.service.as_str(),
            ),
            (None, None) => (super::auth::realm(None, request, self.tls), "regcache"),
        };
        let mut challenge = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
        if let Some(repository) = repository {
            challenge.push_str(&format!(",scope=\"repository:{repository}:pull\""));
        }
        challenge
    }

    fn log_refusal(&self, request: &Parts, status: StatusCode, reason: &str) {
        let kind = route::parse(request.uri.path()).kind();
        let class = if status.is_server_error() {
            "5xx"
        } else {
            "4xx"
        };
        self.state
            .metrics
            .http_requests
            .with_label_values(&[kind, request.method.as_str(), class])
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

/// The token endpoint's answer (Docker uses `token`, OAuth2 `access_token`) for a token and
/// its lifetime in seconds; `None`: none could be made (the system RNG failed).
fn token_response(issued: Option<(String, u64)>) -> Response<Body> {
    let Some((token, expires_in)) = issued else {
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
