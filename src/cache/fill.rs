//! Single-flight blob fills and the readers that stream them.
//!
//! One fill per (upstream, digest) runs in its own task: it outlives any client, writes the
//! upstream body to a temp file while hashing it, and commits the file under its digest only
//! when the digest matches. Every client of that blob — the one that started the fill and any
//! that arrive while it runs — is a [`FillReader`] reading the growing temp file at its own pace,
//! so a slow client never slows the fill or the others.
//!
//! Invariant: while a fill is running, a reader holds back the final byte of its response, so
//! no client receives a complete body before the digest is verified; on a mismatch the readers
//! end with an error and the client's connection is aborted.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::CacheError;
use crate::oci::{Digest, RepoName};
use crate::store::{BlobStore, Namespace, TempBlob};
use crate::upstream::UpstreamClient;

/// Bytes hashed and written per blocking call: large enough to amortise the thread hop, small
/// enough that followers see progress often and memory per fill stays small.
const WRITE_BATCH: usize = 256 * 1024;
/// Bytes a reader reads per chunk it sends. With hyper's write queue capped near one chunk
/// (see `server.rs`), a connection holds about two chunks: 64 clients stay within tens of MiB.
pub(crate) const READ_CHUNK: usize = 256 * 1024;

/// Where a fill stands; published through a `watch` channel.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// The upstream answered and the temp file exists: readers may start.
    pub(crate) started: bool,
    /// The upstream's `Content-Length`, when it sent one.
    pub(crate) size: Option<u64>,
    /// Bytes written to the temp file so far.
    pub(crate) written: u64,
    pub(crate) state: FillState,
}

#[derive(Debug, Clone)]
pub(crate) enum FillState {
    Running,
    /// Every byte is written and the digest matched: readers may finish their responses
    /// while the file is fsynced and renamed (a crash now loses the file, never correctness).
    Verified,
    /// Verified and committed under its digest.
    Done,
    Failed(Arc<CacheError>),
}

/// The shared state of one fill.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(crate) temp_path: PathBuf,
    pub(crate) final_path: PathBuf,
    pub(crate) progress: watch::Receiver<Progress>,
}

type FillKey = (Namespace, Digest);

/// The fills in flight.
#[derive(Debug, Default)]
pub(crate) struct Fills {
    // A std mutex: held only for map operations, never across an await.
    running: Mutex<HashMap<FillKey, Arc<Fill>>>,
}

/// Whether the caller started the fill or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Leader,
    Follower,
}

/// What the leader task needs.
pub(crate) struct FillJob {
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) access_log: Arc<super::evict::AccessLog>,
    pub(crate) store_trouble: Arc<super::direct::StoreTrouble>,
    pub(crate) store: Arc<BlobStore>,
    pub(crate) upstream: Arc<UpstreamClient>,
    pub(crate) namespace: Namespace,
    pub(crate) repo: RepoName,
    pub(crate) digest: Digest,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl Fills {
    /// Joins the running fill of `key`, or starts one with `start` when there is none and the
    /// blob is not (yet, or any more) in the store. Returns `None` when the blob is now in the
    /// store: a fill finished between the caller's store lookup and this call.
    pub(crate) fn join_or_start(
        self: &Arc<Self>,
        store: &BlobStore,
        namespace: &Namespace,
        digest: &Digest,
        start: impl FnOnce() -> Result<FillJob, CacheError>,
    ) -> Result<Option<(Arc<Fill>, Role)>, CacheError> {
        let key = (namespace.clone(), *digest);
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fill) = running.get(&key) {
            return Ok(Some((Arc::clone(fill), Role::Follower)));
        }
        // The map entry is removed only after the commit, so a blob absent from both the map and
        // the store really needs a fill.
        if store.contains(namespace, digest) {
            return Ok(None);
        }
        let job = start()?;
        let temp = job
            .store
            .create_temp()
            .map_err(|e| CacheError::Store(Arc::new(e)))?;
        let (sender, progress) = watch::channel(Progress {
            started: false,
            size: None,
            written: 0,
            state: FillState::Running,
        });
        let fill = Arc::new(Fill {
            temp_path: temp.path.clone(),
            final_path: store.path(namespace, digest),
            progress,
        });
        running.insert(key.clone(), Arc::clone(&fill));
        drop(running);
        let guard = FillGuard {
            fills: Arc::clone(self),
            key,
            sender,
        };
        // The span is made here, in the request that started the fill, so that the fill's log
        // lines carry that request's id.
        let span =
            tracing::info_span!("fill", upstream = job.upstream.name(), digest = %job.digest);
        tokio::spawn(tracing::Instrument::instrument(
            run_fill(job, temp, guard),
            span,
        ));
        Ok(Some((fill, Role::Leader)))
    }
}

