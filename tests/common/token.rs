//! An in-process Docker-style token server (the "Docker Hub flow").
//!
//! A client that gets `401` with `WWW-Authenticate: Bearer realm=..,service=..`
//! from the registry calls `GET /token?service=S&scope=repository:NAME:pull`
//! (optionally with HTTP basic credentials) and receives
//! `{"token", "access_token", "expires_in", "issued_at"}`. The token is an RS256
//! JWT whose header carries the signing certificate in `x5c`; CNCF
//! Distribution 2.8 verifies it against its `rootcertbundle`, which is the same
//! self-signed certificate ([`TokenServer::cert_pem`]).
//!
//! Policy: the configured user gets every action it asks for; each reader
//! ([`TokenReader`]) gets `pull` on the repositories under its prefixes and
//! nothing else (a token without that access: the registry answers `401`);
//! anonymous requests get `pull` only (unless `anonymous_pull` is off); wrong
//! credentials get `401`. Listens on `127.0.0.1` on a port picked by the kernel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, KeyPair, RsaKeySize, SigningKey, PKCS_RSA_SHA256};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The `service` the registry names in its challenge and the token's `aud`.
pub const SERVICE: &str = "regcache-test-registry";
/// The token's `iss`, configured as the registry's `auth.token.issuer`.
pub const ISSUER: &str = "regcache-test-issuer";
/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/token";

/// What the token server accepts and how long its tokens live.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// The one user that may authenticate.
    pub user: String,
    /// That user's password.
    pub password: String,
    /// Token lifetime (`exp - iat` and `expires_in`), seconds.
    pub ttl_secs: u64,
    /// Whether anonymous requests get `pull` (true) or nothing (false).
    pub anonymous_pull: bool,
    /// Users who may only pull, each under its own prefixes.
    pub readers: Vec<TokenReader>,
}

/// A user who may pull the repositories under some prefixes, and nothing else.
#[derive(Debug, Clone)]
pub struct TokenReader {
    /// The user name.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Repository prefixes it may pull (`team-a/`).
    pub pull: Vec<String>,
}

/// One `access` claim entry of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    /// Resource type, usually `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name, e.g. `test/small-oci`.
    pub name: String,
    /// Granted actions, e.g. `["pull"]`.
    pub actions: Vec<String>,
}

/// A record of one token handed out.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The authenticated user, empty for anonymous tokens.
    pub subject: String,
    /// What the token grants.
    pub access: Vec<Access>,
}

/// Shared by all connections of one server.
struct State {
    config: TokenConfig,
    key: &'static KeyPair,
    /// Base64 (standard) DER of the certificate, for the `x5c` header.
    x5c: String,
    issued: Mutex<Vec<IssuedToken>>,
    serial: AtomicUsize,
}

