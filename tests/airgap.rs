//! Air-gapped sites against a real upstream (CNCF Distribution 2.8, which has no referrers API
//! and lists tags unsorted): tag lists and referrers served from the cache, `regcache
//! prefetch`, `regcache export` / `import`, with skopeo as the client.

use crate::common;

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

    // skopeo reads the export as an OCI archive, by the full reference: OCI images as they
    // are, Docker ones through the wrapper index the export writes (the bytes skopeo picks
    // keep the upstream's digest; from a manifest list, the image for this machine).
    let skopeo_reads = |image: &images::Pushed| {
        let source = format!("oci-archive:{}:{}", archive.display(), full_ref(image));
        async move {
            let copy = tempfile::tempdir().expect("copy dir");
            let output = tokio::process::Command::new("skopeo")
                .args(["copy", "--preserve-digests"])
                .arg(&source)
                .arg(format!("dir:{}", copy.path().display()))
                .output()
                .await
                .expect("run skopeo");
            assert_success(&output, &format!("skopeo copy {source}"));
            copy
        }
    };
    for image in [&images.small_oci, &images.docker_v2, &images.many_layers] {
        let copy = skopeo_reads(image).await;
        verify_dir(copy.path(), &image.digest);
    }
    for list in [&images.multiarch_docker, &images.multiarch_oci] {
        let copy = skopeo_reads(list).await;
        let top = std::fs::read(copy.path().join("manifest.json")).expect("manifest.json");
        let picked = common::proxy::manifest_digest(&top);
        assert!(
            list.children.contains(&picked),
            "{picked} is not an image of {}",
            list.reference
        );
        verify_dir(copy.path(), &picked);
    }

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
        let after = site.events().len();
        let output =
            regcache(&["import", "--config", path_str(&site_config), path_str(path)]).await;
        assert_success(&output, "import into a running server");
        // The running server did the import (the command handed it over the admin socket).
        let imported = site
            .wait_for_event(after, std::time::Duration::from_secs(10), |event| {
                event["event"] == "imported"
            })
            .await;
        assert_eq!(imported["archive"], path_str(path), "{imported}");
        assert!(imported["error"].is_null(), "{imported}");
    }
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

    // An image the store does not hold: export says so and how to fetch it (it reads only the
    // store, so whether the upstream answers is beside the point).
    let missing = format!("{UPSTREAM_NAME}/test/never-pulled:v1");
    let none = dir.path().join("none.tar");
    let output = regcache(&[
        "export",
        "--config",
        path_str(&connected),
        &missing,
        "-o",
        path_str(&none),
    ])
    .await;
    assert!(!output.status.success(), "export of an image not cached");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not cached here")
            && stderr.contains(&format!("regcache prefetch {missing}"))
            && !stderr.contains("offline"),
        "{stderr}"
    );
    assert!(!none.exists(), "no archive is left behind");

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
    // The fast layer's fill verifies and commits: its file appears under `blobs/` (renamed
    // into place whole).
    let fast_file = format!("/sha256/{}/{}", &fast_digest[7..9], &fast_digest[7..]);
    let committed = || {
        store_files(&proxy.storage()).iter().any(|(name, size)| {
            name.starts_with("blobs/") && name.ends_with(&fast_file) && *size == 64 * 1024
        })
    };
    while !committed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fast layer was not committed: {:?}",
            store_files(&proxy.storage())
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
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

/// A tar written byte by byte, so that a test can declare sizes its data does not have.
#[derive(Default)]
struct TarBytes(Vec<u8>);

impl TarBytes {
    /// A header of `kind` declaring `declared` bytes, then `data`, padded to a block.
    fn entry(&mut self, kind: tar::EntryType, name: &str, declared: u64, data: &[u8]) -> &mut Self {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        // Written as given (`set_path` would drop the `./` of `././@LongLink`).
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(declared);
        header.set_mode(0o644);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(tar::EntryType::Regular, name, data.len() as u64, data)
    }

