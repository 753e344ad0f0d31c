//! `GET /api/build/{key}/events`: a build's progress as Server-Sent Events.
//!
//! Events (the caddyserver.com beta page's names): `step` `{step}`, `log` `{line}`,
//! `result` `{success, error}`, and `state` `{status, ...}` for every state change. Every
//! event has an id: `<seq>` for one stored event, `<seq>.<i>` for its further messages (the
//! i-th line of an output event older versions wrote into the log, a result),
//! `<seq>.<c>.<i>` for the i-th line of output chunk `c` written after event `seq` (the
//! output table). A client that reconnects with `Last-Event-ID` gets exactly what it missed,
//! then live events; keep-alive comments every 15 s; the stream ends after `result`, and a
//! finished build's stream replays and ends. Where retention removed an attempt's output,
//! the stream says so in its place.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use cbs_api_types::{LogData, ResultData, StateData, StepData, StreamEvent};
use cbs_events::{Event, EventType, FailureKind, RecordedEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::builds::parse_key;
use super::error::ApiError;
use super::ApiState;

/// Events, and chunks of output, per read.
const PAGE: u32 = 500;

/// How often a waiting stream reads again without a notification (output notifications
/// are not backed by the hub's own reads of the log).
const OUTPUT_BACKSTOP: Duration = Duration::from_secs(10);

/// Where in a stored event's or chunk's messages a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    /// The event's messages: `None` the first, `Some(i)` the further ones.
    Event(Option<usize>),
    /// Line `i` of output chunk `c` (the chunk's number in its attempt).
    Chunk(u32, usize),
}

/// An SSE message's place: after which event, and where there. Places order like the
/// stream, so comparing them says what a client has already seen.
type Place = (u32, Part);

/// Parses an event id (`12`, `12.3` or `12.4.5`) into its place.
fn parse_resume(s: &str) -> Option<Place> {
    let mut parts = s.trim().split('.');
    let seq = parts.next()?.parse().ok()?;
    let place = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => (seq, Part::Event(None)),
        (Some(i), None, _) => (seq, Part::Event(Some(i.parse().ok()?))),
        (Some(c), Some(i), None) => (seq, Part::Chunk(c.parse().ok()?, i.parse().ok()?)),
        _ => return None,
    };
    Some(place)
}

fn id_of((seq, part): Place) -> String {
    match part {
        Part::Event(None) => seq.to_string(),
        Part::Event(Some(i)) => format!("{seq}.{i}"),
        Part::Chunk(c, i) => format!("{seq}.{c}.{i}"),
    }
}

/// The `log` messages of an output chunk.
fn chunk_messages(c: &cbs_store::OutputChunk) -> Vec<(Place, Sse)> {
    c.lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let place = (c.after_seq, Part::Chunk(c.seq, i));
            let m = StreamEvent::Log(LogData { line: line.clone() });
            let sse = Sse::default()
                .id(id_of(place))
                .event(m.name())
                .data(m.data());
            (place, sse)
        })
        .collect()
}

fn pruned_line(attempt: u32) -> String {
    format!(
        "[the output of attempt {attempt} is no longer kept: retention removed it (the build's history says when)]"
    )
}

/// A `log` message at `place`.
fn notice(place: Place, line: String) -> Sse {
    let m = StreamEvent::Log(LogData { line });
    Sse::default()
        .id(id_of(place))
        .event(m.name())
        .data(m.data())
}

/// The attempt whose output a client at `place` was reading: the last claim at or before
/// it, and the claim's seq. `None` before the first claim or when the log cannot be read.
async fn attempt_at(
    store: &cbs_store::Store,
    key: &cbs_domain::BuildKey,
    place: Place,
) -> Option<(u32, u32)> {
    let events = store.events(key, 0, PAGE).await.ok()?;
    events
        .iter()
        .take_while(|e| e.seq <= place.0)
        .filter_map(|e| match &e.event {
            Event::Claimed(c) => Some((c.attempt, e.seq)),
            _ => None,
        })
        .last()
}

