//! The executor's progress: steps as events, output as chunks of the output table, capped.

use std::time::Duration;

use cbs_events::{Event, StepFinished, StepStarted};
use cbs_executor::Progress;
use cbs_projections::BuildState;
use cbs_store::StoreError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::App;

/// Output lines are coalesced into one chunk per this many lines...
const OUTPUT_LINES: usize = 64;
/// ...or per this much time, whichever comes first.
const OUTPUT_INTERVAL: Duration = Duration::from_millis(250);
/// Tries per chunk while no database connection can be had (pauses of 0.2, 0.8, 3.2 s).
const WRITE_TRIES: u32 = 4;

/// An attempt's output on its way to the store: lines are coalesced into chunks and the
/// attempt keeps at most `cap` bytes (counted as the lines' bytes plus one per line break).
/// The first line that does not fit ends the kept output with a marker chunk; the lines from
/// there on are counted, and a last marker says how many there were.
struct OutputSink {
    app: App,
    key: cbs_domain::BuildKey,
    attempt: u32,
    cap: u64,
    kept: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// The first marker was written.
    marked: bool,
    /// Lines the store could not take (it was away longer than the retries).
    lost_lines: u64,
    step: String,
    pending: Vec<String>,
    fenced: CancellationToken,
}

impl OutputSink {
    fn line(&mut self, step: &str, line: String) {
        let size = line.len() as u64 + 1;
        if self.dropped_lines > 0 || self.kept + size > self.cap {
            self.dropped_lines += 1;
            self.dropped_bytes += size;
            return;
        }
        self.kept += size;
        step.clone_into(&mut self.step);
        self.pending.push(line);
    }

    fn full(&self) -> bool {
        self.pending.len() >= OUTPUT_LINES
    }

    /// Writes what is pending, and the marker once lines were left out; `false` when the
    /// attempt was fenced off (stop the build).
    async fn flush(&mut self) -> bool {
        if !self.pending.is_empty() {
            let lines = std::mem::take(&mut self.pending);
            if !self.write(lines, false).await {
                return false;
            }
        }
        if self.dropped_lines > 0 && !self.marked {
            self.marked = true;
            let marker = format!(
                "[output truncated: this attempt printed more than the {} bytes of output kept per attempt; the rest is counted, not kept]",
                self.cap
            );
            return self.write(vec![marker], true).await;
        }
        true
    }

    /// Ends the attempt's output: what is pending, and how much was left out.
    async fn finish(mut self) {
        if !self.flush().await {
            return;
        }
        if self.lost_lines > 0 {
            let marker = format!(
                "[{} lines of output could not be recorded: the database was unavailable]",
                self.lost_lines
            );
            if !self.write(vec![marker], true).await {
                return;
            }
        }
        if self.dropped_lines == 0 {
            return;
        }
        let marker = format!(
            "[output truncated: {} more lines ({} bytes) were not kept]",
            self.dropped_lines, self.dropped_bytes
        );
        self.write(vec![marker], true).await;
    }

    /// Writes one chunk, trying again while no database connection can be had (a restart);
    /// `false` when the attempt was fenced off. Lines the store never took are counted, and
    /// the attempt's output ends saying how many.
    async fn write(&mut self, lines: Vec<String>, truncated: bool) -> bool {
        let mut pause = Duration::from_millis(200);
        for tries_left in (0..WRITE_TRIES).rev() {
            let r = self
                .app
                .store
                .append_output(&self.key, self.attempt, &self.step, &lines, truncated)
                .await;
            match r {
                Ok(_) => return true,
                Err(e) if e.is_fenced() => {
                    warn!(error = %e, "lease lost; stopping the build");
                    self.fenced.cancel();
                    return false;
                }
                // Only when no connection could be had: the chunk was never sent. Any other
                // error may follow a commit whose answer was lost, and a second append
                // would store the lines twice.
                Err(e @ StoreError::Pool(_)) if tries_left > 0 => {
                    warn!(error = %e, "cannot record build output; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(e) => {
                    // Progress is best effort; the result is what counts.
                    warn!(error = %e, lines = lines.len(), "cannot record build output");
                    self.lost_lines += lines.len() as u64;
                }
            }
        }
        true
    }
}

/// Turns progress into events (steps as they start and finish) and output into chunks of
/// the output table. Cancels `fenced` if the build's lease was taken away.
pub(super) async fn record(
    app: App,
    build: BuildState,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    fenced: CancellationToken,
) {
    let key = build.key.clone();
    let attempt = build.attempt;
    let mut out = OutputSink {
        app: app.clone(),
        key: key.clone(),
        attempt,
        cap: app.config.worker.output_cap_bytes,
        kept: 0,
        dropped_lines: 0,
        dropped_bytes: 0,
        marked: false,
        lost_lines: 0,
        step: String::new(),
        pending: Vec::new(),
        fenced: fenced.clone(),
    };
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
                if !out.flush().await {
                    return;
                }
                continue;
            }
        };
        let Some(progress) = progress else { break };
        // Output before a step's start or end is written before it, so that it is placed
        // before the event.
        if !matches!(progress, Progress::Line { .. }) && !out.flush().await {
            return;
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
                out.line(step, line);
                if out.full() && !out.flush().await {
                    return;
                }
                continue;
            }
        };
        if !append(event).await {
            return;
        }
    }
    out.finish().await;
}
