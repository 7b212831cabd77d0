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

/// The digest a registry gives these manifest bytes: the sha256 of the bytes, except for signed
/// schema1, whose digest covers the payload with the signatures cut out (libtrust's
/// `formatLength` / `formatTail`), so that re-signing does not change it.
pub fn manifest_digest(bytes: &[u8], media_type: &MediaType) -> Digest {
    if media_type.is_schema1() {
        if let Some(payload) = schema1_payload(bytes) {
            return Digest::of(&payload);
        }
    }
    Digest::of(bytes)
}

fn schema1_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    let signed: SignedSchema1 = serde_json::from_slice(bytes).ok()?;
    let first = signed.signatures.first()?;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header_json = engine.decode(first.protected.trim_end_matches('=')).ok()?;
    let header: ProtectedHeader = serde_json::from_slice(&header_json).ok()?;
    let tail = engine
        .decode(header.format_tail.trim_end_matches('='))
        .ok()?;
    let mut payload = bytes.get(..header.format_length)?.to_vec();
    payload.extend_from_slice(&tail);
    Some(payload)
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
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Schema1Layer {
    blob_sum: String,
}

#[derive(Deserialize)]
struct Child {
    digest: String,
    platform: Option<Platform>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_sniff(json: &str, expected: Option<&str>) {
        let sniffed = sniff_media_type(json.as_bytes());
        assert_eq!(sniffed.as_ref().map(MediaType::as_str), expected, "{json}");
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

    #[test]
    fn schema1_digest_ignores_signature() {
        // A signed schema1 manifest: the payload is the bytes up to formatLength plus the tail.
        let payload = "{\n   \"schemaVersion\": 1,\n   \"name\": \"x\"\n}";
        let body_start = &payload[..payload.len() - 2];
        let tail = &payload[payload.len() - 2..];
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let protected = engine.encode(format!(
            r#"{{"formatLength":{},"formatTail":"{}"}}"#,
            body_start.len(),
            engine.encode(tail)
        ));
        let signed =
            format!("{body_start},\n   \"signatures\": [{{\"protected\": \"{protected}\"}}]\n}}");
        let media_type = MediaType::from_static(MediaType::DOCKER_SCHEMA1_SIGNED);
        assert_eq!(
            manifest_digest(signed.as_bytes(), &media_type),
            Digest::of(payload.as_bytes())
        );
    }
}