/// Owned by the leader task. Dropping it — on success, failure or panic — publishes a final
/// state (failed, unless the task said otherwise) and removes the fill from the map, so
/// followers never wait on a dead fill.
struct FillGuard {
    fills: Arc<Fills>,
    key: FillKey,
    sender: watch::Sender<Progress>,
}

impl FillGuard {
    fn finish(&self, state: FillState) {
        self.sender.send_modify(|p| p.state = state);
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.sender.send_if_modified(|p| {
            if matches!(p.state, FillState::Running | FillState::Verified) {
                p.state = FillState::Failed(Arc::new(CacheError::FillAborted));
                true
            } else {
                false
            }
        });
        let mut running = self.fills.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.key);
    }
}

async fn run_fill(job: FillJob, temp: TempBlob, guard: FillGuard) {
    job.metrics.fills_in_flight.inc();
    let temp_path = temp.path.clone();
    let result = fill_body(&job, temp, &guard).await;
    match result {
        Ok(()) => guard.finish(FillState::Done),
        Err(err) => {
            let _ = tokio::fs::remove_file(&temp_path).await;
            tracing::warn!(error = %err, "fill failed");
            match &err {
                CacheError::DigestMismatch { .. } => job
                    .upstream
                    .record_error("digest_mismatch", err.to_string()),
                CacheError::Store(_) => {
                    job.metrics.store_write_errors.inc();
                    job.store_trouble.mark();
                }
                _ => {}
            }
            guard.finish(FillState::Failed(Arc::new(err)));
        }
    }
    job.metrics.fills_in_flight.dec();
    drop(job.permit);
}

/// Times an interrupted download is resumed with a `Range` request before the fill fails.
const MAX_RESUMES: u32 = 3;

async fn fill_body(job: &FillJob, temp: TempBlob, guard: &FillGuard) -> Result<(), CacheError> {
    let upstream_error = |e| CacheError::Upstream(Arc::new(e));
    let mut response = job
        .upstream
        .get_blob(&job.repo, &job.digest, 0)
        .await
        .map_err(upstream_error)?;
    let size = response.total_size;
    guard.sender.send_modify(|p| {
        p.started = true;
        p.size = size;
    });
    let mut sink = Sink::new(temp);
    let mut resumes = 0;
    loop {
        // An upstream that ignored the range resent bytes we already have: skip them.
        let mut skip = sink.written.saturating_sub(response.offset);
        let mut interrupted = None;
        while let Some(chunk) = response.body.next().await {
            let mut chunk = match chunk {
                Ok(chunk) => chunk,
                Err(err) => {
                    interrupted = Some(err);
                    break;
                }
            };
            let skipped = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
            let _ = chunk.split_to(skipped);
            skip -= skipped as u64;
            sink.push(&chunk, guard).await?;
        }
        let Some(err) = interrupted else { break };
        // Resume from what is on disk: settle the batches first.
        sink.flush(guard).await?;
        let idle = sink.settle(guard).await?;
        sink.idle = Some(idle);
        if resumes == MAX_RESUMES || size.is_some_and(|s| sink.written >= s) {
            return Err(upstream_error(err));
        }
        resumes += 1;
        tracing::warn!(at = sink.written, error = %err, "upstream body interrupted; resuming with a range request");
        response = job
            .upstream
            .get_blob(&job.repo, &job.digest, sink.written)
            .await
            .map_err(upstream_error)?;
        if response.total_size.is_some() && size.is_some() && response.total_size != size {
            return Err(CacheError::FillAborted);
        }
    }
    let (temp, actual, written) = sink.finish(guard).await?;
    if actual != job.digest {
        return Err(CacheError::DigestMismatch {
            expected: job.digest,
            actual,
        });
    }
    guard.sender.send_modify(|p| p.state = FillState::Verified);
    let store = Arc::clone(&job.store);
    let (namespace, digest) = (job.namespace.clone(), job.digest);
    tokio::task::spawn_blocking(move || store.commit(temp, &namespace, &digest))
        .await
        .map_err(|_| CacheError::FillAborted)?
        .map_err(|e| CacheError::Store(Arc::new(e)))?;
    tracing::debug!(bytes = written, resumes, "fill committed");
    job.access_log.touch(&job.namespace, &job.digest, written);
    job.access_log.check_budget(job.store.usage().bytes);
    Ok(())
}

