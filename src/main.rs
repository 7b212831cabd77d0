//! The `regcache` command: parse arguments, load the config, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use regcache::activation;
use regcache::cache::{PinsError, PinsFile};
use regcache::config::{Config, LogFormat};
use regcache::routing::Resolver;
use tokio_util::sync::CancellationToken;

/// A pull-through cache for OCI / Docker container registries.
///
/// Point Docker (`registry-mirrors`), containerd (`hosts.toml`), podman/CRI-O
/// (`registries.conf`) or skopeo at it; it fetches from the configured upstream registries on a
/// miss, verifies every byte against its digest, and serves later pulls from local disk.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML configuration file (see config.toml.example for every key); without it, the
    /// embedded default.
    #[arg(long, short, global = true, env = "REGCACHE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache server.
    ///
    /// Without --config, an embedded default is used: listen on 0.0.0.0:5000, store under
    /// ./regcache-data, one default upstream docker.io -> https://registry-1.docker.io.
    /// Requests are routed by `?ns=<registry>`, then by a first path segment equal to an
    /// upstream name (/v2/ghcr.io/org/app/...), then to the default upstream.
    Serve {
        /// Override `server.listen` (e.g. 127.0.0.1:5000); a socket handed in by socket
        /// activation (LISTEN_FDS) is used instead of either.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override `storage.path`.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Serve only cached content; never contact any upstream.
        #[arg(long)]
        offline: bool,
    },
    /// Re-hash every cached file, quarantine corrupt ones and drop index entries that point
    /// nowhere. Exits 1 when something was wrong. The file check runs while a server runs;
    /// the index check needs the server stopped.
    Verify {
        /// Also rebuild the index from the store (a corrupt index is moved aside first).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove temp files and index entries whose files are gone; print what was freed.
    Gc,
    /// List cached tags with digests, cached sizes and last access (server stopped).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Keep an image cached and never evict it (IMAGE as clients name it: `alpine:3.20`,
    /// `ghcr.io/org/app:1.0`, `org/app@sha256:…`). Recorded in `<storage>/pins.toml`; a running
    /// server picks it up within seconds and fetches what is missing.
    Pin {
        /// The image.
        image: String,
        /// Keep only these platforms of an index (`linux/amd64`, `linux/arm64/v8`); repeatable.
        #[arg(long = "platform")]
        platforms: Vec<String>,
    },
    /// Remove a pin made with `regcache pin`.
    Unpin {
        /// The image, as given to `regcache pin`.
        image: String,
    },
    /// Pull images into the store ahead of any client, through the same verified path as a
    /// pull (all platforms of an index unless --platform). Resumable; exits 1 if any failed.
    /// Works while `regcache serve` runs on the store (through its admin socket).
    Prefetch(regcache::airgap::prefetch::PrefetchArgs),
    /// Write cached images as an OCI image layout tar, byte for byte (server stopped).
    Export(regcache::airgap::archive::ExportArgs),
    /// Load an OCI image layout tar (from `regcache export` or `skopeo copy ...
    /// oci-archive:PATH:REF`), verifying every digest. Works while `regcache serve` runs.
    Import(regcache::airgap::import::ImportArgs),
    /// Check a configuration file and print the effective settings (exit 64 if invalid).
    CheckConfig,
    /// Run every [[sync]] rule now (`--once`), for cron-style sites; the server runs the
    /// rules on their own schedule. Works while `regcache serve` runs on the store. Exits 75
    /// when a round stopped at the upstream's rate-limit reserve, 1 when an image failed.
    Sync {
        /// Run each rule once, now (required: the schedule itself runs in the server).
        #[arg(long)]
        once: bool,
    },
}

/// `EX_USAGE`: the configuration (or an image named against it) is invalid.
const EXIT_CONFIG: u8 = 64;

