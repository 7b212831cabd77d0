//! Manifest media types, media-type sniffing and the manifest digest rule (including the signed
//! schema1 exception, whose digest covers the payload without its JWS signature).

use std::fmt;

use base64::Engine as _;
use serde::Deserialize;

use super::Digest;

/// Manifests are buffered in memory to be verified before the first byte is sent, so their size
/// is capped. Distribution uses the same 4 MiB limit.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A media type such as `application/vnd.oci.image.index.v1+json`, as sent in `Content-Type`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MediaType(String);

impl MediaType {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &'static str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &'static str = "application/vnd.oci.image.index.v1+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &'static str =
        "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &'static str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema 1, signed.
    pub const DOCKER_SCHEMA1_SIGNED: &'static str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// Docker schema 1, unsigned.
    pub const DOCKER_SCHEMA1: &'static str = "application/vnd.docker.distribution.manifest.v1+json";

    /// Every manifest type regcache asks an upstream for when the client did not say.
    pub const ALL_MANIFESTS: [&'static str; 6] = [
        Self::OCI_INDEX,
        Self::OCI_MANIFEST,
        Self::DOCKER_LIST,
        Self::DOCKER_MANIFEST,
        Self::DOCKER_SCHEMA1_SIGNED,
        Self::DOCKER_SCHEMA1,
    ];

    /// Keeps the `type/subtype` part of a `Content-Type` value (parameters such as `charset`
    /// are dropped). Returns `None` for a value that is not a plausible media type.
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or_default().trim();
        let (kind, subtype) = essence.split_once('/')?;
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        (token(kind) && token(subtype)).then(|| Self(essence.to_ascii_lowercase()))
    }

    /// A media type known to be well-formed (one of the constants).
    pub fn from_static(value: &'static str) -> Self {
        Self(value.to_owned())
    }

    /// The media type as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a signed or unsigned Docker schema1 manifest.
    pub fn is_schema1(&self) -> bool {
        self.0 == Self::DOCKER_SCHEMA1_SIGNED || self.0 == Self::DOCKER_SCHEMA1
    }

    /// Whether a client that sent `accept` (the values of all its `Accept` headers) takes this
    /// type. No `Accept`, `*/*` or `application/*` means anything. Schema1 is what registries
    /// send to clients that do not negotiate, so it is accepted only when asked for or when the
    /// client did not say.
    pub fn accepted_by(&self, accept: &[String]) -> bool {
        if accept.is_empty() {
            return true;
        }
        accept
            .iter()
            .flat_map(|value| value.split(','))
            .filter_map(|item| item.split(';').next())
            .map(str::trim)
            .any(|item| {
                item.eq_ignore_ascii_case(&self.0)
                    || item == "*/*"
                    || item == "application/*"
                    || (self.0 == Self::DOCKER_SCHEMA1_SIGNED && item == Self::DOCKER_SCHEMA1)
            })
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The fields of any manifest that tell its type apart.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestShape {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
    signatures: Option<serde_json::Value>,
}

/// Guesses the media type of manifest bytes from their JSON (used when the index lost the type
/// the upstream sent: the bytes are the source of truth). `None` when the bytes are not a
/// manifest.
pub fn sniff_media_type(bytes: &[u8]) -> Option<MediaType> {
    let shape: ManifestShape = serde_json::from_slice(bytes).ok()?;
    if let Some(declared) = shape.media_type.as_deref() {
        return MediaType::from_content_type(declared);
    }
    let sniffed = match shape.schema_version? {
        1 if shape.signatures.is_some() => MediaType::DOCKER_SCHEMA1_SIGNED,
        1 => MediaType::DOCKER_SCHEMA1,
        2 if shape.manifests.is_some() => MediaType::OCI_INDEX,
        2 if shape.layers.is_some() => MediaType::OCI_MANIFEST,
        _ => return None,
    };
    Some(MediaType::from_static(sniffed))
}

/// The JWS protected header of a schema1 signature: where the signed payload ends.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProtectedHeader {
    format_length: usize,
    format_tail: String,
}

#[derive(Deserialize)]
struct SignedSchema1 {
    signatures: Vec<Schema1Signature>,
}

#[derive(Deserialize)]
struct Schema1Signature {
    protected: String,
}

/// Why manifest bytes are refused: they are not what they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid manifest: {reason}")]
pub struct InvalidManifest {
    reason: &'static str,
}

