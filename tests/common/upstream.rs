//! A real upstream registry: CNCF Distribution 2.8 (`docker-registry`) as a
//! child process on `127.0.0.1:0` (it logs the port it got), storage in a temporary directory,
//! optionally behind basic auth (bcrypt htpasswd) or token auth (the
//! in-process [`TokenServer`]).
//!
//! # Request counting
//!
//! Distribution writes one access-log line per request to its stdout, in the
//! Apache combined format, after the handler finished:
//!
//! ```text
//! 127.0.0.1 - - [23/Nov/2026:10:45:14 +0000] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 4242 "" "UA"
//! ```
//!
//! stdout goes straight to `access.log` in the temp dir (appended across
//! restarts); stderr (the application log, `level=info`) to `registry.log`.
//! The counters parse `access.log`; they wait until the file has stopped
//! growing for a moment first, because the line is written just *after* the
//! last response byte was sent. Requests made by the harness itself (User-Agent
//! [`HARNESS_USER_AGENT`]: readiness probes, pushes, push verification) and
//! the skopeo run that makes the schema1 image are not counted, so right after
//! `push_standard` every counter is 0. [`Upstream::access_log`] has every line.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use super::regclient::{RegistryClient, HARNESS_USER_AGENT};
use super::require_tool;
pub use super::token::TokenReader;
use super::token::{TokenConfig, TokenServer, ISSUER, SERVICE};

/// How long to wait for `GET /v2/` to answer after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The access log counts as settled once it has not grown for this long.
const LOG_SETTLE: Duration = Duration::from_millis(25);
/// Upper bound of the wait for the access log to settle.
const LOG_SETTLE_MAX: Duration = Duration::from_secs(2);
/// bcrypt cost of the htpasswd entry (4 is the minimum Go accepts; fast).
const BCRYPT_COST: u32 = 4;

/// How the upstream authenticates clients.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Open registry.
    None,
    /// HTTP basic auth (htpasswd, bcrypt).
    Basic {
        /// The only user.
        user: String,
        /// Its password.
        password: String,
    },
    /// Docker token auth: `user` may pull and push, readers pull under their prefixes,
    /// anonymous clients pull when `anonymous_pull`.
    Token {
        /// The user who pushes.
        user: String,
        /// Its password.
        password: String,
        /// Token lifetime in seconds.
        ttl_secs: u64,
        /// Users who may pull only under their prefixes.
        readers: Vec<TokenReader>,
        /// Whether anonymous clients may pull.
        anonymous_pull: bool,
    },
}

impl Auth {
    /// `Auth::Basic` with the harness's default user `harness`/`harness-pw`.
    pub fn basic() -> Auth {
        Auth::Basic {
            user: "harness".into(),
            password: "harness-pw".into(),
        }
    }

    /// `Auth::Token` with the default user and `ttl_secs`.
    pub fn token(ttl_secs: u64) -> Auth {
        Auth::Token {
            user: "harness".into(),
            password: "harness-pw".into(),
            ttl_secs,
            readers: Vec::new(),
            anonymous_pull: true,
        }
    }

    /// `Auth::Token` where `readers` pull under their prefixes and anonymous clients get
    /// nothing: an upstream whose users have different rights.
    pub fn token_readers(readers: Vec<TokenReader>) -> Auth {
        Auth::Token {
            user: "harness".into(),
            password: "harness-pw".into(),
            ttl_secs: 300,
            readers,
            anonymous_pull: false,
        }
    }

    fn creds(&self) -> Option<(String, String)> {
        match self {
            Auth::None => None,
            Auth::Basic { user, password } | Auth::Token { user, password, .. } => {
                Some((user.clone(), password.clone()))
            }
        }
    }
}

/// One parsed access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// HTTP method.
    pub method: String,
    /// Request path, without the query string.
    pub path: String,
    /// Query string (without `?`), empty if none.
    pub query: String,
    /// Response status.
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    /// The client's User-Agent (empty if none).
    pub user_agent: String,
}

impl AccessEntry {
    /// Whether the harness itself made this request.
    pub fn is_harness(&self) -> bool {
        self.user_agent.starts_with(HARNESS_USER_AGENT)
    }
}

