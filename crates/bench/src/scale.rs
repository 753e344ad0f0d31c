//! `bench scale`: the database at a million builds. Loads `--builds` whole histories (about
//! ten state events each, plus two chunks of output in the output table, as the worker
//! writes them today) with the
//! projection rows their fold gives, `--queued` of them still queued and `--running`
//! running, then measures what must not grow with the log: a status read, one build's
//! history, a page of the global feed (all types, and filtered), the claim with the queue
//! full, a janitor scan, and reports `rebuild-projections` and the bytes per build. Writes
//! to the configured database: point it at a scratch one (scripts/bench-scale makes one).

use std::time::{Duration, Instant};

use anyhow::Context;
use cbs_domain::{BuildKey, BuildRequest, Platform, Plugin};
use cbs_events::{
    Artifact, ArtifactDeleted, Claimed, Event, EventType, Failed, FailureKind, Requested,
    RequeueReason, Requeued, StepFinished, StepStarted, Succeeded,
};
use chrono::{DateTime, Utc};
use rand::Rng;

use crate::print_out;
use cbs_roles::App;
use cbs_store::BenchChunk;

/// Options of `bench scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Builds loaded (skipped when the database already holds at least this many).
    #[arg(long, default_value_t = 1_000_000)]
    pub builds: u64,
    /// Of them, still queued (the claim's queue).
    #[arg(long, default_value_t = 10_000)]
    pub queued: u64,
    /// Of them, running (leases in the future).
    #[arg(long, default_value_t = 100)]
    pub running: u64,
    /// Samples per measurement.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Output lines per build (two chunks of the output table carry them).
    #[arg(long, default_value_t = 60)]
    pub output_lines: usize,
    /// Also time `rebuild-projections` over everything (minutes at a million builds).
    #[arg(long)]
    pub rebuild: bool,
}

/// Builds per load transaction.
const BATCH: u64 = 5_000;
const STEPS: [&str; 4] = [
    "initialize_module",
    "pin_versions",
    "tidy_module",
    "compile",
];

fn key(i: u64) -> BuildKey {
    BuildKey::digest(format!("bench scale build {i}").as_bytes())
}

fn request(i: u64) -> BuildRequest {
    let plugins = (0..(i % 3))
        .map(|p| Plugin {
            module: format!("github.com/bench-org{}/caddy-plugin-{}", (i + p) % 97, p)
                .parse()
                .expect("valid module"),
            version: format!("v1.{}.{}", i % 13, (i / 13) % 40)
                .parse()
                .expect("valid version"),
        })
        .collect();
    let platforms = [
        ("linux", "amd64"),
        ("linux", "arm64"),
        ("windows", "amd64"),
        ("darwin", "arm64"),
    ];
    let (os, arch) = platforms[(i % 4) as usize];
    BuildRequest::new(
        Platform::new(os, arch, None).expect("valid platform"),
        "v2.8.4".parse().expect("valid version"),
        plugins,
        vec![],
    )
    .expect("valid request")
}

/// What happened to build `i` of `n`: the newest are queued or running; of the rest, 2 %
/// failed, 1 % expired, the others succeeded.
fn history(
    i: u64,
    n: u64,
    args: &ScaleArgs,
    now: DateTime<Utc>,
) -> (Vec<(DateTime<Utc>, Event)>, Vec<BenchChunk>) {
    let mut chunks = Vec::new();
    let h = events(i, n, args, now, &mut chunks);
    (h, chunks)
}

