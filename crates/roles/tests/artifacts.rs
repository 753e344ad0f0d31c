//! Published artifacts: signatures checked by the stock `minisign` tool, checksums by
//! `sha256sum -c`, provenance against the binary's build information (read by the real
//! `go version -m`), both storage backends (S3: a real moto server), and an S3 outage during
//! the upload.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cbs_domain::BuildKey;
use cbs_projections::Status;
use cbs_testkit::s3::{Gate, S3Server};
use serde_json::Value;

mod common;
use common::{client, server, server_configured, Server};

const QUERY: &str = "os=linux&arch=amd64&p=github.com/acme/alpha";

/// Waits (through the listening connection) until the build satisfies `done`.
async fn wait_build(
    s: &Server,
    key: &BuildKey,
    what: &str,
    done: impl Fn(&cbs_projections::BuildState) -> bool,
) -> cbs_projections::BuildState {
    let mut waiter = s.app.hub.watch_build(key);
    tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            if let Some(b) = s.app.store.build(key).await.unwrap() {
                if done(&b) {
                    return b;
                }
            }
            waiter.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

async fn get_ok(url: &str) -> reqwest::Response {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    r
}

/// Downloads the binary through caddyserver.com's endpoint; returns it and its build key.
async fn download(s: &Server, dir: &Path) -> (Vec<u8>, String) {
    download_query(s, dir, QUERY).await
}

async fn download_query(s: &Server, dir: &Path, query: &str) -> (Vec<u8>, String) {
    let r = get_ok(&format!("{}/api/download?{query}", s.base)).await;
    let key = r.headers()["x-caddy-build-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = r.bytes().await.unwrap().to_vec();
    std::fs::write(dir.join("caddy"), &bytes).unwrap();
    (bytes, key)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `path@version` of every dependency the real `go version -m` reads from the binary.
fn go_deps(binary: &Path) -> Vec<String> {
    let (ok, out) = run(Command::new(cbs_testkit::go_binary())
        .args(["version", "-m"])
        .arg(binary));
    assert!(ok, "{out}");
    let mut deps: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split('\t').collect();
            (f.first() == Some(&"dep")).then(|| format!("{}@{}", f[1], f[2]))
        })
        .collect();
    deps.sort();
    deps
}

/// Everything a user can check about a published build, with the stock tools.
async fn check_published(s: &Server, key: &str, binary: &[u8], dir: &Path) {
    let pk_text = get_ok(&format!("{}/api/public-key", s.base))
        .await
        .text()
        .await
        .unwrap();
    let pk = cbs_signing::parse_public_key(&pk_text).unwrap();
    std::fs::write(dir.join("key.pub"), &pk_text).unwrap();
    let base = format!("{}/api/build/{key}", s.base);
    let sig = get_ok(&format!("{base}/download.minisig"))
        .await
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.join("caddy.minisig"), &sig).unwrap();
    let sum = get_ok(&format!("{base}/download.sha256"))
        .await
        .text()
        .await
        .unwrap();
    std::fs::write(dir.join("caddy.sha256"), &sum).unwrap();

    // minisign -Vm caddy -P <key>
    let (ok, out) = run(Command::new("minisign")
        .current_dir(dir)
        .args(["-Vm", "caddy", "-P", &pk]));
    assert!(ok, "minisign rejected the binary: {out}");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(binary))
    };
    assert!(out.contains(&format!("build:{key}")), "{out}");
    assert!(out.contains("caddy:v2.8.4"), "{out}");
    assert!(out.contains(&format!("sha256:{sha}")), "{out}");
    let deps = go_deps(&dir.join("caddy"));
    let modules = cbs_signing::modules_hash(deps.iter().map(String::as_str));
    assert!(out.contains(&format!("modules:{modules}")), "{out}");
    // The same with the served key file (-p).
    let (ok, out) = run(Command::new("minisign")
        .current_dir(dir)
        .args(["-Vm", "caddy", "-p", "key.pub"]));
    assert!(ok, "{out}");
    // sha256sum -c
    assert_eq!(sum, format!("{sha}  caddy\n"));
    let (ok, out) = run(Command::new("sha256sum")
        .current_dir(dir)
        .args(["-c", "caddy.sha256"]));
    assert!(ok, "{out}");

    // A flipped byte fails both.
    let flipped = dir.join("flipped");
    std::fs::create_dir_all(&flipped).unwrap();
    let mut bad = binary.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(flipped.join("caddy"), &bad).unwrap();
    std::fs::write(flipped.join("caddy.minisig"), &sig).unwrap();
    std::fs::write(flipped.join("caddy.sha256"), &sum).unwrap();
    let (ok, out) = run(Command::new("minisign")
        .current_dir(&flipped)
        .args(["-Vm", "caddy", "-P", &pk]));
    assert!(!ok, "minisign accepted a tampered binary: {out}");
    let (ok, _) = run(Command::new("sha256sum")
        .current_dir(&flipped)
        .args(["-c", "caddy.sha256"]));
    assert!(!ok, "sha256sum accepted a tampered binary");

    // Provenance: signed, and listing exactly the binary's modules.
    let prov = get_ok(&format!("{base}/provenance"))
        .await
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.join("provenance.json"), &prov).unwrap();
    let prov_sig = get_ok(&format!("{base}/provenance.minisig"))
        .await
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.join("provenance.json.minisig"), &prov_sig).unwrap();
    let (ok, out) =
        run(Command::new("minisign")
            .current_dir(dir)
            .args(["-Vm", "provenance.json", "-P", &pk]));
    assert!(ok, "{out}");
    let statement: Value = serde_json::from_slice(&prov).unwrap();
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(statement["subject"][0]["name"], "caddy");
    assert_eq!(statement["subject"][0]["digest"]["sha256"], sha);
    let mut listed = cbs_signing::provenance::listed_modules(&statement);
    listed.sort();
    assert_eq!(
        listed, deps,
        "provenance lists exactly the binary's modules"
    );
    let pred = &statement["predicate"];
    assert_eq!(
        pred["buildDefinition"]["externalParameters"]["request"]["caddy_version"],
        "v2.8.4"
    );
    let image_digest = pred["runDetails"]["builder"]["builderDependencies"][0]["digest"]["sha256"]
        .as_str()
        .unwrap();
    assert_eq!(image_digest.len(), 64, "the builder image id");
    assert!(pred["runDetails"]["builder"]["id"]
        .as_str()
        .unwrap()
        .ends_with(&s.app.config.worker.id));
    assert!(pred["runDetails"]["metadata"]["startedOn"].is_string());
    assert!(pred["runDetails"]["metadata"]["finishedOn"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_artifacts_verify_with_the_stock_tools_fs_backend() {
    let s = server(true).await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, key) = download(&s, dir.path()).await;
    check_published(&s, &key, &binary, dir.path()).await;
    // The files are where the layout says.
    let b = s
        .app
        .store
        .build(&key.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let a = b.artifact.unwrap();
    assert_eq!(
        a.location,
        format!("builds/{}/{key}/{}", &key[..2], b.attempt)
    );
    for f in &a.files {
        assert!(
            s.app.config.storage.dir.join(&a.location).join(f).is_file(),
            "{f}"
        );
    }
    assert_eq!(a.files.len(), 5);
    // Unknown builds and builds without a binary yet.
    let unknown = format!("{}/api/build/{}/download.minisig", s.base, "0".repeat(64));
    assert_eq!(
        client()
            .get(&unknown)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
}

/// A plugin with a forged build-information blob in its read-only data: the trusted comment's
/// module hash and the provenance name the modules the real `go version -m` reads, never the
/// forged ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_build_information_blob_is_not_signed() {
    let s = server(true).await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, key) =
        download_query(&s, dir.path(), "os=linux&arch=amd64&p=example.com/forger").await;
    let forged = cbs_testkit::fixtures::forged_blob();
    assert!(
        binary.windows(forged.len()).any(|w| w == forged),
        "the look-alike is in the binary"
    );
    check_published(&s, &key, &binary, dir.path()).await;
    let prov = get_ok(&format!("{}/api/build/{key}/provenance", s.base))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !prov.contains(cbs_testkit::fixtures::FORGED_MODULE),
        "{prov}"
    );
    assert!(prov.contains("example.com/forger"), "{prov}");
}

