//! Blob bodies as the upstream sends them: where an answer starts, and a body cut at the size
//! it may have.

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use reqwest::StatusCode;

use crate::{header_str, UpstreamError};

/// Where a successful blob answer to a request from byte `requested` starts, and the blob's
/// total size when known: a 206 starts at `requested` and names the total in `Content-Range`
/// (`bytes a-b/total`); any other answer is the whole blob, its `Content-Length` the total.
pub fn blob_extent(response: &reqwest::Response, requested: u64) -> (u64, Option<u64>) {
    if response.status() == StatusCode::PARTIAL_CONTENT {
        let total = header_str(response.headers(), "content-range")
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.parse().ok());
        (requested, total)
    } else {
        (0, response.content_length())
    }
}

/// Cuts a blob body at byte `limit` (counting from `offset`, the position of its first byte):
/// the bytes up to the limit pass, then the stream ends with `too_large` if more arrive.
pub(crate) fn limit_body(
    body: impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static,
    offset: u64,
    limit: u64,
    too_large: UpstreamError,
) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
    let state = (Box::pin(body), offset, Some(too_large));
    futures_util::stream::unfold(state, move |(mut body, position, too_large)| async move {
        let too_large = too_large?;
        if position > limit {
            // Nothing more is taken from this body.
            return Some((Err(too_large), (body, position, None)));
        }
        let mut chunk = match body.next().await? {
            Ok(chunk) => chunk,
            Err(err) => return Some((Err(err), (body, position, Some(too_large)))),
        };
        let next = position + chunk.len() as u64;
        if next > limit {
            // The allowed part first; the next poll reports the excess.
            chunk.truncate(usize::try_from(limit - position).unwrap_or(usize::MAX));
        }
        Some((Ok(chunk), (body, next, Some(too_large))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect_limited(chunks: &[&'static str], offset: u64, limit: u64) -> Vec<String> {
        let body = futures_util::stream::iter(
            chunks
                .iter()
                .map(|chunk| Ok(Bytes::from_static(chunk.as_bytes())))
                .collect::<Vec<_>>(),
        );
        let too_large = UpstreamError::TooLarge {
            upstream: "u".to_owned(),
            limit: 0,
        };
        limit_body(body, offset, limit, too_large)
            .map(|item| match item {
                Ok(chunk) => String::from_utf8_lossy(&chunk).into_owned(),
                Err(_) => "ERR".to_owned(),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn blob_bodies_are_cut_at_the_limit() {
        assert_eq!(collect_limited(&["abc", "def"], 0, 6).await, ["abc", "def"]);
        assert_eq!(
            collect_limited(&["abc", "def", "ghi"], 0, 7).await,
            ["abc", "def", "g", "ERR"]
        );
        assert_eq!(
            collect_limited(&["abc", "def", "ghi"], 0, 6).await,
            ["abc", "def", "", "ERR"]
        );
        assert_eq!(
            collect_limited(&["abc", "def"], 4, 7).await,
            ["abc", "", "ERR"]
        );
        assert_eq!(collect_limited(&["abc"], 0, 1_000).await, ["abc"]);
    }
}