/// The SSE messages of one stored event, and whether the stream ends with it.
/// `output_pruned`: retention removed the output of attempts up to this one.
fn messages(e: &RecordedEvent, output_pruned: u32) -> (Vec<(Place, Sse)>, bool) {
    let msg = |place: Place, m: StreamEvent| {
        (
            place,
            Sse::default()
                .id(id_of(place))
                .event(m.name())
                .data(m.data()),
        )
    };
    let head = (e.seq, Part::Event(None));
    let result = (e.seq, Part::Event(Some(1)));
    let state = |s: StateData| msg(head, StreamEvent::State(s));
    let failure = |message: &str| msg(result, StreamEvent::Result(ResultData::failure(message)));
    let log = |place: Place, line: String| msg(place, StreamEvent::Log(LogData { line }));
    match &e.event {
        Event::Requested(_) => (vec![state(StateData::Queued)], false),
        Event::Claimed(c) => {
            let mut out = vec![state(StateData::Running { attempt: c.attempt })];
            if c.attempt <= output_pruned {
                out.push(log((e.seq, Part::Event(Some(0))), pruned_line(c.attempt)));
            }
            (out, false)
        }
        Event::OutputPruned(p) => (
            vec![log(
                head,
                format!(
                    "[the output of attempts up to {} was removed: {}]",
                    p.attempts, p.reason
                ),
            )],
            false,
        ),
        // Heartbeats are for the janitor, not for people watching; reproductions happen
        // after the stream ended (the status and the history show them).
        Event::LeaseRenewed(_)
        | Event::ReproductionRequested(_)
        | Event::ReproductionClaimed(_)
        | Event::Reproduced(_) => (vec![], false),
        Event::ArtifactDeleted(d) => (
            vec![state(StateData::Expired {
                reason: d.reason.clone(),
            })],
            false,
        ),
        Event::StepStarted(s) => (
            vec![msg(
                head,
                StreamEvent::Step(StepData {
                    step: s.step.clone(),
                }),
            )],
            false,
        ),
        Event::StepFinished(s) => {
            let how = match s.exit_code {
                Some(c) => format!("exit status {c}"),
                None => "did not exit".to_owned(),
            };
            let line = format!(
                "step {} finished in {:.1}s ({how})",
                s.step,
                s.duration_ms as f64 / 1000.0
            );
            (vec![log(head, line)], false)
        }
        Event::Output(o) => (
            o.lines
                .iter()
                .enumerate()
                .map(|(i, line)| log((e.seq, Part::Event(Some(i))), line.clone()))
                .collect(),
            false,
        ),
        Event::Succeeded(s) => (
            vec![
                state(StateData::Succeeded),
                msg(
                    result,
                    StreamEvent::Result(ResultData::success(
                        s.artifact.size,
                        s.artifact.sha256.clone(),
                    )),
                ),
            ],
            true,
        ),
        Event::Failed(f) => {
            let permanent = f.kind == FailureKind::Permanent;
            let mut out = vec![state(StateData::Failed {
                error: f.message.clone(),
                retryable: !permanent,
                step: f.step.clone(),
            })];
            if permanent {
                out.push(failure(&f.message));
            }
            (out, permanent)
        }
        Event::Requeued(r) => (
            vec![state(StateData::Requeued {
                not_before: r.not_before,
                reason: super::wire::requeue_reason(r.reason),
            })],
            false,
        ),
        Event::Cancelled(c) => (
            vec![
                state(StateData::Cancelled {
                    reason: c.reason.clone(),
                }),
                failure(&format!("the build was cancelled: {}", c.reason)),
            ],
            true,
        ),
        Event::GaveUp(g) => (
            vec![
                state(StateData::GaveUp {
                    failures: g.failures,
                }),
                failure(&g.message),
            ],
            true,
        ),
    }
}

