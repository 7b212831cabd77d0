//! Tag freshness, serving through upstream outages, the circuit breaker, offline mode and
//! self-healing, against a real upstream registry (Debian's `docker-registry`), optionally
//! behind a [`FaultProxy`] that hangs or refuses, pulled with skopeo. regcache runs in process
//! (port 0) with an adjustable clock: TTLs pass by advancing it, not by sleeping.

use crate::common;

use std::time::{Duration, Instant};

use common::faultproxy::{FaultProxy, Mode};
use common::images;
use common::inproc::InProcess;
use common::proxy::{skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;

const NAME: &str = "registry.test";

async fn proxy_for(upstream: &Upstream, cache_toml: &str) -> InProcess {
    InProcess::start(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        cache_toml,
    )
    .await
}

/// A manifest GET's status, `Docker-Content-Digest` and whether it carried `Warning: 110`.
async fn manifest_answer(
    base_url: &str,
    repo: &str,
    reference: &str,
) -> (StatusCode, String, bool) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
        .get(format!("{base_url}/v2/{repo}/manifests/{reference}"))
        .header("accept", images::MT_OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (digest, warning) = (header("docker-content-digest"), header("warning"));
    (response.status(), digest, warning.starts_with("110"))
}

async fn manifest_digest(proxy: &InProcess, repo: &str, reference: &str) -> (StatusCode, String) {
    let (status, digest, _) = manifest_answer(&proxy.url(), repo, reference).await;
    (status, digest)
}

fn heads(upstream: &Upstream, repo: &str, tag: &str) -> usize {
    let path = format!("/v2/{repo}/manifests/{tag}");
    upstream.count(|e| e.method == "HEAD" && e.path == path)
}

fn gets(upstream: &Upstream, repo: &str, tag: &str) -> usize {
    let path = format!("/v2/{repo}/manifests/{tag}");
    upstream.count(|e| e.method == "GET" && e.path == path)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_re_pushed_tag_is_seen_after_the_ttl_and_not_before() {
    let upstream = Upstream::start(Auth::None).await;
    let old = images::push_oci_image(&upstream, "test/moving", "v1", "old", &[512]).await;
    let proxy = proxy_for(&upstream, "[cache]\ntag_ttl = \"60s\"\n").await;
    assert_eq!(
        manifest_digest(&proxy, "test/moving", "v1").await.1,
        old.digest
    );
    let new = images::push_oci_image(&upstream, "test/moving", "v1", "new", &[512]).await;
    assert_ne!(old.digest, new.digest);
    // Within the TTL: the cached digest, without asking the upstream.
    let gets_before = gets(&upstream, "test/moving", "v1");
    assert_eq!(
        manifest_digest(&proxy, "test/moving", "v1").await.1,
        old.digest
    );
    assert_eq!(gets(&upstream, "test/moving", "v1"), gets_before);
    assert_eq!(heads(&upstream, "test/moving", "v1"), 0);
    proxy.clock().advance(Duration::from_secs(59));
    assert_eq!(
        manifest_digest(&proxy, "test/moving", "v1").await.1,
        old.digest,
        "a second before the TTL"
    );
    proxy.clock().advance(Duration::from_secs(2));
    // After it: the new digest.
    assert_eq!(
        manifest_digest(&proxy, "test/moving", "v1").await.1,
        new.digest
    );
    // And by skopeo, the whole new image.
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) = skopeo_copy(
        &format!("{}/test/moving:v1", proxy.addr()),
        dest.path(),
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    verify_dir(dest.path(), &new.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_tag_is_revalidated_with_one_head_for_many_clients() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/steady", "v1", "steady", &[512]).await;
    let proxy = proxy_for(&upstream, "[cache]\ntag_ttl = \"60s\"\n").await;
    assert_eq!(
        manifest_digest(&proxy, "test/steady", "v1").await.1,
        image.digest
    );
    let gets_after_first = gets(&upstream, "test/steady", "v1");
    proxy.clock().advance(Duration::from_secs(61));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let url = proxy.url();
        clients.push(tokio::spawn(async move {
            let response = reqwest::Client::new()
                .get(format!("{url}/v2/test/steady/manifests/v1"))
                .header("accept", images::MT_OCI_MANIFEST)
                .send()
                .await
                .expect("GET");
            response.headers()["docker-content-digest"]
                .to_str()
                .expect("ascii")
                .to_owned()
        }));
    }
    for client in clients {
        assert_eq!(client.await.expect("client"), image.digest);
    }
    assert_eq!(
        heads(&upstream, "test/steady", "v1"),
        1,
        "revalidations were not coalesced"
    );
    assert_eq!(
        gets(&upstream, "test/steady", "v1"),
        gets_after_first,
        "an unchanged tag was downloaded again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_serves_cached_tags_stale_and_fails_misses_fast() {
    let mut upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/outage", "v1", "outage", &[2048]).await;
    let spec = UpstreamSpec::default_at(NAME, &upstream.url()).with("breaker_threshold = 2");
    let proxy = InProcess::start(&[spec], "[cache]\ntag_ttl = \"0s\"\n").await;
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) = skopeo_copy(
        &format!("{}/test/outage:v1", proxy.addr()),
        dest.path(),
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    upstream.stop().await;

    // Cached: the whole image still pulls by tag.
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) = skopeo_copy(
        &format!("{}/test/outage:v1", proxy.addr()),
        dest.path(),
        &[],
    )
    .await;
    assert!(ok, "stale pull failed: {stderr}\n{}", proxy.log());
    verify_dir(dest.path(), &image.digest);
    let response = reqwest::get(format!("{}/v2/test/outage/manifests/v1", proxy.url()))
        .await
        .expect("GET");
    assert!(response.headers()["warning"]
        .to_str()
        .expect("ascii")
        .starts_with("110"));

    // Misses fail with a clear error. The failed revalidations above and these misses (each
    // request counted once, retries included) open the circuit.
    for _ in 0..2 {
        let response = reqwest::get(format!("{}/v2/test/never/manifests/v1", proxy.url()))
            .await
            .expect("GET");
        assert!(response.status().is_server_error());
    }
    assert_eq!(breaker_transitions(&proxy, "open").await, 1.0);
    // While open, a miss is one probe without retries: answered at once.
    let started = Instant::now();
    let response = reqwest::get(format!("{}/v2/test/never/manifests/v1", proxy.url()))
        .await
        .expect("GET");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = response.text().await.expect("body");
    assert!(
        body.contains("UNAVAILABLE") && body.contains(NAME),
        "{body}"
    );
    // Not a timing target: the retries with backoff alone would take longer than this.
    assert!(elapsed < Duration::from_millis(250), "{elapsed:?}");
}

/// `regcache_upstream_breaker_transitions_total` for the upstream, to `to`.
async fn breaker_transitions(proxy: &InProcess, to: &str) -> f64 {
    proxy
        .metric(&format!(
            "regcache_upstream_breaker_transitions_total{{to=\"{to}\",upstream=\"{NAME}\"}}"
        ))
        .await
}

/// An upstream behind a fault proxy, and regcache in front of the fault proxy.
async fn behind_fault_proxy(upstream: &Upstream, cache_toml: &str) -> (FaultProxy, InProcess) {
    let faults = FaultProxy::start(&upstream.addr()).await;
    let proxy =
        InProcess::start(&[UpstreamSpec::default_at(NAME, &faults.url())], cache_toml).await;
    (faults, proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_upstream_gets_a_cached_tag_served_stale_within_3s_then_updated() {
    let upstream = Upstream::start(Auth::None).await;
    let old = images::push_oci_image(&upstream, "test/brownout", "v1", "old", &[4096]).await;
    let (faults, proxy) = behind_fault_proxy(&upstream, "").await;
    proxy.pull_verified("test/brownout:v1", &old.digest).await;
    let new = images::push_oci_image(&upstream, "test/brownout", "v1", "new", &[4096]).await;

    // Past the TTL, the upstream accepts connections and never answers.
    faults.set(Mode::Hang);
    proxy.clock().advance(Duration::from_secs(61));
    let started = Instant::now();
    let (status, digest, warning) = manifest_answer(&proxy.url(), "test/brownout", "v1").await;
    let elapsed = started.elapsed();
    assert_eq!(
        (status, digest.as_str(), warning),
        (StatusCode::OK, old.digest.as_str(), true)
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "served stale after {elapsed:?}"
    );
    assert_eq!(
        proxy
            .metric(&format!(
                "regcache_revalidation_deadline_total{{upstream=\"{NAME}\"}}"
            ))
            .await,
        1.0
    );
    assert!(
        proxy
            .metric("regcache_stale_served_total{reason=\"deadline\"}")
            .await
            >= 1.0
    );
    // While that revalidation is still out, later clients are not held again.
    let started = Instant::now();
    let (status, digest, warning) = manifest_answer(&proxy.url(), "test/brownout", "v1").await;
    assert_eq!(
        (status, digest.as_str(), warning),
        (StatusCode::OK, old.digest.as_str(), true)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The whole cached image still pulls, digest-checked, while the upstream hangs.
    let started = Instant::now();
    proxy.pull_verified("test/brownout:v1", &old.digest).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The upstream answers again: the tag moves to what it says.
    faults.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, digest, _) = manifest_answer(&proxy.url(), "test/brownout", "v1").await;
        assert_eq!(status, StatusCode::OK);
        if digest == new.digest {
            break;
        }
        assert!(Instant::now() < deadline, "the tag was not updated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.pull_verified("test/brownout:v1", &new.digest).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revalidation_past_its_deadline_updates_the_tag_in_the_background() {
    let upstream = Upstream::start(Auth::None).await;
    let old = images::push_oci_image(&upstream, "test/slow", "v1", "old", &[1024]).await;
    let (faults, proxy) =
        behind_fault_proxy(&upstream, "[cache]\nrevalidate_timeout = \"300ms\"\n").await;
    assert_eq!(
        manifest_digest(&proxy, "test/slow", "v1").await.1,
        old.digest
    );
    let new = images::push_oci_image(&upstream, "test/slow", "v1", "new", &[1024]).await;

    // A slow upstream: every new connection waits 1.5 s before it is answered.
    faults.set(Mode::Delay(Duration::from_millis(1500)));
    proxy.clock().advance(Duration::from_secs(61));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = proxy.url();
            tokio::spawn(async move { manifest_answer(&url, "test/slow", "v1").await })
        })
        .collect();
    for client in clients {
        let (status, digest, warning) = client.await.expect("client");
        assert_eq!(
            (status, digest.as_str(), warning),
            (StatusCode::OK, old.digest.as_str(), true)
        );
    }
    // The shared revalidation answers after the deadline and moves the tag; within the TTL
    // the next client gets it from the index.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, digest, warning) = manifest_answer(&proxy.url(), "test/slow", "v1").await;
        if digest == new.digest {
            assert!(!warning);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the background revalidation did not land"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        heads(&upstream, "test/slow", "v1"),
        1,
        "the waiting clients shared one revalidation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_answers_at_once_and_refreshes_behind() {
    let upstream = Upstream::start(Auth::None).await;
    let old = images::push_oci_image(&upstream, "test/swr", "v1", "old", &[1024]).await;
    let proxy = proxy_for(
        &upstream,
        "[cache]\ntag_ttl = \"60s\"\nstale_while_revalidate = \"60s\"\n",
    )
    .await;
    assert_eq!(
        manifest_digest(&proxy, "test/swr", "v1").await.1,
        old.digest
    );
    let new = images::push_oci_image(&upstream, "test/swr", "v1", "new", &[1024]).await;
    proxy.clock().advance(Duration::from_secs(90));
    let (status, digest, warning) = manifest_answer(&proxy.url(), "test/swr", "v1").await;
    assert_eq!(
        (status, digest.as_str(), warning),
        (StatusCode::OK, old.digest.as_str(), true)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while manifest_digest(&proxy, "test/swr", "v1").await.1 != new.digest {
        assert!(
            Instant::now() < deadline,
            "the background revalidation did not land"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the window, the client waits for the revalidation again.
    proxy.clock().advance(Duration::from_secs(121));
    let (_, digest, warning) = manifest_answer(&proxy.url(), "test/swr", "v1").await;
    assert_eq!((digest.as_str(), warning), (new.digest.as_str(), false));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_short_outage_the_first_miss_succeeds_within_3s() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/back", "v1", "back", &[4096, 512]).await;
    let faults = FaultProxy::start(&upstream.addr()).await;
    let spec = UpstreamSpec::default_at(NAME, &faults.url()).with("breaker_threshold = 3");
    let proxy = InProcess::start(&[spec], "").await;
    // The outage: every request is refused (each with its retries) until the circuit opens,
    // and misses then fail at once.
    faults.set(Mode::Refuse);
    for _ in 0..4 {
        let (status, _, _) = manifest_answer(&proxy.url(), "test/back", "v1").await;
        assert!(status.is_server_error(), "{status}");
    }
    assert_eq!(breaker_transitions(&proxy, "open").await, 1.0);

    faults.set(Mode::Pass);
    let started = Instant::now();
    let (status, digest, _) = manifest_answer(&proxy.url(), "test/back", "v1").await;
    let elapsed = started.elapsed();
    assert_eq!(
        (status, digest.as_str()),
        (StatusCode::OK, image.digest.as_str())
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(breaker_transitions(&proxy, "closed").await, 1.0);
    proxy.pull_verified("test/back:v1", &image.digest).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_provoking_server_errors_leaves_the_breaker_closed() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/legit", "v1", "legit", &[2048]).await;
    let proxy = proxy_for(&upstream, "").await;
    // A valid 255-character name, which Distribution 2.8 answers with 500.
    let odd = format!("test/{}", "a".repeat(250));
    let mut provoked = 0;
    for _ in 0..12 {
        let (status, _, _) = manifest_answer(&proxy.url(), &odd, "v1").await;
        assert!(
            status.is_server_error() || status == StatusCode::NOT_FOUND,
            "{status}"
        );
        provoked += usize::from(status.is_server_error());
    }
    assert!(
        provoked > 0,
        "the upstream did not answer 5xx to the odd name"
    );
    assert_eq!(breaker_transitions(&proxy, "open").await, 0.0);
    proxy.pull_verified("test/legit:v1", &image.digest).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_deleted_upstream_is_not_served_stale_unless_configured() {
    for (serve_stale_on_404, expected) in [(false, StatusCode::NOT_FOUND), (true, StatusCode::OK)] {
        let upstream = Upstream::start(Auth::None).await;
        let image = images::push_oci_image(&upstream, "test/gone", "v1", "gone", &[256]).await;
        let cache =
            format!("[cache]\ntag_ttl = \"0s\"\nserve_stale_on_404 = {serve_stale_on_404}\n");
        let proxy = proxy_for(&upstream, &cache).await;
        assert_eq!(
            manifest_digest(&proxy, "test/gone", "v1").await.1,
            image.digest
        );
        let deleted = reqwest::Client::new()
            .delete(format!(
                "{}/v2/test/gone/manifests/{}",
                upstream.url(),
                image.digest
            ))
            .send()
            .await
            .expect("DELETE upstream");
        assert!(deleted.status().is_success(), "{}", deleted.status());
        assert_eq!(manifest_digest(&proxy, "test/gone", "v1").await.0, expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_mode_serves_the_cache_and_never_dials_the_upstream() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/edge", "v1", "edge", &[4096, 1024]).await;
    let mut proxy = TestProxy::start(&[UpstreamSpec::default_at(NAME, &upstream.url())], "").await;
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) =
        skopeo_copy(&format!("{}/test/edge:v1", proxy.addr()), dest.path(), &[]).await;
    assert!(ok, "{stderr}");
    proxy.edit_config(|text| text.replace("default = true", "default = true\noffline = true"));
    proxy.restart().await;
    let requests_before = upstream.request_count();
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) =
        skopeo_copy(&format!("{}/test/edge:v1", proxy.addr()), dest.path(), &[]).await;
    assert!(
        ok,
        "offline pull of a cached image failed: {stderr}\n{}",
        proxy.log()
    );
    verify_dir(dest.path(), &image.digest);
    let (status, _, _) = manifest_answer(&proxy.url(), "test/not-cached", "v1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        upstream.request_count(),
        requests_before,
        "offline mode contacted the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_deleted_from_the_store_are_fetched_again_not_answered_404() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/heal", "v1", "heal", &[8192]).await;
    let proxy = proxy_for(&upstream, "").await;
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) =
        skopeo_copy(&format!("{}/test/heal:v1", proxy.addr()), dest.path(), &[]).await;
    assert!(ok, "{stderr}");
    // Delete every cached file (manifest, config, layer) under the live index entries.
    let blobs = proxy.storage().join("blobs").join(NAME).join("sha256");
    let mut deleted = 0;
    for digest in image.blobs.iter().chain(std::iter::once(&image.digest)) {
        let hex = digest.trim_start_matches("sha256:");
        let path = blobs.join(&hex[..2]).join(hex);
        std::fs::remove_file(&path).expect("cached file exists");
        deleted += 1;
    }
    assert_eq!(deleted, image.blobs.len() + 1);
    let dest = tempfile::tempdir().expect("temp dir");
    let by_digest = format!("{}/test/heal@{}", proxy.addr(), image.digest);
    let (ok, stderr) = skopeo_copy(&by_digest, dest.path(), &[]).await;
    assert!(
        ok,
        "pull after deleting the store's files failed: {stderr}\n{}",
        proxy.log()
    );
    verify_dir(dest.path(), &image.digest);
    for digest in &image.blobs {
        assert_eq!(upstream.blob_gets(digest), 2, "{digest} was not refetched");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_is_served_stale_up_to_max_stale_and_not_after() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/aged", "v1", "aged", &[1024]).await;
    let (faults, proxy) = behind_fault_proxy(
        &upstream,
        "[cache]\ntag_ttl = \"60s\"\nmax_stale = \"1h\"\n",
    )
    .await;
    assert_eq!(
        manifest_digest(&proxy, "test/aged", "v1").await.1,
        image.digest
    );
    faults.set(Mode::Refuse);

    proxy.clock().advance(Duration::from_secs(60 + 3590));
    let (status, digest, warning) = manifest_answer(&proxy.url(), "test/aged", "v1").await;
    assert_eq!(
        (status, digest.as_str(), warning),
        (StatusCode::OK, image.digest.as_str(), true)
    );

    proxy.clock().advance(Duration::from_secs(20));
    let (status, _, _) = manifest_answer(&proxy.url(), "test/aged", "v1").await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "past tag_ttl + max_stale the upstream's failure is the answer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_tag_is_remembered_for_negative_ttl() {
    let upstream = Upstream::start(Auth::None).await;
    images::push_oci_image(&upstream, "test/later", "v0", "later-0", &[512]).await;
    let proxy = proxy_for(&upstream, "[cache]\nnegative_ttl = \"60s\"\n").await;
    for _ in 0..3 {
        assert_eq!(
            manifest_digest(&proxy, "test/later", "v1").await.0,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(
        gets(&upstream, "test/later", "v1"),
        1,
        "the 404 was remembered"
    );

    let image = images::push_oci_image(&upstream, "test/later", "v1", "later", &[512]).await;
    proxy.clock().advance(Duration::from_secs(59));
    assert_eq!(
        manifest_digest(&proxy, "test/later", "v1").await.0,
        StatusCode::NOT_FOUND,
        "within negative_ttl"
    );
    proxy.clock().advance(Duration::from_secs(2));
    assert_eq!(
        manifest_digest(&proxy, "test/later", "v1").await,
        (StatusCode::OK, image.digest.clone())
    );
    assert_eq!(gets(&upstream, "test/later", "v1"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_rules_keep_versions_for_ever_and_refresh_latest_within_its_ttl() {
    let upstream = Upstream::start(Auth::None).await;
    let repo = "test/rules";
    let release = images::push_oci_image(&upstream, repo, "1.2.3", "release", &[512]).await;
    let latest = images::push_oci_image(&upstream, repo, "latest", "first", &[512]).await;
    let spec = UpstreamSpec::default_at(NAME, &upstream.url())
        .with("[[upstream.tag_rule]]\ntags = '^v?[0-9]+\\.[0-9]+\\.[0-9]+$'\nttl = \"never\"")
        .with("[[upstream.tag_rule]]\ntags = '^(latest|prod)$'\nttl = \"30s\"");
    let proxy = InProcess::start(&[spec], "[cache]\ntag_ttl = \"10m\"\n").await;
    for (tag, image) in [("1.2.3", &release), ("latest", &latest)] {
        assert_eq!(manifest_digest(&proxy, repo, tag).await.1, image.digest);
    }

    // A day on, far past cache.tag_ttl: the version is served without asking the upstream.
    proxy.clock().advance(Duration::from_secs(86_400));
    let before = upstream.request_count();
    assert_eq!(
        manifest_digest(&proxy, repo, "1.2.3").await.1,
        release.digest
    );
    assert_eq!(upstream.request_count(), before, "ttl = \"never\"");

    // latest moves upstream; its rule's 30 s (not the 10 m default) bring the new digest.
    let moved = images::push_oci_image(&upstream, repo, "latest", "second", &[512]).await;
    assert_eq!(
        manifest_digest(&proxy, repo, "latest").await.1,
        moved.digest,
        "a day past its 30 s TTL"
    );
    let moved_again = images::push_oci_image(&upstream, repo, "latest", "third", &[512]).await;
    proxy.clock().advance(Duration::from_secs(29));
    assert_eq!(
        manifest_digest(&proxy, repo, "latest").await.1,
        moved.digest,
        "within 30 s"
    );
    proxy.clock().advance(Duration::from_secs(2));
    assert_eq!(
        manifest_digest(&proxy, repo, "latest").await.1,
        moved_again.digest,
        "past 30 s, well within cache.tag_ttl"
    );
    assert_eq!(heads(&upstream, repo, "1.2.3"), 0);
}
