//! The build store against a real Postgres: appends, conflicts, the claim, fencing, the
//! global feed, rebuilds, LISTEN/NOTIFY fan-out, migrations and the append-only log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use cbs_config::NotifyConfig;
use cbs_domain::BuildKey;
use cbs_events::{
    Artifact, Cancelled, Event, EventType, Failed, FailureKind, GaveUp, GlobalCursor,
    RequeueReason, Requeued, StepFinished, StepStarted, Succeeded,
};
use cbs_projections::{FoldError, Status};
use cbs_store::{Hub, Store, StoreError};
use cbs_testkit::TestDb;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(60);
/// Deadline of every wait in these tests: generous, never a sleep.
const DEADLINE: Duration = Duration::from_secs(20);

use cbs_testkit::sample_request as request;

fn key(n: u32) -> BuildKey {
    BuildKey::digest(&n.to_be_bytes())
}

async fn store(db: &TestDb) -> Store {
    Store::new(&db.config()).expect("store")
}

fn step(attempt: u32, name: &str) -> Event {
    Event::StepStarted(StepStarted {
        attempt,
        step: name.into(),
    })
}

fn succeeded(attempt: u32) -> Event {
    Event::Succeeded(Succeeded {
        attempt,
        artifact: Artifact {
            location: format!("builds/{attempt}"),
            size: 10,
            sha256: "ab".repeat(32),
            files: vec![],
            modules_sha256: None,
        },
    })
}

fn requeued(attempt: u32, reason: RequeueReason) -> Event {
    Event::Requeued(Requeued {
        attempt,
        reason,
        not_before: Utc::now(),
    })
}

/// Every event of a build, as (seq, type).
async fn history(store: &Store, key: &BuildKey) -> Vec<(u32, EventType)> {
    store
        .events(key, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event.event_type()))
        .collect()
}

fn assert_gap_free(h: &[(u32, EventType)]) {
    let seqs: Vec<u32> = h.iter().map(|(s, _)| *s).collect();
    let want: Vec<u32> = (1..=h.len() as u32).collect();
    assert_eq!(seqs, want, "sequence numbers are 1..n without gaps");
}

#[tokio::test]
async fn concurrent_identical_requests_create_one_build() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(1);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.request_build(&k, &request(1)).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let outcome = t.await.unwrap();
        assert_eq!(outcome.build.key, k);
        assert_eq!(outcome.build.status, Status::Queued);
        created += usize::from(outcome.created);
    }
    assert_eq!(created, 1);
    assert_eq!(history(&store, &k).await, vec![(1, EventType::Requested)]);
}

#[tokio::test]
async fn two_writers_of_one_sequence_number_one_wins_the_other_conflicts() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(2);
    store.request_build(&k, &request(2)).await.unwrap();
    let claimed = store.claim("w1", LEASE).await.unwrap().unwrap();

    for round in 0..20 {
        let prev = store.build(&k).await.unwrap().unwrap();
        let (a, b) = tokio::join!(
            store.append(&prev, step(1, &format!("a{round}"))),
            store.append(&prev, step(1, &format!("b{round}"))),
        );
        let (won, lost) = match (a, b) {
            (Ok(s), Err(e)) | (Err(e), Ok(s)) => (s, e),
            other => panic!("round {round}: exactly one writer must win: {other:?}"),
        };
        assert_eq!(won.last_seq, prev.last_seq + 1);
        match lost {
            StoreError::Conflict { key, expected_seq } => {
                assert_eq!(key, k);
                assert_eq!(expected_seq, prev.last_seq + 1);
            }
            other => panic!("expected a conflict, got {other}"),
        }
    }
    // A stale writer (an old state) conflicts too, and writes nothing.
    let err = store.append(&claimed, step(1, "stale")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");

    let h = history(&store, &k).await;
    assert_eq!(h.len(), 2 + 20);
    assert_gap_free(&h);
    let stored = store.build(&k).await.unwrap().unwrap();
    assert_eq!(stored.last_seq, 22);
}

