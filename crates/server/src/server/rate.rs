//! The optional per-client-address request rate limit (`server.rate_limit`): a GCRA limiter
//! (the `governor` crate) keyed by IP address, as a tower service in front of authentication,
//! so password guessing is limited too. Over the limit, a request gets `429` with
//! `Retry-After` and goes no further.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::http;

/// How often addresses that have not been seen for a while are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Requests per second per client address, with a burst of the same size.
#[derive(Debug)]
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl RateLimit {
    pub fn new(per_second: NonZeroU32) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second)),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when `address` is over its rate.
    fn check(&self, address: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&address)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets idle addresses every minute until `shutdown`, so memory follows the number of
    /// recently active clients, not of all clients ever seen.
    pub async fn prune_periodically(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => self.limiter.retain_recent(),
            }
        }
    }
}

/// A service behind the rate limit of one connection's client address.
#[derive(Debug, Clone)]
pub(crate) struct Limited<S> {
    pub(crate) inner: S,
    pub(crate) limit: Option<Arc<RateLimit>>,
    pub(crate) address: IpAddr,
}

impl<S, B> tower::Service<hyper::Request<B>> for Limited<S>
where
    S: tower::Service<
        hyper::Request<B>,
        Response = hyper::Response<http::Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<http::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<hyper::Response<http::Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<B>) -> Self::Future {
        if let Some(limit) = &self.limit {
            if let Err(wait) = limit.check(self.address) {
                tracing::info!(client = %self.address, path = %request.uri().path(), "rate limit exceeded");
                let response =
                    http::too_many_requests(request.method() == hyper::Method::HEAD, wait);
                return Box::pin(std::future::ready(Ok(response)));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_budget() {
        let limit = RateLimit::new(NonZeroU32::new(3).expect("non-zero"));
        let a: IpAddr = "192.0.2.1".parse().expect("address");
        let b: IpAddr = "192.0.2.2".parse().expect("address");
        for _ in 0..3 {
            assert!(limit.check(a).is_ok());
        }
        let wait = limit.check(a).expect_err("over the limit");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limit.check(b).is_ok());
    }
}
