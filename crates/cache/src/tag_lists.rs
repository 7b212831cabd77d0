//! Upstream tag lists, bounded and shared. A [`TagCollector`] takes one repository's tags from
//! its upstream's pages within `cache.tag_list_max_bytes` and `cache.tag_list_max_tags`,
//! decoding each page as it is read and keeping what fits; [`TagLists`] runs one walk of the
//! pages per (upstream, repository) at a time, at most [`MAX_WALKS`] at once, and keeps each
//! result for `cache.tag_list_ttl` in a moka cache bounded by weight.
//!
//! Memory, then, is bounded overall: a walk holds one page (at most 4 MiB) and the tags taken
//! so far (at most `tag_list_max_tags`), and finished lists are kept in at most
//! [`TAG_LIST_CACHE_BYTES`]. Like the rest of `cache`, no HTTP types.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::flight::SingleFlight;
use super::{CacheError, CachePhase};
use regcache_config::CacheConfig;
use regcache_oci::{RepoName, Tag};
use regcache_store::Namespace;
use regcache_upstream::clock::Clock;

/// Memory for finished tag lists, by weight (about the bytes they hold).
pub(crate) const TAG_LIST_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Tag-list walks running at once (each holds a page and its tags); beyond it, `503`.
pub(crate) const MAX_WALKS: usize = 16;
/// The most of one page read into memory, whatever remains of `tag_list_max_bytes` (the page
/// limit regcache had before the total one).
const MAX_PAGE_BYTES: usize = regcache_oci::MAX_MANIFEST_BYTES;

/// What one repository's tag list may take from its upstream, all pages together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TagListLimits {
    /// Body bytes read (`cache.tag_list_max_bytes`).
    pub(crate) max_bytes: usize,
    /// Tags kept (`cache.tag_list_max_tags`).
    pub(crate) max_tags: usize,
}

/// Which limit cut a tag list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// `cache.tag_list_max_bytes`, or a page over 4 MiB.
    Bytes,
    /// `cache.tag_list_max_tags`.
    Tags,
    /// The bound on pages followed.
    Pages,
}

impl Cut {
    /// The setting that cut the list, for the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Bytes => "cache.tag_list_max_bytes",
            Self::Tags => "cache.tag_list_max_tags",
            Self::Pages => "the page bound",
        }
    }
}

/// The tags of one repository's upstream list, as they are read page by page: every tag kept
/// is whole and valid, in the upstream's order; nothing past the limits is kept, or read.
#[derive(Debug)]
pub(crate) struct TagCollector {
    limits: TagListLimits,
    tags: Vec<Tag>,
    bytes_read: usize,
    cut: Option<Cut>,
}

impl TagCollector {
    pub(crate) fn new(limits: TagListLimits) -> Self {
        Self {
            limits,
            tags: Vec::new(),
            bytes_read: 0,
            cut: None,
        }
    }

    /// How many bytes of the next page may be read (0: none; the list is then cut if more
    /// pages follow).
    pub(crate) fn page_limit(&self) -> usize {
        (self.limits.max_bytes - self.bytes_read).min(MAX_PAGE_BYTES)
    }

    /// Takes the tags of one page body, read up to [`TagCollector::page_limit`]; `cut_short`
    /// says the upstream had more bytes. A body cut mid-way, or malformed part of the way,
    /// gives the whole tags before the cut.
    pub(crate) fn add_page(&mut self, body: &[u8], cut_short: bool) {
        self.bytes_read += body.len();
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        // An error ends the page: a body cut short (expected), the tag limit reached, or a
        // malformed page; the tags taken before it are kept either way.
        if let Err(err) = PageSeed(self).deserialize(&mut deserializer) {
            tracing::debug!(error = %err, cut_short, "tag list page ends early");
        }
        if cut_short {
            self.cut.get_or_insert(Cut::Bytes);
        }
    }

    /// Whether the list was cut: nothing more is to be read.
    pub(crate) fn cut(&self) -> Option<Cut> {
        self.cut
    }

