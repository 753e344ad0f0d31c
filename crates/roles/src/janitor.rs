//! The janitor role: migrations at start, then the maintenance services (which come with
//! the janitor issue), and the `rebuild-projections` command.

use anyhow::Context;
use cbs_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::App;

/// Applies migrations if the config asks for it (before anything else connects, so that
/// the listening connection finds its tables).
pub async fn migrate(config: &cbs_config::Config) -> anyhow::Result<()> {
    if config.janitor.migrate_on_start {
        let connector = cbs_store::PgConnector::new(&config.database)?;
        cbs_store::migrate::run(&connector)
            .await
            .with_context(|| format!("migrating {}", connector.display()))?;
    }
    Ok(())
}

/// The maintenance services, until `shutdown`.
pub async fn run_services(_app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    info!("janitor started (no maintenance services yet)");
    shutdown.cancelled().await;
    info!("janitor stopped");
    Ok(())
}

/// Prints what `rebuild-projections` found; an error (non-zero exit) if the projection
/// differs from the log and was not fixed.
pub async fn rebuild_projections(store: &Store, fix: bool) -> anyhow::Result<()> {
    let report = store
        .rebuild_projections(fix)
        .await
        .context("rebuilding projections")?;
    let mut out = format!(
        "rebuilt {} builds from {} events: {} difference(s)\n",
        report.builds,
        report.events,
        report.differences.len()
    );
    for d in &report.differences {
        out.push_str(&format!("  {d}\n"));
    }
    if report.fixed {
        out.push_str("the differing rows were replaced with the rebuilt ones\n");
    }
    print_out(&out);
    if !report.differences.is_empty() && !report.fixed {
        anyhow::bail!(
            "the projection differs from the event log in {} build(s); rerun with --fix to repair",
            report.differences.len()
        );
    }
    Ok(())
}

/// A command's report goes to stdout (logs go to stderr).
#[allow(clippy::print_stdout)]
pub(crate) fn print_out(s: &str) {
    print!("{s}");
}
