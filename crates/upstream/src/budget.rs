//! An upstream's pull budget: what its rate-limit headers say is left, the reserve kept for
//! misses, and the pause after a `429`.
//!
//! - **Headers**: every answer's `ratelimit-limit` / `ratelimit-remaining` (`100;w=21600`, as
//!   Docker Hub sends them: a count, then the window in seconds) and, when sent,
//!   `ratelimit-reset` (seconds until the window resets) are remembered.
//! - **Reserve** (`ratelimit_reserve`): once `remaining <= reserve`, the budget is *low* until
//!   the window resets (`ratelimit-reset`, else the window `w` from the answer that said so,
//!   else [`DEFAULT_LOW_FOR`]) or until a later answer reports more than the reserve left. While
//!   low, cached tags are not revalidated (the cache asks [`Budget::is_low`]); misses still go
//!   out, so the reserve is what they spend.
//! - **Pause**: a `429` (from the registry or from its token endpoint) pauses the upstream
//!   until its `Retry-After` (seconds or an HTTP date; [`DEFAULT_PAUSE`] without one): no
//!   request is sent, [`Budget::admit`] refuses with the time left. After it, one request is
//!   the **probe** (one at a time; the others keep waiting out a second); its answer ends the
//!   pause, another `429` starts a new one. A probe dropped without a verdict frees the slot.
//!
//! Every decision takes "now" from the [`Clock`], so tests jump it instead of sleeping.

use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::header_str;

/// How long the budget stays low when the upstream named no window.
pub(crate) const DEFAULT_LOW_FOR: Duration = Duration::from_secs(3600);
/// The pause after a `429` without a usable `Retry-After`.
pub(crate) const DEFAULT_PAUSE: Duration = Duration::from_secs(60);
/// The longest pause honoured: a `Retry-After` further out is cut to this.
const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// What the upstream last said about its budget, for metrics and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitView {
    /// Requests allowed per window (`ratelimit-limit`).
    pub limit: Option<u64>,
    /// Requests left in the window (`ratelimit-remaining`).
    pub remaining: Option<u64>,
    /// The window, when the upstream named it (`;w=`).
    pub window: Option<Duration>,
    /// The reserve configured for this upstream.
    pub reserve: u64,
    /// Whether the budget is at or under the reserve (cached tags are not revalidated).
    pub low: bool,
    /// Time until the pause after a `429` ends, while paused.
    pub paused_for: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    limit: Option<u64>,
    remaining: Option<u64>,
    window: Option<Duration>,
    /// Set while `remaining <= reserve`: until then the budget is low.
    low_until: Option<Instant>,
    /// Set by a `429`: no request before it.
    paused_until: Option<Instant>,
    /// A probe of an ended pause is in flight.
    probing: bool,
}

/// One upstream's budget; see the module doc.
#[derive(Debug)]
pub(crate) struct Budget {
    reserve: u64,
    clock: Clock,
    state: Mutex<State>,
}

/// The upstream is paused after a `429`; this long is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paused(pub(crate) Duration);

/// Leave to send one request. Dropping a probe's admission without a verdict frees the probe
/// slot, so a cancelled probe cannot keep the upstream paused.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    budget: &'a Budget,
    probe: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.budget.state.lock().probing = false;
        }
    }
}

impl Admission<'_> {
    /// The request was answered `429`: pause until `retry_after` (the header's value).
    /// Returns the pause.
    pub(crate) fn rate_limited(self, retry_after: Option<&str>) -> Duration {
        let now = self.budget.clock.instant();
        let pause = retry_after
            .and_then(|value| parse_retry_after(value, self.budget.clock.now()))
            .unwrap_or(DEFAULT_PAUSE)
            .min(MAX_PAUSE);
        let mut state = self.budget.state.lock();
        let until = now + pause;
        // Concurrent 429s: the furthest pause holds.
        state.paused_until = Some(state.paused_until.map_or(until, |at| at.max(until)));
        pause
    }

    /// The request got any other outcome: a probe ends the pause.
    pub(crate) fn not_rate_limited(self) -> bool {
        if !self.probe {
            return false;
        }
        let mut state = self.budget.state.lock();
        let ended = state.paused_until.take().is_some();
        state.probing = false;
        ended
    }
}

impl Budget {
    pub(crate) fn new(reserve: u64, clock: Clock) -> Self {
        Self {
            reserve,
            clock,
            state: Mutex::default(),
        }
    }

