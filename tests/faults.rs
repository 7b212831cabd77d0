//! Upstream faults a real registry cannot be made to produce on demand — rate limits, 5xx,
//! wrong bytes, hangs, expiring tokens, redirects to a storage host — injected by the in-process
//! [`FakeRegistry`], with regcache running in process in front of it (port 0, an adjustable
//! clock for cooldowns: no sleeps) and plain HTTP clients checking what a user would see.

use crate::common;

use std::time::{Duration, Instant};

use common::fake::{FakeRegistry, Fault, Listener};
use common::http::{client, oci_error};
use common::images::{seeded_bytes, MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST};
use common::inproc::InProcess;
use common::proxy::UpstreamSpec;
use common::regclient::sha256_digest;
use reqwest::StatusCode;

/// The name regcache knows the fake by.
const UPSTREAM: &str = "fake.test";
/// The repository every test pulls from.
const REPO: &str = "test/app";

/// A layer, a config and a manifest naming them, as bytes.
struct Image {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl Image {
    /// An image whose layer is `layer_len` seeded bytes.
    fn new(layer_len: usize) -> Image {
        let layer = seeded_bytes("faults-layer", layer_len);
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let descriptor = |media_type: &str, bytes: &[u8]| {
            serde_json::json!({
                "mediaType": media_type,
                "digest": sha256_digest(bytes),
                "size": bytes.len(),
            })
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": descriptor(MT_OCI_CONFIG, &config),
            "layers": [descriptor(MT_OCI_LAYER_GZIP, &layer)],
        });
        let manifest = serde_json::to_vec(&manifest).expect("serialise the manifest");
        Image {
            layer,
            config,
            manifest,
        }
    }

    /// A fake registry builder holding this image as `REPO:v1`.
    fn fake(&self) -> common::fake::FakeRegistryBuilder {
        FakeRegistry::builder()
            .blob(self.layer.clone())
            .blob(self.config.clone())
            .manifest(REPO, "v1", MT_OCI_MANIFEST, self.manifest.clone())
    }

    fn layer_digest(&self) -> String {
        sha256_digest(&self.layer)
    }

    fn manifest_digest(&self) -> String {
        sha256_digest(&self.manifest)
    }
}

/// regcache with the fake as its default upstream, plus `extra` lines in its `[[upstream]]`.
async fn proxy_for(fake: &FakeRegistry, extra: &[&str]) -> InProcess {
    proxy_with(fake, extra, "").await
}

