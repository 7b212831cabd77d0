//! Upstream budgets and sync schedules: rate-limit headers read into metrics and the status
//! page, the reserve that stops tag revalidation, the pause after a `429` (the registry's or
//! its token endpoint's), `max_bandwidth`, and `[[sync]]` rounds. Rate limits come from the
//! in-process [`FakeRegistry`] (a real registry does not count pulls); the bandwidth cap and
//! the sync schedule run against the real one (Debian's `docker-registry`), the schedule with
//! the real binary: the newest tags by version range and by pattern are fetched before anyone
//! pulls, kept pinned against eviction, the schedule survives a restart, and `regcache sync
//! --once` (through the running server) moves the set: the dropped image is unpinned and
//! evicted in its turn, the kept ones stay.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::fake::{FakeRegistry, Fault, Listener};
use common::http::{client, get_text, oci_error};
use common::images::{push_oci_image, Pushed, MT_OCI_MANIFEST};
use common::inproc::InProcess;
use common::proxy::{run_regcache, TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;

const UPSTREAM: &str = "fake.test";
const REPO: &str = "test/app";

/// A manifest naming no blobs of its own (an artifact): enough for tag traffic.
fn manifest(seed: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": "application/vnd.example.budget",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": sha256_digest(b"{}"),
            "size": 2,
        },
        "layers": [],
        "annotations": {"seed": seed},
    }))
    .expect("json")
}

/// A fake with tags `t1`..`t<tags>` (each its own manifest) and Docker Hub's budget.
fn fake(tags: usize) -> common::fake::FakeRegistryBuilder {
    (1..=tags).fold(FakeRegistry::builder().blob(b"{}".to_vec()), |fake, i| {
        let tag = format!("t{i}");
        fake.manifest(REPO, &tag, MT_OCI_MANIFEST, manifest(&tag))
    })
}

async fn proxy(fake: &FakeRegistry, upstream_lines: &[&str], toml: &str) -> InProcess {
    let spec = upstream_lines.iter().fold(
        UpstreamSpec::default_at(UPSTREAM, fake.url()),
        |spec, line| spec.with(line),
    );
    InProcess::start(&[spec], toml).await
}

async fn get(proxy: &InProcess, tail: &str) -> reqwest::Response {
    client()
        .get(format!("{}/v2/{REPO}/{tail}", proxy.url()))
        .header("accept", MT_OCI_MANIFEST)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {tail}: {e}"))
}

fn is_stale(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("warning")
        .and_then(|w| w.to_str().ok())
        .is_some_and(|w| w.starts_with("110"))
}

fn registry_requests(fake: &FakeRegistry) -> usize {
    fake.count(|r| r.on == Listener::Registry)
}

