//! Smoke test of the test harness itself: a real upstream registry, the
//! standard images, access-log counting and the token flow.

use crate::common;

use common::images::{self, MT_DOCKER_LIST, MT_OCI_INDEX, MT_OCI_MANIFEST, MT_SCHEMA1_SIGNED};
use common::regclient::{sha256_digest, RegistryClient};
use common::upstream::{Auth, Upstream};

#[tokio::test]
async fn open_upstream_round_trips_standard_images() {
    let up = Upstream::start(Auth::None).await;
    let imgs = images::push_standard(&up, "test").await;
    assert_eq!(
        up.request_count(),
        0,
        "harness requests must not be counted: {:#?}",
        up.counted_entries()
    );

    assert_eq!(imgs.small_oci.media_type, MT_OCI_MANIFEST);
    assert_eq!(imgs.multiarch_oci.media_type, MT_OCI_INDEX);
    assert_eq!(imgs.multiarch_oci.children.len(), 2);
    assert_eq!(imgs.multiarch_docker.media_type, MT_DOCKER_LIST);
    assert_eq!(imgs.many_layers.blobs.len(), 31);
    assert_eq!(imgs.schema1.media_type, MT_SCHEMA1_SIGNED);
    assert_eq!(imgs.artifact.blobs[0], images::EMPTY_DIGEST);

    // Same seed and sizes, same digests, whatever the repository.
    let a = images::push_oci_image(&up, "test/seeded-a", "v1", "seed", &[4096, 100]).await;
    let b = images::push_oci_image(&up, "test/seeded-b", "v1", "seed", &[4096, 100]).await;
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.blobs, b.blobs);

    // A plain client (no harness User-Agent) is counted.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client");
    let manifest_url = format!(
        "{}/v2/{}/manifests/{}",
        up.url(),
        imgs.docker_v2.repo,
        imgs.docker_v2.tag
    );
    let resp = http
        .get(&manifest_url)
        .header("Accept", images::MT_DOCKER_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    let header = resp.headers()["docker-content-digest"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body = resp.bytes().await.expect("manifest body");
    assert_eq!(header, imgs.docker_v2.digest);
    assert_eq!(sha256_digest(&body), imgs.docker_v2.digest);
    assert_eq!(up.manifest_gets(&imgs.docker_v2.tag), 1);

    let layer = &imgs.small_oci.blobs[1];
    assert_eq!(up.blob_gets(layer), 0);
    let blob_url = format!("{}/v2/{}/blobs/{layer}", up.url(), imgs.small_oci.repo);
    let bytes = http
        .get(&blob_url)
        .send()
        .await
        .expect("GET blob")
        .bytes()
        .await
        .expect("blob body");
    assert_eq!(&sha256_digest(&bytes), layer);
    assert_eq!(up.blob_gets(layer), 1);
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn token_upstream_allows_push_with_creds_and_anonymous_pull() {
    let up = Upstream::start(Auth::token(300)).await;
    let small =
        images::push_oci_image(&up, "test/small-oci", "v1", images::DEFAULT_SEED, &[4096]).await;
    let tokens = up.token_server().expect("token auth has a token server");
    let issued_for_push = tokens.tokens_issued();
    assert!(issued_for_push > 0, "pushing must have fetched tokens");

    // Without a token the registry challenges.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client");
    let resp = http
        .get(format!("{}/v2/", up.url()))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(resp.status(), 401);

    // Anonymous pull through the token dance, counted (not a harness UA).
    let anon = RegistryClient::with_user_agent(&up.url(), None, "smoke-test").expect("client");
    let got = anon
        .get_manifest(&small.repo, &small.tag)
        .await
        .expect("anonymous manifest pull");
    assert_eq!(got.digest, small.digest);
    anon.get_blob(&small.repo, &small.blobs[1])
        .await
        .expect("anonymous blob pull");
    assert!(tokens.tokens_issued() > issued_for_push);
    assert_eq!(up.blob_gets(&small.blobs[1]), 1);
    assert_eq!(up.manifest_gets("v1"), 1);

    // Anonymous clients may not push.
    let denied = anon
        .put_manifest(&small.repo, "v2", MT_OCI_MANIFEST, &got.bytes)
        .await;
    assert!(denied.is_err(), "anonymous push must be refused");
}

#[tokio::test]
async fn basic_upstream_survives_restart_and_takes_large_layers() {
    let mut up = Upstream::start(Auth::basic()).await;
    let first = images::push_oci_image(&up, "test/img", "v1", "seed-a", &[1000, 2000]).await;
    let anon = RegistryClient::with_user_agent(&up.url(), None, "smoke-test").expect("client");
    assert!(
        anon.get_manifest("test/img", "v1").await.is_err(),
        "basic auth must refuse anonymous pulls"
    );
    let user =
        RegistryClient::with_user_agent(&up.url(), up.creds(), "smoke-test").expect("client");

    up.stop().await;
    assert!(
        user.get_manifest("test/img", "v1").await.is_err(),
        "a stopped upstream must not answer"
    );
    up.restart().await;
    // Back on a new port (see `Upstream::restart`), with the same storage.
    let user =
        RegistryClient::with_user_agent(&up.url(), up.creds(), "smoke-test").expect("client");
    assert_eq!(
        user.get_manifest("test/img", "v1")
            .await
            .expect("pull after restart")
            .digest,
        first.digest
    );

    up.freeze();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("reqwest client");
    let hung = http.get(format!("{}/v2/", up.url())).send().await;
    assert!(hung
        .expect_err("a frozen upstream must not answer")
        .is_timeout());
    up.thaw();
    assert_eq!(
        user.get_manifest("test/img", "v1")
            .await
            .expect("pull after thaw")
            .digest,
        first.digest
    );

    let moved = images::push_oci_image(&up, "test/img", "v1", "seed-b", &[1000, 2000]).await;
    assert_ne!(moved.digest, first.digest, "another seed must move the tag");

    let large = images::push_large(&up, "test/large", "v1", 1).await;
    let layer = user
        .get_blob("test/large", &large.blobs[1])
        .await
        .expect("large layer");
    let mut archive = tar::Archive::new(layer.as_ref());
    let names: Vec<String> = archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["data/", "data/large.bin", "data/large.txt"]);
    assert_eq!(up.blob_gets(&large.blobs[1]), 1);
    assert_eq!(up.manifest_gets("v1"), 2);
}
