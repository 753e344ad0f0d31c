//! The process's metrics, served as `GET /metrics` in the Prometheus (OpenMetrics) text
//! format by every role: the api on its own port, the worker and janitor on `metrics.listen`,
//! `all` once.
//!
//! One registry per process ([`metrics`]), recorded into by every crate that sees the event
//! (the store's listening connection, the storage backends, the executor, the roles). Labels
//! are bounded by the code, never by the input: step names, platforms the server accepts,
//! failure kinds, route templates (not paths), status codes. No build keys and no module
//! paths: those belong to the event log and the logs.
//!
//! Names follow Prometheus' conventions: `cbs_` prefix, `_total` on counters (added by the
//! encoder), base units (`_seconds`).

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram family whose histograms share one set of buckets.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `matched`, `mismatched` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `build` (what the build itself put), `local`, `shared` or `none` (a miss).
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `down` (from the shared tier) or `up` (published to it).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// A failure kind (`compile`, `resolve`, `infrastructure`, ...).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub os: &'static str,
    pub arch: &'static str,
    /// `succeeded` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: &'static str,
    pub os: &'static str,
    pub arch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabel {
    /// `long_poll`, `sse` or `download`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    /// `fs` or `s3`.
    pub backend: &'static str,
    /// `put`, `get`, `head`, `delete`, `list`, `presign`.
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route's template (`/api/build/{key}`), or `unmatched`.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// `submissions` (per-client build rate), `queue` (per-client queued builds),
    /// `waits_client`, `waits_server`, `connections`.
    pub limit: &'static str,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    // Builds, by what happened to them (each counted by the process that wrote the event).
    pub builds_requested: Counter,
    pub builds_joined: Counter,
    pub builds_claimed: Counter,
    pub builds_succeeded: Counter,
    pub builds_failed: Family<KindLabel, Counter>,
    pub builds_retried: Counter,
    pub builds_given_up: Counter,
    pub builds_cancelled: Counter,
    pub builds_rescued: Counter,
    pub builds_preempted: Counter,
    pub builds_released: Counter,
    pub builds_fenced: Counter,
    /// Reproducibility checks ended, by outcome.
    pub reproductions: Family<OutcomeLabel, Counter>,
    // The build cache (GOCACHEPROG): lookups by the tier that answered, bytes moved.
    pub build_cache_gets: Family<CacheLabels, Counter>,
    pub build_cache_bytes: Family<DirectionLabel, Counter>,
    pub build_cache_rejected: Counter,
    // The queue, read from the projection at scrape time (see [`Metrics::set_queue`]).
    pub queue_builds: Family<StatusLabel, Gauge>,
    pub queue_oldest_seconds: Gauge<f64, AtomicU64>,
    pub queue_read_errors: Counter,
    // Durations.
    pub build_duration: Histograms<BuildLabels>,
    pub step_duration: Histograms<StepLabels>,
    pub dispatch_latency: Histogram,
    // Waiting requests.
    pub waiters: Family<WaitLabel, Gauge>,
    // The listening connection.
    pub notifications_received: Counter,
    pub listen_reconnects: Counter,
    pub backstop_reads: Counter,
    pub lost_notifications: Counter,
    // Artifact storage.
    pub storage_duration: Histograms<StorageLabels>,
    pub storage_errors: Family<StorageLabels, Counter>,
    // HTTP.
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Histograms<RouteLabels>,
    // Build containers.
    pub containers_started: Counter,
    pub container_failures: Family<ReasonLabel, Counter>,
    // Abuse resistance.
    pub rate_limited: Family<LimitLabel, Counter>,
}

