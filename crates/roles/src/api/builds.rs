//! Build endpoints: submit, status with long-poll, history, the global audit feed.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cbs_api_types as wire;
use cbs_domain::BuildKey;
use cbs_events::{Event, EventType, GlobalCursor, RequeueReason, Requeued};
use cbs_goproxy::ResolveError;
use cbs_projections::{BuildState, Status};

use super::error::ApiError;
use super::params::{self, Parsed};
use super::ApiState;

/// `status` as clients know it: `complete` for a finished build.
pub fn status_name(s: Status) -> &'static str {
    super::wire::status(s).as_str()
}

/// The body of a status answer.
pub fn status_body(b: &BuildState) -> Bytes {
    // Strings, numbers and timestamps only: serializing cannot fail.
    Bytes::from(serde_json::to_vec(&super::wire::build_envelope(b)).expect("status JSON"))
}

pub fn parse_key(key: &str) -> Result<BuildKey, ApiError> {
    key.parse()
        .map_err(|e| ApiError::bad_request(format!("invalid build key: {e}")))
}

fn resolve_error(e: ResolveError) -> ApiError {
    match e {
        ResolveError::NotFound { .. } | ResolveError::BadAnswer { .. } => {
            ApiError::bad_request(e.to_string())
        }
        ResolveError::Unavailable { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        ResolveError::BadSetting(_) => ApiError::internal("module proxy setting", e),
    }
}

/// Whether a request reopens an existing build: a forced one reopens any build that ended
/// without an artifact ([`Status::reopenable`]); any request reopens an expired build (its
/// files were deleted for retention: it is rebuilt on request).
fn reopens(force: bool, status: Status) -> bool {
    (force && status.reopenable()) || status == Status::Expired
}

/// Takes a submission token for the client, or says when to come back (429).
pub fn rate_limit(
    state: &ApiState,
    client: Option<&super::limit::ClientAddr>,
) -> Result<(), ApiError> {
    let (Some(limiter), Some(client)) = (&state.limiter, client) else {
        return Ok(());
    };
    limiter.check(client.0).map_err(|wait| {
        cbs_metrics::metrics().refused("submissions");
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many new builds from {}; try again in {} s (joining a build in progress and downloading are not limited)",
                super::limit::client_key(client.0),
                wait.as_secs().max(1)
            ),
        )
        .retry_after(wait.as_secs().max(1))
    })
}

/// The id a build records for who requested it: the token's name, or a keyed hash of the
/// client's address (IPv6: its /64), so that the public history does not show addresses.
pub async fn requester_id(
    state: &ApiState,
    caller: &super::access::Caller,
    client: Option<&super::limit::ClientAddr>,
) -> Result<Option<String>, ApiError> {
    use sha2::Digest;
    if let Some(name) = caller.name() {
        return Ok(Some(format!("token:{name}")));
    }
    let Some(client) = client else {
        return Ok(None);
    };
    let ip = super::limit::client_key(client.0);
    let salt = state
        .client_salt
        .get_or_try_init(|| state.app.store.deployment_id())
        .await?;
    let mut h = sha2::Sha256::new();
    h.update(salt.as_bytes());
    h.update(b"\0");
    h.update(ip.to_string().as_bytes());
    let digest = h.finalize();
    Ok(Some(format!("addr:{}", hex::encode(&digest[..8]))))
}

/// Refuses (429) a new build for a client that has `api.max_queued_per_client` builds
/// queued or running. Admins are not limited. Two concurrent requests of one client may
/// both pass at the limit; the submission rate limit bounds that overshoot.
async fn queue_cap(
    state: &ApiState,
    caller: &super::access::Caller,
    requester: Option<&str>,
) -> Result<(), ApiError> {
    let cap = state.app.config.api.max_queued_per_client;
    let (Some(requester), false) = (requester, cap == 0 || caller.is_admin()) else {
        return Ok(());
    };
    let active = state.app.store.client_active_builds(requester).await?;
    if usize::try_from(active).unwrap_or(usize::MAX) >= cap {
        cbs_metrics::metrics().refused("queue");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "you have {active} builds queued or running; this server builds at most {cap} per client at a time: try again when one has finished (joining a build in progress and downloading are not limited)"
            ),
        )
        .retry_after(30));
    }
    Ok(())
}

