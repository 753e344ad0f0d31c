//! The executor a worker builds with, made from the config; the build root's checks.

use std::sync::Arc;

use anyhow::Context;
use cbs_executor::{
    CachePaths, DockerExecutor, DockerSettings, Executor, GoSettings, LocalExecutor,
};

use crate::App;

/// Makes the configured executor.
pub async fn executor(app: &App, worker: &str) -> anyhow::Result<Executor> {
    let w = &app.config.worker;
    let local = matches!(w.executor, cbs_config::ExecutorKind::Local);
    let go = GoSettings {
        goproxy: app.config.go.proxy.clone(),
        gosumdb: app.config.go.sumdb.clone(),
        command_timeout: w.command_timeout,
        gonosumdb: app.config.go.gonosumdb(),
        // The local executor's go reaches the proxy itself; docker builds reach it through
        // the worker's gate, which holds the credentials and authorities itself.
        netrc: if local {
            write_netrc(app)?.map(Arc::new)
        } else {
            None
        },
        proxy_ca: Some(app.config.go.proxy_ca_file.clone())
            .filter(|p| local && !p.as_os_str().is_empty()),
    };
    // go.proxy was checked when the config was loaded (App::new): proxy URLs only.
    match w.executor {
        cbs_config::ExecutorKind::Local => Ok(Executor::Local(LocalExecutor::new(
            w.local_go.clone(),
            go,
            CachePaths {
                gomodcache: w.cache_dir.join("local/mod"),
                gocache: w.cache_dir.join("local/build"),
                home: w.cache_dir.join("local/home"),
            },
        ))),
        cbs_config::ExecutorKind::Docker => {
            let d = &w.docker;
            let docker = DockerExecutor::connect(
                DockerSettings {
                    container: d.clone(),
                    // The gate's proxies: a request may carry a whole module zip, so
                    // it gets a command's time.
                    proxy: Arc::new(
                        cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                            timeout: w.command_timeout,
                            ..app.proxy_config(std::time::Duration::from_secs(1))?
                        })
                        .context("go.proxy")?,
                    ),
                    deployment: app
                        .store
                        .deployment_id()
                        .await
                        .context("reading the deployment id")?,
                },
                go,
                w.cache_dir.join("mod"),
                // One build cache per host, whatever the worker's id (which changes with
                // its pid): Go's build cache is safe for concurrent go commands.
                w.cache_dir.join("build"),
                worker.to_owned(),
            )
            .await
            .context("docker executor")?;
            let docker = if w.build_cache.enabled {
                let shared = if w.build_cache.shared {
                    Some(
                        cbs_storage::Storage::connect(&app.config.storage)
                            .await
                            .context("artifact storage (the shared build cache)")?,
                    )
                } else {
                    None
                };
                let cache = cbs_executor::BuildCache::open(cbs_executor::BuildCacheSettings {
                    dir: w.cache_dir.join("prog"),
                    local_max_bytes: w.build_cache.local_max_bytes,
                    shared,
                })
                .await
                .with_context(|| {
                    format!("build cache in {}", w.cache_dir.join("prog").display())
                })?;
                docker.with_build_cache(cache)
            } else {
                docker
            };
            docker
                .remove_orphans()
                .await
                .context("removing orphaned containers")?;
            Ok(Executor::Docker(Box::new(docker)))
        }
    }
}

/// Writes the module proxy's credentials (if any) into a new file only this worker's user
/// can read, in the build root; removed when the executor goes.
fn write_netrc(app: &App) -> anyhow::Result<Option<tempfile::TempPath>> {
    use std::io::Write;
    let Some(text) = app.config.go.netrc() else {
        return Ok(None);
    };
    let root = app.config.worker.build_root();
    check_build_root(&root)?;
    // Created with mode 0600 (tempfile's default), then handed to the builder user.
    let mut file = tempfile::Builder::new()
        .prefix(".netrc-")
        .tempfile_in(&root)
        .with_context(|| format!("creating the proxy credentials file in {}", root.display()))?;
    file.write_all(text.expose().as_bytes())
        .and_then(|()| file.flush())
        .context("writing the proxy credentials file")?;
    Ok(Some(file.into_temp_path()))
}

/// Creates the build root if needed (mode 0700), and refuses one that another user could
/// have prepared: a symbolic link, not owned by this process's user, or writable by others.
pub fn check_build_root(root: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if std::fs::symlink_metadata(root).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("creating worker.build_dir {}", root.display()))?;
    }
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("worker.build_dir {}", root.display()))?;
    // /proc/self belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let problem = if meta.file_type().is_symlink() {
        Some("is a symbolic link".to_owned())
    } else if !meta.is_dir() {
        Some("is not a directory".to_owned())
    } else if me.is_some_and(|uid| uid != meta.uid()) {
        Some(format!(
            "is owned by uid {}, not by this worker's user",
            meta.uid()
        ))
    } else if meta.permissions().mode() & 0o022 != 0 {
        Some(format!(
            "is writable by other users (mode {:o})",
            meta.permissions().mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(p) => anyhow::bail!(
            "worker.build_dir {} {p}: use a directory of the worker's own (empty: <cache_dir>/builds)",
            root.display()
        ),
        None => Ok(()),
    }
}
