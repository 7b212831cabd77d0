//! `seed-store`: writes N small blobs, each under its own digest, in regcache's store layout
//! (`DIR/sha256/<2 hex>/<64 hex>`, DIR being `<storage.path>/blobs/<upstream name>`), to time
//! a start-up with a large cache. Only for a stopped server's store; every file's bytes match
//! its name, so the store's invariant holds.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::http::sha256_digest;
use crate::Report;

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// The namespace directory: <storage.path>/blobs/<upstream name>
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// Number of blobs.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Distinguishes the blobs of different runs.
    #[arg(long, default_value = "seed")]
    pub seed: String,
}

pub fn run(args: SeedArgs) -> Result<Report> {
    if args.count > 10_000_000 {
        bail!("--count must be at most 10000000");
    }
    let t0 = Instant::now();
    let mut first = None;
    let mut bytes = 0u64;
    for i in 0..args.count {
        let content = format!("regcache-loadtest seeded blob {} {i}\n", args.seed);
        let digest = sha256_digest(content.as_bytes());
        let hex = &digest["sha256:".len()..];
        let dir = args.dir.join("sha256").join(&hex[..2]);
        if i < 256 || !dir.is_dir() {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let path = dir.join(hex);
        std::fs::write(&path, content.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        bytes += content.len() as u64;
        if first.is_none() {
            first = Some(digest);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let json = json!({
        "scenario": "seed-store",
        "dir": args.dir,
        "count": args.count,
        "bytes": bytes,
        "first_digest": first,
        "elapsed_s": elapsed,
    });
    let rows = vec![
        ("dir".into(), args.dir.display().to_string()),
        ("blobs written".into(), args.count.to_string()),
        ("first digest".into(), first.unwrap_or_default()),
        ("time".into(), format!("{elapsed:.2} s")),
    ];
    Ok(Report { json, rows })
}
