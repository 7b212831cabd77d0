//! A per-upstream circuit breaker: after `threshold` consecutive failures (connection errors,
//! timeouts, 5xx) the upstream is considered down for `cooldown`, and requests fail at once
//! instead of each paying a timeout. After the cooldown one probe request is let through; a
//! success closes the circuit, a failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    // A std mutex: a few integer updates, never held across an await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// A probe is in flight after the cooldown; others keep failing fast until it reports.
    probing: bool,
}

/// A probe in flight; see [`Breaker::check`].
#[derive(Debug)]
pub(crate) struct Probe<'a>(&'a Breaker);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        // Recorded results already cleared the flag; this covers a probe that never reported.
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.probing = false;
    }
}

/// The circuit is open; retry after this long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Open(pub(crate) Duration);

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether a request may go out now. After the cooldown, the one request let through is
    /// the probe; the returned guard ends the probe when dropped, so a probe whose caller was
    /// cancelled (a client that went away) cannot keep the circuit open forever.
    pub(crate) fn check(&self) -> Result<Option<Probe<'_>>, Open> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(open_until) = state.open_until else {
            return Ok(None);
        };
        let now = Instant::now();
        if now < open_until {
            return Err(Open(open_until - now));
        }
        if state.probing {
            return Err(Open(Duration::from_secs(1)));
        }
        state.probing = true;
        Ok(Some(Probe(self)))
    }

    /// The upstream answered (any status below 500).
    pub(crate) fn record_success(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = State::default();
    }

    /// The upstream failed (connection, timeout, 5xx). Returns true when this opened the circuit.
    pub(crate) fn record_failure(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let was_probe = std::mem::take(&mut state.probing);
        if was_probe || state.consecutive_failures >= self.threshold {
            let newly_open = state.open_until.is_none_or(|until| Instant::now() >= until);
            state.open_until = Some(Instant::now() + self.cooldown);
            return newly_open;
        }
        false
    }

    /// Whether the circuit is open now (for health reporting).
    pub(crate) fn is_open(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open_until.is_some_and(|until| Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let breaker = Breaker::new(3, Duration::from_millis(30));
        assert!(breaker.check().is_ok());
        assert!(!breaker.record_failure());
        assert!(!breaker.record_failure());
        assert!(
            breaker.record_failure(),
            "the third failure opens the circuit"
        );
        assert!(breaker.check().is_err());
        assert!(breaker.is_open());
        std::thread::sleep(Duration::from_millis(40));
        let probe = breaker.check().expect("one probe after the cooldown");
        assert!(probe.is_some());
        assert!(breaker.check().is_err(), "only one probe at a time");
        breaker.record_failure();
        drop(probe);
        assert!(breaker.check().is_err(), "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.check().is_ok());
        breaker.record_success();
        assert!(breaker.check().is_ok());
        assert!(!breaker.is_open());
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let breaker = Breaker::new(1, Duration::from_millis(10));
        breaker.record_failure();
        std::thread::sleep(Duration::from_millis(20));
        let probe = breaker.check().expect("probe");
        drop(probe);
        assert!(
            breaker.check().is_ok(),
            "a dropped probe must not wedge the circuit"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.record_failure();
        breaker.record_success();
        assert!(!breaker.record_failure());
        assert!(breaker.check().is_ok());
    }
}