/// The temp file being written, its running hash, and the batch not yet written. One batch
/// is hashed and written on a blocking thread while the next arrives from the network, so the
/// two overlap on two cores.
struct Sink {
    path: PathBuf,
    /// The file and hasher while no batch is in flight.
    idle: Option<(std::fs::File, Sha256)>,
    in_flight: Option<tokio::task::JoinHandle<Result<WrittenBatch, CacheError>>>,
    batch: BytesMut,
    written: u64,
}

/// A batch hashed and appended: the file and hasher come back with the batch's length.
type WrittenBatch = (std::fs::File, Sha256, u64);

impl Sink {
    fn new(temp: TempBlob) -> Self {
        Self {
            path: temp.path,
            idle: Some((temp.file, Sha256::new())),
            in_flight: None,
            batch: BytesMut::with_capacity(WRITE_BATCH),
            written: 0,
        }
    }

    async fn push(&mut self, chunk: &[u8], guard: &FillGuard) -> Result<(), CacheError> {
        self.batch.extend_from_slice(chunk);
        if self.batch.len() >= WRITE_BATCH {
            self.flush(guard).await?;
        }
        Ok(())
    }

    /// Starts writing the batch (after the previous one is done).
    async fn flush(&mut self, guard: &FillGuard) -> Result<(), CacheError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let data = self.batch.split().freeze();
        let (mut file, mut hasher) = self.settle(guard).await?;
        let path = self.path.clone();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            file.write_all(&data).map_err(|source| {
                CacheError::Store(Arc::new(crate::store::StoreError::Io {
                    action: "write",
                    path,
                    source,
                }))
            })?;
            Ok((file, hasher, data.len() as u64))
        }));
        Ok(())
    }

    /// Waits for the batch in flight, tells the readers how far the file goes, and hands back
    /// the file and hasher.
    async fn settle(&mut self, guard: &FillGuard) -> Result<(std::fs::File, Sha256), CacheError> {
        let Some(handle) = self.in_flight.take() else {
            return self.idle.take().ok_or(CacheError::FillAborted);
        };
        let (file, hasher, len) = handle.await.map_err(|_| CacheError::FillAborted)??;
        self.written += len;
        let written = self.written;
        guard.sender.send_modify(|p| p.written = written);
        Ok((file, hasher))
    }

    /// Writes what is left and returns the file, the digest of everything and the length.
    async fn finish(mut self, guard: &FillGuard) -> Result<(TempBlob, Digest, u64), CacheError> {
        self.flush(guard).await?;
        let (file, hasher) = self.settle(guard).await?;
        let temp = TempBlob {
            path: self.path,
            file,
        };
        Ok((temp, Digest::from_hasher(hasher), self.written))
    }
}