#[tokio::test]
async fn many_concurrent_writers_leave_a_gap_free_log() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(3);
    store.request_build(&k, &request(3)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move {
                for i in 0..25 {
                    store
                        .append_latest(&k, step(1, &format!("t{t}-{i}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let h = history(&store, &k).await;
    assert_eq!(h.len(), 2 + 8 * 25);
    assert_gap_free(&h);
}

#[tokio::test]
async fn eight_claimers_over_500_builds_claim_each_attempt_exactly_once() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    const BUILDS: u32 = 500;
    for n in 0..BUILDS {
        store.request_build(&key(n), &request(n)).await.unwrap();
    }
    // Each claimer records what it claimed; every third first attempt is handed back
    // (preempted), so second attempts are claimed concurrently too.
    let tasks: Vec<_> = (0..8)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                let worker = format!("claimer-{c}");
                let mut mine = Vec::new();
                while let Some(b) = store.claim(&worker, LEASE).await.unwrap() {
                    assert_eq!(b.status, Status::Running);
                    assert_eq!(b.owner.as_deref(), Some(worker.as_str()));
                    mine.push((b.key.clone(), b.attempt));
                    let release = b.attempt == 1 && b.key.as_str().as_bytes()[0] % 3 == 0;
                    let event = if release {
                        requeued(1, RequeueReason::Preempted)
                    } else {
                        succeeded(b.attempt)
                    };
                    store.append(&b, event).await.unwrap();
                }
                mine
            })
        })
        .collect();
    let mut claims: HashMap<(BuildKey, u32), usize> = HashMap::new();
    for t in tasks {
        for c in t.await.unwrap() {
            *claims.entry(c).or_default() += 1;
        }
    }
    assert!(
        claims.values().all(|&n| n == 1),
        "an attempt was claimed twice"
    );
    let mut claimed_events = 0;
    for n in 0..BUILDS {
        let k = key(n);
        let b = store.build(&k).await.unwrap().unwrap();
        assert_eq!(b.status, Status::Succeeded, "{k}");
        let events = store.events(&k, 0, 100).await.unwrap();
        assert_gap_free(
            &events
                .iter()
                .map(|e| (e.seq, e.event.event_type()))
                .collect::<Vec<_>>(),
        );
        let attempts: Vec<u32> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::Claimed(c) => Some(c.attempt),
                _ => None,
            })
            .collect();
        let want: Vec<u32> = (1..=b.attempt).collect();
        assert_eq!(attempts, want, "{k}: one claimed event per attempt");
        for a in &attempts {
            assert_eq!(claims.get(&(k.clone(), *a)), Some(&1), "{k} attempt {a}");
        }
        claimed_events += attempts.len();
    }
    assert_eq!(claimed_events, claims.len());
    assert!(
        claims.len() > BUILDS as usize,
        "some builds had a second attempt"
    );
    let report = store.rebuild_projections(false).await.unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

