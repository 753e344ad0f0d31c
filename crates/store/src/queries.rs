//! Every SQL statement of the project, one documented function each.
//!
//! Hot statements go through deadpool's statement cache (`prepare_cached`), so a write is
//! one round trip. Writes are single statements (autocommit): the event and its projection
//! row commit together, with one WAL flush.

use std::time::Duration;

use cbs_domain::BuildKey;
use cbs_events::{Event, EventType, GlobalCursor, RecordedEvent, SCHEMA_VERSION};
use cbs_projections::{BuildState, Status};
use deadpool_postgres::GenericClient;
use postgres_types::Json;
use tokio_postgres::{Client, Row};

use crate::StoreError;

/// The notification channel. Payloads are `key:seq` entries (`key:seq:q` when the event made
/// the build claimable) separated by spaces; never event bodies.
pub(crate) const CHANNEL: &str = "cbs_events";

/// Columns of a `builds` row; [`build_from_row`] reads them by name.
const BUILD_COLUMNS: &str = "key, status, request, attempt, failures, owner, lease_expires_at, \
     available_at, current_step, last_error, artifact, last_seq, created_at, updated_at, client, \
     queue_rank, built_by, reproduction, output_pruned";

/// Columns of a `build_events` row; [`event_from_row`] reads them by name.
const EVENT_COLUMNS: &str =
    "position, tx_id::text AS tx_id, build_key, seq, event_type, schema_version, \
     payload, recorded_at";

fn to_i32(v: u32, what: &str) -> Result<i32, StoreError> {
    i32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is out of range")))
}

fn to_u32(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("projection values serialize to JSON")
}

fn from_json<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Reads a `builds` row selected with [`BUILD_COLUMNS`].
pub(crate) fn build_from_row(row: &Row) -> Result<BuildState, StoreError> {
    let key: String = row.try_get("key")?;
    let key: BuildKey = key
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("builds.key: {e}")))?;
    let status: String = row.try_get("status")?;
    let status: Status = status
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("builds.status: {e}")))?;
    let last_error: Option<serde_json::Value> = row.try_get("last_error")?;
    let artifact: Option<serde_json::Value> = row.try_get("artifact")?;
    let reproduction: Option<serde_json::Value> = row.try_get("reproduction")?;
    Ok(BuildState {
        status,
        request: from_json(row.try_get("request")?, "builds.request")?,
        attempt: to_u32(row.try_get("attempt")?, "builds.attempt")?,
        failures: to_u32(row.try_get("failures")?, "builds.failures")?,
        owner: row.try_get("owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        available_at: row.try_get("available_at")?,
        current_step: row.try_get("current_step")?,
        last_error: last_error
            .map(|v| from_json(v, "builds.last_error"))
            .transpose()?,
        artifact: artifact
            .map(|v| from_json(v, "builds.artifact"))
            .transpose()?,
        last_seq: to_u32(row.try_get("last_seq")?, "builds.last_seq")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        client: row.try_get("client")?,
        queue_rank: row.try_get("queue_rank")?,
        built_by: row.try_get("built_by")?,
        reproduction: reproduction
            .map(|v| from_json(v, "builds.reproduction"))
            .transpose()?,
        output_pruned: to_u32(row.try_get("output_pruned")?, "builds.output_pruned")?,
        key,
    })
}

/// Reads a `build_events` row selected with [`EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &Row) -> Result<RecordedEvent, StoreError> {
    let tx: String = row.try_get("tx_id")?;
    let key: String = row.try_get("build_key")?;
    let event_type: String = row.try_get("event_type")?;
    let payload: serde_json::Value = row.try_get("payload")?;
    Ok(RecordedEvent {
        position: row.try_get("position")?,
        tx_id: tx
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("build_events.tx_id {tx:?}")))?,
        key: key
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("build_events.build_key: {e}")))?,
        seq: to_u32(row.try_get("seq")?, "build_events.seq")?,
        recorded_at: row.try_get("recorded_at")?,
        event: Event::decode(&event_type, row.try_get("schema_version")?, payload)
            .map_err(|e| StoreError::Corrupt(format!("build_events: {e}")))?,
    })
}

/// How many builds `client` requested that are queued or running.
pub(crate) async fn client_active_builds(
    c: &impl GenericClient,
    client: &str,
) -> Result<i64, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT count(*) FROM builds WHERE client = $1 AND status IN ('queued', 'running')",
        )
        .await?;
    Ok(c.query_one(&stmt, &[&client]).await?.try_get(0)?)
}

