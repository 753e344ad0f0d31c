//! Sends the notifications that wake waiters, after the events they announce are committed.
//!
//! Why not NOTIFY inside the writing transaction: a transaction that notifies takes a
//! database-wide lock at commit and holds it through its WAL flush, so notifying writers
//! cannot share a flush and the log's write rate collapses (Postgres serializes the commits of
//! notifying transactions on a global queue lock). Instead, a
//! write commits on its own, and this task then sends `pg_notify` on a dedicated connection
//! whose transactions are `synchronous_commit = off`: they write no data, so nothing is lost
//! by not waiting for the flush, and the lock is held for microseconds. Entries that arrive
//! together are coalesced into one NOTIFY (one per transaction, under the 8000-byte limit).
//!
//! A notification is a hint. If this process dies between a commit and its notification,
//! the listeners' backstop poll of the log's tail still finds the event.

use std::collections::HashMap;
use std::time::Duration;

use cbs_domain::BuildKey;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::connect::PgConnector;
use crate::queries;

/// Room for entries in one payload (Postgres allows just under 8000 bytes).
const MAX_PAYLOAD: usize = 7000;

/// How long progress notes (steps, results) may wait to share a NOTIFY with later ones.
/// Every NOTIFY is a transaction and wakes every listening backend, so at high write rates
/// coalescing is what keeps notifications from costing more than the writes. Notes that make
/// a build claimable are sent at once (and take whatever is waiting with them), so dispatch
/// latency does not pay for this.
const LINGER: Duration = Duration::from_millis(2);

/// Least time between two NOTIFYs of one process. After a quiet period the first goes at
/// once; under load this caps the rate and everything that arrives meanwhile shares one.
const MIN_GAP: Duration = Duration::from_millis(1);

/// Queues notifications for the sending task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: mpsc::UnboundedSender<Note>,
}

#[derive(Debug)]
struct Note {
    key: BuildKey,
    seq: u32,
    claimable: bool,
    /// New output after event `seq` (the build's events did not change).
    output: bool,
}

impl Notifier {
    /// Starts the sending task; it ends when every `Notifier` clone is dropped.
    pub(crate) fn start(connector: PgConnector) -> Notifier {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(connector, rx));
        Notifier { tx }
    }

    /// Announces that build `key` has event `seq` (committed). `claimable` wakes idle
    /// workers too.
    pub(crate) fn note(&self, key: &BuildKey, seq: u32, claimable: bool) {
        // Fails only when the task is gone (runtime shutting down): nothing left to wake.
        let _ = self.tx.send(Note {
            key: key.clone(),
            seq,
            claimable,
            output: false,
        });
    }

    /// Announces a new chunk of output of build `key`, placed after its event `after_seq`.
    pub(crate) fn note_output(&self, key: &BuildKey, after_seq: u32) {
        let _ = self.tx.send(Note {
            key: key.clone(),
            seq: after_seq,
            claimable: false,
            output: true,
        });
    }
}