/// A running (or stopped) Distribution registry; dropping it kills it.
pub struct Upstream {
    dir: TempDir,
    port: u16,
    auth: Auth,
    token: Option<TokenServer>,
    child: Option<Child>,
    /// Ports of stopped registries, held bound (never listening) so that connections to them
    /// are refused and no other test's listener gets them while a proxy still points there.
    held_ports: Vec<tokio::net::TcpSocket>,
    /// Access-log line ranges left out of the counters (e.g. skopeo's).
    ignored: Mutex<Vec<Range<usize>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr())
            .field("dir", &self.dir.path())
            .field("auth", &self.auth)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Starts a registry with `auth` on a port the kernel chooses and waits (at most 15 s)
    /// until `GET /v2/` answers. Panics with the registry's log on failure.
    pub async fn start(auth: Auth) -> Upstream {
        Upstream::try_start(auth)
            .await
            .unwrap_or_else(|e| panic!("starting the upstream registry: {e:#}"))
    }

    /// [`Upstream::start`] returning errors.
    pub async fn try_start(auth: Auth) -> Result<Upstream> {
        require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("regcache-upstream-")
            .tempdir()
            .context("creating the upstream's temp dir")?;
        std::fs::create_dir_all(dir.path().join("storage"))?;
        std::fs::create_dir_all(dir.path().join("auth"))?;
        let token = start_token_server(&auth).await?;
        let mut up = Upstream {
            dir,
            port: 0,
            auth,
            token,
            child: None,
            held_ports: Vec::new(),
            ignored: Mutex::new(Vec::new()),
        };
        up.write_auth_files()?;
        up.spawn_and_wait().await?;
        Ok(up)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `(user, password)` for basic and token auth, `None` for an open registry.
    pub fn creds(&self) -> Option<(String, String)> {
        self.auth.creds()
    }

    /// The authentication mode.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The token server (only with `Auth::Token`).
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// The temp dir holding `config.yml`, `storage/`, `auth/`, the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The storage root (kept across stop/restart).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Path of the access log (one line per request).
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Path of the application log (stderr).
    pub fn registry_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Whether the registry process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A harness client with this upstream's credentials (its requests are
    /// not counted).
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), self.creds()).expect("building a registry client")
    }

    /// Kills the registry and waits for it; storage and logs stay. Its port stays the test's
    /// (bound, not listening): connections to it are refused.
    pub async fn stop(&mut self) {
        self.kill_child();
        self.hold_port();
    }

    /// Freezes the registry (SIGSTOP): connections are still accepted by the
    /// kernel but never answered, like a hanging upstream. [`Upstream::thaw`]
    /// resumes it; drop and [`Upstream::stop`] kill it either way.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
    }

    /// Resumes a frozen registry (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&mut self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .expect("the upstream is not running");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// Starts the registry again with the same storage (stopping it first if it runs), on a
    /// new port: [`Upstream::url`] changes. Waits until it answers (at most 15 s).
    ///
    /// Not the same port: Distribution binds its own socket (it cannot be handed one), and a
    /// port the kernel chose is in the ephemeral range, where any outgoing connection may take
    /// it while the registry is down. No test needs the old address back (the one that restarts
    /// it, in `harness_smoke.rs`, asks again at the new `url()`); one that did would need a
    /// forwarder of its own in front, on a listener it keeps.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.kill_child();
            self.hold_port();
        }
        self.spawn_and_wait()
            .await
            .unwrap_or_else(|e| panic!("restarting the upstream (was {}): {e:#}", self.addr()));
    }

    /// GETs of `/v2/<any>/blobs/<digest>` answered 200 or 206.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.count(|e| {
            e.method == "GET" && e.path.ends_with(&suffix) && matches!(e.status, 200 | 206)
        })
    }

    /// GETs of `/v2/<any>/manifests/<reference_or_digest>` answered 200.
    pub fn manifest_gets(&self, reference_or_digest: &str) -> usize {
        let suffix = format!("/manifests/{reference_or_digest}");
        self.count(|e| e.method == "GET" && e.path.ends_with(&suffix) && e.status == 200)
    }

    /// Every request so far, except the harness's own.
    pub fn request_count(&self) -> usize {
        self.count(|_| true)
    }

    /// Counted (non-harness) requests matching `pred`.
    pub fn count(&self, pred: impl Fn(&AccessEntry) -> bool) -> usize {
        self.counted_entries().iter().filter(|e| pred(e)).count()
    }

    /// Counted (non-harness) requests, oldest first.
    pub fn counted_entries(&self) -> Vec<AccessEntry> {
        let ignored = self.ignored.lock().map(|v| v.clone()).unwrap_or_default();
        self.access_log()
            .into_iter()
            .enumerate()
            .filter(|(i, e)| !e.is_harness() && !ignored.iter().any(|r| r.contains(i)))
            .map(|(_, e)| e)
            .collect()
    }

    /// Every access-log line so far (harness requests included), oldest
    /// first, after waiting for the log to settle (at most 2 s).
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text = read_settled(&self.access_log_path());
        complete_lines(&text)
            .filter_map(parse_access_line)
            .collect()
    }

    /// Waits (polling, at most `timeout`) until `blob_gets(digest) >= at_least`;
    /// returns the last count.
    pub async fn wait_blob_gets(&self, digest: &str, at_least: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.blob_gets(digest);
            if n >= at_least || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `work` and leaves the requests logged meanwhile out of the
    /// counters (for harness work done by other clients, e.g. skopeo).
    /// Note: `work` must not have started yet (tokio's `Command::output()`
    /// spawns at the call, not at the first poll: wrap it in `async {}`).
    pub async fn uncounted<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let start = self.access_log().len();
        let out = work.await;
        let end = self.access_log().len();
        if let Ok(mut ignored) = self.ignored.lock() {
            ignored.push(start..end);
        }
        out
    }

    /// The last `n` lines of the application log (for failure messages).
    pub fn registry_log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.registry_log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Starts `docker-registry` on `127.0.0.1:0` and learns its port from its log.
    async fn spawn_and_wait(&mut self) -> Result<()> {
        self.write_config()?;
        let config = self.dir.path().join("config.yml");
        // This start's lines of the log (appended across restarts) begin here.
        let log_start = std::fs::metadata(self.registry_log_path()).map_or(0, |m| m.len());
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(self.append_log("access.log")?)
            .stderr(self.append_log("registry.log")?)
            .spawn()
            .context("spawning docker-registry")?;
        self.child = Some(child);
        if let Err(e) = self.wait_ready(log_start).await {
            self.kill_child();
            let tail = self.registry_log_tail(20);
            bail!("{e:#}\n--- registry.log (tail) ---\n{tail}");
        }
        Ok(())
    }

    fn append_log(&self, name: &str) -> Result<File> {
        let path = self.dir.path().join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// Waits (at most 15 s in all) for the `listening on 127.0.0.1:PORT` line that Distribution
    /// logs once its socket listens (with the port the kernel chose), then for the answer to
    /// `GET /v2/`.
    async fn wait_ready(&mut self, log_start: u64) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        self.port = loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("docker-registry exited early ({status})");
            }
            let log = std::fs::read(self.registry_log_path()).unwrap_or_default();
            let this_start = log.get(usize::try_from(log_start)?..).unwrap_or_default();
            if let Some(port) = listening_port(&String::from_utf8_lossy(this_start)) {
                break port;
            }
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not log `listening on` within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let probe = reqwest::Client::builder()
            .no_proxy()
            .user_agent(format!("{HARNESS_USER_AGENT} probe"))
            .timeout(deadline.saturating_duration_since(Instant::now()))
            .build()?;
        let url = format!("{}/v2/", self.url());
        let resp = probe
            .get(&url)
            .send()
            .await
            .with_context(|| format!("{url} did not answer"))?;
        ensure!(
            resp.headers()
                .contains_key("docker-distribution-api-version"),
            "{url} answered, but not as a Distribution registry"
        );
        Ok(())
    }

    /// Best effort: a registry's connections in TIME_WAIT do not stop it (`SO_REUSEADDR`).
    fn hold_port(&mut self) {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        let bound = socket
            .set_reuseaddr(true)
            .and_then(|()| socket.bind(([127, 0, 0, 1], self.port).into()));
        if bound.is_ok() {
            self.held_ports.push(socket);
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn write_config(&self) -> Result<()> {
        let yaml = config_yaml(self.dir.path(), &self.auth_yaml());
        let path = self.dir.path().join("config.yml");
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    fn auth_yaml(&self) -> String {
        let auth_dir = self.dir.path().join("auth");
        match (&self.auth, &self.token) {
            (Auth::None, _) => String::new(),
            (Auth::Basic { .. }, _) => format!(
                "auth:\n  htpasswd:\n    realm: regcache-test-basic\n    path: {}\n",
                auth_dir.join("htpasswd").display()
            ),
            (Auth::Token { .. }, Some(token)) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                token.realm(),
                auth_dir.join("token.crt").display()
            ),
            (Auth::Token { .. }, None) => String::new(),
        }
    }

    /// The htpasswd file (basic) or the token certificate (token).
    fn write_auth_files(&self) -> Result<()> {
        let auth_dir = self.dir.path().join("auth");
        if let Auth::Basic { user, password } = &self.auth {
            let hash = bcrypt::hash(password, BCRYPT_COST).context("bcrypt")?;
            let mut f = File::create(auth_dir.join("htpasswd"))?;
            writeln!(f, "{user}:{hash}")?;
        }
        if let Some(token) = &self.token {
            std::fs::write(auth_dir.join("token.crt"), token.cert_pem())?;
        }
        Ok(())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill_child();
        if std::thread::panicking() {
            eprintln!(
                "upstream {} (dir {}) registry.log tail:\n{}",
                self.addr(),
                self.dir.path().display(),
                self.registry_log_tail(15)
            );
        }
    }
}

async fn start_token_server(auth: &Auth) -> Result<Option<TokenServer>> {
    let Auth::Token {
        user,
        password,
        ttl_secs,
        readers,
        anonymous_pull,
    } = auth
    else {
        return Ok(None);
    };
    let config = TokenConfig {
        user: user.clone(),
        password: password.clone(),
        ttl_secs: *ttl_secs,
        anonymous_pull: *anonymous_pull,
        readers: readers.clone(),
    };
    Ok(Some(TokenServer::start(config).await?))
}

/// The port in Distribution's `listening on 127.0.0.1:PORT` log line, if it is in `log`.
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once("listening on 127.0.0.1:")?;
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse().ok().filter(|port| *port != 0)
    })
}