/// Inserts a new build's projection row and its first event (`requested`), unless the key
/// exists; returns the build's fair-queue rank if it was inserted. Concurrent inserts of
/// one key wait for each other and exactly one wins (`ON CONFLICT DO NOTHING`).
///
/// The rank (start-time fair queuing) is computed here, in the same statement: the queue's
/// lowest rank (its "virtual time"; 0 when empty), or one past the client's last queued
/// build if that is higher. Each client's first queued build thus ties with the head of the
/// queue, its second with the head's next rank, and so on: a client with 500 queued builds
/// delays another client's single build by at most one build per client. Builds without a
/// client get the queue's lowest rank. Two concurrent requests of one client may get the
/// same rank; that only orders them by age. The rank is written into the event too (the
/// projection stays a fold of the log). Both reads are index lookups (`builds_fair_claim`,
/// `builds_client_active`).
pub(crate) async fn insert_build(
    c: &impl GenericClient,
    state: &BuildState,
    event: &Event,
) -> Result<Option<i64>, StoreError> {
    let stmt = c
        .prepare_cached(
            "WITH r AS (
                SELECT GREATEST(
                    COALESCE((SELECT min(queue_rank) FROM builds WHERE status = 'queued'), 0),
                    COALESCE((SELECT max(queue_rank) + 1 FROM builds
                              WHERE client = $18 AND status = 'queued'), 0)) AS rank
            ), b AS (
                INSERT INTO builds (key, status, request, attempt, failures, owner,
                    lease_expires_at, available_at, current_step, last_error, artifact,
                    last_seq, created_at, updated_at, client, queue_rank)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $18, rank
                FROM r
                ON CONFLICT (key) DO NOTHING
                RETURNING key, queue_rank
            ), e AS (
                INSERT INTO build_events (build_key, seq, event_type, schema_version, payload,
                    recorded_at)
                SELECT key, $12, $15, $16,
                    CASE WHEN queue_rank = 0 THEN $17::jsonb
                         ELSE $17::jsonb || jsonb_build_object('rank', queue_rank) END,
                    $14
                FROM b
            )
            SELECT queue_rank FROM b",
        )
        .await?;
    let result = c
        .query_opt(
            &stmt,
            &[
                &state.key.as_str(),
                &state.status.as_str(),
                &Json(json(&state.request)),
                &to_i32(state.attempt, "attempt")?,
                &to_i32(state.failures, "failures")?,
                &state.owner,
                &state.lease_expires_at,
                &state.available_at,
                &state.current_step,
                &state.last_error.as_ref().map(|e| Json(json(e))),
                &state.artifact.as_ref().map(|a| Json(json(a))),
                &to_i32(state.last_seq, "seq")?,
                &state.created_at,
                &state.updated_at,
                &event.event_type().as_str(),
                &SCHEMA_VERSION,
                &Json(event.encode()),
                &state.client,
            ],
        )
        .await;
    match result {
        Ok(row) => Ok(row.map(|r| r.try_get(0)).transpose()?),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `event` as number `next.last_seq` and the projection row `next`, only if the
/// build is still at `expected_last_seq`. Returns `false` (and writes nothing) otherwise.
///
/// A concurrent writer that updated the row first holds its lock until commit; this
/// statement then re-checks `last_seq` against the committed row and matches nothing. The
/// unique `(build_key, seq)` constraint is the second line of defence.
pub(crate) async fn append_event(
    c: &impl GenericClient,
    expected_last_seq: u32,
    next: &BuildState,
    event: &Event,
) -> Result<bool, StoreError> {
    let stmt = c
        .prepare_cached(
            "WITH b AS (
                UPDATE builds SET status = $3, attempt = $4, failures = $5, owner = $6,
                    lease_expires_at = $7, available_at = $8, current_step = $9,
                    last_error = $10, artifact = $11, last_seq = $12, updated_at = $13,
                    built_by = $17, reproduction = $18, output_pruned = $19
                WHERE key = $1 AND last_seq = $2
                RETURNING key
            )
            INSERT INTO build_events (build_key, seq, event_type, schema_version, payload,
                recorded_at)
            SELECT key, $12, $14, $15, $16, $13 FROM b",
        )
        .await?;
    let result = c
        .execute(
            &stmt,
            &[
                &next.key.as_str(),
                &to_i32(expected_last_seq, "seq")?,
                &next.status.as_str(),
                &to_i32(next.attempt, "attempt")?,
                &to_i32(next.failures, "failures")?,
                &next.owner,
                &next.lease_expires_at,
                &next.available_at,
                &next.current_step,
                &next.last_error.as_ref().map(|e| Json(json(e))),
                &next.artifact.as_ref().map(|a| Json(json(a))),
                &to_i32(next.last_seq, "seq")?,
                &next.updated_at,
                &event.event_type().as_str(),
                &SCHEMA_VERSION,
                &Json(event.encode()),
                &next.built_by,
                &next.reproduction.as_ref().map(|r| Json(json(r))),
                &to_i32(next.output_pruned, "output_pruned")?,
            ],
        )
        .await;
    match result {
        Ok(n) => Ok(n == 1),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The claim: takes the available queued build of lowest rank, oldest first (skipping rows
/// other claimers hold; ranks make clients take turns, see [`queue_rank`]),
/// marks it running for `worker` with a new attempt and lease, and appends the `claimed`
/// event, all in one statement.
///
/// This statement is the one place where the fold of an event (`claimed`) is also written
/// in SQL, so that the claim needs no second round trip; `rebuild-projections` and the tests
/// check it against [`cbs_projections::apply`].
pub(crate) async fn claim(
    c: &impl GenericClient,
    worker: &str,
    lease: Duration,
) -> Result<Option<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "WITH next AS (
                SELECT key FROM builds
                WHERE status = 'queued' AND available_at <= now()
                ORDER BY queue_rank, available_at, key
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE builds b SET status = 'running', attempt = b.attempt + 1, owner = $1,
                    lease_expires_at = now() + make_interval(secs => $2),
                    current_step = NULL, last_seq = b.last_seq + 1, updated_at = now()
                FROM next WHERE b.key = next.key
                RETURNING b.*
            ), event AS (
                INSERT INTO build_events (build_key, seq, event_type, schema_version, payload,
                    recorded_at)
                SELECT key, last_seq, 'claimed', $3,
                    jsonb_build_object('worker', owner, 'attempt', attempt,
                        'lease_expires_at', lease_expires_at),
                    updated_at
                FROM claimed
            )
            SELECT {BUILD_COLUMNS} FROM claimed"
        ))
        .await?;
    let row = c
        .query_opt(&stmt, &[&worker, &lease.as_secs_f64(), &SCHEMA_VERSION])
        .await?;
    row.as_ref().map(build_from_row).transpose()
}

