//! Tag lists and referrers, answered by the cache: the upstream's answer merged with what the
//! index holds, sorted and paginated here (Distribution 2.8 returns tags unsorted and has no
//! referrers API), and served from the index alone when the upstream is offline or down.
//!
//! Like the rest of `cache`, it returns domain values; the HTTP layer writes the JSON and the
//! `Link` / `OCI-Filters-Applied` headers.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::manifest::Manifests;
use super::parts::Parts;
use super::tag_lists::{TagCollector, TagListLimits, TagLists, UpstreamTags};
use super::{CacheError, CachePhase, Manifest, Target};
use regcache_config::CacheConfig;
use regcache_metrics::Metrics;
use regcache_oci::{Digest, MediaType, Reference, RepoName, Tag};
use regcache_store::{Index, Namespace, ReferrerRecord};
use regcache_upstream::{UpstreamClient, UpstreamError};

/// Upper bound on upstream tag-list pages followed for one answer: enough for any real
/// repository at Distribution's default page size, and a bound on a looping `Link`.
const MAX_TAG_PAGES: usize = 64;

/// One page of a repository's tags.
#[derive(Debug)]
pub struct TagPage {
    /// The tags of this page, in lexical order.
    pub tags: Vec<Tag>,
    /// When more tags follow: the last tag of this page (the next page's `last`).
    pub next_after: Option<Tag>,
    /// How it was answered.
    pub phase: CachePhase,
}

/// The referrers of a subject.
#[derive(Debug)]
pub struct ReferrerList {
    /// Descriptors of the referring manifests, sorted by digest.
    pub manifests: Vec<Descriptor>,
    /// Whether an `artifactType` filter was applied.
    pub filtered: bool,
    /// How it was answered.
    pub phase: CachePhase,
}

/// A descriptor in a referrers index. Fields regcache does not know are kept as they came.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The manifest's media type.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Its artifact type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Anything else the upstream sent.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl From<&ReferrerRecord> for Descriptor {
    fn from(record: &ReferrerRecord) -> Self {
        Self {
            media_type: record.media_type.to_string(),
            digest: record.digest.to_string(),
            size: record.size,
            artifact_type: record.artifact_type.clone(),
            annotations: (!record.annotations.is_empty()).then(|| record.annotations.clone()),
            other: serde_json::Map::new(),
        }
    }
}

