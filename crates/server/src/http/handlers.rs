//! Handlers: match the route, parse names at the edge, call the cache, build the response.
//! They may not touch `store` or `upstream`.

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::body::{self, Body};
use super::error::{ApiError, Origin};
use super::front_door as auth;
use super::route::Route;
use super::status::{self, StatusBoard};
use regcache_cache::routing::Resolver;
use regcache_cache::{
    Asker, BlobAnswer, BlobReply, Cache, CachePhase, DigestKind, ManifestAnswer, RangeRequest,
    Target,
};
use regcache_config::{AuthConfig, ServerConfig, StorageConfig};
use regcache_metrics::Metrics;
use regcache_oci::{Digest, Reference};

/// Everything a request needs.
#[derive(Debug)]
pub struct AppState {
    pub(crate) cache: Arc<Cache>,
    pub(crate) resolver: Resolver,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) board: StatusBoard,
    /// The status page's charts: a sample a minute.
    pub(crate) history: super::history::History,
    /// Request ids: unique per process, short, ordered.
    pub(crate) next_request_id: std::sync::atomic::AtomicU64,
    status_page: bool,
    budget: Option<u64>,
    /// Client authentication and grants (`None`: off).
    pub(crate) auth: Option<super::auth::Authenticator>,
    /// Logins of clients whose credentials go upstream (`Some` when an upstream has
    /// `credentials = "client"`).
    pub(crate) client_logins: Option<super::client_login::ClientLogins>,
    /// `storage.s3.redirect`: blob GETs answered `307` to the object store.
    blob_redirects: bool,
}

impl AppState {
    /// Samples the status page's charts once a minute until `shutdown`.
    pub async fn sample_history(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(super::history::SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => self.history.sample(&self.metrics, &self.cache),
            }
        }
    }

    /// Whether `[auth]` is on (so `SIGHUP` has an htpasswd file to re-read).
    pub fn authenticates(&self) -> bool {
        self.auth.is_some()
    }

    pub fn new(
        cache: Arc<Cache>,
        resolver: Resolver,
        metrics: Arc<Metrics>,
        server: &ServerConfig,
        storage: &StorageConfig,
        auth: Option<&AuthConfig>,
    ) -> Self {
        metrics
            .storage_budget
            .set(i64::try_from(storage.max_size.unwrap_or(0)).unwrap_or(i64::MAX));
        let client_logins = cache
            .upstreams()
            .iter()
            .any(|u| u.client_mode())
            .then(|| {
                super::client_login::ClientLogins::new(
                    auth.map_or(std::time::Duration::from_secs(300), |a| a.token_ttl),
                    auth.and_then(|a| a.realm.clone()),
                    auth.map_or_else(|| "regcache".to_owned(), |a| a.service.clone()),
                )
            })
            .flatten();
        Self {
            cache,
            resolver,
            metrics,
            board: StatusBoard::default(),
            history: super::history::History::default(),
            next_request_id: std::sync::atomic::AtomicU64::new(1),
            status_page: server.status_page,
            budget: storage.max_size,
            client_logins,
            auth: auth.map(super::auth::Authenticator::new),
            blob_redirects: matches!(
                &storage.backend,
                regcache_config::StorageBackend::S3(s3) if s3.redirect
            ),
        }
    }
}

