//! `max_bandwidth`: one token bucket (governor) per upstream, shared by every blob body read
//! from it, so that all its fills together stay under the cap. Only upstream blob bodies wait
//! on it: manifests, listings and everything served from the store never do.
//!
//! A body chunk is let through once the bucket holds its bytes. The bucket holds at most a
//! tenth of a second's worth (at least 64 KiB, at most the rate), so a fill starts at once and
//! then keeps to the rate; the upstream is slowed by TCP flow control while a chunk waits.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The smallest burst: one chunk of a typical upstream body.
const MIN_BURST: u32 = 64 * 1024;

/// A shared byte-rate cap.
#[derive(Debug)]
pub(crate) struct Throttle {
    limiter: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Throttle {
    /// A cap of `bytes_per_second`; `None` for 0 (no cap). Rates above `u32::MAX` bytes a
    /// second are refused by the configuration.
    pub(crate) fn new(bytes_per_second: u64) -> Option<Self> {
        let rate = NonZeroU32::new(u32::try_from(bytes_per_second).unwrap_or(u32::MAX))?;
        let burst = NonZeroU32::new((rate.get() / 10).max(MIN_BURST).min(rate.get()))?;
        Some(Self {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            burst,
        })
    }

    /// Waits until `bytes` may pass (in pieces of at most the burst).
    pub(crate) async fn take(&self, bytes: usize) {
        let mut left = u32::try_from(bytes).unwrap_or(u32::MAX);
        while let Some(cells) = NonZeroU32::new(left.min(self.burst.get())) {
            // Cannot fail: `cells` is at most the burst.
            let _ = self.limiter.until_n_ready(cells).await;
            left -= cells.get();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_at_zero_and_a_burst_between_the_floor_and_the_rate() {
        assert!(Throttle::new(0).is_none());
        let small = Throttle::new(10_000).expect("a cap");
        assert_eq!(small.burst.get(), 10_000);
        let large = Throttle::new(16 << 20).expect("a cap");
        assert_eq!(large.burst.get(), (16 << 20) / 10);
        let huge = Throttle::new(u64::MAX).expect("a cap");
        assert_eq!(huge.burst.get(), u32::MAX / 10);
    }
}