#[tokio::test]
async fn claim_honours_not_before_and_takes_the_oldest_first() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    for n in 0..3 {
        store.request_build(&key(n), &request(n)).await.unwrap();
    }
    let first = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(first.key, key(0), "oldest first");
    assert_eq!(first.attempt, 1);
    let lease_left = first.lease_expires_at.unwrap() - Utc::now();
    assert!(lease_left > chrono::Duration::seconds(50), "{lease_left}");
    // Back to the queue, but not before an hour from now: not claimable.
    let later = Event::Requeued(Requeued {
        attempt: 1,
        reason: RequeueReason::Preempted,
        not_before: Utc::now() + chrono::Duration::hours(1),
    });
    store.append(&first, later).await.unwrap();
    assert_eq!(store.claim("w", LEASE).await.unwrap().unwrap().key, key(1));
    assert_eq!(store.claim("w", LEASE).await.unwrap().unwrap().key, key(2));
    assert!(store.claim("w", LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn a_fenced_worker_cannot_record_success_and_leaves_no_trace() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(4);
    store.request_build(&k, &request(4)).await.unwrap();
    let first = store.claim("old-worker", LEASE).await.unwrap().unwrap();
    assert_eq!(first.attempt, 1);
    store.append(&first, step(1, "compile")).await.unwrap();
    // The janitor decides the lease expired and requeues; another worker claims.
    store
        .append_latest(&k, requeued(1, RequeueReason::LeaseExpired))
        .await
        .unwrap();
    let second = store.claim("new-worker", LEASE).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);

    let before_log = history(&store, &k).await;
    let before_row = store.build(&k).await.unwrap().unwrap();
    // The old worker, unaware, reports success and a failure and a step: all refused.
    for event in [
        succeeded(1),
        step(1, "compile"),
        Event::Failed(Failed {
            attempt: 1,
            kind: FailureKind::Retryable,
            step: None,
            message: "late".into(),
        }),
    ] {
        let err = store.append_latest(&k, event).await.unwrap_err();
        assert!(err.is_fenced(), "{err}");
        match err {
            StoreError::Rejected(FoldError::Fenced {
                writer_attempt,
                current_attempt,
                ..
            }) => assert_eq!((writer_attempt, current_attempt), (1, 2)),
            other => panic!("{other}"),
        }
    }
    // Also with the stale state it held: a conflict or a fence, never a write.
    assert!(store.append(&first, succeeded(1)).await.is_err());
    assert_eq!(history(&store, &k).await, before_log, "log unchanged");
    assert_eq!(
        store.build(&k).await.unwrap().unwrap(),
        before_row,
        "projection unchanged"
    );
    // The current attempt finishes normally.
    let done = store.append(&second, succeeded(2)).await.unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert_eq!(done.owner, None);
}

#[tokio::test]
async fn append_returns_what_is_stored() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(5);
    let created = store.request_build(&k, &request(5)).await.unwrap().build;
    assert_eq!(store.build(&k).await.unwrap().unwrap(), created);
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(store.build(&k).await.unwrap().unwrap(), claimed);
    let s = store.append(&claimed, step(1, "compile")).await.unwrap();
    assert_eq!(store.build(&k).await.unwrap().unwrap(), s);
    let s = store
        .append(
            &s,
            Event::StepFinished(StepFinished {
                attempt: 1,
                step: "compile".into(),
                duration_ms: 3,
                exit_code: Some(2),
            }),
        )
        .await
        .unwrap();
    assert_eq!(store.build(&k).await.unwrap().unwrap(), s);
}

/// A random walk over many builds with several concurrent actors, then a rebuild.
#[tokio::test]
async fn rebuilt_projection_equals_the_live_one_after_a_random_concurrent_workload() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let store = store(&db).await;
    const BUILDS: u32 = 60;
    for n in 0..BUILDS {
        store.request_build(&key(n), &request(n)).await.unwrap();
    }
    let actors: Vec<_> = (0..6u64)
        .map(|seed| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let worker = format!("actor-{seed}");
                let mut refused = 0;
                for _ in 0..150 {
                    if rng.random_bool(0.4) {
                        if let Some(b) = store.claim(&worker, LEASE).await.unwrap() {
                            let _ = store.append(&b, step(b.attempt, "pin_versions")).await;
                        }
                        continue;
                    }
                    let k = key(rng.random_range(0..BUILDS));
                    let b = store.build(&k).await.unwrap().unwrap();
                    let a = b.attempt;
                    let event = match rng.random_range(0..9) {
                        0 => succeeded(a),
                        1 => Event::Failed(Failed {
                            attempt: a,
                            kind: FailureKind::Retryable,
                            step: Some("compile".into()),
                            message: "flaky".into(),
                        }),
                        2 => Event::Failed(Failed {
                            attempt: a,
                            kind: FailureKind::Permanent,
                            step: Some("compile".into()),
                            message: "bad".into(),
                        }),
                        3 => requeued(a, RequeueReason::Retry),
                        4 => requeued(a, RequeueReason::LeaseExpired),
                        5 => requeued(a, RequeueReason::Forced),
                        6 => Event::Cancelled(Cancelled {
                            reason: "test".into(),
                        }),
                        7 => Event::GaveUp(GaveUp {
                            attempt: a,
                            failures: b.failures,
                            message: "enough".into(),
                        }),
                        _ => step(a.saturating_sub(rng.random_range(0..2)), "compile"),
                    };
                    match store.append(&b, event).await {
                        Ok(_) => {}
                        Err(StoreError::Conflict { .. } | StoreError::Rejected(_)) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                refused
            })
        })
        .collect();
    for a in actors {
        a.await.unwrap();
    }
    let report = store.rebuild_projections(false).await.unwrap();
    assert_eq!(report.builds, u64::from(BUILDS));
    assert!(report.events > u64::from(BUILDS) * 2, "{}", report.events);
    assert!(
        report.differences.is_empty(),
        "{}",
        report
            .differences
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Statuses are spread over the state machine (the walk did something).
    let mut statuses = HashSet::new();
    for n in 0..BUILDS {
        statuses.insert(store.build(&key(n)).await.unwrap().unwrap().status);
    }
    assert!(statuses.len() >= 4, "{statuses:?}");
}

