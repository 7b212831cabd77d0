//! The proxy under test: the real `regcache` binary started as a child process with a config
//! file written here, plus `skopeo` helpers that pull through it and verify what arrived.
//!
//! The test binds the proxy's listeners (`127.0.0.1:0`) and hands them in by socket activation
//! ([`activated_regcache`]): the port is known before the child starts, stays across restarts
//! (the test keeps the socket open; connections made meanwhile wait in its backlog), and no
//! other process can take it.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_fds::{CommandFdExt as _, FdMapping};
use sha2::{Digest as _, Sha256};
use tokio::process::{Child, Command};

/// How long a (re)started proxy may take to answer its first `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A listener on `127.0.0.1`, port chosen by the kernel, to hand to a child process.
pub fn bind_local() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// The address of a listener bound here.
pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("the listener's address")
}

/// A `regcache` command (add its arguments) that is handed `sockets` by socket activation, as
/// systemd does: fds 3, 4... in order, `LISTEN_FDS`, `LISTEN_FDNAMES` (the names given,
/// `metrics` for the metrics listener) and `LISTEN_PID`. The pid is known only once the child
/// runs, so a shell sets it to its own (`$$`) and then `exec`s regcache, which keeps that pid.
pub fn activated_regcache(sockets: &[(&str, &TcpListener)]) -> Command {
    activated(&[], Path::new(env!("CARGO_BIN_EXE_regcache")), sockets)
}

/// [`activated_regcache`] for the regcache binary at `binary`, run through `wrapper` (a
/// command that runs its arguments, e.g. `setpriv` to change user; empty for none).
pub fn activated(wrapper: &[&str], binary: &Path, sockets: &[(&str, &TcpListener)]) -> Command {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg("/bin/sh");
            command
        }
        None => Command::new("/bin/sh"),
    };
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(binary)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env(
            "LISTEN_FDNAMES",
            sockets
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(":"),
        );
    let mappings = sockets
        .iter()
        .zip(3..)
        .map(|((name, listener), child_fd)| FdMapping {
            parent_fd: OwnedFd::from(
                listener
                    .try_clone()
                    .unwrap_or_else(|e| panic!("duplicate the {name} listener: {e}")),
            ),
            child_fd,
        })
        .collect();
    command
        .fd_mappings(mappings)
        .expect("one descriptor per child fd");
    command
}

/// One `[[upstream]]` of the proxy's config.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub name: String,
    pub url: String,
    pub default: bool,
    /// Extra TOML lines for this upstream (credentials, offline, timeouts).
    pub extra: String,
}

