//! The process's single listening connection and its in-process fan-out.
//!
//! Every NOTIFY wakes every listening backend, so each process holds exactly ONE listening
//! connection, and any number of waiters (long-polls, SSE streams, idle workers) subscribe
//! here instead. A waiter subscribes first, then reads the log, then waits: it cannot miss
//! an event committed between its read and its wait.
//!
//! Notifications are hints and can be lost (the sender died, the connection dropped). So the
//! hub also follows the log itself: it keeps a cursor in the global log and reads the tail
//! (a) after every (re)connection, before anything else, and (b) every `poll_interval` as a
//! backstop. Whatever it finds is dispatched exactly like a notification. After each
//! reconnection it also bumps an epoch that makes every waiter re-read from the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbs_config::NotifyConfig;
use cbs_domain::BuildKey;
use cbs_events::{EventType, GlobalCursor};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::{Message, PgConnector};
use crate::{queries, StoreError};

/// Rows per read of the log's tail.
const TAIL_PAGE: u32 = 5_000;

/// A backstop read that takes longer means a dead connection (keepalives aside).
const TAIL_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The fan-out; clone it freely, all clones share one listening connection.
#[derive(Clone, Debug)]
pub struct Hub {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Newest known seq of each build somebody waits for, and a count of output
    /// notifications seen for it.
    builds: Mutex<HashMap<BuildKey, watch::Sender<(u32, u64)>>>,
    /// Bumped when a build may have become claimable.
    queue: watch::Sender<u64>,
    /// Bumped after every (re)connection: waiters re-read from the log.
    epoch: watch::Sender<u64>,
    /// Bumped on every event of any build (for the janitor).
    any: watch::Sender<u64>,
}

impl Shared {
    fn dispatch(&self, key: &str, seq: u32, claimable: bool, output: bool) {
        if output {
            // New output, no new event: wakes the build's watchers only.
            let builds = self.builds.lock().expect("hub map lock");
            if let Some(tx) = builds.get(key) {
                tx.send_modify(|known| known.1 = known.1.wrapping_add(1));
            }
            return;
        }
        self.any.send_modify(|n| *n = n.wrapping_add(1));
        if claimable {
            self.queue.send_modify(|n| *n = n.wrapping_add(1));
        }
        let builds = self.builds.lock().expect("hub map lock");
        if let Some(tx) = builds.get(key) {
            tx.send_if_modified(|known| {
                let newer = seq > known.0;
                if newer {
                    known.0 = seq;
                }
                newer
            });
        }
    }

    /// Parses a payload of `key:seq[:q]` entries; malformed entries are ignored (they can
    /// only come from someone else's NOTIFY on our channel).
    fn dispatch_payload(&self, payload: &str) {
        for (key, seq, flag) in entries(payload) {
            self.dispatch(key, seq, flag == Flag::Claimable, flag == Flag::Output);
        }
    }

    /// Forgets builds nobody waits for any more.
    fn prune(&self) {
        let mut builds = self.builds.lock().expect("hub map lock");
        builds.retain(|_, tx| tx.receiver_count() > 0);
    }
}

/// Returns when either receiver sees a new value. A closed sender (the hub is gone) never
/// wakes, so a waiter cannot spin; waiters always wait with their own deadline.
async fn either_changed<A, B>(a: &mut watch::Receiver<A>, b: &mut watch::Receiver<B>) {
    let never = std::future::pending::<()>;
    tokio::select! {
        r = a.changed() => if r.is_err() { never().await },
        r = b.changed() => if r.is_err() { never().await },
    }
}

/// Waits for news of one build.
#[derive(Debug)]
pub struct BuildWaiter {
    seq: watch::Receiver<(u32, u64)>,
    epoch: watch::Receiver<u64>,
}

impl BuildWaiter {
    /// Returns when the build may have new events (a notification, a backstop read, or a
    /// reconnection of the hub). Read the log after it returns; it may return spuriously.
    pub async fn changed(&mut self) {
        either_changed(&mut self.seq, &mut self.epoch).await;
    }

    /// The newest sequence number the hub has seen for this build (0 if none yet).
    pub fn latest_seq(&self) -> u32 {
        self.seq.borrow().0
    }
}

/// Waits for builds becoming claimable.
#[derive(Debug)]
pub struct QueueWaiter {
    queue: watch::Receiver<u64>,
    epoch: watch::Receiver<u64>,
}

impl QueueWaiter {
    /// Returns when a build may have become claimable (or the hub reconnected).
    pub async fn changed(&mut self) {
        either_changed(&mut self.queue, &mut self.epoch).await;
    }
}

