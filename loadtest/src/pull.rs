//! `pull`: what a registry client does, timed: `GET /v2/` (and an anonymous Bearer token when
//! the registry asks for one), the manifest by tag (an index picks linux/amd64 or its first
//! entry), the config, then the layers over `--layer-connections` connections. Every manifest
//! and blob is hashed and checked against its digest; nothing is written to disk. With
//! `--clients N`, N such pulls start at the same instant.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use crate::http::{empty, hash_body, header_str, sha256_digest, Conn, Endpoint};
use crate::stats::median;
use crate::storm::MANIFEST_ACCEPT;
use crate::Report;

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    #[arg(long)]
    pub registry: String,
    /// Repository name, e.g. bench/large
    #[arg(long)]
    pub repo: String,
    /// Tag or digest to pull.
    #[arg(long)]
    pub reference: String,
    /// Connections per client for blobs (layers are fetched in parallel over them).
    #[arg(long, default_value_t = 3)]
    pub layer_connections: usize,
    /// Pulls started at the same instant.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub clients: usize,
    /// Give up on a client after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PullResult {
    pub client: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub manifest_digest: Option<String>,
    pub blobs: usize,
    pub bytes: u64,
    pub total_s: f64,
    /// Time to the end of each step, seconds from the start of the pull.
    pub steps: Vec<(String, f64)>,
}

/// An anonymous Bearer token when `GET /v2/` answers 401 with a Bearer challenge.
async fn token_for(conn: &mut Conn, prefix: &str, repo: &str) -> Result<Option<String>> {
    let (status, headers, _) = conn
        .fetch(Method::GET, &format!("{prefix}/v2/"), &[])
        .await?;
    if status == StatusCode::OK {
        return Ok(None);
    }
    if status != StatusCode::UNAUTHORIZED {
        bail!("GET /v2/ answered {status}");
    }
    let challenge = header_str(&headers, "www-authenticate").to_owned();
    let Some(params) = challenge.strip_prefix("Bearer ") else {
        bail!("GET /v2/ wants {challenge:?}; only anonymous Bearer tokens are supported");
    };
    let field = |name: &str| {
        params.split(',').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_owned())
        })
    };
    let realm = field("realm").ok_or_else(|| anyhow!("Bearer challenge without realm"))?;
    let service = field("service").unwrap_or_default();
    let (token_endpoint, token_path) = Endpoint::parse_url(&realm)?;
    let mut token_conn = Conn::connect(&token_endpoint).await?;
    let sep = if token_path.contains('?') { '&' } else { '?' };
    let path = format!("{token_path}{sep}service={service}&scope=repository:{repo}:pull");
    let (status, _, body) = token_conn.fetch(Method::GET, &path, &[]).await?;
    if status != StatusCode::OK {
        bail!("token endpoint answered {status}");
    }
    let v: Value = serde_json::from_slice(&body)?;
    let token = v["token"]
        .as_str()
        .or_else(|| v["access_token"].as_str())
        .ok_or_else(|| anyhow!("token response without token"))?;
    Ok(Some(token.to_owned()))
}

struct Ctx {
    prefix: String,
    repo: String,
    auth: Option<String>,
}

impl Ctx {
    fn headers<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut h = extra.to_vec();
        if let Some(a) = &self.auth {
            h.push(("authorization", a.as_str()));
        }
        h
    }
}

/// Fetches a manifest, checks its digest; returns (digest, media type, parsed JSON, size).
async fn manifest(conn: &mut Conn, ctx: &Ctx, reference: &str) -> Result<(String, Value, usize)> {
    let path = format!("{}/v2/{}/manifests/{reference}", ctx.prefix, ctx.repo);
    let (status, headers, body) = conn
        .fetch(
            Method::GET,
            &path,
            &ctx.headers(&[("accept", MANIFEST_ACCEPT)]),
        )
        .await?;
    if status != StatusCode::OK {
        bail!("GET {path}: {status}");
    }
    let digest = sha256_digest(&body);
    let announced = header_str(&headers, "docker-content-digest");
    if !announced.is_empty() && announced != digest {
        bail!("GET {path}: body is {digest}, Docker-Content-Digest says {announced}");
    }
    if reference.starts_with("sha256:") && reference != digest {
        bail!("GET {path}: body is {digest}");
    }
    let v: Value = serde_json::from_slice(&body).context("manifest is not JSON")?;
    Ok((digest, v, body.len()))
}

