//! `[[sync]]`: tags kept mirrored on a schedule. [`Mirror`] is the service (the rules, their
//! state, one round at a time per upstream); a round lists the repository's tags upstream,
//! picks the rule's newest matches, and prefetches each image through the same verified fill
//! path a client pull takes ([`Cache::prefetch_image`]), with its referrers when asked.
//!
//! What a round keeps is pinned against eviction until a later round drops it from the set
//! (then it is only unpinned: eviction takes it when its turn comes). A round that cannot
//! finish — the upstream's rate-limit budget at its reserve, a pause after a `429`, a tag
//! that fails — keeps what earlier rounds kept for the tags it did not reach. Each rule's
//! state ([`SyncRecord`]: last and next run, images kept, counts, outcome) lives in the index,
//! so the schedule survives restarts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use regcache_config::{PinConfig, SyncConfig, UpstreamConfig};
use regcache_metrics::Metrics;
use regcache_oci::{Digest, Reference, Tag};
use regcache_store::{Index, SyncRecord, SyncedImage};
use regcache_upstream::Answer;

use super::{Cache, CacheError, Target};

/// How often the scheduler looks for a rule that is due.
const TICK: Duration = Duration::from_secs(1);

/// One rule's state, for the status page.
#[derive(Debug, Clone)]
pub struct SyncStatus {
    /// The rule's name.
    pub name: String,
    /// The upstream's name.
    pub upstream: String,
    /// The repository as the upstream knows it.
    pub repository: String,
    /// What it did last (default when it never ran).
    pub record: SyncRecord,
}

/// What one round did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// The rule's name.
    pub rule: String,
    /// Tags the rule picked from the upstream's list.
    pub picked: usize,
    /// Images it now keeps.
    pub kept: usize,
    /// Images fetched this round (not already cached).
    pub fetched: u64,
    /// Images that failed this round.
    pub failed: u64,
    /// How the round ended, in words.
    pub outcome: String,
}

