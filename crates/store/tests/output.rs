//! Build output in its own table against a real Postgres: placed among the build's events,
//! fenced like the events of its attempt, append-only, announced to waiters, and removed
//! only together with the `output_pruned` event that says so.

use std::time::Duration;

use cbs_config::NotifyConfig;
use cbs_domain::BuildKey;
use cbs_events::{Artifact, Event, EventType, RequeueReason, Requeued, StepStarted, Succeeded};
use cbs_projections::Status;
use cbs_store::{Hub, Store, StoreError};
use cbs_testkit::{sample_request as request, TestDb};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(20);

fn key(n: u32) -> BuildKey {
    BuildKey::digest(&n.to_be_bytes())
}

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} line {i}")).collect()
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

#[tokio::test]
async fn output_is_placed_among_events_fenced_and_pruned_only_with_its_event() {
    let db = TestDb::new().await;
    let store = Store::new(&db.config()).unwrap();
    let shutdown = CancellationToken::new();
    // The backstop poll is far away: only the output's notification can wake the waiter.
    let hub = Hub::start(
        store.connector().clone(),
        NotifyConfig {
            poll_interval: Duration::from_secs(3600),
            max_reconnect_backoff: Duration::from_millis(200),
        },
        shutdown.clone(),
    );
    let mut epoch = hub.epoch();
    tokio::time::timeout(DEADLINE, epoch.wait_for(|e| *e > 0))
        .await
        .unwrap()
        .unwrap();
    let k = key(1);
    store.request_build(&k, &request(1)).await.unwrap();
    // No output before a claim: the attempt does not run.
    let err = store
        .append_output(&k, 1, "compile", &lines("early", 1), false)
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");

    let first = store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!((first.attempt, first.last_seq), (1, 2));
    let mut waiter = hub.watch_build(&k);
    assert_eq!(
        store
            .append_output(&k, 1, "pin_versions", &lines("a", 3), false)
            .await
            .unwrap(),
        (1, 2)
    );
    tokio::time::timeout(DEADLINE, waiter.changed())
        .await
        .expect("output wakes the build's waiters");
    store.append_latest(&k, step(1, "compile")).await.unwrap();
    assert_eq!(
        store
            .append_output(&k, 1, "compile", &lines("b", 2), false)
            .await
            .unwrap(),
        (2, 3)
    );
    assert_eq!(
        store
            .append_output(&k, 1, "compile", &["".into(), "x".into()], true)
            .await
            .unwrap(),
        (3, 3)
    );

    // Events and chunks in one read, placed: chunk 1 after event 2, chunks 2 and 3 after 3.
    let (events, chunks) = store.timeline(&k, 0, (0, 0), (0, 0), 500).await.unwrap();
    assert_eq!(events.len(), 3);
    let placed: Vec<(u32, u32, u32)> = chunks
        .iter()
        .map(|c| (c.attempt, c.seq, c.after_seq))
        .collect();
    assert_eq!(placed, [(1, 1, 2), (1, 2, 3), (1, 3, 3)]);
    assert_eq!(chunks[0].lines, lines("a", 3));
    assert_eq!(chunks[0].step, "pin_versions");
    // Empty lines survive the round trip; the marker is marked.
    assert_eq!(chunks[2].lines, ["", "x"]);
    assert!(chunks[2].truncated && !chunks[1].truncated);
    // A read that returns only event 1 returns no chunk placed after a later event.
    let (events, chunks) = store.timeline(&k, 0, (0, 0), (0, 0), 1).await.unwrap();
    assert_eq!((events.len(), chunks.len()), (1, 0));
    // From the middle: chunks from place (3, 3) on.
    let (events, chunks) = store.timeline(&k, 2, (3, 3), (1, 0), 500).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
    // Knowing the chunk it is at (attempt 1, chunk 3) gives the same.
    let (_, chunks) = store.timeline(&k, 2, (3, 3), (1, 3), 500).await.unwrap();
    assert_eq!(chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
    // Past the last chunk: none.
    let (_, chunks) = store.timeline(&k, 2, (3, 3), (1, 4), 500).await.unwrap();
    assert!(chunks.is_empty());

    // The lease is taken away: the old attempt's output is refused and nothing is written.
    store
        .append_latest(
            &k,
            Event::Requeued(Requeued {
                attempt: 1,
                reason: RequeueReason::LeaseExpired,
                not_before: Utc::now(),
            }),
        )
        .await
        .unwrap();
    let err = store
        .append_output(&k, 1, "compile", &lines("late", 1), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::OutputFenced { attempt: 1, .. }),
        "{err}"
    );
    assert_eq!(store.output(&k, (0, 0), 100).await.unwrap().len(), 3);

    let second = store.claim("w2", LEASE).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(
        store
            .append_output(&k, 2, "compile", &lines("c", 1), false)
            .await
            .unwrap(),
        (1, second.last_seq)
    );
    // Pages of the output endpoint: in (attempt, seq) order.
    let page = store.output(&k, (1, 2), 100).await.unwrap();
    let places: Vec<(u32, u32)> = page.iter().map(|c| (c.attempt, c.seq)).collect();
    assert_eq!(places, [(1, 3), (2, 1)]);

    // Chunks are never changed.
    let client = db.client().await;
    let err = client
        .batch_execute("UPDATE build_output SET body = 'forged'")
        .await
        .unwrap_err();
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("build_output is append-only"), "{msg}");

    // While attempt 2 runs only attempt 1's output may go; retention takes finished builds.
    let running = store.build(&k).await.unwrap().unwrap();
    let far = Utc::now() + chrono::Duration::days(1);
    assert!(store
        .output_to_prune("succeeded", far, 10)
        .await
        .unwrap()
        .is_empty());
    let done = store.append_latest(&k, succeeded(2)).await.unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert!(running.attempt == 2);
    let due = store.output_to_prune("succeeded", far, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].key, k);
    // Only builds older than the cutoff.
    let past = done.updated_at - chrono::Duration::seconds(1);
    assert!(store
        .output_to_prune("succeeded", past, 10)
        .await
        .unwrap()
        .is_empty());
    // A stale state conflicts and removes nothing.
    let err = store.prune_output(&running, "test").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.output(&k, (0, 0), 100).await.unwrap().len(), 4);

    let (after, pruned) = store.prune_output(&done, "kept for 1s").await.unwrap();
    assert_eq!((pruned.attempts, pruned.chunks), (2, 4));
    let bytes: usize = [
        "a line 0\na line 1\na line 2",
        "b line 0\nb line 1",
        "\nx",
        "c line 0",
    ]
    .iter()
    .map(|b| b.len())
    .sum();
    assert_eq!(pruned.bytes, bytes as u64);
    assert_eq!(after.output_pruned, 2);
    assert_eq!(after.updated_at, done.updated_at, "pruning is not activity");
    assert_eq!(store.build(&k).await.unwrap().unwrap(), after);
    assert!(store.output(&k, (0, 0), 100).await.unwrap().is_empty());
    let log = store.events(&k, 0, 100).await.unwrap();
    assert_eq!(
        log.last().unwrap().event.event_type(),
        EventType::OutputPruned
    );
    // Pruned builds leave the retention scan, and a second pruning is refused.
    assert!(store
        .output_to_prune("succeeded", far, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.prune_output(&after, "again").await.is_err());
    // The fold of the log gives the same projection.
    let report = store.rebuild_projections(false).await.unwrap();
    assert!(report.differences.is_empty(), "{report:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn chunks_written_while_events_are_appended_stay_in_order() {
    let db = TestDb::new().await;
    let store = Store::new(&db.config()).unwrap();
    let k = key(2);
    store.request_build(&k, &request(2)).await.unwrap();
    let claimed = store.claim("w1", LEASE).await.unwrap().unwrap();
    let writer = {
        let store = store.clone();
        let k = k.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .append_output(&k, 1, "compile", &lines(&i.to_string(), 2), false)
                    .await
                    .unwrap();
            }
        })
    };
    for i in 0..50 {
        store
            .append_latest(&k, step(claimed.attempt, &format!("step{i}")))
            .await
            .unwrap();
    }
    writer.await.unwrap();
    let chunks = store.output(&k, (0, 0), 1000).await.unwrap();
    assert_eq!(chunks.len(), 200);
    for pair in chunks.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert!(pair[1].after_seq >= pair[0].after_seq, "{pair:?}");
    }
    // Each names an event of the claimed attempt (the claim is event 2, the last step 52).
    assert!(chunks.iter().all(|c| (2..=52).contains(&c.after_seq)));
}