    /// Writes the archive, then `hole` bytes that take no disk space (a sparse file: the data
    /// of a last entry declaring more than was written) and the end-of-archive blocks.
    fn write(&self, path: &Path, hole: u64) {
        std::fs::write(path, &self.0).expect("write archive");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open archive");
        let len = (self.0.len() as u64 + hole).next_multiple_of(512) + 1024;
        file.set_len(len).expect("extend archive");
    }
}

fn sha(bytes: &[u8]) -> String {
    common::regclient::sha256_digest(bytes)
}

fn entry_of(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// An OCI image manifest of `config` and `layers` (digest, declared size).
fn oci_manifest(config: &[u8], layers: &[(String, u64)]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({"mediaType": images::MT_OCI_LAYER_TAR, "digest": digest, "size": size})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::MT_OCI_MANIFEST,
        "config": {"mediaType": images::MT_OCI_CONFIG, "digest": sha(config), "size": config.len()},
        "layers": layers,
    }))
    .expect("json")
}

/// `index.json` naming `manifest` (declared as `media_type`) as `name` (none: unnamed).
fn index_json(media_type: &str, manifest: &[u8], name: Option<&str>) -> Vec<u8> {
    let mut descriptor = serde_json::json!({
        "mediaType": media_type,
        "digest": sha(manifest),
        "size": manifest.len(),
    });
    if let Some(name) = name {
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    }
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]}))
        .expect("json")
}

/// A layout holding one manifest (declared as `media_type`, named `name`) and `blobs`.
fn layout(media_type: &str, manifest: &[u8], name: Option<&str>, blobs: &[&[u8]]) -> TarBytes {
    let mut archive = TarBytes::default();
    archive
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("index.json", &index_json(media_type, manifest, name))
        .file(&entry_of(&sha(manifest)), manifest);
    for blob in blobs {
        archive.file(&entry_of(&sha(blob)), blob);
    }
    archive
}

/// The image every hostile-import test loads first: `test/good:v1`.
struct GoodImage {
    layer: Vec<u8>,
    manifest: Vec<u8>,
    archive: tempfile::TempPath,
}

fn good_image() -> GoodImage {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#.to_vec();
    let layer = images::seeded_bytes("good layer", 64 * 1024);
    let manifest = oci_manifest(&config, &[(sha(&layer), layer.len() as u64)]);
    let name = format!("{UPSTREAM_NAME}/test/good:v1");
    let archive = tempfile::NamedTempFile::new()
        .expect("archive")
        .into_temp_path();
    layout(
        images::MT_OCI_MANIFEST,
        &manifest,
        Some(&name),
        &[&config, &layer],
    )
    .write(&archive, 0);
    GoodImage {
        layer,
        manifest,
        archive,
    }
}

/// An archive that must be refused: what it tries, and what the message must name.
struct HostileCase {
    what: &'static str,
    path: std::path::PathBuf,
    expected: Vec<String>,
}

