//! Deterministic test images, built in Rust and pushed with the registry HTTP
//! API (monolithic blob uploads, manifests PUT with their media type).
//!
//! Layers are real tar archives (entries sorted, mtime 0, uid/gid 0, ustar)
//! holding seeded pseudo-random bytes (splitmix64 seeded by the sha256 of a
//! seed string), gzip-compressed with flate2 at a fixed level and a fixed gzip
//! header. Configs are valid OCI image configs (`rootfs.diff_ids` = sha256 of
//! the uncompressed tar). Same seed and sizes give the same digests on every
//! run; JSON is serialised from structs, so field order is fixed.
//!
//! Every manifest push is checked: the registry's Docker-Content-Digest (and
//! the hash of what it serves) must equal the digest computed here.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::regclient::{sha256_digest, Payload, RegistryClient};
use super::require_tool;
use super::upstream::Upstream;

/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer.
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI uncompressed layer.
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI empty descriptor (`{}`).
pub const MT_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Docker schema2 manifest.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker schema1 signed manifest.
pub const MT_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// The artifact type of the artifact and referrer images.
pub const ARTIFACT_TYPE: &str = "application/vnd.example.regcache.test.v1+json";
/// Media type of the artifacts' one opaque blob.
pub const MT_ARTIFACT_BLOB: &str = "application/vnd.example.regcache.blob.v1";
/// Digest of the empty descriptor's content `{}`.
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Seed of the standard images.
pub const DEFAULT_SEED: &str = "regcache-harness";
/// Tag of the standard images.
pub const TAG: &str = "v1";
/// gzip level of every compressed layer.
const GZIP_LEVEL: u32 = 1;
/// Time limit of the skopeo conversion to schema1.
const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// What was pushed for one image (or index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `repo:tag`.
    pub reference: String,
    /// Repository name, e.g. `test/small-oci`.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Media type of the top manifest.
    pub media_type: String,
    /// Digest of the top manifest.
    pub digest: String,
    /// Every config and layer digest, children of indexes included.
    pub blobs: Vec<String>,
    /// Child manifest digests (indexes only).
    pub children: Vec<String>,
    /// Bytes of all manifests, configs and layers.
    pub total_bytes: u64,
}

/// The standard image set of [`push_standard`].
#[derive(Debug, Clone)]
pub struct Images {
    /// `<prefix>/small-oci:v1`: OCI manifest, one ~4 KiB layer.
    pub small_oci: Pushed,
    /// `<prefix>/docker-v2:v1`: Docker schema2, two layers.
    pub docker_v2: Pushed,
    /// `<prefix>/multiarch-oci:v1`: OCI index, linux/amd64 + linux/arm64/v8.
    pub multiarch_oci: Pushed,
    /// `<prefix>/multiarch-docker:v1`: Docker manifest list, two children.
    pub multiarch_docker: Pushed,
    /// `<prefix>/many-layers:v1`: 30 layers of 64 KiB.
    pub many_layers: Pushed,
    /// `<prefix>/artifact:v1`: artifactType, empty config, one opaque blob.
    pub artifact: Pushed,
    /// `<prefix>/small-oci:referrer-v1`: an artifact whose subject is small_oci.
    pub referrer: Pushed,
    /// `<prefix>/small-oci:sha256-<small_oci hex>`: the referrers tag-schema
    /// index listing `referrer`.
    pub referrers_index: Pushed,
    /// `<prefix>/schema1:v1`: signed schema1 made by skopeo from docker_v2.
    pub schema1: Pushed,
}

impl Images {
    /// Every image a client pulls by its tag: all but the tag-schema index (which skopeo
    /// re-serialises, so it is checked raw).
    pub fn pullable(&self) -> [&Pushed; 8] {
        [
            &self.small_oci,
            &self.docker_v2,
            &self.multiarch_oci,
            &self.multiarch_docker,
            &self.many_layers,
            &self.artifact,
            &self.referrer,
            &self.schema1,
        ]
    }
}

