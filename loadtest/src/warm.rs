//! `warm-blob`: N keep-alive connections GET one blob URL back to back for D seconds.
//! Throughput counts every body byte received before the deadline (in-flight responses are cut
//! at the deadline, as wrk does); latency is over completed responses only.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::json;
use tokio::sync::Barrier;

use crate::http::{empty, hash_body, Conn, Endpoint};
use crate::stats::{new_histogram, record, summarize};
use crate::Report;

#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Blob URL, e.g. http://127.0.0.1:5000/v2/bench/large/blobs/sha256:...
    #[arg(long)]
    pub url: String,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 8)]
    pub connections: usize,
    /// Seconds to run.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Expected digest: one GET before the timed run is hashed and must match (proves the
    /// target serves the right bytes and warms it).
    #[arg(long)]
    pub digest: Option<String>,
}

#[derive(Default)]
struct ConnStats {
    bytes: u64,
    completed: u64,
    errors: u64,
    non_2xx: u64,
}

pub async fn check_once(endpoint: &Endpoint, path: &str, digest: &str) -> Result<u64> {
    let mut conn = Conn::connect(endpoint).await?;
    let request = conn.request(Method::GET, path).body(empty())?;
    let response = conn.send(request).await?;
    if !response.status().is_success() {
        bail!("GET {path} answered {}", response.status());
    }
    let (got, n) = hash_body(response.into_body()).await?;
    if got != digest {
        bail!("GET {path}: body hashes to {got}, expected {digest}");
    }
    Ok(n)
}

async fn run_conn(mut conn: Conn, path: &str, stats: &mut ConnStats, hist: &mut Histogram<u64>) {
    loop {
        let request = match conn.request(Method::GET, path).body(empty()) {
            Ok(r) => r,
            Err(_) => return,
        };
        let t0 = Instant::now();
        let response = match conn.send(request).await {
            Ok(r) => r,
            Err(_) => {
                stats.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !response.status().is_success() {
            stats.non_2xx += 1;
        }
        let mut body = response.into_body();
        let mut ok = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        stats.bytes += data.len() as u64;
                    }
                }
                Err(_) => {
                    stats.errors += 1;
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            stats.completed += 1;
            record(hist, t0.elapsed());
        }
    }
}

pub async fn run(args: WarmArgs, pids: &crate::PidArgs) -> Result<Report> {
    let (endpoint, path) = Endpoint::parse_url(&args.url)?;
    if args.connections == 0 || args.connections > 4096 {
        bail!("--connections must be 1..4096");
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    let verified_size = match &args.digest {
        Some(d) => Some(check_once(&endpoint, &path, d).await?),
        None => None,
    };
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(Conn::connect(&endpoint).await?);
    }
    let barrier = std::sync::Arc::new(Barrier::new(args.connections + 1));
    let duration = Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for conn in conns {
        let barrier = std::sync::Arc::clone(&barrier);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = ConnStats::default();
            let mut hist = new_histogram();
            barrier.wait().await;
            let deadline = tokio::time::Instant::now() + duration;
            let _ = tokio::time::timeout_at(deadline, run_conn(conn, &path, &mut stats, &mut hist))
                .await;
            (stats, hist)
        }));
    }
    let watch = pids.start();
    let client_cpu0 = crate::procwatch::cpu_seconds("self");
    barrier.wait().await;
    let t0 = Instant::now();
    let mut total = ConnStats::default();
    let mut hist = new_histogram();
    for task in tasks {
        let (s, h) = task.await?;
        total.bytes += s.bytes;
        total.completed += s.completed;
        total.errors += s.errors;
        total.non_2xx += s.non_2xx;
        hist.add(&h).ok();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = crate::procwatch::cpu_seconds("self")
        .zip(client_cpu0)
        .map(|(b, a)| b - a);
    let procs = watch.finish().await;
    let latency = summarize(&hist);
    let mbps = total.bytes as f64 / elapsed / 1e6;
    let rps = total.completed as f64 / elapsed;
    let gb = total.bytes as f64 / 1e9;
    let cpu_total: Option<f64> = if procs.is_empty() {
        None
    } else {
        procs.iter().map(|p| p.cpu_s).sum()
    };
    let json = json!({
        "scenario": "warm-blob",
        "url": args.url,
        "connections": args.connections,
        "duration_s": elapsed,
        "bytes": total.bytes,
        "mb_per_s": mbps,
        "requests_completed": total.completed,
        "req_per_s": rps,
        "errors": total.errors,
        "non_2xx": total.non_2xx,
        "verified_size": verified_size,
        "latency": latency,
        "client_cpu_s": client_cpu,
        "target_cpu_s": cpu_total,
        "target_cpu_s_per_gb": cpu_total.map(|c| if gb > 0.0 { c / gb } else { 0.0 }),
        "processes": procs,
    });
    let mut rows = vec![
        ("url".into(), args.url.clone()),
        ("connections".into(), args.connections.to_string()),
        ("duration".into(), format!("{elapsed:.2} s")),
        (
            "bytes received".into(),
            format!("{} ({:.2} GB)", total.bytes, gb),
        ),
        ("throughput".into(), format!("{mbps:.1} MB/s")),
        (
            "responses completed".into(),
            format!("{} ({rps:.2}/s)", total.completed),
        ),
        (
            "latency p50 / p99 / max".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                latency.p50_ms, latency.p99_ms, latency.max_ms
            ),
        ),
        (
            "errors / non-2xx".into(),
            format!("{} / {}", total.errors, total.non_2xx),
        ),
    ];
    if let Some(c) = client_cpu {
        rows.push(("client CPU".into(), format!("{c:.2} s")));
    }
    if let Some(c) = cpu_total {
        rows.push((
            "target CPU".into(),
            format!("{c:.2} s ({:.3} s/GB)", if gb > 0.0 { c / gb } else { 0.0 }),
        ));
    }
    crate::proc_rows(&mut rows, &json["processes"]);
    Ok(Report { json, rows })
}
