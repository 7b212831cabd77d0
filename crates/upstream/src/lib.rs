//! The registry client: manifests, blobs and pass-through listings from one upstream registry,
//! with anonymous, basic and bearer-token authentication (see `auth`).
//!
//! `upstream` may not touch `store` or `cache`: it returns bytes and streams, and the cache
//! decides what to keep. Redirects (blob storage on another host, as ghcr.io, quay.io and ECR
//! do) are followed by reqwest, which drops `Authorization` when the host changes, and only to
//! `http(s)` URLs on public addresses; token realms are held to the same rule (`egress`).
//! Credentials go only where `auth`'s `CredentialScope` allows; blob bodies are cut at
//! `cache.max_blob_size`.

pub(crate) mod auth;
mod body;
mod breaker;
mod budget;
pub mod caller;
mod class;
pub mod clock;
pub mod egress;
mod error;
mod headers;
mod identity;
mod response;
mod throttle;
mod trust;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use http::{HeaderMap, Method, StatusCode};
use reqwest::RequestBuilder;

use crate::clock::Clock;
#[doc(hidden)]
pub use auth::fuzz_parse_challenge;
use auth::{parse_challenge, Challenge, TokenResponse};
pub use body::blob_extent;
use body::limit_body;
pub use breaker::Need;
use breaker::{Breaker, Transition};
pub use budget::RateLimitView;
use budget::{Budget, Paused};
pub use class::{Answer, ErrorClass, Health, Origin};
pub use error::{network_cause, UpstreamError};
use headers::accept_header;
pub(crate) use headers::header_str;
use identity::Identity;
use regcache_config::UpstreamConfig;
use regcache_metrics::Metrics;
use regcache_oci::{declared_sizes, Digest, MediaType, RepoName, MAX_MANIFEST_BYTES};
pub use response::{BlobResponse, FetchedManifest, PassThrough, TagPageBody};
use throttle::Throttle;
pub use trust::trust_pem_file;

/// Attempts per idempotent request (the first try and two retries) for connection errors and
/// 502/503/504.
const MAX_ATTEMPTS: u32 = 3;
/// First retry delay; doubled per retry, plus up to 100% jitter.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Repositories remembered as answered, per upstream.
const ANSWERED_REPOSITORIES: u64 = 10_000;
/// Declared blob sizes remembered per upstream (about 100 bytes each).
const DECLARED_SIZES_CAPACITY: u64 = 100_000;
/// How long a declared size is remembered: long enough for the pull that read the manifest.
const DECLARED_SIZES_TTL: Duration = Duration::from_secs(3600);
/// HTTP/2 receive window per stream (one blob): 16 MiB keeps a 100 ms path busy up to
/// ~1.3 Gbit/s (Go's registry clients use 4 MiB).
const UPSTREAM_H2_STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 receive window per connection, shared by the blobs on it.
const UPSTREAM_H2_CONNECTION_WINDOW: u32 = 64 << 20;

/// What a request is for: its metric kind, its repository and whether the caller has a
/// fallback (see [`Need`]).
#[derive(Debug, Clone, Copy)]
struct Request<'a> {
    kind: &'static str,
    repo: &'a RepoName,
    need: Need,
}

/// A client for one upstream registry.
#[derive(Debug)]
pub struct UpstreamClient {
    name: String,
    base: url::Url,
    http: reqwest::Client,
    /// Credentials (configured or each caller's), where they may go, the tokens they earned.
    identity: Identity,
    /// Which addresses requests may reach; token realms are judged before they are asked.
    egress: std::sync::Arc<egress::Egress>,
    /// The largest blob body accepted (`cache.max_blob_size`).
    max_blob_size: u64,
    /// Blob sizes declared by the manifests fetched from this upstream, per repository (so a
    /// manifest in one repository cannot cap a blob pulled through another): a blob body is
    /// cut at its declared size.
    declared_sizes: moka::future::Cache<(RepoName, Digest), u64>,
    offline: bool,
    breaker: Breaker,
    /// What its rate-limit headers say is left, the reserve, the pause after a `429`.
    budget: Budget,
    /// `max_bandwidth`: shared by every blob body read from this upstream.
    throttle: Option<std::sync::Arc<Throttle>>,
    /// Repositories the upstream answered recently: its 5xx on them are its own failures (see
    /// [`Health::FailedUnlessProvoked`]). Bounded.
    answered: moka::future::Cache<RepoName, ()>,
    metrics: std::sync::Arc<Metrics>,
    /// The last failure, for the status page.
    last_error: parking_lot::Mutex<Option<(std::time::SystemTime, String)>>,
}

