//! Socket activation (`LISTEN_FDS`, as systemd's `deploy/regcache.socket` hands it in): regcache
//! serves on the sockets it is given, tells them apart by `LISTEN_FDNAMES`, binds neither
//! `server.listen` nor `server.metrics_listen`, and refuses malformed variables naming them.

use crate::common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::proxy::{activated_regcache, bind_local, local_addr};

/// A config listening on `listen` (and `metrics_listen` when given), the store in `dir`.
fn write_config(dir: &Path, listen: &TcpListener, metrics_listen: Option<&TcpListener>) {
    let metrics_line = metrics_listen
        .map(|l| format!("metrics_listen = \"{}\"\n", local_addr(l)))
        .unwrap_or_default();
    let config = format!(
        "[server]\nlisten = \"{}\"\n{metrics_line}[storage]\npath = \"{}\"\n\
         [[upstream]]\nname = \"registry.test\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
        local_addr(listen),
        dir.join("data").display()
    );
    std::fs::write(dir.join("config.toml"), config).expect("write config");
}

/// `GET url`, waiting (bounded) for the answer: the socket listens before regcache runs.
async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_the_handed_sockets_told_apart_by_name_and_binds_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The configured addresses are held here: binding either would fail and end regcache.
    let (configured, configured_metrics) = (bind_local(), bind_local());
    write_config(dir.path(), &configured, Some(&configured_metrics));
    let (main, metrics) = (bind_local(), bind_local());
    let log_path = dir.path().join("regcache.log");
    // The metrics socket first: the names, not the order, say which is which.
    let mut child = activated_regcache(&[("metrics", &metrics), ("http", &main)])
        .args(["serve", "--config"])
        .arg(dir.path().join("config.toml"))
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn regcache");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let main_url = format!("http://{}", local_addr(&main));
    let metrics_url = format!("http://{}", local_addr(&metrics));
    assert_eq!(
        get(&format!("{main_url}/v2/")).await.status(),
        200,
        "{}",
        log()
    );
    let scrape = get(&format!("{metrics_url}/metrics")).await;
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().await.expect("text").contains("regcache_"));
    assert_eq!(get(&format!("{metrics_url}/v2/")).await.status(), 404);
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "regcache exited: {}",
        log()
    );
    let log = log();
    for (fd, role) in [(3, "metrics"), (4, "main")] {
        assert!(
            log.lines().any(|line| line.contains("inherited socket")
                && line.contains(&format!("fd={fd}"))
                && line.contains(&format!("role=\"{role}\""))),
            "fd {fd} is the {role} listener:\n{log}"
        );
    }
}

/// Runs `regcache serve` handed `sockets`, with `env` overriding the protocol's variables;
/// (success, stderr).
async fn serve_once(
    sockets: &[(&str, &TcpListener)],
    env: &[(&str, &str)],
    metrics_listen: bool,
) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (configured, configured_metrics) = (bind_local(), bind_local());
    write_config(
        dir.path(),
        &configured,
        metrics_listen.then_some(&configured_metrics),
    );
    let mut command = activated_regcache(sockets);
    command
        .args(["serve", "--config"])
        .arg(dir.path().join("config.toml"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("regcache did not exit within 30 s")
        .expect("run regcache");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts that regcache refuses to start with these sockets and variables, saying `expected`.
async fn refused(
    sockets: &[(&str, &TcpListener)],
    env: &[(&str, &str)],
    metrics_listen: bool,
    expected: &str,
) {
    let (ok, stderr) = serve_once(sockets, env, metrics_listen).await;
    assert!(!ok, "{env:?}: regcache started");
    assert!(stderr.contains(expected), "{env:?}: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_variables_and_an_unwanted_metrics_socket_are_refused_by_name() {
    let (main, metrics) = (bind_local(), bind_local());
    let both = [("http", &main), ("metrics", &metrics)];
    let env = [("LISTEN_FDS", "one")];
    refused(&both[..1], &env, false, "LISTEN_FDS=\"one\"").await;
    refused(&both, &[("LISTEN_FDS", "3")], true, "LISTEN_FDS=3").await;
    let env = [("LISTEN_FDNAMES", "metrics:metrics")];
    refused(&both, &env, true, "LISTEN_FDNAMES=\"metrics:metrics\"").await;
    refused(&both, &[], false, "server.metrics_listen is not set").await;
}

#[test]
fn the_socket_unit_hands_port_5000_named_http_to_the_service() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let socket = std::fs::read_to_string(deploy.join("regcache.socket")).expect("regcache.socket");
    let lines: Vec<&str> = socket.lines().map(str::trim).collect();
    for line in [
        "[Socket]",
        "ListenStream=5000",
        "FileDescriptorName=http",
        "Service=regcache.service",
    ] {
        assert!(lines.contains(&line), "regcache.socket lacks {line}");
    }
    let service =
        std::fs::read_to_string(deploy.join("regcache.service")).expect("regcache.service");
    assert!(service.contains("regcache.socket"), "{service}");
}