fn histogram(start: f64, factor: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("cbs"),
            builds_requested: Counter::default(),
            builds_joined: Counter::default(),
            builds_claimed: Counter::default(),
            builds_succeeded: Counter::default(),
            builds_failed: Family::default(),
            builds_retried: Counter::default(),
            builds_given_up: Counter::default(),
            builds_cancelled: Counter::default(),
            builds_rescued: Counter::default(),
            builds_preempted: Counter::default(),
            builds_released: Counter::default(),
            builds_fenced: Counter::default(),
            reproductions: Family::default(),
            build_cache_gets: Family::default(),
            build_cache_bytes: Family::default(),
            build_cache_rejected: Counter::default(),
            queue_builds: Family::default(),
            queue_oldest_seconds: Gauge::default(),
            queue_read_errors: Counter::default(),
            // 1 s to about 2.3 hours.
            build_duration: Family::new_with_constructor(|| histogram(1.0, 2.0, 14)),
            // 50 ms to about 27 minutes.
            step_duration: Family::new_with_constructor(|| histogram(0.05, 2.0, 16)),
            // 5 ms to about 11 minutes.
            dispatch_latency: histogram(0.005, 2.0, 18),
            waiters: Family::default(),
            notifications_received: Counter::default(),
            listen_reconnects: Counter::default(),
            backstop_reads: Counter::default(),
            lost_notifications: Counter::default(),
            // 1 ms to about 33 s.
            storage_duration: Family::new_with_constructor(|| histogram(0.001, 2.0, 16)),
            storage_errors: Family::default(),
            http_requests: Family::default(),
            // 1 ms to about 65 s (long-polls and downloads wait that long).
            http_duration: Family::new_with_constructor(|| histogram(0.001, 2.0, 17)),
            containers_started: Counter::default(),
            container_failures: Family::default(),
            rate_limited: Family::default(),
        };
        // Series whose label values are known up front exist from the start (at zero), so
        // that `rate()` and alerts see them before the first event.
        for kind in ["retryable", "permanent"] {
            let _ = m.builds_failed.get_or_create(&KindLabel { kind });
        }
        for kind in ["long_poll", "sse", "download"] {
            let _ = m.waiters.get_or_create(&WaitLabel { kind });
        }
        for limit in [
            "submissions",
            "queue",
            "waits_client",
            "waits_server",
            "connections",
        ] {
            let _ = m.rate_limited.get_or_create(&LimitLabel { limit });
        }
        for reason in ["create", "engine", "timeout", "killed"] {
            let _ = m.container_failures.get_or_create(&ReasonLabel { reason });
        }
        m.set_queue(0, 0, None);
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "builds_requested",
            "Builds queued by a request that created them (not joins of existing builds)",
            self.builds_requested.clone(),
        );
        r.register(
            "builds_joined",
            "Build requests answered with a build that already existed (the build key deduplicated them)",
            self.builds_joined.clone(),
        );
        r.register(
            "builds_claimed",
            "Attempts claimed by a worker of this process",
            self.builds_claimed.clone(),
        );
        r.register(
            "builds_succeeded",
            "Attempts that published a verified, signed artifact",
            self.builds_succeeded.clone(),
        );
        r.register(
            "builds_failed",
            "Attempts that failed, by failure kind",
            self.builds_failed.clone(),
        );
        r.register(
            "builds_retried",
            "Failed builds requeued by the janitor after their backoff",
            self.builds_retried.clone(),
        );
        r.register(
            "builds_given_up",
            "Builds the janitor gave up on (attempts exhausted or failure not retryable)",
            self.builds_given_up.clone(),
        );
        r.register(
            "builds_cancelled",
            "Builds cancelled by an admin request",
            self.builds_cancelled.clone(),
        );
        r.register(
            "builds_rescued",
            "Builds requeued by the janitor because their worker's lease expired",
            self.builds_rescued.clone(),
        );
        r.register(
            "builds_preempted",
            "Builds released by a worker that received a preemption notice",
            self.builds_preempted.clone(),
        );
        r.register(
            "builds_released",
            "Builds a stopping worker handed back to the queue (shutdown or preemption)",
            self.builds_released.clone(),
        );
        r.register(
            "builds_fenced",
            "Writes of a worker refused because its attempt was no longer current (lost lease)",
            self.builds_fenced.clone(),
        );
        r.register(
            "reproductions",
            "Reproducibility checks (a second worker built a succeeded build again) by outcome: matched, mismatched (other bytes: the builders differ) or failed",
            self.reproductions.clone(),
        );
        r.register(
            "build_cache_gets",
            "Build cache lookups of compile steps by the tier that answered: build (the build's own entry), local, shared, none (a miss)",
            self.build_cache_gets.clone(),
        );
        r.register_with_unit(
            "build_cache_transferred",
            "Bytes of build cache objects moved between a worker and the shared tier (down: fetched, up: published)",
            Unit::Bytes,
            self.build_cache_bytes.clone(),
        );
        r.register(
            "build_cache_rejected",
            "Build cache entries refused: a put whose contents do not hash to its output ID, or a shared object that does not",
            self.build_cache_rejected.clone(),
        );
        r.register(
            "queue_builds",
            "Builds waiting (queued) and building (running), read from the projection at scrape time",
            self.queue_builds.clone(),
        );
        r.register_with_unit(
            "queue_oldest_wait",
            "How long the longest-waiting claimable build has waited since it became available",
            Unit::Seconds,
            self.queue_oldest_seconds.clone(),
        );
        r.register(
            "queue_read_errors",
            "Scrapes that could not read the queue from the database",
            self.queue_read_errors.clone(),
        );
        r.register_with_unit(
            "build_duration",
            "Attempt duration from claim to its end, by platform and outcome",
            Unit::Seconds,
            self.build_duration.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Build step duration, by step and platform",
            Unit::Seconds,
            self.step_duration.clone(),
        );
        r.register_with_unit(
            "dispatch_latency",
            "Time from a build becoming available (requested, requeued) to its claim",
            Unit::Seconds,
            self.dispatch_latency.clone(),
        );
        r.register(
            "waiters",
            "Open waiting requests: long-polls, event streams, compat download waits",
            self.waiters.clone(),
        );
        r.register(
            "notifications_received",
            "Notifications received on the listening connection",
            self.notifications_received.clone(),
        );
        r.register(
            "listen_reconnects",
            "Times the listening connection was established again after it was lost",
            self.listen_reconnects.clone(),
        );
        r.register(
            "backstop_reads",
            "Backstop reads of the event log's tail",
            self.backstop_reads.clone(),
        );
        r.register(
            "lost_notifications",
            "Events that only the backstop read found: their notification never arrived",
            self.lost_notifications.clone(),
        );
        r.register_with_unit(
            "storage_operation_duration",
            "Artifact storage operation latency, by backend and operation",
            Unit::Seconds,
            self.storage_duration.clone(),
        );
        r.register(
            "storage_errors",
            "Artifact storage operations that failed, by backend and operation",
            self.storage_errors.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Time to an HTTP answer's headers, by route template and method",
            Unit::Seconds,
            self.http_duration.clone(),
        );
        r.register(
            "containers_started",
            "Build step containers started",
            self.containers_started.clone(),
        );
        r.register(
            "container_failures",
            "Build step containers that could not run or ended abnormally, by reason",
            self.container_failures.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a limit, by limit",
            self.rate_limited.clone(),
        );
        self
    }

    /// Sets the queue gauges from a reading of the projection.
    pub fn set_queue(&self, queued: i64, running: i64, oldest_wait: Option<Duration>) {
        self.queue_builds
            .get_or_create(&StatusLabel { status: "queued" })
            .set(queued);
        self.queue_builds
            .get_or_create(&StatusLabel { status: "running" })
            .set(running);
        self.queue_oldest_seconds
            .set(oldest_wait.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Counts one failed attempt of `kind`.
    pub fn failed(&self, kind: &'static str) {
        self.builds_failed.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts a refusal by `limit`.
    pub fn refused(&self, limit: &'static str) {
        self.rate_limited.get_or_create(&LimitLabel { limit }).inc();
    }

    /// Records one storage operation's outcome and latency.
    pub fn storage_op(&self, backend: &'static str, op: &'static str, took: Duration, ok: bool) {
        let labels = StorageLabels { backend, op };
        self.storage_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if !ok {
            self.storage_errors.get_or_create(&labels).inc();
        }
    }

    /// Opens a waiting request of `kind`; the gauge goes down when the guard drops.
    pub fn wait(&'static self, kind: &'static str) -> WaitGauge {
        self.waiters.get_or_create(&WaitLabel { kind }).inc();
        WaitGauge {
            metrics: self,
            kind,
        }
    }

    /// The registry in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An open waiting request (see [`Metrics::wait`]).
#[derive(Debug)]
pub struct WaitGauge {
    metrics: &'static Metrics,
    kind: &'static str,
}

impl Drop for WaitGauge {
    fn drop(&mut self) {
        self.metrics
            .waiters
            .get_or_create(&WaitLabel { kind: self.kind })
            .dec();
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_labels() {
        let m = Metrics::new();
        m.builds_requested.inc();
        m.failed("compile");
        m.step_duration
            .get_or_create(&StepLabels {
                step: "compile",
                os: "linux",
                arch: "amd64",
            })
            .observe(2.5);
        m.set_queue(3, 1, Some(Duration::from_secs(7)));
        let text = m.encode();
        assert!(text.contains("cbs_builds_requested_total 1"), "{text}");
        assert!(
            text.contains(r#"cbs_builds_failed_total{kind="compile"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"cbs_step_duration_seconds_count{step="compile",os="linux",arch="amd64"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cbs_queue_builds{status="queued"} 3"#),
            "{text}"
        );
        assert!(text.contains("cbs_queue_oldest_wait_seconds 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_wait_gauge_goes_down_when_dropped() {
        let m = metrics();
        let gauge = || m.waiters.get_or_create(&WaitLabel { kind: "sse" }).get();
        let before = gauge();
        let g = m.wait("sse");
        assert_eq!(gauge(), before + 1);
        drop(g);
        assert_eq!(gauge(), before);
    }
}
