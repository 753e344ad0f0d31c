//! Connections: one Postgres config, used for the pool, the listener, the notifier and
//! migrations.

use std::fmt;
use std::time::Duration;

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// Opens connections to the configured database.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    /// `None`: plain connections (`sslmode: disable`).
    tls: Option<MakeRustlsConnect>,
    /// For logs: the URL without its password.
    display: String,
}

impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgConnector({})", self.display)
    }
}

impl PgConnector {
    pub fn new(db: &cbs_config::DatabaseConfig) -> Result<PgConnector, StoreError> {
        if db.url.expose().contains("sslmode=") {
            return Err(StoreError::Config(
                "database.url sets sslmode: set TLS with database.sslmode (and database.ssl_root_cert) instead".into(),
            ));
        }
        // The parser's own errors may quote the URL; say only which part is wrong.
        let mut config: tokio_postgres::Config = db.url.expose().parse().map_err(|_| {
            StoreError::Config(format!(
                "database.url is not a valid Postgres URL: {}",
                db.url
            ))
        })?;
        if let Some(pw) = db.password.as_ref().filter(|p| !p.expose().is_empty()) {
            config.password(pw.expose());
        }
        config
            .connect_timeout(db.connect_timeout)
            // Find dead peers (a cut network) without waiting for the kernel's two hours.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("caddy-build-server");
        }
        let tls = crate::tls::connector(db.sslmode, &db.ssl_root_cert)?;
        config.ssl_mode(match db.sslmode {
            cbs_config::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            cbs_config::SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgConnector {
            config,
            tls,
            display: db.url.redacted(),
        })
    }

    /// The application name connections report (`caddy-build-server` unless the URL sets
    /// `application_name`).
    pub fn application_name(&self) -> &str {
        self.config
            .get_application_name()
            .unwrap_or("caddy-build-server")
    }

    /// The database URL without its password, for logs.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// A pool of `size` connections.
    pub(crate) fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool, StoreError> {
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => deadpool_postgres::Manager::from_config(
                self.config.clone(),
                tls.clone(),
                manager_config,
            ),
            None => {
                deadpool_postgres::Manager::from_config(self.config.clone(), NoTls, manager_config)
            }
        };
        let timeout = self.config.get_connect_timeout().copied();
        deadpool_postgres::Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(timeout)
            .wait_timeout(timeout.map(|t| t * 2))
            .build()
            .map_err(|e| StoreError::Config(format!("database pool: {e}")))
    }

    /// One new connection outside the pool. `setup` runs first (e.g. session settings).
    /// The connection's driver runs as a task; `messages` receives its notifications.
    pub async fn connect_with_messages(
        &self,
        setup: &str,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<Message>), StoreError> {
        let (client, rx) = match &self.tls {
            Some(tls) => connect_and_drive(&self.config, tls.clone()).await?,
            None => connect_and_drive(&self.config, NoTls).await?,
        };
        if !setup.is_empty() {
            client.batch_execute(setup).await?;
        }
        Ok((client, rx))
    }
}

/// Connects, and runs the connection's driver as a task that forwards its notifications.
async fn connect_and_drive<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<Message>), StoreError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures::StreamExt;
        while let Some(msg) = stream.next().await {
            let out = match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    Message::Notification(n.payload().to_owned())
                }
                Ok(_) => continue,
                Err(e) => Message::Closed(Some(e.to_string())),
            };
            let closed = matches!(out, Message::Closed(_));
            if tx.send(out).is_err() || closed {
                return;
            }
        }
        let _ = tx.send(Message::Closed(None));
    });
    Ok((client, rx))
}

/// What a connection's driver reports besides query results.
#[derive(Debug)]
pub enum Message {
    Notification(String),
    /// The connection ended, with the error if there was one.
    Closed(Option<String>),
}
