//! Tag freshness: whether a cached tag is served as it is, served while a revalidation runs in
//! the background, or revalidated first, and whether it may be served stale when the upstream
//! cannot be asked. A pure decision over the tag's age, so it is tested without a clock.

use std::time::Duration;

/// The freshness settings (`cache.tag_ttl`, `cache.stale_while_revalidate`, `cache.max_stale`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Freshness {
    /// Served without asking for this long after the upstream confirmed it.
    pub(crate) tag_ttl: Duration,
    /// Past the TTL, served at once for this long while a background revalidation runs
    /// (RFC 5861).
    pub(crate) stale_while_revalidate: Duration,
    /// Past the TTL, served stale for this long when the upstream cannot be asked.
    pub(crate) max_stale: Duration,
}

/// What to do with a cached tag of some age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it; do not ask the upstream.
    Fresh,
    /// Serve it at once (stale) and revalidate in the background.
    ServeAndRevalidate,
    /// Revalidate first. With `stale_ok`, a revalidation that fails because the upstream
    /// cannot be asked, or that is not answered within `cache.revalidate_timeout`, falls back
    /// to the cached tag; without, the client waits for the upstream's answer.
    Revalidate {
        /// Whether the cached tag may still be served stale.
        stale_ok: bool,
    },
}

impl Freshness {
    /// The verdict for a tag confirmed `age` ago.
    pub(crate) fn judge(&self, age: Duration) -> Verdict {
        if age < self.tag_ttl {
            return Verdict::Fresh;
        }
        let past_ttl = age - self.tag_ttl;
        let stale_ok = past_ttl < self.max_stale;
        if stale_ok && past_ttl < self.stale_while_revalidate {
            Verdict::ServeAndRevalidate
        } else {
            Verdict::Revalidate { stale_ok }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn freshness(tag_ttl: u32, swr: u32, max_stale: u32) -> Freshness {
        Freshness {
            tag_ttl: S * tag_ttl,
            stale_while_revalidate: S * swr,
            max_stale: S * max_stale,
        }
    }

    #[track_caller]
    fn check(freshness: Freshness, age: Duration, expected: Verdict) {
        assert_eq!(freshness.judge(age), expected, "age {age:?}");
    }

    #[test]
    fn verdicts_by_age() {
        use Verdict::*;
        let f = freshness(60, 0, 3600);
        check(f, Duration::ZERO, Fresh);
        check(f, S * 59, Fresh);
        check(f, S * 61, Revalidate { stale_ok: true });
        check(f, S * 3659, Revalidate { stale_ok: true });
        check(f, S * 3660, Revalidate { stale_ok: false });
        check(f, S * 100_000, Revalidate { stale_ok: false });

        let f = freshness(60, 30, 3600);
        check(f, S * 61, ServeAndRevalidate);
        check(f, S * 89, ServeAndRevalidate);
        check(f, S * 90, Revalidate { stale_ok: true });

        // A stale-while-revalidate window longer than max_stale ends with it.
        let f = freshness(60, 600, 30);
        check(f, S * 89, ServeAndRevalidate);
        check(f, S * 91, Revalidate { stale_ok: false });

        // tag_ttl = 0 asks every time.
        let f = freshness(0, 0, 3600);
        check(f, Duration::ZERO, Revalidate { stale_ok: true });
        check(f, S * 5, Revalidate { stale_ok: true });
    }
}