/// Collects the notes of one payload: the newest seq per build, claimable if any was.
/// Waits up to [`LINGER`] for more unless a claimable note is among them, and in any case
/// until `earliest` (the previous NOTIFY plus [`MIN_GAP`]).
async fn next_payload(
    first: Note,
    rx: &mut mpsc::UnboundedReceiver<Note>,
    earliest: tokio::time::Instant,
) -> String {
    // Per build: the newest event, claimable, and the newest place of output (if any).
    #[derive(Default)]
    struct Entry {
        seq: Option<u32>,
        claimable: bool,
        output: Option<u32>,
    }
    let mut latest: HashMap<BuildKey, Entry> = HashMap::new();
    let mut urgent = false;
    let mut add = |n: Note, urgent: &mut bool| {
        *urgent |= n.claimable;
        let e = latest.entry(n.key).or_default();
        if n.output {
            e.output = e.output.max(Some(n.seq));
        } else {
            e.seq = e.seq.max(Some(n.seq));
            e.claimable |= n.claimable;
        }
    };
    add(first, &mut urgent);
    let lazy_deadline = (tokio::time::Instant::now() + LINGER).max(earliest);
    // Each entry takes at most 64 + 1 + 10 + 2 + 1 bytes.
    let mut size = 80;
    while size + 80 < MAX_PAYLOAD {
        let deadline = if urgent { earliest } else { lazy_deadline };
        let next = match rx.try_recv() {
            Ok(n) => Some(n),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) if tokio::time::Instant::now() >= deadline => {
                None
            }
            Err(mpsc::error::TryRecvError::Empty) => tokio::time::timeout_at(deadline, rx.recv())
                .await
                .ok()
                .flatten(),
        };
        let Some(n) = next else { break };
        add(n, &mut urgent);
        size += 80;
    }
    let mut payload = String::with_capacity(latest.len() * 80);
    let mut entry = |key: &BuildKey, seq: u32, flag: &str| {
        if !payload.is_empty() {
            payload.push(' ');
        }
        payload.push_str(key.as_str());
        payload.push(':');
        payload.push_str(&seq.to_string());
        payload.push_str(flag);
    };
    for (key, e) in &latest {
        if let Some(seq) = e.seq {
            entry(key, seq, if e.claimable { ":q" } else { "" });
        }
        // Output has its own entry, which listeners of older versions read as an event
        // they already know (and ignore).
        if let Some(after) = e.output {
            entry(key, after, ":o");
        }
    }
    payload
}

/// A connection for notifications with its prepared statement.
async fn connect(
    connector: &PgConnector,
) -> Result<(tokio_postgres::Client, tokio_postgres::Statement), crate::StoreError> {
    let (client, _messages) = connector
        .connect_with_messages(queries::NOTIFIER_SETUP)
        .await?;
    queries::name_connection(&client, connector.application_name(), "notifier").await?;
    let stmt = queries::prepare_notify(&client).await?;
    Ok((client, stmt))
}

async fn run(connector: PgConnector, mut rx: mpsc::UnboundedReceiver<Note>) {
    let mut client = None;
    let mut backoff = Duration::from_millis(50);
    let mut earliest = tokio::time::Instant::now();
    while let Some(first) = rx.recv().await {
        let payload = next_payload(first, &mut rx, earliest).await;
        earliest = tokio::time::Instant::now() + MIN_GAP;
        if client.is_none() {
            match connect(&connector).await {
                Ok(c) => {
                    client = Some(c);
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    // Dropped: listeners find these events with their backstop poll.
                    warn!(error = %e, "cannot connect to send notifications");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some((c, stmt)) = &client else { continue };
        if let Err(e) = queries::notify(c, stmt, &payload).await {
            debug!(error = %e, "notification not sent; reconnecting");
            client = None;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payload_keeps_the_newest_seq_per_build_and_the_claimable_flag() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = BuildKey::digest(b"a");
        let b = BuildKey::digest(b"b");
        for (k, seq, q) in [(&a, 2, false), (&b, 1, true), (&a, 3, false)] {
            tx.send(Note {
                key: k.clone(),
                seq,
                claimable: q,
                output: false,
            })
            .unwrap();
        }
        let first = rx.try_recv().unwrap();
        let payload = next_payload(first, &mut rx, tokio::time::Instant::now()).await;
        let mut entries: Vec<&str> = payload.split(' ').collect();
        entries.sort();
        let mut want = vec![format!("{a}:3"), format!("{b}:1:q")];
        want.sort();
        assert_eq!(entries, want);
    }

    #[tokio::test]
    async fn payload_stays_under_the_postgres_limit() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..1000u32 {
            tx.send(Note {
                key: BuildKey::digest(&i.to_be_bytes()),
                seq: u32::MAX,
                claimable: true,
                output: false,
            })
            .unwrap();
        }
        let first = rx.try_recv().unwrap();
        let payload = next_payload(first, &mut rx, tokio::time::Instant::now()).await;
        assert!(payload.len() < 8000, "{}", payload.len());
        assert!(!rx.is_empty(), "the rest waits for the next payload");
    }
}
