//! The API in-process against a real Postgres, a real worker building in Docker, and the
//! fixture module proxy; spoken to over HTTP on loopback.

use std::time::Duration;

use cbs_testkit::{FixtureProxy, TestDb};
use serde_json::Value;

mod common;
use common::{client, server, server_configured, server_with};

async fn event_count(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM build_events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_4xx_with_a_message_and_change_nothing() {
    let s = server(false).await;
    let c = client();
    let before = event_count(&s.db).await;
    let long_path = format!("example.com/{}", "a".repeat(300));
    let many: String = (0..51).map(|i| format!("&p=example.com/p{i}")).collect();
    let big_body = format!(
        "{{\"os\":\"linux\",\"arch\":\"amd64\",\"x\":\"{}\"}}",
        "a".repeat(70_000)
    );
    let key = "a".repeat(64);
    // (method, path and query, body, expected status, words in the message)
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "GET",
            "/api/download".into(),
            None,
            400,
            "parameter os is required",
        ),
        (
            "GET",
            "/api/download?os=linux".into(),
            None,
            400,
            "parameter arch is required",
        ),
        (
            "GET",
            "/api/download?os=plan10&arch=amd64".into(),
            None,
            400,
            "valid choices",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=x86_64".into(),
            None,
            400,
            "unsupported os/arch",
        ),
        (
            "GET",
            "/api/download?os=android&arch=amd64".into(),
            None,
            400,
            "unsupported os/arch",
        ),
        (
            "GET",
            "/api/download?os=js&arch=wasm".into(),
            None,
            400,
            "unsupported os/arch",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&arm=7".into(),
            None,
            400,
            "only for arch",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=arm&arm=8".into(),
            None,
            400,
            "use 5, 6 or 7",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=arm&arm=7%3Bid".into(),
            None,
            400,
            "use 5, 6 or 7",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a%0Arequire".into(),
            None,
            400,
            "plugins[0].module",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a%22b".into(),
            None,
            400,
            "character",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a%20b".into(),
            None,
            400,
            "character ' '",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a%5Cb".into(),
            None,
            400,
            "character",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/../x".into(),
            None,
            400,
            "only dots",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=-x.com/a".into(),
            None,
            400,
            "must not start with '-'",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/$(id)".into(),
            None,
            400,
            "character '$'",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a;ls".into(),
            None,
            400,
            "character ';'",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a%60id%60".into(),
            None,
            400,
            "character '`'",
        ),
        (
            "GET",
            format!("/api/download?os=linux&arch=amd64&p={long_path}"),
            None,
            400,
            "longer than 256",
        ),
        // v1.2 is a valid Go version query (the newest v1.2.x); this proxy has no such module.
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a@v1.2".into(),
            None,
            400,
            "not found on the module proxy",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a@v1.2.3%0A".into(),
            None,
            400,
            "is not valid",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a@-v1".into(),
            None,
            400,
            "is not valid",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a@v2.0.0".into(),
            None,
            400,
            "plugins[0].version",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&version=v1.2.3%20x".into(),
            None,
            400,
            "is not valid",
        ),
        (
            "GET",
            format!("/api/download?os=linux&arch=amd64{many}"),
            None,
            400,
            "too many plugins: 51",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/a&p=example.com/a".into(),
            None,
            400,
            "listed twice",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=github.com/caddyserver/caddy/v2".into(),
            None,
            400,
            "Caddy itself",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&r=nonsense".into(),
            None,
            400,
            "old=new@version",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&colour=red".into(),
            None,
            400,
            "unknown parameter",
        ),
        (
            "GET",
            "/api/download?os=linux&os=linux&arch=amd64".into(),
            None,
            400,
            "given twice",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&p=example.com/does-not-exist".into(),
            None,
            400,
            "not found on the module proxy",
        ),
        (
            "GET",
            "/api/download?os=linux&arch=amd64&version=v9.9.9".into(),
            None,
            400,
            "not found on the module proxy",
        ),
        (
            "POST",
            "/api/build".into(),
            Some("{not json".into()),
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(r#"{"os":"linux","arch":"amd64","colour":"red"}"#.into()),
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(r#"{"os":"linux"}"#.into()),
            400,
            "missing field `arch`",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(r#"{"os":"linux","arch":"amd64","plugins":[{"module":"x"}]}"#.into()),
            400,
            "first element must contain a dot",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(
                r#"{"os":"linux","arch":"amd64","plugins":[{"module":"example.com/a","extra":1}]}"#
                    .into(),
            ),
            400,
            "unknown field `extra`",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(r#"{"os":1,"arch":"amd64"}"#.into()),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/api/build?os=linux".into(),
            Some(r#"{"os":"linux","arch":"amd64"}"#.into()),
            400,
            "not both",
        ),
        (
            "POST",
            "/api/build".into(),
            Some(big_body),
            413,
            "length limit",
        ),
        (
            "GET",
            "/api/build/nothex".into(),
            None,
            400,
            "invalid build key",
        ),
        (
            "GET",
            format!("/api/build/{}", "A".repeat(64)),
            None,
            400,
            "invalid build key",
        ),
        (
            "GET",
            format!("/api/build/{key}"),
            None,
            404,
            "no build with key",
        ),
        (
            "GET",
            format!("/api/build/{key}?wait=forever"),
            None,
            400,
            "not a duration",
        ),
        (
            "GET",
            format!("/api/build/{key}?after=-1"),
            None,
            400,
            "not an event sequence number",
        ),
        (
            "GET",
            format!("/api/build/{key}/history"),
            None,
            404,
            "no build with key",
        ),
        (
            "GET",
            format!("/api/build/{key}/download"),
            None,
            404,
            "no build with key",
        ),
        (
            "GET",
            "/api/download/xyz".into(),
            None,
            400,
            "invalid build key",
        ),
        (
            "GET",
            "/api/events?after=bogus".into(),
            None,
            400,
            "a cursor looks like",
        ),
        (
            "GET",
            "/api/events?limit=0".into(),
            None,
            400,
            "limit must be",
        ),
        (
            "GET",
            "/api/events?type=exploded".into(),
            None,
            400,
            "unknown event type",
        ),
        ("GET", "/api/nothing".into(), None, 404, "no such endpoint"),
        (
            "DELETE",
            "/api/build".into(),
            None,
            405,
            "Method Not Allowed",
        ),
    ];
    assert!(cases.len() >= 40);
    for (method, path, body, status, want) in cases {
        let url = format!("{}{path}", s.base);
        let req = match method {
            "GET" => c.get(&url),
            "POST" => c.post(&url),
            "DELETE" => c.delete(&url),
            _ => unreachable!(),
        };
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(b),
            None => req,
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert!(
            resp.headers().contains_key("x-request-id"),
            "{method} {path}"
        );
        let json: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(json["status_code"], status, "{method} {path}");
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{method} {path}: {message}");
        assert!(json["error"]["id"].is_string(), "{method} {path}");
    }
    assert_eq!(
        event_count(&s.db).await,
        before,
        "bad requests changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_wakes_on_the_commit() {
    let s = server(false).await;
    let c = client();
    let resp = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["result"]["status"], "queued");
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    assert_eq!(
        json["result"]["request"]["caddy_version"], "v2.8.4",
        "latest resolved"
    );
    assert_eq!(json["result"]["request"]["plugins"][0]["version"], "v1.1.0");

    let url = format!("{}/api/build/{key}?wait=60s&after=1", s.base);
    let poll = tokio::spawn(async move {
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    // The long-poll is parked on the listening connection; a claim commits event 2.
    let claimed = s
        .app
        .store
        .claim("manual", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.last_seq, 2);
    let answer = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .expect("the long-poll answered")
        .unwrap();
    assert_eq!(answer["result"]["status"], "running");
    assert_eq!(answer["result"]["last_seq"], 2);

    // With nothing new, a short wait ends on its own.
    let start = std::time::Instant::now();
    let same: Value = c
        .get(format!("{}/api/build/{key}?wait=1s", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(same["result"]["last_seq"], 2);
    assert!(start.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_downloads_share_one_build_and_get_identical_binaries() {
    let s = server(true).await;
    let url = format!(
        "{}/api/download?os=linux&arch=amd64&p=github.com/acme/alpha&p=github.com/Acme/Beta",
        s.base
    );
    let c = client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{url}&idempotency={i}"));
            tokio::spawn(async move {
                let resp = c.get(&url).send().await.unwrap();
                let status = resp.status().as_u16();
                let etag = resp.headers().get("etag").cloned();
                let body = resp.bytes().await.unwrap();
                (status, etag, body)
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, etag, body) = t.await.unwrap();
        assert_eq!(
            status,
            200,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        assert!(etag.is_some());
        bodies.push(body);
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]), "byte-identical");
    assert!(bodies[0].len() > 100_000);
    let requested: i64 =
        s.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM build_events WHERE event_type = 'requested'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(requested, 1, "exactly one build");

    // As a user would: curl the binary and run it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("caddy");
    let status = std::process::Command::new("curl")
        .args(["-fsS", &format!("{}/api/download?os=linux&arch=amd64&p=github.com/acme/alpha&p=github.com/Acme/Beta", s.base), "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&out)
        .status()
        .unwrap();
    let listed = std::process::Command::new(&out)
        .arg("list-modules")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("http.handlers.alpha github.com/acme/alpha v1.1.0"),
        "{listed}"
    );

    // HEAD, Range and ETag on the finished build.
    let json: Value = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha&p=github.com/Acme/Beta",
            s.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["result"]["status"], "complete");
    let key = json["result"]["key"].as_str().unwrap();
    let dl = format!("{}/api/build/{key}/download", s.base);
    let head = c.head(&dl).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        bodies[0].len().to_string()
    );
    assert_eq!(
        head.headers()["content-disposition"],
        "attachment; filename=caddy"
    );
    assert_eq!(head.headers()["content-type"], "application/octet-stream");
    let etag = head.headers()["etag"].clone();
    assert!(head.bytes().await.unwrap().is_empty());
    let part = c
        .get(&dl)
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes 0-99/{}", bodies[0].len())
    );
    assert_eq!(part.bytes().await.unwrap(), bodies[0].slice(0..100));
    let tail = c
        .get(&dl)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(
        tail.bytes().await.unwrap(),
        bodies[0].slice(bodies[0].len() - 10..)
    );
    let bad = c
        .get(&dl)
        .header("range", "bytes=999999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 416);
    let cached = c
        .get(&dl)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status().as_u16(), 304);
    let by_key = c
        .get(format!("{}/api/download/{key}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.bytes().await.unwrap(), bodies[0]);

    // History lists every event of the build.
    let history: Value = c
        .get(format!("{}/api/build/{key}/history", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = history["result"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"requested"));
    assert_eq!(types.last(), Some(&"succeeded"));

    // A plugin that does not compile: the download answers with the build's error.
    let resp = c
        .get(format!(
            "{}/api/download?os=linux&arch=amd64&p=example.com/broken",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let json: Value = resp.json().await.unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("step compile failed"), "{message}");
    assert!(
        message.contains("undefined: undefinedFunction"),
        "{message}"
    );
}

/// Reads SSE messages `(id, event, data)` until `stop` says so or the stream ends.
async fn read_sse(
    resp: &mut reqwest::Response,
    mut stop: impl FnMut(&(String, String, String)) -> bool,
) -> Vec<(String, String, String)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(240), resp.chunk())
            .await
            .expect("SSE stream stalled")
            .unwrap();
        let Some(chunk) = chunk else { return out };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = v.trim().to_owned();
                }
            }
            if id.is_empty() && event.is_empty() {
                continue; // a keep-alive comment
            }
            let m = (id, event, data);
            let done = stop(&m);
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_resumes_with_last_event_id_exactly_once_through_the_result() {
    let s = server(true).await;
    let c = client();
    let json: Value = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=example.com/gamma/v2",
            s.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    let url = format!("{}/api/build/{key}/events", s.base);

    // First connection: read until the first step, then go away mid-build.
    let mut first = c.get(&url).send().await.unwrap();
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let part1 = read_sse(&mut first, |m| m.1 == "step").await;
    drop(first);
    let last = part1.last().unwrap().0.clone();

    // Reconnect with Last-Event-ID: the rest, through the result, then the stream ends.
    let mut second = c
        .get(&url)
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    let part2 = read_sse(&mut second, |_| false).await;
    assert_eq!(part2.last().unwrap().1, "result", "{part2:?}");
    assert!(part2.last().unwrap().2.contains("\"success\":true"));

    // A fresh stream of the finished build replays everything and ends.
    let mut replay = c.get(&url).send().await.unwrap();
    let all = read_sse(&mut replay, |_| false).await;
    let resumed: Vec<String> = part1.iter().chain(&part2).map(|m| m.0.clone()).collect();
    let replayed: Vec<String> = all.iter().map(|m| m.0.clone()).collect();
    assert_eq!(resumed, replayed, "each event exactly once, in order");
    let names: std::collections::HashSet<&str> = all.iter().map(|m| m.1.as_str()).collect();
    for want in ["state", "step", "log", "result"] {
        assert!(names.contains(want), "{want} missing: {names:?}");
    }
    // Resuming in the middle of an output chunk continues with its next line.
    let mid = all
        .iter()
        .position(|m| m.0.contains('.') && m.1 == "log")
        .unwrap();
    let mut from_mid = c
        .get(&url)
        .header("last-event-id", &all[mid].0)
        .send()
        .await
        .unwrap();
    let rest = read_sse(&mut from_mid, |_| false).await;
    let want: Vec<String> = all[mid + 1..].iter().map(|m| m.0.clone()).collect();
    assert_eq!(rest.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), want);

    // The output is in the output table (ids <event>.<chunk>.<line>), not in the event
    // log, and the output endpoint has the same lines.
    let chunk_lines: Vec<String> = all
        .iter()
        .filter(|m| m.0.matches('.').count() == 2)
        .map(|m| {
            serde_json::from_str::<Value>(&m.2).unwrap()["line"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(!chunk_lines.is_empty(), "{all:?}");
    let k: cbs_domain::BuildKey = key.parse().unwrap();
    let events = s.app.store.events(&k, 0, 1000).await.unwrap();
    assert!(
        events
            .iter()
            .all(|e| e.event.event_type() != cbs_events::EventType::Output),
        "no output events in the log"
    );
    let page: Value = c
        .get(format!("{}/api/build/{key}/output", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<String> = page["result"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["lines"].as_array().unwrap().iter())
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, chunk_lines);
    assert_eq!(page["result"]["pruned_attempts"], 0);
    for bad in ["after=1", "after=x.1", "limit=0", "attempt=1"] {
        let resp = c
            .get(format!("{}/api/build/{key}/output?{bad}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }

    // Retention removes the output (with an event saying so); the stream then says so in
    // its place, and everything else replays as before.
    let build = s.app.store.build(&k).await.unwrap().unwrap();
    let (_, pruned) = s
        .app
        .store
        .prune_output(&build, "output of succeeded builds is kept for 1s")
        .await
        .unwrap();
    assert!(pruned.chunks > 0 && pruned.bytes > 0, "{pruned:?}");
    let mut replay = c.get(&url).send().await.unwrap();
    let after_prune = read_sse(&mut replay, |_| false).await;
    let kept: Vec<&(String, String, String)> = all
        .iter()
        .filter(|m| m.0.matches('.').count() != 2)
        .collect();
    let notice: Vec<&(String, String, String)> = after_prune
        .iter()
        .filter(|m| m.2.contains("no longer kept"))
        .collect();
    assert_eq!(notice.len(), 1, "{after_prune:?}");
    assert_eq!(after_prune.len(), kept.len() + 1, "{after_prune:?}");
    // A client that was in the middle of that output when it went resumes to a notice
    // with the id it resumed from (its resume point stays), then the rest.
    let mut from_mid = c
        .get(&url)
        .header("last-event-id", &all[mid].0)
        .send()
        .await
        .unwrap();
    let rest = read_sse(&mut from_mid, |_| false).await;
    assert_eq!(rest[0].0, all[mid].0, "{rest:?}");
    assert!(rest[0].2.contains("no longer kept"), "{rest:?}");
    let want: Vec<&String> = all[mid + 1..]
        .iter()
        .filter(|m| m.0.matches('.').count() != 2)
        .map(|m| &m.0)
        .collect();
    assert_eq!(rest[1..].iter().map(|m| &m.0).collect::<Vec<_>>(), want);
    // A Last-Event-ID that is not text is refused, not taken for "from the start".
    let resp = c
        .get(&url)
        .header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes(b"1\xff").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let page: Value = c
        .get(format!("{}/api/build/{key}/output", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["result"]["chunks"], serde_json::json!([]));
    assert_eq!(page["result"]["pruned_attempts"], 1);
    let history: Value = c
        .get(format!("{}/api/build/{key}/history", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = history["result"]["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["type"], "output_pruned", "{last}");
    assert_eq!(last["data"]["chunks"], pruned.chunks);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_waits_across_a_retry() {
    // The worker's proxy is down at first: the first attempt fails, retryably.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = down.local_addr().unwrap();
    drop(down);
    let s = server_with(true, Some(format!("http://{down_addr}"))).await;
    let url = format!(
        "{}/api/download?os=linux&arch=amd64&p=github.com/acme/alpha",
        s.base
    );
    let download = tokio::spawn(async move {
        let resp = client().get(&url).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap())
    });
    // The same request through POST names the same build (it is keyed, not duplicated).
    let json: Value = client()
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha",
            s.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    // Wait (woken through the listening connection) until the first attempt failed.
    let parsed: cbs_domain::BuildKey = key.parse().unwrap();
    let mut waiter = s.app.hub.watch_build(&parsed);
    tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let b = s.app.store.build(&parsed).await.unwrap().unwrap();
            if b.status == cbs_projections::Status::Failed {
                return;
            }
            waiter.changed().await;
        }
    })
    .await
    .expect("the first attempt failed");
    let key: cbs_domain::BuildKey = key.parse().unwrap();
    let b = s.app.store.build(&key).await.unwrap().unwrap();
    assert_eq!(
        b.last_error.as_ref().unwrap().kind,
        cbs_events::FailureKind::Retryable
    );
    assert!(!download.is_finished(), "the download still waits");
    // The proxy comes up and the build is retried (as the janitor does).
    let _proxy = FixtureProxy::start_on(down_addr).await;
    s.app
        .store
        .append_latest(
            &key,
            cbs_events::Event::Requeued(cbs_events::Requeued {
                attempt: b.attempt,
                reason: cbs_events::RequeueReason::Retry,
                not_before: chrono::Utc::now(),
            }),
        )
        .await
        .unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(240), download)
        .await
        .expect("the download answered")
        .unwrap();
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    let b = s.app.store.build(&key).await.unwrap().unwrap();
    assert_eq!(b.attempt, 2);
    assert_eq!(b.artifact.unwrap().size, body.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_lists_packages_and_refuses_what_it_must() {
    let catalog = r#"
catalog_only: false
deny: ["example.com/broken", "example.com/evil/"]
catalog:
  - path: github.com/acme/alpha
    repo: https://github.com/acme/alpha
    description: Alpha handler
    modules:
      - name: http.handlers.alpha
        docs: https://example.com/alpha
"#;
    let packages: cbs_config::PackagesConfig = serde_yaml_ng::from_str(catalog).unwrap();
    let s = server_configured(false, None, |c| c.packages = packages).await;
    let c = client();
    let before = event_count(&s.db).await;
    for (query, want) in [
        ("p=example.com/broken", "may not be built on this server"),
        (
            "p=example.com/evil/thing",
            "may not be built on this server",
        ),
    ] {
        let resp = c
            .get(format!(
                "{}/api/download?os=linux&arch=amd64&{query}",
                s.base
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{query}");
        let json: Value = resp.json().await.unwrap();
        assert!(
            json["error"]["message"].as_str().unwrap().contains(want),
            "{json}"
        );
    }
    assert_eq!(event_count(&s.db).await, before);

    let ok = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let list: Value = c
        .get(format!("{}/api/packages", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let alpha = &list["result"][0];
    assert_eq!(alpha["path"], "github.com/acme/alpha");
    assert_eq!(alpha["downloads"], 1);
    assert_eq!(alpha["modules"][0]["name"], "http.handlers.alpha");
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_only_servers_build_only_the_catalog() {
    let s = server_configured(false, None, |c| {
        c.packages.catalog_only = true;
        c.packages.catalog = vec![cbs_config::CatalogEntry {
            path: "github.com/acme/alpha".into(),
            repo: String::new(),
            description: String::new(),
            modules: vec![],
        }];
    })
    .await;
    let c = client();
    let refused = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/Acme/Beta",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let json: Value = refused.json().await.unwrap();
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not in this server's catalog"));
    let ok = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_create_builds_without_limit() {
    let s = server_configured(false, None, |c| {
        c.api.submissions_per_minute = 6;
        c.api.submission_burst = 3;
    })
    .await;
    let c = client();
    let url = |p: &str| format!("{}/api/build?os=linux&arch=amd64&p={p}", s.base);
    let distinct = [
        "github.com/acme/alpha@v1.0.0",
        "github.com/acme/alpha@v1.1.0",
        "example.com/gamma/v2@v2.0.0",
    ];
    for p in distinct {
        assert_eq!(c.post(url(p)).send().await.unwrap().status().as_u16(), 202);
    }
    // Joining builds that exist is not limited.
    for _ in 0..10 {
        assert_eq!(
            c.post(url(distinct[0]))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            202
        );
    }
    let refused = c
        .post(url("example.com/gamma/v2@v2.1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let json: Value = refused.json().await.unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("too many new builds from 127.0.0.1"),
        "{message}"
    );
    // Reading is not limited.
    let key = cbs_testkit::sample_request(1).key();
    let status = c
        .get(format!("{}/api/build/{key}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status().as_u16(), 404);
}

/// 50 servers behind one NAT run `caddy upgrade` at once: all want the same binary, which
/// one request built. None is refused, although the submission limit is 3 a minute.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_machines_behind_one_address_all_get_the_built_binary() {
    let s = server_configured(true, None, |c| {
        c.api.submissions_per_minute = 3;
        c.api.submission_burst = 1;
    })
    .await;
    let url = format!(
        "{}/api/download?os=linux&arch=amd64&p=github.com/acme/alpha",
        s.base
    );
    let first = client().get(&url).send().await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let want = first.bytes().await.unwrap();
    let all = futures::future::join_all((0..50).map(|_| {
        let url = url.clone();
        async move {
            let r = client().get(&url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }
    }))
    .await;
    for (status, bytes) in all {
        assert_eq!(status, 200);
        assert_eq!(bytes, want);
    }
}

/// One client may hold only so many waiting requests open (429 beyond), and the server
/// only so many in total (503 with Retry-After beyond); a closed wait frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn open_waits_are_capped_per_client_and_in_total() {
    let s = server_configured(false, None, |c| {
        c.api.max_waits_per_client = 3;
        c.api.max_waits = 4;
    })
    .await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let c = from("127.0.0.1");
    let json: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    let events = format!("{}/api/build/{key}/events", s.base);
    // A stream's answer head comes after its wait was opened: three are held.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let r = c.get(&events).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        streams.push(r);
    }
    let refused = c.get(&events).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let json: Value = refused.json().await.unwrap();
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too many open waits"));
    // A download wait is a wait: refused before anything is recorded (no build queued).
    let builds = || async {
        let n: i64 =
            s.db.client()
                .await
                .query_one("SELECT count(*) FROM builds", &[])
                .await
                .unwrap()
                .get(0);
        n
    };
    let before = builds().await;
    let refused = c
        .get(format!("{}/api/download?os=linux&arch=arm64", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(builds().await, before, "a refused download queued a build");
    // A status read without wait is not a wait.
    let status = c.get(format!("{}/api/build/{key}", s.base)).send().await;
    assert_eq!(status.unwrap().status().as_u16(), 200);
    // The server-wide cap (4): another address gets the fourth, a third address a 503,
    // for a long-poll as for a stream.
    let mut fourth = from("127.0.0.2").get(&events).send().await.unwrap();
    assert_eq!(fourth.status().as_u16(), 200);
    let full = from("127.0.0.3")
        .get(format!("{}/api/build/{key}?wait=60s", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status().as_u16(), 503);
    assert_eq!(full.headers()["retry-after"], "5");
    // The build ends: every stream sends its result and ends, and a stream's place is
    // given back before its end reaches the client.
    claim_and_fail(&s, "ended").await;
    for r in streams.iter_mut().chain(std::iter::once(&mut fourth)) {
        let got = read_sse(r, |_| false).await;
        assert_eq!(got.last().unwrap().1, "result");
    }
    let again = c.get(&events).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 200, "the places came back");
}

/// Caddy's CLI installs any answer below 400 as its executable: when the wait of
/// /api/download (and /api/compat) runs out, the answer is 503 with Retry-After and the
/// error JSON, for GET and HEAD, never 202. The API's own endpoints keep their 202.
#[tokio::test(flavor = "multi_thread")]
async fn a_compat_download_whose_wait_runs_out_is_a_503_not_a_2xx() {
    let s = common::server_configured(false, None, |c| {
        c.api.download_wait = Duration::from_millis(300);
        c.api.download_retry_after = Duration::from_secs(7);
    })
    .await;
    let c = client();
    for path in ["/api/download", "/api/compat"] {
        for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let resp = c
                .request(
                    method.clone(),
                    format!(
                        "{}{path}?os=linux&arch=amd64&p=github.com/acme/alpha",
                        s.base
                    ),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 503, "{method} {path}");
            assert_eq!(resp.headers()["retry-after"], "7", "{method} {path}");
            assert!(resp.headers().contains_key("x-caddy-build-key"));
            if method == reqwest::Method::GET {
                let json: Value = resp.json().await.unwrap();
                assert_eq!(json["status_code"], 503);
                let message = json["error"]["message"].as_str().unwrap();
                assert!(message.contains("still queued"), "{message}");
                assert!(json["error"]["id"].is_string());
            }
        }
    }
    let key = c
        .post(format!(
            "{}/api/build?os=linux&arch=amd64&p=github.com/acme/alpha",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(key.status().as_u16(), 202, "the API's own endpoint");
    let key: Value = key.json().await.unwrap();
    let key = key["result"]["key"].as_str().unwrap();
    let by_key = c
        .get(format!("{}/api/build/{key}/download", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status().as_u16(), 202);
}

/// Claims the next queued build as a worker would and fails its attempt permanently with
/// `message`.
async fn claim_and_fail(s: &common::Server, message: &str) {
    let b = s
        .app
        .store
        .claim("test-worker", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    s.app
        .store
        .append_latest(
            &b.key,
            cbs_events::Event::Failed(cbs_events::Failed {
                attempt: b.attempt,
                kind: cbs_events::FailureKind::Permanent,
                step: Some("compile".into()),
                message: message.into(),
            }),
        )
        .await
        .unwrap();
}

/// Connects to a build's event stream with a resume point far past its end, reads the
/// answer's head and hangs up.
async fn connect_and_hang_up(addr: &str, key: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /api/build/{key}/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 4294967295\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

/// Thousands of clients that open an event stream with `Last-Event-ID: 4294967295` and hang
/// up leave nothing behind: the server's tasks go back to their number before, later events
/// of that build wake nobody, and the database pool still answers.
#[tokio::test(flavor = "multi_thread")]
async fn event_streams_of_clients_that_hang_up_end() {
    use futures::StreamExt;
    let s = server(false).await;
    let c = client();
    let json: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    let addr = s.base.trim_start_matches("http://").to_owned();
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up: the database pool opens its connections (a task each) under this load.
    futures::stream::iter(0..500)
        .for_each_concurrent(100, |_| connect_and_hang_up(&addr, &key))
        .await;
    let settled = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut baseline = metrics.num_alive_tasks();
    while tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = metrics.num_alive_tasks();
        if now == baseline && now < 100 {
            break;
        }
        baseline = now;
    }
    const CLIENTS: usize = 2_000;
    futures::stream::iter(0..CLIENTS)
        .for_each_concurrent(100, |_| connect_and_hang_up(&addr, &key))
        .await;
    // Every stream's task ends (hyper drops the body when it sees the connection closed,
    // at the latest at the next keep-alive). Nothing announces a task's end, and the
    // build's own end would end them all anyway (hiding a leak), so the runtime's task count
    // is read until it is back, with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let alive = metrics.num_alive_tasks();
        if alive <= baseline + 8 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{alive} tasks alive after {CLIENTS} hung-up streams, {baseline} before"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pool is not starved: a status read and a new stream answer at once.
    let status = c
        .get(format!("{}/api/build/{key}", s.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status().as_u16(), 200);
    // A resume point past the end of a finished build ends the stream at once.
    claim_and_fail(&s, "first attempt").await;
    let mut ended = c
        .get(format!("{}/api/build/{key}/events", s.base))
        .header("last-event-id", "4294967295")
        .send()
        .await
        .unwrap();
    assert!(read_sse(&mut ended, |_| false).await.is_empty());
}

/// After a forced rebuild, a stream replayed from the start shows the old attempt's state
/// but ends with the new attempt's result, not the old one's.
#[tokio::test(flavor = "multi_thread")]
async fn sse_replay_after_a_forced_rebuild_ends_with_the_new_result() {
    let s = server(false).await;
    let c = client();
    let url = format!("{}/api/build?os=linux&arch=amd64", s.base);
    let json: Value = c.post(&url).send().await.unwrap().json().await.unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    for (n, message) in ["first attempt failed", "second attempt failed"]
        .iter()
        .enumerate()
    {
        if n > 0 {
            let forced = c.post(format!("{url}&force=true")).send().await.unwrap();
            assert_eq!(forced.status().as_u16(), 202);
        }
        claim_and_fail(&s, message).await;
    }
    let mut replay = c
        .get(format!("{}/api/build/{key}/events", s.base))
        .send()
        .await
        .unwrap();
    let all = read_sse(&mut replay, |_| false).await;
    let results: Vec<&(String, String, String)> = all.iter().filter(|m| m.1 == "result").collect();
    assert_eq!(results.len(), 1, "{all:?}");
    assert!(results[0].2.contains("second attempt failed"), "{all:?}");
    assert_eq!(all.last().unwrap().1, "result");
    assert!(
        all.iter()
            .any(|m| m.1 == "state" && m.2.contains("first attempt failed")),
        "the old attempt's state is replayed: {all:?}"
    );
}

/// /readyz says the database is unavailable, and nothing of what the database driver said
/// (which names the host, port, user and database).
#[tokio::test(flavor = "multi_thread")]
async fn readyz_does_not_echo_database_errors() {
    let s = server_configured(false, None, |c| {
        c.database.url = cbs_config::DatabaseUrl::new("postgres://secretuser@127.0.0.1:1/secretdb");
        c.database.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let resp = client()
        .get(format!("{}/readyz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let text = resp.text().await.unwrap();
    assert!(text.contains("the database is unavailable"), "{text}");
    for secret in ["secretuser", "secretdb", "127.0.0.1", "refused"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// A build's history comes a page at a time (at most 1000 events), with the `after` of the
/// next page; a type filter of the global feed that matches nothing still answers.
#[tokio::test(flavor = "multi_thread")]
async fn history_is_paginated_and_the_feed_answers_for_unwritten_types() {
    let s = server(false).await;
    let c = client();
    let json: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    claim_and_fail(&s, "x").await;
    let page = |q: String| {
        let c = c.clone();
        let url = format!("{}/api/build/{key}/history{q}", s.base);
        async move { c.get(url).send().await.unwrap() }
    };
    let first: Value = page("?limit=2".into()).await.json().await.unwrap();
    let seqs = |v: &Value| -> Vec<u64> {
        v["result"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&first), [1, 2]);
    assert_eq!(first["result"]["next"], 2);
    let second: Value = page("?limit=2&after=2".into()).await.json().await.unwrap();
    assert_eq!(seqs(&second), [3]);
    assert!(second["result"]["next"].is_null());
    for bad in ["?limit=0", "?limit=1001", "?after=x", "?page=2"] {
        assert_eq!(page(bad.into()).await.status().as_u16(), 400, "{bad}");
    }
    let feed: Value = c
        .get(format!("{}/api/events?type=cancelled", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(feed["result"]["events"].as_array().unwrap().is_empty());
    assert!(feed["result"]["next"].is_string());
}

/// Opens a connection from `from`, sends a POST's head and the first byte of its body, and
/// waits (at most `limit`) for the server to close it; true if it did.
async fn trickle(addr: std::net::SocketAddr, from: &str, limit: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let Ok(mut conn) = socket.connect(addr).await else {
        return true;
    };
    let head = "POST /api/build HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 answer, then the close
            }
        }
    })
    .await;
    closed.is_ok()
}

/// 500 clients trickle request bodies: the ones past the per-client connection cap are
/// closed at once, the others when the body timeout ends; meanwhile /healthz and a normal
/// build request from another client answer promptly.
#[tokio::test(flavor = "multi_thread")]
async fn trickling_bodies_do_not_hold_the_server() {
    let s = server_configured(false, None, |c| {
        c.api.body_timeout = Duration::from_secs(2);
        c.api.max_connections_per_client = 50;
    })
    .await;
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let tricklers: Vec<_> = (0..500)
        .map(|_| tokio::spawn(trickle(addr, "127.0.0.2", Duration::from_secs(30))))
        .collect();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = c.get(format!("{}/healthz", s.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let build = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(build.status().as_u16(), 202);
    let mut closed = 0;
    for t in tricklers {
        if t.await.unwrap() {
            closed += 1;
        }
    }
    assert_eq!(closed, 500, "every trickling connection was closed");
}

const ADMIN: &str = "admin-token-0123456789";
const BUILDER: &str = "build-token-0123456789";

fn tokens(c: &mut cbs_config::Config) {
    c.access.tokens = vec![
        cbs_config::TokenConfig {
            name: "ops".into(),
            secret: cbs_config::Secret::new(ADMIN.into()),
            scopes: vec![cbs_config::Scope::Admin],
        },
        cbs_config::TokenConfig {
            name: "ci".into(),
            secret: cbs_config::Secret::new(BUILDER.into()),
            scopes: vec![cbs_config::Scope::Build],
        },
    ];
}

/// An admin lists the queue and the workers, and cancels a running build: the worker stops
/// its container within seconds. Others get 401/403; an ended build 409.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_cancels_a_running_build_and_its_container_goes() {
    // The worker's proxy never answers: the build hangs in pin_versions.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            held.push(c);
        }
    });
    let s = server_configured(true, Some(hole_url), tokens).await;
    let c = client();
    let json: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: cbs_domain::BuildKey = json["result"]["key"].as_str().unwrap().parse().unwrap();
    let mut waiter = s.app.hub.watch_build(&key);
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let b = s.app.store.build(&key).await.unwrap().unwrap();
            if b.current_step.as_deref() == Some("pin_versions") {
                return;
            }
            waiter.changed().await;
        }
    })
    .await
    .expect("the build reached pin_versions");
    let containers = || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=org.caddy-build-server.build={key}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(!containers().is_empty(), "the build's container runs");
    let admin_get = |path: &str| c.get(format!("{}{path}", s.base)).bearer_auth(ADMIN).send();
    let queue: Value = admin_get("/api/admin/queue")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queue["result"]["builds"][0]["key"], key.as_str());
    assert_eq!(queue["result"]["builds"][0]["status"], "running");
    let workers: Value = admin_get("/api/admin/workers")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        workers["result"]["workers"][0]["builds"][0]["key"],
        key.as_str()
    );
    assert!(workers["result"]["workers"][0]["builds"][0]["lease_expires_at"].is_string());
    let cancel = format!("{}/api/build/{key}/cancel", s.base);
    let anonymous = c.post(&cancel).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    assert_eq!(
        c.post(&cancel)
            .bearer_auth(BUILDER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        c.get(format!("{}/api/admin/queue", s.base))
            .bearer_auth(BUILDER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    // Docker's own event stream says when the build's containers are destroyed (from just
    // before the cancel, so an early removal is not missed).
    let running: Vec<String> = containers().lines().map(str::to_owned).collect();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(2)).timestamp();
    let mut destroyed = tokio::process::Command::new("docker")
        .args(["events", "--since", &since.to_string(), "--filter"])
        .arg(format!("label=org.caddy-build-server.build={key}"))
        .args(["--filter", "event=destroy", "--format", "{{.ID}}"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let done = c.post(&cancel).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(done.status().as_u16(), 200);
    let done: Value = done.json().await.unwrap();
    assert_eq!(done["result"]["status"], "cancelled");
    // The worker stops the build: its containers go within seconds.
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(destroyed.stdout.take().unwrap()).lines();
        let mut left = running.clone();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !left.is_empty() {
                let id = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("docker events ended");
                left.retain(|short| !id.starts_with(short.as_str()));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("containers {running:?} still there"));
    }
    assert!(containers().is_empty());
    let again = c.post(&cancel).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 409);
    // Hostile admin input: a bad key, an unknown build, bad listing parameters.
    for (method, path, status) in [
        ("POST", "/api/build/not-a-key/cancel".to_owned(), 400),
        ("POST", format!("/api/build/{}/cancel", "0".repeat(64)), 404),
        ("GET", "/api/admin/queue?limit=0".to_owned(), 400),
        ("GET", "/api/admin/queue?limit=1001".to_owned(), 400),
        ("GET", "/api/admin/queue?order=desc".to_owned(), 400),
    ] {
        let resp = c
            .request(method.parse().unwrap(), format!("{}{path}", s.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        let json: Value = resp.json().await.unwrap();
        assert!(json["error"]["message"].is_string(), "{method} {path}");
    }
    let b = s.app.store.build(&key).await.unwrap().unwrap();
    assert_eq!(b.status, cbs_projections::Status::Cancelled);
}

/// Twelve distinct build requests (four platforms by three plugin sets).
fn twelve_builds() -> Vec<String> {
    let platforms = [
        "os=linux&arch=amd64",
        "os=linux&arch=arm64",
        "os=windows&arch=amd64",
        "os=darwin&arch=arm64",
    ];
    let plugins = [
        "p=github.com/acme/alpha@v1.0.0",
        "p=github.com/acme/alpha@v1.1.0",
        "p=example.com/gamma/v2@v2.0.0",
    ];
    platforms
        .iter()
        .flat_map(|o| plugins.iter().map(move |p| format!("{o}&{p}")))
        .collect()
}

async fn submit_as(base: &str, from: &str, query: &str) -> reqwest::Response {
    client()
        .post(format!("{base}/api/build?{query}"))
        .header("x-forwarded-for", from)
        .send()
        .await
        .unwrap()
}

/// Workers take queued builds in turns across clients: one client's twelve queued builds
/// delay another client's single build by at most one claim (first come first served
/// would take it thirteenth). Builds record who asked, without the address.
#[tokio::test(flavor = "multi_thread")]
async fn one_clients_queue_does_not_delay_another_clients_build() {
    let s = server_configured(false, None, |c| {
        c.api.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    let mut first = Vec::new();
    for q in twelve_builds() {
        let r = submit_as(&s.base, "203.0.113.5", &q).await;
        assert_eq!(r.status().as_u16(), 202);
        let json: Value = r.json().await.unwrap();
        first.push(json["result"]["key"].as_str().unwrap().to_owned());
    }
    let r = submit_as(
        &s.base,
        "198.51.100.7",
        "os=linux&arch=amd64&p=example.com/gamma/v2@v2.1.0",
    )
    .await;
    assert_eq!(r.status().as_u16(), 202);
    let json: Value = r.json().await.unwrap();
    let second = json["result"]["key"].as_str().unwrap().to_owned();

    let mut order = Vec::new();
    while let Some(b) = s
        .app
        .store
        .claim("fair-test", Duration::from_secs(60))
        .await
        .unwrap()
    {
        order.push(b.key.to_string());
    }
    assert_eq!(order.len(), 13);
    let at = order.iter().position(|k| *k == second).unwrap();
    assert!(at <= 1, "the second client's build was claimed at {at}");
    // The first client's builds keep their order among themselves.
    let firsts: Vec<_> = order.iter().filter(|k| **k != second).collect();
    assert_eq!(firsts, first.iter().collect::<Vec<_>>());

    // The audit history says who asked: a keyed hash per client, never the address.
    let history: Value = client()
        .get(format!("{}/api/build/{second}/history", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let requested = &history["result"]["events"][0];
    assert_eq!(requested["type"], "requested");
    let who = requested["data"]["client"].as_str().unwrap();
    assert!(who.starts_with("addr:") && who.len() == 21, "{who}");
    assert!(!history.to_string().contains("198.51.100"));
    let other: Value = client()
        .get(format!("{}/api/build/{}/history", s.base, first[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(
        other["result"]["events"][0]["data"]["client"]
            .as_str()
            .unwrap(),
        who
    );
}

/// A client may have only so many builds queued or running; joining builds, other clients
/// and admins are not limited, and a finished build frees a place.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_has_at_most_so_many_builds_in_the_queue() {
    let s = server_configured(false, None, |c| {
        c.api.trusted_proxies = vec!["127.0.0.1/32".into()];
        c.api.max_queued_per_client = 3;
        tokens(c);
    })
    .await;
    let builds = twelve_builds();
    for q in &builds[..3] {
        assert_eq!(submit_as(&s.base, "203.0.113.5", q).await.status(), 202);
    }
    let events = event_count(&s.db).await;
    let refused = submit_as(&s.base, "203.0.113.5", &builds[3]).await;
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let json: Value = refused.json().await.unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("you have 3 builds queued or running")
            && message.contains("at most 3 per client"),
        "{message}"
    );
    assert_eq!(event_count(&s.db).await, events, "a refusal writes nothing");
    // Joining one of its own builds is not a new build.
    assert_eq!(
        submit_as(&s.base, "203.0.113.5", &builds[0]).await.status(),
        202
    );
    // Another client, and the same client's other address (IPv4: no grouping) are free.
    assert_eq!(
        submit_as(&s.base, "198.51.100.7", &builds[3])
            .await
            .status(),
        202
    );
    // An admin is not limited, although it comes from the same address.
    let admin = client()
        .post(format!("{}/api/build?{}", s.base, builds[4]))
        .header("x-forwarded-for", "203.0.113.5")
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status().as_u16(), 202);
    // A build that ends frees a place.
    claim_and_fail(&s, "does not compile").await;
    assert_eq!(
        submit_as(&s.base, "203.0.113.5", &builds[5]).await.status(),
        202
    );
    assert_eq!(
        submit_as(&s.base, "203.0.113.5", &builds[6]).await.status(),
        429
    );
}

/// A long-poll after the largest sequence number there is (`after=4294967295`) waits out its
/// time and answers. The wake-up computed `after + 1`, which overflowed: in a build with
/// overflow checks the handler panicked and the connection dropped without an answer (found
/// while documenting the API's parameters for the OpenAPI document).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_after_the_largest_seq_answers_when_its_wait_ends() {
    let s = server_configured(false, None, |c| {
        c.api.max_long_poll = Duration::from_millis(500);
    })
    .await;
    let c = client();
    let json: Value = c
        .post(format!("{}/api/build?os=linux&arch=amd64", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = json["result"]["key"].as_str().unwrap();
    let start = std::time::Instant::now();
    let resp = c
        .get(format!(
            "{}/api/build/{key}?wait=60s&after={}",
            s.base,
            u32::MAX
        ))
        .send()
        .await
        .expect("an answer, not a dropped connection");
    assert_eq!(resp.status().as_u16(), 200);
    let same: Value = resp.json().await.unwrap();
    assert_eq!(same["result"]["last_seq"], 1);
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "the wait is capped, not skipped"
    );
}

/// A request head over 64 KiB is refused by the HTTP layer with 431, before any route (no
/// error JSON, no request id; the OpenAPI document says so for every operation); a query
/// string over 8 KiB that fits is the api's own 414 with the error JSON (schemathesis sent a
/// query string of over 64 KiB to `HEAD /api/compat`, and 431 was not in the document).
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_request_head_is_a_431_and_a_long_query_a_414() {
    let s = server(false).await;
    let c = client();
    let doc: Value = c
        .get(format!("{}/api/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Well over the limit, so that hyper meets it before the head is complete (it checks
    // its buffer when a parse needs more bytes: a head just over 64 KiB that arrives whole
    // may be read).
    for path in ["/healthz", "/api/events"] {
        let resp = c
            .get(format!("{}{path}", s.base))
            .header("x-padding", "b".repeat(1 << 20))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 431, "{path}");
        assert!(doc["paths"][path]["get"]["responses"]["431"].is_object());
    }
    let long = format!(
        "{}/api/compat?os=linux&arch=amd64&r={}",
        s.base,
        "a".repeat(9_000)
    );
    let resp = c.get(&long).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 414);
    assert!(resp.headers().contains_key("x-request-id"));
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["status_code"], 414);
}