/// How many queued builds come before `key` in the claim's order (0: it is next); `None`
/// unless `key` is queued. Reads the queued builds' partial index only.
pub(crate) async fn queue_position(
    c: &impl GenericClient,
    key: &BuildKey,
) -> Result<Option<u32>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT count(q.key) AS ahead FROM builds b
             LEFT JOIN builds q ON q.status = 'queued'
                 AND (q.queue_rank, q.available_at, q.key) < (b.queue_rank, b.available_at, b.key)
             WHERE b.key = $1 AND b.status = 'queued'
             GROUP BY b.key",
        )
        .await?;
    let row = c.query_opt(&stmt, &[&key.as_str()]).await?;
    row.map(|r| {
        let ahead: i64 = r.try_get("ahead")?;
        Ok(u32::try_from(ahead).unwrap_or(u32::MAX))
    })
    .transpose()
}

/// The builds whose stored artifact has this SHA-256 (lower-case hex), newest first.
pub(crate) async fn builds_by_artifact(
    c: &impl GenericClient,
    sha256: &str,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE artifact IS NOT NULL AND artifact->>'sha256' = $1
             ORDER BY updated_at DESC LIMIT 10"
        ))
        .await?;
    let rows = c.query(&stmt, &[&sha256]).await?;
    rows.iter().map(build_from_row).collect()
}

/// The builds whose binary has this module-list hash (the same modules at the same
/// versions, whatever the platform), newest first.
pub(crate) async fn builds_by_modules(
    c: &impl GenericClient,
    modules_sha256: &str,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE artifact IS NOT NULL AND artifact->>'modules_sha256' = $1
             ORDER BY updated_at DESC LIMIT 20"
        ))
        .await?;
    let rows = c.query(&stmt, &[&modules_sha256]).await?;
    rows.iter().map(build_from_row).collect()
}

/// One build's projection row.
pub(crate) async fn get_build(
    c: &impl GenericClient,
    key: &BuildKey,
) -> Result<Option<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE key = $1"
        ))
        .await?;
    let row = c.query_opt(&stmt, &[&key.as_str()]).await?;
    row.as_ref().map(build_from_row).transpose()
}

/// One build's projection row, locked until the end of the transaction `c` is in, and the
/// database's clock: the time the event about to be appended happens at. Not before the
/// build's last change, so that a build's event times never go back (`now()` is when the
/// transaction began, which may be before a lock wait).
pub(crate) async fn lock_build_at(
    c: &impl GenericClient,
    key: &BuildKey,
) -> Result<Option<(BuildState, chrono::DateTime<chrono::Utc>)>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS}, now() AS db_now FROM builds WHERE key = $1 FOR UPDATE"
        ))
        .await?;
    let Some(row) = c.query_opt(&stmt, &[&key.as_str()]).await? else {
        return Ok(None);
    };
    let build = build_from_row(&row)?;
    let now: chrono::DateTime<chrono::Utc> = row.try_get("db_now")?;
    let now = now.max(build.updated_at);
    Ok(Some((build, now)))
}

/// The database's clock. Every time the store records comes from it, so that a process
/// whose clock is off (a worker's lease, an api's `available_at`) cannot make another
/// process's decisions wrong: claims and rescues compare with the same clock.
pub(crate) async fn db_now(
    c: &impl GenericClient,
) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    let stmt = c.prepare_cached("SELECT now() AS db_now").await?;
    Ok(c.query_one(&stmt, &[]).await?.try_get("db_now")?)
}

