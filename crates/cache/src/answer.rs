//! The cache's answers and errors: the domain values the HTTP layer turns into responses
//! (`CacheError` and its one classification, the manifest and blob answers, ranges).

use std::sync::Arc;

use bytes::Bytes;

use crate::fill::FillReader;
use crate::{direct, routing, Refusal};
use regcache_oci::{Digest, MediaType, RepoName};
use regcache_store::{Chunks, StoreError};
use regcache_upstream::{Answer, ErrorClass, Health, Origin, UpstreamError};

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The upstream failed or said no.
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
    /// The store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The upstream sent bytes that do not match the digest.
    #[error("digest mismatch: expected {expected}, upstream sent {actual}")]
    DigestMismatch {
        /// The digest asked for (or announced by the upstream).
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The upstream sent something that is not a manifest.
    #[error("upstream sent a manifest regcache cannot identify")]
    NotAManifest,
    /// The content is not cached and the upstream is offline or was not asked.
    #[error("not cached and upstream {upstream} is offline")]
    NotCachedOffline {
        /// The upstream's name.
        upstream: String,
    },
    /// Too many fills at once.
    #[error("too many concurrent upstream fills")]
    Busy,
    /// A fill task ended without a result (it panicked or the runtime is shutting down).
    #[error("upstream fill aborted")]
    FillAborted,
    /// The failure of a fill that other requests share.
    #[error(transparent)]
    Shared(Arc<CacheError>),
    /// `credentials = "client"`: the upstream refused this client the repository (its `401`
    /// or `403`, passed on).
    #[error("upstream {upstream} refused {who} access to this repository ({status})")]
    AccessRefused {
        /// The upstream's name.
        upstream: String,
        /// The client's user name, or "an anonymous client".
        who: String,
        /// The upstream's status, 401 or 403.
        status: http::StatusCode,
    },
    /// `[[policy]]`: a runnable image of a covered repository without a signature the policy
    /// accepts.
    #[error("signature policy: {}", refusal.text())]
    PolicyRefused {
        /// `<upstream>/<repository>@<digest>`.
        image: String,
        /// Why.
        refusal: Refusal,
    },
    /// `credentials = "client"`: the upstream cannot be asked whether this client may read the
    /// repository, and it did not say so within `client_auth_offline_grace`.
    #[error("upstream {upstream} cannot confirm this client's access ({cause}), and it did not within client_auth_offline_grace")]
    AccessUnconfirmed {
        /// The upstream's name.
        upstream: String,
        /// Why it could not be asked.
        cause: String,
    },
}

impl CacheError {
    /// The error itself, looking through [`CacheError::Shared`].
    pub fn root(&self) -> &CacheError {
        match self {
            Self::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

impl CacheError {
    /// The one classification of this error (see [`UpstreamError::class`]); `http/error.rs`
    /// only maps it.
    pub fn class(&self) -> ErrorClass {
        let ours = |origin, answer| ErrorClass {
            origin,
            answer,
            retryable: false,
            health: Health::Unknown,
            unavailable: false,
            reason: None,
        };
        match self.root() {
            Self::Upstream(err) => err.class(),
            Self::DigestMismatch { .. } | Self::NotAManifest => {
                ours(Origin::Upstream, Answer::BadContent)
            }
            Self::NotCachedOffline { .. } => ours(Origin::Client, Answer::Unknown),
            Self::AccessRefused { .. } | Self::PolicyRefused { .. } => {
                ours(Origin::Client, Answer::Unauthorized)
            }
            Self::AccessUnconfirmed { .. } => ours(Origin::Upstream, Answer::Offline),
            Self::Busy => ours(Origin::Overload, Answer::Busy),
            Self::Store(err) if err.unavailable_store().is_some() => {
                ours(Origin::Internal, Answer::StoreUnavailable)
            }
            Self::Store(_) | Self::FillAborted | Self::Shared(_) => {
                ours(Origin::Internal, Answer::Internal)
            }
        }
    }

    /// The upstream the error is about, if any.
    pub fn upstream(&self) -> Option<&str> {
        match self.root() {
            Self::Upstream(err) => Some(err.upstream()),
            Self::NotCachedOffline { upstream }
            | Self::AccessRefused { upstream, .. }
            | Self::AccessUnconfirmed { upstream, .. } => Some(upstream),
            _ => None,
        }
    }

    /// The object store that could not be reached, if that is the error.
    pub fn object_store(&self) -> Option<&str> {
        match self.root() {
            Self::Store(err) => err.unavailable_store(),
            _ => None,
        }
    }

    /// The `Retry-After` to send, if any.
    pub fn retry_after(&self) -> Option<String> {
        match self.root() {
            Self::Upstream(err) => err.retry_after(),
            Self::Busy => Some("1".to_owned()),
            Self::Store(err) if err.unavailable_store().is_some() => Some("5".to_owned()),
            _ => None,
        }
    }
}

impl From<StoreError> for CacheError {
    fn from(err: StoreError) -> Self {
        Self::Store(Arc::new(err))
    }
}

impl From<UpstreamError> for CacheError {
    fn from(err: UpstreamError) -> Self {
        Self::Upstream(Arc::new(err))
    }
}

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePhase {
    /// From memory or disk, without asking the upstream.
    Hit,
    /// Fetched from the upstream (and cached).
    Miss,
    /// Joined a fetch another request had started.
    Coalesced,
    /// A cached tag the upstream confirmed (or moved).
    Revalidated,
    /// A cached tag served because the upstream could not be asked.
    Stale,
    /// Passed through without caching (referrers).
    PassThrough,
}

impl CachePhase {
    /// A short lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::Revalidated => "revalidated",
            Self::Stale => "stale",
            Self::PassThrough => "pass-through",
        }
    }
}

/// Which upstream and repository a request is for; resolved from the client's path by the
/// HTTP layer.
#[derive(Debug, Clone)]
pub struct Target {
    /// Index into the configured upstreams.
    pub upstream: usize,
    /// The repository name as the upstream knows it.
    pub repo: RepoName,
}

impl From<routing::Resolved> for Target {
    fn from(resolved: routing::Resolved) -> Self {
        Self {
            upstream: resolved.upstream,
            repo: resolved.repo,
        }
    }
}

/// A verified manifest.
#[derive(Debug)]
pub struct Manifest {
    /// Its digest (for schema1, over the unsigned payload).
    pub digest: Digest,
    /// Its media type.
    pub media_type: MediaType,
    /// The exact bytes the upstream sent.
    pub bytes: Bytes,
}

/// A manifest answer.
#[derive(Debug)]
pub struct ManifestAnswer {
    /// The manifest.
    pub manifest: Arc<Manifest>,
    /// How it was answered.
    pub phase: CachePhase,
}

/// A byte range `[start, end)` of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The body of a blob answer.
#[derive(Debug)]
pub enum BlobBody {
    /// Verified bytes from the store (the requested range of them).
    Stored(Chunks),
    /// A blob being filled.
    Filling(BlobStream),
}

impl BlobBody {
    /// The next chunk, `None` at the end; an error aborts the client's connection.
    ///
    /// # Cancel safety
    /// Not cancel safe; poll it to completion from one body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        match self {
            Self::Stored(chunks) => chunks.next_chunk().await,
            Self::Filling(stream) => stream.next_chunk().await,
        }
    }
}

