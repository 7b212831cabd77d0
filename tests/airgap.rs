//! Air-gapped sites against a real upstream (CNCF Distribution 2.8, which has no referrers API
//! and lists tags unsorted): tag lists and referrers served from the cache, `regcache
//! prefetch`, `regcache export` / `import`, with skopeo as the client.

mod common;

use std::path::Path;
use std::process::Output;

use common::images::{self, Pushed};
use common::proxy::{skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
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

/// Runs `regcache <args>` to completion.
async fn regcache(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run regcache")
}

#[track_caller]
fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// `registry.test/<repo>:<tag>`: the full reference the CLI takes.
fn full_ref(image: &Pushed) -> String {
    format!("{UPSTREAM_NAME}/{}", image.reference)
}

/// Whether the (offline) proxy serves blob `digest` of `repo`.
async fn serves_blob(proxy: &TestProxy, repo: &str, digest: &str) -> bool {
    let response = reqwest::Client::new()
        .head(format!("{}/v2/{repo}/blobs/{digest}", proxy.url()))
        .send()
        .await
        .expect("HEAD blob");
    response.status() == StatusCode::OK
}

/// The config and layer digests of each platform's manifest of an index, keyed by platform.
async fn platform_blobs(upstream: &Upstream, index: &Pushed) -> Vec<(String, Vec<String>)> {
    let client = upstream.client();
    let top = client
        .get_manifest(&index.repo, &index.digest)
        .await
        .expect("index");
    let top: serde_json::Value = serde_json::from_slice(&top.bytes).expect("index json");
    let mut platforms = Vec::new();
    for child in top["manifests"].as_array().expect("manifests") {
        let platform = format!(
            "{}/{}",
            child["platform"]["os"].as_str().unwrap_or_default(),
            child["platform"]["architecture"]
                .as_str()
                .unwrap_or_default()
        );
        let digest = child["digest"].as_str().expect("child digest");
        let manifest = client
            .get_manifest(&index.repo, digest)
            .await
            .expect("child manifest");
        let manifest: serde_json::Value =
            serde_json::from_slice(&manifest.bytes).expect("child json");
        let mut blobs = vec![manifest["config"]["digest"]
            .as_str()
            .expect("config")
            .to_owned()];
        for layer in manifest["layers"].as_array().expect("layers") {
            blobs.push(layer["digest"].as_str().expect("layer").to_owned());
        }
        platforms.push((platform, blobs));
    }
    platforms
}

fn go_offline(proxy: &TestProxy) {
    proxy.edit_config(|text| text.replace("default = true", "default = true\noffline = true"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_takes_the_chosen_platforms_and_a_rerun_fetches_only_what_is_missing() {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    let mut proxy = TestProxy::start(&[spec], "").await;
    assert!(proxy.stop().await, "{}", proxy.log());
    let config = proxy.config_path().to_owned();
    let index = &images.multiarch_oci;
    let platforms = platform_blobs(&upstream, index).await;
    let (amd64, arm64): (Vec<_>, Vec<_>) = platforms
        .iter()
        .partition(|(platform, _)| platform == "linux/amd64");
    assert_eq!((amd64.len(), arm64.len()), (1, 1), "{platforms:?}");

    // Stopped store, one platform; a list file with a comment.
    let list = tempfile::NamedTempFile::new().expect("list file");
    std::fs::write(list.path(), format!("# edge images\n{}\n", full_ref(index))).expect("write");
    let output = regcache(&[
        "prefetch",
        "--config",
        path_str(&config),
        "--platform",
        "linux/amd64",
        "--file",
        path_str(list.path()),
    ])
    .await;
    assert_success(&output, "prefetch --platform linux/amd64");
    go_offline(&proxy);
    proxy.restart_after_crash().await;
    for blob in &amd64[0].1 {
        assert!(
            serves_blob(&proxy, &index.repo, blob).await,
            "amd64 blob {blob}"
        );
    }
    for blob in &arm64[0].1 {
        assert!(
            !serves_blob(&proxy, &index.repo, blob).await,
            "arm64 blob {blob} was fetched"
        );
    }
    assert!(proxy.stop().await);

    // All platforms now: only the arm64 blobs are fetched; the amd64 ones stay at one GET.
    proxy.edit_config(|text| text.replace("offline = true\n", ""));
    let output = regcache(&["prefetch", "--config", path_str(&config), &full_ref(index)]).await;
    assert_success(&output, "prefetch of every platform");
    for (_, blobs) in &platforms {
        for blob in blobs {
            assert_eq!(
                upstream.blob_gets(blob),
                1,
                "blob {blob} fetched once in all"
            );
        }
    }
    go_offline(&proxy);
    proxy.restart_after_crash().await;
    proxy.pull_verified(&index.reference, &index.digest).await;

    // A failure is summarised and fails the run.
    assert!(proxy.stop().await);
    let missing = format!("{UPSTREAM_NAME}/test/no-such-image:v1");
    let output = regcache(&["prefetch", "--config", path_str(&config), &missing]).await;
    assert!(!output.status.success(), "a failed image must fail the run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("1 of 1 images failed") && stderr.contains(&missing),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_into_a_running_server_is_served_with_the_upstream_gone() {
    let mut upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    let proxy = TestProxy::start(&[spec], "").await;
    let config = proxy.config_path().to_owned();
    let wanted = [&images.small_oci, &images.multiarch_docker];
    let mut args = vec![
        "prefetch",
        "--referrers",
        "--jobs",
        "3",
        "--config",
        path_str(&config),
    ];
    let refs: Vec<String> = wanted.iter().map(|image| full_ref(image)).collect();
    args.extend(refs.iter().map(String::as_str));
    let output = regcache(&args).await;
    assert_success(&output, "prefetch into a running server");
    assert!(
        proxy
            .log()
            .contains("prefetch requested on the admin socket"),
        "the CLI went through the server"
    );

    let archive = tempfile::NamedTempFile::new().expect("archive path");
    let output = regcache(&[
        "export",
        "--config",
        path_str(&config),
        "-o",
        path_str(archive.path()),
        &refs[0],
    ])
    .await;
    assert!(
        !output.status.success(),
        "export cannot read a store a server holds"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stop it to export"), "{stderr}");

    upstream.stop().await;
    for image in wanted {
        proxy.pull_verified(&image.reference, &image.digest).await;
    }
    // The referrer came by digest, through the referrers API (the upstream has none: the
    // sha256-<hex> fallback tag).
    let referrer = &images.referrer;
    let by_digest = format!("{}@{}", referrer.repo, referrer.digest);
    proxy.pull_verified(&by_digest, &referrer.digest).await;
    let referrers = format!(
        "{}/v2/{}/referrers/{}",
        proxy.url(),
        images.small_oci.repo,
        images.small_oci.digest
    );
    let (status, _, index) = get_json(&referrers).await;
    assert_eq!(status, StatusCode::OK, "{index}");
    assert_eq!(digests(&index), [images.referrer.digest.as_str()]);
}

/// The connected side: prefetch into a running cache, stop it, export. Returns the upstream,
/// the images and the archive (kept in `dir`).
async fn connected_side(dir: &Path) -> (Upstream, images::Images, std::path::PathBuf) {
    let upstream = Upstream::start(Auth::None).await;
    let images = images::push_standard(&upstream, "test").await;
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url());
    let mut proxy = TestProxy::start_with_storage(&[spec], "", Some(dir.join("connected"))).await;
    let config = dir.join("connected.toml");
    std::fs::copy(proxy.config_path(), &config).expect("keep the config");
    let list = dir.join("images.txt");
    let wanted = images.pullable();
    let lines: Vec<String> = wanted.iter().map(|image| full_ref(image)).collect();
    std::fs::write(&list, lines.join("\n")).expect("write list");
    let output = regcache(&[
        "prefetch",
        "--referrers",
        "--config",
        path_str(&config),
        "--file",
        path_str(&list),
    ])
    .await;
    assert_success(&output, "prefetch");
    assert!(proxy.stop().await, "{}", proxy.log());
    let archive = dir.join("site.tar");
    let output = regcache(&[
        "export",
        "--referrers",
        "--config",
        path_str(&config),
        "--file",
        path_str(&list),
        "-o",
        path_str(&archive),
    ])
    .await;
    assert_success(&output, "export");
    (upstream, images, archive)
}

/// A site-side cache: offline, on a fresh store.
async fn site_proxy(upstream_url: &str) -> TestProxy {
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, upstream_url).with("offline = true");
    TestProxy::start(&[spec], "").await
}

#[tokio::test(flavor = "multi_thread")]
async fn export_then_import_serves_every_image_offline_with_the_upstream_digests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut upstream, images, archive) = connected_side(dir.path()).await;

    // skopeo reads the export as an OCI archive, by the full reference.
    let copy = tempfile::tempdir().expect("copy dir");
    let output = tokio::process::Command::new("skopeo")
        .args(["copy", "--preserve-digests"])
        .arg(format!(
            "oci-archive:{}:{}",
            archive.display(),
            full_ref(&images.small_oci)
        ))
        .arg(format!("dir:{}", copy.path().display()))
        .output()
        .await
        .expect("run skopeo");
    assert_success(&output, "skopeo copy oci-archive:");
    verify_dir(copy.path(), &images.small_oci.digest);

    // A skopeo-written archive of an image the export does not hold.
    let skopeo_archive = dir.path().join("from-skopeo.tar");
    let skopeo_ref = format!("{UPSTREAM_NAME}/test/from-skopeo:v1");
    let output = tokio::process::Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!(
            "docker://{}/{}",
            upstream.addr(),
            images.many_layers.reference
        ))
        .arg(format!(
            "oci-archive:{}:{skopeo_ref}",
            skopeo_archive.display()
        ))
        .output()
        .await
        .expect("run skopeo");
    assert_success(&output, "skopeo copy to oci-archive:");

    // The site: the upstream is gone; import into a running offline cache.
    let upstream_url = upstream.url();
    upstream.stop().await;
    let site = site_proxy(&upstream_url).await;
    let site_config = site.config_path().to_owned();
    for path in [&archive, &skopeo_archive] {
        let output =
            regcache(&["import", "--config", path_str(&site_config), path_str(path)]).await;
        assert_success(&output, "import into a running server");
    }
    assert!(site.log().contains("import requested on the admin socket"));
    for image in images.pullable() {
        site.pull_verified(&image.reference, &image.digest).await;
    }
    let referrer = &images.referrer;
    let by_digest = format!("{}@{}", referrer.repo, referrer.digest);
    site.pull_verified(&by_digest, &referrer.digest).await;
    let (status, _, index) = get_json(&format!(
        "{}/v2/{}/referrers/{}",
        site.url(),
        images.small_oci.repo,
        images.small_oci.digest
    ))
    .await;
    assert_eq!(status, StatusCode::OK, "{index}");
    assert_eq!(digests(&index), [referrer.digest.as_str()]);
    // The tag schema too: the `sha256-<hex>` fallback index, byte for byte, by tag, offline.
    let fallback = &images.referrers_index;
    let response = reqwest::Client::new()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            site.url(),
            fallback.repo,
            fallback.tag
        ))
        .header("accept", images::MT_OCI_INDEX)
        .send()
        .await
        .expect("GET the fallback tag");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.expect("body");
    assert_eq!(common::proxy::manifest_digest(&body), fallback.digest);

    // The repository's tag list, sorted and paginated, offline.
    let tags_url = format!("{}/v2/{}/tags/list", site.url(), images.small_oci.repo);
    let (status, _, list) = get_json(&tags_url).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let expected = ["referrer-v1", fallback.tag.as_str(), "v1"];
    assert_eq!(list["tags"], serde_json::json!(expected));
    let (_, headers, list) = get_json(&format!("{tags_url}?n=2&last=referrer-v1")).await;
    assert_eq!(list["tags"], serde_json::json!(expected[1..]));
    assert!(!headers.contains_key("link"), "the last page links nowhere");
    let (_, headers, list) = get_json(&format!("{tags_url}?n=1")).await;
    assert_eq!(list["tags"], serde_json::json!(expected[..1]));
    assert!(headers.contains_key("link"), "a next page is linked");

    // The next delivery carries only what the first lacked, and imports on top of it.
    let connected = dir.path().join("connected.toml");
    let list = dir.path().join("images.txt");
    let delta = dir.path().join("delta.tar");
    let output = regcache(&[
        "export",
        "--referrers",
        "--config",
        path_str(&connected),
        "--file",
        path_str(&list),
        "--since",
        path_str(&archive),
        "-o",
        path_str(&delta),
    ])
    .await;
    assert_success(&output, "export --since");
    let mut delta_entries = tar::Archive::new(std::fs::File::open(&delta).expect("open delta"));
    let names: Vec<String> = delta_entries
        .entries()
        .expect("entries")
        .map(|entry| {
            let entry = entry.expect("entry");
            entry.path().expect("path").to_string_lossy().into_owned()
        })
        .collect();
    for blob in &images.docker_v2.blobs {
        let name = format!("blobs/sha256/{}", blob.trim_start_matches("sha256:"));
        assert!(!names.contains(&name), "{name} was in the first archive");
    }
    let manifest_entry = format!(
        "blobs/sha256/{}",
        images.docker_v2.digest.trim_start_matches("sha256:")
    );
    assert!(names.contains(&manifest_entry), "{names:?}");
    let output = regcache(&[
        "import",
        "--config",
        path_str(&site_config),
        path_str(&delta),
    ])
    .await;
    assert_success(&output, "import of the delta");

    let from_skopeo = tempfile::tempdir().expect("copy dir");
    let (ok, stderr) = skopeo_copy(
        &format!("{}/test/from-skopeo:v1", site.addr()),
        from_skopeo.path(),
        &[],
    )
    .await;
    assert!(ok, "{stderr}\n{}", site.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_or_truncated_archive_is_refused_naming_the_entry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut upstream, images, archive) = connected_side(dir.path()).await;
    let upstream_url = upstream.url();
    upstream.stop().await;
    let bytes = std::fs::read(&archive).expect("read archive");

    // Flip one byte inside the largest layer of docker-v2 (found by its digest's entry name).
    let layer = images.docker_v2.blobs.last().expect("a layer").clone();
    let entry = format!("blobs/sha256/{}", layer.trim_start_matches("sha256:"));
    let header_at = bytes
        .windows(entry.len())
        .position(|window| window == entry.as_bytes())
        .expect("the layer's entry in the archive");
    let mut tampered = bytes.clone();
    tampered[header_at + 512 + 100] ^= 0x01;
    let tampered_path = dir.path().join("tampered.tar");
    std::fs::write(&tampered_path, &tampered).expect("write");
    let truncated_path = dir.path().join("truncated.tar");
    std::fs::write(&truncated_path, &bytes[..bytes.len() * 2 / 3]).expect("write");

    // `--all`: every cached tag, by its full reference.
    let all = dir.path().join("all.tar");
    let connected = dir.path().join("connected.toml");
    let output = regcache(&[
        "export",
        "--config",
        path_str(&connected),
        "--all",
        "-o",
        path_str(&all),
    ])
    .await;
    assert_success(&output, "export --all");
    let mut all_archive = tar::Archive::new(std::fs::File::open(&all).expect("open"));
    let mut index_json = String::new();
    for entry in all_archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").to_string_lossy() == "index.json" {
            std::io::Read::read_to_string(&mut entry, &mut index_json).expect("index.json");
        }
    }
    for image in [&images.small_oci, &images.schema1, &images.multiarch_docker] {
        assert!(
            index_json.contains(&format!("\"{}\"", full_ref(image))),
            "{index_json}"
        );
    }

    let mut site = site_proxy(&upstream_url).await;
    let config = site.config_path().to_owned();
    assert!(site.stop().await);
    let output = regcache(&[
        "import",
        "--config",
        path_str(&config),
        path_str(&tampered_path),
    ])
    .await;
    assert!(
        !output.status.success(),
        "a tampered archive must be refused"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&entry) && stderr.contains("mismatch"),
        "{stderr}"
    );
    let output = regcache(&[
        "import",
        "--config",
        path_str(&config),
        path_str(&truncated_path),
    ])
    .await;
    assert!(
        !output.status.success(),
        "a truncated archive must be refused"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("archive entry"), "{stderr}");

    site.restart_after_crash().await;
    assert!(
        !serves_blob(&site, &images.docker_v2.repo, &layer).await,
        "the tampered blob was stored"
    );
    let (status, _, _) = get_json(&format!(
        "{}/v2/{}/manifests/v1",
        site.url(),
        images.docker_v2.repo
    ))
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a manifest whose blob failed is not served"
    );
}

