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
    /// Exit 0 if this host's server answers GET /healthz (for a container's HEALTHCHECK):
    /// the metrics listener's when metrics.listen is set (worker, janitor), else the api's.
    Healthcheck {
        /// Ask this URL instead.
        #[arg(long)]
        url: Option<String>,
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
