//! The front door: TLS (skopeo pulls over verified TLS, HTTP/2 by ALPN, a certificate reloaded
//! on `SIGHUP` while an old connection keeps working), time limits for silent, partial and
//! idle connections, and client authentication with per-repository grants (htpasswd, the token flow
//! with `skopeo --creds`, anonymous patterns, refusals that never reach the upstream, no
//! cross-repository blob reads).

use crate::common;

use std::time::{Duration, Instant};

use common::images;
use common::pki::Pki;
use common::proxy::{self, skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use rcgen::{CertificateParams, KeyPair};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The name regcache knows the test upstream by.
const UPSTREAM_NAME: &str = "registry.test";

/// Opens a TLS connection to the proxy; returns it with the certificate the server presented.
async fn tls_connect(
    pki: &Pki,
    proxy: &TestProxy,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .expect("a server certificate")
        .to_vec();
    (stream, presented)
}

/// Sends `GET path` on a kept-alive HTTP/1.1 connection; returns the status.
async fn raw_get<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "connection closed before a full response");
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() >= length {
            return head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("a status line");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_pulls_negotiates_http2_and_reloads_the_certificate_on_sighup() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "tls/app", "v1", "tls", &[4096, 1024]).await;
    let pki = Pki::new();
    let first_cert = pki.issue_server_cert();
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())],
        &pki.server_lines(),
        "",
        Some(pki.ca_path()),
    )
    .await;

    // skopeo, verifying the certificate against the test CA.
    let dest = tempfile::tempdir().expect("temp dir");
    let cert_dir = pki.cert_dir();
    let (ok, stderr) = skopeo_copy(
        &format!("{}/{}", proxy.addr(), image.reference),
        dest.path(),
        &[
            "--src-tls-verify=true",
            "--src-cert-dir",
            cert_dir.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(ok, "skopeo over TLS: {stderr}\n{}", proxy.log());
    verify_dir(dest.path(), &image.digest);

    // HTTP/2 when the client offers it by ALPN, HTTP/1.1 otherwise.
    let response = proxy
        .client()
        .get(format!("{}/v2/", proxy.url()))
        .send()
        .await
        .expect("GET /v2/ over TLS");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (mut old_connection, presented) = tls_connect(&pki, &proxy).await;
    assert_eq!(presented, first_cert);
    assert_eq!(raw_get(&mut old_connection, "/v2/").await, 200);

    // A new certificate, a SIGHUP: new handshakes get it, the open connection keeps working.
    let second_cert = pki.issue_server_cert();
    assert_ne!(first_cert, second_cert);
    assert_eq!(proxy.reload("tls").await, None);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, presented) = tls_connect(&pki, &proxy).await;
        if presented == second_cert {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served after SIGHUP; log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(raw_get(&mut old_connection, "/v2/").await, 200);

    // A broken file and a SIGHUP: the certificate in force stays.
    std::fs::write(pki.cert_path(), "not a certificate").expect("break the file");
    let error = proxy.reload("tls").await;
    assert!(error.is_some(), "a broken certificate file was reloaded");
    let (_, presented) = tls_connect(&pki, &proxy).await;
    assert_eq!(presented, second_cert);
}

/// Reads until the server closes the connection; returns how long that took.
async fn time_until_closed(mut stream: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer)).await {
            Err(_) => panic!("the connection was still open after 30 s"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_idle_connections_are_closed() {
    // The upstream is never contacted.
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(
            UPSTREAM_NAME,
            "http://127.0.0.1:9",
        )],
        "header_read_timeout = \"2s\"\nidle_timeout = \"4s\"\n",
        "",
        None,
    )
    .await;
    // Sends nothing at all.
    let silent = TcpStream::connect(proxy.addr()).await.expect("connect");
    // Sends the HTTP/2 preface and SETTINGS, then no request.
    let mut http2 = TcpStream::connect(proxy.addr()).await.expect("connect");
    http2
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("send the preface");
    // One request, then an idle keep-alive connection.
    let mut kept_alive = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(raw_get(&mut kept_alive, "/healthz").await, 200);
    let (silent, http2, kept_alive) = tokio::join!(
        time_until_closed(silent),
        time_until_closed(http2),
        time_until_closed(kept_alive),
    );
    // Generous upper bounds: the machine is loaded. The lower bounds show which limit applied.
    assert!(
        silent >= Duration::from_millis(1500) && silent < Duration::from_secs(20),
        "{silent:?}"
    );
    assert!(
        http2 >= Duration::from_millis(1500) && http2 < Duration::from_secs(20),
        "{http2:?}"
    );
    assert!(
        kept_alive >= Duration::from_millis(3500) && kept_alive < Duration::from_secs(20),
        "{kept_alive:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_heads_and_a_bare_http2_preface_close_at_the_header_timeout() {
    // The upstream is never contacted. The idle limit is long and the close grace is 5 s, so a
    // close near 2 s shows that `header_read_timeout` alone applied.
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(
            UPSTREAM_NAME,
            "http://127.0.0.1:9",
        )],
        "header_read_timeout = \"2s\"\nidle_timeout = \"60s\"\n",
        "",
        None,
    )
    .await;
    let connect_and_send = |bytes: &'static [u8]| {
        let addr = proxy.addr();
        async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(bytes).await.expect("send");
            stream
        }
    };
    let partial_head = connect_and_send(b"GET /v2/ HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ").await;
    let preface_only = connect_and_send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let preface_and_settings =
        connect_and_send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await;
    let closed = tokio::join!(
        time_until_closed(partial_head),
        time_until_closed(preface_only),
        time_until_closed(preface_and_settings),
    );
    for (what, took) in [
        ("partial head", closed.0),
        ("preface only", closed.1),
        ("preface and SETTINGS", closed.2),
    ] {
        // Without the grace: well under 2 s + 5 s, even on a loaded machine.
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_millis(5500),
            "{what}: closed after {took:?}\n{}",
            proxy.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_dropped_and_readers_are_not() {
    let upstream = Upstream::start(Auth::None).await;
    let image = images::push_oci_image(&upstream, "test/big", "v1", "stall", &[24 << 20]).await;
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())],
        "send_timeout = \"2s\"\n",
        "",
        None,
    )
    .await;
    // The layer: the largest blob, as the upstream reports it.
    let (layer, size) = images::largest_blob(&upstream, &image).await;

    // Asks for 24 MiB and reads nothing: more than loopback's socket buffers hold.
    let mut stalled = TcpStream::connect(proxy.addr()).await.expect("connect");
    let request = format!("GET /v2/test/big/blobs/{layer} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    stalled
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // What was buffered arrives, then the connection ends: it was dropped, not held.
    let mut received = 0u64;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buffer)).await {
            Err(_) => panic!(
                "the stalled connection was still open after 30 s ({received} bytes):\n{}",
                proxy.log()
            ),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received += n as u64,
        }
    }
    assert!(received < size, "received {received} of {size} bytes");
    assert!(
        proxy.log().contains("stopped taking its response"),
        "{}",
        proxy.log()
    );

    // A client that reads gets the whole layer, verified, from the same proxy.
    let response = common::http::client()
        .get(format!("{}/v2/test/big/blobs/{layer}", proxy.url()))
        .send()
        .await
        .expect("GET layer");
    assert_eq!(common::body_digest(response).await, (layer, size));
}

