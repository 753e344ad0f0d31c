//! `caddy-build-server client ...`: a client of a build server, for people and scripts,
//! speaking the wire formats of `cbs-api-types`. A subcommand group of the one binary (not a
//! second binary): one download, one version, and it shares the server's own readers of
//! build information and signatures, so the client checks exactly what the server signs.
//!
//! The server comes from `--server` or `CBS_SERVER`. Its signing key is pinned on first use
//! in the user's config directory (`$CBS_CLIENT_DIR`, else `$XDG_CONFIG_HOME` or
//! `~/.config`, then `caddy-build-server/keys/`); a key that changed later is an error that
//! says so, unless `--public-key` names the key to trust.
//!
//! Exit codes: 0 ok; 1 the build failed; 2 bad input (arguments, a file, a request the
//! server refused); 3 verification failed (unknown binary, bad signature, mismatching build
//! information, a changed key); 4 the server cannot be reached or failed.

// Printing is this module's interface: answers on stdout, failures and notes on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cbs_api_types as wire;
use sha2::Digest;

use crate::cli::ClientCommand;

mod progress;
use progress::Progress;

/// Why the client stopped; each kind has its exit code.
#[derive(Debug)]
pub enum Failure {
    BuildFailed(String),
    BadInput(String),
    /// The server has no such thing (a bad input, unless the caller knows better).
    NotFound(String),
    Verification(String),
    Unreachable(String),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::BuildFailed(_) => 1,
            Failure::BadInput(_) | Failure::NotFound(_) => 2,
            Failure::Verification(_) => 3,
            Failure::Unreachable(_) => 4,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::BuildFailed(m)
            | Failure::BadInput(m)
            | Failure::NotFound(m)
            | Failure::Verification(m)
            | Failure::Unreachable(m) => m,
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// Runs a client command; prints its failure and returns the exit code.
pub async fn run(server: String, command: ClientCommand) -> ExitCode {
    let client = match Client::new(&server) {
        Ok(c) => c,
        Err(f) => return fail(&f),
    };
    let result = match command {
        ClientCommand::PublicKey { public_key } => client
            .public_key(public_key.as_deref())
            .await
            .map(|k| print!("{k}")),
        ClientCommand::Build {
            os,
            arch,
            arm,
            caddy_version,
            plugins,
            replacements,
            output,
            public_key,
            quiet,
            json,
        } => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("os", &os).append_pair("arch", &arch);
            if let Some(a) = &arm {
                q.append_pair("arm", a);
            }
            q.append_pair("version", &caddy_version);
            for p in &plugins {
                q.append_pair("p", p);
            }
            for r in &replacements {
                q.append_pair("r", r);
            }
            client
                .build(
                    &q.finish(),
                    &output,
                    public_key.as_deref(),
                    quiet || json,
                    json,
                )
                .await
        }
        ClientCommand::Status { key } => client.status(&key).await,
        ClientCommand::History { key } => client.history(&key).await,
        ClientCommand::Watch { types, last, count } => {
            client.watch(types.as_deref(), last, count).await
        }
        ClientCommand::Verify { file, public_key } => {
            client.verify(&file, public_key.as_deref()).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(&f),
    }
}

fn fail(f: &Failure) -> ExitCode {
    eprintln!("error: {}", f.message());
    ExitCode::from(f.code())
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(server: &str) -> Result<Client> {
        let base = server.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|e| {
            Failure::BadInput(format!(
                "--server {server:?} is not a URL ({e}); give one like https://builds.example.com"
            ))
        })?;
        if !["http", "https"].contains(&url.scheme()) {
            return Err(Failure::BadInput(format!(
                "--server {server:?}: only http and https servers"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!(
                "caddy-build-server-client/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| Failure::Unreachable(format!("cannot make an HTTP client: {e}")))?;
        Ok(Client { base, http })
    }

    /// GETs `path`; the body of a 2xx answer, or the failure the status means.
    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        self.send(self.http.get(format!("{}{path}", self.base)), path)
            .await
    }

    async fn send(&self, req: reqwest::RequestBuilder, path: &str) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            Failure::Unreachable(format!(
                "cannot reach {}: {e}; check the address (--server or CBS_SERVER) and your network",
                self.base
            ))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<wire::ErrorBody>(&body)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| body.chars().take(200).collect());
        let said = format!("{} answered {status} to {path}: {message}", self.base);
        Err(if status.is_server_error() {
            Failure::Unreachable(said)
        } else if status == reqwest::StatusCode::NOT_FOUND {
            Failure::NotFound(said)
        } else {
            Failure::BadInput(said)
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.get(path).await?;
        self.read_json(resp, path).await
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        path: &str,
    ) -> Result<T> {
        resp.json::<wire::Envelope<T>>()
            .await
            .map(|e| e.result)
            .map_err(|e| {
                Failure::Unreachable(format!(
                    "{} answered {path} with something that is not this API's JSON: {e}",
                    self.base
                ))
            })
    }

    /// The server's public key file: the one given, else the pinned one (checked against
    /// what the server serves now), else the server's, pinned from now on.
    async fn public_key(&self, given: Option<&Path>) -> Result<String> {
        if let Some(p) = given {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Failure::BadInput(format!("--public-key {}: {e}", p.display())))?;
            cbs_signing::parse_public_key(&text)
                .map_err(|e| Failure::BadInput(format!("--public-key {}: {e}", p.display())))?;
            return Ok(text);
        }
        let served = self
            .get("/api/public-key")
            .await?
            .text()
            .await
            .map_err(|e| Failure::Unreachable(format!("reading the public key: {e}")))?;
        let served_key = cbs_signing::parse_public_key(&served).map_err(|e| {
            Failure::Verification(format!("the server's public key is not valid: {e}"))
        })?;
        let pin = pin_file(&self.base)?;
        match std::fs::read_to_string(&pin) {
            Ok(pinned) => {
                let pinned_key = cbs_signing::parse_public_key(&pinned).map_err(|e| {
                    Failure::Verification(format!(
                        "the pinned key {} is not valid: {e}",
                        pin.display()
                    ))
                })?;
                if pinned_key != served_key {
                    return Err(Failure::Verification(format!(
                        "the signing key of {} changed: pinned {pinned_key} (in {}), now served {served_key}. If the operator rotated the key, check the new one with them, then delete the pinned file or pass --public-key",
                        self.base,
                        pin.display()
                    )));
                }
                Ok(pinned)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = pin.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Failure::BadInput(format!("creating {}: {e}", dir.display()))
                    })?;
                }
                std::fs::write(&pin, &served).map_err(|e| {
                    Failure::BadInput(format!("pinning the key in {}: {e}", pin.display()))
                })?;
                eprintln!(
                    "pinned the signing key of {} ({served_key}) in {}",
                    self.base,
                    pin.display()
                );
                Ok(served)
            }
            Err(e) => Err(Failure::BadInput(format!("reading {}: {e}", pin.display()))),
        }
    }

