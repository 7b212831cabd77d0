//! What a connection is doing, for its time limits: requests in flight, how long it has been
//! idle, and responses whose client stopped taking them.
//!
//! A response is *offered* from the moment its head is ready and again after each frame of its
//! body has been handed to hyper; it is *taken* when hyper asks for the next frame, which it
//! does only once the client has made room (TCP window, HTTP/2 flow control). A response
//! offered and not taken for `send_timeout` means a client that stopped reading: an HTTP/1
//! connection is dropped; an HTTP/2 stream is reset alone (each runs in a task of its own, see
//! [`StreamExecutor`]), so that the frame hyper holds for it until the client grants window
//! (one chunk, and its share of the response budget) is freed while the connection's other
//! streams go on. Time the cache itself spends producing a frame (a fill waiting on its
//! upstream, a read waiting for its share of the response budget) is never counted against
//! the client.
//!
//! Each poll for a frame updates the record once, after the inner body has answered: a frame
//! with more to come replaces the previous offer (hyper asking for it took that one); anything
//! else (the cache still producing, the end, an error) clears it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ListenerOptions;
use crate::http;
use regcache_cache::ConnectionShare;

tokio::task_local! {
    /// In the task of each HTTP/2 stream (see [`StreamExecutor`]): cancelled, it resets that
    /// stream.
    static STREAM_RESET: CancellationToken;
}

/// Runs each HTTP/2 stream (hyper hands its executor one future per stream) in a task of its
/// own, counted to its connection's [`ConnectionShare`] of the response budget, that a stall
/// can end: cancelling it drops the stream's future, so h2 resets the stream
/// (`RST_STREAM` with `CANCEL`) and what it held is freed, while the connection goes on.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let reset = CancellationToken::new();
        // Called from the connection's task: the stream's reads count to its connection.
        let share = ConnectionShare::current().unwrap_or_default();
        tokio::spawn(share.scope(STREAM_RESET.scope(reset.clone(), async move {
            tokio::select! {
                () = stream => {}
                () = reset.cancelled() => {}
            }
        })));
    }
}

/// Why a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closing {
    /// No first request within `header_read_timeout` (nothing sent, a partial head, an HTTP/2
    /// preface alone): nothing to finish, so it is closed at once.
    NoRequest,
    /// No request in flight for `idle_timeout` since the last one.
    Idle,
    /// A response offered to the client and not taken for `send_timeout`.
    Stalled,
}

/// Counts each request as in flight on its connection until its response body has been sent
/// or dropped, and watches whether the client takes the body.
#[derive(Debug, Clone)]
pub(super) struct Tracked<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S, B> tower::Service<hyper::Request<B>> for Tracked<S>
where
    S: tower::Service<hyper::Request<B>, Response = hyper::Response<http::Body>>,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<http::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<B>) -> Self::Future {
        let request_guard = self.activity.begin();
        let response = self.inner.call(request);
        Box::pin(async move {
            // Polled in the stream's own task on HTTP/2, in the connection's on HTTP/1.
            if let Ok(reset) = STREAM_RESET.try_with(CancellationToken::clone) {
                request_guard.on_stream(reset);
            }
            let response = response.await?;
            // The head is ready: from now on, waiting is the client's.
            request_guard.offered();
            Ok(response.map(|inner| {
                Watched {
                    inner,
                    request: request_guard,
                }
                .boxed_unsync()
            }))
        })
    }
}

