//! The status page's charts: one sample a minute for the last three hours (requests, hit
//! ratio, bytes served and fetched, each upstream's state), kept in memory with a fixed
//! bound, drawn as small inline SVG (no JavaScript, no external assets). The minute in
//! progress is drawn too, from the counters as they are now.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;
use regcache_cache::{Cache, RateLimitView};
use regcache_metrics::Metrics;

/// Minutes kept and drawn.
pub(crate) const MINUTES: usize = 180;
/// Between two samples.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(60);
/// Chart size in pixels: two per minute.
const WIDTH: usize = MINUTES * 2;
const HEIGHT: usize = 48;

/// Counters as they stand; a minute is the difference of two.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    requests: u64,
    answers: u64,
    hits: u64,
    served: u64,
    fetched: u64,
}

impl Totals {
    fn read(metrics: &Metrics, cache: &Cache) -> Self {
        let requests = metrics.http_requests_total();
        let (hits, answers) = metrics.cache_answers();
        let served = ["cache", "upstream"]
            .iter()
            .map(|source| metrics.served_bytes.with_label_values(&[source]).get())
            .sum();
        let fetched = cache
            .upstreams()
            .iter()
            .map(|u| metrics.upstream_bytes.with_label_values(&[u.name()]).get())
            .sum();
        Self {
            requests,
            answers,
            hits,
            served,
            fetched,
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(earlier.requests),
            answers: self.answers.saturating_sub(earlier.answers),
            hits: self.hits.saturating_sub(earlier.hits),
            served: self.served.saturating_sub(earlier.served),
            fetched: self.fetched.saturating_sub(earlier.fetched),
        }
    }
}

/// An upstream's state in a minute, as its strip shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    /// Marked down by the circuit breaker.
    Down,
    /// Paused after a `429`, or at its rate-limit reserve.
    Limited,
    Offline,
}

impl State {
    fn of(offline: bool, marked_down: bool, budget: &RateLimitView) -> Self {
        if offline {
            Self::Offline
        } else if marked_down {
            Self::Down
        } else if budget.low || budget.paused_for.is_some_and(|left| !left.is_zero()) {
            Self::Limited
        } else {
            Self::Up
        }
    }

    /// Every upstream's state now, in configuration order.
    fn all(cache: &Cache) -> Vec<Self> {
        cache
            .upstreams()
            .iter()
            .map(|u| Self::of(u.is_offline(), u.is_marked_down(), &u.rate_limit()))
            .collect()
    }

    fn color(self) -> &'static str {
        match self {
            Self::Up => "#2a2",
            Self::Down => "#c22",
            Self::Limited => "#e90",
            Self::Offline => "#999",
        }
    }
}

#[derive(Debug, Clone)]
struct Minute {
    counts: Totals,
    upstreams: Vec<State>,
}

#[derive(Debug, Default)]
struct Samples {
    minutes: VecDeque<Minute>,
    /// The counters at the last sample.
    last: Option<Totals>,
}

/// The last three hours, a sample a minute.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<Samples>,
}

impl History {
    /// Takes this minute's sample (called every [`SAMPLE_EVERY`]).
    pub(crate) fn sample(&self, metrics: &Metrics, cache: &Cache) {
        let now = Totals::read(metrics, cache);
        let upstreams = State::all(cache);
        let mut samples = self.samples.lock();
        // The first call (at start) only sets the baseline: no minute has passed yet.
        let Some(last) = samples.last.replace(now) else {
            return;
        };
        let counts = now.since(last);
        if samples.minutes.len() == MINUTES {
            samples.minutes.pop_front();
        }
        samples.minutes.push_back(Minute { counts, upstreams });
    }

    /// The kept minutes and the one in progress, oldest first (at most [`MINUTES`]).
    fn minutes(&self, metrics: &Metrics, cache: &Cache) -> Vec<Minute> {
        let now = Totals::read(metrics, cache);
        let samples = self.samples.lock();
        let current = Minute {
            counts: now.since(samples.last.unwrap_or_default()),
            upstreams: State::all(cache),
        };
        let skip = (samples.minutes.len() + 1).saturating_sub(MINUTES);
        samples
            .minutes
            .iter()
            .skip(skip)
            .cloned()
            .chain(std::iter::once(current))
            .collect()
    }

