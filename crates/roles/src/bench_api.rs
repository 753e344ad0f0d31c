//! `bench api`: wake latency of long-polls (1, 100, 10,000 waiting clients) with the API
//! process's memory and database connections, and download throughput of a cached artifact
//! side by side with another server (Caddy's file server). Run by `scripts/bench-api`, which
//! starts the API as its own process (so each side has its own file descriptors).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cbs_events::{Artifact, Event, StepStarted, Succeeded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::janitor::print_out;
use crate::App;

/// Options of `bench api`.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The API's address (host:port).
    #[arg(long)]
    pub api: String,
    /// The API process, for its memory.
    #[arg(long)]
    pub api_pid: Option<u32>,
    /// The application name the API process's database connections report.
    #[arg(long, default_value = "cbs-bench-api")]
    pub api_app_name: String,
    /// Waiting clients of each wake-latency run.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    pub waiters: Vec<usize>,
    /// A file to publish as the artifact for the download runs.
    #[arg(long)]
    pub artifact: Option<std::path::PathBuf>,
    /// Another server's URL path to the same file (e.g. Caddy's file server), for comparison.
    #[arg(long)]
    pub compare: Option<String>,
    /// Concurrent clients of each download run.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub download_clients: Vec<usize>,
    /// Length of each download run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub download_time: Duration,
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A new build, requested and claimed (nothing runs it): the subject of a benchmark.
async fn running_build(app: &App) -> anyhow::Result<cbs_projections::BuildState> {
    let key = cbs_domain::BuildKey::digest(&rand::random::<[u8; 32]>());
    let request = cbs_domain::BuildRequest::new(
        cbs_domain::Platform::new("linux", "amd64", None)?,
        "v2.8.4".parse()?,
        vec![],
        vec![],
    )?;
    app.store.request_build(&key, &request).await?;
    app.store
        .claim_key_for_bench(&key)
        .await?
        .context("claim the bench build")
}

/// Sends a GET and returns when the response's first bytes arrive, then drains it.
async fn get_first_byte(addr: &str, path: &str) -> anyhow::Result<(Instant, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await?;
    let first = Instant::now();
    let mut total = n;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok((first, total))
}

/// Opens `n` long-polls on a build, waits until they are parked, commits one event and
/// measures when each answer starts.
async fn wake(app: &App, args: &ApiArgs, n: usize) -> anyhow::Result<()> {
    let build = running_build(app).await?;
    let key = build.key.clone();
    let path = format!("/api/build/{key}?wait=120s&after={}", build.last_seq);
    let connect = Arc::new(Semaphore::new(512));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_sent = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (addr, path, connect) = (args.api.clone(), path.clone(), connect.clone());
        let (sent, all_sent) = (sent.clone(), all_sent.clone());
        tasks.push(tokio::spawn(async move {
            let permit = connect.acquire_owned().await;
            let mut s = TcpStream::connect(&addr).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            drop(permit);
            if sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
                all_sent.notify_one();
            }
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await?;
            let at = Instant::now();
            anyhow::ensure!(n > 0 && buf.starts_with(b"HTTP/1.1 200"), "bad answer");
            anyhow::Ok(at)
        }));
    }
    // Every connection is up and its request sent; give the server a moment to read and
    // park them all (they can only answer after the commit).
    tokio::time::timeout(Duration::from_secs(120), all_sent.notified())
        .await
        .context("not every long-poll could connect within 120 s")?;
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_micros(n as u64 * 100)).await;
    let rss = args.api_pid.and_then(rss_mb);
    let conns = app.store.count_connections(&args.api_app_name).await?;
    let t0 = Instant::now();
    app.store
        .append(
            &build,
            Event::StepStarted(StepStarted {
                attempt: build.attempt,
                step: "bench".into(),
            }),
        )
        .await?;
    let committed = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        let at = t.await??;
        lat.push(at.saturating_duration_since(committed));
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    print_out(&format!(
        "  {n:>6} waiting: commit {:.2} ms, wake p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; api RSS {}; database connections of the api {}\n",
        ms(committed - t0),
        ms(p(0.5)),
        ms(p(0.99)),
        ms(*lat.last().expect("n > 0")),
        rss.map_or("?".into(), |r| format!("{r:.0} MB")),
        conns,
    ));
    Ok(())
}

/// Downloads `path` from `addr` with `clients` clients for `time`; returns bytes/s.
async fn throughput(addr: &str, path: &str, clients: usize, time: Duration) -> anyhow::Result<f64> {
    let deadline = Instant::now() + time;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, path) = (addr.to_owned(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0usize;
            while Instant::now() < deadline {
                bytes += get_first_byte(&addr, &path).await?.1;
            }
            anyhow::Ok(bytes)
        }));
    }
    let mut total = 0usize;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark.
pub async fn api(app: App, args: ApiArgs) -> anyhow::Result<()> {
    print_out("# bench api\n\nwake latency from commit to long-poll answer:\n");
    for &n in &args.waiters {
        wake(&app, &args, n).await?;
    }
    let Some(file) = &args.artifact else {
        return Ok(());
    };
    // Publish the file as a finished build's artifact.
    let bytes = tokio::fs::read(file).await?;
    let b = running_build(&app).await?;
    let key = b.key.clone();
    let location = format!("builds/{}/{key}/{}", key.shard(), b.attempt);
    let dir = app.config.storage.dir.join(&location);
    tokio::fs::create_dir_all(&dir).await?;
    tokio::fs::write(dir.join("caddy"), &bytes).await?;
    use sha2::Digest;
    app.store
        .append(
            &b,
            Event::Succeeded(Succeeded {
                attempt: b.attempt,
                artifact: Artifact {
                    location,
                    size: bytes.len() as u64,
                    sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                },
            }),
        )
        .await?;
    let mb = bytes.len() as f64 / 1e6;
    print_out(&format!(
        "\ndownload throughput of a cached {mb:.0} MB artifact:\n"
    ));
    for &c in &args.download_clients {
        let ours = throughput(
            &args.api,
            &format!("/api/build/{key}/download"),
            c,
            args.download_time,
        )
        .await?;
        let mut line = format!(
            "  {c:>3} clients: caddy-build-server {:.2} GB/s",
            ours / 1e9
        );
        if let Some(other) = &args.compare {
            let (addr, path) = other
                .strip_prefix("http://")
                .and_then(|r| r.split_once('/'))
                .context("--compare must look like http://host:port/path")?;
            let theirs = throughput(addr, &format!("/{path}"), c, args.download_time).await?;
            line.push_str(&format!(", comparison server {:.2} GB/s", theirs / 1e9));
        }
        line.push('\n');
        print_out(&line);
    }
    Ok(())
}