impl Hub {
    /// Starts the listening task; it runs until `shutdown` is cancelled.
    pub fn start(connector: PgConnector, config: NotifyConfig, shutdown: CancellationToken) -> Hub {
        let shared = Arc::new(Shared {
            builds: Mutex::new(HashMap::new()),
            queue: watch::Sender::new(0),
            any: watch::Sender::new(0),
            epoch: watch::Sender::new(0),
        });
        tokio::spawn(listen_forever(shared.clone(), connector, config, shutdown));
        Hub { shared }
    }

    /// Subscribes to one build. Subscribe BEFORE reading the log, then wait.
    pub fn watch_build(&self, key: &BuildKey) -> BuildWaiter {
        let mut builds = self.shared.builds.lock().expect("hub map lock");
        let seq = builds
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new((0, 0)))
            .subscribe();
        BuildWaiter {
            seq,
            epoch: self.shared.epoch.subscribe(),
        }
    }

    /// Subscribes to "a build may be claimable".
    pub fn watch_queue(&self) -> QueueWaiter {
        QueueWaiter {
            queue: self.shared.queue.subscribe(),
            epoch: self.shared.epoch.subscribe(),
        }
    }

    /// A receiver of the connection epoch: it changes after every (re)connection, once the
    /// hub is listening and has caught up with the log. Tests wait on it.
    /// Changes on every event of any build and after every reconnection.
    pub fn watch_any(&self) -> watch::Receiver<u64> {
        self.shared.any.subscribe()
    }

    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.shared.epoch.subscribe()
    }

    /// Builds with at least one waiter (for metrics and tests).
    pub fn watched_builds(&self) -> usize {
        self.shared.prune();
        self.shared.builds.lock().expect("hub map lock").len()
    }
}

async fn listen_forever(
    shared: Arc<Shared>,
    connector: PgConnector,
    config: NotifyConfig,
    shutdown: CancellationToken,
) {
    let mut cursor: Option<GlobalCursor> = None;
    let first_backoff = Duration::from_millis(20);
    let mut backoff = first_backoff;
    loop {
        let mut connected = false;
        let result = tokio::select! {
            r = session(&shared, &connector, &config, &mut cursor, &mut connected) => r,
            _ = shutdown.cancelled() => return,
        };
        if connected {
            backoff = first_backoff;
        }
        if let Err(e) = result {
            warn!(error = %e, database = connector.display(), retry_in = ?backoff, "listening connection lost");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(config.max_reconnect_backoff.max(first_backoff));
    }
}

/// One connection's life: LISTEN, catch up, then dispatch until it breaks.
async fn session(
    shared: &Shared,
    connector: &PgConnector,
    config: &NotifyConfig,
    cursor: &mut Option<GlobalCursor>,
    connected: &mut bool,
) -> Result<(), StoreError> {
    let (client, mut messages) = connector.connect_with_messages("").await?;
    queries::name_connection(&client, connector.application_name(), "listener").await?;
    // LISTEN first, then read: an event committed in between is both notified and read.
    queries::listen(&client).await?;
    let start = match *cursor {
        Some(c) => {
            cbs_metrics::metrics().listen_reconnects.inc();
            c
        }
        None => queries::tail_start(&client).await?,
    };
    *cursor = Some(catch_up(shared, &client, start, None).await?);
    *connected = true;
    shared.epoch.send_modify(|n| *n += 1);
    shared.any.send_modify(|n| *n = n.wrapping_add(1));
    info!(database = connector.display(), "listening for build events");

    let metrics = cbs_metrics::metrics();
    let mut losses = Losses::default();
    let mut backstop = tokio::time::interval(config.poll_interval);
    backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    backstop.reset();
    loop {
        tokio::select! {
            msg = messages.recv() => match msg {
                Some(Message::Notification(payload)) => {
                    metrics.notifications_received.inc();
                    for (key, seq, _) in entries(&payload) {
                        losses.notified(key, seq);
                    }
                    shared.dispatch_payload(&payload);
                }
                Some(Message::Closed(err)) => {
                    return Err(StoreError::Connection(format!(
                        "listening connection closed{}",
                        err.map(|e| format!(": {e}")).unwrap_or_default()
                    )))
                }
                None => return Err(StoreError::Connection("listening connection closed".into())),
            },
            _ = backstop.tick() => {
                let c = cursor.expect("set above");
                // A dead connection shows here at the latest (keepalives aside).
                let read = tokio::time::timeout(
                    TAIL_READ_TIMEOUT,
                    catch_up(shared, &client, c, Some(&mut losses)),
                );
                match read.await {
                    Ok(r) => *cursor = Some(r?),
                    Err(_) => return Err(StoreError::Connection("backstop read of the log timed out".into())),
                }
                metrics.backstop_reads.inc();
                let lost = losses.end_of_read();
                if lost > 0 {
                    metrics.lost_notifications.inc_by(lost);
                    debug!(events = lost, "events found only by the backstop read: notifications lost");
                }
                shared.prune();
            }
        }
    }
}

/// Reads the log's tail after `from` and dispatches it; returns the new cursor. A backstop
/// read passes `losses`, which learns what it found.
async fn catch_up(
    shared: &Shared,
    client: &tokio_postgres::Client,
    from: GlobalCursor,
    mut losses: Option<&mut Losses>,
) -> Result<GlobalCursor, StoreError> {
    let mut cursor = from;
    loop {
        let page = queries::tail(client, cursor, TAIL_PAGE).await?;
        let n = page.len();
        for e in page {
            let claimable = e
                .event_type
                .parse::<EventType>()
                .is_ok_and(EventType::makes_claimable);
            if let Some(l) = losses.as_deref_mut() {
                l.found(&e.key, e.seq);
            }
            shared.dispatch(&e.key, e.seq, claimable, false);
            cursor = e.cursor;
        }
        if n < TAIL_PAGE as usize {
            if n > 0 {
                debug!(events = n, %cursor, "log tail read");
            }
            return Ok(cursor);
        }
    }
}

/// The entries of a payload of `key:seq[:q]` entries; malformed entries are skipped.
fn entries(payload: &str) -> impl Iterator<Item = (&str, u32, Flag)> {
    payload.split_ascii_whitespace().filter_map(|entry| {
        let mut parts = entry.split(':');
        let (key, seq) = (parts.next()?, parts.next()?.parse::<u32>().ok()?);
        let flag = match parts.next() {
            Some("q") => Flag::Claimable,
            Some("o") => Flag::Output,
            _ => Flag::None,
        };
        Some((key, seq, flag))
    })
}

/// What a notification entry says besides the build's newest event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    None,
    /// The event made the build claimable.
    Claimable,
    /// New output after event `seq` (not a new event).
    Output,
}

