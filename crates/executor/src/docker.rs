//! The docker executor: every Go command in its own hardened container (REFERENCE
//! section 4).
//!
//! No container has a network. Resolve commands reach the module proxy only through the
//! worker's gate (see [`crate::gate`]); compile commands get `GOPROXY=off`,
//! `-mod=readonly` and a read-only module cache. Each build sees the shared module and
//! build caches through overlay volumes of its own: what it writes lands in its own
//! layer, which is thrown away after the build (see [`Sandbox`]). Always: a non-root user, all capabilities dropped, no-new-privileges, a read-only
//! root filesystem with a tmpfs for /tmp, pids/memory/CPU limits, an init process, labels
//! naming the build and the worker, and an environment that is exactly [`command_env`].
//! Containers are removed after their output is read (or on timeout, killed and removed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use cbs_domain::plan::{BuildPlan, GoCommand, Phase, Step};
use cbs_metrics::ReasonLabel;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cacheprog::{BuildCache, Session, CACHE_SOCKET, LOCAL_TIER};
use crate::gate::{Gate, GATE_PORT};
use crate::{command_env, CachePaths, ExecError, Exit, GoSettings, PlanOutcome, Progress};

/// Label on every container we create.
pub const LABEL_MANAGED: &str = "org.caddy-build-server.managed";
/// Label with the worker id.
pub const LABEL_WORKER: &str = "org.caddy-build-server.worker";
/// Label with the build key.
pub const LABEL_BUILD: &str = "org.caddy-build-server.build";
/// Label: the deployment (database) the container's build belongs to. Clean-ups only ever
/// touch containers of their own deployment: several deployments may share an engine.
pub const LABEL_DEPLOYMENT: &str = "org.caddy-build-server.deployment";

/// Where things are mounted inside a build container.
const BUILD_DIR: &str = "/build";
const MODCACHE: &str = "/cache/mod";
const GOCACHE: &str = "/cache/build";
const HOME: &str = "/tmp/home";
/// The command runner (see `runner/runner.go`), mounted read-only.
const RUNNER: &str = "/cbs/runner";
/// The least time the runner's compilation is given.
const RUNNER_COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Where resolve containers see the gate's Unix socket.
const GATE_SOCKET: &str = "/cbs/gate.sock";
/// Its source, compiled with the builder image when a worker starts.
const RUNNER_SOURCE: &str = include_str!("runner/runner.go");
/// The exit code the runner reports for a command it stopped at its time limit.
const RUNNER_TIMED_OUT: i64 = -2;
/// How much longer than the sum of its commands' limits a container may run (start-up,
/// the runner itself) before the worker stops it.
const CONTAINER_SLACK: std::time::Duration = std::time::Duration::from_secs(30);

/// Docker settings.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// The engine, image, user and limits, as configured (`worker.docker`).
    pub container: cbs_config::DockerConfig,
    /// The module proxies, which the gate asks for resolve commands (with their
    /// credentials and certificate authorities, which never enter a container).
    pub proxy: std::sync::Arc<cbs_goproxy::Resolver>,
    /// The deployment's id (from its database), put on every container as a label.
    pub deployment: String,
}

/// Runs Go commands in containers.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    docker: Docker,
    settings: DockerSettings,
    go: GoSettings,
    /// Host paths of the shared module cache and this worker's build cache.
    modcache: PathBuf,
    gocache: PathBuf,
    /// Host path of the compiled runner.
    runner: PathBuf,
    worker: String,
    /// The builder image's id (`sha256:...`), read at connect.
    image_id: String,
    /// The build cache compile steps ask through GOCACHEPROG, if on.
    build_cache: Option<std::sync::Arc<BuildCache>>,
}

fn engine(e: bollard::errors::Error) -> ExecError {
    ExecError::Engine(e.to_string())
}

