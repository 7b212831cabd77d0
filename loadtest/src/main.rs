//! `loadtest`: a load generator for regcache and the servers it is compared with (nginx serving
//! a file, CNCF Distribution in proxy mode, the upstream registry itself).
//!
//! Scenarios: `warm-blob`, `cold-blob`, `manifest-storm`, `pull`; `push` builds and pushes a
//! test image; `seed-store` fills a stopped regcache's store with many small blobs; `throttle`
//! is a latency and bandwidth limiting TCP proxy (a WAN-like upstream). Every run
//! prints a table, or one JSON object with `--json`. `--pid PID` (repeatable) watches server
//! processes during the run: peak RSS and CPU seconds.
//! Every loop is bounded in time: scenarios run for `--duration` or until `--timeout`.

mod cold;
mod http;
mod procwatch;
mod pull;
mod push;
mod seed;
mod stats;
mod storm;
mod throttle;
mod warm;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator for registry caches: warm/cold blobs, manifest storms, pulls"
)]
struct Cli {
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// A label printed in the table's title (and in the JSON as "label").
    #[arg(long, global = true)]
    label: Option<String>,
    #[command(flatten)]
    pids: PidArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
pub struct PidArgs {
    /// Process(es) to watch during the run (peak RSS, CPU seconds); repeat or comma-separate.
    #[arg(long = "pid", value_delimiter = ',', global = true)]
    pids: Vec<u32>,
    /// Reset the kernel's RSS high-water mark (VmHWM) of each --pid before the run
    /// (needs permission to write /proc/PID/clear_refs).
    #[arg(long, global = true)]
    reset_hwm: bool,
    /// Sampling interval of VmRSS in milliseconds.
    #[arg(long, default_value_t = 20, global = true)]
    sample_ms: u64,
}

impl PidArgs {
    pub fn start(&self) -> procwatch::ProcWatch {
        procwatch::ProcWatch::start(
            &self.pids,
            self.reset_hwm,
            Duration::from_millis(self.sample_ms.clamp(1, 10_000)),
        )
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N connections GET one blob repeatedly for D seconds: MB/s, req/s, latency.
    WarmBlob(warm::WarmArgs),
    /// N clients GET the same (not yet cached) blob once, at the same instant; each body is
    /// verified: wall time and per-client times.
    ColdBlob(cold::ColdArgs),
    /// GET/HEAD manifests by digest and by tag over N connections for D seconds: req/s, p50/p99.
    ManifestStorm(storm::StormArgs),
    /// A registry client's pull (/v2/, token, manifest, config, layers), every digest verified.
    Pull(pull::PullArgs),
    /// Build a seeded pseudo-random test image and push it with the registry API.
    Push(push::PushArgs),
    /// Write N small verified blobs in regcache's store layout (start-up time with a big cache).
    SeedStore(seed::SeedArgs),
    /// A TCP proxy adding latency and a shared bandwidth cap (a WAN-like upstream); runs
    /// until killed.
    Throttle(throttle::ThrottleArgs),
}

/// What a scenario produced: the JSON object and the rows of the human table.
pub struct Report {
    pub json: serde_json::Value,
    pub rows: Vec<(String, String)>,
}

/// Adds one table row per watched process.
pub fn proc_rows(rows: &mut Vec<(String, String)>, procs: &serde_json::Value) {
    let Some(list) = procs.as_array() else { return };
    for p in list {
        let kib = |k: &str| {
            p[k].as_u64()
                .map(|v| format!("{:.1} MiB", v as f64 / 1024.0))
        };
        rows.push((
            format!("pid {} ({})", p["pid"], p["comm"].as_str().unwrap_or("?")),
            format!(
                "peak RSS sampled {}, VmHWM {}{}, CPU {}",
                kib("peak_rss_sampled_kib").unwrap_or_else(|| "?".into()),
                kib("vm_hwm_kib").unwrap_or_else(|| "?".into()),
                if p["hwm_reset"].as_bool() == Some(true) {
                    " (reset at start)"
                } else {
                    " (process lifetime)"
                },
                p["cpu_s"]
                    .as_f64()
                    .map(|c| format!("{c:.2} s"))
                    .unwrap_or_else(|| "?".into()),
            ),
        ));
    }
}

fn print_table(title: &str, rows: &[(String, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("== {title}");
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let (name, result) = runtime.block_on(async {
        match cli.command {
            Command::WarmBlob(a) => ("warm-blob", warm::run(a, &cli.pids).await),
            Command::ColdBlob(a) => ("cold-blob", cold::run(a, &cli.pids).await),
            Command::ManifestStorm(a) => ("manifest-storm", storm::run(a, &cli.pids).await),
            Command::Pull(a) => ("pull", pull::run(a, &cli.pids).await),
            Command::Push(a) => ("push", push::run(a).await),
            Command::SeedStore(a) => ("seed-store", seed::run(a)),
            Command::Throttle(a) => ("throttle", throttle::run(a).await),
        }
    });
    // Connection tasks may still be parked on sockets; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(mut report) => {
            // A scenario whose requests failed exits 1, after printing what it measured.
            let failed = report.json["all_ok"] == serde_json::Value::Bool(false);
            if cli.json {
                if let Some(label) = &cli.label {
                    report.json["label"] = serde_json::Value::String(label.clone());
                }
                println!("{}", report.json);
            } else {
                let title = match &cli.label {
                    Some(l) => format!("{name}: {l}"),
                    None => name.to_owned(),
                };
                print_table(&title, &report.rows);
            }
            if failed {
                std::process::ExitCode::from(1)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("loadtest {name}: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
