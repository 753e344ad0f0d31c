//! `GET /api/build/{key}/events`: a build's progress as Server-Sent Events.
//!
//! Events (the caddyserver.com beta page's names): `step` `{step}`, `log` `{line}`,
//! `result` `{success, error}`, and `state` `{status, ...}` for every state change. Every
//! event has an id: `<seq>` for one stored event, `<seq>.<i>` for the i-th line of an
//! output chunk. A client that reconnects with `Last-Event-ID` gets exactly what it missed,
//! then live events; keep-alive comments every 15 s; the stream ends after `result`, and a
//! finished build's stream replays and ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use cbs_api_types::{LogData, ResultData, StateData, StepData, StreamEvent};
use cbs_events::{Event, FailureKind, RecordedEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::builds::parse_key;
use super::error::ApiError;
use super::ApiState;

/// Parses an event id (`12` or `12.3`) into its place.
fn parse_resume(s: &str) -> Option<(u32, Option<usize>)> {
    let s = s.trim();
    match s.split_once('.') {
        Some((seq, sub)) => Some((seq.parse().ok()?, Some(sub.parse().ok()?))),
        None => Some((s.parse().ok()?, None)),
    }
}

/// An SSE message's place: `(seq, None)` has id `seq`; `(seq, Some(i))` has id `seq.i`.
/// Options order None first, so comparing places says what a client has already seen.
type Place = (u32, Option<usize>);

fn id_of((seq, sub): Place) -> String {
    match sub {
        Some(i) => format!("{seq}.{i}"),
        None => seq.to_string(),
    }
}

/// The SSE messages of one stored event, and whether the stream ends with it.
fn messages(e: &RecordedEvent) -> (Vec<(Place, Sse)>, bool) {
    let msg = |place: Place, m: StreamEvent| {
        (
            place,
            Sse::default()
                .id(id_of(place))
                .event(m.name())
                .data(m.data()),
        )
    };
    let head = (e.seq, None);
    let result = (e.seq, Some(1));
    let state = |s: StateData| msg(head, StreamEvent::State(s));
    let failure = |message: &str| msg(result, StreamEvent::Result(ResultData::failure(message)));
    let log = |place: Place, line: String| msg(place, StreamEvent::Log(LogData { line }));
    match &e.event {
        Event::Requested(_) => (vec![state(StateData::Queued)], false),
        Event::Claimed(c) => (
            vec![state(StateData::Running { attempt: c.attempt })],
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
                .map(|(i, line)| log((e.seq, Some(i)), line.clone()))
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
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            parse_resume(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Last-Event-ID {v:?} is not an event id of this stream"
                ))
            })
        })
        .transpose()?;
    let mut from_query = None;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                from_query = Some(parse_resume(&v).ok_or_else(|| {
                    ApiError::bad_request("after must be an event id like 12 or 12.3")
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
    // The last place the client has seen; (0, None) is before everything.
    let mut seen: Place = from_header.or(from_query).unwrap_or((0, None));
    // Subscribe first, then check the build exists and start reading.
    let mut waiter = state.app.hub.watch_build(&key);
    let Some(build) = state.app.store.build(&key).await? else {
        return Err(ApiError::not_found(format!("no build with key {key}")));
    };
    // A resume point past the build's last event (a client of another server, a forged
    // id) means "from now on", not "from an event that will never come".
    if seen.0 > build.last_seq {
        seen = (build.last_seq, Some(usize::MAX));
    }
    let wait = super::open_wait(&state, client.as_deref(), "sse")?;
    let (tx, rx) = mpsc::channel::<Result<Sse, Infallible>>(256);
    let store = state.app.store.clone();
    tokio::spawn(async move {
        let _wait = wait; // open as long as the stream
                          // Read from the event the client saw last (it may have seen only part of it).
        let mut read_after = seen.0.saturating_sub(1);
        loop {
            let events = match store.events(&key, read_after, 500).await {
                Ok(e) => e,
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
            let got = events.len();
            for (i, e) in events.iter().enumerate() {
                read_after = e.seq;
                let (mut msgs, mut end) = messages(e);
                // A result that a later event superseded (a forced rebuild reopened the
                // build) is not the stream's end: replay its state, not its result.
                if end {
                    let later = i + 1 < got
                        || matches!(store.events(&key, e.seq, 1).await, Ok(more) if !more.is_empty());
                    if later {
                        msgs.retain(|(place, _)| *place != (e.seq, Some(1)));
                        end = false;
                    }
                }
                for (place, m) in msgs {
                    if place <= seen {
                        continue;
                    }
                    if tx.send(Ok(m)).await.is_err() {
                        return; // the client went away
                    }
                }
                if end {
                    return;
                }
            }
            if got < 500 {
                // Waiting for the next event; a client that hangs up ends the task now, not
                // at the next event (which may never come).
                tokio::select! {
                    _ = waiter.changed() => {}
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
        fn any_last_event_id(s in proptest::prop_oneof!["[0-9]{0,12}(\\.[0-9]{0,22})?", proptest::prelude::any::<String>()]) {
            if let Some((seq, sub)) = parse_resume(&s) {
                proptest::prop_assert_eq!(id_of((seq, sub)).parse::<String>().ok().and_then(|t| parse_resume(&t)), Some((seq, sub)));
            }
        }
    }

    #[test]
    fn resume_ids_order_like_the_stream() {
        assert_eq!(parse_resume("12"), Some((12, None)));
        assert_eq!(parse_resume("12.3"), Some((12, Some(3))));
        assert_eq!(parse_resume("x"), None);
        assert_eq!(parse_resume("1.x"), None);
        assert!((12, None) < (12, Some(0)));
        assert!((12, Some(9)) < (13, None));
    }
}
