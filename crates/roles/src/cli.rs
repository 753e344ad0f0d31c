//! The command line.

use clap::{Parser, Subcommand};

/// A build server for custom Caddy binaries.
///
/// Configuration comes from ./config.yml or the file named by CONFIG_PATH (see
/// config.example.yml); without either, built-in local defaults are used.
#[derive(Debug, Parser)]
#[command(name = "caddy-build-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Api,
    /// Claim and run builds.
    Worker,
    /// Run migrations, then the maintenance services; or a maintenance command.
    Janitor {
        #[command(subcommand)]
        command: Option<JanitorCommand>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Write a new minisign key pair for signing artifacts: the secret key to
    /// signing.key_file (or --out), encrypted with signing.password when that is set, and the
    /// public key beside it (<file>.pub). Refuses to overwrite. Prints the public key.
    Keygen {
        /// Where to write the secret key instead of signing.key_file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Every role in one process (a single machine).
    All,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum JanitorCommand {
    /// Recompute the projections from the event log and report every difference.
    RebuildProjections {
        /// Overwrite the rows that differ with the recomputed ones.
        #[arg(long)]
        fix: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Build cycles per second and dispatch latency of the queue (writes to the configured
    /// database: point it at a scratch database).
    Queue(crate::bench::QueueArgs),
    /// Long-poll wake latency, API memory, and download throughput (see scripts/bench-api).
    Api(crate::bench_api::ApiArgs),
    /// Upload and download throughput and peak memory of the configured artifact storage
    /// (see scripts/bench-storage, which runs it for both backends).
    Storage(crate::bench_storage::StorageArgs),
    /// The bare server of `bench api`'s floor measurement (started by `bench api` itself).
    #[command(hide = true)]
    WakeFloorServer(crate::bench_api::FloorArgs),
}
