//! Preemption notices of spot/preemptible VMs. A detector polls its provider's metadata
//! service (or waits for SIGUSR1) and returns once the VM is going away. A network error or
//! an answer it cannot read is logged and is never a preemption.

use std::time::Duration;

use anyhow::Context;
use cbs_config::{PreemptionConfig, PreemptionDetector};
use tracing::{info, warn};

/// What was detected, and how to acknowledge it once the builds are released (Azure only).
#[derive(Debug)]
pub struct Notice {
    pub detail: String,
    ack: Option<AzureAck>,
}

#[derive(Debug)]
struct AzureAck {
    client: reqwest::Client,
    base: String,
    event_id: String,
}

impl Notice {
    /// Tells the provider we are ready (Azure's scheduled events may then start at once).
    pub async fn acknowledge(self) {
        let Some(a) = self.ack else { return };
        let r = a
            .client
            .post(format!(
                "{}/metadata/scheduledevents?api-version=2020-07-01",
                a.base
            ))
            .header("Metadata", "true")
            .json(&serde_json::json!({ "StartRequests": [{ "EventId": a.event_id }] }))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                info!(event_id = %a.event_id, "preemption acknowledged")
            }
            Ok(r) => warn!(status = %r.status(), "acknowledging the scheduled event failed"),
            Err(e) => warn!(error = %e, "acknowledging the scheduled event failed"),
        }
    }
}

fn base_url(cfg: &PreemptionConfig, default: &str) -> String {
    let b = if cfg.metadata_url.is_empty() {
        default
    } else {
        &cfg.metadata_url
    };
    b.trim_end_matches('/').to_owned()
}

/// A future that resolves when the configured detector sees a preemption (never, for
/// `none`). The SIGUSR1 handler is installed here, before the future is first polled, so a
/// signal that comes early is not the default action (which ends the process).
pub fn watch(
    cfg: &PreemptionConfig,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Notice> + Send>> {
    if cfg.detector == PreemptionDetector::Signal {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::user_defined1()) {
                Ok(mut s) => {
                    return Box::pin(async move {
                        s.recv().await;
                        Notice {
                            detail: "SIGUSR1".into(),
                            ack: None,
                        }
                    })
                }
                Err(e) => warn!(error = %e, "cannot watch SIGUSR1; preemption by signal is off"),
            }
        }
        return Box::pin(std::future::pending());
    }
    let cfg = cfg.clone();
    Box::pin(async move { wait(&cfg).await })
}

/// Polls the provider's metadata service until it reports a preemption; never returns for
/// `none` or `signal` (see [`watch`]).
async fn wait(cfg: &PreemptionConfig) -> Notice {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2).max(cfg.poll_interval / 2))
        .build()
        .unwrap_or_default();
    match cfg.detector {
        PreemptionDetector::None | PreemptionDetector::Signal => std::future::pending().await,
        provider => {
            let base = match provider {
                PreemptionDetector::Gcp => base_url(cfg, "http://metadata.google.internal"),
                _ => base_url(cfg, "http://169.254.169.254"),
            };
            let mut aws_token: Option<String> = None;
            let mut azure_vm: Option<String> = None;
            let mut tick = tokio::time::interval(cfg.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let checked = match provider {
                    PreemptionDetector::Gcp => gcp(&client, &base).await,
                    PreemptionDetector::Aws => aws(&client, &base, &mut aws_token).await,
                    _ => azure(&client, &base, &mut azure_vm).await,
                };
                match checked {
                    Ok(Some(notice)) => return notice,
                    Ok(None) => {}
                    Err(e) => warn!(
                        detector = ?provider,
                        error = format!("{e:#}"),
                        "cannot read the preemption notice (not a preemption)"
                    ),
                }
            }
        }
    }
}

/// GCP: `instance/preempted` says `TRUE` once the VM is being preempted.
async fn gcp(client: &reqwest::Client, base: &str) -> anyhow::Result<Option<Notice>> {
    let r = client
        .get(format!("{base}/computeMetadata/v1/instance/preempted"))
        .header("Metadata-Flavor", "Google")
        .send()
        .await?
        .error_for_status()?;
    let body = r.text().await?;
    Ok((body.trim() == "TRUE").then(|| Notice {
        detail: "GCP instance/preempted is TRUE".into(),
        ack: None,
    }))
}

/// AWS: IMDSv2 token, then `spot/instance-action`: 404 until an interruption is scheduled,
/// then `{"action": "terminate|stop|hibernate", "time": ...}`.
async fn aws(
    client: &reqwest::Client,
    base: &str,
    token: &mut Option<String>,
) -> anyhow::Result<Option<Notice>> {
    if token.is_none() {
        let t = client
            .put(format!("{base}/latest/api/token"))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        *token = Some(t.trim().to_owned());
    }
    let r = client
        .get(format!("{base}/latest/meta-data/spot/instance-action"))
        .header(
            "X-aws-ec2-metadata-token",
            token.as_deref().unwrap_or_default(),
        )
        .send()
        .await?;
    match r.status().as_u16() {
        404 => Ok(None),
        401 => {
            // The token expired: a new one next time.
            *token = None;
            Ok(None)
        }
        200 => {
            let v: serde_json::Value = r.json().await.context("instance-action JSON")?;
            let action = v["action"]
                .as_str()
                .context("instance-action without action")?;
            Ok(Some(Notice {
                detail: format!(
                    "AWS spot instance-action {action} at {}",
                    v["time"].as_str().unwrap_or("?")
                ),
                ack: None,
            }))
        }
        s => anyhow::bail!("spot/instance-action answered HTTP {s}"),
    }
}

/// Azure: scheduled events; a `Preempt` event whose resources name this VM (asked once from
/// the instance metadata) is a preemption. It is acknowledged after the builds are released.
async fn azure(
    client: &reqwest::Client,
    base: &str,
    vm: &mut Option<String>,
) -> anyhow::Result<Option<Notice>> {
    if vm.is_none() {
        let name = client
            .get(format!(
                "{base}/metadata/instance/compute/name?api-version=2021-02-01&format=text"
            ))
            .header("Metadata", "true")
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        *vm = Some(name.trim().to_owned());
    }
    let me = vm.as_deref().unwrap_or_default();
    let v: serde_json::Value = client
        .get(format!(
            "{base}/metadata/scheduledevents?api-version=2020-07-01"
        ))
        .header("Metadata", "true")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .context("scheduled events JSON")?;
    let events = v["Events"].as_array().cloned().unwrap_or_default();
    for e in events {
        let kind = e["EventType"].as_str().unwrap_or_default();
        let ours = e["Resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(me)));
        if kind == "Preempt" && ours {
            let id = e["EventId"].as_str().unwrap_or_default().to_owned();
            return Ok(Some(Notice {
                detail: format!(
                    "Azure scheduled event {id} Preempt not before {}",
                    e["NotBefore"].as_str().unwrap_or("?")
                ),
                ack: Some(AzureAck {
                    client: client.clone(),
                    base: base.to_owned(),
                    event_id: id,
                }),
            }));
        }
    }
    Ok(None)
}
