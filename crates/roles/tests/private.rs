//! Private plugins: an authenticated module proxy, private module patterns, and the
//! credentials nowhere but where they are needed. Its own test binary: it captures every
//! log line of the process.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbs_testkit::FixtureProxy;
use serde_json::Value;

mod common;
use common::{client, server_configured};

const USER: &str = "builder";
const PASSWORD: &str = "pr0xy-s3cret-7f3a9c";
const WRONG: &str = "not-the-password-1234";

/// Every log line of the process, as written.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn credentials(c: &mut cbs_config::Config, proxy: &FixtureProxy, password: &str) {
    c.go.proxy = proxy.url();
    c.go.proxy_ca_file = proxy.ca_cert().unwrap().to_path_buf();
    c.go.private = vec!["github.com/acme/*".into()];
    c.go.proxy_credentials = vec![cbs_config::ProxyCredential {
        host: "127.0.0.1".into(),
        username: USER.into(),
        password: cbs_config::Secret::new(password.into()),
    }];
}

/// Runs `docker` and returns its standard output.
fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "docker {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The secret in any form a leak could take: as is, and in a basic-auth header.
fn leaks(text: &str) -> bool {
    text.contains(PASSWORD) || text.contains("YnVpbGRlcjpwcjB4eS1zM2NyZXQtN2YzYTlj")
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_through_an_authenticated_proxy_keep_the_credentials_secret() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let proxy = FixtureProxy::start_https_with_auth(USER, PASSWORD).await;
    let s = server_configured(true, None, |c| credentials(c, &proxy, PASSWORD)).await;

    // The go command's requests wait at the proxy: the resolve container stays up.
    proxy.close();
    let query = "os=linux&arch=amd64&p=github.com/acme/alpha";
    let r = client()
        .post(format!("{}/api/build?{query}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "the api resolved with the credentials"
    );
    let json: Value = r.json().await.unwrap();
    let key = json["result"]["key"].as_str().unwrap().to_owned();
    if tokio::time::timeout(Duration::from_secs(120), proxy.holding())
        .await
        .is_err()
    {
        let build = client()
            .get(format!("{}/api/build/{key}", s.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        panic!("the resolve step did not ask the proxy: {build}");
    }
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label={}={key}", cbs_executor::LABEL_BUILD),
    ]);
    let id = ids.split_whitespace().next().expect("a resolve container");
    let inspect = docker(&["inspect", id]);
    assert!(!leaks(&inspect), "docker inspect shows the credentials");
    let info: Value = serde_json::from_str(&inspect).unwrap();
    let env: Vec<&str> = info[0]["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // No credentials, certificate authority or network in the container: the worker's
    // gate, at the end of a read-only socket, asks the proxy with them.
    assert!(env.contains(&"GONOSUMDB=github.com/acme/*"), "{env:?}");
    assert!(env.contains(&"GOPROXY=http://127.0.0.1:7070/0"), "{env:?}");
    assert!(
        !env.iter()
            .any(|e| e.starts_with("NETRC=") || e.starts_with("SSL_CERT_FILE=")),
        "{env:?}"
    );
    assert_eq!(info[0]["HostConfig"]["NetworkMode"], "none");
    let mounts = info[0]["Mounts"].as_array().unwrap();
    assert!(
        !mounts
            .iter()
            .any(|m| m["Destination"] == "/cbs/netrc" || m["Destination"] == "/cbs/proxy-ca.pem"),
        "{mounts:?}"
    );
    let gate = mounts
        .iter()
        .find(|m| m["Destination"] == "/cbs/gate.sock")
        .expect("the gate's socket is mounted");
    assert_eq!(gate["RW"], false, "read-only");
    proxy.open();

    // The build goes through, and its binary comes back.
    let download = client()
        .get(format!("{}/api/download?{query}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status().as_u16(), 200);
    let history = client()
        .get(format!("{}/api/build/{key}/history", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(history.contains("succeeded"), "{history}");
    assert!(!leaks(&history), "the events show the credentials");

    // Wrong credentials: a clear refusal that names the setting, never the secret.
    let wrong = server_configured(false, None, |c| credentials(c, &proxy, WRONG)).await;
    let refused = client()
        .post(format!(
            "{}/api/build?os=linux&arch=arm64&p=github.com/acme/alpha",
            wrong.base
        ))
        .send()
        .await
        .unwrap();
    let status = refused.status().as_u16();
    let body = refused.text().await.unwrap();
    assert!((500..600).contains(&status), "{status} {body}");
    assert!(
        body.contains("401") && body.contains("go.proxy_credentials"),
        "{body}"
    );
    assert!(!body.contains(WRONG));

    // A worker with wrong credentials: its resolve step fails on the proxy's 401.
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = server_configured(false, None, |c| credentials(c, &proxy, PASSWORD)).await;
    let mut worker_app = s2.app.clone();
    credentials(Arc::make_mut(&mut worker_app.config), &proxy, WRONG);
    tokio::spawn(cbs_roles::worker::run(worker_app, stop.clone()));
    let r = client()
        .post(format!(
            "{}/api/build?os=windows&arch=amd64&p=github.com/acme/alpha",
            s2.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let key2 = r.json::<Value>().await.unwrap()["result"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = wait_for_failure(&s2.base, &key2).await;
    assert!(failed.contains("401"), "{failed}");
    assert!(!leaks(&failed) && !failed.contains(WRONG), "{failed}");
    stop.cancel();

    let log_text = logs.text();
    assert!(log_text.contains(&key), "the logs were captured");
    assert!(!leaks(&log_text), "a log line shows the credentials");
    assert!(
        !log_text.contains(WRONG),
        "a log line shows the credentials"
    );
}

/// Follows a build's history until its first failure; returns that event's JSON.
async fn wait_for_failure(base: &str, key: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut after = 0u64;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no failure");
        // The long-poll returns when the build has events after `after`.
        let b: Value = client()
            .get(format!("{base}/api/build/{key}?wait=30s&after={after}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        after = b["result"]["last_seq"].as_u64().unwrap_or(after);
        let history = client()
            .get(format!("{base}/api/build/{key}/history"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events: Value = serde_json::from_str(&history).unwrap();
        if let Some(f) = events["result"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "failed")
        {
            return f.to_string();
        }
    }
}
