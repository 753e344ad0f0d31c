//! Postgres over TLS, against a throwaway server that accepts TCP connections only over TLS,
//! with a certificate signed by a CA made for the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cbs_config::{DatabaseConfig, DatabaseUrl, SslMode};
use cbs_store::{PgConnector, Store, StoreError};
use cbs_testkit::PgServer;

fn config(url: &str, sslmode: SslMode, root: &Path) -> DatabaseConfig {
    DatabaseConfig {
        url: DatabaseUrl::new(url),
        pool_size: 2,
        connect_timeout: Duration::from_secs(10),
        sslmode,
        ssl_root_cert: root.to_path_buf(),
        ..Default::default()
    }
}

/// Connects with `config` and says whether the connection is encrypted (pg_stat_ssl).
async fn encrypted(config: &DatabaseConfig) -> Result<bool, String> {
    let connector = PgConnector::new(config).map_err(|e| e.to_string())?;
    let (client, _messages) = connector
        .connect_with_messages("")
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_use_tls_and_check_the_servers_certificate() {
    let pg = tokio::task::spawn_blocking(PgServer::start_tls)
        .await
        .unwrap()
        .unwrap();
    let ca = pg.ca_cert();
    let by_ip = pg.url("postgres");
    let by_name = by_ip.replace("127.0.0.1", "localhost");
    // A host name the certificate does not name, reached at the server's address.
    let other_name = by_ip.replace("127.0.0.1", "db.invalid") + "?hostaddr=127.0.0.1";
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong_ca = cbs_testkit::make_ca(elsewhere.path(), "other").unwrap();
    let none = PathBuf::new();

    // verify-full: signed by the CA and naming the host (a DNS name or an IP address).
    for url in [&by_name, &by_ip] {
        assert_eq!(
            encrypted(&config(url, SslMode::VerifyFull, &ca)).await,
            Ok(true),
            "{url}"
        );
    }
    let err = encrypted(&config(&other_name, SslMode::VerifyFull, &ca))
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // verify-ca does not look at the name.
    assert_eq!(
        encrypted(&config(&other_name, SslMode::VerifyCa, &ca)).await,
        Ok(true)
    );
    // Another CA's signature is not good enough, by name or not.
    for mode in [SslMode::VerifyFull, SslMode::VerifyCa, SslMode::Require] {
        let err = encrypted(&config(&by_name, mode, &wrong_ca))
            .await
            .unwrap_err();
        assert!(err.contains("certificate"), "{mode:?}: {err}");
    }
    // require and prefer encrypt without checking who the server is.
    for mode in [SslMode::Require, SslMode::Prefer] {
        assert_eq!(
            encrypted(&config(&other_name, mode, &none)).await,
            Ok(true),
            "{mode:?}"
        );
    }
    // This server refuses plain connections.
    let err = encrypted(&config(&by_ip, SslMode::Disable, &none))
        .await
        .unwrap_err();
    assert!(err.contains("no encryption"), "{err}");

    // The whole store (pool, listener, notifier, migrations) over verify-full.
    let c = config(&by_name, SslMode::VerifyFull, &ca);
    let store = Store::new(&c).unwrap();
    cbs_store::migrate::run(store.connector()).await.unwrap();
    let request = cbs_testkit::sample_request(1);
    let key = request.key();
    let outcome = store.request_build(&key, &request).await.unwrap();
    assert!(outcome.created);
    let (client, _m) = store.connector().connect_with_messages("").await.unwrap();
    let plain: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.backend_type = 'client backend' AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0, "every connection is encrypted");
}

#[test]
fn tls_settings_that_cannot_work_are_refused_at_start() {
    // sslmode belongs in database.sslmode, not in the URL (one place, no ambiguity).
    let mut c = config(
        "postgres://postgres@db.example:5432/x?sslmode=verify-full",
        SslMode::VerifyFull,
        Path::new(""),
    );
    let err = PgConnector::new(&c).unwrap_err();
    assert!(
        matches!(&err, StoreError::Config(m) if m.contains("database.sslmode")),
        "{err}"
    );
    c.url = DatabaseUrl::new("postgres://postgres@db.example:5432/x");
    c.ssl_root_cert = PathBuf::from("/nonexistent/ca.pem");
    let err = PgConnector::new(&c).unwrap_err().to_string();
    assert!(
        err.contains("database.ssl_root_cert /nonexistent/ca.pem"),
        "{err}"
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    c.ssl_root_cert = empty.path().to_path_buf();
    let err = PgConnector::new(&c).unwrap_err().to_string();
    assert!(err.contains("holds no certificate"), "{err}");
}
