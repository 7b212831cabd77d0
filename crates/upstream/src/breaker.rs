//! A per-upstream circuit breaker, so that a sick upstream costs one waiting request, not one
//! per client, and the first request after it recovers succeeds.
//!
//! The state machine (also in ARCHITECTURE.md):
//!
//! - **Closed**: requests go out. Each request that fails (after its retries: one request, one
//!   failure) adds one to a count of consecutive failures; any answer resets it. At `threshold`
//!   the circuit opens with `cooldown` = `breaker_cooldown`.
//! - **Open** until `retry_at`: a request that has something else to serve (a tag revalidation
//!   with a cached copy) fails fast; a miss, which has nothing to fall back to, may go out as
//!   the **probe** — one probe in flight at a time, sent once without retries; every other
//!   request fails fast (`503` with `Retry-After`). After `retry_at` any request may probe.
//! - The probe's answer closes the circuit. A failed probe re-opens it with the cooldown
//!   doubled (at most [`MAX_BACKOFF`] × `breaker_cooldown`) from now; a probe that ends without
//!   a verdict (its caller went away, or the answer said nothing about health) only frees the
//!   probe slot.
//!
//! Every decision takes `now` from the breaker's [`Clock`], so the machine is tested with
//! fabricated instants.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::clock::Clock;

/// The cooldown after repeated failed probes is at most this many times `breaker_cooldown`.
pub(crate) const MAX_BACKOFF: u32 = 8;

#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    clock: Clock,
    // A std mutex: a few field updates, never held across an await.
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        /// Until then only misses may probe.
        retry_at: Instant,
        /// The cooldown that set `retry_at`; doubled by each failed probe.
        cooldown: Duration,
        /// A probe is in flight; every other request fails fast.
        probing: bool,
    },
}

/// Whether the caller has something to serve if the upstream cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: a miss. May probe an open circuit.
    Miss,
    /// A cached copy (a tag revalidation): fails fast while the circuit is open.
    HasFallback,
}

/// A change of state, for the log and the transition metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Opened,
    Closed,
}

/// Permission to send one request; a probe when the circuit is open. Dropping it without
/// recording a verdict frees the probe slot, so a probe whose caller was cancelled (a client
/// that went away) cannot wedge the circuit.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            let mut state = self.breaker.lock();
            if let State::Open { probing, .. } = &mut *state {
                *probing = false;
            }
        }
    }
}

impl Permit<'_> {
    /// Whether this request is the probe of an open circuit (sent once, without retries).
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
    }

    /// The upstream answered (any status that is not its failure): closes the circuit.
    pub(crate) fn succeeded(self) -> Option<Transition> {
        let mut state = self.breaker.lock();
        let was_open = matches!(*state, State::Open { .. });
        *state = State::Closed {
            consecutive_failures: 0,
        };
        was_open.then_some(Transition::Closed)
    }

    /// The upstream failed this request (after its retries).
    pub(crate) fn failed(self) -> Option<Transition> {
        let now = self.breaker.clock.instant();
        let mut state = self.breaker.lock();
        match *state {
            State::Closed {
                consecutive_failures,
            } => {
                let failures = consecutive_failures.saturating_add(1);
                if failures < self.breaker.threshold {
                    *state = State::Closed {
                        consecutive_failures: failures,
                    };
                    return None;
                }
                *state = State::Open {
                    retry_at: now + self.breaker.cooldown,
                    cooldown: self.breaker.cooldown,
                    probing: false,
                };
                Some(Transition::Opened)
            }
            State::Open { cooldown, .. } if self.probe => {
                let cooldown = (cooldown * 2).min(self.breaker.cooldown * MAX_BACKOFF);
                *state = State::Open {
                    retry_at: now + cooldown,
                    cooldown,
                    probing: false,
                };
                None
            }
            // A request let through before the circuit opened: already counted by others.
            State::Open { .. } => None,
        }
    }
}

