//! The status board behind `/` and `/readyz`: recent pulls and bytes served per repository,
//! kept in memory with fixed bounds, and the HTML page that shows them with upstream health,
//! cache size and hit ratio. No external assets, no JavaScript.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::SystemTime;

use regcache_cache::{Cache, CachePhase};
use regcache_metrics::Metrics;

/// Recent pulls kept for the page.
const RECENT: usize = 50;
/// Repositories tracked for "top by bytes served"; new ones are ignored once full.
const MAX_REPOS: usize = 1000;

/// One manifest request, for the "recent pulls" table.
#[derive(Debug, Clone)]
struct Pull {
    at: SystemTime,
    upstream: String,
    repo: String,
    reference: String,
    status: u16,
    phase: &'static str,
}

/// (upstream, repository)
type RepoKey = (String, String);

/// Whether the viewer may see a repository: `(upstream, repository)`.
pub(crate) type Visible<'a> = dyn Fn(&str, &str) -> bool + 'a;

#[derive(Debug, Default)]
struct Board {
    recent: VecDeque<Pull>,
    bytes_by_repo: HashMap<RepoKey, u64>,
}

/// Shared, bounded request statistics.
#[derive(Debug, Default)]
pub(crate) struct StatusBoard {
    // A std mutex: updates are a push and a map increment, never across an await.
    board: Mutex<Board>,
}

impl StatusBoard {
    pub(crate) fn record_pull(
        &self,
        upstream: &str,
        repo: &str,
        reference: &str,
        status: u16,
        phase: Option<CachePhase>,
    ) {
        let mut board = self.board.lock();
        if board.recent.len() == RECENT {
            board.recent.pop_back();
        }
        board.recent.push_front(Pull {
            at: SystemTime::now(),
            upstream: upstream.to_owned(),
            repo: repo.to_owned(),
            reference: reference.to_owned(),
            status,
            phase: phase.map_or("-", CachePhase::as_str),
        });
    }

    pub(crate) fn record_bytes(&self, upstream: &str, repo: &str, bytes: u64) {
        let mut board = self.board.lock();
        let full = board.bytes_by_repo.len() >= MAX_REPOS;
        let key = (upstream.to_owned(), repo.to_owned());
        match board.bytes_by_repo.get_mut(&key) {
            Some(total) => *total += bytes,
            None if !full => {
                board.bytes_by_repo.insert(key, bytes);
            }
            None => {}
        }
    }

