//! Tag freshness, serving through upstream outages, offline mode and self-healing, against a
//! real upstream registry (Debian's `docker-registry`).

mod common;

use std::time::{Duration, Instant};

use common::images;
use common::proxy::{skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;

const NAME: &str = "registry.test";

async fn proxy_for(upstream: &Upstream, cache_toml: &str) -> TestProxy {
    TestProxy::start(
        &[UpstreamSpec::default_at(NAME, &upstream.url())],
        cache_toml,
    )
    .await
}

async fn manifest_digest(proxy: &TestProxy, repo: &str, reference: &str) -> (StatusCode, String) {
    let response = reqwest::Client::new()
        .get(format!("{}/v2/{repo}/manifests/{reference}", proxy.url()))
        .header("accept", images::MT_OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    let digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (response.status(), digest)
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
    let proxy = proxy_for(&upstream, "[cache]\ntag_ttl = \"3s\"\n").await;
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
    tokio::time::sleep(Duration::from_millis(3100)).await;
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
    let proxy = proxy_for(&upstream, "[cache]\ntag_ttl = \"1s\"\n").await;
    assert_eq!(
        manifest_digest(&proxy, "test/steady", "v1").await.1,
        image.digest
    );
    let gets_after_first = gets(&upstream, "test/steady", "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
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
    let proxy = proxy_for(&upstream, "[cache]\ntag_ttl = \"0s\"\n").await;
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

    // Misses fail with a clear error, and once the upstream is marked down, at once.
    for _ in 0..6 {
        let response = reqwest::get(format!("{}/v2/test/never/manifests/v1", proxy.url()))
            .await
            .expect("GET");
        assert!(response.status().is_server_error());
    }
    let started = Instant::now();
    let response = reqwest::get(format!("{}/v2/test/never/manifests/v1", proxy.url()))
        .await
        .expect("GET");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body = response.text().await.expect("body");
    assert!(
        body.contains("marked down") && body.contains(NAME),
        "{body}"
    );
    // Not a timing target: the retries with backoff alone would take longer than this.
    assert!(elapsed < Duration::from_millis(250), "{elapsed:?}");
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
    let mut proxy = proxy_for(&upstream, "").await;
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
    let (status, _) = manifest_digest(&proxy, "test/not-cached", "v1").await;
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