/// Errors building a client from configuration (a bad CA file).
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: {reason}")]
pub struct ClientBuildError {
    upstream: String,
    reason: String,
}

impl UpstreamClient {
    /// Builds the client for one configured upstream.
    ///
    /// # Errors
    /// [`ClientBuildError`] when the CA file cannot be read or parsed.
    pub fn new(
        config: &UpstreamConfig,
        metrics: std::sync::Arc<Metrics>,
        clock: Clock,
    ) -> Result<Self, ClientBuildError> {
        let build_error = |reason: String| ClientBuildError {
            upstream: config.name.clone(),
            reason,
        };
        let egress = egress::Egress::new(
            &config.name,
            &config.url,
            &config.token_realm_hosts,
            config.allow_private_redirects,
        );
        let mut builder = reqwest::Client::builder()
            .redirect(egress.redirect_policy())
            .dns_resolver(std::sync::Arc::new(egress::GuardedResolver(
                std::sync::Arc::clone(&egress),
            )))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.idle_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            // HTTP/2 upstreams (most public registries) would otherwise get hyper's 2 MiB
            // stream window: at most 2 MiB per round trip per blob. Through a 100 ms,
            // 800 Mbit/s path to a TLS registry, a 64 MiB layer took 4.7-4.9 s cold against
            // 0.98 s for curl straight from it; with these windows 0.78 s. (hyper's adaptive
            // window starts from 64 KiB: the first blob on a new connection took 2.2 s.) The
            // windows bound what an upstream may send ahead of the fill: at most 16 MiB per
            // blob, 64 MiB per connection, and only while the store is slower than the link.
            .http2_initial_stream_window_size(Some(UPSTREAM_H2_STREAM_WINDOW))
            .http2_initial_connection_window_size(Some(UPSTREAM_H2_CONNECTION_WINDOW))
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            builder = trust_pem_file(builder, path)
                .map_err(|err| build_error(format!("ca_file {err}")))?;
        }
        let http = builder
            .build()
            .map_err(|err| build_error(err.to_string()))?;
        Ok(Self {
            name: config.name.clone(),
            base: config.url.clone(),
            http,
            identity: Identity::new(config),
            egress,
            max_blob_size: config.max_blob_size,
            declared_sizes: moka::future::Cache::builder()
                .max_capacity(DECLARED_SIZES_CAPACITY)
                .time_to_live(DECLARED_SIZES_TTL)
                .build(),
            offline: config.offline,
            breaker: Breaker::new(
                config.breaker_threshold,
                config.breaker_cooldown,
                clock.clone(),
            ),
            budget: Budget::new(config.ratelimit_reserve, clock),
            throttle: Throttle::new(config.max_bandwidth).map(std::sync::Arc::new),
            answered: moka::future::Cache::builder()
                .max_capacity(ANSWERED_REPOSITORIES)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            metrics,
            last_error: parking_lot::Mutex::new(None),
        })
    }

    /// The upstream's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest blob body accepted (`cache.max_blob_size`).
    pub fn max_blob_size(&self) -> u64 {
        self.max_blob_size
    }

    /// Whether it is asked with each client's credentials (`credentials = "client"`).
    pub fn client_mode(&self) -> bool {
        self.identity.client_mode()
    }

    /// Whether the upstream is configured offline.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Whether the circuit breaker currently considers the upstream down.
    pub fn is_marked_down(&self) -> bool {
        self.breaker.is_open()
    }

    /// Whether the upstream's rate-limit budget is at or under `ratelimit_reserve`: cached
    /// tags are then served without revalidation, so that what is left goes to misses.
    pub fn budget_is_low(&self) -> bool {
        self.budget.is_low()
    }

    /// What the upstream last said about its rate limit, and whether it is paused.
    pub fn rate_limit(&self) -> RateLimitView {
        self.budget.view()
    }

    /// The last failure and when it happened.
    pub fn last_error(&self) -> Option<(std::time::SystemTime, String)> {
        self.last_error.lock().clone()
    }

    /// Counts an error found by the caller (a digest mismatch) against this upstream.
    pub fn record_error(&self, reason: &'static str, message: String) {
        self.metrics
            .upstream_errors
            .with_label_values(&[self.name.as_str(), reason])
            .inc();
        *self.last_error.lock() = Some((std::time::SystemTime::now(), message));
    }

    fn url(&self, repo: &RepoName, tail: &str) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        format!("{base}/v2/{}/{tail}", repo.as_str())
    }

    /// Fetches a manifest by tag or digest, asking for the media types in `accept` (the
    /// client's `Accept` values; every manifest type when empty). `need` says whether the
    /// caller could serve a cached copy instead (it then fails fast while the circuit is open).
    ///
    /// # Errors
    /// [`UpstreamError`]; a body over 4 MiB is [`UpstreamError::TooLarge`].
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &[String],
        need: Need,
    ) -> Result<FetchedManifest, UpstreamError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let accept = accept_header(accept);
        let request = Request {
            kind: "manifest",
            repo,
            need,
        };
        let response = self
            .send(request, Method::GET, &url, &[("accept", accept.as_str())])
            .await?;
        let headers = response.headers().clone();
        let bytes = self.read_limited(response, MAX_MANIFEST_BYTES).await?;
        self.count_bytes(bytes.len());
        for (digest, size) in declared_sizes(&bytes) {
            self.declared_sizes
                .insert((repo.clone(), digest), size)
                .await;
        }
        Ok(FetchedManifest {
            bytes,
            media_type: header_str(&headers, "content-type").and_then(MediaType::from_content_type),
            digest_header: header_str(&headers, "docker-content-digest")
                .and_then(|value| Digest::parse(value).ok()),
        })
    }

    /// Starts a blob download from byte `offset` (0 for the whole blob); the body is read by
    /// the caller. An upstream that ignores the range answers with the whole blob, which
    /// [`BlobResponse::offset`] reports.
    ///
    /// The body ends in [`UpstreamError::TooLarge`] once it passes `cache.max_blob_size`, the
    /// size a manifest of this repository declared for the blob, or the total size the upstream
    /// announced: exactly the allowed bytes come first, so a fill that resumes asks from the
    /// limit and fails at once instead of downloading again.
    ///
    /// # Errors
    /// [`UpstreamError`] for the status, for an announced size over `cache.max_blob_size` or
    /// the declared size, or for an `offset` at or past either; body errors come through the
    /// stream.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobResponse, UpstreamError> {
        let too_large = |limit: u64| UpstreamError::TooLarge {
            upstream: self.name.clone(),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        };
        let declared = self.declared_sizes.get(&(repo.clone(), *digest)).await;
        let allowed = declared.map_or(self.max_blob_size, |d| d.min(self.max_blob_size));
        if offset >= allowed && offset > 0 {
            return Err(too_large(allowed));
        }
        let url = self.url(repo, &format!("blobs/{digest}"));
        let range = format!("bytes={offset}-");
        let headers: &[(&str, &str)] = if offset > 0 {
            &[("range", range.as_str())]
        } else {
            &[]
        };
        let request = Request {
            kind: "blob",
            repo,
            need: Need::Miss,
        };
        let response = self.send(request, Method::GET, &url, headers).await?;
        let (offset, total_size) = blob_extent(&response, offset);
        if total_size.is_some_and(|total| total > allowed) {
            return Err(too_large(allowed));
        }
        let limit = total_size.map_or(allowed, |t| t.min(allowed));
        let upstream = self.name.clone();
        let fetched = self
            .metrics
            .upstream_bytes
            .with_label_values(&[self.name.as_str()]);
        let body = response
            .bytes_stream()
            .inspect_ok(move |chunk| fetched.inc_by(chunk.len() as u64))
            .map_err(move |source| UpstreamError::Unreachable {
                upstream: upstream.clone(),
                source,
            });
        let body = limit_body(body, offset, limit, too_large(limit));
        let body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>> =
            match &self.throttle {
                Some(throttle) => {
                    let throttle = std::sync::Arc::clone(throttle);
                    Box::pin(body.then(move |item| {
                        let throttle = std::sync::Arc::clone(&throttle);
                        async move {
                            if let Ok(chunk) = &item {
                                throttle.take(chunk.len()).await;
                            }
                            item
                        }
                    }))
                }
                None => Box::pin(body),
            };
        Ok(BlobResponse {
            total_size,
            offset,
            body,
        })
    }

    /// Asks for a manifest's digest without downloading it (`HEAD`; Docker Hub does not count
    /// it against the pull rate limit). `None` when the upstream sent no usable digest. `need`
    /// as for [`UpstreamClient::get_manifest`].
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &[String],
        need: Need,
    ) -> Result<Option<(Digest, Option<MediaType>)>, UpstreamError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let accept = accept_header(accept);
        let request = Request {
            kind: "manifest",
            repo,
            need,
        };
        let response = self
            .send(request, Method::HEAD, &url, &[("accept", accept.as_str())])
            .await?;
        let headers = response.headers();
        let digest =
            header_str(headers, "docker-content-digest").and_then(|v| Digest::parse(v).ok());
        let media_type = header_str(headers, "content-type").and_then(MediaType::from_content_type);
        Ok(digest.map(|digest| (digest, media_type)))
    }

    /// Whether the repository has a blob (`HEAD`, nothing downloaded): how the cache checks
    /// that a client granted one repository does not read another's blobs by digest.
    ///
    /// # Errors
    /// [`UpstreamError`]; a 404 is `Ok(false)`.
    pub async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, UpstreamError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let request = Request {
            kind: "blob",
            repo,
            need: Need::Miss,
        };
        match self.send(request, Method::HEAD, &url, &[]).await {
            Ok(_) => Ok(true),
            Err(UpstreamError::NotFound { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Whether the upstream accepts the caller's credentials (`credentials = "client"`), as a
    /// `docker login` to it would find out: `/v2/`, and its token endpoint with no scope.
    /// An upstream that asks for no credentials accepts any.
    ///
    /// # Errors
    /// [`UpstreamError::Denied`] for credentials it refuses; any failure to ask.
    pub async fn check_login(&self) -> Result<(), UpstreamError> {
        if self.offline {
            return Err(UpstreamError::Offline {
                upstream: self.name.clone(),
            });
        }
        let url = format!("{}/v2/", self.base.as_str().trim_end_matches('/'));
        let response = self.execute(self.http.get(&url)).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return self.check_status(response).map(drop);
        }
        match header_str(response.headers(), "www-authenticate").and_then(parse_challenge) {
            Some(Challenge::Bearer { realm, service, .. }) => self
                .fetch_token(&realm, service.as_deref(), None)
                .await
                .map(drop),
            Some(Challenge::Basic) => {
                let mut request = self.http.get(&url);
                if let Some(basic) = self.identity.basic_authorization() {
                    request = request.header("authorization", basic);
                }
                let answer = self.execute(request).await?;
                self.check_status(answer).map(drop)
            }
            None => self.check_status(response).map(drop),
        }
    }

    /// Fetches `/v2/<repo>/<tail>?<query>` (tag lists, referrers) for pass-through.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn get_pass_through(
        &self,
        repo: &RepoName,
        tail: &str,
        query: Option<&str>,
    ) -> Result<PassThrough, UpstreamError> {
        let mut url = self.url(repo, tail);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(query);
        }
        let accept = "application/json, application/vnd.oci.image.index.v1+json";
        let request = Request {
            kind: "list",
            repo,
            need: Need::Miss,
        };
        let response = self
            .send(request, Method::GET, &url, &[("accept", accept)])
            .await?;
        let headers = response.headers().clone();
        let bytes = self.read_limited(response, MAX_MANIFEST_BYTES).await?;
        self.count_bytes(bytes.len());
        Ok(PassThrough {
            content_type: header_str(&headers, "content-type").map(str::to_owned),
            link: header_str(&headers, "link").map(str::to_owned),
            bytes,
        })
    }

    /// Fetches one page of a repository's tag list (`tags/list?<query>`), reading at most
    /// `max_bytes` of its body: a longer body is cut there, not refused, and the rest is never
    /// read, so that the caller keeps the tags that fit.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn get_tag_page(
        &self,
        repo: &RepoName,
        query: Option<&str>,
        max_bytes: usize,
    ) -> Result<TagPageBody, UpstreamError> {
        let mut url = self.url(repo, "tags/list");
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(query);
        }
        let request = Request {
            kind: "list",
            repo,
            need: Need::Miss,
        };
        let response = self
            .send(
                request,
                Method::GET,
                &url,
                &[("accept", "application/json")],
            )
            .await?;
        let link = header_str(response.headers(), "link").map(str::to_owned);
        let mut body = Vec::new();
        let mut cut_short = false;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| self.unreachable(source))?;
            let room = max_bytes - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                cut_short = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        self.count_bytes(body.len());
        Ok(TagPageBody {
            link,
            bytes: Bytes::from(body),
            cut_short,
        })
    }

    async fn read_limited(
        &self,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, UpstreamError> {
        let too_large = || UpstreamError::TooLarge {
            upstream: self.name.clone(),
            limit,
        };
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| self.unreachable(source))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    fn count_bytes(&self, len: usize) {
        self.metrics
            .upstream_bytes
            .with_label_values(&[self.name.as_str()])
            .inc_by(len as u64);
    }

    fn unreachable(&self, source: reqwest::Error) -> UpstreamError {
        UpstreamError::Unreachable {
            upstream: self.name.clone(),
            source,
        }
    }

    /// Sends an idempotent request through the circuit breaker, retrying what
    /// [`ErrorClass::retryable`] allows with jittered exponential backoff (not a probe). The
    /// request and its retries are one verdict for the breaker.
    async fn send(
        &self,
        request: Request<'_>,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<reqwest::Response, UpstreamError> {
        if self.offline {
            return Err(UpstreamError::Offline {
                upstream: self.name.clone(),
            });
        }
        // A paused upstream (after a 429) is not asked at all, probe aside.
        let admission = match self.budget.admit() {
            Ok(admission) => admission,
            Err(Paused(retry_in)) => {
                let err = UpstreamError::Paused {
                    upstream: self.name.clone(),
                    retry_in,
                };
                self.record_error("paused", err.to_string());
                return Err(err);
            }
        };
        let permit = match self.breaker.check(request.need) {
            Ok(permit) => permit,
            Err(open) => {
                let err = UpstreamError::CircuitOpen {
                    upstream: self.name.clone(),
                    retry_in: open.0,
                };
                self.record_error("circuit_open", err.to_string());
                return Err(err);
            }
        };
        // A probe asks once: its verdict matters more than its own success.
        let max_attempts = if permit.is_probe() { 1 } else { MAX_ATTEMPTS };
        let mut attempt = 1;
        let result = loop {
            if method == Method::GET && request.kind == "manifest" {
                self.metrics
                    .upstream_manifest_gets
                    .with_label_values(&[self.name.as_str()])
                    .inc();
            }
            let timer = self.metrics.upstream_timer(&self.name, request.kind);
            let result = self
                .send_once(method.clone(), url, request.repo, headers)
                .await;
            timer.observe_duration();
            let Err(err) = &result else { break result };
            let class = err.class();
            if let Some(reason) = class.reason {
                self.record_error(reason, err.to_string());
            }
            if !class.retryable || attempt >= max_attempts {
                break result;
            }
            let delay = RETRY_BASE * 2u32.pow(attempt - 1);
            tokio::time::sleep(delay + jitter(delay)).await;
            attempt += 1;
        };
        let health = match &result {
            Ok(_) => Health::Answered,
            Err(err) => err.class().health,
        };
        let transition = match health {
            Health::Answered => {
                if !self.answered.contains_key(request.repo) {
                    self.answered.insert(request.repo.clone(), ()).await;
                }
                permit.succeeded()
            }
            Health::Failed => permit.failed(),
            Health::FailedUnlessProvoked if self.answered.contains_key(request.repo) => {
                permit.failed()
            }
            Health::FailedUnlessProvoked | Health::Unknown => None,
        };
        self.breaker_moved(transition);
        match &result {
            Err(UpstreamError::TooManyRequests { retry_after, .. }) => {
                let pause = admission.rate_limited(retry_after.as_deref());
                tracing::warn!(
                    upstream = %self.name,
                    pause_s = pause.as_secs(),
                    "upstream answered 429; not asked again until its Retry-After (cached tags are served stale, misses get 503)"
                );
            }
            _ => {
                if admission.not_rate_limited() {
                    tracing::info!(upstream = %self.name, "upstream answered after its rate-limit pause");
                }
            }
        }
        result
    }

    /// Reads an answer's rate-limit headers into the budget and the gauges.
    fn observe_budget(&self, headers: &HeaderMap) {
        let was_low = self.budget.is_low();
        let Some((limit, remaining)) = self.budget.observe(headers) else {
            return;
        };
        let low = self.budget.is_low();
        if low && !was_low {
            tracing::warn!(
                upstream = %self.name,
                remaining,
                "rate-limit budget at its reserve: cached tags are served without revalidation until the window resets; misses still go out"
            );
        } else if was_low && !low {
            tracing::info!(upstream = %self.name, remaining, "rate-limit budget above its reserve again");
        }
        self.metrics.set_ratelimit(&self.name, limit, remaining);
    }

    fn breaker_moved(&self, transition: Option<Transition>) {
        let Some(transition) = transition else {
            return;
        };
        let (to, up) = match transition {
            Transition::Opened => {
                tracing::warn!(upstream = %self.name, "upstream marked down after repeated failures");
                ("open", 0)
            }
            Transition::Closed => {
                tracing::info!(upstream = %self.name, "upstream answered again; circuit closed");
                ("closed", 1)
            }
        };
        self.metrics
            .breaker_transitions
            .with_label_values(&[self.name.as_str(), to])
            .inc();
        self.metrics
            .upstream_up
            .with_label_values(&[self.name.as_str()])
            .set(up);
    }

    /// One request: whatever credentials are known, then one answer to a `401` challenge
    /// (fetching a token or switching to basic), then status mapping.
    async fn send_once(
        &self,
        method: Method,
        url: &str,
        repo: &RepoName,
        headers: &[(&str, &str)],
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{}:pull", repo.as_str());
        let token_key = self.identity.token_key(&scope);
        let build = |authorization: Option<&str>| {
            let mut request = self.http.request(method.clone(), url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(authorization) = authorization {
                request = request.header("authorization", authorization);
            }
            request
        };
        let first_auth = self.identity.known_authorization(&token_key);
        let response = self.execute(build(first_auth.as_deref())).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return self.check_status(response);
        }
        let challenge =
            header_str(response.headers(), "www-authenticate").and_then(parse_challenge);
        let authorization = match challenge {
            Some(Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            }) => {
                // A stale or revoked token: forget it and fetch a new one.
                self.identity.forget_token(&token_key);
                let token_scope = challenge_scope.unwrap_or_else(|| scope.clone());
                let token = self
                    .fetch_token(&realm, service.as_deref(), Some(&token_scope))
                    .await?;
                self.identity
                    .keep_token(&token_key, token.0.clone(), token.1);
                format!("Bearer {}", token.0)
            }
            Some(Challenge::Basic) if self.identity.has_credentials() => {
                self.identity.note_basic();
                self.identity.basic_authorization().unwrap_or_default()
            }
            _ => return self.check_status(response),
        };
        if first_auth.as_deref() == Some(authorization.as_str()) {
            return self.check_status(response);
        }
        let retried = self.execute(build(Some(&authorization))).await?;
        self.check_status(retried)
    }

    async fn execute(&self, request: RequestBuilder) -> Result<reqwest::Response, UpstreamError> {
        request
            .send()
            .await
            .map_err(|source| self.unreachable(source))
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<(String, Duration), UpstreamError> {
        let token_error = |reason: String| UpstreamError::Token {
            upstream: self.name.clone(),
            realm: realm.to_owned(),
            reason,
        };
        let mut realm_url = url::Url::parse(realm).map_err(|err| token_error(err.to_string()))?;
        // A realm is named by the answer, not by the configuration: a literal address is
        // judged here (a name, by the resolver), so an internal endpoint is never asked.
        if let Some(reason) = self.egress.refuse_realm(&realm_url) {
            return Err(token_error(reason));
        }
        {
            let mut query = realm_url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            if let Some(scope) = scope {
                query.append_pair("scope", scope);
            }
        }
        self.metrics
            .token_fetches
            .with_label_values(&[self.name.as_str()])
            .inc();
        let _timer = self.metrics.upstream_timer(&self.name, "token");
        let credentials_allowed = self.identity.allows(&realm_url);
        if !credentials_allowed && self.identity.has_credentials() {
            tracing::warn!(
                upstream = %self.name,
                realm_host = realm_url.host_str().unwrap_or_default(),
                "token realm is not this upstream's host nor in its token_realm_hosts; asking it for an anonymous token"
            );
        }
        let mut request = self.http.get(realm_url);
        let basic = self.identity.basic_authorization();
        if let Some(basic) = basic.filter(|_| credentials_allowed) {
            request = request.header("authorization", basic);
        }
        let response = request
            .send()
            .await
            .map_err(|err| token_error(err.to_string()))?;
        let status = response.status();
        // A token endpoint that rate-limits is the registry rate-limiting: the same pause.
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::TooManyRequests {
                upstream: self.name.clone(),
                retry_after: header_str(response.headers(), "retry-after").map(str::to_owned),
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Denied {
                upstream: self.name.clone(),
                status,
            });
        }
        if !status.is_success() {
            return Err(token_error(format!("status {status}")));
        }
        let bytes = self.read_limited(response, 1024 * 1024).await?;
        serde_json::from_slice::<TokenResponse>(&bytes)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| token_error("no token in the response".to_owned()))
    }

    fn check_status(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.observe_budget(response.headers());
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let upstream = self.name.clone();
        Err(match status {
            StatusCode::NOT_FOUND => UpstreamError::NotFound { upstream },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                UpstreamError::Denied { upstream, status }
            }
            StatusCode::TOO_MANY_REQUESTS => UpstreamError::TooManyRequests {
                upstream,
                retry_after: header_str(response.headers(), "retry-after").map(str::to_owned),
            },
            _ => UpstreamError::Status { upstream, status },
        })
    }
}

/// Up to `max` of random delay, so that retries from many requests spread out.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    max.mul_f64(f64::from(nanos % 1000) / 1000.0)
}