#[tokio::test]
async fn rebuild_reports_and_fixes_a_tampered_projection() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    for n in 0..3 {
        store.request_build(&key(n), &request(n)).await.unwrap();
    }
    let b = store.claim("w", LEASE).await.unwrap().unwrap();
    let client = db.client().await;
    client
        .execute(
            "UPDATE builds SET attempt = 7, status = 'succeeded', owner = NULL, lease_expires_at = NULL WHERE key = $1",
            &[&b.key.as_str()],
        )
        .await
        .unwrap();
    client
        .execute("DELETE FROM builds WHERE key = $1", &[&key(1).as_str()])
        .await
        .unwrap();
    let report = store.rebuild_projections(false).await.unwrap();
    let text: Vec<String> = report.differences.iter().map(|d| d.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    let tampered = text.iter().find(|t| t.starts_with(b.key.as_str())).unwrap();
    assert!(
        tampered.contains("status stored=Succeeded rebuilt=Running"),
        "{tampered}"
    );
    assert!(
        tampered.contains("attempt stored=7 rebuilt=1"),
        "{tampered}"
    );
    assert!(text
        .iter()
        .any(|t| t.contains("events but no projection row")));
    assert!(!report.fixed);

    let fixed = store.rebuild_projections(true).await.unwrap();
    assert!(fixed.fixed);
    assert!(store
        .rebuild_projections(false)
        .await
        .unwrap()
        .differences
        .is_empty());
    assert_eq!(store.build(&b.key).await.unwrap().unwrap(), b);
}

#[tokio::test]
async fn the_log_refuses_update_delete_and_truncate() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    store.request_build(&key(6), &request(6)).await.unwrap();
    let client = db.client().await;
    for sql in [
        "UPDATE build_events SET payload = '{}'",
        "DELETE FROM build_events",
        "TRUNCATE build_events",
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(msg.contains("build_events is append-only"), "{sql}: {msg}");
    }
    assert_eq!(history(&store, &key(6)).await.len(), 1);
}

