//! regcache in process: `regcache::run_with_clock` on a listener bound to `127.0.0.1:0` (the
//! kernel picks the port while the listener is already held: no free-port race), with an
//! adjustable [`Clock`] so that tests jump a tag's TTL or a breaker's cooldown instead of
//! sleeping. Time-outs stay on real time: the clock moves only the instants that freshness
//! and breaker decisions compare (see `regcache::clock`).
//!
//! ```ignore
//! let proxy = InProcess::start(&[UpstreamSpec::default_at("registry.test", &url)], "").await;
//! proxy.clock().advance(Duration::from_secs(61));
//! ```
//!
//! Its log lines go to the test's captured output (shown when the test fails).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use regcache::clock::Clock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::proxy::{config_text, skopeo_copy, verify_dir, UpstreamSpec};

/// A regcache server running in this process. Dropping it stops it.
#[derive(Debug)]
pub struct InProcess {
    addr: SocketAddr,
    clock: Clock,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), regcache::RunError>>>,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts regcache with these upstreams and extra top-level TOML (e.g. a `[cache]` table),
    /// its store in a temp directory. Returns once it listens.
    pub async fn start(upstreams: &[UpstreamSpec], extra_toml: &str) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::start_on(listener, upstreams, extra_toml).await
    }

    /// [`InProcess::start`] on a listener the caller bound (so that its address can go into the
    /// config of this and other instances first, as `[cluster]` needs).
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        upstreams: &[UpstreamSpec],
        extra_toml: &str,
    ) -> InProcess {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir for the proxy");
        let storage = dir.path().join("data");
        let config =
            regcache::config::Config::parse(&config_text(0, &storage, upstreams, "", extra_toml))
                .expect("the test config is valid");
        let addr = listener.local_addr().expect("local address");
        let clock = Clock::adjustable();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(regcache::run_with_clock(
            config,
            listener,
            None,
            shutdown.clone(),
            clock.clone(),
        ));
        InProcess {
            addr,
            clock,
            shutdown,
            task: Some(task),
            storage,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The clock its freshness and breaker decisions read.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The storage directory.
    pub fn storage(&self) -> PathBuf {
        self.storage.clone()
    }

    /// For failure messages: where the log is.
    pub fn log(&self) -> String {
        "(regcache runs in process: its log is in this test's captured output)".to_owned()
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("reqwest client")
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one metric series (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Pulls `reference` through it with `skopeo copy --all` and verifies every digest against
    /// `expected_digest`. Returns the number of blob files.
    pub async fn pull_verified(&self, reference: &str, expected_digest: &str) -> usize {
        let dest = tempfile::tempdir().expect("temp dir for the copy");
        let (ok, stderr) =
            skopeo_copy(&format!("{}/{reference}", self.addr()), dest.path(), &[]).await;
        assert!(ok, "skopeo pull of {reference} failed: {stderr}");
        verify_dir(dest.path(), expected_digest)
    }

    /// Shuts it down (drains, flushes the index) and waits at most 15 s.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("regcache stops within 15 s");
            result
                .expect("regcache task")
                .expect("regcache ran cleanly");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Log lines to the test's captured output, once per test binary.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,regcache=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
