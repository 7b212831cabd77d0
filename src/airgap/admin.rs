//! The admin socket: how `regcache prefetch` and `regcache import` work on a live cache.
//!
//! The sled index admits one process, so while `regcache serve` runs on a store the CLI cannot
//! open it. The server therefore listens on a Unix socket, `<storage>/admin/socket`, in a
//! directory made mode 0700 before the socket is bound (only the user the server runs as, and
//! root, can connect, with no window in between; nothing listens on the network).
//! The CLI connects to it first; when a server answers, the work runs inside the server, on its
//! cache, and what it loads is served at once. When nothing answers, the CLI opens the store
//! itself.
//!
//! Protocol: one JSON [`Request`] line from the client, then JSON [`Reply`] lines until the
//! final one ([`Reply::PrefetchDone`], [`Reply::Imported`] or [`Reply::Failed`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::import::ImportReport;
use super::prefetch::{Event, Options};
use crate::cache::Cache;
use crate::config::Config;
use crate::routing::Resolver;

/// The longest request line accepted (a prefetch list of some thousand references).
const MAX_REQUEST_BYTES: u64 = 4 * 1024 * 1024;

/// Admin requests served at once; more are refused (each prefetch is itself bounded by
/// `--jobs` and the cache's fill limit, so a few suffice).
const MAX_ADMIN_REQUESTS: usize = 4;

/// What the CLI asks a running server to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Prefetch these images.
    Prefetch {
        /// References as given.
        images: Vec<String>,
        /// Platforms, referrers, parallelism.
        options: Options,
    },
    /// Import the archive at this (absolute) path; the server reads it.
    Import {
        /// The archive.
        archive: PathBuf,
    },
    /// Run every `[[sync]]` rule now.
    Sync,
}

/// What the server answers, line by line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Prefetch progress.
    Progress {
        /// The event.
        event: Event,
    },
    /// The prefetch ended; these images failed.
    PrefetchDone {
        /// (reference, reason).
        failures: Vec<(String, String)>,
    },
    /// The import succeeded.
    Imported {
        /// What was loaded.
        report: ImportReport,
    },
    /// Every sync rule ran once.
    Synced {
        /// One report per rule.
        reports: Vec<crate::cache::SyncReport>,
    },
    /// The request failed as a whole.
    Failed {
        /// Why.
        message: String,
    },
}

/// Where the admin socket of a store lives.
pub fn socket_path(config: &Config) -> PathBuf {
    config.storage.path.join("admin").join("socket")
}

/// Serves the admin socket until `shutdown`. Failing to bind is logged, not fatal: the cache
/// serves pulls without it.
pub async fn serve(
    cache: Arc<Cache>,
    resolver: Resolver,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    let listener = match bind_private(&path) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "admin socket unavailable; prefetch and import need the server stopped");
            return;
        }
    };
    let resolver = Arc::new(resolver);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_REQUESTS));
    // Imports run one at a time: a refused import removes the blobs it stored, which another
    // import running beside it may have found present and counted on.
    let imports = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin socket accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(async move {
                let (_, mut write) = stream.into_split();
                let message = format!("busy: {MAX_ADMIN_REQUESTS} admin requests are running");
                let _ = send(&mut write, &Reply::Failed { message }).await;
            });
            continue;
        };
        let (cache, resolver) = (Arc::clone(&cache), Arc::clone(&resolver));
        let imports = Arc::clone(&imports);
        tokio::spawn(async move {
            if let Err(err) = handle(cache, &resolver, &imports, stream).await {
                tracing::debug!(error = %err, "admin connection ended");
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Binds `path` inside its parent directory, made owner-only first. A socket file left by a
/// server that was killed is removed (it would make bind fail).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("socket path without a directory"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

async fn handle(
    cache: Arc<Cache>,
    resolver: &Resolver,
    imports: &tokio::sync::Mutex<()>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(request) => request,
        Err(err) => {
            let message = format!("bad request: {err}");
            return send(&mut write, &Reply::Failed { message }).await;
        }
    };
    match request {
        Request::Prefetch { images, options } => {
            tracing::info!(
                images = images.len(),
                "prefetch requested on the admin socket"
            );
            let (sender, mut receiver) = mpsc::channel(64);
            let work = super::prefetch::run(cache, resolver, images, &options, sender);
            tokio::pin!(work);
            // Forward events while the prefetch runs; a client that went away does not stop it.
            let failures = loop {
                tokio::select! {
                    failures = &mut work => break failures,
                    Some(event) = receiver.recv() => {
                        let _ = send(&mut write, &Reply::Progress { event }).await;
                    }
                }
            };
            while let Ok(event) = receiver.try_recv() {
                let _ = send(&mut write, &Reply::Progress { event }).await;
            }
            send(&mut write, &Reply::PrefetchDone { failures }).await
        }
        Request::Import { archive } => {
            tracing::info!(archive = %archive.display(), "import requested on the admin socket");
            let resolver = resolver.clone();
            let _one_import = imports.lock().await;
            let events = cache.events().clone();
            let name = archive.display().to_string();
            let result = tokio::task::spawn_blocking(move || {
                super::import::import(&cache, &resolver, &archive)
            })
            .await;
            let reply = match result {
                Ok(Ok(report)) => Reply::Imported { report },
                Ok(Err(err)) => Reply::Failed {
                    message: err.to_string(),
                },
                Err(err) => Reply::Failed {
                    message: err.to_string(),
                },
            };
            let error = match &reply {
                Reply::Failed { message } => Some(message.clone()),
                _ => None,
            };
            events.emit(crate::metrics::Event::Imported {
                archive: name,
                error,
            });
            send(&mut write, &reply).await
        }
        Request::Sync => {
            tracing::info!("sync of every rule requested on the admin socket");
            let reports = cache.sync_now().await;
            send(&mut write, &Reply::Synced { reports }).await
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// A connection to a running server's admin socket, or `None` when no server answers.
pub async fn connect(config: &Config) -> Option<UnixStream> {
    UnixStream::connect(socket_path(config)).await.ok()
}

/// Sends `request` and calls `on_reply` for every reply line until the connection closes.
///
/// # Errors
/// An I/O or decoding failure of the connection.
pub async fn exchange(
    stream: UnixStream,
    request: &Request,
    mut on_reply: impl FnMut(Reply),
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply: Reply = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        on_reply(reply);
    }
    Ok(())
}
