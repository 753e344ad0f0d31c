//! Runs a [`BuildPlan`]: writes `main.go`, then runs every Go command of every step in the
//! sandbox of its phase, streaming output lines as they come.
//!
//! Two executors: `local` (the host's `go` with a cleared, explicit environment; for
//! development only, no isolation) and `docker` (each command in its own hardened
//! container). Both get the same commands and the same environment from [`command_env`].

mod cacheprog;
mod docker;
mod gate;
mod local;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cbs_domain::plan::{BuildPlan, GoCommand, Phase};
use tokio::sync::mpsc;

pub use cacheprog::{
    trim_shared, BuildCache, BuildCacheSettings, CacheReport, CacheWrites, SHARED_PREFIX,
};
pub use docker::{
    DockerExecutor, DockerSettings, ManagedContainer, LABEL_BUILD, LABEL_DEPLOYMENT, LABEL_MANAGED,
    LABEL_WORKER,
};
pub use local::LocalExecutor;

/// Settings every executor shares: proxies and where the caches live.
#[derive(Debug, Clone)]
pub struct GoSettings {
    /// GOPROXY for resolve steps (proxy URLs only; never `direct`).
    pub goproxy: String,
    /// GOSUMDB (`sum.golang.org` in production, `off` for private fixtures).
    pub gosumdb: String,
    /// Longest time one Go command may run.
    pub command_timeout: Duration,
    /// GONOSUMDB: module path patterns the checksum database is not asked about (private
    /// modules), comma-separated as Go's GOPRIVATE syntax.
    pub gonosumdb: String,
    /// Credentials for the module proxy: a netrc file on the host, private to the worker,
    /// given read-only to resolve steps only (never in their environment or arguments).
    /// Removed when the last holder drops it.
    pub netrc: Option<std::sync::Arc<tempfile::TempPath>>,
    /// Certificate authorities (PEM file on the host) for the proxy's HTTPS certificate:
    /// resolve steps' only roots (SSL_CERT_FILE).
    pub proxy_ca: Option<PathBuf>,
}

/// Files given to resolve steps, as the command sees them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolveFiles<'a> {
    pub netrc: Option<&'a std::path::Path>,
    pub proxy_ca: Option<&'a std::path::Path>,
}

/// Where a command's caches are, as the command sees them.
#[derive(Debug, Clone)]
pub struct CachePaths {
    pub gomodcache: PathBuf,
    pub gocache: PathBuf,
    /// HOME and GOPATH (nothing is kept there between builds).
    pub home: PathBuf,
}

/// The complete environment of one Go command: nothing comes from the worker's own
/// environment. `target` is GOOS/GOARCH/GOARM.
pub fn command_env(
    settings: &GoSettings,
    phase: Phase,
    caches: &CachePaths,
    target: &[(&'static str, String)],
    path: &str,
    files: ResolveFiles<'_>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), path.to_owned()),
        ("HOME".into(), caches.home.display().to_string()),
        (
            "GOPATH".into(),
            caches.home.join("go").display().to_string(),
        ),
        ("GOMODCACHE".into(), caches.gomodcache.display().to_string()),
        ("GOCACHE".into(), caches.gocache.display().to_string()),
        // go.mod must not make Go download and run another toolchain.
        ("GOTOOLCHAIN".into(), "local".into()),
        // cgo flags have led to code execution at build time (CVE-2023-29404/29405).
        ("CGO_ENABLED".into(), "0".into()),
        ("GOTELEMETRY".into(), "off".into()),
        ("GOSUMDB".into(), settings.gosumdb.clone()),
        ("GONOSUMDB".into(), settings.gonosumdb.clone()),
        ("GOPRIVATE".into(), String::new()),
        ("GOINSECURE".into(), String::new()),
        ("GOVCS".into(), "*:off".into()),
    ];
    match phase {
        Phase::Resolve => {
            env.push(("GOPROXY".into(), settings.goproxy.clone()));
            // Module cache files writable, so that caches can be cleaned without root.
            env.push(("GOFLAGS".into(), "-modcacherw".into()));
            // Where the credentials are (the path, never the secret itself).
            if let Some(netrc) = files.netrc {
                env.push(("NETRC".into(), netrc.display().to_string()));
            }
            if let Some(ca) = files.proxy_ca {
                env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
            }
        }
        Phase::Compile => {
            env.push(("GOPROXY".into(), "off".into()));
            env.push(("GOFLAGS".into(), "-mod=readonly".into()));
        }
    }
    for (k, v) in target {
        env.push(((*k).to_owned(), v.clone()));
    }
    env
}

/// A command's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `None` if it did not exit on its own (timed out, killed).
    pub code: Option<i64>,
    pub duration: Duration,
    pub timed_out: bool,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// An executor could not run a command at all (not: the command failed).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot prepare the build directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot run the go command: {0}")]
    Spawn(String),
    #[error("container engine: {0}")]
    Engine(String),
}