    /// Records that more pages follow the ones read: a full collector, or one with no bytes
    /// left, is cut there.
    pub(crate) fn more_follow(&mut self) {
        if self.tags.len() >= self.limits.max_tags {
            self.cut.get_or_insert(Cut::Tags);
        } else if self.page_limit() == 0 {
            self.cut.get_or_insert(Cut::Bytes);
        }
    }

    /// Records that the page bound stopped the walk with more pages to follow.
    pub(crate) fn stop_at_page_bound(&mut self) {
        self.cut.get_or_insert(Cut::Pages);
    }

    /// Body bytes read so far.
    pub(crate) fn bytes_read(&self) -> usize {
        self.bytes_read
    }

    /// The tags taken, sorted and deduplicated.
    pub(crate) fn finish(self) -> Vec<Tag> {
        let mut tags = self.tags;
        tags.sort_unstable();
        tags.dedup();
        tags.shrink_to_fit();
        tags
    }

    fn push(&mut self, tag: Tag) -> Result<(), Full> {
        if self.tags.len() >= self.limits.max_tags {
            self.cut = Some(Cut::Tags);
            return Err(Full);
        }
        self.tags.push(tag);
        Ok(())
    }
}

/// The tag limit was reached within a page.
struct Full;

/// A page `{"name": …, "tags": [...]}`, decoded into a collector: every field but `tags` is
/// skipped, and each tag is pushed as it is decoded.
struct PageSeed<'c>(&'c mut TagCollector);

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Tags,
    #[serde(other)]
    Other,
}

impl<'de> DeserializeSeed<'de> for PageSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PageSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tag list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Tags => map.next_value_seed(TagsSeed(&mut *self.0))?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The `tags` array (or `null`), each valid tag pushed as it is decoded.
struct TagsSeed<'c>(&'c mut TagCollector);

impl<'de> DeserializeSeed<'de> for TagsSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for TagsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tags")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(TagElement(tag)) = seq.next_element()? {
            // A string that is not a valid tag is skipped, as the API could not serve it.
            if let Some(tag) = tag {
                self.0.push(tag).map_err(|Full| {
                    <A::Error as de::Error>::custom("cache.tag_list_max_tags reached")
                })?;
            }
        }
        Ok(())
    }
}

/// One element of `tags`: the tag when it is one.
struct TagElement(Option<Tag>);

impl<'de> Deserialize<'de> for TagElement {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TagElementVisitor)
    }
}

struct TagElementVisitor;

impl Visitor<'_> for TagElementVisitor {
    type Value = TagElement;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tag")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<TagElement, E> {
        Ok(TagElement(Tag::parse(value).ok()))
    }
}

/// An upstream's tag list for one repository, sorted and deduplicated, as far as the limits
/// let it be read.
pub(crate) type UpstreamTags = Arc<Vec<Tag>>;

type Key = (Namespace, RepoName);

/// Upstream tag lists: walks coalesced per (upstream, repository), bounded in number, and
/// their results kept for `cache.tag_list_ttl`.
#[derive(Debug)]
pub(crate) struct TagLists {
    pub(crate) limits: TagListLimits,
    ttl: Duration,
    /// Finished lists with when they were read on `clock` (moka's own expiry, on real time,
    /// only bounds memory; `clock` decides, so that tests can move time).
    lists: moka::future::Cache<Key, (Instant, UpstreamTags)>,
    flights: Arc<SingleFlight<Key, UpstreamTags>>,
    walks: Arc<Semaphore>,
    clock: Clock,
}

impl TagLists {
    pub(crate) fn new(config: &CacheConfig, clock: Clock) -> Self {
        Self {
            limits: TagListLimits {
                max_bytes: config.tag_list_max_bytes,
                max_tags: config.tag_list_max_tags,
            },
            ttl: config.tag_list_ttl,
            lists: moka::future::Cache::builder()
                .max_capacity(TAG_LIST_CACHE_BYTES)
                .weigher(|_, (_, tags): &(Instant, UpstreamTags)| weight(tags))
                .time_to_live(config.tag_list_ttl.max(Duration::from_millis(1)))
                .build(),
            flights: Arc::default(),
            walks: Arc::new(Semaphore::new(MAX_WALKS)),
            clock,
        }
    }

