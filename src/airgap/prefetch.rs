//! `regcache prefetch`: pulls images into the store through the cache's own verified fill path,
//! as if a client had pulled every platform (or those asked for), optionally with what refers
//! to each manifest. Resumable by construction: what is already stored is a cache hit, so a
//! rerun fetches only what is missing.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use super::{AirgapError, ImageRef};
use crate::cache::{
    BlobBody, BlobReply, Cache, CacheError, Manifest, PolicyMode, RangeRequest, Target,
};
use crate::config::Config;
use crate::oci::{Digest, ImageWalk, Reference, Tag};
use crate::routing::Resolver;

/// How long to wait for a fill permit when the cache is at `cache.max_concurrent_fills`
/// (clients of a live server take permits too), before giving up on a blob.
const BUSY_RETRY: Duration = Duration::from_millis(200);
const BUSY_ATTEMPTS: u32 = 150;

/// Arguments of `regcache prefetch`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefetchArgs {
    /// Images, platforms, referrers.
    #[command(flatten)]
    pub select: super::SelectArgs,
    /// Images and blobs fetched in parallel (at most `cache.max_concurrent_fills`).
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
}

/// What to fetch of each image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Platform filter for indexes (empty: all).
    pub platforms: Vec<String>,
    /// Follow referrers.
    pub referrers: bool,
    /// Parallelism.
    pub jobs: usize,
    /// Take images the signature policy refuses, with a warning (`--allow-unsigned`).
    #[serde(default)]
    pub allow_unsigned: bool,
}

/// Progress of a prefetch, for the progress display (or a remote client).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Work on an image began.
    Started {
        /// The reference as given.
        image: String,
    },
    /// A blob is in the store.
    Blob {
        /// The image it belongs to.
        image: String,
        /// Its size.
        bytes: u64,
        /// Whether it was fetched now (false: it was already cached).
        fetched: bool,
    },
    /// An image is complete, or failed.
    Finished {
        /// The reference as given.
        image: String,
        /// Manifests stored (the image's and its children's, referrers').
        manifests: usize,
        /// Blobs stored.
        blobs: usize,
        /// Bytes fetched now.
        fetched_bytes: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
}

/// What one image needed.
#[derive(Debug, Default)]
struct ImageStats {
    manifests: usize,
    blobs: usize,
    fetched_bytes: u64,
}

/// Prefetches `images` into `cache`, reporting progress on `events`; returns the failures
/// (reference, reason).
pub async fn run(
    cache: Arc<Cache>,
    resolver: &Resolver,
    images: Vec<String>,
    options: &Options,
    events: mpsc::Sender<Event>,
) -> Vec<(String, String)> {
    let jobs = options.jobs.max(1);
    let permits = Arc::new(Semaphore::new(jobs));
    let work = images.into_iter().map(|text| {
        let (cache, permits, events) = (Arc::clone(&cache), Arc::clone(&permits), events.clone());
        let parsed = ImageRef::parse(resolver, &text);
        async move {
            let _ = events
                .send(Event::Started {
                    image: text.clone(),
                })
                .await;
            let result = match parsed {
                Ok(image) => fetch_image(&cache, &image, options, &permits, &events).await,
                Err(err) => Err(err),
            };
            let (stats, error) = match result {
                Ok(stats) => (stats, None),
                Err(err) => (ImageStats::default(), Some(err.to_string())),
            };
            let _ = events
                .send(Event::Finished {
                    image: text.clone(),
                    manifests: stats.manifests,
                    blobs: stats.blobs,
                    fetched_bytes: stats.fetched_bytes,
                    error: error.clone(),
                })
                .await;
            error.map(|error| (text, error))
        }
    });
    let failures: Vec<_> = stream::iter(work)
        .buffer_unordered(jobs)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    cache.flush_access();
    if let Err(err) = cache.index().flush() {
        tracing::warn!(error = %err, "flushing the index after prefetch failed");
    }
    failures
}