/// mimalloc, not glibc's malloc: its per-thread heaps give freed memory back instead of
/// keeping it in one of up to 8 arenas per core (see `mimalloc` in Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("regcache: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Command::Serve { .. } | Command::CheckConfig) {
        if let Err(err) = config.check_serving() {
            eprintln!("regcache: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // Every `[[policy]]` key is read and its type checked before anything is served.
    if let Err(err) = regcache_cache::check_keys(&config.policies) {
        eprintln!("regcache: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let result = match cli.command {
        Command::Serve {
            listen,
            storage,
            offline,
        } => serve(config, listen, storage, offline),
        Command::Verify { repair, json } => verify(&config, repair, json),
        Command::Gc => gc(&config),
        Command::Ls { json } => ls(&config, json),
        Command::Pin { image, platforms } => edit_pins(&config, &image, Some(platforms)),
        Command::Unpin { image } => edit_pins(&config, &image, None),
        Command::Prefetch(args) => Ok(regcache::airgap::prefetch::main(&config, args)),
        Command::Export(args) => Ok(regcache::airgap::archive::main(&config, args)),
        Command::Import(args) => Ok(regcache::airgap::import::main(&config, &args)),
        Command::Sync { once: false } => {
            eprintln!(
                "regcache: the [[sync]] schedule runs inside `regcache serve`; `regcache sync --once` runs every rule now"
            );
            Ok(ExitCode::from(2))
        }
        Command::Sync { once: true } => Ok(regcache::schedule::main(&config)),
        Command::CheckConfig => {
            // The configuration in force, as TOML regcache accepts back, then one line.
            print!("{}", config.to_toml());
            println!("# {}", config.summary());
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|err| {
        // Once, on stderr (where the server's log also goes).
        eprintln!("regcache: {}", describe(&err));
        ExitCode::FAILURE
    })
}

/// An error and its causes for the terminal, in one line: each cause once (most errors here
/// already name their source in their own message).
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

fn verify(config: &Config, repair: bool, json: bool) -> anyhow::Result<ExitCode> {
    init_tracing(config);
    let report = regcache::maintenance::verify(config, repair, !json)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} files ({} bytes): {} corrupt (quarantined), {} index entries dropped, {} manifests re-indexed",
            report.checked,
            report.bytes,
            report.corrupt.len(),
            report.dropped_entries,
            report.rebuilt_manifests
        );
        for corrupt in &report.corrupt {
            println!("corrupt: {corrupt}");
        }
        if let Some(reason) = &report.index_skipped {
            println!("index not checked: {reason}");
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn gc(config: &Config) -> anyhow::Result<ExitCode> {
    init_tracing(config);
    let report = regcache::maintenance::gc(config)?;
    println!(
        "removed {} temp files ({} bytes), {} evicted files from the trash and {} orphan index entries",
        report.temp_files, report.temp_bytes, report.trash_files, report.orphan_entries
    );
    if let Some(reason) = &report.index_skipped {
        println!("index not cleaned: {reason}");
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let tags = regcache::maintenance::list(config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tags)?);
        return Ok(ExitCode::SUCCESS);
    }
    let header = [
        "UPSTREAM",
        "REPOSITORY",
        "TAG",
        "DIGEST",
        "CACHED",
        "LAST ACCESS",
        "FRESHNESS",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = tags
        .into_iter()
        .map(|tag| {
            [
                tag.upstream,
                tag.repository,
                tag.tag,
                tag.digest,
                bytesize::ByteSize(tag.cached_bytes).to_string(),
                tag.last_access.unwrap_or_else(|| "-".to_owned()),
                tag.freshness.unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    // Columns as wide as their longest cell: long names and tags do not shift the others.
    let mut widths = header.clone().map(|cell| cell.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(column, (cell, width))| match column {
                4 => format!("{cell:>width$}"),
                _ => format!("{cell:<width$}"),
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// Adds (`platforms` given) or removes a pin in the pins file. An image that does not resolve
/// against the configured upstreams, or a pin that does not validate, is a configuration error
/// (exit 64); failing to write the file is not.
fn edit_pins(
    config: &Config,
    image: &str,
    platforms: Option<Vec<String>>,
) -> anyhow::Result<ExitCode> {
    let resolver = Resolver::for_upstreams(&config.upstreams);
    let (name, reference) = regcache::routing::split_image_ref(image);
    let resolved = match resolver.resolve(None, name) {
        Ok(resolved) => resolved,
        Err(err) => {
            eprintln!("regcache: {image}: {err}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let upstream = &config.upstreams[resolved.upstream].name;
    let path = PinsFile::path(&config.storage);
    let mut file = match PinsFile::read(&path) {
        Err(PinsError::Invalid(err)) => {
            eprintln!("regcache: {}: {err}", path.display());
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        other => other?,
    };
    let changed = match platforms {
        Some(platforms) => file.add(upstream, resolved.repo.as_str(), reference, platforms),
        None => file.remove(upstream, resolved.repo.as_str(), reference),
    };
    // Validate before writing, so a bad reference never reaches the server.
    if let Err(err) = file.validate(&config.upstreams) {
        eprintln!("regcache: {err}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    file.write(&path)?;
    let what = if changed { "updated" } else { "unchanged" };
    println!(
        "{upstream}/{}:{reference}: pins {what} ({})",
        resolved.repo,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colours only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(
    mut config: Config,
    listen: Option<std::net::SocketAddr>,
    storage: Option<PathBuf>,
    offline: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(storage) = storage {
        config.storage.path = storage;
    }
    if offline {
        for upstream in &mut config.upstreams {
            upstream.offline = true;
        }
    }
    init_tracing(&config);
    // Before the runtime's threads start: it reads and removes environment variables.
    let inherited = activation::take_from_env()?;
    if let (Some(_), None) = (&inherited.metrics, config.server.metrics_listen) {
        let fd = activation::FIRST_FD + usize::from(inherited.main.is_some());
        return Err(activation::ActivationError::MetricsNotConfigured(fd).into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = match inherited.main {
            Some(listener) => from_std(listener, "main")?,
            None => tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("binding server.listen = {}", config.server.listen))?,
        };
        let metrics_listener = match (inherited.metrics, config.server.metrics_listen) {
            (Some(listener), _) => Some(from_std(listener, "metrics")?),
            (None, Some(address)) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding server.metrics_listen = {address}"))?,
            ),
            (None, None) => None,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        regcache::run(config, listener, metrics_listener, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// An inherited (socket-activated) listener, for the runtime.
fn from_std(
    listener: std::net::TcpListener,
    role: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .with_context(|| format!("using the inherited {role} listener"))
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
