//! A hostile upstream (tests/common/hostile.rs) against regcache: credentials sent to a token
//! realm on another host, a token realm on a non-public address, forged schema1, bodies that
//! never end, HTML typed as a manifest, redirects to loopback and link-local addresses,
//! listings typed as HTML. Each test asserts what the attacker's server received and what a
//! client and the store end up with.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::fake::Recorded;
use common::hostile::{answer, endless, redirect, Body, Hostile};
use common::http::client;
use common::proxy::{TestProxy, UpstreamSpec};
use common::regclient::sha256_digest;
use http::Response;
use reqwest::StatusCode;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws";

/// An OCI image manifest (its blobs need not exist for manifest tests).
fn oci_manifest() -> String {
    let zeros = "0".repeat(64);
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{zeros}","size":2}},"layers":[]}}"#
    )
}

/// A signed schema1 document in libtrust's layout: `body` (a JSON object without its closing
/// brace), then the signatures, then `\n}`, with a protected header claiming `format_length`
/// and `tail`.
fn schema1(body: &str, format_length: usize, tail: &str) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let protected = engine.encode(format!(
        r#"{{"formatLength":{format_length},"formatTail":"{}"}}"#,
        engine.encode(tail)
    ));
    format!("{body},\n   \"signatures\": [{{\"protected\": \"{protected}\"}}]\n}}")
}

const SCHEMA1_BODY: &str =
    "{\n   \"schemaVersion\": 1,\n   \"name\": \"app\",\n   \"tag\": \"v1\",\n   \"fsLayers\": []";

async fn get(proxy: &TestProxy, tail: &str, accept: &str) -> reqwest::Response {
    client()
        .get(format!("{}/v2/app/{tail}", proxy.url()))
        .header("accept", accept)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {tail}: {e}\nproxy log:\n{}", proxy.log()))
}

/// A proxy whose default upstream `hostile.test` is at `url`, with extra upstream TOML lines.
async fn proxy_for(url: &str, upstream_lines: &[&str], extra_toml: &str) -> TestProxy {
    let mut spec = UpstreamSpec::default_at("hostile.test", url).with("breaker_threshold = 1000");
    for line in upstream_lines {
        spec = spec.with(line);
    }
    TestProxy::start(std::slice::from_ref(&spec), extra_toml).await
}

/// Files under the store's `blobs/` and `tmp/`.
fn stored_files(storage: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&storage.join("blobs"), &mut found);
    walk(&storage.join("tmp"), &mut found);
    found
}

