//! Upstream tag lists, bounded and shared (issue 19, item 3): a fake upstream serves a long
//! paged list (a real registry with a quarter of a million tags is impractical), regcache runs
//! in process in front of it, and the tests count what the fake was asked and what a client
//! gets: the list cut at `cache.tag_list_max_tags` / `cache.tag_list_max_bytes` (the first
//! tags, in order, still paged by `n`/`last`), the truncation counted, one upstream walk for
//! many concurrent requests, none for a request within `cache.tag_list_ttl`.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::fake::{fake_tag, FakeRegistry, Fault, Listener};
use common::http::client;
use common::inproc::InProcess;
use common::proxy::UpstreamSpec;
use reqwest::StatusCode;

/// The name regcache knows the fake by.
const UPSTREAM: &str = "fake.test";
/// The repository whose tags are listed.
const REPO: &str = "test/many";
/// The truncation counter of the fake's upstream.
const TRUNCATED: &str = "regcache_tag_list_truncated_total{upstream=\"fake.test\"}";

async fn proxy(fake: &FakeRegistry, cache_toml: &str) -> InProcess {
    let spec = UpstreamSpec::default_at(UPSTREAM, fake.url());
    InProcess::start(&[spec], &format!("[cache]\n{cache_toml}\n")).await
}

/// Upstream requests for the tag list so far.
fn walks(fake: &FakeRegistry) -> usize {
    fake.count(|r| r.on == Listener::Registry && r.is_get("/tags/list"))
}

/// One page from the proxy: its tags and the `Link` target, if any.
async fn page(proxy: &InProcess, path_and_query: &str) -> (Vec<String>, Option<String>) {
    let response = client()
        .get(format!("{}{path_and_query}", proxy.url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
    assert_eq!(response.status(), StatusCode::OK, "{path_and_query}");
    let link = response
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Some(v.strip_prefix('<')?.split_once('>')?.0.to_owned()));
    let body: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(body["name"], REPO);
    let tags = body["tags"]
        .as_array()
        .expect("a tags array")
        .iter()
        .map(|t| t.as_str().expect("a string").to_owned())
        .collect();
    (tags, link)
}

/// Every tag, following the proxy's `Link`s from a first page of `n`.
async fn all_pages(proxy: &InProcess, n: usize) -> Vec<String> {
    let mut next = Some(format!("/v2/{REPO}/tags/list?n={n}"));
    let mut tags = Vec::new();
    while let Some(path) = next.take() {
        let (page_tags, link) = page(proxy, &path).await;
        assert!(page_tags.len() <= n, "{path}: {} tags", page_tags.len());
        tags.extend(page_tags);
        next = link;
    }
    tags
}

fn first(count: usize) -> Vec<String> {
    (0..count).map(fake_tag).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_past_the_tag_limit_serves_its_first_tags_and_is_read_once_per_ttl() {
    // 200 000 tags in pages of 1 000; regcache takes 2 500 of them.
    let fake = FakeRegistry::builder()
        .tag_list(REPO, 200_000, 1_000)
        .start()
        .await;
    let proxy = proxy(&fake, "tag_list_max_tags = 2500").await;

    let (tags, link) = page(&proxy, &format!("/v2/{REPO}/tags/list?n=1")).await;
    assert_eq!(tags, first(1));
    assert_eq!(
        link.as_deref(),
        Some(format!("/v2/{REPO}/tags/list?n=1&last={}", fake_tag(0)).as_str())
    );
    assert_eq!(walks(&fake), 3, "three pages hold the first 2 500 tags");
    assert_eq!(proxy.metric(TRUNCATED).await, 1.0);

    // The whole list, paged by `n`/`last`, from the list read once.
    assert_eq!(all_pages(&proxy, 700).await, first(2_500));
    let (tags, link) = page(&proxy, &format!("/v2/{REPO}/tags/list")).await;
    assert_eq!((tags, link), (first(2_500), None));
    let last = fake_tag(2_497);
    let (tags, link) = page(&proxy, &format!("/v2/{REPO}/tags/list?n=5&last={last}")).await;
    assert_eq!((tags, link), (vec![fake_tag(2_498), fake_tag(2_499)], None));
    assert_eq!(
        walks(&fake),
        3,
        "within tag_list_ttl, the upstream is not asked again"
    );
    assert_eq!(proxy.metric(TRUNCATED).await, 1.0, "counted once per walk");

    // Past the TTL: one new walk, cut and counted again.
    proxy.clock().advance(Duration::from_secs(31));
    let (tags, _) = page(&proxy, &format!("/v2/{REPO}/tags/list?n=2")).await;
    assert_eq!(tags, first(2));
    assert_eq!(walks(&fake), 6);
    assert_eq!(proxy.metric(TRUNCATED).await, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_past_the_byte_limit_serves_the_tags_read_before_it() {
    // Each tag takes 12 bytes of JSON (`"t00000000",`): a page of 1 000 is about 12 KB, so
    // 20 KiB holds one page and part of the next, whose rest is never read.
    let fake = FakeRegistry::builder()
        .tag_list(REPO, 100_000, 1_000)
        .start()
        .await;
    let proxy = proxy(&fake, "tag_list_max_bytes = \"20KiB\"").await;
    let tags = all_pages(&proxy, 400).await;
    assert!(
        tags.len() > 1_000 && tags.len() * 12 <= 20 * 1024,
        "{} tags",
        tags.len()
    );
    assert_eq!(
        tags,
        first(tags.len()),
        "the first tags, in order, none missing"
    );
    assert_eq!(walks(&fake), 2);
    assert_eq!(proxy.metric(TRUNCATED).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_one_upstream_walk() {
    // A slow upstream (the list trickles in), no reuse after the walk (tag_list_ttl = 0): every
    // request that arrives while the walk runs joins it.
    let fake = FakeRegistry::builder()
        .tag_list(REPO, 300, 100)
        .start()
        .await;
    fake.set_fault(
        "/tags/list",
        Fault::Trickle {
            bytes: 64,
            every: Duration::from_millis(20),
        },
    );
    let proxy = Arc::new(proxy(&fake, "tag_list_ttl = \"0s\"").await);
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut requests = Vec::new();
    for _ in 0..16 {
        let (proxy, barrier) = (Arc::clone(&proxy), Arc::clone(&barrier));
        requests.push(tokio::spawn(async move {
            barrier.wait().await;
            page(&proxy, &format!("/v2/{REPO}/tags/list")).await.0
        }));
    }
    for request in requests {
        assert_eq!(request.await.expect("request task"), first(300));
    }
    assert_eq!(
        walks(&fake),
        3,
        "one walk of three pages for sixteen requests"
    );
    assert_eq!(proxy.metric(TRUNCATED).await, 0.0);

    // With tag_list_ttl = 0 the next request walks again.
    fake.clear_faults();
    let (tags, _) = page(&proxy, &format!("/v2/{REPO}/tags/list?n=10")).await;
    assert_eq!(tags, first(10));
    assert_eq!(walks(&fake), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_walk_is_not_kept() {
    // Failures are not kept: the next request asks again (and gets the list).
    let fake = FakeRegistry::builder()
        .tag_list(REPO, 10, 100)
        .start()
        .await;
    let proxy = proxy(&fake, "").await;
    fake.set_fault_times("/tags/list", Fault::status(404), 1);
    let response = client()
        .get(format!("{}/v2/{REPO}/tags/list", proxy.url()))
        .send()
        .await
        .expect("tags");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (tags, _) = page(&proxy, &format!("/v2/{REPO}/tags/list")).await;
    assert_eq!(tags, first(10));
    assert_eq!(walks(&fake), 2);
}
