//! Response bodies: in-memory bytes, a verified file, or an in-flight fill. Every body is a
//! stream pulled by hyper, so a slow client applies backpressure and memory stays bounded by
//! one chunk per connection.

use bytes::Bytes;
use futures_util::stream::{self, StreamExt as _};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper::body::Frame;

use crate::cache::{BlobBody, READ_CHUNK};

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

/// Reads `len` bytes at `offset`; a file shorter than that is an error (it was verified at
/// that size, so it was truncated under us).
fn read_chunk_at(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt as _;
    let mut buffer = vec![0u8; len];
    file.read_exact_at(&mut buffer, offset)?;
    Ok(Bytes::from(buffer))
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

/// A blob body: a file read in large chunks, or an in-flight fill.
pub(crate) fn blob(body: BlobBody) -> Body {
    match body {
        BlobBody::File { file, offset, len } => {
            let file = std::sync::Arc::new(file);
            let chunks = stream::try_unfold((file, offset, offset + len), |(file, at, end)| async move {
                if at >= end {
                    return Ok(None);
                }
                let want = usize::try_from(end - at).unwrap_or(READ_CHUNK).min(READ_CHUNK);
                let reader = std::sync::Arc::clone(&file);
                // One positioned read per chunk, straight into the buffer that is sent.
                let chunk = tokio::task::spawn_blocking(move || read_chunk_at(&reader, at, want))
                    .await
                    .map_err(std::io::Error::other)??;
                let next = at + chunk.len() as u64;
                Ok(Some((Frame::data(chunk), (file, next, end))))
            });
            StreamBody::new(chunks).boxed_unsync()
        }
        BlobBody::Filling(stream) => {
            let chunks = stream::unfold(stream, |mut stream| async move {
                stream.next_chunk().await.map(|chunk| (chunk, stream))
            });
            StreamBody::new(chunks.map(|chunk| chunk.map(Frame::data))).boxed_unsync()
        }
    }
}