/// One archive per attack of issue 19 (4–6) and the smaller import holes, each naming an
/// image of its own (`test/<what>:v1`), so that a tag recorded in error would show.
fn hostile_cases(dir: &Path, good: &GoodImage) -> Vec<HostileCase> {
    let mut cases = Vec::new();
    let mut add = |what: &'static str, archive: &TarBytes, hole: u64, expected: &[&str]| {
        let path = dir.join(format!("{what}.tar"));
        archive.write(&path, hole);
        cases.push(HostileCase {
            what,
            path,
            expected: expected.iter().map(|part| (*part).to_owned()).collect(),
        });
    };
    let name = |what: &str| format!("{UPSTREAM_NAME}/test/{what}:v1");
    let config =
        |what: &str| format!("{{\"architecture\":\"amd64\",\"os\":\"{what}\"}}").into_bytes();

    // A GNU long name declaring 256 MiB, 8 KiB on disk; a PAX header declaring 1 GiB.
    let mut archive = layout(
        images::MT_OCI_MANIFEST,
        &good.manifest,
        Some(&name("long")),
        &[],
    );
    archive.entry(
        tar::EntryType::GNULongName,
        "././@LongLink",
        256 << 20,
        &[b'a'; 8192],
    );
    add("long", &archive, 0, &["././@LongLink", "268435456"]);
    let mut archive = layout(
        images::MT_OCI_MANIFEST,
        &good.manifest,
        Some(&name("pax")),
        &[],
    );
    archive.entry(
        tar::EntryType::XHeader,
        "PaxHeaders.0/layer",
        1 << 30,
        &[b'a'; 8192],
    );
    add(
        "pax",
        &archive,
        0,
        &["PaxHeaders.0/layer", "PAX header", "1073741824"],
    );

    // A 2 GiB layer in a sparse archive (max_blob_size is 64 MiB); a 1.5 MiB one (the budget
    // is 1 MiB). Only the declared sizes are real.
    for (what, size, reason) in [
        ("sparse", 2u64 << 30, "max_blob_size"),
        ("budget", 3 << 19, "storage budget"),
    ] {
        let config = config(what);
        let layer_digest = sha(what.as_bytes());
        let manifest = oci_manifest(&config, &[(layer_digest.clone(), size)]);
        let mut archive = layout(
            images::MT_OCI_MANIFEST,
            &manifest,
            Some(&name(what)),
            &[&config],
        );
        archive.entry(tar::EntryType::Regular, &entry_of(&layer_digest), size, b"");
        add(what, &archive, size, &[&entry_of(&layer_digest), reason]);
    }

    // Manifests a fill would refuse, under their own digests, declared as manifests.
    let html = b"<html><body>hi</body></html>".to_vec();
    let archive = layout(images::MT_OCI_MANIFEST, &html, Some(&name("html")), &[]);
    add(
        "html",
        &archive,
        0,
        &[&entry_of(&sha(&html)), "not a JSON object"],
    );
    let gzip = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        .to_vec();
    let archive = layout(images::MT_OCI_MANIFEST, &gzip, Some(&name("gzip")), &[]);
    add(
        "gzip",
        &archive,
        0,
        &[&entry_of(&sha(&gzip)), "not a JSON object"],
    );
    let children = serde_json::json!([{"mediaType": images::MT_OCI_MANIFEST, "digest": sha(&good.manifest), "size": good.manifest.len()}]);
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": images::MT_OCI_INDEX, "manifests": children})).expect("json");
    let mut archive = layout(
        images::MT_OCI_MANIFEST,
        &index,
        Some(&name("disguised")),
        &[],
    );
    archive.file(&entry_of(&sha(&good.manifest)), &good.manifest);
    add(
        "disguised",
        &archive,
        0,
        &[&entry_of(&sha(&index)), "mediaType disagrees"],
    );
    let bare = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": children}))
        .expect("json");
    let mut archive = layout(images::MT_OCI_MANIFEST, &bare, Some(&name("bare")), &[]);
    archive.file(&entry_of(&sha(&good.manifest)), &good.manifest);
    add("bare", &archive, 0, &[&entry_of(&sha(&bare)), "an index"]);
    let config_html = config("text-html");
    let manifest = oci_manifest(&config_html, &[]);
    let archive = layout(
        "text/html",
        &manifest,
        Some(&name("texthtml")),
        &[&config_html],
    );
    add(
        "texthtml",
        &archive,
        0,
        &[
            &entry_of(&sha(&manifest)),
            "text/html",
            "not a manifest media type",
        ],
    );

    // No reference names: nothing to import is an error, not an empty success.
    let archive = layout(images::MT_OCI_MANIFEST, &good.manifest, None, &[]);
    add("unnamed", &archive, 0, &["index.json", "names no image"]);

    // The good layer, tampered, after a new config: the store already holds the layer, so the
    // archive's bytes must still be checked, and the config stored before it removed again.
    let new_config = config("tampered");
    let manifest = oci_manifest(&new_config, &[(sha(&good.layer), good.layer.len() as u64)]);
    let mut tampered = good.layer.clone();
    tampered[100] ^= 1;
    let mut archive = layout(
        images::MT_OCI_MANIFEST,
        &manifest,
        Some(&name("tampered")),
        &[&new_config],
    );
    archive.file(&entry_of(&sha(&good.layer)), &tampered);
    add(
        "tampered",
        &archive,
        0,
        &[&entry_of(&sha(&good.layer)), "mismatch"],
    );
    cases
}

