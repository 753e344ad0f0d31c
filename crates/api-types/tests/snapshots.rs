//! Snapshots of every wire type, and checks that the bytes are those the api writes today.
//!
//! Each snapshot is `tests/snapshots/<name>.json`, pretty-printed. `UPDATE_SNAPSHOTS=1 cargo
//! test -p cbs-api-types` rewrites them; review the diff: a changed snapshot is a changed API.

use std::fmt::Debug;
use std::path::PathBuf;

use cbs_api_types::events::{
    ArtifactDeleted, Cancelled, Claimed, Failed, GaveUp, LeaseRenewed, Output, OutputPruned,
    Reproduced, ReproductionClaimed, ReproductionRequested, Requested, RequeueReason, Requeued,
    StepFinished, StepStarted, StoredArtifact, Succeeded,
};
use cbs_api_types::*;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

const KEY: &str = "3f7a9c0e5b2d4f6a8c1e3b5d7f9a2c4e6b8d0f1a3c5e7b9d2f4a6c8e0b1d3f5a";
const KEY2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const SHA: &str = "9b74c9897bac770ffc029102a200c5de7c3a4f0e8a2b7d6c5e4f3a2b1c0d9e8f";

fn t(s: &str) -> DateTime<Utc> {
    s.parse().expect("a fixed RFC 3339 timestamp")
}

/// Compares `value`'s pretty JSON with its snapshot (or writes it with `UPDATE_SNAPSHOTS=1`),
/// checks that the snapshot reads back to `value`, and that its keys are in the order a
/// `serde_json::Value` (what the api builds today) writes them.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(name: &str, value: &T) {
    let pretty = serde_json::to_string_pretty(value).unwrap() + "\n";
    let via_value = serde_json::to_string_pretty(&serde_json::to_value(value).unwrap()).unwrap();
    assert_eq!(
        pretty.trim_end(),
        via_value,
        "{name}: fields not in the order the api writes them (alphabetical)"
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.json"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &pretty).unwrap();
    } else {
        let stored = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_SNAPSHOTS=1 to write it)",
                path.display()
            )
        });
        assert_eq!(
            stored,
            pretty,
            "{name}: differs from {} (UPDATE_SNAPSHOTS=1 rewrites it)",
            path.display()
        );
    }
    let stored = std::fs::read_to_string(&path).unwrap();
    let back: T = serde_json::from_str(&stored)
        .unwrap_or_else(|e| panic!("{name}: the snapshot does not read back: {e}"));
    assert_eq!(&back, value, "{name}: reads back to something else");
}

fn request() -> BuildRequest {
    BuildRequest {
        arch: "arm64".into(),
        arm: None,
        caddy_version: "v2.8.4".into(),
        os: "linux".into(),
        plugins: vec![
            Plugin {
                module: "github.com/caddy-dns/cloudflare".into(),
                version: "v0.0.0-20240703190432-89f16b99c18e".into(),
            },
            Plugin {
                module: "github.com/mholt/caddy-l4".into(),
                version: "v0.0.0-20241012124037-5764d700c21e".into(),
            },
        ],
        replacements: vec![Replacement {
            new: "github.com/acme/certmagic-fork".into(),
            old: "github.com/caddyserver/certmagic".into(),
            version: "v0.21.4".into(),
        }],
    }
}

fn arm_request() -> BuildRequest {
    BuildRequest {
        arch: "arm".into(),
        arm: Some(7),
        caddy_version: "v2.8.4".into(),
        os: "linux".into(),
        plugins: vec![],
        replacements: vec![],
    }
}

fn queued_build() -> Build {
    Build {
        artifact: None,
        attempt: 0,
        created_at: t("2026-01-02T03:04:05.123456Z"),
        error: None,
        failures: 0,
        key: KEY2.into(),
        last_seq: 1,
        links: Links::for_key(KEY2),
        queue_position: None,
        reproduction: None,
        request: arm_request(),
        status: BuildStatus::Queued,
        step: None,
        updated_at: t("2026-01-02T03:04:05.123456Z"),
    }
}