/// A running token server; dropping it stops it.
pub struct TokenServer {
    addr: SocketAddr,
    cert_pem: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .field("tokens_issued", &self.tokens_issued())
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts a token server on `127.0.0.1:0` with a fresh self-signed
    /// certificate (the RSA key is generated once per test process).
    pub async fn start(config: TokenConfig) -> Result<TokenServer> {
        let key = signing_key()?;
        let cert = self_signed_cert(key)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the token server to 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            key,
            x5c: STANDARD.encode(cert.der()),
            issued: Mutex::new(Vec::new()),
            serial: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(TokenServer {
            addr,
            cert_pem: cert.pem(),
            state,
            task,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm URL, `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// PEM of the signing certificate (the registry's `rootcertbundle`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// How many tokens were issued so far (anonymous ones included).
    pub fn tokens_issued(&self) -> usize {
        self.issued().len()
    }

    /// Every token issued so far, oldest first.
    pub fn issued(&self) -> Vec<IssuedToken> {
        self.state
            .issued
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task too.
        self.task.abort();
    }
}

/// The process-wide RSA-2048 key (key generation is the slow part).
fn signing_key() -> Result<&'static KeyPair> {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    if let Some(key) = KEY.get() {
        return Ok(key);
    }
    let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)
        .context("generating the token server's RSA key")?;
    Ok(KEY.get_or_init(|| key))
}

/// A self-signed certificate for `key` (leaf and root at once).
fn self_signed_cert(key: &KeyPair) -> Result<rcgen::Certificate> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "regcache-test-token-issuer");
    params
        .self_signed(key)
        .context("self-signing the token certificate")
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    conns.spawn(serve_conn(stream, Arc::clone(&state)));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(stream: TcpStream, state: Arc<State>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, &req)) }
    });
    // A client that goes away mid-request is not an error worth reporting.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Answers one request to the token server.
fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != TOKEN_PATH {
        return json(
            StatusCode::NOT_FOUND,
            &error_body("NOT_FOUND", "no such path"),
        );
    }
    let query = req.uri().query().unwrap_or("");
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let service_ok = pairs
        .iter()
        .all(|(k, v)| k != "service" || v.is_empty() || v == SERVICE);
    if !service_ok {
        return json(
            StatusCode::BAD_REQUEST,
            &error_body("UNSUPPORTED", "unknown service"),
        );
    }
    let Ok(user) = authenticate(&state.config, req) else {
        let mut resp = json(
            StatusCode::UNAUTHORIZED,
            &error_body("UNAUTHORIZED", "bad credentials"),
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"regcache-test-token\""),
        );
        return resp;
    };
    let scopes = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.as_str());
    let access = grant(&state.config, user.as_deref(), scopes);
    match issue(state, user.unwrap_or_default(), access) {
        Ok(body) => json(StatusCode::OK, &body),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error_body("INTERNAL", &format!("{e:#}")),
        ),
    }
}

/// `Ok(Some(user))` for valid credentials, `Ok(None)` for none, `Err` for wrong ones.
fn authenticate(config: &TokenConfig, req: &Request<Incoming>) -> Result<Option<String>, ()> {
    let Some(value) = req.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, encoded) = value.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(());
    }
    let raw = STANDARD.decode(encoded.trim()).map_err(|_| ())?;
    let raw = String::from_utf8(raw).map_err(|_| ())?;
    let (user, password) = raw.split_once(':').ok_or(())?;
    let reader = config
        .readers
        .iter()
        .any(|r| r.user == user && r.password == password);
    if (user == config.user && password == config.password) || reader {
        Ok(Some(user.to_owned()))
    } else {
        Err(())
    }
}

/// The access entries granted for the requested scopes
/// (`type:name:actions`, several per parameter when space separated).
fn grant<'a>(
    config: &TokenConfig,
    user: Option<&str>,
    scopes: impl Iterator<Item = &'a str>,
) -> Vec<Access> {
    scopes
        .flat_map(|s| s.split(' '))
        .filter_map(parse_scope)
        .filter_map(|mut access| {
            match user {
                None => {
                    let allowed = config.anonymous_pull;
                    access.actions.retain(|a| allowed && a == "pull");
                }
                Some(user) if user != config.user => {
                    let allowed = config.readers.iter().any(|r| {
                        r.user == user && r.pull.iter().any(|p| access.name.starts_with(p.as_str()))
                    });
                    access.actions.retain(|a| allowed && a == "pull");
                }
                Some(_) => {}
            }
            (!access.actions.is_empty()).then_some(access)
        })
        .collect()
}

/// Parses `repository:name/with/slashes:pull,push`.
fn parse_scope(scope: &str) -> Option<Access> {
    let (rest, actions) = scope.rsplit_once(':')?;
    let (kind, name) = rest.split_once(':')?;
    let actions = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    Some(Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions,
    })
}

/// Signs a token for `subject`, records it, and returns the response body.
fn issue(state: &State, subject: String, access: Vec<Access>) -> Result<serde_json::Value> {
    let now = unix_now();
    let ttl = state.config.ttl_secs;
    let serial = state.serial.fetch_add(1, Ordering::Relaxed);
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + ttl,
        "nbf": now.saturating_sub(1),
        "iat": now,
        "jti": format!("regcache-test-{now}-{serial}"),
        "access": access,
    });
    let token = sign_jwt(state, &claims)?;
    if let Ok(mut issued) = state.issued.lock() {
        issued.push(IssuedToken { subject, access });
    }
    Ok(serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": rfc3339(now),
    }))
}

/// `header.claims.signature`, RS256, with the certificate in `x5c`.
fn sign_jwt(state: &State, claims: &serde_json::Value) -> Result<String> {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [state.x5c]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    );
    let signature = state
        .key
        .sign(signing_input.as_bytes())
        .map_err(|e| anyhow!("RS256 signing failed: {e}"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the epoch as RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SSZ`), the
/// format Go clients (skopeo, containerd) parse `issued_at` with.
fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (proleptic calendar,
/// 400-year eras of 146 097 days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"errors": [{"code": code, "message": message}]})
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