    async fn status(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let b: wire::Build = self.json(&format!("/api/build/{key}")).await?;
        let r = &b.request;
        println!("build {}", b.key);
        println!("status   {}", status_word(b.status));
        println!("caddy    {} for {}", r.caddy_version, platform(r));
        for p in &r.plugins {
            println!("plugin   {}@{}", p.module, p.version);
        }
        for x in &r.replacements {
            println!("replace  {} => {}@{}", x.old, x.new, x.version);
        }
        if let Some(a) = &b.artifact {
            println!("binary   {} bytes, sha256 {}", a.size, a.sha256);
            if let Some(w) = &a.built_by {
                println!("built by {w}");
            }
        }
        if let Some(x) = &b.reproduction {
            println!("reproduction {}", reproduction_line(x));
        }
        if let Some(p) = b.queue_position {
            println!("queue    {p} ahead");
        }
        if let Some(e) = &b.error {
            println!("error    {}", e.message);
        }
        match b.status {
            wire::BuildStatus::Failed
            | wire::BuildStatus::GaveUp
            | wire::BuildStatus::Cancelled => Err(Failure::BuildFailed(format!(
                "build {key} {}",
                status_word(b.status)
            ))),
            _ => Ok(()),
        }
    }

    async fn history(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let mut after = 0;
        loop {
            let page: wire::HistoryPage = self
                .json(&format!("/api/build/{key}/history?after={after}"))
                .await?;
            for e in &page.events {
                // `{"data", "seq", "time", "type"}` as the api writes it.
                let data = serde_json::to_value(e).unwrap_or_default();
                println!(
                    "{:>4} {} {:<14} {}",
                    e.seq,
                    e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    data["type"].as_str().unwrap_or(""),
                    data["data"]
                );
            }
            match page.next {
                Some(n) => after = n,
                None => return Ok(()),
            }
        }
    }