    /// The charts section of the status page.
    pub(crate) fn render(&self, metrics: &Metrics, cache: &Cache, html: &mut String) {
        let minutes = self.minutes(metrics, cache);
        html.push_str("<h2>Last three hours, per minute</h2><div class=\"charts\" id=\"charts\">");
        let requests: Vec<Option<f64>> = minutes
            .iter()
            .map(|m| Some(m.counts.requests as f64))
            .collect();
        chart(
            html,
            "requests",
            "Requests",
            &[("#36c", "", &requests)],
            None,
        );
        let ratio: Vec<Option<f64>> = minutes
            .iter()
            .map(|m| (m.counts.answers > 0).then(|| m.counts.hits as f64 / m.counts.answers as f64))
            .collect();
        chart(
            html,
            "hit-ratio-chart",
            "Hit ratio",
            &[("#2a2", "", &ratio)],
            Some(1.0),
        );
        let served: Vec<Option<f64>> = minutes
            .iter()
            .map(|m| Some(m.counts.served as f64))
            .collect();
        let fetched: Vec<Option<f64>> = minutes
            .iter()
            .map(|m| Some(m.counts.fetched as f64))
            .collect();
        chart(
            html,
            "bytes-chart",
            "Bytes",
            &[
                ("#36c", "served (blue)", &served),
                ("#e80", "fetched upstream (orange)", &fetched),
            ],
            None,
        );
        let _ = write!(
            html,
            "<figure id=\"upstream-states\"><figcaption>Upstreams (green up, orange rate-limited, red down, grey offline)</figcaption>"
        );
        for (index, upstream) in cache.upstreams().iter().enumerate() {
            let _ = write!(
                html,
                "<div>{}</div><svg width=\"{WIDTH}\" height=\"10\" viewBox=\"0 0 {WIDTH} 10\" role=\"img\" aria-label=\"{} state\"><rect width=\"{WIDTH}\" height=\"10\" fill=\"#f3f3f3\"/>",
                super::status::escape(upstream.name()),
                super::status::escape(upstream.name())
            );
            let offset = (MINUTES - minutes.len()) * 2;
            for (i, minute) in minutes.iter().enumerate() {
                let state = minute.upstreams.get(index).copied().unwrap_or(State::Up);
                let _ = write!(
                    html,
                    "<rect x=\"{}\" y=\"0\" width=\"2\" height=\"10\" fill=\"{}\"/>",
                    offset + i * 2,
                    state.color()
                );
            }
            html.push_str("</svg>");
        }
        html.push_str("</figure></div>");
    }
}

/// One chart: each series (color, name, one value a minute) a polyline over the minutes, a
/// gap where a value is `None`, a dot where a run is one minute long; scaled to `max` or the
/// largest value. The caption gives each series' value this minute and the scale.
fn chart(
    html: &mut String,
    id: &str,
    title: &str,
    series: &[(&str, &str, &[Option<f64>])],
    max: Option<f64>,
) {
    let largest = series
        .iter()
        .flat_map(|(_, _, values)| values.iter().flatten())
        .fold(0.0_f64, |a, &b| a.max(b));
    let scale = max.unwrap_or(largest.max(1.0));
    let shown = |value: f64| {
        if max == Some(1.0) {
            format!("{:.0}%", value * 100.0)
        } else if value >= 1024.0 {
            bytesize::ByteSize(value as u64).to_string()
        } else {
            format!("{value:.0}")
        }
    };
    let latest: Vec<String> = series
        .iter()
        .map(|(_, name, values)| {
            let value = values
                .last()
                .copied()
                .flatten()
                .map_or("-".to_owned(), shown);
            if name.is_empty() {
                value
            } else {
                format!("{name} {value}")
            }
        })
        .collect();
    let _ = write!(
        html,
        "<figure id=\"{id}\"><figcaption>{title}: {} this minute, scale {}</figcaption>\
         <svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{title}\">\
         <rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#fafafa\" stroke=\"#ddd\"/>",
        latest.join(", "),
        shown(scale),
    );
    for (color, _, values) in series {
        let offset = (MINUTES - values.len().min(MINUTES)) * 2;
        let mut run: Vec<(usize, f64)> = Vec::new();
        let flush = |run: &mut Vec<(usize, f64)>, html: &mut String| {
            match run.as_slice() {
                [] => {}
                [(x, y)] => {
                    let _ = write!(
                        html,
                        "<circle cx=\"{x}\" cy=\"{y:.1}\" r=\"2\" fill=\"{color}\"/>"
                    );
                }
                points => {
                    let points: Vec<String> =
                        points.iter().map(|(x, y)| format!("{x},{y:.1}")).collect();
                    let _ = write!(
                        html,
                        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                        points.join(" ")
                    );
                }
            }
            run.clear();
        };
        for (i, value) in values.iter().enumerate() {
            match value {
                Some(value) => {
                    let y = HEIGHT as f64 - 2.0 - (value / scale).min(1.0) * (HEIGHT as f64 - 4.0);
                    run.push((offset + i * 2, y));
                }
                None => flush(&mut run, html),
            }
        }
        flush(&mut run, html);
    }
    html.push_str("</svg></figure>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_each_run_of_values_and_skips_gaps() {
        let mut html = String::new();
        let values = [Some(1.0), Some(2.0), None, Some(4.0)];
        chart(&mut html, "c", "Requests", &[("#000", "", &values)], None);
        assert_eq!(html.matches("<polyline").count(), 1, "{html}");
        assert_eq!(
            html.matches("<circle").count(),
            1,
            "a one-minute run is a dot: {html}"
        );
        assert!(html.contains("Requests: 4 this minute, scale 4"), "{html}");
        // The latest minute sits at the right edge, the largest value at the top.
        assert!(
            html.contains(&format!("cx=\"{}\" cy=\"2.0\"", WIDTH - 2)),
            "{html}"
        );
    }
}
