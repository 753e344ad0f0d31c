//! The web pages, in a real browser (Debian's chromium, headless, through chromedriver) and
//! over plain HTTP. The api runs as its own process (`caddy-build-server api`, restarted in
//! one test), a worker in this process builds the fixture modules in Docker.
//!
//! Screenshots at desktop and phone width go to `$CBS_SCREENSHOTS` (default: the test's
//! target directory); `CBS_SCREENSHOTS=docs/screenshots` refreshes the README's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbs_roles::App;
use cbs_testkit::browser::{keys, Browser};
use cbs_testkit::{FixtureProxy, TestDb};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
const DEADLINE: Duration = Duration::from_secs(240);

/// One browser at a time: two cores.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The api process; killed when dropped.
struct Api(Child);

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server: the api as a process, a worker in this process (started on demand).
struct Site {
    base: String,
    config: PathBuf,
    app_config: cbs_config::Config,
    api: Option<Api>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
    _db: TestDb,
    _proxy: FixtureProxy,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The plugin catalog the pages list: the fixture plugins and a few more to filter.
const CATALOG: &str = r#"packages:
  catalog:
    - path: github.com/acme/alpha
      description: Alpha handler for tests
      modules: [{name: http.handlers.alpha}]
    - path: github.com/Acme/Beta
      description: Beta handler, upper-case module path
      modules: [{name: http.handlers.beta}]
    - path: example.com/gamma/v2
      description: Gamma, a major-version suffix
      modules: [{name: http.handlers.gamma}]
    - path: example.com/broken
      description: Does not compile
      modules: [{name: http.handlers.broken}]
    - path: example.com/unlisted/delta
      description: In the catalog, not on the proxy
"#;

impl Site {
    async fn start() -> Site {
        let db = TestDb::new().await;
        let proxy = FixtureProxy::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = cbs_testkit::role_config(&db, &proxy.url(), dir.path(), "web-worker");
        c.worker.claim_poll_interval = Duration::from_millis(500);
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                r#"database:
  url: "{db}"
  pool_size: 8
notify:
  poll_interval: 1s
api:
  listen: 127.0.0.1:{port}
  submissions_per_minute: 0
  max_queued_per_client: 0
  max_waits_per_client: 0
  max_connections_per_client: 0
go:
  proxy: {goproxy}
  sumdb: "off"
storage:
  dir: {storage}
signing:
  key_file: {key}
{CATALOG}"#,
                db = db.url,
                goproxy = proxy.url(),
                storage = c.storage.dir.display(),
                key = c.signing.key_file.display(),
            ),
        )
        .unwrap();
        let mut site = Site {
            base: format!("http://127.0.0.1:{port}"),
            config,
            app_config: c,
            api: None,
            shutdown: CancellationToken::new(),
            dir,
            _db: db,
            _proxy: proxy,
        };
        site.start_api().await;
        site
    }

    async fn start_api(&mut self) {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("api.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .arg("api")
            .env("CONFIG_PATH", &self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The api logs when it listens; its log goes on to api.log.
        let (up, is_up) = tokio::sync::oneshot::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let mut up = Some(up);
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains("api listening") {
                    if let Some(up) = up.take() {
                        let _ = up.send(());
                    }
                }
            }
        });
        self.api = Some(Api(child));
        tokio::time::timeout(Duration::from_secs(60), is_up)
            .await
            .ok()
            .and_then(Result::ok)
            .expect("the api never said it listens");
    }

    /// Kills the api process (a crash: no goodbye to open streams).
    fn kill_api(&mut self) {
        self.api = None;
    }

    fn start_worker(&self) {
        let app = App::new(self.app_config.clone(), &self.shutdown).unwrap();
        tokio::spawn(cbs_roles::worker::run(app, self.shutdown.clone()));
    }

    async fn get(&self, path: &str) -> Value {
        let r = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Asks for a build (`POST /api/build?{query}`); returns its key.
    async fn submit(&self, query: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/api/build?{query}", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{query}: {}", r.status());
        let v: Value = r.json().await.unwrap();
        v["result"]["key"].as_str().unwrap().to_owned()
    }

    async fn wait_ended(&self, key: &str) -> Value {
        let until = Instant::now() + DEADLINE;
        let mut after = 0;
        loop {
            assert!(Instant::now() < until, "build {key} never ended");
            let b = self
                .get(&format!("/api/build/{key}?wait=20s&after={after}"))
                .await;
            after = b["result"]["last_seq"].as_u64().unwrap();
            if ["complete", "failed", "gave_up", "cancelled"]
                .contains(&b["result"]["status"].as_str().unwrap())
            {
                return b;
            }
        }
    }
}

