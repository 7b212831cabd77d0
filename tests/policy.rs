//! Signature policy at the edge (`[[policy]]`): images signed with cosign's formats by keys
//! made in the test are served, unsigned, wrongly signed and misnamed ones are refused with
//! `403 DENIED` naming the reason, an index's platform images ride on its signature, keys
//! reload on `SIGHUP`, `prefetch`/`export` refuse what the policy refuses, and signatures
//! travel with `export --referrers` so an air-gapped site verifies offline. The sigstore
//! project's own verifier (the `sigstore` crate) reads the signatures through regcache, online
//! and offline, and agrees with it.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::cosign;
use common::images::{self, Pushed};
use common::proxy::{run_regcache, skopeo_copy, verify_dir, TestProxy, UpstreamSpec};
use common::upstream::{Auth, Upstream};
use sigstore::cosign::verification_constraint::{PublicKeyVerifier, VerificationConstraintVec};
use sigstore::cosign::{verify_constraints, ClientBuilder, CosignCapabilities as _};
use sigstore::crypto::SigningScheme;
use sigstore::registry::{Auth as RegistryAuth, ClientConfig, ClientProtocol, OciReference};

/// The name regcache knows the test upstream by.
const UPSTREAM_NAME: &str = "registry.test";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The policy of these tests: `org/exempt/**` exempt, the rest of `org/**` signed by `key`.
fn policy_toml(key: &Path) -> String {
    format!(
        "[[policy]]\nrepositories = [\"{UPSTREAM_NAME}/org/exempt/**\"]\nrequire = \"none\"\n\
         [[policy]]\nrepositories = [\"{UPSTREAM_NAME}/org/**\"]\nrequire = \"cosign\"\nkeys = [\"{}\"]\n",
        key.display()
    )
}