fn complete_build() -> Build {
    Build {
        artifact: Some(ArtifactInfo {
            built_by: Some("worker-a".into()),
            sha256: SHA.into(),
            size: 48_234_496,
        }),
        attempt: 2,
        created_at: t("2026-01-02T03:04:05.123456Z"),
        error: Some(LastError {
            attempt: 1,
            kind: FailureKind::Retryable,
            message: "the module proxy did not answer in 30s".into(),
            step: None,
        }),
        failures: 1,
        key: KEY.into(),
        last_seq: 14,
        links: Links::for_key(KEY),
        queue_position: None,
        reproduction: Some(ReproductionInfo {
            builder_image: Some("cbs-builder:go1.25.1".into()),
            builder_image_id: Some(format!("sha256:{SHA}")),
            finished_at: Some(t("2026-01-02T03:09:12Z")),
            message: None,
            provenance: Some(format!("/api/build/{KEY}/reproduction")),
            reason: ReproductionReason::Sample,
            reproduction: 1,
            requested_at: t("2026-01-02T03:07:42Z"),
            sha256: Some(SHA.into()),
            status: ReproductionStatus::Matched,
            worker: Some("worker-b".into()),
        }),
        request: request(),
        status: BuildStatus::Succeeded,
        step: None,
        updated_at: t("2026-01-02T03:07:41Z"),
    }
}

fn running_build() -> Build {
    Build {
        artifact: None,
        attempt: 1,
        created_at: t("2026-01-02T03:04:05.123456Z"),
        error: None,
        failures: 0,
        key: KEY.into(),
        last_seq: 5,
        links: Links::for_key(KEY),
        queue_position: None,
        reproduction: None,
        request: request(),
        status: BuildStatus::Running,
        step: Some("compile".into()),
        updated_at: t("2026-01-02T03:05:00Z"),
    }
}

fn all_events() -> Vec<EventData> {
    let lease = t("2026-01-02T03:06:00Z");
    vec![
        EventData::Requested(Requested {
            client: Some("addr:0123456789abcdef".into()),
            rank: 3,
            request: request(),
        }),
        EventData::Claimed(Claimed {
            attempt: 1,
            lease_expires_at: lease,
            worker: "worker-7f3a".into(),
        }),
        EventData::LeaseRenewed(LeaseRenewed {
            attempt: 1,
            lease_expires_at: t("2026-01-02T03:07:00Z"),
        }),
        EventData::StepStarted(StepStarted {
            attempt: 1,
            step: "pin_versions".into(),
        }),
        EventData::Output(Output {
            attempt: 1,
            lines: vec![
                "go: downloading github.com/caddy-dns/cloudflare v0.0.0".into(),
                "go: added github.com/mholt/caddy-l4".into(),
            ],
            step: "pin_versions".into(),
        }),
        EventData::StepFinished(StepFinished {
            attempt: 1,
            duration_ms: 12_345,
            exit_code: None,
            step: "pin_versions".into(),
        }),
        EventData::Failed(Failed {
            attempt: 1,
            kind: FailureKind::Retryable,
            message: "the module proxy did not answer in 30s".into(),
            step: None,
        }),
        EventData::Requeued(Requeued {
            attempt: 1,
            not_before: t("2026-01-02T03:06:30Z"),
            reason: RequeueReason::Retry,
        }),
        EventData::StepFinished(StepFinished {
            attempt: 2,
            duration_ms: 61_002,
            exit_code: Some(0),
            step: "compile".into(),
        }),
        EventData::Succeeded(Succeeded {
            artifact: StoredArtifact {
                files: vec![
                    "caddy".into(),
                    "caddy.minisig".into(),
                    "caddy.sha256".into(),
                    "provenance.json".into(),
                    "provenance.json.minisig".into(),
                ],
                location: format!("builds/{KEY}/2"),
                modules_sha256: Some("4".repeat(64)),
                sha256: SHA.into(),
                size: 48_234_496,
            },
            attempt: 2,
        }),
        EventData::ArtifactDeleted(ArtifactDeleted {
            attempt: 2,
            reason: "not downloaded for 90 days".into(),
        }),
        EventData::Failed(Failed {
            attempt: 3,
            kind: FailureKind::Permanent,
            message: "step compile failed: undefined: caddy.Foo".into(),
            step: Some("compile".into()),
        }),
        EventData::GaveUp(GaveUp {
            attempt: 4,
            failures: 3,
            message: "the module proxy did not answer in 30s".into(),
        }),
        EventData::Cancelled(Cancelled {
            reason: "cancelled by ops".into(),
        }),
        EventData::ReproductionRequested(ReproductionRequested {
            reason: ReproductionReason::Admin,
            reproduction: 0,
        }),
        EventData::ReproductionClaimed(ReproductionClaimed {
            lease_expires_at: t("2026-01-02T04:09:12Z"),
            reproduction: 1,
            worker: "worker-b".into(),
        }),
        EventData::Reproduced(Reproduced {
            builder_image: Some("cbs-builder:go1.25.1".into()),
            builder_image_id: Some(format!("sha256:{SHA}")),
            files: vec![],
            message: "other bytes; differences in the build information: build setting GOAMD64: \"v3\" here, \"v1\" published".into(),
            outcome: ReproductionOutcome::Mismatched,
            reproduction: 1,
            sha256: Some("0".repeat(64)),
            worker: "worker-b".into(),
        }),
        EventData::OutputPruned(OutputPruned {
            attempts: 1,
            bytes: 48_213,
            chunks: 12,
            reason: "output of succeeded builds is kept for 30days".into(),
        }),
    ]
}