/// The manifests and blobs of one image, as far as the platform filter and referrers go.
#[derive(Debug)]
pub(super) struct Walked {
    /// The image's own manifest.
    pub(super) root: Arc<Manifest>,
    /// Every manifest reached (the root first).
    pub(super) manifests: Vec<Arc<Manifest>>,
    /// Those reached as referrers of another.
    pub(super) referrers: Vec<Digest>,
    /// Tag-schema tags found for the walked manifests (`sha256-<hex>`, cosign's `.sig`, `.att`,
    /// `.sbom`), with the manifest each points at.
    pub(super) schema_tags: Vec<(Tag, Arc<Manifest>)>,
    /// Every blob of those manifests, each once.
    pub(super) blobs: Vec<Digest>,
}

/// Walks an image through the cache: its manifest, the children for the chosen platforms, and
/// referrers when asked. Manifests are fetched (and stored) as a client pull would; an offline
/// cache answers from the store alone.
pub(super) async fn walk(
    cache: &Arc<Cache>,
    image: &ImageRef,
    options: &Options,
) -> Result<Walked, AirgapError> {
    let target = &image.target;
    // A site never carries what it will not serve: an image the policy refuses fails here,
    // unless the operator said `--allow-unsigned` (then it is logged and counted).
    let mode = if options.allow_unsigned {
        PolicyMode::Warn
    } else {
        PolicyMode::Enforce
    };
    let root = cache
        .manifest_with(target, &image.reference, &[], mode)
        .await?
        .manifest;
    let mut walked = Walked {
        root: Arc::clone(&root),
        manifests: Vec::new(),
        referrers: Vec::new(),
        schema_tags: Vec::new(),
        blobs: Vec::new(),
    };
    let mut walk = ImageWalk::new(root.digest, &options.platforms);
    // Manifests already in hand (the root, tag-schema manifests) are not fetched again.
    let mut in_hand: HashMap<Digest, Arc<Manifest>> = HashMap::from([(root.digest, root)]);
    while let Some(digest) = walk.next_manifest() {
        let manifest = match in_hand.remove(&digest) {
            Some(manifest) => manifest,
            None => {
                cache
                    .manifest_with(target, &Reference::Digest(digest), &[], mode)
                    .await?
                    .manifest
            }
        };
        walk.read(&manifest.bytes);
        if options.referrers {
            let list = cache.referrers(target, &manifest.digest, None).await?;
            for found in list
                .manifests
                .iter()
                .filter_map(|d| Digest::parse(&d.digest).ok())
            {
                walked.referrers.push(found);
                walk.also(found);
            }
            for (tag, tagged) in schema_tags(cache, target, &manifest.digest).await {
                in_hand.insert(tagged.digest, Arc::clone(&tagged));
                walk.also(tagged.digest);
                walked.schema_tags.push((tag, tagged));
            }
        }
        walked.manifests.push(manifest);
    }
    walked.blobs = walk.into_blobs();
    Ok(walked)
}

/// Suffixes of the tags that refer to `sha256-<hex>` by name: the OCI referrers fallback
/// index, and cosign's signatures, attestations and SBOMs.
const SCHEMA_TAG_SUFFIXES: [&str; 4] = ["", ".sig", ".att", ".sbom"];

/// The tag-schema tags of `digest` that exist (through the cache; absent ones are skipped).
async fn schema_tags(
    cache: &Arc<Cache>,
    target: &Target,
    digest: &Digest,
) -> Vec<(Tag, Arc<Manifest>)> {
    let mut found = Vec::new();
    for suffix in SCHEMA_TAG_SUFFIXES {
        let Ok(tag) = Tag::parse(&format!("sha256-{}{suffix}", digest.hex())) else {
            continue;
        };
        match cache
            .manifest(target, &Reference::Tag(tag.clone()), &[])
            .await
        {
            Ok(answer) => found.push((tag, answer.manifest)),
            Err(err) => tracing::debug!(%tag, error = %err, "no tag-schema manifest"),
        }
    }
    found
}

