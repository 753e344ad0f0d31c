//! Admin endpoints (the `admin` scope): cancel a build, ask for a reproducibility check of
//! one, list the queue, list the workers with their builds.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cbs_api_types as wire;
use cbs_events::{Cancelled, Event, ReproductionReason, ReproductionRequested};
use cbs_projections::{BuildState, Status};

use super::builds::parse_key;
use super::error::ApiError;
use super::ApiState;

/// Builds listed at most.
pub(super) const LIST_LIMIT: u32 = 1000;

/// `POST /api/build/{key}/cancel`: cancels a queued or running build (a `cancelled` event;
/// the worker running it stops its container). 409 for a build that has ended.
pub async fn cancel(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.tokens.admin(&headers, "cancelling a build")?;
    let key = parse_key(&key)?;
    let reason = format!("cancelled by {}", caller.name().unwrap_or("an admin"));
    let event = Event::Cancelled(Cancelled { reason });
    match state.app.store.append_latest(&key, event).await {
        Ok(b) => {
            cbs_metrics::metrics().builds_cancelled.inc();
            tracing::info!(build.key = %key, token = caller.name().unwrap_or_default(), "build cancelled");
            Ok(Json(super::wire::build_envelope(&b)).into_response())
        }
        Err(cbs_store::StoreError::NotFound(_)) => {
            Err(ApiError::not_found(format!("no build with key {key}")))
        }
        Err(cbs_store::StoreError::Rejected(_)) => {
            let status = state
                .app
                .store
                .build(&key)
                .await?
                .map(|b| super::builds::status_name(b.status).to_owned())
                .unwrap_or_default();
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("build {key} is {status}: only queued or running builds, and failed ones that will be retried, can be cancelled"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /api/build/{key}/reproduce`: asks for a reproducibility check of a succeeded
/// build (a `reproduction_requested` event): a worker other than the one that built it
/// builds the request again and the result says whether the bytes are the same. Works
/// whatever `janitor.reproduce` says. 409 for a build that has not succeeded or whose check
/// is already queued or running. 202 with the build's status.
pub async fn reproduce(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state
        .tokens
        .admin(&headers, "asking for a reproducibility check")?;
    let key = parse_key(&key)?;
    let store = &state.app.store;
    let b = store
        .build(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build with key {key}")))?;
    if b.status != Status::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "build {key} is {}: only a succeeded build can be reproduced",
                super::builds::status_name(b.status)
            ),
        ));
    }
    if let Some(r) = b.reproduction.as_ref().filter(|r| !r.status.ended()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "build {key} already has a reproducibility check {}; its result will be in the build's status",
                r.status.as_str()
            ),
        ));
    }
    let event = Event::ReproductionRequested(ReproductionRequested {
        reproduction: b.reproduction.as_ref().map_or(0, |r| r.reproduction),
        reason: ReproductionReason::Admin,
    });
    match store.append(&b, event).await {
        Ok(next) => {
            tracing::info!(build.key = %key, token = caller.name().unwrap_or_default(), "reproducibility check requested");
            Ok((
                StatusCode::ACCEPTED,
                Json(super::wire::build_envelope(&next)),
            )
                .into_response())
        }
        Err(cbs_store::StoreError::Conflict { .. } | cbs_store::StoreError::Rejected(_)) => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("build {key} changed while the check was being requested; read its status and try again"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

fn limit_param(query: Option<&str>) -> Result<i64, ApiError> {
    let mut limit = i64::from(LIST_LIMIT);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => limit = i64::from(super::builds::parse_limit(&v, LIST_LIMIT)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: limit",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    Ok(limit)
}

fn entry(b: &BuildState) -> wire::QueueEntry {
    wire::QueueEntry::new(
        super::wire::build(b),
        b.available_at,
        b.lease_expires_at,
        b.owner.clone(),
    )
}

/// `GET /api/admin/queue[?limit=N]`: running builds, then queued ones in the order workers
/// take them.
pub async fn queue(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.tokens.admin(&headers, "listing the queue")?;
    let limit = limit_param(query.as_deref())?;
    let builds = state.app.store.active_builds(limit).await?;
    let builds = builds.iter().map(entry).collect();
    Ok(Json(wire::Envelope::new(wire::QueueList { builds })).into_response())
}

/// `GET /api/admin/workers`: the workers that hold builds now, each with its builds, their
/// steps and lease ends (a lease is renewed every third of `worker.lease`; `updated_at` is
/// the build's last event, renewals included).
pub async fn workers(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.tokens.admin(&headers, "listing the workers")?;
    let builds = state.app.store.active_builds(i64::from(LIST_LIMIT)).await?;
    let mut by_worker: BTreeMap<String, Vec<wire::WorkerBuild>> = BTreeMap::new();
    for b in builds.iter().filter(|b| b.status == Status::Running) {
        let worker = b.owner.clone().unwrap_or_default();
        by_worker
            .entry(worker)
            .or_default()
            .push(wire::WorkerBuild {
                attempt: b.attempt,
                key: b.key.as_str().to_owned(),
                lease_expires_at: b.lease_expires_at,
                step: b.current_step.clone(),
                updated_at: b.updated_at,
            });
    }
    let workers = by_worker
        .into_iter()
        .map(|(worker, builds)| wire::Worker { builds, worker })
        .collect();
    Ok(Json(wire::Envelope::new(wire::WorkerList { workers })).into_response())
}