fn events(
    i: u64,
    n: u64,
    args: &ScaleArgs,
    now: DateTime<Utc>,
    chunks: &mut Vec<BenchChunk>,
) -> Vec<(DateTime<Utc>, Event)> {
    // Spread over the past, a build per second or so, the newest last.
    let start = now - chrono::Duration::seconds((n - i) as i64);
    let at = |s: i64| start + chrono::Duration::milliseconds(s * 200);
    let mut h = vec![(
        at(0),
        Event::Requested(Requested {
            request: request(i),
            client: Some(format!("addr:{:016x}", i % 5000)),
            rank: 0,
        }),
    )];
    if i >= n - args.queued {
        return h;
    }
    let worker = format!("worker-{}", i % 7);
    let running = i >= n - args.queued - args.running;
    h.push((
        at(1),
        Event::Claimed(Claimed {
            worker: worker.clone(),
            attempt: 1,
            lease_expires_at: if running {
                now + chrono::Duration::hours(1)
            } else {
                at(31)
            },
        }),
    ));
    let fails = i % 100 < 2;
    let mut t = 2;
    for step in STEPS {
        h.push((
            t_at(&at, &mut t),
            Event::StepStarted(StepStarted {
                attempt: 1,
                step: step.into(),
            }),
        ));
        if step == "pin_versions" || step == "compile" {
            let lines = (0..args.output_lines / 2)
                .map(|l| format!("go: downloading github.com/bench-org{}/module-{l} v1.{}.0 (line {l} of {step})", l % 97, i % 13))
                .collect();
            chunks.push(BenchChunk {
                attempt: 1,
                after_seq: h.len() as u32,
                step: step.into(),
                lines,
                at: t_at(&at, &mut t),
            });
        }
        if running && step == "compile" {
            return h;
        }
        let failed_here = fails && step == "compile";
        h.push((
            t_at(&at, &mut t),
            Event::StepFinished(StepFinished {
                attempt: 1,
                step: step.into(),
                duration_ms: 1000 + i % 5000,
                exit_code: Some(if failed_here { 1 } else { 0 }),
            }),
        ));
        if failed_here {
            h.push((
                t_at(&at, &mut t),
                Event::Failed(Failed {
                    attempt: 1,
                    kind: FailureKind::Permanent,
                    step: Some("compile".into()),
                    message: "step compile failed: `go build` exited with status 1; its last output:\n./main.go:3: undefined: caddy.Nope".into(),
                }),
            ));
            return h;
        }
    }
    let k = key(i);
    h.push((
        t_at(&at, &mut t),
        Event::Succeeded(Succeeded {
            attempt: 1,
            artifact: Artifact {
                location: cbs_domain::artifact::ArtifactPath {
                    key: &k,
                    attempt: 1,
                }
                .location(),
                size: 48_000_000 + i % 1_000_000,
                sha256: hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
                    <sha2::Sha256 as sha2::Digest>::new(),
                    k.as_str(),
                ))),
                files: [
                    "caddy",
                    "caddy.minisig",
                    "caddy.sha256",
                    "provenance.json",
                    "provenance.json.minisig",
                ]
                .map(String::from)
                .to_vec(),
                modules_sha256: Some(hex::encode([(i % 256) as u8; 32])),
            },
        }),
    ));
    if i % 100 == 2 {
        h.push((
            t_at(&at, &mut t),
            Event::ArtifactDeleted(ArtifactDeleted {
                attempt: 1,
                reason: "not downloaded for 90 days".into(),
            }),
        ));
    }
    h
}

fn t_at(at: &impl Fn(i64) -> DateTime<Utc>, t: &mut i64) -> DateTime<Utc> {
    *t += 1;
    at(*t)
}

