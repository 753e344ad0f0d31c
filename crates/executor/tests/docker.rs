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
        host: String::new(),
        image: cbs_testkit::builder_image(),
        path: "/usr/local/go/bin".into(),
        user: cbs_testkit::builder_user(),
        // The fixture proxy listens on the host's loopback.
        resolve_network: "host".into(),
        memory_bytes: 2 << 30,
        cpus: 2.0,
        pids_limit: 512,
        tmpfs_size: "1g".into(),
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
    let PlanOutcome::Built(binary) = outcome else {
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
        let PlanOutcome::Built(binary) = outcome else {
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
            assert!(tail.join("\n").contains("connection refused"), "{tail:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// Writes a program that dials `addr` and prints its environment.
fn probe_program(dir: &Path, addr: &str) {
    std::fs::write(dir.join("go.mod"), "module probe\n\ngo 1.21\n").unwrap();
    std::fs::write(
        dir.join("main.go"),
        format!(
            "package main\n\nimport (\n\t\"fmt\"\n\t\"net\"\n\t\"os\"\n\t\"time\"\n)\n\nfunc main() {{\n\tfor _, e := range os.Environ() {{\n\t\tfmt.Println(\"env\", e)\n\t}}\n\tc, err := net.DialTimeout(\"tcp\", \"{addr}\", 3*time.Second)\n\tif err != nil {{\n\t\tfmt.Println(\"dial failed:\", err)\n\t\treturn\n\t}}\n\tc.Close()\n\tfmt.Println(\"dial ok\")\n}}\n"
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn compile_commands_have_no_network_and_no_command_sees_the_workers_secrets() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy.url(), cache.path(), "docker-test-net").await;
    std::env::set_var("CBS_WORKER_SECRET", "hunter2");
    let target = Platform::new("linux", "amd64", None).unwrap().go_env();
    for (phase, want) in [(Phase::Resolve, "dial ok"), (Phase::Compile, "dial failed")] {
        let dir = tempfile::tempdir().unwrap();
        probe_program(dir.path(), &proxy.addr.to_string());
        if let Executor::Docker(d) = &exec {
            d.give_to_builder(dir.path()).unwrap();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cmd = GoCommand {
            args: vec!["run".into(), ".".into()],
        };
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
        assert!(
            out.iter().any(|l| l.starts_with(want)),
            "{phase:?}: {out:?}"
        );
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
    probe_program(dir.path(), "127.0.0.1:9");
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
}