fn invalid(reason: &'static str) -> InvalidManifest {
    InvalidManifest { reason }
}

/// The digest a registry gives these manifest bytes: the sha256 of the bytes, except for signed
/// schema1, whose digest covers the payload with the signatures cut out (libtrust's
/// `formatLength` / `formatTail`), so that re-signing does not change it. A schema1 document
/// whose signature header does not describe exactly that payload gets the sha256 of its bytes,
/// so it can never pass for the document its header names; [`validate_manifest`] refuses it.
pub fn manifest_digest(bytes: &[u8], media_type: &MediaType) -> Digest {
    if media_type.is_schema1() {
        if let Ok(Some(payload)) = schema1_payload(bytes) {
            return Digest::of(&payload);
        }
    }
    Digest::of(bytes)
}

/// Checks that manifest bytes are what they are served as: a JSON object whose `mediaType`,
/// when present, is `media_type`, that is not an index and an image at once (`manifests` with
/// `layers` or `config`), and for signed schema1, signatures that cover exactly the
/// document without its `signatures` member.
///
/// # Errors
/// [`InvalidManifest`] naming the first problem.
pub fn validate_manifest(bytes: &[u8], media_type: &MediaType) -> Result<(), InvalidManifest> {
    let document: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|_| invalid("not a JSON object"))?;
    let agrees = match document.get("mediaType") {
        None => true,
        // Schema1 has no `mediaType` member; one that names another type is a disguise.
        Some(serde_json::Value::String(declared)) if media_type.is_schema1() => {
            MediaType::from_content_type(declared).is_some_and(|d| d.is_schema1())
        }
        Some(serde_json::Value::String(declared)) => {
            declared.eq_ignore_ascii_case(media_type.as_str())
        }
        Some(_) => false,
    };
    if !agrees {
        return Err(invalid("mediaType disagrees with the served type"));
    }
    // An index to one client and an image to another (the ambiguity of CVE-2021-41190): a
    // document naming both its manifests and its own layers or config is neither.
    if document.contains_key("manifests")
        && (document.contains_key("layers") || document.contains_key("config"))
    {
        return Err(invalid(
            "both manifests and layers: an index and an image at once",
        ));
    }
    if media_type.is_schema1() {
        schema1_payload(bytes)?;
    }
    Ok(())
}

/// The signed payload of a schema1 document: its first `formatLength` bytes followed by
/// `formatTail`. `None` for a document without signatures (unsigned schema1, whose digest is
/// that of its bytes).
///
/// The header is not trusted: the payload must be exactly the document with its `signatures`
/// member removed. The bytes between `formatLength` and the tail must be nothing but
/// `, "signatures": [...]`, the document must end with the tail, and the payload must parse to
/// the document minus `signatures`. Without this, `formatLength: 0` and a `formatTail` holding
/// another document would make the bytes pass for that other document's digest.
///
/// # Errors
/// [`InvalidManifest`] when the signature header does not describe this document.
pub fn schema1_payload(bytes: &[u8]) -> Result<Option<Vec<u8>>, InvalidManifest> {
    let mut document: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|_| invalid("not a JSON object"))?;
    if document.remove("signatures").is_none() {
        return Ok(None);
    }
    let signed: SignedSchema1 =
        serde_json::from_slice(bytes).map_err(|_| invalid("schema1 signatures are malformed"))?;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut header = None;
    for signature in &signed.signatures {
        let header_json = engine
            .decode(signature.protected.trim_end_matches('='))
            .map_err(|_| invalid("schema1 protected header is not base64url"))?;
        let this: ProtectedHeader = serde_json::from_slice(&header_json)
            .map_err(|_| invalid("schema1 protected header lacks formatLength/formatTail"))?;
        // libtrust requires every signature to describe the same payload.
        match &header {
            None => header = Some(this),
            Some(first)
                if first.format_length == this.format_length
                    && first.format_tail == this.format_tail => {}
            Some(_) => return Err(invalid("schema1 signatures describe different payloads")),
        }
    }
    let header = header.ok_or_else(|| invalid("schema1 signatures are empty"))?;
    let tail = engine
        .decode(header.format_tail.trim_end_matches('='))
        .map_err(|_| invalid("schema1 formatTail is not base64url"))?;
    let signed_end = bytes
        .len()
        .checked_sub(tail.len())
        .filter(|end| *end >= header.format_length && bytes[*end..] == tail[..])
        .ok_or_else(|| invalid("schema1 document does not end with formatTail"))?;
    if !is_signatures_member(&bytes[header.format_length..signed_end]) {
        return Err(invalid(
            "schema1 signature does not cover the document without its signatures",
        ));
    }
    let mut payload = bytes[..header.format_length].to_vec();
    payload.extend_from_slice(&tail);
    let payload_document: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&payload).map_err(|_| invalid("schema1 payload is not JSON"))?;
    if payload_document != document {
        return Err(invalid(
            "schema1 payload differs from the document without its signatures",
        ));
    }
    Ok(Some(payload))
}

