//! Manifests: by digest from memory, then disk (verified on load), then the upstream; by tag
//! from the index while the tag is fresh (see `revalidate`), otherwise revalidated with the
//! upstream — waiting at most `cache.revalidate_timeout` when a cached copy may be served
//! stale — and served stale when the upstream cannot be asked in time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::flight::SingleFlight;
use super::parts::Parts;
use super::revalidate::{Freshness, Verdict};
use super::upkeep::AccessLog;
use super::{CacheError, CachePhase, Manifest, ManifestAnswer, Target};
use regcache_config::{CacheConfig, UpstreamConfig};
use regcache_oci::{
    manifest_digest, sniff_media_type, validate_manifest, Digest, MediaType, Reference, RepoName,
    Tag, MAX_MANIFEST_BYTES,
};
use regcache_store::{ManifestRecord, Namespace, TagRecord};
use regcache_upstream::{FetchedManifest, Need, UpstreamError};

/// Key of a coalesced manifest lookup. The client's `Accept` is part of a tag's key: clients
/// negotiating different types may get different manifests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum FlightKey {
    Tag(Namespace, RepoName, Tag, String),
    Digest(Namespace, Digest),
}

/// The shared result of a coalesced lookup.
pub(crate) type FlightValue = (Arc<Manifest>, CachePhase);

/// Hot manifests kept in memory, in bytes.
const HOT_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// Tags remembered as absent upstream (`cache.negative_ttl`), at most.
const NEGATIVE_ENTRIES: u64 = 100_000;

/// The manifests service: the hot layer in memory, coalesced lookups, tag freshness and the
/// negative cache, over the store and index in [`Parts`].
#[derive(Debug)]
pub(crate) struct Manifests {
    parts: Arc<Parts>,
    /// Notes each manifest served or stored (it counts against the disk budget too).
    access: Arc<AccessLog>,
    /// Hot manifests by (namespace, digest), weighed by size.
    hot: moka::future::Cache<(Namespace, Digest), Arc<Manifest>>,
    flights: Arc<SingleFlight<FlightKey, FlightValue>>,
    /// Tags the upstream recently said do not exist (only with `cache.negative_ttl` > 0), with
    /// when it said so on the clock (moka's own expiry, on real time, only bounds memory).
    negative: moka::future::Cache<(Namespace, RepoName, Tag), std::time::Instant>,
    /// When a cached tag is served, revalidated, or given up.
    freshness: Freshness,
    /// How long a client waits for a revalidation before it is served the cached tag stale.
    revalidate_timeout: Duration,
    serve_stale_on_404: bool,
    negative_ttl: Duration,
    /// The upstreams' settings, by index: their tag rules and `serve_stale_on_denied`.
    upstreams: Vec<UpstreamConfig>,
}

impl Manifests {
    /// The service for `[cache]`'s freshness settings.
    pub(crate) fn new(
        config: &CacheConfig,
        upstreams: &[UpstreamConfig],
        parts: Arc<Parts>,
        access: Arc<AccessLog>,
    ) -> Self {
        Self {
            parts,
            access,
            hot: moka::future::Cache::builder()
                .max_capacity(HOT_MANIFEST_BYTES)
                .weigher(|_, m: &Arc<Manifest>| u32::try_from(m.bytes.len()).unwrap_or(u32::MAX))
                .build(),
            flights: Arc::default(),
            negative: moka::future::Cache::builder()
                .max_capacity(NEGATIVE_ENTRIES)
                .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
                .build(),
            freshness: Freshness {
                tag_ttl: config.tag_ttl,
                stale_while_revalidate: config.stale_while_revalidate,
                max_stale: config.max_stale,
            },
            revalidate_timeout: config.revalidate_timeout,
            serve_stale_on_404: config.serve_stale_on_404,
            negative_ttl: config.negative_ttl,
            upstreams: upstreams.to_vec(),
        }
    }

    /// Which freshness applies to `tag` of the upstream named `upstream`, in words (for the
    /// status page).
    pub(crate) fn freshness_text(&self, upstream: &str, tag: &str) -> Option<String> {
        let config = self.upstreams.iter().find(|u| u.name == upstream)?;
        Some(config.freshness_of(tag, self.freshness.tag_ttl))
    }