/// What a plan run reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    StepStarted {
        step: &'static str,
    },
    /// One line of a command's output (stdout and stderr interleaved as they come).
    Line {
        step: &'static str,
        line: String,
    },
    StepFinished {
        step: &'static str,
        duration: Duration,
        exit_code: Option<i64>,
    },
}

/// How a plan ended.
#[derive(Debug)]
pub enum PlanOutcome {
    /// The binary is at `binary`; `cache` holds the build cache entries the build put
    /// (docker executor with the build cache on), for the caller to publish once it has
    /// verified the binary.
    Built {
        binary: PathBuf,
        cache: Option<CacheWrites>,
    },
    /// A command failed: the step, the command, its exit and the tail of its output.
    Failed {
        step: &'static str,
        command: String,
        exit: Exit,
        tail: Vec<String>,
    },
}

/// Lines of output kept for a failure message.
pub(crate) const TAIL_LINES: usize = 30;

/// The executors.
#[derive(Debug)]
// One executor per worker process: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Executor {
    Local(LocalExecutor),
    Docker(Box<DockerExecutor>),
}

impl Executor {
    /// What builds run in, for provenance: the image reference and id (`sha256:...`), or
    /// `local` and an empty id for the local executor.
    pub fn builder(&self) -> (String, String) {
        match self {
            Executor::Local(_) => ("local".into(), String::new()),
            Executor::Docker(d) => {
                let (image, id) = d.image();
                (image.to_owned(), id.to_owned())
            }
        }
    }

    /// Removes every container this worker may have left (a stopped build's container is
    /// removed in the background when its run is dropped; this waits for all of them).
    pub async fn remove_leftovers(&self) -> Result<usize, ExecError> {
        match self {
            Executor::Local(_) => Ok(0),
            Executor::Docker(d) => d.remove_orphans().await,
        }
    }

    /// Runs one Go command in `dir` for build `build_key`; output lines go to `lines`.
    pub async fn run(
        &self,
        dir: &Path,
        build_key: &str,
        command: &GoCommand,
        phase: Phase,
        target: &[(&'static str, String)],
        lines: &mpsc::UnboundedSender<String>,
    ) -> Result<Exit, ExecError> {
        match self {
            Executor::Local(l) => l.run(dir, command, phase, target, lines).await,
            Executor::Docker(d) => d.run(dir, build_key, command, phase, target, lines).await,
        }
    }

    /// Runs a whole plan in `dir` (a fresh private directory).
    pub async fn run_plan(
        &self,
        plan: &BuildPlan,
        build_key: &str,
        dir: &Path,
        progress: &mpsc::UnboundedSender<Progress>,
    ) -> Result<PlanOutcome, ExecError> {
        tokio::fs::write(dir.join("main.go"), &plan.main_go).await?;
        if let Executor::Docker(d) = self {
            d.give_to_builder(dir)?;
            return d.run_plan(plan, build_key, dir, progress).await;
        }
        // The local executor's own build cache for a plan that must not read the shared one
        // (ignored by Go as a package directory: its name starts with a dot).
        let private;
        let this = match self {
            Executor::Local(l) if !plan.reads_build_cache => {
                let mut caches = l.caches.clone();
                caches.gocache = dir.join(".gocache");
                private = Executor::Local(LocalExecutor {
                    caches,
                    ..l.clone()
                });
                &private
            }
            _ => self,
        };
        for step in &plan.steps {
            let started = Instant::now();
            let _ = progress.send(Progress::StepStarted { step: step.name });
            let mut tail: std::collections::VecDeque<String> = Default::default();
            for command in &step.commands {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let _ = tx.send(command.display());
                // The sender moves into the run, so the forwarder ends when the run does.
                let run = async move {
                    let tx = tx;
                    this.run(dir, build_key, command, step.phase, &plan.target_env, &tx)
                        .await
                };
                let forward = async {
                    while let Some(line) = rx.recv().await {
                        if tail.len() == TAIL_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(line.clone());
                        let _ = progress.send(Progress::Line {
                            step: step.name,
                            line,
                        });
                    }
                };
                let (exit, ()) = tokio::join!(run, forward);
                let exit = exit?;
                if !exit.success() {
                    let _ = progress.send(Progress::StepFinished {
                        step: step.name,
                        duration: started.elapsed(),
                        exit_code: exit.code,
                    });
                    return Ok(PlanOutcome::Failed {
                        step: step.name,
                        command: command.display(),
                        exit,
                        tail: tail.into_iter().collect(),
                    });
                }
            }
            let _ = progress.send(Progress::StepFinished {
                step: step.name,
                duration: started.elapsed(),
                exit_code: Some(0),
            });
        }
        Ok(PlanOutcome::Built {
            binary: dir.join(plan.output),
            cache: None,
        })
    }
}
