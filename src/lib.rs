//! regcache: a pull-through cache for OCI / Docker container registries.
//!
//! Layering (each layer may use only those to its right):
//! `main → lib → server → http → cache → {store, upstream} → oci`; `config` uses only `oci`.
//! See `ARCHITECTURE.md` for the map and the invariants.

#![warn(clippy::unwrap_used)]

pub mod activation;
pub mod airgap;
#[doc(hidden)]
pub mod fuzzing;
pub mod maintenance;
pub mod schedule;

pub use regcache_cache as cache;
pub use regcache_cache::routing;
pub use regcache_cluster as cluster;
pub use regcache_config as config;
pub use regcache_metrics as metrics;
pub use regcache_oci as oci;
pub use regcache_store as store;
pub use regcache_upstream as upstream;
pub use regcache_upstream::clock;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::clock::Clock;
use crate::config::Config;
use crate::routing::Resolver;
use crate::store::StoreError;
use regcache_server::{self as server, AppState};

/// Entry points for the criterion benchmarks (`benches/`); not a stable API.
#[doc(hidden)]
pub mod bench_support {
    pub use regcache_server::route_kind;
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store or index could not be opened.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The cache could not be built (an upstream's TLS settings).
    #[error(transparent)]
    Cache(#[from] cache::BuildError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] server::TlsError),
    /// The cluster's peer client cannot be built.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterBuildError),
    /// The `[log] events` file cannot be opened for appending.
    #[error("log.events: cannot append to {path}: {source}")]
    Events {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Appends every event to `file`, one JSON object per line, until `shutdown` (then what is
/// still queued). Subscribed before anything emits, so that none is missed.
async fn write_events(
    mut events: tokio::sync::broadcast::Receiver<metrics::Event>,
    mut file: tokio::fs::File,
    shutdown: CancellationToken,
) {
    use tokio::io::AsyncWriteExt as _;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        let event = tokio::select! {
            received = events.recv() => match received {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the events file fell behind; events were dropped");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            () = shutdown.cancelled() => match events.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
        };
        // Flushed per event (they are rare): a line is in the file once the next one is
        // written, and at exit.
        let line = format!("{}\n", event.to_json());
        let written = match file.write_all(line.as_bytes()).await {
            Ok(()) => file.flush().await,
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "cannot write to the events file");
        }
    }
}

/// Runs the server on `listener` until `shutdown` is cancelled, then drains and flushes.
///
/// # Errors
/// [`RunError`] when the storage cannot be opened.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with_clock(
        config,
        listener,
        metrics_listener,
        shutdown,
        Clock::system(),
    )
    .await
}

/// [`run`] with the clock that freshness and circuit-breaker decisions read (tests advance an
/// [`Clock::adjustable`] one instead of sleeping).
///
/// # Errors
/// [`RunError`] when the storage cannot be opened.
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
    clock: Clock,
) -> Result<(), RunError> {
    // TLS files are checked before anything else starts.
    let tls = config
        .server
        .tls
        .as_ref()
        .map(|files| server::Tls::new(files).map(Arc::new))
        .transpose()?;
    let (store, index) = store::open_storage(&config.storage, store::IndexAccess::Serve)?;
    let store = store.with_response_buffer(config.server.response_buffer);
    let (removed, _) = store.discard_staged(std::time::Duration::ZERO)?;
    if removed > 0 {
        tracing::info!(removed, "removed temp files left by an earlier run");
    }
    let resolver = Resolver::for_upstreams(&config.upstreams);
    let metrics = Arc::new(metrics::Metrics::new());
    let events = metrics.events.clone();
    if let Some(path) = &config.log.events {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|source| RunError::Events {
                path: path.clone(),
                source,
            })?;
        tokio::spawn(write_events(events.subscribe(), file, shutdown.clone()));
    }
    let cluster = config
        .cluster
        .as_ref()
        .map(|c| cluster::Cluster::new(c, &metrics).map(Arc::new))
        .transpose()?;
    if let Some(cluster) = &cluster {
        tokio::spawn(Arc::clone(cluster).maintain(shutdown.clone()));
    }
    let cache = Arc::new(
        Cache::with_clock(&config, store, index, Arc::clone(&metrics), clock)?
            .with_cluster(cluster),
    );
    // Usage figures come from a walk of the store; the server does not wait for it.
    let scanning = Arc::clone(&cache);
    let counted = events.clone();
    tokio::task::spawn_blocking(move || {
        let usage = scanning.register_existing_files();
        tracing::info!(
            files = usage.files,
            bytes = usage.bytes,
            "store usage counted"
        );
        counted.emit(metrics::Event::StoreCounted {
            files: usage.files,
            bytes: usage.bytes,
        });
    });
    // One readiness probe at start: says in the log whether the object store answers, and
    // lets a later outage be told from a store that was never reachable (see `store::Tier`).
    let probing = Arc::clone(&cache);
    tokio::spawn(async move {
        match probing.check_ready().await {
            Ok(None) => {}
            Ok(Some(problem)) | Err(problem) => {
                tracing::warn!(%problem, "not ready at start");
            }
        }
    });
    let maintenance = tokio::spawn(Arc::clone(&cache).maintain(shutdown.clone()));
    tokio::spawn(Arc::clone(&cache).prefetch_pins());
    tokio::spawn(Arc::clone(&cache).run_sync(shutdown.clone()));
    tokio::spawn(airgap::admin::serve(
        Arc::clone(&cache),
        Resolver::for_upstreams(&config.upstreams),
        airgap::admin::socket_path(&config),
        shutdown.clone(),
    ));
    let state = Arc::new(AppState::new(
        Arc::clone(&cache),
        resolver,
        metrics,
        &config.server,
        &config.storage,
        config.auth.as_ref(),
    ));
    tokio::spawn(Arc::clone(&state).sample_history(shutdown.clone()));
    let address = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |address| address.to_string());
    tracing::info!(
        %address,
        storage = %config.storage.path.display(),
        upstreams = ?config.upstreams.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        "regcache listening"
    );
    events.emit(metrics::Event::Listening { address });
    let main_options = server::ListenerOptions::main(&config.server, tls);
    if let Some(rate_limit) = &main_options.rate_limit {
        tokio::spawn(Arc::clone(rate_limit).prune_periodically(shutdown.clone()));
    }
    if main_options.tls.is_some() || state.authenticates() || cache.has_policy() {
        tokio::spawn(server::reload_on_sighup(
            main_options.tls.clone(),
            Arc::clone(&state),
            shutdown.clone(),
        ));
    }
    let admin_options = main_options.admin();
    let admin = metrics_listener.map(|listener| {
        tokio::spawn(server::accept_loop(
            listener,
            Arc::clone(&state),
            admin_options,
            shutdown.clone(),
        ))
    });
    server::accept_loop(listener, Arc::clone(&state), main_options, shutdown).await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let _ = maintenance.await;
    if let Err(err) = cache.index().flush() {
        tracing::error!(error = %err, "flushing the index at shutdown failed");
    }
    Ok(())
}
