//! Prometheus metrics: a [`Metrics`] struct of typed handles over its own registry (no global
//! state), and the text encoding for `/metrics`; and the server's typed [`Event`]s
//! ([`events`]), carried beside the handles. No business logic lives here.
//!
//! Labels are bounded: route kind, method, status class, cache result, upstream name (from the
//! config's allow-list) and error reason. Never repository names or digests.

pub mod events;

pub use events::{Event, Events, Reload};

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// A duration in milliseconds to the microsecond, as log lines give them (`elapsed_ms =
/// 0.104`, not `0.10389499999999999`).
pub fn log_millis(elapsed: std::time::Duration) -> f64 {
    (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// All metric handles.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `route`, `method`, `status_class`
    pub http_requests: IntCounterVec,
    /// `route`
    pub http_duration: HistogramVec,
    /// `kind` (manifest, blob), `result` (hit, miss, stale, revalidated, coalesced)
    pub cache_results: IntCounterVec,
    /// `source` (cache, upstream)
    pub served_bytes: IntCounterVec,
    /// `upstream`
    pub upstream_bytes: IntCounterVec,
    /// `upstream`, `kind` (manifest, blob, token, list)
    pub upstream_duration: HistogramVec,
    /// `upstream`, `reason` (timeout, connect, 4xx, 429, 5xx, digest_mismatch, circuit_open)
    pub upstream_errors: IntCounterVec,
    /// `upstream`: 1 when not marked down by the circuit breaker.
    pub upstream_up: IntGaugeVec,
    /// `upstream`
    pub token_fetches: IntCounterVec,
    /// Blob downloads in progress.
    pub fills_in_flight: IntGauge,
    /// Tags served stale because the upstream could not be asked.
    pub stale_served: IntCounterVec,
    /// `upstream`, `result`: access checks of clients of `credentials = "client"` upstreams.
    pub client_access: IntCounterVec,
    /// `result` (verified, refused, exempt), `reason`: signature policy decisions.
    pub policy_decisions: IntCounterVec,
    /// `upstream`, `to` (open, closed): circuit breaker state changes.
    pub breaker_transitions: IntCounterVec,
    /// `upstream`: tag revalidations that passed `cache.revalidate_timeout` (the cached tag
    /// was served stale while they went on in the background).
    pub revalidation_deadlines: IntCounterVec,
    /// `upstream`: tag lists cut at `cache.tag_list_max_bytes` or `cache.tag_list_max_tags`
    /// (served as far as they were read).
    pub tag_list_truncated: IntCounterVec,
    /// Bytes of verified files in the store.
    pub storage_used: IntGauge,
    /// The configured budget (0: none).
    pub storage_budget: IntGauge,
    /// Files in the store.
    pub storage_blobs: IntGauge,
    /// Bytes read for responses and not yet sent (`server.response_buffer` bounds them).
    pub response_buffer: IntGauge,
    /// Manifests known to the index.
    pub storage_manifests: IntGauge,
    /// Files removed to stay under the budget.
    pub evictions: IntCounter,
    /// Bytes removed to stay under the budget.
    pub evicted_bytes: IntCounter,
    /// Fills that failed to write to disk (the client was still served when possible).
    pub store_write_errors: IntCounter,
    /// Requests per window the upstream allows (its `ratelimit-limit`).
    pub upstream_ratelimit_limit: IntGaugeVec,
    /// Requests left in the upstream's window (its `ratelimit-remaining`).
    pub upstream_ratelimit_remaining: IntGaugeVec,
    /// Manifest `GET`s sent upstream: what Docker Hub counts as pulls.
    pub upstream_manifest_gets: IntCounterVec,
    /// Manifests answered to clients, by upstream, however they were answered.
    pub manifests_served: IntCounterVec,
    /// `[[sync]]` rules: when each last ran and runs next (Unix seconds), images kept.
    pub sync_last_run: IntGaugeVec,
    /// See `sync_last_run`.
    pub sync_next_run: IntGaugeVec,
    /// See `sync_last_run`.
    pub sync_images: IntGaugeVec,
    /// Images a sync rule fetched (not already cached).
    pub sync_fetched: IntCounterVec,
    /// Images a sync rule failed to fetch.
    pub sync_failures: IntCounterVec,
    /// The server's typed events (not a metric: carried here because every part that emits
    /// one holds these handles).
    pub events: Events,
}

/// Buckets from 1 ms to ~2 min: manifest hits are sub-millisecond, cold blob pulls minutes.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

impl Metrics {
    /// Creates the handles and registers them (plus process metrics) in a new registry.
    ///
    /// # Panics
    /// Never in practice: the names below are fixed, valid and registered once.
    pub fn new() -> Self {
        let registry = Registry::new();
        let register = Register {
            registry: &registry,
            on_error: OnError::Panic,
        };
        let upstream_up = register.metric(
            IntGaugeVec::new(
                Opts::new(
                    "regcache_upstream_up",
                    "1 when the upstream is not marked down by the circuit breaker",
                ),
                &["upstream"],
            )
            .expect("valid literals"),
        );
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(process));
        }
        let metrics = Self {
            http_requests: register.counter_vec(
                "regcache_http_requests_total",
                "HTTP requests answered, by route kind, method and status class",
                &["route", "method", "status_class"],
            ),
            http_duration: register.histogram_vec(
                "regcache_http_request_duration_seconds",
                "Time to the response head, by route kind",
                &["route"],
            ),
            cache_results: register.counter_vec(
                "regcache_cache_results_total",
                "How manifest and blob requests were answered",
                &["kind", "result"],
            ),
            served_bytes: register.counter_vec(
                "regcache_served_bytes_total",
                "Body bytes sent to clients, by where they came from",
                &["source"],
            ),
            upstream_bytes: register.counter_vec(
                "regcache_upstream_fetched_bytes_total",
                "Body bytes downloaded from each upstream",
                &["upstream"],
            ),
            upstream_duration: register.histogram_vec(
                "regcache_upstream_request_duration_seconds",
                "Upstream request time to the response head",
                &["upstream", "kind"],
            ),
            upstream_errors: register.counter_vec(
                "regcache_upstream_errors_total",
                "Upstream failures by reason",
                &["upstream", "reason"],
            ),
            upstream_up,
            token_fetches: register.counter_vec(
                "regcache_upstream_token_fetches_total",
                "Bearer tokens fetched from upstream token endpoints",
                &["upstream"],
            ),
            fills_in_flight: register.gauge(
                "regcache_fills_in_flight",
                "Blob downloads from upstreams in progress",
            ),
            stale_served: register.counter_vec(
                "regcache_stale_served_total",
                "Tags served stale, by why: unavailable (the upstream could not be asked), deadline (revalidate_timeout), revalidating (stale_while_revalidate), budget (at the rate-limit reserve), not_found (serve_stale_on_404), denied (serve_stale_on_denied)",
                &["reason"],
            ),
            policy_decisions: register.counter_vec(
                "regcache_policy_decisions_total",
                "Signature policy decisions on runnable images of covered repositories, by result (verified, refused, exempt) and reason (none; for refusals no_signature, bad_signature, other_digest, other_identity)",
                &["result", "reason"],
            ),
            client_access: register.counter_vec(
                "regcache_client_access_total",
                "Access checks of clients of credentials = \"client\" upstreams, by upstream and result: confirmed (the upstream said yes), remembered (a yes within client_auth_ttl), refused (401/403), not_found, grace (unreachable upstream, a yes within client_auth_offline_grace), unconfirmed (unreachable upstream, no recent yes: refused)",
                &["upstream", "result"],
            ),
            breaker_transitions: register.counter_vec(
                "regcache_upstream_breaker_transitions_total",
                "Circuit breaker state changes, by upstream and new state",
                &["upstream", "to"],
            ),
            revalidation_deadlines: register.counter_vec(
                "regcache_revalidation_deadline_total",
                "Tag revalidations not answered within cache.revalidate_timeout",
                &["upstream"],
            ),
            tag_list_truncated: register.counter_vec(
                "regcache_tag_list_truncated_total",
                "Upstream tag lists cut at cache.tag_list_max_bytes or cache.tag_list_max_tags",
                &["upstream"],
            ),
            storage_used: register.gauge(
                "regcache_storage_used_bytes",
                "Bytes of verified content in the store",
            ),
            storage_budget: register.gauge(
                "regcache_storage_budget_bytes",
                "Configured storage budget (storage.max_size), 0 when unlimited",
            ),
            storage_blobs: register.gauge(
                "regcache_storage_blobs",
                "Content files (blobs and manifests) in the store",
            ),
            response_buffer: register.gauge(
                "regcache_response_buffer_bytes",
                "Bytes read for responses and not yet sent (bounded by server.response_buffer)",
            ),
            storage_manifests: register.gauge(
                "regcache_storage_manifests",
                "Manifests recorded in the index",
            ),
            evictions: register.counter(
                "regcache_evictions_total",
                "Files evicted to stay under the storage budget",
            ),
            evicted_bytes: register.counter(
                "regcache_evicted_bytes_total",
                "Bytes evicted to stay under the storage budget",
            ),
            store_write_errors: register.counter(
                "regcache_store_write_errors_total",
                "Blob downloads that could not be written to disk",
            ),
            upstream_ratelimit_limit: register.gauge_vec(
                "regcache_upstream_ratelimit_limit",
                "Requests per window the upstream allows (its ratelimit-limit header); 0 until it sends one",
                &["upstream"],
            ),
            upstream_ratelimit_remaining: register.gauge_vec(
                "regcache_upstream_ratelimit_remaining",
                "Requests left in the upstream's window (its ratelimit-remaining header)",
                &["upstream"],
            ),
            upstream_manifest_gets: register.counter_vec(
                "regcache_upstream_manifest_gets_total",
                "Manifest GETs sent to the upstream (the requests Docker Hub counts as pulls)",
                &["upstream"],
            ),
            manifests_served: register.counter_vec(
                "regcache_manifests_served_total",
                "Manifests answered to clients, from the cache or not",
                &["upstream"],
            ),
            sync_last_run: register.gauge_vec(
                "regcache_sync_last_run_timestamp_seconds",
                "When each [[sync]] rule's last round ended (0: never)",
                &["rule"],
            ),
            sync_next_run: register.gauge_vec(
                "regcache_sync_next_run_timestamp_seconds",
                "When each [[sync]] rule's next round is due (0: at once)",
                &["rule"],
            ),
            sync_images: register.gauge_vec(
                "regcache_sync_images",
                "Images each [[sync]] rule keeps (pinned against eviction)",
                &["rule"],
            ),
            sync_fetched: register.counter_vec(
                "regcache_sync_images_fetched_total",
                "Images [[sync]] rounds fetched from the upstream (not already cached)",
                &["rule"],
            ),
            sync_failures: register.counter_vec(
                "regcache_sync_failures_total",
                "Images (or tag listings) [[sync]] rounds failed to fetch",
                &["rule"],
            ),
            events: Events::default(),
            registry,
        };
        for kind in ["manifest", "blob"] {
            for result in ["hit", "miss", "coalesced", "revalidated", "stale"] {
                metrics.cache_results.with_label_values(&[kind, result]);
            }
        }
        for source in ["cache", "upstream"] {
            metrics.served_bytes.with_label_values(&[source]);
        }
        for (result, reason) in [
            ("verified", "none"),
            ("exempt", "none"),
            ("refused", "no_signature"),
            ("refused", "bad_signature"),
            ("refused", "other_digest"),
            ("refused", "other_identity"),
        ] {
            metrics
                .policy_decisions
                .with_label_values(&[result, reason]);
        }
        for reason in [
            "unavailable",
            "deadline",
            "revalidating",
            "budget",
            "not_found",
            "denied",
        ] {
            metrics.stale_served.with_label_values(&[reason]);
        }
        for route in ["manifest", "blob"] {
            metrics.http_duration.with_label_values(&[route]);
            for class in ["2xx", "4xx", "5xx"] {
                metrics
                    .http_requests
                    .with_label_values(&[route, "GET", class]);
            }
        }
        metrics
    }

    /// Counts a signature policy decision.
    pub fn policy_decision(&self, result: &str, reason: &str) {
        self.policy_decisions
            .with_label_values(&[result, reason])
            .inc();
    }

    /// Creates the access-check series of an upstream at zero (they move only with
    /// `credentials = "client"`).
    fn init_client_access(&self, upstream: &str) {
        for result in [
            "confirmed",
            "remembered",
            "refused",
            "not_found",
            "grace",
            "unconfirmed",
        ] {
            self.client_access.with_label_values(&[upstream, result]);
        }
    }

    /// Creates the series of one upstream at zero, so that dashboards and alerts see every
    /// series from the first scrape on.
    pub fn init_upstream(&self, upstream: &str) {
        self.upstream_up.with_label_values(&[upstream]).set(1);
        self.upstream_bytes.with_label_values(&[upstream]);
        self.token_fetches.with_label_values(&[upstream]);
        self.revalidation_deadlines.with_label_values(&[upstream]);
        self.tag_list_truncated.with_label_values(&[upstream]);
        self.upstream_manifest_gets.with_label_values(&[upstream]);
        self.init_client_access(upstream);
        self.manifests_served.with_label_values(&[upstream]);
        // 0 (no limit known) until the upstream sends its headers.
        self.upstream_ratelimit_limit.with_label_values(&[upstream]);
        self.upstream_ratelimit_remaining
            .with_label_values(&[upstream]);
        for to in ["open", "closed"] {
            self.breaker_transitions.with_label_values(&[upstream, to]);
        }
        for reason in [
            "timeout",
            "connect",
            "4xx",
            "429",
            "5xx",
            "digest_mismatch",
            "circuit_open",
            "paused",
            "token",
        ] {
            self.upstream_errors.with_label_values(&[upstream, reason]);
        }
        for kind in ["manifest", "blob"] {
            self.upstream_duration.with_label_values(&[upstream, kind]);
        }
    }

    /// Creates a sync rule's series at zero.
    pub fn init_sync_rule(&self, rule: &str) {
        for vec in [&self.sync_last_run, &self.sync_next_run, &self.sync_images] {
            vec.with_label_values(&[rule]);
        }
        self.sync_fetched.with_label_values(&[rule]);
        self.sync_failures.with_label_values(&[rule]);
    }

    /// Sets a sync rule's gauges.
    pub fn set_sync_state(
        &self,
        rule: &str,
        last_run: Option<u64>,
        next_run: Option<u64>,
        images: usize,
    ) {
        let value = |v: Option<u64>| v.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX));
        self.sync_last_run
            .with_label_values(&[rule])
            .set(value(last_run));
        self.sync_next_run
            .with_label_values(&[rule])
            .set(value(next_run));
        self.sync_images
            .with_label_values(&[rule])
            .set(i64::try_from(images).unwrap_or(i64::MAX));
    }

    /// Counts one sync round's fetched and failed images.
    pub fn count_sync_round(&self, rule: &str, fetched: u64, failed: u64) {
        self.sync_fetched.with_label_values(&[rule]).inc_by(fetched);
        self.sync_failures.with_label_values(&[rule]).inc_by(failed);
    }

    /// Manifest and blob answers so far: (every result but `miss`, all of them), the hit
    /// ratio's two sides.
    pub fn cache_answers(&self) -> (u64, u64) {
        let (mut hits, mut total) = (0, 0);
        for kind in ["manifest", "blob"] {
            for result in ["hit", "miss", "coalesced", "revalidated", "stale"] {
                let count = self.cache_results.with_label_values(&[kind, result]).get();
                total += count;
                if result != "miss" {
                    hits += count;
                }
            }
        }
        (hits, total)
    }

    /// Every HTTP request answered so far, all routes, methods and statuses.
    pub fn http_requests_total(&self) -> u64 {
        use prometheus::core::Collector as _;
        let total: f64 = self
            .http_requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value())
            .sum();
        // A count, well within f64's exact integers.
        total as u64
    }

    /// Sets an upstream's rate-limit gauges from its last answer's headers.
    pub fn set_ratelimit(&self, upstream: &str, limit: Option<u64>, remaining: u64) {
        let value = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(limit) = limit {
            self.upstream_ratelimit_limit
                .with_label_values(&[upstream])
                .set(value(limit));
        }
        self.upstream_ratelimit_remaining
            .with_label_values(&[upstream])
            .set(value(remaining));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        buffer
    }

    /// Observes an upstream request duration.
    pub fn upstream_timer(&self, upstream: &str, kind: &str) -> prometheus::HistogramTimer {
        self.upstream_duration
            .with_label_values(&[upstream, kind])
            .start_timer()
    }
}