#[tokio::test]
async fn the_feed_never_skips_an_event_whose_transaction_commits_late() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    store.request_build(&key(10), &request(10)).await.unwrap();
    let page = feed_until(&store, GlobalCursor::default(), 1).await;
    assert_eq!(page.len(), 1);
    let cursor = page[0].cursor();

    // A slow writer takes a position first but commits last.
    let mut slow = db.client().await;
    let tx = slow.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO build_events (build_key, seq, event_type, schema_version, payload, recorded_at)
         VALUES ($1, 1, 'requested', 1, $2, now())",
        &[
            &key(11).as_str(),
            &postgres_types::Json(Event::Requested(cbs_events::Requested { request: request(11), client: None, rank: 0 }).encode()),
        ],
    )
    .await
    .unwrap();
    // A fast writer commits after it.
    store.request_build(&key(12), &request(12)).await.unwrap();

    // While the slow transaction runs, the feed holds back everything behind it.
    let page = store.feed(cursor, 100, &[]).await.unwrap().0;
    assert!(
        page.is_empty(),
        "returned {:?} past a running transaction",
        page.iter().map(|e| &e.key).collect::<Vec<_>>()
    );

    tx.commit().await.unwrap();
    // Other tests share the cluster, and their running transactions hold the feed back
    // too (transaction ids are cluster-wide): read until both events are out.
    let page = feed_until(&store, cursor, 2).await;
    let keys: Vec<&BuildKey> = page.iter().map(|e| &e.key).collect();
    assert_eq!(
        keys,
        vec![&key(11), &key(12)],
        "the late commit comes first, nothing skipped"
    );
    assert!(page[0].position < page[1].position);

    // Type filter and paging.
    let (only_claims, _) = store
        .feed(GlobalCursor::default(), 100, &[EventType::Claimed])
        .await
        .unwrap();
    assert!(only_claims.is_empty());
    let (first, next) = store.feed(GlobalCursor::default(), 1, &[]).await.unwrap();
    assert_eq!(next, first[0].cursor());
    let rest = feed_until(&store, first[0].cursor(), 2).await;
    assert_eq!(first.len() + rest.len(), 3);

    // A filter that matches nothing looks at a bounded stretch per call, and the cursor
    // moves past it: no call walks the whole log.
    let (none, next) = store
        .feed_scan(GlobalCursor::default(), 100, &[EventType::Cancelled], 2)
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(next, rest[0].cursor(), "past the two events scanned");
    let (none, after) = store
        .feed_scan(next, 100, &[EventType::Cancelled], 2)
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(after, rest[1].cursor(), "past the last event scanned");
}

/// Reads the feed after `cursor` until it returns `n` events (deadline [`DEADLINE`]).
async fn feed_until(
    store: &Store,
    cursor: GlobalCursor,
    n: usize,
) -> Vec<cbs_events::RecordedEvent> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let page = store.feed(cursor, 100, &[]).await.unwrap().0;
        if page.len() >= n || tokio::time::Instant::now() > deadline {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn hub(db: &TestDb, poll: Duration, shutdown: &CancellationToken) -> Hub {
    let store = store(db).await;
    let hub = Hub::start(
        store.connector().clone(),
        NotifyConfig {
            poll_interval: poll,
            max_reconnect_backoff: Duration::from_millis(200),
        },
        shutdown.clone(),
    );
    let mut epoch = hub.epoch();
    tokio::time::timeout(DEADLINE, epoch.wait_for(|e| *e > 0))
        .await
        .expect("hub connects")
        .unwrap();
    hub
}

/// `n` waiters that behave like long-polls: subscribe, read the log, wait, read again, until
/// they have read event `seq` of build `key`. Returns once every waiter has made its first
/// read and is parked; the handle counts the waiters that got the event within the deadline.
async fn park_waiters(
    store: &Store,
    hub: &Hub,
    key: &BuildKey,
    n: usize,
    seq: u32,
) -> tokio::task::JoinHandle<usize> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n + 1));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            let mut w = hub.watch_build(&key);
            tokio::spawn(async move {
                let found = |store: Store, key: BuildKey| async move {
                    !store.events(&key, seq - 1, 1).await.unwrap().is_empty()
                };
                assert!(
                    !found(store.clone(), key.clone()).await,
                    "event {seq} exists already"
                );
                barrier.wait().await;
                tokio::time::timeout(DEADLINE, async {
                    loop {
                        w.changed().await;
                        if found(store.clone(), key.clone()).await {
                            return;
                        }
                    }
                })
                .await
                .is_ok()
            })
        })
        .collect();
    barrier.wait().await;
    tokio::spawn(async move {
        let mut n = 0;
        for t in tasks {
            n += usize::from(t.await.unwrap());
        }
        n
    })
}