/// `user:bcrypt` lines (cost 4: the cheapest bcrypt, the same check).
fn htpasswd(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(user, password)| {
            format!(
                "{user}:{}\n",
                bcrypt::hash(password, 4).expect("bcrypt hash")
            )
        })
        .collect()
}

/// A proxy with `[auth]`: anyone pulls `public/*`, alice pulls `team/*`, root pulls all.
async fn auth_proxy(upstream: &Upstream, dir: &tempfile::TempDir) -> TestProxy {
    let htpasswd_path = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd_path,
        htpasswd(&[("alice", "alice-pw"), ("root", "root-pw")]),
    )
    .expect("write htpasswd");
    let auth = format!(
        "[auth]\nhtpasswd = \"{}\"\nanonymous = [\"{UPSTREAM_NAME}/public/*\"]\n\
         [[auth.grant]]\nusers = [\"alice\"]\npull = [\"{UPSTREAM_NAME}/team/*\"]\n\
         [[auth.grant]]\nusers = [\"root\"]\npull = [\"{UPSTREAM_NAME}/**\"]\n",
        htpasswd_path.display()
    );
    TestProxy::start(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())],
        &auth,
    )
    .await
}

/// `skopeo copy` through the proxy with `creds` (`user:password`) or none; whether it worked.
async fn skopeo_pull(proxy: &TestProxy, image: &images::Pushed, creds: Option<&str>) -> bool {
    match skopeo_try(proxy, None, image, creds).await {
        Ok(_) => true,
        Err(stderr) => {
            assert!(
                stderr.contains("unauthorized") || stderr.contains("denied"),
                "a refusal, not some other failure: {stderr}"
            );
            false
        }
    }
}

