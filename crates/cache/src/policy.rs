//! Signature policy at the edge (`[[policy]]`): a runnable image (an index, or an image
//! manifest with filesystem layers) of a covered repository is served only when a cosign
//! signature by one of the rule's keys verifies over a payload naming its digest.
//!
//! This module holds the rules, the trusted keys (PEM `PUBLIC KEY` files: ECDSA P-256 with
//! SHA-256, Ed25519, RSA PKCS#1 v1.5 with SHA-256; read again on `SIGHUP`), the judgement of
//! the signatures found (pure), and the digests verified (with the children of a verified
//! index). Finding the signatures — cosign's `sha256-<hex>.sig` tag and OCI 1.1 referrers of
//! the cosign signature artifact type, and their payload blobs — goes through the cache's own
//! lookups (`Cache::check_policy`), so imported signatures verify offline.
//!
//! Keyless signatures (Fulcio certificates, Rekor entries) need a network an edge does not
//! have: not verified here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{
    ParsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ED25519,
    RSA_PKCS1_2048_8192_SHA256,
};
use base64::Engine as _;
use bytes::Bytes;
use globset::GlobSet;
use parking_lot::RwLock;
use regcache_config::{repository_patterns, PolicyConfig, Require};
use regcache_oci::{references, Digest, RepoName};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;

/// The annotation of a cosign signature layer holding the base64 signature of its blob.
pub(crate) const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of cosign signatures stored as OCI 1.1 referrers.
pub(crate) const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The largest payload read: a simple-signing payload is a few hundred bytes.
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// Signatures judged for one manifest at most (signature layers, and referrers read): an
/// upstream naming thousands cannot make one pull fetch and verify thousands.
pub(crate) const MAX_SIGNATURES: usize = 16;
/// How long a verified digest is trusted before its signatures are read again.
const VERIFIED_FOR: Duration = Duration::from_secs(3600);
/// Verified digests remembered at most.
const VERIFIED_CAPACITY: u64 = 100_000;
/// Refusals kept for the status page.
const RECENT_REFUSALS: usize = 20;

/// A key file that cannot serve as a trusted key.
#[derive(Debug, thiserror::Error)]
#[error("policy[{position}].keys: {path}: {reason}")]
pub struct PolicyError {
    position: usize,
    path: PathBuf,
    reason: String,
}

/// Why a manifest was refused. The words of [`Refusal::text`] are part of the interface:
/// clients and scripts match them in the `403 DENIED` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Neither the `.sig` tag nor a referrer holds a cosign signature.
    NoSignature,
    /// Signatures exist; none verifies with the rule's keys.
    BadSignature,
    /// A signature verifies, but its payload names another manifest.
    OtherDigest,
    /// A signature verifies, but its payload names another `docker-reference` than the
    /// rule's `identity`.
    OtherIdentity,
}

impl Refusal {
    /// The reason in words (the `DENIED` message, the log, the status page).
    pub fn text(self) -> &'static str {
        match self {
            Self::NoSignature => "no signature",
            Self::BadSignature => "signature does not verify with the configured keys",
            Self::OtherDigest => "payload names another digest",
            Self::OtherIdentity => "payload names another identity",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoSignature => "no_signature",
            Self::BadSignature => "bad_signature",
            Self::OtherDigest => "other_digest",
            Self::OtherIdentity => "other_identity",
        }
    }
}

/// A refusal, for the status page.
#[derive(Debug, Clone)]
pub struct RefusalRecord {
    /// When.
    pub at: std::time::SystemTime,
    /// The upstream's name.
    pub upstream: String,
    /// The repository as the upstream names it.
    pub repository: String,
    /// The manifest refused.
    pub digest: Digest,
    /// Why.
    pub refusal: Refusal,
}

/// A trusted key.
struct TrustedKey {
    key: ParsedPublicKey,
}

/// Reads a PEM public key and finds its type among those regcache verifies with.
fn load_key(path: &Path) -> Result<(TrustedKey, &'static str), String> {
    let spki = SubjectPublicKeyInfoDer::from_pem_file(path)
        .map_err(|err| format!("not a PEM public key (\"BEGIN PUBLIC KEY\"): {err}"))?;
    let algorithms: [(&'static str, &'static dyn VerificationAlgorithm); 3] = [
        ("ECDSA P-256", &ECDSA_P256_SHA256_ASN1),
        ("Ed25519", &ED25519),
        ("RSA", &RSA_PKCS1_2048_8192_SHA256),
    ];
    for (kind, algorithm) in algorithms {
        if let Ok(key) = ParsedPublicKey::new(algorithm, spki.as_ref()) {
            return Ok((TrustedKey { key }, kind));
        }
    }
    Err(
        "an unsupported key type: regcache verifies ECDSA P-256, Ed25519 and RSA \
         (2048-8192 bits) keys"
            .to_owned(),
    )
}