/// Refuses a request the server's rules forbid (denied or uncatalogued modules,
/// replacements without the right, force without the admin scope): before anything is
/// resolved or recorded.
fn check_allowed(
    state: &ApiState,
    parsed: &Parsed,
    caller: &super::access::Caller,
) -> Result<(), ApiError> {
    let packages = &state.app.config.packages;
    let spec = &parsed.spec;
    // Every module the build would contain or replace, under the deny and catalog rules;
    // a replaced module (`old`) is under the deny rules only (it need not be in the
    // catalog: Caddy's own dependencies are not).
    for m in spec.plugins.iter().map(|p| p.module.as_str()) {
        if let Some(why) = packages.refusal(m) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, why));
        }
    }
    for r in &spec.replacements {
        // Replacing is an operator's power: it changes what a signed binary contains.
        if !caller.is_admin() && !packages.anyone_may_replace(r.old.as_str()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "replacing {} needs an API token with the admin scope on this server (packages.replaceable lists what anyone may replace)",
                    r.old
                ),
            ));
        }
        if let Some(why) = packages.refusal(r.new.as_str()) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, why));
        }
        if let Some(why) = packages.denial(r.old.as_str()) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, why));
        }
    }
    if parsed.force && !state.tokens.may_force(caller) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "force needs an API token with the admin scope on this server",
        ));
    }
    Ok(())
}

/// Resolves, keys and records a request (once per key, however many ask at once);
/// reopens a failed build when forced.
pub async fn submit(
    state: &ApiState,
    parsed: Parsed,
    caller: &super::access::Caller,
    client: Option<&super::limit::ClientAddr>,
) -> Result<BuildState, ApiError> {
    check_allowed(state, &parsed, caller)?;
    let request = state
        .resolver
        .resolve_spec(&parsed.spec)
        .await
        .map_err(resolve_error)?;
    let key = request.key();
    // Only work that is new counts against the client's submission rate: joining a build
    // in progress or downloading a finished one is free (50 servers behind one NAT asking
    // for the same binary are one build).
    let existing = state.app.store.build(&key).await?;
    let creates = match &existing {
        None => true,
        Some(b) => reopens(parsed.force, b.status),
    };
    // Who asks matters only for work it creates (joining a build is free).
    let requester = if creates {
        rate_limit(state, client)?;
        let requester = requester_id(state, caller, client).await?;
        queue_cap(state, caller, requester.as_deref()).await?;
        requester
    } else {
        None
    };
    // A build that exists is joined as read (one round trip); only a new key is recorded
    // (a concurrent identical request may record it first: then that one is joined).
    let metrics = cbs_metrics::metrics();
    let mut build = match existing {
        Some(b) => {
            if !reopens(parsed.force, b.status) {
                metrics.builds_joined.inc();
            }
            b
        }
        None => {
            let outcome = state
                .app
                .store
                .request_build_for(&key, &request, requester.as_deref())
                .await?;
            if outcome.created {
                metrics.builds_requested.inc();
            } else {
                metrics.builds_joined.inc();
            }
            outcome.build
        }
    };
    if reopens(parsed.force, build.status) {
        let event = Event::Requeued(Requeued {
            attempt: build.attempt,
            reason: RequeueReason::Forced,
            not_before: chrono::Utc::now(),
        });
        build = match state.app.store.append_latest(&key, event).await {
            Ok(b) => b,
            // Someone else reopened it first: fine, report what is there now.
            Err(cbs_store::StoreError::Rejected(_)) => state
                .app
                .store
                .build(&key)
                .await?
                .ok_or_else(|| ApiError::not_found("build vanished"))?,
            Err(e) => return Err(e.into()),
        };
    }
    Ok(build)
}