/// Fetches one image: [`walk`], then every blob (in parallel, bounded by `permits`).
async fn fetch_image(
    cache: &Arc<Cache>,
    image: &ImageRef,
    options: &Options,
    permits: &Arc<Semaphore>,
    events: &mpsc::Sender<Event>,
) -> Result<ImageStats, AirgapError> {
    let target = &image.target;
    let walked = walk(cache, image, options).await?;
    let mut stats = ImageStats {
        manifests: walked.manifests.len(),
        ..ImageStats::default()
    };
    let mut results = stream::iter(walked.blobs)
        .map(|digest| {
            let permits = Arc::clone(permits);
            async move {
                let _permit = permits.acquire_owned().await;
                fetch_blob(cache, target, &digest).await
            }
        })
        .buffer_unordered(options.jobs.max(1));
    // Reported as each completes; the first failure ends the image (fills already started
    // finish in their own tasks, so a rerun finds them stored).
    while let Some(result) = results.next().await {
        let (bytes, fetched) = result?;
        stats.blobs += 1;
        if fetched {
            stats.fetched_bytes += bytes;
        }
        let _ = events
            .send(Event::Blob {
                image: image.text.clone(),
                bytes,
                fetched,
            })
            .await;
    }
    Ok(stats)
}

/// Makes one blob cached: a store hit costs nothing; a miss joins or starts a fill and reads
/// it to the end, so the fill verifies and commits. Returns (size, fetched now).
async fn fetch_blob(
    cache: &Cache,
    target: &Target,
    digest: &Digest,
) -> Result<(u64, bool), AirgapError> {
    let mut attempts = 0;
    let answer = loop {
        match cache.blob(target, digest, RangeRequest::Full).await {
            Err(CacheError::Busy) if attempts < BUSY_ATTEMPTS => {
                attempts += 1;
                tokio::time::sleep(BUSY_RETRY).await;
            }
            other => break other?,
        }
    };
    let BlobReply::Found(answer) = answer else {
        // A full request has no range to refuse.
        return Err(CacheError::FillAborted.into());
    };
    match answer.body {
        BlobBody::Stored(_) => Ok((answer.size.unwrap_or(0), false)),
        BlobBody::Filling(mut body) => {
            let mut size = 0u64;
            while let Some(chunk) = body.next_chunk().await {
                size += chunk.map_err(AirgapError::Read)?.len() as u64;
            }
            // The last byte comes once the digest is verified; the commit follows. A command
            // that exits now would lose the blob with its runtime.
            if !body.stored().await {
                return Err(CacheError::FillAborted.into());
            }
            Ok((size, true))
        }
    }
}

/// `regcache prefetch`: runs on the stopped store, prints progress and a summary; exit 1 when
/// anything failed.
pub fn main(config: &Config, args: PrefetchArgs) -> ExitCode {
    let images = match args.select.image_list() {
        Ok(images) => images,
        Err(err) => {
            eprintln!("regcache: {err}");
            return ExitCode::FAILURE;
        }
    };
    if images.is_empty() {
        eprintln!("regcache: no images given (REF... or --file LIST)");
        return ExitCode::from(2);
    }
    let options = Options {
        platforms: args.select.platforms,
        referrers: args.select.referrers,
        jobs: args.jobs.clamp(1, config.cache.max_concurrent_fills.max(1)),
        allow_unsigned: args.select.allow_unsigned,
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let count = images.len();
    let failures = runtime.block_on(async {
        if let Some(stream) = super::admin::connect(config).await {
            return remote(stream, images, options).await;
        }
        let cache = super::open_cache(config, crate::store::IndexAccess::Serve)
            .map_err(|err| err.to_string())?;
        let resolver = crate::routing::Resolver::for_upstreams(&config.upstreams);
        let (sender, receiver) = mpsc::channel(64);
        let display = tokio::spawn(super::progress::show(receiver));
        let failures = run(cache, &resolver, images, &options, sender).await;
        let _ = display.await;
        Ok(failures)
    });
    super::progress::summary("prefetch", count, failures)
}

/// Runs the prefetch inside the server that holds the store, showing its progress here.
async fn remote(
    stream: tokio::net::UnixStream,
    images: Vec<String>,
    options: Options,
) -> Result<Vec<(String, String)>, String> {
    use super::admin::{exchange, Reply, Request};
    let mut display = super::progress::Display::new();
    let mut outcome = Err("the server closed the admin connection early".to_owned());
    let request = Request::Prefetch { images, options };
    exchange(stream, &request, |reply| match reply {
        Reply::Progress { event } => display.show(event),
        Reply::PrefetchDone { failures } => outcome = Ok(failures),
        Reply::Failed { message } => outcome = Err(message),
        Reply::Imported { .. } | Reply::Synced { .. } => {}
    })
    .await
    .map_err(|err| format!("admin socket: {err}"))?;
    display.finish();
    outcome
}