/// Loads every key of every rule; what `check-config` and start-up do.
///
/// # Errors
/// [`PolicyError`] naming the first key that cannot be used.
pub fn check_keys(policies: &[PolicyConfig]) -> Result<usize, PolicyError> {
    load_all(policies).map(|keys| keys.iter().map(Vec::len).sum())
}

fn load_all(policies: &[PolicyConfig]) -> Result<Vec<Vec<TrustedKey>>, PolicyError> {
    policies
        .iter()
        .enumerate()
        .map(|(index, policy)| {
            policy
                .keys
                .iter()
                .map(|path| {
                    load_key(path)
                        .map(|(key, _)| key)
                        .map_err(|reason| PolicyError {
                            position: index + 1,
                            path: path.clone(),
                            reason,
                        })
                })
                .collect()
        })
        .collect()
}

/// A compiled `[[policy]]`.
struct Rule {
    matcher: GlobSet,
    require: Require,
    identity: Option<String>,
}

/// A signature found for a manifest: a payload and the signature over it.
pub(crate) struct FoundSignature {
    pub(crate) payload: Bytes,
    pub(crate) signature: Vec<u8>,
}

/// What the policy says of a repository.
pub(crate) enum Coverage {
    /// No rule matches: served as it is.
    None,
    /// `require = "none"`.
    Exempt,
    /// `require = "cosign"`: the rule's position.
    Cosign(usize),
}

/// The rules, their keys, the verified digests and the recent refusals.
pub(crate) struct Policies {
    configs: Vec<PolicyConfig>,
    rules: Vec<Rule>,
    /// Per rule; replaced whole on reload.
    keys: RwLock<Arc<Vec<Vec<TrustedKey>>>>,
    /// (rule, upstream, digest) verified, children of verified indexes included: a digest
    /// verified under one rule's keys says nothing under another's.
    verified: moka::future::Cache<(usize, usize, Digest), ()>,
    upstream_names: Vec<String>,
    refusals: parking_lot::Mutex<std::collections::VecDeque<RefusalRecord>>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// The rules of `configs` over the upstreams named `upstream_names` (config order).
    ///
    /// # Errors
    /// [`PolicyError`] for a key that cannot be used.
    pub(crate) fn new(
        configs: &[PolicyConfig],
        upstream_names: Vec<String>,
    ) -> Result<Self, PolicyError> {
        let keys = load_all(configs)?;
        let rules = configs
            .iter()
            .map(|config| Rule {
                matcher: repository_patterns(&config.repositories),
                require: config.require,
                identity: config.identity.clone(),
            })
            .collect();
        Ok(Self {
            configs: configs.to_vec(),
            rules,
            keys: RwLock::new(Arc::new(keys)),
            verified: moka::future::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_FOR)
                .build(),
            upstream_names,
            refusals: parking_lot::Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Whether any rule exists.
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Reads the key files again (`SIGHUP`); the verified digests are forgotten. On error the
    /// keys in force stay.
    ///
    /// # Errors
    /// [`PolicyError`] for a key that cannot be used.
    pub(crate) fn reload_keys(&self) -> Result<usize, PolicyError> {
        let keys = load_all(&self.configs)?;
        let count = keys.iter().map(Vec::len).sum();
        *self.keys.write() = Arc::new(keys);
        self.verified.invalidate_all();
        Ok(count)
    }

    /// Which rule covers `repo` of the upstream at index `upstream`: the first that matches.
    pub(crate) fn coverage(&self, upstream: usize, repo: &RepoName) -> Coverage {
        if self.rules.is_empty() {
            return Coverage::None;
        }
        let name = format!(
            "{}/{}",
            self.upstream_names.get(upstream).map_or("", String::as_str),
            repo.as_str()
        );
        match self
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matcher.is_match(&name))
        {
            None => Coverage::None,
            Some((_, rule)) if rule.require == Require::None => Coverage::Exempt,
            Some((index, _)) => Coverage::Cosign(index),
        }
    }

    /// Whether `digest` of the upstream at index `upstream` was verified under rule `rule`
    /// (itself, or as a child of a verified index).
    pub(crate) fn is_verified(&self, rule: usize, upstream: usize, digest: &Digest) -> bool {
        self.verified.contains_key(&(rule, upstream, *digest))
    }

    /// Remembers a manifest verified under rule `rule`, and the children of an index as part
    /// of it.
    pub(crate) async fn remember(
        &self,
        rule: usize,
        upstream: usize,
        digest: &Digest,
        bytes: &[u8],
    ) {
        self.verified.insert((rule, upstream, *digest), ()).await;
        for child in references(bytes, &[]).0 {
            self.verified.insert((rule, upstream, child), ()).await;
        }
    }

    /// Judges the signatures found for `digest` under rule `rule`.
    pub(crate) fn judge(
        &self,
        rule: usize,
        digest: &Digest,
        signatures: &[FoundSignature],
    ) -> Result<(), Refusal> {
        let keys = Arc::clone(&self.keys.read());
        let (Some(keys), Some(rule)) = (keys.get(rule), self.rules.get(rule)) else {
            return Err(Refusal::BadSignature);
        };
        judge(keys, rule.identity.as_deref(), digest, signatures)
    }

    /// Keeps a refusal for the status page.
    pub(crate) fn record(&self, record: RefusalRecord) {
        let mut refusals = self.refusals.lock();
        if refusals.len() >= RECENT_REFUSALS {
            refusals.pop_front();
        }
        refusals.push_back(record);
    }

    /// The recent refusals, newest first.
    pub(crate) fn recent(&self) -> Vec<RefusalRecord> {
        self.refusals.lock().iter().rev().cloned().collect()
    }
}

fn judge(
    keys: &[TrustedKey],
    identity: Option<&str>,
    digest: &Digest,
    signatures: &[FoundSignature],
) -> Result<(), Refusal> {
    if signatures.is_empty() {
        return Err(Refusal::NoSignature);
    }
    let mut refusal = Refusal::BadSignature;
    for found in signatures {
        let verifies = keys
            .iter()
            .any(|key| key.key.verify_sig(&found.payload, &found.signature).is_ok());
        if !verifies {
            continue;
        }
        let Ok(payload) = serde_json::from_slice::<Payload>(&found.payload) else {
            refusal = Refusal::OtherDigest;
            continue;
        };
        if payload.critical.image.docker_manifest_digest != digest.to_string() {
            refusal = Refusal::OtherDigest;
            continue;
        }
        if identity.is_some_and(|want| payload.critical.identity.docker_reference != want) {
            if refusal == Refusal::BadSignature {
                refusal = Refusal::OtherIdentity;
            }
            continue;
        }
        return Ok(());
    }
    Err(refusal)
}

/// A cosign simple-signing payload (only what is checked).
#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(default)]
    identity: PayloadIdentity,
}

