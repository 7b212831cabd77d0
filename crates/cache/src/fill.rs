//! Single-flight blob fills and the readers that stream them. This module only coordinates:
//! the bytes go through the store's [`BlobWriter`] (which hashes, verifies and commits) and
//! [`PartialReader`] (which follows what is written and holds back the final byte until the
//! digest is verified); there is no file I/O or hashing here.
//!
//! One fill per (upstream, digest) runs in its own task: it outlives any client and pumps the
//! upstream body into the writer, resuming a cut body with a `Range` request. Every client of
//! that blob — the one that started the fill and any that arrive while it runs — is a
//! [`FillReader`] following the written bytes at its own pace, so a slow client never slows the
//! fill or the others.
//!
//! Invariant (kept by the store's [`PartialReader`]): no client receives a complete body before
//! the digest is verified; on a mismatch, or when the fill fails, the readers end with an
//! error (the fill's reason) and the client's connection is aborted.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::CacheError;
use regcache_oci::Digest;
use regcache_store::{
    BlobWriter, Namespace, Partial, PartialReader, Store, StoreError, WriteState,
};
use regcache_upstream::{BlobResponse, UpstreamClient, UpstreamError};

/// Where a fill stands; published through a `watch` channel.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// The upstream answered and the writer exists: readers may start.
    pub(crate) started: bool,
    /// The upstream's `Content-Length`, when it sent one.
    pub(crate) size: Option<u64>,
    pub(crate) state: FillState,
}

#[derive(Debug, Clone)]
pub(crate) enum FillState {
    Running,
    /// Every byte is written and the digest matched: readers may finish their responses
    /// while the blob is committed (a crash now loses it, never correctness).
    Verified,
    /// Verified and committed under its digest.
    Done,
    Failed(Arc<CacheError>),
}

/// The shared state of one fill.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(crate) partial: Partial,
    pub(crate) progress: watch::Receiver<Progress>,
}

type FillKey = (Namespace, Digest);

/// The fills in flight.
#[derive(Debug, Default)]
pub(crate) struct Fills {
    // A std mutex: held only for map operations, never across an await or a syscall.
    running: Mutex<HashMap<FillKey, Slot>>,
}

/// A key of the fills map: reserved while its fill is being set up (the store checked, the
/// staged object created, off the lock), then running.
#[derive(Debug)]
enum Slot {
    /// Set up by one request; others wait for the change (the receiver sees the reservation's
    /// sender dropped) and look again.
    Starting(watch::Receiver<()>),
    Running(Arc<Fill>),
}

/// The right to set up the fill of a key. Dropped without [`Reservation::fulfil`] (an error,
/// the blob already stored, the request gone), it frees the key; either way waiters wake.
#[derive(Debug)]
struct Reservation {
    fills: Arc<Fills>,
    key: FillKey,
    fulfilled: bool,
    _wake: watch::Sender<()>,
}

impl Reservation {
    fn fulfil(mut self, fill: &Arc<Fill>) {
        let mut running = self.fills.running.lock();
        running.insert(self.key.clone(), Slot::Running(Arc::clone(fill)));
        self.fulfilled = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.fulfilled {
            return;
        }
        let mut running = self.fills.running.lock();
        if matches!(running.get(&self.key), Some(Slot::Starting(_))) {
            running.remove(&self.key);
        }
    }
}

/// Whether the caller started the fill or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Leader,
    Follower,
}

/// Where a fill gets its bytes: an upstream's blob endpoint, or a scripted body in tests.
pub(crate) trait BlobSource: Send + Sync + 'static {
    /// For the fill's log span.
    fn name(&self) -> &str;
    /// The blob from byte `offset`.
    fn get(&self, offset: u64) -> BoxFuture<'_, Result<BlobResponse, UpstreamError>>;
    /// Notes that the bytes did not match the digest (a metric).
    fn digest_mismatch(&self, _message: String) {}
}

/// A blob of a repository on an upstream.
pub(crate) struct UpstreamBlob {
    /// The upstream client, and the index where its 2xx is recorded: the blob belongs to the
    /// target's repository (`grant.rs`).
    pub(crate) parts: Arc<super::parts::Parts>,
    pub(crate) target: super::Target,
    pub(crate) digest: Digest,
}

