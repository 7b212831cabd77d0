//! [`S3Backend`]: the [`BlobBackend`] over an S3-compatible bucket (Apache Arrow's
//! `object_store`), objects named `<prefix>/blobs/<namespace>/sha256/<64 hex>`.
//!
//! Invariant: an object appears under its digest name only when the store completes it after
//! the digest was verified: a staged object is a multipart upload to that name (invisible until
//! completed; aborted when dropped) or, when smaller than one part, a single `PUT` at commit.
//! Two replicas writing one digest both upload the same bytes; the last completion wins, so
//! correctness needs no compare-and-swap (which Garage and SeaweedFS lack).
//!
//! The trait is blocking; requests run with `Handle::block_on` on a small runtime of the
//! backend's own (its connection pool lives there), from the store's blocking threads. It is
//! meant to sit behind a [`Tier`](super::Tier), which never calls the network from `stage`,
//! `stat` or `remove` (the store calls those from async code).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer as _;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _, RetryConfig,
};
use tokio::task::JoinHandle;

use super::backend::{BlobBackend, BlobRead, ListedBlob, Presigned, StagedId, StagedWrite};
use super::{Namespace, StoreError};
use regcache_config::S3Config;
use regcache_oci::Digest;

/// Bytes buffered per multipart part: above S3's 5 MiB minimum for all parts but the last.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploading at once per blob, while the fill goes on writing the local tier and
/// filling the next part: a blob being written holds up to this many parts plus the one it is
/// filling (16 MiB). The fill runs ahead of the store by at most that much.
const PARTS_IN_FLIGHT: usize = 1;

/// A part upload (or a single `PUT` of up to a part) may take this many `storage.s3.timeout`s.
const PART_TIMEOUTS: u32 = 12;

/// What every request shares: the client, the runtime it runs on, the bucket's name.
struct Shared {
    client: AmazonS3,
    /// `s3://bucket/prefix`, for messages.
    name: String,
    prefix: Path,
    redirect_ttl: Duration,
    /// How long a request may wait for an answer, or a body for its next bytes
    /// (`storage.s3.timeout`); a part upload gets [`PART_TIMEOUTS`] of them.
    timeout: Duration,
    /// `Some` until dropped; shut down in the background (dropping a runtime may happen on an
    /// async thread, where a blocking shutdown panics).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's configuration is long; the name says which bucket.
        f.debug_struct("S3")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Shared {
    /// Runs `request` to completion on this thread. Called only from blocking threads (the
    /// store's `spawn_blocking`, or a CLI command without a runtime).
    fn run<T>(&self, request: impl std::future::Future<Output = T>) -> T {
        self.handle.block_on(request)
    }

    /// [`Shared::run`] for at most `timeouts` × `storage.s3.timeout` (retries included): a
    /// store that accepts connections but never answers fails as fast as one that is down.
    fn call<T>(
        &self,
        timeouts: u32,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        self.run(within(self.timeout * timeouts, request))
    }

    fn key(&self, namespace: &Namespace, digest: &Digest) -> Path {
        self.prefix
            .clone()
            .join("blobs")
            .join(namespace.as_str())
            .join("sha256")
            .join(digest.hex())
    }

    fn unavailable(
        &self,
        action: &'static str,
        object: &Path,
    ) -> impl Fn(object_store::Error) -> StoreError {
        let (store, object) = (self.name.clone(), object.to_string());
        move |source| StoreError::Unavailable {
            store: store.clone(),
            action,
            object: object.clone(),
            source: Box::new(source),
        }
    }
}

/// An S3-compatible bucket. See the module documentation.
#[derive(Debug)]
pub struct S3Backend {
    shared: Arc<Shared>,
}

impl S3Backend {
    /// A backend for `config`. Nothing is sent yet: an unreachable bucket shows in
    /// [`BlobBackend::check_ready`] (`/readyz`) and as 503s, not as a failed start.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the client cannot be built from the configuration.
    pub fn new(config: &S3Config) -> Result<Self, StoreError> {
        let name = if config.prefix.is_empty() {
            format!("s3://{}", config.bucket)
        } else {
            format!("s3://{}/{}", config.bucket, config.prefix)
        };
        let build_error = |err: &dyn std::fmt::Display| StoreError::Io {
            action: "configure",
            object: name.clone(),
            source: std::io::Error::other(err.to_string()),
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            // One `DELETE` per object (every S3-compatible store has it), not the bulk
            // `POST ?delete` that `object_store` sends by default since 0.13.
            .with_disable_bulk_delete(true)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(config.timeout)
                    // Requests are bounded by `storage.s3.timeout` (`Shared::call`); a body
                    // may take as long as it keeps arriving.
                    .with_timeout_disabled()
                    .with_allow_http(
                        config
                            .endpoint
                            .as_ref()
                            .is_some_and(|url| url.scheme() == "http"),
                    ),
            )
            // Fail fast when the store is down: a miss answers 503 within seconds.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
        }
        if let Some((id, secret)) = &config.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
        }
        let client = builder.build().map_err(|err| build_error(&err))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("regcache-s3")
            .enable_all()
            .build()
            .map_err(|err| build_error(&err))?;
        let prefix = Path::from(config.prefix.as_str());
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                name,
                prefix,
                redirect_ttl: config.redirect_ttl,
                timeout: config.timeout,
                handle: runtime.handle().clone(),
                runtime: Some(runtime),
            }),
        })
    }

    /// `s3://bucket/prefix`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

