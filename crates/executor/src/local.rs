//! The local executor: the host's `go`, a cleared environment, no isolation. For
//! development only; it says so in the log when created.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use cbs_domain::plan::{GoCommand, Phase};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{command_env, CachePaths, ExecError, Exit, GoSettings};

/// Runs Go commands on the host.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    /// The real `go` binary (not a wrapper script): `$GOROOT/bin/go`.
    pub go: PathBuf,
    pub settings: GoSettings,
    pub caches: CachePaths,
}

impl LocalExecutor {
    pub fn new(go: PathBuf, settings: GoSettings, caches: CachePaths) -> LocalExecutor {
        warn!(go = %go.display(), "local executor: builds run on this host WITHOUT isolation; use it for development only");
        LocalExecutor {
            go,
            settings,
            caches,
        }
    }

    pub(crate) async fn run(
        &self,
        dir: &Path,
        command: &GoCommand,
        phase: Phase,
        target: &[(&'static str, String)],
        lines: &mpsc::UnboundedSender<String>,
    ) -> Result<Exit, ExecError> {
        let bin_dir = self
            .go
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let env = command_env(
            &self.settings,
            phase,
            &self.caches,
            target,
            &format!("{bin_dir}:/usr/bin:/bin"),
            crate::ResolveFiles {
                netrc: self.settings.netrc.as_deref().map(|p| p.as_ref()),
                proxy_ca: self.settings.proxy_ca.as_deref(),
            },
        );
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&self.go)
            .args(&command.args)
            .current_dir(dir)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ExecError::Spawn(format!("{}: {e}", self.go.display())))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let pump = |r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let lines = lines.clone();
            async move {
                let mut reader = BufReader::new(r).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let _ = lines.send(line);
                }
            }
        };
        let output = async {
            tokio::join!(pump(Box::new(stdout)), pump(Box::new(stderr)));
        };
        let waited = tokio::time::timeout(self.settings.command_timeout, async {
            let (status, ()) = tokio::join!(child.wait(), output);
            status
        })
        .await;
        match waited {
            Ok(status) => {
                let status = status.map_err(|e| ExecError::Spawn(e.to_string()))?;
                Ok(Exit {
                    code: status.code().map(i64::from),
                    duration: started.elapsed(),
                    timed_out: false,
                })
            }
            Err(_) => {
                let _ = child.kill().await;
                let _ = lines.send(format!(
                    "timed out after {:?}",
                    self.settings.command_timeout
                ));
                Ok(Exit {
                    code: None,
                    duration: started.elapsed(),
                    timed_out: true,
                })
            }
        }
    }
}