    /// `client watch`: the newest events, then the feed as it grows (read every 2 s: the
    /// feed has no long-poll).
    async fn watch(&self, types: Option<&str>, last: u32, count: u64) -> Result<()> {
        let filter = types
            .map(|t| {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("type", t);
                format!("&{}", q.finish())
            })
            .unwrap_or_default();
        let mut shown = 0u64;
        let mut page: wire::FeedPage = self
            .json(&format!("/api/events?last={}{filter}", last.clamp(1, 1000)))
            .await?;
        let mut first = true;
        loop {
            // `last` shows at most what was asked for; later pages all of theirs.
            let skip = if first && last == 0 {
                page.events.len()
            } else {
                0
            };
            first = false;
            for e in page.events.iter().skip(skip) {
                let v = serde_json::to_value(e).unwrap_or_default();
                let key = v["key"].as_str().unwrap_or("");
                println!(
                    "{} {} {:<14} {}",
                    e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    key.get(..12).unwrap_or(key),
                    v["type"].as_str().unwrap_or(""),
                    v["data"]
                );
                shown += 1;
                if count > 0 && shown >= count {
                    return Ok(());
                }
            }
            if page.events.is_empty() {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            let next = page.next.clone();
            page = loop {
                match self
                    .json(&format!("/api/events?after={next}&limit=1000{filter}"))
                    .await
                {
                    Ok(p) => break p,
                    // A server restarting: keep watching.
                    Err(Failure::Unreachable(m)) => {
                        eprintln!("({m}; trying again)");
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                    Err(f) => return Err(f),
                }
            };
        }
    }

    /// `client build`: ask, follow, download, check, write.
    async fn build(
        &self,
        query: &str,
        output: &Path,
        public_key: Option<&Path>,
        quiet: bool,
        json: bool,
    ) -> Result<()> {
        let progress = Progress::new(quiet);
        let key_text = self.public_key(public_key).await?;
        let path = format!("/api/build?{query}");
        let resp = self
            .send(self.http.post(format!("{}{path}", self.base)), "/api/build")
            .await?;
        let b: wire::Build = self.read_json(resp, "/api/build").await?;
        let key = b.key.clone();
        {
            progress.note(&format!(
                "build {key}: Caddy {} for {}{}",
                b.request.caddy_version,
                platform(&b.request),
                if b.request.plugins.is_empty() {
                    String::new()
                } else {
                    format!(
                        " with {}",
                        b.request
                            .plugins
                            .iter()
                            .map(|p| format!("{}@{}", p.module, p.version))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        }
        if b.status != wire::BuildStatus::Succeeded {
            if let Err(f) = self.follow(&key, &progress).await {
                progress.finish();
                return Err(f);
            }
        }
        let b: wire::Build = self.json(&format!("/api/build/{key}")).await?;
        let Some(artifact) = b.artifact.clone() else {
            return Err(Failure::BuildFailed(format!(
                "build {key} is {} and has no binary",
                status_word(b.status)
            )));
        };
        let part = output.with_extension("part");
        let bytes = self.download(&key, &part, artifact.size, &progress).await;
        progress.finish();
        let bytes = bytes?;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let discard = |why: String| {
            let _ = std::fs::remove_file(&part);
            Failure::Verification(why)
        };
        if sha != artifact.sha256 {
            return Err(discard(format!(
                "the download's sha256 is {sha}, the server recorded {}: not written",
                artifact.sha256
            )));
        }
        let info = cbs_domain::buildinfo::BuildInfo::from_binary(&bytes)
            .map_err(|e| discard(format!("the download is not a Go binary: {e}")))?;
        let trusted = match self.check(&b, &bytes, &info, &key_text).await {
            Ok(t) => t,
            Err(f) => {
                let _ = std::fs::remove_file(&part);
                return Err(f);
            }
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::rename(&part, output))
            .map_err(|e| Failure::BadInput(format!("writing {}: {e}", output.display())))?;
        if json {
            let answer = serde_json::json!({
                "file": output,
                "key": key,
                "request": b.request,
                "sha256": sha,
                "signature": trusted,
                "size": bytes.len(),
            });
            println!("{answer}");
            return Ok(());
        }
        println!(
            "{}: Caddy {} for {}, sha256 {sha}, signature and build information checked",
            output.display(),
            b.request.caddy_version,
            platform(&b.request)
        );
        Ok(())
    }

    /// Follows the build's event stream to its result, reconnecting with Last-Event-ID.
    async fn follow(&self, key: &str, progress: &Progress) -> Result<()> {
        let mut last_id: Option<String> = None;
        let mut failures = 0;
        loop {
            let mut req = self
                .http
                .get(format!("{}/api/build/{key}/events", self.base));
            if let Some(id) = &last_id {
                req = req.header("last-event-id", id);
            }
            let mut resp = match self.send(req, "/api/build/{key}/events").await {
                Ok(r) => r,
                Err(Failure::Unreachable(m)) if failures < 30 => {
                    failures += 1;
                    progress.note(&format!("({m}; trying again)"));
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    continue;
                }
                Err(f) => return Err(f),
            };
            let (mut buf, mut event, mut data, mut id) =
                (String::new(), String::new(), String::new(), None::<String>);
            while let Ok(Some(chunk)) = resp.chunk().await {
                failures = 0;
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(nl) = buf.find('\n') {
                    let line: String = buf.drain(..=nl).collect();
                    let line = line.trim_end_matches(['\r', '\n']);
                    if line.is_empty() {
                        if let Some(i) = id.take() {
                            last_id = Some(i);
                        }
                        let done = on_event(&event, &data, progress)?;
                        event.clear();
                        data.clear();
                        if done {
                            return Ok(());
                        }
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
            }
            // The stream dropped before the result: resume where it was.
            failures += 1;
            if failures > 30 {
                return Err(Failure::Unreachable(format!(
                    "the progress of build {key} kept breaking off"
                )));
            }
        }
    }

    /// Downloads the binary into `part`, resuming with Range after a dropped connection;
    /// returns its bytes.
    async fn download(
        &self,
        key: &str,
        part: &Path,
        size: u64,
        progress: &Progress,
    ) -> Result<Vec<u8>> {
        let bar = progress.download(size);
        use std::io::Write;
        let _ = std::fs::remove_file(part);
        let mut out = std::fs::File::create(part)
            .map_err(|e| Failure::BadInput(format!("creating {}: {e}", part.display())))?;
        let mut have: u64 = 0;
        let mut tries = 0;
        while have < size {
            tries += 1;
            if tries > 10 {
                return Err(Failure::Unreachable(format!(
                    "the download of build {key} kept breaking off at {have} of {size} bytes"
                )));
            }
            let mut req = self
                .http
                .get(format!("{}/api/build/{key}/download", self.base));
            if have > 0 {
                req = req.header("range", format!("bytes={have}-"));
            }
            let mut resp = match self.send(req, "/api/build/{key}/download").await {
                Ok(r) => r,
                Err(Failure::Unreachable(_)) => continue,
                Err(f) => return Err(f),
            };
            if have > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                // The server sent the whole file again: start over.
                have = 0;
                if let Some(b) = &bar {
                    b.set_position(0);
                }
                out = std::fs::File::create(part)
                    .map_err(|e| Failure::BadInput(format!("{}: {e}", part.display())))?;
            }
            while let Ok(Some(chunk)) = resp.chunk().await {
                out.write_all(&chunk)
                    .map_err(|e| Failure::BadInput(format!("writing {}: {e}", part.display())))?;
                have += chunk.len() as u64;
                if let Some(b) = &bar {
                    b.set_position(have);
                }
            }
            if bar.is_none() {
                progress.note(&format!("downloaded {have} of {size} bytes"));
            }
        }
        out.flush()
            .and_then(|()| out.sync_all())
            .map_err(|e| Failure::BadInput(format!("writing {}: {e}", part.display())))?;
        std::fs::read(part).map_err(|e| Failure::BadInput(format!("{}: {e}", part.display())))
    }

    /// Checks `bytes` as the binary of build `b`: its signature with `key_text`, and its
    /// build information against the build's request. Returns the trusted comment.
    async fn check(
        &self,
        b: &wire::Build,
        bytes: &[u8],
        info: &cbs_domain::buildinfo::BuildInfo,
        key_text: &str,
    ) -> Result<String> {
        let sig = self
            .get(&format!("/api/build/{}/download.minisig", b.key))
            .await?
            .text()
            .await
            .map_err(|e| Failure::Unreachable(format!("reading the signature: {e}")))?;
        let trusted =
            cbs_signing::verify(key_text, &sig, std::io::Cursor::new(bytes)).map_err(|e| {
                Failure::Verification(format!(
                    "build {}: the signature does not verify: {e}",
                    b.key
                ))
            })?;
        let request: cbs_domain::BuildRequest = serde_json::to_value(&b.request)
            .and_then(serde_json::from_value)
            .map_err(|e| {
                Failure::Verification(format!("build {}: its request cannot be read: {e}", b.key))
            })?;
        if request.key().as_str() != b.key {
            return Err(Failure::Verification(format!(
                "build {}: its request does not have this key",
                b.key
            )));
        }
        info.check_matches(&request).map_err(|mismatches| {
            Failure::Verification(format!(
                "build {}: the file's build information differs from the request: {}",
                b.key,
                mismatches.join("; ")
            ))
        })?;
        Ok(trusted)
    }

    /// Why a file with bytes this server never built is not this server's: it built the same
    /// request (the same modules at the same versions, for the file's platform) to other
    /// bytes, or it never built that request at all.
    async fn not_built_here(
        &self,
        sha: &str,
        info: &cbs_domain::buildinfo::BuildInfo,
        says: &str,
    ) -> Result<String> {
        let hash = crate::worker::publish::binary_modules_hash(info);
        let same: Vec<wire::Build> = match self
            .json(&format!("/api/artifacts?modules_sha256={hash}"))
            .await
        {
            Ok(b) => b,
            Err(Failure::NotFound(_)) => Vec::new(),
            Err(f) => return Err(f),
        };
        let same_request = same.iter().find(|b| {
            serde_json::to_value(&b.request)
                .and_then(serde_json::from_value::<cbs_domain::BuildRequest>)
                .is_ok_and(|r| info.check_matches(&r).is_ok())
        });
        let Some(b) = same_request else {
            return Ok(format!(
                "unknown binary: {} never built a file with these bytes (sha256 {sha}), nor the request the file says it was built from: {says}",
                self.base
            ));
        };
        let theirs = b
            .artifact
            .as_ref()
            .map_or("(deleted)", |a| a.sha256.as_str());
        let mut message = format!(
            "different bytes for the same request: {} built this request (build {}: Caddy {} for {}) to a binary with sha256 {theirs}; this file has sha256 {sha}. It was changed after it was built, or built elsewhere by a builder that differs",
            self.base,
            b.key,
            b.request.caddy_version,
            platform(&b.request)
        );
        if let Some(r) = b
            .reproduction
            .as_ref()
            .filter(|r| r.sha256.as_deref() == Some(sha))
        {
            message.push_str(&format!(
                " (these are the bytes of this server's reproducibility check on worker {}, which found: {})",
                r.worker.as_deref().unwrap_or("?"),
                r.message.as_deref().unwrap_or("other bytes")
            ));
        }
        Ok(message)
    }

    /// Did this server build and sign exactly this file?
    async fn verify(&self, file: &Path, public_key: Option<&Path>) -> Result<()> {
        let bytes = std::fs::read(file)
            .map_err(|e| Failure::BadInput(format!("{}: {e}", file.display())))?;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let info = cbs_domain::buildinfo::BuildInfo::from_binary(&bytes).map_err(|e| {
            Failure::Verification(format!(
                "{} is not a Caddy binary this server could have built: {e}",
                file.display()
            ))
        })?;
        let says = describe_info(&info);
        let key_text = self.public_key(public_key).await?;
        let builds: Vec<wire::Build> = match self.json(&format!("/api/artifacts/{sha}")).await {
            Ok(b) => b,
            Err(Failure::NotFound(_)) => {
                return Err(Failure::Verification(
                    self.not_built_here(&sha, &info, &says).await?,
                ))
            }
            Err(f) => return Err(f),
        };
        let mut why = Vec::new();
        for b in builds {
            let trusted = match self.check(&b, &bytes, &info, &key_text).await {
                Ok(t) => t,
                Err(Failure::Verification(why_not)) => {
                    why.push(why_not);
                    continue;
                }
                Err(f) => return Err(f),
            };
            let r = &b.request;
            println!("OK: {} built and signed this file", self.base);
            println!("build    {}", b.key);
            println!("caddy    {} for {}", r.caddy_version, platform(r));
            for p in &r.plugins {
                println!("plugin   {}@{}", p.module, p.version);
            }
            for x in &r.replacements {
                println!("replace  {} => {}@{}", x.old, x.new, x.version);
            }
            println!("sha256   {sha}");
            println!(
                "built    {}",
                b.updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            println!("signed   {trusted}");
            if let Some(x) = &b.reproduction {
                println!("reproduction {}", reproduction_line(x));
            }
            return Ok(());
        }
        Err(Failure::Verification(format!(
            "{} has a build with these bytes, but: {}",
            self.base,
            why.join("; ")
        )))
    }
}

/// A reproducibility check in one line.
fn reproduction_line(r: &wire::ReproductionInfo) -> String {
    let who = r.worker.as_deref().unwrap_or("another worker");
    match r.status {
        wire::ReproductionStatus::Queued => {
            "queued (waiting for a worker that did not build it)".into()
        }
        wire::ReproductionStatus::Running => format!("running on {who}"),
        wire::ReproductionStatus::Matched => format!("matched: {who} built the same bytes"),
        wire::ReproductionStatus::Mismatched => format!(
            "MISMATCHED: {who} built other bytes: {}",
            r.message.as_deref().unwrap_or("")
        ),
        wire::ReproductionStatus::Failed => {
            format!("failed on {who}: {}", r.message.as_deref().unwrap_or(""))
        }
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.len() == 64
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Failure::BadInput(format!(
            "{:?} is not a build key (64 lower-case hex digits)",
            key.chars().take(80).collect::<String>()
        )))
    }
}

fn platform(r: &wire::BuildRequest) -> String {
    match r.arm {
        Some(v) => format!("{}/{}v{v}", r.os, r.arch),
        None => format!("{}/{}", r.os, r.arch),
    }
}

fn status_word(s: wire::BuildStatus) -> &'static str {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| {
            v.as_str().map(|s| match s {
                "queued" => "queued",
                "running" => "running",
                "complete" => "complete",
                "failed" => "failed",
                "gave_up" => "gave up",
                "cancelled" => "cancelled",
                "expired" => "expired",
                _ => "unknown",
            })
        })
        .unwrap_or("unknown")
}

/// What a binary's build information says, in a line.
fn describe_info(info: &cbs_domain::buildinfo::BuildInfo) -> String {
    let caddy = info
        .dep(cbs_domain::caddy_module().as_str())
        .map_or("no Caddy module".to_owned(), |m| {
            format!("Caddy {}", m.version)
        });
    let os = info.settings.get("GOOS").map_or("?", String::as_str);
    let arch = info.settings.get("GOARCH").map_or("?", String::as_str);
    format!(
        "{caddy} for {os}/{arch} with {} modules, built by {}",
        info.deps.len(),
        info.go_version
    )
}

/// Where the key of `server` is pinned.
fn pin_file(server: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("CBS_CLIENT_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CONFIG_HOME")
                .map(|d| PathBuf::from(d).join("caddy-build-server"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/caddy-build-server"))
        })
        .ok_or_else(|| {
            Failure::BadInput(
                "no config directory to pin the server's key in (set CBS_CLIENT_DIR or HOME), or pass --public-key".into(),
            )
        })?;
    let name: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(dir.join("keys").join(format!("{name}.pub")))
}

/// One stream message; `true` when the build succeeded (the stream's end).
fn on_event(event: &str, data: &str, progress: &Progress) -> Result<bool> {
    let Ok(e) = wire::StreamEvent::parse(event, data) else {
        return Ok(false);
    };
    match e {
        wire::StreamEvent::Step(s) => progress.step(&s.step),
        wire::StreamEvent::Log(l) => progress.log(&l.line),
        wire::StreamEvent::State(s) => progress.state(status_word(s.status())),
        wire::StreamEvent::Result(r) => {
            return if r.success {
                Ok(true)
            } else {
                Err(Failure::BuildFailed(format!(
                    "the build failed: {}",
                    r.error.unwrap_or_default()
                )))
            };
        }
    }
    Ok(false)
}
