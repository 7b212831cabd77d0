//! A fault-injecting fake upstream registry, in process, for the faults a real registry cannot
//! be made to produce on demand: 429 and 5xx answers, bytes that do not match their digest,
//! bodies cut short, slow trickles, hangs, bearer tokens that expire, and blob redirects to a
//! storage host. Everything else is tested against the real registry of [`super::upstream`].
//!
//! ```ignore
//! let fake = FakeRegistry::builder()
//!     .manifest("test/app", "v1", MT_OCI_MANIFEST, manifest_bytes)
//!     .blob(layer_bytes)
//!     .bearer_auth(300)
//!     .start()
//!     .await;
//! fake.set_fault("/manifests/", Fault::too_many_requests("7"));
//! // ... pull through regcache ...
//! assert_eq!(fake.count(|r| r.path == "/token"), 1);
//! ```
//!
//! The registry serves `GET`/`HEAD` `/v2/`, `/v2/<name>/manifests/<reference>` and
//! `/v2/<name>/blobs/<digest>` with `Content-Length`, `Content-Type` and
//! `Docker-Content-Digest`, and honours `Range: bytes=N-` / `bytes=N-M` (`206`);
//! `/v2/<name>/tags/list` lists the tags of its manifests, or with
//! [`FakeRegistryBuilder::tag_list`] in pages (`n`, `last`, `Link`) however many tags, made up
//! as they are served; with [`FakeRegistryBuilder::rate_limit`],
//! Docker Hub's pull budget (`ratelimit-*` headers, manifest `GET`s counted). Faults are
//! rules matched against the request path, settable at any time (they live behind the shared
//! state), so a test can change behaviour between two requests. Every request is recorded.
//!
//! Listens on `127.0.0.1`, port picked by the kernel. With [`FakeRegistryBuilder::redirect_blobs`]
//! a second "storage" listener runs on another port of `127.0.0.1`: another origin, so a client
//! that follows the redirect must drop `Authorization` (reqwest does when host or port changes).
//! Dropping the fake stops both listeners and aborts every connection, hanging ones included.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt as _};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::regclient::sha256_digest;

/// Bytes per body frame (the unit of [`Fault::WrongBytes`]'s `final_chunk_only`).
pub const CHUNK: usize = 16 * 1024;
/// The `service` named in the Bearer challenge.
pub const SERVICE: &str = "fake-registry";

type Body = BoxBody<Bytes, std::io::Error>;

/// Something the fake does wrong, on the requests whose path matches a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` (e.g. 429, 500, 503), with `Retry-After` when given, and an OCI JSON
    /// error body.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Serve content of the right length (and the right `Docker-Content-Digest`) whose bytes
    /// differ: every byte, or with `final_chunk_only` only those of the final [`CHUNK`]-sized
    /// frame, so that a streaming client gets most of the right bytes first.
    WrongBytes { final_chunk_only: bool },
    /// Announce the full `Content-Length`, send `after` bytes, then drop the connection.
    Truncate { after: usize },
    /// Send content `bytes` bytes at a time, pausing `every` before each frame.
    Trickle { bytes: usize, every: Duration },
    /// Accept and read the request, never answer.
    Hang,
}

impl Fault {
    /// A plain error status (500, 503, ...).
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
        }
    }

    /// `429 Too Many Requests` with `Retry-After: retry_after`.
    pub fn too_many_requests(retry_after: &str) -> Fault {
        Fault::Status {
            status: 429,
            retry_after: Some(retry_after.to_owned()),
        }
    }
}

/// Which listener of the fake received a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The registry (`/v2/...`, `/token`).
    Registry,
    /// The blob storage host that blob GETs are redirected to.
    Storage,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The listener that received it.
    pub on: Listener,
    /// `GET`, `HEAD`, ...
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query, if any.
    pub query: Option<String>,
    /// Every request header.
    pub headers: HeaderMap,
}

impl Recorded {
    /// A header's value, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Authorization` header.
    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }

    /// The `Range` header.
    pub fn range(&self) -> Option<&str> {
        self.header("range")
    }

    /// Whether this is a `GET` whose path ends with `suffix` (e.g. a digest or `/manifests/v1`).
    pub fn is_get(&self, suffix: &str) -> bool {
        self.method == Method::GET && self.path.ends_with(suffix)
    }
}

/// A fault rule: `fault` on paths containing `pattern`, `remaining` more times (`None`: always).
#[derive(Debug)]
struct Rule {
    pattern: String,
    fault: Fault,
    remaining: Option<usize>,
}