impl DockerExecutor {
    /// Connects to the engine (the default socket, or DOCKER_HOST) and checks the image.
    pub async fn connect(
        settings: DockerSettings,
        go: GoSettings,
        modcache: PathBuf,
        gocache: PathBuf,
        worker: String,
    ) -> Result<DockerExecutor, ExecError> {
        // Absolute, as overlay options need them.
        let mut dirs = Vec::new();
        for dir in [modcache, gocache] {
            tokio::fs::create_dir_all(&dir).await?;
            dirs.push(dir.canonicalize()?);
        }
        let (modcache, gocache) = (dirs.remove(0), dirs.remove(0));
        let docker = if settings.container.host.is_empty() {
            Docker::connect_with_defaults()
        } else {
            Docker::connect_with_host(&settings.container.host)
        };
        let docker = docker
            .map_err(engine)?
            .negotiate_version()
            .await
            .map_err(engine)?;
        let image = docker
            .inspect_image(&settings.container.image)
            .await
            .map_err(|e| {
                ExecError::Engine(format!("builder image {}: {e}", settings.container.image))
            })?;
        let full_image_id = image.id.unwrap_or_default();
        let image_id = full_image_id.trim_start_matches("sha256:");
        // Keyed by image and runner source: a changed runner is compiled again.
        let source_id = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(RUNNER_SOURCE.as_bytes())[..6])
        };
        let runner_dir = modcache.parent().unwrap_or(&modcache).join(format!(
            "runner-{}-{source_id}",
            &image_id[..image_id.len().min(16)]
        ));
        let mut executor = DockerExecutor {
            docker,
            settings,
            go,
            modcache,
            gocache,
            runner: runner_dir.join("runner"),
            worker,
            image_id: full_image_id.clone(),
            build_cache: None,
        };
        for dir in [&executor.modcache, &executor.gocache] {
            tokio::fs::create_dir_all(dir).await?;
            mount_option_safe(dir)?;
            executor.give_to_builder(dir)?;
        }
        if !executor.runner.exists() {
            executor.build_runner(&runner_dir).await?;
        }
        Ok(executor)
    }

    /// Compile steps from now on ask `cache` for build cache entries (GOCACHEPROG).
    pub fn with_build_cache(mut self, cache: std::sync::Arc<BuildCache>) -> DockerExecutor {
        self.build_cache = Some(cache);
        self
    }

    /// The builder image: its reference and its id.
    pub fn image(&self) -> (&str, &str) {
        (&self.settings.container.image, &self.image_id)
    }

    /// Compiles the runner with the builder image (no network), for the image's platform.
    async fn build_runner(&mut self, runner_dir: &Path) -> Result<(), ExecError> {
        tokio::fs::create_dir_all(runner_dir).await?;
        let src = tempfile::tempdir_in(runner_dir)?;
        tokio::fs::write(src.path().join("go.mod"), "module runner\n\ngo 1.21\n").await?;
        tokio::fs::write(src.path().join("runner.go"), RUNNER_SOURCE).await?;
        self.give_to_builder(src.path())?;
        // The runner is not mounted yet: mount the (empty) source dir in its place.
        let final_path = std::mem::replace(&mut self.runner, src.path().join("runner.go"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cmd = ["go", "build", "-trimpath", "-o", "runner", "."]
            .map(String::from)
            .to_vec();
        // The runner is our own code: it may use (and fill) the shared build cache.
        let mounts = Mounts {
            modcache: self.modcache.display().to_string(),
            gocache: self.gocache.display().to_string(),
            volumes: false,
            gate: None,
            cache: None,
        };
        let exit = self
            .run_container(
                src.path(),
                "runner",
                cmd,
                Phase::Compile,
                &[],
                &mounts,
                &tx,
                // The worker's own setup, not a build's command: a short command limit
                // must not keep a worker from starting (a cold cache compiles the standard
                // library first).
                self.go.command_timeout.max(RUNNER_COMPILE_TIMEOUT),
            )
            .await;
        self.runner = final_path;
        drop(tx);
        let mut out = Vec::new();
        while let Some(l) = rx.recv().await {
            out.push(l);
        }
        let exit = exit?;
        if !exit.success() {
            return Err(ExecError::Engine(format!(
                "cannot compile the command runner with {}: {}",
                self.settings.container.image,
                out.join("\n")
            )));
        }
        tokio::fs::rename(src.path().join("runner"), &self.runner).await?;
        info!(runner = %self.runner.display(), "command runner compiled");
        Ok(())
    }

    /// Makes `dir` (a new build directory or a cache) writable for the builder user: when
    /// the worker runs as root it hands the directory to that user; otherwise the
    /// directory is the worker's and the configured user should be the worker's own.
    pub fn give_to_builder(&self, dir: &Path) -> Result<(), ExecError> {
        use std::os::unix::fs::MetadataExt;
        let (uid, gid) = parse_user(&self.settings.container.user)?;
        // Never through a symbolic link: someone else's link would get us to hand over
        // whatever it points at.
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return Err(ExecError::Io(std::io::Error::other(format!(
                "{} is not a directory (a symbolic link?)",
                dir.display()
            ))));
        }
        if meta.uid() == 0 && uid != 0 {
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }
}

/// Overlay mount options are `key=value` pairs separated by commas, paths with colons:
/// a path with either cannot be a layer.
fn mount_option_safe(path: &Path) -> Result<(), ExecError> {
    let s = path.to_string_lossy();
    if s.contains([',', ':', '\\']) || !path.is_absolute() {
        return Err(ExecError::Engine(format!(
            "{s}: cache and build directories must be absolute paths without ',', ':' or '\\' (they become overlay mount options)"
        )));
    }
    Ok(())
}

/// `uid:gid` (numbers; names would need the image's /etc/passwd).
fn parse_user(user: &str) -> Result<(u32, u32), ExecError> {
    let bad = || ExecError::Engine(format!("docker.user must be numeric uid:gid, got {user:?}"));
    let (u, g) = user.split_once(':').ok_or_else(bad)?;
    let (u, g): (u32, u32) = (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
    if u == 0 {
        return Err(ExecError::Engine(
            "docker.user must not be root (uid 0)".into(),
        ));
    }
    Ok((u, g))
}

impl DockerExecutor {
    /// Removes containers that a previous run of this worker left behind.
    pub async fn remove_orphans(&self) -> Result<usize, ExecError> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_WORKER}={}", self.worker),
                format!("{LABEL_DEPLOYMENT}={}", self.settings.deployment),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let orphans = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine)?;
        for c in &orphans {
            if let Some(id) = &c.id {
                // A removal already under way (a dropped run's guard) answers at once; this
                // waits for the engine's word that the container is gone.
                self.remove_container(id).await;
            }
        }
        if !orphans.is_empty() {
            info!(count = orphans.len(), worker.id = %self.worker, "removed orphaned build containers");
        }
        // The overlay volumes of builds a previous run of this worker did not finish.
        let volumes = self
            .docker
            .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                filters: Some(filters.clone()),
            }))
            .await
            .map_err(engine)?
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect::<Vec<_>>();
        if !volumes.is_empty() {
            info!(count = volumes.len(), worker.id = %self.worker, "removing orphaned build volumes");
            remove_volumes(self.docker.clone(), volumes).await;
        }
        Ok(orphans.len())
    }

    /// Every container of this deployment on this engine, whichever worker made it.
    pub async fn managed_containers(&self) -> Result<Vec<ManagedContainer>, ExecError> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([(
            "label".to_owned(),
            vec![
                LABEL_MANAGED.to_owned(),
                format!("{LABEL_DEPLOYMENT}={}", self.settings.deployment),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine)?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                Some(ManagedContainer {
                    id: c.id?,
                    worker: labels.get(LABEL_WORKER).cloned().unwrap_or_default(),
                    build: labels.get(LABEL_BUILD).cloned().unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Removes a container (forced) and waits until it is gone.
    pub async fn remove_container(&self, id: &str) {
        self.remove(id).await;
        let gone = bollard::query_parameters::WaitContainerOptions {
            condition: "removed".into(),
        };
        let mut w = self.docker.wait_container(id, Some(gone));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), w.next()).await;
    }

    async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => {}
            // Already gone, or another removal of it is under way.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => debug!(container = id, "container already gone or going"),
            Err(e) => warn!(container = id, error = %e, "cannot remove build container"),
        }
    }

    /// Runs one Go command in its own container (and sandbox).
    pub(crate) async fn run(
        &self,
        dir: &Path,
        build_key: &str,
        command: &GoCommand,
        phase: Phase,
        target: &[(&'static str, String)],
        lines: &mpsc::UnboundedSender<String>,
    ) -> Result<Exit, ExecError> {
        let sandbox = self.sandbox(dir, build_key, true).await?;
        let step = Step {
            name: "command",
            phase,
            commands: vec![command.clone()],
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let boxed = &sandbox;
        let run = async move {
            let tx = tx;
            self.run_group(
                std::slice::from_ref(&step),
                phase,
                target,
                build_key,
                dir,
                boxed,
                &tx,
            )
            .await
        };
        let forward = async {
            while let Some(p) = rx.recv().await {
                if let Progress::Line { line, .. } = p {
                    let _ = lines.send(line);
                }
            }
        };
        let (outcome, ()) = tokio::join!(run, forward);
        let outcome = outcome?;
        // (On an error, the dropped sandbox removes itself in the background.)
        sandbox.teardown().await;
        Ok(match outcome {
            None => Exit {
                code: Some(0),
                duration: started.elapsed(),
                timed_out: false,
            },
            Some(PlanOutcome::Failed { exit, .. }) => exit,
            Some(PlanOutcome::Built { .. }) => unreachable!("a group never builds"),
        })
    }

    /// Runs `cmd` in a new hardened container for `phase`, then removes it.
    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        dir: &Path,
        build_key: &str,
        cmd: Vec<String>,
        phase: Phase,
        target: &[(&'static str, String)],
        mounts: &Mounts<'_>,
        lines: &mpsc::UnboundedSender<String>,
        timeout: std::time::Duration,
    ) -> Result<Exit, ExecError> {
        let caches = CachePaths {
            gomodcache: MODCACHE.into(),
            gocache: GOCACHE.into(),
            home: HOME.into(),
        };
        let resolve = phase == Phase::Resolve;
        let env = command_env(
            &self.go,
            phase,
            &caches,
            target,
            &self.settings.container.path,
            crate::ResolveFiles::default(),
        )
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            // The proxies, as the gate serves them on the container's loopback.
            "GOPROXY" if resolve => format!(
                "GOPROXY={}",
                self.settings
                    .proxy
                    .forwarded_goproxy(&format!("http://127.0.0.1:{GATE_PORT}"))
            ),
            _ => format!("{k}={v}"),
        })
        .collect();
        let modcache_mode = if resolve { "rw" } else { "ro" };
        // A volume is never filled from the image (Docker copies the mount point's
        // contents and owner into an empty volume otherwise).
        let nocopy = if mounts.volumes { ",nocopy" } else { "" };
        let mut binds = vec![
            format!("{}:{BUILD_DIR}:rw", dir.display()),
            format!("{}:{MODCACHE}:{modcache_mode}{nocopy}", mounts.modcache),
            format!("{}:{GOCACHE}:rw{nocopy}", mounts.gocache),
            format!("{}:{RUNNER}:ro", self.runner.display()),
        ];
        if let Some(socket) = mounts.gate.filter(|_| resolve) {
            binds.push(format!("{}:{GATE_SOCKET}:ro", socket.display()));
        }
        let mut env: Vec<String> = env;
        if let Some(cache) = mounts.cache.filter(|_| !resolve) {
            binds.push(format!("{}:{CACHE_SOCKET}:ro", cache.socket().display()));
            binds.push(format!("{}:{LOCAL_TIER}:ro", cache.local_dir().display()));
            env.push(format!("GOCACHEPROG={RUNNER} cacheprog {CACHE_SOCKET}"));
        }
        let host_config = HostConfig {
            binds: Some(binds),
            // Not even a bridge: the only way out is the gate's socket.
            network_mode: Some("none".to_owned()),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            pids_limit: Some(self.settings.container.pids_limit),
            memory: Some(self.settings.container.memory_bytes),
            memory_swap: Some(self.settings.container.memory_bytes),
            nano_cpus: Some((self.settings.container.cpus * 1e9) as i64),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!(
                    "rw,exec,nosuid,nodev,mode=1777,size={}",
                    self.settings.container.tmpfs_size
                ),
            )])),
            init: Some(true),
            ..Default::default()
        };
        let config = ContainerCreateBody {
            image: Some(self.settings.container.image.clone()),
            cmd: Some(cmd),
            entrypoint: Some(vec![]),
            env: Some(env),
            working_dir: Some(BUILD_DIR.into()),
            user: Some(self.settings.container.user.clone()),
            labels: Some(self.labels(build_key)),
            network_disabled: Some(phase == Phase::Compile),
            host_config: Some(host_config),
            ..Default::default()
        };
        let started = Instant::now();
        let metrics = cbs_metrics::metrics();
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().build()),
                config,
            )
            .await
            .map_err(|e| {
                metrics
                    .container_failures
                    .get_or_create(&ReasonLabel { reason: "create" })
                    .inc();
                engine(e)
            })?;
        let id = created.id;
        // If this future is dropped midway (the build was fenced off or the worker stops),
        // the guard still removes the container.
        let guard = RemoveOnDrop {
            docker: Some(self.docker.clone()),
            id: id.clone(),
        };
        let result = self.start_and_follow(&id, lines, started, timeout).await;
        let failure = match &result {
            Err(_) => Some("engine"),
            Ok(exit) if exit.timed_out => Some("timeout"),
            // SIGKILL: the memory limit (OOM killer) or the engine.
            Ok(exit) if exit.code == Some(137) => Some("killed"),
            Ok(_) => None,
        };
        if let Some(reason) = failure {
            metrics
                .container_failures
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        guard.disarm();
        self.remove(&id).await;
        result
    }

    async fn start_and_follow(
        &self,
        id: &str,
        lines: &mpsc::UnboundedSender<String>,
        started: Instant,
        timeout: std::time::Duration,
    ) -> Result<Exit, ExecError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(engine)?;
        cbs_metrics::metrics().containers_started.inc();
        let follow = async {
            let options = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut logs = self.docker.logs(id, Some(options));
            // Output arrives in chunks; split into lines, per stream.
            let mut split = [LineSplitter::default(), LineSplitter::default()];
            while let Some(chunk) = logs.next().await {
                let (i, bytes) = match chunk {
                    Ok(bollard::container::LogOutput::StdOut { message }) => (0, message),
                    Ok(bollard::container::LogOutput::StdErr { message }) => (1, message),
                    Ok(_) => continue,
                    Err(e) => {
                        debug!(error = %e, "log stream ended");
                        break;
                    }
                };
                for line in split[i].push(&bytes) {
                    let _ = lines.send(line);
                }
            }
            for s in split {
                if let Some(rest) = s.finish() {
                    let _ = lines.send(rest);
                }
            }
        };
        let wait = async {
            let mut w = self.docker.wait_container(id, None);
            match w.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(engine(e)),
                None => Err(ExecError::Engine("wait ended without a status".into())),
            }
        };
        let waited = tokio::time::timeout(timeout, async { tokio::join!(wait, follow).0 }).await;
        match waited {
            Ok(code) => Ok(Exit {
                code: Some(code?),
                duration: started.elapsed(),
                timed_out: false,
            }),
            Err(_) => {
                let _ = lines.send(format!("timed out after {timeout:?}"));
                Ok(Exit {
                    code: None,
                    duration: started.elapsed(),
                    timed_out: true,
                })
            }
        }
    }
}

