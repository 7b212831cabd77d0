//! A fill source for a blob another replica owns (`[cluster]`): the owner's answer, and the
//! upstream when the owner cannot give one. The fill path is the ordinary one (`fill.rs`): the
//! store hashes what arrives and commits only a match, as for the upstream.
//!
//! The owner is asked first; when it is unreachable, times out, answers 5xx or anything but the
//! blob or 404, or its body breaks, the fill falls back to the upstream for good (resuming with
//! a `Range` from what was written), logs it and counts it in
//! `regcache_cluster_peer_fallbacks_total`. A 404 from the owner is its upstream's answer and is
//! passed on. A 429 is not: it may be the owner's own `server.rate_limit`, and the upstream may
//! limit each replica's address on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use http::StatusCode;

use super::fill::{BlobSource, UpstreamBlob};
use regcache_cluster::{Cluster, PeerError};
use regcache_upstream::{BlobResponse, UpstreamError};

/// The owner replica's copy of a blob, falling back to the upstream.
pub(crate) struct PeerSource {
    owner: Arc<Owner>,
    /// The upstream blob, asked when the owner cannot answer.
    upstream: UpstreamBlob,
}

/// The owner replica of one fill.
struct Owner {
    cluster: Arc<Cluster>,
    /// The owner's member id.
    id: String,
    /// Set once the owner failed: the rest of the fill asks the upstream.
    fell_back: AtomicBool,
}

impl Owner {
    /// Gives the owner up for the rest of the fill; the first time, logs `message` and counts
    /// the failure (`reason`), which also cools the peer down.
    fn fail(&self, reason: &'static str, error: &dyn std::fmt::Display, message: &str) {
        if !self.fell_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(peer = %self.id, reason, %error, "{message}");
            self.cluster.peer_failed(&self.id, reason);
        }
    }
}

impl PeerSource {
    /// A fill source asking `owner` (a member id of `cluster`) first, then `upstream`.
    pub(crate) fn new(cluster: Arc<Cluster>, owner: String, upstream: UpstreamBlob) -> Self {
        Self {
            owner: Arc::new(Owner {
                cluster,
                id: owner,
                fell_back: AtomicBool::new(false),
            }),
            upstream,
        }
    }

    async fn ask_owner(&self, offset: u64) -> Result<Option<BlobResponse>, UpstreamError> {
        const CANNOT_SERVE: &str = "owner replica cannot serve the blob; filling from the upstream";
        let name = self.upstream.client().name();
        let cluster = &self.owner.cluster;
        let answer = cluster
            .client()
            .get_blob(
                &self.owner.id,
                name,
                &self.upstream.target.repo,
                &self.upstream.digest,
                offset,
            )
            .await;
        let fetches = &cluster.metrics().peer_fetches;
        let blob = match answer {
            Ok(blob) => blob,
            Err(PeerError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                fetches.with_label_values(&["not_found"]).inc();
                return Err(UpstreamError::NotFound {
                    upstream: name.to_owned(),
                });
            }
            Err(err) => {
                self.owner.fail(err.reason(), &err, CANNOT_SERVE);
                return Ok(None);
            }
        };
        let max_blob_size = self.upstream.client().max_blob_size();
        if blob.total_size.is_some_and(|total| total > max_blob_size) {
            self.owner.fail(
                "status",
                &"blob larger than cache.max_blob_size",
                CANNOT_SERVE,
            );
            return Ok(None);
        }
        let limit = blob
            .total_size
            .map_or(max_blob_size, |total| total.min(max_blob_size));
        fetches.with_label_values(&["ok"]).inc();
        tracing::debug!(peer = %self.owner.id, offset = blob.offset, "filling from the owner replica");
        let owner = Arc::clone(&self.owner);
        let upstream = name.to_owned();
        let mut position = blob.offset;
        let body = blob.body.map(move |chunk| match chunk {
            Ok(chunk) => {
                position += chunk.len() as u64;
                owner
                    .cluster
                    .metrics()
                    .peer_bytes
                    .inc_by(chunk.len() as u64);
                if position > limit {
                    // More than announced: cut here, the next attempt asks the upstream.
                    owner.fell_back.store(true, Ordering::Relaxed);
                    return Err(UpstreamError::TooLarge {
                        upstream: upstream.clone(),
                        limit: usize::try_from(limit).unwrap_or(usize::MAX),
                    });
                }
                Ok(chunk)
            }
            Err(err) => {
                // The network failure itself, as logged before the error was named.
                let cause: &dyn std::fmt::Display = match &err {
                    UpstreamError::Unreachable { source, .. } => source,
                    other => other,
                };
                owner.fail(
                    "body",
                    cause,
                    "owner replica's body broke; resuming from the upstream",
                );
                Err(err)
            }
        });
        Ok(Some(BlobResponse {
            total_size: blob.total_size,
            offset: blob.offset,
            body: Box::pin(body),
        }))
    }
}

impl BlobSource for PeerSource {
    fn name(&self) -> &str {
        self.upstream.name()
    }

    fn get(&self, offset: u64) -> BoxFuture<'_, Result<BlobResponse, UpstreamError>> {
        Box::pin(async move {
            if !self.owner.fell_back.load(Ordering::Relaxed) {
                if let Some(response) = self.ask_owner(offset).await? {
                    return Ok(response);
                }
            }
            self.upstream.get(offset).await
        })
    }

    fn digest_mismatch(&self, message: String) {
        self.upstream.digest_mismatch(message);
    }
}