/// Waits until the fill has started (or ended).
///
/// # Cancel safety
/// Cancel safe: it only watches.
pub(crate) async fn wait_started(fill: &Fill) -> Result<Progress, CacheError> {
    let mut progress = fill.progress.clone();
    let progress = progress
        .wait_for(|p| p.started || !matches!(p.state, FillState::Running))
        .await
        .map_err(|_| CacheError::FillAborted)?
        .clone();
    match &progress.state {
        FillState::Failed(err) => Err(CacheError::Shared(Arc::clone(err))),
        _ => Ok(progress),
    }
}

/// Streams `[start, end)` of a blob that is being filled. `end` is `None` when the size is not
/// known yet (no `Content-Length` from the upstream): then the reader ends where the fill ends.
#[derive(Debug)]
pub(crate) struct FillReader {
    fill: Arc<Fill>,
    progress: watch::Receiver<Progress>,
    position: u64,
    end: Option<u64>,
    file: Option<std::fs::File>,
}

impl FillReader {
    pub(crate) fn new(fill: Arc<Fill>, start: u64, end: Option<u64>) -> Self {
        let progress = fill.progress.clone();
        Self {
            fill,
            progress,
            position: start,
            end,
            file: None,
        }
    }

    /// The next chunk, `None` at the end, an error if the fill failed.
    ///
    /// # Cancel safety
    /// Not cancel safe across a read in progress; it is only polled by the response body.
    pub(crate) async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            let (limit, done) = {
                let progress = self.progress.borrow_and_update();
                match &progress.state {
                    FillState::Failed(err) => {
                        return Some(Err(std::io::Error::other(err.to_string())))
                    }
                    FillState::Verified | FillState::Done => (
                        self.end.unwrap_or(progress.written).min(progress.written),
                        true,
                    ),
                    FillState::Running => {
                        // Hold back the final byte of the response until the digest is verified.
                        let end = self.end.unwrap_or(u64::MAX);
                        let limit = progress.written.min(end.saturating_sub(1));
                        let limit = if self.end.is_none() {
                            progress.written.saturating_sub(1)
                        } else {
                            limit
                        };
                        (limit, false)
                    }
                }
            };
            if self.position < limit {
                let len = usize::try_from(limit - self.position)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                return Some(self.read(len).await);
            }
            if done {
                return None;
            }
            if self.progress.changed().await.is_err() {
                // The sender is gone: the guard published a final state first, so look again.
                let state = self.progress.borrow().state.clone();
                if matches!(state, FillState::Running) {
                    return Some(Err(std::io::Error::other("fill ended without a result")));
                }
            }
        }
    }

    async fn read(&mut self, len: usize) -> Result<Bytes, std::io::Error> {
        let file = self.file.take();
        let (temp_path, final_path) = (self.fill.temp_path.clone(), self.fill.final_path.clone());
        let position = self.position;
        let (file, bytes) = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(file) => file,
                None => open_fill_file(&temp_path, &final_path, position)?,
            };
            // Read into spare capacity (no zero-fill); the bytes are known to be written.
            let mut buffer = Vec::with_capacity(len);
            (&mut file).take(len as u64).read_to_end(&mut buffer)?;
            if buffer.len() < len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "fill file shrank",
                ));
            }
            Ok::<_, std::io::Error>((file, Bytes::from(buffer)))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.file = Some(file);
        self.position += bytes.len() as u64;
        Ok(bytes)
    }
}

/// Opens the temp file, or the committed file if the fill already renamed it (the rename
/// happens just before `Done` is published, so the reader may not know yet).
fn open_fill_file(
    temp_path: &std::path::Path,
    final_path: &std::path::Path,
    position: u64,
) -> Result<std::fs::File, std::io::Error> {
    let mut file = match std::fs::File::open(temp_path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => std::fs::File::open(final_path)?,
        Err(err) => return Err(err),
    };
    file.seek(SeekFrom::Start(position))?;
    Ok(file)
}