/// A container with our labels.
#[derive(Debug, Clone)]
pub struct ManagedContainer {
    pub id: String,
    pub worker: String,
    pub build: String,
}

/// Removes a container when dropped before `disarm`: the cleanup of cancelled runs.
struct RemoveOnDrop {
    docker: Option<Docker>,
    id: String,
}

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.docker = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let options = RemoveContainerOptionsBuilder::default().force(true).build();
                if let Err(e) = docker.remove_container(&id, Some(options)).await {
                    warn!(container = %id, error = %e, "cannot remove a cancelled build container");
                }
            });
        }
    }
}

/// A JSON string literal (the arguments are validated, but escape anyway).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A marker the runner prints, with this run's nonce.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    Start(usize),
    Exit(usize, i64),
}

fn parse_marker(line: &str, nonce: &str) -> Option<Marker> {
    let rest = line
        .strip_prefix("@@cbs ")?
        .strip_prefix(nonce)?
        .strip_prefix(' ')?;
    let mut f = rest.split(' ');
    match (f.next()?, f.next()?.parse().ok()?, f.next()) {
        ("start", i, None) => Some(Marker::Start(i)),
        ("exit", i, Some(code)) => Some(Marker::Exit(i, code.parse().ok()?)),
        _ => None,
    }
}