/// What changes while the fake runs.
#[derive(Debug, Default)]
struct Mutable {
    requests: Vec<Recorded>,
    rules: Vec<Rule>,
    tokens: HashSet<String>,
    issued: usize,
    /// Manifest `GET`s left in the window, with [`FakeRegistryBuilder::rate_limit`].
    remaining: Option<u64>,
}

/// Shared by every connection of both listeners.
#[derive(Debug)]
struct State {
    blobs: HashMap<String, Bytes>,
    /// (repository, tag or digest) → (media type, bytes).
    manifests: HashMap<(String, String), (String, Bytes)>,
    /// repository → its tag list.
    tag_lists: HashMap<String, TagList>,
    /// `expires_in` of issued tokens, when Bearer auth is required.
    bearer: Option<u64>,
    /// `http://127.0.0.1:PORT/token`.
    realm: String,
    /// `http://127.0.0.1:PORT` of the storage listener, when blob GETs are redirected.
    storage: Option<String>,
    /// (limit, window seconds) of the pull budget.
    rate_limit: Option<(u64, u64)>,
    mutable: Mutex<Mutable>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Mutable> {
        self.mutable.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Configures a [`FakeRegistry`] before it starts.
#[derive(Debug, Default)]
pub struct FakeRegistryBuilder {
    blobs: HashMap<String, Bytes>,
    manifests: HashMap<(String, String), (String, Bytes)>,
    tag_lists: HashMap<String, TagList>,
    bearer: Option<u64>,
    redirect: bool,
    rate_limit: Option<(u64, u64)>,
}

impl FakeRegistryBuilder {
    /// Adds a blob, served under its sha256 digest from every repository.
    pub fn blob(mut self, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        self.blobs.insert(sha256_digest(&bytes), bytes);
        self
    }

    /// Adds a manifest to `repo` under `reference` (a tag) and under its sha256 digest.
    pub fn manifest(
        mut self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Self {
        let bytes = bytes.into();
        let entry = (media_type.to_owned(), bytes.clone());
        for key in [reference.to_owned(), sha256_digest(&bytes)] {
            self.manifests.insert((repo.to_owned(), key), entry.clone());
        }
        self
    }

    /// Lists `count` tags in `repo` ([`fake_tag`]`(0)` to `fake_tag(count - 1)`, in lexical
    /// order), `page_size` a page unless the client asks for fewer (`n`), each page but the
    /// last with a `Link` to the next. Tag list bodies take [`Fault::Trickle`].
    pub fn tag_list(mut self, repo: &str, count: usize, page_size: usize) -> Self {
        self.tag_lists
            .insert(repo.to_owned(), TagList { count, page_size });
        self
    }

    /// Requires a Bearer token on `/v2/...`; `/token` issues tokens valid for `expires_in`
    /// seconds as far as the client knows (they die only by [`FakeRegistry::expire_tokens`]).
    pub fn bearer_auth(mut self, expires_in: u64) -> Self {
        self.bearer = Some(expires_in);
        self
    }

    /// Answers blob GETs (after auth) with `307` to the storage listener, which serves them
    /// without auth at `/storage/<digest>`. Blob HEADs are answered directly.
    pub fn redirect_blobs(mut self) -> Self {
        self.redirect = true;
        self
    }

    /// Counts manifest `GET`s against a budget of `limit` per `window_secs` window, as Docker
    /// Hub does: every manifest answer (`HEAD` too, which is not counted) carries
    /// `ratelimit-limit: <limit>;w=<window>` and `ratelimit-remaining: <left>;w=<window>`; a
    /// `GET` with nothing left is answered `429` with `Retry-After: 3600`.
    /// [`FakeRegistry::set_remaining`] moves the count.
    pub fn rate_limit(mut self, limit: u64, window_secs: u64) -> Self {
        self.rate_limit = Some((limit, window_secs));
        self
    }

    /// Binds the listener(s) and starts serving.
    pub async fn start(self) -> FakeRegistry {
        let registry = bind().await;
        let url = format!(
            "http://{}",
            registry.local_addr().expect("registry address")
        );
        let storage = if self.redirect {
            Some(bind().await)
        } else {
            None
        };
        let storage_url = storage
            .as_ref()
            .map(|l| format!("http://{}", l.local_addr().expect("storage address")));
        let state = Arc::new(State {
            blobs: self.blobs,
            manifests: self.manifests,
            tag_lists: self.tag_lists,
            bearer: self.bearer,
            realm: format!("{url}/token"),
            storage: storage_url,
            rate_limit: self.rate_limit,
            mutable: Mutex::new(Mutable {
                remaining: self.rate_limit.map(|(limit, _)| limit),
                ..Mutable::default()
            }),
        });
        let mut tasks = vec![tokio::spawn(accept_loop(
            registry,
            Listener::Registry,
            Arc::clone(&state),
        ))];
        if let Some(storage) = storage {
            let state = Arc::clone(&state);
            tasks.push(tokio::spawn(accept_loop(storage, Listener::Storage, state)));
        }
        FakeRegistry { url, state, tasks }
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the fake registry to 127.0.0.1:0")
}

/// A running fake registry; dropping it stops it.
#[derive(Debug)]
pub struct FakeRegistry {
    url: String,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeRegistry {
    /// A builder with no content, no auth, no redirect.
    pub fn builder() -> FakeRegistryBuilder {
        FakeRegistryBuilder::default()
    }

    /// `http://127.0.0.1:PORT` of the registry.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `http://127.0.0.1:PORT` of the storage listener, if blobs are redirected.
    pub fn storage_url(&self) -> Option<&str> {
        self.state.storage.as_deref()
    }

    /// Applies `fault` to every request whose path contains `pattern` (`""`: every request,
    /// `/token` and storage included), from now on. Status and hang faults come before auth;
    /// body faults apply to manifest and blob bodies. Rules are tried in the order they were set; the first match applies.
    pub fn set_fault(&self, pattern: &str, fault: Fault) {
        self.add_rule(pattern, fault, None);
    }

    /// Like [`set_fault`](Self::set_fault), for the next `times` matching requests only.
    pub fn set_fault_times(&self, pattern: &str, fault: Fault, times: usize) {
        self.add_rule(pattern, fault, Some(times));
    }

    fn add_rule(&self, pattern: &str, fault: Fault, remaining: Option<usize>) {
        self.state.lock().rules.push(Rule {
            pattern: pattern.to_owned(),
            fault,
            remaining,
        });
    }

    /// Removes every fault rule: the fake behaves again.
    pub fn clear_faults(&self) {
        self.state.lock().rules.clear();
    }

    /// Every request received so far, on both listeners, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().requests.clone()
    }

    /// How many requests so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Recorded) -> bool) -> usize {
        self.state
            .lock()
            .requests
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// How many tokens `/token` issued.
    pub fn tokens_issued(&self) -> usize {
        self.state.lock().issued
    }

    /// Sets the manifest `GET`s left in the window ([`FakeRegistryBuilder::rate_limit`]).
    pub fn set_remaining(&self, left: u64) {
        self.state.lock().remaining = Some(left);
    }

    /// The manifest `GET`s left in the window.
    pub fn remaining(&self) -> Option<u64> {
        self.state.lock().remaining
    }

    /// Invalidates every token issued so far, as if they had all expired.
    pub fn expire_tokens(&self) {
        self.state.lock().tokens.clear();
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        // Aborting an accept loop drops its JoinSet, which aborts its connections.
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, on: Listener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = Arc::clone(&state);
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, on, req).await) }
                    });
                    // A client going away (or a truncate fault) is not an error worth reporting.
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Records the request, applies a status or hang fault, then routes by listener.
async fn handle(state: &State, on: Listener, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let fault = {
        let mut mutable = state.lock();
        mutable.requests.push(Recorded {
            on,
            method: req.method().clone(),
            path: path.clone(),
            query: req.uri().query().map(str::to_owned),
            headers: req.headers().clone(),
        });
        let rule = mutable
            .rules
            .iter_mut()
            .find(|r| path.contains(&r.pattern) && r.remaining != Some(0));
        rule.map(|rule| {
            rule.remaining = rule.remaining.map(|n| n - 1);
            rule.fault.clone()
        })
    };
    match fault {
        Some(Fault::Hang) => return std::future::pending().await,
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = error(status, "UNKNOWN", "injected fault");
            if let Some(retry_after) = retry_after {
                set(&mut response, header::RETRY_AFTER, &retry_after);
            }
            return response;
        }
        _ => {}
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read only");
    }
    let digest = path.strip_prefix("/storage/").unwrap_or_default();
    match (on, state.blobs.get(digest)) {
        (Listener::Storage, Some(bytes)) => content(&req, bytes, OCTET, digest, fault.as_ref()),
        (Listener::Storage, None) => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob"),
        (Listener::Registry, _) => registry(state, &req, &path, fault.as_ref()),
    }
}

