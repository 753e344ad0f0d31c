//! The fleet of deploy/compose.yml on this Docker engine, for the tests that run it (the
//! chaos test and the scaling benchmark): images, docker-compose with a fixture module
//! proxy in the fleet's network, and the waits every client of it needs.
#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
pub const DEADLINE: Duration = Duration::from_secs(600);

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A fleet brought up with docker-compose; `down -v` when dropped (its logs are printed
/// first when the test failed).
pub struct Fleet {
    pub project: String,
    pub dir: PathBuf,
    pub override_file: PathBuf,
    pub lb: String,
}

impl Fleet {
    pub fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(ROOT)
            .args(["-f", "deploy/compose.yml", "-f"])
            .arg(&self.override_file)
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("FLEET_DIR", &self.dir)
            .env("SERVER_IMAGE", "caddy-build-server:fleet-test")
            .env("GOPROXY_URL", "http://goproxy:8081")
            .env("GOSUMDB", "off")
            .env("WORKER_LEASE", "6s")
            // A build may meet several faults; retries come quickly.
            .env("MAX_ATTEMPTS", "10")
            .env("RETRY_BACKOFF", "1s")
            // The test is one client asking for every build and waiting on each: the
            // per-client limits (tested elsewhere) are off.
            .env("SUBMISSIONS_PER_MINUTE", "0")
            .env("MAX_QUEUED_PER_CLIENT", "0")
            .env("MAX_WAITS_PER_CLIENT", "0")
            .env("LB_PORT", self.lb.rsplit(':').next().unwrap());
        c
    }

    pub fn container(&self, service: &str) -> String {
        run(self.compose().args(["ps", "-q", service]))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .compose()
                .args(["logs", "--no-color", "--tail", "200"])
                .status();
        }
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The images: the fleet's others (made locally when they cannot be pulled) and the server
/// from this build's binary.
pub fn images() {
    run(Command::new(format!("{ROOT}/scripts/images"))
        .env("SKIP_SERVER", "1")
        .env("PULL_TIMEOUT", "5"));
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(BIN, ctx.path().join("caddy-build-server")).unwrap();
    run(Command::new("docker")
        .args(["build", "-q", "-f"])
        .arg(format!("{ROOT}/deploy/server.Dockerfile"))
        .args(["-t", "caddy-build-server:fleet-test"])
        .arg(ctx.path()));
}

pub fn up(dir: &Path) -> Fleet {
    images();
    let proxy = dir.join("goproxy");
    cbs_testkit::fixtures::write_proxy(&proxy).unwrap();
    for d in ["builds", "cache"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    run(Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(dir.join("minisign.key"))
        .env_remove("CONFIG_PATH")
        .current_dir(dir)
        .stderr(Stdio::null()));
    // The api and janitors run as 10001 and read the public key.
    run(Command::new("chown")
        .arg("10001:10001")
        .arg(dir.join("minisign.key.pub")));
    let override_file = dir.join("compose.test.yml");
    std::fs::write(
        &override_file,
        format!(
            r#"version: "3.7"
services:
  goproxy:
    image: cbs-lb:dev
    entrypoint: ["caddy", "file-server", "--root", "/proxy", "--listen", ":8081"]
    volumes:
      - {proxy}:/proxy:ro
    networks: [front]
"#,
            proxy = proxy.display()
        ),
    )
    .unwrap();
    let fleet = Fleet {
        project: format!("cbs-fleet-test-{}", std::process::id()),
        dir: dir.to_owned(),
        override_file,
        lb: format!("127.0.0.1:{}", free_port()),
    };
    run(fleet.compose().args(["up", "-d"]));
    fleet
}

pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    let until = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < until, "the fleet never became ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Long-polls a build through the load balancer until it ends; returns its status body.
/// Retries across a replica's death (the load balancer sends the retry to the other).
pub async fn wait_build(http: &reqwest::Client, base: &str, key: &str) -> serde_json::Value {
    let until = Instant::now() + DEADLINE;
    // The long-poll answers when the build has an event after `after` (at once the first
    // time: every build has its `requested` event).
    let mut after = 0;
    loop {
        assert!(Instant::now() < until, "build {key} never ended");
        let r = match http
            .get(format!("{base}/api/build/{key}?wait=20s&after={after}"))
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => {
                // A replica died under the request; the next one goes to the other.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !r.status().is_success() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let body: serde_json::Value = r.json().await.unwrap();
        after = body["result"]["last_seq"].as_u64().unwrap_or(after);
        let status = body["result"]["status"].as_str().unwrap_or_default();
        if ["complete", "failed", "gave_up", "cancelled"].contains(&status) {
            return body;
        }
    }
}

pub fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}

/// Asks for a build through the load balancer; returns its key.
pub async fn submit(http: &reqwest::Client, base: &str, q: &str) -> String {
    let r = http
        .post(format!("{base}/api/build?{q}"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(status == 200 || status == 202, "{status} {body}");
    body["result"]["key"].as_str().unwrap().to_owned()
}
