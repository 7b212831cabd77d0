//! Listeners, TLS, the accept loop, the connection limit, per-connection time limits and
//! graceful shutdown. No routing and no OCI knowledge: each request goes through the front-door
//! layers (activity tracking, then [`crate::http::front_door`]) to [`crate::http::serve`].
//!
//! Time limits are per connection, never per request (a whole-request limit would cut long blob
//! pulls): a new connection must finish its TLS handshake and send a first request head within
//! `header_read_timeout`; a connection with no request in flight is closed after
//! `idle_timeout` (HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 gets a `GOAWAY`); a response
//! whose client stops taking it for `send_timeout` has its HTTP/1 connection dropped or its
//! HTTP/2 stream reset (`activity`).
//!
//! Memory per connection: hyper's HTTP/1 write queue is capped near one chunk, and HTTP/2 has
//! at most `max_concurrent_streams` streams, each holding the frame hyper polled before it has
//! flow-control window; every chunk counts against the store's response budget
//! (`server.response_buffer`), which bounds them all together.

mod activity;
mod rate;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use activity::{Activity, Closing, StreamExecutor, Tracked};
pub use rate::RateLimit;
pub use tls::{Tls, TlsError};

use crate::http::{self, AppState};
use regcache_cache::ConnectionShare;
use regcache_config::ServerConfig;
use regcache_metrics::{Event, Reload};

/// How long a connection closed for idleness may take to finish closing before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How one listener serves its connections.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Which routes it serves.
    pub kind: http::Listener,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long open connections may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Time for the TLS handshake and the first request head of a connection.
    pub header_read_timeout: Duration,
    /// Time a connection with no request in flight is kept.
    pub idle_timeout: Duration,
    /// Time a response may wait for its client to take the next bytes (zero: no limit).
    pub send_timeout: Duration,
    /// HTTP/2 streams open at once per connection.
    pub max_concurrent_streams: u32,
    /// TLS, when the listener has it.
    pub tls: Option<Arc<Tls>>,
    /// The per-client-address request rate limit, when configured.
    pub rate_limit: Option<Arc<RateLimit>>,
}

impl ListenerOptions {
    /// The main listener's options: the `[server]` limits and timeouts, `tls` (loaded from
    /// `server.tls_*`), and the per-address rate limit.
    pub fn main(server: &ServerConfig, tls: Option<Arc<Tls>>) -> Self {
        Self {
            kind: http::Listener::Main,
            max_connections: server.max_connections,
            drain_timeout: server.shutdown_timeout,
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            max_concurrent_streams: server.max_concurrent_streams,
            tls,
            rate_limit: server.rate_limit.map(|rate| Arc::new(RateLimit::new(rate))),
        }
    }

    /// The metrics listener's options: the main listener's timeouts, a few connections, plain
    /// HTTP (it is meant for a private address) and no rate limit.
    #[must_use]
    pub fn admin(&self) -> Self {
        Self {
            kind: http::Listener::Admin,
            max_connections: 64,
            tls: None,
            rate_limit: None,
            ..self.clone()
        }
    }
}