impl UpstreamSpec {
    /// The default upstream named `name`, at `url`.
    pub fn default_at(name: &str, url: &str) -> Self {
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            default: true,
            extra: String::new(),
        }
    }

    /// A non-default upstream.
    pub fn named(name: &str, url: &str) -> Self {
        Self {
            default: false,
            ..Self::default_at(name, url)
        }
    }

    /// Adds TOML lines (e.g. `username = "u"`).
    pub fn with(mut self, line: &str) -> Self {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// A running regcache. Drop kills it.
#[derive(Debug)]
pub struct TestProxy {
    child: Option<Child>,
    /// Handed to every start of the child (`server.listen` names its address).
    listener: TcpListener,
    /// Handed in as `metrics` when set ([`TestProxy::bind_metrics_listener`]).
    metrics_listener: Option<TcpListener>,
    dir: tempfile::TempDir,
    storage: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    /// The CA of the proxy's TLS certificate, when it serves TLS.
    tls_ca: Option<PathBuf>,
}

impl TestProxy {
    /// Starts regcache with these upstreams and extra top-level TOML (e.g. a `[cache]` table).
    pub async fn start(upstreams: &[UpstreamSpec], extra_toml: &str) -> TestProxy {
        Self::start_with_storage(upstreams, extra_toml, None).await
    }

    /// Like [`TestProxy::start`], with the store at `storage` instead of a temp directory.
    pub async fn start_with_storage(
        upstreams: &[UpstreamSpec],
        extra_toml: &str,
        storage: Option<PathBuf>,
    ) -> TestProxy {
        Self::start_full(upstreams, "", extra_toml, storage, None).await
    }

    /// Like [`TestProxy::start`], with extra `[server]` lines; with `tls_ca` (the CA of the
    /// certificate those lines configure) it is reached over HTTPS.
    pub async fn start_with_server(
        upstreams: &[UpstreamSpec],
        server_lines: &str,
        extra_toml: &str,
        tls_ca: Option<PathBuf>,
    ) -> TestProxy {
        Self::start_full(upstreams, server_lines, extra_toml, None, tls_ca).await
    }

    async fn start_full(
        upstreams: &[UpstreamSpec],
        server_lines: &str,
        extra_toml: &str,
        storage: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
    ) -> TestProxy {
        let dir = tempfile::tempdir().expect("temp dir for the proxy");
        let storage = storage.unwrap_or_else(|| dir.path().join("data"));
        let listener = bind_local();
        let port = local_addr(&listener).port();
        let config = config_text(port, &storage, upstreams, server_lines, extra_toml);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write proxy config");
        let log_path = dir.path().join("regcache.log");
        let mut proxy = TestProxy {
            child: None,
            listener,
            metrics_listener: None,
            dir,
            storage,
            config_path,
            log_path,
            tls_ca,
        };
        proxy.spawn().await;
        proxy
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open proxy log");
        let mut sockets = vec![("http", &self.listener)];
        if let Some(metrics) = &self.metrics_listener {
            sockets.push(("metrics", metrics));
        }
        let mut child = activated_regcache(&sockets)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,regcache=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn regcache");
        // The socket listens already: the first request waits in its backlog until regcache
        // accepts it, unless regcache exits first.
        let probe = self
            .client()
            .get(format!("{}/v2/", self.url()))
            .timeout(READY_TIMEOUT)
            .send();
        tokio::select! {
            answer = probe => {
                if let Err(err) = answer {
                    panic!("regcache did not answer GET /v2/ ({err}); log:\n{}", self.log());
                }
            }
            status = child.wait() => {
                panic!("regcache exited before answering ({status:?}); log:\n{}", self.log());
            }
        }
        self.child = Some(child);
    }

    /// Binds a metrics listener on `127.0.0.1:0`, handed in as `metrics` from the next
    /// (re)start on; its address, for `server.metrics_listen`.
    pub fn bind_metrics_listener(&mut self) -> SocketAddr {
        let listener = bind_local();
        let address = local_addr(&listener);
        self.metrics_listener = Some(listener);
        address
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        local_addr(&self.listener).to_string()
    }

    /// `http://127.0.0.1:PORT` (`https://` when the proxy serves TLS)
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr())
    }

    /// A client for the proxy (trusting its CA when it serves TLS).
    pub fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).expect("read the proxy's CA");
            builder =
                builder.tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("a PEM CA")]);
        }
        builder.build().expect("build a client")
    }

    /// The process id, for signals.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The storage directory.
    pub fn storage(&self) -> PathBuf {
        self.storage.clone()
    }

    /// The config file the proxy runs with (for the CLI's maintenance commands).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Pulls `reference` (`repo:tag` or `repo@digest`, as a client names it) through the proxy
    /// with `skopeo copy --all` and verifies every digest against `expected_digest`. Returns
    /// the number of blob files copied.
    pub async fn pull_verified(&self, reference: &str, expected_digest: &str) -> usize {
        let dest = tempfile::tempdir().expect("temp dir for the copy");
        let (ok, stderr) =
            skopeo_copy(&format!("{}/{reference}", self.addr()), dest.path(), &[]).await;
        assert!(
            ok,
            "skopeo pull of {reference} failed: {stderr}\nproxy log:\n{}",
            self.log()
        );
        verify_dir(dest.path(), expected_digest)
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.client()
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// SIGTERM, then wait (bounded) for exit; returns whether it exited cleanly. The listener
    /// stays the test's: connections made while regcache is down are not refused but wait in
    /// its backlog for the next start (await such clients only after a restart).
    pub async fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = child.kill().await;
                false
            }
        }
    }

    /// SIGKILL (a crash). Connections it had accepted break; those still in the listener's
    /// backlog wait for the next start, as in [`TestProxy::stop`].
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The typed events the proxy emitted so far (across restarts), oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&events_path(&self.storage))
    }

    /// The events named `name` (`"reloaded"`, `"evicted"`...) emitted so far.
    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        let mut events = self.events();
        events.retain(|event| event["event"] == name);
        events
    }

    /// Waits for the first event after the first `after` (a count taken with
    /// [`TestProxy::events`] before the action) that `wanted` accepts; fails after `within`,
    /// showing the events and the log.
    pub async fn wait_for_event(
        &self,
        after: usize,
        within: Duration,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(event) = self.events().into_iter().skip(after).find(&wanted) {
                return event;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no such event within {within:?}; events: {:#?}\nlog:\n{}",
                self.events(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGHUP and waits for the reload of `part` (`tls`, `htpasswd`, `policy_keys`):
    /// its error when it failed (what was in force stays), `None` when it was reloaded.
    pub async fn reload(&self, part: &str) -> Option<String> {
        let after = self.events().len();
        let pid = self.pid().expect("the proxy runs");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid}");
        let event = self
            .wait_for_event(after, Duration::from_secs(10), |event| {
                event["event"] == "reloaded" && event["part"] == part
            })
            .await;
        event["error"].as_str().map(str::to_owned)
    }

    /// Rewrites the config file (takes effect at the next restart).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read proxy config");
        std::fs::write(&self.config_path, edit(text)).expect("write proxy config");
    }

    /// Starts again after [`TestProxy::kill`] or [`TestProxy::stop`].
    pub async fn restart_after_crash(&mut self) {
        self.child = None;
        self.spawn().await;
    }

    /// Starts again on the same port, config and storage.
    pub async fn restart(&mut self) {
        assert!(
            self.stop().await,
            "regcache did not shut down cleanly; log:\n{}",
            self.log()
        );
        self.spawn().await;
    }
}

/// The proxy's config file: listening on `127.0.0.1:port`, the store at `storage`, these
/// upstreams and extra top-level TOML (a `[storage]` table in it gets the path line).
pub fn config_text(
    port: u16,
    storage: &Path,
    upstreams: &[UpstreamSpec],
    server_lines: &str,
    extra_toml: &str,
) -> String {
    let storage_line = format!("[storage]\npath = \"{}\"\n", storage.display());
    let (storage_table, extra) = if extra_toml.contains("[storage]\n") {
        (
            String::new(),
            extra_toml.replacen("[storage]\n", &storage_line, 1),
        )
    } else {
        (storage_line, extra_toml.to_owned())
    };
    // The typed events the tests wait on (`TestProxy::wait_for_event`).
    let events = events_path(storage);
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"5s\"\n{server_lines}\n\
         [log]\nevents = \"{}\"\n{storage_table}{extra}\n",
        events.display()
    );
    for upstream in upstreams {
        config.push_str(&format!(
            "[[upstream]]\nname = \"{}\"\nurl = \"{}\"\ndefault = {}\n{}\n",
            upstream.name, upstream.url, upstream.default, upstream.extra
        ));
    }
    config
}