impl UpstreamBlob {
    /// The client of the target's upstream.
    pub(crate) fn client(&self) -> &Arc<UpstreamClient> {
        self.parts.upstream(&self.target).0
    }
}

impl BlobSource for UpstreamBlob {
    fn name(&self) -> &str {
        self.client().name()
    }

    fn get(&self, offset: u64) -> BoxFuture<'_, Result<BlobResponse, UpstreamError>> {
        Box::pin(async move {
            let response = self
                .client()
                .get_blob(&self.target.repo, &self.digest, offset)
                .await?;
            // The upstream served the blob under this repository: its word on membership.
            self.parts.confirm_member(&self.target, &self.digest).await;
            Ok(response)
        })
    }

    fn digest_mismatch(&self, message: String) {
        self.client().record_error("digest_mismatch", message);
    }
}

/// What the leader task needs.
pub(crate) struct FillJob {
    pub(crate) metrics: Arc<regcache_metrics::Metrics>,
    pub(crate) access_log: Arc<super::upkeep::AccessLog>,
    pub(crate) store_trouble: Arc<super::direct::StoreTrouble>,
    pub(crate) store: Arc<Store>,
    pub(crate) source: Box<dyn BlobSource>,
    pub(crate) namespace: Namespace,
    pub(crate) digest: Digest,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl Fills {
    /// Joins the running fill of `key`, or starts one with `start` when there is none and the
    /// blob is not (yet, or any more) in the store. Returns `None` when the blob is now in the
    /// store: a fill finished between the caller's store lookup and this call.
    ///
    /// The map's lock is held for map operations only: the key is reserved, the lock released,
    /// and the store's `stat` and the staging run on the blocking pool, so one slow disk or
    /// bucket call never stalls the misses of other blobs.
    pub(crate) async fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        namespace: &Namespace,
        digest: &Digest,
        start: impl FnOnce() -> Result<FillJob, CacheError>,
    ) -> Result<Option<(Arc<Fill>, Role)>, CacheError> {
        let key = (namespace.clone(), *digest);
        let reservation = loop {
            let mut changed = {
                let mut running = self.running.lock();
                match running.get(&key) {
                    Some(Slot::Running(fill)) => {
                        return Ok(Some((Arc::clone(fill), Role::Follower)));
                    }
                    Some(Slot::Starting(changed)) => changed.clone(),
                    None => {
                        let (wake, changed) = watch::channel(());
                        running.insert(key.clone(), Slot::Starting(changed));
                        break Reservation {
                            fills: Arc::clone(self),
                            key: key.clone(),
                            fulfilled: false,
                            _wake: wake,
                        };
                    }
                }
            };
            // Ends when the reservation is fulfilled or dropped (its sender goes away).
            let _ = changed.changed().await;
        };
        // The map entry is removed only after the commit, so a blob absent from both the map and
        // the store really needs a fill.
        if store.holds(namespace, digest).await {
            return Ok(None);
        }
        let job = start()?;
        let writer = store.stage_writer(namespace, digest).await?;
        let (sender, progress) = watch::channel(Progress {
            started: false,
            size: None,
            state: FillState::Running,
        });
        let fill = Arc::new(Fill {
            partial: writer.partial(),
            progress,
        });
        reservation.fulfil(&fill);
        let guard = FillGuard {
            fills: Arc::clone(self),
            key,
            sender,
        };
        // The span is made here, in the request that started the fill, so that the fill's log
        // lines carry that request's id.
        let span = tracing::info_span!("fill", upstream = job.source.name(), digest = %job.digest);
        // On behalf of the client that started it (`credentials = "client"` upstreams ask
        // with the leader's credentials; the bytes are the same for every client).
        tokio::spawn(tracing::Instrument::instrument(
            regcache_upstream::caller::carry(run_fill(job, writer, guard)),
            span,
        ));
        Ok(Some((fill, Role::Leader)))
    }
}

/// Owned by the leader task. Dropping it — on success, failure, panic or abort — publishes a
/// final state (failed, unless the task said otherwise) and removes the fill from the map, so
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
        let mut running = self.fills.running.lock();
        running.remove(&self.key);
    }
}