/// A fresh unguessable token for the runner's markers, so that no build output can fake one.
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", h.finish())
}

impl DockerExecutor {
    /// Runs a plan with one container per phase: consecutive steps of the same phase run
    /// their commands through the runner in one container. All in one sandbox; after a
    /// successful build, the module files it fetched are shared (when they match its
    /// go.sum) and, for a plan that may share them, its build cache entries too.
    pub(crate) async fn run_plan(
        &self,
        plan: &BuildPlan,
        build_key: &str,
        dir: &Path,
        progress: &mpsc::UnboundedSender<Progress>,
    ) -> Result<PlanOutcome, ExecError> {
        let mut sandbox = self.sandbox(dir, build_key, plan.reads_build_cache).await?;
        let mut first = 0;
        while first < plan.steps.len() {
            let phase = plan.steps[first].phase;
            let end = plan.steps[first..]
                .iter()
                .position(|s| s.phase != phase)
                .map_or(plan.steps.len(), |n| first + n);
            let group = &plan.steps[first..end];
            if let Some(failed) = self
                .run_group(
                    group,
                    phase,
                    &plan.target_env,
                    build_key,
                    dir,
                    &sandbox,
                    progress,
                )
                .await?
            {
                sandbox.teardown().await;
                return Ok(failed);
            }
            first = end;
        }
        // With the cache program, what the build compiled is published by the caller
        // (after it verified the binary); otherwise its overlay layer is promoted here.
        let cache = sandbox.cache.take().map(Session::finish);
        self.share(&sandbox, dir, plan.shares_build_cache && cache.is_none())
            .await;
        sandbox.teardown().await;
        Ok(PlanOutcome::Built {
            binary: dir.join(plan.output),
            cache,
        })
    }

