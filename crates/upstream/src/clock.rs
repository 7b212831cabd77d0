//! [`Clock`]: the time that freshness and circuit-breaker decisions read. In production it is
//! the system clock; tests use [`Clock::adjustable`] to jump it forward (a tag's TTL, a
//! breaker's cooldown) without sleeping.
//!
//! Why not tokio's paused clock: the decisions here read wall time (`SystemTime`, stored in the
//! index) and `std::time::Instant`, and a paused tokio runtime auto-advances while it waits on
//! real sockets, firing upstream timeouts spuriously. A jump of an offset leaves every timeout
//! on real time and moves only the instants the decisions compare. Uses nothing internal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A source of "now" for decisions: the system clock, plus an offset tests may advance.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Nanoseconds added to the system clock; `None` in production.
    offset: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system clock plus an offset that [`Clock::advance`] moves forward (for tests). Its
    /// clones share the offset.
    pub fn adjustable() -> Self {
        Self {
            offset: Some(Arc::default()),
        }
    }

    /// Moves an adjustable clock forward; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(offset) = &self.offset {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            offset.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    fn offset(&self) -> Duration {
        self.offset.as_ref().map_or(Duration::ZERO, |o| {
            Duration::from_nanos(o.load(Ordering::Relaxed))
        })
    }

    /// Wall-clock now (for times stored in the index).
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + self.offset()
    }

    /// Monotonic now (for cooldowns).
    pub fn instant(&self) -> Instant {
        Instant::now() + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_both_clocks_of_every_clone_and_never_the_system_one() {
        let clock = Clock::adjustable();
        let clone = clock.clone();
        let (wall, mono) = (SystemTime::now(), Instant::now());
        clock.advance(Duration::from_secs(3600));
        assert!(clone.now() >= wall + Duration::from_secs(3600));
        assert!(clone.instant() >= mono + Duration::from_secs(3600));
        let system = Clock::system();
        system.advance(Duration::from_secs(3600));
        assert!(system.now() < wall + Duration::from_secs(60));
    }
}
