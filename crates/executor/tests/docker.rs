//! The docker executor against the real Docker engine, the real go tool (in a locally built
//! image) and the fixture module proxy.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::plan::{plan, GoCommand, Phase};
use cbs_domain::{BuildRequest, Platform};
use cbs_executor::{
    DockerExecutor, DockerSettings, Executor, GoSettings, PlanOutcome, Progress, LABEL_DEPLOYMENT,
    LABEL_WORKER,
};
use cbs_testkit::FixtureProxy;
use tokio::sync::mpsc;

const WORKER: &str = "docker-test";

async fn executor(goproxy: &str, cache: &Path, worker: &str) -> Executor {
    let settings = DockerSettings {
        container: cbs_config::DockerConfig {
            host: String::new(),
            image: cbs_testkit::builder_image(),
            path: "/usr/local/go/bin".into(),
            user: cbs_testkit::builder_user(),
            memory_bytes: 2 << 30,
            cpus: 2.0,
            pids_limit: 512,
            tmpfs_size: "1g".into(),
        },
        proxy: std::sync::Arc::new(
            cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                goproxy: goproxy.to_owned(),
                credentials: Vec::new(),
                ca_pem: None,
                timeout: Duration::from_secs(600),
                cache_ttl: Duration::from_secs(1),
            })
            .unwrap(),
        ),
        deployment: "executor-tests".into(),
    };
    let go = GoSettings {
        goproxy: goproxy.to_owned(),
        gosumdb: "off".into(),
        command_timeout: Duration::from_secs(600),
        gonosumdb: String::new(),
        netrc: None,
        proxy_ca: None,
    };
    let docker = DockerExecutor::connect(
        settings,
        go,
        cache.join("mod"),
        cache.join("build"),
        worker.into(),
    )
    .await
    .unwrap();
    Executor::Docker(Box::new(docker))
}

use cbs_testkit::request_with as request;

async fn build(
    exec: &Executor,
    req: &BuildRequest,
) -> (PlanOutcome, Vec<Progress>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = exec
        .run_plan(&plan(req), req.key().as_str(), dir.path(), &tx)
        .await
        .unwrap();
    drop(tx);
    let mut events = Vec::new();
    while let Some(p) = rx.recv().await {
        events.push(p);
    }
    (outcome, events, dir)
}