fn history_page() -> HistoryResponse {
    let events: Vec<HistoryEvent> = all_events()
        .into_iter()
        .enumerate()
        .map(|(i, data)| HistoryEvent {
            data,
            seq: i as u32 + 1,
            time: t("2026-01-02T03:04:05.123456Z") + chrono::Duration::seconds(i as i64 * 7),
        })
        .collect();
    Envelope::new(HistoryPage {
        events,
        key: KEY.into(),
        next: None,
    })
}

#[test]
fn snapshots() {
    check("build_queued", &Envelope::new(queued_build()));
    check("build_complete", &Envelope::new(complete_build()));
    check("build_running", &Envelope::new(running_build()));
    check(
        "build_submission",
        &BuildSubmission {
            arch: "arm".into(),
            arm: Some(ArmValue::Number(7)),
            caddy_version: Some("v2.8.4".into()),
            force: true,
            os: "linux".into(),
            plugins: vec![
                PluginSubmission {
                    module: "github.com/caddy-dns/cloudflare".into(),
                    version: None,
                },
                PluginSubmission {
                    module: "github.com/mholt/caddy-l4".into(),
                    version: Some("master".into()),
                },
            ],
            replacements: vec![ReplacementSubmission {
                new: "github.com/acme/certmagic-fork".into(),
                old: "github.com/caddyserver/certmagic".into(),
                version: Some("v0.21.4".into()),
            }],
        },
    );
    check(
        "build_submission_minimal",
        &BuildSubmission {
            arch: "amd64".into(),
            arm: Some(ArmValue::Text("7".into())),
            caddy_version: None,
            force: false,
            os: "linux".into(),
            plugins: vec![],
            replacements: vec![],
        },
    );
    check("history", &history_page());
    check(
        "output",
        &OutputResponse::new(OutputPage {
            chunks: vec![
                OutputChunk {
                    after_seq: 4,
                    attempt: 2,
                    lines: vec![
                        "go: downloading github.com/caddyserver/caddy/v2 v2.10.0".into(),
                        "go: added github.com/acme/alpha v1.2.0".into(),
                    ],
                    seq: 1,
                    step: "pin_versions".into(),
                    time: t("2026-01-02T03:04:06.5Z"),
                    truncated: false,
                },
                OutputChunk {
                    after_seq: 7,
                    attempt: 2,
                    lines: vec![
                        "[output truncated: 12 more lines (480 bytes) were not kept]".into(),
                    ],
                    seq: 2,
                    step: "compile".into(),
                    time: t("2026-01-02T03:05:01Z"),
                    truncated: true,
                },
            ],
            key: KEY.into(),
            next: Some("2.2".into()),
            pruned_attempts: 1,
        }),
    );
    check(
        "history_full_page",
        &Envelope::new(HistoryPage {
            events: history_page().result.events[..2].to_vec(),
            key: KEY.into(),
            next: Some(2),
        }),
    );
    let feed: Vec<FeedEvent> = history_page()
        .result
        .events
        .into_iter()
        .take(3)
        .enumerate()
        .map(|(i, e)| FeedEvent {
            cursor: format!("{}-{}", 7_000 + i, 40 + i),
            data: e.data,
            key: if i == 1 { KEY2.into() } else { KEY.into() },
            seq: e.seq,
            time: e.time,
        })
        .collect();
    check(
        "feed",
        &Envelope::new(FeedPage {
            events: feed,
            next: "7002-42".into(),
        }),
    );
    check(
        "packages",
        &Envelope::new(vec![
            Package {
                description: "Cloudflare DNS provider for the ACME DNS challenge".into(),
                downloads: 1_204,
                modules: vec![PackageModule {
                    docs: "https://caddyserver.com/docs/modules/dns.providers.cloudflare".into(),
                    name: "dns.providers.cloudflare".into(),
                }],
                path: "github.com/caddy-dns/cloudflare".into(),
                repo: "https://github.com/caddy-dns/cloudflare".into(),
            },
            Package {
                description: String::new(),
                downloads: 0,
                modules: vec![],
                path: "github.com/acme/alpha".into(),
                repo: String::new(),
            },
        ]),
    );
    check(
        "queue",
        &Envelope::new(QueueList {
            builds: vec![
                QueueEntry::new(
                    running_build(),
                    t("2026-01-02T03:04:05.123456Z"),
                    Some(t("2026-01-02T03:06:00Z")),
                    Some("worker-7f3a".into()),
                ),
                QueueEntry::new(queued_build(), t("2026-01-02T03:10:00Z"), None, None),
            ],
        }),
    );
    check(
        "workers",
        &Envelope::new(WorkerList {
            workers: vec![Worker {
                builds: vec![
                    WorkerBuild {
                        attempt: 1,
                        key: KEY.into(),
                        lease_expires_at: Some(t("2026-01-02T03:06:00Z")),
                        step: Some("compile".into()),
                        updated_at: t("2026-01-02T03:05:00Z"),
                    },
                    WorkerBuild {
                        attempt: 2,
                        key: KEY2.into(),
                        lease_expires_at: Some(t("2026-01-02T03:06:10Z")),
                        step: None,
                        updated_at: t("2026-01-02T03:05:10Z"),
                    },
                ],
                worker: "worker-7f3a".into(),
            }],
        }),
    );
    check(
        "error",
        &ErrorBody::new(
            404,
            format!("no build with key {KEY}"),
            Some("1f2e-3".into()),
        ),
    );
    check("sse_state", &all_states());
    check(
        "sse_step",
        &StepData {
            step: "compile".into(),
        },
    );
    check(
        "sse_log",
        &LogData {
            line: "step compile finished in 61.0s (exit status 0)".into(),
        },
    );
    check("sse_result_success", &ResultData::success(48_234_496, SHA));
    check(
        "sse_result_failure",
        &ResultData::failure("step compile failed: undefined: caddy.Foo"),
    );
}