/// `POST /api/build`: a JSON body, or the same request as query parameters.
pub async fn post_build(
    State(state): State<ApiState>,
    client: Option<axum::Extension<super::limit::ClientAddr>>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.tokens.submitter(&headers)?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        params::from_query(query.as_deref())?
    } else {
        if query.as_deref().is_some_and(|q| !q.is_empty()) {
            return Err(ApiError::bad_request(
                "send the request either as a JSON body or as query parameters, not both",
            ));
        }
        params::from_json(&body)?
    };
    let build = submit(&state, parsed, &caller, client.as_deref()).await?;
    let code = match build.status {
        Status::Succeeded => StatusCode::OK,
        Status::Failed | Status::Cancelled | Status::GaveUp if build.is_terminal() => {
            StatusCode::OK
        }
        _ => StatusCode::ACCEPTED,
    };
    Ok((code, Json(super::wire::build_envelope(&build))).into_response())
}

/// `GET /api/resolve?<the parameters of POST /api/build>`: what the request resolves to and
/// its build key, and that build if it exists; under the same rules as a submission, but
/// nothing is recorded and no limit is charged.
pub async fn resolve(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.tokens.submitter(&headers)?;
    let parsed = params::from_query(query.as_deref())?;
    if parsed.force {
        return Err(ApiError::bad_request(
            "force is a parameter of POST /api/build, not of a resolution",
        ));
    }
    check_allowed(&state, &parsed, &caller)?;
    let request = state
        .resolver
        .resolve_spec(&parsed.spec)
        .await
        .map_err(resolve_error)?;
    let key = request.key();
    let build = state.app.store.build(&key).await?;
    Ok(Json(wire::Envelope::new(wire::Resolution {
        build: build.as_ref().map(super::wire::build),
        key: key.as_str().to_owned(),
        request: super::wire::request(&request),
    }))
    .into_response())
}

/// `GET /api/artifacts/{sha256}`: the builds whose binary has these bytes (what a client
/// that holds a binary asks: did this server build it?); 404 when none.
pub async fn by_artifact(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let sha256 = sha256.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "a binary's SHA-256 is 64 hex digits (as sha256sum prints it)",
        ));
    }
    let builds = state.app.store.builds_by_artifact(&sha256).await?;
    if builds.is_empty() {
        return Err(ApiError::not_found(format!(
            "no build of this server has a binary with SHA-256 {sha256}"
        )));
    }
    let builds: Vec<wire::Build> = builds.iter().map(super::wire::build).collect();
    Ok(Json(wire::Envelope::new(builds)).into_response())
}

/// `GET /api/artifacts?modules_sha256=<hex>`: the builds whose binary links exactly these
/// modules at these versions (the module-list hash its signature's trusted comment states),
/// any platform, newest first; 404 when none. What a client holding a binary that this
/// server never built asks: did it build that request, to other bytes?
pub async fn by_modules(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut hash = None;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "modules_sha256" => hash = Some(v.to_ascii_lowercase()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: modules_sha256",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let hash = hash.ok_or_else(|| {
        ApiError::bad_request(
            "modules_sha256 is required (the module-list hash of a binary, 64 hex digits)",
        )
    })?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "modules_sha256 is 64 hex digits (the module-list hash in a signature's trusted comment)",
        ));
    }
    let builds = state.app.store.builds_by_modules(&hash).await?;
    if builds.is_empty() {
        return Err(ApiError::not_found(format!(
            "no build of this server links the modules with list hash {hash}"
        )));
    }
    let builds: Vec<wire::Build> = builds.iter().map(super::wire::build).collect();
    Ok(Json(wire::Envelope::new(builds)).into_response())
}

/// How long the Caddy versions of `/api/options` are reused.
const CADDY_VERSIONS_TTL: Duration = Duration::from_secs(300);

/// A value read at most once per `ttl` by one request while the others wait for its
/// answer; a failed read is not kept (the next request tries again).
#[derive(Debug)]
pub struct Cached<T> {
    ttl: Duration,
    value: tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<T>)>>,
}

