//! `manifest-storm`: N keep-alive connections send manifest requests back to back for D
//! seconds, cycling through GET/HEAD by digest and by tag. Each response must be 200 and carry
//! the expected `Docker-Content-Digest`; GET bodies are read in full.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::json;

use crate::http::{empty, header_str, Conn, Endpoint};
use crate::stats::{new_histogram, record, summarize};
use crate::Report;

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, clap::Args)]
pub struct StormArgs {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    #[arg(long)]
    pub registry: String,
    /// Repository name, e.g. bench/large
    #[arg(long)]
    pub repo: String,
    /// Tag to request.
    #[arg(long)]
    pub tag: String,
    /// The manifest digest the tag points to (sha256:...).
    #[arg(long)]
    pub digest: String,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub connections: usize,
    /// Seconds to run.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Request kinds to cycle through (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "get-digest,head-digest,get-tag,head-tag"
    )]
    pub kinds: Vec<Kind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    GetDigest,
    HeadDigest,
    GetTag,
    HeadTag,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::GetDigest => "get-digest",
            Kind::HeadDigest => "head-digest",
            Kind::GetTag => "get-tag",
            Kind::HeadTag => "head-tag",
        }
    }
}

struct ConnStats {
    hists: Vec<Histogram<u64>>,
    errors: Vec<u64>,
    last_error: Option<String>,
}