/// Distribution's config: filesystem storage, deletes and schema1 enabled,
/// `info` text logging, no upload purging, 127.0.0.1 only, port chosen by the
/// kernel; layers with `http(s)` `urls` (foreign, non-distributable) accepted,
/// as Docker Hub does.
fn config_yaml(dir: &Path, auth_yaml: &str) -> String {
    let storage = dir.join("storage");
    format!(
        "version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: upstream
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:0
  secret: regcache-test-upstream-secret
  headers:
    X-Content-Type-Options: [nosniff]
compatibility:
  schema1:
    enabled: true
validation:
  manifests:
    urls:
      allow:
        - ^https?://
{auth_yaml}",
        storage = storage.display()
    )
}

/// The file's content once it has not grown for [`LOG_SETTLE`]
/// (bounded by [`LOG_SETTLE_MAX`]).
fn read_settled(path: &Path) -> String {
    let deadline = Instant::now() + LOG_SETTLE_MAX;
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    loop {
        std::thread::sleep(LOG_SETTLE);
        let again = std::fs::read_to_string(path).unwrap_or_default();
        if again.len() == text.len() || Instant::now() >= deadline {
            return again;
        }
        text = again;
    }
}

/// Lines ended by `\n` (a line being written is left out).
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// Parses a combined-format line:
/// `HOST - USER [TIME] "METHOD URI PROTO" STATUS BYTES "REFERER" "UA"`.
pub fn parse_access_line(line: &str) -> Option<AccessEntry> {
    let (_, rest) = line.split_once(" \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_owned();
    let uri = parts.next()?;
    let mut fields = rest.split(' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    let user_agent = rest
        .trim_end()
        .strip_suffix('"')
        .and_then(|s| s.rsplit_once(" \""))
        .map(|(_, ua)| ua.to_owned())
        .unwrap_or_default();
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    Some(AccessEntry {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        status,
        bytes,
        user_agent,
    })
}