/// A response body that reports when hyper takes its frames. Owns the request's [`InFlight`],
/// released when hyper drops the body.
struct Watched {
    inner: http::Body,
    request: InFlight,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // Hyper asking took the previous offer: one lock per frame either replaces it with this
        // frame's or, while the cache produces the next one (or at the end), clears it.
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !self.inner.is_end_stream() {
            self.request.offered();
        } else {
            self.request.taken();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a connection has requests in flight, since when it has had none, and which of its
/// responses wait for the client.
#[derive(Debug)]
pub(super) struct Activity {
    // A std mutex: held for a few field updates, never across an await.
    state: Mutex<ActivityState>,
    changed: Notify,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    idle_since: Instant,
    /// Requests begun so far (the last id handed out): non-zero once one has been served.
    next_request: u64,
    /// Requests whose response waits for the client, and since when.
    offered: HashMap<u64, Instant>,
    /// Requests served on an HTTP/2 stream, and how to reset it.
    streams: HashMap<u64, CancellationToken>,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
                next_request: 0,
                offered: HashMap::new(),
                streams: HashMap::new(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, ActivityState> {
        self.state.lock()
    }

    pub(super) fn first_request_deadline(&self, options: &ListenerOptions) -> Instant {
        self.lock().idle_since + options.header_read_timeout
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let id = {
            let mut state = self.lock();
            state.in_flight += 1;
            state.next_request += 1;
            state.next_request
        };
        self.changed.notify_waiters();
        InFlight {
            activity: Arc::clone(self),
            id,
        }
    }

    /// When the connection should be closed, and why: `None` while requests are in flight and
    /// none of their responses waits for the client.
    fn deadline(&self, options: &ListenerOptions) -> Option<(Instant, Closing)> {
        let state = self.lock();
        if state.in_flight == 0 {
            return Some(if state.next_request > 0 {
                (state.idle_since + options.idle_timeout, Closing::Idle)
            } else {
                (
                    state.idle_since + options.header_read_timeout,
                    Closing::NoRequest,
                )
            });
        }
        if options.send_timeout.is_zero() {
            return None;
        }
        let oldest = state.offered.values().min()?;
        Some((*oldest + options.send_timeout, Closing::Stalled))
    }

    /// Resets the HTTP/2 streams whose response has waited for the client for
    /// `send_timeout`; `true` when a response that is not on its own stream (HTTP/1) has too,
    /// and the connection must go.
    fn reset_stalled(&self, options: &ListenerOptions) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let stalled: Vec<u64> = state
            .offered
            .iter()
            .filter(|(_, since)| **since + options.send_timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut reset = 0usize;
        for id in stalled {
            let Some(stream) = state.streams.get(&id) else {
                return true;
            };
            stream.cancel();
            // Not considered again: the stream's task ends at once and drops the request.
            state.offered.remove(&id);
            reset += 1;
        }
        drop(state);
        if reset > 0 {
            tracing::info!(
                streams = reset,
                send_timeout = ?options.send_timeout,
                "reset HTTP/2 streams whose client stopped taking their response"
            );
        }
        false
    }

    /// Completes once the connection should be closed, and says why. Resets stalled HTTP/2
    /// streams on the way (see [`Activity::reset_stalled`]).
    ///
    /// # Cancel safety
    /// Cancel-safe: it only waits, reads and resets streams that are due.
    pub(super) async fn closing(&self, options: &ListenerOptions) -> Closing {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between is not missed.
            changed.as_mut().enable();
            match self.deadline(options) {
                None => changed.await,
                // Checked again after each wait: a response taken meanwhile moved it.
                Some((deadline, Closing::Stalled)) if deadline <= Instant::now() => {
                    if self.reset_stalled(options) {
                        return Closing::Stalled;
                    }
                }
                Some((deadline, why)) if deadline <= Instant::now() => return why,
                Some((deadline, _)) => tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = changed => {}
                },
            }
        }
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
struct InFlight {
    activity: Arc<Activity>,
    id: u64,
}

impl InFlight {
    /// It is served on an HTTP/2 stream, which `reset` resets.
    fn on_stream(&self, reset: CancellationToken) {
        self.activity.lock().streams.insert(self.id, reset);
    }

    /// Its response waits for the client from now (replacing an earlier offer, which hyper
    /// took by asking for the frame now offered).
    fn offered(&self) {
        let first = {
            let mut state = self.activity.lock();
            let first = state.offered.is_empty();
            state.offered.insert(self.id, Instant::now());
            first
        };
        // Only an offer into an empty map can bring the deadline forward (from "none"): any
        // other is no older than those already there, and replacing this request's own only
        // moves it later, which `closing` finds when its sleep ends.
        if first {
            self.activity.changed.notify_waiters();
        }
    }

    /// The client took what was offered.
    fn taken(&self) {
        self.activity.lock().offered.remove(&self.id);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut state = self.activity.lock();
            state.offered.remove(&self.id);
            state.streams.remove(&self.id);
            state.in_flight = state.in_flight.saturating_sub(1);
            state.idle_since = Instant::now();
        }
        self.activity.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn options() -> ListenerOptions {
        ListenerOptions {
            kind: http::Listener::Main,
            max_connections: 1,
            drain_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(20),
            max_concurrent_streams: 32,
            tls: None,
            rate_limit: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_idles_out_after_the_header_timeout() {
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        assert_eq!(activity.closing(&options()).await, Closing::NoRequest);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_then_idle_timeout_applies() {
        let activity = Arc::new(Activity::new());
        let request = activity.begin();
        let options = options();
        let closing = activity.closing(&options);
        tokio::pin!(closing);
        // Far past every limit, a request still being produced holds the connection open.
        assert!(
            tokio::time::timeout(Duration::from_secs(600), closing.as_mut())
                .await
                .is_err()
        );
        let finished = Instant::now();
        drop(request);
        assert_eq!(closing.await, Closing::Idle);
        assert_eq!(finished.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_take_closes_the_connection() {
        let activity = Arc::new(Activity::new());
        let options = options();
        let slow = activity.begin();
        let stuck = activity.begin();
        let closing = activity.closing(&options);
        tokio::pin!(closing);
        // A client taking a frame every 15 s (under the 20 s limit) keeps its connection.
        for _ in 0..4 {
            slow.offered();
            assert!(
                tokio::time::timeout(Duration::from_secs(15), closing.as_mut())
                    .await
                    .is_err()
            );
            slow.taken();
        }
        // One response offered and never taken: closed 20 s after the offer, although the
        // other request is still in flight.
        let offered = Instant::now();
        stuck.offered();
        slow.offered();
        tokio::time::sleep(Duration::from_secs(5)).await;
        slow.taken();
        assert_eq!(closing.await, Closing::Stalled);
        assert_eq!(offered.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_http2_stream_is_reset_and_the_connection_kept() {
        let activity = Arc::new(Activity::new());
        let options = options();
        let stuck = activity.begin();
        let reset = CancellationToken::new();
        stuck.on_stream(reset.clone());
        let taking = activity.begin();
        taking.on_stream(CancellationToken::new());
        let closing = activity.closing(&options);
        tokio::pin!(closing);
        stuck.offered();
        taking.offered();
        tokio::time::sleep(Duration::from_secs(10)).await;
        taking.taken();
        assert!(
            tokio::time::timeout(Duration::from_secs(9), closing.as_mut())
                .await
                .is_err()
        );
        assert!(!reset.is_cancelled());
        // The stalled stream is reset 20 s after its offer; the connection stays open.
        assert!(
            tokio::time::timeout(Duration::from_secs(600), closing.as_mut())
                .await
                .is_err()
        );
        assert!(reset.is_cancelled());
        // Its task ending drops the request: the connection is idle from then on.
        drop(stuck);
        drop(taking);
        let idle = Instant::now();
        assert_eq!(closing.await, Closing::Idle);
        assert_eq!(idle.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn send_timeout_zero_never_closes_a_connection_in_flight() {
        let activity = Arc::new(Activity::new());
        let options = ListenerOptions {
            send_timeout: Duration::ZERO,
            ..options()
        };
        let request = activity.begin();
        request.offered();
        let closing = activity.closing(&options);
        assert!(tokio::time::timeout(Duration::from_secs(3600), closing)
            .await
            .is_err());
    }
}