/// Runs the benchmark and prints a report.
pub async fn scale(app: App, args: ScaleArgs) -> anyhow::Result<()> {
    let store = &app.store;
    let mut out = format!(
        "# bench scale\n\n{} builds ({} queued, {} running), {} output lines each, {} samples per figure\n\n",
        args.builds, args.queued, args.running, args.output_lines, args.samples
    );
    anyhow::ensure!(
        args.queued + args.running < args.builds,
        "--queued plus --running must be fewer than --builds"
    );
    let existing = store.count_builds_for_bench().await?;
    if existing >= args.builds {
        out.push_str(&format!(
            "(reusing the {existing} builds already loaded)\n\n"
        ));
    } else {
        anyhow::ensure!(
            existing == 0,
            "the database holds {existing} builds, fewer than --builds: use an empty database"
        );
        let now = Utc::now();
        let started = Instant::now();
        let mut events = 0;
        let mut first = 0;
        while first < args.builds {
            let last = (first + BATCH).min(args.builds);
            let batch: Vec<_> = (first..last)
                .map(|i| {
                    let (h, c) = history(i, args.builds, &args, now);
                    (key(i), h, c)
                })
                .collect();
            events += store
                .load_histories_for_bench(&batch)
                .await
                .with_context(|| format!("loading builds {first}..{last}"))?;
            first = last;
            if first % 100_000 == 0 || first == args.builds {
                tracing::info!(builds = first, events, elapsed = ?started.elapsed(), "loaded");
            }
        }
        store.analyze_for_bench().await?;
        out.push_str(&format!(
            "loaded {events} events in {:.0} s ({:.1} per build), then VACUUM ANALYZE\n\n",
            started.elapsed().as_secs_f64(),
            events as f64 / args.builds as f64
        ));
    }
    let mut total = 0i64;
    for (table, bytes) in store.table_bytes_for_bench().await? {
        out.push_str(&format!(
            "{table}: {:.1} MiB, {:.0} bytes per build\n",
            bytes as f64 / 1048576.0,
            bytes as f64 / args.builds as f64
        ));
        total += bytes;
    }
    out.push_str(&format!(
        "database bytes per build (log, output, projection, indexes): {:.0}\n\n",
        total as f64 / args.builds as f64
    ));

    let mut rng = rand::rng();
    let mut pick = || key(rng.random_range(0..args.builds));
    let mut status = Vec::new();
    let mut history = Vec::new();
    let mut feed = Vec::new();
    let mut feed_typed = Vec::new();
    let mut replay = Vec::new();
    for _ in 0..args.samples {
        let k = pick();
        let t = Instant::now();
        store.build(&k).await?.context("a loaded build")?;
        status.push(t.elapsed());
        let t = Instant::now();
        let events = store.events(&k, 0, 1000).await?;
        history.push(t.elapsed());
        // What a progress stream's replay reads: the events and the output among them.
        let t = Instant::now();
        store.timeline(&k, 0, (0, 0), (0, 0), 500).await?;
        replay.push(t.elapsed());
        // A page of the global feed from where this build's first event is.
        let cursor = events.first().context("a history")?.cursor();
        let t = Instant::now();
        store.feed(cursor, 100, &[]).await?;
        feed.push(t.elapsed());
        let t = Instant::now();
        store.feed(cursor, 100, &[EventType::Succeeded]).await?;
        feed_typed.push(t.elapsed());
    }
    out.push_str(&format!(
        "status read (GET /api/build/{{key}}):  {}\n",
        summary(status)
    ));
    out.push_str(&format!(
        "history of one build:                {}\n",
        summary(history)
    ));
    out.push_str(&format!(
        "events and output of one build:      {}\n",
        summary(replay)
    ));
    out.push_str(&format!(
        "feed page of 100, all types:         {}\n",
        summary(feed)
    ));
    out.push_str(&format!(
        "feed page of 100, type=succeeded:    {}\n",
        summary(feed_typed)
    ));

    // The claim with the queue full: claim, then hand the build back (preempted, at its
    // old place), so the queue stays as long.
    let n = args.samples.min(args.queued as usize);
    out.push_str(&format!(
        "claim with {} queued:               {}\n",
        args.queued,
        summary(claims(store, n).await?)
    ));
    // The same claims on connections whose commits do not wait for the WAL flush: what is
    // left is the statement (the index walk, the lock, the fold); the difference is the
    // durable commit.
    let mut db = app.config.database.clone();
    let url = db.url.expose();
    let sep = if url.contains('?') { '&' } else { '?' };
    db.url =
        cbs_config::DatabaseUrl::new(format!("{url}{sep}options=-c%20synchronous_commit%3Doff"));
    let async_store = cbs_store::Store::new(&db)?;
    out.push_str(&format!(
        "claim, commit without WAL flush wait: {}\n",
        summary(claims(&async_store, n).await?)
    ));
    let mut scans = Vec::new();
    for _ in 0..args.samples.min(200) {
        let t = Instant::now();
        cbs_roles::janitor::scan(&app).await?;
        scans.push(t.elapsed());
    }
    out.push_str(&format!(
        "janitor scan:                        {}\n",
        summary(scans)
    ));
    // Output retention's scan (every retention check): finished builds whose output is
    // still kept and older than the cutoff (none here are old enough: the index walk
    // alone), and the same with every build old enough (a page of 200).
    let mut retention = Vec::new();
    let mut retention_due = Vec::new();
    let month = Utc::now() - chrono::Duration::days(30);
    let all = Utc::now() + chrono::Duration::days(1);
    // One scan is what the janitor does per class: a page per status of the class.
    let class_scan = |cutoff| async move {
        let mut due = 0;
        for status in ["succeeded", "expired"] {
            due += store.output_to_prune(status, cutoff, 200).await?.len();
        }
        anyhow::Ok(due)
    };
    for _ in 0..args.samples.min(200) {
        let t = Instant::now();
        class_scan(month).await?;
        retention.push(t.elapsed());
        let t = Instant::now();
        let due = class_scan(all).await?;
        retention_due.push(t.elapsed());
        anyhow::ensure!(due >= 200, "finished builds with output are due");
    }
    out.push_str(&format!(
        "output retention scan, none due:     {}\n",
        summary(retention)
    ));
    out.push_str(&format!(
        "output retention scan, all due:      {}\n",
        summary(retention_due)
    ));
    if args.rebuild {
        let t = Instant::now();
        let report = store.rebuild_projections(false).await?;
        out.push_str(&format!(
            "rebuild-projections: {} builds, {} events in {:.1} s, {} differences\n",
            report.builds,
            report.events,
            t.elapsed().as_secs_f64(),
            report.differences.len()
        ));
        anyhow::ensure!(
            report.differences.is_empty(),
            "the loaded projection differs from the fold of the log: {:?}",
            report.differences.first()
        );
    }
    print_out(&out);
    Ok(())
}

/// Times `n` claims with the queue full; each claimed build is handed back (preempted, at
/// its old place), so the queue stays as long.
async fn claims(store: &cbs_store::Store, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let b = store
            .claim("bench-claimer", Duration::from_secs(3600))
            .await?
            .context("a queued build")?;
        times.push(t.elapsed());
        store
            .append(
                &b,
                Event::Requeued(Requeued {
                    attempt: b.attempt,
                    reason: RequeueReason::Preempted,
                    not_before: b.available_at,
                }),
            )
            .await?;
    }
    Ok(times)
}

fn summary(v: Vec<Duration>) -> String {
    crate::queue::summary(v)
}