/// The sync service: the rules, their state, one round at a time per upstream.
#[derive(Debug)]
pub(crate) struct Mirror {
    rules: Vec<SyncConfig>,
    /// Each rule's state, by name; loaded from the index at start.
    states: Mutex<HashMap<String, SyncRecord>>,
    /// One round at a time per upstream.
    rounds: Vec<tokio::sync::Mutex<()>>,
    /// Whether the states were read from the index.
    loaded: tokio::sync::OnceCell<()>,
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Mirror {
    pub(crate) fn new(
        rules: &[SyncConfig],
        upstreams: &[UpstreamConfig],
        metrics: &Metrics,
    ) -> Self {
        for rule in rules {
            metrics.init_sync_rule(&rule.name);
        }
        Self {
            rules: rules.to_vec(),
            states: Mutex::default(),
            rounds: upstreams
                .iter()
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            loaded: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether any rule is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Reads every rule's state from the index and returns the pins the kept images make.
    /// Blocking.
    pub(crate) fn load(&self, index: &Index, metrics: &Metrics) -> Vec<(String, Vec<PinConfig>)> {
        let mut states = self.states.lock();
        let mut pins = Vec::new();
        for rule in &self.rules {
            let record = match index.sync_state(&rule.name) {
                Ok(record) => record.unwrap_or_default(),
                Err(err) => {
                    tracing::warn!(rule = %rule.name, error = %err, "could not read the sync state; the rule runs at once");
                    SyncRecord::default()
                }
            };
            metrics.set_sync_state(
                &rule.name,
                record.last_run,
                record.next_run,
                record.images.len(),
            );
            pins.push((rule.name.clone(), pins_of(rule, &record)));
            states.insert(rule.name.clone(), record);
        }
        pins
    }

    /// Every rule's state; `upstream_name` names an upstream by its index.
    pub(crate) fn status(&self, upstream_name: impl Fn(usize) -> String) -> Vec<SyncStatus> {
        let states = self.states.lock();
        self.rules
            .iter()
            .map(|rule| SyncStatus {
                name: rule.name.clone(),
                upstream: upstream_name(rule.upstream),
                repository: rule.repository.as_str().to_owned(),
                record: states.get(&rule.name).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// The rules due at `now`.
    fn due(&self, now: SystemTime) -> Vec<usize> {
        let now = unix(now);
        let states = self.states.lock();
        (0..self.rules.len())
            .filter(|&i| {
                states
                    .get(&self.rules[i].name)
                    .and_then(|record| record.next_run)
                    .is_none_or(|next| next <= now)
            })
            .collect()
    }
}

/// The pins a rule's kept images make: each image by digest (its platforms), each referrer
/// whole.
fn pins_of(rule: &SyncConfig, record: &SyncRecord) -> Vec<PinConfig> {
    let pin = |digest: &str, platforms: &[String]| {
        Digest::parse(digest).ok().map(|digest| PinConfig {
            upstream: rule.upstream,
            repository: rule.repository.clone(),
            reference: Reference::Digest(digest),
            platforms: platforms.to_vec(),
        })
    };
    record
        .images
        .iter()
        .flat_map(|image| {
            std::iter::once(pin(&image.digest, &rule.platforms))
                .chain(image.referrers.iter().map(|r| pin(r, &[])))
        })
        .flatten()
        .collect()
}

impl Cache {
    /// Runs the `[[sync]]` schedule until `shutdown`: each rule when its next run is due (at
    /// once when it never ran), one at a time.
    pub async fn run_sync(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if self.mirror.is_empty() {
            return;
        }
        self.load_sync_state().await;
        loop {
            for rule in self.mirror.due(self.parts.clock.now()) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = self.sync_round(rule) => {}
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Runs every `[[sync]]` rule now (`regcache sync --once`), one after the other.
    pub async fn sync_now(self: &Arc<Self>) -> Vec<SyncReport> {
        self.load_sync_state().await;
        let mut reports = Vec::new();
        for rule in 0..self.mirror.rules.len() {
            reports.push(self.sync_round(rule).await);
        }
        reports
    }

    /// Reads the rules' states from the index (once) and pins what they keep.
    async fn load_sync_state(self: &Arc<Self>) {
        self.mirror
            .loaded
            .get_or_init(|| async {
                let cache = Arc::clone(self);
                let loaded = tokio::task::spawn_blocking(move || {
                    cache.mirror.load(&cache.parts.index, &cache.parts.metrics)
                })
                .await
                .unwrap_or_default();
                for (name, pins) in loaded {
                    self.pins.set_synced(&name, pins);
                }
            })
            .await;
    }

    /// Every `[[sync]]` rule's state, for the status page.
    pub fn sync_status(&self) -> Vec<SyncStatus> {
        self.mirror
            .status(|index| self.parts.upstreams[index].name().to_owned())
    }

    /// One round of one rule; see the module doc.
    async fn sync_round(self: &Arc<Self>, rule_index: usize) -> SyncReport {
        let rule = &self.mirror.rules[rule_index];
        let _one_per_upstream = self.mirror.rounds[rule.upstream].lock().await;
        let started = Instant::now();
        let target = Target {
            upstream: rule.upstream,
            repo: rule.repository.clone(),
        };
        let upstream = Arc::clone(&self.parts.upstreams[rule.upstream]);
        let previous = self
            .mirror
            .states
            .lock()
            .get(&rule.name)
            .cloned()
            .unwrap_or_default();
        let kept_before = |tag: &str| previous.images.iter().find(|i| i.tag == tag).cloned();
        let mut kept = Vec::new();
        let (mut fetched, mut failed, mut picked_count) = (0u64, 0u64, 0usize);
        // An air-gapped site keeps its rules for when the link comes back: not a failure.
        let listing = if upstream.is_offline() {
            None
        } else {
            Some(self.listings.upstream_tags(&target).await)
        };
        let outcome = match listing {
            None => {
                kept = previous.images.clone();
                format!(
                    "skipped: upstream {} is offline (configured)",
                    upstream.name()
                )
            }
            Some(Err(err)) => {
                failed += 1;
                kept = previous.images.clone();
                format!("listing the tags failed: {err}")
            }
            Some(Ok(listed)) => {
                let picked = rule.pick(&listed);
                picked_count = picked.len();
                let mut stopped = None;
                for (position, tag) in picked.iter().enumerate() {
                    let why = match budget_stop(&upstream) {
                        Some(why) => why,
                        None => match self.sync_image(rule, &target, tag).await {
                            Ok((image, new)) => {
                                fetched += u64::from(new);
                                kept.push(image);
                                continue;
                            }
                            Err(err) if err.class().answer == Answer::Paused => err.to_string(),
                            Err(err) => {
                                failed += 1;
                                tracing::warn!(rule = %rule.name, %tag, error = %err, "sync: image not fetched");
                                kept.extend(kept_before(tag.as_str()));
                                continue;
                            }
                        },
                    };
                    // Stopped before this tag: the tags not reached keep what earlier rounds kept.
                    kept.extend(
                        picked[position..]
                            .iter()
                            .filter_map(|t| kept_before(t.as_str())),
                    );
                    stopped = Some(why);
                    break;
                }
                match stopped {
                    Some(why) => format!("stopped early: {why}"),
                    None if failed > 0 => format!("{failed} of {picked_count} failed"),
                    None => "ok".to_owned(),
                }
            }
        };
        let now = self.parts.clock.now();
        let record = SyncRecord {
            last_run: Some(unix(now)),
            next_run: Some(unix(now + rule.interval)),
            images: kept,
            fetched: previous.fetched + fetched,
            failures: previous.failures + failed,
            outcome: outcome.clone(),
        };
        self.pins.set_synced(&rule.name, pins_of(rule, &record));
        let metrics = &self.parts.metrics;
        metrics.count_sync_round(&rule.name, fetched, failed);
        metrics.set_sync_state(
            &rule.name,
            record.last_run,
            record.next_run,
            record.images.len(),
        );
        let report = SyncReport {
            rule: rule.name.clone(),
            picked: picked_count,
            kept: record.images.len(),
            fetched,
            failed,
            outcome,
        };
        let (name, saved) = (rule.name.clone(), record.clone());
        if let Err(err) = self
            .parts
            .on_index(move |index| index.put_sync_state(&name, &saved))
            .await
        {
            tracing::warn!(rule = %rule.name, error = %err, "could not record the sync state; the rule runs again at the next start");
        }
        self.mirror.states.lock().insert(rule.name.clone(), record);
        tracing::info!(
            rule = %rule.name,
            picked = report.picked,
            kept = report.kept,
            fetched = report.fetched,
            failed = report.failed,
            outcome = %report.outcome,
            elapsed_ms = regcache_metrics::log_millis(started.elapsed()),
            "sync round done"
        );
        report
    }

    /// One picked tag: the image (its platforms) and, when the rule asks, its referrers.
    /// Returns what is kept and whether anything was fetched.
    async fn sync_image(
        self: &Arc<Self>,
        rule: &SyncConfig,
        target: &Target,
        tag: &Tag,
    ) -> Result<(SyncedImage, bool), CacheError> {
        let (digest, mut fetched) = self
            .prefetch_image(target, &Reference::Tag(tag.clone()), &rule.platforms)
            .await?;
        let mut referrers = Vec::new();
        if rule.referrers {
            let list = self.referrers(target, &digest, None).await?;
            for descriptor in list.manifests {
                let Ok(referrer) = Digest::parse(&descriptor.digest) else {
                    continue;
                };
                let (_, new) = self
                    .prefetch_image(target, &Reference::Digest(referrer), &[])
                    .await?;
                fetched |= new;
                referrers.push(referrer.to_string());
            }
        }
        Ok((
            SyncedImage {
                tag: tag.as_str().to_owned(),
                digest: digest.to_string(),
                referrers,
            },
            fetched,
        ))
    }
}

/// Why a round must stop before the next image: the upstream's budget at its reserve, or a
/// pause after a `429`.
fn budget_stop(upstream: &regcache_upstream::UpstreamClient) -> Option<String> {
    let view = upstream.rate_limit();
    if let Some(paused) = view.paused_for.filter(|left| !left.is_zero()) {
        return Some(format!(
            "upstream {} is paused after a 429 for {}s more",
            upstream.name(),
            paused.as_secs().max(1)
        ));
    }
    view.low.then(|| {
        format!(
            "upstream {} is at its rate-limit reserve ({} left, reserve {})",
            upstream.name(),
            view.remaining.unwrap_or(0),
            view.reserve
        )
    })
}
