//! The blobs service: a blob from the store, or through the one fill of its digest that every
//! client shares (from the upstream, or with `[cluster]` from the replica that owns it), or
//! streamed uncached while the store cannot be written (`direct.rs`).

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::fill::{self, FillReader, Fills, Role};
use super::parts::Parts;
use super::upkeep::AccessLog;
use super::{
    direct, peer, Asker, BlobAnswer, BlobBody, BlobReply, BlobStream, CacheError, CachePhase,
    RangeRequest, StreamSource, Target,
};
use regcache_config::CacheConfig;
use regcache_oci::Digest;
use regcache_store::{Namespace, Presigned};

#[derive(Debug)]
pub(crate) struct Blobs {
    parts: Arc<Parts>,
    /// Notes each blob served (fills note what they wrote).
    access: Arc<AccessLog>,
    /// Fills in progress, one per (upstream, digest).
    fills: Arc<Fills>,
    /// Bounds the fills running at once (`cache.max_concurrent_fills`).
    fill_permits: Arc<Semaphore>,
    /// Set when writing to the store fails (disk full): misses then stream without caching.
    store_trouble: Arc<direct::StoreTrouble>,
    /// The other replicas, which fill the blobs they own (`None`: this replica is alone).
    cluster: Option<Arc<regcache_cluster::Cluster>>,
}

impl Blobs {
    /// The service with `[cache]`'s fill limit.
    pub(crate) fn new(config: &CacheConfig, parts: Arc<Parts>, access: Arc<AccessLog>) -> Self {
        Self {
            parts,
            access,
            fills: Arc::new(Fills::default()),
            fill_permits: Arc::new(Semaphore::new(config.max_concurrent_fills)),
            store_trouble: Arc::default(),
            cluster: None,
        }
    }

    /// Makes misses go through `cluster`: the replica that owns a blob fills it.
    pub(crate) fn set_cluster(&mut self, cluster: Option<Arc<regcache_cluster::Cluster>>) {
        self.cluster = cluster;
    }

