//! `regcache export`: writes cached images as an OCI image layout in a tar (`oci-layout`,
//! `index.json`, `blobs/sha256/…`), byte for byte as the upstream sent them: no manifest is
//! rewritten, converted or recompressed, so every digest stays the upstream's. Each image in
//! `index.json` carries its full reference (`registry.test/test/app:v1`) as
//! `org.opencontainers.image.ref.name`; referrers are listed by digest (`…@sha256:…`) so that
//! `regcache import` knows their repository.
//!
//! OCI layout readers (containers/image: skopeo, podman, buildah) take only OCI types in
//! `index.json`. A Docker manifest or manifest list is therefore named there through a
//! *wrapper*: a small OCI index written for the archive that lists the Docker manifest (or the
//! list's own entries, platforms included), so those tools pick the very bytes the upstream
//! sent; the wrapper's annotations name the real root, which is what `regcache import` files
//! the tag under (the wrapper itself is never imported). A signed schema1 manifest is named as
//! it is: only regcache reads it back.
//!
//! Streaming: blobs are copied from the store's files into the tar; memory holds the manifests
//! only. The archive is written under a temporary name and renamed when complete.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::prefetch::{walk, Options, Walked};
use super::{AirgapError, ImageRef};
use crate::cache::{BlobBody, Cache, RangeRequest, Target};
use crate::config::Config;
use crate::oci::{Digest, MediaType, Reference};

/// The annotation naming an image in an OCI layout's `index.json`.
pub(super) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// On a wrapper's descriptor in `index.json`: the digest of the manifest it stands for.
pub(super) const WRAPPED_ROOT: &str = "io.regcache.export.root";
/// On a wrapper's descriptor in `index.json`: the media type of the manifest it stands for.
pub(super) const WRAPPED_MEDIA_TYPE: &str = "io.regcache.export.root.media-type";

/// Arguments of `regcache export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Images, platforms, referrers.
    #[command(flatten)]
    pub select: super::SelectArgs,
    /// The archive to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Every cached tag.
    #[arg(long)]
    pub all: bool,
    /// Leave out the blobs (configs and layers) an earlier archive already carries; the site
    /// must have imported that one first. Manifests are always written.
    #[arg(long)]
    pub since: Option<PathBuf>,
}

/// `index.json` of an OCI image layout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LayoutIndex {
    pub(super) schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) media_type: Option<String>,
    #[serde(default)]
    pub(super) manifests: Vec<LayoutDescriptor>,
}

/// A descriptor of `index.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LayoutDescriptor {
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) annotations: BTreeMap<String, String>,
}

/// The full reference of an image: upstream name, repository, tag or digest.
fn full_reference(cache: &Cache, target: &Target, reference: &Reference) -> String {
    let upstream = cache.upstreams()[target.upstream].name();
    match reference {
        Reference::Tag(tag) => format!("{upstream}/{}:{tag}", target.repo),
        Reference::Digest(digest) => format!("{upstream}/{}@{digest}", target.repo),
    }
}

/// The wrapper OCI index standing for a Docker manifest or manifest list (see the module doc);
/// `None` for any other type.
fn wrapper(media_type: &MediaType, digest: &Digest, bytes: &[u8]) -> Option<Vec<u8>> {
    let entries = match media_type.as_str() {
        MediaType::DOCKER_MANIFEST => vec![serde_json::json!({
            "mediaType": media_type.as_str(),
            "digest": digest.to_string(),
            "size": bytes.len(),
        })],
        MediaType::DOCKER_LIST => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()?
            .get("manifests")?
            .as_array()?
            .clone(),
        _ => return None,
    };
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::OCI_INDEX,
        "manifests": entries,
    }))
    .ok()
}

/// `index.json` and the wrapper indexes it names (digest, bytes), to be written as blobs.
struct Layout {
    index: LayoutIndex,
    wrappers: Vec<(Digest, Vec<u8>)>,
}

impl Layout {
    /// Names a manifest in `index.json`: as it is, or through a wrapper.
    fn name(&mut self, media_type: &MediaType, digest: &Digest, bytes: &[u8], name: String) {
        let mut annotations = BTreeMap::from([(REF_NAME.to_owned(), name)]);
        let descriptor = match wrapper(media_type, digest, bytes) {
            Some(wrapper) => {
                let wrapper_digest = Digest::of(&wrapper);
                annotations.insert(WRAPPED_ROOT.to_owned(), digest.to_string());
                annotations.insert(WRAPPED_MEDIA_TYPE.to_owned(), media_type.to_string());
                let descriptor = LayoutDescriptor {
                    media_type: MediaType::OCI_INDEX.to_owned(),
                    digest: wrapper_digest.to_string(),
                    size: wrapper.len() as u64,
                    annotations,
                };
                self.wrappers.push((wrapper_digest, wrapper));
                descriptor
            }
            None => LayoutDescriptor {
                media_type: media_type.to_string(),
                digest: digest.to_string(),
                size: bytes.len() as u64,
                annotations,
            },
        };
        self.index.manifests.push(descriptor);
    }
}

