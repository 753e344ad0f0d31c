//! The `janitor rebuild-projections [--fix]` command.

use anyhow::Context;
use cbs_store::Store;

use crate::print_out;

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
