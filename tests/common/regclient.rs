//! A small registry HTTP API client for tests: pushes and pulls blobs and
//! manifests, authenticating the way registry clients do when the registry
//! asks (`WWW-Authenticate` on `GET /v2/`): basic credentials, or a Bearer
//! token fetched from the realm for `repository:NAME:ACTIONS` (anonymous when
//! no credentials are given).
//!
//! Its requests carry the User-Agent [`HARNESS_USER_AGENT`] unless told
//! otherwise, which `Upstream`'s request counters leave out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use reqwest::{header, Method, StatusCode};
use sha2::{Digest as _, Sha256};

/// User-Agent of every request the harness itself makes.
pub const HARNESS_USER_AGENT: &str = "regcache-test-harness/1";

/// `Accept` for manifest requests: every manifest type, schema1 last.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
    application/vnd.docker.distribution.manifest.v1+json;q=0.5";

/// Per-request time limit (large uploads included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Time limit for establishing a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request body that can be sent again (after a 401, with a fresh token).
#[derive(Debug, Clone)]
pub enum Payload {
    /// No body.
    Empty,
    /// Bytes in memory.
    Bytes(Bytes),
    /// A file, streamed; `len` is sent as Content-Length.
    File {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
}

/// What `GET /v2/` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// No authentication.
    None,
    /// HTTP basic authentication.
    Basic,
    /// Bearer tokens from `realm` for `service`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// The `service` parameter to send.
        service: String,
    },
}

/// A manifest as served by the registry.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Content-Type of the response.
    pub media_type: String,
    /// The registry's Docker-Content-Digest header (empty if absent).
    pub digest: String,
    /// The raw bytes.
    pub bytes: Bytes,
}

#[derive(Debug)]
struct CachedToken {
    token: String,
    fetched: Instant,
    ttl: Duration,
}

/// A registry API client bound to one registry base URL.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    creds: Option<(String, String)>,
    challenge: tokio::sync::OnceCell<Challenge>,
    tokens: Mutex<HashMap<String, CachedToken>>,
}

impl RegistryClient {
    /// A client for `base_url` (e.g. `http://127.0.0.1:5000`) with optional
    /// `(user, password)`, sending [`HARNESS_USER_AGENT`].
    pub fn new(base_url: &str, creds: Option<(String, String)>) -> Result<RegistryClient> {
        RegistryClient::with_user_agent(base_url, creds, HARNESS_USER_AGENT)
    }

    /// Like [`RegistryClient::new`] with another User-Agent (requests with a
    /// User-Agent other than the harness's are counted by `Upstream`).
    pub fn with_user_agent(
        base_url: &str,
        creds: Option<(String, String)>,
        user_agent: &str,
    ) -> Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .user_agent(user_agent)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(RegistryClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            creds,
            challenge: tokio::sync::OnceCell::new(),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The registry base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends one request to `path_or_url` (a path like `/v2/...` or an
    /// absolute URL such as an upload `Location`), authenticating as needed;
    /// on 401 fetches a fresh token and tries once more.
    pub async fn send(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, &str)],
        payload: &Payload,
    ) -> Result<reqwest::Response> {
        let url = self.absolute(path_or_url);
        let repo = repo_of(&url);
        let mut refresh = false;
        loop {
            let auth = self.authorization(repo.as_deref(), refresh).await?;
            let mut rb = self.http.request(method.clone(), &url);
            for (name, value) in headers {
                rb = rb.header(*name, *value);
            }
            if let Some(auth) = auth {
                rb = rb.header(header::AUTHORIZATION, auth);
            }
            let rb = attach(rb, payload).await?;
            let resp = rb.send().await.with_context(|| format!("{method} {url}"))?;
            let retry = resp.status() == StatusCode::UNAUTHORIZED && !refresh;
            if !retry || *self.challenge().await? == Challenge::None {
                return Ok(resp);
            }
            refresh = true;
        }
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<FetchedManifest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let accept = [(header::ACCEPT.as_str(), ACCEPT_ALL_MANIFESTS)];
        let resp = self
            .send(Method::GET, &path, &accept, &Payload::Empty)
            .await?;
        let resp = expect_status(resp, &[StatusCode::OK], &path).await?;
        let media_type = header_str(&resp, header::CONTENT_TYPE.as_str());
        let digest = header_str(&resp, "docker-content-digest");
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading {path}"))?;
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// The Docker-Content-Digest of `HEAD /v2/<repo>/manifests/<reference>`
    /// with `accept` (HEAD, so that it is not counted as a manifest GET).
    pub async fn head_manifest_digest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> Result<String> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let headers = [(header::ACCEPT.as_str(), accept)];
        let resp = self
            .send(Method::HEAD, &path, &headers, &Payload::Empty)
            .await?;
        let resp = expect_status(resp, &[StatusCode::OK], &path).await?;
        let digest = header_str(&resp, "docker-content-digest");
        if digest.is_empty() {
            bail!("HEAD {path}: no Docker-Content-Digest header");
        }
        Ok(digest)
    }

