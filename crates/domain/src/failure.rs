//! Whose fault a failed build step is: the request's (retrying cannot help) or the world's
//! (the proxy was down, the engine failed, a command was killed: try again later).
//!
//! Decided only from what the worker observed itself: the step's phase, how the command
//! ended (its exit status, a timeout, a kill), and, for a failed resolve step, whether the
//! module proxy answered the worker's own requests. Never from the text a build prints: a
//! plugin controls that text (a compile error can quote any string), and a build that could
//! make its failure look retryable would be retried on the house.

use crate::plan::Phase;

/// Who a failure is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Unknown module or version, a compile error: the same request fails again.
    Request,
    /// Network, proxy, engine, resources: a retry may succeed.
    Infrastructure,
}

/// What the worker learnt by asking the module proxy itself after a resolve step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCheck {
    /// Not asked (not a resolve step, or the step did not exit on its own).
    NotAsked,
    /// The proxy answered every request (found or not found).
    Answered,
    /// The proxy could not be reached, timed out or answered with a server error.
    Unavailable,
}

/// What the worker itself saw of a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub phase: Phase,
    /// The go command's exit status; `None` when it did not exit on its own (killed by a
    /// signal, the container ended early).
    pub exit_code: Option<i64>,
    /// The worker stopped it at its time limit.
    pub timed_out: bool,
    pub proxy: ProxyCheck,
}

/// Exit statuses of the command runner itself (it could not start or wait for go): the
/// sandbox failed, not the request.
const RUNNER_FAILURES: std::ops::RangeInclusive<i64> = 125..=127;

/// Classifies a failed step from what the worker observed.
pub fn classify(o: &Observed) -> Blame {
    if o.timed_out || o.exit_code.is_none() {
        return Blame::Infrastructure;
    }
    let code = o.exit_code.unwrap_or_default();
    // Killed by a signal (137: SIGKILL, often the memory limit; 143: SIGTERM), or the
    // runner could not run go at all.
    if matches!(code, 137 | 143) || RUNNER_FAILURES.contains(&code) {
        return Blame::Infrastructure;
    }
    match (o.phase, o.proxy) {
        (Phase::Resolve, ProxyCheck::Unavailable) => Blame::Infrastructure,
        // The proxy answers (or it is a compile step): an unknown module or version, a
        // module that declares another path, a compile error. All the request's.
        (Phase::Resolve, _) | (Phase::Compile, _) => Blame::Request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_blamed_on_what_the_worker_saw() {
        use Blame::*;
        use Phase::*;
        use ProxyCheck::*;
        let cases: &[(Phase, Option<i64>, bool, ProxyCheck, Blame)] = &[
            (Compile, Some(1), false, NotAsked, Request),
            (Resolve, Some(1), false, Answered, Request),
            (Resolve, Some(1), false, Unavailable, Infrastructure),
            (Resolve, Some(1), false, NotAsked, Request),
            (Compile, Some(2), false, NotAsked, Request),
            (Compile, Some(137), false, NotAsked, Infrastructure),
            (Compile, Some(143), false, NotAsked, Infrastructure),
            (Compile, Some(127), false, NotAsked, Infrastructure),
            (Compile, None, true, NotAsked, Infrastructure),
            (Resolve, None, false, NotAsked, Infrastructure),
        ];
        for &(phase, exit_code, timed_out, proxy, want) in cases {
            let o = Observed {
                phase,
                exit_code,
                timed_out,
                proxy,
            };
            assert_eq!(classify(&o), want, "{o:?}");
        }
    }
}
