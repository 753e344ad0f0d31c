//! Host clean-up: what dead workers left on this host (containers, build directories), and
//! per-worker build caches of an older layout.

use std::sync::Arc;
use std::time::Duration;

use cbs_executor::Executor;
use tracing::{info, warn};

use crate::App;

/// Runs [`clean_host`] every `worker.cleanup_interval`.
pub(super) async fn clean_host_every(app: App, exec: Arc<Executor>, me: String) {
    let mut tick = tokio::time::interval(app.config.worker.cleanup_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        clean_host(&app, &exec, &me).await;
    }
}

/// Removes what dead workers left on this host: containers of ours whose build (or its
/// reproduction) is not running under the worker that made them, and build directories
/// (build_dir/<worker>/build-<key prefix>-... and reproduce-<key prefix>-...) of builds
/// their worker no longer runs. When the database cannot
/// say, nothing is removed.
pub async fn clean_host(app: &App, exec: &Executor, me: &str) {
    if let Executor::Docker(d) = exec {
        match d.managed_containers().await {
            Ok(list) => {
                for c in list {
                    // Not a build's (a worker compiling its runner): its own worker
                    // removes it if it dies meanwhile (orphans are removed at start).
                    let Ok(k) = c.build.parse::<cbs_domain::BuildKey>() else {
                        continue;
                    };
                    let live = match app.store.build(&k).await {
                        Ok(Some(b)) => {
                            let attempt = b.status == cbs_projections::Status::Running
                                && b.owner.as_deref() == Some(c.worker.as_str());
                            let reproduction = b.reproduction.as_ref().is_some_and(|r| {
                                r.status == cbs_projections::ReproductionStatus::Running
                                    && r.worker.as_deref() == Some(c.worker.as_str())
                            });
                            attempt || reproduction
                        }
                        Ok(None) => false,
                        Err(_) => continue,
                    };
                    if !live {
                        d.remove_container(&c.id).await;
                        info!(container = %c.id, worker.id = %c.worker, build.key = %c.build, "removed a dead worker's container");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list containers for clean-up"),
        }
    }
    let root = app.config.worker.build_root();
    let Ok(mut workers) = tokio::fs::read_dir(&root).await else {
        return;
    };
    while let Ok(Some(w)) = workers.next_entry().await {
        let worker = w.file_name().to_string_lossy().into_owned();
        // Never through a symbolic link (entries' own types, not what they point at): a
        // link planted here must not make us delete what it points to.
        let is_real_dir = w.file_type().await.is_ok_and(|t| t.is_dir());
        if worker == me || !is_real_dir {
            continue;
        }
        // Directories first, then the running builds: a directory listed here was made
        // after its build's claim committed, so the read below sees that build running
        // (or already finished).
        let Ok(mut entries) = tokio::fs::read_dir(w.path()).await else {
            continue;
        };
        let mut dirs = Vec::new();
        while let Ok(Some(d)) = entries.next_entry().await {
            if d.file_type().await.is_ok_and(|t| t.is_dir()) {
                dirs.push(d);
            }
        }
        let Ok(running) = app.store.running_builds_of(&worker).await else {
            continue;
        };
        let mut left = 0;
        for d in dirs {
            let name = d.file_name().to_string_lossy().into_owned();
            let prefix = name
                .strip_prefix("build-")
                .or_else(|| name.strip_prefix("reproduce-"))
                .and_then(|r| r.split('-').next())
                .unwrap_or_default()
                .to_owned();
            if !prefix.is_empty() && running.iter().any(|k| k.starts_with(&prefix)) {
                left += 1;
                continue;
            }
            if let Err(e) = tokio::fs::remove_dir_all(d.path()).await {
                warn!(dir = %d.path().display(), error = %e, "cannot remove a dead worker's build directory");
                left += 1;
            }
        }
        if left == 0 {
            let _ = tokio::fs::remove_dir(w.path()).await;
        }
    }
}

/// Removes per-worker build caches (`build-<worker id>`, the layout before the cache was
/// shared per host) that nobody used for a day. Never follows a symbolic link.
pub fn prune_old_build_caches(cache_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let day = Duration::from_secs(24 * 3600);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > day);
        if name.starts_with("build-") && meta.is_dir() && old {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    info!(dir = %e.path().display(), "removed an unused per-worker build cache")
                }
                Err(err) => {
                    warn!(dir = %e.path().display(), error = %err, "cannot remove an old build cache")
                }
            }
        }
    }
}
