//! Store methods only the benchmarks use (`cbs-bench`), compiled with the `bench` feature
//! alone, so that the server's binary carries none of them.

use cbs_domain::BuildKey;
use cbs_events::Event;
use cbs_projections::BuildState;
use chrono::Utc;
use deadpool_postgres::GenericClient;

use crate::{Store, StoreError};

impl Store {
    /// Server settings that decide write performance, with the server version.
    pub async fn server_settings(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.client().await?;
        let names = [
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "full_page_writes",
            "shared_buffers",
            "commit_delay",
            "max_connections",
        ];
        let rows = client
            .query(
                "SELECT name, setting || coalesce(unit, '') AS value FROM pg_settings
                 WHERE name = ANY($1)
                 UNION ALL SELECT 'server_version', version()
                 ORDER BY 1",
                &[&&names[..]],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("value")?)))
            .collect()
    }

    /// Claims one specific queued build (benchmarks; workers use [`Store::claim`]).
    pub async fn claim_key_for_bench(
        &self,
        key: &BuildKey,
    ) -> Result<Option<BuildState>, StoreError> {
        let Some(b) = self.build(key).await? else {
            return Ok(None);
        };
        let event = Event::Claimed(cbs_events::Claimed {
            worker: "bench".into(),
            attempt: b.attempt + 1,
            lease_expires_at: Utc::now() + chrono::Duration::hours(1),
        });
        Ok(Some(self.append(&b, event).await?))
    }

    /// Connections to this database whose application name starts with `name` (the
    /// benchmark reports what the api process holds).
    pub async fn count_connections(&self, name: &str) -> Result<i64, StoreError> {
        let client = self.client().await?;
        count_connections(&client, name).await
    }
}

async fn count_connections(c: &impl GenericClient, name: &str) -> Result<i64, StoreError> {
    let row = c
        .query_one(
            "SELECT count(*) AS n FROM pg_stat_activity
             WHERE datname = current_database() AND starts_with(application_name, $1)",
            &[&name],
        )
        .await?;
    Ok(row.try_get("n")?)
}