fn s3_storage(s3: &S3Server, endpoint: &str) -> cbs_config::StorageConfig {
    s3.config(endpoint, "cbs")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_s3_backend_stores_and_serves_the_artifacts() {
    let s3 = S3Server::start("artifacts").await;
    let endpoint = s3.endpoint();
    let s = server_configured(true, None, |c| c.storage = s3_storage(&s3, &endpoint)).await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, key) = download(&s, dir.path()).await;
    check_published(&s, &key, &binary, dir.path()).await;
    // Nothing went to the directory backend's place.
    assert!(!s.app.config.storage.dir.join("builds").exists());
    // Ranges stream from S3 through the api.
    let r = client()
        .get(format!("{}/api/build/{key}/download", s.base))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 100-199/{}", binary.len())
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &binary[100..200]);
}

#[tokio::test(flavor = "multi_thread")]
async fn presigned_downloads_redirect_to_the_bucket() {
    let s3 = S3Server::start("artifacts").await;
    let endpoint = s3.endpoint();
    let s = server_configured(true, None, |c| {
        c.storage = s3_storage(&s3, &endpoint);
        c.storage.s3.presign_downloads = true;
    })
    .await;
    // reqwest follows the redirect, as curl -L and Caddy's upgrade client do.
    let binary = get_ok(&format!("{}/api/download?{QUERY}", s.base))
        .await
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let json: Value = client()
        .post(format!("{}/api/build?{QUERY}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["result"]["status"], "complete");
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    assert!(binary.len() > 100_000);
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect
        .get(format!("{}/api/build/{key}/download", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&endpoint), "{location}");
    assert!(location.contains("X-Amz-Expires=600"), "{location}");
    let direct = client().get(&location).send().await.unwrap();
    assert_eq!(direct.status().as_u16(), 200);
    assert_eq!(direct.bytes().await.unwrap().to_vec(), binary);
    // HEAD still answers from the api.
    let head = no_redirect
        .head(format!("{}/api/build/{key}/download", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_unreachable_during_upload_fails_retryably_and_the_retry_publishes() {
    let s3 = S3Server::start("artifacts").await;
    let gate = Gate::start(s3.addr(), false).await;
    let s = server_configured(true, None, |c| c.storage = s3_storage(&s3, &gate.url())).await;
    let json: Value = client()
        .post(format!("{}/api/build?{QUERY}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: BuildKey = json["result"]["key"].as_str().unwrap().parse().unwrap();
    // The build runs; its upload meets a closed gate.
    let failed = wait_build(&s, &key, "the first attempt fails", |b| {
        b.status == Status::Failed
    })
    .await;
    let err = failed.last_error.clone().unwrap();
    assert_eq!(err.kind, cbs_events::FailureKind::Retryable);
    assert_eq!(err.step.as_deref(), Some("publish"), "{err:?}");
    assert!(
        err.message.contains("storage unavailable"),
        "{}",
        err.message
    );
    assert!(failed.artifact.is_none());
    let events = s.app.store.events(&key, 0, 1000).await.unwrap();
    assert!(!events
        .iter()
        .any(|e| matches!(e.event, cbs_events::Event::Succeeded(_))));
    // S3 comes back; the build is retried (as the janitor does) and publishes.
    gate.set_open(true);
    s.app
        .store
        .append_latest(
            &key,
            cbs_events::Event::Requeued(cbs_events::Requeued {
                attempt: failed.attempt,
                reason: cbs_events::RequeueReason::Retry,
                not_before: chrono::Utc::now(),
            }),
        )
        .await
        .unwrap();
    let done = wait_build(&s, &key, "the retry succeeds", |b| {
        b.status == Status::Succeeded
    })
    .await;
    assert_eq!(done.attempt, failed.attempt + 1);
    let a = done.artifact.clone().unwrap();
    assert!(a.location.ends_with(&format!("/{}", done.attempt)));
    // Every file the event names is in the bucket.
    let storage = cbs_storage::Storage::connect(&s3_storage(&s3, &s3.endpoint()))
        .await
        .unwrap();
    for f in &a.files {
        assert!(
            storage
                .head(&format!("{}/{f}", a.location))
                .await
                .unwrap()
                .is_some(),
            "{f} is stored"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (binary, k) = download(&s, dir.path()).await;
    assert_eq!(k, key.as_str());
    check_published(&s, &k, &binary, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_not_downloaded_for_the_retention_expire_and_a_new_request_rebuilds() {
    let s = server_configured(true, None, |c| {
        c.janitor.retention = Duration::from_secs(2);
        c.janitor.retention_check_interval = Duration::from_millis(200);
        c.janitor.leader_check_interval = Duration::from_millis(300);
    })
    .await;
    tokio::spawn(cbs_roles::janitor::run_services(
        s.app.clone(),
        s.shutdown.clone(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let (first, key) = download(&s, dir.path()).await;
    let parsed: BuildKey = key.parse().unwrap();
    let built = s.app.store.build(&parsed).await.unwrap().unwrap();
    let location = built.artifact.clone().unwrap().location;
    let expired = wait_build(&s, &parsed, "expired", |b| b.status == Status::Expired).await;
    assert!(expired.artifact.is_none());
    // The event comes first, then the janitor deletes the files (no event says when: the
    // directory is watched, with a deadline).
    let files = s.app.config.storage.dir.join(&location);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while files.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the files are deleted: {} still exists",
            files.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = s.app.store.events(&parsed, 0, 1000).await.unwrap();
    assert!(matches!(
        &history.last().unwrap().event,
        cbs_events::Event::ArtifactDeleted(d) if d.reason.contains("not downloaded")
    ));
    // By key: gone, and the message says how to get it back.
    let r = client()
        .get(format!("{}/api/build/{key}/download", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 410);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request the build again"),
        "{body}"
    );
    // The same request again rebuilds it (a new attempt) and serves it.
    let (again, key2) = download(&s, dir.path()).await;
    assert_eq!(key2, key);
    let rebuilt = s.app.store.build(&parsed).await.unwrap().unwrap();
    assert_eq!(rebuilt.status, Status::Succeeded);
    assert_eq!(rebuilt.attempt, built.attempt + 1);
    assert_eq!(again.len(), first.len());
}

/// Files of an attempt that was never published (its worker uploaded, then failed, was
/// fenced off, or died before its `succeeded` event) are removed by the janitor's
/// retention, once the attempt has been over for twice the lease; the published attempt's
/// files stay and are served.
#[tokio::test(flavor = "multi_thread")]
async fn files_of_attempts_never_published_are_removed_and_the_published_ones_stay() {
    let s = server_configured(false, None, |c| {
        c.worker.lease = Duration::from_secs(3);
        c.janitor.retry_backoff = Duration::from_millis(100);
        c.janitor.retention_check_interval = Duration::from_millis(200);
        c.janitor.leader_check_interval = Duration::from_millis(300);
    })
    .await;
    // Attempt 1: a worker that stored its files and then failed (retryably).
    let request = cbs_testkit::request_with("linux", "amd64", None, &[]);
    let key = request.key();
    s.app.store.request_build(&key, &request).await.unwrap();
    let claimed = s
        .app
        .store
        .claim("vanished-worker", Duration::from_secs(3))
        .await
        .unwrap()
        .expect("the build is claimable");
    assert_eq!((claimed.key.clone(), claimed.attempt), (key.clone(), 1));
    let storage = cbs_storage::Storage::connect(&s.app.config.storage)
        .await
        .unwrap();
    let first = cbs_domain::artifact::ArtifactPath {
        key: &key,
        attempt: 1,
    };
    for name in ["caddy", "caddy.minisig", "caddy.sha256"] {
        storage
            .put_bytes(&first.file(name), b"unpublished".to_vec().into())
            .await
            .unwrap();
    }
    let first_dir = s.app.config.storage.dir.join(first.location());
    assert!(first_dir.join("caddy").exists());
    s.app
        .store
        .append(
            &claimed,
            cbs_events::Event::Failed(cbs_events::Failed {
                attempt: 1,
                kind: cbs_events::FailureKind::Retryable,
                step: Some("publish".into()),
                message: "stored the files, then lost the storage".into(),
            }),
        )
        .await
        .unwrap();
    // The janitor retries it; a worker builds and publishes attempt 2.
    tokio::spawn(cbs_roles::janitor::run_services(
        s.app.clone(),
        s.shutdown.clone(),
    ));
    tokio::spawn(cbs_roles::worker::run(s.app.clone(), s.shutdown.clone()));
    let built = wait_build(&s, &key, "built by attempt 2", |b| {
        b.status == Status::Succeeded
    })
    .await;
    assert_eq!(built.attempt, 2);
    let location = built.artifact.clone().unwrap().location;
    assert_eq!(
        location,
        cbs_domain::artifact::ArtifactPath {
            key: &key,
            attempt: 2
        }
        .location()
    );
    // No event says when the files go: the directory is watched, with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&first_dir).is_ok_and(|mut d| d.next().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "attempt 1's files are removed: {} still holds files",
            first_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The published attempt is whole and served.
    let published = s.app.config.storage.dir.join(&location);
    for name in &built.artifact.as_ref().unwrap().files {
        assert!(published.join(name).exists(), "{name} of attempt 2 stays");
    }
    let dir = tempfile::tempdir().unwrap();
    let r = get_ok(&format!("{}/api/build/{key}/download", s.base)).await;
    let binary = r.bytes().await.unwrap();
    assert_eq!(binary.len() as u64, built.artifact.as_ref().unwrap().size);
    std::fs::write(dir.path().join("caddy"), &binary).unwrap();
    check_published(&s, key.as_str(), &binary, dir.path()).await;
}

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// Replacements are an operator's power: anonymous requests may not replace (not even
/// Caddy itself), deny rules cover `old`, `new` and case variants, and an admin's
/// replacement is stated in the trusted comment, and covered by its module hash.
#[tokio::test(flavor = "multi_thread")]
async fn replacements_need_the_admin_scope_and_are_signed_into_the_trusted_comment() {
    let s = server_configured(true, None, |c| {
        c.access.tokens = vec![cbs_config::TokenConfig {
            name: "ops".into(),
            secret: cbs_config::Secret::new(ADMIN_TOKEN.into()),
            scopes: vec![cbs_config::Scope::Admin],
        }];
        c.packages.deny = vec!["example.com/GAMMA/".into()];
    })
    .await;
    let c = client();
    let base = format!("{}/api/download?os=linux&arch=amd64", s.base);
    let refused = [
        // Anonymous: no replacement at all, Caddy itself least of all.
        (
            format!("{base}&p=github.com/acme/alpha&r=github.com/caddyserver/caddy/v2=github.com/acme/alpha@v1.0.0"),
            None,
            403,
            "admin scope",
        ),
        (
            format!("{base}&p=github.com/acme/alpha&r=github.com/acme/alpha=github.com/acme/alpha@v1.0.0"),
            None,
            403,
            "admin scope",
        ),
        // Deny rules ignore case, as plugin, as new and as old.
        (format!("{base}&p=example.com/gamma/v2"), None, 403, "may not be built"),
        (
            format!("{base}&p=github.com/acme/alpha&r=github.com/acme/alpha=example.com/gamma/v2@v2.0.0"),
            Some(ADMIN_TOKEN),
            403,
            "may not be built",
        ),
        (
            format!("{base}&p=github.com/acme/alpha&r=example.com/Gamma/v2=github.com/acme/alpha@v1.0.0"),
            Some(ADMIN_TOKEN),
            403,
            "may not be built",
        ),
        // A wrong token is a 401 even on a public server.
        (
            format!("{base}&p=github.com/acme/alpha"),
            Some("not-a-token-at-all"),
            401,
            "unknown API token",
        ),
    ];
    for (url, token, status, want) in refused {
        let mut req = c.get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{url}");
        let json: Value = resp.json().await.unwrap();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{url}: {message}");
    }
    let r = c
        .get(format!(
            "{base}&p=github.com/acme/alpha&r=github.com/acme/alpha=github.com/acme/alpha@v1.0.0"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let key = r.headers()["x-caddy-build-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let binary = r.bytes().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("caddy"), &binary).unwrap();
    let sig = get_ok(&format!("{}/api/build/{key}/download.minisig", s.base))
        .await
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.path().join("caddy.minisig"), &sig).unwrap();
    let pk = get_ok(&format!("{}/api/public-key", s.base))
        .await
        .text()
        .await
        .unwrap();
    let pk = cbs_signing::parse_public_key(&pk).unwrap();
    let (ok, out) = run(Command::new("minisign")
        .current_dir(dir.path())
        .args(["-Vm", "caddy", "-P", &pk]));
    assert!(ok, "{out}");
    assert!(
        out.contains("replace:github.com/acme/alpha=>github.com/acme/alpha@v1.0.0 "),
        "{out}"
    );
    // The module hash covers the replacement lines, as `go version -m` prints them.
    let (ok, listing) = run(Command::new(cbs_testkit::go_binary())
        .args(["version", "-m"])
        .arg(dir.path().join("caddy")));
    assert!(ok, "{listing}");
    let mut lines: Vec<String> = Vec::new();
    for l in listing.lines() {
        let f: Vec<&str> = l.trim().split('\t').collect();
        match f.first() {
            Some(&"dep") => lines.push(format!("{}@{}", f[1], f[2])),
            Some(&"=>") => {
                let last = lines.last_mut().unwrap();
                *last = format!("{last} => {}@{}", f[1], f[2]);
            }
            _ => {}
        }
    }
    assert!(
        lines.contains(&"github.com/acme/alpha@v1.1.0 => github.com/acme/alpha@v1.0.0".to_owned()),
        "{lines:?}"
    );
    let modules = cbs_signing::modules_hash(lines.iter().map(String::as_str));
    assert!(out.contains(&format!("modules:{modules}")), "{out}");
}