impl<T> Cached<T> {
    pub fn new(ttl: Duration) -> Cached<T> {
        Cached {
            ttl,
            value: tokio::sync::Mutex::new(None),
        }
    }

    async fn get<E, F>(&self, load: impl FnOnce() -> F) -> Result<std::sync::Arc<T>, E>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        let mut value = self.value.lock().await;
        if let Some((at, v)) = value.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(v.clone());
            }
        }
        let v = std::sync::Arc::new(load().await?);
        *value = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
    }
}

/// The Caddy versions the module proxy lists.
pub type CaddyVersions = Cached<Vec<String>>;

impl Default for CaddyVersions {
    fn default() -> Self {
        Cached::new(CADDY_VERSIONS_TTL)
    }
}

/// `GET /api/options`: what a build request can choose on this server.
pub async fn options(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.tokens.caller(&headers)?;
    let packages = &state.app.config.packages;
    let versions = state
        .caddy_versions
        .get(|| async {
            let list = state
                .resolver
                .list_versions(&cbs_domain::caddy_module())
                .await?;
            Ok::<_, cbs_goproxy::ResolveError>(list.iter().map(|v| v.as_str().to_owned()).collect())
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list Caddy's versions");
            std::sync::Arc::new(Vec::new())
        });
    Ok(Json(wire::Envelope::new(wire::ServerOptions {
        caddy_versions: versions.as_ref().clone(),
        platforms: cbs_domain::platform::PLATFORMS
            .iter()
            .map(|(os, arch)| wire::PlatformOption {
                arch: (*arch).to_owned(),
                os: (*os).to_owned(),
            })
            .collect(),
        replaceable: packages.replaceable.clone(),
        replacements_allowed: caller.is_admin() || !packages.replaceable.is_empty(),
    }))
    .into_response())
}

/// After a failed read, a waiting request tries again this soon (or at the next wake-up).
pub const READ_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Query parameters of the status long-poll.
struct WaitParams {
    wait: Duration,
    after: Option<u32>,
}

fn wait_params(query: Option<&str>, max: Duration) -> Result<WaitParams, ApiError> {
    let mut p = WaitParams {
        wait: Duration::ZERO,
        after: None,
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "wait" => {
                let d = humantime::parse_duration(&v).map_err(|_| {
                    ApiError::bad_request(format!(
                        "wait {:?} is not a duration like 30s or 2m",
                        v.chars().take(40).collect::<String>()
                    ))
                })?;
                p.wait = d.min(max);
            }
            "after" => {
                p.after = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "after {:?} is not an event sequence number",
                        v.chars().take(40).collect::<String>()
                    ))
                })?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: wait, after",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    Ok(p)
}