    /// The freshness of `tag` on the upstream `upstream`: the first matching tag rule's TTL
    /// (`never`: fresh for ever) and `max_stale`, else `[cache]`'s.
    fn freshness_for(&self, upstream: usize, tag: &Tag) -> Freshness {
        let rule = self
            .upstreams
            .get(upstream)
            .and_then(|config| config.tag_rule(tag.as_str()));
        match rule {
            Some((_, rule)) => Freshness {
                tag_ttl: rule.ttl.unwrap_or(Duration::MAX),
                max_stale: rule.max_stale.unwrap_or(self.freshness.max_stale),
                ..self.freshness
            },
            None => self.freshness,
        }
    }

    /// A manifest by tag or digest. `accept` is the client's `Accept` values: a cached manifest
    /// of a type the client does not take is fetched again with the client's `Accept`.
    ///
    /// # Errors
    /// [`CacheError`].
    pub(crate) async fn get(
        self: &Arc<Self>,
        target: &Target,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestAnswer, CacheError> {
        let answer = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(target, digest, accept).await,
            Reference::Tag(tag) => self.manifest_by_tag(target, tag, accept).await,
        };
        if answer.is_ok() {
            let (upstream, _) = self.parts.upstream(target);
            self.parts
                .metrics
                .manifests_served
                .with_label_values(&[upstream.name()])
                .inc();
        }
        answer
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        accept: &[String],
    ) -> Result<ManifestAnswer, CacheError> {
        let (_, namespace) = self.parts.upstream(target);
        if let Some(manifest) = self.local_manifest(namespace, digest).await? {
            return Ok(ManifestAnswer {
                manifest,
                phase: CachePhase::Hit,
            });
        }
        let key = FlightKey::Digest(namespace.clone(), *digest);
        let (this, target, digest, accept) =
            (Arc::clone(self), target.clone(), *digest, accept.to_vec());
        self.coalesced(key, async move {
            let manifest = this
                .fetch_manifest(
                    &target,
                    &digest.to_string(),
                    Some(&digest),
                    &accept,
                    Need::Miss,
                )
                .await?;
            Ok((manifest, CachePhase::Miss))
        })
        .await
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        target: &Target,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestAnswer, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        let record = self.parts.index.tag(namespace, &target.repo, tag)?;
        let cached = match &record {
            Some(record) => self
                .local_manifest(namespace, &record.digest)
                .await?
                .filter(|m| m.media_type.accepted_by(accept))
                .map(|m| (m, record.confirmed_at)),
            None => None,
        };
        let verdict = cached.as_ref().map(|(_, confirmed_at)| {
            let age = self
                .parts
                .clock
                .now()
                .duration_since(*confirmed_at)
                .unwrap_or_default();
            self.freshness_for(target.upstream, tag).judge(age)
        });
        let fresh = |manifest: &Arc<Manifest>| {
            Ok(ManifestAnswer {
                manifest: Arc::clone(manifest),
                phase: CachePhase::Hit,
            })
        };
        match (&cached, verdict) {
            (Some((manifest, _)), _) if upstream.is_offline() => return fresh(manifest),
            (Some((manifest, _)), Some(Verdict::Fresh)) => return fresh(manifest),
            // At the rate-limit reserve, what is left goes to misses.
            (Some((manifest, _)), _) if upstream.budget_is_low() => {
                return Ok(self.served_stale(Arc::clone(manifest), "budget"));
            }
            _ => {}
        }
        let negative_key = (namespace.clone(), target.repo.clone(), tag.clone());
        let remembered_404 = cached.is_none()
            && self.negative.get(&negative_key).await.is_some_and(|at| {
                self.parts.clock.instant().duration_since(at) < self.negative_ttl
            });
        if remembered_404 {
            return Err(CacheError::Upstream(Arc::new(UpstreamError::NotFound {
                upstream: upstream.name().to_owned(),
            })));
        }
        let stale_ok = match verdict {
            Some(Verdict::Revalidate { stale_ok }) => stale_ok,
            Some(Verdict::ServeAndRevalidate | Verdict::Fresh) => true,
            None => false,
        };
        let (key, work) = self.revalidation(target, tag, accept, cached.as_ref(), stale_ok);
        let stale = |manifest: Arc<Manifest>, why: &dyn std::fmt::Display, reason: &str| {
            tracing::warn!(
                upstream = upstream.name(),
                repo = %target.repo,
                %tag,
                reason = %why,
                "serving the cached manifest stale"
            );
            Ok(self.served_stale(manifest, reason))
        };
        let result = match (cached.clone(), verdict) {
            (Some((manifest, _)), Some(Verdict::ServeAndRevalidate)) => {
                // RFC 5861: answer now, let the revalidation update the tag for the next client.
                let this = Arc::clone(self);
                tokio::spawn(regcache_upstream::caller::carry(async move {
                    this.coalesced(key, work).await
                }));
                tracing::debug!(
                    repo = %target.repo,
                    %tag,
                    "within stale_while_revalidate; serving the cached manifest and revalidating in the background"
                );
                return Ok(self.served_stale(manifest, "revalidating"));
            }
            (Some((manifest, _)), _) if stale_ok => {
                // The revalidation runs in its own task (see `SingleFlight`): when the deadline
                // passes it goes on, and its answer updates the tag for the next client. Until
                // then, later clients are not made to wait for it again.
                match self.coalesced_within(key, work, upstream.name()).await {
                    Some(result) => result,
                    None => {
                        let why = format!(
                            "revalidation not answered within {:?}; it goes on in the background",
                            self.revalidate_timeout
                        );
                        return stale(manifest, &why, "deadline");
                    }
                }
            }
            _ => self.coalesced(key, work).await,
        };
        let err = match result {
            Ok(answer) => return Ok(answer),
            Err(err) => err,
        };
        let not_found = matches!(err.root(), CacheError::Upstream(e) if matches!(**e, UpstreamError::NotFound { .. }));
        if not_found && !self.negative_ttl.is_zero() {
            self.negative
                .insert(negative_key, self.parts.clock.instant())
                .await;
        }
        let denied = matches!(err.root(), CacheError::Upstream(e) if matches!(**e, UpstreamError::Denied { .. }));
        let reason = if err.class().unavailable {
            Some("unavailable")
        } else if not_found && self.serve_stale_on_404 {
            Some("not_found")
        } else if denied
            && self
                .upstreams
                .get(target.upstream)
                .is_some_and(|u| u.serve_stale_on_denied)
        {
            Some("denied")
        } else {
            None
        };
        match (cached, reason) {
            (Some((manifest, _)), Some(reason)) if stale_ok => stale(manifest, &err, reason),
            _ => Err(err),
        }
    }

