//! How `client build` shows a build going by: progress bars on a terminal (one for the steps,
//! a line following the log, one for the download's bytes), plain lines on stderr when it
//! is not a terminal, nothing with `--quiet`.

// Plain lines are this module's output.
#![allow(clippy::print_stderr)]

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The steps every build goes through (the worker's plan), for the steps bar.
const STEPS: [&str; 4] = [
    "initialize_module",
    "pin_versions",
    "tidy_module",
    "compile",
];

fn label(step: &str) -> &str {
    match step {
        "initialize_module" => "Initializing Go module",
        "pin_versions" => "Downloading dependencies",
        "tidy_module" => "Resolving modules",
        "compile" => "Compiling",
        other => other,
    }
}

pub enum Progress {
    Quiet,
    Lines,
    Bars {
        multi: MultiProgress,
        steps: ProgressBar,
        log: ProgressBar,
    },
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let steps = multi.add(ProgressBar::new(STEPS.len() as u64));
        steps.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        steps.enable_steady_tick(std::time::Duration::from_millis(120));
        let log = multi.add(ProgressBar::new_spinner());
        log.set_style(
            ProgressStyle::with_template("  {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Progress::Bars { multi, steps, log }
    }

    pub fn state(&self, what: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => eprintln!("[{what}]"),
            Progress::Bars { steps, .. } => steps.set_message(what.to_owned()),
        }
    }

    pub fn step(&self, step: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => eprintln!("==> {step}"),
            Progress::Bars { steps, .. } => {
                let done = STEPS.iter().position(|s| *s == step).unwrap_or(0);
                steps.set_position(done as u64);
                steps.set_message(label(step).to_owned());
            }
        }
    }

    pub fn log(&self, line: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => eprintln!("    {line}"),
            Progress::Bars { log, .. } => log.set_message(line.to_owned()),
        }
    }

    pub fn note(&self, line: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => eprintln!("{line}"),
            Progress::Bars { multi, .. } => {
                let _ = multi.println(line);
            }
        }
    }

    /// The build ended; the download's bar (bytes of `size`), if bars are shown.
    pub fn download(&self, size: u64) -> Option<ProgressBar> {
        match self {
            Progress::Bars { multi, steps, log } => {
                steps.set_position(STEPS.len() as u64);
                steps.finish_with_message("built");
                log.finish_and_clear();
                let bar = multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "  [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                Some(bar)
            }
            _ => None,
        }
    }

    pub fn finish(&self) {
        if let Progress::Bars { steps, log, .. } = self {
            steps.finish_and_clear();
            log.finish_and_clear();
        }
    }
}