#[derive(Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

#[derive(Deserialize, Default)]
struct PayloadIdentity {
    #[serde(rename = "docker-reference", default)]
    docker_reference: String,
}

/// A signature manifest's layers (only what is read).
#[derive(Deserialize)]
struct SignatureManifest {
    #[serde(default)]
    layers: Vec<SignatureLayer>,
}

#[derive(Deserialize)]
struct SignatureLayer {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

/// The cosign signature layers of a signature manifest, at most [`MAX_SIGNATURES`]: each
/// payload blob's digest and the decoded signature over it. Layers without the annotation,
/// with a payload over [`MAX_PAYLOAD`] or with undecodable parts are left out.
pub(crate) fn signature_layers(bytes: &[u8]) -> Vec<(Digest, Vec<u8>)> {
    let Ok(manifest) = serde_json::from_slice::<SignatureManifest>(bytes) else {
        return Vec::new();
    };
    manifest
        .layers
        .iter()
        .filter(|layer| layer.size <= MAX_PAYLOAD as u64)
        .filter_map(|layer| {
            let signature = layer.annotations.get(SIGNATURE_ANNOTATION)?;
            let signature = base64::engine::general_purpose::STANDARD
                .decode(signature.trim())
                .ok()?;
            Some((Digest::parse(&layer.digest).ok()?, signature))
        })
        .take(MAX_SIGNATURES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, SigningKey as _};

    fn key_file(dir: &Path, name: &str, key: &KeyPair) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, key.public_key_pem()).expect("write key");
        path
    }

    fn payload(digest: &str, reference: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        ))
    }

    fn signed(key: &KeyPair, payload: Bytes) -> FoundSignature {
        let signature = key.sign(&payload).expect("sign");
        FoundSignature { payload, signature }
    }

    #[test]
    fn keys_of_the_supported_types_load_and_others_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        assert_eq!(
            load_key(&key_file(dir.path(), "a.pub", &p256))
                .map(|k| k.1)
                .ok(),
            Some("ECDSA P-256")
        );
        assert_eq!(
            load_key(&key_file(dir.path(), "b.pub", &ed))
                .map(|k| k.1)
                .ok(),
            Some("Ed25519")
        );
        let refused = load_key(&key_file(dir.path(), "c.pub", &p384))
            .err()
            .unwrap_or_default();
        assert!(refused.contains("unsupported key type"), "{refused}");
        std::fs::write(dir.path().join("d.pub"), "not a key").expect("write");
        let refused = load_key(&dir.path().join("d.pub"))
            .err()
            .unwrap_or_default();
        assert!(refused.contains("not a PEM public key"), "{refused}");
    }

    #[test]
    fn a_signature_verifies_over_a_payload_naming_the_digest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let trusted = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let keys = vec![
            load_key(&key_file(dir.path(), "t.pub", &trusted))
                .expect("key")
                .0,
            load_key(&key_file(dir.path(), "e.pub", &ed))
                .expect("key")
                .0,
        ];
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).expect("digest");
        let another = format!("sha256:{}", "b".repeat(64));
        let good = payload(&digest.to_string(), "r.test/app");
        assert_eq!(judge(&keys, None, &digest, &[]), Err(Refusal::NoSignature));
        assert_eq!(
            judge(&keys, None, &digest, &[signed(&trusted, good.clone())]),
            Ok(())
        );
        assert_eq!(
            judge(&keys, None, &digest, &[signed(&ed, good.clone())]),
            Ok(())
        );
        assert_eq!(
            judge(&keys, None, &digest, &[signed(&other, good.clone())]),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            judge(
                &keys,
                None,
                &digest,
                &[signed(&trusted, payload(&another, "r.test/app"))]
            ),
            Err(Refusal::OtherDigest)
        );
        assert_eq!(
            judge(
                &keys,
                Some("r.test/other"),
                &digest,
                &[signed(&trusted, good.clone())]
            ),
            Err(Refusal::OtherIdentity)
        );
        // One good signature among bad ones is enough.
        assert_eq!(
            judge(
                &keys,
                Some("r.test/app"),
                &digest,
                &[signed(&other, good.clone()), signed(&trusted, good)]
            ),
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_digest_verified_under_one_rule_is_not_under_another() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let path = key_file(dir.path(), "k.pub", &key);
        let rule = |pattern: &str| PolicyConfig {
            repositories: vec![pattern.to_owned()],
            require: Require::Cosign,
            keys: vec![path.clone()],
            identity: None,
        };
        let policies = Policies::new(
            &[rule("r.test/a/*"), rule("r.test/b/*")],
            vec!["r.test".into()],
        )
        .expect("policies");
        let repo = |name: &str| RepoName::parse(name).expect("repo");
        assert!(matches!(
            policies.coverage(0, &repo("a/app")),
            Coverage::Cosign(0)
        ));
        assert!(matches!(
            policies.coverage(0, &repo("b/app")),
            Coverage::Cosign(1)
        ));
        assert!(matches!(
            policies.coverage(0, &repo("c/app")),
            Coverage::None
        ));
        let child = format!("sha256:{}", "c".repeat(64));
        let index = format!(r#"{{"manifests":[{{"digest":"{child}"}}]}}"#);
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).expect("digest");
        policies.remember(0, 0, &digest, index.as_bytes()).await;
        assert!(policies.is_verified(0, 0, &digest));
        assert!(policies.is_verified(0, 0, &Digest::parse(&child).expect("child")));
        assert!(!policies.is_verified(1, 0, &digest));
        policies.reload_keys().expect("reload");
        assert!(
            !policies.is_verified(0, 0, &digest),
            "forgotten when the keys change"
        );
    }

    #[test]
    fn signature_layers_are_read_from_the_annotation() {
        let sig = base64::engine::general_purpose::STANDARD.encode(b"sig");
        let manifest = format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"sha256:{}","size":200,"annotations":{{"{SIGNATURE_ANNOTATION}":"{sig}"}}}},{{"digest":"sha256:{}","size":10}}]}}"#,
            "c".repeat(64),
            "d".repeat(64)
        );
        let layers = signature_layers(manifest.as_bytes());
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].1, b"sig");
        // A hostile upstream naming a thousand signatures gets the first few judged.
        let layer = format!(
            r#"{{"digest":"sha256:{}","size":200,"annotations":{{"{SIGNATURE_ANNOTATION}":"{sig}"}}}}"#,
            "e".repeat(64)
        );
        let many = format!(r#"{{"layers":[{}]}}"#, vec![layer; 1000].join(","));
        assert_eq!(signature_layers(many.as_bytes()).len(), MAX_SIGNATURES);
    }
}