    /// A cached manifest answered stale (`Warning: 110`), counted under `reason` (a label of
    /// `regcache_stale_served_total`).
    fn served_stale(&self, manifest: Arc<Manifest>, reason: &str) -> ManifestAnswer {
        self.parts
            .metrics
            .stale_served
            .with_label_values(&[reason])
            .inc();
        ManifestAnswer {
            manifest,
            phase: CachePhase::Stale,
        }
    }

    /// The key and the work of a tag's revalidation (or first fetch), for [`Manifests::coalesced`].
    fn revalidation(
        self: &Arc<Self>,
        target: &Target,
        tag: &Tag,
        accept: &[String],
        cached: Option<&(Arc<Manifest>, SystemTime)>,
        stale_ok: bool,
    ) -> (
        FlightKey,
        impl std::future::Future<Output = Result<FlightValue, CacheError>> + Send + 'static,
    ) {
        let (_, namespace) = self.parts.upstream(target);
        let key = FlightKey::Tag(
            namespace.clone(),
            target.repo.clone(),
            tag.clone(),
            accept.join(","),
        );
        let cached_digest = cached.map(|(m, _)| m.digest);
        let need = if stale_ok {
            Need::HasFallback
        } else {
            Need::Miss
        };
        let this = Arc::clone(self);
        let (target, tag, accept) = (target.clone(), tag.clone(), accept.to_vec());
        let work = async move {
            this.refresh_tag(&target, &tag, &accept, cached_digest, need)
                .await
        };
        (key, work)
    }