/// The references to export: those given, the list file's, and with `all` every cached tag.
fn images_to_export(cache: &Cache, args: &ExportArgs) -> Result<Vec<String>, AirgapError> {
    let mut images = args.select.image_list()?;
    if args.all {
        for (namespace, repo, tag, _) in cache.index().tags()? {
            images.push(format!("{}/{repo}:{tag}", namespace.as_str()));
        }
    }
    Ok(images)
}

/// Exports `images` from `cache` (which should be offline: export never fetches) to `output`.
/// Returns the number of images written.
///
/// # Errors
/// [`AirgapError`] naming the first image that is not completely cached, or the write failure;
/// nothing is left at `output` then.
pub async fn export(
    cache: &Arc<Cache>,
    resolver: &crate::routing::Resolver,
    images: &[String],
    options: &Options,
    since: Option<&Path>,
    output: &Path,
) -> Result<usize, AirgapError> {
    let skip: HashSet<String> = match since {
        Some(old) => super::entries::list_entries(old)?.into_keys().collect(),
        None => HashSet::new(),
    };
    let mut walked: Vec<(ImageRef, Walked)> = Vec::new();
    for text in images {
        let image = ImageRef::parse(resolver, text)?;
        let image_walk = walk(cache, &image, options)
            .await
            .map_err(|err| AirgapError::Image {
                image: text.clone(),
                reason: match &err {
                    AirgapError::Cache(err) => export_reason(err, text),
                    other => other.to_string(),
                },
            })?;
        walked.push((image, image_walk));
    }
    let Layout { index, wrappers } = layout_index(cache, &walked);
    let index_json = serde_json::to_vec_pretty(&index).map_err(|e| AirgapError::Write {
        path: output.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let cache = Arc::clone(cache);
    let output = output.to_owned();
    let handle = tokio::runtime::Handle::current();
    let count = walked.len();
    tokio::task::spawn_blocking(move || {
        write_archive(
            &handle,
            &cache,
            &walked,
            &index_json,
            &wrappers,
            &skip,
            &output,
        )
    })
    .await
    .map_err(|_| AirgapError::Cache(crate::cache::CacheError::FillAborted))??;
    Ok(count)
}

/// `index.json`: each image at its root manifest, named by its full reference; tag-schema
/// tags (`sha256-<hex>`, `.sig`, …) by theirs; each referrer by digest (so an import knows
/// its repository). Docker types through wrappers (see the module doc).
fn layout_index(cache: &Cache, walked: &[(ImageRef, Walked)]) -> Layout {
    let mut layout = Layout {
        index: LayoutIndex {
            schema_version: 2,
            media_type: Some(MediaType::OCI_INDEX.to_owned()),
            manifests: Vec::new(),
        },
        wrappers: Vec::new(),
    };
    for (image, image_walk) in walked {
        let root = &image_walk.root;
        let name = full_reference(cache, &image.target, &image.reference);
        layout.name(&root.media_type, &root.digest, &root.bytes, name);
        for (tag, manifest) in &image_walk.schema_tags {
            let name = full_reference(cache, &image.target, &Reference::Tag(tag.clone()));
            layout.name(
                &manifest.media_type,
                &manifest.digest,
                &manifest.bytes,
                name,
            );
        }
        for manifest in &image_walk.manifests {
            if image_walk.referrers.contains(&manifest.digest) {
                let name =
                    full_reference(cache, &image.target, &Reference::Digest(manifest.digest));
                layout.name(
                    &manifest.media_type,
                    &manifest.digest,
                    &manifest.bytes,
                    name,
                );
            }
        }
    }
    layout
}

/// Writes the tar: `oci-layout`, `index.json`, then each manifest and blob once. Blocking (it
/// drives the cache's async blob lookups through `handle`).
fn write_archive(
    handle: &tokio::runtime::Handle,
    cache: &Arc<Cache>,
    walked: &[(ImageRef, Walked)],
    index_json: &[u8],
    wrappers: &[(Digest, Vec<u8>)],
    skip: &HashSet<String>,
    output: &Path,
) -> Result<(), AirgapError> {
    let write_err = |source| AirgapError::Write {
        path: output.to_owned(),
        source,
    };
    let temp = output.with_extension("partial");
    let file = std::fs::File::create(&temp).map_err(write_err)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let result = write_entries(
        handle,
        cache,
        walked,
        index_json,
        wrappers,
        skip,
        &mut builder,
    )
    .and_then(|()| {
        let mut writer = builder.into_inner().map_err(write_err)?;
        writer.flush().map_err(write_err)?;
        writer.get_ref().sync_all().map_err(write_err)
    });
    match result {
        Ok(()) => std::fs::rename(&temp, output).map_err(write_err),
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            Err(err)
        }
    }
}

fn write_entries<W: std::io::Write>(
    handle: &tokio::runtime::Handle,
    cache: &Arc<Cache>,
    walked: &[(ImageRef, Walked)],
    index_json: &[u8],
    wrappers: &[(Digest, Vec<u8>)],
    skip: &HashSet<String>,
    builder: &mut tar::Builder<W>,
) -> Result<(), AirgapError> {
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(
        builder,
        "oci-layout",
        layout.as_slice(),
        layout.len() as u64,
    )?;
    append(builder, "index.json", index_json, index_json.len() as u64)?;
    let mut written = HashSet::new();
    for (digest, bytes) in wrappers {
        if written.insert(*digest) {
            append(builder, &blob_path(digest), &bytes[..], bytes.len() as u64)?;
        }
    }
    for (image, image_walk) in walked {
        for manifest in &image_walk.manifests {
            if written.insert(manifest.digest) {
                let bytes = &manifest.bytes[..];
                append(
                    builder,
                    &blob_path(&manifest.digest),
                    bytes,
                    bytes.len() as u64,
                )?;
            }
        }
        for digest in &image_walk.blobs {
            if !written.insert(*digest) || skip.contains(&blob_path(digest)) {
                continue;
            }
            let not_cached = |reason: String| AirgapError::Image {
                image: image.text.clone(),
                reason: format!("blob {digest}: {reason}"),
            };
            let answer = handle
                .block_on(cache.blob(&image.target, digest, RangeRequest::Full))
                .map_err(|err| not_cached(export_reason(&err, &image.text)))?;
            let crate::cache::BlobReply::Found(crate::cache::BlobAnswer {
                body: BlobBody::Stored(chunks),
                size: Some(len),
                ..
            }) = answer
            else {
                return Err(not_cached(format!(
                    "not cached here (`regcache prefetch {}` fetches it)",
                    image.text
                )));
            };
            let reader = ChunkRead {
                handle,
                chunks,
                current: bytes::Bytes::new(),
            };
            append(builder, &blob_path(digest), reader, len)?;
        }
    }
    Ok(())
}

/// Why `image` cannot be exported, for the operator. Export opens the cache offline (it reads
/// only the store), so "not cached" is the whole story, and `prefetch` the fix: the upstream
/// itself may well be reachable.
fn export_reason(err: &crate::cache::CacheError, image: &str) -> String {
    match err.root() {
        crate::cache::CacheError::NotCachedOffline { .. } => format!(
            "not cached here (export reads only the store; `regcache prefetch {image}` fetches it, with every platform and manifest it names)"
        ),
        other => other.to_string(),
    }
}

/// A stored blob's chunks as a blocking `Read`, for the tar writer (which runs off the async
/// threads).
struct ChunkRead<'a> {
    handle: &'a tokio::runtime::Handle,
    chunks: crate::store::Chunks,
    current: bytes::Bytes,
}