const OCTET: &str = "application/octet-stream";

/// `/token` and `/v2/...`.
fn registry(
    state: &State,
    req: &Request<Incoming>,
    path: &str,
    fault: Option<&Fault>,
) -> Response<Body> {
    if path == "/token" {
        return issue_token(state);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such path");
    };
    let manifest = rest.rsplit_once("/manifests/");
    let blob = rest.rsplit_once("/blobs/");
    if state.bearer.is_some() && !authorized(state, req) {
        let scope = manifest
            .or(blob)
            .map(|(name, _)| format!(",scope=\"repository:{name}:pull\""))
            .unwrap_or_default();
        let challenge = format!(
            "Bearer realm=\"{}\",service=\"{SERVICE}\"{scope}",
            state.realm
        );
        let mut response = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "token required");
        set(&mut response, header::WWW_AUTHENTICATE, &challenge);
        return response;
    }
    if rest.is_empty() {
        return json(StatusCode::OK, Bytes::from_static(b"{}"));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return match state.tag_lists.get(name) {
            Some(list) => list.page(name, req.uri().query(), fault),
            None => manifest_tags(state, name),
        };
    }
    if let Some((name, reference)) = manifest {
        let budget = state.rate_limit.map(|(limit, window)| {
            let mut mutable = state.lock();
            let left = mutable.remaining.unwrap_or(limit);
            let spent = req.method() == Method::GET && left > 0;
            if spent {
                mutable.remaining = Some(left - 1);
            }
            (limit, window, if spent { left - 1 } else { left }, spent)
        });
        let mut response = match state
            .manifests
            .get(&(name.to_owned(), reference.to_owned()))
        {
            Some((media_type, bytes)) => {
                content(req, bytes, media_type, &sha256_digest(bytes), fault)
            }
            None => error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "no such manifest",
            ),
        };
        if let Some((limit, window, left, spent)) = budget {
            if req.method() == Method::GET && !spent {
                response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "You have reached your pull rate limit.",
                );
                set(&mut response, header::RETRY_AFTER, "3600");
            }
            set(
                &mut response,
                "ratelimit-limit",
                &format!("{limit};w={window}"),
            );
            set(
                &mut response,
                "ratelimit-remaining",
                &format!("{left};w={window}"),
            );
        }
        return response;
    }
    if let Some((_, digest)) = blob {
        return match (state.blobs.get(digest), &state.storage) {
            (None, _) => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "no such blob"),
            (Some(_), Some(storage)) if req.method() == Method::GET => {
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                set(
                    &mut response,
                    header::LOCATION,
                    &format!("{storage}/storage/{digest}"),
                );
                response
            }
            (Some(bytes), _) => content(req, bytes, OCTET, digest, fault),
        };
    }
    error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such path")
}

