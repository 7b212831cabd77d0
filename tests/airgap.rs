//! Air-gapped sites against a real upstream (CNCF Distribution 2.8, which has no referrers API
//! and lists tags unsorted): tag lists and referrers served from the cache, `regcache
//! prefetch`, `regcache export` / `import`, with skopeo as the client.

mod common;

use common::images;
use common::proxy::{TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;

/// The name regcache knows the test upstream by.
const UPSTREAM_NAME: &str = "registry.test";

async fn get_json(url: &str) -> (StatusCode, reqwest::header::HeaderMap, serde_json::Value) {
    let response = reqwest::get(url).await.expect("GET");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn digests(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|d| d["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_lists_and_referrers_are_answered_from_the_cache_offline() {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    let mut proxy = TestProxy::start(&[spec], "").await;
    let subject = &images.small_oci;
    for image in [subject, &images.referrer] {
        proxy.pull_verified(&image.reference, &image.digest).await;
    }
    let referrers_url = format!(
        "{}/v2/{}/referrers/{}",
        proxy.url(),
        subject.repo,
        subject.digest
    );
    let fallback_tag = subject.digest.replace(':', "-");

    // Online: the upstream lacks the referrers API (404); regcache answers with an index.
    let (status, headers, index) = get_json(&referrers_url).await;
    assert_eq!(status, StatusCode::OK, "{index}\n{}", proxy.log());
    assert_eq!(
        headers["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(digests(&index), [images.referrer.digest.as_str()]);

    // Offline: the tag list and the referrers come from the cache.
    proxy.edit_config(|text| text.replace("default = true", "default = true\noffline = true"));
    proxy.restart().await;
    let requests_before = upstream.request_count();
    let tags_url = format!("{}/v2/{}/tags/list", proxy.url(), subject.repo);
    let (status, _, list) = get_json(&tags_url).await;
    assert_eq!(status, StatusCode::OK, "{list}\n{}", proxy.log());
    let mut expected = vec![
        "referrer-v1".to_owned(),
        fallback_tag.clone(),
        "v1".to_owned(),
    ];
    expected.sort();
    assert_eq!(list["tags"], serde_json::json!(expected));
    assert_eq!(list["name"], subject.repo.as_str());

    let (status, headers, page) = get_json(&format!("{tags_url}?n=2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["tags"], serde_json::json!(expected[..2]));
    let link = headers["link"].to_str().expect("ascii link");
    assert!(
        link.starts_with(&format!("</v2/{}/tags/list?n=2&last=", subject.repo)),
        "{link}"
    );
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .expect("a link target");
    let (_, headers, page) = get_json(&format!("{}{next}", proxy.url())).await;
    assert_eq!(page["tags"], serde_json::json!(expected[2..]));
    assert!(headers.get("link").is_none(), "the last page has no link");

    let (status, _, index) = get_json(&referrers_url).await;
    assert_eq!(status, StatusCode::OK, "{index}");
    assert_eq!(digests(&index), [images.referrer.digest.as_str()]);
    let filtered = format!(
        "{referrers_url}?artifactType={}",
        images::ARTIFACT_TYPE.replace('+', "%2B")
    );
    let (_, headers, index) = get_json(&filtered).await;
    assert_eq!(digests(&index), [images.referrer.digest.as_str()]);
    assert_eq!(headers["oci-filters-applied"], "artifactType");
    let (_, headers, index) =
        get_json(&format!("{referrers_url}?artifactType=application/x-none")).await;
    assert!(digests(&index).is_empty(), "{index}");
    assert_eq!(headers["oci-filters-applied"], "artifactType");

    // A repository nothing was cached for is unknown, not an outage.
    let (status, _, _) = get_json(&format!("{}/v2/test/docker-v2/tags/list", proxy.url())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        upstream.request_count(),
        requests_before,
        "offline mode contacted the upstream"
    );
}
