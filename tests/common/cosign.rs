//! cosign-format signatures for test images, made with keys generated in the test (`rcgen`,
//! the crypto already in the tree; no cosign binary is packaged): the simple-signing payload
//! as a blob, its signature in the layer annotation `dev.cosignproject.cosign/signature`,
//! pushed either as cosign's `sha256-<hex>.sig` tag or as an OCI 1.1 referrer (artifact type
//! `application/vnd.dev.cosign.artifact.sig.v1+json`, listed in the referrers tag-schema index
//! `sha256-<hex>`, since Distribution 2.8 has no referrers API).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{KeyPair, SigningKey as _};
use sha2::{Digest as _, Sha256};

use super::images::{push_raw_blob, push_raw_manifest};
use super::upstream::Upstream;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The artifact type of cosign signatures stored as referrers.
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// A new ECDSA P-256 key (cosign's default kind).
pub fn p256_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key")
}

/// A new Ed25519 key.
pub fn ed25519_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("generate an Ed25519 key")
}

/// cosign's simple-signing payload for `digest` under `reference` (`host/repo`).
pub fn payload(digest: &str, reference: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    }))
    .expect("payload JSON")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pushes a signature manifest for `repo` whose payload names `named` (normally the image's
/// own digest) and `reference`, signed by `key`; `subject` (digest, media type, size) makes it
/// an OCI 1.1 referrer; `tampered` changes the payload blob after signing (one byte more).
/// Returns the manifest's bytes.
async fn push_signature_manifest(
    upstream: &Upstream,
    repo: &str,
    named: &str,
    reference: &str,
    key: &KeyPair,
    subject: Option<(&str, &str, usize)>,
    tampered: bool,
) -> Vec<u8> {
    let mut payload = payload(named, reference);
    let signature = key.sign(&payload).expect("sign the payload");
    if tampered {
        payload.push(b' ');
    }
    let payload_digest = push_raw_blob(upstream, repo, &payload).await;
    let config = br#"{"architecture":"","config":{},"created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_raw_blob(upstream, repo, config).await;
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "size": payload.len(),
            "digest": payload_digest,
            "annotations": {"dev.cosignproject.cosign/signature": STANDARD.encode(signature)},
        }],
    });
    if let Some((digest, media_type, size)) = subject {
        manifest["artifactType"] = SIGNATURE_ARTIFACT.into();
        manifest["subject"] =
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
    }
    serde_json::to_vec(&manifest).expect("manifest JSON")
}

/// Signs `digest` of `repo` with `key` as `cosign sign` does: the `sha256-<hex>.sig` tag.
/// The payload names `named` (pass `digest` for an honest signature).
pub async fn sign_with_tag(
    upstream: &Upstream,
    repo: &str,
    digest: &str,
    named: &str,
    key: &KeyPair,
) {
    push_sig_tag(upstream, repo, digest, named, key, false).await;
}

/// [`sign_with_tag`], the payload blob changed after signing.
pub async fn sign_tampered(upstream: &Upstream, repo: &str, digest: &str, key: &KeyPair) {
    push_sig_tag(upstream, repo, digest, digest, key, true).await;
}

async fn push_sig_tag(
    upstream: &Upstream,
    repo: &str,
    digest: &str,
    named: &str,
    key: &KeyPair,
    tampered: bool,
) {
    let reference = format!("{}/{repo}", upstream.addr());
    let manifest =
        push_signature_manifest(upstream, repo, named, &reference, key, None, tampered).await;
    let tag = format!("{}.sig", digest.replace(':', "-"));
    push_raw_manifest(upstream, repo, &tag, OCI_MANIFEST, &manifest).await;
}

/// Signs `digest` (a manifest of `media_type`, `size` bytes) of `repo` with `key` as an OCI
/// 1.1 referrer, listed in the tag-schema index `sha256-<hex>`.
pub async fn sign_with_referrer(
    upstream: &Upstream,
    repo: &str,
    digest: &str,
    media_type: &str,
    size: usize,
    key: &KeyPair,
) {
    let reference = format!("{}/{repo}", upstream.addr());
    let manifest = push_signature_manifest(
        upstream,
        repo,
        digest,
        &reference,
        key,
        Some((digest, media_type, size)),
        false,
    )
    .await;
    let manifest_digest = sha256(&manifest);
    push_raw_manifest(upstream, repo, &manifest_digest, OCI_MANIFEST, &manifest).await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "size": manifest.len(),
            "digest": manifest_digest,
            "artifactType": SIGNATURE_ARTIFACT,
        }],
    }))
    .expect("index JSON");
    push_raw_manifest(upstream, repo, &digest.replace(':', "-"), OCI_INDEX, &index).await;
}