/// `request`'s answer, or [`no_answer`] when it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    request: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| Err(no_answer(limit)))
}

/// The error of a request that took longer than `limit`.
fn no_answer(limit: Duration) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: format!("no answer within {}", humantime::format_duration(limit)).into(),
    }
}

/// `NotFound` becomes `None`.
fn found<T>(result: object_store::Result<T>) -> object_store::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

impl BlobBackend for S3Backend {
    fn stage(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Box<dyn StagedWrite>, StoreError> {
        // No request yet: the upload starts with the first full part.
        let key = self.shared.key(namespace, digest);
        Ok(Box::new(Upload {
            shared: Arc::clone(&self.shared),
            id: StagedId(key.to_string()),
            key,
            buffer: BytesMut::new(),
            multipart: None,
            parts: Vec::new(),
            in_flight: VecDeque::new(),
            sent: 0,
        }))
    }

    fn open_staged(&self, _id: &StagedId) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        // An upload in progress cannot be read; the tier's readers follow its local copy.
        Ok(None)
    }

    fn open(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Box<dyn BlobRead>>, StoreError> {
        let shared = &self.shared;
        let key = shared.key(namespace, digest);
        let got = shared
            .call(1, async { found(shared.client.get(&key).await) })
            .map_err(shared.unavailable("get", &key))?;
        Ok(got.map(|got| {
            Box::new(ObjectRead {
                shared: Arc::clone(shared),
                size: got.meta.size,
                position: 0,
                body: Some(got.into_stream()),
                pending: Bytes::new(),
                key,
            }) as Box<dyn BlobRead>
        }))
    }

    fn stat(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let shared = &self.shared;
        let key = shared.key(namespace, digest);
        let meta = shared
            .call(1, async { found(shared.client.head(&key).await) })
            .map_err(shared.unavailable("head", &key))?;
        Ok(meta.map(|meta| meta.size))
    }

    fn remove(&self, namespace: &Namespace, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some(size) = self.stat(namespace, digest)? else {
            return Ok(None);
        };
        let shared = &self.shared;
        let key = shared.key(namespace, digest);
        shared
            .call(1, async { found(shared.client.delete(&key).await) })
            .map_err(shared.unavailable("delete", &key))?;
        Ok(Some(size))
    }

    fn quarantine(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<(u64, String), StoreError> {
        let shared = &self.shared;
        let key = shared.key(namespace, digest);
        let target = shared.prefix.clone().join("quarantine").join(format!(
            "{}-{}",
            namespace.as_str(),
            digest.hex()
        ));
        let size = self.stat(namespace, digest)?.unwrap_or(0);
        shared
            .call(1, async { shared.client.rename(&key, &target).await })
            .map_err(shared.unavailable("quarantine", &key))?;
        Ok((size, format!("{}/{target}", shared.name)))
    }

    fn list(&self, visit: &mut dyn FnMut(ListedBlob)) {
        let shared = &self.shared;
        let blobs = shared.prefix.clone().join("blobs");
        let depth = blobs.parts_count();
        shared.run(async {
            let mut listing = shared.client.list(Some(&blobs));
            while let Some(Ok(meta)) = listing.next().await {
                // <blobs>/<namespace>/sha256/<hex>
                let parts: Vec<_> = meta.location.parts().skip(depth).collect();
                let [namespace, algorithm, hex] = parts.as_slice() else {
                    continue;
                };
                if algorithm.as_ref() != "sha256" {
                    continue;
                }
                let Ok(digest) = Digest::parse(&format!("sha256:{}", hex.as_ref())) else {
                    continue;
                };
                // Names were encoded from the namespace; decode back.
                let namespace = percent_encoding::percent_decode_str(namespace.as_ref())
                    .decode_utf8_lossy()
                    .into_owned();
                visit(ListedBlob {
                    namespace: Namespace::new(&namespace),
                    digest,
                    size: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                });
            }
        });
    }

    fn discard_staged(&self, _age: Duration) -> Result<(usize, u64), StoreError> {
        // Uploads a killed process left are invisible; the bucket's lifecycle rule
        // (AbortIncompleteMultipartUpload, see the README) reclaims their parts.
        Ok((0, 0))
    }

    fn presigned_get(
        &self,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<Option<Presigned>, StoreError> {
        let shared = &self.shared;
        let key = shared.key(namespace, digest);
        shared
            .call(1, async {
                let Some(meta) = found(shared.client.head(&key).await)? else {
                    return Ok(None);
                };
                let url = shared
                    .client
                    .signed_url(http::Method::GET, &key, shared.redirect_ttl)
                    .await?;
                Ok(Some(Presigned {
                    url: url.to_string(),
                    size: meta.size,
                }))
            })
            .map_err(shared.unavailable("sign", &key))
    }

    fn check_ready(&self) -> Result<Option<String>, StoreError> {
        // Any answer about a name that need not exist proves the bucket reachable and our
        // credentials accepted.
        let shared = &self.shared;
        let probe = shared.prefix.clone().join("readyz");
        shared
            .call(1, async { found(shared.client.head(&probe).await) })
            .map(|_| None)
            .map_err(shared.unavailable("probe", &probe))
    }
}

/// A committed object, read front to back from one `GET` (a new ranged `GET` when a read
/// does not continue where the last one ended).
struct ObjectRead {
    shared: Arc<Shared>,
    key: Path,
    size: u64,
    /// Where `pending` starts.
    position: u64,
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    /// Received and not yet read.
    pending: Bytes,
}

impl std::fmt::Debug for ObjectRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRead")
            .field("key", &self.key)
            .field("size", &self.size)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl BlobRead for ObjectRead {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }

    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        if offset.saturating_add(len as u64) > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the stored object",
            ));
        }
        if offset != self.position || self.body.is_none() {
            let shared = Arc::clone(&self.shared);
            let options = GetOptions::new().with_range(Some(GetRange::Bounded(offset..self.size)));
            let got = shared
                .call(1, shared.client.get_opts(&self.key, options))
                .map_err(std::io::Error::other)?;
            self.body = Some(got.into_stream());
            self.position = offset;
            self.pending = Bytes::new();
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            if self.pending.is_empty() {
                // Opened above when there was none.
                let Some(body) = self.body.as_mut() else {
                    return Err(std::io::Error::other("no open body to read"));
                };
                let next = self.shared.call(1, async { body.next().await.transpose() });
                match next {
                    Ok(Some(bytes)) => self.pending = bytes,
                    Err(err) => {
                        self.body = None;
                        return Err(std::io::Error::other(err));
                    }
                    Ok(None) => {
                        self.body = None;
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the object store ended the object early",
                        ));
                    }
                }
            }
            let take = self.pending.len().min(len - out.len());
            out.extend_from_slice(&self.pending.split_to(take));
            self.position += take as u64;
        }
        Ok(out.freeze())
    }
}