/// A response with what the log line, the metrics and the status board need.
pub(crate) struct Outcome {
    pub(crate) response: Response<Body>,
    pub(crate) phase: Option<CachePhase>,
    pub(crate) error: Option<(Origin, String)>,
    /// For manifest and blob requests: the upstream and repository.
    pub(crate) target: Option<(String, String)>,
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

pub(crate) async fn handle<B>(state: &AppState, route: Route<'_>, request: &Request<B>) -> Outcome {
    let head_only = request.method() == Method::HEAD;
    let mut target = None;
    let mut outcome = match route_request(state, route, request, &mut target).await {
        Ok((response, phase)) => Outcome {
            response,
            phase,
            error: None,
            target: None,
        },
        Err(err) => {
            let cause = err.internal.clone().unwrap_or_else(|| err.message.clone());
            let origin = err.origin;
            Outcome {
                response: err.into_response(head_only),
                phase: None,
                error: Some((origin, cause)),
                target: None,
            }
        }
    };
    outcome.target = target.map(|t: Target| {
        let upstream = state.cache.upstreams()[t.upstream].name().to_owned();
        (upstream, t.repo.to_string())
    });
    outcome
        .response
        .headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    // Bytes passed through from an upstream (tag lists, referrers, manifests) are never to be
    // sniffed into HTML by a browser on the cache's origin.
    outcome.response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    outcome
}

type Handled = Result<(Response<Body>, Option<CachePhase>), ApiError>;

async fn route_request<B>(
    state: &AppState,
    route: Route<'_>,
    request: &Request<B>,
    resolved: &mut Option<Target>,
) -> Handled {
    let method = request.method();
    let readable = method == Method::GET || method == Method::HEAD;
    match route {
        Route::Health if readable => Ok((text_response(StatusCode::OK, "ok\n"), None)),
        Route::Ready if readable => Ok((readiness(state).await, None)),
        Route::Metrics if readable => {
            let usage = state.cache.store().usage();
            let metrics = &state.metrics;
            metrics
                .storage_used
                .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
            metrics
                .storage_blobs
                .set(i64::try_from(usage.files).unwrap_or(i64::MAX));
            metrics
                .storage_manifests
                .set(i64::try_from(state.cache.index().manifest_count()).unwrap_or(i64::MAX));
            metrics
                .response_buffer
                .set(i64::try_from(state.cache.store().response_buffer_held()).unwrap_or(i64::MAX));
            let mut response = Response::new(body::full(metrics.encode()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok((response, None))
        }
        Route::Status if readable && state.status_page => {
            // With `[auth]`, only the repositories the caller may pull (the front door put
            // the caller's identity in the request).
            let viewer = request.extensions().get::<super::auth::Identity>();
            let visible = |upstream: &str, repo: &str| match (&state.auth, viewer) {
                (None, _) => true,
                (Some(auth), Some(identity)) => auth.may_pull(identity, upstream, repo),
                (Some(_), None) => false,
            };
            let html = status::render(
                &state.cache,
                &state.metrics,
                &state.board,
                &state.history,
                state.budget,
                &visible,
            );
            let mut response = Response::new(body::full(html));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok((response, None))
        }
        Route::Status => Err(ApiError::not_found()),
        Route::Base if readable => Ok((json_response(StatusCode::OK, "{}"), None)),
        Route::NotFound => Err(ApiError::not_found()),
        Route::Catalog => Err(ApiError::unsupported("a pull-through cache has no catalog")),
        Route::Upload => Err(ApiError::unsupported(
            "regcache is a read-only pull-through cache",
        )),
        _ if !readable => Err(ApiError::unsupported(format!(
            "{method} is not supported: regcache is a read-only pull-through cache"
        ))),
        Route::Manifest { name, reference } => {
            let target = resolve(state, request, name)?;
            *resolved = Some(target.clone());
            let reference = Reference::parse(reference).map_err(|e| ApiError::from_parse(&e))?;
            if let Reference::Digest(digest) = &reference {
                auth::check_membership(state, &target, digest, DigestKind::Manifest).await?;
            }
            manifest(state, request, &target, &reference).await
        }
        Route::Blob { name, digest } => {
            let target = resolve(state, request, name)?;
            *resolved = Some(target.clone());
            let digest = Digest::parse(digest).map_err(|e| ApiError::from_parse(&e))?;
            // A peer replica (proven by the cluster secret) checked its client's grant itself.
            let asker = match state.cache.cluster() {
                Some(cluster) if cluster.is_peer_request(request.headers()) => Asker::Peer,
                _ => Asker::Client,
            };
            if asker == Asker::Client {
                auth::check_membership(state, &target, &digest, DigestKind::Blob).await?;
            }
            blob(state, request, &target, &digest, asker).await
        }
        Route::TagsList { name } => {
            let target = resolve(state, request, name)?;
            *resolved = Some(target.clone());
            tag_list(state, request, &target, name).await
        }
        Route::Referrers { name, digest } => {
            let target = resolve(state, request, name)?;
            *resolved = Some(target.clone());
            let digest = Digest::parse(digest).map_err(|e| ApiError::from_parse(&e))?;
            referrers(state, request, &target, &digest).await
        }
        Route::Base | Route::Health | Route::Ready | Route::Metrics => {
            Err(ApiError::unsupported("only GET and HEAD"))
        }
    }
}

/// `/readyz`: 200 when the store is writable and the index readable. Upstream health is
/// reported but does not fail readiness: an uplink outage must not take a cache that can still
/// serve out of its load balancer. The same holds for an object store that answered once
/// (`degraded` names it); one never reached since start fails readiness.
async fn readiness(state: &AppState) -> Response<Body> {
    let ready = state.cache.check_ready().await;
    let upstreams: Vec<serde_json::Value> = state
        .cache
        .upstreams()
        .iter()
        .map(|u| {
            let budget = u.rate_limit();
            serde_json::json!({
                "name": u.name(),
                "up": !u.is_marked_down() && !u.is_offline(),
                "offline": u.is_offline(),
                "last_error": u.last_error().map(|(_, message)| message),
                "ratelimit": {
                    "limit": budget.limit,
                    "remaining": budget.remaining,
                    "at_reserve": budget.low,
                    "paused_seconds": budget.paused_for.map(|left| left.as_secs()),
                },
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "ready": ready.is_ok(),
        "problem": ready.as_ref().err(),
        "degraded": ready.as_ref().ok().cloned().flatten(),
        "upstreams": upstreams,
    });
    // The members this replica routes blob misses over; peers never fail readiness (a replica
    // whose owner is down fills from the upstream itself).
    if let Some(cluster) = state.cache.cluster() {
        body["cluster"] = serde_json::json!({
            "self": cluster.self_id(),
            "members": *cluster.members(),
        });
    }
    let mut response = Response::new(body::full(body.to_string()));
    if ready.is_err() {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn query_param<'q>(query: &'q str, key: &str) -> Option<std::borrow::Cow<'q, str>> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn resolve<B>(state: &AppState, request: &Request<B>, name: &str) -> Result<Target, ApiError> {
    let ns = request.uri().query().and_then(|q| query_param(q, "ns"));
    state
        .resolver
        .resolve(ns.as_deref(), name)
        .map(Target::from)
        .map_err(|e| ApiError::from_resolve(&e))
}

fn accept_values<B>(request: &Request<B>) -> Vec<String> {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect()
}

async fn manifest<B>(
    state: &AppState,
    request: &Request<B>,
    target: &Target,
    reference: &Reference,
) -> Handled {
    let answer = state
        .cache
        .manifest(target, reference, &accept_values(request))
        .await
        .map_err(|e| ApiError::from_cache(&e, "MANIFEST_UNKNOWN"))?;
    let ManifestAnswer { manifest, phase } = answer;
    // Schema1 goes only to a client that accepts it, whatever the upstream sent.
    if manifest.media_type.is_schema1() && !manifest.media_type.accepted_by(&accept_values(request))
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "the manifest is schema1, which the client does not accept",
        ));
    }
    let digest = manifest.digest.to_string();
    let body = if request.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(manifest.bytes.clone())
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header_value(manifest.media_type.as_str()),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(manifest.bytes.len()),
    );
    headers.insert("docker-content-digest", header_value(&digest));
    headers.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    if phase == CachePhase::Stale {
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 regcache \"Response is Stale\""),
        );
    }
    Ok((response, Some(phase)))
}

