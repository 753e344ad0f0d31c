//! xcaddy's steps by hand, for the benchmarks' anchor: the plan's Go commands in ONE
//! `docker run` of the builder image (through the runner), with the given caches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cbs_domain::plan::plan;
use cbs_domain::BuildRequest;
use cbs_executor::{CachePaths, GoSettings};

/// The runner an executor compiled into its cache directory `cache`.
pub fn runner_in(cache: &Path) -> PathBuf {
    std::fs::read_dir(cache)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("runner-"))
        .expect("runner compiled by the executor")
        .path()
        .join("runner")
}

/// The plan's commands by hand: one `docker run` of the runner with all of them, network
/// and caches as for resolve steps.
pub fn in_one_container(
    go: &GoSettings,
    cache: &Path,
    runner: &Path,
    req: &BuildRequest,
) -> Duration {
    use std::process::Command;
    let plan = plan(req);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.go"), &plan.main_go).unwrap();
    Command::new("chown")
        .arg("65532:65532")
        .arg(dir.path())
        .status()
        .unwrap();
    let cmds: Vec<String> = plan
        .steps
        .iter()
        .flat_map(|s| s.commands.iter())
        .map(|c| {
            format!(
                "[{}]",
                c.args
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    let env = cbs_executor::command_env(
        go,
        cbs_domain::plan::Phase::Resolve,
        &CachePaths {
            gomodcache: "/cache/mod".into(),
            gocache: "/cache/build".into(),
            home: "/tmp/home".into(),
        },
        &plan.target_env,
        "/usr/local/go/bin",
        Default::default(),
    );
    let mut cmd = Command::new("docker");
    cmd.args([
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        "--user",
        "65532:65532",
    ])
    .args(["--tmpfs", "/tmp:rw,exec,mode=1777"])
    .arg("-v")
    .arg(format!("{}:/build", dir.path().display()))
    .arg("-v")
    .arg(format!("{}:/cache/mod", cache.join("mod").display()))
    .arg("-v")
    .arg(format!("{}:/cache/build", cache.join("build").display()))
    .arg("-v")
    .arg(format!("{}:/cbs/runner:ro", runner.display()))
    .args(["-w", "/build"]);
    for (k, v) in env {
        cmd.arg("-e").arg(format!("{k}={v}"));
    }
    cmd.arg(cbs_testkit::builder_image())
        .arg("/cbs/runner")
        .arg("bench")
        // Each command's time limit, in milliseconds.
        .arg("600000")
        .arg(format!("[{}]", cmds.join(",")));
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("@@cbs bench exit {} 0", cmds.len() - 1)),
        "{text}"
    );
    assert!(dir.path().join("caddy").exists());
    took
}
