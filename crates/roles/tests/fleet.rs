//! The fleet of deploy/compose.yml, run for real on this Docker engine: Postgres, the S3
//! server, two api replicas behind Caddy, three workers driving the host's engine, two
//! janitors, each in its own container on the compose networks. The server image is made
//! from this build's binary (deploy/server.Dockerfile); the module proxy is the fixture
//! tree served by a Caddy file server in the fleet's network (the only addition, in an
//! override file). Everything the test asks goes through the load balancer on loopback.
//!
//! Builds requested through the load balancer must each succeed exactly once, with a binary
//! whose sha256 is the recorded one and whose signature stock minisign verifies;
//! `janitor rebuild-projections` must find no difference and no build container may be
//! left.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const DEADLINE: Duration = Duration::from_secs(600);

fn run(cmd: &mut Command) -> String {
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
struct Fleet {
    project: String,
    dir: PathBuf,
    override_file: PathBuf,
    lb: String,
}

impl Fleet {
    fn compose(&self) -> Command {
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
            .env("LB_PORT", self.lb.rsplit(':').next().unwrap());
        c
    }

    fn container(&self, service: &str) -> String {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The images: the fleet's others (made locally when they cannot be pulled) and the server
/// from this build's binary.
fn images() {
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

fn up(dir: &Path) -> Fleet {
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

async fn wait_ready(http: &reqwest::Client, base: &str) {
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
async fn wait_build(http: &reqwest::Client, base: &str, key: &str) -> serde_json::Value {
    let until = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < until, "build {key} never ended");
        let r = match http
            .get(format!("{base}/api/build/{key}?wait=20s"))
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => continue,
        };
        if !r.status().is_success() {
            continue;
        }
        let body: serde_json::Value = r.json().await.unwrap();
        let status = body["result"]["status"].as_str().unwrap_or_default();
        if ["complete", "failed", "gave_up", "cancelled"].contains(&status) {
            return body;
        }
    }
}

fn plugin_sets() -> Vec<Vec<&'static str>> {
    vec![
        vec![],
        vec!["github.com/acme/alpha@v1.0.0"],
        vec!["github.com/acme/alpha@v1.1.0"],
        vec!["github.com/Acme/Beta@v0.2.0"],
        vec!["example.com/gamma/v2@v2.0.0"],
        vec![
            "github.com/acme/alpha@v1.0.0",
            "github.com/Acme/Beta@v0.2.0",
        ],
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_builds_through_the_load_balancer() {
    let dir = tempfile::Builder::new()
        .prefix("cbs-fleet-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let fleet = up(dir.path());
    let base = format!("http://{}", fleet.lb);
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;

    let mut keys = Vec::new();
    for set in plugin_sets() {
        let mut url = format!("{base}/api/build?os=linux&arch=amd64&version=v2.8.4");
        for p in set {
            url.push_str(&format!("&p={p}"));
        }
        let r = http.post(&url).send().await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(status == 200 || status == 202, "{status} {body}");
        keys.push(body["result"]["key"].as_str().unwrap().to_owned());
    }
    let public_key = dir.path().join("minisign.key.pub");
    for key in &keys {
        let status = wait_build(&http, &base, key).await;
        assert_eq!(status["result"]["status"], "complete", "{status}");
        let sha = status["result"]["artifact"]["sha256"].as_str().unwrap();
        // Exactly one success in the build's history.
        let history: serde_json::Value = http
            .get(format!("{base}/api/build/{key}/history"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let successes = history["result"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "succeeded")
            .count();
        assert_eq!(successes, 1, "{history}");
        // The served binary is the recorded one, and stock minisign verifies it.
        let binary = http
            .get(format!("{base}/api/build/{key}/download"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let got = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&binary))
        };
        assert_eq!(got, sha, "build {key}");
        let sig = http
            .get(format!("{base}/api/build/{key}/download.minisig"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let file = dir.path().join(format!("{key}.bin"));
        std::fs::write(&file, &binary).unwrap();
        std::fs::write(dir.path().join(format!("{key}.bin.minisig")), &sig).unwrap();
        run(Command::new("minisign")
            .args(["-V", "-q", "-p"])
            .arg(&public_key)
            .arg("-m")
            .arg(&file));
    }
    // The projections are the fold of the log.
    let janitor = fleet.container("janitor1");
    let report = run(Command::new("docker").args([
        "exec",
        &janitor,
        "caddy-build-server",
        "janitor",
        "rebuild-projections",
    ]));
    assert!(report.contains(": 0 difference(s)"), "{report}");
    // Every worker built something or stood by; no build container is left.
    let left = run(Command::new("docker").args([
        "ps",
        "-aq",
        "--filter",
        "label=org.caddy-build-server.managed",
    ]));
    assert!(left.is_empty(), "containers left: {left}");
}