fn all_states() -> Vec<StateData> {
    vec![
        StateData::Queued,
        StateData::Running { attempt: 1 },
        StateData::Failed {
            error: "the module proxy did not answer in 30s".into(),
            retryable: true,
            step: None,
        },
        StateData::Requeued {
            not_before: t("2026-01-02T03:06:30Z"),
            reason: RequeueReason::Retry,
        },
        StateData::Failed {
            error: "step compile failed: undefined: caddy.Foo".into(),
            retryable: false,
            step: Some("compile".into()),
        },
        StateData::Succeeded,
        StateData::Expired {
            reason: "not downloaded for 90 days".into(),
        },
        StateData::Cancelled {
            reason: "cancelled by ops".into(),
        },
        StateData::GaveUp { failures: 3 },
    ]
}

// ---- caddyserver.com-compatible shapes, exactly ----

#[test]
fn the_error_body_is_byte_exact() {
    let body = ErrorBody::new(400, "invalid build key: too short", Some("1f2e-3".into()));
    let want =
        r#"{"error":{"id":"1f2e-3","message":"invalid build key: too short"},"status_code":400}"#;
    assert_eq!(serde_json::to_string(&body).unwrap(), want);
    assert_eq!(serde_json::from_str::<ErrorBody>(want).unwrap(), body);
    // As error.rs builds it today.
    let mut error = json!({ "message": "invalid build key: too short" });
    error["id"] = "1f2e-3".into();
    let today = json!({ "status_code": 400, "error": error }).to_string();
    assert_eq!(today, want);

    // Without an id, `id` is left out.
    let body = ErrorBody::new(503, "database error", None);
    assert_eq!(
        serde_json::to_string(&body).unwrap(),
        r#"{"error":{"message":"database error"},"status_code":503}"#
    );
}