/// A blob streaming from the upstream: through a shared fill, or (when the store cannot be
/// written) straight through. Either way it yields an error, aborting the client connection,
/// if the bytes fail verification, and holds back the final bytes until they pass.
#[derive(Debug)]
pub struct BlobStream(pub(crate) StreamSource);

#[derive(Debug)]
pub(crate) enum StreamSource {
    Fill(FillReader),
    Direct(direct::DirectStream),
}

impl BlobStream {
    /// The next chunk.
    ///
    /// # Cancel safety
    /// Not cancel safe; poll it to completion from one body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        match &mut self.0 {
            StreamSource::Fill(reader) => reader.next_chunk().await,
            StreamSource::Direct(stream) => stream.next_chunk().await,
        }
    }

    /// After the last chunk: whether the blob is now stored (its fill committed it). A stream
    /// straight from the upstream (store trouble) stores nothing. For callers that need the
    /// blob kept, not only read (prefetch), before they exit.
    pub async fn stored(&mut self) -> bool {
        match &mut self.0 {
            StreamSource::Fill(reader) => reader.committed().await,
            StreamSource::Direct(_) => false,
        }
    }
}

/// A blob answer.
#[derive(Debug)]
pub struct BlobAnswer {
    /// The whole blob's size, when known.
    pub size: Option<u64>,
    /// The range served, when the client asked for one and it could be honoured.
    pub range: Option<ByteRange>,
    /// The bytes.
    pub body: BlobBody,
    /// How it was answered.
    pub phase: CachePhase,
}

/// What a blob request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// The whole blob.
    Full,
    /// `bytes=start-` or `bytes=start-last`.
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        last: Option<u64>,
    },
    /// `bytes=-n`.
    Suffix(u64),
}

impl RangeRequest {
    /// Resolves against a known size; `Ok(None)` means the whole blob.
    ///
    /// # Errors
    /// [`RangeNotSatisfiable`] when the range starts past the end.
    pub fn resolve(self, size: u64) -> Result<Option<ByteRange>, RangeNotSatisfiable> {
        let unsatisfiable = RangeNotSatisfiable { size };
        match self {
            Self::Full => Ok(None),
            Self::From { start, last } => {
                let end = last.map_or(size, |last| last.saturating_add(1).min(size));
                if start >= size || start >= end {
                    return Err(unsatisfiable);
                }
                Ok(Some(ByteRange { start, end }))
            }
            Self::Suffix(0) => Err(unsatisfiable),
            Self::Suffix(n) => Ok(Some(ByteRange {
                start: size.saturating_sub(n),
                end: size,
            })),
        }
    }
}

/// Raised when a range cannot be satisfied; the HTTP layer answers 416.
#[derive(Debug)]
pub struct RangeNotSatisfiable {
    /// The blob's size.
    pub size: u64,
}

/// What a blob request gets: the blob (or the requested part of it), or 416 when the range
/// lies outside the blob.
#[derive(Debug)]
// Returned once per request and matched at once: a box would cost an allocation per blob.
#[allow(clippy::large_enum_variant)]
pub enum BlobReply {
    /// The blob, whole or the requested range.
    Found(BlobAnswer),
    /// The requested range lies outside the blob.
    RangeNotSatisfiable(RangeNotSatisfiable),
}