async fn blob(conn: &mut Conn, ctx: &Ctx, digest: &str, size: Option<u64>) -> Result<u64> {
    let path = format!("{}/v2/{}/blobs/{digest}", ctx.prefix, ctx.repo);
    let mut builder = conn.request(Method::GET, &path);
    for (k, v) in ctx.headers(&[]) {
        builder = builder.header(k, v);
    }
    let response = conn.send(builder.body(empty())?).await?;
    if response.status() != StatusCode::OK {
        bail!("GET {path}: {}", response.status());
    }
    let (got, n) = hash_body(response.into_body()).await?;
    if got != digest {
        bail!("GET {path}: body is {got}");
    }
    if let Some(size) = size {
        if size != n {
            bail!("GET {path}: {n} bytes, descriptor says {size}");
        }
    }
    Ok(n)
}

fn descriptor(v: &Value) -> Result<(String, Option<u64>)> {
    let d = v["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("descriptor without digest"))?;
    Ok((d.to_owned(), v["size"].as_u64()))
}

async fn one_pull(
    endpoint: Endpoint,
    prefix: String,
    args: Arc<PullArgs>,
) -> Result<(String, usize, u64, Vec<(String, f64)>)> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let mut conn = Conn::connect(&endpoint).await?;
    let auth = token_for(&mut conn, &prefix, &args.repo)
        .await?
        .map(|t| format!("Bearer {t}"));
    steps.push(("v2".to_owned(), t0.elapsed().as_secs_f64()));
    let ctx = Arc::new(Ctx {
        prefix,
        repo: args.repo.clone(),
        auth,
    });
    let (mut digest, mut m, mut bytes) = manifest(&mut conn, &ctx, &args.reference).await?;
    let top_digest = digest.clone();
    if m["manifests"].is_array() {
        let list = m["manifests"].as_array().cloned().unwrap_or_default();
        let pick = list
            .iter()
            .find(|d| d["platform"]["os"] == "linux" && d["platform"]["architecture"] == "amd64")
            .or_else(|| list.first())
            .ok_or_else(|| anyhow!("empty index"))?;
        let (d, _) = descriptor(pick)?;
        let (d2, m2, b2) = manifest(&mut conn, &ctx, &d).await?;
        digest = d2;
        m = m2;
        bytes += b2;
    }
    let _ = digest;
    steps.push(("manifest".to_owned(), t0.elapsed().as_secs_f64()));
    let mut bytes = bytes as u64;
    let mut nblobs = 0;
    if m["config"].is_object() {
        let (d, size) = descriptor(&m["config"])?;
        bytes += blob(&mut conn, &ctx, &d, size).await?;
        nblobs += 1;
    }
    steps.push(("config".to_owned(), t0.elapsed().as_secs_f64()));
    let layers: VecDeque<(String, Option<u64>)> = m["layers"]
        .as_array()
        .map(|a| a.iter().map(descriptor).collect::<Result<_>>())
        .transpose()?
        .unwrap_or_default();
    nblobs += layers.len();
    let queue = Arc::new(Mutex::new(layers));
    let mut workers = Vec::new();
    let mut first = Some(conn);
    for _ in 0..args.layer_connections.max(1) {
        let queue = Arc::clone(&queue);
        let ctx = Arc::clone(&ctx);
        let endpoint = endpoint.clone();
        let conn = first.take();
        workers.push(tokio::spawn(async move {
            let mut conn = match conn {
                Some(c) => c,
                None => Conn::connect(&endpoint).await?,
            };
            let mut n = 0u64;
            loop {
                let next = queue.lock().unwrap().pop_front();
                let Some((d, size)) = next else { break };
                n += blob(&mut conn, &ctx, &d, size).await?;
            }
            anyhow::Ok(n)
        }));
    }
    for w in workers {
        bytes += w.await??;
    }
    steps.push(("layers".to_owned(), t0.elapsed().as_secs_f64()));
    Ok((top_digest, nblobs, bytes, steps))
}

