//! The executor's progress as events: steps as they start and finish, output coalesced.

use std::time::Duration;

use cbs_events::{Event, Output, StepFinished, StepStarted};
use cbs_executor::Progress;
use cbs_projections::BuildState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::App;

/// Output lines are coalesced into one event per this many lines...
const OUTPUT_LINES: usize = 64;
/// ...or per this much time, whichever comes first.
const OUTPUT_INTERVAL: Duration = Duration::from_millis(250);

/// Turns progress into events: steps as they start and finish, output coalesced. Cancels
/// `fenced` if the build's lease was taken away.
pub(super) async fn record(
    app: App,
    build: BuildState,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    fenced: CancellationToken,
) {
    let key = build.key.clone();
    let attempt = build.attempt;
    let mut pending: Vec<String> = Vec::new();
    let mut pending_step = String::new();
    let append = |event: Event| {
        let app = app.clone();
        let key = key.clone();
        let fenced = fenced.clone();
        async move {
            match app.store.append_latest(&key, event).await {
                Ok(_) => true,
                Err(e) if e.is_fenced() => {
                    warn!(error = %e, "lease lost; stopping the build");
                    fenced.cancel();
                    false
                }
                Err(e) => {
                    // Progress is best effort; the result is what counts.
                    warn!(error = %e, "cannot record build progress");
                    true
                }
            }
        }
    };
    let mut tick = tokio::time::interval(OUTPUT_INTERVAL);
    loop {
        let progress = tokio::select! {
            p = rx.recv() => p,
            _ = tick.tick() => {
                if !pending.is_empty() {
                    let lines = std::mem::take(&mut pending);
                    if !append(Event::Output(Output { attempt, step: pending_step.clone(), lines })).await {
                        return;
                    }
                }
                continue;
            }
        };
        let Some(progress) = progress else { break };
        let flush_first = !matches!(progress, Progress::Line { .. }) && !pending.is_empty();
        if flush_first {
            let lines = std::mem::take(&mut pending);
            if !append(Event::Output(Output {
                attempt,
                step: pending_step.clone(),
                lines,
            }))
            .await
            {
                return;
            }
        }
        let event = match progress {
            Progress::StepStarted { step } => Event::StepStarted(StepStarted {
                attempt,
                step: step.to_owned(),
            }),
            Progress::StepFinished {
                step,
                duration,
                exit_code,
            } => {
                let platform = build.request.platform();
                cbs_metrics::metrics()
                    .step_duration
                    .get_or_create(&cbs_metrics::StepLabels {
                        step,
                        os: platform.os(),
                        arch: platform.arch(),
                    })
                    .observe(duration.as_secs_f64());
                Event::StepFinished(StepFinished {
                    attempt,
                    step: step.to_owned(),
                    duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                    exit_code,
                })
            }
            Progress::Line { step, line } => {
                pending_step = step.to_owned();
                pending.push(line);
                if pending.len() < OUTPUT_LINES {
                    continue;
                }
                Event::Output(Output {
                    attempt,
                    step: step.to_owned(),
                    lines: std::mem::take(&mut pending),
                })
            }
        };
        if !append(event).await {
            return;
        }
    }
    if !pending.is_empty() {
        append(Event::Output(Output {
            attempt,
            step: pending_step,
            lines: pending,
        }))
        .await;
    }
}