/// Whether `gap` is exactly `, "signatures": [ ... ]` (with any JSON whitespace).
fn is_signatures_member(gap: &[u8]) -> bool {
    let trim = |bytes: &[u8]| -> usize {
        bytes
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count()
    };
    let mut rest = &gap[trim(gap)..];
    for expected in [&b","[..], b"\"signatures\"", b":"] {
        let Some(after) = rest.strip_prefix(expected) else {
            return false;
        };
        rest = &after[trim(after)..];
    }
    if rest.first() != Some(&b'[') {
        return false;
    }
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
    if !matches!(values.next(), Some(Ok(serde_json::Value::Array(_)))) {
        return false;
    }
    let after = &rest[values.byte_offset()..];
    trim(after) == after.len()
}

/// The parts of a manifest that point at other content.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Links {
    #[serde(default)]
    manifests: Vec<Child>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    fs_layers: Vec<Schema1Layer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    size: Option<u64>,
    media_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Schema1Layer {
    blob_sum: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Child {
    digest: String,
    platform: Option<Platform>,
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl Platform {
    /// `os/arch` and `os/arch/variant` both match a platform with that variant.
    fn matches(&self, wanted: &str) -> bool {
        let base = format!("{}/{}", self.os, self.architecture);
        match &self.variant {
            Some(variant) => wanted == base || wanted == format!("{base}/{variant}"),
            None => wanted == base,
        }
    }
}

/// The child manifests (filtered by `platforms`, `os/arch[/variant]`, when not empty) and the
/// blobs (config, layers, schema1 `fsLayers`) a manifest references. A `subject` is not a
/// reference: the referrer points at it, not the other way. Bytes that are not a manifest
/// reference nothing.
pub fn references(bytes: &[u8], platforms: &[String]) -> (Vec<Digest>, Vec<Digest>) {
    let Ok(links) = serde_json::from_slice::<Links>(bytes) else {
        return (Vec::new(), Vec::new());
    };
    let children = links
        .manifests
        .iter()
        .filter(|child| {
            platforms.is_empty()
                || child
                    .platform
                    .as_ref()
                    .is_some_and(|p| platforms.iter().any(|w| p.matches(w)))
        })
        .filter_map(|child| Digest::parse(&child.digest).ok())
        .collect();
    let blobs = links
        .config
        .iter()
        .map(|d| d.digest.as_str())
        .chain(links.layers.iter().map(|d| d.digest.as_str()))
        .chain(links.fs_layers.iter().map(|l| l.blob_sum.as_str()))
        .filter_map(|d| Digest::parse(d).ok())
        .collect();
    (children, blobs)
}

/// Whether a manifest describes something a container runtime would run: a manifest list, an
/// index with an entry that is not an artifact (no `artifactType`, or a platform), a schema1
/// manifest, or an image manifest with at least one filesystem layer
/// (`application/vnd.oci.image.layer.…`, `application/vnd.docker.image.rootfs.…`). Artifacts
/// (cosign signatures, attestations, SBOMs, charts) are not: their layers are not
/// filesystems; nor is a referrers index (every entry an artifact), whose runnable entries,
/// if any, are judged on their own. Other bytes are runnable only as an OCI index.
pub fn is_runnable(bytes: &[u8], media_type: &MediaType) -> bool {
    if media_type.is_schema1() || media_type.as_str() == MediaType::DOCKER_LIST {
        return true;
    }
    let Ok(links) = serde_json::from_slice::<Links>(bytes) else {
        return media_type.as_str() == MediaType::OCI_INDEX;
    };
    links
        .manifests
        .iter()
        .any(|child| child.artifact_type.is_none() || child.platform.is_some())
        || links.layers.iter().any(|layer| {
            layer.media_type.as_deref().is_some_and(|t| {
                t.starts_with("application/vnd.oci.image.layer.")
                    || t.starts_with("application/vnd.docker.image.rootfs.")
            })
        })
}

/// The sizes a manifest declares for the blobs it references (config and layers; schema1
/// declares none). Descriptors with a malformed digest or no size are left out.
pub fn declared_sizes(bytes: &[u8]) -> Vec<(Digest, u64)> {
    let Ok(links) = serde_json::from_slice::<Links>(bytes) else {
        return Vec::new();
    };
    links
        .config
        .iter()
        .chain(links.layers.iter())
        .filter_map(|d| Some((Digest::parse(&d.digest).ok()?, d.size?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_sniff(json: &str, expected: Option<&str>) {
        let sniffed = sniff_media_type(json.as_bytes());
        assert_eq!(sniffed.as_ref().map(MediaType::as_str), expected, "{json}");
    }

    #[test]
    fn runnable_means_filesystem_layers_or_an_index() {
        let oci = MediaType::from_static(MediaType::OCI_MANIFEST);
        let index = MediaType::from_static(MediaType::OCI_INDEX);
        let image = br#"{"config":{"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}]}"#;
        let signature = br#"{"config":{"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}]}"#;
        assert!(is_runnable(image, &oci));
        assert!(!is_runnable(signature, &oci));
        assert!(!is_runnable(b"not json", &oci));
        let platforms = br#"{"manifests":[{"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let referrers = br#"{"manifests":[{"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json"}]}"#;
        assert!(is_runnable(platforms, &index));
        assert!(!is_runnable(referrers, &index));
        assert!(is_runnable(b"not json", &index));
    }

    #[test]
    fn references_follow_platform_filters() {
        let index = br#"{"manifests":[
            {"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        assert_eq!(references(index, &[]).0.len(), 2);
        assert_eq!(references(index, &["linux/arm64".to_owned()]).0.len(), 1);
        assert_eq!(references(index, &["linux/arm64/v8".to_owned()]).0.len(), 1);
        assert_eq!(references(index, &["windows/amd64".to_owned()]).0.len(), 0);
        let image = br#"{"config":{"digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"},
            "layers":[{"digest":"sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"}]}"#;
        assert_eq!(references(image, &[]).1.len(), 2);
        assert_eq!(declared_sizes(image), []);
        let sized = br#"{"config":{"digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":7},
            "layers":[{"digest":"sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd","size":9},{"digest":"bad","size":1}]}"#;
        let sizes: Vec<u64> = declared_sizes(sized).into_iter().map(|(_, s)| s).collect();
        assert_eq!(sizes, [7, 9]);
    }

    #[test]
    fn sniffing() {
        check_sniff(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#,
            Some(MediaType::DOCKER_LIST),
        );
        check_sniff(
            r#"{"schemaVersion":2,"manifests":[]}"#,
            Some(MediaType::OCI_INDEX),
        );
        check_sniff(
            r#"{"schemaVersion":2,"config":{},"layers":[]}"#,
            Some(MediaType::OCI_MANIFEST),
        );
        check_sniff(
            r#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#,
            Some(MediaType::DOCKER_SCHEMA1_SIGNED),
        );
        check_sniff("not json", None);
        check_sniff(r#"{"hello":1}"#, None);
    }

    #[test]
    fn accept_negotiation() {
        let oci = MediaType::from_static(MediaType::OCI_INDEX);
        assert!(oci.accepted_by(&[]));
        assert!(oci.accepted_by(&[format!(
            "{}, {}",
            MediaType::DOCKER_LIST,
            MediaType::OCI_INDEX
        )]));
        assert!(!oci.accepted_by(&[MediaType::DOCKER_MANIFEST.to_owned()]));
        assert!(oci.accepted_by(&["*/*".to_owned()]));
    }

    #[test]
    fn content_type_parsing() {
        let parsed = MediaType::from_content_type("Application/JSON; charset=utf-8");
        assert_eq!(
            parsed.as_ref().map(MediaType::as_str),
            Some("application/json")
        );
        assert!(MediaType::from_content_type("nonsense").is_none());
        assert!(MediaType::from_content_type("a/b\r\nX: y").is_none());
    }

    /// A signed schema1 document in libtrust's layout, with a protected header claiming
    /// `format_length` and `tail`.
    fn signed_schema1(body: &str, format_length: usize, tail: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let protected = engine.encode(format!(
            r#"{{"formatLength":{format_length},"formatTail":"{}"}}"#,
            engine.encode(tail)
        ));
        format!("{body},\n   \"signatures\": [{{\"protected\": \"{protected}\"}}]\n}}")
    }

    const PAYLOAD: &str = "{\n   \"schemaVersion\": 1,\n   \"name\": \"x\"\n}";

    #[test]
    fn schema1_digest_ignores_signature() {
        // The payload is the bytes up to formatLength plus the tail.
        let body_start = &PAYLOAD[..PAYLOAD.len() - 2];
        let signed = signed_schema1(body_start, body_start.len(), "\n}");
        let media_type = MediaType::from_static(MediaType::DOCKER_SCHEMA1_SIGNED);
        assert_eq!(
            manifest_digest(signed.as_bytes(), &media_type),
            Digest::of(PAYLOAD.as_bytes())
        );
        assert_eq!(validate_manifest(signed.as_bytes(), &media_type), Ok(()));
    }

    #[test]
    fn forged_schema1_is_refused() {
        let media_type = MediaType::from_static(MediaType::DOCKER_SCHEMA1_SIGNED);
        let other = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let body_start = &PAYLOAD[..PAYLOAD.len() - 2];
        let forgeries = [
            // formatLength 0 and the tail another document: the issue's attack.
            signed_schema1(body_start, 0, other),
            // The tail is not where the document ends.
            signed_schema1(body_start, body_start.len(), "\n }"),
            // formatLength cuts the document short: the gap is more than the signatures.
            signed_schema1(body_start, body_start.len() - 5, "\n}"),
            // formatLength past the end.
            signed_schema1(body_start, 10_000, "\n}"),
        ];
        for forged in &forgeries {
            assert!(
                validate_manifest(forged.as_bytes(), &media_type).is_err(),
                "{forged}"
            );
            assert_eq!(
                manifest_digest(forged.as_bytes(), &media_type),
                Digest::of(forged.as_bytes()),
                "a forgery is never given another document's digest: {forged}"
            );
        }
        // A member after the signatures is outside the signed payload.
        let extra = format!(
            "{},\n   \"extra\": 1\n}}",
            signed_schema1(body_start, body_start.len(), "\n}").trim_end_matches("\n}")
        );
        assert!(validate_manifest(extra.as_bytes(), &media_type).is_err());
    }

    #[track_caller]
    fn check_valid(json: &str, served_as: &'static str, expected: bool) {
        let media_type = MediaType::from_static(served_as);
        let result = validate_manifest(json.as_bytes(), &media_type);
        assert_eq!(
            result.is_ok(),
            expected,
            "{json} as {served_as}: {result:?}"
        );
    }

    #[test]
    fn manifests_are_json_of_the_served_type() {
        let oci_index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        check_valid(oci_index, MediaType::OCI_INDEX, true);
        check_valid(oci_index, MediaType::DOCKER_LIST, false);
        check_valid(oci_index, MediaType::DOCKER_SCHEMA1, false);
        check_valid(
            r#"{"schemaVersion":2,"manifests":[]}"#,
            MediaType::OCI_INDEX,
            true,
        );
        check_valid(r#"{"mediaType":7}"#, MediaType::OCI_MANIFEST, false);
        let both = r#"{"schemaVersion":2,"manifests":[],"layers":[]}"#;
        check_valid(both, MediaType::OCI_INDEX, false);
        check_valid(both, MediaType::OCI_MANIFEST, false);
        check_valid(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"config":{}}"#,
            MediaType::OCI_INDEX,
            false,
        );
        check_valid(
            "<html><body>hi</body></html>",
            MediaType::OCI_MANIFEST,
            false,
        );
        check_valid("\u{1f}\u{8b}\u{8}\u{0}", MediaType::DOCKER_MANIFEST, false);
        check_valid("[1,2]", MediaType::OCI_MANIFEST, false);
        check_valid(
            r#"{"schemaVersion":1,"fsLayers":[]}"#,
            MediaType::DOCKER_SCHEMA1,
            true,
        );
    }
}