/// A staged object: bytes buffered up to one part, then a multipart upload to the digest's
/// name, completed only by [`StagedWrite::commit`] and aborted on drop.
#[derive(Debug)]
struct Upload {
    shared: Arc<Shared>,
    id: StagedId,
    key: Path,
    buffer: BytesMut,
    /// The upload id, once the first part went out.
    multipart: Option<object_store::MultipartId>,
    /// Parts uploaded, in order.
    parts: Vec<PartId>,
    /// Parts being uploaded, oldest first (at most [`PARTS_IN_FLIGHT`]).
    in_flight: VecDeque<JoinHandle<object_store::Result<PartId>>>,
    /// Bytes handed to parts (uploaded or in flight).
    sent: u64,
}

impl Upload {
    /// Starts uploading `part` in the background; waits first for the oldest part when
    /// [`PARTS_IN_FLIGHT`] are out, so the fill runs ahead of the store by that much at most.
    fn send_part(&mut self, part: Bytes) -> Result<(), StoreError> {
        let shared = Arc::clone(&self.shared);
        let len = part.len() as u64;
        let upload = match &self.multipart {
            Some(id) => id.clone(),
            None => {
                let id = shared
                    .call(1, shared.client.create_multipart(&self.key))
                    .map_err(shared.unavailable("start upload of", &self.key))?;
                self.multipart = Some(id.clone());
                id
            }
        };
        if self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        let index = self.parts.len() + self.in_flight.len();
        let key = self.key.clone();
        let limit = shared.timeout * PART_TIMEOUTS;
        let uploading = Arc::clone(&shared);
        self.in_flight.push_back(shared.handle.spawn(async move {
            let request = uploading.client.put_part(&key, &upload, index, part.into());
            within(limit, request).await
        }));
        self.sent += len;
        Ok(())
    }