/// A token from the proxy's token endpoint for `user:password`.
async fn token(proxy: &TestProxy, user: &str, password: &str) -> String {
    let response = proxy
        .client()
        .get(format!("{}/auth/token?service=regcache", proxy.url()))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.expect("token body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("token JSON");
    body["token"].as_str().expect("a token").to_owned()
}

/// Status and OCI error code of an error response.
async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let (status, code, _) = common::http::oci_error(response).await;
    (status.as_u16(), code)
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_tokens_grants_and_anonymous_patterns_with_skopeo() {
    let upstream = Upstream::start(Auth::None).await;
    let team = images::push_oci_image(&upstream, "team/app", "v1", "team", &[2048]).await;
    let public = images::push_oci_image(&upstream, "public/base", "v1", "public", &[2048]).await;
    let secret = images::push_oci_image(&upstream, "other/secret", "v1", "secret", &[2048]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = auth_proxy(&upstream, &dir).await;

    // Granted: alice with `skopeo --creds` (the Bearer token flow), anyone for public/*.
    assert!(skopeo_pull(&proxy, &team, Some("alice:alice-pw")).await);
    assert!(skopeo_pull(&proxy, &public, None).await);

    // Refused: no credentials, a wrong password, a repository alice is not granted.
    assert!(!skopeo_pull(&proxy, &team, None).await);
    assert!(!skopeo_pull(&proxy, &team, Some("alice:wrong")).await);
    assert!(!skopeo_pull(&proxy, &secret, Some("alice:alice-pw")).await);
    let client = proxy.client();
    let manifest_url = format!("{}/v2/other/secret/manifests/v1", proxy.url());
    let anonymous = client.get(&manifest_url).send().await.expect("GET");
    let challenge = anonymous
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}/auth/token\",service=\"regcache\",scope=\"repository:other/secret:pull\"",
            proxy.url()
        )
    );
    assert_eq!(
        status_and_code(anonymous).await,
        (401, "UNAUTHORIZED".to_owned())
    );
    let alice = token(&proxy, "alice", "alice-pw").await;
    let denied = client
        .get(&manifest_url)
        .bearer_auth(&alice)
        .send()
        .await
        .expect("GET");
    assert_eq!(status_and_code(denied).await, (403, "DENIED".to_owned()));
    let basic_denied = client
        .get(&manifest_url)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        status_and_code(basic_denied).await,
        (403, "DENIED".to_owned())
    );
    // None of the refusals reached the upstream.
    assert_eq!(upstream.count(|e| e.path.contains("/other/secret/")), 0);

    // The status page and metrics need a signed-in user; probes stay open.
    let status = client.get(proxy.url()).send().await.expect("GET /");
    assert_eq!(status.status(), 401);
    let metrics = client
        .get(format!("{}/metrics", proxy.url()))
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(metrics.status(), 200);
    let health = client
        .get(format!("{}/healthz", proxy.url()))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);

    // SIGHUP re-reads htpasswd: alice is removed (her Basic credentials, remembered until now,
    // and her token stop working at once), bob is added.
    let team_url = format!("{}/v2/team/app/manifests/v1", proxy.url());
    std::fs::write(
        dir.path().join("htpasswd"),
        htpasswd(&[("bob", "bob-pw"), ("root", "root-pw")]),
    )
    .expect("rewrite htpasswd");
    assert_eq!(proxy.reload("htpasswd").await, None);
    let basic = client
        .get(&team_url)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        status_and_code(basic).await,
        (401, "UNAUTHORIZED".to_owned())
    );
    let old_token = client
        .get(&team_url)
        .bearer_auth(&alice)
        .send()
        .await
        .expect("GET");
    assert_eq!(
        status_and_code(old_token).await,
        (401, "UNAUTHORIZED".to_owned())
    );
    assert!(!skopeo_pull(&proxy, &team, Some("alice:alice-pw")).await);
    let bob_signs_in = || async {
        client
            .get(format!("{}/metrics", proxy.url()))
            .basic_auth("bob", Some("bob-pw"))
            .send()
            .await
            .expect("GET /metrics")
            .status()
    };
    assert_eq!(bob_signs_in().await, 200);
    // A file that does not parse keeps the users in force.
    std::fs::write(dir.path().join("htpasswd"), "bob:plaintext\n").expect("break htpasswd");
    let error = proxy.reload("htpasswd").await.unwrap_or_default();
    assert!(
        error.contains("htpasswd"),
        "a broken htpasswd was reloaded: {error:?}"
    );
    assert_eq!(bob_signs_in().await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_for_one_repository_does_not_read_another_by_digest() {
    let upstream = Upstream::start(Auth::None).await;
    let team = images::push_oci_image(&upstream, "team/app", "v1", "team", &[2048]).await;
    let sibling = images::push_oci_image(&upstream, "team/sibling", "v1", "sib", &[3072]).await;
    let secret = images::push_oci_image(&upstream, "other/secret", "v1", "secret", &[2048]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = auth_proxy(&upstream, &dir).await;
    // root caches the secret image; alice pulls hers.
    assert!(skopeo_pull(&proxy, &secret, Some("root:root-pw")).await);
    assert!(skopeo_pull(&proxy, &team, Some("alice:alice-pw")).await);
    let alice = token(&proxy, "alice", "alice-pw").await;
    let client = proxy.client();
    let get = |repo: &str, kind: &str, digest: &str| {
        client
            .get(format!("{}/v2/{repo}/{kind}/{digest}", proxy.url()))
            .bearer_auth(&alice)
            .send()
    };

    // The secret's cached layer and manifest, asked for under alice's repository: unknown there.
    for blob in &secret.blobs {
        let response = get("team/app", "blobs", blob).await.expect("GET blob");
        assert_eq!(
            status_and_code(response).await,
            (404, "BLOB_UNKNOWN".to_owned())
        );
    }
    let response = get("team/app", "manifests", &secret.digest)
        .await
        .expect("GET manifest");
    assert_eq!(
        status_and_code(response).await,
        (404, "MANIFEST_UNKNOWN".to_owned())
    );

    // Her own blobs are served; a blob of another granted repository whose manifest was never
    // pulled here is served once the upstream confirms it (a HEAD).
    for blob in &team.blobs {
        let response = get("team/app", "blobs", blob).await.expect("GET blob");
        assert_eq!(response.status(), 200, "{blob}");
    }
    let layer = sibling.blobs.last().expect("a layer");
    let response = get("team/sibling", "blobs", layer).await.expect("GET blob");
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.expect("blob bytes");
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
        *layer
    );
    assert_eq!(
        upstream.count(|e| e.method == "HEAD" && e.path.ends_with(&format!("/blobs/{layer}"))),
        1
    );
}

/// Pushes to `team/b:evil` a manifest whose (foreign, `urls`) layers name digests of `a` that
/// `team/b` does not have upstream: its layer and its manifest. Returns them.
async fn push_manifest_naming(upstream: &Upstream, a: &images::Pushed) -> Vec<String> {
    let (a_layer, a_layer_size) = images::largest_blob(upstream, a).await;
    let a_manifest = common::http::client()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            upstream.url(),
            a.repo,
            a.digest
        ))
        .header("accept", images::MT_OCI_MANIFEST)
        .send()
        .await
        .expect("GET A's manifest")
        .bytes()
        .await
        .expect("A's manifest bytes");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = images::push_raw_blob(upstream, "team/b", config).await;
    let foreign = |digest: &str, size: u64| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": digest,
            "size": size,
            "urls": ["http://127.0.0.1:9/elsewhere"],
        })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::MT_OCI_MANIFEST,
        "config": {
            "mediaType": images::MT_OCI_CONFIG,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [
            foreign(&a_layer, a_layer_size),
            foreign(&a.digest, a_manifest.len() as u64),
        ],
    })
    .to_string();
    images::push_raw_manifest(
        upstream,
        "team/b",
        "evil",
        images::MT_OCI_MANIFEST,
        manifest.as_bytes(),
    )
    .await;
    vec![a_layer, a.digest.clone()]
}

