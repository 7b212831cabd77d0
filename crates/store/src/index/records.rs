//! What the index stores, and each record's on-disk form: blobs' access records under
//! compact keys, tag, manifest and referrer records (versioned JSON), sync rules' state.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::split_key;
use crate::Namespace;
use regcache_oci::{Digest, MediaType};

/// `namespace\n` + the digest's 32 bytes: a blob's access key. 43 bytes for `docker.io`,
/// where the text form took 81; unambiguous, as names contain no `\n` and the digest has a
/// fixed length at the end.
pub(super) fn blob_key(namespace: &Namespace, digest: &Digest) -> Vec<u8> {
    let name = namespace.as_str().as_bytes();
    let mut key = Vec::with_capacity(name.len() + 33);
    key.extend_from_slice(name);
    key.push(b'\n');
    key.extend_from_slice(digest.as_bytes());
    key
}

/// The blob a [`blob_key`] names.
pub(super) fn parse_blob_key(key: &[u8]) -> Option<(Namespace, Digest)> {
    let split = key.len().checked_sub(33)?;
    let (name, rest) = key.split_at(split);
    let (newline, hash) = rest.split_first()?;
    if *newline != b'\n' {
        return None;
    }
    let namespace = Namespace::new(std::str::from_utf8(name).ok()?);
    Some((namespace, Digest::from_bytes(hash.try_into().ok()?)))
}

/// The blob a legacy text key (`namespace\nsha256:<hex>`) names.
pub(super) fn parse_legacy_key(key: &[u8]) -> Option<(Namespace, Digest)> {
    match split_key(key)?.as_slice() {
        [namespace, digest] => Some((Namespace::new(namespace), Digest::parse(digest).ok()?)),
        _ => None,
    }
}

/// One access record as [`Index::for_each_access`] streams it: the record, and the blob it
/// belongs to decoded only when asked (eviction looks at most records' times alone).
#[derive(Debug)]
pub struct AccessEntry<'k> {
    /// The record.
    pub record: AccessRecord,
    pub(super) key: &'k [u8],
    pub(super) legacy: bool,
}

impl AccessEntry<'_> {
    /// The blob the record belongs to (`None`: an undecodable key).
    pub fn blob(&self) -> Option<(Namespace, Digest)> {
        if self.legacy {
            parse_legacy_key(self.key)
        } else {
            parse_blob_key(self.key)
        }
    }
}

/// Size and last use of a cached blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRecord {
    /// File size in bytes.
    pub size: u64,
    /// Last time it was served or written, in milliseconds since the Unix epoch.
    pub last_access: u64,
}

/// On-disk form of [`AccessRecord`]: two little-endian u64s (size, last access). Fixed-size
/// binary, not JSON: there is one per blob and eviction reads them all.
pub(super) fn encode_access(record: AccessRecord) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&record.size.to_le_bytes());
    raw[8..].copy_from_slice(&record.last_access.to_le_bytes());
    raw
}

pub(super) fn decode_access(raw: &[u8]) -> Option<AccessRecord> {
    let size = u64::from_le_bytes(raw.get(..8)?.try_into().ok()?);
    let last_access = u64::from_le_bytes(raw.get(8..16)?.try_into().ok()?);
    Some(AccessRecord { size, last_access })
}

/// What the index knows about a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    /// The manifest the tag pointed at when last confirmed.
    pub digest: Digest,
    /// When the upstream last confirmed it.
    pub confirmed_at: SystemTime,
}

/// What the index knows about a manifest whose bytes are in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    /// The `Content-Type` the upstream gave it.
    pub media_type: MediaType,
}

/// On-disk form of [`TagRecord`], version 1.
#[derive(Serialize, Deserialize)]
pub(super) struct TagRecordV1 {
    pub(super) v: u8,
    pub(super) digest: String,
    pub(super) confirmed_unix_ms: u64,
}

/// On-disk form of [`ManifestRecord`], version 1.
#[derive(Serialize, Deserialize)]
pub(super) struct ManifestRecordV1 {
    pub(super) v: u8,
    pub(super) media_type: String,
}

/// A cached manifest that names another as its `subject` (a signature, an SBOM, an
/// attestation): what the referrers API lists for that subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrerRecord {
    /// The referring manifest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: MediaType,
    /// Its size in bytes.
    pub size: u64,
    /// Its `artifactType` (or its config's media type), if any.
    pub artifact_type: Option<String>,
    /// Its annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// On-disk form of [`ReferrerRecord`], version 1 (the digest is in the key).
#[derive(Serialize, Deserialize)]
pub(super) struct ReferrerRecordV1 {
    pub(super) v: u8,
    pub(super) media_type: String,
    pub(super) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(super) annotations: std::collections::BTreeMap<String, String>,
}

/// What a `[[sync]]` rule did last, kept across restarts: when it ran and runs next, the
/// images it keeps (pinned against eviction until a later round drops them), its counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// When the last round ended (Unix seconds).
    #[serde(default)]
    pub last_run: Option<u64>,
    /// When the next round is due (Unix seconds).
    #[serde(default)]
    pub next_run: Option<u64>,
    /// The images the rule keeps, newest first.
    #[serde(default)]
    pub images: Vec<SyncedImage>,
    /// Images fetched (not already cached) over every round.
    #[serde(default)]
    pub fetched: u64,
    /// Images that failed over every round.
    #[serde(default)]
    pub failures: u64,
    /// How the last round ended, in words.
    #[serde(default)]
    pub outcome: String,
}

/// One image a sync rule keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedImage {
    /// The tag it was synced under.
    pub tag: String,
    /// The tag's manifest digest when synced.
    pub digest: String,
    /// The digests of its referrers fetched with it (signatures, SBOMs).
    #[serde(default)]
    pub referrers: Vec<String>,
}