/// `GET /api/build/{key}[?wait=30s&after=N]`: the build's status; with `wait`, answers as
/// soon as the build has an event after `after` (default: its current last event), or when
/// the wait ends. Woken through the process's one listening connection.
pub async fn get_build(
    State(state): State<ApiState>,
    client: Option<axum::Extension<super::limit::ClientAddr>>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let p = wait_params(query.as_deref(), state.app.config.api.max_long_poll)?;
    let _wait = if p.wait.is_zero() {
        None
    } else {
        Some(super::open_wait(&state, client.as_deref(), "long_poll")?)
    };
    // Subscribe before reading: a commit between the read and the wait still wakes us.
    let mut waiter = state.app.hub.watch_build(&key);
    let deadline = tokio::time::Instant::now() + p.wait;
    let render = status_body;
    let answer = |body: Bytes| {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    // The first read is always fresh from the database; like every read of a waiting
    // request, it is retried until the deadline if the database is away.
    let build = loop {
        match state.app.store.build(&key).await {
            Ok(b) => break b,
            Err(e) if tokio::time::Instant::now() + READ_RETRY_PAUSE < deadline => {
                tracing::warn!(build.key = %key, error = %e, "long-poll read failed; trying again");
                tokio::time::sleep(READ_RETRY_PAUSE).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    .ok_or_else(|| ApiError::not_found(format!("no build with key {key}")))?;
    let after = p.after.unwrap_or(build.last_seq);
    if p.wait.is_zero() && build.status == Status::Queued {
        // A plain read of a queued build says where it stands in the queue.
        let mut body = super::wire::build_envelope(&build);
        body.result.queue_position = state.app.store.queue_position(&key).await?;
        return Ok(Json(body).into_response());
    }
    if build.last_seq > after || p.wait.is_zero() {
        return Ok(answer(render(&build)));
    }
    loop {
        tokio::select! {
            _ = waiter.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        // Woken: many waiters of this build read it once between them.
        // `after` is the client's: u32::MAX must not overflow.
        let min_seq = waiter.latest_seq().max(after.saturating_add(1));
        // The database may be away (a restart, a failover): the client asked to wait, so
        // reads are retried until the deadline.
        let fresh = loop {
            match state
                .fresh
                .get(&state.app.store, &key, min_seq, render)
                .await
            {
                Ok(f) => break f,
                Err(e) if tokio::time::Instant::now() + READ_RETRY_PAUSE < deadline => {
                    tracing::warn!(build.key = %key, error = %e, "long-poll read failed; trying again");
                    tokio::time::sleep(READ_RETRY_PAUSE).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        .ok_or_else(|| ApiError::not_found(format!("no build with key {key}")))?;
        if fresh.last_seq > after || tokio::time::Instant::now() >= deadline {
            return Ok(answer(fresh.body));
        }
    }
}

/// A `limit` query parameter: a number from 1 to `max`.
pub fn parse_limit(v: &str, max: u32) -> Result<u32, ApiError> {
    v.parse::<u32>()
        .ok()
        .filter(|l| (1..=max).contains(l))
        .ok_or_else(|| ApiError::bad_request(format!("limit must be a number from 1 to {max}")))
}

/// Events a history page holds at most (and by default).
pub const HISTORY_PAGE: u32 = 1000;

/// `GET /api/build/{key}/history[?after=<seq>&limit=<n>]`: the build's events, a page at a
/// time; `next` is the `after` of the next page (null on the last one).
pub async fn history(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let mut after = 0u32;
    let mut limit = HISTORY_PAGE;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                after = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("after must be an event sequence number"))?
            }
            "limit" => limit = parse_limit(&v, HISTORY_PAGE)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: after, limit",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let events = state.app.store.events(&key, after, limit).await?;
    if events.is_empty() && (after == 0 || state.app.store.build(&key).await?.is_none()) {
        return Err(ApiError::not_found(format!("no build with key {key}")));
    }
    let next = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    let events = events
        .iter()
        .map(super::wire::history_event)
        .collect::<Result<_, _>>()?;
    Ok(Json(wire::Envelope::new(wire::HistoryPage {
        events,
        key: key.as_str().to_owned(),
        next,
    }))
    .into_response())
}

/// Output chunks a page holds at most (and by default).
pub const OUTPUT_PAGE: u32 = 200;

/// `GET /api/build/{key}/output[?after=<attempt>.<seq>&limit=<n>]`: the build's output
/// chunks in order, a page at a time, and which attempts' output retention removed.
pub async fn output(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let mut after = (0u32, 0u32);
    let mut limit = OUTPUT_PAGE;
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                after = v
                    .split_once('.')
                    .and_then(|(a, c)| Some((a.parse().ok()?, c.parse().ok()?)))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "after must be <attempt>.<seq> of a chunk, like 1.20 (`next` of the previous page)",
                        )
                    })?
            }
            "limit" => limit = parse_limit(&v, OUTPUT_PAGE)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: after, limit",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    // The chunks first, then the build: a prune that commits between the two reads shows as
    // chunks with a note that they are pruned, never as no output and no note.
    let chunks = state.app.store.output(&key, after, limit).await?;
    let Some(build) = state.app.store.build(&key).await? else {
        return Err(ApiError::not_found(format!("no build with key {key}")));
    };
    let next = (chunks.len() == limit as usize)
        .then(|| chunks.last().map(|c| format!("{}.{}", c.attempt, c.seq)))
        .flatten();
    let chunks = chunks
        .into_iter()
        .map(|c| wire::OutputChunk {
            after_seq: c.after_seq,
            attempt: c.attempt,
            lines: c.lines,
            seq: c.seq,
            step: c.step,
            time: c.recorded_at,
            truncated: c.truncated,
        })
        .collect();
    Ok(Json(wire::Envelope::new(wire::OutputPage {
        chunks,
        key: key.as_str().to_owned(),
        next,
        pruned_attempts: build.output_pruned,
    }))
    .into_response())
}

/// Events a feed page holds at most.
pub const FEED_PAGE: u32 = 1000;

/// `GET /api/events?after=<cursor>&limit=N&type=a,b`: the global audit feed, paged without
/// skipping transactions that commit late; `?last=N` instead gives the newest N events and
/// the cursor to read on from (what a live view starts with).
pub async fn feed(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut after = None;
    let mut limit: u32 = 100;
    let mut last = None;
    let mut types: Vec<EventType> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "after" => {
                after = Some(
                    v.parse::<GlobalCursor>()
                        .map_err(|e: cbs_events::BadCursor| ApiError::bad_request(e.to_string()))?,
                )
            }
            "limit" => limit = parse_limit(&v, FEED_PAGE)?,
            "last" => {
                last = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|l| (1..=FEED_PAGE).contains(l))
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "last must be a number from 1 to {FEED_PAGE}"
                            ))
                        })?,
                )
            }
            "type" => {
                for t in v.split(',').filter(|t| !t.is_empty()) {
                    types.push(t.parse().map_err(|e: cbs_events::UnknownEventType| {
                        ApiError::bad_request(e.to_string())
                    })?);
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; known: after, limit, last, type",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    // With a type filter, one request scans a bounded stretch of the log; `next` moves past
    // what was scanned, so a type never written costs a bounded read per page.
    let (events, next) =
        match (after, last) {
            (Some(_), Some(_)) => return Err(ApiError::bad_request(
                "give either after (read on from a cursor) or last (the newest events), not both",
            )),
            (None, Some(n)) => state.app.store.feed_tail(n, &types).await?,
            (after, None) => {
                state
                    .app
                    .store
                    .feed(after.unwrap_or_default(), limit, &types)
                    .await?
            }
        };
    let events = events
        .iter()
        .map(super::wire::feed_event)
        .collect::<Result<_, _>>()?;
    Ok(Json(wire::Envelope::new(wire::FeedPage {
        events,
        next: next.to_string(),
    }))
    .into_response())
}

/// How long the build counts of `/api/packages` are reused.
const PACKAGE_COUNTS_TTL: Duration = Duration::from_secs(60);

/// The build counts per plugin module.
pub type PackageCounts = Cached<std::collections::HashMap<String, i64>>;

impl Default for PackageCounts {
    fn default() -> Self {
        Cached::new(PACKAGE_COUNTS_TTL)
    }
}

/// `GET /api/packages`: the catalog, in caddyserver.com's shape, with build counts.
pub async fn packages(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let counts = state
        .package_counts
        .get(|| async { Ok::<_, ApiError>(state.app.store.plugin_counts().await?) })
        .await?;
    let result: Vec<wire::Package> = state
        .app
        .config
        .packages
        .catalog
        .iter()
        .map(|e| wire::Package {
            description: e.description.clone(),
            downloads: counts.get(&e.path).copied().unwrap_or(0),
            modules: e
                .modules
                .iter()
                .map(|m| wire::PackageModule {
                    docs: m.docs.clone(),
                    name: m.name.clone(),
                })
                .collect(),
            path: e.path.clone(),
            repo: e.repo.clone(),
        })
        .collect();
    Ok(Json(wire::Envelope::new(result)).into_response())
}