/// A value known to be a valid header (media types and digests are validated at parse time).
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

async fn blob<B>(
    state: &AppState,
    request: &Request<B>,
    target: &Target,
    digest: &Digest,
    asker: Asker,
) -> Handled {
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeRequest::Full, parse_range);
    // A peer replica asking the owner wants the bytes (it stores them): never redirected.
    if state.blob_redirects && asker == Asker::Client {
        if let Some(presigned) = state.cache.blob_redirect(target, digest).await {
            let response = if request.method() == Method::HEAD {
                // What the bucket says, without copying the blob into the local tier.
                let mut response = Response::new(body::empty());
                insert_blob_headers(response.headers_mut(), digest);
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(presigned.size));
                response
            } else {
                redirect(&presigned.url, digest)
            };
            return Ok((response, Some(CachePhase::Hit)));
        }
    }
    let answer = state
        .cache
        .blob_for(target, digest, range, asker)
        .await
        .map_err(|e| ApiError::from_cache(&e, "BLOB_UNKNOWN"))?;
    let answer = match answer {
        BlobReply::Found(answer) => answer,
        BlobReply::RangeNotSatisfiable(unsatisfiable) => {
            let mut err = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "range not satisfiable",
            );
            err.internal = Some(format!("size {}", unsatisfiable.size));
            let mut response = err.into_response(request.method() == Method::HEAD);
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{}", unsatisfiable.size)),
            );
            return Ok((response, None));
        }
    };
    let BlobAnswer {
        size,
        range,
        body,
        phase,
    } = answer;
    let mut response = Response::new(if request.method() == Method::HEAD {
        body::empty()
    } else {
        body::blob(body)
    });
    insert_blob_headers(response.headers_mut(), digest);
    match (range, size) {
        (Some(r), Some(size)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {}-{}/{size}", r.start, r.end - 1)),
            );
        }
        (None, Some(size)) => {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        _ => {}
    }
    Ok((response, Some(phase)))
}

/// The headers of every blob answer but its length and range.
fn insert_blob_headers(headers: &mut http::HeaderMap, digest: &Digest) {
    let digest_text = digest.to_string();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("docker-content-digest", header_value(&digest_text));
    headers.insert(header::ETAG, header_value(&format!("\"{digest_text}\"")));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000, immutable"),
    );
}

