//! `cold-blob`: N clients, each on its own connection, GET the same blob once, all released at
//! the same instant. Every body is hashed and must match the digest. Reports the wall time
//! (first request sent to last body byte) and each client's time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use http_body_util::BodyExt as _;
use hyper::Method;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::sync::Barrier;

use crate::http::{empty, finish_digest, Conn, Endpoint};
use crate::stats::median;
use crate::Report;

#[derive(Debug, clap::Args)]
pub struct ColdArgs {
    /// Blob URL, e.g. http://127.0.0.1:5000/v2/bench/large/blobs/sha256:...
    #[arg(long)]
    pub url: String,
    /// Concurrent clients (one connection each).
    #[arg(short = 'n', long, default_value_t = 8)]
    pub clients: usize,
    /// Expected digest (default: the sha256:... at the end of the URL).
    #[arg(long)]
    pub digest: Option<String>,
    /// Give up on a client after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientResult {
    pub client: usize,
    pub status: u16,
    pub bytes: u64,
    pub digest_ok: bool,
    pub ttfb_s: f64,
    pub total_s: f64,
    /// Time between the second-to-last and the last body chunk: how long the final bytes were
    /// held back (a cache that verifies before completing a response shows its commit here).
    pub tail_s: f64,
    pub error: Option<String>,
}

async fn one_client(
    i: usize,
    mut conn: Conn,
    path: String,
    digest: String,
    barrier: Arc<Barrier>,
    start: Arc<std::sync::OnceLock<Instant>>,
    timeout: Duration,
) -> ClientResult {
    let mut result = ClientResult {
        client: i,
        status: 0,
        bytes: 0,
        digest_ok: false,
        ttfb_s: 0.0,
        total_s: 0.0,
        tail_s: 0.0,
        error: None,
    };
    barrier.wait().await;
    let t0 = Instant::now();
    start.get_or_init(|| t0);
    let work = async {
        let request = conn.request(Method::GET, &path).body(empty())?;
        let response = conn.send(request).await?;
        result.ttfb_s = t0.elapsed().as_secs_f64();
        result.status = response.status().as_u16();
        let mut body = response.into_body();
        let mut hasher = Sha256::new();
        let mut last = Instant::now();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                let now = Instant::now();
                result.tail_s = now.duration_since(last).as_secs_f64();
                last = now;
                hasher.update(data);
                result.bytes += data.len() as u64;
            }
        }
        result.digest_ok = finish_digest(hasher) == digest;
        anyhow::Ok(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result.error = Some(format!("{e:#}")),
        Err(_) => result.error = Some(format!("timed out after {timeout:?}")),
    }
    result.total_s = t0.elapsed().as_secs_f64();
    if result.error.is_none() && !(200..300).contains(&result.status) {
        result.error = Some(format!("status {}", result.status));
    } else if result.error.is_none() && !result.digest_ok {
        result.error = Some("body does not match the digest".into());
    }
    result
}

pub fn digest_from_url(url: &str) -> Option<String> {
    let i = url.rfind("sha256:")?;
    let d = &url[i..];
    let d = d.split(['?', '#']).next()?;
    (d.len() == 71).then(|| d.to_owned())
}

pub async fn run(args: ColdArgs, pids: &crate::PidArgs) -> Result<Report> {
    let (endpoint, path) = Endpoint::parse_url(&args.url)?;
    if args.clients == 0 || args.clients > 1024 {
        bail!("--clients must be 1..1024");
    }
    let digest = match args.digest.clone().or_else(|| digest_from_url(&args.url)) {
        Some(d) => d,
        None => bail!("--digest is required when the URL does not end in sha256:<hex>"),
    };
    let timeout = Duration::from_secs_f64(args.timeout.clamp(1.0, 3600.0));
    // Connect everyone first so that the measured part is only the requests.
    let mut conns = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        conns.push(Conn::connect(&endpoint).await?);
    }
    let barrier = Arc::new(Barrier::new(args.clients + 1));
    let start = Arc::new(std::sync::OnceLock::new());
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(one_client(
            i,
            conn,
            path.clone(),
            digest.clone(),
            Arc::clone(&barrier),
            Arc::clone(&start),
            timeout,
        )));
    }
    let watch = pids.start();
    let client_cpu0 = crate::procwatch::cpu_seconds("self");
    barrier.wait().await;
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await?);
    }
    let end = Instant::now();
    let client_cpu = crate::procwatch::cpu_seconds("self")
        .zip(client_cpu0)
        .map(|(b, a)| b - a);
    let procs = watch.finish().await;
    let wall = start
        .get()
        .map(|s| end.duration_since(*s).as_secs_f64())
        .unwrap_or(0.0);
    let totals: Vec<f64> = results.iter().map(|r| r.total_s).collect();
    let ttfbs: Vec<f64> = results.iter().map(|r| r.ttfb_s).collect();
    let tails: Vec<f64> = results.iter().map(|r| r.tail_s).collect();
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let min = totals.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = totals.iter().cloned().fold(0.0, f64::max);
    let json = json!({
        "scenario": "cold-blob",
        "url": args.url,
        "digest": digest,
        "clients": args.clients,
        "wall_s": wall,
        "client_s": {"min": min, "median": median(&totals), "max": max},
        "ttfb_s": {"median": median(&ttfbs), "max": ttfbs.iter().cloned().fold(0.0, f64::max)},
        "tail_s": {"median": median(&tails), "max": tails.iter().cloned().fold(0.0, f64::max)},
        "bytes": bytes,
        "aggregate_mb_per_s": if wall > 0.0 { bytes as f64 / wall / 1e6 } else { 0.0 },
        "failed": failed,
        "all_ok": failed == 0,
        "client_cpu_s": client_cpu,
        "per_client": results,
        "processes": procs,
    });
    let mut rows = vec![
        ("url".into(), args.url.clone()),
        ("clients".into(), args.clients.to_string()),
        ("wall time (all clients)".into(), format!("{wall:.3} s")),
        (
            "per-client min / median / max".into(),
            format!("{min:.3} / {:.3} / {max:.3} s", median(&totals)),
        ),
        (
            "time to first byte (median)".into(),
            format!("{:.3} s", median(&ttfbs)),
        ),
        (
            "wait for the last chunk (median)".into(),
            format!("{:.3} s", median(&tails)),
        ),
        (
            "bytes (all clients)".into(),
            format!(
                "{bytes} ({:.1} MB/s aggregate)",
                bytes as f64 / wall.max(1e-9) / 1e6
            ),
        ),
        (
            "verified".into(),
            format!("{} of {} clients OK", args.clients - failed, args.clients),
        ),
    ];
    if let Some(c) = client_cpu {
        rows.push(("client CPU".into(), format!("{c:.2} s")));
    }
    for r in results.iter().filter(|r| r.error.is_some()).take(5) {
        rows.push((
            format!("client {} failed", r.client),
            r.error.clone().unwrap_or_default(),
        ));
    }
    crate::proc_rows(&mut rows, &json["processes"]);
    Ok(Report { json, rows })
}
