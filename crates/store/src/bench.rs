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

/// Writes `s` as a COPY text-format field: backslash, tab, newline and carriage return
/// escaped; `None` is `\N`.
fn copy_field(out: &mut String, s: Option<&str>) {
    let Some(s) = s else {
        out.push_str("\\N");
        return;
    };
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn copy_row(out: &mut String, fields: &[Option<&str>]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        copy_field(out, *f);
    }
    out.push('\n');
}

fn time(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A build's events with their times, in order.
pub type History = Vec<(chrono::DateTime<Utc>, Event)>;

/// A chunk of a loaded build's output (its number is its place in the build's list).
#[derive(Debug, Clone)]
pub struct BenchChunk {
    pub attempt: u32,
    /// The event it follows.
    pub after_seq: u32,
    pub step: String,
    pub lines: Vec<String>,
    pub at: chrono::DateTime<Utc>,
}

impl Store {
    /// Loads whole build histories into an empty part of the database in one transaction
    /// (`COPY` of the events and of their folded projection rows): the data of the scale
    /// benchmark. Each history is folded with [`cbs_projections::replay`], so the rows are
    /// exactly what the live path would have written. Returns the events written.
    pub async fn load_histories_for_bench(
        &self,
        histories: &[(BuildKey, History, Vec<BenchChunk>)],
    ) -> Result<u64, StoreError> {
        use futures::SinkExt;
        let mut events = String::new();
        let mut builds = String::new();
        let mut output = String::new();
        let mut n = 0u64;
        for (key, history, chunks) in histories {
            for (i, c) in chunks.iter().enumerate() {
                copy_row(
                    &mut output,
                    &[
                        Some(key.as_str()),
                        Some(&c.attempt.to_string()),
                        Some(&(i + 1).to_string()),
                        Some(&c.after_seq.to_string()),
                        Some(&c.step),
                        Some(&c.lines.join("\n")),
                        Some(&c.lines.len().to_string()),
                        Some("f"),
                        Some(&time(c.at)),
                    ],
                );
            }
            let state = cbs_projections::replay(
                key,
                history
                    .iter()
                    .enumerate()
                    .map(|(i, (at, e))| (i as u32 + 1, *at, e)),
            )?
            .ok_or_else(|| StoreError::Corrupt(format!("build {key}: empty history")))?;
            for (i, (at, e)) in history.iter().enumerate() {
                copy_row(
                    &mut events,
                    &[
                        Some(key.as_str()),
                        Some(&(i + 1).to_string()),
                        Some(e.event_type().as_str()),
                        Some(&cbs_events::SCHEMA_VERSION.to_string()),
                        Some(&e.encode().to_string()),
                        Some(&time(*at)),
                    ],
                );
                n += 1;
            }
            let json = |v: serde_json::Value| v.to_string();
            let s = &state;
            copy_row(
                &mut builds,
                &[
                    Some(s.key.as_str()),
                    Some(s.status.as_str()),
                    Some(&json(serde_json::to_value(&s.request).expect("request"))),
                    Some(&s.attempt.to_string()),
                    Some(&s.failures.to_string()),
                    s.owner.as_deref(),
                    s.lease_expires_at.map(time).as_deref(),
                    Some(&time(s.available_at)),
                    s.current_step.as_deref(),
                    s.last_error
                        .as_ref()
                        .map(|e| json(serde_json::to_value(e).expect("error")))
                        .as_deref(),
                    s.artifact
                        .as_ref()
                        .map(|a| json(serde_json::to_value(a).expect("artifact")))
                        .as_deref(),
                    Some(&s.last_seq.to_string()),
                    Some(&time(s.created_at)),
                    Some(&time(s.updated_at)),
                    s.client.as_deref(),
                    Some(&s.queue_rank.to_string()),
                    s.built_by.as_deref(),
                    s.reproduction
                        .as_ref()
                        .map(|r| json(serde_json::to_value(r).expect("reproduction")))
                        .as_deref(),
                ],
            );
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for (sql, data) in [
            (
                "COPY build_events (build_key, seq, event_type, schema_version, payload, \
                 recorded_at) FROM STDIN",
                events,
            ),
            (
                "COPY builds (key, status, request, attempt, failures, owner, lease_expires_at, \
                 available_at, current_step, last_error, artifact, last_seq, created_at, \
                 updated_at, client, queue_rank, built_by, reproduction) FROM STDIN",
                builds,
            ),
            (
                "COPY build_output (build_key, attempt, seq, after_seq, step, body, lines, \
                 truncated, recorded_at) FROM STDIN",
                output,
            ),
        ] {
            let sink = tx.copy_in(sql).await?;
            futures::pin_mut!(sink);
            sink.send(std::io::Cursor::new(data.into_bytes())).await?;
            sink.finish().await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Bytes the event log and the projection take (tables with their indexes and TOAST).
    pub async fn table_bytes_for_bench(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT t, pg_total_relation_size(t::regclass) AS bytes
                 FROM unnest(ARRAY['build_events', 'build_output', 'builds',
                                   'artifact_downloads']) AS t",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("t")?, r.try_get("bytes")?)))
            .collect()
    }

    /// How many builds the projection holds.
    pub async fn count_builds_for_bench(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM builds", &[])
            .await?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// `VACUUM ANALYZE` of the event log and the projection (after a bulk load, as
    /// autovacuum would do in time).
    pub async fn analyze_for_bench(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        // One statement each: several in one string run as one transaction, which VACUUM
        // refuses.
        client.batch_execute("VACUUM ANALYZE build_events").await?;
        client.batch_execute("VACUUM ANALYZE builds").await?;
        client.batch_execute("VACUUM ANALYZE build_output").await?;
        Ok(())
    }
}