/// Like [`proxy_for`], with extra top-level TOML (a `[cache]` table).
async fn proxy_with(fake: &FakeRegistry, extra: &[&str], toml: &str) -> InProcess {
    let spec = extra.iter().fold(
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
        .unwrap_or_else(|e| panic!("GET {tail}: {e:?}\nproxy log:\n{}", proxy.log()))
}

/// How many GETs whose path ends with `suffix` the fake registry (not storage) received.
fn gets(fake: &FakeRegistry, suffix: &str) -> usize {
    fake.count(|r| r.on == Listener::Registry && r.is_get(suffix))
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_rate_limit_is_passed_on_with_its_retry_after() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    fake.set_fault("/manifests/", Fault::too_many_requests("7"));
    let proxy = proxy_for(&fake, &[]).await;

    let response = get(&proxy, "manifests/v1").await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let (status, code, _) = oci_error(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code, "TOOMANYREQUESTS");
    assert_eq!(retry_after.as_deref(), Some("7"));
    assert!(
        gets(&fake, "/manifests/v1") >= 1,
        "the miss reached the fake"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_redirected_to_storage_is_served_without_leaking_the_token() {
    let image = Image::new(300 * 1024);
    let fake = image.fake().bearer_auth(300).redirect_blobs().start().await;
    let proxy = proxy_for(&fake, &[]).await;
    let digest = image.layer_digest();

    let response = get(&proxy, &format!("blobs/{digest}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.expect("blob body");
    assert_eq!(sha256_digest(&body), digest, "blob bytes through regcache");

    let requests = fake.requests();
    let registry_gets: Vec<_> = requests
        .iter()
        .filter(|r| r.on == Listener::Registry && r.is_get(&digest))
        .collect();
    assert!(
        registry_gets
            .iter()
            .any(|r| r.authorization().is_some_and(|a| a.starts_with("Bearer "))),
        "the registry got the blob GET with a token: {registry_gets:#?}"
    );
    let storage: Vec<_> = requests
        .iter()
        .filter(|r| r.on == Listener::Storage)
        .collect();
    assert!(!storage.is_empty(), "the redirect was followed");
    for request in storage {
        assert_eq!(
            request.authorization(),
            None,
            "the storage host received the registry's Authorization: {request:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_fetched_again_on_401() {
    let image = Image::new(4096);
    let fake = image.fake().bearer_auth(300).start().await;
    let proxy = proxy_for(&fake, &[]).await;
    let tokens = |fake: &FakeRegistry| fake.count(|r| r.path == "/token");

    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tokens(&fake), 1, "the first pull fetched a token");

    fake.expire_tokens();
    let digest = image.layer_digest();
    let response = get(&proxy, &format!("blobs/{digest}")).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a miss after the token expired"
    );
    let body = response.bytes().await.expect("blob body");
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(tokens(&fake), 2, "the token was fetched again after a 401");

    // The new token is cached: another miss needs no third one.
    let config = sha256_digest(&image.config);
    let response = get(&proxy, &format!("blobs/{config}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tokens(&fake), 2, "the refreshed token is reused");
}

/// GETs `tail` and returns the body only if a complete 200 body arrived.
async fn complete_body(proxy: &InProcess, tail: &str) -> Result<bytes::Bytes, String> {
    let response = get(proxy, tail).await;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    response.bytes().await.map_err(|e| format!("body: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_never_reach_a_client_complete_and_are_not_cached() {
    let image = Image::new(600 * 1024);
    let fake = image.fake().start().await;
    let digest = image.layer_digest();
    fake.set_fault(
        &digest,
        Fault::WrongBytes {
            final_chunk_only: true,
        },
    );
    let proxy = proxy_for(&fake, &[]).await;

    for attempt in 1..=2 {
        if attempt > 1 {
            // The failed fill is gone (it leaves the map as it stops counting, with no await
            // between), so that this attempt cannot join it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while proxy.metric("regcache_fills_in_flight").await != 0.0 {
                assert!(Instant::now() < deadline, "the failed fill never ended");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let outcome = complete_body(&proxy, &format!("blobs/{digest}")).await;
        assert!(
            outcome.is_err(),
            "attempt {attempt}: a complete 200 body of {} wrong bytes arrived",
            outcome.map(|b| b.len()).unwrap_or_default()
        );
    }
    assert_eq!(
        gets(&fake, &digest),
        2,
        "each attempt fetched again: nothing was cached"
    );

    let manifest = image.manifest_digest();
    fake.set_fault(
        &manifest,
        Fault::WrongBytes {
            final_chunk_only: false,
        },
    );
    let (status, code, _) = oci_error(get(&proxy, &format!("manifests/{manifest}")).await).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "DIGEST_INVALID");
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_range_request_is_answered_and_fills_the_whole_blob() {
    let image = Image::new(300 * 1024);
    let fake = image.fake().start().await;
    let proxy = proxy_for(&fake, &[]).await;
    let digest = image.layer_digest();
    let url = format!("{}/v2/{REPO}/blobs/{digest}", proxy.url());

    let response = client()
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .expect("ranged GET");
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    let content_range = response.headers()["content-range"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        content_range,
        format!("bytes 100-199/{}", image.layer.len())
    );
    let body = response.bytes().await.expect("range body");
    assert_eq!(&body[..], &image.layer[100..200]);

    let response = client().get(&url).send().await.expect("full GET");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.expect("full body");
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(
        gets(&fake, &digest),
        1,
        "the whole blob was cached by the ranged miss"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_upstream_is_answered_504_naming_it_after_the_idle_timeout() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    fake.set_fault("/manifests/", Fault::Hang);
    let proxy = proxy_for(
        &fake,
        &["connect_timeout = \"1s\"", "idle_timeout = \"2s\""],
    )
    .await;

    let started = Instant::now();
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
        .get(format!("{}/v2/{REPO}/manifests/v1", proxy.url()))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "regcache did not answer within 20 s: {e}\nproxy log:\n{}",
                proxy.log()
            )
        });
    let elapsed = started.elapsed();
    let (status, code, message) = oci_error(response).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "after {elapsed:?}");
    assert_eq!(code, "UNAVAILABLE");
    assert!(
        message.contains(UPSTREAM),
        "names the upstream: {message:?}"
    );
    // The documented bound: one idle_timeout (a timeout is not retried). Generous slack for
    // a loaded machine, far below a second attempt.
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert_eq!(gets(&fake, "/manifests/v1"), 1, "asked once, no retries");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_server_error_is_a_bad_gateway_naming_the_upstream() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    fake.set_fault("/manifests/", Fault::status(500));
    let proxy = proxy_for(&fake, &[]).await;

    let (status, code, message) = oci_error(get(&proxy, "manifests/v1").await).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "UNAVAILABLE");
    assert!(
        message.contains(UPSTREAM),
        "the message names the upstream: {message:?}"
    );
}

/// The start offset of a `Range: bytes=N-` header, if the request carried one.
fn range_start(request: &common::fake::Recorded) -> Option<u64> {
    request
        .range()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_cut_off_half_way_is_resumed_with_a_range_request() {
    const MIB: usize = 1024 * 1024;
    let image = Image::new(8 * MIB);
    let fake = image.fake().start().await;
    let digest = image.layer_digest();
    fake.set_fault_times(&digest, Fault::Truncate { after: 3 * MIB }, 1);
    let proxy = proxy_for(&fake, &[]).await;

    let response = get(&proxy, &format!("blobs/{digest}")).await;
    assert_eq!(response.status(), StatusCode::OK, "the interrupted miss");
    let body = response
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("blob body: {e}\nproxy log:\n{}", proxy.log()));
    assert_eq!(body.len(), image.layer.len(), "a complete blob arrived");
    assert_eq!(sha256_digest(&body), digest, "the blob's bytes are right");

    let blob_gets: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.on == Listener::Registry && r.is_get(&digest))
        .collect();
    assert_eq!(
        blob_gets.len(),
        2,
        "one cut-off GET and one resumed GET: {blob_gets:#?}"
    );
    assert_eq!(
        blob_gets[0].range(),
        None,
        "the first GET asks for everything"
    );
    let resumed_at = range_start(&blob_gets[1]).unwrap_or_else(|| {
        panic!(
            "the second GET resumes with `Range: bytes=N-`: {:#?}",
            blob_gets[1]
        )
    });
    assert!(
        resumed_at > 0 && resumed_at <= 3 * MIB as u64,
        "resumed from a byte that had arrived, not from the start: {resumed_at}"
    );

    let response = get(&proxy, &format!("blobs/{digest}")).await;
    assert_eq!(response.status(), StatusCode::OK, "the second pull");
    let body = response.bytes().await.expect("cached blob body");
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(
        gets(&fake, &digest),
        2,
        "the second pull was served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_trickle_is_served_correctly_and_shared_by_a_second_client() {
    let image = Image::new(300 * 1024);
    let fake = image.fake().start().await;
    let digest = image.layer_digest();
    // 19 frames of 16 KiB, 50 ms apart: about a second for the whole blob.
    fake.set_fault(
        &digest,
        Fault::Trickle {
            bytes: 16 * 1024,
            every: Duration::from_millis(50),
        },
    );
    let proxy = proxy_for(&fake, &[]).await;
    let tail = format!("blobs/{digest}");

    let started = Instant::now();
    let first = {
        let url = format!("{}/v2/{REPO}/{tail}", proxy.url());
        tokio::spawn(async move {
            let response = client().get(url).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body, Instant::now()))
        })
    };
    // The first client's fill is under way: the upstream was asked (and trickles for a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while gets(&fake, &digest) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first client's fill never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = get(&proxy, &tail).await;
    let second_answered = Instant::now();
    assert_eq!(second.status(), StatusCode::OK, "the second client");
    let second_body = second.bytes().await.expect("second client's body");
    let (first_status, first_body, first_done) = first
        .await
        .expect("first client task")
        .unwrap_or_else(|e| panic!("first client: {e}\nproxy log:\n{}", proxy.log()));

    assert_eq!(first_status, StatusCode::OK, "the first client");
    assert_eq!(sha256_digest(&first_body), digest, "first client's bytes");
    assert_eq!(sha256_digest(&second_body), digest, "second client's bytes");
    assert!(
        second_answered < first_done,
        "the second client arrived while the first one's download was still running"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a slow upstream costs its own pace, no more: {:?}",
        started.elapsed()
    );
    assert_eq!(
        gets(&fake, &digest),
        1,
        "both clients were served by one upstream download"
    );
}

/// `regcache_upstream_breaker_transitions_total` for the fake, to `to`.
async fn transitions(proxy: &InProcess, to: &str) -> f64 {
    proxy
        .metric(&format!(
            "regcache_upstream_breaker_transitions_total{{to=\"{to}\",upstream=\"{UPSTREAM}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_error_storm_opens_the_circuit_and_the_first_answer_closes_it() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    let proxy = proxy_with(
        &fake,
        &["breaker_threshold = 3", "breaker_cooldown = \"10s\""],
        "[cache]\ntag_ttl = \"0s\"\n",
    )
    .await;
    let manifest_requests = |fake: &FakeRegistry| fake.count(|r| r.path.contains("/manifests/"));
    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK, "the tag is cached");

    // Every pull by tag revalidates (tag_ttl 0s); each failing revalidation is served stale
    // and counts once, retries included.
    fake.set_fault("/manifests/", Fault::status(503));
    for attempt in 1..=3 {
        let asked = manifest_requests(&fake);
        let response = get(&proxy, "manifests/v1").await;
        assert_eq!(response.status(), StatusCode::OK, "stale serve {attempt}");
        assert!(response.headers().contains_key("warning"));
        assert_eq!(manifest_requests(&fake), asked + 3, "a try and two retries");
        let expected = if attempt < 3 { 0.0 } else { 1.0 };
        assert_eq!(
            transitions(&proxy, "open").await,
            expected,
            "after request {attempt}: its retries counted once"
        );
    }
    assert_eq!(
        transitions(&proxy, "open").await,
        1.0,
        "three failures opened it"
    );
    assert_eq!(
        proxy
            .metric(&format!("regcache_upstream_up{{upstream=\"{UPSTREAM}\"}}"))
            .await,
        0.0
    );

    // Open: a pull with a cached copy does not ask the upstream; it is served stale at once.
    let before = manifest_requests(&fake);
    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("warning"));
    assert_eq!(manifest_requests(&fake), before, "no request while open");

    // A miss has nothing to fall back to: it probes, once, without retries. A failed probe keeps
    // the circuit open and doubles the cooldown.
    let config = sha256_digest(&image.config);
    let (status, code, message) =
        oci_error(get(&proxy, &format!("manifests/{config}")).await).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "the probe's own answer");
    assert_eq!(code, "UNAVAILABLE");
    assert!(message.contains(UPSTREAM), "{message:?}");
    assert_eq!(
        manifest_requests(&fake),
        before + 1,
        "one probe, no retries"
    );
    let response = get(&proxy, "manifests/v1").await;
    assert!(response.headers().contains_key("warning"), "still open");
    assert_eq!(manifest_requests(&fake), before + 1);

    // The upstream is back: the first miss succeeds and closes the circuit.
    fake.clear_faults();
    let response = get(&proxy, &format!("blobs/{}", image.layer_digest())).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the first miss after recovery"
    );
    assert_eq!(transitions(&proxy, "closed").await, 1.0);
    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response.headers().contains_key("warning"),
        "revalidated again once closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_cooldown_a_revalidation_probes_and_closes_the_circuit() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    let proxy = proxy_with(
        &fake,
        &["breaker_threshold = 1", "breaker_cooldown = \"30s\""],
        "[cache]\ntag_ttl = \"0s\"\n",
    )
    .await;
    assert_eq!(get(&proxy, "manifests/v1").await.status(), StatusCode::OK);
    fake.set_fault("/manifests/", Fault::status(502));
    let response = get(&proxy, "manifests/v1").await;
    assert!(
        response.headers().contains_key("warning"),
        "stale, and open"
    );
    fake.clear_faults();
    let before = fake.count(|r| r.path.contains("/manifests/"));
    let response = get(&proxy, "manifests/v1").await;
    assert!(
        response.headers().contains_key("warning"),
        "within the cooldown"
    );
    assert_eq!(fake.count(|r| r.path.contains("/manifests/")), before);

    proxy.clock().advance(Duration::from_secs(31));
    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response.headers().contains_key("warning"),
        "the revalidation after the cooldown probed and was answered"
    );
    assert_eq!(transitions(&proxy, "closed").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_a_client_provokes_do_not_open_the_circuit() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    // The upstream answers 500 for one odd repository only (as Distribution does for a
    // 255-character name), and serves the others.
    fake.set_fault("/v2/odd/", Fault::status(500));
    let proxy = proxy_for(
        &fake,
        &["breaker_threshold = 2", "breaker_cooldown = \"60s\""],
    )
    .await;
    for _ in 0..10 {
        let response = client()
            .get(format!("{}/v2/odd/name/manifests/v1", proxy.url()))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
    assert_eq!(transitions(&proxy, "open").await, 0.0, "still closed");
    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK, "a legitimate miss");
    let response = get(&proxy, &format!("blobs/{}", image.layer_digest())).await;
    assert_eq!(response.status(), StatusCode::OK);

    // The same 500 on a repository the upstream has answered is its own failure.
    fake.set_fault("/manifests/", Fault::status(500));
    for tag in ["v2", "v3"] {
        let (status, _, _) = oci_error(get(&proxy, &format!("manifests/{tag}")).await).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(transitions(&proxy, "open").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_expiring_mid_pull_is_refreshed_for_the_remaining_blobs() {
    let image = Image::new(64 * 1024);
    let fake = image.fake().bearer_auth(300).start().await;
    let proxy = proxy_for(&fake, &[]).await;

    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(response.status(), StatusCode::OK, "the manifest");
    let body = response.bytes().await.expect("manifest body");
    assert_eq!(&body[..], &image.manifest[..]);
    assert_eq!(fake.tokens_issued(), 1, "the manifest needed one token");

    fake.expire_tokens();
    for (what, bytes) in [("config", &image.config), ("layer", &image.layer)] {
        let digest = sha256_digest(bytes);
        let response = get(&proxy, &format!("blobs/{digest}")).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "the {what} after the token expired"
        );
        let body = response.bytes().await.expect("blob body");
        assert_eq!(sha256_digest(&body), digest, "the {what}'s bytes");
    }
    assert_eq!(
        fake.tokens_issued(),
        2,
        "one new token after the expiry, reused for the second blob"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_unavailability_is_absorbed_by_retries() {
    let image = Image::new(64 * 1024);
    let fake = image.fake().start().await;
    let digest = image.layer_digest();
    fake.set_fault_times("/manifests/v1", Fault::status(503), 2);
    fake.set_fault_times(&digest, Fault::status(503), 2);
    let proxy = proxy_for(&fake, &[]).await;

    let response = get(&proxy, "manifests/v1").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "two 503s then a success: the client sees only the success"
    );
    let body = response.bytes().await.expect("manifest body");
    assert_eq!(&body[..], &image.manifest[..]);
    assert_eq!(
        fake.count(|r| r.path.ends_with("/manifests/v1")),
        3,
        "two failed attempts and the successful one"
    );

    let response = get(&proxy, &format!("blobs/{digest}")).await;
    assert_eq!(response.status(), StatusCode::OK, "the layer");
    let body = response.bytes().await.expect("blob body");
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(
        fake.count(|r| r.path.ends_with(&digest)),
        3,
        "two failed attempts and the successful one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn circuit_recovers_after_a_probe_is_abandoned_by_its_client() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    let proxy = proxy_for(
        &fake,
        &["breaker_threshold = 1", "breaker_cooldown = \"60s\""],
    )
    .await;
    assert_eq!(get(&proxy, "manifests/v1").await.status(), StatusCode::OK);
    fake.set_fault("/manifests/", Fault::status(500));
    let (status, _, _) = oci_error(get(&proxy, "manifests/v2").await).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "the failure opens the circuit"
    );
    assert_eq!(transitions(&proxy, "open").await, 1.0);

    // The next miss is the probe: a referrers listing (passed through, not run in a task of
    // its own, unlike tag lists, which are walked in a shared task) whose client gives up
    // while the upstream hangs.
    fake.set_fault("/referrers/", Fault::Hang);
    let abandoned = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("reqwest client")
        .get(format!(
            "{}/v2/{REPO}/referrers/{}",
            proxy.url(),
            image.layer_digest()
        ))
        .send()
        .await;
    assert!(abandoned.is_err(), "the probe's client gave up");
    assert_eq!(
        fake.count(|r| r.path.contains("/referrers/")),
        1,
        "the probe reached the upstream"
    );

    fake.clear_faults();
    // Poll briefly: the server notices the client's disconnect asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = get(&proxy, &format!("blobs/{}", image.layer_digest())).await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a healthy upstream is asked again once the abandoned probe is gone: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(transitions(&proxy, "closed").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_tag_is_served_stale_at_once_on_429_and_5xx() {
    let image = Image::new(4096);
    let fake = image.fake().start().await;
    let proxy = proxy_with(&fake, &[], "[cache]\ntag_ttl = \"0s\"\n").await;
    assert_eq!(get(&proxy, "manifests/v1").await.status(), StatusCode::OK);
    // The 5xx first: after the 429 the upstream is paused, and the next one would not be sent.
    for fault in [Fault::status(500), Fault::too_many_requests("30")] {
        fake.set_fault("/manifests/", fault.clone());
        let started = Instant::now();
        let response = get(&proxy, "manifests/v1").await;
        let elapsed = started.elapsed();
        assert_eq!(response.status(), StatusCode::OK, "{fault:?}");
        assert!(
            response.headers()["warning"]
                .to_str()
                .is_ok_and(|w| w.starts_with("110")),
            "{fault:?}"
        );
        assert_eq!(
            response.bytes().await.expect("body"),
            image.manifest,
            "{fault:?}"
        );
        // Neither is retried: answered at once, well inside revalidate_timeout.
        assert!(elapsed < Duration::from_secs(1), "{fault:?}: {elapsed:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_on_revalidation_serves_the_cached_tag_only_with_serve_stale_on_denied() {
    let image = Image::new(4096);
    for serve_stale_on_denied in [false, true] {
        let fake = image
            .fake()
            .manifest(REPO, "v2", MT_OCI_MANIFEST, image.manifest.clone())
            .start()
            .await;
        let proxy = proxy_with(
            &fake,
            &[&format!("serve_stale_on_denied = {serve_stale_on_denied}")],
            "[cache]\ntag_ttl = \"0s\"\n",
        )
        .await;
        assert_eq!(get(&proxy, "manifests/v1").await.status(), StatusCode::OK);
        // The cache's credentials are revoked: every answer is 401, no challenge to answer.
        fake.set_fault("/manifests/", Fault::status(401));
        let response = get(&proxy, "manifests/v1").await;
        if serve_stale_on_denied {
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers()["warning"]
                .to_str()
                .is_ok_and(|w| w.starts_with("110")));
            assert_eq!(response.bytes().await.expect("body"), image.manifest);
            assert_eq!(
                proxy
                    .metric("regcache_stale_served_total{reason=\"denied\"}")
                    .await,
                1.0
            );
        } else {
            let (status, code, _) = oci_error(response).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
            );
        }
        // A miss has nothing to fall back to.
        let (status, _, _) = oci_error(get(&proxy, "manifests/v2").await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{serve_stale_on_denied}");
    }
}
