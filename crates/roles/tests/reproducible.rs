//! Builds are bit-for-bit reproducible, and the server checks it: with `janitor.reproduce:
//! all`, a second worker (its own id, build directory and Go caches; the same builder image)
//! builds every succeeded request again, and every fixture request (Linux amd64 and arm64,
//! Windows, ARM v7, macOS) gets the same SHA-256, stated by the second builder in its own
//! signed provenance. A worker whose builder image differs (one variable in its environment)
//! is flagged: the check is a mismatch, named in the status, the history, a metric and the
//! message. Prints the rate (docs/benchmarks.md reports it).

mod common;
use std::time::Duration;

use common::{client, server_configured, Server};
use serde_json::Value;

/// Linux, Windows, ARM and macOS, with plugins (one with an upper-case path, one with a
/// major-version suffix) and without.
const REQUESTS: [&str; 5] = [
    "os=linux&arch=amd64&p=github.com/acme/alpha@v1.0.0",
    "os=windows&arch=amd64&p=github.com/Acme/Beta",
    "os=linux&arch=arm&arm=7&p=example.com/gamma/v2",
    "os=darwin&arch=arm64",
    "os=linux&arch=arm64&p=github.com/acme/alpha&p=example.com/gamma/v2@v2.0.0",
];

const ADMIN: &str = "admin-token-0123456789";

/// A server with the janitor (`reproduce`) and a first worker, plus a second worker with
/// its own id, build directory and caches, and the builder image `image`.
async fn two_workers(
    reproduce: cbs_config::Reproduce,
    image: String,
) -> (Server, tempfile::TempDir) {
    let s = server_configured(true, None, |c| {
        c.janitor.reproduce = reproduce;
        c.janitor.poll_interval = Duration::from_millis(500);
        c.access.tokens = vec![cbs_config::TokenConfig {
            name: "ops".into(),
            secret: cbs_config::Secret::new(ADMIN.into()),
            scopes: vec![cbs_config::Scope::Admin],
        }];
    })
    .await;
    tokio::spawn(cbs_roles::janitor::run_services(
        s.app.clone(),
        s.shutdown.clone(),
    ));
    let dirs = tempfile::tempdir().unwrap();
    let mut second = s.app.clone();
    {
        let c = std::sync::Arc::make_mut(&mut second.config);
        c.worker.id = format!("second-{}", std::process::id());
        c.worker.build_dir = dirs.path().join("builds");
        c.worker.cache_dir = dirs.path().join("cache");
        c.worker.docker.image = image;
    }
    assert_ne!(
        s.app.config.worker.cache_dir,
        second.config.worker.cache_dir
    );
    assert_ne!(
        s.app.config.worker.build_dir,
        second.config.worker.build_dir
    );
    tokio::spawn(cbs_roles::worker::run(second, s.shutdown.clone()));
    (s, dirs)
}

