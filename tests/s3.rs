//! `[storage] backend = "s3"`: replicas sharing a real S3-compatible object store (SeaweedFS,
//! credentials enforced), each with its own local tier and index. Replicas are the real binary
//! (`TestProxy`), pulls are skopeo's, and the bucket is inspected with the same `object_store`
//! client regcache uses: every object must hash to the digest in its name.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::fake::{FakeRegistry, Fault};
use common::faultproxy::{FaultProxy, Mode};
use common::images::{self, seeded_bytes};
use common::proxy::{run_regcache, TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;
use common::seaweed::Seaweed;
use common::upstream::{Auth, Upstream};
use futures_util::StreamExt as _;
use reqwest::StatusCode;

/// Where regcache's objects go in the bucket.
const PREFIX: &str = "regcache";

/// A replica: regcache with `upstream_url` as its default upstream and `store`'s bucket.
async fn replica(upstream_url: &str, store: &Seaweed, dir: &Path, s3_lines: &str) -> TestProxy {
    TestProxy::start(
        &[UpstreamSpec::default_at("registry.test", upstream_url)],
        &store.storage_toml(dir, PREFIX, s3_lines),
    )
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// GETs `url` (redirects not followed): status and body.
async fn fetch(url: &str) -> (StatusCode, bytes::Bytes) {
    let response = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    (status, response.bytes().await.expect("body"))
}

/// `/readyz`: its status and the problem it names: why it is not ready, or what is degraded
/// while it stays ready.
async fn readiness(proxy: &TestProxy) -> (StatusCode, String) {
    let (status, body) = fetch(&format!("{}/readyz", proxy.url())).await;
    let ready: serde_json::Value = serde_json::from_slice(&body).expect("readyz JSON");
    let problem = ready["problem"]
        .as_str()
        .or(ready["degraded"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, problem)
}

/// Waits (at most 10 s) until the bucket holds every one of `digests`. Each poll verifies every
/// object in the bucket, so the last one has verified them all.
async fn wait_in_bucket(store: &Seaweed, digests: impl IntoIterator<Item = impl AsRef<str>>) {
    let digests: Vec<String> = digests.into_iter().map(|d| d.as_ref().to_owned()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let in_bucket = store.assert_all_verified(PREFIX).await;
        let missing: Vec<&String> = digests.iter().filter(|d| !in_bucket.contains(*d)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing:?} never reached the bucket"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Names of the files under a replica's local tier.
fn local_files(storage: &Path) -> Vec<String> {
    fn walk(dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                walk(&entry.path(), found);
            } else {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut found = Vec::new();
    walk(&storage.join("blobs"), &mut found);
    found
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_verified_objects_and_a_new_replica_serves_without_the_upstream() {
    let mut upstream = Upstream::start(Auth::None).await;
    // One layer above the 8 MiB part size: a multipart upload of three parts.
    let image =
        images::push_oci_image(&upstream, "s3/app", "v1", "s3-shared", &[4096, 18 << 20]).await;
    let store = Seaweed::start("shared").await;
    let dir = tempfile::tempdir().expect("temp dir");

    let first = replica(&upstream.url(), &store, dir.path(), "").await;
    first.pull_verified(&image.reference, &image.digest).await;
    // A body ends once verified; its upload completes just after.
    wait_in_bucket(&store, image.blobs.iter().chain([&image.digest])).await;

    // A second replica (its own disk and index) pulls: blobs come from the bucket.
    let second = replica(&upstream.url(), &store, dir.path(), "").await;
    second.pull_verified(&image.reference, &image.digest).await;
    for blob in &image.blobs {
        assert_eq!(
            upstream.blob_gets(blob),
            1,
            "the upstream served {blob} more than once"
        );
    }

    // A new replica with an empty disk serves a pull by digest with the upstream gone.
    upstream.stop().await;
    let third = replica(&upstream.url(), &store, dir.path(), "").await;
    third
        .pull_verified(&format!("s3/app@{}", image.digest), &image.digest)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_answers_307_to_a_presigned_url_and_skopeo_pulls_through_it() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(
        &upstream,
        "s3/redirect",
        "v1",
        "s3-redirect",
        &[4096, 1 << 20],
    )
    .await;
    let store = Seaweed::start("redirect").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let first = replica(&upstream.url(), &store, dir.path(), "redirect = true").await;
    // Cold: not in the bucket yet, so served through a fill.
    first.pull_verified(&image.reference, &image.digest).await;
    wait_in_bucket(&store, &image.blobs).await;

    let blob = &image.blobs[0];
    let response = client()
        .get(format!("{}/v2/s3/redirect/blobs/{blob}", first.url()))
        .send()
        .await
        .expect("GET a blob");
    assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location")
        .to_owned();
    assert!(
        location.starts_with(&format!("{}/redirect/{PREFIX}/blobs/", store.endpoint())),
        "{location}"
    );
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let bytes = client()
        .get(&location)
        .send()
        .await
        .expect("GET the presigned URL")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&sha256_digest(&bytes), blob);
    // The signature is what lets the client in: the bare object URL is refused.
    let bare = location.split('?').next().expect("a URL");
    let refused = client().get(bare).send().await.expect("GET unsigned");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // A fresh replica sends skopeo to the bucket for every blob: none lands on its disk and
    // the upstream is not asked again.
    let second = replica(&upstream.url(), &store, dir.path(), "redirect = true").await;
    // A HEAD is answered from what the bucket says.
    let head = client()
        .head(format!("{}/v2/s3/redirect/blobs/{blob}", second.url()))
        .send()
        .await
        .expect("HEAD a blob");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(bytes.len().to_string().as_str())
    );
    second.pull_verified(&image.reference, &image.digest).await;
    let local = local_files(&second.storage());
    for blob in &image.blobs {
        assert!(!local.iter().any(|name| name == hex(blob)), "{local:?}");
        assert_eq!(upstream.blob_gets(blob), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_down_mid_pull_fails_cleanly_and_leaves_only_verified_objects() {
    let small = seeded_bytes("s3-outage-small", 4096);
    // Parts go out in the background, one at a time: a failed part surfaces when the next one
    // waits for it, so the blob spans several parts past the moment the store goes down.
    let big = seeded_bytes("s3-outage-big", 40 << 20);
    let never = seeded_bytes("s3-outage-never", 4096);
    let (small_digest, big_digest, never_digest) = (
        sha256_digest(&small),
        sha256_digest(&big),
        sha256_digest(&never),
    );
    // A real registry serves at full speed; the fake trickles the big layer so that the store
    // goes down while its fill runs.
    let fake = FakeRegistry::builder()
        .blob(small.clone())
        .blob(big.clone())
        .blob(never)
        .start()
        .await;
    fake.set_fault(
        &format!("/blobs/{big_digest}"),
        Fault::Trickle {
            bytes: 512 << 10,
            every: Duration::from_millis(25),
        },
    );
    let mut store = Seaweed::start("outage").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = replica(fake.url(), &store, dir.path(), "").await;
    let blob_url = |digest: &str| format!("{}/v2/test/app/blobs/{digest}", proxy.url());

    assert_eq!(
        fetch(&blob_url(&small_digest)).await,
        (StatusCode::OK, small.clone().into())
    );
    wait_in_bucket(&store, [&small_digest]).await;

    let response = client()
        .get(blob_url(&big_digest))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut received = 0usize;
    // Past the first 8 MiB part: the upload has started when the store goes down.
    while received < 9 << 20 {
        let chunk = body
            .next()
            .await
            .expect("more of the body")
            .expect("a chunk");
        received += chunk.len();
    }
    store.kill().await;
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => received += chunk.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "the body ended cleanly after {received} of {} bytes with the store down",
        big.len()
    );

    // The replica stays up; what its local tier holds still serves.
    let (status, _) = fetch(&format!("{}/v2/", proxy.url())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fetch(&blob_url(&small_digest)).await,
        (StatusCode::OK, small.clone().into())
    );
    // A miss fails fast with an OCI error naming the store.
    for digest in [&big_digest, &never_digest] {
        let (status, body) = fetch(&blob_url(digest)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let error: serde_json::Value = serde_json::from_slice(&body).expect("an OCI error body");
        assert_eq!(error["errors"][0]["code"], "UNAVAILABLE", "{error}");
        let message = error["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("s3://outage/regcache"), "{message}");
    }
    // Ready still (every replica shares the store; their local tiers serve), naming it.
    let (status, problem) = readiness(&proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        problem.contains("object store s3://outage/regcache"),
        "{problem}"
    );

    // Back up: nothing half-written is visible, and the blob fills again.
    store.restart().await;
    let in_bucket = store.assert_all_verified(PREFIX).await;
    assert_eq!(in_bucket, vec![small_digest.clone()]);
    fake.clear_faults();
    assert_eq!(readiness(&proxy).await, (StatusCode::OK, String::new()));
    assert_eq!(
        fetch(&blob_url(&big_digest)).await,
        (StatusCode::OK, big.clone().into())
    );
    // The body completes once verified; the upload completes right after.
    wait_in_bucket(&store, [&big_digest]).await;
    let mut in_bucket = store.assert_all_verified(PREFIX).await;
    in_bucket.sort();
    let mut expected = vec![small_digest, big_digest];
    expected.sort();
    assert_eq!(in_bucket, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_keeps_the_replica_unready_and_misses_answer_503() {
    let store = Seaweed::start("secret").await;
    let fake = FakeRegistry::builder()
        .blob(seeded_bytes("s3-secret", 1024))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = store.storage_toml(dir.path(), PREFIX, "");
    // The file the config names now holds another secret.
    Seaweed::credentials_file(dir.path(), "not-the-secret");
    let proxy = TestProxy::start(
        &[UpstreamSpec::default_at("registry.test", fake.url())],
        &toml,
    )
    .await;
    let (status, problem) = readiness(&proxy).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        problem.contains("object store s3://secret/regcache"),
        "{problem}"
    );
    assert!(!problem.contains("not-the-secret"), "{problem}");
    let digest = sha256_digest(&seeded_bytes("s3-secret", 1024));
    let (status, _) = fetch(&format!("{}/v2/test/app/blobs/{digest}", proxy.url())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(store.objects(PREFIX).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_fails_misses_within_its_timeout() {
    let store = Seaweed::start("hang").await;
    let front = FaultProxy::start(store.endpoint().trim_start_matches("http://")).await;
    let cached = seeded_bytes("s3-hang-cached", 4096);
    let missing = seeded_bytes("s3-hang-missing", 4096);
    let fake = FakeRegistry::builder()
        .blob(cached.clone())
        .blob(missing.clone())
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = store
        .storage_toml(dir.path(), PREFIX, "timeout = \"1s\"")
        .replace(&store.endpoint(), &front.url());
    let proxy = TestProxy::start(
        &[UpstreamSpec::default_at("registry.test", fake.url())],
        &toml,
    )
    .await;
    let blob_url =
        |bytes: &[u8]| format!("{}/v2/test/app/blobs/{}", proxy.url(), sha256_digest(bytes));
    assert_eq!(
        fetch(&blob_url(&cached)).await,
        (StatusCode::OK, cached.clone().into())
    );
    // The body ends once verified; the blob is in the local tier once the bucket has it.
    wait_in_bucket(&store, [sha256_digest(&cached)]).await;

    // Connections are accepted and never answered: the miss still gets its 503 (the client
    // would give up after 30 s), the local tier still serves, /readyz says why.
    front.set(Mode::Hang);
    let (status, body) = fetch(&blob_url(&missing)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(
        fetch(&blob_url(&cached)).await,
        (StatusCode::OK, cached.clone().into())
    );
    let (status, problem) = readiness(&proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert!(problem.contains("no answer within 1s"), "{problem}");

    front.set(Mode::Pass);
    assert_eq!(readiness(&proxy).await, (StatusCode::OK, String::new()));
    assert_eq!(
        fetch(&blob_url(&missing)).await,
        (StatusCode::OK, missing.clone().into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_filling_one_digest_at_once_leave_one_correct_object() {
    let upstream = Upstream::start(Auth::None).await;
    let image =
        images::push_oci_image(&upstream, "s3/race", "v1", "s3-race", &[4096, 10 << 20]).await;
    let store = Seaweed::start("race").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica(&upstream.url(), &store, dir.path(), "").await;
    let b = replica(&upstream.url(), &store, dir.path(), "").await;
    // Both cold at once: each may fill and upload (no compare-and-swap is needed).
    tokio::join!(
        a.pull_verified(&image.reference, &image.digest),
        b.pull_verified(&image.reference, &image.digest),
    );
    wait_in_bucket(&store, &image.blobs).await;
    // A third replica serves it from the bucket alone.
    let before: Vec<usize> = image.blobs.iter().map(|b| upstream.blob_gets(b)).collect();
    let c = replica(&upstream.url(), &store, dir.path(), "").await;
    c.pull_verified(&image.reference, &image.digest).await;
    let after: Vec<usize> = image.blobs.iter().map(|b| upstream.blob_gets(b)).collect();
    assert_eq!(
        before, after,
        "the third replica asked the upstream for blobs"
    );
}

/// Runs a maintenance command of the regcache binary against `config`: (exit status, stdout,
/// stderr).
async fn maintenance(args: &[&str], config: &Path) -> (Option<i32>, String, String) {
    let output = run_regcache(args, config).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_gc_and_ls_keep_tags_whose_bytes_only_the_bucket_holds() {
    let mut upstream = Upstream::start(Auth::None).await;
    let image =
        images::push_oci_image(&upstream, "s3/kept", "v1", "s3-kept", &[4096, 64 << 10]).await;
    let store = Seaweed::start("kept").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = replica(&upstream.url(), &store, dir.path(), "").await;
    proxy.pull_verified(&image.reference, &image.digest).await;
    wait_in_bucket(&store, image.blobs.iter().chain([&image.digest])).await;
    assert!(proxy.stop().await, "{}", proxy.log());

    // Every local copy is gone, as after eviction of the local tier: the bucket holds them all.
    std::fs::remove_dir_all(proxy.storage().join("blobs")).expect("remove the local tier");
    assert!(local_files(&proxy.storage()).is_empty());

    let (status, out, err) = maintenance(&["verify", "--json"], proxy.config_path()).await;
    assert_eq!(status, Some(0), "verify failed\n{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("verify JSON");
    assert_eq!(report["dropped_entries"], 0, "{out}");
    let (status, out, err) = maintenance(&["gc"], proxy.config_path()).await;
    assert_eq!(status, Some(0), "gc failed\n{out}\n{err}");
    assert!(out.contains(" 0 orphan index entries"), "{out}");
    let (status, out, err) = maintenance(&["ls", "--json"], proxy.config_path()).await;
    assert_eq!(status, Some(0), "ls failed\n{out}\n{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("ls JSON");
    let tags = listed.as_array().expect("a list");
    assert!(
        tags.iter().any(|t| t["repository"] == "s3/kept"
            && t["tag"] == "v1"
            && t["digest"] == image.digest.as_str()),
        "{out}"
    );
    // ls read the bucket without copying anything into the local tier.
    assert!(local_files(&proxy.storage()).is_empty());

    // The tag survived: a restarted replica serves it by tag with the upstream gone.
    upstream.stop().await;
    proxy.restart_after_crash().await;
    proxy.pull_verified(&image.reference, &image.digest).await;
}
