//! `cbs-bench`: the benchmarks of scripts/bench-queue, scripts/bench-api and
//! scripts/bench-storage. A binary of its own so that the server's binary and library carry
//! no benchmark code (and the store's benchmark-only methods stay behind its `bench`
//! feature, which only this crate turns on).

mod api;
mod queue;
mod scale;
mod storage;

use anyhow::Context;
use cbs_config::Config;
use cbs_roles::App;
use clap::{Parser, Subcommand};

/// The server's allocator (see crates/roles/src/main.rs): the benchmarks run the server's
/// code paths in this process and must measure them as the server runs them.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Benchmarks of caddy-build-server. Configuration comes from CONFIG_PATH or ./config.yml,
/// as for the server.
#[derive(Debug, Parser)]
#[command(name = "cbs-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build cycles per second and dispatch latency of the queue (writes to the configured
    /// database: point it at a scratch database).
    Queue(queue::QueueArgs),
    /// Long-poll wake latency, API memory, and download throughput (see scripts/bench-api).
    Api(api::ApiArgs),
    /// Upload and download throughput and peak memory of the configured artifact storage
    /// (see scripts/bench-storage, which runs it for both backends).
    Storage(storage::StorageArgs),
    /// The database at a million builds: status, history, feed, claim and janitor-scan
    /// latencies and bytes per build (writes to the configured database: point it at a
    /// scratch one; scripts/bench-scale makes one).
    Scale(scale::ScaleArgs),
    /// The bare server of `api`'s floor measurement (started by `api` itself).
    #[command(hide = true)]
    WakeFloorServer(api::FloorArgs),
}

/// A report goes to stdout (logs go to stderr).
#[allow(clippy::print_stdout)]
fn print_out(s: &str) {
    print!("{s}");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, _) = Config::load()?;
    cbs_roles::init_logging(&config);
    let shutdown = cbs_roles::shutdown::on_signals();
    match cli.command {
        Command::Api(args) => {
            let app = App::new(config, &shutdown)?;
            let mut epoch = app.hub.epoch();
            epoch.wait_for(|e| *e > 0).await?;
            api::api(app, args).await
        }
        Command::Storage(args) => storage::run(&config, args).await,
        Command::WakeFloorServer(args) => api::floor_server(args).await,
        Command::Scale(args) => {
            let connector = cbs_store::PgConnector::new(&config.database)?;
            cbs_store::migrate::run(&connector)
                .await
                .context("migrating the benchmark database")?;
            let app = App::new(config, &shutdown)?;
            scale::scale(app, args).await
        }
        Command::Queue(args) => {
            let connector = cbs_store::PgConnector::new(&config.database)?;
            cbs_store::migrate::run(&connector)
                .await
                .context("migrating the benchmark database")?;
            let app = App::new(config, &shutdown)?;
            queue::queue(app, args, shutdown).await
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
