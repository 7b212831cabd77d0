//! Air-gapped sites: `regcache prefetch` fills the store ahead of any pull, through the same
//! verified fill path a client pull takes (it calls [`Cache::manifest`] and [`Cache::blob`] and
//! drains the streams).
//!
//! `airgap` sits beside `http` on top of `cache`: it may use `cache`, `store` and `oci`, never
//! `upstream` directly (every byte from an upstream comes through the cache's fills) and never
//! HTTP types. Bytes that do not come from an upstream (an imported archive) enter the store
//! only through [`store_verified`], which hashes while writing and refuses a mismatch.

pub mod admin;
pub mod archive;
pub(crate) mod entries;
pub mod import;
pub mod prefetch;
mod progress;

use std::io::Read;
use std::sync::Arc;

use crate::cache::{Cache, CacheError, Target};
use crate::config::Config;
use crate::oci::{manifest_digest, Digest, MediaType, ParseError, Reference, MAX_MANIFEST_BYTES};
use crate::routing::{split_image_ref, ResolveError, Resolver};
use crate::store::{Namespace, Store, StoreError};

/// Why an air-gap command failed.
#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    /// An image reference could not be resolved to a configured upstream.
    #[error("{reference}: {source}")]
    Resolve {
        /// The reference as written.
        reference: String,
        /// Why.
        #[source]
        source: ResolveError,
    },
    /// An image reference's tag or digest is invalid.
    #[error("{reference}: {source}")]
    Reference {
        /// The reference as written.
        reference: String,
        /// Why.
        #[source]
        source: ParseError,
    },
    /// A list file could not be read.
    #[error("reading {path}: {source}")]
    ReadList {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache could not answer.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bytes did not match their digest; nothing was stored.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the bytes were named by.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// Reading the bytes to store failed (a truncated archive).
    #[error("reading: {0}")]
    Read(#[source] std::io::Error),
    /// An image could not be processed.
    #[error("{image}: {reason}")]
    Image {
        /// The reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file (or archive entry).
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An archive entry is damaged, tampered with or missing; nothing unverified was stored.
    #[error("archive entry {entry}: {reason}")]
    Entry {
        /// The entry's path in the archive.
        entry: String,
        /// What is wrong.
        reason: String,
    },
}

/// An image named on the command line or in a list file, resolved to an upstream.
#[derive(Debug, Clone)]
pub struct ImageRef {
    /// The reference as written.
    pub text: String,
    /// Which upstream and repository.
    pub target: Target,
    /// The tag or digest.
    pub reference: Reference,
}

impl ImageRef {
    /// Resolves `text` (`<upstream>/<repository>:<tag>`, `...@sha256:<hex>`, or a name that
    /// routes to the default upstream, as `regcache pin` takes it).
    ///
    /// # Errors
    /// [`AirgapError::Resolve`] or [`AirgapError::Reference`].
    pub fn parse(resolver: &Resolver, text: &str) -> Result<Self, AirgapError> {
        let (name, reference) = split_image_ref(text);
        let resolved = resolver
            .resolve(None, name)
            .map_err(|source| AirgapError::Resolve {
                reference: text.to_owned(),
                source,
            })?;
        let reference = Reference::parse(reference).map_err(|source| AirgapError::Reference {
            reference: text.to_owned(),
            source,
        })?;
        Ok(Self {
            text: text.to_owned(),
            target: Target {
                upstream: resolved.upstream,
                repo: resolved.repo,
            },
            reference,
        })
    }
}

/// What `prefetch` and `export` take: which images, which platforms, and referrers.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    /// Only these platforms of an index (`linux/amd64,linux/arm64/v8`); default all.
    #[arg(long = "platform", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// Also take what refers to each manifest (signatures, SBOMs, attestations).
    #[arg(long)]
    pub referrers: bool,
    /// Take images a `[[policy]]` refuses (unsigned, or not signed by its keys), with a warning
    /// for each, instead of failing on them.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// A file of references, one per line (`#` comments).
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Images: `<upstream>/<repository>:<tag>` or `...@sha256:<hex>`.
    pub images: Vec<String>,
}

impl SelectArgs {
    /// The images given and those of the list file.
    ///
    /// # Errors
    /// [`AirgapError::ReadList`].
    pub fn image_list(&self) -> Result<Vec<String>, AirgapError> {
        let mut images = self.images.clone();
        if let Some(file) = &self.file {
            images.extend(read_list(file)?);
        }
        Ok(images)
    }
}

/// A runtime for a CLI command, or the exit code after saying why there is none.
fn runtime() -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Runtime::new().map_err(|err| {
        eprintln!("regcache: starting the async runtime: {err}");
        std::process::ExitCode::FAILURE
    })
}

