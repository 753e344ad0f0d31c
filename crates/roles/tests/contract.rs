//! The API against its own OpenAPI document (`GET /api/openapi.json`, api/openapi.rs):
//!
//! - the document and the router list the same routes, both ways (the router's `.route(...)`
//!   calls in api/mod.rs, and a request to every documented route reaching its handler);
//! - schemathesis (PyPI) sends generated requests, valid and hostile, to a live server and
//!   checks every answer against the document: no server errors, statuses, content types,
//!   bodies and headers as documented; rejected requests change nothing in the database.
//!
//! `CBS_SCHEMATHESIS_EXAMPLES` (examples per operation and phase, default 25) makes the run
//! longer; `CBS_SCHEMATHESIS_SEED` picks another seed (default fixed, so a run repeats).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::client;

const ADMIN: &str = "admin-token-0123456789";

/// `(path, method)` of every route of the router, from the `.route("...", get(...).post(...))`
/// calls in api/mod.rs (as tidy.rs reads the same file for README's table).
fn router_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/mod.rs"),
    )
    .unwrap();
    let methods = [
        "get", "post", "put", "delete", "patch", "head", "options", "trace",
    ];
    let mut routes = BTreeSet::new();
    for (at, _) in src.match_indices(".route(") {
        let args_start = at + ".route(".len();
        // The call's arguments: up to the parenthesis that closes it.
        let mut depth = 1;
        let mut end = args_start;
        for (i, c) in src[args_start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = args_start + i;
                break;
            }
        }
        let args = &src[args_start..end];
        let path = args
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("a route without a literal path: {args}"));
        assert!(
            args.trim_start().starts_with('"'),
            "the path is the first argument: {args}"
        );
        let rest = &args[args.find(',').expect("a method router")..];
        let mut found = 0;
        for m in methods {
            for (i, _) in rest.match_indices(&format!("{m}(")) {
                // `get(` or `.post(`, not `x::get(` or `forget(`.
                let before = rest[..i].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                    routes.insert((path.to_owned(), m.to_owned()));
                    found += 1;
                }
            }
        }
        assert!(found > 0, "no method router in `.route({args})`");
    }
    assert!(routes.len() > 10, "found only {routes:?} in api/mod.rs");
    routes
}

/// `(path, method)` of every operation of the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((path.clone(), method.clone()));
        }
    }
    ops
}