/// Accepts connections until `shutdown` is cancelled, then drains open connections for up to
/// `drain_timeout`.
pub async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    options: ListenerOptions,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let tasks = TaskTracker::new();
    let mut builder = auto::Builder::new(StreamExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        // Bounds a request head that drips in slowly. hyper's timer also runs while a
        // kept-alive connection waits for its next request, so it gets the longer of the two
        // limits; `Activity` applies each one exactly (a connection that sends nothing at all
        // is closed after `header_read_timeout`, an idle one after `idle_timeout`).
        .header_read_timeout(options.header_read_timeout.max(options.idle_timeout))
        // Bounds the write queue to about one body chunk per connection (hyper's default
        // lets ~400 KiB queue up), so memory does not grow with the number of clients.
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Each stream may hold a chunk while its client grants no window (hyper polls the
        // body before it has credit): few streams per connection, and the response budget
        // over all of them.
        .max_concurrent_streams(options.max_concurrent_streams);
    let builder = Arc::new(builder);
    let options = Arc::new(options);
    loop {
        // The permit is taken before accept: at the limit, new connections wait in the kernel's
        // backlog instead of consuming memory here.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let state = Arc::clone(&state);
        let builder = Arc::clone(&builder);
        let options = Arc::clone(&options);
        let shutdown = shutdown.clone();
        // Its reads for responses (its HTTP/2 streams' too) count to one share of the budget.
        tasks.spawn(ConnectionShare::new().scope(async move {
            let connection = Connection {
                builder: &builder,
                state,
                options: &options,
                activity,
                shutdown,
                peer,
            };
            match options.tls.as_ref().map(|tls| tls.acceptor()) {
                None => connection.serve(stream).await,
                Some(acceptor) => {
                    // The handshake counts against the time allowed for the first request.
                    let deadline = connection.activity.first_request_deadline(&options);
                    let handshake = tokio::select! {
                        () = connection.shutdown.cancelled() => return,
                        handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => handshake,
                    };
                    match handshake {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        }));
    }
    tracing::info!("shutting down: draining open connections");
    tasks.close();
    if tokio::time::timeout(options.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout = ?options.drain_timeout,
            "connections still open after the drain timeout"
        );
    }
}

/// Reloads the TLS files, the htpasswd users and the `[[policy]]` keys on every `SIGHUP` until
/// `shutdown`. A file that does not load is logged and what is in force stays.
pub async fn reload_on_sighup(
    tls: Option<Arc<Tls>>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; TLS and htpasswd files will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        let events = &state.metrics.events;
        let reloaded = |part, error: Option<String>| events.emit(Event::Reloaded { part, error });
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => {
                    tracing::info!("SIGHUP: TLS certificate reloaded");
                    reloaded(Reload::Tls, None);
                }
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: TLS reload failed; keeping the certificate in use");
                    reloaded(Reload::Tls, Some(err.to_string()));
                }
            }
        }
        if let Some(auth) = &state.auth {
            match auth.reload_users() {
                Ok(Some(users)) => {
                    tracing::info!(users, "SIGHUP: htpasswd reloaded");
                    reloaded(Reload::Htpasswd, None);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: htpasswd reload failed; keeping the users in force");
                    reloaded(Reload::Htpasswd, Some(err.to_string()));
                }
            }
        }
        if state.cache.has_policy() {
            match state.cache.reload_policy_keys() {
                Ok(keys) => {
                    tracing::info!(keys, "SIGHUP: signature policy keys reloaded");
                    reloaded(Reload::PolicyKeys, None);
                }
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: signature policy keys not reloaded; keeping the keys in force");
                    reloaded(Reload::PolicyKeys, Some(err.to_string()));
                }
            }
        }
    }
}

/// One accepted connection and what serving it needs.
struct Connection<'a> {
    builder: &'a auto::Builder<StreamExecutor>,
    state: Arc<AppState>,
    options: &'a ListenerOptions,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
    peer: std::net::SocketAddr,
}

impl Connection<'_> {
    /// Serves HTTP/1.1 or HTTP/2 on `stream` until the client closes, it idles out, or
    /// shutdown asks it to finish.
    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            builder,
            state,
            options,
            activity,
            shutdown,
            peer,
        } = self;
        let kind = options.kind;
        let service = tower::ServiceBuilder::new()
            .layer(tower::layer::layer_fn(|inner| Tracked {
                inner,
                activity: Arc::clone(&activity),
            }))
            .layer(tower::layer::layer_fn(|inner| rate::Limited {
                inner,
                limit: options.rate_limit.clone(),
                address: peer.ip(),
            }))
            .layer(http::front_door(
                Arc::clone(&state),
                kind,
                options.tls.is_some(),
            ))
            .service(tower::service_fn(move |request| {
                http::serve(Arc::clone(&state), kind, request)
            }));
        let connection = builder.serve_connection_with_upgrades(
            TokioIo::new(stream),
            TowerToHyperService::new(service),
        );
        tokio::pin!(connection);
        let closing = tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled() => None,
            why = activity.closing(options) => Some(why),
        };
        if closing == Some(Closing::Stalled) {
            // Its (HTTP/1) response would never finish: dropping the connection frees what it
            // holds. HTTP/2 streams are reset one by one instead (`Activity::closing`).
            tracing::info!(
                %peer,
                send_timeout = ?options.send_timeout,
                "dropping a connection whose client stopped taking its response"
            );
            return;
        }
        if closing == Some(Closing::NoRequest) {
            // Nothing was asked, so nothing is cut: a partial head or an HTTP/2 preface alone
            // gets no close grace (hyper would wait for the head, or for the client to answer
            // the GOAWAY), so `header_read_timeout` is the whole time it is kept.
            tracing::debug!(
                %peer,
                header_read_timeout = ?options.header_read_timeout,
                "dropping a connection that sent no request"
            );
            return;
        }
        tracing::debug!(%peer, ?closing, "closing connection");
        connection.as_mut().graceful_shutdown();
        let finished = if closing == Some(Closing::Idle) {
            // Nothing is in flight: a client that does not close its end is not waited for.
            tokio::time::timeout(CLOSE_GRACE, connection).await.ok()
        } else {
            Some(connection.await)
        };
        if let Some(Err(err)) = finished {
            tracing::debug!(%peer, error = %err, "connection ended with an error");
        }
    }
}