/// Where the proxy with its store at `storage` writes its typed events (`[log] events`).
pub fn events_path(storage: &Path) -> PathBuf {
    storage.with_extension("events.jsonl")
}

/// The typed events in the file at `path`, oldest first (`{"event": "<name>", ...}`); a last
/// line still being written (no newline yet) is left for the next read.
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("event line {line:?}: {e}"))
        })
        .collect()
}

/// Runs a command of the regcache binary (`verify`, `gc`, `ls`, `pin`...) against the config
/// file `config`; its whole output.
pub async fn run_regcache(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run regcache")
}

/// Runs `skopeo copy --all --preserve-digests docker://<image> dir:<dest>` through a plain-HTTP
/// registry and returns (success, stderr).
pub async fn skopeo_copy(image: &str, dest: &Path, extra: &[&str]) -> (bool, String) {
    super::require_tool("skopeo");
    let output = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--retry-times=0",
        ])
        .args(extra)
        .arg(format!("docker://{image}"))
        .arg(format!("dir:{}", dest.display()))
        .output()
        .await
        .expect("run skopeo");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks a skopeo `dir:` copy: every blob file hashes to its name, every instance manifest to
/// its digest, and the top manifest to `expected_digest` (schema1: over the unsigned payload).
/// Returns the number of blob files.
pub fn verify_dir(dir: &Path, expected_digest: &str) -> usize {
    let top = std::fs::read(dir.join("manifest.json")).expect("manifest.json in the copy");
    let top_digest = manifest_digest(&top);
    assert_eq!(
        top_digest, expected_digest,
        "top manifest digest of the copy"
    );
    let mut blobs = 0;
    for entry in std::fs::read_dir(dir).expect("list copy") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).expect("read copied file");
        if name == "version" || name == "manifest.json" {
            continue;
        }
        if let Some(hex) = name.strip_suffix(".manifest.json") {
            assert_eq!(
                manifest_digest(&bytes),
                format!("sha256:{hex}"),
                "instance manifest {name}"
            );
        } else {
            assert_eq!(sha256_hex(&bytes), name, "blob {name} content");
            blobs += 1;
        }
    }
    blobs
}

/// A manifest's digest as a registry computes it (schema1 signatures cut out).
pub fn manifest_digest(bytes: &[u8]) -> String {
    super::images::schema1_payload_digest(bytes)
        .unwrap_or_else(|_| format!("sha256:{}", sha256_hex(bytes)))
}
