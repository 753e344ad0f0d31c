//! The build store: the only crate that speaks SQL.
//!
//! - [`Store`] appends events and updates the `builds` projection in the same statement,
//!   claims builds with `FOR UPDATE SKIP LOCKED`, and reads builds, histories and the global
//!   feed. Every write is a single autocommit statement, so a build cycle costs one commit
//!   (one WAL flush) per event and no more.
//! - After each commit the store hands `(key, seq)` to the [`notify`] sender, which NOTIFYs
//!   on a separate connection (see there why).
//! - [`Hub`] is the process's one listening connection and its in-process fan-out.
//! - [`migrate`] applies the embedded migrations under an advisory lock.
//!
//! All statements live in [`queries`], one documented function each.

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
pub use bench::BenchChunk;
mod connect;
mod error;
mod hub;
pub mod migrate;
pub mod notify;
mod queries;
mod rebuild;
mod tls;

use std::time::Duration;

use cbs_domain::{BuildKey, BuildRequest};
use cbs_events::{Event, GlobalCursor, RecordedEvent, Requested};
use cbs_projections::{apply, BuildState};
use chrono::Utc;

pub use connect::PgConnector;
pub use error::StoreError;
pub use hub::{BuildWaiter, Hub, QueueWaiter};
pub use queries::QueueStats;
pub use rebuild::{Difference, RebuildReport};

/// A chunk of a build's output (the `build_output` table): lines one step of one attempt
/// printed, placed after the build's event `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub attempt: u32,
    /// 1, 2, 3, ... within the attempt.
    pub seq: u32,
    /// The build's last event when the chunk was written.
    pub after_seq: u32,
    pub step: String,
    pub lines: Vec<String>,
    /// The marker that ends the attempt's output at the cap.
    pub truncated: bool,
    pub recorded_at: chrono::DateTime<Utc>,
}

/// The result of asking for a build.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    pub build: BuildState,
    /// `true` if this call created the build, `false` if it existed already.
    pub created: bool,
}

/// Handle to the build store; cheap to clone, share one per process.
#[derive(Clone, Debug)]
pub struct Store {
    pool: deadpool_postgres::Pool,
    notifier: notify::Notifier,
    connector: PgConnector,
}

/// Events of the log a filtered feed request looks at, at most.
pub const FEED_SCAN: i64 = 10_000;

impl Store {
    /// A store for the configured database. Connections are made when first needed.
    pub fn new(config: &cbs_config::DatabaseConfig) -> Result<Store, StoreError> {
        let connector = PgConnector::new(config)?;
        let pool = connector.pool(config.pool_size)?;
        let notifier = notify::Notifier::start(connector.clone());
        Ok(Store {
            pool,
            notifier,
            connector,
        })
    }

