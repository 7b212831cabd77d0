//! What the client hands back: a manifest as sent, a blob response whose body streams, small
//! pass-through bodies and tag-list pages.

use bytes::Bytes;
use futures_util::Stream;

use crate::UpstreamError;
use regcache_oci::{Digest, MediaType};

/// A manifest as the upstream sent it.
#[derive(Debug)]
pub struct FetchedManifest {
    /// The raw bytes.
    pub bytes: Bytes,
    /// The upstream's `Content-Type`, if it was a plausible media type.
    pub media_type: Option<MediaType>,
    /// The upstream's `Docker-Content-Digest`, if it sent a valid one.
    pub digest_header: Option<Digest>,
}

/// A blob response whose body has not been read yet.
pub struct BlobResponse {
    /// The blob's total size, when known (from `Content-Length` or `Content-Range`).
    pub total_size: Option<u64>,
    /// The offset of the body's first byte: the requested offset when the upstream honoured
    /// the range, 0 when it sent the whole blob.
    pub offset: u64,
    /// The body.
    pub body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>,
}

impl std::fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobResponse")
            .field("total_size", &self.total_size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// A small response passed through to the client as it came (tag lists, referrers).
#[derive(Debug)]
pub struct PassThrough {
    /// The upstream's `Content-Type`.
    pub content_type: Option<String>,
    /// The upstream's `Link` header (pagination), unrewritten.
    pub link: Option<String>,
    /// The body.
    pub bytes: Bytes,
}

/// One page of a tag list, read up to a limit ([`UpstreamClient::get_tag_page`]).
#[derive(Debug)]
pub struct TagPageBody {
    /// The upstream's `Link` header (the next page), unrewritten.
    pub link: Option<String>,
    /// The body, or its first bytes when `cut_short`.
    pub bytes: Bytes,
    /// Whether the body went on past the limit (the rest was not read).
    pub cut_short: bool,
}
