//! `caddy-build-server client`, the real binary against a live server (api and worker
//! in-process, fixture modules built in Docker): `verify` says who built a file and from
//! what, or exactly why not (a flipped byte, a file that is not a Go binary, a changed
//! signing key); `status`, `history` and `public-key`; and the exit codes.

use std::path::Path;
use std::process::Command;

mod common;
use common::{client, server};

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");

/// Runs the client with its own config directory; returns (exit code, stdout, stderr).
fn cli(base: &str, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("client")
        .args(["--server", base])
        .args(args)
        .env("CBS_CLIENT_DIR", dir)
        .env_remove("CBS_SERVER")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_says_who_built_a_file_or_exactly_why_not() {
    let s = server(true).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("client");
    let query = "os=linux&arch=arm&arm=7&p=github.com/acme/alpha@v1.0.0&p=example.com/gamma/v2";
    let r = client()
        .get(format!("{}/api/download?{query}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = r.headers()["x-caddy-build-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let binary = r.bytes().await.unwrap().to_vec();
    let file = dir.path().join("caddy");
    std::fs::write(&file, &binary).unwrap();
    let file = file.to_str().unwrap();

    // The server's own binary: who, what, when; the key is pinned on first use.
    let (code, out, err) = cli(&s.base, &home, &["verify", file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("build    {key}")), "{out}");
    assert!(out.contains("caddy    v2.8.4 for linux/armv7"), "{out}");
    assert!(
        out.contains("plugin   github.com/acme/alpha@v1.0.0"),
        "{out}"
    );
    assert!(
        out.contains("plugin   example.com/gamma/v2@v2.1.0"),
        "{out}"
    );
    assert!(
        out.contains(&format!("build:{key}")) || out.contains(&key),
        "{out}"
    );
    assert!(err.contains("pinned the signing key"), "{err}");
    let pinned = std::fs::read_dir(home.join("keys")).unwrap().count();
    assert_eq!(pinned, 1);

    // One flipped byte: other bytes, which this server never built.
    let mut flipped = binary.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    let other = dir.path().join("flipped");
    std::fs::write(&other, &flipped).unwrap();
    let (code, out, err) = cli(&s.base, &home, &["verify", other.to_str().unwrap()]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("different bytes for the same request"),
        "{err}"
    );
    assert!(
        err.contains(&format!("build {key}: Caddy v2.8.4 for linux/armv7")),
        "{err}"
    );
    use sha2::Digest;
    assert!(
        err.contains(&hex::encode(sha2::Sha256::digest(&binary))),
        "{err}"
    );
    assert!(
        err.contains(&hex::encode(sha2::Sha256::digest(&flipped))),
        "{err}"
    );

    // A Go binary of a request this server never built: unknown, with what it says it is.
    let module = dir.path().join("hello");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(
        module.join("go.mod"),
        "module example.com/hello\n\ngo 1.21\n",
    )
    .unwrap();
    std::fs::write(
        module.join("main.go"),
        "package main\n\nfunc main() { println(\"hello\") }\n",
    )
    .unwrap();
    let built = std::process::Command::new(cbs_testkit::go_binary())
        .args(["build", "-o", "hello", "."])
        .current_dir(&module)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.path().join("gocache"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let hello = module.join("hello");
    let (code, out, err) = cli(&s.base, &home, &["verify", hello.to_str().unwrap()]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("unknown binary"), "{err}");
    assert!(err.contains("no Caddy module"), "{err}");

    // Not a Go binary at all.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"just text").unwrap();
    let (code, _, err) = cli(&s.base, &home, &["verify", text.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not a Caddy binary"), "{err}");

    // A file that is not there: bad input.
    let (code, _, err) = cli(&s.base, &home, &["verify", "/nonexistent/caddy"]);
    assert_eq!(code, 2, "{err}");

    // The pinned key changed (here: someone else's key was pinned): refused, saying so;
    // a key given on the command line is trusted instead.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    cbs_signing::keygen(&wrong.join("k.key"), None).unwrap();
    let pin = std::fs::read_dir(home.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(wrong.join("k.key.pub"), &pin).unwrap();
    let (code, _, err) = cli(&s.base, &home, &["verify", file]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("signing key") && err.contains("changed"),
        "{err}"
    );
    let right = cbs_signing::public_key_path(&s.app.config.signing.key_file);
    let (code, out, err) = cli(
        &s.base,
        &home,
        &["verify", file, "--public-key", right.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The wrong key given: the signature does not verify.
    let (code, _, err) = cli(
        &s.base,
        &home,
        &[
            "verify",
            file,
            "--public-key",
            wrong.join("k.key.pub").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("signature does not verify"), "{err}");

    // status and history of the build; public-key.
    let (code, out, err) = cli(&s.base, &home, &["status", &key, "--server", &s.base]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("status   complete"), "{out}");
    let (code, out, _) = cli(&s.base, &home, &["history", &key]);
    assert_eq!(code, 0);
    assert!(out.lines().next().unwrap().contains("requested"), "{out}");
    assert!(out.contains("succeeded"), "{out}");
    let (code, out, _) = cli(
        &s.base,
        &home,
        &["public-key", "--public-key", right.to_str().unwrap()],
    );
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string(&right).unwrap());

    // Exit codes of bad input and of an unreachable server.
    let (code, _, err) = cli(&s.base, &home, &["status", "nope"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&s.base, &home, &["status", &"0".repeat(64)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, _, err) = cli(
        &format!("http://127.0.0.1:{port}"),
        &home,
        &["status", &key],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    let (code, _, err) = cli("ftp://example", &home, &["status", &key]);
    assert_eq!(code, 2, "{err}");

    // The lookup itself: bad input and unknown bytes.
    let r = client()
        .get(format!("{}/api/artifacts/xyz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client()
        .get(format!("{}/api/artifacts/{}", s.base, "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The stored binary of a build (the fs backend's files), found by its size.
fn stored_binary(root: &Path, size: u64) -> std::path::PathBuf {
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::metadata(&p).unwrap().len() == size {
                return p;
            }
        }
    }
    panic!("no stored file of {size} bytes under {}", root.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn build_follows_downloads_checks_and_writes_the_binary() {
    let s = server(true).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("client");
    let out = dir.path().join("bin/caddy");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let args = [
        "build",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "-p",
        "github.com/Acme/Beta",
        "-o",
        out.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = cli(&s.base, &home, &args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // It followed the build: the steps and the compiler's command line went by.
    assert!(stderr.contains("==> compile"), "{stderr}");
    assert!(stderr.contains("go build"), "{stderr}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    let binary = std::fs::read(&out).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&binary))
    };
    assert!(stdout.contains(&sha), "{stdout}");
    assert!(!out.with_extension("part").exists());

    // The same build again, finished now, for a script: one JSON object, no progress.
    let json_out = dir.path().join("again");
    let (code, stdout, stderr) = cli(
        &s.base,
        &home,
        &[
            "build",
            "--os",
            "linux",
            "--arch",
            "amd64",
            "-p",
            "github.com/Acme/Beta",
            "-o",
            json_out.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["request"]["plugins"][0]["module"], "github.com/Acme/Beta");
    assert!(
        v["signature"]
            .as_str()
            .unwrap()
            .contains(v["key"].as_str().unwrap()),
        "{v}"
    );

    // The stored file tampered with (one flipped byte): refused, nothing written.
    let stored = stored_binary(&s.app.config.storage.dir, binary.len() as u64);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let tampered = dir.path().join("tampered");
    let mut args2 = args;
    args2[8] = tampered.to_str().unwrap();
    let (code, stdout, stderr) = cli(&s.base, &home, &args2);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("sha256"), "{stderr}");
    assert!(!tampered.exists() && !tampered.with_extension("part").exists());

    // A plugin that does not compile: exit 1 with the compiler's words.
    let (code, _, stderr) = cli(
        &s.base,
        &home,
        &[
            "build",
            "--os",
            "linux",
            "--arch",
            "amd64",
            "-p",
            "example.com/broken",
            "-o",
            dir.path().join("broken").to_str().unwrap(),
            "--quiet",
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("undefinedFunction"), "{stderr}");
    // A platform the server refuses: exit 2 with its message.
    let (code, _, stderr) = cli(
        &s.base,
        &home,
        &["build", "--os", "linux", "--arch", "nope"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_shows_the_recent_events_then_new_ones() {
    let s = server(false).await;
    let dir = tempfile::tempdir().unwrap();
    let submit = |q: &'static str| {
        let base = s.base.clone();
        async move {
            let v: serde_json::Value = client()
                .post(format!("{base}/api/build?{q}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["result"]["key"].as_str().unwrap().to_owned()
        }
    };
    let first = submit("os=linux&arch=amd64").await;
    let child = Command::new(BIN)
        .args([
            "client",
            "--server",
            &s.base,
            "watch",
            "--type",
            "requested",
        ])
        .args(["--last", "5", "--count", "2"])
        .env("CBS_CLIENT_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let second = submit("os=windows&arch=arm64").await;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("watch never saw the second build")
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains(&first[..12]) && lines[0].contains("requested"),
        "{text}"
    );
    assert!(lines[1].contains(&second[..12]), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_terminal_the_build_shows_progress_bars() {
    let s = server(true).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("caddy");
    // `script` gives the client a terminal (util-linux, in every Debian).
    let command = format!(
        "{BIN} client --server {} build --os linux --arch arm64 -p github.com/acme/alpha -o {}",
        s.base,
        out.display()
    );
    let r = tokio::task::spawn_blocking({
        let home = dir.path().join("client");
        move || {
            Command::new("script")
                .args(["-qec", &command, "/dev/null"])
                .env("CBS_CLIENT_DIR", home)
                .env("COLUMNS", "100")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{text}");
    assert!(out.exists());
    // The steps bar (position of four) and the download's byte bar were drawn.
    assert!(text.contains("/4 "), "{text}");
    assert!(text.contains("MiB") || text.contains("KiB"), "{text}");
}