/// The tags of `name`'s manifests (those added under a tag), in one page, lexical order.
fn manifest_tags(state: &State, name: &str) -> Response<Body> {
    let mut tags: Vec<&str> = state
        .manifests
        .keys()
        .filter(|(repo, reference)| repo == name && !reference.starts_with("sha256:"))
        .map(|(_, tag)| tag.as_str())
        .collect();
    if tags.is_empty() {
        return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such repository");
    }
    tags.sort_unstable();
    let body = serde_json::json!({ "name": name, "tags": tags }).to_string();
    json(StatusCode::OK, Bytes::from(body))
}

/// The `i`-th tag of a [`FakeRegistryBuilder::tag_list`]: `t` and 8 digits, so that numeric
/// and lexical order agree.
pub fn fake_tag(i: usize) -> String {
    format!("t{i:08}")
}

/// A tag list made up as it is served.
#[derive(Debug, Clone, Copy)]
struct TagList {
    count: usize,
    page_size: usize,
}

impl TagList {
    /// The page after `last` (a [`fake_tag`]), `n` or `page_size` long.
    fn page(&self, name: &str, query: Option<&str>, fault: Option<&Fault>) -> Response<Body> {
        let param = |key: &str| {
            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let start = param("last")
            .and_then(|last| last.strip_prefix('t')?.parse::<usize>().ok())
            .map_or(0, |last| last + 1)
            .min(self.count);
        let size = param("n")
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(self.page_size, |n| n.min(self.page_size));
        let end = (start + size).min(self.count);
        let tags: Vec<String> = (start..end).map(fake_tag).collect();
        let body = serde_json::json!({ "name": name, "tags": tags }).to_string();
        let mut response = json(StatusCode::OK, Bytes::new());
        if end < self.count && end > start {
            let link = format!(
                "</v2/{name}/tags/list?last={}&n={size}>; rel=\"next\"",
                fake_tag(end - 1)
            );
            set(&mut response, header::LINK, &link);
        }
        set(
            &mut response,
            header::CONTENT_LENGTH,
            &body.len().to_string(),
        );
        *response.body_mut() = shaped(Bytes::from(body), fault);
        response
    }
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    token.is_some_and(|t| state.lock().tokens.contains(t))
}

fn issue_token(state: &State) -> Response<Body> {
    let token = {
        let mut mutable = state.lock();
        mutable.issued += 1;
        let token = format!("fake-token-{}", mutable.issued);
        mutable.tokens.insert(token.clone());
        token
    };
    let expires_in = state.bearer.unwrap_or(60);
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in});
    json(StatusCode::OK, Bytes::from(body.to_string()))
}

