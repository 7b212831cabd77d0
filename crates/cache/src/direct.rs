//! Streaming a blob straight from the upstream to one client, without caching it: the fallback
//! when the store cannot be written (disk full). The digest is still verified: the last chunk
//! is held back until the hash matches, and a mismatch ends the stream with an error.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use regcache_oci::Digest;
use regcache_store::DigestCheck;
use regcache_upstream::UpstreamError;

/// How long after a store write failure misses bypass the store.
const BYPASS_FOR: Duration = Duration::from_secs(30);

/// When the store last failed a write.
#[derive(Debug, Default)]
pub(crate) struct StoreTrouble {
    // A std mutex: one timestamp, never held across an await.
    since: Mutex<Option<Instant>>,
}

impl StoreTrouble {
    pub(crate) fn mark(&self) {
        *self.since.lock() = Some(Instant::now());
    }

    pub(crate) fn is_recent(&self) -> bool {
        self.since
            .lock()
            .is_some_and(|at| at.elapsed() < BYPASS_FOR)
    }
}

type UpstreamBody = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// The upstream body, hashed as it passes, with one chunk held back.
pub(crate) struct DirectStream {
    body: UpstreamBody,
    hasher: Option<DigestCheck>,
    expected: Digest,
    held: Option<Bytes>,
}

impl std::fmt::Debug for DirectStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectStream")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl DirectStream {
    pub(crate) fn new(body: UpstreamBody, expected: Digest) -> Self {
        Self {
            body,
            hasher: Some(DigestCheck::default()),
            expected,
            held: None,
        }
    }

    pub(crate) async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            // Finished (successfully or not) once the hasher is gone.
            self.hasher.as_ref()?;
            match self.body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    if let Some(hasher) = self.hasher.as_mut() {
                        hasher.update(&chunk);
                    }
                    if let Some(previous) = self.held.replace(chunk) {
                        return Some(Ok(previous));
                    }
                }
                Some(Err(err)) => {
                    self.hasher = None;
                    return Some(Err(std::io::Error::other(err)));
                }
                None => {
                    if let Err(mismatch) = self.hasher.take()?.check(&self.expected) {
                        return Some(Err(std::io::Error::other(mismatch)));
                    }
                    return self.held.take().map(Ok);
                }
            }
        }
    }
}