/// A build's events after `after`, in sequence order. Per-build reads need no snapshot
/// tricks: sequence numbers are gap-free and assigned under the build's row lock.
pub(crate) async fn build_events(
    c: &impl GenericClient,
    key: &BuildKey,
    after: u32,
    limit: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM build_events
             WHERE build_key = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .await?;
    let rows = c
        .query(
            &stmt,
            &[
                &key.as_str(),
                &i32::try_from(after).unwrap_or(i32::MAX),
                &i64::from(limit),
            ],
        )
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// The global log after `after` in `(tx_id, position)` order, only below the oldest
/// transaction still running: every event returned belongs to a finished transaction, and no
/// event can later appear before the last one returned. Empty `types` means all types.
pub(crate) async fn feed(
    c: &impl GenericClient,
    after: GlobalCursor,
    limit: u32,
    types: &[EventType],
    scan: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    // Only the next `scan` events of the log are looked at (the index gives them in order).
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM (
                 SELECT * FROM build_events
                 WHERE (tx_id, position) > ($1::text::xid8, $2)
                   AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY tx_id, position
                 LIMIT $5
             ) w
             WHERE cardinality($3::text[]) = 0 OR event_type = ANY($3)
             ORDER BY tx_id, position
             LIMIT $4"
        ))
        .await?;
    let types: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
    let rows = c
        .query(
            &stmt,
            &[
                &after.tx_id.to_string(),
                &after.position,
                &types,
                &i64::from(limit),
                &scan,
            ],
        )
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// The last `limit` events of the global log below the oldest running transaction (of
/// `types`, among the last `scan` events), oldest first, and the cursor of the last visible
/// event: a feed read from there on misses nothing.
pub(crate) async fn feed_tail(
    c: &impl GenericClient,
    limit: u32,
    types: &[EventType],
    scan: i64,
) -> Result<(Vec<RecordedEvent>, Option<GlobalCursor>), StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM (
                 SELECT * FROM (
                     SELECT * FROM build_events
                     WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
                     ORDER BY tx_id DESC, position DESC
                     LIMIT $3
                 ) w
                 WHERE cardinality($1::text[]) = 0 OR event_type = ANY($1)
                 ORDER BY tx_id DESC, position DESC
                 LIMIT $2
             ) t
             ORDER BY tx_id, position"
        ))
        .await?;
    let type_names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
    let rows = c
        .query(&stmt, &[&type_names, &i64::from(limit), &scan])
        .await?;
    let events: Vec<RecordedEvent> = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
    // The end of the visible log (a filtered tail may end before it).
    let end = feed_scan_end_desc(c).await?;
    Ok((events, end))
}

/// The cursor of the last event below the oldest running transaction, if any.
async fn feed_scan_end_desc(c: &impl GenericClient) -> Result<Option<GlobalCursor>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT tx_id::text AS tx_id, position FROM build_events
             WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY tx_id DESC, position DESC
             LIMIT 1",
        )
        .await?;
    let row = c.query_opt(&stmt, &[]).await?;
    row.map(|r| cursor_from_row(&r)).transpose()
}

/// The cursor of the last of the next `scan` visible events after `after`, if any.
pub(crate) async fn feed_scan_end(
    c: &impl GenericClient,
    after: GlobalCursor,
    scan: i64,
) -> Result<Option<GlobalCursor>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT tx_id::text AS tx_id, position FROM (
                 SELECT tx_id, position FROM build_events
                 WHERE (tx_id, position) > ($1::text::xid8, $2)
                   AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY tx_id, position
                 LIMIT $3
             ) w
             ORDER BY tx_id DESC, position DESC
             LIMIT 1",
        )
        .await?;
    let row = c
        .query_opt(&stmt, &[&after.tx_id.to_string(), &after.position, &scan])
        .await?;
    row.map(|r| cursor_from_row(&r)).transpose()
}

/// A `(tx_id as text, position)` row as a cursor.
fn cursor_from_row(r: &tokio_postgres::Row) -> Result<GlobalCursor, StoreError> {
    let tx: String = r.try_get("tx_id")?;
    let position: i64 = r.try_get("position")?;
    Ok(GlobalCursor {
        tx_id: tx
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("tx_id {tx}")))?,
        position,
    })
}

/// One entry of the log's tail as the listener needs it.
#[derive(Debug, Clone)]
pub(crate) struct TailEntry {
    pub cursor: GlobalCursor,
    pub key: String,
    pub seq: u32,
    pub event_type: String,
}

/// The cursor before which every event is already visible now: where a new listener starts.
pub(crate) async fn tail_start(c: &Client) -> Result<GlobalCursor, StoreError> {
    let row = c
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await?;
    let xmin: String = row.try_get(0)?;
    let xmin: u64 = xmin
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("snapshot xmin {xmin:?}")))?;
    Ok(GlobalCursor {
        tx_id: xmin.saturating_sub(1),
        position: i64::MAX,
    })
}