async fn run_conn(
    mut conn: Conn,
    offset: usize,
    kinds: &[Kind],
    paths: &[(Method, String)],
    digest: &str,
    stats: &mut ConnStats,
) {
    let mut i = offset;
    loop {
        let k = i % kinds.len();
        i += 1;
        let (method, path) = &paths[k];
        let request = match conn
            .request(method.clone(), path)
            .header(hyper::header::ACCEPT, MANIFEST_ACCEPT)
            .body(empty())
        {
            Ok(r) => r,
            Err(_) => return,
        };
        let t0 = Instant::now();
        let outcome: Result<()> = async {
            let response = conn.send(request).await?;
            let status = response.status();
            let got = header_str(response.headers(), "docker-content-digest").to_owned();
            let body = response.into_body().collect().await?;
            drop(body);
            if status != hyper::StatusCode::OK {
                bail!("status {status}");
            }
            if got != digest {
                bail!("Docker-Content-Digest {got:?}, expected {digest}");
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => record(&mut stats.hists[k], t0.elapsed()),
            Err(e) => {
                stats.errors[k] += 1;
                stats.last_error = Some(format!("{} {path}: {e:#}", kinds[k].name()));
                // A refused connection must not turn into a busy loop.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

pub async fn run(args: StormArgs, pids: &crate::PidArgs) -> Result<Report> {
    let base = args.registry.trim_end_matches('/');
    let (endpoint, prefix) = Endpoint::parse_url(base)?;
    let prefix = prefix.trim_end_matches('/').to_owned();
    if args.connections == 0 || args.connections > 4096 {
        bail!("--connections must be 1..4096");
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    if args.kinds.is_empty() {
        bail!("--kinds is empty");
    }
    let paths: Vec<(Method, String)> = args
        .kinds
        .iter()
        .map(|k| {
            let method = match k {
                Kind::GetDigest | Kind::GetTag => Method::GET,
                Kind::HeadDigest | Kind::HeadTag => Method::HEAD,
            };
            let reference = match k {
                Kind::GetDigest | Kind::HeadDigest => &args.digest,
                Kind::GetTag | Kind::HeadTag => &args.tag,
            };
            (
                method,
                format!("{prefix}/v2/{}/manifests/{reference}", args.repo),
            )
        })
        .collect();
    // Prime: each kind once, and it must succeed.
    {
        let mut conn = Conn::connect(&endpoint).await?;
        for (method, path) in &paths {
            let (status, headers, _) = conn
                .fetch(method.clone(), path, &[("accept", MANIFEST_ACCEPT)])
                .await?;
            if status != hyper::StatusCode::OK {
                bail!("priming {method} {path}: status {status}");
            }
            let got = header_str(&headers, "docker-content-digest");
            if got != args.digest {
                bail!(
                    "priming {method} {path}: Docker-Content-Digest {got:?}, expected {}",
                    args.digest
                );
            }
        }
    }
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(Conn::connect(&endpoint).await?);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(args.connections + 1));
    let duration = Duration::from_secs_f64(args.duration);
    let kinds = std::sync::Arc::new(args.kinds.clone());
    let paths = std::sync::Arc::new(paths);
    let mut tasks = Vec::new();
    for (offset, conn) in conns.into_iter().enumerate() {
        let barrier = std::sync::Arc::clone(&barrier);
        let kinds = std::sync::Arc::clone(&kinds);
        let paths = std::sync::Arc::clone(&paths);
        let digest = args.digest.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = ConnStats {
                hists: kinds.iter().map(|_| new_histogram()).collect(),
                errors: vec![0; kinds.len()],
                last_error: None,
            };
            barrier.wait().await;
            let deadline = tokio::time::Instant::now() + duration;
            let _ = tokio::time::timeout_at(
                deadline,
                run_conn(conn, offset, &kinds, &paths, &digest, &mut stats),
            )
            .await;
            stats
        }));
    }
    let watch = pids.start();
    let client_cpu0 = crate::procwatch::cpu_seconds("self");
    barrier.wait().await;
    let t0 = Instant::now();
    let mut hists: Vec<Histogram<u64>> = args.kinds.iter().map(|_| new_histogram()).collect();
    let mut errors = vec![0u64; args.kinds.len()];
    let mut last_error = None;
    for task in tasks {
        let s = task.await?;
        for (k, h) in s.hists.iter().enumerate() {
            hists[k].add(h).ok();
            errors[k] += s.errors[k];
        }
        if s.last_error.is_some() {
            last_error = s.last_error;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = crate::procwatch::cpu_seconds("self")
        .zip(client_cpu0)
        .map(|(b, a)| b - a);
    let procs = watch.finish().await;
    let mut all = new_histogram();
    for h in &hists {
        all.add(h).ok();
    }
    let total = summarize(&all);
    let total_errors: u64 = errors.iter().sum();
    let rps = total.count as f64 / elapsed;
    let per_kind: Vec<serde_json::Value> = args
        .kinds
        .iter()
        .enumerate()
        .map(|(k, kind)| {
            let l = summarize(&hists[k]);
            json!({
                "kind": kind.name(),
                "ok": l.count,
                "errors": errors[k],
                "req_per_s": l.count as f64 / elapsed,
                "latency": l,
            })
        })
        .collect();
    let json = json!({
        "scenario": "manifest-storm",
        "registry": args.registry,
        "repo": args.repo,
        "tag": args.tag,
        "digest": args.digest,
        "connections": args.connections,
        "duration_s": elapsed,
        "ok": total.count,
        "errors": total_errors,
        "last_error": last_error,
        "req_per_s": rps,
        "latency": total,
        "per_kind": per_kind,
        "client_cpu_s": client_cpu,
        "processes": procs,
    });
    let mut rows = vec![
        ("registry".into(), args.registry.clone()),
        ("connections".into(), args.connections.to_string()),
        ("duration".into(), format!("{elapsed:.2} s")),
        (
            "requests OK / errors".into(),
            format!("{} / {total_errors}", total.count),
        ),
        ("throughput".into(), format!("{rps:.0} req/s")),
        (
            "latency p50 / p99 / max".into(),
            format!(
                "{:.3} / {:.3} / {:.3} ms",
                total.p50_ms, total.p99_ms, total.max_ms
            ),
        ),
    ];
    for (k, kind) in args.kinds.iter().enumerate() {
        let l = summarize(&hists[k]);
        rows.push((
            format!("  {}", kind.name()),
            format!(
                "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, errors {}",
                l.count as f64 / elapsed,
                l.p50_ms,
                l.p99_ms,
                errors[k]
            ),
        ));
    }
    if let Some(e) = &last_error {
        rows.push(("last error".into(), e.clone()));
    }
    if let Some(c) = client_cpu {
        rows.push(("client CPU".into(), format!("{c:.2} s")));
    }
    crate::proc_rows(&mut rows, &json["processes"]);
    Ok(Report { json, rows })
}