    /// Publishes what a successful build fetched and, if `build_cache`, what it compiled.
    async fn share(&self, sandbox: &Sandbox, dir: &Path, build_cache: bool) {
        let owner = parse_user(&self.settings.container.user).ok();
        let kept = sandbox.gate.as_ref().map(Gate::kept).unwrap_or_default();
        let go_sum = dir.join("go.sum");
        let modcache = self.modcache.clone();
        let gocache = self.gocache.clone();
        let upper = sandbox.dir.join("build/upper");
        let shared = tokio::task::spawn_blocking(move || {
            let go_sum = std::fs::read_to_string(go_sum).unwrap_or_default();
            if let Err(e) = crate::gate::publish(&kept, &go_sum, &modcache, owner) {
                warn!(error = %e, "cannot share module files");
            }
            if build_cache {
                match promote(&upper, &gocache, owner) {
                    Ok(n) if n > 0 => info!(entries = n, "build cache entries shared"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot share build cache entries"),
                }
            }
        })
        .await;
        if let Err(e) = shared {
            warn!(error = %e, "sharing the build's caches failed");
        }
    }

    /// A new sandbox for one build: overlay volumes over the shared module and build
    /// caches (over an empty directory instead of the build cache unless
    /// `reads_build_cache`), with layers in a new directory beside `dir`, and a gate to the
    /// proxies.
    async fn sandbox(
        &self,
        dir: &Path,
        build_key: &str,
        reads_build_cache: bool,
    ) -> Result<Sandbox, ExecError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir.canonicalize()?;
        let parent = dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        // Named after the build directory, so that what cleans up build directories
        // (by name) treats the two alike.
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let layers = tempfile::Builder::new()
            .prefix(&format!("{name}-sandbox-"))
            .tempdir_in(&parent)?;
        std::fs::set_permissions(layers.path(), std::fs::Permissions::from_mode(0o700))?;
        mount_option_safe(layers.path())?;
        let mut sandbox = Sandbox {
            docker: Some(self.docker.clone()),
            volumes: Vec::new(),
            gate: None,
            cache: None,
            dir: layers.path().to_path_buf(),
            layers: Some(layers),
        };
        let id = sandbox
            .dir
            .to_string_lossy()
            .rsplit("-sandbox-")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let empty = sandbox.dir.join("empty");
        let build_lower = if reads_build_cache {
            self.gocache.clone()
        } else {
            std::fs::create_dir_all(&empty)?;
            empty
        };
        for (layer, lower) in [("mod", &self.modcache), ("build", &build_lower)] {
            let base = sandbox.dir.join(layer);
            for d in ["upper", "work"] {
                std::fs::create_dir_all(base.join(d))?;
            }
            // The merged view's root is the upper directory's: the builder's to write in.
            self.give_to_builder(&base.join("upper"))?;
            let name = format!("cbs-{layer}-{id}-{}", std::process::id());
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                base.join("upper").display(),
                base.join("work").display()
            );
            self.docker
                .create_volume(bollard::models::VolumeCreateRequest {
                    name: Some(name.clone()),
                    driver: Some("local".into()),
                    driver_opts: Some(HashMap::from([
                        ("type".to_owned(), "overlay".to_owned()),
                        ("device".to_owned(), "overlay".to_owned()),
                        ("o".to_owned(), options),
                    ])),
                    labels: Some(self.labels(build_key)),
                    ..Default::default()
                })
                .await
                .map_err(engine)?;
            sandbox.volumes.push(name);
        }
        sandbox.gate =
            Some(Gate::start(self.settings.proxy.clone(), &sandbox.dir.join("gate")).await?);
        if let Some(cache) = &self.build_cache {
            sandbox.cache = Some(
                Session::start(cache.clone(), &sandbox.dir.join("cache"), reads_build_cache)
                    .await?,
            );
        }
        Ok(sandbox)
    }

    /// The labels of everything made for `build_key`.
    fn labels(&self, build_key: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_WORKER.to_owned(), self.worker.clone()),
            (LABEL_BUILD.to_owned(), build_key.to_owned()),
            (
                LABEL_DEPLOYMENT.to_owned(),
                self.settings.deployment.clone(),
            ),
        ])
    }

    /// Runs the commands of `steps` in one container; `Some(Failed)` if one failed.
    #[allow(clippy::too_many_arguments)]
    async fn run_group(
        &self,
        steps: &[Step],
        phase: Phase,
        target: &[(&'static str, String)],
        build_key: &str,
        dir: &Path,
        sandbox: &Sandbox,
        progress: &mpsc::UnboundedSender<Progress>,
    ) -> Result<Option<PlanOutcome>, ExecError> {
        // (step index, command) in order.
        let commands: Vec<(usize, &GoCommand)> = steps
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.commands.iter().map(move |c| (i, c)))
            .collect();
        let json = format!(
            "[{}]",
            commands
                .iter()
                .map(|(_, c)| format!(
                    "[{}]",
                    c.args
                        .iter()
                        .map(|a| json_string(a))
                        .collect::<Vec<_>>()
                        .join(",")
                ))
                .collect::<Vec<_>>()
                .join(",")
        );
        let nonce = nonce();
        // Each command has its own limit, enforced by the runner; the container as a whole
        // gets the sum (and some slack) as a backstop.
        let per_command = self.go.command_timeout;
        let mut cmd = vec![
            RUNNER.to_owned(),
            nonce.clone(),
            per_command.as_millis().max(1).to_string(),
            json,
        ];
        let mounts = Mounts {
            modcache: sandbox.volumes[0].clone(),
            gocache: sandbox.volumes[1].clone(),
            volumes: true,
            gate: sandbox.gate.as_ref().map(Gate::socket),
            cache: sandbox.cache.as_ref(),
        };
        if phase == Phase::Resolve {
            cmd.push(format!("127.0.0.1:{GATE_PORT}"));
            cmd.push(GATE_SOCKET.to_owned());
        }
        let timeout = per_command * u32::try_from(commands.len()).unwrap_or(1) + CONTAINER_SLACK;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let run = async move {
            let tx = tx;
            self.run_container(dir, build_key, cmd, phase, target, &mounts, &tx, timeout)
                .await
        };
        // What the markers told so far.
        let mut current: Option<usize> = None;
        let mut step_started = Instant::now();
        let mut failed: Option<(usize, i64)> = None;
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let follow = async {
            while let Some(line) = rx.recv().await {
                match parse_marker(&line, &nonce) {
                    Some(Marker::Start(i)) if i < commands.len() => {
                        let (step, command) = commands[i];
                        let new_step = i == 0 || commands[i - 1].0 != step;
                        if new_step {
                            step_started = Instant::now();
                            tail.clear();
                            let _ = progress.send(Progress::StepStarted {
                                step: steps[step].name,
                            });
                        }
                        current = Some(i);
                        let _ = progress.send(Progress::Line {
                            step: steps[step].name,
                            line: command.display(),
                        });
                        push_tail(&mut tail, command.display());
                    }
                    Some(Marker::Exit(i, code)) if i < commands.len() => {
                        let step = commands[i].0;
                        let last_of_step = i + 1 == commands.len() || commands[i + 1].0 != step;
                        if code != 0 {
                            failed = Some((i, code));
                        }
                        if code != 0 || last_of_step {
                            let _ = progress.send(Progress::StepFinished {
                                step: steps[step].name,
                                duration: step_started.elapsed(),
                                exit_code: (code >= 0).then_some(code),
                            });
                        }
                    }
                    _ => {
                        let step = current.map_or(0, |i| commands[i].0);
                        push_tail(&mut tail, line.clone());
                        let _ = progress.send(Progress::Line {
                            step: steps[step].name,
                            line,
                        });
                    }
                }
            }
        };
        let (exit, ()) = tokio::join!(run, follow);
        let exit = exit?;
        let tail: Vec<String> = tail.into_iter().collect();
        if let Some((i, code)) = failed {
            let (step, command) = commands[i];
            return Ok(Some(PlanOutcome::Failed {
                step: steps[step].name,
                command: command.display(),
                exit: Exit {
                    code: (code >= 0).then_some(code),
                    duration: exit.duration,
                    timed_out: code == RUNNER_TIMED_OUT,
                },
                tail,
            }));
        }
        let all_done = exit.success() && current == Some(commands.len() - 1);
        if all_done {
            return Ok(None);
        }
        // The container ended early (timed out, killed, the runner could not start).
        let i = current.unwrap_or(0);
        let (step, command) = commands[i];
        let _ = progress.send(Progress::StepFinished {
            step: steps[step].name,
            duration: step_started.elapsed(),
            exit_code: None,
        });
        Ok(Some(PlanOutcome::Failed {
            step: steps[step].name,
            command: command.display(),
            exit: Exit { code: None, ..exit },
            tail,
        }))
    }
}