    /// Waits for the oldest part in flight.
    fn wait_oldest(&mut self) -> Result<(), StoreError> {
        let Some(uploading) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let part = self
            .shared
            .run(uploading)
            .unwrap_or_else(|err| Err(object_store::Error::JoinError { source: err }))
            .map_err(self.shared.unavailable("upload a part of", &self.key))?;
        self.parts.push(part);
        Ok(())
    }
}

impl StagedWrite for Upload {
    fn id(&self) -> &StagedId {
        &self.id
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(bytes);
        // Parts of one size: some stores (R2) require it of all but the last.
        while self.buffer.len() >= PART_SIZE {
            let part = self.buffer.split_to(PART_SIZE).freeze();
            self.send_part(part)?;
        }
        Ok(())
    }

    fn commit(
        mut self: Box<Self>,
        namespace: &Namespace,
        digest: &Digest,
    ) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        if shared.key(namespace, digest) != self.key {
            return Err(StoreError::io("commit", &self.key)(std::io::Error::other(
                "staged for another digest",
            )));
        }
        let len = self.sent + self.buffer.len() as u64;
        if self.multipart.is_none() {
            // Smaller than one part: one PUT, visible whole or not at all.
            let bytes = self.buffer.split().freeze();
            shared
                .call(PART_TIMEOUTS, shared.client.put(&self.key, bytes.into()))
                .map_err(shared.unavailable("put", &self.key))?;
            return Ok(len);
        }
        if !self.buffer.is_empty() {
            let part = self.buffer.split().freeze();
            self.send_part(part)?;
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        // Started: checked above (it stays set until here, so a failed part aborts it on drop).
        let upload = self.multipart.take().ok_or_else(|| {
            StoreError::io("commit", &self.key)(std::io::Error::other("no multipart upload"))
        })?;
        let parts = std::mem::take(&mut self.parts);
        let completed = shared.call(
            1,
            shared.client.complete_multipart(&self.key, &upload, parts),
        );
        if let Err(err) = completed {
            // Not completed: nothing is visible; free the parts.
            self.multipart = Some(upload);
            return Err(shared.unavailable("complete upload of", &self.key)(err));
        }
        Ok(len)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Not committed (failure, mismatch, abort): abort the upload in the background. This
        // may run on an async thread, so it must not wait; if the abort is lost, the upload
        // stays invisible and the bucket's lifecycle rule reclaims its parts.
        if let Some(upload) = self.multipart.take() {
            let (shared, key) = (Arc::clone(&self.shared), self.key.clone());
            let in_flight = std::mem::take(&mut self.in_flight);
            self.shared.handle.spawn(async move {
                // Parts still uploading would outlive an abort sent now.
                for part in in_flight {
                    let _ = part.await;
                }
                if let Err(err) = shared.client.abort_multipart(&key, &upload).await {
                    tracing::debug!(error = %err, %key, "aborting an upload failed");
                }
            });
        }
    }
}