/// The circuit is open; retry after this long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Open(pub(crate) Duration);

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration, clock: Clock) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            clock,
            state: Mutex::new(State::Closed {
                consecutive_failures: 0,
            }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Whether a request may go out now; see the module doc for who may probe.
    ///
    /// # Errors
    /// [`Open`] with the time until a request with a fallback may probe.
    pub(crate) fn check(&self, need: Need) -> Result<Permit<'_>, Open> {
        let now = self.clock.instant();
        let mut state = self.lock();
        match &mut *state {
            State::Closed { .. } => Ok(Permit {
                breaker: self,
                probe: false,
            }),
            State::Open {
                retry_at, probing, ..
            } => {
                let wait = retry_at.saturating_duration_since(now);
                if *probing || (need == Need::HasFallback && !wait.is_zero()) {
                    // While a probe is in flight, its verdict is at most a timeout away.
                    return Err(Open(wait.max(Duration::from_secs(1))));
                }
                *probing = true;
                Ok(Permit {
                    breaker: self,
                    probe: true,
                })
            }
        }
    }

    /// Whether the circuit is open (for health reporting): from the failure that opened it to
    /// the answer that closes it.
    pub(crate) fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    fn breaker(threshold: u32) -> (Breaker, Clock) {
        let clock = Clock::adjustable();
        (Breaker::new(threshold, COOLDOWN, clock.clone()), clock)
    }

    fn fail(breaker: &Breaker, need: Need) -> Option<Transition> {
        breaker.check(need).expect("a permit").failed()
    }

    #[test]
    fn opens_after_threshold_requests_fail() {
        let (breaker, _) = breaker(3);
        assert_eq!(fail(&breaker, Need::Miss), None);
        assert_eq!(fail(&breaker, Need::Miss), None);
        assert_eq!(fail(&breaker, Need::Miss), Some(Transition::Opened));
        assert!(breaker.is_open());
    }

    #[test]
    fn an_answer_resets_the_count() {
        let (breaker, _) = breaker(2);
        fail(&breaker, Need::Miss);
        assert_eq!(breaker.check(Need::Miss).expect("permit").succeeded(), None);
        assert_eq!(fail(&breaker, Need::Miss), None, "the count restarted");
        assert!(!breaker.is_open());
    }

    #[test]
    fn while_open_a_miss_probes_at_once_and_others_fail_fast() {
        let (breaker, _) = breaker(1);
        fail(&breaker, Need::Miss);
        let open = breaker
            .check(Need::HasFallback)
            .expect_err("a request with a fallback does not probe during the cooldown");
        assert!(open.0 <= COOLDOWN && open.0 > COOLDOWN - Duration::from_secs(1));
        let probe = breaker.check(Need::Miss).expect("a miss may probe at once");
        assert!(breaker.check(Need::Miss).is_err(), "one probe at a time");
        assert_eq!(probe.succeeded(), Some(Transition::Closed));
        assert!(!breaker.is_open());
        assert!(breaker.check(Need::HasFallback).is_ok());
    }

    #[test]
    fn failed_probes_back_off_the_cooldown_up_to_the_cap() {
        let (breaker, clock) = breaker(1);
        fail(&breaker, Need::Miss);
        let mut expected = COOLDOWN;
        for _ in 0..6 {
            expected = (expected * 2).min(COOLDOWN * MAX_BACKOFF);
            assert_eq!(fail(&breaker, Need::Miss), None, "still open");
            let wait = breaker.check(Need::HasFallback).expect_err("open").0;
            assert!(
                wait <= expected && wait > expected - Duration::from_secs(1),
                "{wait:?} vs {expected:?}"
            );
        }
        assert_eq!(expected, COOLDOWN * MAX_BACKOFF);
        clock.advance(expected);
        let probe = breaker
            .check(Need::HasFallback)
            .expect("after the cooldown anyone may probe");
        assert_eq!(probe.succeeded(), Some(Transition::Closed));
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_and_keeps_the_circuit_open() {
        let (breaker, _) = breaker(1);
        fail(&breaker, Need::Miss);
        drop(breaker.check(Need::Miss).expect("probe"));
        assert!(breaker.is_open());
        assert!(
            breaker.check(Need::Miss).is_ok(),
            "a dropped probe must not wedge the circuit"
        );
    }

    #[test]
    fn a_late_failure_of_a_request_sent_while_closed_does_not_extend_the_cooldown() {
        let (breaker, _) = breaker(1);
        let early = breaker.check(Need::Miss).expect("closed");
        fail(&breaker, Need::Miss);
        let before = breaker.check(Need::HasFallback).expect_err("open").0;
        assert_eq!(early.failed(), None);
        let after = breaker.check(Need::HasFallback).expect_err("open").0;
        assert!(after <= before);
    }
}