/// What a container mounts as its caches (host paths or volume names) and the gate's
/// socket, if it resolves.
#[derive(Debug)]
struct Mounts<'a> {
    modcache: String,
    gocache: String,
    /// Whether the caches are volumes (names), not host paths.
    volumes: bool,
    gate: Option<&'a Path>,
    /// The build's cache session (compile steps get GOCACHEPROG).
    cache: Option<&'a Session>,
}

/// One build's sandbox: its overlay volumes, the directory of their layers and the gate.
/// [`Sandbox::teardown`] removes it all; dropped without it (a cancelled build), the
/// removal goes on in the background.
#[derive(Debug)]
struct Sandbox {
    docker: Option<Docker>,
    /// The module cache's volume, then the build cache's.
    volumes: Vec<String>,
    gate: Option<Gate>,
    cache: Option<Session>,
    /// The layers' directory, and its owner until the sandbox is removed.
    dir: PathBuf,
    layers: Option<tempfile::TempDir>,
}

impl Sandbox {
    async fn teardown(mut self) {
        if let Some(docker) = self.docker.take() {
            self.gate = None;
            remove_volumes(docker, std::mem::take(&mut self.volumes)).await;
        }
        if let Some(layers) = self.layers.take() {
            let _ = tokio::task::spawn_blocking(move || remove_layers(layers)).await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let volumes = std::mem::take(&mut self.volumes);
        let layers = self.layers.take();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                remove_volumes(docker, volumes).await;
                if let Some(layers) = layers {
                    let _ = tokio::task::spawn_blocking(move || remove_layers(layers)).await;
                }
            });
        }
    }
}