    /// Whether a request may go out now: refused while paused, and while an ended pause's probe
    /// is in flight (for at least a second: its answer is a round trip away).
    pub(crate) fn admit(&self) -> Result<Admission<'_>, Paused> {
        let now = self.clock.instant();
        let mut state = self.state.lock();
        let Some(until) = state.paused_until else {
            return Ok(Admission {
                budget: self,
                probe: false,
            });
        };
        let wait = until.saturating_duration_since(now);
        if !wait.is_zero() || state.probing {
            return Err(Paused(wait.max(Duration::from_secs(1))));
        }
        state.probing = true;
        Ok(Admission {
            budget: self,
            probe: true,
        })
    }

    /// Reads an answer's rate-limit headers. Returns the new (limit, remaining) when it had
    /// any.
    pub(crate) fn observe(&self, headers: &HeaderMap) -> Option<(Option<u64>, u64)> {
        let limit = header_str(headers, "ratelimit-limit").and_then(parse_quota);
        let remaining = header_str(headers, "ratelimit-remaining").and_then(parse_quota)?;
        let reset = header_str(headers, "ratelimit-reset")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let now = self.clock.instant();
        let mut state = self.state.lock();
        if let Some((limit, window)) = limit {
            state.limit = Some(limit);
            state.window = window.or(state.window);
        }
        let (left, window) = remaining;
        state.remaining = Some(left);
        state.window = window.or(state.window);
        state.low_until = (left <= self.reserve).then(|| {
            let lasts = reset.or(state.window).unwrap_or(DEFAULT_LOW_FOR);
            now + lasts.min(MAX_PAUSE)
        });
        Some((state.limit, left))
    }

    /// Whether the budget is at or under the reserve (see the module doc).
    pub(crate) fn is_low(&self) -> bool {
        let now = self.clock.instant();
        let state = self.state.lock();
        state.low_until.is_some_and(|until| now < until)
    }

    /// What is known, for the status page.
    pub(crate) fn view(&self) -> RateLimitView {
        let now = self.clock.instant();
        let state = self.state.lock();
        RateLimitView {
            limit: state.limit,
            remaining: state.remaining,
            window: state.window,
            reserve: self.reserve,
            low: state.low_until.is_some_and(|until| now < until),
            paused_for: state
                .paused_until
                .map(|until| until.saturating_duration_since(now)),
        }
    }
}

/// `100;w=21600` (also a bare `100`) → (100, window).
fn parse_quota(value: &str) -> Option<(u64, Option<Duration>)> {
    let mut parts = value.split(';');
    let count = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|param| param.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Some((count, window))
}

/// `Retry-After`: seconds, or an HTTP date (RFC 9110 §10.2.3) relative to `now`.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("ascii"));
        }
        map
    }

    fn budget(reserve: u64) -> (Budget, Clock) {
        let clock = Clock::adjustable();
        (Budget::new(reserve, clock.clone()), clock)
    }

    #[test]
    fn docker_hub_headers_are_read() {
        assert_eq!(parse_quota("100;w=21600"), Some((100, Some(S * 21600))));
        assert_eq!(parse_quota(" 76 ; w=21600"), Some((76, Some(S * 21600))));
        assert_eq!(parse_quota("5"), Some((5, None)));
        assert_eq!(parse_quota("many"), None);
        let (budget, _) = budget(20);
        let seen = budget.observe(&headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "76;w=21600"),
        ]));
        assert_eq!(seen, Some((Some(100), 76)));
        let view = budget.view();
        assert_eq!(
            (view.limit, view.remaining, view.window, view.low),
            (Some(100), Some(76), Some(S * 21600), false)
        );
        assert_eq!(
            budget.observe(&headers(&[("ratelimit-limit", "100")])),
            None
        );
    }

    #[test]
    fn low_at_the_reserve_until_the_window_resets_or_more_is_left() {
        let (budget, clock) = budget(20);
        let at = |left: &str| {
            budget.observe(&headers(&[
                ("ratelimit-limit", "100;w=600"),
                ("ratelimit-remaining", left),
            ]));
        };
        at("21;w=600");
        assert!(!budget.is_low());
        at("20;w=600");
        assert!(budget.is_low(), "at the reserve");
        clock.advance(S * 599);
        assert!(budget.is_low());
        clock.advance(S);
        assert!(!budget.is_low(), "the window reset");
        at("3;w=600");
        assert!(budget.is_low());
        at("90;w=600");
        assert!(!budget.is_low(), "a later answer says there is more");
        budget.observe(&headers(&[
            ("ratelimit-remaining", "0"),
            ("ratelimit-reset", "30"),
        ]));
        clock.advance(S * 29);
        assert!(budget.is_low());
        clock.advance(S);
        assert!(!budget.is_low(), "ratelimit-reset says when");
    }

    #[test]
    fn a_429_pauses_until_retry_after_then_one_probe_goes() {
        let (budget, clock) = budget(0);
        let paused = budget.admit().expect("not paused").rate_limited(Some("30"));
        assert_eq!(paused, S * 30);
        let Paused(left) = budget.admit().expect_err("paused");
        assert!(left <= S * 30 && left > S * 29, "{left:?}");
        clock.advance(S * 29);
        assert_eq!(
            budget.admit().expect_err("paused").0,
            S,
            "at least a second"
        );
        clock.advance(S);
        let probe = budget.admit().expect("the probe");
        assert!(budget.admit().is_err(), "one probe at a time");
        assert!(
            probe.not_rate_limited(),
            "the probe's answer ends the pause"
        );
        assert!(budget.admit().is_ok());
    }

    #[test]
    fn a_probe_answered_429_pauses_again_and_a_dropped_probe_frees_the_slot() {
        let (budget, clock) = budget(0);
        budget.admit().expect("open").rate_limited(None);
        assert!(budget.admit().expect_err("paused").0 > DEFAULT_PAUSE - S);
        clock.advance(DEFAULT_PAUSE);
        drop(budget.admit().expect("the probe"));
        let probe = budget.admit().expect("a dropped probe frees the slot");
        probe.rate_limited(Some("5"));
        assert!(budget.admit().expect_err("paused again").0 > S * 4);
        assert!(budget.view().paused_for.is_some_and(|left| left > S * 4));
    }

    #[test]
    fn retry_after_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + S * 1_000_000_000;
        let later = httpdate::fmt_http_date(now + S * 90);
        assert_eq!(parse_retry_after(&later, now), Some(S * 90));
        let earlier = httpdate::fmt_http_date(now - S * 90);
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
