//! Database migrations: the SQL files of `migrations/`, embedded at build time.
//!
//! Several processes may start at once (janitors, `all`, `migrate`): each takes a
//! session-level advisory lock first, so exactly one applies what is missing and the others
//! then find nothing to do.

use tracing::info;

use crate::{queries, PgConnector, StoreError};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// The newest migration this build knows.
pub fn latest_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

/// Applies every missing migration; returns how many were applied.
pub async fn run(connector: &PgConnector) -> Result<usize, StoreError> {
    let (mut client, _messages) = connector.connect_with_messages("").await?;
    queries::lock_migrations(&client).await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Migration(e.to_string()));
    // Unlock even on failure; the session's end would release it too.
    let unlocked = queries::unlock_migrations(&client).await;
    let report = report?;
    unlocked?;
    let applied = report.applied_migrations().len();
    if applied > 0 {
        info!(applied, latest = latest_version(), "database migrated");
    }
    Ok(applied)
}

/// `Ok` when every embedded migration has been applied.
pub(crate) async fn check_applied(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    let want = latest_version();
    match queries::applied_migration(client).await? {
        Some(v) if i64::from(v) >= want => Ok(()),
        have => Err(StoreError::Migration(format!(
            "database schema is at version {}, this build needs {want}: run `caddy-build-server migrate`",
            have.unwrap_or(0)
        ))),
    }
}