    /// The upstream's list for (`namespace`, `repo`): kept from a walk less than
    /// `cache.tag_list_ttl` ago, else from the walk running for it, else from a new one,
    /// `walk`, which runs in its own task.
    ///
    /// # Errors
    /// The walk's [`CacheError`] (shared by the requests that joined it), or
    /// [`CacheError::Busy`] when [`MAX_WALKS`] are running.
    pub(crate) async fn get<W>(
        &self,
        namespace: &Namespace,
        repo: &RepoName,
        walk: W,
    ) -> Result<(UpstreamTags, CachePhase), CacheError>
    where
        W: std::future::Future<Output = Result<Vec<Tag>, CacheError>> + Send + 'static,
    {
        let key = (namespace.clone(), repo.clone());
        if let Some((read_at, tags)) = self.lists.get(&key).await {
            if self.clock.instant().saturating_duration_since(read_at) < self.ttl {
                return Ok((tags, CachePhase::Hit));
            }
        }
        let walks = Arc::clone(&self.walks);
        let (lists, ttl, clock) = (self.lists.clone(), self.ttl, self.clock.clone());
        let task_key = key.clone();
        let work = async move {
            let _permit = walks.try_acquire_owned().map_err(|_| CacheError::Busy)?;
            let tags = Arc::new(walk.await?);
            if !ttl.is_zero() {
                lists
                    .insert(task_key, (clock.instant(), Arc::clone(&tags)))
                    .await;
            }
            Ok(tags)
        };
        let (result, leader) = self.flights.run(key, work).await;
        let phase = if leader {
            CachePhase::Miss
        } else {
            CachePhase::Coalesced
        };
        result.map(|tags| (tags, phase)).map_err(CacheError::Shared)
    }
}