/// Like [`feed`], but only what the listener dispatches, on its own connection.
pub(crate) async fn tail(
    c: &Client,
    after: GlobalCursor,
    limit: u32,
) -> Result<Vec<TailEntry>, StoreError> {
    let rows = c
        .query(
            "SELECT tx_id::text AS tx_id, position, build_key, seq, event_type FROM build_events
             WHERE (tx_id, position) > ($1::text::xid8, $2)
               AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY tx_id, position
             LIMIT $3",
            &[&after.tx_id.to_string(), &after.position, &i64::from(limit)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let tx: String = r.try_get("tx_id")?;
            Ok(TailEntry {
                cursor: GlobalCursor {
                    tx_id: tx
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("tx_id {tx:?}")))?,
                    position: r.try_get("position")?,
                },
                key: r.try_get("build_key")?,
                seq: to_u32(r.try_get("seq")?, "seq")?,
                event_type: r.try_get("event_type")?,
            })
        })
        .collect()
}

/// Subscribes the listening connection to the channel.
pub(crate) async fn listen(c: &Client) -> Result<(), StoreError> {
    c.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(())
}

/// Session settings of the notifying connection: its transactions write no data, so they
/// need not wait for a WAL flush (see `notify`).
pub(crate) const NOTIFIER_SETUP: &str = "SET synchronous_commit = off";

/// Names a special connection `<application name> <role>` (`caddy-build-server listener`),
/// so operators and benchmarks can tell the connections apart.
pub(crate) async fn name_connection(c: &Client, base: &str, role: &str) -> Result<(), StoreError> {
    c.execute(
        "SELECT set_config('application_name', $1, false)",
        &[&format!("{base} {role}")],
    )
    .await?;
    Ok(())
}

/// Prepares [`notify`]'s statement on the notifier's connection.
pub(crate) async fn prepare_notify(c: &Client) -> Result<tokio_postgres::Statement, StoreError> {
    Ok(c.prepare("SELECT pg_notify($1, $2)").await?)
}

/// Sends one notification (a batch of `key:seq` entries) in its own transaction.
pub(crate) async fn notify(
    c: &Client,
    stmt: &tokio_postgres::Statement,
    payload: &str,
) -> Result<(), StoreError> {
    c.execute(stmt, &[&CHANNEL, &payload]).await?;
    Ok(())
}

/// A page of projection rows with keys after `after`, in key order (for the rebuild).
pub(crate) async fn builds_page(
    c: &tokio_postgres::Transaction<'_>,
    after: &str,
    limit: u32,
) -> Result<Vec<BuildState>, StoreError> {
    let rows = c
        .query(
            &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE key > $1 ORDER BY key LIMIT $2"),
            &[&after, &i64::from(limit)],
        )
        .await?;
    rows.iter().map(build_from_row).collect()
}

/// Every event of the given builds, by build and sequence (for the rebuild).
pub(crate) async fn events_of_builds(
    c: &tokio_postgres::Transaction<'_>,
    keys: &[&str],
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = c
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM build_events WHERE build_key = ANY($1)
                 ORDER BY build_key, seq"
            ),
            &[&keys],
        )
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// Keys that have events but no projection row (for the rebuild).
pub(crate) async fn keys_without_projection(
    c: &tokio_postgres::Transaction<'_>,
) -> Result<Vec<String>, StoreError> {
    let rows = c
        .query(
            "SELECT DISTINCT e.build_key FROM build_events e
             WHERE NOT EXISTS (SELECT 1 FROM builds b WHERE b.key = e.build_key)
             ORDER BY 1",
            &[],
        )
        .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Replaces (or inserts) a projection row with a recomputed one.
pub(crate) async fn overwrite_build(
    c: &tokio_postgres::Transaction<'_>,
    s: &BuildState,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO builds (key, status, request, attempt, failures, owner, lease_expires_at,
            available_at, current_step, last_error, artifact, last_seq, created_at, updated_at,
            client, queue_rank, built_by, reproduction, output_pruned)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            $18, $19)
         ON CONFLICT (key) DO UPDATE SET status = EXCLUDED.status, request = EXCLUDED.request,
            attempt = EXCLUDED.attempt, failures = EXCLUDED.failures, owner = EXCLUDED.owner,
            lease_expires_at = EXCLUDED.lease_expires_at, available_at = EXCLUDED.available_at,
            current_step = EXCLUDED.current_step, last_error = EXCLUDED.last_error,
            artifact = EXCLUDED.artifact, last_seq = EXCLUDED.last_seq,
            created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
            client = EXCLUDED.client, queue_rank = EXCLUDED.queue_rank,
            built_by = EXCLUDED.built_by, reproduction = EXCLUDED.reproduction,
            output_pruned = EXCLUDED.output_pruned",
        &[
            &s.key.as_str(),
            &s.status.as_str(),
            &Json(json(&s.request)),
            &to_i32(s.attempt, "attempt")?,
            &to_i32(s.failures, "failures")?,
            &s.owner,
            &s.lease_expires_at,
            &s.available_at,
            &s.current_step,
            &s.last_error.as_ref().map(|e| Json(json(e))),
            &s.artifact.as_ref().map(|a| Json(json(a))),
            &to_i32(s.last_seq, "seq")?,
            &s.created_at,
            &s.updated_at,
            &s.client,
            &s.queue_rank,
            &s.built_by,
            &s.reproduction.as_ref().map(|r| Json(json(r))),
            &to_i32(s.output_pruned, "output_pruned")?,
        ],
    )
    .await?;
    Ok(())
}

