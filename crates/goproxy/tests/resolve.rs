//! Resolution against a real HTTP module proxy serving the fixture modules.

use std::time::Duration;

use cbs_domain::{BuildSpec, ModulePath, VersionQuery};
use cbs_goproxy::{ProxyConfig, ResolveError, Resolver};
use cbs_testkit::FixtureProxy;

fn resolver(goproxy: &str) -> Resolver {
    Resolver::new(&ProxyConfig {
        goproxy: goproxy.to_owned(),
        credentials: vec![],
        ca_pem: None,
        timeout: Duration::from_secs(5),
        cache_ttl: Duration::from_secs(60),
    })
    .unwrap()
}

fn m(p: &str) -> ModulePath {
    p.parse().unwrap()
}

fn q(s: &str) -> VersionQuery {
    s.parse().unwrap()
}

/// A loopback port with nothing listening.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn resolves_latest_exact_escaped_and_major_suffix_modules() {
    let proxy = FixtureProxy::start().await;
    let r = resolver(&proxy.url());
    let cases = [
        ("github.com/caddyserver/caddy/v2", "latest", "v2.8.4"),
        ("github.com/caddyserver/caddy/v2", "", "v2.8.4"),
        ("github.com/caddyserver/caddy/v2", "v2.7.6", "v2.7.6"),
        (
            "github.com/caddyserver/caddy/v2",
            "v2.9.0-beta.1",
            "v2.9.0-beta.1",
        ),
        ("github.com/acme/alpha", "latest", "v1.1.0"),
        ("github.com/Acme/Beta", "latest", "v0.2.0"),
        ("example.com/gamma/v2", "latest", "v2.1.0"),
        ("example.com/gamma/v2", "v2.0.0", "v2.0.0"),
    ];
    for (module, query, want) in cases {
        let v = r.resolve(&m(module), &q(query)).await.unwrap();
        assert_eq!(v.as_str(), want, "{module}@{query}");
    }
}

#[tokio::test]
async fn unknown_modules_and_versions_are_the_users_error() {
    let proxy = FixtureProxy::start().await;
    let r = resolver(&proxy.url());
    for (module, query) in [
        ("github.com/acme/nope", "latest"),
        ("github.com/acme/alpha", "v9.9.9"),
        ("github.com/acme/alpha", "no-such-branch"),
    ] {
        let err = r.resolve(&m(module), &q(query)).await.unwrap_err();
        assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains(module), "{err}");
    }
}

#[tokio::test]
async fn an_unreachable_proxy_is_ours_and_retryable() {
    let r = resolver(&dead_url());
    let err = r
        .resolve(&m("github.com/acme/alpha"), &VersionQuery::Latest)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("is unavailable"), "{err}");
}

#[tokio::test]
async fn proxy_lists_fall_through_as_go_does() {
    let proxy = FixtureProxy::start().await;
    // ',' falls through on 404 (a proxy that has nothing under this prefix)...
    let empty_then_fixture = format!("{}/empty,{}", proxy.url(), proxy.url());
    let v = resolver(&empty_then_fixture)
        .resolve(&m("github.com/acme/alpha"), &VersionQuery::Latest)
        .await
        .unwrap();
    assert_eq!(v.as_str(), "v1.1.0");
    // ...but not on a connection error; '|' does.
    let dead = dead_url();
    let err = resolver(&format!("{dead},{}", proxy.url()))
        .resolve(&m("github.com/acme/alpha"), &VersionQuery::Latest)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let v = resolver(&format!("{dead}|{}", proxy.url()))
        .resolve(&m("github.com/acme/alpha"), &VersionQuery::Latest)
        .await
        .unwrap();
    assert_eq!(v.as_str(), "v1.1.0");
}

#[tokio::test]
async fn a_spec_resolves_into_a_keyed_request() {
    let proxy = FixtureProxy::start().await;
    let r = resolver(&proxy.url());
    let spec = BuildSpec::parse(
        "linux",
        "arm",
        Some("7"),
        None,
        &[
            ("github.com/acme/alpha", None),
            ("example.com/gamma/v2", Some("v2.0.0")),
        ],
        &[],
    )
    .unwrap();
    let request = r.resolve_spec(&spec).await.unwrap();
    assert_eq!(request.caddy_version().as_str(), "v2.8.4");
    let plugins: Vec<String> = request
        .plugins()
        .iter()
        .map(|p| format!("{}@{}", p.module, p.version))
        .collect();
    assert_eq!(
        plugins,
        [
            "example.com/gamma/v2@v2.0.0",
            "github.com/acme/alpha@v1.1.0"
        ]
    );
    // The same spec asked again (cached or not) gives the same key.
    assert_eq!(r.resolve_spec(&spec).await.unwrap().key(), request.key());
    let explicit = BuildSpec::parse(
        "linux",
        "arm",
        Some("7"),
        Some("v2.8.4"),
        &[
            ("example.com/gamma/v2", Some("v2.0.0")),
            ("github.com/acme/alpha", Some("v1.1.0")),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        r.resolve_spec(&explicit).await.unwrap().key(),
        request.key()
    );
}

/// A proxy whose answer is larger than the cap is unavailable, not read into memory.
#[tokio::test]
async fn an_oversized_answer_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                // No Content-Length: the size shows only while reading.
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    .await;
                let line = "v1.0.0\n".repeat(1000);
                for _ in 0..(2 * cbs_goproxy::MAX_ANSWER / line.len()) {
                    if conn.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let r = resolver(&url);
    let err = r
        .resolve(&m("example.com/huge"), &q("latest"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ResolveError::Unavailable { detail, .. } if detail.contains("larger than")),
        "{err:?}"
    );
}
