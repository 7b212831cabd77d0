//! `regcache sync --once`: runs every `[[sync]]` rule now, for sites that schedule with cron
//! instead of the server's own schedule. With a server running on the store, the rounds run
//! inside it (admin socket) and what they fetch is served at once; otherwise the command opens
//! the store itself.
//!
//! Exit status: 0 when every rule ran through, 75 (`EX_TEMPFAIL`) when a round stopped at the
//! upstream's rate-limit reserve or pause (run it again later), 1 when an image or a tag
//! listing failed.

use std::process::ExitCode;

use crate::cache::SyncReport;
use crate::config::Config;

/// `EX_TEMPFAIL`: a round stopped early on the upstream's budget; try again later.
const EXIT_TEMPFAIL: u8 = 75;

/// `regcache sync --once`.
pub fn main(config: &Config) -> ExitCode {
    if config.syncs.is_empty() {
        eprintln!("regcache: no [[sync]] rule is configured");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("regcache: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let reports = runtime.block_on(async {
        if let Some(stream) = crate::airgap::admin::connect(config).await {
            return remote(stream).await;
        }
        let cache = crate::airgap::open_cache(config, crate::store::IndexAccess::Serve)
            .map_err(|err| err.to_string())?;
        let reports = cache.sync_now().await;
        cache
            .index()
            .flush()
            .map_err(|err| format!("flushing the index: {err}"))?;
        Ok(reports)
    });
    let reports = match reports {
        Ok(reports) => reports,
        Err(err) => {
            eprintln!("regcache: {err}");
            return ExitCode::FAILURE;
        }
    };
    for report in &reports {
        println!(
            "{}: {} picked, {} kept, {} fetched, {} failed — {}",
            report.rule, report.picked, report.kept, report.fetched, report.failed, report.outcome
        );
    }
    exit_code(&reports)
}

fn exit_code(reports: &[SyncReport]) -> ExitCode {
    if reports.iter().any(|r| r.failed > 0) {
        ExitCode::FAILURE
    } else if reports
        .iter()
        .any(|r| r.outcome.starts_with("stopped early"))
    {
        ExitCode::from(EXIT_TEMPFAIL)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the rounds inside the server that holds the store.
async fn remote(stream: tokio::net::UnixStream) -> Result<Vec<SyncReport>, String> {
    use crate::airgap::admin::{exchange, Reply, Request};
    let mut outcome = Err("the server closed the admin connection early".to_owned());
    exchange(stream, &Request::Sync, |reply| match reply {
        Reply::Synced { reports } => outcome = Ok(reports),
        Reply::Failed { message } => outcome = Err(message),
        Reply::Progress { .. } | Reply::PrefetchDone { .. } | Reply::Imported { .. } => {}
    })
    .await
    .map_err(|err| format!("admin socket: {err}"))?;
    outcome
}
