//! Pull-through end to end: a real upstream (CNCF Distribution, Debian's `docker-registry`),
//! the real `regcache` binary, and real clients (`skopeo`, plus raw HTTP where a client would
//! hide what is checked).

use crate::common;

use common::http::oci_error;
use common::images::{self, Pushed};
use common::proxy::{verify_dir, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};

/// The name regcache knows the test upstream by (what `ns=` and path prefixes use).
const UPSTREAM_NAME: &str = "registry.test";

async fn setup(auth: Auth) -> (Upstream, TestProxy) {
    let upstream = Upstream::start(auth).await;
    let mut spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    if let Some((user, password)) = upstream.creds() {
        spec = spec
            .with(&format!("username = \"{user}\""))
            .with(&format!("password = \"{password}\""));
    }
    let proxy = TestProxy::start(&[spec], "").await;
    (upstream, proxy)
}

/// Pulls `reference` (`repo:tag` or `repo@digest`) through the proxy with skopeo and checks
/// every digest against `expected`.
async fn pull_and_verify(proxy: &TestProxy, reference: &str, expected: &Pushed) -> usize {
    proxy.pull_verified(reference, &expected.digest).await
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_media_type_pulls_with_identical_digests_and_warm_pulls_stay_local() {
    let (upstream, proxy) = setup(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let all = images.pullable();
    for image in all {
        let blobs = pull_and_verify(&proxy, &image.reference, image).await;
        assert!(blobs > 0, "{} copied no blobs", image.reference);
    }
    // By digest, through the prefix route.
    for image in all {
        let reference = format!("{UPSTREAM_NAME}/{}@{}", image.repo, image.digest);
        pull_and_verify(&proxy, &reference, image).await;
    }
    // Warm: the second pull of everything makes no upstream blob request.
    let blob_gets_before: usize = all
        .iter()
        .flat_map(|i| i.blobs.iter())
        .map(|d| upstream.blob_gets(d))
        .sum();
    for image in all {
        pull_and_verify(&proxy, &image.reference, image).await;
    }
    let blob_gets_after: usize = all
        .iter()
        .flat_map(|i| i.blobs.iter())
        .map(|d| upstream.blob_gets(d))
        .sum();
    assert_eq!(
        blob_gets_before, blob_gets_after,
        "a warm pull fetched blobs upstream"
    );

    // The referrers tag-schema index carries artifactType descriptors that skopeo 1.9
    // re-serialises, so it is checked raw: byte-for-byte, same digest.
    let index = &images.referrers_index;
    let response = reqwest::Client::new()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            proxy.url(),
            index.repo,
            index.tag
        ))
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .await
        .expect("GET referrers index");
    assert_eq!(response.status(), StatusCode::OK);
    let header_digest = response.headers()["docker-content-digest"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body = response.bytes().await.expect("body");
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), index.digest);
    assert_eq!(header_digest, index.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_specific_pull_from_a_multi_arch_index() {
    let (upstream, proxy) = setup(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    for index in [&images.multiarch_oci, &images.multiarch_docker] {
        let dest = tempfile::tempdir().expect("temp dir");
        let output = tokio::process::Command::new("skopeo")
            .args([
                "--override-os",
                "linux",
                "--override-arch",
                "arm64",
                "--override-variant",
                "v8",
            ])
            .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
            .arg(format!("docker://{}/{}", proxy.addr(), index.reference))
            .arg(format!("dir:{}", dest.path().display()))
            .output()
            .await
            .expect("run skopeo");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let manifest = std::fs::read(dest.path().join("manifest.json")).expect("manifest");
        let digest = format!("sha256:{}", sha256_hex(&manifest));
        // The arm64 child is the second entry of each index.
        assert_eq!(
            digest, index.children[1],
            "{} arm64 instance",
            index.reference
        );
        verify_dir(dest.path(), &index.children[1]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_concurrent_cold_pulls_fetch_a_large_blob_once_and_ranges_work() {
    let (upstream, proxy) = setup(Auth::None).await;
    // 64 MiB: long enough a fill that all sixteen join it while it runs (the memory bound
    // with larger blobs and more clients is loadtest's, README "Performance").
    let large = images::push_large(&upstream, "test/large", "v1", 64).await;
    let client = reqwest::Client::new();
    let (layer, layer_size) = images::largest_blob(&upstream, &large).await;
    assert!(
        layer_size >= 64 * 1024 * 1024,
        "the large layer is {layer_size} bytes"
    );
    let url = format!("{}/v2/test/large/blobs/{layer}", proxy.url());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut pulls = Vec::new();
    for _ in 0..16 {
        let (client, url, barrier) = (client.clone(), url.clone(), barrier.clone());
        pulls.push(tokio::spawn(async move {
            barrier.wait().await;
            let response = client.get(&url).send().await.expect("GET blob");
            assert_eq!(response.status(), StatusCode::OK);
            common::body_digest(response).await
        }));
    }
    for pull in pulls {
        let (digest, len) = pull.await.expect("pull task");
        assert_eq!(digest, layer);
        assert_eq!(len, layer_size);
    }
    assert_eq!(
        upstream.blob_gets(&layer),
        1,
        "the upstream served the layer more than once"
    );

    // Ranges on the now-cached blob.
    let response = client
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .expect("range GET");
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    let content_range = response.headers()["content-range"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(content_range, format!("bytes 1000-1999/{layer_size}"));
    let part = response.bytes().await.expect("range body");
    assert_eq!(part.len(), 1000);
    let whole = client
        .get(&url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&whole[1000..2000], &part[..]);
    let tail = client
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .expect("suffix range");
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        &tail.bytes().await.expect("body")[..],
        &whole[whole.len() - 10..]
    );
    let beyond = client
        .get(&url)
        .header("range", format!("bytes={}-", whole.len()))
        .send()
        .await
        .expect("unsatisfiable range");
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // And the whole image through skopeo, warm.
    pull_and_verify(&proxy, &large.reference, &large).await;
    assert_eq!(upstream.blob_gets(&layer), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pulls_work_with_the_upstream_stopped_and_survive_a_restart() {
    let (mut upstream, mut proxy) = setup(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    for image in [&images.small_oci, &images.multiarch_oci] {
        pull_and_verify(&proxy, &image.reference, image).await;
    }
    upstream.stop().await;
    for image in [&images.small_oci, &images.multiarch_oci] {
        let by_digest = format!("{}@{}", image.repo, image.digest);
        pull_and_verify(&proxy, &by_digest, image).await;
        pull_and_verify(&proxy, &image.reference, image).await;
    }
    proxy.restart().await;
    for image in [&images.small_oci, &images.multiarch_oci] {
        let by_digest = format!("{}@{}", image.repo, image.digest);
        pull_and_verify(&proxy, &by_digest, image).await;
        pull_and_verify(&proxy, &image.reference, image).await;
    }
    // A miss with the upstream down fails fast with a JSON error naming the upstream.
    let response = reqwest::Client::new()
        .get(format!("{}/v2/test/never-pushed/manifests/v1", proxy.url()))
        .send()
        .await
        .expect("GET");
    let (status, code, message) = oci_error(response).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "UNAVAILABLE");
    assert!(message.contains(UPSTREAM_NAME), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_index_is_moved_aside_and_cached_digests_still_serve() {
    let (mut upstream, mut proxy) = setup(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    pull_and_verify(&proxy, &images.docker_v2.reference, &images.docker_v2).await;
    assert!(proxy.stop().await);
    let index_dir = proxy.storage().join("index");
    for entry in std::fs::read_dir(&index_dir).expect("index dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::write(&path, b"not a sled database").expect("corrupt");
        }
    }
    upstream.stop().await;
    proxy.restart().await;
    assert!(proxy.log().contains("moved it aside"), "{}", proxy.log());
    let by_digest = format!("{}@{}", images.docker_v2.repo, images.docker_v2.digest);
    pull_and_verify(&proxy, &by_digest, &images.docker_v2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_auth_upstream() {
    let (upstream, proxy) = setup(Auth::token(300)).await;
    let images = images::push_standard(&upstream, "test").await;
    let issued_before = upstream
        .token_server()
        .expect("token server")
        .tokens_issued();
    pull_and_verify(
        &proxy,
        &images.multiarch_docker.reference,
        &images.multiarch_docker,
    )
    .await;
    let issued = upstream
        .token_server()
        .expect("token server")
        .tokens_issued()
        - issued_before;
    assert!(issued >= 1, "regcache never fetched a token");
    // Tokens are cached per scope: one image's pull needs one token, not one per request.
    assert!(issued <= 2, "{issued} tokens for one repository");
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_upstream_with_and_without_credentials() {
    let (upstream, proxy) = setup(Auth::basic()).await;
    let image = images::push_oci_image(&upstream, "test/basic", "v1", "basic-seed", &[4096]).await;
    pull_and_verify(&proxy, &image.reference, &image).await;

    let anonymous = TestProxy::start(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())],
        "",
    )
    .await;
    let response = reqwest::Client::new()
        .get(format!("{}/v2/test/basic/manifests/v1", anonymous.url()))
        .send()
        .await
        .expect("GET");
    let (status, code, _) = oci_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_upstream_blob_is_never_cached_or_served() {
    let (upstream, proxy) = setup(Auth::None).await;
    let image =
        images::push_oci_image(&upstream, "test/corrupt", "v1", "corrupt-seed", &[200_000]).await;
    let layer = image.blobs.last().expect("a layer").clone();
    // Flip bytes of the blob inside the upstream's own storage: Distribution serves it as is.
    let hex = layer.trim_start_matches("sha256:");
    let data = upstream.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).expect("upstream blob file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, &bytes).expect("corrupt upstream blob");

    let url = format!("{}/v2/test/corrupt/blobs/{layer}", proxy.url());
    for attempt in 0..2 {
        let result = reqwest::get(&url).await;
        let complete = match result {
            Ok(response) if response.status() == StatusCode::OK => response.bytes().await.ok(),
            _ => None,
        };
        assert!(
            complete.is_none(),
            "attempt {attempt}: a complete body with wrong bytes reached the client"
        );
    }
    assert_eq!(
        upstream.blob_gets(&layer),
        2,
        "the bad blob was cached after the first attempt"
    );
    let cached = proxy
        .storage()
        .join(format!("blobs/{UPSTREAM_NAME}/sha256/{}/{hex}", &hex[..2]));
    assert!(
        !cached.exists(),
        "bytes that failed verification were stored"
    );
    assert!(proxy.log().contains("digest mismatch"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_by_ns_prefix_and_default_and_refusal_of_unknown_registries() {
    let first = Upstream::start(Auth::None).await;
    let second = Upstream::start(Auth::None).await;
    let a = images::push_oci_image(&first, "team/app", "v1", "first-seed", &[1000]).await;
    let b = images::push_oci_image(&second, "team/app", "v1", "second-seed", &[1000]).await;
    assert_ne!(a.digest, b.digest);
    let proxy = TestProxy::start(
        &[
            UpstreamSpec::default_at("first.test", &first.url()),
            UpstreamSpec::named("second.test", &second.url()),
        ],
        "",
    )
    .await;
    let client = reqwest::Client::new();
    let digest_of = |response: &reqwest::Response| {
        response.headers()["docker-content-digest"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    let get = |path: String| client.get(format!("{}{path}", proxy.url())).send();
    let by_default = get("/v2/team/app/manifests/v1".into()).await.expect("GET");
    assert_eq!(digest_of(&by_default), a.digest);
    let by_prefix = get("/v2/second.test/team/app/manifests/v1".into())
        .await
        .expect("GET");
    assert_eq!(digest_of(&by_prefix), b.digest);
    let by_ns = get("/v2/team/app/manifests/v1?ns=second.test".into())
        .await
        .expect("GET");
    assert_eq!(digest_of(&by_ns), b.digest);
    let ns_first = get("/v2/team/app/manifests/v1?ns=first.test".into())
        .await
        .expect("GET");
    assert_eq!(digest_of(&ns_first), a.digest);
    // skopeo through the prefix route.
    pull_and_verify(&proxy, &format!("second.test/{}", b.reference), &b).await;

    let requests_before = first.request_count() + second.request_count();
    for path in [
        "/v2/team/app/manifests/v1?ns=quay.io",
        "/v2/quay.io/team/app/manifests/v1",
        "/v2/evil.example:8080/x/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let (status, code, message) = oci_error(get(path.into()).await.expect("GET")).await;
        assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"), "{path}");
        assert!(message.contains("not configured"), "{message}");
    }
    assert_eq!(
        first.request_count() + second.request_count(),
        requests_before
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_writes_are_refused_before_reaching_the_upstream() {
    let (upstream, proxy) = setup(Auth::None).await;
    let client = reqwest::Client::new();
    let requests_before = upstream.request_count();
    let cases = [
        (
            "GET",
            "/v2/Bad_Name/manifests/v1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/test/x/manifests/-bad",
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            "GET",
            "/v2/test/x/manifests/sha256:abc",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/test/x/blobs/sha256:zz",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/test/x/blobs/md5:abcd",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "PUT",
            "/v2/test/x/manifests/v1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            "/v2/test/x/manifests/v1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "POST",
            "/v2/test/x/blobs/uploads/",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "PATCH",
            "/v2/test/x/blobs/uploads/abc",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = client
            .request(method.clone(), format!("{}{path}", proxy.url()))
            .send()
            .await
            .expect("request");
        assert_eq!(oci_error(response).await.0, status, "{method} {path}");
        let response = client
            .request(method.clone(), format!("{}{path}", proxy.url()))
            .send()
            .await
            .expect("request");
        assert_eq!(oci_error(response).await.1, code, "{method} {path}");
    }
    assert_eq!(
        upstream.request_count(),
        requests_before,
        "bad input reached the upstream"
    );

    // Unknown content: the upstream's 404 becomes the matching OCI code.
    let (status, code, _) = oci_error(
        client
            .get(format!("{}/v2/test/missing/manifests/v1", proxy.url()))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let missing_blob = format!("sha256:{}", "0".repeat(64));
    let (status, code, _) = oci_error(
        client
            .get(format!(
                "{}/v2/test/missing/blobs/{missing_blob}",
                proxy.url()
            ))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_head_requests_and_tag_list_pagination() {
    let (upstream, proxy) = setup(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/paged", "v1", "paged", &[1234]).await;
    for tag in ["v2", "v3"] {
        images::push_oci_image(&upstream, "test/paged", tag, "paged", &[1234]).await;
    }
    let client = reqwest::Client::new();
    let manifest_url = format!("{}/v2/test/paged/manifests/v1", proxy.url());
    let get = client.get(&manifest_url).send().await.expect("GET");
    let head = client.head(&manifest_url).send().await.expect("HEAD");
    for response in [&get, &head] {
        let headers = response.headers();
        assert_eq!(headers["docker-content-digest"], image.digest.as_str());
        assert_eq!(headers["content-type"], image.media_type.as_str());
        assert_eq!(headers["etag"], format!("\"{}\"", image.digest).as_str());
        assert_eq!(headers["docker-distribution-api-version"], "registry/2.0");
    }
    assert_eq!(
        get.headers()["content-length"],
        head.headers()["content-length"]
    );
    let layer = image.blobs.last().expect("layer");
    let blob_head = client
        .head(format!("{}/v2/test/paged/blobs/{layer}", proxy.url()))
        .send()
        .await
        .expect("HEAD blob");
    assert_eq!(blob_head.status(), StatusCode::OK);
    let blob_len = client
        .get(format!("{}/v2/test/paged/blobs/{layer}", upstream.url()))
        .send()
        .await
        .expect("GET upstream blob")
        .content_length();
    assert_eq!(
        blob_head.headers()["content-length"]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok()),
        blob_len
    );
    assert_eq!(blob_head.headers()["docker-content-digest"], layer.as_str());

    // Tag lists are sorted and paginated by the cache (`n`/`last` per the OCI spec), from the
    // upstream's whole list; regcache's own `ns` is kept in the next-page link.
    let response = client
        .get(format!(
            "{}/v2/test/paged/tags/list?n=1&last=v1&ns={UPSTREAM_NAME}",
            proxy.url()
        ))
        .send()
        .await
        .expect("tags");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["link"],
        format!("</v2/test/paged/tags/list?n=1&last=v2&ns={UPSTREAM_NAME}>; rel=\"next\"").as_str()
    );
    let page: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(page["name"], "test/paged");
    assert_eq!(page["tags"], serde_json::json!(["v2"]));
    let asked = upstream.count(|e| e.path == "/v2/test/paged/tags/list" && e.query.is_empty());
    assert_eq!(asked, 1, "{:?}", upstream.access_log());
}

/// Sends a request with a raw path (HTTP clients normalise `..` and `%2e` away).
async fn raw_status(addr: &str, method: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_attempts_are_invalid_names() {
    let (upstream, proxy) = setup(Auth::None).await;
    let before = upstream.request_count();
    for path in [
        "/v2/a/../b/manifests/v1",
        "/v2/a/%2e%2e/b/manifests/v1",
        "/v2/../../etc/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "/v2//x/manifests/v1",
    ] {
        assert_eq!(raw_status(&proxy.addr(), "GET", path).await, 400, "{path}");
    }
    assert_eq!(upstream.request_count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_are_served_stale_when_the_upstream_is_down_after_the_ttl() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/stale", "v1", "stale", &[100]).await;
    let mut upstream = upstream;
    let proxy = TestProxy::start(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())],
        "[cache]\ntag_ttl = \"0s\"\n",
    )
    .await;
    let url = format!("{}/v2/test/stale/manifests/v1", proxy.url());
    let fresh = reqwest::get(&url).await.expect("GET");
    assert!(fresh.headers().get("warning").is_none());
    upstream.stop().await;
    let stale = reqwest::get(&url).await.expect("GET");
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(
        stale.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    assert!(stale.headers()["warning"]
        .to_str()
        .expect("ascii")
        .starts_with("110"));
}