/// Removes a projection row that has no events behind it.
pub(crate) async fn delete_build(
    c: &tokio_postgres::Transaction<'_>,
    key: &str,
) -> Result<(), StoreError> {
    c.execute("DELETE FROM builds WHERE key = $1", &[&key])
        .await?;
    Ok(())
}

/// Takes the lock that serializes migrations across processes (held until released or the
/// session ends).
pub(crate) async fn lock_migrations(c: &Client) -> Result<(), StoreError> {
    c.execute(
        "SELECT pg_advisory_lock(hashtext('caddy-build-server migrations'))",
        &[],
    )
    .await?;
    Ok(())
}

/// Releases [`lock_migrations`].
pub(crate) async fn unlock_migrations(c: &Client) -> Result<(), StoreError> {
    c.execute(
        "SELECT pg_advisory_unlock(hashtext('caddy-build-server migrations'))",
        &[],
    )
    .await?;
    Ok(())
}

/// The newest applied migration version, `None` before the first migration.
pub(crate) async fn applied_migration(c: &Client) -> Result<Option<i32>, StoreError> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let row = c
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await?;
    Ok(row.try_get(0)?)
}

/// How many builds were requested with each plugin module (the catalog's counts).
pub(crate) async fn plugin_counts(
    c: &impl GenericClient,
) -> Result<Vec<(String, i64)>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT p->>'module', count(*) FROM build_events,
                 jsonb_array_elements(payload->'request'->'plugins') p
             WHERE event_type = 'requested' GROUP BY 1",
        )
        .await?;
    let rows = c.query(&stmt, &[]).await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Running builds whose lease ended before now, oldest expiry first.
pub(crate) async fn expired_leases(
    c: &impl GenericClient,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE status = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at LIMIT $1"
        ))
        .await?;
    let rows = c.query(&stmt, &[&limit]).await?;
    rows.iter().map(build_from_row).collect()
}

/// The earliest lease expiry of any running build.
pub(crate) async fn next_lease_expiry(
    c: &impl GenericClient,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT min(lease_expires_at) FROM builds WHERE status = 'running'")
        .await?;
    Ok(c.query_one(&stmt, &[]).await?.try_get(0)?)
}

/// The oldest queued reproduction that `worker` may take (it did not build the artifact),
/// locked for the caller's transaction; other claimers skip it.
pub(crate) async fn lock_next_reproduction(
    c: &impl GenericClient,
    worker: &str,
) -> Result<Option<(BuildState, chrono::DateTime<chrono::Utc>)>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS}, now() AS now FROM builds
             WHERE (reproduction->>'status') = 'queued' AND status = 'succeeded'
               AND built_by IS DISTINCT FROM $1
             ORDER BY (reproduction->>'requested_at'), key
             LIMIT 1
             FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let row = c.query_opt(&stmt, &[&worker]).await?;
    row.map(|r| Ok((build_from_row(&r)?, r.try_get("now")?)))
        .transpose()
}

/// Running reproductions (a handful: at most one per worker and build slot).
pub(crate) async fn running_reproductions(
    c: &impl GenericClient,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE (reproduction->>'status') = 'running'
             ORDER BY key LIMIT $1"
        ))
        .await?;
    let rows = c.query(&stmt, &[&limit]).await?;
    rows.iter().map(build_from_row).collect()
}

/// Builds that failed retryably and wait for the janitor's decision (retry or give up).
pub(crate) async fn retryable_failures(
    c: &impl GenericClient,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE status = 'failed' AND (last_error->>'kind') = 'retryable'
             ORDER BY updated_at LIMIT $1"
        ))
        .await?;
    let rows = c.query(&stmt, &[&limit]).await?;
    rows.iter().map(build_from_row).collect()
}

/// Takes the session-level advisory lock `id` if nobody holds it.
pub(crate) async fn try_advisory_lock(c: &Client, id: i64) -> Result<bool, StoreError> {
    Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&id])
        .await?
        .try_get(0)?)
}

/// Keys of the builds `owner` runs now.
pub(crate) async fn running_builds_of(
    c: &impl GenericClient,
    owner: &str,
) -> Result<Vec<String>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT key FROM builds WHERE status = 'running' AND owner = $1
             UNION ALL
             SELECT key FROM builds
             WHERE (reproduction->>'status') = 'running' AND reproduction->>'worker' = $1",
        )
        .await?;
    let rows = c.query(&stmt, &[&owner]).await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Queued and running builds: running ones first (by lease end), then the queue in the