    /// `GET /v2/<repo>/blobs/<digest>`, checking the bytes hash to `digest`.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Result<Bytes> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self.send(Method::GET, &path, &[], &Payload::Empty).await?;
        let resp = expect_status(resp, &[StatusCode::OK], &path).await?;
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading {path}"))?;
        let got = sha256_digest(&bytes);
        if got != digest {
            bail!("GET {path}: content hashes to {got}");
        }
        Ok(bytes)
    }

    /// Whether `HEAD /v2/<repo>/blobs/<digest>` answers 200.
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self.send(Method::HEAD, &path, &[], &Payload::Empty).await?;
        Ok(resp.status() == StatusCode::OK)
    }

    /// Monolithic upload: `POST /v2/<repo>/blobs/uploads/`, then
    /// `PUT <Location>&digest=<digest>` with the whole body.
    pub async fn upload_blob(&self, repo: &str, digest: &str, payload: &Payload) -> Result<()> {
        let start = format!("/v2/{repo}/blobs/uploads/");
        let resp = self
            .send(Method::POST, &start, &[], &Payload::Empty)
            .await?;
        let resp = expect_status(resp, &[StatusCode::ACCEPTED], &start).await?;
        let location = header_str(&resp, header::LOCATION.as_str());
        if location.is_empty() {
            bail!("POST {start}: no Location header");
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let octets = [(header::CONTENT_TYPE.as_str(), "application/octet-stream")];
        let resp = self.send(Method::PUT, &put, &octets, payload).await?;
        expect_status(resp, &[StatusCode::CREATED], &put).await?;
        Ok(())
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `media_type`; returns the
    /// registry's Docker-Content-Digest (or the sha256 of `bytes` if absent).
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let headers = [(header::CONTENT_TYPE.as_str(), media_type)];
        let payload = Payload::Bytes(Bytes::copy_from_slice(bytes));
        let resp = self.send(Method::PUT, &path, &headers, &payload).await?;
        let resp = expect_status(resp, &[StatusCode::CREATED], &path).await?;
        let digest = header_str(&resp, "docker-content-digest");
        Ok(if digest.is_empty() {
            sha256_digest(bytes)
        } else {
            digest
        })
    }

    /// The challenge of `GET /v2/`, asked once per client.
    pub async fn challenge(&self) -> Result<&Challenge> {
        self.challenge
            .get_or_try_init(|| self.fetch_challenge())
            .await
    }

    async fn fetch_challenge(&self) -> Result<Challenge> {
        let url = format!("{}/v2/", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(Challenge::None);
        }
        let value = header_str(&resp, header::WWW_AUTHENTICATE.as_str());
        parse_challenge(&value).with_context(|| format!("GET {url}: challenge {value:?}"))
    }

    /// The Authorization header value for a request on `repo`, if any.
    async fn authorization(&self, repo: Option<&str>, refresh: bool) -> Result<Option<String>> {
        match self.challenge().await? {
            Challenge::None => Ok(None),
            Challenge::Basic => Ok(self.creds.as_ref().map(|(u, p)| basic(u, p))),
            Challenge::Bearer { realm, service } => {
                let scope = repo.map(|r| format!("repository:{r}:{}", self.actions()));
                let token = self
                    .token(realm, service, scope.as_deref(), refresh)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    fn actions(&self) -> &'static str {
        if self.creds.is_some() {
            "pull,push,delete"
        } else {
            "pull"
        }
    }

    /// A token for `scope`, from the cache while younger than half its TTL.
    async fn token(
        &self,
        realm: &str,
        service: &str,
        scope: Option<&str>,
        refresh: bool,
    ) -> Result<String> {
        let key = scope.unwrap_or("").to_owned();
        if !refresh {
            if let Some(token) = self.cached_token(&key) {
                return Ok(token);
            }
        }
        let fresh = self.fetch_token(realm, service, scope).await?;
        let token = fresh.token.clone();
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(key, fresh);
        }
        Ok(token)
    }

    fn cached_token(&self, key: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        let cached = tokens.get(key)?;
        (cached.fetched.elapsed() < cached.ttl / 2).then(|| cached.token.clone())
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: &str,
        scope: Option<&str>,
    ) -> Result<CachedToken> {
        let mut url = url::Url::parse(realm).with_context(|| format!("token realm {realm:?}"))?;
        url.query_pairs_mut().append_pair("service", service);
        if let Some(scope) = scope {
            url.query_pairs_mut().append_pair("scope", scope);
        }
        let mut rb = self.http.get(url);
        if let Some((user, password)) = &self.creds {
            rb = rb.basic_auth(user, Some(password));
        }
        let resp = rb.send().await.with_context(|| format!("GET {realm}"))?;
        let resp = expect_status(resp, &[StatusCode::OK], realm).await?;
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .context("token response without token")?;
        let ttl = body["expires_in"].as_u64().unwrap_or(60);
        Ok(CachedToken {
            token: token.to_owned(),
            fetched: Instant::now(),
            ttl: Duration::from_secs(ttl),
        })
    }

    fn absolute(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Parses `Bearer realm="..",service=".."` or `Basic realm=".."`.
pub fn parse_challenge(value: &str) -> Result<Challenge> {
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        bail!("unknown authentication scheme {scheme:?}");
    }
    let params = parse_auth_params(params);
    let realm = params
        .get("realm")
        .context("Bearer challenge without realm")?;
    Ok(Challenge::Bearer {
        realm: realm.clone(),
        service: params.get("service").cloned().unwrap_or_default(),
    })
}

/// `key="value", key=value` pairs (quoted values may hold commas).
fn parse_auth_params(params: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(key, value.to_owned());
        rest = tail.trim_start_matches([',', ' ']);
    }
    out
}

/// The repository named in a `/v2/<name>/(manifests|blobs|tags|referrers)/`
/// URL, if any.
pub fn repo_of(url: &str) -> Option<String> {
    let path = url::Url::parse(url).ok()?.path().to_owned();
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()
        .map(|end| rest[..end].to_owned())
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

async fn attach(rb: reqwest::RequestBuilder, payload: &Payload) -> Result<reqwest::RequestBuilder> {
    Ok(match payload {
        Payload::Empty => rb,
        Payload::Bytes(bytes) => rb.body(bytes.clone()),
        Payload::File { path, len } => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
            rb.header(header::CONTENT_LENGTH, *len)
                .body(reqwest::Body::wrap_stream(stream))
        }
    })
}

/// The response if its status is one of `ok`, else an error with the body.
pub async fn expect_status(
    resp: reqwest::Response,
    ok: &[StatusCode],
    what: &str,
) -> Result<reqwest::Response> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    bail!(
        "{what}: HTTP {status}: {}",
        body.chars().take(500).collect::<String>()
    )
}

/// A response header as a string (empty if absent or not text).
pub fn header_str(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}