    /// Asks the upstream where a tag points: a cheap `HEAD` when a cached digest can be
    /// confirmed, a `GET` when the tag moved or was never seen. Records the confirmation.
    async fn refresh_tag(
        &self,
        target: &Target,
        tag: &Tag,
        accept: &[String],
        cached_digest: Option<Digest>,
        need: Need,
    ) -> Result<FlightValue, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        let confirm = |digest: Digest| {
            let record = TagRecord {
                digest,
                confirmed_at: self.parts.clock.now(),
            };
            let (namespace, repo, tag) = (namespace.clone(), target.repo.clone(), tag.clone());
            self.parts
                .on_index(move |index| index.put_tag(&namespace, &repo, &tag, &record))
        };
        if let Some(cached_digest) = cached_digest {
            let head = upstream
                .head_manifest(&target.repo, tag.as_str(), accept, need)
                .await?;
            if head.is_some_and(|(digest, _)| digest == cached_digest) {
                if let Some(manifest) = self.local_manifest(namespace, &cached_digest).await? {
                    confirm(cached_digest).await?;
                    self.parts.confirm_member(target, &cached_digest).await;
                    return Ok((manifest, CachePhase::Revalidated));
                }
            }
        }
        let manifest = self
            .fetch_manifest(target, tag.as_str(), None, accept, need)
            .await?;
        confirm(manifest.digest).await?;
        let phase = if cached_digest.is_some() {
            CachePhase::Revalidated
        } else {
            CachePhase::Miss
        };
        Ok((manifest, phase))
    }

    /// Runs `work` once for concurrent callers with the same key; joiners see
    /// [`CachePhase::Coalesced`].
    async fn coalesced(
        &self,
        key: FlightKey,
        work: impl std::future::Future<Output = Result<FlightValue, CacheError>> + Send + 'static,
    ) -> Result<ManifestAnswer, CacheError> {
        let (result, leader) = self.flights.run(key, work).await;
        shared_answer(result, leader)
    }

    /// [`Manifests::coalesced`] waiting at most `cache.revalidate_timeout`; `None` (counted in
    /// `regcache_revalidation_deadline_total`) when the deadline passed or had already passed
    /// for an earlier client of the same run, which goes on in the background.
    async fn coalesced_within(
        &self,
        key: FlightKey,
        work: impl std::future::Future<Output = Result<FlightValue, CacheError>> + Send + 'static,
        upstream: &str,
    ) -> Option<Result<ManifestAnswer, CacheError>> {
        match self
            .flights
            .run_within(key, work, self.revalidate_timeout)
            .await
        {
            Some((result, leader)) => Some(shared_answer(result, leader)),
            None => {
                self.parts
                    .metrics
                    .revalidation_deadlines
                    .with_label_values(&[upstream])
                    .inc();
                None
            }
        }
    }

    /// A manifest from memory or disk. Bytes on disk are re-verified on load; a missing or
    /// corrupt file is forgotten (and will be fetched again), never answered as present.
    async fn local_manifest(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, CacheError> {
        let key = (namespace.clone(), *digest);
        if let Some(manifest) = self.hot.get(&key).await {
            self.access
                .touch(namespace, digest, manifest.bytes.len() as u64);
            return Ok(Some(manifest));
        }
        let record = self.parts.index.manifest(namespace, digest)?;
        let Some(bytes) = self
            .parts
            .store
            .read_small(namespace, digest, MAX_MANIFEST_BYTES)
            .await?
        else {
            if record.is_some() {
                tracing::warn!(%digest, "indexed manifest missing from the store; will refetch");
                let (namespace, digest) = (namespace.clone(), *digest);
                self.parts
                    .on_index(move |index| index.remove_manifest(&namespace, &digest))
                    .await?;
            }
            return Ok(None);
        };
        // Without a record (the index was lost), the bytes say what they are.
        let Some(media_type) = record
            .map(|r| r.media_type)
            .or_else(|| sniff_media_type(&bytes))
        else {
            return Ok(None);
        };
        if manifest_digest(&bytes, &media_type) != *digest {
            tracing::warn!(%digest, "cached manifest is corrupt; removing it");
            let store = Arc::clone(&self.parts.store);
            let (namespace, digest) = (namespace.clone(), *digest);
            self.parts
                .on_index(move |index| {
                    store.remove(&namespace, &digest)?;
                    index.remove_manifest(&namespace, &digest)
                })
                .await?;
            return Ok(None);
        }
        let record = ManifestRecord {
            media_type: media_type.clone(),
        };
        let (record_namespace, record_digest) = (namespace.clone(), *digest);
        self.parts
            .on_index(move |index| index.put_manifest(&record_namespace, &record_digest, &record))
            .await?;
        let manifest = Arc::new(Manifest {
            digest: *digest,
            media_type,
            bytes,
        });
        self.access
            .touch(namespace, digest, manifest.bytes.len() as u64);
        self.hot.insert(key, Arc::clone(&manifest)).await;
        Ok(Some(manifest))
    }

    /// Fetches, verifies and stores a manifest. The bytes are checked against the requested
    /// digest and the upstream's `Docker-Content-Digest` before anything is stored or served.
    async fn fetch_manifest(
        &self,
        target: &Target,
        reference: &str,
        expected: Option<&Digest>,
        accept: &[String],
        need: Need,
    ) -> Result<Arc<Manifest>, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        if upstream.is_offline() {
            return Err(CacheError::NotCachedOffline {
                upstream: upstream.name().to_owned(),
            });
        }
        let fetched = upstream
            .get_manifest(&target.repo, reference, accept, need)
            .await?;
        let manifest = verify_manifest(fetched, expected)?;
        // The upstream served this manifest under the repository: its word on membership.
        self.parts.confirm_member(target, &manifest.digest).await;
        // The bytes, then their record and referrer entry: file and index work, off the workers.
        let store = Arc::clone(&self.parts.store);
        let (ns, repo) = (namespace.clone(), target.repo.clone());
        let manifest = self
            .parts
            .on_index(move |index| {
                store.put_verified(&ns, &manifest.digest, &manifest.bytes)?;
                let record = ManifestRecord {
                    media_type: manifest.media_type.clone(),
                };
                index.put_manifest(&ns, &manifest.digest, &record)?;
                super::listing::note_referrer(index, &ns, &repo, &manifest);
                Ok(manifest)
            })
            .await?;
        let manifest = Arc::new(manifest);
        self.access
            .touch(namespace, &manifest.digest, manifest.bytes.len() as u64);
        self.hot
            .insert((namespace.clone(), manifest.digest), Arc::clone(&manifest))
            .await;
        Ok(manifest)
    }
}