/// order workers take it, at most `limit`.
pub(crate) async fn active_builds(
    c: &impl GenericClient,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE status IN ('queued', 'running')
             ORDER BY status = 'queued', queue_rank, available_at, key
             LIMIT $1"
        ))
        .await?;
    let rows = c.query(&stmt, &[&limit]).await?;
    rows.iter().map(build_from_row).collect()
}

/// Records a download of `key` now.
pub(crate) async fn record_download(c: &impl GenericClient, key: &str) -> Result<(), StoreError> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO artifact_downloads (build_key, last_download_at) VALUES ($1, now())
             ON CONFLICT (build_key) DO UPDATE SET last_download_at = now()",
        )
        .await?;
    c.execute(&stmt, &[&key]).await?;
    Ok(())
}

/// Succeeded builds neither built nor downloaded since `cutoff`, oldest first.
pub(crate) async fn stale_artifacts(
    c: &impl GenericClient,
    cutoff: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let cols = BUILD_COLUMNS
        .split(',')
        .map(|c| format!("b.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {cols} FROM builds b
             WHERE b.status = 'succeeded' AND b.updated_at < $1
               AND NOT EXISTS (SELECT 1 FROM artifact_downloads d
                               WHERE d.build_key = b.key AND d.last_download_at >= $1)
             ORDER BY b.updated_at LIMIT $2"
        ))
        .await?;
    let rows = c.query(&stmt, &[&cutoff, &limit]).await?;
    rows.iter().map(build_from_row).collect()
}

/// This deployment's id: the random id the migrations made, with the database's name (a
/// database cloned or restored under another name is another deployment).
pub(crate) async fn deployment_id(c: &impl GenericClient) -> Result<String, StoreError> {
    Ok(c.query_one(
        "SELECT left(md5(id || '/' || current_database()), 16) FROM deployment",
        &[],
    )
    .await?
    .try_get(0)?)
}

/// When the next queued build becomes claimable (a retry's backoff ends), if any waits.
pub(crate) async fn next_available(
    c: &impl GenericClient,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT min(available_at) FROM builds WHERE status = 'queued'")
        .await?;
    Ok(c.query_one(&stmt, &[]).await?.try_get(0)?)
}

/// The queue as the metrics show it: builds queued, builds running, and how long the
/// longest-waiting claimable build has waited (seconds, by the database's clock). Reads the
/// two partial indexes, which hold only the queue: the cost follows the queue's length,
/// not the table's.
pub(crate) async fn queue_stats(c: &impl GenericClient) -> Result<QueueStats, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT (SELECT count(*) FROM builds WHERE status = 'queued') AS queued,
                    (SELECT count(*) FROM builds WHERE status = 'running') AS running,
                    (SELECT extract(epoch FROM now() - min(available_at))::float8
                       FROM builds WHERE status = 'queued' AND available_at <= now()) AS oldest",
        )
        .await?;
    let row = c.query_one(&stmt, &[]).await?;
    Ok(QueueStats {
        queued: row.try_get("queued")?,
        running: row.try_get("running")?,
        oldest_wait_seconds: row.try_get("oldest")?,
    })
}

/// See [`queue_stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    pub queued: i64,
    pub running: i64,
    /// `None` when nothing is claimable now.
    pub oldest_wait_seconds: Option<f64>,
}

/// Where the janitor's duty `name` has read the global log to (`0-0` before its first read).
pub(crate) async fn janitor_cursor(
    c: &impl GenericClient,
    name: &str,
) -> Result<Option<String>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT cursor FROM janitor_cursors WHERE name = $1")
        .await?;
    let row = c.query_opt(&stmt, &[&name]).await?;
    Ok(match row {
        Some(r) => Some(r.try_get("cursor")?),
        None => None,
    })
}

/// Records how far the janitor's duty `name` has read the global log.
pub(crate) async fn set_janitor_cursor(
    c: &impl GenericClient,
    name: &str,
    cursor: &str,
) -> Result<(), StoreError> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO janitor_cursors (name, cursor) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET cursor = $2",
        )
        .await?;
    c.execute(&stmt, &[&name, &cursor]).await?;
    Ok(())
}

/// Columns of a `build_output` row; [`chunk_from_row`] reads them by name.
const CHUNK_COLUMNS: &str = "attempt, seq, after_seq, step, body, truncated, recorded_at";