/// Containers with our worker label (there must be none after a run).
fn our_containers(worker: &str) -> String {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label={LABEL_WORKER}={worker}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs an untrusted linux/amd64 binary the way it was built: in the builder image, as the
/// builder user, with no network and a read-only root.
fn run_sandboxed(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--cap-drop",
            "ALL",
        ])
        .args([
            "--security-opt",
            "no-new-privileges:true",
            "--user",
            &cbs_testkit::builder_user(),
        ])
        .arg("-v")
        .arg(format!("{}:/out:ro", dir.display()))
        .arg(cbs_testkit::builder_image())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn builds_for_several_platforms_with_verified_build_info() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), WORKER).await;

    // linux/amd64 with two plugins: it runs and lists both at the resolved versions.
    let req = request(
        "linux",
        "amd64",
        None,
        &[
            ("github.com/acme/alpha", "v1.1.0"),
            ("example.com/gamma/v2", "v2.0.0"),
        ],
    );
    let (outcome, events, dir) = build(&exec, &req).await;
    let PlanOutcome::Built { binary, .. } = outcome else {
        panic!("{outcome:?}\n{events:#?}")
    };
    BuildInfo::from_binary(&std::fs::read(&binary).unwrap())
        .unwrap()
        .check_matches(&req)
        .unwrap();
    let listed = run_sandboxed(dir.path(), &["/out/caddy", "list-modules"]);
    assert!(
        listed.contains("http.handlers.alpha github.com/acme/alpha v1.1.0"),
        "{listed}"
    );
    assert!(
        listed.contains("http.handlers.gamma example.com/gamma/v2 v2.0.0"),
        "{listed}"
    );
    assert!(listed.contains("http.handlers.file_server"), "{listed}");
    let finished: Vec<(&str, Option<i64>)> = events
        .iter()
        .filter_map(|e| match e {
            Progress::StepFinished {
                step, exit_code, ..
            } => Some((*step, *exit_code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        [
            ("initialize_module", Some(0)),
            ("pin_versions", Some(0)),
            ("tidy_module", Some(0)),
            ("compile", Some(0))
        ]
    );

    // Other platforms: build info names the platform, Caddy and the plugin.
    for (os, arch, arm, file) in [
        ("windows", "amd64", None, "caddy.exe"),
        ("linux", "arm64", None, "caddy"),
        ("linux", "arm", Some("7"), "caddy"),
    ] {
        let req = request(os, arch, arm, &[("github.com/Acme/Beta", "v0.2.0")]);
        let (outcome, events, _dir) = build(&exec, &req).await;
        let PlanOutcome::Built { binary, .. } = outcome else {
            panic!("{os}/{arch}: {outcome:?}\n{events:#?}")
        };
        assert_eq!(binary.file_name().unwrap(), file);
        let info = BuildInfo::from_binary(&std::fs::read(&binary).unwrap()).unwrap();
        info.check_matches(&req)
            .unwrap_or_else(|p| panic!("{os}/{arch}: {p:?}"));
    }
    assert_eq!(our_containers(WORKER), "", "every container was removed");
}

#[tokio::test]
async fn a_plugin_that_does_not_compile_fails_with_the_compilers_error() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-broken").await;
    let req = request("linux", "amd64", None, &[("example.com/broken", "v1.0.0")]);
    let (outcome, _events, _dir) = build(&exec, &req).await;
    match outcome {
        PlanOutcome::Failed {
            step, exit, tail, ..
        } => {
            assert_eq!(step, "compile");
            assert_eq!(exit.code, Some(1));
            assert!(
                tail.join("\n").contains("undefined: undefinedFunction"),
                "{tail:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(our_containers("docker-test-broken"), "");
}

#[tokio::test]
async fn an_unreachable_proxy_fails_a_resolve_step() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&dead, cache.path(), "docker-test-dead").await;
    let req = request("linux", "amd64", None, &[]);
    let (outcome, _events, _dir) = build(&exec, &req).await;
    match outcome {
        PlanOutcome::Failed { step, tail, .. } => {
            assert_eq!(step, "pin_versions");
            // Go's words, with the gate's: which proxy, and why it could not be reached
            // (its address, never a credential).
            let tail = tail.join("\n");
            assert!(
                tail.contains(&format!("cannot reach the module proxy {dead}")),
                "{tail}"
            );
            assert!(
                tail.to_ascii_lowercase().contains("connection refused"),
                "{tail}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Writes a program that prints its environment and network interfaces, dials `addr`,
/// asks the gate for `gate_path`, and writes `marker` into GOMODCACHE and GOCACHE (or
/// reports whether it is there, with `check`).
fn probe_program(dir: &Path, addr: &str, gate_path: &str) {
    std::fs::write(dir.join("go.mod"), "module probe\n\ngo 1.21\n").unwrap();
    std::fs::write(
        dir.join("main.go"),
        format!(
            r#"package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

func main() {{
	for _, e := range os.Environ() {{
		fmt.Println("env", e)
	}}
	ifs, _ := net.Interfaces()
	for _, i := range ifs {{
		fmt.Println("interface", i.Name)
	}}
	c, err := net.DialTimeout("tcp", "{addr}", 3*time.Second)
	if err != nil {{
		fmt.Println("dial failed:", err)
	}} else {{
		c.Close()
		fmt.Println("dial ok")
	}}
	resp, err := (&http.Client{{Timeout: 10 * time.Second}}).Get("http://127.0.0.1:7070/0/{gate_path}")
	if err != nil {{
		fmt.Println("gate failed:", err)
	}} else {{
		b, _ := io.ReadAll(resp.Body)
		fmt.Printf("gate %d %q\n", resp.StatusCode, b)
	}}
	for _, v := range []string{{"GOMODCACHE", "GOCACHE"}} {{
		f := filepath.Join(os.Getenv(v), "marker")
		if len(os.Args) > 1 && os.Args[1] == "check" {{
			_, err := os.Stat(f)
			fmt.Println(v, "marker present:", err == nil)
		}} else {{
			err := os.WriteFile(f, []byte("poison"), 0o644)
			fmt.Println(v, "marker written:", err == nil)
			fmt.Println(v, "write error:", err)
		}}
	}}
}}
"#
        ),
    )
    .unwrap();
}

/// Runs the probe (`go run . [arg]`) in a new directory in `phase`; its output.
async fn run_probe(exec: &Executor, addr: &str, phase: Phase, arg: Option<&str>) -> Vec<String> {
    let target = Platform::new("linux", "amd64", None).unwrap().go_env();
    let dir = tempfile::tempdir().unwrap();
    probe_program(dir.path(), addr, "github.com/caddyserver/caddy/v2/@v/list");
    if let Executor::Docker(d) = exec {
        d.give_to_builder(dir.path()).unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut args = vec!["run".to_owned(), ".".to_owned()];
    args.extend(arg.map(str::to_owned));
    let cmd = GoCommand { args };
    let exit = exec
        .run(dir.path(), "probe", &cmd, phase, &target, &tx)
        .await
        .unwrap();
    drop(tx);
    let mut out = Vec::new();
    while let Some(l) = rx.recv().await {
        out.push(l);
    }
    assert!(exit.success(), "{phase:?}: {out:?}");
    out
}

/// The host's address on Docker's default bridge (a local interface of this machine).
fn bridge_gateway() -> String {
    let out = Command::new("docker")
        .args([
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ])
        .output()
        .unwrap();
    let mut ip = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if ip.is_empty() {
        // Not always reported: the address of the bridge's interface.
        let out = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "docker0"])
            .output()
            .unwrap();
        ip = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_owned();
    }
    assert!(!ip.is_empty(), "no address of Docker's bridge network");
    ip
}

#[tokio::test]
async fn build_containers_reach_the_module_proxy_through_the_gate_and_nothing_else() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-net").await;
    // A service of the host, on every interface: what a container on a bridge could reach
    // (as it could the cloud metadata address, the Docker engine's port, ...).
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let addr = format!(
        "{}:{}",
        bridge_gateway(),
        host_service.local_addr().unwrap().port()
    );
    std::env::set_var("CBS_WORKER_SECRET", "hunter2");
    for phase in [Phase::Resolve, Phase::Compile] {
        let out = run_probe(&exec, &addr, phase, None).await;
        // Only the loopback interface: no route to anything, the metadata address included.
        let interfaces: Vec<&String> = out.iter().filter(|l| l.starts_with("interface ")).collect();
        assert_eq!(interfaces, ["interface lo"], "{phase:?}: {out:?}");
        assert!(
            out.iter().any(|l| l.starts_with("dial failed:")),
            "{phase:?}: {out:?}"
        );
        let through_gate = out
            .iter()
            .any(|l| l.starts_with("gate 200") && l.contains("v2.8.4"));
        assert_eq!(through_gate, phase == Phase::Resolve, "{phase:?}: {out:?}");
        assert!(
            !out.iter().any(|l| l.contains("hunter2")),
            "{phase:?}: {out:?}"
        );
        assert!(out.iter().any(|l| l == "env GOTOOLCHAIN=local"), "{out:?}");
        assert!(out.iter().any(|l| l == "env CGO_ENABLED=0"), "{out:?}");
    }
    assert_eq!(our_containers("docker-test-net"), "");
}

#[tokio::test]
async fn what_a_build_writes_into_the_caches_no_other_build_sees() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-layers").await;
    for phase in [Phase::Resolve, Phase::Compile] {
        // A build that runs code of its own (as one that exploited the toolchain could)
        // writes into both caches: it may, in its own layer.
        let out = run_probe(&exec, "127.0.0.1:9", phase, None).await;
        for v in ["GOCACHE", "GOMODCACHE"] {
            let written = format!("{v} marker written: true");
            // The module cache is read-only while compiling.
            let want = v == "GOCACHE" || phase == Phase::Resolve;
            assert_eq!(out.contains(&written), want, "{phase:?}: {out:?}");
        }
        // Neither the shared caches nor the next build see it.
        for shared in ["mod", "build"] {
            assert!(
                !cache.path().join(shared).join("marker").exists(),
                "{phase:?}: {shared}"
            );
        }
        let out = run_probe(&exec, "127.0.0.1:9", phase, Some("check")).await;
        for v in ["GOCACHE", "GOMODCACHE"] {
            assert!(
                out.contains(&format!("{v} marker present: false")),
                "{phase:?}: {out:?}"
            );
        }
    }
    // Nothing of the sandboxes is left: no volume, no layer directory.
    let volumes = Command::new("docker")
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label={LABEL_WORKER}=docker-test-layers"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&volumes.stdout).trim(), "");
}

#[tokio::test]
async fn module_files_a_build_fetched_are_shared_and_reused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-share").await;
    // The same plugin for two platforms: the second build takes every module's zip from
    // the shared cache.
    let mut fetched = 0;
    for arch in ["amd64", "arm64"] {
        let req = request("linux", arch, None, &[("github.com/acme/alpha", "v1.1.0")]);
        let (outcome, events, _dir) = build(&exec, &req).await;
        assert!(
            matches!(outcome, PlanOutcome::Built { .. }),
            "{arch}: {outcome:?}\n{events:#?}"
        );
        if arch == "amd64" {
            fetched = proxy.zips_served();
            assert!(fetched > 0);
        } else {
            assert_eq!(proxy.zips_served(), fetched, "zips fetched again");
        }
        // Shared: what the gate relayed and go.sum vouches for, read-only, the builder's.
        let v = cache
            .path()
            .join("mod/cache/download/github.com/acme/alpha/@v");
        for f in ["v1.1.0.zip", "v1.1.0.mod", "v1.1.0.info", "v1.1.0.ziphash"] {
            let meta = std::fs::symlink_metadata(v.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{f}");
            assert_eq!(
                format!("{}:{}", meta.uid(), meta.gid()),
                cbs_testkit::builder_user(),
                "{f}"
            );
        }
    }
}

#[tokio::test]
async fn orphans_of_this_worker_are_removed_at_start() {
    let cache = tempfile::tempdir().unwrap();
    let worker = "docker-test-orphans";
    let create = |deployment: &str| {
        let out = Command::new("docker")
            .args([
                "create",
                "--label",
                &format!("{LABEL_WORKER}={worker}"),
                "--label",
                &format!("{LABEL_DEPLOYMENT}={deployment}"),
            ])
            .arg(cbs_testkit::builder_image())
            .arg("go")
            .arg("version")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // Whatever an earlier failed run of this test left.
    for id in our_containers(worker).lines() {
        let _ = Command::new("docker").args(["rm", "-f", id]).output();
    }
    // A container left behind by an earlier run of this worker, and one of a worker with
    // the same name in another deployment sharing the engine.
    create("executor-tests");
    let foreign = create("another-deployment");
    let Executor::Docker(exec) = executor("http://127.0.0.1:9", cache.path(), worker).await else {
        unreachable!()
    };
    assert_eq!(exec.remove_orphans().await.unwrap(), 1);
    let left = our_containers(worker);
    assert!(left.contains(&foreign[..12]), "{left}");
    assert_eq!(left.lines().count(), 1, "{left}");
    let _ = Command::new("docker").args(["rm", "-f", &foreign]).output();
}

#[tokio::test]
async fn a_cancelled_run_leaves_no_container_behind() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let worker = "docker-test-cancel";
    let exec = executor(&proxy.url(), cache.path(), worker).await;
    let dir = tempfile::tempdir().unwrap();
    probe_program(dir.path(), "127.0.0.1:9", "x");
    // A program that never ends, cancelled once its container runs.
    std::fs::write(
        dir.path().join("main.go"),
        "package main\n\nimport \"time\"\n\nfunc main() { println(\"started\"); time.Sleep(time.Hour) }\n",
    )
    .unwrap();
    if let Executor::Docker(d) = &exec {
        d.give_to_builder(dir.path()).unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = Platform::new("linux", "amd64", None).unwrap().go_env();
    let cmd = GoCommand {
        args: vec!["run".into(), ".".into()],
    };
    let mut run = Box::pin(exec.run(dir.path(), "cancel", &cmd, Phase::Compile, &target, &tx));
    let started = async {
        while let Some(l) = rx.recv().await {
            if l == "started" {
                return;
            }
        }
    };
    tokio::select! {
        r = &mut run => panic!("the endless program ended: {r:?}"),
        () = started => {}
    }
    let id = our_containers(worker);
    assert_eq!(id.lines().count(), 1, "one running container: {id:?}");
    // Listen for the engine's event that this container is destroyed, then drop the run.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 120;
    let mut watcher = tokio::process::Command::new("docker")
        .args([
            "events",
            "--format",
            "{{.ID}}",
            "--until",
            &until.to_string(),
        ])
        .args([
            "--filter",
            &format!("container={id}"),
            "--filter",
            "event=destroy",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut events = tokio::io::BufReader::new(watcher.stdout.take().unwrap());
    use tokio::io::AsyncBufReadExt;
    // With --until, docker also replays its recent events, so the destroy is seen even if
    // it happens before the watcher has subscribed.
    drop(run);
    let destroyed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut line = String::new();
        events.read_line(&mut line).await.unwrap();
        line
    })
    .await
    .expect("the container was destroyed");
    assert!(
        id.starts_with(destroyed.trim()) || destroyed.trim().starts_with(&id),
        "{destroyed}"
    );
    assert_eq!(our_containers(worker), "", "container left behind");
    // The sandbox's volumes go in the background too; a worker's start removes any left.
    exec.remove_leftovers().await.unwrap();
    let volumes = Command::new("docker")
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label={LABEL_WORKER}={worker}"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&volumes.stdout).trim(), "");
}

/// An independent plan (a reproducibility check) compiles everything itself: with every
/// entry of the shared build cache poisoned (same sizes, other bytes), a normal build of
/// the same request gets other bytes, the independent one gets the first build's again.
#[tokio::test]
async fn an_independent_build_reads_nothing_of_the_shared_build_cache() {
    use sha2::Digest;
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-independent").await;
    // Caddy alone: its compiled packages go into the shared build cache.
    let req = request("linux", "amd64", None, &[]);
    let sha_of = |outcome: &PlanOutcome| match outcome {
        PlanOutcome::Built { binary: p, .. } => {
            Some(hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap())))
        }
        _ => None,
    };
    let (outcome, events, _dir) = build(&exec, &req).await;
    let first = sha_of(&outcome).unwrap_or_else(|| panic!("{outcome:?}\n{events:#?}"));
    let mut poisoned = 0;
    for entry in walk(&cache.path().join("build")) {
        if entry.to_string_lossy().ends_with("-d") {
            let len = std::fs::metadata(&entry).unwrap().len() as usize;
            std::fs::write(&entry, vec![b'x'; len]).unwrap();
            poisoned += 1;
        }
    }
    assert!(poisoned > 10, "{poisoned} cache outputs");
    let (normal, _, _d1) = build(&exec, &req).await;
    assert_ne!(
        sha_of(&normal).as_deref(),
        Some(first.as_str()),
        "the poison has no effect"
    );
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let independent = exec
        .run_plan(
            &plan(&req).independent(),
            req.key().as_str(),
            dir.path(),
            &tx,
        )
        .await
        .unwrap();
    drop(tx);
    while rx.recv().await.is_some() {}
    assert_eq!(
        sha_of(&independent).as_deref(),
        Some(first.as_str()),
        "{independent:?}"
    );
}

/// Every file under `dir` (not following symbolic links).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}