/// A manifest or blob answer: headers, `Range`, and the body shaped by `fault`.
fn content(
    req: &Request<Incoming>,
    bytes: &Bytes,
    media_type: &str,
    digest: &str,
    fault: Option<&Fault>,
) -> Response<Body> {
    let len = bytes.len();
    let bytes = match fault {
        Some(Fault::WrongBytes { final_chunk_only }) => corrupt(bytes, *final_chunk_only),
        _ => bytes.clone(),
    };
    let start = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(first, last)| Some((first.parse::<usize>().ok()?, last.parse::<usize>().ok())));
    let mut response = Response::new(full(Bytes::new()));
    let (sent, status) = match start {
        Some((first, last)) if first < len => {
            let end = last.map_or(len, |l| (l + 1).min(len));
            let range = format!("bytes {first}-{}/{len}", end - 1);
            set(&mut response, header::CONTENT_RANGE, &range);
            (bytes.slice(first..end), StatusCode::PARTIAL_CONTENT)
        }
        _ => (bytes, StatusCode::OK),
    };
    *response.status_mut() = status;
    set(
        &mut response,
        header::CONTENT_LENGTH,
        &sent.len().to_string(),
    );
    set(&mut response, header::CONTENT_TYPE, media_type);
    set(&mut response, "docker-content-digest", digest);
    set(&mut response, header::ACCEPT_RANGES, "bytes");
    if req.method() == Method::GET {
        *response.body_mut() = shaped(sent, fault);
    }
    response
}

/// `bytes` with every byte flipped, or only those of the final [`CHUNK`]-sized frame.
fn corrupt(bytes: &Bytes, final_chunk_only: bool) -> Bytes {
    let mut wrong = bytes.to_vec();
    let from = if final_chunk_only {
        wrong.len().saturating_sub(1) / CHUNK * CHUNK
    } else {
        0
    };
    for byte in &mut wrong[from..] {
        *byte ^= 0x5a;
    }
    Bytes::from(wrong)
}

/// A streamed body: frames of [`CHUNK`] bytes, or as [`Fault::Trickle`] or
/// [`Fault::Truncate`] say.
fn shaped(bytes: Bytes, fault: Option<&Fault>) -> Body {
    let (chunk, pause, cut) = match fault {
        Some(Fault::Trickle { bytes, every }) => ((*bytes).max(1), Some(*every), None),
        Some(Fault::Truncate { after }) => (CHUNK, None, Some((*after).min(bytes.len()))),
        _ => (CHUNK, None, None),
    };
    let sent = cut.map_or_else(|| bytes.clone(), |n| bytes.slice(..n));
    let data = (0..sent.len()).step_by(chunk).map(move |at| {
        let frame = Frame::data(sent.slice(at..(at + chunk).min(sent.len())));
        (Ok(frame), pause)
    });
    // An error from the body makes hyper close the connection mid-response; the pause before
    // it lets hyper flush the head and the bytes sent so far.
    let drop_connection = cut.map(|_| {
        let error = std::io::Error::other("truncate fault: dropping the connection");
        (Err(error), Some(Duration::from_millis(100)))
    });
    let frames = stream::iter(data.chain(drop_connection)).then(|(frame, pause)| async move {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        frame
    });
    http_body_util::BodyExt::boxed(StreamBody::new(frames))
}

fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

fn json(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let len = bytes.len().to_string();
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    set(&mut response, header::CONTENT_TYPE, "application/json");
    set(&mut response, header::CONTENT_LENGTH, &len);
    response
}

/// Sets a header; values are built here from digests, numbers and URLs, so always valid.
fn set(response: &mut Response<Body>, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// An OCI JSON error response.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    json(status, Bytes::from(body.to_string()))
}
