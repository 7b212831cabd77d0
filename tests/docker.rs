//! A real Docker Engine (Debian's `docker.io`: `dockerd` 20.10) pulling through regcache as its
//! `registry-mirrors` entry over verified TLS.
//!
//! Everything runs inside a private network and mount namespace (`unshare --net --mount`): the
//! upstream registry, regcache and `dockerd` share only a loopback interface, so Docker cannot
//! fall back to Docker Hub and a pull that works went through the mirror; the CA goes into
//! `/etc/docker/certs.d/<mirror>/ca.crt` of the private mount namespace only. The outer test
//! re-runs this test binary inside the namespaces for the inner one.
//!
//! The same Docker then logs in to a regcache whose upstream has `credentials = "client"`
//! (`docker login` with what the upstream knows) and pulls what its user may read, and nothing
//! else.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::images;
use common::pki::Pki;
use common::proxy::{TestProxy, UpstreamSpec};
use common::upstream::{Auth, TokenReader, Upstream};
use tokio::process::Command;

/// Set for the inner test, which must run in its own namespaces.
const INSIDE: &str = "REGCACHE_TEST_INSIDE_NAMESPACES";

#[tokio::test(flavor = "multi_thread")]
async fn docker_engine_pulls_through_regcache_as_its_tls_mirror() {
    common::require_tool("dockerd");
    common::require_tool("unshare");
    let test_binary = std::env::current_exe().expect("the test binary");
    // New network and mount namespaces need root; CI may run as a user with sudo.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("run id");
    let mut command = if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        Command::new("unshare")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", &format!("--preserve-env={INSIDE},PATH"), "unshare"]);
        sudo
    };
    let output = command
        .args(["--net", "--mount", "--"])
        .arg(test_binary)
        .args([
            "--exact",
            &common::test_name(module_path!(), "docker_engine_inside_private_namespaces"),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INSIDE, "1")
        .output()
        .await
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "inner test failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

/// Runs `ip`, `mount` and friends; panics with their output on failure.
fn run(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `docker` CLI that ships with the daemon (another one may be earlier on `PATH`).
fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

async fn docker(socket: &Path, args: &[&str]) -> (bool, String) {
    // The CLI's own config (what `docker login` stores) next to the daemon's socket, not in
    // the user's home.
    let cli_config = socket.with_file_name("docker-cli");
    let output = Command::new(docker_cli())
        .env("DOCKER_CONFIG", cli_config)
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .await
        .expect("run docker");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by docker_engine_pulls_through_regcache_as_its_tls_mirror inside private namespaces"]
async fn docker_engine_inside_private_namespaces() {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "this test changes /etc/docker and the network: it runs only inside its namespaces"
    );
    run("ip", &["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().expect("temp dir");

    // The upstream plays Docker Hub; regcache mirrors it over TLS.
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(
        &upstream,
        "library/regcache-docker-test",
        "v1",
        "docker",
        &[8192, 2048],
    )
    .await;
    let pki = Pki::new();
    pki.issue_server_cert();
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at("docker.io", &upstream.url())],
        &pki.server_lines(),
        "",
        Some(pki.ca_path()),
    )
    .await;

    // Docker trusts the CA for the mirror's host:port, in this mount namespace only.
    let etc_docker = dir.path().join("etc-docker");
    let certs = etc_docker.join("certs.d").join(proxy.addr());
    std::fs::create_dir_all(&certs).expect("certs.d");
    std::fs::copy(pki.ca_path(), certs.join("ca.crt")).expect("CA into certs.d");
    std::fs::create_dir_all("/etc/docker").expect("/etc/docker");
    run(
        "mount",
        &["--bind", etc_docker.to_str().expect("utf-8"), "/etc/docker"],
    );

    let socket = dir.path().join("docker.sock");
    let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("dockerd log");
    let mut dockerd = Command::new("dockerd")
        .arg("--data-root")
        .arg(dir.path().join("data"))
        .arg("--exec-root")
        .arg(dir.path().join("exec"))
        .arg("--pidfile")
        .arg(dir.path().join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args([
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
        ])
        .arg(format!("--registry-mirror=https://{}", proxy.addr()))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dockerd");
    let dockerd_log =
        || std::fs::read_to_string(dir.path().join("dockerd.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker(&socket, &["version"]).await.0 {
        assert!(
            Instant::now() < deadline,
            "dockerd did not start:\n{}",
            dockerd_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (ok, out) = docker(&socket, &["pull", "regcache-docker-test:v1"]).await;
    assert!(
        ok,
        "docker pull: {out}\ndockerd:\n{}\nregcache:\n{}",
        dockerd_log(),
        proxy.log()
    );
    assert!(out.contains(&image.digest), "{out}");
    let (ok, digests) = docker(
        &socket,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "regcache-docker-test:v1",
        ],
    )
    .await;
    assert!(ok, "{digests}");
    assert!(digests.contains(&image.digest), "{digests}");
    // Every layer came through regcache from the upstream.
    for blob in &image.blobs {
        assert_eq!(upstream.blob_gets(blob), 1, "{blob}");
    }

    // `docker login` to a regcache that asks its upstream with each client's credentials.
    let reader = |user: &str, prefix: &str| TokenReader {
        user: user.to_owned(),
        password: format!("{user}-docker-pw"),
        pull: vec![prefix.to_owned()],
    };
    let private = Upstream::start(Auth::token_readers(vec![
        reader("alice", "team-a/"),
        reader("bob", "team-b/"),
    ]))
    .await;
    let team_a = images::push_oci_image(&private, "team-a/app", "v1", "docker-a", &[4096]).await;
    let client_mode = TestProxy::start_with_server(
        &[UpstreamSpec::default_at("registry.corp", &private.url())
            .with("credentials = \"client\"")],
        &pki.server_lines(),
        "",
        Some(pki.ca_path()),
    )
    .await;
    let certs = etc_docker.join("certs.d").join(client_mode.addr());
    std::fs::create_dir_all(&certs).expect("certs.d");
    std::fs::copy(pki.ca_path(), certs.join("ca.crt")).expect("CA into certs.d");
    let host = client_mode.addr();
    let login = |user: &'static str, password: &'static str| {
        let socket = socket.clone();
        let host = host.clone();
        async move { docker(&socket, &["login", "-u", user, "-p", password, &host]).await }
    };
    let (ok, out) = login("alice", "wrong").await;
    assert!(!ok, "a wrong password is refused at login: {out}");
    let (ok, out) = login("alice", "alice-docker-pw").await;
    assert!(ok, "docker login: {out}\nregcache:\n{}", client_mode.log());
    let reference = format!("{host}/team-a/app:v1");
    let (ok, out) = docker(&socket, &["pull", &reference]).await;
    assert!(ok, "alice's pull: {out}\nregcache:\n{}", client_mode.log());
    assert!(out.contains(&team_a.digest), "{out}");
    assert!(docker(&socket, &["image", "rm", &reference]).await.0);
    assert!(docker(&socket, &["logout", &host]).await.0);
    let (ok, out) = login("bob", "bob-docker-pw").await;
    assert!(ok, "bob logs in: {out}");
    let (ok, out) = docker(&socket, &["pull", &reference]).await;
    assert!(!ok, "bob may not pull team-a: {out}");
    assert!(out.contains("unauthorized"), "{out}");
    for blob in &team_a.blobs {
        assert_eq!(private.blob_gets(blob), 1, "{blob}");
    }

    if let Some(pid) = dockerd.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), dockerd.wait()).await;
}
