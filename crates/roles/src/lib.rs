//! The roles of caddy-build-server: api, worker, janitor, and `all` of them in one process.
//!
//! Each role is `run(app, ..., shutdown)`, so tests start it in-process with their own config
//! and a listener on port 0. This crate is the only HTTP server (the api; the executor's per-build gate
//! aside), and the only one that knows the command line and signals.

pub mod api;
pub mod cli;
pub mod client;
pub mod janitor;
pub mod shutdown;
pub mod worker;

use anyhow::Context;
use cbs_config::{Config, LogFormat, Source};
use cbs_store::{Hub, Store};
use tokio_util::sync::CancellationToken;
use tracing::info;

use cli::{Command, JanitorCommand};

/// What every role shares in one process: config, store, and the one listening connection.
/// Cheap to clone (every request handler gets a clone).
#[derive(Clone, Debug)]
pub struct App {
    pub config: std::sync::Arc<Config>,
    pub store: Store,
    pub hub: Hub,
}

impl App {
    /// Connects (lazily) and starts the process's listening connection.
    pub fn new(config: Config, shutdown: &CancellationToken) -> anyhow::Result<App> {
        config.go.check().map_err(|e| anyhow::anyhow!(e))?;
        let store = Store::new(&config.database).context("database config")?;
        let hub = Hub::start(
            store.connector().clone(),
            config.notify.clone(),
            shutdown.clone(),
        );
        Ok(App {
            config: std::sync::Arc::new(config),
            store,
            hub,
        })
    }

    /// The module proxy client's settings (with the configured credentials and CA).
    pub fn proxy_config(
        &self,
        cache_ttl: std::time::Duration,
    ) -> anyhow::Result<cbs_goproxy::ProxyConfig> {
        let ca = &self.config.go.proxy_ca_file;
        let ca_pem = if ca.as_os_str().is_empty() {
            None
        } else {
            Some(std::fs::read(ca).with_context(|| format!("go.proxy_ca_file {}", ca.display()))?)
        };
        Ok(cbs_goproxy::ProxyConfig {
            ca_pem,
            goproxy: self.config.go.proxy.clone(),
            credentials: self
                .config
                .go
                .proxy_credentials
                .iter()
                .map(|c| cbs_goproxy::Credential {
                    host: c.host.clone(),
                    username: c.username.clone(),
                    password: c.password.expose().clone(),
                })
                .collect(),
            timeout: self.config.go.resolve_timeout,
            cache_ttl,
        })
    }
}

/// Runs the command line's subcommand.
pub async fn main(cli: cli::Cli) -> anyhow::Result<()> {
    let (config, source) = Config::load()?;
    init_logging(&config);
    match &source {
        Source::File(p) => info!(config = %p.display(), "config loaded"),
        Source::Defaults => info!("no config.yml and no CONFIG_PATH: using built-in defaults"),
    }
    let shutdown = shutdown::on_signals();
    match cli.command {
        Command::Keygen { out } => {
            let path = out.unwrap_or_else(|| config.signing.key_file.clone());
            let password = config.signing.password.as_ref().map(|p| p.expose().clone());
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let public = tokio::task::spawn_blocking({
                let path = path.clone();
                move || cbs_signing::keygen(&path, password.as_deref())
            })
            .await??;
            print_out(&public);
            info!(
                secret = %path.display(),
                public = %cbs_signing::public_key_path(&path).display(),
                "key pair written"
            );
            Ok(())
        }
        Command::Migrate => {
            let connector = cbs_store::PgConnector::new(&config.database)?;
            let applied = cbs_store::migrate::run(&connector)
                .await
                .with_context(|| format!("migrating {}", connector.display()))?;
            info!(applied, "migrations done");
            Ok(())
        }
        Command::Janitor {
            command: Some(JanitorCommand::RebuildProjections { fix }),
        } => {
            let store = Store::new(&config.database)?;
            janitor::rebuild_projections(&store, fix).await
        }
        Command::Janitor { command: None } => {
            janitor::migrate(&config).await?;
            let app = App::new(config, &shutdown)?;
            with_metrics_listener(
                &app,
                &shutdown,
                Box::pin(janitor::run_services(app.clone(), shutdown.clone())),
            )
            .await
        }
        Command::Api => {
            let app = App::new(config, &shutdown)?;
            let listener = api::bind(&app.config).await?;
            api::run(app, listener, shutdown).await
        }
        Command::Worker => {
            let app = App::new(config, &shutdown)?;
            with_metrics_listener(
                &app,
                &shutdown,
                Box::pin(worker::run(app.clone(), shutdown.clone())),
            )
            .await
        }
        Command::All => Box::pin(run_all(config, shutdown)).await,
        Command::Healthcheck { url } => healthcheck(&config, url).await,
        Command::Client { server, command } => match client::run(server, command).await {
            c if c == std::process::ExitCode::SUCCESS => Ok(()),
            _ => anyhow::bail!("the client command failed"),
        },
    }
}

/// `healthcheck`: GET /healthz of this host's server, within 3 s.
async fn healthcheck(config: &Config, url: Option<String>) -> anyhow::Result<()> {
    let local = |addr: std::net::SocketAddr| {
        // A wildcard address is served on loopback too.
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        format!(
            "http://{}/healthz",
            std::net::SocketAddr::new(ip, addr.port())
        )
    };
    let url = match url {
        Some(u) => u,
        None => match config
            .metrics
            .listen_addr()
            .map_err(|e| anyhow::anyhow!(e))?
        {
            Some(addr) => local(addr),
            None => local(config.api.listen),
        },
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "GET {url} answered {}",
        resp.status()
    );
    Ok(())
}

/// Runs `role` beside the metrics listener of `metrics.listen` (worker and janitor: the
/// roles without an HTTP port). A listener that cannot start stops the role; the role's end
/// stops the listener.
async fn with_metrics_listener(
    app: &App,
    shutdown: &CancellationToken,
    role: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let listener = api::metrics::listener(app.clone(), stop.clone());
    let role = async {
        let r = role.await;
        stop.cancel();
        r
    };
    tokio::try_join!(role, listener).map(|_| ())
}

/// Every role in one process: migrations first, then api, worker and janitor side by side.
/// The first role to fail stops the others.
pub async fn run_all(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    janitor::migrate(&config).await?;
    let app = App::new(config, &shutdown)?;
    let listener = api::bind(&app.config).await?;
    let stop = shutdown.child_token();
    let result = tokio::try_join!(
        async {
            let r = api::run(app.clone(), listener, stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = worker::run(app.clone(), stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = janitor::run_services(app.clone(), stop.clone()).await;
            stop.cancel();
            r
        },
    );
    stop.cancel();
    result.map(|_| ())
}

/// Logging as the config says (`log.filter`, overridden by RUST_LOG; `log.format`), to
/// stderr.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests calling main twice) is harmless: keep the first.
    let _ = match config.log.format {
        // One object per line: the event's fields at the top level (`message`, `error`,
        // ...), and the spans it happened in under `spans` (a build's `build.key`,
        // `attempt`, `worker.id`; a request's `request.id`), innermost last in `span`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A command's report goes to stdout (logs go to stderr).
#[allow(clippy::print_stdout)]
pub(crate) fn print_out(s: &str) {
    print!("{s}");
}

/// The property tests' settings: `CBS_FUZZ_CASES` inputs per property (3,000 by default), no
/// failure files written into the source tree.
#[cfg(test)]
pub(crate) fn fuzz_config() -> proptest::prelude::ProptestConfig {
    proptest::prelude::ProptestConfig {
        cases: std::env::var("CBS_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3_000),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    }
}
