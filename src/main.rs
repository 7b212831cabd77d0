//! The `regcache` command: parse arguments, load the config, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use regcache::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

/// A pull-through cache for OCI / Docker container registries.
///
/// Point Docker (`registry-mirrors`), containerd (`hosts.toml`), podman/CRI-O
/// (`registries.conf`) or skopeo at it; it fetches from the configured upstream registries on a
/// miss, verifies every byte against its digest, and serves later pulls from local disk.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
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
        /// TOML configuration file (see config.toml.example for every key).
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Override `server.listen` (e.g. 127.0.0.1:5000).
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
        /// TOML configuration file (for storage.path).
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Also rebuild the index from the store (a corrupt index is moved aside first).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove temp files and index entries whose files are gone; print what was freed.
    Gc {
        /// TOML configuration file (for storage.path).
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// List cached tags with digests, cached sizes and last access (server stopped).
    Ls {
        /// TOML configuration file (for storage.path).
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
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
        /// TOML configuration file.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Remove a pin made with `regcache pin`.
    Unpin {
        /// The image, as given to `regcache pin`.
        image: String,
        /// TOML configuration file.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
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
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `EX_USAGE`: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;

fn load_or_exit(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        eprintln!("regcache: {err}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Verify {
            config,
            repair,
            json,
        } => {
            let config = match load_or_exit(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_tracing(&config);
            match regcache::maintenance::verify(&config, repair, !json) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).unwrap_or_default()
                        );
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
                    if report.is_clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(err) => {
                    eprintln!("regcache: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pin {
            image,
            platforms,
            config,
        } => match load_or_exit(config.as_deref()) {
            Ok(config) => edit_pins(&config, &image, Some(platforms)),
            Err(code) => code,
        },
        Command::Unpin { image, config } => match load_or_exit(config.as_deref()) {
            Ok(config) => edit_pins(&config, &image, None),
            Err(code) => code,
        },
        Command::Gc { config } => {
            let config = match load_or_exit(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_tracing(&config);
            match regcache::maintenance::gc(&config) {
                Ok(report) => {
                    println!(
                        "removed {} temp files ({} bytes) and {} orphan index entries",
                        report.temp_files, report.temp_bytes, report.orphan_entries
                    );
                    if let Some(reason) = &report.index_skipped {
                        println!("index not cleaned: {reason}");
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("regcache: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ls { config, json } => {
            let config = match load_or_exit(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match regcache::maintenance::list(&config) {
                Ok(tags) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&tags).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(tags) => {
                    println!(
                        "{:<24} {:<40} {:<20} {:<73} {:>12}",
                        "UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "CACHED"
                    );
                    for tag in tags {
                        println!(
                            "{:<24} {:<40} {:<20} {:<73} {:>12}",
                            tag.upstream,
                            tag.repository,
                            tag.tag,
                            tag.digest,
                            bytesize::ByteSize(tag.cached_bytes).to_string()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("regcache: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Prefetch(args) => match load_or_exit(args.select.config.as_deref()) {
            Ok(config) => regcache::airgap::prefetch::main(&config, args),
            Err(code) => code,
        },
        Command::Export(args) => match load_or_exit(args.select.config.as_deref()) {
            Ok(config) => regcache::airgap::archive::main(&config, args),
            Err(code) => code,
        },
        Command::Import(args) => match load_or_exit(args.config.as_deref()) {
            Ok(config) => regcache::airgap::import::main(&config, &args),
            Err(code) => code,
        },
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(config) => {
                println!("{config:#?}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("regcache: {err}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve {
            config,
            listen,
            storage,
            offline,
        } => {
            let mut config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("regcache: {err}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(storage) = storage {
                config.storage_path = storage;
            }
            if offline {
                for upstream in &mut config.upstreams {
                    upstream.offline = true;
                }
            }
            init_tracing(&config);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("regcache: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Adds (`platforms` given) or removes a pin in the pins file.
fn edit_pins(config: &Config, image: &str, platforms: Option<Vec<String>>) -> ExitCode {
    let resolver = regcache::routing::Resolver::new(
        config.upstreams.iter().map(|u| u.name.clone()).collect(),
        config.upstreams.iter().position(|u| u.default),
    );
    let (name, reference) = regcache::routing::split_image_ref(image);
    let resolved = match resolver.resolve(None, name) {
        Ok(resolved) => resolved,
        Err(err) => {
            eprintln!("regcache: {image}: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let upstream = &config.upstreams[resolved.upstream].name;
    let path = regcache::config::PinsFile::path(config);
    let result = regcache::config::PinsFile::read(&path).and_then(|mut file| {
        let changed = match platforms {
            Some(platforms) => file.add(upstream, resolved.repo.as_str(), reference, platforms),
            None => file.remove(upstream, resolved.repo.as_str(), reference),
        };
        // Validate before writing, so a bad reference never reaches the server.
        file.validate(&config.upstreams)?;
        std::fs::create_dir_all(&config.storage_path).map_err(|source| {
            regcache::config::ConfigError::Read {
                path: config.storage_path.clone(),
                source,
            }
        })?;
        file.write(&path)?;
        Ok(changed)
    });
    match result {
        Ok(changed) => {
            let what = if changed { "updated" } else { "unchanged" };
            println!(
                "{upstream}/{}:{reference}: pins {what} ({})",
                resolved.repo,
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("regcache: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    // Colours only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding server.listen = {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding server.metrics_listen = {address}"))?,
            ),
            None => None,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        regcache::run(config, listener, metrics_listener, shutdown).await?;
        Ok(())
    })
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
