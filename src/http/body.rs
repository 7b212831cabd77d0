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

/// Reads `len` bytes at `offset` into a fresh buffer (not zero-filled first:
/// `read_to_end` fills spare capacity directly). A file shorter than that is an error: it was
/// verified at that size, so it was truncated under us.
fn read_chunk(
    mut file: std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<(std::fs::File, Bytes)> {
    use std::io::{Read as _, Seek as _};
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut buffer = Vec::with_capacity(usize::try_from(len).unwrap_or(READ_CHUNK));
    (&mut file).take(len).read_to_end(&mut buffer)?;
    if (buffer.len() as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "cached file shrank",
        ));
    }
    Ok((file, Bytes::from(buffer)))
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
            let chunks = stream::try_unfold(
                (Some(file), offset, len),
                |(file, offset, left)| async move {
                    let Some(file) = file.filter(|_| left > 0) else {
                        return Ok(None);
                    };
                    let want = left.min(READ_CHUNK as u64);
                    // The file moves into the blocking read and comes back with the chunk, read
                    // straight into the buffer that is sent.
                    let (file, chunk) =
                        tokio::task::spawn_blocking(move || read_chunk(file, offset, want))
                            .await
                            .map_err(std::io::Error::other)??;
                    let read = chunk.len() as u64;
                    Ok(Some((
                        Frame::data(chunk),
                        (Some(file), offset + read, left - read),
                    )))
                },
            );
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