/// Reads a `build_output` row selected with [`CHUNK_COLUMNS`].
fn chunk_from_row(row: &Row) -> Result<crate::OutputChunk, StoreError> {
    let body: String = row.try_get("body")?;
    Ok(crate::OutputChunk {
        attempt: to_u32(row.try_get("attempt")?, "build_output.attempt")?,
        seq: to_u32(row.try_get("seq")?, "build_output.seq")?,
        after_seq: to_u32(row.try_get("after_seq")?, "build_output.after_seq")?,
        step: row.try_get("step")?,
        lines: body.split('\n').map(str::to_owned).collect(),
        truncated: row.try_get("truncated")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// Appends a chunk of output to `attempt` of a build, only while that attempt runs: the
/// build's row is share-locked (no event can commit meanwhile) and the chunk is placed after
/// the build's last event. Returns the chunk's `(seq, after_seq)`, or `None` when the
/// attempt is not running (its lease was taken away, or it ended).
pub(crate) async fn append_output(
    c: &impl GenericClient,
    key: &BuildKey,
    attempt: u32,
    step: &str,
    lines: &[String],
    truncated: bool,
) -> Result<Option<(u32, u32)>, StoreError> {
    let stmt = c
        .prepare_cached(
            "WITH b AS (
                SELECT key, last_seq FROM builds
                WHERE key = $1 AND status = 'running' AND attempt = $2
                FOR SHARE
            )
            INSERT INTO build_output (build_key, attempt, seq, after_seq, step, body, lines,
                truncated)
            SELECT b.key, $2,
                COALESCE((SELECT max(seq) FROM build_output
                          WHERE build_key = $1 AND attempt = $2), 0) + 1,
                b.last_seq, $3, $4, $5, $6
            FROM b
            RETURNING seq, after_seq",
        )
        .await?;
    let body = lines.join("\n");
    let count = i32::try_from(lines.len()).unwrap_or(i32::MAX);
    let row = c
        .query_opt(
            &stmt,
            &[
                &key.as_str(),
                &to_i32(attempt, "attempt")?,
                &step,
                &body,
                &count,
                &truncated,
            ],
        )
        .await?;
    row.map(|r| {
        Ok((
            to_u32(r.try_get(0)?, "build_output.seq")?,
            to_u32(r.try_get(1)?, "build_output.after_seq")?,
        ))
    })
    .transpose()
}

/// A build's output chunks from place `(after_seq, seq) >= from` up to chunks placed after
/// event `upto`, in order, at most `limit`. `min_chunk` (attempt, seq) starts the index
/// range where the caller knows it is.
pub(crate) async fn build_output(
    c: &impl GenericClient,
    key: &BuildKey,
    from: (u32, u32),
    min_chunk: (u32, u32),
    upto: u32,
    limit: u32,
) -> Result<Vec<crate::OutputChunk>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {CHUNK_COLUMNS} FROM build_output
             WHERE build_key = $1 AND (attempt, seq) >= ($2, $7)
               AND (after_seq, seq) >= ($3, $4) AND after_seq <= $5
             ORDER BY attempt, seq LIMIT $6"
        ))
        .await?;
    let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let rows = c
        .query(
            &stmt,
            &[
                &key.as_str(),
                &clamp(min_chunk.0),
                &clamp(from.0),
                &clamp(from.1),
                &clamp(upto),
                &i64::from(limit),
                &clamp(min_chunk.1),
            ],
        )
        .await?;
    rows.iter().map(chunk_from_row).collect()
}

/// A build's output chunks after `(attempt, seq)` in order, at most `limit` (the output
/// endpoint's pages).
pub(crate) async fn output_page(
    c: &impl GenericClient,
    key: &BuildKey,
    after: (u32, u32),
    limit: u32,
) -> Result<Vec<crate::OutputChunk>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {CHUNK_COLUMNS} FROM build_output
             WHERE build_key = $1 AND (attempt, seq) > ($2, $3)
             ORDER BY attempt, seq LIMIT $4"
        ))
        .await?;
    let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let rows = c
        .query(
            &stmt,
            &[
                &key.as_str(),
                &clamp(after.0),
                &clamp(after.1),
                &i64::from(limit),
            ],
        )
        .await?;
    rows.iter().map(chunk_from_row).collect()
}

/// Removes the output of attempts `1..=attempts` of a build; returns chunks and bytes.
pub(crate) async fn delete_output(
    c: &impl GenericClient,
    key: &BuildKey,
    attempts: u32,
) -> Result<(u64, u64), StoreError> {
    let row = c
        .query_one(
            "WITH d AS (DELETE FROM build_output WHERE build_key = $1 AND attempt <= $2
                        RETURNING octet_length(body) AS bytes)
             SELECT count(*), COALESCE(sum(bytes), 0)::bigint FROM d",
            &[&key.as_str(), &to_i32(attempts, "attempt")?],
        )
        .await?;
    let n: i64 = row.try_get(0)?;
    let bytes: i64 = row.try_get(1)?;
    Ok((
        u64::try_from(n).unwrap_or(0),
        u64::try_from(bytes).unwrap_or(0),
    ))
}

/// Finished builds of `status` whose output is still kept and which have not changed since
/// `cutoff`, oldest first (the `builds_output_kept` index, keyed by status: only such
/// builds are in it, so the scan reads due builds only).
pub(crate) async fn output_to_prune(
    c: &impl GenericClient,
    status: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<BuildState>, StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE output_pruned < attempt
               AND status IN ('succeeded', 'expired', 'failed', 'gave_up', 'cancelled')
               AND status = $1 AND updated_at < $2
             ORDER BY updated_at LIMIT $3"
        ))
        .await?;
    let rows = c.query(&stmt, &[&status, &cutoff, &limit]).await?;
    rows.iter().map(build_from_row).collect()
}