#[test]
fn the_envelope_is_result() {
    assert_eq!(
        serde_json::to_string(&Envelope::new(json!({"a": 1}))).unwrap(),
        r#"{"result":{"a":1}}"#
    );
    let r: Envelope<Vec<u32>> = serde_json::from_str(r#"{"result":[1,2]}"#).unwrap();
    assert_eq!(r.result, vec![1, 2]);
}

#[test]
fn a_succeeded_build_reads_complete() {
    assert_eq!(
        serde_json::to_string(&BuildStatus::Succeeded).unwrap(),
        r#""complete""#
    );
    let b = serde_json::to_value(Envelope::new(complete_build())).unwrap();
    assert_eq!(b["result"]["status"], "complete");
    assert!(serde_json::from_str::<BuildStatus>(r#""succeeded""#).is_err());
    for s in BuildStatus::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        assert_eq!(s.as_str().parse::<BuildStatus>(), Ok(s));
    }
    assert_eq!(
        serde_json::to_string(&StateData::Succeeded).unwrap(),
        r#"{"status":"complete"}"#
    );
}

#[test]
fn names_match_their_strings() {
    for t in EventType::ALL {
        assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
    }
    for r in RequeueReason::ALL {
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
    }
}

// ---- the same bytes as the `json!` the api builds today ----

/// `build_json` of crates/roles/src/api/builds.rs, on this crate's values.
fn build_json_today(b: &Build) -> Value {
    let key = b.key.as_str();
    let mut v = json!({
        "status": b.status.as_str(),
        "key": key,
        "attempt": b.attempt,
        "failures": b.failures,
        "created_at": b.created_at,
        "updated_at": b.updated_at,
        "last_seq": b.last_seq,
        "request": b.request,
        "links": {
            "self": format!("/api/build/{key}"),
            "events": format!("/api/build/{key}/events"),
            "history": format!("/api/build/{key}/history"),
            "download": format!("/api/build/{key}/download"),
        },
    });
    if let Some(step) = &b.step {
        v["step"] = json!(step);
    }
    if let Some(e) = &b.error {
        v["error"] =
            json!({ "message": e.message, "step": e.step, "kind": e.kind, "attempt": e.attempt });
    }
    if let Some(a) = &b.artifact {
        v["artifact"] = json!({ "size": a.size, "sha256": a.sha256 });
        if let Some(w) = &a.built_by {
            v["artifact"]["built_by"] = json!(w);
        }
    }
    // Added with reproducibility checks: new keys only.
    if let Some(r) = &b.reproduction {
        v["reproduction"] = serde_json::to_value(r).unwrap();
    }
    v
}

#[test]
fn builds_match_build_json() {
    for b in [queued_build(), running_build(), complete_build()] {
        let today = json!({ "result": build_json_today(&b) }).to_string();
        assert_eq!(serde_json::to_string(&Envelope::new(&b)).unwrap(), today);
    }
}

#[test]
fn queue_entries_match_admin_entry() {
    let b = running_build();
    let at = t("2026-01-02T03:04:05Z");
    let lease = Some(t("2026-01-02T03:06:00Z"));
    let mut today = build_json_today(&b);
    today["available_at"] = json!(at);
    today["owner"] = json!(Option::<String>::None);
    today["lease_expires_at"] = json!(lease);
    let entry = QueueEntry::new(b.clone(), at, lease, None);
    assert_eq!(serde_json::to_string(&entry).unwrap(), today.to_string());
    assert_eq!(entry.build(), b);
}

#[test]
fn worker_builds_match_admin_workers() {
    let w = WorkerBuild {
        attempt: 1,
        key: KEY.into(),
        lease_expires_at: None,
        step: None,
        updated_at: t("2026-01-02T03:05:00Z"),
    };
    let today = json!({ "worker": "w", "builds": [json!({
        "key": w.key,
        "attempt": w.attempt,
        "step": w.step,
        "lease_expires_at": w.lease_expires_at,
        "updated_at": w.updated_at,
    })] });
    let ours = Worker {
        builds: vec![w],
        worker: "w".into(),
    };
    assert_eq!(serde_json::to_string(&ours).unwrap(), today.to_string());
}

#[test]
fn events_match_event_json() {
    for (i, data) in all_events().into_iter().enumerate() {
        let time = t("2026-01-02T03:04:05.5Z");
        // `event_json` and the feed's additions in builds.rs; `encode()` is `to_value` of
        // the payload struct.
        let mut today = json!({
            "seq": i,
            "type": data.event_type().as_str(),
            "time": time,
            "data": serde_json::to_value(&data).unwrap(),
        });
        let history = HistoryEvent {
            data: data.clone(),
            seq: i as u32,
            time,
        };
        assert_eq!(serde_json::to_string(&history).unwrap(), today.to_string());
        today["key"] = json!(KEY);
        today["cursor"] = json!("5-9");
        let feed = FeedEvent {
            cursor: "5-9".into(),
            data,
            key: KEY.into(),
            seq: i as u32,
            time,
        };
        assert_eq!(serde_json::to_string(&feed).unwrap(), today.to_string());
    }
    // The history page and the feed page around them.
    let page = json!({ "result": { "key": KEY, "events": Vec::<Value>::new(), "next": Option::<u32>::None } });
    let ours = Envelope::new(HistoryPage {
        events: vec![],
        key: KEY.into(),
        next: None,
    });
    assert_eq!(serde_json::to_string(&ours).unwrap(), page.to_string());
    let page = json!({ "result": { "events": Vec::<Value>::new(), "next": "0-0" } });
    let ours = Envelope::new(FeedPage {
        events: vec![],
        next: "0-0".into(),
    });
    assert_eq!(serde_json::to_string(&ours).unwrap(), page.to_string());
}

#[test]
fn event_payloads_match_the_event_log() {
    // The payloads as cbs-events writes them (crates/events/src/lib.rs): optional fields
    // left out (`client`, zero `rank`, `step` of a failure, empty `files`), `exit_code` null.
    let requested = EventData::Requested(Requested {
        client: None,
        rank: 0,
        request: arm_request(),
    });
    assert_eq!(
        serde_json::to_string(&requested).unwrap(),
        r#"{"request":{"arch":"arm","arm":7,"caddy_version":"v2.8.4","os":"linux","plugins":[],"replacements":[]}}"#
    );
    let failed = EventData::Failed(Failed {
        attempt: 1,
        kind: FailureKind::Permanent,
        message: "m".into(),
        step: None,
    });
    assert_eq!(
        serde_json::to_string(&failed).unwrap(),
        r#"{"attempt":1,"kind":"permanent","message":"m"}"#
    );
    let succeeded = EventData::Succeeded(Succeeded {
        artifact: StoredArtifact {
            files: vec![],
            location: "x".into(),
            modules_sha256: None,
            sha256: "ab".into(),
            size: 1,
        },
        attempt: 1,
    });
    assert_eq!(
        serde_json::to_string(&succeeded).unwrap(),
        r#"{"artifact":{"location":"x","sha256":"ab","size":1},"attempt":1}"#
    );
    let finished = EventData::StepFinished(StepFinished {
        attempt: 1,
        duration_ms: 5,
        exit_code: None,
        step: "s".into(),
    });
    assert_eq!(
        serde_json::to_string(&finished).unwrap(),
        r#"{"attempt":1,"duration_ms":5,"exit_code":null,"step":"s"}"#
    );
    // A `type` whose data does not fit is refused.
    let bad = r#"{"data":{"reason":"x"},"seq":1,"time":"2026-01-02T03:04:05Z","type":"claimed"}"#;
    assert!(serde_json::from_str::<HistoryEvent>(bad).is_err());
}

/// The `state` extras of crates/roles/src/api/sse.rs: `{"status"}` merged with `extra`.
fn state_today(status: &str, extra: Value) -> String {
    let mut v = json!({ "status": status });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    v.to_string()
}

#[test]
fn stream_data_matches_sse() {
    let not_before = t("2026-01-02T03:06:30Z");
    let cases = [
        (StateData::Queued, state_today("queued", json!({}))),
        (
            StateData::Running { attempt: 2 },
            state_today("running", json!({ "attempt": 2 })),
        ),
        (
            StateData::Expired { reason: "r".into() },
            state_today("expired", json!({ "reason": "r" })),
        ),
        (StateData::Succeeded, state_today("complete", json!({}))),
        (
            StateData::Failed {
                error: "e".into(),
                retryable: true,
                step: None,
            },
            state_today(
                "failed",
                json!({ "retryable": true, "step": Option::<String>::None, "error": "e" }),
            ),
        ),
        (
            StateData::Failed {
                error: "e".into(),
                retryable: false,
                step: Some("compile".into()),
            },
            state_today(
                "failed",
                json!({ "retryable": false, "step": "compile", "error": "e" }),
            ),
        ),
        (
            StateData::Requeued {
                not_before,
                reason: RequeueReason::LeaseExpired,
            },
            state_today(
                "queued",
                json!({ "reason": "lease_expired", "not_before": not_before }),
            ),
        ),
        (
            StateData::Cancelled { reason: "r".into() },
            state_today("cancelled", json!({ "reason": "r" })),
        ),
        (
            StateData::GaveUp { failures: 3 },
            state_today("gave_up", json!({ "failures": 3 })),
        ),
    ];
    for (state, today) in cases {
        let event = StreamEvent::State(state.clone());
        assert_eq!(event.name(), "state");
        assert_eq!(event.data(), today, "{state:?}");
        assert_eq!(StreamEvent::parse("state", &today).unwrap(), event);
    }
    let success = StreamEvent::Result(ResultData::success(10, "ab"));
    let today = json!({ "success": true, "error": null, "size": 10, "sha256": "ab" }).to_string();
    assert_eq!(success.data(), today);
    assert_eq!(StreamEvent::parse("result", &today).unwrap(), success);
    let failure = StreamEvent::Result(ResultData::failure("no"));
    let today = json!({ "success": false, "error": "no" }).to_string();
    assert_eq!(failure.data(), today);
    assert_eq!(StreamEvent::parse("result", &today).unwrap(), failure);
    assert_eq!(
        StreamEvent::Step(StepData { step: "s".into() }).data(),
        json!({ "step": "s" }).to_string()
    );
    assert_eq!(
        StreamEvent::Log(LogData { line: "l".into() }).data(),
        json!({ "line": "l" }).to_string()
    );
    assert!(StreamEvent::parse("ping", "{}").is_err());
    // A state that lacks what its status needs is refused.
    assert!(StreamEvent::parse("state", r#"{"status":"running"}"#).is_err());
    assert!(StreamEvent::parse("state", r#"{"reason":"retry","status":"queued"}"#).is_err());
}

// ---- the accepted request ----

#[test]
fn submissions_parse_like_params() {
    // The body of params.rs's test: arm as a number, `new_version` as an alias.
    let body = br#"{"os":"linux","arch":"arm","arm":7,"caddy_version":"v2.8.4","plugins":[{"module":"github.com/acme/alpha","version":"v1.0.0"},{"module":"example.com/b"}],"replacements":[{"old":"example.com/x","new":"example.com/y","new_version":"v1.0.0"}]}"#;
    let s: BuildSubmission = serde_json::from_slice(body).unwrap();
    assert_eq!(s.arm, Some(ArmValue::Number(7)));
    assert_eq!(s.plugins[1].version, None);
    assert_eq!(s.replacements[0].version.as_deref(), Some("v1.0.0"));
    assert!(!s.force);
    let s: BuildSubmission =
        serde_json::from_str(r#"{"os":"linux","arch":"arm","arm":"6"}"#).unwrap();
    assert_eq!(s.arm, Some(ArmValue::Text("6".into())));
    // Unknown fields and missing required ones are refused, as params.rs refuses them.
    for bad in [
        r#"{"os":"linux","arch":"amd64","colour":"red"}"#,
        r#"{"os":"linux"}"#,
        r#"{"os":"linux","arch":"amd64","plugins":[{"module":"m","v":"1"}]}"#,
        r#"{"os":"linux","arch":"amd64","arm":-1}"#,
    ] {
        assert!(
            serde_json::from_str::<BuildSubmission>(bad).is_err(),
            "{bad}"
        );
    }
}