pub async fn run(args: PullArgs, pids: &crate::PidArgs) -> Result<Report> {
    let base = args.registry.trim_end_matches('/').to_owned();
    let (endpoint, prefix) = Endpoint::parse_url(&base)?;
    let prefix = prefix.trim_end_matches('/').to_owned();
    if args.clients == 0 || args.clients > 1024 {
        bail!("--clients must be 1..1024");
    }
    if args.layer_connections > 64 {
        bail!("--layer-connections must be at most 64");
    }
    let timeout = Duration::from_secs_f64(args.timeout.clamp(1.0, 3600.0));
    let args = Arc::new(args);
    let barrier = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let barrier = Arc::clone(&barrier);
        let endpoint = endpoint.clone();
        let prefix = prefix.clone();
        let args = Arc::clone(&args);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let r = tokio::time::timeout(timeout, one_pull(endpoint, prefix, args)).await;
            let total_s = t0.elapsed().as_secs_f64();
            let r = match r {
                Ok(r) => r,
                Err(_) => Err(anyhow!("timed out after {timeout:?}")),
            };
            match r {
                Ok((digest, blobs, bytes, steps)) => PullResult {
                    client: i,
                    ok: true,
                    error: None,
                    manifest_digest: Some(digest),
                    blobs,
                    bytes,
                    total_s,
                    steps,
                },
                Err(e) => PullResult {
                    client: i,
                    ok: false,
                    error: Some(format!("{e:#}")),
                    manifest_digest: None,
                    blobs: 0,
                    bytes: 0,
                    total_s,
                    steps: Vec::new(),
                },
            }
        }));
    }
    let watch = pids.start();
    let client_cpu0 = crate::procwatch::cpu_seconds("self");
    barrier.wait().await;
    let t0 = Instant::now();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    let wall = t0.elapsed().as_secs_f64();
    let client_cpu = crate::procwatch::cpu_seconds("self")
        .zip(client_cpu0)
        .map(|(b, a)| b - a);
    let procs = watch.finish().await;
    let failed = results.iter().filter(|r| !r.ok).count();
    let totals: Vec<f64> = results.iter().map(|r| r.total_s).collect();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let min = totals.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = totals.iter().cloned().fold(0.0, f64::max);
    let first = &results[0];
    let json = json!({
        "scenario": "pull",
        "registry": args.registry,
        "repo": args.repo,
        "reference": args.reference,
        "clients": args.clients,
        "wall_s": wall,
        "client_s": {"min": min, "median": median(&totals), "max": max},
        "bytes": bytes,
        "mb_per_s": if wall > 0.0 { bytes as f64 / wall / 1e6 } else { 0.0 },
        "failed": failed,
        "all_ok": failed == 0,
        "manifest_digest": first.manifest_digest,
        "client_cpu_s": client_cpu,
        "per_client": results,
        "processes": procs,
    });
    let mut rows = vec![
        (
            "image".into(),
            format!("{}/{}:{}", args.registry, args.repo, args.reference),
        ),
        (
            "manifest digest".into(),
            first.manifest_digest.clone().unwrap_or_default(),
        ),
        ("clients".into(), args.clients.to_string()),
        ("wall time".into(), format!("{wall:.3} s")),
        (
            "per-client min / median / max".into(),
            format!("{min:.3} / {:.3} / {max:.3} s", median(&totals)),
        ),
        (
            "bytes (all clients)".into(),
            format!("{bytes} ({:.1} MB/s)", bytes as f64 / wall.max(1e-9) / 1e6),
        ),
        ("blobs per pull".into(), first.blobs.to_string()),
        (
            "steps (client 0)".into(),
            first
                .steps
                .iter()
                .map(|(s, t)| format!("{s} {t:.3}s"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "verified".into(),
            format!("{} of {} pulls OK", args.clients - failed, args.clients),
        ),
    ];
    if let Some(c) = client_cpu {
        rows.push(("client CPU".into(), format!("{c:.2} s")));
    }
    for r in results.iter().filter(|r| !r.ok).take(5) {
        rows.push((
            format!("client {} failed", r.client),
            r.error.clone().unwrap_or_default(),
        ));
    }
    crate::proc_rows(&mut rows, &json["processes"]);
    Ok(Report { json, rows })
}
