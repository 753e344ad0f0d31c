//! The worker role. The foundation starts it and stops it cleanly; claiming and building
//! come with the worker issue (the claim itself is `Store::claim`).

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::App;

/// Runs until `shutdown`.
pub async fn run(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = app.config.worker_id();
    info!(worker.id = %id, "worker started (build execution is not implemented yet: it claims nothing)");
    shutdown.cancelled().await;
    info!(worker.id = %id, "worker stopped");
    Ok(())
}