/// Every route of the router is documented, with each of its methods; every documented
/// operation is a route (HEAD of a GET route, which axum answers, included) and reaches its
/// handler: not the fallback's 404, not a 405.
#[tokio::test(flavor = "multi_thread")]
async fn the_document_and_the_router_have_the_same_routes() {
    let s = common::server(false).await;
    let c = client();
    let doc: Value = c
        .get(format!("{}/api/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = router_routes();
    let ops = documented(&doc);
    let mut failures = Vec::new();
    for (path, method) in &routes {
        if !ops.contains(&(path.clone(), method.clone())) {
            failures.push(format!(
                "{} {path} is a route of the router but not in the OpenAPI document (api/openapi.rs)",
                method.to_uppercase()
            ));
        }
    }
    for (path, method) in &ops {
        let routed = routes.contains(&(path.clone(), method.clone()))
            || (method == "head" && routes.contains(&(path.clone(), "get".to_owned())));
        if !routed {
            failures.push(format!(
                "{} {path} is documented but is not a route of the router (api/mod.rs)",
                method.to_uppercase()
            ));
        }
    }

    // A build that exists (queued: no worker), so that every route with a key reaches its
    // handler's own answer.
    let build: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = build["result"]["key"].as_str().unwrap().to_owned();
    for (path, method) in &ops {
        let url = format!("{}{}", s.base, path.replace("{key}", &key));
        let resp = c
            .request(method.to_uppercase().parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let documented_statuses = doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        // Headers are enough (an event stream does not end).
        let body = if resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
        {
            resp.text().await.unwrap_or_default()
        } else {
            String::new()
        };
        if status == 405 || body.contains("no such endpoint") {
            failures.push(format!(
                "{} {path}: {status} {body}: not routed",
                method.to_uppercase()
            ));
        }
        if !documented_statuses.contains(&status.to_string()) {
            failures.push(format!(
                "{} {path}: {status} is not among its documented statuses {documented_statuses:?}",
                method.to_uppercase()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The schemathesis command (PyPI's `schemathesis`; scripts/test installs it).
fn schemathesis() -> std::process::Command {
    let scripts = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let installed = std::path::Path::new(&scripts).join("schemathesis");
    let program = if installed.exists() {
        installed
    } else {
        "schemathesis".into()
    };
    let mut cmd = std::process::Command::new(program);
    cmd.env("NO_COLOR", "1");
    cmd
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn count(db: &cbs_testkit::TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// `key -> last_seq` of every build.
async fn builds(db: &cbs_testkit::TestDb) -> BTreeMap<String, i64> {
    db.client()
        .await
        .query("SELECT key, last_seq::bigint FROM builds", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Events per type.
async fn event_types(db: &cbs_testkit::TestDb) -> BTreeMap<String, i64> {
    db.client()
        .await
        .query(
            "SELECT event_type, count(*) FROM build_events GROUP BY event_type",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// One request and its answer, from schemathesis's HAR report.
#[derive(Debug)]
struct Exchange {
    method: String,
    path: String,
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn exchanges(har: &Value) -> Vec<Exchange> {
    har["log"]["entries"]
        .as_array()
        .expect("HAR entries")
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap_or_default();
            let after_host = url.splitn(4, '/').nth(3).unwrap_or_default();
            let path = after_host.split('?').next().unwrap_or_default();
            Exchange {
                method: e["request"]["method"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                path: format!("/{path}"),
                status: e["response"]["status"].as_u64().unwrap_or_default() as u16,
                headers: e["response"]["headers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|h| {
                        (
                            h["name"].as_str().unwrap_or_default().to_ascii_lowercase(),
                            h["value"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect(),
                body: e["response"]["content"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            }
        })
        .collect()
}

/// Schemathesis against a live server: at least 1,000 generated requests over every
/// operation (examples, coverage, fuzzing and stateful phases; the stateful links go from
/// `POST /api/build` to the build's status, history and download), with the checks
/// not_a_server_error, status_code_conformance, content_type_conformance,
/// response_schema_conformance, response_headers_conformance, negative_data_rejection (a
/// request the document forbids is refused), unsupported_method and allow_header_conformance
/// (405 with `Allow`) and missing_required_header. Then: no 5xx but the documented one (a
/// download whose wait ran out: 503 with Retry-After), and the database changed only as
/// accepted requests say.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing() {
    let s = common::server_configured(false, None, |c| {
        // One client sends every request: the per-client limits (builds per minute, queued
        // builds, open waits, connections) are off, as in common::server (they have their
        // own tests); they would only turn generated requests into 429s.
        c.access.tokens = vec![cbs_config::TokenConfig {
            name: "ops".into(),
            secret: cbs_config::Secret::new(ADMIN.into()),
            scopes: vec![cbs_config::Scope::Admin],
        }];
        // Waits must not make the run slow: a long-poll waits 1 s at most, a download that
        // is not built 1 s (then 503 with Retry-After, as documented).
        c.api.max_long_poll = Duration::from_secs(1);
        c.api.download_wait = Duration::from_secs(1);
        c.api.download_retry_after = Duration::from_secs(5);
    })
    .await;
    let c = client();

    // One build done before the run, so that downloads, Range and ETag have a binary: a
    // worker builds it, then stops, so that during the run the database changes only
    // through the requests.
    let worker_stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(cbs_roles::worker::run(s.app.clone(), worker_stop.clone()));
    let built: Value = c
        .post(format!("{}/api/build", s.base))
        .json(&serde_json::json!({"os": "linux", "arch": "amd64"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seed = built["result"]["key"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let status: Value = c
            .get(format!("{}/api/build/{seed}?wait=1s", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match status["result"]["status"].as_str() {
            Some("complete") => break,
            Some("queued" | "running") if std::time::Instant::now() < deadline => {}
            other => panic!("the seed build did not complete: {other:?} {status}"),
        }
    }
    worker_stop.cancel();
    worker.await.unwrap().unwrap();
    let etag = c
        .head(format!("{}/api/build/{seed}/download", s.base))
        .send()
        .await
        .unwrap()
        .headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    // Builds in the other states a download meets: failed for good, queued, cancelled.
    let submit = |query: &'static str| {
        let (c, base) = (c.clone(), s.base.clone());
        async move {
            let v: Value = c
                .post(format!("{base}/api/build?os=linux&arch=amd64&{query}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["result"]["key"].as_str().unwrap().to_owned()
        }
    };
    let failed = submit("p=example.com/liar").await;
    let claimed = s
        .app
        .store
        .claim("contract-test", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.key.as_str(), failed);
    s.app
        .store
        .append_latest(
            &claimed.key,
            cbs_events::Event::Failed(cbs_events::Failed {
                attempt: claimed.attempt,
                kind: cbs_events::FailureKind::Permanent,
                step: Some("compile".into()),
                message: "a compile error".into(),
            }),
        )
        .await
        .unwrap();
    let queued = submit("p=github.com/acme/alpha").await;
    let cancelled = submit("p=github.com/Acme/Beta").await;
    let resp = c
        .post(format!("{}/api/build/{cancelled}/cancel", s.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let builds_before = builds(&s.db).await;
    let events_before = event_types(&s.db).await;
    let total_before = count(&s.db, "SELECT count(*) FROM build_events").await;

    let examples = env_number("CBS_SCHEMATHESIS_EXAMPLES", 25);
    let seed_value = env_number("CBS_SCHEMATHESIS_SEED", 12);
    // The config and the report stay in target/tmp/schemathesis after the run.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
# Written by crates/roles/tests/contract.rs.
[auth.openapi.bearer]
bearer = "{ADMIN}"

[generation]
database = "none"

# Values the generator mixes in, so that requests reach builds that exist (one of each state
# a download meets), the fixture proxy's Caddy versions, and the binary's ranges and ETag.
[dictionaries.keys]
values = ["{seed}", "{failed}", "{queued}", "{cancelled}"]
[dictionaries.versions]
values = ["v2.8.4", "v2.7.6", "latest", "v2.9.0-beta.1"]
[dictionaries.ranges]
values = ["bytes=0-99", "bytes=-10", "bytes=100-", "bytes=0-0", "bytes=999999999-", "bytes=5-1", "bytes=0-1,5-6", "items=0-1"]
[dictionaries.waits]
values = ["1s", "500ms", "0s", "2m", "1h 30m"]
[dictionaries.etags]
values = ['{etag}', "*", '"0000"', 'W/{etag}']

[parameters]
"path.key" = {{ dictionary = "keys", probability = 0.6 }}
"query.version" = {{ dictionary = "versions", probability = 0.5 }}
"body.caddy_version" = {{ dictionary = "versions", probability = 0.5 }}
"header.Range" = {{ dictionary = "ranges", probability = 0.7 }}
"header.If-None-Match" = {{ dictionary = "etags", probability = 0.5 }}
"query.wait" = {{ dictionary = "waits", probability = 0.5 }}

# A request that breaks the document is refused: with a 4xx of the document's (413, 414 and
# 431 included), never served.
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 414, 415, 422, 428, 429, 431]

# A download whose build is not done answers 503 with Retry-After after `api.download_wait`
# (never a 2xx without the binary); the test checks each one itself.
[[operations]]
include-path-regex = "^/api/(download|compat)$"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

# An event stream of a build that is not done does not end: read a few events.
[[operations]]
include-path = "/api/build/{{key}}/events"
max-stream-events = 3
request-timeout = 2
"#
        ),
    )
    .unwrap();
    // `POST /api/build` takes its request as a JSON body or as query parameters; both at once
    // are a 400. Generated cases mostly carry both, so the hook drops the query of half of
    // those: JSON submissions get built and the stateful links have keys to follow.
    let hooks = dir.join("hooks.py");
    std::fs::write(
        &hooks,
        r#"# Written by crates/roles/tests/contract.rs.
import schemathesis
from hypothesis import strategies as st
from schemathesis.core import NOT_SET


@schemathesis.hook
def flatmap_case(context, case):
    if case.method.upper() != "POST" or case.path != "/api/build" or case.body is NOT_SET or not case.query:
        return st.just(case)

    def pick(keep_query):
        if not keep_query:
            case.query = {}
        return case

    return st.booleans().map(pick)
"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = schemathesis()
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .current_dir(&dir)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/openapi.json", s.base))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection,unsupported_method,allow_header_conformance,missing_required_header",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            // One worker: with several, Python 3.11's ast.parse (hypothesis describing its
            // strategies) can fail with "AST constructor recursion depth mismatch".
            "--workers",
            "1",
            "--request-timeout",
            "20",
            // The report keeps headers as sent (`x-caddy-build-key` is not a secret).
            "--output-sanitize",
            "false",
            "--report",
            "har",
            "--report-har-path",
        ])
        .arg(dir.join("run.har"))
        .arg(format!("--max-examples={examples}"))
        .arg(format!("--seed={seed_value}"))
        .output()
        .expect("schemathesis runs (pip install schemathesis; scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    eprintln!("schemathesis took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "schemathesis found something (its report is above)"
    );

    let har: Value = serde_json::from_slice(&std::fs::read(dir.join("run.har")).unwrap()).unwrap();
    let exchanges = exchanges(&har);
    // Requests per documented operation (a path segment `{key}` matches any one segment);
    // methods the document does not list are the 405 probes.
    let doc: Value = c
        .get(format!("{}/api/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations = documented(&doc);
    let matches = |template: &str, path: &str| {
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || t.starts_with('{'))
    };
    let mut per_operation: BTreeMap<String, usize> = BTreeMap::new();
    for e in &exchanges {
        let method = e.method.to_lowercase();
        let op = operations
            .iter()
            .find(|(path, m)| *m == method && matches(path, &e.path))
            .map_or_else(
                || "other methods".to_owned(),
                |(path, m)| format!("{} {path}", m.to_uppercase()),
            );
        *per_operation.entry(op).or_default() += 1;
    }
    // Schemathesis reads the document from its route but does not test that route itself.
    for (path, method) in operations.iter().filter(|(p, _)| p != "/api/openapi.json") {
        let op = format!("{} {path}", method.to_uppercase());
        assert!(
            per_operation.contains_key(&op),
            "schemathesis sent no request to {op}"
        );
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for e in &exchanges {
        *statuses.entry(e.status).or_default() += 1;
    }
    eprintln!(
        "schemathesis sent {} requests; statuses {statuses:?}",
        exchanges.len()
    );
    if examples >= 25 {
        assert!(
            exchanges.len() >= 1000,
            "only {} requests were generated",
            exchanges.len()
        );
    }

    // The only 5xx: a download that waited in vain (documented: 503, Retry-After, the key).
    for e in exchanges.iter().filter(|e| e.status >= 500) {
        let documented_wait = e.status == 503
            && (e.path == "/api/download" || e.path == "/api/compat")
            && e.headers.get("retry-after").map(String::as_str) == Some("5")
            && e.headers.contains_key("x-caddy-build-key");
        assert!(documented_wait, "a server error: {e:?}");
    }

    // Rejected requests changed nothing: every new build, and every build with new events,
    // is one an accepted request names, and the new events are what those requests do.
    let builds_after = builds(&s.db).await;
    let events_after = event_types(&s.db).await;
    let total_after = count(&s.db, "SELECT count(*) FROM build_events").await;
    let mut submitted = BTreeSet::new();
    let mut cancels = 0i64;
    let mut reproductions = 0i64;
    for e in &exchanges {
        let key_in_body = || {
            serde_json::from_str::<Value>(&e.body)
                .ok()
                .and_then(|v| v["result"]["key"].as_str().map(str::to_owned))
        };
        match (e.method.as_str(), e.path.as_str()) {
            ("POST", "/api/build") if (200..300).contains(&e.status) => {
                submitted.insert(key_in_body().expect("a build's status"));
            }
            ("GET" | "HEAD", "/api/download" | "/api/compat") => {
                if let Some(k) = e.headers.get("x-caddy-build-key") {
                    submitted.insert(k.clone());
                }
            }
            ("POST", p) if p.ends_with("/cancel") && e.status == 200 => {
                cancels += 1;
                submitted.insert(key_in_body().expect("a build's status"));
            }
            ("POST", p) if p.ends_with("/reproduce") && e.status == 202 => {
                reproductions += 1;
                submitted.insert(key_in_body().expect("a build's status"));
            }
            _ => {}
        }
    }
    let new_builds: Vec<_> = builds_after
        .keys()
        .filter(|k| !builds_before.contains_key(*k))
        .collect();
    for k in &new_builds {
        assert!(
            submitted.contains(*k),
            "build {k} was created, but no accepted request names it"
        );
    }
    let mut changed = 0;
    for (k, seq) in &builds_after {
        let before = builds_before.get(k).copied().unwrap_or(0);
        changed += seq - before;
        if *seq != before {
            assert!(
                submitted.contains(k),
                "build {k} has new events, but no accepted request names it"
            );
        }
    }
    assert_eq!(total_after - total_before, changed, "events outside builds");
    let added = |t: &str| events_after.get(t).unwrap_or(&0) - events_before.get(t).unwrap_or(&0);
    assert_eq!(
        added("requested"),
        new_builds.len() as i64,
        "a requested event per new build"
    );
    assert_eq!(
        added("cancelled"),
        cancels,
        "a cancelled event per 200 cancel"
    );
    assert_eq!(
        added("reproduction_requested"),
        reproductions,
        "a reproduction_requested event per 202 reproduce"
    );
    for (t, n) in &events_after {
        let new = n - events_before.get(t).unwrap_or(&0);
        assert!(
            new == 0
                || [
                    "requested",
                    "cancelled",
                    "requeued",
                    "reproduction_requested"
                ]
                .contains(&t.as_str()),
            "{new} {t} events while no worker ran"
        );
    }
    eprintln!(
        "{} requests; per operation {per_operation:?}; {} new builds, {cancels} cancelled, {} events",
        exchanges.len(),
        new_builds.len(),
        total_after - total_before
    );
}
