//! The handles every cache service shares: the upstream clients (with the store namespace of
//! each), the store, the index, the metrics and the clock. Each service holds an
//! `Arc<Parts>` next to the state it owns.

use std::sync::Arc;

use regcache_metrics::Metrics;
use regcache_oci::Digest;
use regcache_store::{Index, Namespace, Store, StoreError};
use regcache_upstream::clock::Clock;
use regcache_upstream::UpstreamClient;

use crate::{grant, CacheError, Target};

#[derive(Debug)]
pub(crate) struct Parts {
    /// One client per configured upstream, in config order (a [`Target`]'s `upstream`).
    pub(crate) upstreams: Vec<Arc<UpstreamClient>>,
    /// The store namespace of each upstream, in the same order.
    pub(crate) namespaces: Vec<Namespace>,
    pub(crate) store: Arc<Store>,
    pub(crate) index: Index,
    pub(crate) metrics: Arc<Metrics>,
    /// What "now" is for tag ages and cooldowns (tests advance it).
    pub(crate) clock: Clock,
}

impl Parts {
    /// The client and store namespace of `target`'s upstream.
    pub(crate) fn upstream(&self, target: &Target) -> (&Arc<UpstreamClient>, &Namespace) {
        (
            &self.upstreams[target.upstream],
            &self.namespaces[target.upstream],
        )
    }

    /// Records that the upstream served or confirmed `digest` under the repository of `target`
    /// (an index write, on the blocking pool).
    pub(crate) async fn confirm_member(&self, target: &Target, digest: &Digest) {
        let (_, namespace) = self.upstream(target);
        let (index, namespace, repo, digest) = (
            self.index.clone(),
            namespace.clone(),
            target.repo.clone(),
            *digest,
        );
        let _ = tokio::task::spawn_blocking(move || {
            grant::record(&index, &namespace, &repo, &digest);
        })
        .await;
    }

    /// Runs `op` on the index on the blocking pool: index writes and scans never run on an
    /// async worker (sled may wait on its disk). Point reads of hot keys stay inline.
    pub(crate) async fn on_index<T, F>(&self, op: F) -> Result<T, CacheError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, StoreError> + Send + 'static,
    {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || op(&index))
            .await
            .map_err(|_| CacheError::FillAborted)?
            .map_err(CacheError::from)
    }
}