#[tokio::test]
async fn a_thousand_waiters_on_one_connection_wake_on_one_commit_and_survive_its_loss() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    // The backstop poll is an hour: everything below must come from NOTIFY or reconnection.
    let hub = hub(&db, Duration::from_secs(3600), &shutdown).await;
    let store = store(&db).await;
    let k = key(20);
    let requested = store.request_build(&k, &request(20)).await.unwrap().build;

    let woken = park_waiters(&store, &hub, &k, 1000, 2).await;
    assert_eq!(hub.watched_builds(), 1);
    let claimed = store.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.last_seq, requested.last_seq + 1);
    assert_eq!(woken.await.unwrap(), 1000, "all woken by one commit");

    // Exactly one listening connection in this database for this process.
    let admin = db.admin().await;
    let listeners: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'caddy-build-server listener'",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listeners, 1);

    // Kill the listening connection from the server side, then write at once: the
    // notification may be sent while nobody listens; the reconnection's catch-up finds it.
    let woken = park_waiters(&store, &hub, &k, 1000, 3).await;
    let mut epoch = hub.epoch();
    let before = *epoch.borrow_and_update();
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'caddy-build-server listener') t",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    store.append(&claimed, step(1, "compile")).await.unwrap();
    assert_eq!(
        woken.await.unwrap(),
        1000,
        "waiters see events after the loss"
    );
    tokio::time::timeout(DEADLINE, epoch.wait_for(|e| *e > before))
        .await
        .expect("the hub reconnected")
        .unwrap();

    // And later events arrive by NOTIFY again.
    let woken = park_waiters(&store, &hub, &k, 10, 4).await;
    store.append_latest(&k, succeeded(1)).await.unwrap();
    assert_eq!(woken.await.unwrap(), 10);
    shutdown.cancel();
}

#[tokio::test]
async fn the_backstop_poll_finds_an_event_whose_notification_was_lost() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let hub = hub(&db, Duration::from_millis(200), &shutdown).await;
    let store = store(&db).await;
    let k = key(30);
    store.request_build(&k, &request(30)).await.unwrap();
    let mut w = hub.watch_build(&k);
    // Written behind the store's back: no notification at all.
    db.client()
        .await
        .execute(
            "INSERT INTO build_events (build_key, seq, event_type, schema_version, payload, recorded_at)
             VALUES ($1, 2, 'cancelled', 1, '{\"reason\":\"x\"}', now())",
            &[&k.as_str()],
        )
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        while w.latest_seq() < 2 {
            w.changed().await;
        }
    })
    .await
    .expect("the backstop read found the event");
    // ...and counted it as a lost notification, one backstop read later (other tests of
    // this process share the counter: it only grows).
    let lost = || cbs_metrics::metrics().lost_notifications.get();
    let before_judgement = lost();
    tokio::time::timeout(DEADLINE, async {
        while lost() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("lost notifications still {before_judgement}"));
    shutdown.cancel();
}

#[tokio::test]
async fn idle_claimers_are_woken_by_a_request() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let hub = hub(&db, Duration::from_secs(3600), &shutdown).await;
    let store = store(&db).await;
    let mut waiter = hub.watch_queue();
    assert!(store.claim("w", LEASE).await.unwrap().is_none());
    store.request_build(&key(40), &request(40)).await.unwrap();
    tokio::time::timeout(DEADLINE, waiter.changed())
        .await
        .expect("woken");
    assert!(store.claim("w", LEASE).await.unwrap().is_some());
    shutdown.cancel();
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::empty().await;
    let store = store(&db).await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let c = store.connector().clone();
            tokio::spawn(async move { cbs_store::migrate::run(&c).await })
        })
        .collect();
    let mut applied = 0;
    for r in runs {
        applied += r.await.unwrap().expect("every concurrent run succeeds");
    }
    let want = usize::try_from(cbs_store::migrate::latest_version()).unwrap();
    assert_eq!(applied, want, "each migration applied exactly once");
    store.ready().await.expect("ready after migrating");
}

#[tokio::test]
async fn readiness_reports_a_missing_schema() {
    let db = TestDb::empty().await;
    let store = store(&db).await;
    let err = store.ready().await.unwrap_err().to_string();
    assert!(err.contains("run `caddy-build-server migrate`"), "{err}");
}

