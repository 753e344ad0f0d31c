//! The server's values in the API's wire formats (crates/api-types): the one place where a
//! build, an event or a status becomes what clients read.

use cbs_api_types as wire;
use cbs_domain::BuildRequest;
use cbs_events::{FailureKind, RecordedEvent, RequeueReason};
use cbs_projections::{BuildState, Status};

use super::error::ApiError;

pub fn status(s: Status) -> wire::BuildStatus {
    match s {
        Status::Queued => wire::BuildStatus::Queued,
        Status::Running => wire::BuildStatus::Running,
        Status::Succeeded => wire::BuildStatus::Succeeded,
        Status::Failed => wire::BuildStatus::Failed,
        Status::Cancelled => wire::BuildStatus::Cancelled,
        Status::GaveUp => wire::BuildStatus::GaveUp,
        Status::Expired => wire::BuildStatus::Expired,
    }
}

pub fn failure_kind(k: FailureKind) -> wire::FailureKind {
    match k {
        FailureKind::Retryable => wire::FailureKind::Retryable,
        FailureKind::Permanent => wire::FailureKind::Permanent,
    }
}

pub fn requeue_reason(r: RequeueReason) -> wire::RequeueReason {
    match r {
        RequeueReason::LeaseExpired => wire::RequeueReason::LeaseExpired,
        RequeueReason::Preempted => wire::RequeueReason::Preempted,
        RequeueReason::Retry => wire::RequeueReason::Retry,
        RequeueReason::Forced => wire::RequeueReason::Forced,
    }
}

pub fn request(r: &BuildRequest) -> wire::BuildRequest {
    let p = r.platform();
    wire::BuildRequest {
        arch: p.arch().to_owned(),
        arm: p.arm(),
        caddy_version: r.caddy_version().to_string(),
        os: p.os().to_owned(),
        plugins: r
            .plugins()
            .iter()
            .map(|p| wire::Plugin {
                module: p.module.to_string(),
                version: p.version.to_string(),
            })
            .collect(),
        replacements: r
            .replacements()
            .iter()
            .map(|x| wire::Replacement {
                new: x.new.to_string(),
                old: x.old.to_string(),
                version: x.version.to_string(),
            })
            .collect(),
    }
}

/// A build's status, as every build-status route answers it.
pub fn build(b: &BuildState) -> wire::Build {
    let key = b.key.as_str();
    wire::Build {
        artifact: b.artifact.as_ref().map(|a| wire::ArtifactInfo {
            built_by: b.built_by.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
        }),
        attempt: b.attempt,
        created_at: b.created_at,
        error: b.last_error.as_ref().map(|e| wire::LastError {
            attempt: e.attempt,
            kind: failure_kind(e.kind),
            message: e.message.clone(),
            step: e.step.clone(),
        }),
        failures: b.failures,
        key: key.to_owned(),
        last_seq: b.last_seq,
        links: wire::Links::for_key(key),
        queue_position: None,
        reproduction: b.reproduction.as_ref().map(|r| reproduction(key, r)),
        request: request(&b.request),
        status: status(b.status),
        step: b.current_step.clone(),
        updated_at: b.updated_at,
    }
}

fn reproduction(key: &str, r: &cbs_projections::Reproduction) -> wire::ReproductionInfo {
    use cbs_events::ReproductionReason as R;
    use cbs_projections::ReproductionStatus as S;
    wire::ReproductionInfo {
        builder_image: r.builder_image.clone(),
        builder_image_id: r.builder_image_id.clone(),
        finished_at: r.finished_at,
        message: Some(r.message.clone()).filter(|m| !m.is_empty()),
        provenance: (r.status == S::Matched && !r.files.is_empty())
            .then(|| format!("/api/build/{key}/reproduction")),
        reason: match r.reason {
            R::Sample => wire::ReproductionReason::Sample,
            R::Admin => wire::ReproductionReason::Admin,
            R::Released => wire::ReproductionReason::Released,
            R::LeaseExpired => wire::ReproductionReason::LeaseExpired,
        },
        reproduction: r.reproduction,
        requested_at: r.requested_at,
        sha256: r.sha256.clone(),
        status: match r.status {
            S::Queued => wire::ReproductionStatus::Queued,
            S::Running => wire::ReproductionStatus::Running,
            S::Matched => wire::ReproductionStatus::Matched,
            S::Mismatched => wire::ReproductionStatus::Mismatched,
            S::Failed => wire::ReproductionStatus::Failed,
        },
        worker: r.worker.clone(),
    }
}