/// The stream handler.
pub async fn events(
    State(state): State<ApiState>,
    client: Option<axum::Extension<super::limit::ClientAddr>>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let from_header = headers
        .get("last-event-id")
        .map(|v| {
            let v = v.to_str().map_err(|_| {
                ApiError::bad_request("Last-Event-ID must be an event id like 12, 12.3 or 12.4.5")
            })?;
            parse_resume(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Last-Event-ID {:?} is not an event id of this stream (like 12, 12.3 or 12.4.5)",
                    v.chars().take(40).collect::<String>()
                ))
            })
        })
        .transpose()?;
    let mut from_query = None;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                from_query = Some(parse_resume(&v).ok_or_else(|| {
                    ApiError::bad_request("after must be an event id like 12, 12.3 or 12.4.5")
                })?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: after",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    // The last place the client has seen; (0, first) is before everything.
    let mut seen: Place = from_header.or(from_query).unwrap_or((0, Part::Event(None)));
    // Subscribe first, then check the build exists and start reading.
    let mut waiter = state.app.hub.watch_build(&key);
    let Some(build) = state.app.store.build(&key).await? else {
        return Err(ApiError::not_found(format!("no build with key {key}")));
    };
    // A resume point past the build's last event (a client of another server, a forged
    // id) means "from the last event on", not "from an event that will never come".
    if seen.0 > build.last_seq {
        seen = (build.last_seq, Part::Event(Some(usize::MAX)));
    }
    let output_pruned = build.output_pruned;
    let wait = super::open_wait(&state, client.as_deref(), "sse")?;
    let (tx, rx) = mpsc::channel::<Result<Sse, Infallible>>(256);
    let store = state.app.store.clone();
    tokio::spawn(async move {
        // Open as long as the stream.
        let _wait = wait;
        // Read from the event the client saw last (it may have seen only part of it), and
        // the output from the chunk it saw last.
        let mut read_after = seen.0.saturating_sub(1);
        let mut chunks_from = match seen.1 {
            Part::Chunk(c, _) => (seen.0, c),
            Part::Event(_) => (seen.0, 0),
        };
        let mut min_chunk = (0, 0);
        // A client resuming inside an attempt whose output retention removed since: the
        // lines it would have got next are gone, and it is told so (with the id it resumed
        // from: its resume point stays where it was).
        if output_pruned > 0 && seen > (0, Part::Event(None)) {
            if let Some((attempt, claimed)) = attempt_at(&store, &key, seen).await {
                // (Before the claim's own notice, the replay says it.)
                if attempt <= output_pruned
                    && seen >= (claimed, Part::Event(Some(0)))
                    && tx
                        .send(Ok(notice(seen, pruned_line(attempt))))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
        loop {
            let read = store
                .timeline(&key, read_after, chunks_from, min_chunk, PAGE)
                .await;
            let (events, chunks) = match read {
                Ok(r) => r,
                // The database is away (a restart): the stream stays open (keep-alives go
                // on) and reads again shortly, for as long as the client listens.
                Err(e) => {
                    tracing::warn!(error = %e, "event stream: cannot read the log; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(super::builds::READ_RETRY_PAUSE) => continue,
                        _ = tx.closed() => return,
                    }
                }
            };
            // A full page of chunks may not hold every chunk before the page's later
            // events: those events wait for the next read.
            let horizon = if chunks.len() == PAGE as usize {
                chunks.last().map_or(u32::MAX, |c| c.after_seq)
            } else {
                u32::MAX
            };
            let full = events.len() == PAGE as usize || chunks.len() == PAGE as usize;
            let mut chunks = chunks.into_iter().peekable();
            let send = |msgs: Vec<(Place, Sse)>, tx: &mpsc::Sender<_>| {
                let fresh: Vec<Sse> = msgs
                    .into_iter()
                    .filter(|(place, _)| *place > seen)
                    .map(|(_, m)| m)
                    .collect();
                let tx = tx.clone();
                async move {
                    for m in fresh {
                        if tx.send(Ok(m)).await.is_err() {
                            return false; // the client went away
                        }
                    }
                    true
                }
            };
            for (i, e) in events.iter().enumerate() {
                if e.seq > horizon {
                    break;
                }
                // Output written before this event.
                while let Some(c) = chunks.next_if(|c| c.after_seq < e.seq) {
                    if !send(chunk_messages(&c), &tx).await {
                        return;
                    }
                    chunks_from = (c.after_seq, c.seq + 1);
                    min_chunk = (c.attempt, c.seq + 1);
                }
                read_after = e.seq;
                let (mut msgs, mut end) = messages(e, output_pruned);
                // A result that a later event superseded (a forced rebuild reopened the
                // build) is not the stream's end: replay its state, not its result. Events
                // that do not reopen (an artifact's expiry, a reproduction, output
                // retention) leave it the end.
                if end {
                    let reopens = |e: &RecordedEvent| e.event.event_type() == EventType::Requeued;
                    let later = events[i + 1..].iter().any(reopens)
                        || matches!(store.events(&key, e.seq, PAGE).await, Ok(more) if more.iter().any(reopens));
                    if later {
                        msgs.retain(|(place, _)| *place != (e.seq, Part::Event(Some(1))));
                        end = false;
                    }
                }
                // Retention that ran while this stream replayed took output it had not
                // sent yet: say so before the result (its place `seq.0` is free).
                if end {
                    if let Ok(Some(now)) = store.build(&key).await {
                        if now.output_pruned > output_pruned {
                            let place = (e.seq, Part::Event(Some(0)));
                            let line = format!(
                                "[the output of attempts up to {} was removed by retention while this stream was sent; what is missing above is gone]",
                                now.output_pruned
                            );
                            msgs.insert(1.min(msgs.len()), (place, notice(place, line)));
                        }
                    }
                }
                if !send(msgs, &tx).await {
                    return;
                }
                if end {
                    return;
                }
            }
            // Output after the last event read.
            for c in chunks {
                if !send(chunk_messages(&c), &tx).await {
                    return;
                }
                chunks_from = (c.after_seq, c.seq + 1);
                min_chunk = (c.attempt, c.seq + 1);
            }
            if !full {
                // Waiting for the next event or output; a client that hangs up ends the
                // task now, not at the next event (which may never come). Output
                // notifications are not backed by the hub's read of the log, so a lost
                // one is made up for by reading again now and then.
                tokio::select! {
                    _ = waiter.changed() => {}
                    _ = tokio::time::sleep(OUTPUT_BACKSTOP) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    });
    let sse = axum::response::sse::Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    let mut resp = sse.into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config())]

        /// Any Last-Event-ID: a place in the stream or none; never a panic.
        #[test]
        fn any_last_event_id(s in proptest::prop_oneof!["[0-9]{0,12}(\\.[0-9]{0,22}){0,3}", proptest::prelude::any::<String>()]) {
            if let Some(place) = parse_resume(&s) {
                proptest::prop_assert_eq!(parse_resume(&id_of(place)), Some(place));
            }
        }
    }

    #[test]
    fn resume_ids_order_like_the_stream() {
        assert_eq!(parse_resume("12"), Some((12, Part::Event(None))));
        assert_eq!(parse_resume("12.3"), Some((12, Part::Event(Some(3)))));
        assert_eq!(parse_resume("12.4.5"), Some((12, Part::Chunk(4, 5))));
        assert_eq!(parse_resume("x"), None);
        assert_eq!(parse_resume("1.x"), None);
        assert_eq!(parse_resume("1.2.3.4"), None);
        assert!((12, Part::Event(None)) < (12, Part::Event(Some(0))));
        // Output written after event 12 follows all of its messages, then event 13.
        assert!((12, Part::Event(Some(9))) < (12, Part::Chunk(1, 0)));
        assert!((12, Part::Chunk(1, 7)) < (12, Part::Chunk(2, 0)));
        assert!((12, Part::Chunk(9, 9)) < (13, Part::Event(None)));
    }
}