    /// How to open more connections to the same database (the listener, migrations).
    pub fn connector(&self) -> &PgConnector {
        &self.connector
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Records a request for a build unless one with this key exists (concurrent identical
    /// requests create exactly one build).
    pub async fn request_build(
        &self,
        key: &BuildKey,
        request: &BuildRequest,
    ) -> Result<RequestOutcome, StoreError> {
        self.request_build_for(key, request, None).await
    }

    /// [`Store::request_build`] on behalf of `requester` (the api's client id): the build
    /// records who asked and gets its rank in the fair queue.
    pub async fn request_build_for(
        &self,
        key: &BuildKey,
        request: &BuildRequest,
        requester: Option<&str>,
    ) -> Result<RequestOutcome, StoreError> {
        let event = Event::Requested(Requested {
            request: request.clone(),
            client: requester.map(str::to_owned),
            rank: 0,
        });
        let client = self.client().await?;
        let mut state = apply(None, key, 1, queries::db_now(&client).await?, &event)?;
        // The rank is computed by the insert itself (and written into the event).
        if let Some(rank) = queries::insert_build(&client, &state, &event).await? {
            state.queue_rank = rank;
            self.notifier.note(key, 1, true);
            return Ok(RequestOutcome {
                build: state,
                created: true,
            });
        }
        let build = queries::get_build(&client, key)
            .await?
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        Ok(RequestOutcome {
            build,
            created: false,
        })
    }

    /// Appends `event` to a build whose current state the caller holds as `prev`.
    ///
    /// The event is folded into `prev` first (the fold refuses events that do not fit, e.g.
    /// from a fenced attempt); then the event and the new projection row are written in one
    /// statement that succeeds only if the build is still at `prev.last_seq`. A concurrent
    /// writer therefore gets [`StoreError::Conflict`], never a duplicate or a gap.
    pub async fn append(&self, prev: &BuildState, event: Event) -> Result<BuildState, StoreError> {
        let seq = prev.last_seq + 1;
        let client = self.client().await?;
        let time = queries::db_now(&client).await?.max(prev.updated_at);
        let next = apply(Some(prev), &prev.key, seq, time, &event)?;
        if !queries::append_event(&client, prev.last_seq, &next, &event).await? {
            return Err(StoreError::Conflict {
                key: prev.key.clone(),
                expected_seq: seq,
            });
        }
        self.notifier
            .note(&next.key, seq, event.event_type().makes_claimable());
        Ok(next)
    }

    /// Appends `event` to the build's latest state: locks the build's row, folds, writes,
    /// commits. For writers that do not hold the current state, or that compete for a build
    /// (workers, the janitor, cancellation). Events of one attempt carry its number, so the
    /// fold refuses them with [`cbs_projections::FoldError::Fenced`] once the lease was taken
    /// away, whatever happened in between.
    pub async fn append_latest(
        &self,
        key: &BuildKey,
        event: Event,
    ) -> Result<BuildState, StoreError> {
        self.append_latest_with(key, |_| event).await
    }

    /// Renews the lease of `attempt` until `lease` from now by the database's clock (a
    /// worker's own clock may be off: the janitor's rescue compares with the database's).
    pub async fn renew_lease(
        &self,
        key: &BuildKey,
        attempt: u32,
        lease: Duration,
    ) -> Result<BuildState, StoreError> {
        self.append_latest_with(key, |now| {
            Event::LeaseRenewed(cbs_events::LeaseRenewed {
                attempt,
                lease_expires_at: now + chrono::Duration::from_std(lease).unwrap_or_default(),
            })
        })
        .await
    }

    /// [`Store::append_latest`] of the event `make` gives for the database's time.
    async fn append_latest_with(
        &self,
        key: &BuildKey,
        make: impl FnOnce(chrono::DateTime<Utc>) -> Event,
    ) -> Result<BuildState, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (prev, time) = queries::lock_build_at(&tx, key)
            .await?
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        let event = make(time);
        let seq = prev.last_seq + 1;
        // On a refusal the transaction is dropped, which rolls it back.
        let next = apply(Some(&prev), key, seq, time, &event)?;
        if !queries::append_event(&tx, prev.last_seq, &next, &event).await? {
            return Err(StoreError::Corrupt(format!(
                "build {key}: event {seq} exists although the row was locked at {}",
                prev.last_seq
            )));
        }
        tx.commit().await?;
        self.notifier
            .note(key, seq, event.event_type().makes_claimable());
        Ok(next)
    }

    /// Claims the next available queued build for `worker` (the fair queue's lowest rank,
    /// then the oldest), in one statement that also appends the `claimed` event. `None` when nothing is available.
    pub async fn claim(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<BuildState>, StoreError> {
        let client = self.client().await?;
        let claimed = queries::claim(&client, worker, lease).await?;
        if let Some(b) = &claimed {
            self.notifier.note(&b.key, b.last_seq, false);
        }
        Ok(claimed)
    }

    /// Claims the oldest queued reproduction of an artifact that `worker` did not build, for
    /// `lease` (the janitor gives it to another worker after that): locks the row (skipping
    /// rows other claimers hold), folds and appends `reproduction_claimed`, commits. `None`
    /// when there is none for this worker.
    pub async fn claim_reproduction(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<BuildState>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some((prev, now)) = queries::lock_next_reproduction(&tx, worker).await? else {
            return Ok(None);
        };
        let now = now.max(prev.updated_at);
        let event = Event::ReproductionClaimed(cbs_events::ReproductionClaimed {
            reproduction: prev.reproduction.as_ref().map_or(0, |r| r.reproduction) + 1,
            worker: worker.to_owned(),
            lease_expires_at: now + chrono::Duration::from_std(lease).unwrap_or_default(),
        });
        let seq = prev.last_seq + 1;
        let next = apply(Some(&prev), &prev.key, seq, now, &event)?;
        if !queries::append_event(&tx, prev.last_seq, &next, &event).await? {
            return Err(StoreError::Corrupt(format!(
                "build {}: event {seq} exists although the row was locked at {}",
                prev.key, prev.last_seq
            )));
        }
        tx.commit().await?;
        self.notifier.note(&next.key, seq, false);
        Ok(Some(next))
    }

    /// Reproductions a worker runs now (the janitor's rescue of expired ones).
    pub async fn running_reproductions(&self, limit: i64) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::running_reproductions(&client, limit).await
    }

    /// The current state of one build.
    pub async fn build(&self, key: &BuildKey) -> Result<Option<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::get_build(&client, key).await
    }