/// What [`Register`] does when a metric cannot be registered (its name is taken).
#[derive(Debug, Clone, Copy)]
enum OnError {
    /// A bug: the server's own metrics are registered once, in a new registry.
    Panic,
    /// Logged as "<what> not registered"; the handle still works, unexported.
    Log(&'static str),
}

/// Builds metric handles from literal names and registers them in one registry.
#[derive(Debug, Clone, Copy)]
struct Register<'r> {
    registry: &'r Registry,
    on_error: OnError,
}

impl Register<'_> {
    fn metric<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> M {
        if let Err(err) = self.registry.register(Box::new(metric.clone())) {
            match self.on_error {
                OnError::Panic => panic!("each metric is registered once: {err}"),
                OnError::Log(what) => tracing::error!(error = %err, "{what} not registered"),
            }
        }
        metric
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.metric(
            IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric names and labels are valid literals"),
        )
    }

    fn histogram_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
        self.metric(HistogramVec::new(opts, labels).expect("valid literals"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.metric(IntCounter::new(name, help).expect("valid literals"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.metric(IntGauge::new(name, help).expect("valid literals"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.metric(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid literals"))
    }
}

/// The cluster metrics (`[cluster]`), registered in the server's registry only when a cluster
/// is configured.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// Members known (this replica included).
    pub members: IntGauge,
    /// `result` (ok, not_found, fallback): blob fetches from an owner.
    pub peer_fetches: IntCounterVec,
    /// `reason` (connect, timeout, broken, 5xx, status, body, cooldown): misses filled from the
    /// upstream because the owner could not serve them.
    pub peer_fallbacks: IntCounterVec,
    /// Bytes received from owners.
    pub peer_bytes: IntCounter,
    /// Blob requests this replica answered for a peer.
    pub served_to_peers: IntCounter,
}

impl ClusterMetrics {
    /// Creates the handles and registers them in `metrics`' registry (a name already taken
    /// there is logged, not fatal).
    pub fn new(metrics: &Metrics) -> Self {
        let register = Register {
            registry: &metrics.registry,
            on_error: OnError::Log("cluster metric"),
        };
        let members = register.gauge("regcache_cluster_members", "Cluster members known");
        let peer_fetches = register.counter_vec(
            "regcache_cluster_peer_fetches_total",
            "Blob misses asked of their owner replica, by result",
            &["result"],
        );
        let peer_fallbacks = register.counter_vec(
            "regcache_cluster_peer_fallbacks_total",
            "Blob misses filled from the upstream because the owner replica could not serve them",
            &["reason"],
        );
        for result in ["ok", "not_found", "fallback"] {
            peer_fetches.with_label_values(&[result]);
        }
        Self {
            members,
            peer_fetches,
            peer_fallbacks,
            peer_bytes: register.counter(
                "regcache_cluster_peer_bytes_total",
                "Blob bytes received from owner replicas",
            ),
            served_to_peers: register.counter(
                "regcache_cluster_served_to_peers_total",
                "Blob requests answered for peer replicas",
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions() {
        let metrics = Metrics::new();
        metrics
            .http_requests
            .with_label_values(&["blob", "GET", "2xx"])
            .inc();
        metrics.upstream_up.with_label_values(&["docker.io"]).set(1);
        let text = String::from_utf8(metrics.encode()).expect("utf-8");
        assert!(text.contains(
            "regcache_http_requests_total{method=\"GET\",route=\"blob\",status_class=\"2xx\"} 1"
        ));
        for line in text.lines().filter(|l| l.starts_with("# TYPE regcache_")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                _ => {}
            }
        }
    }
}