/// Removes volumes; one still in use (its container's removal under way) is tried again
/// for a while.
async fn remove_volumes(docker: Docker, volumes: Vec<String>) {
    for v in volumes {
        for attempt in 0..40 {
            match docker
                .remove_volume(&v, None::<bollard::query_parameters::RemoveVolumeOptions>)
                .await
            {
                Ok(()) => break,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => break,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) if attempt < 39 => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => {
                    warn!(volume = %v, error = %e, "cannot remove a build's volume");
                    break;
                }
            }
        }
    }
}

/// Removes a layers directory. Overlay leaves `work/work` owned by root with mode 0: it is
/// empty, so it is removed by name first (reading it is not needed).
fn remove_layers(layers: tempfile::TempDir) {
    for layer in ["mod", "build"] {
        let _ = std::fs::remove_dir(layers.path().join(layer).join("work/work"));
    }
    let path = layers.path().to_path_buf();
    if let Err(e) = layers.close() {
        warn!(dir = %path.display(), error = %e, "cannot remove a build's cache layers");
    }
}

/// Copies the build cache entries a build wrote (in its overlay's upper directory) into
/// the shared build cache: only Go's entry files (`xx/<64 hex>-a` and `-d`), regular
/// files, never replacing one. Returns how many were added.
fn promote(upper: &Path, shared: &Path, owner: Option<(u32, u32)>) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut added = 0;
    let Ok(dirs) = std::fs::read_dir(upper) else {
        return Ok(0);
    };
    for d in dirs {
        let d = d?;
        let name = d.file_name().to_string_lossy().into_owned();
        if !hex(&name, 2) || !d.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(d.path())? {
            let f = f?;
            let file = f.file_name().to_string_lossy().into_owned();
            let entry = file
                .strip_suffix("-a")
                .or_else(|| file.strip_suffix("-d"))
                .is_some_and(|h| hex(h, 64) && h.starts_with(&name));
            if !entry || !f.file_type()?.is_file() {
                continue;
            }
            let target_dir = shared.join(&name);
            let target = target_dir.join(&file);
            if target.exists() {
                continue;
            }
            if !target_dir.exists() {
                std::fs::create_dir(&target_dir).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
                std::fs::set_permissions(&target_dir, std::fs::Permissions::from_mode(0o755))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&target_dir, Some(uid), Some(gid))?;
                }
            }
            let tmp = tempfile::NamedTempFile::new_in(&target_dir)?;
            std::fs::copy(f.path(), tmp.path())?;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(tmp.path(), Some(uid), Some(gid))?;
            }
            tmp.persist(&target).map_err(|e| e.error)?;
            added += 1;
        }
    }
    Ok(added)
}

