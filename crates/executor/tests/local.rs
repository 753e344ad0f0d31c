//! The local executor with the real go tool against the fixture module proxy.

use std::time::Duration;

use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::plan::{plan, GoCommand, Phase};
use cbs_domain::{BuildRequest, Platform};
use cbs_executor::{CachePaths, Executor, GoSettings, LocalExecutor, PlanOutcome, Progress};
use cbs_testkit::FixtureProxy;
use tokio::sync::mpsc;

fn executor(proxy: &FixtureProxy, cache: &std::path::Path) -> Executor {
    Executor::Local(LocalExecutor::new(
        cbs_testkit::go_binary(),
        GoSettings {
            goproxy: proxy.url(),
            gosumdb: "off".into(),
            command_timeout: Duration::from_secs(300),
            gonosumdb: String::new(),
            netrc: None,
            proxy_ca: None,
        },
        CachePaths {
            gomodcache: cache.join("mod"),
            gocache: cache.join("build"),
            home: cache.join("home"),
        },
    ))
}

use cbs_testkit::request_with as request;

async fn build(
    exec: &Executor,
    req: &BuildRequest,
) -> (PlanOutcome, Vec<Progress>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = exec
        .run_plan(&plan(req), "test", dir.path(), &tx)
        .await
        .unwrap();
    drop(tx);
    let mut events = Vec::new();
    while let Some(p) = rx.recv().await {
        events.push(p);
    }
    (outcome, events, dir)
}

#[tokio::test]
async fn builds_caddy_with_two_plugins_that_runs_and_lists_them() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy, cache.path());
    let req = request(
        "linux",
        "amd64",
        None,
        &[
            ("github.com/acme/alpha", "v1.1.0"),
            ("github.com/Acme/Beta", "v0.2.0"),
        ],
    );
    let (outcome, events, _dir) = build(&exec, &req).await;
    let PlanOutcome::Built { binary, .. } = outcome else {
        panic!("{outcome:?}\n{events:#?}")
    };
    let steps: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Progress::StepFinished {
                step,
                exit_code: Some(0),
                ..
            } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        [
            "initialize_module",
            "pin_versions",
            "tidy_module",
            "compile"
        ]
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Progress::Line { line, .. } if line == "go mod tidy -e")));

    let out = std::process::Command::new(&binary)
        .arg("list-modules")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("http.handlers.alpha github.com/acme/alpha v1.1.0"),
        "{listed}"
    );
    assert!(
        listed.contains("http.handlers.beta github.com/Acme/Beta v0.2.0"),
        "{listed}"
    );
    let version = std::process::Command::new(&binary)
        .arg("version")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), "v2.8.4");

    let info = BuildInfo::from_binary(&std::fs::read(&binary).unwrap()).unwrap();
    info.check_matches(&req).unwrap();
    assert_eq!(info.settings["-trimpath"], "true");
}

#[tokio::test]
async fn a_plugin_that_does_not_compile_fails_in_the_compile_step_with_the_error() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy, cache.path());
    let req = request("linux", "amd64", None, &[("example.com/broken", "v1.0.0")]);
    let (outcome, _events, _dir) = build(&exec, &req).await;
    match outcome {
        PlanOutcome::Failed {
            step,
            command,
            exit,
            tail,
        } => {
            assert_eq!(step, "compile");
            assert!(command.starts_with("go build"), "{command}");
            assert_eq!(exit.code, Some(1));
            let tail = tail.join("\n");
            assert!(tail.contains("undefined: undefinedFunction"), "{tail}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn commands_see_only_the_explicit_environment() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy, cache.path());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("go.mod"), "module envdump\n\ngo 1.21\n").unwrap();
    std::fs::write(
        dir.path().join("main.go"),
        "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\nfunc main() {\n\tfor _, e := range os.Environ() {\n\t\tfmt.Println(e)\n\t}\n}\n",
    )
    .unwrap();
    // The test process has a secret; the command must not.
    std::env::set_var("CBS_TEST_SECRET", "hunter2");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = Platform::new("linux", "amd64", None).unwrap().go_env();
    let cmd = GoCommand {
        args: vec!["run".into(), ".".into()],
    };
    let exit = exec
        .run(dir.path(), "test", &cmd, Phase::Compile, &target, &tx)
        .await
        .unwrap();
    drop(tx);
    let mut env = Vec::new();
    while let Some(l) = rx.recv().await {
        env.push(l);
    }
    assert!(exit.success(), "{env:?}");
    assert!(!env.iter().any(|l| l.contains("hunter2")), "{env:?}");
    for want in [
        "GOTOOLCHAIN=local",
        "CGO_ENABLED=0",
        "GOPROXY=off",
        "GOFLAGS=-mod=readonly",
        "GOOS=linux",
    ] {
        assert!(env.iter().any(|l| l == want), "{want} missing: {env:?}");
    }
}

/// A plugin that carries a forged build-information blob in a string constant (which lands
/// in read-only data, before the real blob) does not change what is read from the binary:
/// for ELF, PE and Mach-O, the verified information names the real modules.
#[tokio::test]
async fn forged_build_information_in_a_plugin_is_not_what_is_read() {
    let proxy = FixtureProxy::start().await;
    let cache = tempfile::tempdir().unwrap();
    let exec = executor(&proxy, cache.path());
    let forged = cbs_testkit::fixtures::forged_blob();
    for (os, arch) in [
        ("linux", "amd64"),
        ("windows", "amd64"),
        ("darwin", "arm64"),
    ] {
        let req = request(
            os,
            arch,
            None,
            &[
                ("example.com/forger", "v1.0.0"),
                ("github.com/acme/alpha", "v1.1.0"),
            ],
        );
        let (outcome, events, _dir) = build(&exec, &req).await;
        let PlanOutcome::Built { binary, .. } = outcome else {
            panic!("{os}/{arch}: {outcome:?}\n{events:#?}")
        };
        let bytes = std::fs::read(&binary).unwrap();
        // The look-alike is in the file, before the real blob.
        let forged_at = bytes
            .windows(forged.len())
            .position(|w| w == forged)
            .expect("the forged blob is in the binary");
        let magic = b"\xff Go buildinf:";
        let first_magic = bytes.windows(magic.len()).position(|w| w == magic);
        assert_eq!(
            first_magic,
            Some(forged_at),
            "{os}/{arch}: the look-alike comes first in the file"
        );
        let info = BuildInfo::from_binary(&bytes).unwrap();
        assert!(
            info.dep(cbs_testkit::fixtures::FORGED_MODULE).is_none(),
            "{os}/{arch}: forged module list read: {info:?}"
        );
        assert!(info.go_version.starts_with("go1."), "{}", info.go_version);
        assert_ne!(info.go_version, "go1.99.9");
        assert_eq!(info.dep("github.com/acme/alpha").unwrap().version, "v1.1.0");
        assert_eq!(info.settings["GOOS"], os);
        assert_eq!(info.check_matches(&req), Ok(()), "{os}/{arch}");
    }
}
