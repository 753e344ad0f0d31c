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

use crate::print_out;
use cbs_roles::App;

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

/// `n` clients, each with one request sent on its own keep-alive connection, waiting for
/// the answer's first bytes.
struct Waiters {
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<(Instant, TcpStream)>>>,
}

impl Waiters {
    /// Connects `n` clients (at most 512 connecting at once) and sends each request; returns
    /// when every request is sent.
    async fn open(addr: &str, path: &str, n: usize) -> anyhow::Result<Waiters> {
        let connect = Arc::new(Semaphore::new(512));
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let all_sent = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (addr, path, connect) = (addr.to_owned(), path.to_owned(), connect.clone());
            let (sent, all_sent) = (sent.clone(), all_sent.clone());
            tasks.push(tokio::spawn(async move {
                let permit = connect.acquire_owned().await;
                let mut s = TcpStream::connect(&addr).await?;
                // Keep-alive, as long-polling clients are: the answer is measured, not the
                // closing of the connection.
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
                    .await?;
                drop(permit);
                if sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
                    all_sent.notify_one();
                }
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await?;
                let at = Instant::now();
                anyhow::ensure!(n > 0 && buf.starts_with(b"HTTP/1.1 200"), "bad answer");
                anyhow::Ok((at, s))
            }));
        }
        tokio::time::timeout(Duration::from_secs(120), all_sent.notified())
            .await
            .context("not every client could connect within 120 s")?;
        Ok(Waiters { tasks })
    }

    /// Every answer's delay after `from`, sorted. Connections close after the last answer.
    async fn latencies(self, from: Instant) -> anyhow::Result<Vec<Duration>> {
        let mut lat = Vec::with_capacity(self.tasks.len());
        let mut open = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            let (at, s) = t.await??;
            lat.push(at.saturating_duration_since(from));
            open.push(s);
        }
        drop(open);
        lat.sort();
        Ok(lat)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "p50 .. ms, p99 .. ms, max .. ms" of sorted latencies.
fn percentiles(lat: &[Duration]) -> String {
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p(0.5)),
        ms(p(0.99)),
        ms(*lat.last().expect("at least one latency"))
    )
}

/// Opens `n` long-polls on a build, waits until they are parked, commits one event and
/// measures when each answer starts.
async fn wake(app: &App, args: &ApiArgs, n: usize) -> anyhow::Result<usize> {
    let build = running_build(app).await?;
    let key = build.key.clone();
    let path = format!("/api/build/{key}?wait=120s&after={}", build.last_seq);
    let waiters = Waiters::open(&args.api, &path, n).await?;
    // Every request is sent; give the server a moment to read and park them all (they can
    // only answer after the commit).
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
    let lat = waiters.latencies(committed).await?;
    print_out(&format!(
        "  {n:>6} waiting: commit {:.2} ms, wake {}; api RSS {}; database connections of the api {}\n",
        ms(committed - t0),
        percentiles(&lat),
        rss.map_or("?".into(), |r| format!("{r:.0} MB")),
        conns,
    ));
    // The answer's size, for the floor.
    let answer = app
        .store
        .build(&key)
        .await?
        .map_or(0, |b| cbs_roles::api::status_body(&b).len());
    Ok(answer)
}

/// Options of the floor measurement's bare server.
#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// Length of the body of each answer.
    #[arg(long)]
    pub body_len: usize,
}

/// The floor measurement's server, a process of its own as the API is: listens on a free
/// loopback port (printed as `listening <addr>`), reads each connection's request and parks
/// it; when a line arrives on stdin, writes a fixed answer to every parked connection.
pub async fn floor_server(args: FloorArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let body_len = args.body_len;
    let answer: Arc<[u8]> = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n\r\n{}",
        "x".repeat(body_len)
    )
    .into_bytes()
    .into();
    let (go, _) = tokio::sync::watch::channel(false);
    print_out(&format!("listening {}\n", listener.local_addr()?));
    let accept = {
        let go = go.clone();
        async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (mut go, answer) = (go.subscribe(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = go.wait_for(|g| *g).await;
                    let _ = s.write_all(&answer).await;
                    // Keep the connection until the client closes it.
                    let _ = s.read(&mut buf).await;
                });
            }
        }
    };
    let trigger = async {
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line).await
    };
    tokio::select! {
        () = accept => {}
        _ = trigger => {}
    }
    go.send_replace(true);
    // Until the parent closes stdin.
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    Ok(())
}

/// The floor of the wake measurement on this machine: the same clients, but the server is a
/// bare process that, on a signal, writes a fixed answer of the API's size to every parked
/// connection. No HTTP parsing, database, hub or routing: what remains is the kernel's
/// loopback TCP work and the two processes' runtimes.
async fn floor(n: usize, body_len: usize) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["wake-floor-server", "--body-len", &body_len.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the floor server")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("floor server said {line:?}"))?
        .to_owned();
    let waiters = Waiters::open(&addr, "/", n).await?;
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_micros(n as u64 * 100)).await;
    let from = Instant::now();
    stdin.write_all(b"go\n").await?;
    stdin.flush().await?;
    let lat = waiters.latencies(from).await?;
    drop(stdin);
    child.wait().await?;
    print_out(&format!(
        "  {n:>6} waiting: floor (a bare server writing a {body_len}-byte answer to each) {}\n",
        percentiles(&lat)
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
    let mut body_len = 0;
    for &n in &args.waiters {
        body_len = wake(&app, &args, n).await?;
    }
    if let Some(&n) = args.waiters.iter().max() {
        floor(n, body_len).await?;
    }
    let Some(file) = &args.artifact else {
        return Ok(());
    };
    // Publish the file as a finished build's artifact.
    let bytes = tokio::fs::read(file).await?;
    let b = running_build(&app).await?;
    let key = b.key.clone();
    let place = cbs_domain::artifact::ArtifactPath {
        key: &key,
        attempt: b.attempt,
    };
    let location = place.location();
    // Through the configured storage, as the worker stores it (unsigned: the download path
    // does not read the signature).
    let storage = cbs_storage::Storage::connect(&app.config.storage).await?;
    storage.put_file(&place.file("caddy"), file).await?;
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
                    files: vec!["caddy".into()],
                    modules_sha256: None,
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