    /// The builds whose binary has this SHA-256 (lower-case hex), newest first (at most 10).
    pub async fn builds_by_artifact(&self, sha256: &str) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::builds_by_artifact(&client, sha256).await
    }

    /// The builds whose binary links the same modules at the same versions (its module-list
    /// hash, lower-case hex), newest first (at most 20; every platform).
    pub async fn builds_by_modules(
        &self,
        modules_sha256: &str,
    ) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::builds_by_modules(&client, modules_sha256).await
    }

    /// How many queued builds a worker takes before `key` (0: next); `None` unless queued.
    pub async fn queue_position(&self, key: &BuildKey) -> Result<Option<u32>, StoreError> {
        let client = self.client().await?;
        queries::queue_position(&client, key).await
    }

    /// Appends a chunk of output of `attempt`, which must be running (else
    /// [`StoreError::OutputFenced`]); returns the chunk's `(seq, after_seq)`.
    pub async fn append_output(
        &self,
        key: &BuildKey,
        attempt: u32,
        step: &str,
        lines: &[String],
        truncated: bool,
    ) -> Result<(u32, u32), StoreError> {
        let client = self.client().await?;
        let placed = queries::append_output(&client, key, attempt, step, lines, truncated)
            .await?
            .ok_or_else(|| StoreError::OutputFenced {
                key: key.clone(),
                attempt,
            })?;
        self.notifier.note_output(key, placed.1);
        Ok(placed)
    }

    /// A build's events after `after_event` and the output chunks among them, read in one
    /// snapshot: at most `limit` events, and the chunks placed from `chunks_from` (a place
    /// `(after_seq, seq)`, inclusive) up to the last event returned (or `after_event` when
    /// none), at most `limit`. A chunk placed after an event not yet returned waits for the
    /// next read. `min_chunk` (attempt, seq), inclusive, narrows the chunk scan to where the
    /// caller knows it is (the chunk after the last one it got), so that a read costs the
    /// chunks it returns, not every chunk of the attempt before them; `(0, 0)` when unknown.
    pub async fn timeline(
        &self,
        key: &BuildKey,
        after_event: u32,
        chunks_from: (u32, u32),
        min_chunk: (u32, u32),
        limit: u32,
    ) -> Result<(Vec<RecordedEvent>, Vec<OutputChunk>), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let events = queries::build_events(&tx, key, after_event, limit).await?;
        let upto = events.last().map_or(after_event, |e| e.seq);
        let chunks = queries::build_output(&tx, key, chunks_from, min_chunk, upto, limit).await?;
        tx.commit().await?;
        Ok((events, chunks))
    }

    /// A build's output chunks after `(attempt, seq)`, in order, at most `limit`.
    pub async fn output(
        &self,
        key: &BuildKey,
        after: (u32, u32),
        limit: u32,
    ) -> Result<Vec<OutputChunk>, StoreError> {
        let client = self.client().await?;
        queries::output_page(&client, key, after, limit).await
    }

    /// Finished builds of `status` whose output is kept and which did not change since
    /// `cutoff`, oldest first, at most `limit`.
    pub async fn output_to_prune(
        &self,
        status: &str,
        cutoff: chrono::DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::output_to_prune(&client, status, cutoff, limit).await
    }

    /// Removes the output of every ended attempt of the build `prev` describes and appends
    /// the `output_pruned` event that says so, in one transaction: both happen or neither.
    /// [`StoreError::Conflict`] if the build changed since `prev` was read.
    pub async fn prune_output(
        &self,
        prev: &BuildState,
        reason: &str,
    ) -> Result<(BuildState, cbs_events::OutputPruned), StoreError> {
        let attempts = if prev.status == cbs_projections::Status::Running {
            prev.attempt.saturating_sub(1)
        } else {
            prev.attempt
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (chunks, bytes) = queries::delete_output(&tx, &prev.key, attempts).await?;
        let pruned = cbs_events::OutputPruned {
            attempts,
            chunks,
            bytes,
            reason: reason.to_owned(),
        };
        let event = Event::OutputPruned(pruned.clone());
        let seq = prev.last_seq + 1;
        let time = queries::db_now(&tx).await?.max(prev.updated_at);
        let next = apply(Some(prev), &prev.key, seq, time, &event)?;
        if !queries::append_event(&tx, prev.last_seq, &next, &event).await? {
            // Dropping the transaction rolls the deletion back.
            return Err(StoreError::Conflict {
                key: prev.key.clone(),
                expected_seq: seq,
            });
        }
        tx.commit().await?;
        self.notifier.note(&prev.key, seq, false);
        Ok((next, pruned))
    }

    /// A build's events with `seq > after`, oldest first, at most `limit`.
    pub async fn events(
        &self,
        key: &BuildKey,
        after: u32,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.client().await?;
        queries::build_events(&client, key, after, limit).await
    }

    /// The global log after `cursor`, in commit-safe order (events of transactions still
    /// running are not returned yet, and nothing before them is skipped), at most `limit`,
    /// optionally only the given event types.
    ///
    /// Returns the events and the cursor to continue from. With a type filter at most
    /// [`FEED_SCAN`] events of the log are looked at per call: when fewer than `limit`
    /// match, the cursor moves past what was looked at, so a filter that matches nothing
    /// costs a bounded read per call, not a walk of the whole log.
    pub async fn feed(
        &self,
        after: GlobalCursor,
        limit: u32,
        types: &[cbs_events::EventType],
    ) -> Result<(Vec<RecordedEvent>, GlobalCursor), StoreError> {
        self.feed_scan(after, limit, types, FEED_SCAN).await
    }

    /// The last `limit` events of the global log (of `types`, among the last
    /// [`FEED_SCAN`]), oldest first, and the cursor to follow the feed from.
    pub async fn feed_tail(
        &self,
        limit: u32,
        types: &[cbs_events::EventType],
    ) -> Result<(Vec<RecordedEvent>, GlobalCursor), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let (events, end) = queries::feed_tail(&tx, limit, types, FEED_SCAN).await?;
        tx.commit().await?;
        let last = events.last().map(RecordedEvent::cursor).unwrap_or_default();
        Ok((events, end.map_or(last, |e| e.max(last))))
    }

    /// [`Store::feed`] looking at `scan` events at most.
    pub async fn feed_scan(
        &self,
        after: GlobalCursor,
        limit: u32,
        types: &[cbs_events::EventType],
        scan: i64,
    ) -> Result<(Vec<RecordedEvent>, GlobalCursor), StoreError> {
        let mut client = self.client().await?;
        // One snapshot for both reads: the cursor must not pass an event the first missed.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let events = queries::feed(&tx, after, limit, types, scan).await?;
        let last = events.last().map_or(after, RecordedEvent::cursor);
        let next = if types.is_empty() || events.len() == limit as usize {
            last
        } else {
            queries::feed_scan_end(&tx, after, scan)
                .await?
                .map_or(last, |end| end.max(last))
        };
        tx.commit().await?;
        Ok((events, next))
    }

    /// Recomputes every build's projection from the log and compares it with the stored one;
    /// with `fix`, overwrites the stored rows that differ (in one transaction).
    pub async fn rebuild_projections(&self, fix: bool) -> Result<RebuildReport, StoreError> {
        let mut client = self.client().await?;
        rebuild::rebuild(&mut client, fix).await
    }

    /// `Ok` when the database answers and every migration is applied.
    pub async fn ready(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        migrate::check_applied(&client).await
    }

    /// Builds requested per plugin module.
    pub async fn plugin_counts(
        &self,
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let client = self.client().await?;
        Ok(queries::plugin_counts(&client).await?.into_iter().collect())
    }

    /// Where the janitor's feed-driven duty `name` has read the global log to; `None` if it
    /// never recorded a place.
    pub async fn janitor_cursor(&self, name: &str) -> Result<Option<GlobalCursor>, StoreError> {
        let client = self.client().await?;
        queries::janitor_cursor(&client, name)
            .await?
            .map(|text| {
                text.parse().map_err(|e: cbs_events::BadCursor| {
                    StoreError::Corrupt(format!("janitor cursor {name}: {e}"))
                })
            })
            .transpose()
    }

    /// Records how far the janitor's duty `name` has read the global log.
    pub async fn set_janitor_cursor(
        &self,
        name: &str,
        cursor: GlobalCursor,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        queries::set_janitor_cursor(&client, name, &cursor.to_string()).await
    }

    /// Running builds whose lease has expired (their worker stopped renewing it).
    pub async fn expired_leases(&self, limit: i64) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::expired_leases(&client, limit).await
    }

    /// When the next lease of a running build expires, if any build runs.
    pub async fn next_lease_expiry(&self) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        queries::next_lease_expiry(&client).await
    }

    /// This deployment's id (one per database, made by the migrations).
    pub async fn deployment_id(&self) -> Result<String, StoreError> {
        let client = self.client().await?;
        queries::deployment_id(&client).await
    }

    /// Records that `key`'s artifact was downloaded now.
    pub async fn record_download(&self, key: &BuildKey) -> Result<(), StoreError> {
        let client = self.client().await?;
        queries::record_download(&client, key.as_str()).await
    }

    /// Succeeded builds neither finished nor downloaded since `cutoff`.
    pub async fn stale_artifacts(
        &self,
        cutoff: chrono::DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::stale_artifacts(&client, cutoff, limit).await
    }

    /// When the earliest queued build becomes claimable (now or later), if any is queued.
    pub async fn next_available(&self) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        queries::next_available(&client).await
    }

    /// Builds queued and running, and the longest wait of a claimable build (metrics).
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let client = self.client().await?;
        queries::queue_stats(&client).await
    }

    /// How many of `client`'s builds are queued or running (the api's per-client cap).
    pub async fn client_active_builds(&self, client: &str) -> Result<i64, StoreError> {
        let c = self.client().await?;
        queries::client_active_builds(&c, client).await
    }

    /// Running builds (by lease end), then queued ones in the order workers take them; at
    /// most `limit` (the admin's queue listing).
    pub async fn active_builds(&self, limit: i64) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::active_builds(&client, limit).await
    }

    /// Keys of the builds a worker runs now: its attempts and its reproductions.
    pub async fn running_builds_of(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        queries::running_builds_of(&client, owner).await
    }

    /// Builds whose last attempt failed retryably and that wait for a retry decision.
    pub async fn retryable_failures(&self, limit: i64) -> Result<Vec<BuildState>, StoreError> {
        let client = self.client().await?;
        queries::retryable_failures(&client, limit).await
    }

    /// Tries to become the one leader of `name` (a session-level advisory lock on a
    /// connection of its own). `None` if another process leads.
    pub async fn try_lead(&self, name: &str) -> Result<Option<Leadership>, StoreError> {
        let (client, _messages) = self.connector.connect_with_messages("").await?;
        queries::name_connection(&client, self.connector.application_name(), "leader").await?;
        // A stable 63-bit id from the name.
        let id = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }) >> 1;
        if queries::try_advisory_lock(&client, id as i64).await? {
            Ok(Some(Leadership { client }))
        } else {
            Ok(None)
        }
    }
}

/// Held leadership: the advisory lock lives as long as this connection. Dropping it (or the
/// connection breaking) lets another process take over.
#[derive(Debug)]
pub struct Leadership {
    client: tokio_postgres::Client,
}

impl Leadership {
    /// Whether the lock is still ours: the connection answers. A leader that cannot tell
    /// must stop acting (another may already lead; the appends it would make are fenced and
    /// conflict-checked, so a short overlap changes nothing twice).
    pub async fn still_held(&self) -> bool {
        !self.client.is_closed()
            && tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.client.simple_query("SELECT 1"),
            )
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