async fn run_fill(job: FillJob, writer: BlobWriter, guard: FillGuard) {
    job.metrics.fills_in_flight.inc();
    match fill_body(&job, writer, &guard).await {
        Ok(()) => guard.finish(FillState::Done),
        Err(err) => {
            tracing::warn!(error = %err, "fill failed");
            match &err {
                CacheError::DigestMismatch { .. } => job.source.digest_mismatch(err.to_string()),
                CacheError::Store(store_err) => {
                    job.metrics.store_write_errors.inc();
                    // An object store outage already fails misses at lookup (503) until it is
                    // back; streaming around the store is for a local disk that cannot write.
                    if store_err.unavailable_store().is_none() {
                        job.store_trouble.mark();
                    }
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

/// A store error as the fill reports it: a mismatch is the upstream's fault.
fn store_error(err: StoreError) -> CacheError {
    match err {
        StoreError::DigestMismatch { expected, actual } => {
            CacheError::DigestMismatch { expected, actual }
        }
        other => CacheError::from(other),
    }
}

async fn fill_body(
    job: &FillJob,
    mut writer: BlobWriter,
    guard: &FillGuard,
) -> Result<(), CacheError> {
    let upstream_error = |e| CacheError::Upstream(Arc::new(e));
    let mut response = job.source.get(0).await.map_err(upstream_error)?;
    let size = response.total_size;
    guard.sender.send_modify(|p| {
        p.started = true;
        p.size = size;
    });
    let mut resumes = 0;
    loop {
        // An upstream that ignored the range resent bytes we already have: skip them.
        let mut skip = writer.written().saturating_sub(response.offset);
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
            writer.write(&chunk).await.map_err(store_error)?;
        }
        let Some(err) = interrupted else { break };
        // Resume from what is written: settle the batches first.
        let written = writer.settle().await.map_err(store_error)?;
        if resumes == MAX_RESUMES || size.is_some_and(|s| written >= s) {
            return Err(upstream_error(err));
        }
        resumes += 1;
        tracing::warn!(at = written, error = %err, "upstream body interrupted; resuming with a range request");
        response = job.source.get(written).await.map_err(upstream_error)?;
        if response.total_size.is_some() && size.is_some() && response.total_size != size {
            return Err(CacheError::FillAborted);
        }
    }
    let verified = writer.finish().await.map_err(store_error)?;
    let written = verified.len();
    guard.finish(FillState::Verified);
    verified.commit().await.map_err(store_error)?;
    tracing::debug!(bytes = written, resumes, "fill committed");
    job.access_log.touch(&job.namespace, &job.digest, written);
    job.access_log.check_budget(job.store.usage().bytes);
    Ok(())
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
    progress: watch::Receiver<Progress>,
    reader: PartialReader,
}

impl FillReader {
    pub(crate) fn new(fill: &Fill, start: u64, end: Option<u64>) -> Self {
        Self {
            progress: fill.progress.clone(),
            reader: fill.partial.reader(start, end),
        }
    }

    /// The next chunk, `None` at the end, an error if the fill failed.
    ///
    /// # Cancel safety
    /// Not cancel safe across a read in progress; it is only polled by the response body.
    pub(crate) async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        match self.reader.next_chunk().await {
            Some(Err(err)) if self.reader.state() == WriteState::Failed => {
                Some(Err(self.failure().await.unwrap_or(err)))
            }
            other => other,
        }
    }

    /// Whether the fill committed the blob under its digest, once it has finished: a reader
    /// gets its last byte when the digest is verified, which is before the commit.
    pub(crate) async fn committed(&mut self) -> bool {
        self.progress
            .wait_for(|p| matches!(p.state, FillState::Done | FillState::Failed(_)))
            .await
            .is_ok_and(|p| matches!(p.state, FillState::Done))
    }

    /// Why the fill failed (the upstream's or the store's reason, which says more than the
    /// reader's), once the fill task has said it: right after its writer failed.
    async fn failure(&mut self) -> Option<std::io::Error> {
        let progress = self
            .progress
            .wait_for(|p| !matches!(p.state, FillState::Running | FillState::Verified))
            .await
            .ok()?;
        match &progress.state {
            FillState::Failed(err) => Some(std::io::Error::other(err.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use futures_util::{stream, StreamExt as _};

    use super::*;
    use crate::direct::StoreTrouble;
    use crate::upkeep::AccessLog;

    /// Body faults, one per request, in order.
    #[derive(Debug, Clone, Copy)]
    enum Body {
        /// The blob as asked.
        Whole,
        /// Cut (a body error) after this many bytes of the answer.
        CutAfter(usize),
        /// The blob with one byte flipped.
        Corrupt,
        /// After this many bytes, the body waits for [`Script::die`], then the task reading
        /// it panics (a leader that dies).
        PanicAfter(usize),
    }

    /// A scripted upstream blob: answers ranges honestly, with the faults queued.
    struct Script {
        blob: Bytes,
        faults: Mutex<VecDeque<Body>>,
        offsets: Mutex<Vec<u64>>,
        die: Arc<tokio::sync::Notify>,
    }

    impl Script {
        fn new(blob: &Bytes, faults: &[Body]) -> Arc<Self> {
            Arc::new(Self {
                blob: blob.clone(),
                faults: Mutex::new(faults.iter().copied().collect()),
                offsets: Mutex::default(),
                die: Arc::default(),
            })
        }

        /// Lets a `PanicAfter` body panic.
        fn die(&self) {
            self.die.notify_one();
        }

        fn offsets(&self) -> Vec<u64> {
            self.offsets.lock().clone()
        }
    }

    struct Source(Arc<Script>);

    impl BlobSource for Source {
        fn name(&self) -> &str {
            "scripted"
        }

        fn get(&self, offset: u64) -> BoxFuture<'_, Result<BlobResponse, UpstreamError>> {
            let script = &self.0;
            script.offsets.lock().push(offset);
            let fault = script.faults.lock().pop_front().unwrap_or(Body::Whole);
            let mut body = script.blob.slice(usize::try_from(offset).expect("small")..);
            let mut error = None;
            match fault {
                Body::Whole => {}
                Body::CutAfter(len) => {
                    body.truncate(len);
                    error = Some(UpstreamError::Status {
                        upstream: "scripted".to_owned(),
                        status: http::StatusCode::BAD_GATEWAY,
                    });
                }
                Body::Corrupt => {
                    let mut corrupt = body.to_vec();
                    corrupt[0] ^= 1;
                    body = Bytes::from(corrupt);
                }
                Body::PanicAfter(len) => body.truncate(len),
            }
            let chunks: Vec<Result<Bytes, UpstreamError>> = body
                .chunks(64 * 1024)
                .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
                .chain(error.map(Err))
                .collect();
            let panics = matches!(fault, Body::PanicAfter(_));
            let die = Arc::clone(&script.die);
            let tail = stream::once(async move {
                if panics {
                    die.notified().await;
                    panic!("the scripted leader dies");
                }
                // Never reached: `filter_map` drops it.
                None::<Result<Bytes, UpstreamError>>
            })
            .filter_map(|item| async move { item });
            let response = BlobResponse {
                total_size: Some(script.blob.len() as u64),
                offset,
                body: Box::pin(stream::iter(chunks).chain(tail)),
            };
            Box::pin(async move { Ok(response) })
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        store: Arc<Store>,
        fills: Arc<Fills>,
        permits: Arc<tokio::sync::Semaphore>,
        namespace: Namespace,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(Store::open_local(dir.path()).expect("store"));
            Self {
                _dir: dir,
                store,
                fills: Arc::default(),
                permits: Arc::new(tokio::sync::Semaphore::new(4)),
                namespace: Namespace::new("registry.test"),
            }
        }

        /// Joins or starts the fill of `digest` from `script`; a reader of the whole blob.
        async fn request(
            &self,
            digest: &Digest,
            script: &Arc<Script>,
        ) -> Result<Request, CacheError> {
            let start = || {
                Ok(FillJob {
                    metrics: Arc::new(regcache_metrics::Metrics::new()),
                    access_log: Arc::new(AccessLog::new(None)),
                    store_trouble: Arc::new(StoreTrouble::default()),
                    store: Arc::clone(&self.store),
                    source: Box::new(Source(Arc::clone(script))),
                    namespace: self.namespace.clone(),
                    digest: *digest,
                    permit: Arc::clone(&self.permits)
                        .try_acquire_owned()
                        .map_err(|_| CacheError::Busy)?,
                })
            };
            let (fill, role) = self
                .fills
                .join_or_start(&self.store, &self.namespace, digest, start)
                .await?
                .ok_or(CacheError::FillAborted)?;
            let progress = wait_started(&fill).await?;
            Ok(Request {
                reader: FillReader::new(&fill, 0, progress.size),
                role,
                progress: fill.progress.clone(),
            })
        }
    }

    /// A client's request for the blob.
    struct Request {
        reader: FillReader,
        role: Role,
        progress: watch::Receiver<Progress>,
    }

    impl Request {
        /// Waits until the fill is over (committed or failed); readers may finish earlier.
        async fn fill_over(mut self) {
            let _ = self
                .progress
                .wait_for(|p| matches!(p.state, FillState::Done | FillState::Failed(_)))
                .await;
        }
    }

    /// Everything a reader yields: the bytes, and the error it ended with (if any).
    async fn drain(reader: &mut FillReader) -> (Vec<u8>, Option<std::io::Error>) {
        let mut bytes = Vec::new();
        while let Some(chunk) = reader.next_chunk().await {
            match chunk {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(err) => return (bytes, Some(err)),
            }
        }
        (bytes, None)
    }

    fn blob(len: usize) -> Bytes {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_cut_body_resumes_from_what_was_written_and_commits() {
        let harness = Harness::new();
        let bytes = blob(700 * 1024);
        let digest = Digest::of(&bytes);
        let script = Script::new(&bytes, &[Body::CutAfter(300 * 1024)]);
        let mut request = harness.request(&digest, &script).await.expect("fill");
        assert_eq!(request.role, Role::Leader);
        let (received, error) = drain(&mut request.reader).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, bytes);
        assert_eq!(script.offsets(), vec![0, 300 * 1024], "one ranged resume");
        request.fill_over().await;
        assert!(harness.store.contains(&harness.namespace, &digest));
    }

    #[tokio::test]
    async fn a_digest_mismatch_stores_nothing_and_every_reader_ends_with_an_error() {
        let harness = Harness::new();
        let bytes = blob(600 * 1024);
        let digest = Digest::of(&bytes);
        // Corrupt twice: should the first fill be over before the second request, that one
        // starts a fill of its own.
        let script = Script::new(&bytes, &[Body::Corrupt, Body::Corrupt]);
        // The fill may fail before a request has seen it start: that request then gets the
        // mismatch as its answer, with nothing to read.
        let fill_or_mismatch = |result: Result<_, CacheError>| match result {
            Ok(request) => Some(request),
            Err(err) => {
                assert!(
                    matches!(err.root(), CacheError::DigestMismatch { .. }),
                    "{err}"
                );
                None
            }
        };
        let leader = fill_or_mismatch(harness.request(&digest, &script).await);
        if let Some(leader) = &leader {
            assert_eq!(leader.role, Role::Leader);
        }
        let follower = fill_or_mismatch(harness.request(&digest, &script).await);
        for mut request in leader.into_iter().chain(follower) {
            let (received, error) = drain(&mut request.reader).await;
            let error = error.expect("a reader of unverified bytes must end with an error");
            assert!(error.to_string().contains("digest mismatch"), "{error}");
            assert!(
                received.len() < bytes.len(),
                "a reader received the complete unverified body"
            );
            request.fill_over().await;
        }
        assert!(!harness.store.contains(&harness.namespace, &digest));
        assert_eq!(
            harness.store.discard_staged(Duration::ZERO).expect("clean"),
            (0, 0),
            "the staged bytes were left behind"
        );
    }

    #[tokio::test]
    async fn when_the_leader_dies_followers_get_an_error_and_the_next_request_leads() {
        let harness = Harness::new();
        let bytes = blob(400 * 1024);
        let digest = Digest::of(&bytes);
        let script = Script::new(&bytes, &[Body::PanicAfter(100 * 1024)]);
        let leader = harness.request(&digest, &script).await.expect("fill");
        let follower = harness.request(&digest, &script).await.expect("join");
        assert_eq!((leader.role, follower.role), (Role::Leader, Role::Follower));
        script.die();
        for mut request in [leader, follower] {
            let (received, error) = drain(&mut request.reader).await;
            let error = error.expect("the reader of a dead fill must end with an error");
            assert!(error.to_string().contains("aborted"), "{error}");
            assert!(received.len() < bytes.len());
        }
        assert!(!harness.store.contains(&harness.namespace, &digest));
        // The dead fill left the map: the next request starts a fresh one, which succeeds.
        let mut retry = harness.request(&digest, &script).await.expect("retry");
        assert_eq!(retry.role, Role::Leader);
        let (received, error) = drain(&mut retry.reader).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, bytes);
    }
}