    /// The cluster, when `[cluster]` is configured.
    pub(crate) fn cluster(&self) -> Option<&Arc<regcache_cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// A blob for `asker`, from the store or through a (shared) fill: with `[cluster]`, a
    /// client's miss of a blob another replica owns is filled from that replica (which falls
    /// back to the upstream when it cannot).
    ///
    /// # Errors
    /// [`CacheError`].
    pub(crate) async fn get(
        &self,
        target: &Target,
        digest: &Digest,
        range: RangeRequest,
        asker: Asker,
    ) -> Result<BlobReply, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        if let (Some(cluster), Asker::Peer) = (&self.cluster, asker) {
            cluster.metrics().served_to_peers.inc();
        }
        if let Some(answer) = self
            .stored(namespace, digest, range, CachePhase::Hit)
            .await?
        {
            return Ok(answer);
        }
        if upstream.is_offline() {
            return Err(CacheError::NotCachedOffline {
                upstream: upstream.name().to_owned(),
            });
        }
        let start = || {
            let permit = Arc::clone(&self.fill_permits)
                .try_acquire_owned()
                .map_err(|_| CacheError::Busy)?;
            Ok(fill::FillJob {
                metrics: Arc::clone(&self.parts.metrics),
                access_log: Arc::clone(&self.access),
                store_trouble: Arc::clone(&self.store_trouble),
                store: Arc::clone(&self.parts.store),
                source: self.source(target, digest, asker),
                namespace: namespace.clone(),
                digest: *digest,
                permit,
            })
        };
        if self.store_trouble.is_recent() {
            return self.direct(target, digest).await;
        }
        let joined = match self
            .fills
            .join_or_start(&self.parts.store, namespace, digest, start)
            .await
        {
            Err(CacheError::Store(err)) => {
                tracing::warn!(error = %err, "cannot create a temp file; streaming without caching");
                self.parts.metrics.store_write_errors.inc();
                self.store_trouble.mark();
                return self.direct(target, digest).await;
            }
            other => other?,
        };
        let Some((fill, role)) = joined else {
            // Committed by a fill that just finished.
            return self
                .stored(namespace, digest, range, CachePhase::Coalesced)
                .await?
                .ok_or(CacheError::FillAborted);
        };
        let phase = match role {
            Role::Leader => CachePhase::Miss,
            Role::Follower => CachePhase::Coalesced,
        };
        let progress = fill::wait_started(&fill).await?;
        let (start, end, range) = match (progress.size, range) {
            (Some(size), range) => match range.resolve(size) {
                Ok(Some(r)) => (r.start, Some(r.end), Some(r)),
                Ok(None) => (0, Some(size), None),
                Err(unsatisfiable) => return Ok(BlobReply::RangeNotSatisfiable(unsatisfiable)),
            },
            // Unknown size: ranges cannot be checked yet; send the whole blob.
            (None, _) => (0, None, None),
        };
        Ok(BlobReply::Found(BlobAnswer {
            size: progress.size,
            range,
            body: BlobBody::Filling(BlobStream(StreamSource::Fill(FillReader::new(
                &fill, start, end,
            )))),
            phase,
        }))
    }

    /// Where a client may fetch a cached blob directly (a short-lived presigned URL of the
    /// object store) and its size, `None` when the blob is not in the bucket or the bucket
    /// cannot say: the request is then answered as usual (from the local tier when it has the
    /// blob).
    pub(crate) async fn redirect(&self, target: &Target, digest: &Digest) -> Option<Presigned> {
        let (_, namespace) = self.parts.upstream(target);
        match self.parts.store.presigned_get(namespace, digest).await {
            Ok(location) => location,
            Err(err) => {
                tracing::warn!(error = %err, %digest, "cannot redirect to the object store; serving the blob");
                None
            }
        }
    }

    /// Where a fill gets the blob: the owner replica when it is another one (and the asker is
    /// not a peer), else the upstream.
    fn source(&self, target: &Target, digest: &Digest, asker: Asker) -> Box<dyn fill::BlobSource> {
        let (upstream, _) = self.parts.upstream(target);
        let blob = fill::UpstreamBlob {
            parts: Arc::clone(&self.parts),
            target: target.clone(),
            digest: *digest,
        };
        // An upstream asked with clients' credentials is filled here: a peer is never handed
        // a client's credentials, and has none of its own for it.
        let client_mode = upstream.client_mode();
        let owner = match (&self.cluster, asker) {
            (Some(cluster), Asker::Client) if !client_mode => cluster
                .remote_owner(upstream.name(), digest)
                .map(|owner| (cluster, owner)),
            _ => None,
        };
        match owner {
            Some((cluster, owner)) => {
                Box::new(peer::PeerSource::new(Arc::clone(cluster), owner, blob))
            }
            None => Box::new(blob),
        }
    }

    /// Streams a blob from the upstream without caching it (the store cannot be written).
    async fn direct(&self, target: &Target, digest: &Digest) -> Result<BlobReply, CacheError> {
        let (upstream, _) = self.parts.upstream(target);
        let response = upstream.get_blob(&target.repo, digest, 0).await?;
        self.parts.confirm_member(target, digest).await;
        Ok(BlobReply::Found(BlobAnswer {
            size: response.total_size,
            range: None,
            body: BlobBody::Filling(BlobStream(StreamSource::Direct(direct::DirectStream::new(
                response.body,
                *digest,
            )))),
            phase: CachePhase::Miss,
        }))
    }

    async fn stored(
        &self,
        namespace: &Namespace,
        digest: &Digest,
        range: RangeRequest,
        phase: CachePhase,
    ) -> Result<Option<BlobReply>, CacheError> {
        let Some(stored) = self.parts.store.open(namespace, digest).await? else {
            return Ok(None);
        };
        let size = stored.size();
        self.access.touch(namespace, digest, size);
        let range = match range.resolve(size) {
            Ok(range) => range,
            Err(unsatisfiable) => return Ok(Some(BlobReply::RangeNotSatisfiable(unsatisfiable))),
        };
        let (start, end) = range.map_or((0, size), |r| (r.start, r.end));
        Ok(Some(BlobReply::Found(BlobAnswer {
            size: Some(size),
            range,
            body: BlobBody::Stored(stored.chunks(start, end)),
            phase,
        })))
    }
}
