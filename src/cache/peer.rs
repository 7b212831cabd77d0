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
use crate::cluster::{Cluster, PeerError};
use crate::upstream::{BlobResponse, UpstreamError};

/// The owner replica's copy of a blob, falling back to the upstream.
pub(crate) struct PeerSource {
    pub(crate) cluster: Arc<Cluster>,
    /// The owner's member id.
    pub(crate) owner: String,
    /// The upstream blob, asked when the owner cannot answer.
    pub(crate) upstream: UpstreamBlob,
    /// Set once the owner failed: the rest of the fill asks the upstream.
    pub(crate) fell_back: Arc<AtomicBool>,
}

impl PeerSource {
    fn fall_back(&self, reason: &'static str, error: &dyn std::fmt::Display) {
        if !self.fell_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(peer = %self.owner, reason, %error, "owner replica cannot serve the blob; filling from the upstream");
            self.cluster.peer_failed(&self.owner, reason);
        }
    }

    async fn ask_owner(&self, offset: u64) -> Result<Option<BlobResponse>, UpstreamError> {
        let name = self.upstream.upstream.name();
        let answer = self
            .cluster
            .client()
            .get_blob(
                &self.owner,
                name,
                &self.upstream.repo,
                &self.upstream.digest,
                offset,
            )
            .await;
        let fetches = &self.cluster.metrics().peer_fetches;
        let blob = match answer {
            Ok(blob) => blob,
            Err(PeerError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                fetches.with_label_values(&["not_found"]).inc();
                return Err(UpstreamError::NotFound {
                    upstream: name.to_owned(),
                });
            }
            Err(err) => {
                self.fall_back(err.reason(), &err);
                return Ok(None);
            }
        };
        let limit = blob
            .total_size
            .unwrap_or(u64::MAX)
            .min(self.cluster.max_blob_size());
        if blob.total_size.is_some_and(|total| total > limit) {
            self.fall_back("status", &"blob larger than cache.max_blob_size");
            return Ok(None);
        }
        fetches.with_label_values(&["ok"]).inc();
        tracing::debug!(peer = %self.owner, offset = blob.offset, "filling from the owner replica");
        let fell_back = Arc::clone(&self.fell_back);
        let cluster = Arc::clone(&self.cluster);
        let owner = self.owner.clone();
        let upstream = name.to_owned();
        let mut position = blob.offset;
        let body = blob.body.map(move |chunk| match chunk {
            Ok(chunk) => {
                position += chunk.len() as u64;
                cluster.metrics().peer_bytes.inc_by(chunk.len() as u64);
                if position > limit {
                    // More than announced: cut here, the next attempt asks the upstream.
                    fell_back.store(true, Ordering::Relaxed);
                    return Err(UpstreamError::TooLarge {
                        upstream: upstream.clone(),
                        limit: usize::try_from(limit).unwrap_or(usize::MAX),
                    });
                }
                Ok(chunk)
            }
            Err(source) => {
                if !fell_back.swap(true, Ordering::Relaxed) {
                    tracing::warn!(peer = %owner, error = %source, "owner replica's body broke; resuming from the upstream");
                    cluster.peer_failed(&owner, "body");
                }
                Err(UpstreamError::Unreachable {
                    upstream: format!("{upstream} (via peer {owner})"),
                    source,
                })
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
            if !self.fell_back.load(Ordering::Relaxed) {
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