/// A stored event's `type` and `data` as clients read them (the stored payload, typed).
pub fn event_data(e: &RecordedEvent) -> Result<wire::EventData, ApiError> {
    let bad = |what: String| ApiError::internal("event as JSON", what);
    let t: wire::EventType = e
        .event
        .event_type()
        .as_str()
        .parse()
        .map_err(|err: wire::UnknownEventType| bad(err.to_string()))?;
    wire::EventData::from_parts(t, e.event.encode()).map_err(|err| bad(err.to_string()))
}

/// One event of a build's history.
pub fn history_event(e: &RecordedEvent) -> Result<wire::HistoryEvent, ApiError> {
    Ok(wire::HistoryEvent {
        data: event_data(e)?,
        seq: e.seq,
        time: e.recorded_at,
    })
}

/// One event of the global feed.
pub fn feed_event(e: &RecordedEvent) -> Result<wire::FeedEvent, ApiError> {
    Ok(wire::FeedEvent {
        cursor: e.cursor().to_string(),
        data: event_data(e)?,
        key: e.key.as_str().to_owned(),
        seq: e.seq,
        time: e.recorded_at,
    })
}

/// `{"result": <build>}`.
pub fn build_envelope(b: &BuildState) -> wire::BuildResponse {
    wire::Envelope::new(build(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every status and reason has its wire name, and the names agree with the server's.
    #[test]
    fn names_agree() {
        for s in Status::ALL {
            let w = status(s);
            if s == Status::Succeeded {
                assert_eq!(w.as_str(), "complete");
            } else {
                assert_eq!(w.as_str(), s.as_str());
            }
        }
        for r in [
            RequeueReason::LeaseExpired,
            RequeueReason::Preempted,
            RequeueReason::Retry,
            RequeueReason::Forced,
        ] {
            assert_eq!(
                serde_json::to_value(requeue_reason(r)).unwrap(),
                serde_json::to_value(r).unwrap()
            );
        }
        for k in [FailureKind::Retryable, FailureKind::Permanent] {
            assert_eq!(
                serde_json::to_value(failure_kind(k)).unwrap(),
                serde_json::to_value(k).unwrap()
            );
        }
    }

    /// The wire vocabulary of event types is the server's, name for name.
    #[test]
    fn event_types_agree() {
        for t in cbs_events::EventType::ALL {
            let w: wire::EventType = t.as_str().parse().unwrap();
            assert_eq!(w.as_str(), t.as_str());
        }
        assert_eq!(cbs_events::EventType::ALL.len(), wire::EventType::ALL.len());
    }

    /// The typed request writes what the domain's request writes.
    #[test]
    fn requests_agree() {
        let r = BuildRequest::new(
            cbs_domain::Platform::new("linux", "arm", Some("7")).unwrap(),
            "v2.8.4".parse().unwrap(),
            vec![cbs_domain::Plugin {
                module: "github.com/acme/alpha".parse().unwrap(),
                version: "v1.0.0".parse().unwrap(),
            }],
            vec![cbs_domain::Replacement {
                old: "github.com/acme/old".parse().unwrap(),
                new: "github.com/acme/new".parse().unwrap(),
                version: "v0.1.0".parse().unwrap(),
            }],
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&request(&r)).unwrap(),
            serde_json::to_string(&serde_json::to_value(&r).unwrap()).unwrap()
        );
    }
}
