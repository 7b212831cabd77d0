//! Storage lifecycle: the disk budget and eviction, pins, crash safety under SIGKILL, and the
//! `verify`, `gc` and `ls` commands, against a real upstream (Debian's `docker-registry`).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::images::{self, Pushed};
use common::proxy::{run_regcache, skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;
use common::upstream::{Auth, Upstream};
use tokio::process::Command;

const NAME: &str = "registry.test";

fn cached_path(proxy: &TestProxy, digest: &str) -> std::path::PathBuf {
    common::blob_file(&proxy.storage(), NAME, digest)
}

fn stored_bytes(dir: &Path) -> u64 {
    common::files_under(dir)
        .iter()
        .map(|path| std::fs::metadata(path).expect("metadata").len())
        .sum()
}

/// Every path under `dir` with its length and a hash of its bytes, sorted: equal snapshots
/// mean nothing was created, removed, renamed or rewritten.
fn storage_snapshot(dir: &Path) -> Vec<(String, u64, String)> {
    fn walk(root: &Path, dir: &Path, found: &mut Vec<(String, u64, String)>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            let name = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            if path.is_dir() {
                found.push((name, 0, String::new()));
                walk(root, &path, found);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                found.push((
                    name,
                    bytes.len() as u64,
                    common::regclient::sha256_digest(&bytes),
                ));
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

async fn pull(proxy: &TestProxy, image: &Pushed) {
    proxy.pull_verified(&image.reference, &image.digest).await;
}

/// Runs a maintenance command of the regcache binary; returns (exit success, stdout).
async fn regcache(args: &[&str], config: &Path) -> (bool, String) {
    let output = run_regcache(args, config).await;
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn largest_blob(image: &Pushed, proxy: &TestProxy) -> String {
    image
        .blobs
        .iter()
        .max_by_key(|d| std::fs::metadata(cached_path(proxy, d)).map_or(0, |m| m.len()))
        .expect("a blob")
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_budget_evicts_least_recently_used_blobs_but_never_pins() {
    let upstream = Upstream::start(Auth::None).await;
    let mut pushed = Vec::new();
    for name in ["a", "b", "c", "d"] {
        pushed.push(
            images::push_oci_image(
                &upstream,
                &format!("test/{name}"),
                "v1",
                name,
                &[600 * 1024],
            )
            .await,
        );
    }
    // Room for about two images; "a" is pinned.
    let proxy = TestProxy::start(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        "[storage]\nmax_size = \"1500KiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.6\n\
         [[pin]]\nupstream = \"registry.test\"\nrepository = \"test/a\"\nreference = \"v1\"\n",
    )
    .await;
    for image in &pushed {
        pull(&proxy, image).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Eviction runs in the background right after the fill that crossed the mark.
    let budget = 1500 * 1024;
    let mut used = u64::MAX;
    for _ in 0..100 {
        used = stored_bytes(&proxy.storage().join("blobs"));
        if used <= budget {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        used <= budget,
        "store holds {used} bytes over a {budget} budget\n{}",
        proxy.log()
    );
    let layer = |image: &Pushed| largest_blob(image, &proxy);
    assert!(
        cached_path(&proxy, &layer(&pushed[0])).exists(),
        "the pinned image was evicted"
    );
    assert!(
        !cached_path(&proxy, &layer(&pushed[1])).exists(),
        "the least recently used blob stayed"
    );
    assert!(
        !cached_path(&proxy, &pushed[1].digest).exists(),
        "the least recently used manifest stayed"
    );
    assert!(
        cached_path(&proxy, &pushed[0].digest).exists(),
        "the pinned manifest was evicted"
    );
    assert!(
        cached_path(&proxy, &layer(&pushed[3])).exists(),
        "the newest blob was evicted"
    );
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regcache_evictions_total ") && !l.ends_with(" 0")),
        "no eviction counted"
    );
    // An evicted image pulls again (from the upstream).
    pull(&proxy, &pushed[1]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_concurrent_cold_pulls_leaves_only_verified_bytes() {
    let upstream = Upstream::start(Auth::None).await;
    let mut proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    let mut all_pushed = Vec::new();
    let mut completed_bodies = 0;
    // A different kill point each round (early, mid-fill, late), varied per run by the clock.
    let jitter = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_millis()
            % 40,
    );
    for (round, kill_after_ms) in [10u64, 40, 90, 160, 300].into_iter().enumerate() {
        // Fresh images each round, so that every pull in the round is cold.
        let mut pushed = Vec::new();
        for index in 0..5 {
            let repo = format!("test/crash{round}-{index}");
            pushed.push(
                images::push_oci_image(
                    &upstream,
                    &repo,
                    "v1",
                    &repo,
                    &[2 * 1024 * 1024, 300 * 1024, 40 * 1024],
                )
                .await,
            );
        }
        // 50 concurrent cold requests: every manifest and blob, twice.
        let mut pulls = Vec::new();
        for _ in 0..2 {
            for image in &pushed {
                for digest in image.blobs.iter().chain(std::iter::once(&image.digest)) {
                    let kind = if digest == &image.digest {
                        "manifests"
                    } else {
                        "blobs"
                    };
                    let url = format!("{}/v2/{}/{kind}/{digest}", proxy.url(), image.repo);
                    let digest = digest.clone();
                    // Each reader really reads: a body that completes (before the kill, or
                    // from the restarted server) is returned with its digest; one cut by the
                    // kill is an error, which is what it must be.
                    pulls.push(tokio::spawn(async move {
                        let response = reqwest::get(url).await.ok()?;
                        if !response.status().is_success() {
                            return None;
                        }
                        let body = response.bytes().await.ok()?;
                        Some((digest, body))
                    }));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(kill_after_ms + jitter)).await;
        proxy.kill().await;
        // Offline check of everything on disk, with the server down: the index opens, and
        // every file hashes to its name.
        let (clean, report) = regcache(&["verify", "--json"], proxy.config_path()).await;
        assert!(
            clean,
            "round {round}: verify found problems after SIGKILL:\n{report}"
        );
        let report: serde_json::Value = serde_json::from_str(&report).expect("verify --json");
        assert!(report["index_skipped"].is_null(), "round {round}: {report}");
        // The temp files the kill left behind are gone after a restart. (The restarted server
        // may have a file of its own there for an instant: its start-up writability probe.)
        let temp_dir = proxy.storage().join("tmp");
        let temp_files = || {
            std::fs::read_dir(&temp_dir)
                .expect("tmp")
                .flatten()
                .map(|entry| entry.file_name())
                .collect::<std::collections::HashSet<_>>()
        };
        let left_by_the_kill = temp_files();
        proxy.restart_after_crash().await;
        let survivors: Vec<_> = temp_files()
            .intersection(&left_by_the_kill)
            .cloned()
            .collect();
        assert!(
            survivors.is_empty(),
            "round {round}: temp files survived a restart: {survivors:?}"
        );
        // Requests still waiting in the listener's backlog at the kill (the test keeps the
        // socket, as systemd does) are answered by the restarted server.
        for pull in pulls {
            let Some((digest, body)) = pull.await.expect("pull task") else {
                continue;
            };
            completed_bodies += 1;
            assert_eq!(
                sha256_digest(&body),
                digest,
                "round {round}: a completed body does not hash to its digest"
            );
        }
        all_pushed.extend(pushed);
        // Everything pulled so far pulls again, with every digest checked.
        for image in &all_pushed {
            pull(&proxy, image).await;
        }
    }
    assert!(
        completed_bodies > 0,
        "no request completed before a kill: the readers were not exercised"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_quarantines_corrupt_files_and_the_next_pull_refetches() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/rot", "v1", "rot", &[100_000]).await;
    let mut proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    pull(&proxy, &image).await;
    assert!(proxy.stop().await);
    let layer = largest_blob(&image, &proxy);
    let path = cached_path(&proxy, &layer);
    let mut bytes = std::fs::read(&path).expect("cached layer");
    bytes[10] ^= 0x55;
    std::fs::write(&path, &bytes).expect("rot a byte");

    let (clean, report) = regcache(&["verify", "--json"], proxy.config_path()).await;
    assert!(!clean, "verify must fail on a corrupt file");
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    assert_eq!(
        report["corrupt"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert!(!path.exists(), "the corrupt file is still in the store");
    let quarantined = proxy.storage().join("quarantine");
    assert_eq!(
        std::fs::read_dir(&quarantined)
            .expect("quarantine dir")
            .count(),
        1
    );
    let (clean, _) = regcache(&["verify"], proxy.config_path()).await;
    assert!(clean, "a second verify is clean");

    proxy.restart_after_crash().await;
    pull(&proxy, &image).await;
    assert_eq!(
        upstream.blob_gets(&layer),
        2,
        "the quarantined blob was not refetched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_repair_rebuilds_a_corrupt_index_and_ls_and_gc_report() {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let mut proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    pull(&proxy, &images.multiarch_oci).await;
    pull(&proxy, &images.schema1).await;
    assert!(proxy.stop().await);

    let (ok, listing) = regcache(&["ls", "--json"], proxy.config_path()).await;
    assert!(ok, "{listing}");
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("ls --json");
    let entry = listing
        .as_array()
        .and_then(|tags| {
            tags.iter()
                .find(|t| t["repository"] == "test/multiarch-oci")
        })
        .expect("the pulled tag is listed");
    assert_eq!(entry["digest"], images.multiarch_oci.digest.as_str());
    assert!(
        entry["cached_bytes"].as_u64().unwrap_or(0) > 80_000,
        "{entry}"
    );
    // Times in one form, RFC 3339 in UTC: confirmed and last used this run (within minutes).
    let now = std::time::SystemTime::now();
    for field in ["confirmed_at", "last_access"] {
        let text = entry[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {entry}"));
        let at = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field} {text}: {e}"));
        let age = now.duration_since(at).unwrap_or_default();
        assert!(
            age < Duration::from_secs(600),
            "{field} {text} is not recent"
        );
    }
    let (ok, table) = regcache(&["ls"], proxy.config_path()).await;
    assert!(ok, "{table}");
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("LAST ACCESS"), "{table}");
    let row = table
        .lines()
        .find(|line| line.contains("test/multiarch-oci"))
        .expect("the tag's row");
    let last_access = entry["last_access"].as_str().unwrap_or_default();
    assert!(row.contains(last_access), "{row}");
    // No tag rule: the cache-wide TTL applies, and each form says so.
    assert_eq!(entry["freshness"], "cache.tag_ttl (1m)", "{entry}");
    assert!(row.ends_with("cache.tag_ttl (1m)"), "{row}");
    // Columns line up whatever the lengths: each column starts where its header does.
    let digest_at = header.find("DIGEST").expect("DIGEST");
    assert_eq!(row.find("sha256:"), Some(digest_at), "{table}");

    // A stray temp file (as a crash leaves) is removed by gc.
    std::fs::write(
        proxy.storage().join("tmp").join("stray.part"),
        vec![0u8; 4096],
    )
    .expect("write");
    let (ok, gc) = regcache(&["gc"], proxy.config_path()).await;
    assert!(
        ok && gc.contains("removed 1 temp files (4096 bytes)"),
        "{gc}"
    );

    for entry in std::fs::read_dir(proxy.storage().join("index")).expect("index dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::write(&path, b"garbage").expect("corrupt the index");
        }
    }
    // Read-only commands report the corrupt index (exit 1, naming the repair) and change
    // nothing in the storage directory; verify without --repair too.
    let before = storage_snapshot(&proxy.storage());
    for args in [&["ls"][..], &["verify"][..]] {
        let output = run_regcache(args, proxy.config_path()).await;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains("corrupt") && said.contains("verify --repair"),
            "{args:?}: {said}"
        );
        assert_eq!(
            storage_snapshot(&proxy.storage()),
            before,
            "{args:?} changed the storage directory"
        );
    }
    let (ok, report) = regcache(&["verify", "--repair", "--json"], proxy.config_path()).await;
    assert!(ok, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    // The index, the two children and schema1 manifests are re-indexed from their files.
    assert!(
        report["rebuilt_manifests"].as_u64().unwrap_or(0) >= 4,
        "{report}"
    );
    let mut upstream = upstream;
    upstream.stop().await;
    proxy.restart_after_crash().await;
    let dest = tempfile::tempdir().expect("temp dir");
    let by_digest = format!(
        "{}/test/multiarch-oci@{}",
        proxy.addr(),
        images.multiarch_oci.digest
    );
    let (ok, stderr) = skopeo_copy(&by_digest, dest.path(), &[]).await;
    assert!(ok, "{stderr}");
    verify_dir(dest.path(), &images.multiarch_oci.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn regcache_pin_makes_a_running_server_fetch_and_keep_an_image() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/pinned", "v2", "pinned", &[50_000]).await;
    let proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    let (ok, out) = regcache(
        &["pin", "registry.test/test/pinned:v2"],
        proxy.config_path(),
    )
    .await;
    assert!(ok, "{out}");
    let layer = image.blobs.last().expect("layer").clone();
    // The server re-reads the pins every couple of seconds and fetches what is missing.
    let fetched = upstream
        .wait_blob_gets(&layer, 1, Duration::from_secs(15))
        .await;
    assert_eq!(
        fetched,
        1,
        "the pinned image was not prefetched\n{}",
        proxy.log()
    );
    let pins = std::fs::read_to_string(proxy.storage().join("pins.toml")).expect("pins file");
    assert!(
        pins.contains("test/pinned") && pins.contains("v2"),
        "{pins}"
    );
    let (ok, out) = regcache(
        &["unpin", "registry.test/test/pinned:v2"],
        proxy.config_path(),
    )
    .await;
    assert!(ok, "{out}");
    let pins = std::fs::read_to_string(proxy.storage().join("pins.toml")).expect("pins file");
    assert!(!pins.contains("test/pinned"), "{pins}");
    // An unknown registry is refused with the configuration exit status.
    let output = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["pin", "quay.io/x/y:1", "--config"])
        .arg(proxy.config_path())
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
}

#[tokio::test]
async fn pin_with_an_unwritable_storage_directory_fails_without_claiming_a_bad_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A storage path below a regular file: the configuration is valid, the directory cannot be
    // created.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"").expect("write");
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = {:?}\n[[upstream]]\nname = \"{NAME}\"\n\
             url = \"http://127.0.0.1:9\"\ndefault = true\n",
            blocker.join("store").display().to_string()
        ),
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["pin", "registry.test/test/app:1", "--config"])
        .arg(&config)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pins.toml"), "{stderr}");
}

/// A small tmpfs, unmounted on drop (after the proxy using it is gone).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = format!("size={size}");
        let mounted = ["", "sudo"].iter().any(|sudo| {
            let mut command = if sudo.is_empty() {
                std::process::Command::new("mount")
            } else {
                let mut command = std::process::Command::new("sudo");
                command.args(["-n", "mount"]);
                command
            };
            command
                .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|status| status.success())
        });
        assert!(
            mounted,
            "mounting a tmpfs needs root (or passwordless sudo), as CI has"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let path = self.dir.path().to_owned();
        let unmounted = std::process::Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("sudo")
                .args(["-n", "umount"])
                .arg(&path)
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_fill_cleanly_and_later_pulls_stream_uncached() {
    let upstream = Upstream::start(Auth::None).await;
    let small = images::push_oci_image(&upstream, "test/fits", "v1", "fits", &[512 * 1024]).await;
    let large = images::push_oci_image(
        &upstream,
        "test/too-big",
        "v1",
        "too-big",
        &[12 * 1024 * 1024],
    )
    .await;
    let disk = SmallDisk::mount("6m");
    let storage = disk.path().join("store");
    let mut proxy = TestProxy::start_with_storage(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        "",
        Some(storage),
    )
    .await;
    pull(&proxy, &small).await;

    let layer = large.blobs.last().expect("the layer").clone();
    let url = format!("{}/v2/test/too-big/blobs/{layer}", proxy.url());
    // The first pull runs into the full disk: its fill fails, the partial file is removed, and
    // the client's transfer is aborted rather than completed with unverified bytes.
    let first = reqwest::get(&url).await.expect("GET");
    let first_complete = first.status().is_success() && first.bytes().await.is_ok();
    assert!(
        !first_complete,
        "a 12 MiB fill cannot have succeeded on a 6 MiB disk"
    );
    // The server keeps running, says why, and streams later pulls without caching them.
    let retried = reqwest::get(&url).await.expect("GET");
    assert_eq!(retried.status(), reqwest::StatusCode::OK);
    let bytes = retried.bytes().await.expect("a complete body on retry");
    assert_eq!(sha256_digest(&bytes), layer);
    let metrics = proxy.metrics_text().await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("regcache_store_write_errors_total "))
        .expect("the write error metric");
    assert!(!errors.ends_with(" 0"), "{errors}");
    assert!(proxy.log().contains("fill failed"), "{}", proxy.log());
    let temp_files = std::fs::read_dir(proxy.storage().join("tmp"))
        .expect("tmp")
        .count();
    assert_eq!(temp_files, 0, "the partial file was left behind");
    // What was cached before still serves.
    pull(&proxy, &small).await;
    proxy.kill().await;
    drop(proxy);
    drop(disk);
}

#[tokio::test]
async fn serve_and_check_config_refuse_a_config_without_an_upstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:9\"\n[storage]\npath = {:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("write config");
    for command in ["check-config", "serve"] {
        let output = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args([command, "--config"])
            .arg(&config)
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{command}: {stderr}");
        assert!(
            stderr.contains("no [[upstream]] is configured") && stderr.contains("https://"),
            "{command}: {stderr}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "nothing was created for a config that cannot serve"
    );
}

#[tokio::test]
async fn serve_refuses_an_events_file_it_cannot_append_to_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[log]\nevents = {:?}\n[storage]\npath = {:?}\n\
             [[upstream]]\nname = \"{NAME}\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
            dir.path()
                .join("no-such-dir/events.jsonl")
                .display()
                .to_string(),
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("write config");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["serve", "--config"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("serve exits")
    .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("log.events"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_commands_refuse_a_store_a_server_holds_naming_it_once() {
    let upstream = Upstream::start(Auth::None).await;
    let proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    let pid = proxy.pid().expect("running");
    for command in [&["ls"][..], &["gc"], &["verify"], &["verify", "--json"]] {
        let output = run_regcache(command, proxy.config_path()).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command:?} exited 0:\n{stderr}");
        let sentence = format!("in use by a running regcache server (PID {pid}); stop it");
        assert_eq!(
            stderr.matches(&sentence).count(),
            1,
            "{command:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("Os {"),
            "{command:?}: a Debug dump:\n{stderr}"
        );
    }
    // Nothing was judged or removed meanwhile: the server still serves.
    assert!(proxy
        .client()
        .get(format!("{}/v2/", proxy.url()))
        .send()
        .await
        .is_ok());
}