impl std::io::Read for ChunkRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.handle.block_on(self.chunks.next_chunk()) {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let len = buf.len().min(self.current.len());
        buf[..len].copy_from_slice(&self.current.split_to(len));
        Ok(len)
    }
}

/// `blobs/sha256/<hex>`.
pub(super) fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Appends one regular file (mode 0644, mtime 0: the same content gives the same archive).
fn append<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    data: impl std::io::Read,
    size: u64,
) -> Result<(), AirgapError> {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, path, data)
        .map_err(|source| AirgapError::Write {
            path: PathBuf::from(path),
            source,
        })
}

/// `regcache export`: runs on the stopped store, never contacting an upstream.
pub fn main(config: &Config, args: ExportArgs) -> ExitCode {
    let mut offline = config.clone();
    for upstream in &mut offline.upstreams {
        upstream.offline = true;
    }
    let options = Options {
        platforms: args.select.platforms.clone(),
        referrers: args.select.referrers,
        jobs: 1,
        allow_unsigned: args.select.allow_unsigned,
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        if super::admin::connect(config).await.is_some() {
            // Export reads the index, which the server holds; it never needs the network, so
            // it does not run inside the server (whose cache would fetch what is missing).
            return Err("a server is running on this store; stop it to export".to_owned());
        }
        let cache = super::open_cache(&offline, crate::store::IndexAccess::Existing)
            .map_err(|e| e.to_string())?;
        let images = images_to_export(&cache, &args).map_err(|e| e.to_string())?;
        if images.is_empty() {
            return Err("no images given (REF..., --file LIST or --all)".to_owned());
        }
        export(
            &cache,
            &crate::routing::Resolver::for_upstreams(&config.upstreams),
            &images,
            &options,
            args.since.as_deref(),
            &args.output,
        )
        .await
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(count) => {
            eprintln!(
                "regcache export: {count} images written to {}",
                args.output.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("regcache export: {err}");
            ExitCode::FAILURE
        }
    }
}