/// Every file under the store's `blobs/` and `tmp/`, with its size.
fn store_files(storage: &Path) -> Vec<(String, u64)> {
    fn walk(dir: &Path, root: &Path, files: &mut Vec<(String, u64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                walk(&path, root, files);
            } else {
                let name = path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                files.push((name, meta.len()));
            }
        }
    }
    let mut files = Vec::new();
    // The trash too: what a refused import stored is gone from the disk, not only the store.
    for part in ["blobs", "tmp", "trash"] {
        walk(&storage.join(part), storage, &mut files);
    }
    files.sort();
    files
}

/// Imports each hostile archive with the CLI (through the server's admin socket when one
/// runs): each is refused with exit status 1, naming the entry, and the store is unchanged.
async fn refuse_all(config: &Path, storage: &Path, cases: &[HostileCase]) {
    let before = store_files(storage);
    assert!(
        before.iter().any(|(name, _)| name.starts_with("blobs/")),
        "the good image is stored: {before:?}"
    );
    for case in cases {
        let output =
            regcache(&["import", "--config", path_str(config), path_str(&case.path)]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}: {stderr}{}",
            case.what,
            String::from_utf8_lossy(&output.stdout)
        );
        for part in &case.expected {
            assert!(
                stderr.contains(part.as_str()),
                "{}: {stderr:?} lacks {part:?}",
                case.what
            );
        }
        assert_eq!(
            store_files(storage),
            before,
            "{}: the store changed",
            case.what
        );
    }
}

/// The good image is served, and no tag of a refused archive is.
async fn serves_only_the_good_image(site: &TestProxy, good: &GoodImage, cases: &[HostileCase]) {
    let response = reqwest::Client::new()
        .get(format!("{}/v2/test/good/manifests/v1", site.url()))
        .header("accept", images::MT_OCI_MANIFEST)
        .send()
        .await
        .expect("GET the good manifest");
    assert_eq!(response.status(), StatusCode::OK, "{}", site.log());
    assert_eq!(
        sha(&response.bytes().await.expect("body")),
        sha(&good.manifest)
    );
    assert!(serves_blob(site, "test/good", &sha(&good.layer)).await);
    for case in cases {
        let (status, _, _) = get_json(&format!(
            "{}/v2/test/{}/manifests/v1",
            site.url(),
            case.what
        ))
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{} was tagged", case.what);
    }
}

const HOSTILE_IMPORT_TOML: &str =
    "[cache]\nmax_blob_size = \"64MiB\"\n[storage]\nmax_size = \"1MiB\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archives_are_refused_by_the_cli_and_leave_the_store_as_it_was() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, "http://127.0.0.1:9").with("offline = true");
    let mut site = TestProxy::start(&[spec], HOSTILE_IMPORT_TOML).await;
    assert!(site.stop().await, "{}", site.log());
    let config = site.config_path().to_owned();
    let good = good_image();
    let output = regcache(&[
        "import",
        "--config",
        path_str(&config),
        path_str(&good.archive),
    ])
    .await;
    assert_success(&output, "import of the good image");
    let cases = hostile_cases(dir.path(), &good);
    refuse_all(&config, &site.storage(), &cases).await;
    site.restart_after_crash().await;
    serves_only_the_good_image(&site, &good, &cases).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archives_are_refused_through_the_admin_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = UpstreamSpec::default_at(UPSTREAM_NAME, "http://127.0.0.1:9").with("offline = true");
    let site = TestProxy::start(&[spec], HOSTILE_IMPORT_TOML).await;
    let config = site.config_path().to_owned();
    let good = good_image();
    let output = regcache(&[
        "import",
        "--config",
        path_str(&config),
        path_str(&good.archive),
    ])
    .await;
    assert_success(&output, "import of the good image into the running server");
    let cases = hostile_cases(dir.path(), &good);
    refuse_all(&config, &site.storage(), &cases).await;
    let log = site.log();
    assert_eq!(
        log.matches("import requested on the admin socket").count(),
        cases.len() + 1,
        "every import went through the server:\n{log}"
    );
    serves_only_the_good_image(&site, &good, &cases).await;
}
