//! The docker executor: every Go command in its own hardened container (REFERENCE
//! section 4).
//!
//! Resolve commands get the configured network and a writable module cache; compile
//! commands get no network at all, `GOPROXY=off`, `-mod=readonly` and a read-only module
//! cache. Always: a non-root user, all capabilities dropped, no-new-privileges, a read-only
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
use cbs_domain::plan::{GoCommand, Phase};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{command_env, CachePaths, ExecError, Exit, GoSettings};

/// Label on every container we create.
pub const LABEL_MANAGED: &str = "org.caddy-build-server.managed";
/// Label with the worker id.
pub const LABEL_WORKER: &str = "org.caddy-build-server.worker";
/// Label with the build key.
pub const LABEL_BUILD: &str = "org.caddy-build-server.build";

/// Where things are mounted inside a build container.
const BUILD_DIR: &str = "/build";
const MODCACHE: &str = "/cache/mod";
const GOCACHE: &str = "/cache/build";
const HOME: &str = "/tmp/home";

/// Docker settings.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// The engine's address (`unix:///var/run/docker.sock`, `tcp://host:2375`); empty means
    /// DOCKER_HOST or the local socket.
    pub host: String,
    /// The builder image (with `go` on PATH).
    pub image: String,
    /// PATH inside the image.
    pub path: String,
    /// `uid:gid` the commands run as (never root).
    pub user: String,
    /// Network of resolve commands (`bridge`, `host`, or a network name). Compile commands
    /// always get `none`.
    pub resolve_network: String,
    pub memory_bytes: i64,
    /// CPUs (1.5 = one and a half).
    pub cpus: f64,
    pub pids_limit: i64,
    /// Size of the /tmp tmpfs, like `1g`.
    pub tmpfs_size: String,
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
    worker: String,
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
        let docker = if settings.host.is_empty() {
            Docker::connect_with_defaults()
        } else {
            Docker::connect_with_host(&settings.host)
        };
        let docker = docker
            .map_err(engine)?
            .negotiate_version()
            .await
            .map_err(engine)?;
        docker
            .inspect_image(&settings.image)
            .await
            .map_err(|e| ExecError::Engine(format!("builder image {}: {e}", settings.image)))?;
        let executor = DockerExecutor {
            docker,
            settings,
            go,
            modcache,
            gocache,
            worker,
        };
        for dir in [&executor.modcache, &executor.gocache] {
            tokio::fs::create_dir_all(dir).await?;
            executor.give_to_builder(dir)?;
        }
        Ok(executor)
    }

    /// Makes `dir` (a new build directory or a cache) writable for the builder user: when
    /// the worker runs as root it hands the directory to that user; otherwise the
    /// directory is the worker's and the configured user should be the worker's own.
    pub fn give_to_builder(&self, dir: &Path) -> Result<(), ExecError> {
        use std::os::unix::fs::MetadataExt;
        let (uid, gid) = parse_user(&self.settings.user)?;
        let meta = std::fs::metadata(dir)?;
        if meta.uid() == 0 && uid != 0 {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }
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
            vec![format!("{LABEL_WORKER}={}", self.worker)],
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
                self.remove(id).await;
            }
        }
        if !orphans.is_empty() {
            info!(count = orphans.len(), worker.id = %self.worker, "removed orphaned build containers");
        }
        Ok(orphans.len())
    }

    async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self.docker.remove_container(id, Some(options)).await {
            warn!(container = id, error = %e, "cannot remove build container");
        }
    }

    pub(crate) async fn run(
        &self,
        dir: &Path,
        build_key: &str,
        command: &GoCommand,
        phase: Phase,
        target: &[(&'static str, String)],
        lines: &mpsc::UnboundedSender<String>,
    ) -> Result<Exit, ExecError> {
        let caches = CachePaths {
            gomodcache: MODCACHE.into(),
            gocache: GOCACHE.into(),
            home: HOME.into(),
        };
        let env = command_env(&self.go, phase, &caches, target, &self.settings.path)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let (network, modcache_mode) = match phase {
            Phase::Resolve => (self.settings.resolve_network.clone(), "rw"),
            Phase::Compile => ("none".to_owned(), "ro"),
        };
        let host_config = HostConfig {
            binds: Some(vec![
                format!("{}:{BUILD_DIR}:rw", dir.display()),
                format!("{}:{MODCACHE}:{modcache_mode}", self.modcache.display()),
                format!("{}:{GOCACHE}:rw", self.gocache.display()),
            ]),
            network_mode: Some(network),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            pids_limit: Some(self.settings.pids_limit),
            memory: Some(self.settings.memory_bytes),
            memory_swap: Some(self.settings.memory_bytes),
            nano_cpus: Some((self.settings.cpus * 1e9) as i64),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!(
                    "rw,exec,nosuid,nodev,mode=1777,size={}",
                    self.settings.tmpfs_size
                ),
            )])),
            init: Some(true),
            ..Default::default()
        };
        let mut cmd = vec!["go".to_owned()];
        cmd.extend(command.args.iter().cloned());
        let config = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            cmd: Some(cmd),
            entrypoint: Some(vec![]),
            env: Some(env),
            working_dir: Some(BUILD_DIR.into()),
            user: Some(self.settings.user.clone()),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_WORKER.to_owned(), self.worker.clone()),
                (LABEL_BUILD.to_owned(), build_key.to_owned()),
            ])),
            network_disabled: Some(phase == Phase::Compile),
            host_config: Some(host_config),
            ..Default::default()
        };
        let started = Instant::now();
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().build()),
                config,
            )
            .await
            .map_err(engine)?;
        let id = created.id;
        let result = self.start_and_follow(&id, lines, started).await;
        self.remove(&id).await;
        result
    }

    async fn start_and_follow(
        &self,
        id: &str,
        lines: &mpsc::UnboundedSender<String>,
        started: Instant,
    ) -> Result<Exit, ExecError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(engine)?;
        let follow = async {
            let options = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut logs = self.docker.logs(id, Some(options));
            // Output arrives in chunks; split into lines, per stream.
            let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
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
                partial[i].extend_from_slice(&bytes);
                while let Some(nl) = partial[i].iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial[i].drain(..=nl).collect();
                    let _ =
                        lines.send(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
                }
            }
            for rest in partial {
                if !rest.is_empty() {
                    let _ = lines.send(String::from_utf8_lossy(&rest).into_owned());
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
        let waited = tokio::time::timeout(self.go.command_timeout, async {
            tokio::join!(wait, follow).0
        })
        .await;
        match waited {
            Ok(code) => Ok(Exit {
                code: Some(code?),
                duration: started.elapsed(),
                timed_out: false,
            }),
            Err(_) => {
                let _ = lines.send(format!("timed out after {:?}", self.go.command_timeout));
                Ok(Exit {
                    code: None,
                    duration: started.elapsed(),
                    timed_out: true,
                })
            }
        }
    }
}