/// Tells which events reached this process only through the backstop read (their
/// notification was lost: the sender died between commit and NOTIFY, or the notifying
/// connection broke). A notification names a build's newest seq (the sender coalesces), so
/// an event counts as notified when a notification named its build with that seq or a
/// later one. A notification may arrive just after the read that found its event, so an
/// event is judged one read later: lost if no notification covered it by then.
/// Notifications are remembered for two reads (an event can be notified before a read can
/// see it: the tail only shows transactions older than every running one).
#[derive(Debug, Default)]
struct Losses {
    notified: HashMap<String, u32>,
    notified_before: HashMap<String, u32>,
    /// Found by the last read and not notified yet.
    suspects: Vec<(String, u32)>,
    /// Found by the current read and not notified yet.
    found: Vec<(String, u32)>,
}

impl Losses {
    fn covered(&self, key: &str, seq: u32) -> bool {
        [&self.notified, &self.notified_before]
            .iter()
            .any(|m| m.get(key).is_some_and(|&s| s >= seq))
    }

    fn notified(&mut self, key: &str, seq: u32) {
        let known = self.notified.entry(key.to_owned()).or_insert(seq);
        *known = (*known).max(seq);
    }

    fn found(&mut self, key: &str, seq: u32) {
        if !self.covered(key, seq) {
            self.found.push((key.to_owned(), seq));
        }
    }

    /// Ends a backstop read; returns how many events are now judged lost.
    fn end_of_read(&mut self) -> u64 {
        let suspects = std::mem::take(&mut self.suspects);
        let lost = suspects
            .iter()
            .filter(|(k, s)| !self.covered(k, *s))
            .count() as u64;
        self.suspects = std::mem::take(&mut self.found);
        self.notified_before = std::mem::take(&mut self.notified);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_entries_skip_malformed_ones() {
        let got: Vec<_> = entries("a:1 b:2:q junk c:x d:4:z e:5:o").collect();
        assert_eq!(
            got,
            vec![
                ("a", 1, Flag::None),
                ("b", 2, Flag::Claimable),
                ("d", 4, Flag::None),
                ("e", 5, Flag::Output)
            ]
        );
    }

    #[test]
    fn an_event_only_the_backstop_found_is_lost_one_read_later() {
        let mut l = Losses::default();
        l.notified("a", 3);
        // Covered by a coalesced notification of a later seq.
        l.found("a", 2);
        l.found("a", 3);
        // Never notified.
        l.found("b", 1);
        // Notified just after the read found it: not lost.
        l.found("c", 1);
        assert_eq!(l.end_of_read(), 0, "judged one read later");
        l.notified("c", 1);
        assert_eq!(l.end_of_read(), 1, "b is lost, c arrived late");
        assert_eq!(l.end_of_read(), 0, "each loss counts once");
    }

    #[test]
    fn a_notification_before_its_event_is_visible_still_counts() {
        let mut l = Losses::default();
        l.notified("a", 1);
        assert_eq!(l.end_of_read(), 0);
        l.found("a", 1);
        assert_eq!(l.end_of_read(), 0);
        assert_eq!(l.end_of_read(), 0);
    }
}