fn push_tail(tail: &mut std::collections::VecDeque<String>, line: String) {
    if tail.len() == crate::TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

/// The longest line a container's output is passed on with: the rest of a longer line is
/// dropped and the line says so, so that one hostile line (a generated identifier in a
/// compiler error, a binary written to stdout) cannot fill memory, the output table or a
/// failure message.
pub const MAX_LINE_BYTES: usize = 4096;

/// Splits a stream of bytes into lines of at most [`MAX_LINE_BYTES`] (invalid UTF-8 is
/// replaced).
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
    /// Bytes of the current line dropped past the limit.
    dropped: usize,
}

impl LineSplitter {
    fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let nl = bytes.iter().position(|&b| b == b'\n');
            let (piece, ends) = match nl {
                Some(n) => (&bytes[..n], true),
                None => (bytes, false),
            };
            let room = MAX_LINE_BYTES - self.partial.len();
            let keep = piece.len().min(room);
            self.partial.extend_from_slice(&piece[..keep]);
            self.dropped += piece.len() - keep;
            if ends {
                out.push(self.take());
                bytes = &bytes[piece.len() + 1..];
            } else {
                bytes = &[];
            }
        }
        out
    }

    fn take(&mut self) -> String {
        let mut line = String::from_utf8_lossy(&self.partial).into_owned();
        if self.dropped > 0 {
            line.push_str(&format!(" [line cut: {} more bytes]", self.dropped));
        }
        self.partial.clear();
        self.dropped = 0;
        line
    }

    fn finish(mut self) -> Option<String> {
        (!self.partial.is_empty() || self.dropped > 0).then(|| self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks_and_cut_at_the_limit() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"go: downloading ").is_empty());
        assert_eq!(
            s.push(b"x v1\nnext\n\nla"),
            ["go: downloading x v1", "next", ""]
        );
        assert_eq!(s.finish().as_deref(), Some("la"));

        // One line of 1 MB arriving in pieces comes out as one line of the limit, saying
        // how much went.
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for _ in 0..256 {
            out.extend(s.push(&[b'a'; 4096]));
        }
        out.extend(s.push(b"\nafter\n"));
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert!(out[0].starts_with(&"a".repeat(MAX_LINE_BYTES)));
        assert!(out[0].ends_with(&format!(
            " [line cut: {} more bytes]",
            256 * 4096 - MAX_LINE_BYTES
        )));
        assert_eq!(out[1], "after");
        assert_eq!(s.finish(), None);

        // Invalid UTF-8 is replaced, not an error.
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"\xff\xfeok\n"), ["\u{fffd}\u{fffd}ok"]);
    }

    #[test]
    fn markers_need_the_nonce() {
        assert_eq!(
            parse_marker("@@cbs abc start 3", "abc"),
            Some(Marker::Start(3))
        );
        assert_eq!(
            parse_marker("@@cbs abc exit 3 -1", "abc"),
            Some(Marker::Exit(3, -1))
        );
        assert_eq!(parse_marker("@@cbs abd exit 3 0", "abc"), None);
        assert_eq!(parse_marker("@@cbs abc exit 3", "abc"), None);
        assert_eq!(parse_marker("x @@cbs abc start 1", "abc"), None);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("-w -s"), "\"-w -s\"");
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
