//! Response bodies: in-memory bytes, stored bytes, or an in-flight fill. Every body is a
//! stream pulled by hyper, so a slow client applies backpressure and memory stays bounded by
//! one chunk per connection.

use bytes::Bytes;
use futures_util::stream::{self, StreamExt as _};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper::body::Frame;

use regcache_cache::BlobBody;

/// The response body type of every handler.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// No body (HEAD, errors to HEAD).
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body held in memory (manifests, error JSON).
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Counts the data bytes of `body` into `counter` as they are sent.
pub(crate) fn counted(body: Body, counter: prometheus::IntCounter) -> Body {
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    })
    .boxed_unsync()
}

/// A blob body: stored bytes or an in-flight fill, pulled chunk by chunk.
pub(crate) fn blob(body: BlobBody) -> Body {
    let chunks = stream::unfold(body, |mut body| async move {
        body.next_chunk().await.map(|chunk| (chunk, body))
    });
    StreamBody::new(chunks.map(|chunk| chunk.map(Frame::data))).boxed_unsync()
}