/// About the bytes a list holds, for the cache's capacity.
fn weight(tags: &[Tag]) -> u32 {
    let bytes: usize = tags
        .iter()
        .map(|tag| tag.as_str().len() + std::mem::size_of::<Tag>())
        .sum();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector(max_bytes: usize, max_tags: usize) -> TagCollector {
        TagCollector::new(TagListLimits {
            max_bytes,
            max_tags,
        })
    }

    fn names(tags: &[Tag]) -> Vec<&str> {
        tags.iter().map(Tag::as_str).collect()
    }

    /// Feeds `pages` as an upstream would answer them (each cut at the page limit), stopping
    /// where the walk would; returns the tags and the cut.
    #[track_caller]
    fn collect(max_bytes: usize, max_tags: usize, pages: &[&str]) -> (Vec<Tag>, Option<Cut>) {
        let mut tags = collector(max_bytes, max_tags);
        for (at, page) in pages.iter().enumerate() {
            let limit = tags.page_limit();
            let body = &page.as_bytes()[..page.len().min(limit)];
            tags.add_page(body, page.len() > limit);
            if tags.cut().is_some() {
                break;
            }
            if at + 1 < pages.len() {
                tags.more_follow();
                if tags.cut().is_some() {
                    break;
                }
            }
        }
        let cut = tags.cut();
        (tags.finish(), cut)
    }

    #[test]
    fn pages_within_the_limits_are_taken_whole() {
        let pages = [
            r#"{"name":"r","tags":["b","a"]}"#,
            r#"{"tags":null}"#,
            r#"{"tags":["c","a"],"extra":{"x":[1]}}"#,
        ];
        let (tags, cut) = collect(1000, 100, &pages);
        assert_eq!(names(&tags), ["a", "b", "c"]);
        assert_eq!(cut, None);
    }

    #[test]
    fn the_tag_limit_keeps_the_first_tags_in_the_upstream_order() {
        let pages = [r#"{"tags":["d","c"]}"#, r#"{"tags":["b","a"]}"#];
        let (tags, cut) = collect(1000, 3, &pages);
        assert_eq!(names(&tags), ["b", "c", "d"]);
        assert_eq!(cut, Some(Cut::Tags));
        // Exactly full with nothing after: not cut.
        let (tags, cut) = collect(1000, 2, &pages[..1]);
        assert_eq!((tags.len(), cut), (2, None));
        // Exactly full with another page to follow: cut, and that page is not read.
        let (tags, cut) = collect(1000, 2, &pages);
        assert_eq!(names(&tags), ["c", "d"]);
        assert_eq!(cut, Some(Cut::Tags));
    }

    #[test]
    fn the_byte_limit_keeps_the_whole_tags_before_it() {
        let page = r#"{"tags":["aa","bb","cc"]}"#;
        // Cut inside "cc": only the complete strings count.
        let (tags, cut) = collect(page.len() - 4, 100, &[page]);
        assert_eq!(names(&tags), ["aa", "bb"]);
        assert_eq!(cut, Some(Cut::Bytes));
        // Cut just after the closing quote of "cc" (before `]`): "cc" is whole.
        let (tags, _) = collect(page.len() - 2, 100, &[page]);
        assert_eq!(names(&tags), ["aa", "bb", "cc"]);
        // The budget spans pages: the second page gets what the first left.
        let second = r#"{"tags":["dd","ee"]}"#;
        let (tags, cut) = collect(page.len() + second.len() - 6, 100, &[page, second]);
        assert_eq!(names(&tags), ["aa", "bb", "cc", "dd"]);
        assert_eq!(cut, Some(Cut::Bytes));
        // A budget used up exactly by one page, with another to follow: cut, nothing read.
        let mut exact = collector(page.len(), 100);
        exact.add_page(page.as_bytes(), false);
        exact.more_follow();
        assert_eq!((exact.cut(), exact.page_limit()), (Some(Cut::Bytes), 0));
    }

    #[test]
    fn a_page_is_never_read_past_4_mib() {
        let tags = collector(64 << 20, 100);
        assert_eq!(tags.page_limit(), MAX_PAGE_BYTES);
    }

    #[test]
    fn malformed_pages_and_invalid_tags_give_what_came_before() {
        let (tags, cut) = collect(1000, 100, &[r#"{"tags":["a","-bad","b",7,"c"]}"#]);
        assert_eq!(names(&tags), ["a", "b"]);
        assert_eq!(cut, None);
        let (tags, _) = collect(1000, 100, &["<html>", r#"{"tags":["x"]}"#]);
        assert_eq!(names(&tags), ["x"]);
        let (tags, _) = collect(1000, 100, &[r#"{"tags":["a\u0062"]}"#]);
        assert_eq!(names(&tags), ["ab"]);
    }

    #[tokio::test]
    async fn concurrent_gets_share_one_walk_and_the_ttl_reuses_it() {
        let config = regcache_config::Config::load(None).expect("the embedded default is valid");
        let clock = Clock::adjustable();
        let lists = Arc::new(TagLists::new(&config.cache, clock.clone()));
        let namespace = Namespace::new("up");
        let repo = RepoName::parse("a/b").expect("a valid name");
        let walks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let walk = |walks: Arc<std::sync::atomic::AtomicUsize>| async move {
            walks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, CacheError>(vec![Tag::parse("v1").expect("a valid tag")])
        };
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (lists, namespace, repo) = (Arc::clone(&lists), namespace.clone(), repo.clone());
            let walk = walk(Arc::clone(&walks));
            joins.push(tokio::spawn(async move {
                lists.get(&namespace, &repo, walk).await.map(|(_, p)| p)
            }));
        }
        let mut phases = Vec::new();
        for join in joins {
            phases.push(join.await.expect("task").expect("listed"));
        }
        assert_eq!(walks.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(phases.iter().filter(|p| **p == CachePhase::Miss).count(), 1);
        let (tags, phase) = lists
            .get(&namespace, &repo, walk(Arc::clone(&walks)))
            .await
            .expect("listed");
        assert_eq!((names(&tags), phase), (vec!["v1"], CachePhase::Hit));
        clock.advance(Duration::from_secs(31));
        let (_, phase) = lists
            .get(&namespace, &repo, walk(Arc::clone(&walks)))
            .await
            .expect("listed");
        assert_eq!(phase, CachePhase::Miss);
        assert_eq!(walks.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