/// Builds `q` through the download route; its key and the binary's SHA-256.
async fn build(base: &str, q: &str) -> (String, String) {
    let r = client()
        .get(format!("{base}/api/download?{q}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{q}");
    let key = r.headers()["x-caddy-build-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = r.bytes().await.unwrap();
    use sha2::Digest;
    (key, hex::encode(sha2::Sha256::digest(&bytes)))
}

/// Long-polls the build's status until its reproduction has ended (or the deadline).
async fn reproduction_ended(base: &str, key: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut after = 0;
    loop {
        let b: Value = client()
            .get(format!("{base}/api/build/{key}?wait=20s&after={after}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let b = b["result"].clone();
        let status = b["reproduction"]["status"].as_str().unwrap_or("none");
        if ["matched", "mismatched", "failed"].contains(&status) {
            return b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "build {key}: reproduction still {status} after 5 minutes: {b}"
        );
        after = b["last_seq"].as_u64().unwrap();
    }
}

async fn history_types(base: &str, key: &str) -> Vec<Value> {
    let h: Value = client()
        .get(format!("{base}/api/build/{key}/history"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h["result"]["events"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_worker_reproduces_every_fixture_build_bit_for_bit() {
    let (s, _dirs) = two_workers(cbs_config::Reproduce::All, cbs_testkit::builder_image()).await;
    let mut built = Vec::new();
    for q in REQUESTS {
        built.push((q, build(&s.base, q).await));
    }
    let public_key = s.dirs.path().join("minisign.key.pub");
    let mut same = 0;
    for (q, (key, sha)) in &built {
        let b = reproduction_ended(&s.base, key).await;
        let r = &b["reproduction"];
        let by = b["artifact"]["built_by"].as_str().unwrap();
        assert_ne!(
            r["worker"].as_str(),
            Some(by),
            "{q}: reproduced by its own builder"
        );
        assert_eq!(r["reason"], "sample", "{q}");
        if r["status"] == "matched" {
            same += 1;
        } else {
            eprintln!("{q}: {r}");
            continue;
        }
        assert_eq!(r["sha256"].as_str(), Some(sha.as_str()), "{q}");
        // The second builder's own statement: the same subject, another builder, signed.
        let url = format!("{}{}", s.base, r["provenance"].as_str().unwrap());
        let statement = client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&statement).unwrap();
        assert_eq!(
            v["subject"][0]["digest"]["sha256"].as_str(),
            Some(sha.as_str())
        );
        let builder = v["predicate"]["runDetails"]["builder"]["id"]
            .as_str()
            .unwrap();
        assert!(
            builder.ends_with(r["worker"].as_str().unwrap()),
            "{builder}"
        );
        let first: Value = client()
            .get(format!("{}/api/build/{key}/provenance", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(first["predicate"]["runDetails"]["builder"]["id"]
            .as_str()
            .unwrap()
            .ends_with(by));
        let sig = client()
            .get(format!("{url}.minisig"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("statement.json"), &statement).unwrap();
        std::fs::write(dir.path().join("statement.json.minisig"), &sig).unwrap();
        let out = std::process::Command::new("minisign")
            .arg("-Vm")
            .arg(dir.path().join("statement.json"))
            .arg("-p")
            .arg(&public_key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{q}: minisign: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The history has the whole check.
        let types: Vec<String> = history_types(&s.base, key)
            .await
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        let tail: Vec<&str> = types
            .iter()
            .rev()
            .take(3)
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "reproduction_requested",
                "reproduction_claimed",
                "reproduced"
            ],
            "{q}"
        );
    }
    eprintln!(
        "reproduced {same} of {} builds bit for bit on a second worker",
        REQUESTS.len()
    );
    assert_eq!(same, REQUESTS.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_builder_image_differs_is_flagged() {
    let variant = cbs_testkit::variant_builder_image("GOAMD64=v3");
    let (s, _dirs) = two_workers(cbs_config::Reproduce::Off, variant).await;
    let mismatches = || {
        cbs_metrics::metrics()
            .reproductions
            .get_or_create(&cbs_metrics::OutcomeLabel {
                outcome: "mismatched",
            })
            .get()
    };
    let before = mismatches();
    let (key, _) = build(&s.base, REQUESTS[0]).await;
    let url = format!("{}/api/build/{key}/reproduce", s.base);
    // Only an admin asks; sampling is off, so nothing else does.
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = client()
        .get(format!("{}/api/build/{key}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(b["result"].get("reproduction").is_none(), "{b}");
    let r = client().post(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert!(
        ["queued", "running"].contains(&v["result"]["reproduction"]["status"].as_str().unwrap()),
        "{v}"
    );
    // A second request while one is pending changes nothing.
    let r = client().post(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let bad = format!("{}/api/build/{}/reproduce", s.base, "0".repeat(64));
    let r = client().post(&bad).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let b = reproduction_ended(&s.base, &key).await;
    let r = &b["reproduction"];
    assert_eq!(r["status"], "mismatched", "{b}");
    assert_eq!(r["reason"], "admin");
    let message = r["message"].as_str().unwrap();
    assert!(message.contains("GOAMD64"), "{message}");
    eprintln!("flagged: {message}");
    assert_ne!(r["sha256"], b["artifact"]["sha256"]);
    assert!(r.get("provenance").is_none());
    // The build itself stays downloadable, and marked.
    assert_eq!(b["status"], "complete");
    let events = history_types(&s.base, &key).await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "reproduced");
    assert_eq!(last["data"]["outcome"], "mismatched");
    let r = client()
        .get(format!("{}/api/build/{key}/reproduction", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(mismatches() - before, 1);
    // It can be asked again once ended.
    let r = client().post(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 202);
}