fn screenshots() -> PathBuf {
    std::env::var_os("CBS_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots"))
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Every request the browser made went to `base`'s origin, and the console shows no error
/// (but failed connections when `server_went_away`).
async fn same_origin_only(browser: &Browser, base: &str, server_went_away: bool) {
    let urls = browser.requested_urls().await;
    assert!(!urls.is_empty(), "the network log is empty");
    let foreign: Vec<_> = urls
        .iter()
        .filter(|u| !u.starts_with(&format!("{base}/")) && u.as_str() != base)
        .collect();
    assert!(foreign.is_empty(), "requests to other origins: {foreign:?}");
    let console = browser.console().await;
    let blocked: Vec<_> = console
        .iter()
        .filter(|m| m.contains("Content Security Policy") || m.contains("SEVERE"))
        .filter(|m| {
            !(server_went_away
                && m.contains("Failed to load resource: net::ERR_")
                && !m.contains("Content Security Policy"))
        })
        .collect();
    assert!(blocked.is_empty(), "console errors: {blocked:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_carry_a_strict_policy_and_the_new_endpoints_answer() {
    let site = Site::start().await;
    let http = reqwest::Client::new();
    let base = &site.base;
    for (path, kind) in [
        ("/", "text/html"),
        ("/recent", "text/html"),
        (&format!("/build/{}", "a".repeat(64)) as &str, "text/html"),
        (&format!("/build/{}/history", "b".repeat(64)), "text/html"),
        ("/assets/style.css", "text/css"),
        ("/assets/download.js", "text/javascript"),
        ("/assets/common.js", "text/javascript"),
        ("/assets/build.js", "text/javascript"),
        ("/assets/history.js", "text/javascript"),
        ("/assets/recent.js", "text/javascript"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = r.text().await.unwrap();
        if kind == "text/html" {
            // No inline script or style for the policy to refuse.
            assert!(
                !body.contains("<script>") && !body.contains("<style"),
                "{path}"
            );
            assert!(!body.contains(" style="), "{path}");
            assert!(
                !body.contains("http://") && !body.contains("//cdn"),
                "{path}"
            );
        }
        // Revalidation by ETag.
        let etag = h["etag"].to_str().unwrap().to_owned();
        let again = http
            .get(format!("{base}{path}"))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    for (path, status, says) in [
        ("/assets/nope.js", 404, "no asset"),
        ("/assets/..%2Fconfig.yml", 404, "no asset"),
        ("/build/not-a-key", 400, "invalid build key"),
        ("/build/not-a-key/history", 400, "invalid build key"),
        ("/api/resolve?os=linux", 400, "arch"),
        ("/api/resolve?os=linux&arch=amd64&force=1", 400, "force"),
        (
            "/api/resolve?os=linux&arch=amd64&p=example.com/nowhere",
            400,
            "example.com/nowhere",
        ),
        ("/api/events?last=0", 400, "last"),
        ("/api/events?last=5&after=0-0", 400, "either"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }

    // What the page offers: Caddy versions from the proxy, releases first.
    let options = site.get("/api/options").await;
    assert_eq!(
        options["result"]["caddy_versions"],
        serde_json::json!(["v2.8.4", "v2.7.6", "v2.9.0-beta.1"])
    );
    let platforms = options["result"]["platforms"].as_array().unwrap();
    assert!(platforms.contains(&serde_json::json!({"os": "linux", "arch": "arm64"})));
    assert_eq!(options["result"]["replacements_allowed"], false);

    // A resolution records nothing, and names the key a submission gets.
    let q = "os=linux&arch=amd64&p=github.com/acme/alpha";
    let r = site.get(&format!("/api/resolve?{q}")).await;
    assert_eq!(r["result"]["request"]["caddy_version"], "v2.8.4");
    assert_eq!(
        r["result"]["request"]["plugins"],
        serde_json::json!([{"module": "github.com/acme/alpha", "version": "v1.1.0"}])
    );
    assert_eq!(r["result"]["build"], Value::Null);
    let key = r["result"]["key"].as_str().unwrap().to_owned();
    let feed = site.get("/api/events?last=5").await;
    assert!(
        feed["result"]["events"].as_array().unwrap().is_empty(),
        "a resolution recorded something: {feed}"
    );
    assert_eq!(site.submit(q).await, key);
    let r = site.get(&format!("/api/resolve?{q}")).await;
    assert_eq!(r["result"]["build"]["status"], "queued");

    // Queue positions (no worker runs): the first is next, the second has one ahead.
    let second = site.submit("os=linux&arch=arm64").await;
    assert_eq!(
        site.get(&format!("/api/build/{key}")).await["result"]["queue_position"],
        0
    );
    assert_eq!(
        site.get(&format!("/api/build/{second}")).await["result"]["queue_position"],
        1
    );

    // The newest events, and a cursor that reads on from them.
    let tail = site.get("/api/events?last=1").await;
    let events = tail["result"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["key"], second.as_str());
    assert_eq!(events[0]["type"], "requested");
    let next = tail["result"]["next"].as_str().unwrap();
    let on = site.get(&format!("/api/events?after={next}")).await;
    assert!(
        on["result"]["events"].as_array().unwrap().is_empty(),
        "{on}"
    );
    let both = site.get("/api/events?last=10&type=requested").await;
    assert_eq!(both["result"]["events"].as_array().unwrap().len(), 2);
}

/// Nothing on the page reaches past the window's width (no sideways scrolling).
async fn fits_the_width(b: &Browser) {
    let wider = b
        .eval(
            "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1).map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))",
        )
        .await;
    assert_eq!(wider, serde_json::json!([]), "wider than the window");
}

/// The plugin checkbox of `module` on the download page.
fn checkbox(module: &str) -> String {
    format!("input[type=checkbox][data-module=\"{module}\"]")
}

#[tokio::test(flavor = "multi_thread")]
async fn pick_two_plugins_build_watch_the_steps_and_download() {
    let _one = BROWSER.lock().await;
    let site = Site::start().await;
    site.start_worker();
    let b = Browser::start().await;
    let base = &site.base;
    b.goto(&format!("{base}/?os=linux&arch=amd64")).await;
    b.wait_for(
        "the plugin list",
        "document.querySelectorAll('#plugins li').length === 5",
        DEADLINE,
    )
    .await;
    // Filter, then select two.
    b.type_into("#filter", "acme").await;
    b.wait_for(
        "the filter",
        "document.querySelectorAll('#plugins li').length === 2",
        DEADLINE,
    )
    .await;
    b.click(&checkbox("github.com/acme/alpha")).await;
    b.click(&checkbox("github.com/Acme/Beta")).await;
    b.wait_for(
        "the count",
        "document.getElementById('selected-count').textContent === '2 plugins selected'",
        DEADLINE,
    )
    .await;
    let url = b.current_url().await;
    assert!(
        url.contains("package=github.com%2FAcme%2FBeta")
            && url.contains("package=github.com%2Facme%2Falpha"),
        "{url}"
    );
    // What `latest` resolves to, before building.
    b.click("#check").await;
    b.wait_for(
        "the resolution",
        "document.querySelector('#resolved dl') !== null",
        DEADLINE,
    )
    .await;
    let resolved = b
        .eval("document.getElementById('resolved').innerText")
        .await;
    let resolved = resolved.as_str().unwrap();
    assert!(
        resolved.contains("v2.8.4") && resolved.contains("v0.2.0") && resolved.contains("v1.1.0"),
        "{resolved}"
    );
    b.screenshot(&screenshots().join("download-desktop.png"))
        .await;
    b.click("#download").await;
    b.wait_for(
        "the build page",
        "location.pathname.startsWith('/build/')",
        DEADLINE,
    )
    .await;
    let key = b
        .eval("location.pathname.split('/')[2]")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        resolved.contains(&key),
        "the page showed another key: {resolved}"
    );
    b.wait_for(
        "success",
        "document.getElementById('result').className === 'ok'",
        DEADLINE,
    )
    .await;
    // Every step advanced to done, with the duration the worker reported.
    let steps = b
        .eval("[...document.querySelectorAll('#steps li')].filter(l => !l.hidden).map(l => [l.dataset.step, l.className, l.lastChild.textContent])")
        .await;
    let steps = steps.as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "initialize_module",
            "pin_versions",
            "tidy_module",
            "compile"
        ]
    );
    for s in steps {
        assert_eq!(s[1], "done", "{s}");
        assert!(s[2].as_str().unwrap().ends_with(" s"), "no duration: {s}");
    }
    assert_eq!(b.eval("document.getElementById('progress').value").await, 4);
    // The download, as the API describes it.
    let file = b.downloaded(DEADLINE).await;
    let status = site.get(&format!("/api/build/{key}")).await;
    assert_eq!(
        sha256_file(&file),
        status["result"]["artifact"]["sha256"].as_str().unwrap()
    );
    assert_eq!(file.file_name().unwrap(), "caddy");
    // The verification commands name this server's key and the binary's checksum.
    let verify = b.eval("document.getElementById('verify').innerText").await;
    let verify = verify.as_str().unwrap();
    let public_key =
        std::fs::read_to_string(site.app_config.signing.key_file.with_extension("key.pub"))
            .unwrap();
    assert!(
        verify.contains(public_key.lines().last().unwrap().trim()),
        "{verify}"
    );
    assert!(verify.contains(status["result"]["artifact"]["sha256"].as_str().unwrap()));
    b.screenshot(&screenshots().join("build-desktop.png")).await;
    accessible(&b).await;
    b.resize(390, 844).await;
    b.screenshot(&screenshots().join("build-phone.png")).await;
    // At a phone's width nothing is wider than the screen.
    fits_the_width(&b).await;
    // The history page: the audit trail.
    b.goto(&format!("{base}/build/{key}/history")).await;
    b.wait_for(
        "the history",
        "document.querySelector('#events tr[data-type=succeeded]') !== null",
        DEADLINE,
    )
    .await;
    let types = b
        .eval("[...document.querySelectorAll('#events tr')].map(r => r.dataset.type)")
        .await;
    let types: Vec<&str> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"requested"));
    assert!(types.contains(&"claimed") && types.contains(&"step_started"));
    // Below the events, the build's output (its own table).
    b.wait_for(
        "the output",
        "document.getElementById('output').textContent.includes('--- attempt 1 ---')",
        DEADLINE,
    )
    .await;
    // The download page at a phone's width, with the selection from the link.
    b.goto(&format!(
        "{base}/?package=github.com/acme/alpha&package=github.com/Acme/Beta&os=linux&arch=arm64"
    ))
    .await;
    b.wait_for(
        "the deep link",
        "document.getElementById('selected-count').textContent === '2 plugins selected'",
        DEADLINE,
    )
    .await;
    fits_the_width(&b).await;
    b.screenshot(&screenshots().join("download-phone.png"))
        .await;
    accessible(&b).await;
    // Dark mode follows the system setting, still readable.
    b.cmd(
        "POST",
        "/goog/cdp/execute",
        serde_json::json!({"cmd": "Emulation.setEmulatedMedia", "params": {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}}),
    )
    .await
    .unwrap();
    let background = b
        .eval("getComputedStyle(document.body).backgroundColor")
        .await;
    assert_eq!(background, "rgb(15, 18, 22)");
    accessible(&b).await;
    b.screenshot(&screenshots().join("download-phone-dark.png"))
        .await;
    // A build that is done downloads at once, from the download page itself.
    b.resize(1280, 900).await;
    b.goto(&format!(
        "{base}/?package=github.com/acme/alpha&package=github.com/Acme/Beta&os=linux&arch=amd64"
    ))
    .await;
    b.wait_for(
        "the deep link",
        "document.getElementById('selected-count').textContent === '2 plugins selected'",
        DEADLINE,
    )
    .await;
    b.click("#check").await;
    b.wait_for(
        "the offer to download at once",
        "document.getElementById('download-now') !== null",
        DEADLINE,
    )
    .await;
    // (The browser saves a file of the same name over the first: make room for it.)
    let first = sha256_file(&file);
    std::fs::remove_file(&file).unwrap();
    b.click("#download").await;
    let again = b.downloaded(DEADLINE).await;
    assert_eq!(sha256_file(&again), first);
    assert_eq!(b.eval("location.pathname").await, "/");
    same_origin_only(&b, base, false).await;
}