/// The references of a list file: one per line; blank lines and `#` comments skipped.
///
/// # Errors
/// [`AirgapError::ReadList`].
pub fn read_list(path: &std::path::Path) -> Result<Vec<String>, AirgapError> {
    let text = std::fs::read_to_string(path).map_err(|source| AirgapError::ReadList {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

/// What is being stored: a blob (named by the sha256 of its bytes) or a manifest of a media
/// type (named by [`manifest_digest`], which for schema1 leaves out the signatures).
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    /// A config or layer.
    Blob,
    /// A manifest.
    Manifest(&'a MediaType),
}

/// Writes `reader` into the store under `digest` if and only if the bytes match it: blobs are
/// hashed while they stream to a temp file, manifests (small) are read whole and checked with
/// the schema1 rule. The one way air-gap code writes bytes that did not come through a fill.
/// Blocking. Returns the size.
///
/// # Errors
/// [`AirgapError::DigestMismatch`] (nothing stored), [`AirgapError::Read`], [`AirgapError::Store`].
pub fn store_verified(
    store: &Store,
    namespace: &Namespace,
    digest: &Digest,
    content: Content<'_>,
    mut reader: impl Read,
) -> Result<u64, AirgapError> {
    if let Content::Manifest(media_type) = content {
        let mut bytes = Vec::new();
        let limit = MAX_MANIFEST_BYTES as u64 + 1;
        (&mut reader)
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(AirgapError::Read)?;
        let actual = manifest_digest(&bytes, media_type);
        if bytes.len() as u64 == limit || actual != *digest {
            return Err(AirgapError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        store.put_verified(namespace, digest, &bytes)?;
        return Ok(bytes.len() as u64);
    }
    match store.put_stream_verified(namespace, digest, &mut reader) {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            Err(AirgapError::DigestMismatch { expected, actual })
        }
        other => Ok(other?),
    }
}

/// A cache over the configured store for a command run while no server holds it.
///
/// # Errors
/// A description when the store cannot be opened (a server holds it) or the cache not built.
pub fn open_cache(
    config: &Config,
    access: crate::store::IndexAccess,
) -> Result<Arc<Cache>, crate::RunError> {
    let (store, index) = crate::store::open_storage(&config.storage, access)?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    Ok(Arc::new(Cache::new(config, store, index, metrics)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_verified_refuses_a_mismatch_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open_local(dir.path()).expect("store");
        let namespace = Namespace::new("r.test");
        let digest = Digest::of(b"good bytes");
        let err = store_verified(
            &store,
            &namespace,
            &digest,
            Content::Blob,
            &b"bad bytes"[..],
        )
        .expect_err("a mismatch is refused");
        assert!(matches!(err, AirgapError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&namespace, &digest));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0,
            "the temp file is gone"
        );
        let size = store_verified(
            &store,
            &namespace,
            &digest,
            Content::Blob,
            &b"good bytes"[..],
        )
        .expect("ok");
        assert_eq!(size, 10);
        assert!(store.contains(&namespace, &digest));
    }

    #[test]
    fn list_files_skip_comments_and_blank_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("list");
        std::fs::write(
            &path,
            "# images\nr.test/a:v1\n\n  r.test/b@sha256:00 # pinned\n",
        )
        .expect("write");
        assert_eq!(
            read_list(&path).expect("read"),
            ["r.test/a:v1", "r.test/b@sha256:00"]
        );
    }
}