    /// Recent pulls and the top repositories, of the repositories `visible` says the viewer
    /// may see (`(upstream, repository)`).
    fn snapshot(&self, visible: &Visible<'_>) -> (Vec<Pull>, Vec<(RepoKey, u64)>) {
        let board = self.board.lock();
        let mut top: Vec<_> = board
            .bytes_by_repo
            .iter()
            .filter(|((upstream, repo), _)| visible(upstream, repo))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        top.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        top.truncate(10);
        let recent = board
            .recent
            .iter()
            .filter(|pull| visible(&pull.upstream, &pull.repo))
            .cloned()
            .collect();
        (recent, top)
    }
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(at: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(at)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// `in 5m`, or `due` when `at` has passed.
fn until(at: SystemTime) -> String {
    let Ok(left) = at.duration_since(SystemTime::now()) else {
        return "due".to_owned();
    };
    match left.as_secs() {
        secs @ 0..=59 => format!("in {secs}s"),
        secs @ 60..=3599 => format!("in {}m", secs / 60),
        secs => format!("in {}h", secs / 3600),
    }
}

/// The hit ratio so far: hits (including coalesced and revalidated) over all cache answers.
/// The rate-limit cell: what the upstream said is left, the reserve, a pause.
fn rate_limit_text(view: &regcache_cache::RateLimitView) -> String {
    let mut text = match (view.remaining, view.limit) {
        (Some(left), Some(limit)) => format!("{left} of {limit} left"),
        (Some(left), None) => format!("{left} left"),
        _ => "not reported".to_owned(),
    };
    if let Some(window) = view.window {
        let _ = write!(text, " per {}", humantime::format_duration(window));
    }
    if view.low {
        let _ = write!(
            text,
            "; at the reserve ({}): cached tags served without revalidation",
            view.reserve
        );
    }
    if let Some(paused) = view.paused_for.filter(|left| !left.is_zero()) {
        let _ = write!(
            text,
            "; paused after a 429 for {}s more",
            paused.as_secs().max(1)
        );
    }
    text
}

pub(crate) fn hit_ratio(metrics: &Metrics) -> Option<f64> {
    let (hits, total) = metrics.cache_answers();
    (total > 0).then(|| hits as f64 / total as f64)
}

/// Renders the status page, naming only the repositories `visible` lets the viewer see.
pub(crate) fn render(
    cache: &Cache,
    metrics: &Metrics,
    board: &StatusBoard,
    history: &super::history::History,
    budget: Option<u64>,
    visible: &Visible<'_>,
) -> String {
    let usage = cache.store().usage();
    let (recent, top) = board.snapshot(visible);
    let mut html = String::from(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>regcache status</title><style>",
        "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}",
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}",
        "th{background:#f3f3f3}.up{color:#0a0}.down{color:#c00}",
        ".tiles{display:flex;gap:1em;flex-wrap:wrap}",
        ".charts{display:flex;gap:1.5em;flex-wrap:wrap}figure{margin:0}figcaption{font-size:12px;color:#555}",
        ".tile{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;min-width:12em}",
        ".tile b{display:block;font-size:1.5em}",
        "</style></head><body><h1>regcache</h1>"
    ));
    let ratio = hit_ratio(metrics).map_or("n/a".to_owned(), |r| format!("{:.1}%", r * 100.0));
    let served_cache = metrics.served_bytes.with_label_values(&["cache"]).get();
    let served_upstream = metrics.served_bytes.with_label_values(&["upstream"]).get();
    let size = match budget {
        Some(budget) => format!(
            "{} of {} ({:.0}%)",
            bytesize::ByteSize(usage.bytes),
            bytesize::ByteSize(budget),
            usage.bytes as f64 * 100.0 / budget.max(1) as f64
        ),
        None => format!("{} (no budget)", bytesize::ByteSize(usage.bytes)),
    };
    let _ = write!(
        html,
        "<div class=\"tiles\"><div class=\"tile\" id=\"hit-ratio\">Hit ratio<b>{ratio}</b></div>\
         <div class=\"tile\" id=\"cache-size\">Cache size<b>{}</b>{} files</div>\
         <div class=\"tile\" id=\"bytes-saved\">Served from cache<b>{}</b>{} from upstreams</div></div>",
        escape(&size),
        usage.files,
        bytesize::ByteSize(served_cache),
        bytesize::ByteSize(served_upstream),
    );
    history.render(metrics, cache, &mut html);
    html.push_str("<h2>Upstreams</h2><table id=\"upstreams\"><tr><th>name</th><th>health</th><th>rate limit</th><th>last error</th></tr>");
    for upstream in cache.upstreams() {
        let (class, health) = if upstream.is_offline() {
            ("down", "offline (configured)")
        } else if upstream.is_marked_down() {
            ("down", "marked down")
        } else {
            ("up", "up")
        };
        let last_error = upstream
            .last_error()
            .map_or("none".to_owned(), |(at, message)| {
                format!("{} — {message}", ago(at))
            });
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"{class}\">{health}</td><td>{}</td><td>{}</td></tr>",
            escape(upstream.name()),
            escape(&rate_limit_text(&upstream.rate_limit())),
            escape(&last_error)
        );
    }
    let rules: Vec<_> = cache
        .sync_status()
        .into_iter()
        .filter(|rule| visible(&rule.upstream, &rule.repository))
        .collect();
    if !rules.is_empty() {
        html.push_str("</table><h2>Sync schedules</h2><table id=\"sync\"><tr><th>rule</th><th>repository</th><th>last run</th><th>next run</th><th>images kept</th><th>fetched</th><th>failures</th><th>last outcome</th></tr>");
        for rule in rules {
            let record = &rule.record;
            let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let last = record.last_run.map_or("never".to_owned(), |t| ago(at(t)));
            let next = record.next_run.map_or("now".to_owned(), |t| until(at(t)));
            let kept: Vec<&str> = record.images.iter().map(|i| i.tag.as_str()).collect();
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}/{}</td><td>{last}</td><td>{next}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&rule.name),
                escape(&rule.upstream),
                escape(&rule.repository),
                escape(&kept.join(", ")),
                record.fetched,
                record.failures,
                escape(&record.outcome),
            );
        }
    }
    let refusals: Vec<_> = cache
        .policy_refusals()
        .into_iter()
        .filter(|r| visible(&r.upstream, &r.repository))
        .collect();
    if cache.has_policy() {
        html.push_str("</table><h2>Signature policy refusals</h2><table id=\"policy-refusals\"><tr><th>when</th><th>image</th><th>reason</th></tr>");
        for refusal in refusals {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}/{}@{}</td><td>{}</td></tr>",
                ago(refusal.at),
                escape(&refusal.upstream),
                escape(&refusal.repository),
                refusal.digest,
                refusal.refusal.text(),
            );
        }
    }
    html.push_str("</table><h2>Top repositories by bytes served</h2><table id=\"top-repos\"><tr><th>upstream</th><th>repository</th><th>served</th></tr>");
    for ((upstream, repo), bytes) in top {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&upstream),
            escape(&repo),
            bytesize::ByteSize(bytes)
        );
    }
    html.push_str("</table><h2>Recent pulls</h2><table id=\"recent\"><tr><th>when</th><th>upstream</th><th>image</th><th>status</th><th>cache</th><th>freshness</th></tr>");
    for pull in recent {
        // A tag's freshness rule; a digest never needs one.
        let freshness = if pull.reference.contains(':') {
            String::new()
        } else {
            cache
                .tag_freshness(&pull.upstream, &pull.reference)
                .unwrap_or_default()
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ago(pull.at),
            escape(&pull.upstream),
            escape(&pull.repo),
            // `repo@sha256:…` by digest, `repo:tag` by tag, as clients write them.
            if pull.reference.contains(':') {
                "@"
            } else {
                ":"
            },
            escape(&pull.reference),
            pull.status,
            pull.phase,
            escape(&freshness)
        );
    }
    html.push_str("</table><p><a href=\"/metrics\">metrics</a> · <a href=\"/readyz\">readiness</a></p></body></html>");
    html
}
