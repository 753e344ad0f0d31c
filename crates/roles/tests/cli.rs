//! The real binary as a process: subcommands, config errors, start-up and clean shutdown
//! on SIGTERM, against a real Postgres.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cbs_testkit::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
const DEADLINE: Duration = Duration::from_secs(30);

/// A config file for `db` in a temp dir (kept alive by the returned guard).
fn config_for(db: &TestDb, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yml");
    std::fs::write(
        &path,
        format!(
            "database:\n  url: \"{}\"\napi:\n  listen: 127.0.0.1:0\n  shutdown_grace: 2s\nnotify:\n  poll_interval: 1s\nstorage:\n  dir: {}\nsigning:\n  key_file: {}\n{extra}",
            db.url,
            dir.path().join("artifacts").display(),
            dir.path().join("keys/minisign.key").display(),
        ),
    )
    .unwrap();
    (dir, path)
}

fn run(config: &PathBuf, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CONFIG_PATH", config)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts the binary with stderr read line by line into a channel.
fn spawn(config: &PathBuf, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("CONFIG_PATH", config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads lines until one contains `needle`; returns it (and everything seen, on failure).
fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(_) => panic!(
                "no line with {needle:?} within {DEADLINE:?}; saw:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child to exit, with a deadline (a thread waits on the process; if it does
/// not exit in time, it is killed and the test fails).
fn wait_exit(child: Child) -> std::process::ExitStatus {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("process did not exit within {DEADLINE:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_then_rebuild_projections_on_an_empty_database() {
    let db = TestDb::empty().await;
    let (_dir, config) = config_for(&db, "");
    let out = run(&config, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("migrations done"),
        "{}",
        text(&out.stderr)
    );
    // Twice is fine: nothing left to apply.
    assert!(run(&config, &["migrate"]).status.success());

    let out = run(&config, &["janitor", "rebuild-projections"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "rebuilt 0 builds from 0 events: 0 difference(s)\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_projections_fails_on_a_difference_and_fix_repairs_it() {
    let db = TestDb::new().await;
    let store = cbs_store::Store::new(&db.config()).unwrap();
    let key = cbs_domain::BuildKey::digest(b"cli");
    store
        .request_build(&key, &cbs_testkit::sample_request(4))
        .await
        .unwrap();
    db.client()
        .await
        .execute("UPDATE builds SET attempt = 3", &[])
        .await
        .unwrap();
    let (_dir, config) = config_for(&db, "");
    let out = run(&config, &["janitor", "rebuild-projections"]);
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("1 difference(s)"), "{stdout}");
    assert!(stdout.contains("attempt stored=3 rebuilt=0"), "{stdout}");
    assert!(
        text(&out.stderr).contains("rerun with --fix"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&config, &["janitor", "rebuild-projections", "--fix"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&config, &["janitor", "rebuild-projections"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn config_errors_name_the_file_and_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yml");
    std::fs::write(&path, "api:\n  listen: 127.0.0.1:0\n  colour: blue\n").unwrap();
    let out = run(&path, &["migrate"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("bad.yml"), "{err}");
    assert!(err.contains("key `api.colour`"), "{err}");
    assert!(err.contains("line 3"), "{err}");

    std::fs::write(
        &path,
        "database:\n  url: \"{{ env('CBS_TEST_SURELY_UNSET') }}\"\n",
    )
    .unwrap();
    let out = run(&path, &["migrate"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("environment variable CBS_TEST_SURELY_UNSET is not set"),
        "{err}"
    );

    let missing = dir.path().join("missing.yml");
    let out = run(&missing, &["migrate"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("missing.yml: cannot read it"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn all_roles_start_serve_health_and_stop_cleanly_on_sigterm() {
    let db = TestDb::empty().await;
    let (_dir, config) = config_for(&db, "");
    let (child, rx) = spawn(&config, &["all"]);
    let mut seen = Vec::new();
    let line = wait_for_line(&rx, "api listening", &mut seen);
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
        .to_owned();
    // The listener may have come up before the api.
    if !seen
        .iter()
        .any(|l| l.contains("listening for build events"))
    {
        wait_for_line(&rx, "listening for build events", &mut seen);
    }

    let health = http_get(&addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    sigterm(&child);
    let status = wait_exit(child);
    // Collect what was logged after the signal.
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(l);
    }
    let log = seen.join("\n");
    assert!(status.success(), "exit {status:?}\n{log}");
    for want in [
        "shutting down",
        "api stopped",
        "worker stopped",
        "janitor stopped",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_with_the_error_shape_before_migrations() {
    let db = TestDb::empty().await;
    let (_dir, config) = config_for(&db, "");
    let (child, rx) = spawn(&config, &["api"]);
    let mut seen = Vec::new();
    let line = wait_for_line(&rx, "api listening", &mut seen);
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let ready = http_get(&addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let body = ready.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["status_code"], 503);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("caddy-build-server migrate"),
        "{json}"
    );
    sigterm(&child);
    assert!(wait_exit(child).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn keygen_writes_a_key_pair_minisign_accepts_and_never_overwrites() {
    let db = TestDb::empty().await;
    let (dir, config) = config_for(&db, "");
    let out = run(&config, &["keygen"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout);
    let key = dir.path().join("keys/minisign.key");
    let pub_path = dir.path().join("keys/minisign.key.pub");
    assert_eq!(std::fs::read_to_string(&pub_path).unwrap(), public);
    assert!(public.starts_with("untrusted comment: minisign public key "));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the secret key is private");
    }
    // A second run refuses to overwrite, and says why.
    let again = run(&config, &["keygen"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&pub_path).unwrap(), public);
    // What the key signs, the stock minisign verifies.
    let signer = cbs_signing::Signer::load(&key, None).unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"some artifact").unwrap();
    let sig = signer.sign(&b"some artifact"[..], "t").unwrap();
    std::fs::write(dir.path().join("data.minisig"), sig).unwrap();
    let v = Command::new("minisign")
        .arg("-Vm")
        .arg(&data)
        .arg("-p")
        .arg(&pub_path)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v.stderr));
    // --out writes elsewhere.
    let other = dir.path().join("other.key");
    let out = run(&config, &["keygen", "--out", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(other.exists());
}
