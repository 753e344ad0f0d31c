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
    /// A client of a build server: status, history, the signing key, and whether this
    /// server built and signed a file. Exit codes: 0 ok, 1 the build failed, 2 bad input,
    /// 3 verification failed, 4 the server cannot be reached.
    Client {
        /// The server's URL.
        #[arg(
            long,
            global = true,
            env = "CBS_SERVER",
            default_value = "http://127.0.0.1:8234"
        )]
        server: String,
        #[command(subcommand)]
        command: ClientCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Print the server's signing public key (pinned on first use; a changed key is an error).
    PublicKey {
        /// Trust this public key file instead of the pinned one.
        #[arg(long)]
        public_key: Option<std::path::PathBuf>,
    },
    /// Build Caddy (or take the finished build), follow its progress, download it (resuming
    /// after a dropped connection), check its checksum, signature and build information, and
    /// write it atomically with mode 0755.
    Build {
        /// GOOS, like linux.
        #[arg(long)]
        os: String,
        /// GOARCH, like amd64.
        #[arg(long)]
        arch: String,
        /// GOARM (5, 6 or 7) for --arch arm.
        #[arg(long)]
        arm: Option<String>,
        /// Caddy's version.
        #[arg(long, default_value = "latest")]
        caddy_version: String,
        /// A plugin, module[@version]; repeat for each.
        #[arg(short = 'p', long = "plugin")]
        plugins: Vec<String>,
        /// A replacement, old=new[@version]; repeat for each.
        #[arg(long = "replace")]
        replacements: Vec<String>,
        /// Where to write the binary.
        #[arg(short = 'o', long, default_value = "caddy")]
        output: std::path::PathBuf,
        /// Trust this public key file instead of the pinned one.
        #[arg(long)]
        public_key: Option<std::path::PathBuf>,
        /// Print only the result.
        #[arg(long)]
        quiet: bool,
        /// Print the result as one JSON object on stdout (key, file, sha256, size, request,
        /// signature's trusted comment), and no progress.
        #[arg(long)]
        json: bool,
    },
    /// A build's status (exit 1 when it failed, gave up or was cancelled).
    Status { key: String },
    /// A build's events, oldest first.
    History { key: String },
    /// The live feed of every build's events (the newest first, then as they come).
    Watch {
        /// Only these event types, comma-separated (e.g. requested,succeeded,failed).
        #[arg(long = "type")]
        types: Option<String>,
        /// How many recent events to show first.
        #[arg(long, default_value_t = 20)]
        last: u32,
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Whether this server built and signed exactly this file, and from what request.
    Verify {
        file: std::path::PathBuf,
        /// Trust this public key file instead of the pinned one.
        #[arg(long)]
        public_key: Option<std::path::PathBuf>,
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