/// The status page as `user` sees it.
async fn status_page(proxy: &TestProxy, user: &str, password: &str) -> String {
    let response = proxy
        .client()
        .get(proxy.url())
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("GET /");
    assert_eq!(response.status(), 200);
    response.text().await.expect("status page")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_manifest_naming_another_repositorys_digests_reads_none_of_them() {
    let mut upstream = Upstream::start(Auth::None).await;
    let a = images::push_oci_image(&upstream, "other/a", "v1", "repo-a", &[4096]).await;
    let b = images::push_oci_image(&upstream, "team/b", "v1", "repo-b", &[2048]).await;
    let named = push_manifest_naming(&upstream, &a).await;
    // The upstream itself answers 404 for those reads under team/b.
    for digest in &named {
        let head = common::http::client()
            .head(format!("{}/v2/team/b/blobs/{digest}", upstream.url()))
            .send()
            .await
            .expect("HEAD upstream");
        assert_eq!(head.status(), 404, "{digest}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = auth_proxy(&upstream, &dir).await;
    // root caches A (its layer and manifest); alice, granted team/* only, pulls B.
    assert!(skopeo_pull(&proxy, &a, Some("root:root-pw")).await);
    assert!(skopeo_pull(&proxy, &b, Some("alice:alice-pw")).await);
    let client = proxy.client();
    let alice = token(&proxy, "alice", "alice-pw").await;
    let evil = client
        .get(format!("{}/v2/team/b/manifests/evil", proxy.url()))
        .header("accept", images::MT_OCI_MANIFEST)
        .bearer_auth(&alice)
        .send()
        .await
        .expect("GET the pushed manifest");
    assert_eq!(evil.status(), 200, "B's own manifest is served");

    let probe = |client: reqwest::Client, url: String, token: String| {
        let named = named.clone();
        async move {
            let mut answers = Vec::new();
            for digest in &named {
                for kind in ["blobs", "manifests"] {
                    let response = client
                        .get(format!("{url}/v2/team/b/{kind}/{digest}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .expect("GET");
                    let status = response.status().as_u16();
                    let bytes = response.bytes().await.expect("body");
                    answers.push((kind, digest.clone(), status, bytes));
                }
            }
            answers
        }
    };
    // Online: what the manifest names is unknown under team/b, as upstream says.
    for (kind, digest, status, body) in probe(proxy.client(), proxy.url(), alice.clone()).await {
        let code = if kind == "blobs" {
            "BLOB_UNKNOWN"
        } else {
            "MANIFEST_UNKNOWN"
        };
        assert_eq!(status, 404, "{kind} {digest}");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(code), "{kind} {digest}: {text}");
    }

    // The status page shows alice only what she may pull; root sees A too.
    let alices_page = status_page(&proxy, "alice", "alice-pw").await;
    assert!(alices_page.contains("team/b"), "{alices_page}");
    assert!(!alices_page.contains("other/a"), "{alices_page}");
    assert!(status_page(&proxy, "root", "root-pw")
        .await
        .contains("other/a"));

    // The upstream down: still never served (unknown, and the upstream cannot confirm it).
    upstream.stop().await;
    for (kind, digest, status, _) in probe(proxy.client(), proxy.url(), alice.clone()).await {
        assert!(
            status == 404 || status >= 500,
            "{kind} {digest}: {status}\n{}",
            proxy.log()
        );
    }

    // Offline, and restarted: 404; what the upstream confirmed for team/b before is served.
    proxy.edit_config(|text| text.replace("default = true\n", "default = true\noffline = true\n"));
    proxy.restart().await;
    let alice = token(&proxy, "alice", "alice-pw").await;
    for (kind, digest, status, _) in probe(proxy.client(), proxy.url(), alice.clone()).await {
        assert_eq!(status, 404, "{kind} {digest}\n{}", proxy.log());
    }
    for blob in &b.blobs {
        let response = proxy
            .client()
            .get(format!("{}/v2/team/b/blobs/{blob}", proxy.url()))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("GET blob");
        assert_eq!(response.status(), 200, "{blob}\n{}", proxy.log());
    }
    let by_digest = images::Pushed {
        reference: format!("{}@{}", b.repo, b.digest),
        ..b.clone()
    };
    assert!(
        skopeo_pull(&proxy, &by_digest, Some("alice:alice-pw")).await,
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(
            UPSTREAM_NAME,
            "http://127.0.0.1:9",
        )],
        "rate_limit = 5\n",
        "",
        None,
    )
    .await;
    // Let the budget used by the start-up probe refill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = proxy.client();
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..20 {
        let response = client
            .get(format!("{}/v2/", proxy.url()))
            .send()
            .await
            .expect("GET /v2/");
        statuses.push(response.status().as_u16());
        if response.status() == 429 && refusal.is_none() {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            refusal = Some((retry_after, status_and_code(response).await));
        }
    }
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    // A burst of 5, plus what refills while the loop runs on a loaded machine.
    assert!((5..20).contains(&allowed), "{statuses:?}");
    let (retry_after, error) = refusal.expect("some requests were refused");
    assert_eq!(error, (429, "TOOMANYREQUESTS".to_owned()));
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let pki = Pki::new();
    pki.issue_server_cert();
    let client_ca = Pki::new();
    let server_lines = format!(
        "{}tls_client_ca = \"{}\"\n",
        pki.server_lines(),
        client_ca.ca_path().display()
    );
    // The harness's readiness probe has no client certificate: start it by hand.
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = proxy::bind_local();
    let port = proxy::local_addr(&listener).port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{server_lines}[storage]\npath = \"{}\"\n\
         [[upstream]]\nname = \"{UPSTREAM_NAME}\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
        dir.path().join("data").display()
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).expect("write config");
    let log_path = dir.path().join("regcache.log");
    let log = std::fs::File::create(&log_path).expect("create the log");
    let _child = proxy::activated_regcache(&[("http", &listener)])
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("NO_COLOR", "1")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn regcache");

    let client_key = KeyPair::generate().expect("client key");
    let client_cert = CertificateParams::new(vec!["client.test".to_owned()])
        .expect("client params")
        .signed_by(&client_key, &client_ca.ca)
        .expect("client cert");
    let identity = reqwest::Identity::from_pem(
        format!("{}{}", client_cert.pem(), client_key.serialize_pem()).as_bytes(),
    )
    .expect("client identity");
    let ca = reqwest::Certificate::from_pem(pki.ca.pem().as_bytes()).expect("server CA");
    let with_cert = reqwest::Client::builder()
        .tls_certs_only([ca.clone()])
        .identity(identity)
        .build()
        .expect("client");
    let without_cert = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client");
    let url = format!("https://127.0.0.1:{port}/v2/");
    // The socket listens already: the request waits in its backlog until regcache accepts it.
    let response = with_cert
        .get(&url)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap_or_else(|err| {
            panic!(
                "no answer with a client certificate: {err}; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
    assert_eq!(response.status(), 200);
    assert!(without_cert.get(&url).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_pulls_by_digest_work_after_a_restart_and_stay_within_the_grant() {
    let upstream = Upstream::start(Auth::None).await;
    let team = images::push_oci_image(&upstream, "team/app", "v1", "team", &[2048]).await;
    let secret = images::push_oci_image(&upstream, "other/secret", "v1", "secret", &[2048]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = auth_proxy(&upstream, &dir).await;
    assert!(skopeo_pull(&proxy, &secret, Some("root:root-pw")).await);
    assert!(skopeo_pull(&proxy, &team, Some("alice:alice-pw")).await);
    // Offline, and restarted: nothing in memory says what belongs where.
    proxy.edit_config(|text| text.replace("default = true\n", "default = true\noffline = true\n"));
    proxy.restart().await;

    let by_digest = images::Pushed {
        reference: format!("{}@{}", team.repo, team.digest),
        ..team.clone()
    };
    assert!(
        skopeo_pull(&proxy, &by_digest, Some("alice:alice-pw")).await,
        "{}",
        proxy.log()
    );
    let alice = token(&proxy, "alice", "alice-pw").await;
    for blob in &secret.blobs {
        let response = proxy
            .client()
            .get(format!("{}/v2/team/app/blobs/{blob}", proxy.url()))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("GET blob");
        assert_eq!(status_and_code(response).await.0, 404);
    }
}

/// `skopeo copy` through the proxy (over TLS verified against `pki` when given) with `creds`
/// (`user:password`) or none: the verified copy when it worked, else skopeo's error.
async fn skopeo_try(
    proxy: &TestProxy,
    pki: Option<&Pki>,
    image: &images::Pushed,
    creds: Option<&str>,
) -> Result<tempfile::TempDir, String> {
    let dest = tempfile::tempdir().expect("temp dir");
    let mut extra = Vec::new();
    if let Some(pki) = pki {
        let cert_dir = pki.cert_dir();
        extra.extend([
            "--src-tls-verify=true".to_owned(),
            "--src-cert-dir".to_owned(),
            cert_dir.to_str().expect("utf-8 path").to_owned(),
        ]);
    }
    extra.extend(creds.map(|c| format!("--src-creds={c}")));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (ok, stderr) = skopeo_copy(
        &format!("{}/{}", proxy.addr(), image.reference),
        dest.path(),
        &extra,
    )
    .await;
    if ok {
        verify_dir(dest.path(), &image.digest);
        Ok(dest)
    } else {
        Err(stderr)
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    common::files_under(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_the_upstream_decides_who_reads_what_and_bytes_are_fetched_once() {
    use common::upstream::TokenReader;
    let reader = |user: &str, prefix: &str| TokenReader {
        user: user.to_owned(),
        password: format!("{user}-Pw-7f3a9c"),
        pull: vec![prefix.to_owned()],
    };
    let mut upstream = Upstream::start(Auth::token_readers(vec![
        reader("alice", "team-a/"),
        reader("carol", "team-a/"),
        reader("bob", "team-b/"),
    ]))
    .await;
    let team_a = images::push_oci_image(&upstream, "team-a/app", "v1", "ta", &[8192, 2048]).await;
    let team_b = images::push_oci_image(&upstream, "team-b/app", "v1", "tb", &[4096]).await;
    let pki = Pki::new();
    pki.issue_server_cert();
    let proxy = TestProxy::start_with_server(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &upstream.url())
            .with("credentials = \"client\"")
            .with("client_auth_ttl = \"1s\"")
            .with("client_auth_offline_grace = \"1h\"")],
        &pki.server_lines(),
        "",
        Some(pki.ca_path()),
    )
    .await;
    let alice = "alice:alice-Pw-7f3a9c";

    // alice pulls team-a with her own credentials (the token flow, over TLS).
    skopeo_try(&proxy, Some(&pki), &team_a, Some(alice))
        .await
        .unwrap_or_else(|err| panic!("alice pulls team-a: {err}\n{}", proxy.log()));
    // carol too: the bytes are shared, each blob came from the upstream once.
    skopeo_try(&proxy, Some(&pki), &team_a, Some("carol:carol-Pw-7f3a9c"))
        .await
        .unwrap_or_else(|err| panic!("carol pulls team-a: {err}\n{}", proxy.log()));
    for blob in &team_a.blobs {
        assert_eq!(upstream.blob_gets(blob), 1, "{blob} fetched once");
    }

    // bob is refused team-a, cached as it is, and pulls team-b.
    let refused = skopeo_try(&proxy, Some(&pki), &team_a, Some("bob:bob-Pw-7f3a9c"))
        .await
        .expect_err("bob may not read team-a");
    assert!(refused.contains("unauthorized"), "{refused}");
    skopeo_try(&proxy, Some(&pki), &team_b, Some("bob:bob-Pw-7f3a9c"))
        .await
        .unwrap_or_else(|err| panic!("bob pulls team-b: {err}\n{}", proxy.log()));
    // Not a byte of team-a for bob: its manifest and a blob straight, and the blob through
    // team-b, which bob may read (it does not belong there).
    let bob = token(&proxy, "bob", "bob-Pw-7f3a9c").await;
    let client = proxy.client();
    let get = |path: String| {
        client
            .get(format!("{}{path}", proxy.url()))
            .bearer_auth(&bob)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
    };
    let answer = get(format!("/v2/team-a/app/manifests/{}", team_a.digest))
        .await
        .expect("bob asks for team-a's manifest");
    assert!(answer.headers().contains_key("www-authenticate"));
    let (status, code, message) = common::http::oci_error(answer).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (401, "UNAUTHORIZED"),
        "{message}"
    );
    let layer = &team_a.blobs[0];
    let answer = get(format!("/v2/team-a/app/blobs/{layer}"))
        .await
        .expect("bob asks for team-a's blob");
    assert_eq!(answer.status(), 401);
    let answer = get(format!("/v2/team-b/app/blobs/{layer}"))
        .await
        .expect("bob asks for team-a's blob under team-b");
    let (status, code, _) = common::http::oci_error(answer).await;
    assert_eq!((status.as_u16(), code.as_str()), (404, "BLOB_UNKNOWN"));

    // A wrong password: no token, no pull; anonymous clients get what the upstream gives them
    // (nothing here).
    let wrong = proxy
        .client()
        .get(format!("{}/auth/token?service=regcache", proxy.url()))
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .expect("token request");
    assert_eq!(wrong.status(), 401);
    assert!(skopeo_try(&proxy, Some(&pki), &team_a, Some("alice:wrong"))
        .await
        .is_err());
    assert!(skopeo_try(&proxy, Some(&pki), &team_a, None).await.is_err());

    // The upstream goes away: alice is served within the grace, bob never, and alice only
    // what the upstream confirmed for her.
    upstream.stop().await;
    // Past client_auth_ttl (1s): the upstream would be asked again, and cannot be.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    skopeo_try(&proxy, Some(&pki), &team_a, Some(alice))
        .await
        .unwrap_or_else(|err| panic!("alice within the grace: {err}\n{}", proxy.log()));
    let refused = skopeo_try(&proxy, Some(&pki), &team_a, Some("bob:bob-Pw-7f3a9c"))
        .await
        .expect_err("bob is not served team-a offline either");
    assert!(!refused.is_empty());
    let alice_token = token(&proxy, "alice", "alice-Pw-7f3a9c").await;
    let answer = client
        .get(format!("{}/v2/team-b/app/manifests/v1", proxy.url()))
        .bearer_auth(&alice_token)
        .send()
        .await
        .expect("alice asks for team-b offline");
    let (status, code, message) = common::http::oci_error(answer).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (503, "UNAVAILABLE"),
        "{message}"
    );
    assert!(message.contains("client_auth_offline_grace"), "{message}");

    // Counted, and alice's password is nowhere: not in the log, the metrics or the store.
    let metrics = proxy.metrics_text().await;
    for result in ["confirmed", "refused", "grace", "unconfirmed"] {
        let line = format!(
            "regcache_client_access_total{{result=\"{result}\",upstream=\"{UPSTREAM_NAME}\"}}"
        );
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(count > 0, "{line} counted:\n{metrics}");
    }
    let password = b"alice-Pw-7f3a9c";
    assert!(
        !proxy.log().contains("alice-Pw-7f3a9c"),
        "password in the log"
    );
    assert!(
        !metrics.contains("alice-Pw-7f3a9c"),
        "password in the metrics"
    );
    assert_eq!(
        files_containing(&proxy.storage(), password),
        Vec::<std::path::PathBuf>::new()
    );
}
