//! The cache: lookup order (memory → store → upstream fill), tag freshness and serve-stale, and
//! the domain answers the HTTP layer turns into responses.
//!
//! `cache` joins `store` and `upstream`; it never builds HTTP responses. Every byte it returns
//! was verified against its digest: manifests when they are fetched or read from disk, blobs
//! when they are committed (and, while a fill runs, by holding back the final byte until the
//! fill verifies).

mod access;
mod answer;
mod blobs;
mod direct;
mod fill;
mod flight;
mod grant;
mod listing;
mod manifest;
mod mirror;
mod parts;
mod peer;
mod pins;
mod policy;
mod revalidate;
pub mod routing;
mod tag_lists;
mod upkeep;

pub use access::AccessProbe;
pub(crate) use answer::StreamSource;
pub use answer::{
    BlobAnswer, BlobBody, BlobReply, BlobStream, ByteRange, CacheError, CachePhase, Manifest,
    ManifestAnswer, RangeNotSatisfiable, RangeRequest, Target,
};
pub use grant::DigestKind;
pub use listing::{Descriptor, ReferrerList, TagPage};
pub use mirror::{SyncReport, SyncStatus};
pub use pins::{PinsError, PinsFile};
pub use policy::{check_keys, PolicyError, Refusal, RefusalRecord};
/// The response budget share of a connection (`server.response_buffer`): the server scopes
/// each connection's task with one; store reads wait for their part of the budget.
pub use regcache_store::ConnectionShare;
/// The caller of a request to a `credentials = "client"` upstream (the front door names it).
pub use regcache_upstream::caller;
pub use upkeep::EvictionReport;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use regcache_config::Config;
use regcache_metrics::Metrics;
use regcache_oci::{Digest, RepoName};
use regcache_store::{Index, Namespace, Presigned, Store};
use regcache_upstream::clock::Clock;
pub use regcache_upstream::{Answer, ErrorClass, Origin, RateLimitView};
use regcache_upstream::{ClientBuildError, UpstreamClient, UpstreamError};

/// The cache, shared by all requests.
#[derive(Debug)]
pub struct Cache {
    /// Upstream clients, store, index, metrics and clock: what every service uses.
    parts: Arc<parts::Parts>,
    /// Manifests: the hot layer, coalesced lookups, tag freshness, the negative cache.
    manifests: Arc<manifest::Manifests>,
    /// Blobs: the store, shared fills, the owner replica, uncached streams.
    blobs: blobs::Blobs,
    /// Access records, the disk budget and eviction.
    upkeep: upkeep::Upkeep,
    /// The pins in force and what they protect.
    pins: pins::Pins,
    /// Tag lists and referrers.
    listings: listing::Listings,
    /// `[[sync]]` rules and their state.
    mirror: mirror::Mirror,
    /// What each client may read of `credentials = "client"` upstreams.
    access: access::ClientAccess,
    /// `[[policy]]`: the rules, their keys, the verified digests.
    policies: policy::Policies,
}

/// Whether a manifest answer must satisfy the signature policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// A refused manifest is an error ([`CacheError::PolicyRefused`]).
    Enforce,
    /// A refusal is logged and counted, the manifest answered (`prefetch`/`export
    /// --allow-unsigned`).
    Warn,
}

/// Who asks for a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// A client (or regcache's own prefetch): a miss of a blob another replica owns is asked of
    /// that replica.
    Client,
    /// A peer replica that found this one the blob's owner: a miss is filled from the upstream
    /// here, never forwarded again (no loops).
    Peer,
}