#[tokio::test]
async fn build_histories_are_ordered_and_complete() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let k = key(50);
    store.request_build(&k, &request(50)).await.unwrap();
    let b = store.claim("w", LEASE).await.unwrap().unwrap();
    let b = store.append(&b, step(1, "compile")).await.unwrap();
    store.append(&b, succeeded(1)).await.unwrap();
    let all = store.events(&k, 0, 100).await.unwrap();
    let types: Vec<EventType> = all.iter().map(|e| e.event.event_type()).collect();
    assert_eq!(
        types,
        [
            EventType::Requested,
            EventType::Claimed,
            EventType::StepStarted,
            EventType::Succeeded
        ]
    );
    match &all[1].event {
        Event::Claimed(c) => {
            assert_eq!(c.worker, "w");
            assert_eq!(c.attempt, 1);
        }
        other => panic!("{other:?}"),
    }
    let after_two: BTreeMap<u32, EventType> = store
        .events(&k, 2, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event.event_type()))
        .collect();
    assert_eq!(after_two.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(store.events(&k, 0, 2).await.unwrap().len(), 2);
}

/// Reproducibility checks: only a worker other than the builder claims one, concurrent
/// claimers take each check once, a result of a check handed to another worker is fenced,
/// and the projection equals the fold of the log.
#[tokio::test]
async fn reproductions_are_claimed_once_never_by_the_builder_and_fold_like_the_log() {
    use cbs_events::{Reproduced, ReproductionOutcome, ReproductionReason, ReproductionRequested};
    const CHECKS: u32 = 20;
    let db = TestDb::new().await;
    let store = store(&db).await;
    for n in 0..CHECKS {
        store.request_build(&key(n), &request(n)).await.unwrap();
        let b = store.claim("builder", LEASE).await.unwrap().unwrap();
        let b = store.append(&b, succeeded(1)).await.unwrap();
        assert_eq!(b.built_by.as_deref(), Some("builder"));
        store
            .append(
                &b,
                Event::ReproductionRequested(ReproductionRequested {
                    reproduction: 0,
                    reason: ReproductionReason::Sample,
                }),
            )
            .await
            .unwrap();
    }
    // The builder finds nothing to check.
    assert!(store
        .claim_reproduction("builder", LEASE)
        .await
        .unwrap()
        .is_none());
    // Four other workers claim concurrently: every check exactly once.
    let claimers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(b) = store
                    .claim_reproduction(&format!("checker-{w}"), LEASE)
                    .await
                    .unwrap()
                {
                    got.push(b);
                }
                got
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    let keys: HashSet<_> = claimed.iter().map(|b| b.key.clone()).collect();
    assert_eq!(
        (claimed.len(), keys.len()),
        (CHECKS as usize, CHECKS as usize)
    );
    // The first check is handed to another worker: its first worker's result is fenced.
    let first = &claimed[0];
    let worker = first.reproduction.as_ref().unwrap().worker.clone().unwrap();
    let result = |worker: &str, n: u32| {
        Event::Reproduced(Reproduced {
            reproduction: n,
            worker: worker.to_owned(),
            outcome: ReproductionOutcome::Matched,
            sha256: Some("ab".repeat(32)),
            builder_image: None,
            builder_image_id: None,
            message: String::new(),
            files: vec![],
        })
    };
    store
        .append(
            first,
            Event::ReproductionRequested(ReproductionRequested {
                reproduction: 1,
                reason: ReproductionReason::LeaseExpired,
            }),
        )
        .await
        .unwrap();
    let e = store
        .append_latest(&first.key, result(&worker, 1))
        .await
        .unwrap_err();
    assert!(e.is_fenced(), "{e}");
    let again = store
        .claim_reproduction("checker-9", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.key, first.key);
    let done = store
        .append_latest(&first.key, result("checker-9", 2))
        .await
        .unwrap();
    assert_eq!(
        done.reproduction.map(|r| (r.status, r.reproduction)),
        Some((cbs_projections::ReproductionStatus::Matched, 2))
    );
    assert_eq!(
        store.running_reproductions(100).await.unwrap().len(),
        CHECKS as usize - 1
    );
    let report = store.rebuild_projections(false).await.unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}