/// The parts of a manifest the referrers API needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFields {
    subject: Option<SubjectField>,
    artifact_type: Option<String>,
    config: Option<ConfigField>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct SubjectField {
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigField {
    media_type: Option<String>,
}

/// The subject a manifest refers to, with its referrer record, if it names one.
pub(crate) fn referrer_of(manifest: &Manifest) -> Option<(Digest, ReferrerRecord)> {
    let fields: ManifestFields = serde_json::from_slice(&manifest.bytes).ok()?;
    let subject = Digest::parse(&fields.subject?.digest).ok()?;
    // The spec: an image manifest without `artifactType` is listed with its config's type.
    let artifact_type = fields
        .artifact_type
        .or_else(|| fields.config.and_then(|c| c.media_type));
    Some((
        subject,
        ReferrerRecord {
            digest: manifest.digest,
            media_type: manifest.media_type.clone(),
            size: manifest.bytes.len() as u64,
            artifact_type,
            annotations: fields.annotations,
        },
    ))
}

/// The tag a registry without the referrers API lists a subject's referrers under.
/// Records a freshly stored manifest in the referrers index when it names a subject.
/// Best effort: a failure is logged, and only costs the referrers listing this entry.
pub(crate) fn note_referrer(
    index: &Index,
    namespace: &Namespace,
    repo: &RepoName,
    manifest: &Manifest,
) {
    let Some((subject, record)) = referrer_of(manifest) else {
        return;
    };
    if let Err(err) = index.put_referrer(namespace, repo, &subject, &record) {
        tracing::warn!(digest = %manifest.digest, error = %err, "could not index a referrer");
    }
}

fn fallback_tag(subject: &Digest) -> Option<Tag> {
    Tag::parse(&format!("sha256-{}", subject.hex())).ok()
}

/// The listings service: tag lists (the upstream's, through [`TagLists`], merged with the
/// cached tags) and referrers.
#[derive(Debug)]
pub(crate) struct Listings {
    parts: Arc<Parts>,
    /// For the `sha256-<hex>` fallback tag of referrers.
    manifests: Arc<Manifests>,
    tag_lists: TagLists,
}

impl Listings {
    /// The service over the shared parts, with `[cache]`'s tag-list limits.
    pub(crate) fn new(config: &CacheConfig, parts: Arc<Parts>, manifests: Arc<Manifests>) -> Self {
        Self {
            tag_lists: TagLists::new(config, parts.clock.clone()),
            parts,
            manifests,
        }
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
    pub(crate) async fn tags(
        &self,
        target: &Target,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<TagPage, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        // In lexical order, as the index keeps them.
        let cached = {
            let (namespace, repo) = (namespace.clone(), target.repo.clone());
            self.parts
                .on_index(move |index| index.repository_tags(&namespace, &repo))
                .await?
        };
        let cached_any = !cached.is_empty();
        let (listed, phase) = if upstream.is_offline() {
            if !cached_any {
                return Err(CacheError::NotCachedOffline {
                    upstream: upstream.name().to_owned(),
                });
            }
            (None, CachePhase::Hit)
        } else {
            let walk = walk_tags(
                Arc::clone(upstream),
                target.repo.clone(),
                self.tag_lists.limits,
                Arc::clone(&self.parts.metrics),
            );
            match self.tag_lists.get(namespace, &target.repo, walk).await {
                Ok((listed, phase)) => (Some(listed), phase),
                Err(err) if cached_any && cache_falls_back(&err) => {
                    tracing::warn!(repo = %target.repo, error = %err, "tag list from the cache only");
                    (None, CachePhase::Stale)
                }
                Err(err) => return Err(err),
            }
        };
        let listed = listed.as_deref().map_or(&[][..], Vec::as_slice);
        Ok(paginate(listed, &cached, n, last, phase))
    }

    /// The upstream's tags of a repository (lexical order), by the same walk a client's tag
    /// list takes (pages, limits, shared, reused for `cache.tag_list_ttl`); never the cached
    /// tags alone: a sync round must not pick from what it already has.
    ///
    /// # Errors
    /// [`CacheError`] when the upstream cannot be asked or refuses.
    pub(crate) async fn upstream_tags(&self, target: &Target) -> Result<UpstreamTags, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        let walk = walk_tags(
            Arc::clone(upstream),
            target.repo.clone(),
            self.tag_lists.limits,
            Arc::clone(&self.parts.metrics),
        );
        let (listed, _) = self.tag_lists.get(namespace, &target.repo, walk).await?;
        Ok(listed)
    }

    /// The referrers of `subject` in a repository: the upstream's referrers API answer (or,
    /// where it has none or cannot be asked, the `sha256-<hex>` fallback tag's index through
    /// the cache) and the cached manifests naming `subject`, merged; filtered by
    /// `artifact_type` when given.
    ///
    /// # Errors
    /// [`CacheError`] when the upstream refuses access; an upstream without the API, offline
    /// or down is answered from the cache.
    pub(crate) async fn referrers(
        &self,
        target: &Target,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrerList, CacheError> {
        let (upstream, namespace) = self.parts.upstream(target);
        let mut by_digest: BTreeMap<String, Descriptor> = BTreeMap::new();
        let mut phase = CachePhase::Hit;
        if !upstream.is_offline() {
            let tail = format!("referrers/{subject}");
            match upstream.get_pass_through(&target.repo, &tail, None).await {
                Ok(answer) => {
                    if let Ok(fields) = serde_json::from_slice::<ManifestFields>(&answer.bytes) {
                        for descriptor in fields.manifests {
                            by_digest.insert(descriptor.digest.clone(), descriptor);
                        }
                    }
                    phase = CachePhase::PassThrough;
                }
                Err(err) if falls_back(&err) => {
                    tracing::debug!(repo = %target.repo, error = %err, "referrers from the cache");
                }
                Err(err) => return Err(err.into()),
            }
        }
        // The tag schema is what clients use when the API is missing; an upstream that
        // answered the API is not asked for the fallback tag as well.
        if phase != CachePhase::PassThrough {
            for descriptor in self.fallback_referrers(target, subject).await {
                by_digest
                    .entry(descriptor.digest.clone())
                    .or_insert(descriptor);
            }
        }
        let indexed = {
            let (namespace, repo, subject) = (namespace.clone(), target.repo.clone(), *subject);
            self.parts
                .on_index(move |index| index.referrers(&namespace, &repo, &subject))
                .await?
        };
        for record in indexed {
            // An evicted referrer is not listed as if it could be served.
            if !self.parts.store.holds(namespace, &record.digest).await {
                continue;
            }
            let descriptor = Descriptor::from(&record);
            by_digest
                .entry(descriptor.digest.clone())
                .or_insert(descriptor);
        }
        let manifests = by_digest
            .into_values()
            .filter(|d| {
                artifact_type.is_none_or(|wanted| d.artifact_type.as_deref() == Some(wanted))
            })
            .collect();
        Ok(ReferrerList {
            manifests,
            filtered: artifact_type.is_some(),
            phase,
        })
    }

    /// The descriptors of the `sha256-<hex>` tag-schema index, through the cache (so they are
    /// cached too, and served offline). Absent or unreadable: none.
    async fn fallback_referrers(&self, target: &Target, subject: &Digest) -> Vec<Descriptor> {
        let Some(tag) = fallback_tag(subject) else {
            return Vec::new();
        };
        let accept = [MediaType::OCI_INDEX.to_owned()];
        match self
            .manifests
            .get(target, &Reference::Tag(tag), &accept)
            .await
        {
            Ok(answer) if answer.manifest.media_type.as_str() == MediaType::OCI_INDEX => {
                serde_json::from_slice::<ManifestFields>(&answer.manifest.bytes)
                    .map(|fields| fields.manifests)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

/// Whether an upstream failure lets the cache answer from what it holds: the upstream is
/// unavailable, or does not know the repository or the API (404).
fn falls_back(err: &UpstreamError) -> bool {
    err.class().unavailable || matches!(err, UpstreamError::NotFound { .. })
}

/// [`falls_back`] for a tag-list walk's error.
fn cache_falls_back(err: &CacheError) -> bool {
    match err.root() {
        CacheError::Upstream(err) => falls_back(err),
        _ => false,
    }
}

/// Every tag the upstream lists, following its `Link` pagination, sorted: within `limits`,
/// each page read at most up to what remains of the byte limit and its tags taken as it is
/// decoded, and at most [`MAX_TAG_PAGES`] pages. A list cut at a limit is what was read
/// before it, logged and counted once (this runs once per walk, for every request sharing it).
async fn walk_tags(
    upstream: Arc<UpstreamClient>,
    repo: RepoName,
    limits: TagListLimits,
    metrics: Arc<Metrics>,
) -> Result<Vec<Tag>, CacheError> {
    let mut collector = TagCollector::new(limits);
    let mut query: Option<String> = None;
    for page_number in 1..=MAX_TAG_PAGES {
        let page = upstream
            .get_tag_page(&repo, query.as_deref(), collector.page_limit())
            .await?;
        collector.add_page(&page.bytes, page.cut_short);
        query = page.link.as_deref().and_then(link_query).map(str::to_owned);
        if query.is_none() || collector.cut().is_some() {
            break;
        }
        collector.more_follow();
        if page_number == MAX_TAG_PAGES {
            collector.stop_at_page_bound();
        }
        if collector.cut().is_some() {
            break;
        }
    }
    let (cut, bytes) = (collector.cut(), collector.bytes_read());
    let tags = collector.finish();
    if let Some(cut) = cut {
        tracing::warn!(
            upstream = upstream.name(),
            repo = %repo,
            limit = cut.as_str(),
            tags = tags.len(),
            bytes,
            "upstream tag list cut at a limit; serving the tags read before it"
        );
        metrics
            .tag_list_truncated
            .with_label_values(&[upstream.name()])
            .inc();
    }
    Ok(tags)
}

/// The query of a `Link: </v2/…?last=x&n=y>; rel="next"` header.
fn link_query(link: &str) -> Option<&str> {
    let start = link.find('<')? + 1;
    let end = start + link[start..].find('>')?;
    let (_, query) = link[start..end].split_once('?')?;
    Some(query)
}

/// The page after `last`, at most `n` long, of the merge of two sorted, deduplicated lists
/// (the upstream's and the cached tags). Only the page is copied, however long the lists.
fn paginate(
    listed: &[Tag],
    cached: &[Tag],
    n: Option<usize>,
    last: Option<&str>,
    phase: CachePhase,
) -> TagPage {
    let after = |tags: &[Tag]| last.map_or(0, |last| tags.partition_point(|t| t.as_str() <= last));
    let mut rest = Merged {
        listed: &listed[after(listed)..],
        cached: &cached[after(cached)..],
    };
    let page: Vec<Tag> = rest
        .by_ref()
        .take(n.unwrap_or(usize::MAX))
        .cloned()
        .collect();
    let next_after = (!page.is_empty() && rest.next().is_some())
        .then(|| page.last().cloned())
        .flatten();
    TagPage {
        tags: page,
        next_after,
        phase,
    }
}

/// Two sorted, deduplicated tag lists as one, in order, each tag once.
struct Merged<'t> {
    listed: &'t [Tag],
    cached: &'t [Tag],
}

impl<'t> Iterator for Merged<'t> {
    type Item = &'t Tag;

    fn next(&mut self) -> Option<&'t Tag> {
        let (listed, cached) = (self.listed, self.cached);
        match (listed.split_first(), cached.split_first()) {
            (Some((a, listed_rest)), Some((b, cached_rest))) => {
                if a <= b {
                    self.listed = listed_rest;
                }
                if b <= a {
                    self.cached = cached_rest;
                }
                Some(a.min(b))
            }
            (Some((a, rest)), None) => {
                self.listed = rest;
                Some(a)
            }
            (None, Some((b, rest))) => {
                self.cached = rest;
                Some(b)
            }
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(names: &[&str]) -> Vec<Tag> {
        names
            .iter()
            .map(|name| Tag::parse(name).expect("a valid tag"))
            .collect()
    }

    #[track_caller]
    fn check(n: Option<usize>, last: Option<&str>, expected: &[&str], next: Option<&str>) {
        // a b c d, split between the upstream's list and the cache, overlapping.
        let (listed, cached) = (tags(&["a", "c", "d"]), tags(&["b", "c"]));
        for (listed, cached) in [(&listed, &cached), (&cached, &listed)] {
            let page = paginate(listed, cached, n, last, CachePhase::Hit);
            let got: Vec<&str> = page.tags.iter().map(Tag::as_str).collect();
            assert_eq!(got, expected, "n={n:?} last={last:?}");
            assert_eq!(page.next_after.as_ref().map(Tag::as_str), next);
        }
    }

    #[test]
    fn pages() {
        check(None, None, &["a", "b", "c", "d"], None);
        check(Some(2), None, &["a", "b"], Some("b"));
        check(Some(2), Some("b"), &["c", "d"], None);
        check(None, Some("b"), &["c", "d"], None);
        check(None, Some("bb"), &["c", "d"], None);
        check(Some(10), Some("d"), &[], None);
        check(Some(0), None, &[], None);
        check(Some(4), None, &["a", "b", "c", "d"], None);
    }

    #[test]
    fn link_queries() {
        assert_eq!(
            link_query(r#"</v2/a/tags/list?last=b&n=2>; rel="next""#),
            Some("last=b&n=2")
        );
        assert_eq!(link_query("garbage"), None);
    }

    #[test]
    fn referrer_records_take_the_config_type_without_an_artifact_type() {
        let subject = Digest::of(b"subject");
        let bytes = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/x.sig","digest":"{subject}","size":1}},
            "layers":[],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"{subject}","size":1}},"annotations":{{"k":"v"}}}}"#
        );
        let manifest = Manifest {
            digest: Digest::of(bytes.as_bytes()),
            media_type: MediaType::from_static(MediaType::OCI_MANIFEST),
            bytes: bytes.into(),
        };
        let (found, record) = referrer_of(&manifest).expect("names a subject");
        assert_eq!(found, subject);
        assert_eq!(record.artifact_type.as_deref(), Some("application/x.sig"));
        assert_eq!(record.annotations.get("k").map(String::as_str), Some("v"));
        let plain = Manifest {
            bytes: br#"{"schemaVersion":2,"layers":[]}"#.as_slice().into(),
            ..manifest
        };
        assert!(referrer_of(&plain).is_none());
    }
}
