//! Whose fault a failed build step is: the request's (retrying cannot help) or the world's
//! (the proxy timed out, Docker failed, the disk is full: try again later).

use crate::plan::Phase;

/// Who a failure is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Unknown module or version, a compile error: the same request fails again.
    Request,
    /// Network, proxy, engine, resources: a retry may succeed.
    Infrastructure,
}

/// Output that means the world failed, not the request (checked first, lower case).
const INFRASTRUCTURE: &[&str] = &[
    "connection refused",
    "connection reset",
    "i/o timeout",
    "timeout awaiting",
    "context deadline exceeded",
    "tls handshake",
    "no such host",
    "temporary failure in name resolution",
    "network is unreachable",
    "500 internal server error",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway",
    "429 too many requests",
    "no space left on device",
    "cannot allocate memory",
    "resource temporarily unavailable",
    "signal: killed",
    "timed out after",
];

/// Classifies a failed command from its phase, exit and last lines of output.
pub fn classify(phase: Phase, exit_code: Option<i64>, timed_out: bool, tail: &[String]) -> Blame {
    if timed_out || exit_code.is_none() {
        return Blame::Infrastructure;
    }
    // Killed by a signal (137: SIGKILL, often the memory limit; 143: SIGTERM).
    if matches!(exit_code, Some(137 | 143)) {
        return Blame::Infrastructure;
    }
    let text = tail.join("\n").to_lowercase();
    if INFRASTRUCTURE.iter().any(|p| text.contains(p)) {
        return Blame::Infrastructure;
    }
    match phase {
        // What is left: a 404/410 from the proxy, an unknown revision, a module that
        // declares another path, a compile error. All the request's.
        Phase::Resolve | Phase::Compile => Blame::Request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_blamed_on_the_request_or_the_world() {
        use Blame::*;
        use Phase::*;
        let cases: &[(Phase, Option<i64>, bool, &str, Blame)] = &[
            (Compile, Some(1), false, "./main.go:3: undefined: undefinedFunction", Request),
            (Resolve, Some(1), false, "go: example.com/x@v9.9.9: reading http://p/example.com/x/@v/v9.9.9.info: 404 Not Found", Request),
            (Resolve, Some(1), false, "go: example.com/x@v1.0.0: invalid version: unknown revision v1.0.0", Request),
            (Resolve, Some(1), false, "go: module example.com/x@latest found (v1.0.0), but does not contain package example.com/x", Request),
            (Resolve, Some(1), false, "dial tcp 127.0.0.1:9: connect: connection refused", Infrastructure),
            (Resolve, Some(1), false, "read tcp 10.0.0.1:5->1.2.3.4:443: i/o timeout", Infrastructure),
            (Resolve, Some(1), false, "reading https://proxy.golang.org/x/@v/list: 503 Service Unavailable", Infrastructure),
            (Compile, Some(1), false, "write /cache/build/x: no space left on device", Infrastructure),
            (Compile, Some(137), false, "", Infrastructure),
            (Compile, None, true, "", Infrastructure),
            (Resolve, None, false, "", Infrastructure),
        ];
        for (phase, code, timed_out, out, want) in cases {
            let tail = vec!["go get x".to_owned(), (*out).to_owned()];
            assert_eq!(classify(*phase, *code, *timed_out, &tail), *want, "{out}");
        }
    }
}