/// The status and OCI error message of `GET /v2/<repo>/manifests/<reference>`.
async fn manifest_status(proxy: &TestProxy, repo: &str, reference: &str) -> (u16, String) {
    let response = proxy
        .client()
        .get(format!("{}/v2/{repo}/manifests/{reference}", proxy.url()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .expect("manifest request");
    let status = response.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    let (_, code, message) = common::http::oci_error(response).await;
    assert_eq!(code, "DENIED", "{message}");
    (status, message)
}

/// What a signature by another key (or over another payload) is refused with.
const BAD_SIGNATURE: &str = "signature does not verify with the configured keys";

/// skopeo pulls each of `images` whole through `proxy`, digests checked.
async fn assert_served(proxy: &TestProxy, images: &[&Pushed]) {
    for image in images {
        skopeo_pull(proxy, image)
            .await
            .unwrap_or_else(|err| panic!("{}: {err}\n{}", image.reference, proxy.log()));
    }
}

/// A `GET` of `image`'s tag through `proxy` is `403 DENIED` naming `reason`.
async fn assert_refused(proxy: &TestProxy, image: &Pushed, reason: &str) {
    let (status, message) = manifest_status(proxy, &image.repo, "v1").await;
    assert_eq!(status, 403, "{}", image.reference);
    assert!(message.contains(reason), "{}: {message}", image.reference);
}

/// `skopeo copy --all` of `image` through the proxy; the error when it fails.
async fn skopeo_pull(proxy: &TestProxy, image: &Pushed) -> Result<(), String> {
    let dest = tempfile::tempdir().expect("temp dir");
    let (ok, stderr) = skopeo_copy(
        &format!("{}/{}", proxy.addr(), image.reference),
        dest.path(),
        &[],
    )
    .await;
    if ok {
        verify_dir(dest.path(), &image.digest);
        Ok(())
    } else {
        Err(stderr)
    }
}

/// Whether the sigstore crate's cosign verifier, reading from the registry at `addr` (plain
/// HTTP), finds a signature of `image` by the key in `key_pem`.
async fn sigstore_verifies(addr: &str, image: &Pushed, key_pem: &[u8]) -> Result<(), String> {
    let mut client = ClientBuilder::default()
        .with_oci_client_config(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        })
        .build()
        .map_err(|e| format!("sigstore client: {e}"))?;
    let reference: OciReference = format!("{addr}/{}", image.reference)
        .parse()
        .map_err(|e| format!("reference: {e:?}"))?;
    let layers = client
        .trusted_signature_layers(&RegistryAuth::Anonymous, &reference)
        .await
        .map_err(|e| format!("signature layers: {e}"))?;
    let verifier = PublicKeyVerifier::new(key_pem, &SigningScheme::ECDSA_P256_SHA256_ASN1)
        .map_err(|e| format!("key: {e}"))?;
    let constraints: VerificationConstraintVec = vec![Box::new(verifier)];
    verify_constraints(&layers, constraints.iter()).map_err(|e| format!("constraints: {e:?}"))
}

/// The value of a `regcache_policy_decisions_total` series.
fn decisions(metrics: &str, result: &str, reason: &str) -> u64 {
    let series =
        format!("regcache_policy_decisions_total{{reason=\"{reason}\",result=\"{result}\"}}");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

struct Signed {
    upstream: Upstream,
    key_pem: Vec<u8>,
    signed: Pushed,
    multi: Pushed,
    referred: Pushed,
    unsigned: Pushed,
    forged: Pushed,
    misnamed: Pushed,
    tampered: Pushed,
    exempt: Pushed,
}

/// An upstream with images signed every way (and not).
async fn signed_upstream() -> (Signed, rcgen::KeyPair, rcgen::KeyPair) {
    let upstream = Upstream::start(Auth::None).await;
    let key = cosign::p256_key();
    let rogue = cosign::p256_key();
    let push = |repo: &'static str, seed: &'static str| {
        let upstream = &upstream;
        async move { images::push_oci_image(upstream, repo, "v1", seed, &[4096, 1024]).await }
    };
    let signed = push("org/signed", "signed").await;
    cosign::sign_with_tag(
        &upstream,
        &signed.repo,
        &signed.digest,
        &signed.digest,
        &key,
    )
    .await;
    let multi = images::push_multiarch_oci(&upstream, "org/multi", "multi").await;
    cosign::sign_with_tag(&upstream, &multi.repo, &multi.digest, &multi.digest, &key).await;
    let referred = push("org/referred", "referred").await;
    let size = upstream
        .client()
        .get_manifest(&referred.repo, &referred.digest)
        .await
        .expect("referred manifest")
        .bytes
        .len();
    cosign::sign_with_referrer(
        &upstream,
        &referred.repo,
        &referred.digest,
        &referred.media_type,
        size,
        &key,
    )
    .await;
    let unsigned = push("org/unsigned", "unsigned").await;
    let forged = push("org/forged", "forged").await;
    cosign::sign_with_tag(
        &upstream,
        &forged.repo,
        &forged.digest,
        &forged.digest,
        &rogue,
    )
    .await;
    let misnamed = push("org/misnamed", "misnamed").await;
    cosign::sign_with_tag(
        &upstream,
        &misnamed.repo,
        &misnamed.digest,
        &signed.digest,
        &key,
    )
    .await;
    let tampered = push("org/tampered", "tampered").await;
    cosign::sign_tampered(&upstream, &tampered.repo, &tampered.digest, &key).await;
    let exempt = push("org/exempt/tool", "exempt").await;
    let key_pem = key.public_key_pem().into_bytes();
    (
        Signed {
            upstream,
            key_pem,
            signed,
            multi,
            referred,
            unsigned,
            forged,
            misnamed,
            tampered,
            exempt,
        },
        key,
        rogue,
    )
}

/// A proxy of `set`'s upstream under [`policy_toml`], its key written in `dir`; with the key
/// file's path.
async fn connected_proxy(set: &Signed, dir: &Path) -> (TestProxy, PathBuf) {
    let key_path = dir.join("release.pub");
    std::fs::write(&key_path, &set.key_pem).expect("write the key");
    let proxy = TestProxy::start(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, &set.upstream.url())],
        &policy_toml(&key_path),
    )
    .await;
    (proxy, key_path)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_images_signed_by_trusted_keys_are_served_and_a_real_verifier_agrees() {
    let (set, _key, rogue) = signed_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy, key_path) = connected_proxy(&set, dir.path()).await;

    // Served: signed by tag, by referrer, an index signed as a whole (its platform images with
    // it), and an exempt repository.
    assert_served(
        &proxy,
        &[&set.signed, &set.referred, &set.multi, &set.exempt],
    )
    .await;
    // Refused, with the reason in the words scripts match.
    for (image, reason) in [
        (&set.unsigned, "no signature"),
        (&set.forged, BAD_SIGNATURE),
        (&set.misnamed, "payload names another digest"),
        (&set.tampered, BAD_SIGNATURE),
    ] {
        assert_refused(&proxy, image, reason).await;
        let (status, _) = manifest_status(&proxy, &image.repo, &image.digest).await;
        assert_eq!(status, 403, "{} by digest", image.reference);
        let refused = skopeo_pull(&proxy, image)
            .await
            .expect_err("skopeo is refused");
        assert!(refused.contains("denied"), "{refused}");
    }

    // The sigstore project's verifier agrees: straight from the upstream it accepts what
    // regcache serves and rejects what regcache refuses, and through regcache it finds the
    // signatures of what regcache serves and verifies them with the key.
    let upstream_addr = set.upstream.addr();
    for image in [&set.signed, &set.multi] {
        sigstore_verifies(&upstream_addr, image, &set.key_pem)
            .await
            .unwrap_or_else(|err| panic!("sigstore, {} upstream: {err}", image.reference));
        sigstore_verifies(&proxy.addr(), image, &set.key_pem)
            .await
            .unwrap_or_else(|err| panic!("sigstore, {} through regcache: {err}", image.reference));
    }
    // The signatures themselves are served without a requirement of their own: a verifier
    // must be able to fetch them (the `.sig` tag, the referrers tag-schema index).
    let sig_tag = format!("{}.sig", set.signed.digest.replace(':', "-"));
    assert_eq!(
        manifest_status(&proxy, &set.signed.repo, &sig_tag).await.0,
        200
    );
    let referrers_tag = set.referred.digest.replace(':', "-");
    assert_eq!(
        manifest_status(&proxy, &set.referred.repo, &referrers_tag)
            .await
            .0,
        200
    );
    for image in [&set.unsigned, &set.forged, &set.misnamed, &set.tampered] {
        for addr in [&upstream_addr, &proxy.addr()] {
            assert!(
                sigstore_verifies(addr, image, &set.key_pem).await.is_err(),
                "sigstore accepts {} from {addr}",
                image.reference
            );
        }
    }

    // Seen: metrics, the status page, the log.
    let metrics = proxy.metrics_text().await;
    assert!(decisions(&metrics, "verified", "none") >= 3, "{metrics}");
    assert!(decisions(&metrics, "exempt", "none") >= 1);
    for reason in ["no_signature", "bad_signature", "other_digest"] {
        assert!(decisions(&metrics, "refused", reason) >= 1, "{reason}");
    }
    let page = common::http::get_text(&format!("{}/", proxy.url())).await;
    assert!(page.contains("Signature policy refusals"), "{page}");
    assert!(
        page.contains(&format!("org/unsigned@{}", set.unsigned.digest)),
        "{page}"
    );
    assert!(proxy.log().contains("signature policy refuses this image"));

    // prefetch refuses what the policy refuses; --allow-unsigned takes it with a warning.
    let config = proxy.config_path();
    let unsigned_ref = format!("{UPSTREAM_NAME}/{}", set.unsigned.reference);
    let refused = run_regcache(&["prefetch", &unsigned_ref], config).await;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("no signature"),
        "{}",
        text(&refused)
    );
    let allowed = run_regcache(&["prefetch", "--allow-unsigned", &unsigned_ref], config).await;
    assert!(allowed.status.success(), "{}", text(&allowed));

    // New keys on SIGHUP: what the old key signed is refused, what the new one signed served.
    std::fs::write(&key_path, rogue.public_key_pem()).expect("swap the key");
    assert_eq!(proxy.reload("policy_keys").await, None);
    assert_refused(&proxy, &set.signed, BAD_SIGNATURE).await;
    assert_eq!(manifest_status(&proxy, &set.forged.repo, "v1").await.0, 200);

    // check-config reads every key and names one it cannot use.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
    std::fs::write(&key_path, p384.public_key_pem()).expect("write a P-384 key");
    let checked = run_regcache(&["check-config"], config).await;
    assert_eq!(checked.status.code(), Some(64), "{}", text(&checked));
    assert!(
        text(&checked).contains("unsupported key type"),
        "{}",
        text(&checked)
    );
    assert!(
        text(&checked).contains("policy[2].keys"),
        "{}",
        text(&checked)
    );
    // The same key on SIGHUP: refused, and the keys in force stay (the new one's signature
    // still served, the old one's still refused).
    let error = proxy.reload("policy_keys").await.unwrap_or_default();
    assert!(error.contains("unsupported key type"), "{error:?}");
    assert_refused(&proxy, &set.signed, BAD_SIGNATURE).await;
    assert_eq!(manifest_status(&proxy, &set.forged.repo, "v1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_travel_with_the_export_and_verify_at_an_air_gapped_site() {
    let (set, _key, _rogue) = signed_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (connected, key_path) = connected_proxy(&set, dir.path()).await;
    let config = connected.config_path().to_owned();
    let full = |image: &Pushed| format!("{UPSTREAM_NAME}/{}", image.reference);
    let signed_refs = [full(&set.signed), full(&set.multi), full(&set.referred)];
    let mut prefetch = vec!["prefetch", "--referrers"];
    prefetch.extend(signed_refs.iter().map(String::as_str));
    let output = run_regcache(&prefetch, &config).await;
    assert!(output.status.success(), "{}", text(&output));
    // An unsigned and a forged image cached anyway (an operator's --allow-unsigned).
    let unsigned = full(&set.unsigned);
    let forged = full(&set.forged);
    let output = run_regcache(
        &[
            "prefetch",
            "--referrers",
            "--allow-unsigned",
            &unsigned,
            &forged,
        ],
        &config,
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let mut connected = connected;
    assert!(connected.stop().await);

    // export refuses an image the policy refuses: a site never carries what it will not serve.
    let archive = dir.path().join("site.tar");
    let archive_arg = archive.to_str().expect("utf-8").to_owned();
    let refused = run_regcache(
        &["export", "--referrers", "-o", &archive_arg, &unsigned],
        &config,
    )
    .await;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("no signature"),
        "{}",
        text(&refused)
    );
    // With --allow-unsigned the refused ones travel too (with a warning), to show the site
    // judges them exactly as the connected side does.
    let mut export = vec![
        "export",
        "--referrers",
        "--allow-unsigned",
        "-o",
        &archive_arg,
        &unsigned,
        &forged,
    ];
    export.extend(signed_refs.iter().map(String::as_str));
    let output = run_regcache(&export, &config).await;
    assert!(output.status.success(), "{}", text(&output));

    // The site: no upstream at all, the same policy, the archive imported.
    let site = TestProxy::start(
        &[UpstreamSpec::default_at(UPSTREAM_NAME, "http://127.0.0.1:9").with("offline = true")],
        &policy_toml(&key_path),
    )
    .await;
    let output = run_regcache(&["import", &archive_arg], site.config_path()).await;
    assert!(output.status.success(), "{}", text(&output));
    assert_served(&site, &[&set.signed, &set.multi, &set.referred]).await;
    assert_refused(&site, &set.unsigned, "no signature").await;
    assert_refused(&site, &set.forged, BAD_SIGNATURE).await;
    for image in [&set.signed, &set.multi] {
        sigstore_verifies(&site.addr(), image, &set.key_pem)
            .await
            .unwrap_or_else(|err| panic!("sigstore, offline {}: {err}", image.reference));
    }
    for image in [&set.unsigned, &set.forged] {
        assert!(
            sigstore_verifies(&site.addr(), image, &set.key_pem)
                .await
                .is_err(),
            "sigstore accepts {} offline",
            image.reference
        );
    }
    let metrics = site.metrics_text().await;
    assert!(decisions(&metrics, "verified", "none") >= 3, "{metrics}");
    assert!(
        decisions(&metrics, "refused", "bad_signature") >= 1,
        "{metrics}"
    );
}