/// Errors building the cache at start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An upstream client could not be built.
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    /// A `[[policy]]` key cannot be used.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl Cache {
    /// Builds the cache over an opened store and index.
    ///
    /// # Errors
    /// [`BuildError`] when an upstream client cannot be built.
    pub fn new(
        config: &Config,
        store: Store,
        index: Index,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        Self::with_clock(config, store, index, metrics, Clock::system())
    }

    /// [`Cache::new`] with the clock that tag freshness and the circuit breakers read.
    ///
    /// # Errors
    /// [`BuildError`] when an upstream client cannot be built.
    pub fn with_clock(
        config: &Config,
        store: Store,
        index: Index,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<Self, BuildError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamClient::new(u, Arc::clone(&metrics), clock.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for upstream in &config.upstreams {
            metrics.init_upstream(&upstream.name);
        }
        let namespaces = config
            .upstreams
            .iter()
            .map(|u| Namespace::new(&u.name))
            .collect();
        let parts = Arc::new(parts::Parts {
            upstreams,
            namespaces,
            store: Arc::new(store),
            index,
            metrics,
            clock,
        });
        let upkeep = upkeep::Upkeep::new(&config.storage, Arc::clone(&parts));
        let manifests = Arc::new(manifest::Manifests::new(
            &config.cache,
            &config.upstreams,
            Arc::clone(&parts),
            Arc::clone(upkeep.access_log()),
        ));
        Ok(Self {
            listings: listing::Listings::new(
                &config.cache,
                Arc::clone(&parts),
                Arc::clone(&manifests),
            ),
            manifests,
            blobs: blobs::Blobs::new(
                &config.cache,
                Arc::clone(&parts),
                Arc::clone(upkeep.access_log()),
            ),
            upkeep,
            pins: pins::Pins::new(&config.pins, &config.storage, &config.upstreams),
            mirror: mirror::Mirror::new(&config.syncs, &config.upstreams, &parts.metrics),
            access: access::ClientAccess::new(&config.upstreams, Arc::clone(&parts)),
            policies: policy::Policies::new(
                &config.policies,
                config.upstreams.iter().map(|u| u.name.clone()).collect(),
            )?,
            parts,
        })
    }

    /// Makes blob misses go through `cluster`: the replica that owns a blob fills it.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Option<Arc<regcache_cluster::Cluster>>) -> Self {
        self.blobs.set_cluster(cluster);
        self
    }

    /// The cluster, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&Arc<regcache_cluster::Cluster>> {
        self.blobs.cluster()
    }

    /// The server's typed events, for what the parts outside the cache report (an import on
    /// the admin socket).
    pub fn events(&self) -> &regcache_metrics::Events {
        &self.parts.metrics.events
    }

    /// The index, for flushing at shutdown.
    pub fn index(&self) -> &Index {
        &self.parts.index
    }

    /// The blob store (usage figures, the start-up scan).
    pub fn store(&self) -> &Store {
        &self.parts.store
    }

    /// The bytes the store may hold before eviction starts (`storage.max_size` ×
    /// `high_watermark`); `None` without a budget. An import must fit in it.
    pub fn storage_budget(&self) -> Option<u64> {
        self.upkeep.high_watermark()
    }

    /// Whether the store is writable and the index readable; `Err` says which is not.
    /// `Ok(Some(problem))`: ready, but the object store is unreachable (reported only).
    ///
    /// # Errors
    /// A description of the first failing part.
    pub async fn check_ready(&self) -> Result<Option<String>, String> {
        self.parts
            .index
            .check()
            .map_err(|e| format!("index: {e}"))?;
        self.parts
            .store
            .check_writable()
            .await
            .map_err(|e| format!("store: {e}"))
    }

    /// The upstream clients, in config order (health for the status page).
    pub fn upstreams(&self) -> &[Arc<UpstreamClient>] {
        &self.parts.upstreams
    }

    /// Whether the running task's caller (`regcache_upstream::caller`) may be served
    /// `target`: always for an upstream with its own credentials; with `credentials =
    /// "client"`, once the upstream confirmed it for that client (asked about `probe` when no
    /// confirmation is remembered).
    ///
    /// # Errors
    /// [`CacheError::AccessRefused`] (the upstream's 401/403), a 404 from the upstream,
    /// [`CacheError::AccessUnconfirmed`] when it cannot be asked and no confirmation is recent
    /// enough, or the upstream's other failures.
    pub async fn check_access(
        &self,
        target: &Target,
        probe: AccessProbe<'_>,
    ) -> Result<(), CacheError> {
        self.access.check(target, probe).await
    }

    /// Whether the upstream of `target` accepts the running task's caller's login (a
    /// `docker login` with no repository named); `Ok` for an upstream with its own
    /// credentials.
    ///
    /// # Errors
    /// [`CacheError::AccessRefused`] when it refuses them; any failure to ask.
    pub async fn check_login(&self, target: &Target) -> Result<(), CacheError> {
        let (client, _) = self.parts.upstream(target);
        if !client.client_mode() {
            return Ok(());
        }
        match client.check_login().await {
            Ok(()) => Ok(()),
            Err(UpstreamError::Denied { status, .. }) => Err(CacheError::AccessRefused {
                upstream: client.name().to_owned(),
                who: caller::who(),
                status,
            }),
            Err(err) => Err(CacheError::Upstream(Arc::new(err))),
        }
    }

    /// A manifest by tag or digest. `accept` is the client's `Accept` values: a cached manifest
    /// of a type the client does not take is fetched again with the client's `Accept`.
    ///
    /// # Errors
    /// [`CacheError`].
    ///
    /// A runnable image of a repository a `[[policy]]` covers is answered only when its
    /// signature verifies ([`CacheError::PolicyRefused`] otherwise).
    pub async fn manifest(
        &self,
        target: &Target,
        reference: &regcache_oci::Reference,
        accept: &[String],
    ) -> Result<ManifestAnswer, CacheError> {
        self.manifest_with(target, reference, accept, PolicyMode::Enforce)
            .await
    }

    /// [`Cache::manifest`], the signature policy enforced or only reported.
    ///
    /// # Errors
    /// [`CacheError`].
    pub async fn manifest_with(
        &self,
        target: &Target,
        reference: &regcache_oci::Reference,
        accept: &[String],
        mode: PolicyMode,
    ) -> Result<ManifestAnswer, CacheError> {
        let answer = self.manifests.get(target, reference, accept).await?;
        self.check_policy(target, &answer.manifest, mode).await?;
        Ok(answer)
    }

    /// Reads the `[[policy]]` key files again (`SIGHUP`): how many keys are in force. The
    /// verified digests are forgotten; on error the keys in force stay.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key that cannot be used.
    pub fn reload_policy_keys(&self) -> Result<usize, PolicyError> {
        self.policies.reload_keys()
    }

    /// Whether any `[[policy]]` is configured.
    pub fn has_policy(&self) -> bool {
        !self.policies.is_empty()
    }

    /// The recent signature-policy refusals, newest first (the status page).
    pub fn policy_refusals(&self) -> Vec<RefusalRecord> {
        self.policies.recent()
    }

    /// The signature policy's decision on `manifest` of `target` (see `policy.rs`): nothing
    /// for a repository no rule covers or an artifact (a signature, an SBOM); an exemption;
    /// verified (remembered, with an index's children); or refused, which is an error in
    /// [`PolicyMode::Enforce`].
    async fn check_policy(
        &self,
        target: &Target,
        manifest: &Manifest,
        mode: PolicyMode,
    ) -> Result<(), CacheError> {
        let runnable = || regcache_oci::is_runnable(&manifest.bytes, &manifest.media_type);
        let rule = match self.policies.coverage(target.upstream, &target.repo) {
            policy::Coverage::None => return Ok(()),
            policy::Coverage::Exempt => {
                if runnable() {
                    self.parts.metrics.policy_decision("exempt", "none");
                }
                return Ok(());
            }
            // A digest verified before needs no parse (every pull after the first).
            policy::Coverage::Cosign(rule)
                if self
                    .policies
                    .is_verified(rule, target.upstream, &manifest.digest) =>
            {
                return Ok(())
            }
            policy::Coverage::Cosign(_) if !runnable() => return Ok(()),
            policy::Coverage::Cosign(rule) => rule,
        };
        let signatures = self.signatures_of(target, &manifest.digest).await;
        let Err(refusal) = self.policies.judge(rule, &manifest.digest, &signatures) else {
            self.parts.metrics.policy_decision("verified", "none");
            self.policies
                .remember(rule, target.upstream, &manifest.digest, &manifest.bytes)
                .await;
            return Ok(());
        };
        self.parts
            .metrics
            .policy_decision("refused", refusal.label());
        let (client, _) = self.parts.upstream(target);
        let image = format!("{}/{}@{}", client.name(), target.repo, manifest.digest);
        tracing::warn!(
            upstream = client.name(),
            repository = %target.repo,
            digest = %manifest.digest,
            reason = refusal.text(),
            enforced = mode == PolicyMode::Enforce,
            "signature policy refuses this image"
        );
        self.policies.record(RefusalRecord {
            at: std::time::SystemTime::now(),
            upstream: client.name().to_owned(),
            repository: target.repo.to_string(),
            digest: manifest.digest,
            refusal,
        });
        match mode {
            PolicyMode::Enforce => Err(CacheError::PolicyRefused { image, refusal }),
            PolicyMode::Warn => Ok(()),
        }
    }

    /// The cosign signatures of `digest`: the layers of its `sha256-<hex>.sig` manifest and of
    /// its referrers of the cosign signature type, each with its payload, all through the
    /// cache (cached, fetched, or offline from the store). What cannot be read is left out.
    async fn signatures_of(&self, target: &Target, digest: &Digest) -> Vec<policy::FoundSignature> {
        use regcache_oci::{Reference, Tag};
        let mut holders = Vec::new();
        if let Ok(tag) = Tag::parse(&format!("sha256-{}.sig", digest.hex())) {
            if let Ok(answer) = self.manifests.get(target, &Reference::Tag(tag), &[]).await {
                holders.push(answer.manifest);
            }
        }
        if let Ok(list) = self
            .listings
            .referrers(target, digest, Some(policy::SIGNATURE_ARTIFACT_TYPE))
            .await
        {
            for descriptor in list.manifests.iter().take(policy::MAX_SIGNATURES) {
                let Ok(referrer) = Digest::parse(&descriptor.digest) else {
                    continue;
                };
                if let Ok(answer) = self
                    .manifests
                    .get(target, &Reference::Digest(referrer), &[])
                    .await
                {
                    holders.push(answer.manifest);
                }
            }
        }
        let mut found = Vec::new();
        let layers = holders
            .iter()
            .flat_map(|holder| policy::signature_layers(&holder.bytes))
            .take(policy::MAX_SIGNATURES);
        for (payload, signature) in layers {
            if let Some(payload) = self.read_small(target, &payload, policy::MAX_PAYLOAD).await {
                found.push(policy::FoundSignature { payload, signature });
            }
        }
        found
    }

    /// A small blob whole (a signature payload), through the store or a fill; `None` when it
    /// cannot be had or is longer than `limit`.
    async fn read_small(&self, target: &Target, digest: &Digest, limit: usize) -> Option<Bytes> {
        let BlobReply::Found(answer) = self.blob(target, digest, RangeRequest::Full).await.ok()?
        else {
            return None;
        };
        let mut body = answer.body;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next_chunk().await {
            let chunk = chunk.ok()?;
            if bytes.len() + chunk.len() > limit {
                return None;
            }
            bytes.extend_from_slice(&chunk);
        }
        Some(Bytes::from(bytes))
    }

    /// Which freshness applies to `tag` of the upstream named `upstream`, in words:
    /// `"tag_rule 1 (ttl never)"` or `"cache.tag_ttl (1m)"`; `None` for an unknown upstream.
    pub fn tag_freshness(&self, upstream: &str, tag: &str) -> Option<String> {
        self.manifests.freshness_text(upstream, tag)
    }

    /// One page of a repository's tags: the upstream's list merged with the cached tags,
    /// sorted; only the cached tags when the upstream is offline or unavailable. `last`
    /// excludes every tag up to and including it; `n` bounds the page. The upstream's list is
    /// read within `cache.tag_list_max_bytes` and `cache.tag_list_max_tags`, by one walk for
    /// all concurrent requests, and reused for `cache.tag_list_ttl`.
    ///
    /// # Errors
    /// [`CacheError`] when the upstream refuses (404 with nothing cached, 401, …),
    /// [`CacheError::NotCachedOffline`] when nothing is cached and the upstream is offline, or
    /// [`CacheError::Busy`] when too many tag lists are being read.
    pub async fn tags(
        &self,
        target: &Target,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<TagPage, CacheError> {
        self.listings.tags(target, n, last).await
    }

    /// The manifests that name `subject` in this repository: the upstream's referrers API (or,
    /// where it has none or cannot be asked, the `sha256-<hex>` fallback tag's index through
    /// the cache) and the cached manifests naming `subject`, merged; filtered by
    /// `artifact_type` when given.
    ///
    /// # Errors
    /// [`CacheError`] when the upstream refuses access; an upstream without the API, offline
    /// or down is answered from the cache.
    pub async fn referrers(
        &self,
        target: &Target,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrerList, CacheError> {
        self.listings
            .referrers(target, subject, artifact_type)
            .await
    }

    /// Records a freshly stored manifest in the referrers index when it names a subject.
    /// Best effort: a failure is logged, and only costs the referrers listing this entry.
    pub fn note_referrer(&self, namespace: &Namespace, repo: &RepoName, manifest: &Manifest) {
        listing::note_referrer(&self.parts.index, namespace, repo, manifest);
    }

    /// Whether `digest` belongs to the repository of `target`: the upstream served or confirmed
    /// it there before (recorded in the index), or says so now (a `HEAD` under the repository,
    /// recorded). An offline upstream confirms nothing: unknown is `false`.
    ///
    /// # Errors
    /// [`CacheError::Upstream`] when the upstream had to be asked and could not answer (down,
    /// not offline: the client may retry); [`CacheError::Store`] when the index cannot be read.
    pub async fn belongs_to(
        &self,
        target: &Target,
        digest: &Digest,
        kind: DigestKind,
    ) -> Result<bool, CacheError> {
        grant::belongs_to(&self.parts, target, digest, kind).await
    }

    /// A blob, from the store or through a (shared) fill.
    ///
    /// # Errors
    /// [`CacheError`].
    pub async fn blob(
        &self,
        target: &Target,
        digest: &Digest,
        range: RangeRequest,
    ) -> Result<BlobReply, CacheError> {
        self.blob_for(target, digest, range, Asker::Client).await
    }

    /// [`Cache::blob`] for `asker`: with `[cluster]`, a client's miss of a blob another replica
    /// owns is filled from that replica (which falls back to the upstream when it cannot).
    ///
    /// # Errors
    /// [`CacheError`].
    pub async fn blob_for(
        &self,
        target: &Target,
        digest: &Digest,
        range: RangeRequest,
        asker: Asker,
    ) -> Result<BlobReply, CacheError> {
        self.blobs.get(target, digest, range, asker).await
    }

    /// Where a client may fetch a cached blob directly (a short-lived presigned URL of the
    /// object store) and its size, `None` when the blob is not in the bucket or the bucket
    /// cannot say: the request is then answered as usual (from the local tier when it has the
    /// blob).
    pub async fn blob_redirect(&self, target: &Target, digest: &Digest) -> Option<Presigned> {
        self.blobs.redirect(target, digest).await
    }

    /// Writes buffered accesses to the index. Blocking.
    pub fn flush_access(&self) {
        self.upkeep.flush_access();
    }

    /// Walks the store at start: counts usage and gives every blob file without an access
    /// record one dated by its modification time. Blocking.
    pub fn register_existing_files(&self) -> regcache_store::Usage {
        self.upkeep.register_existing_files()
    }

    /// Evicts least-recently-used blobs when usage is above the high watermark, down to the
    /// low watermark, keeping what the pins protect. Blocking.
    pub fn evict_if_needed(&self) -> EvictionReport {
        self.upkeep.evict_if_needed(|| {
            self.pins
                .protected(&self.parts.namespaces, &self.parts.index, &self.parts.store)
        })
    }

    /// Runs until `shutdown`: flushes accesses and enforces the budget every few seconds, or
    /// at once when a fill pushes usage past the high watermark; picks up new pins.
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
                () = self.upkeep.over_budget() => {}
            }
            // Access records, eviction and the pins file are disk work: off the async workers.
            let cache = Arc::clone(&self);
            let pins_changed = tokio::task::spawn_blocking(move || {
                cache.flush_access();
                cache.evict_if_needed();
                cache.pins.reload()
            })
            .await
            .unwrap_or(false);
            if pins_changed {
                tokio::spawn(Arc::clone(&self).prefetch_pins());
            }
        }
        let cache = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || cache.flush_access()).await;
    }

    /// Fetches every pinned image that is not fully cached. Best effort: failures are logged
    /// and retried at the next start.
    pub async fn prefetch_pins(self: Arc<Self>) {
        let cache = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || cache.pins.reload()).await;
        for pin in self.pins.current() {
            if let Err(err) = self.prefetch_pin(&pin).await {
                tracing::warn!(repo = %pin.repository, reference = %pin.reference, error = %err, "could not prefetch pinned image");
            }
        }
    }

    /// Pulls one pinned image through the cache (the chosen platforms of an index).
    async fn prefetch_pin(
        self: &Arc<Self>,
        pin: &regcache_config::PinConfig,
    ) -> Result<(), CacheError> {
        let target = Target {
            upstream: pin.upstream,
            repo: pin.repository.clone(),
        };
        self.prefetch_image(&target, &pin.reference, &pin.platforms)
            .await?;
        tracing::info!(repo = %pin.repository, reference = %pin.reference, "pinned image cached");
        Ok(())
    }

    /// Pulls one image through the cache as a client would (the chosen platforms of an
    /// index), draining each blob's fill to its end. Returns the root manifest's digest and
    /// whether anything came from the upstream (a manifest fetched or a blob filled).
    async fn prefetch_image(
        self: &Arc<Self>,
        target: &Target,
        reference: &regcache_oci::Reference,
        platforms: &[String],
    ) -> Result<(Digest, bool), CacheError> {
        let root = self.manifest(target, reference, &[]).await?;
        let mut fetched = root.phase == CachePhase::Miss;
        let mut walk = regcache_oci::ImageWalk::new(root.manifest.digest, platforms);
        while let Some(digest) = walk.next_manifest() {
            let answer = if digest == root.manifest.digest {
                Arc::clone(&root.manifest)
            } else {
                let answer = self
                    .manifest(target, &regcache_oci::Reference::Digest(digest), &[])
                    .await?;
                fetched |= answer.phase == CachePhase::Miss;
                answer.manifest
            };
            walk.read(&answer.bytes);
        }
        for blob in walk.into_blobs() {
            if let BlobReply::Found(answer) = self.blob(target, &blob, RangeRequest::Full).await? {
                if let BlobBody::Filling(mut body) = answer.body {
                    fetched = true;
                    while let Some(chunk) = body.next_chunk().await {
                        chunk.map_err(|_| CacheError::FillAborted)?;
                    }
                    // The last byte comes once the digest is verified; the commit follows (a
                    // command that exits now would lose the blob with its runtime).
                    if !body.stored().await {
                        return Err(CacheError::FillAborted);
                    }
                }
            }
        }
        Ok((root.manifest.digest, fetched))
    }
}

/// How often buffered accesses are written, the budget checked and the pins file re-read.
/// Each is cheap: a batch write, an atomic compare, a small file read.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);
