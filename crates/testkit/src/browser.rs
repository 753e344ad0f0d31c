//! A real browser for the web page tests: Debian's chromium, headless, driven through
//! chromedriver's W3C WebDriver protocol (plain HTTP and JSON, spoken here with reqwest),
//! with the browser's own network log (chromedriver's performance log) and downloads into a
//! directory of the test's.
//!
//! Waits for page state run inside the page: a script watches the document with a
//! MutationObserver until a condition holds or the deadline passes (no polling from here).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The chromium and chromedriver of Debian's packages.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether this machine has the browser (the tests say how to install it when not).
pub fn available() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

/// Key codes of the WebDriver protocol.
pub mod keys {
    pub const TAB: &str = "\u{E004}";
    pub const ENTER: &str = "\u{E007}";
    pub const SPACE: &str = "\u{E00D}";
}

/// A browser session; the browser and its driver end when it is dropped.
#[derive(Debug)]
pub struct Browser {
    http: reqwest::Client,
    url: String,
    driver: Child,
    profile: tempfile::TempDir,
    pub downloads: tempfile::TempDir,
}

/// A WebDriver error, with the driver's message.
#[derive(Debug)]
pub struct DriverError(pub String);

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Browser {
    /// Starts chromedriver on a free port and a headless chromium session (1280x900).
    pub async fn start() -> Browser {
        assert!(
            available(),
            "the browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        // chromedriver says when it listens; the rest of what it prints is read and dropped.
        let (up, is_up) = tokio::sync::oneshot::channel();
        let out = driver.stdout.take().expect("chromedriver's stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut up = Some(up);
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("started successfully") {
                    if let Some(up) = up.take() {
                        let _ = up.send(());
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), is_up)
            .await
            .ok()
            .and_then(Result::ok)
            .expect("chromedriver never said it started");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let profile = tempfile::tempdir().unwrap();
        let downloads = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--no-default-browser-check",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--metrics-recording-only", "--disable-default-apps",
                    // No network here for Safe Browsing's scan of a downloaded program.
                    "--safebrowsing-disable-download-protection",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
                "prefs": {
                    "download.default_directory": downloads.path(),
                    "download.prompt_for_download": false,
                    "safebrowsing": {"enabled": false, "disable_download_protection": true},
                    // A second download from one site asks first; a user says yes once.
                    "profile": {"default_content_setting_values": {"automatic_downloads": 1}},
                },
            },
            "goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"},
            "timeouts": {"script": 120_000, "pageLoad": 60_000, "implicit": 0},
        }}});
        let mut browser = Browser {
            http,
            url,
            driver,
            profile,
            downloads,
        };
        let session = browser
            .raw("POST", "/session", caps)
            .await
            .expect("creating a browser session");
        let id = session["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        browser.url = format!("{}/session/{id}", browser.url);
        // Downloads go to our directory without asking (headless needs this said).
        let dir = browser.downloads.path().display().to_string();
        browser
            .cmd(
                "POST",
                "/goog/cdp/execute",
                json!({"cmd": "Browser.setDownloadBehavior",
                       "params": {"behavior": "allow", "downloadPath": dir}}),
            )
            .await
            .expect("setting the download directory");
        // The browser's own start page made requests of its own: start the log afresh.
        browser.goto("about:blank").await;
        browser.requested_urls().await;
        browser.console().await;
        browser
    }

    async fn raw(&self, method: &str, path: &str, body: Value) -> Result<Value, DriverError> {
        let base = self.url.split("/session/").next().unwrap_or(&self.url);
        self.send(method, &format!("{base}{path}"), body).await
    }

    async fn send(&self, method: &str, url: &str, body: Value) -> Result<Value, DriverError> {
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| DriverError(format!("{method} {url}: {e}")))?;
        let ok = resp.status().is_success();
        let v: Value = resp
            .json()
            .await
            .map_err(|e| DriverError(format!("{method} {url}: {e}")))?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(DriverError(format!(
                "{method} {url}: {} {}",
                v["value"]["error"], v["value"]["message"]
            )))
        }
    }

    /// A command of this session (`path` after `/session/{id}`).
    pub async fn cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, DriverError> {
        self.send(method, &format!("{}{path}", self.url), body)
            .await
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}))
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    pub async fn current_url(&self) -> String {
        self.cmd("GET", "/url", Value::Null)
            .await
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value, DriverError> {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Waits until the JavaScript expression `condition` is true in the page (watched with
    /// a MutationObserver, and re-checked every 250 ms for state the DOM does not show), or
    /// panics after `timeout` naming `what`. Survives the page navigating meanwhile.
    pub async fn wait_for(&self, what: &str, condition: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let page = self.page_text().await;
                panic!("timed out waiting for {what} ({condition}); the page says:\n{page}");
            }
            let ms = left.min(Duration::from_secs(60)).as_millis();
            let script = format!(
                r#"const done = arguments[arguments.length - 1];
const check = () => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }};
if (check()) {{ done(true); return; }}
let timer = null, tick = null;
const finish = (v) => {{ obs.disconnect(); clearTimeout(timer); clearInterval(tick); done(v); }};
const obs = new MutationObserver(() => {{ if (check()) finish(true); }});
obs.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});
tick = setInterval(() => {{ if (check()) finish(true); }}, 250);
timer = setTimeout(() => finish(check()), {ms});"#
            );
            match self
                .cmd(
                    "POST",
                    "/execute/async",
                    json!({"script": script, "args": []}),
                )
                .await
            {
                Ok(Value::Bool(true)) => return,
                Ok(_) => {}
                // The page navigated away under the script: the next call waits for the new
                // page to load, then watches it.
                Err(_) => {}
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&self, expression: &str) -> Value {
        self.execute(&format!("return ({expression});"), json!([]))
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// The page's visible text.
    pub async fn page_text(&self) -> String {
        self.execute(
            "return document.body ? document.body.innerText : '';",
            json!([]),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
    }

    /// The element `css` matches (the first), as a WebDriver element reference.
    pub async fn find(&self, css: &str) -> Value {
        let v = self
            .cmd(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await
            .unwrap_or_else(|e| panic!("finding {css}: {e}"));
        v
    }

    fn element_id(el: &Value) -> String {
        el.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element reference")
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{}/click", Self::element_id(&el)),
            json!({}),
        )
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Types `text` into the element `css` matches.
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{}/value", Self::element_id(&el)),
            json!({"text": text}),
        )
        .await
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Presses keys (see [`keys`]) on whatever has the focus, as a keyboard user does.
    pub async fn press(&self, keys: &[&str]) {
        let mut actions = Vec::new();
        for k in keys {
            actions.push(json!({"type": "keyDown", "value": k}));
            actions.push(json!({"type": "keyUp", "value": k}));
        }
        self.cmd(
            "POST",
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await
        .unwrap_or_else(|e| panic!("pressing keys: {e}"));
    }

    /// Resizes the window (the viewport follows).
    pub async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await
        .unwrap_or_else(|e| panic!("resizing: {e}"));
    }

    /// Saves a PNG of the viewport at `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let v = self
            .cmd("GET", "/screenshot", Value::Null)
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Every URL the browser requested since the last call, from its own network log.
    pub async fn requested_urls(&self) -> Vec<String> {
        let entries = match self
            .cmd("POST", "/se/log", json!({"type": "performance"}))
            .await
        {
            Ok(v) => v,
            Err(_) => self
                .cmd("POST", "/log", json!({"type": "performance"}))
                .await
                .unwrap_or_else(|e| panic!("reading the network log: {e}")),
        };
        let mut urls = Vec::new();
        for e in entries.as_array().into_iter().flatten() {
            let Some(text) = e["message"].as_str() else {
                continue;
            };
            let Ok(m) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if m["message"]["method"] == "Network.requestWillBeSent" {
                if let Some(u) = m["message"]["params"]["request"]["url"].as_str() {
                    urls.push(u.to_owned());
                }
            }
        }
        urls
    }

    /// The browser console's messages since the last call (errors, CSP reports).
    pub async fn console(&self) -> Vec<String> {
        let entries = match self
            .cmd("POST", "/se/log", json!({"type": "browser"}))
            .await
        {
            Ok(v) => v,
            Err(_) => self
                .cmd("POST", "/log", json!({"type": "browser"}))
                .await
                .unwrap_or_default(),
        };
        entries
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{} {}", e["level"], e["message"]))
            .collect()
    }

    /// Waits for a finished download in the download directory (a poll: the browser tells
    /// nothing when it is done); returns its path.
    pub async fn downloaded(&self, timeout: Duration) -> PathBuf {
        self.downloads_done(1, timeout).await.remove(0)
    }

    /// Waits until `n` downloads have finished; returns them, oldest first.
    pub async fn downloads_done(&self, n: usize, timeout: Duration) -> Vec<PathBuf> {
        let until = Instant::now() + timeout;
        loop {
            let mut files: Vec<(std::time::SystemTime, PathBuf)> =
                std::fs::read_dir(self.downloads.path())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                    .collect();
            let partial = files.iter().any(|(_, p)| {
                p.extension()
                    .is_some_and(|x| x == "crdownload" || x == "tmp")
            });
            if !partial && files.len() >= n {
                files.sort();
                return files.into_iter().map(|(_, p)| p).collect();
            }
            assert!(
                Instant::now() < until,
                "{n} download(s) did not finish in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // The browser outlives a killed driver: end it by its profile directory.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("user-data-dir={}", self.profile.path().display()))
            .status();
    }
}