/// The one fault Distribution cannot produce on demand: a blob that never arrives, so that the
/// prefetch is interrupted with part of the image stored.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_prefetch_resumes_without_fetching_again_what_it_stored() {
    use common::fake::{FakeRegistry, Fault};
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    let fast = images::seeded_bytes("fast", 64 * 1024);
    let slow = images::seeded_bytes("slow", 64 * 1024);
    let digest_of = |bytes: &[u8]| common::regclient::sha256_digest(bytes);
    let (config_digest, fast_digest, slow_digest) =
        (digest_of(&config), digest_of(&fast), digest_of(&slow));
    let layer = |digest: &str, size: usize| serde_json::json!({"mediaType": images::MT_OCI_LAYER_TAR, "digest": digest, "size": size});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::MT_OCI_MANIFEST,
        "config": {"mediaType": images::MT_OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [layer(&fast_digest, fast.len()), layer(&slow_digest, slow.len())],
    });
    let fake = FakeRegistry::builder()
        .blob(config)
        .blob(fast)
        .blob(slow)
        .manifest(
            "test/app",
            "v1",
            images::MT_OCI_MANIFEST,
            serde_json::to_vec(&manifest).expect("json"),
        )
        .start()
        .await;
    fake.set_fault(&slow_digest, Fault::Hang);
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, fake.url());
    let mut proxy = TestProxy::start(&[spec], "").await;
    assert!(proxy.stop().await);
    let config_path = proxy.config_path().to_owned();
    let image = format!("{UPSTREAM_NAME}/test/app:v1");

    let mut first = tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["prefetch", "--config", path_str(&config_path), &image])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn prefetch");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fake.count(|r| r.is_get(&fast_digest)) == 0 || fake.count(|r| r.is_get(&slow_digest)) == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the prefetch never asked for both layers"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Generous time for the fast layer's fill to verify and commit on a loaded machine.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    first.kill().await.expect("interrupt the prefetch");

    fake.clear_faults();
    let output = regcache(&["prefetch", "--config", path_str(&config_path), &image]).await;
    assert_success(&output, "the resumed prefetch");
    assert_eq!(
        fake.count(|r| r.is_get(&fast_digest)),
        1,
        "the stored layer was fetched again"
    );
    assert_eq!(fake.count(|r| r.is_get(&slow_digest)), 2);
    go_offline(&proxy);
    proxy.restart_after_crash().await;
    for digest in [&config_digest, &fast_digest, &slow_digest] {
        assert!(serves_blob(&proxy, "test/app", digest).await, "{digest}");
    }
}