// ---------------------------------------------------------------- PRNG --

/// A fast deterministic PRNG (splitmix64) seeded by a string.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// Seeds with the first 8 bytes of sha256(`seed`).
    pub fn new(seed: &str) -> SeededRng {
        let hash = Sha256::digest(seed.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        SeededRng(u64::from_le_bytes(first))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` (little-endian words; a partial last word is cut).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes for `seed`.
pub fn seeded_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    SeededRng::new(seed).fill(&mut out);
    out
}

/// A reader of exactly `remaining` seeded bytes, the same bytes as
/// [`seeded_bytes`] whatever the read sizes.
struct SeededReader {
    rng: SeededRng,
    buf: Vec<u8>,
    pos: usize,
    remaining: u64,
}

impl SeededReader {
    fn new(seed: &str, len: u64) -> SeededReader {
        SeededReader {
            rng: SeededRng::new(seed),
            buf: vec![0u8; 64 * 1024],
            pos: 64 * 1024,
            remaining: len,
        }
    }
}

impl Read for SeededReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        if self.pos == self.buf.len() {
            self.rng.fill(&mut self.buf);
            self.pos = 0;
        }
        let available = (self.buf.len() - self.pos) as u64;
        let n = out.len().min(available.min(self.remaining) as usize);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        Ok(n)
    }
}

// ------------------------------------------------------- JSON shapes --

/// An OCI / Docker content descriptor.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifest {
    schema_version: u32,
    media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: String,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
struct ImageConfig {
    created: &'static str,
    architecture: String,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    config: RunConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Debug, Serialize)]
struct RunConfig {
    #[serde(rename = "Env")]
    env: Vec<&'static str>,
    #[serde(rename = "Cmd")]
    cmd: Vec<&'static str>,
    #[serde(rename = "Labels")]
    labels: BTreeMap<&'static str, &'static str>,
}

#[derive(Debug, Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
struct History {
    created: &'static str,
    created_by: &'static str,
}

// -------------------------------------------------------- building --

/// A blob (or manifest) in memory.
#[derive(Debug, Clone)]
struct Blob {
    media_type: String,
    digest: String,
    bytes: Bytes,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            bytes: Bytes::from(bytes),
        }
    }

    fn json(media_type: &str, value: &impl Serialize) -> Result<Blob> {
        Ok(Blob::new(media_type, serde_json::to_vec(value)?))
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size(),
            platform: None,
            artifact_type: None,
            data: None,
            annotations: None,
        }
    }
}

/// Docker or OCI media types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `application/vnd.oci.*`.
    Oci,
    /// `application/vnd.docker.*`.
    Docker,
}

impl Kind {
    fn manifest(self) -> &'static str {
        match self {
            Kind::Oci => MT_OCI_MANIFEST,
            Kind::Docker => MT_DOCKER_MANIFEST,
        }
    }

    fn index(self) -> &'static str {
        match self {
            Kind::Oci => MT_OCI_INDEX,
            Kind::Docker => MT_DOCKER_LIST,
        }
    }

    fn config(self) -> &'static str {
        match self {
            Kind::Oci => MT_OCI_CONFIG,
            Kind::Docker => MT_DOCKER_CONFIG,
        }
    }

    fn layer(self) -> &'static str {
        match self {
            Kind::Oci => MT_OCI_LAYER_GZIP,
            Kind::Docker => MT_DOCKER_LAYER,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Oci => "oci",
            Kind::Docker => "docker",
        }
    }
}

/// A single-platform image: manifest, config and layers, all in memory.
#[derive(Debug, Clone)]
struct Built {
    manifest: Blob,
    config: Blob,
    layers: Vec<Blob>,
}

impl Built {
    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    fn blob_digests(&self) -> Vec<String> {
        self.blobs().map(|b| b.digest.clone()).collect()
    }

    fn total_bytes(&self) -> u64 {
        self.manifest.size() + self.blobs().map(Blob::size).sum::<u64>()
    }
}

/// What a single-platform image is made of.
#[derive(Debug, Clone)]
struct ImageSpec<'a> {
    kind: Kind,
    seed: &'a str,
    arch: &'a str,
    variant: Option<&'a str>,
    /// `(name, bytes)` of each layer's random file.
    layers: Vec<(String, usize)>,
}

fn build_image(spec: &ImageSpec<'_>) -> Result<Built> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (name, size) in &spec.layers {
        let tar = layer_tar(spec.seed, name, *size)?;
        diff_ids.push(sha256_digest(&tar));
        layers.push(Blob::new(spec.kind.layer(), gzip(&tar)?));
    }
    let config = Blob::json(
        spec.kind.config(),
        &image_config(spec.arch, spec.variant, diff_ids),
    )?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: spec.kind.manifest().to_owned(),
        artifact_type: None,
        config: config.descriptor(),
        layers: layers.iter().map(Blob::descriptor).collect(),
        subject: None,
        annotations: None,
    };
    let manifest = Blob::json(spec.kind.manifest(), &manifest)?;
    Ok(Built {
        manifest,
        config,
        layers,
    })
}

fn image_config(arch: &str, variant: Option<&str>, diff_ids: Vec<String>) -> ImageConfig {
    let history = diff_ids
        .iter()
        .map(|_| History {
            created: "1970-01-01T00:00:00Z",
            created_by: "regcache test harness",
        })
        .collect();
    ImageConfig {
        created: "1970-01-01T00:00:00Z",
        architecture: arch.to_owned(),
        os: "linux",
        variant: variant.map(str::to_owned),
        config: RunConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            cmd: vec!["/bin/sh"],
            labels: BTreeMap::from([("org.example.regcache.harness", "1")]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids,
        },
        history,
    }
}

/// A tar header: ustar, owner 0:0, mtime 0, checksum set.
fn tar_header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path)?;
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(kind);
    header.set_cksum();
    Ok(header)
}

/// Writes `data/`, `data/<name>.bin` (`bin_len` bytes from `bin`) and
/// `data/<name>.txt`, in that (sorted) order.
fn write_layer_entries<W: Write>(
    builder: &mut tar::Builder<W>,
    seed: &str,
    name: &str,
    bin: impl Read,
    bin_len: u64,
) -> Result<()> {
    builder.append(
        &tar_header("data/", 0, 0o755, tar::EntryType::Directory)?,
        io::empty(),
    )?;
    let bin_header = tar_header(
        &format!("data/{name}.bin"),
        bin_len,
        0o644,
        tar::EntryType::Regular,
    )?;
    builder.append(&bin_header, bin)?;
    let txt = format!("layer {name}, seed {seed}\n");
    let txt_header = tar_header(
        &format!("data/{name}.txt"),
        txt.len() as u64,
        0o644,
        tar::EntryType::Regular,
    )?;
    builder.append(&txt_header, txt.as_bytes())?;
    Ok(())
}

/// The uncompressed tar of a layer with `size` random bytes.
fn layer_tar(seed: &str, name: &str, size: usize) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let bin = seeded_bytes(&format!("{seed}/{name}"), size);
    write_layer_entries(&mut builder, seed, name, bin.as_slice(), size as u64)?;
    Ok(builder.into_inner()?)
}

/// gzip with a fixed level and header (no name, mtime 0, OS "unknown").
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

/// An artifact manifest: artifactType, the empty config, one opaque blob,
/// and `subject` if given. Returns the manifest and its two blobs.
fn build_artifact(seed: &str, name: &str, subject: Option<Descriptor>) -> Result<Built> {
    let config = Blob::new(MT_OCI_EMPTY, b"{}".to_vec());
    let mut content = seeded_bytes(&format!("{seed}/{name}"), 2048);
    content.extend_from_slice(format!("\n{name}\n").as_bytes());
    let blob = Blob::new(MT_ARTIFACT_BLOB, content);
    let mut config_desc = config.descriptor();
    config_desc.data = Some("e30=".to_owned());
    let mut blob_desc = blob.descriptor();
    blob_desc.annotations = Some(annotations(
        "org.opencontainers.image.title",
        &format!("{name}.bin"),
    ));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: MT_OCI_MANIFEST.to_owned(),
        artifact_type: Some(ARTIFACT_TYPE.to_owned()),
        config: config_desc,
        layers: vec![blob_desc],
        subject,
        annotations: Some(created_annotation()),
    };
    Ok(Built {
        manifest: Blob::json(MT_OCI_MANIFEST, &manifest)?,
        config,
        layers: vec![blob],
    })
}

fn annotations(key: &str, value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(key.to_owned(), value.to_owned())])
}

fn created_annotation() -> BTreeMap<String, String> {
    annotations("org.opencontainers.image.created", "1970-01-01T00:00:00Z")
}

fn index_blob(kind: Kind, manifests: Vec<Descriptor>) -> Result<Blob> {
    let index = Index {
        schema_version: 2,
        media_type: kind.index().to_owned(),
        manifests,
    };
    Blob::json(kind.index(), &index)
}

fn platform(arch: &str, variant: Option<&str>) -> Platform {
    Platform {
        architecture: arch.to_owned(),
        os: "linux".to_owned(),
        variant: variant.map(str::to_owned),
    }
}

// --------------------------------------------------------- pushing --

/// Uploads `blob` unless the repository already has it.
async fn push_blob(client: &RegistryClient, repo: &str, blob: &Blob) -> Result<()> {
    if client.blob_exists(repo, &blob.digest).await? {
        return Ok(());
    }
    let payload = Payload::Bytes(blob.bytes.clone());
    client
        .upload_blob(repo, &blob.digest, &payload)
        .await
        .with_context(|| format!("uploading {} to {repo}", blob.digest))
}

/// PUTs `manifest` as `repo:reference`, then checks what the registry serves.
async fn push_manifest(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
    manifest: &Blob,
) -> Result<()> {
    let put = client
        .put_manifest(repo, reference, &manifest.media_type, &manifest.bytes)
        .await?;
    ensure!(
        put == manifest.digest,
        "PUT {repo}:{reference}: registry says {put}, built {}",
        manifest.digest
    );
    verify_manifest(client, repo, reference, &manifest.digest).await
}

/// GET `repo:reference`: the Docker-Content-Digest and the body's hash must be `digest`.
async fn verify_manifest(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
    digest: &str,
) -> Result<()> {
    let got = client.get_manifest(repo, reference).await?;
    ensure!(
        got.digest == digest,
        "{repo}:{reference}: Docker-Content-Digest {}, want {digest}",
        got.digest
    );
    let body = sha256_digest(&got.bytes);
    ensure!(
        body == digest,
        "{repo}:{reference}: served bytes hash to {body}, want {digest}"
    );
    Ok(())
}

/// Pushes a single-platform image's blobs and its manifest as `repo:reference`.
async fn push_built(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
    built: &Built,
) -> Result<()> {
    for blob in built.blobs() {
        push_blob(client, repo, blob).await?;
    }
    push_manifest(client, repo, reference, &built.manifest).await
}

fn pushed(
    repo: &str,
    tag: &str,
    manifest: &Blob,
    blobs: Vec<String>,
    children: Vec<String>,
    total: u64,
) -> Pushed {
    let mut unique = Vec::new();
    for digest in blobs {
        if !unique.contains(&digest) {
            unique.push(digest);
        }
    }
    Pushed {
        reference: format!("{repo}:{tag}"),
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        media_type: manifest.media_type.clone(),
        digest: manifest.digest.clone(),
        blobs: unique,
        children,
        total_bytes: total,
    }
}

async fn push_single(
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    spec: &ImageSpec<'_>,
) -> Result<Pushed> {
    let built = build_image(spec)?;
    push_built(client, repo, tag, &built).await?;
    Ok(pushed(
        repo,
        tag,
        &built.manifest,
        built.blob_digests(),
        Vec::new(),
        built.total_bytes(),
    ))
}

/// An index (OCI or Docker list) of linux/amd64 and linux/arm64/v8 images,
/// children pushed by digest first.
async fn push_multiarch(
    client: &RegistryClient,
    repo: &str,
    kind: Kind,
    seed: &str,
) -> Result<Pushed> {
    let mut descriptors = Vec::new();
    let (mut blobs, mut children, mut total) = (Vec::new(), Vec::new(), 0);
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let prefix = format!("multi-{}-{arch}", kind.name());
        let spec = ImageSpec {
            kind,
            seed,
            arch,
            variant,
            layers: vec![
                (format!("{prefix}-base"), 32 * 1024),
                (format!("{prefix}-app"), 8 * 1024),
            ],
        };
        let built = build_image(&spec)?;
        push_built(client, repo, &built.manifest.digest, &built).await?;
        let mut desc = built.manifest.descriptor();
        desc.platform = Some(platform(arch, variant));
        descriptors.push(desc);
        blobs.extend(built.blob_digests());
        children.push(built.manifest.digest.clone());
        total += built.total_bytes();
    }
    let index = index_blob(kind, descriptors)?;
    push_manifest(client, repo, TAG, &index).await?;
    Ok(pushed(
        repo,
        TAG,
        &index,
        blobs,
        children,
        total + index.size(),
    ))
}

/// The referrer of `subject` (tag `referrer-v1` in the subject's repo) and the
/// referrers tag-schema index `sha256-<subject hex>` listing it.
async fn push_referrer(
    client: &RegistryClient,
    subject: &Pushed,
    seed: &str,
) -> Result<(Pushed, Pushed)> {
    let subject_desc = Descriptor {
        media_type: subject.media_type.clone(),
        size: client
            .get_manifest(&subject.repo, &subject.digest)
            .await?
            .bytes
            .len() as u64,
        digest: subject.digest.clone(),
        platform: None,
        artifact_type: None,
        data: None,
        annotations: None,
    };
    let built = build_artifact(seed, "referrer", Some(subject_desc))?;
    let repo = subject.repo.as_str();
    let tag = format!("referrer-{TAG}");
    push_built(client, repo, &tag, &built).await?;
    let referrer = pushed(
        repo,
        &tag,
        &built.manifest,
        built.blob_digests(),
        Vec::new(),
        built.total_bytes(),
    );
    let mut desc = built.manifest.descriptor();
    desc.artifact_type = Some(ARTIFACT_TYPE.to_owned());
    desc.annotations = Some(created_annotation());
    let index = index_blob(Kind::Oci, vec![desc])?;
    let index_tag = subject.digest.replace(':', "-");
    push_manifest(client, repo, &index_tag, &index).await?;
    let children = vec![built.manifest.digest.clone()];
    let total = built.total_bytes() + index.size();
    let index = pushed(
        repo,
        &index_tag,
        &index,
        built.blob_digests(),
        children,
        total,
    );
    Ok((referrer, index))
}

/// Digest of a signed schema1 manifest: sha256 of the payload without the
/// signatures (`raw[..formatLength] + base64url(formatTail)`).
pub fn schema1_payload_digest(raw: &[u8]) -> Result<String> {
    let manifest: serde_json::Value = serde_json::from_slice(raw)?;
    let protected = manifest["signatures"][0]["protected"]
        .as_str()
        .context("schema1 manifest without signatures[0].protected")?;
    let protected: serde_json::Value = serde_json::from_slice(&b64url(protected)?)?;
    let len = protected["formatLength"]
        .as_u64()
        .context("no formatLength")? as usize;
    let tail = b64url(protected["formatTail"].as_str().context("no formatTail")?)?;
    let mut payload = raw
        .get(..len)
        .context("formatLength past the end")?
        .to_vec();
    payload.extend_from_slice(&tail);
    Ok(sha256_digest(&payload))
}

fn b64url(text: &str) -> Result<Vec<u8>> {
    Ok(URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))?)
}

/// `<prefix>/schema1:v1`, converted from `<prefix>/docker-v2:v1` by skopeo.
async fn push_schema1(
    up: &Upstream,
    client: &RegistryClient,
    prefix: &str,
    docker_v2: &Pushed,
) -> Result<Pushed> {
    require_tool("skopeo");
    let repo = format!("{prefix}/schema1");
    let src = format!("docker://{}/{}", up.addr(), docker_v2.reference);
    let dest = format!("docker://{}/{repo}:{TAG}", up.addr());
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args([
        "copy",
        "-q",
        "--format",
        "v2s1",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]);
    if let Some((user, password)) = up.creds() {
        let creds = format!("{user}:{password}");
        cmd.args(["--src-creds", &creds, "--dest-creds", &creds]);
    }
    cmd.args([&src, &dest])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // tokio spawns the child when output() is called: keep it inside the block.
    let run = async { tokio::time::timeout(SKOPEO_TIMEOUT, cmd.output()).await };
    let out = up.uncounted(run).await.context("skopeo copy timed out")??;
    ensure!(
        out.status.success(),
        "skopeo copy --format v2s1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = client.get_manifest(&repo, TAG).await?;
    let digest = schema1_payload_digest(&got.bytes)?;
    ensure!(
        got.digest == digest,
        "{repo}:{TAG}: registry digest {}, payload digest {digest}",
        got.digest
    );
    let manifest = Blob {
        media_type: MT_SCHEMA1_SIGNED.to_owned(),
        digest,
        bytes: got.bytes.clone(),
    };
    let layers = schema1_layers(&got.bytes)?;
    let layer_bytes = docker_v2.total_bytes - docker_v2_overhead(client, docker_v2).await?;
    Ok(pushed(
        &repo,
        TAG,
        &manifest,
        layers,
        Vec::new(),
        manifest.size() + layer_bytes,
    ))
}

/// Distinct `fsLayers[].blobSum` of a schema1 manifest.
fn schema1_layers(raw: &[u8]) -> Result<Vec<String>> {
    let manifest: serde_json::Value = serde_json::from_slice(raw)?;
    let layers = manifest["fsLayers"]
        .as_array()
        .context("schema1 without fsLayers")?;
    Ok(layers
        .iter()
        .filter_map(|l| l["blobSum"].as_str().map(str::to_owned))
        .collect())
}

/// Bytes of docker_v2's manifest and config (total minus layers).
async fn docker_v2_overhead(client: &RegistryClient, docker_v2: &Pushed) -> Result<u64> {
    let got = client
        .get_manifest(&docker_v2.repo, &docker_v2.digest)
        .await?;
    let manifest: serde_json::Value = serde_json::from_slice(&got.bytes)?;
    let config = manifest["config"]["size"]
        .as_u64()
        .context("docker_v2 config size")?;
    Ok(got.bytes.len() as u64 + config)
}

async fn try_push_standard(up: &Upstream, prefix: &str) -> Result<Images> {
    let client = up.client();
    let seed = DEFAULT_SEED;
    let single = |kind, layers: Vec<(String, usize)>| ImageSpec {
        kind,
        seed,
        arch: "amd64",
        variant: None,
        layers,
    };
    let kib = 1024;
    let small = single(Kind::Oci, vec![("small".into(), 4 * kib)]);
    let small_oci = push_single(&client, &format!("{prefix}/small-oci"), TAG, &small).await?;
    let docker = single(
        Kind::Docker,
        vec![("docker-a".into(), 8 * kib), ("docker-b".into(), 16 * kib)],
    );
    let docker_v2 = push_single(&client, &format!("{prefix}/docker-v2"), TAG, &docker).await?;
    let multiarch_oci =
        push_multiarch(&client, &format!("{prefix}/multiarch-oci"), Kind::Oci, seed).await?;
    let multiarch_docker = push_multiarch(
        &client,
        &format!("{prefix}/multiarch-docker"),
        Kind::Docker,
        seed,
    )
    .await?;
    let many = single(
        Kind::Oci,
        (1..=30).map(|i| (format!("many-{i}"), 64 * kib)).collect(),
    );
    let many_layers = push_single(&client, &format!("{prefix}/many-layers"), TAG, &many).await?;
    let artifact = push_artifact(&client, &format!("{prefix}/artifact"), seed).await?;
    let (referrer, referrers_index) = push_referrer(&client, &small_oci, seed).await?;
    let schema1 = push_schema1(up, &client, prefix, &docker_v2).await?;
    Ok(Images {
        small_oci,
        docker_v2,
        multiarch_oci,
        multiarch_docker,
        many_layers,
        artifact,
        referrer,
        referrers_index,
        schema1,
    })
}

async fn push_artifact(client: &RegistryClient, repo: &str, seed: &str) -> Result<Pushed> {
    let built = build_artifact(seed, "artifact", None)?;
    push_built(client, repo, TAG, &built).await?;
    Ok(pushed(
        repo,
        TAG,
        &built.manifest,
        built.blob_digests(),
        Vec::new(),
        built.total_bytes(),
    ))
}

/// Pushes the standard image set (all but `large`) under `<prefix>/...`, tag
/// `v1`, with the upstream's credentials. Digests do not depend on `prefix`,
/// except schema1's (a schema1 manifest names its repository).
/// Panics on any failure.
pub async fn push_standard(upstream: &Upstream, prefix: &str) -> Images {
    try_push_standard(upstream, prefix)
        .await
        .unwrap_or_else(|e| panic!("pushing the standard images to {}: {e:#}", upstream.addr()))
}

/// A generic single-arch (linux/amd64) OCI image whose layer `i` holds
/// `layer_sizes[i]` random bytes of `seed`. Pushing the same tag again with
/// another seed moves the tag to a new digest.
pub async fn push_oci_image(
    upstream: &Upstream,
    repo: &str,
    tag: &str,
    seed: &str,
    layer_sizes: &[usize],
) -> Pushed {
    let spec = ImageSpec {
        kind: Kind::Oci,
        seed,
        arch: "amd64",
        variant: None,
        layers: layer_sizes
            .iter()
            .enumerate()
            .map(|(i, size)| (format!("layer-{i}"), *size))
            .collect(),
    };
    push_single(&upstream.client(), repo, tag, &spec)
        .await
        .unwrap_or_else(|e| panic!("pushing {repo}:{tag}: {e:#}"))
}

/// An OCI index of linux/amd64 and linux/arm64/v8 images of `seed` as `repo:v1`.
pub async fn push_multiarch_oci(upstream: &Upstream, repo: &str, seed: &str) -> Pushed {
    push_multiarch(&upstream.client(), repo, Kind::Oci, seed)
        .await
        .unwrap_or_else(|e| panic!("pushing {repo}:{TAG}: {e:#}"))
}

/// Uploads `bytes` as a blob of `repo`; returns its digest.
pub async fn push_raw_blob(upstream: &Upstream, repo: &str, bytes: &[u8]) -> String {
    let blob = Blob::new("application/octet-stream", bytes.to_vec());
    push_blob(&upstream.client(), repo, &blob)
        .await
        .unwrap_or_else(|e| panic!("pushing a raw blob to {repo}: {e:#}"));
    blob.digest
}

/// PUTs `bytes` as manifest `repo:reference` with `media_type`; returns the
/// digest the registry reports. The referenced blobs must exist.
pub async fn push_raw_manifest(
    upstream: &Upstream,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    upstream
        .client()
        .put_manifest(repo, reference, media_type, bytes)
        .await
        .unwrap_or_else(|e| panic!("pushing raw manifest {repo}:{reference}: {e:#}"))
}

// ----------------------------------------------------------- large --

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the large layer's tar to `path`, streamed from the generator;
/// returns its digest and size.
fn write_large_tar(path: &Path, seed: &str, bin_len: u64) -> Result<(String, u64)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let writer = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        len: 0,
    };
    let mut builder = tar::Builder::new(writer);
    let bin = SeededReader::new(&format!("{seed}/large"), bin_len);
    write_layer_entries(&mut builder, seed, "large", bin, bin_len)?;
    let mut writer = builder.into_inner()?;
    writer.flush()?;
    let digest = format!("sha256:{}", hex::encode(writer.hasher.finalize()));
    Ok((digest, writer.len))
}

async fn try_push_large(up: &Upstream, repo: &str, tag: &str, size_mib: u64) -> Result<Pushed> {
    let tmp = tempfile::Builder::new()
        .prefix("regcache-large-")
        .tempfile()?;
    let path: PathBuf = tmp.path().to_owned();
    let bin_len = size_mib * 1024 * 1024;
    let (digest, len) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || write_large_tar(&path, DEFAULT_SEED, bin_len)).await??
    };
    let client = up.client();
    if !client.blob_exists(repo, &digest).await? {
        client
            .upload_blob(repo, &digest, &Payload::File { path, len })
            .await?;
    }
    let layer = Descriptor {
        media_type: MT_OCI_LAYER_TAR.to_owned(),
        digest: digest.clone(),
        size: len,
        platform: None,
        artifact_type: None,
        data: None,
        annotations: None,
    };
    let config = Blob::json(
        MT_OCI_CONFIG,
        &image_config("amd64", None, vec![digest.clone()]),
    )?;
    push_blob(&client, repo, &config).await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: MT_OCI_MANIFEST.to_owned(),
        artifact_type: None,
        config: config.descriptor(),
        layers: vec![layer],
        subject: None,
        annotations: None,
    };
    let manifest = Blob::json(MT_OCI_MANIFEST, &manifest)?;
    push_manifest(&client, repo, tag, &manifest).await?;
    let total = manifest.size() + config.size() + len;
    Ok(pushed(
        repo,
        tag,
        &manifest,
        vec![config.digest.clone(), digest],
        Vec::new(),
        total,
    ))
}

/// One uncompressed tar layer (`application/vnd.oci.image.layer.v1.tar`)
/// holding `size_mib` MiB of seeded random bytes, built to a temp file by a
/// streaming generator and uploaded streamed; then its config and manifest.
pub async fn push_large(upstream: &Upstream, repo: &str, tag: &str, size_mib: u64) -> Pushed {
    try_push_large(upstream, repo, tag, size_mib)
        .await
        .unwrap_or_else(|e| panic!("pushing large image {repo}:{tag}: {e:#}"))
}

/// The largest blob of `image` and its size, as the upstream reports them: each blob is HEADed
/// at the upstream (a blob without a length counts as empty).
pub async fn largest_blob(upstream: &Upstream, image: &Pushed) -> (String, u64) {
    let client = super::http::client();
    let (mut layer, mut layer_size) = (String::new(), 0);
    for digest in &image.blobs {
        let url = format!("{}/v2/{}/blobs/{digest}", upstream.url(), image.repo);
        let head = client.head(&url).send().await.expect("HEAD upstream blob");
        // A HEAD's body is empty: its size is in the header.
        let size: u64 = head
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        if size > layer_size {
            (layer, layer_size) = (digest.clone(), size);
        }
    }
    (layer, layer_size)
}