async fn series(proxy: &InProcess, name: &str) -> f64 {
    proxy
        .metric(&format!("{name}{{upstream=\"{UPSTREAM}\"}}"))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_is_exported_and_at_the_reserve_cached_tags_are_not_revalidated() {
    let fake = fake(4).rate_limit(10, 21600).start().await;
    // Every cached tag is due for revalidation at each pull.
    let proxy = proxy(
        &fake,
        &["ratelimit_reserve = 7"],
        "[cache]\ntag_ttl = \"0s\"\n",
    )
    .await;

    assert_eq!(get(&proxy, "manifests/t1").await.status(), StatusCode::OK);
    assert_eq!(
        series(&proxy, "regcache_upstream_ratelimit_limit").await,
        10.0
    );
    assert_eq!(
        series(&proxy, "regcache_upstream_ratelimit_remaining").await,
        9.0
    );
    // Revalidating t1 costs a HEAD, which the upstream does not count.
    let response = get(&proxy, "manifests/t1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!is_stale(&response));
    assert_eq!(fake.remaining(), Some(9));
    assert_eq!(
        fake.count(|r| r.method == http::Method::HEAD && r.path.ends_with("/manifests/t1")),
        1
    );

    // Two more misses bring it to the reserve.
    for tag in ["t2", "t3"] {
        assert_eq!(
            get(&proxy, &format!("manifests/{tag}")).await.status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        series(&proxy, "regcache_upstream_ratelimit_remaining").await,
        7.0
    );
    let before = registry_requests(&fake);
    for tag in ["t1", "t2", "t3"] {
        let response = get(&proxy, &format!("manifests/{tag}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{tag}");
        assert!(
            is_stale(&response),
            "{tag} is served with the stale warning"
        );
        assert_eq!(
            response.bytes().await.expect("body"),
            manifest(tag),
            "{tag}"
        );
    }
    assert_eq!(
        registry_requests(&fake),
        before,
        "no revalidation at the reserve"
    );
    // A miss still goes out and spends the reserve.
    assert_eq!(get(&proxy, "manifests/t4").await.status(), StatusCode::OK);
    assert_eq!(fake.remaining(), Some(6));
    assert_eq!(
        series(&proxy, "regcache_upstream_manifest_gets_total").await,
        4.0,
        "one GET per miss, none for revalidations"
    );
    assert_eq!(
        series(&proxy, "regcache_manifests_served_total").await,
        8.0,
        "every answer counts, whether it cost a GET or not"
    );
    let status = get_text(&format!("{}/", proxy.url())).await;
    assert!(
        status.contains("6 of 10 left per 6h") && status.contains("at the reserve (7)"),
        "{status}"
    );

    let ready: serde_json::Value =
        serde_json::from_str(&get_text(&format!("{}/readyz", proxy.url())).await).expect("json");
    assert_eq!(
        ready["upstreams"][0]["ratelimit"],
        serde_json::json!({"limit": 10, "remaining": 6, "at_reserve": true, "paused_seconds": null})
    );

    // A new window: the upstream reports more than the reserve, revalidation resumes.
    fake.set_remaining(10);
    assert_eq!(
        get(&proxy, "manifests/missing").await.status(),
        StatusCode::NOT_FOUND
    );
    let response = get(&proxy, "manifests/t1").await;
    assert!(!is_stale(&response));
    assert_eq!(
        fake.count(|r| r.method == http::Method::HEAD && r.path.ends_with("/manifests/t1")),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_429_nothing_is_sent_until_retry_after_then_one_probe() {
    let fake = fake(2).start().await;
    let proxy = proxy(&fake, &[], "[cache]\ntag_ttl = \"0s\"\n").await;
    assert_eq!(get(&proxy, "manifests/t1").await.status(), StatusCode::OK);

    fake.set_fault_times("/manifests/", Fault::too_many_requests("30"), 1);
    let response = get(&proxy, "manifests/t1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        is_stale(&response),
        "the 429 is answered with the cached tag"
    );
    let sent = registry_requests(&fake);

    // Paused: the cached tag is served stale, a miss fails fast, nothing is sent.
    let response = get(&proxy, "manifests/t1").await;
    assert!(is_stale(&response));
    let miss = get(&proxy, "manifests/t2").await;
    let retry_after: u64 = miss.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    let (status, code, message) = oci_error(miss).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "TOOMANYREQUESTS")
    );
    assert!(message.contains(UPSTREAM), "{message}");
    let blob = get(&proxy, &format!("blobs/{}", sha256_digest(b"{}"))).await;
    assert_eq!(blob.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(registry_requests(&fake), sent, "no request while paused");
    assert_eq!(
        proxy
            .metric(&format!(
                "regcache_upstream_errors_total{{reason=\"paused\",upstream=\"{UPSTREAM}\"}}"
            ))
            .await,
        3.0
    );

    proxy.clock().advance(Duration::from_secs(30));
    // The first request after the pause is the probe; its answer ends the pause.
    assert_eq!(get(&proxy, "manifests/t2").await.status(), StatusCode::OK);
    assert_eq!(registry_requests(&fake), sent + 1);
    let response = get(&proxy, "manifests/t1").await;
    assert!(!is_stale(&response), "revalidated again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_token_endpoint_pauses_the_upstream_and_is_never_a_404() {
    let fake = fake(1).bearer_auth(300).start().await;
    fake.set_fault("/token", Fault::too_many_requests("20"));
    let proxy = proxy(&fake, &[], "").await;

    let response = get(&proxy, "manifests/t1").await;
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, code, _) = oci_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")
    );
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("20")
    );
    let tokens_asked = fake.count(|r| r.path == "/token");
    assert_eq!(tokens_asked, 1);

    let (status, _, _) = oci_error(get(&proxy, "manifests/t1").await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fake.count(|r| r.path == "/token"), tokens_asked, "paused");

    fake.clear_faults();
    proxy.clock().advance(Duration::from_secs(20));
    let response = get(&proxy, "manifests/t1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.expect("body"), manifest("t1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn max_bandwidth_holds_a_fill_to_its_rate_and_warm_reads_are_not_capped() {
    let upstream = Upstream::start(Auth::None).await;
    push_oci_image(&upstream, "bw/big", "v1", "bandwidth", &[64 << 20]).await;
    let pushed = upstream
        .client()
        .get_manifest("bw/big", "v1")
        .await
        .expect("the pushed manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&pushed.bytes).expect("json");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("a layer digest")
        .to_owned();
    let spec = UpstreamSpec::default_at("registry.test", &upstream.url())
        .with("max_bandwidth = \"16MiB/s\"");
    let proxy = InProcess::start(&[spec], "").await;
    let url = format!("{}/v2/bw/big/blobs/{layer}", proxy.url());

    let fetch = || async {
        let started = Instant::now();
        let bytes = client()
            .get(&url)
            .send()
            .await
            .expect("blob GET")
            .bytes()
            .await
            .expect("blob body");
        assert_eq!(sha256_digest(&bytes), layer);
        (started.elapsed(), bytes.len())
    };
    let (cold, len) = fetch().await;
    assert!(len >= 64 << 20, "{len}");
    let expected = len as f64 / f64::from(16 << 20);
    assert!(
        (cold.as_secs_f64() - expected).abs() <= expected * 0.1,
        "a cold fill of {len} bytes under 16 MiB/s took {cold:?}, expected {expected:.2} s ± 10%"
    );
    let (warm, _) = fetch().await;
    assert!(
        warm < Duration::from_secs(2),
        "a warm read is not capped: {warm:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_round_stops_at_the_reserve_and_says_so() {
    let fake = fake(5).rate_limit(10, 21600).start().await;
    let proxy = proxy(
        &fake,
        &["ratelimit_reserve = 7"],
        &format!(
            "[[sync]]\nname = \"budget\"\nrepository = \"{UPSTREAM}/{REPO}\"\ntags = '^t'\n\
             interval = \"1h\"\n"
        ),
    )
    .await;
    let kept = "regcache_sync_images{rule=\"budget\"}";
    for _ in 0..100 {
        if proxy.metric(kept).await > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // t5, t4, t3 spend 10 → 7: at the reserve the round stops before t2.
    assert_eq!(proxy.metric(kept).await, 3.0);
    assert_eq!(fake.remaining(), Some(7));
    for tag in ["t2", "t1"] {
        assert_eq!(
            fake.count(|r| r.path.ends_with(&format!("/manifests/{tag}"))),
            0,
            "{tag} is not asked for"
        );
    }
    let status = get_text(&format!("{}/", proxy.url())).await;
    assert!(
        status.contains("t5, t4, t3")
            && status.contains("stopped early: upstream fake.test is at its rate-limit reserve"),
        "{status}"
    );
    assert_eq!(
        proxy
            .metric("regcache_sync_failures_total{rule=\"budget\"}")
            .await,
        0.0,
        "a stop at the reserve is not a failure"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_rule_of_an_offline_upstream_is_skipped_not_failed() {
    let fake = fake(2).start().await;
    let proxy = proxy(
        &fake,
        &["offline = true"],
        &format!("[[sync]]\nname = \"air\"\nrepository = \"{UPSTREAM}/{REPO}\"\n"),
    )
    .await;
    let next_run = "regcache_sync_next_run_timestamp_seconds{rule=\"air\"}";
    for _ in 0..100 {
        if proxy.metric(next_run).await > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.metric(next_run).await > 0.0, "the round ran");
    assert_eq!(
        proxy
            .metric("regcache_sync_failures_total{rule=\"air\"}")
            .await,
        0.0
    );
    let status = get_text(&format!("{}/", proxy.url())).await;
    assert!(
        status.contains("skipped: upstream fake.test is offline (configured)"),
        "{status}"
    );
    assert_eq!(
        registry_requests(&fake),
        0,
        "an offline upstream is never asked"
    );
}

// ---------------------------------------------------------------- sync schedules --

/// The real upstream's name in the sync test.
const NAME: &str = "registry.test";
/// Each image's one layer.
const LAYER: usize = 200 * 1024;

fn cached_path(proxy: &TestProxy, digest: &str) -> PathBuf {
    common::blob_file(&proxy.storage(), NAME, digest)
}

/// Whether every blob and the manifest of `image` is in the store.
fn fully_cached(proxy: &TestProxy, image: &Pushed) -> bool {
    std::iter::once(&image.digest)
        .chain(&image.blobs)
        .all(|digest| cached_path(proxy, digest).exists())
}

async fn push_tag(upstream: &Upstream, repo: &str, tag: &str) -> Pushed {
    push_oci_image(upstream, repo, tag, &format!("{repo}:{tag}"), &[LAYER]).await
}

async fn proxy_series(proxy: &TestProxy, series: &str) -> Option<f64> {
    proxy
        .metrics_text()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Waits until `series` reads `value`.
async fn wait_metric(proxy: &TestProxy, name: &str, value: f64) {
    for _ in 0..300 {
        if proxy_series(proxy, name).await == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{name} never reached {value} (now {:?})\n{}",
        proxy_series(proxy, name).await,
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_keeps_the_newest_matching_tags_mirrored_and_pinned_across_restarts() {
    let upstream = Upstream::start(Auth::None).await;
    let mut app = std::collections::BTreeMap::new();
    for tag in [
        "1.25.5", "1.26.0", "1.27.0", "1.27.3", "1.28.0", "2.0.0", "latest",
    ] {
        app.insert(tag, push_tag(&upstream, "sync/app", tag).await);
    }
    let mut tool = std::collections::BTreeMap::new();
    for tag in ["stable-a", "stable-b", "dev"] {
        tool.insert(tag, push_tag(&upstream, "sync/tool", tag).await);
    }
    // Room for six images; the synced ones (four, then five with the one dropped) fit.
    let mut proxy = TestProxy::start(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        &format!(
            "[storage]\nmax_size = \"1300KiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.5\n\
             [[sync]]\nname = \"app\"\nrepository = \"{NAME}/sync/app\"\nsemver = \">=1.26, <2\"\n\
             keep = 3\ninterval = \"1h\"\n\
             [[sync]]\nrepository = \"sync/tool\"\ntags = '^stable-'\nkeep = 1\ninterval = \"1h\"\n"
        ),
    )
    .await;

    // At start each rule runs once, before anyone pulls.
    wait_metric(&proxy, "regcache_sync_images{rule=\"app\"}", 3.0).await;
    wait_metric(&proxy, "regcache_sync_images{rule=\"sync/tool\"}", 1.0).await;
    for tag in ["1.28.0", "1.27.3", "1.27.0"] {
        assert!(fully_cached(&proxy, &app[tag]), "{tag} was synced");
    }
    assert!(fully_cached(&proxy, &tool["stable-b"]));
    for (tag, image) in [
        ("1.26.0", &app["1.26.0"]),
        ("2.0.0", &app["2.0.0"]),
        ("latest", &app["latest"]),
        ("stable-a", &tool["stable-a"]),
    ] {
        assert!(
            !cached_path(&proxy, &image.digest).exists(),
            "{tag} is not in the set"
        );
    }
    assert_eq!(
        upstream.manifest_gets("1.26.0"),
        0,
        "only picked tags are fetched"
    );
    // A pull of a synced image now costs the upstream nothing but the tag's revalidation.
    let blob_gets = upstream.count(|e| e.method == "GET" && e.path.contains("/blobs/"));
    proxy
        .pull_verified("sync/app:1.28.0", &app["1.28.0"].digest)
        .await;
    assert_eq!(
        upstream.count(|e| e.method == "GET" && e.path.contains("/blobs/")),
        blob_gets
    );
    let page = get_text(&format!("{}/", proxy.url())).await;
    assert!(
        page.contains("1.28.0, 1.27.3, 1.27.0") && page.contains("in 59m"),
        "{page}"
    );

    // The schedule survives a restart: the next round is an hour away, not at start.
    let next_run = proxy_series(
        &proxy,
        "regcache_sync_next_run_timestamp_seconds{rule=\"app\"}",
    )
    .await;
    let listings = upstream.count(|e| e.path.ends_with("/tags/list"));
    let after = proxy.events().len();
    proxy.restart().await;
    proxy
        .wait_for_event(after, Duration::from_secs(10), |event| {
            event["event"] == "listening"
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        upstream.count(|e| e.path.ends_with("/tags/list")),
        listings,
        "no round at restart\n{}",
        proxy.log()
    );
    assert_eq!(
        proxy_series(
            &proxy,
            "regcache_sync_next_run_timestamp_seconds{rule=\"app\"}"
        )
        .await,
        next_run
    );

    // A new release; `sync --once` runs the rounds inside the running server.
    let newest = push_tag(&upstream, "sync/app", "1.29.0").await;
    let output = run_regcache(&["sync", "--once"], proxy.config_path()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("app: 3 picked, 3 kept, 1 fetched, 0 failed"),
        "{stdout}"
    );
    assert!(fully_cached(&proxy, &newest));
    let dropped_layer = app["1.27.0"]
        .blobs
        .iter()
        .find(|d| std::fs::metadata(cached_path(&proxy, d)).is_ok_and(|m| m.len() >= LAYER as u64))
        .cloned()
        .expect("the dropped image's layer is still cached");

    // Past the budget, eviction takes the dropped 1.27.0 (unpinned, least recently used)
    // and never the kept ones.
    proxy
        .pull_verified("sync/app:2.0.0", &app["2.0.0"].digest)
        .await;
    proxy
        .pull_verified("sync/app:1.26.0", &app["1.26.0"].digest)
        .await;
    for _ in 0..100 {
        if !cached_path(&proxy, &dropped_layer).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !cached_path(&proxy, &dropped_layer).exists(),
        "the dropped image was evicted\n{}",
        proxy.log()
    );
    for image in [&newest, &app["1.28.0"], &app["1.27.3"], &tool["stable-b"]] {
        assert!(
            fully_cached(&proxy, image),
            "{} stays pinned",
            image.reference
        );
    }
}