/// `307` to where the client fetches a blob itself (a presigned object store URL). The
/// client's `Range`, if any, goes with it.
fn redirect(location: &str, digest: &Digest) -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, header_value(location));
    headers.insert("docker-content-digest", header_value(&digest.to_string()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response
}

/// Parses a single `bytes=` range; anything else (multiple ranges, other units) is served as
/// the whole blob, as RFC 9110 allows.
pub(crate) fn parse_range(value: &str) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    match (first.parse::<u64>(), last) {
        (Ok(start), "") => RangeRequest::From { start, last: None },
        (Ok(start), last) => match last.parse::<u64>() {
            Ok(last) if last >= start => RangeRequest::From {
                start,
                last: Some(last),
            },
            _ => RangeRequest::Full,
        },
        (Err(_), suffix) if first.is_empty() => suffix
            .parse()
            .map_or(RangeRequest::Full, RangeRequest::Suffix),
        _ => RangeRequest::Full,
    }
}

/// `GET /v2/<name>/tags/list`: the cache's sorted, paginated list (`n`, `last`), with a
/// `Link` to the next page that names the path (and `ns=`) the client used.
async fn tag_list<B>(
    state: &AppState,
    request: &Request<B>,
    target: &Target,
    client_name: &str,
) -> Handled {
    let query = request.uri().query().unwrap_or("");
    let n = match query_param(query, "n") {
        Some(value) => Some(value.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n = {value:?} is not a number"),
            )
        })?),
        None => None,
    };
    let last = query_param(query, "last");
    let page = state
        .cache
        .tags(target, n, last.as_deref())
        .await
        .map_err(|e| ApiError::from_cache(&e, "NAME_UNKNOWN"))?;
    #[derive(serde::Serialize)]
    struct TagListBody<'a> {
        name: &'a str,
        tags: Vec<&'a str>,
    }
    let json = serde_json::to_vec(&TagListBody {
        name: client_name,
        tags: page.tags.iter().map(regcache_oci::Tag::as_str).collect(),
    })
    .unwrap_or_default();
    let mut response = json_bytes_response(request, json, "application/json");
    if let (Some(n), Some(after)) = (n, &page.next_after) {
        let mut next = url::form_urlencoded::Serializer::new(String::new());
        next.append_pair("n", &n.to_string());
        next.append_pair("last", after.as_str());
        if let Some(ns) = query_param(query, "ns") {
            next.append_pair("ns", &ns);
        }
        let link = format!(
            "</v2/{client_name}/tags/list?{}>; rel=\"next\"",
            next.finish()
        );
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok((response, Some(page.phase)))
}

/// `GET /v2/<name>/referrers/<digest>`: an image index of the referrers the upstream and the
/// cache know, filtered by `artifactType`.
async fn referrers<B>(
    state: &AppState,
    request: &Request<B>,
    target: &Target,
    subject: &Digest,
) -> Handled {
    let query = request.uri().query().unwrap_or("");
    let artifact_type = query_param(query, "artifactType");
    let list = state
        .cache
        .referrers(target, subject, artifact_type.as_deref())
        .await
        .map_err(|e| ApiError::from_cache(&e, "NAME_UNKNOWN"))?;
    let json = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": regcache_oci::MediaType::OCI_INDEX,
        "manifests": list.manifests,
    }))
    .unwrap_or_default();
    let mut response = json_bytes_response(request, json, regcache_oci::MediaType::OCI_INDEX);
    if list.filtered {
        response.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok((response, Some(list.phase)))
}

/// A 200 JSON response (no body for HEAD, same headers).
fn json_bytes_response<B>(
    request: &Request<B>,
    json: Vec<u8>,
    content_type: &'static str,
) -> Response<Body> {
    let len = json.len();
    let mut response = Response::new(if request.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(json)
    });
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn json_response(status: StatusCode, json: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(json));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(value: &str, expected: RangeRequest) {
        assert_eq!(parse_range(value), expected, "{value}");
    }

    #[test]
    fn ranges() {
        check(
            "bytes=0-99",
            RangeRequest::From {
                start: 0,
                last: Some(99),
            },
        );
        check(
            "bytes=100-",
            RangeRequest::From {
                start: 100,
                last: None,
            },
        );
        check("bytes=-500", RangeRequest::Suffix(500));
        check("bytes=5-1", RangeRequest::Full);
        check("bytes=0-1,5-6", RangeRequest::Full);
        check("items=0-1", RangeRequest::Full);
        check("bytes=x-y", RangeRequest::Full);
    }
}