fn bearer_or_challenge(
    request: &Recorded,
    realm: &str,
    ok: impl Fn() -> Response<Body>,
) -> Response<Body> {
    if request
        .authorization()
        .is_some_and(|a| a.starts_with("Bearer "))
    {
        return ok();
    }
    let challenge = format!(r#"Bearer realm="{realm}",service="hostile""#);
    answer(
        StatusCode::UNAUTHORIZED,
        "application/json",
        &[("www-authenticate", challenge.as_str())],
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}"#,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_go_only_to_listed_token_realm_hosts() {
    let realm = Hostile::start("127.0.0.1:0", |_| {
        answer(
            StatusCode::OK,
            "application/json",
            &[],
            r#"{"token":"t","expires_in":300}"#,
        )
    })
    .await;
    let realm_url = format!("{}/token", realm.url());
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        bearer_or_challenge(request, &realm_url, || {
            answer(StatusCode::OK, OCI_MANIFEST, &[], oci_manifest())
        })
    })
    .await;
    // The upstream is named `localhost`, the realm `127.0.0.1`: another host.
    let url = format!("http://localhost:{}", upstream.port());
    let credentials = ["username = \"robot\"", "password = \"hunter2\""];

    let proxy = proxy_for(&url, &credentials, "").await;
    let response = get(&proxy, "manifests/v1", ACCEPT_ALL).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", proxy.log());
    let asked = realm.requests();
    assert!(!asked.is_empty(), "the realm was asked for a token");
    for request in &asked {
        assert_eq!(
            request.authorization(),
            None,
            "credentials went to a realm on another host: {request:#?}"
        );
    }
    drop(proxy);

    // Listed, the realm host gets them.
    let listed = [
        credentials[0],
        credentials[1],
        "token_realm_hosts = [\"127.0.0.1\"]",
    ];
    let proxy = proxy_for(&url, &listed, "").await;
    let response = get(&proxy, "manifests/v1", ACCEPT_ALL).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", proxy.log());
    let later = &realm.requests()[asked.len()..];
    assert!(!later.is_empty(), "the realm was asked again");
    for request in later {
        assert!(
            request
                .authorization()
                .is_some_and(|a| a.starts_with("Basic ")),
            "a listed realm host gets the credentials: {request:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_schema1_is_refused_and_nothing_is_stored() {
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
    let index_digest = sha256_digest(index.as_bytes());
    // formatLength 0 and the tail another document: the payload digest would be the index's.
    let forged = schema1(SCHEMA1_BODY, 0, &index);
    let digest_header = index_digest.clone();
    let upstream = Hostile::start("127.0.0.1:0", move |_| {
        answer(
            StatusCode::OK,
            SCHEMA1_SIGNED,
            &[("docker-content-digest", digest_header.as_str())],
            forged.clone(),
        )
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "").await;

    for (tail, accept) in [
        (format!("manifests/{index_digest}"), OCI_INDEX),
        (format!("manifests/{index_digest}"), SCHEMA1_SIGNED),
        ("manifests/v1".to_owned(), ACCEPT_ALL),
    ] {
        let response = get(&proxy, &tail, accept).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "{tail} with {accept}"
        );
    }
    assert!(!upstream.requests().is_empty(), "the upstream was asked");
    assert_eq!(stored_files(&proxy.storage()), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn schema1_goes_only_to_clients_that_accept_it() {
    let tail = "\n}";
    let signed = schema1(SCHEMA1_BODY, SCHEMA1_BODY.len(), tail);
    let payload_digest = sha256_digest(format!("{SCHEMA1_BODY}{tail}").as_bytes());
    let upstream = Hostile::start("127.0.0.1:0", move |_| {
        answer(StatusCode::OK, SCHEMA1_SIGNED, &[], signed.clone())
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "").await;

    let response = get(&proxy, "manifests/v1", OCI_MANIFEST).await;
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "an OCI-only client"
    );
    let response = get(&proxy, &format!("manifests/{payload_digest}"), OCI_MANIFEST).await;
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "by digest, OCI only"
    );

    let response = get(&proxy, "manifests/v1", SCHEMA1_SIGNED).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", proxy.log());
    assert_eq!(
        response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(payload_digest.as_str()),
        "a genuine signed schema1 keeps its payload digest"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_that_are_not_json_of_their_type_are_refused() {
    let docker_list = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        let (content_type, body): (&str, Vec<u8>) = if request.path.ends_with("/html") {
            (
                OCI_MANIFEST,
                b"<html><script>alert(1)</script></html>".to_vec(),
            )
        } else if request.path.ends_with("/gzip") {
            (OCI_MANIFEST, vec![0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00])
        } else {
            // A Docker list's bytes served as an OCI index.
            (OCI_INDEX, docker_list.as_bytes().to_vec())
        };
        answer(StatusCode::OK, content_type, &[], body)
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "").await;
    for tag in ["html", "gzip", "disguised"] {
        let response = get(&proxy, &format!("manifests/{tag}"), ACCEPT_ALL).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{tag}");
    }
    assert_eq!(stored_files(&proxy.storage()), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_body_past_max_blob_size_is_cut_and_nothing_is_kept() {
    let big = vec![0u8; 2 * 1024 * 1024];
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        if request.path.contains("sha256:bb") {
            // Announces 2 MiB: refused before the body is read.
            answer(StatusCode::OK, "application/octet-stream", &[], big.clone())
        } else {
            endless()
        }
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "[cache]\nmax_blob_size = \"1MiB\"\n").await;

    let started = Instant::now();
    assert_blob_cut(
        &proxy,
        &upstream,
        &format!("sha256:{}", "a".repeat(64)),
        1024 * 1024,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(25));
    let response = get(&proxy, &format!("blobs/sha256:{}", "b".repeat(64)), "*/*").await;
    assert_eq!(
        response.status(),
        StatusCode::BAD_GATEWAY,
        "announced too large"
    );
    assert_eq!(stored_files(&proxy.storage()), Vec::<PathBuf>::new());
}

/// Pulls `digest`, which `upstream` serves without end, and checks that the body was cut at
/// `limit` bytes: the client never gets a complete body, the upstream is asked once (no
/// resume), the log names the limit, and nothing of the blob stays on disk.
async fn assert_blob_cut(proxy: &TestProxy, upstream: &Hostile, digest: &str, limit: u64) {
    // The cut may come before the response head is flushed: the connection then closes
    // without an answer, which is also "never completed".
    let response = client()
        .get(format!("{}/v2/app/blobs/{digest}", proxy.url()))
        .send()
        .await;
    let completed = match response {
        Ok(response) if response.status() == StatusCode::OK => {
            response.bytes().await.ok().map(|b| b.len())
        }
        _ => None,
    };
    assert_eq!(
        completed, None,
        "a body cut at {limit} bytes is never completed"
    );
    let hex = digest.trim_start_matches("sha256:");
    let kept = || {
        stored_files(&proxy.storage())
            .into_iter()
            .filter(|p| {
                p.starts_with(proxy.storage().join("tmp")) || p.to_string_lossy().contains(hex)
            })
            .collect::<Vec<_>>()
    };
    // The fill fails and its temp file goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kept().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kept(), Vec::<PathBuf>::new(), "nothing of the blob is kept");
    let gets = upstream
        .requests()
        .iter()
        .filter(|r| r.path.contains(digest))
        .count();
    assert_eq!(gets, 1, "the cut body is not resumed");
    let log = proxy.log();
    assert!(log.contains(&format!("more than {limit} bytes")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_to_non_public_addresses_are_refused() {
    // A "metadata endpoint" on loopback addresses other than the upstream's own.
    let metadata = Hostile::start("127.0.0.2:0", |_| {
        answer(StatusCode::OK, "text/plain", &[], "secret")
    })
    .await;
    let metadata_by_name = Hostile::start("127.0.0.1:0", |_| {
        answer(StatusCode::OK, "text/plain", &[], "secret")
    })
    .await;
    let (literal, by_name) = (
        format!("{}/latest/meta-data", metadata.url()),
        format!(
            "http://localhost:{}/latest/meta-data",
            metadata_by_name.port()
        ),
    );
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        if request.path.contains("sha256:aa") {
            redirect(&literal)
        } else if request.path.contains("sha256:bb") {
            redirect(&by_name)
        } else {
            redirect("ftp://127.0.0.1/file")
        }
    })
    .await;
    let url = upstream.url();

    let strict = proxy_for(&url, &["allow_private_redirects = false"], "").await;
    for letter in ["a", "b", "c"] {
        let response = get(
            &strict,
            &format!("blobs/sha256:{}", letter.repeat(64)),
            "*/*",
        )
        .await;
        assert_ne!(response.status(), StatusCode::OK, "redirect {letter}");
    }
    assert!(metadata.requests().is_empty(), "reached 127.0.0.2");
    assert!(metadata_by_name.requests().is_empty(), "reached localhost");

    // The same redirect is followed when the upstream itself lives on loopback (the default).
    // The metadata's bytes then fail verification: the client gets a body cut short, or no
    // answer at all when the check fails before the headers leave (a 6-byte body).
    let lenient = proxy_for(&url, &[], "").await;
    let attempt = client()
        .get(format!(
            "{}/v2/app/blobs/sha256:{}",
            lenient.url(),
            "a".repeat(64)
        ))
        .send()
        .await;
    if let Some(response) = attempt.ok().filter(|r| r.status() == StatusCode::OK) {
        assert!(
            response.bytes().await.is_err(),
            "wrong bytes arrived complete"
        );
    }
    assert_eq!(metadata.requests().len(), 1, "followed by default");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_realm_on_a_non_public_address_is_never_contacted() {
    // An "internal token service" on a loopback address other than the upstream's own, and
    // one reached by a name that resolves to loopback.
    let token = || {
        answer(
            StatusCode::OK,
            "application/json",
            &[],
            r#"{"token":"internal","expires_in":300}"#,
        )
    };
    let internal = Hostile::start("127.0.0.2:0", move |_| token()).await;
    let internal_by_name = Hostile::start("127.0.0.1:0", move |_| token()).await;
    let (literal, by_name) = (
        format!("{}/token", internal.url()),
        format!("http://localhost:{}/token", internal_by_name.port()),
    );
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        let realm = if request.path.contains("/by-name/") {
            &by_name
        } else {
            &literal
        };
        bearer_or_challenge(request, realm, || {
            answer(StatusCode::OK, OCI_MANIFEST, &[], oci_manifest())
        })
    })
    .await;
    let url = upstream.url();

    let strict = proxy_for(&url, &["allow_private_redirects = false"], "").await;
    for path in ["app/manifests/v1", "by-name/app/manifests/v1"] {
        let response = client()
            .get(format!("{}/v2/{path}", strict.url()))
            .header("accept", ACCEPT_ALL)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_ne!(
            response.status(),
            StatusCode::OK,
            "{path}: {}",
            strict.log()
        );
    }
    assert!(internal.requests().is_empty(), "reached 127.0.0.2");
    assert!(internal_by_name.requests().is_empty(), "reached localhost");
    let log = strict.log();
    assert!(
        log.contains("token realm to non-public address 127.0.0.2 refused"),
        "{log}"
    );
    let asked = upstream.requests();
    assert!(
        asked.iter().all(|r| r.authorization().is_none()),
        "no token from the internal realm reached the upstream: {asked:#?}"
    );

    // The same realm is asked when the upstream itself lives on loopback (the default).
    let lenient = proxy_for(&url, &[], "").await;
    let response = get(&lenient, "manifests/v1", ACCEPT_ALL).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", lenient.log());
    assert_eq!(internal.requests().len(), 1, "asked by default");
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_typed_as_html_are_not_served_as_html() {
    let upstream = Hostile::start("127.0.0.1:0", |_| {
        answer(
            StatusCode::OK,
            "text/html",
            &[],
            "<html><script>alert(document.domain)</script></html>",
        )
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "").await;
    for tail in ["tags/list", "manifests/v1"] {
        let response = get(&proxy, tail, ACCEPT_ALL).await;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            header("x-content-type-options").as_deref(),
            Some("nosniff"),
            "{tail}"
        );
        assert_ne!(
            header("content-type").as_deref(),
            Some("text/html"),
            "{tail}"
        );
    }
}

/// Set in the copy of this test binary that runs inside the private network namespace.
const IN_NETNS: &str = "REGCACHE_TEST_IN_NETNS";

/// Runs the named test of this binary again inside private network and mount namespaces
/// (`unshare`, as root or in a user namespace), where it may add addresses and rewrite
/// `/etc/hosts` without touching the machine. Returns false in that inner copy, which must
/// then run the test body.
fn rerun_in_private_network(test_name: &str) -> bool {
    if std::env::var_os(IN_NETNS).is_some() {
        return false;
    }
    common::require_tool("unshare");
    common::require_tool("ip");
    let exe = std::env::current_exe().expect("the test binary");
    let mut tried = Vec::new();
    for user_namespace in [false, true] {
        let mut command = std::process::Command::new("unshare");
        if user_namespace {
            command.args(["--user", "--map-root-user"]);
        }
        let output = command
            .args(["--net", "--mount", "--"])
            .arg(&exe)
            .arg(common::test_name(module_path!(), test_name))
            .args(["--exact", "--nocapture", "--test-threads=1"])
            .env(IN_NETNS, "1")
            .output()
            .expect("run unshare");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if output.status.success() && stdout.contains("1 passed") {
            return true;
        }
        // The inner test ran and failed: that is the answer.
        if stdout.contains("running 1 test") {
            panic!("inside the private network namespace:\n{stdout}\n{stderr}");
        }
        tried.push(format!("user namespace {user_namespace}: {stderr}"));
    }
    panic!("cannot make a private network namespace (needs root or user namespaces): {tried:#?}");
}

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_link_local_metadata_is_refused_in_a_private_network() {
    if rerun_in_private_network("redirect_to_link_local_metadata_is_refused_in_a_private_network") {
        return;
    }
    // Inside: the cloud metadata address and a public (documentation) address for the
    // upstream, both on this namespace's loopback device, and a name for the metadata address.
    run("ip", &["link", "set", "lo", "up"]);
    run("ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    run("ip", &["addr", "add", "198.51.100.1/32", "dev", "lo"]);
    let hosts = tempfile::NamedTempFile::new().expect("hosts file");
    std::fs::write(
        hosts.path(),
        "127.0.0.1 localhost\n169.254.169.254 metadata.test\n",
    )
    .expect("write hosts file");
    let hosts_path = hosts.path().to_str().expect("utf-8 temp path");
    run("mount", &["--bind", hosts_path, "/etc/hosts"]);

    let metadata = Hostile::start("169.254.169.254:0", |_| {
        answer(StatusCode::OK, "text/plain", &[], "secret")
    })
    .await;
    let (literal, by_name) = (
        format!("{}/latest/meta-data/", metadata.url()),
        format!("http://metadata.test:{}/latest/meta-data/", metadata.port()),
    );
    let upstream = Hostile::start("198.51.100.1:0", move |request| {
        if request.path.contains("sha256:aa") {
            redirect(&literal)
        } else {
            redirect(&by_name)
        }
    })
    .await;

    // The upstream lives on a public address: nothing private is reachable through it.
    let proxy = proxy_for(&upstream.url(), &[], "").await;
    for letter in ["a", "b"] {
        let response = get(
            &proxy,
            &format!("blobs/sha256:{}", letter.repeat(64)),
            "*/*",
        )
        .await;
        assert_ne!(response.status(), StatusCode::OK, "redirect {letter}");
    }
    assert!(upstream.requests().len() >= 2, "both blobs were asked for");
    assert!(
        metadata.requests().is_empty(),
        "the metadata endpoint was reached: {:#?}\n{}",
        metadata.requests(),
        proxy.log()
    );
    assert!(proxy.log().contains("non-public"), "{}", proxy.log());

    // Allowed, the same redirects reach it: the refusal above was the rule, not the network.
    let allowed = proxy_for(&upstream.url(), &["allow_private_redirects = true"], "").await;
    for letter in ["a", "b"] {
        // The bytes fetched are not the digest: the fill fails, and the 6-byte answer may be
        // cut before its head is written. Only the metadata endpoint's requests are checked.
        let answer = client()
            .get(format!(
                "{}/v2/app/blobs/sha256:{}",
                allowed.url(),
                letter.repeat(64)
            ))
            .send()
            .await;
        if let Ok(response) = answer {
            let _ = response.bytes().await;
        }
    }
    assert_eq!(metadata.requests().len(), 2, "{}", allowed.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_body_past_the_size_its_manifest_declared_is_cut() {
    let layer = format!("sha256:{}", "c".repeat(64));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":1000}}]}}"#,
        "0".repeat(64)
    );
    let upstream = Hostile::start("127.0.0.1:0", move |request| {
        if request.path.contains("/manifests/") {
            answer(StatusCode::OK, OCI_MANIFEST, &[], manifest.clone())
        } else {
            endless()
        }
    })
    .await;
    let proxy = proxy_for(&upstream.url(), &[], "").await;

    let response = get(&proxy, "manifests/v1", ACCEPT_ALL).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", proxy.log());
    assert_blob_cut(&proxy, &upstream, &layer, 1000).await;
}