/// A coalesced lookup's shared result as this caller's answer; joiners see
/// [`CachePhase::Coalesced`].
fn shared_answer(
    result: Result<FlightValue, Arc<CacheError>>,
    leader: bool,
) -> Result<ManifestAnswer, CacheError> {
    match result {
        Ok((manifest, phase)) => Ok(ManifestAnswer {
            manifest,
            phase: if leader { phase } else { CachePhase::Coalesced },
        }),
        Err(err) => Err(CacheError::Shared(err)),
    }
}

/// Checks a fetched manifest's digest against what was asked for and what the upstream claims.
fn verify_manifest(
    fetched: FetchedManifest,
    expected: Option<&Digest>,
) -> Result<Manifest, CacheError> {
    let declared = fetched.media_type.filter(|m| {
        MediaType::ALL_MANIFESTS.contains(&m.as_str()) || m.as_str().starts_with("application/vnd.")
    });
    let media_type = declared
        .or_else(|| sniff_media_type(&fetched.bytes))
        .ok_or(CacheError::NotAManifest)?;
    if let Err(err) = validate_manifest(&fetched.bytes, &media_type) {
        tracing::warn!(%media_type, error = %err, "refusing the upstream's manifest");
        return Err(CacheError::NotAManifest);
    }
    let actual = manifest_digest(&fetched.bytes, &media_type);
    for claimed in [expected.copied(), fetched.digest_header]
        .into_iter()
        .flatten()
    {
        if claimed != actual {
            return Err(CacheError::DigestMismatch {
                expected: claimed,
                actual,
            });
        }
    }
    Ok(Manifest {
        digest: actual,
        media_type,
        bytes: fetched.bytes,
    })
}