/// Every control has a name a screen reader can say, and text has at least WCAG AA
/// contrast (4.5:1) against the background it is drawn on.
async fn accessible(b: &Browser) {
    let unnamed = b
        .eval(
            "[...document.querySelectorAll('input, select, textarea, button, a')].filter(e => e.offsetParent !== null).filter(e => !(e.getAttribute('aria-label') || (e.id && document.querySelector(`label[for='${e.id}']`)) || e.closest('label') || e.textContent.trim())).map(e => e.outerHTML.slice(0, 80))",
        )
        .await;
    assert_eq!(unnamed, serde_json::json!([]), "controls without a name");
    let low = b
        .eval(
            r#"(() => {
  const rgb = (c) => { const m = c.match(/[\d.]+/g); return m ? m.map(Number) : [0, 0, 0, 0]; };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const bg = (e) => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.length < 4 || c[3] > 0) return c; } return [255, 255, 255]; };
  const out = [];
  for (const e of document.querySelectorAll('body *')) {
    if (e.offsetParent === null || ![...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    if (e.closest('option')) continue;
    const s = getComputedStyle(e);
    const a = lum(rgb(s.color)), b = lum(bg(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) out.push(`${e.tagName}#${e.id}.${e.className} ${ratio.toFixed(2)}`);
  }
  return out;
})()"#,
        )
        .await;
    assert_eq!(low, serde_json::json!([]), "text below 4.5:1 contrast");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_does_not_compile_shows_the_compilers_error() {
    let _one = BROWSER.lock().await;
    let site = Site::start().await;
    site.start_worker();
    let b = Browser::start().await;
    let base = &site.base;
    // A deep link preselects the plugin.
    b.goto(&format!(
        "{base}/?package=example.com/broken&os=linux&arch=amd64"
    ))
    .await;
    b.wait_for(
        "the deep link",
        &format!(
            "document.querySelector('{}')?.checked === true",
            checkbox("example.com/broken").replace('\'', "\\'")
        ),
        DEADLINE,
    )
    .await;
    assert_eq!(
        b.eval("document.getElementById('selected-count').textContent")
            .await,
        "1 plugin selected"
    );
    b.click("#download").await;
    b.wait_for(
        "the failure",
        "document.getElementById('result').className === 'error'",
        DEADLINE,
    )
    .await;
    let result = b
        .eval("document.getElementById('result').textContent")
        .await;
    assert!(
        result.as_str().unwrap().contains("undefinedFunction"),
        "{result}"
    );
    // The failing step is marked, and its output is open and holds the compiler's words.
    let failed = b
        .eval("document.querySelector('#steps li.failed')?.dataset.step")
        .await;
    assert_eq!(failed, "compile");
    let open = b
        .eval("[...document.querySelectorAll('#log details')].filter(d => d.open).map(d => d.querySelector('pre').textContent)")
        .await;
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert!(
        open[0]
            .as_str()
            .unwrap()
            .contains("undefined: undefinedFunction"),
        "{open:?}"
    );
    assert_eq!(std::fs::read_dir(b.downloads.path()).unwrap().count(), 0);
    same_origin_only(&b, base, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_build_page_resumes_after_an_api_restart_without_duplicates() {
    let _one = BROWSER.lock().await;
    let mut site = Site::start().await;
    let b = Browser::start().await;
    let base = site.base.clone();
    let key = site
        .submit("os=windows&arch=amd64&p=example.com/gamma/v2")
        .await;
    b.goto(&format!("{base}/build/{key}")).await;
    b.wait_for(
        "the queue position",
        "document.getElementById('state').textContent.startsWith('Queued: next in line')",
        DEADLINE,
    )
    .await;
    site.start_worker();
    // The build runs; its first lines are on the page. Then the api dies and comes back.
    b.wait_for(
        "the first log lines",
        "document.querySelector('#log pre[data-step=initialize_module]')?.textContent.length > 0",
        DEADLINE,
    )
    .await;
    site.kill_api();
    b.wait_for(
        "the page to notice",
        "document.getElementById('state').textContent.startsWith('Connection lost')",
        DEADLINE,
    )
    .await;
    site.start_api().await;
    b.wait_for(
        "success",
        "document.getElementById('result').className === 'ok'",
        DEADLINE,
    )
    .await;
    let ended = site.wait_ended(&key).await;
    assert_eq!(ended["result"]["status"], "complete");
    let file = b.downloaded(DEADLINE).await;
    assert_eq!(file.file_name().unwrap(), "caddy.exe");
    assert_eq!(
        sha256_file(&file),
        ended["result"]["artifact"]["sha256"].as_str().unwrap()
    );
    // Every output line of the build is on the page exactly as often as it was stored.
    let output = site.get(&format!("/api/build/{key}/output")).await;
    let mut want: HashMap<String, usize> = HashMap::new();
    for c in output["result"]["chunks"].as_array().unwrap() {
        for l in c["lines"].as_array().unwrap() {
            *want.entry(l.as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    assert!(!want.is_empty());
    let page = b
        .eval("[...document.querySelectorAll('#log pre')].map(p => p.textContent).join('')")
        .await;
    let mut got: HashMap<String, usize> = HashMap::new();
    for l in page.as_str().unwrap().lines() {
        *got.entry(l.to_owned()).or_default() += 1;
    }
    for (line, n) in &want {
        assert_eq!(
            got.get(line),
            Some(n),
            "line {line:?} on the page {:?} times, in the log {n}",
            got.get(line)
        );
    }
    same_origin_only(&b, &base, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keyboard_alone_selects_a_plugin_and_starts_a_build() {
    let _one = BROWSER.lock().await;
    let site = Site::start().await;
    let b = Browser::start().await;
    let base = &site.base;
    b.goto(&format!("{base}/?os=linux&arch=amd64")).await;
    b.wait_for(
        "the plugin list",
        "document.querySelectorAll('#plugins li').length === 5",
        DEADLINE,
    )
    .await;
    /// Presses Tab until the focus is on `css` (at most 40 times).
    async fn tab_to(b: &Browser, css: &str) {
        for _ in 0..40 {
            let here = b
                .eval(&format!(
                    "document.activeElement === document.querySelector('{css}')"
                ))
                .await;
            if here == true {
                return;
            }
            b.press(&[keys::TAB]).await;
        }
        panic!("Tab never reached {css}");
    }
    tab_to(&b, "#filter").await;
    b.press(&["g", "a", "m", "m", "a"]).await;
    b.wait_for(
        "the filter",
        "document.querySelectorAll('#plugins li').length === 1",
        DEADLINE,
    )
    .await;
    tab_to(&b, "#plugins input[type=checkbox]").await;
    b.press(&[keys::SPACE]).await;
    b.wait_for(
        "the selection",
        "document.getElementById('selected-count').textContent === '1 plugin selected'",
        DEADLINE,
    )
    .await;
    // Focus is visible where it is.
    let outline = b
        .eval("getComputedStyle(document.activeElement, ':focus-visible').outlineStyle")
        .await;
    assert_ne!(outline, "none");
    tab_to(&b, "#download").await;
    b.press(&[keys::ENTER]).await;
    b.wait_for(
        "the build page",
        "location.pathname.startsWith('/build/')",
        DEADLINE,
    )
    .await;
    let key = b.eval("location.pathname.split('/')[2]").await;
    let status = site
        .get(&format!("/api/build/{}", key.as_str().unwrap()))
        .await;
    assert_eq!(
        status["result"]["request"]["plugins"][0]["module"],
        "example.com/gamma/v2"
    );
    same_origin_only(&b, base, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recent_builds_follow_the_feed_live() {
    let _one = BROWSER.lock().await;
    let site = Site::start().await;
    let b = Browser::start().await;
    let base = &site.base;
    let first = site.submit("os=linux&arch=amd64").await;
    b.goto(&format!("{base}/recent")).await;
    b.wait_for(
        "the build already asked for",
        &format!("document.querySelector('#builds tr[data-key=\"{first}\"]') !== null"),
        DEADLINE,
    )
    .await;
    let second = site.submit("os=freebsd&arch=amd64").await;
    b.wait_for(
        "a new build, live",
        &format!("document.querySelector('#builds tr:first-child')?.dataset.key === '{second}'"),
        DEADLINE,
    )
    .await;
    let row = b
        .eval("document.querySelector('#builds tr:first-child').innerText")
        .await;
    assert!(row.as_str().unwrap().contains("freebsd/amd64"), "{row}");
    assert!(row.as_str().unwrap().contains("Queued"), "{row}");
    same_origin_only(&b, base, false).await;
}
