//! The module-proxy gate: a build's only way out of its sandbox.
//!
//! Resolve containers have no network but their own loopback. The command runner inside
//! listens on `127.0.0.1:GATE_PORT` and carries each connection over a Unix socket, mounted
//! into the container, to this gate, which the worker serves for that one build. The gate
//! answers GET requests for module-proxy paths by asking the configured proxies (with
//! their credentials and certificate authorities, which never enter the container); it
//! reaches nothing else, so a resolve step cannot reach a cloud metadata address, the
//! host's services or the Docker engine.
//!
//! The gate also keeps the module files it relayed (`.info`, `.mod`, `.zip`) in a directory
//! the container cannot see. After a successful build, [`publish`] copies into the shared
//! module cache those whose hash matches the build's `go.sum`: the shared cache only ever
//! holds bytes the worker itself received from the module proxy.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cbs_goproxy::Resolver;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

/// The port the runner listens on inside a resolve container (its own loopback).
pub(crate) const GATE_PORT: u16 = 7070;

/// Largest module zip Go accepts (cmd/go: 500 MiB).
const MAX_ZIP: u64 = 500 << 20;
/// Largest other answer relayed (`.mod`, `.info`, version lists, checksum database tiles).
const MAX_OTHER: u64 = 16 << 20;

/// A module file the gate relayed: `(escaped module path, version, extension)`.
type FileKey = (String, String, &'static str);

#[derive(Debug)]
struct Shared {
    upstream: Arc<Resolver>,
    /// Where relayed module files are kept (private to the worker).
    files: PathBuf,
    kept: Mutex<HashMap<FileKey, PathBuf>>,
    next: std::sync::atomic::AtomicU64,
}

/// A running gate for one build; stops when dropped.
#[derive(Debug)]
pub(crate) struct Gate {
    shared: Arc<Shared>,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    /// Starts a gate with its socket and kept files in `dir` (a new directory private to
    /// the worker). The socket is made connectable for anyone who can reach it: only
    /// the build's container can (the directory is the worker's own, mode 0700).
    pub(crate) async fn start(upstream: Arc<Resolver>, dir: &Path) -> std::io::Result<Gate> {
        use std::os::unix::fs::PermissionsExt;
        let files = dir.join("files");
        tokio::fs::create_dir_all(&files).await?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.join("gate.sock");
        let listener = tokio::net::UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
        let shared = Arc::new(Shared {
            upstream,
            files,
            kept: Mutex::default(),
            next: Default::default(),
        });
        let app = axum::Router::new()
            .route("/{index}/{*rest}", axum::routing::get(relay))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "module-proxy gate stopped");
            }
        });
        Ok(Gate {
            shared,
            socket,
            task,
        })
    }

    /// The socket's host path.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// The module files relayed so far.
    pub(crate) fn kept(&self) -> HashMap<FileKey, PathBuf> {
        self.shared.kept.lock().expect("gate lock").clone()
    }
}

fn text(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

/// Whether `path` is a plain relative proxy path: no `..`, no empty or dot segments, no
/// characters a module proxy path never has.
fn clean(path: &str) -> bool {
    !path.is_empty()
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-~!+@".contains(&b))
}

/// `<escaped module>/@v/<version>.<info|mod|zip>` as a key.
fn module_file(path: &str) -> Option<FileKey> {
    let (module, file) = path.split_once("/@v/")?;
    let (version, ext) = file.rsplit_once('.')?;
    let ext = match ext {
        "info" => "info",
        "mod" => "mod",
        "zip" => "zip",
        _ => return None,
    };
    if version.is_empty() || version.contains('/') || version == "list" {
        return None;
    }
    Some((module.to_owned(), version.to_owned(), ext))
}

async fn relay(
    State(shared): State<Arc<Shared>>,
    UrlPath((index, rest)): UrlPath<(usize, String)>,
    headers: HeaderMap,
) -> Response {
    if index >= shared.upstream.proxy_count() || !clean(&rest) {
        return text(
            StatusCode::BAD_REQUEST,
            format!("the module-proxy gate does not serve /{index}/{rest}"),
        );
    }
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let resp = match shared.upstream.forward(index, &rest, user_agent).await {
        Ok(r) => r,
        Err(why) => {
            warn!(error = %why, "module-proxy gate: upstream request failed");
            return text(StatusCode::BAD_GATEWAY, why);
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_server_error() {
        warn!(%status, path = %rest, "module-proxy gate: the module proxy answered with an error");
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let key = module_file(&rest).filter(|_| status == StatusCode::OK);
    let limit = if key.as_ref().is_some_and(|k| k.2 == "zip") {
        MAX_ZIP
    } else {
        MAX_OTHER
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return text(
            StatusCode::BAD_GATEWAY,
            format!("the module proxy's answer for {rest} is larger than {limit} bytes"),
        );
    }
    // Spooled to a file the container cannot see, then served from it: what is kept is
    // exactly what the container got.
    let n = shared
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spool = shared.files.join(format!("{n}"));
    let spooled = async {
        let mut file = tokio::fs::File::create(&spool).await?;
        let mut size = 0u64;
        let mut resp = resp;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| std::io::Error::other(format!("reading it: {e}")))?
        {
            size += chunk.len() as u64;
            if size > limit {
                return Err(std::io::Error::other(format!(
                    "it is larger than {limit} bytes"
                )));
            }
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(e) = spooled {
        let _ = tokio::fs::remove_file(&spool).await;
        let why = format!("the module proxy's answer for {rest}: {e}");
        warn!(error = %why, "module-proxy gate: relaying failed");
        return text(StatusCode::BAD_GATEWAY, why);
    }
    let file = match tokio::fs::File::open(&spool).await {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("spooling: {e}")),
    };
    match key {
        Some(key) => {
            debug!(module = %key.0, version = %key.1, ext = key.2, "relayed a module file");
            shared.kept.lock().expect("gate lock").insert(key, spool);
        }
        None => {
            // Not kept: unlinked now, served from the open file.
            let _ = tokio::fs::remove_file(&spool).await;
        }
    }
    (
        status,
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response()
}

/// Go's `h1:` hash (golang.org/x/mod/sumdb/dirhash Hash1) of named files: SHA-256 over
/// lines `<hex sha256 of the file>  <name>\n`, names sorted, base64.
fn hash1(mut files: Vec<(String, [u8; 32])>) -> Option<String> {
    use base64::Engine;
    use sha2::Digest;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = sha2::Sha256::new();
    for (name, sum) in &files {
        if name.contains('\n') {
            return None;
        }
        h.update(format!("{}  {name}\n", hex::encode(sum)));
    }
    Some(format!(
        "h1:{}",
        base64::engine::general_purpose::STANDARD.encode(h.finalize())
    ))
}

/// The `h1:` hash of a module zip (dirhash.HashZip).
fn hash_zip(path: &Path) -> std::io::Result<Option<String>> {
    use sha2::Digest;
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(path)?).map_err(std::io::Error::other)?;
    let mut files = Vec::with_capacity(zip.len());
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(std::io::Error::other)?;
        let name = f.name().to_owned();
        let mut h = sha2::Sha256::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        files.push((name, h.finalize().into()));
    }
    Ok(hash1(files))
}

/// The `h1:` hash of a `go.mod` file (`<module> <version>/go.mod h1:...` in go.sum).
fn hash_mod(content: &[u8]) -> String {
    use sha2::Digest;
    hash1(vec![(
        "go.mod".into(),
        sha2::Sha256::digest(content).into(),
    )])
    .unwrap_or_default()
}

/// go.sum as `(escaped module, version or version/go.mod) -> h1 hash`.
fn parse_go_sum(text: &str) -> HashMap<(String, String), String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (m, v, h) = (f.next()?, f.next()?, f.next()?);
            Some(((cbs_domain::module::escape(m), v.to_owned()), h.to_owned()))
        })
        .collect()
}

/// What [`publish`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// Module files added to the shared cache.
    pub added: usize,
    /// Files already there.
    pub present: usize,
    /// Files whose hash did not match go.sum (or that go.sum does not name): not added.
    pub refused: usize,
}

/// Copies the module files `kept` by a build's gate into the shared module cache at
/// `modcache`, each only if its hash matches the build's `go_sum` (a `.info` only if
/// go.sum names its version and it says that version). Files are added with
/// a temporary name and renamed, owned by `owner` (the builder user) and read-only.
pub(crate) fn publish(
    kept: &HashMap<FileKey, PathBuf>,
    go_sum: &str,
    modcache: &Path,
    owner: Option<(u32, u32)>,
) -> std::io::Result<Published> {
    let sums = parse_go_sum(go_sum);
    let mut out = Published::default();
    for ((module, version, ext), file) in kept {
        let verified = match *ext {
            "zip" => match sums.get(&(module.clone(), version.clone())) {
                Some(want) => hash_zip(file).ok().flatten().filter(|got| got == want),
                None => None,
            },
            "mod" => sums
                .get(&(module.clone(), format!("{version}/go.mod")))
                .filter(|want| **want == hash_mod(&std::fs::read(file).unwrap_or_default()))
                .cloned(),
            _ => {
                let named = sums.contains_key(&(module.clone(), version.clone()))
                    || sums.contains_key(&(module.clone(), format!("{version}/go.mod")));
                let says = std::fs::read(file)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["Version"] == version.as_str());
                (named && says).then(String::new)
            }
        };
        let Some(hash) = verified else {
            warn!(%module, %version, ext, "a relayed module file does not match go.sum: not shared");
            out.refused += 1;
            continue;
        };
        let dir = modcache.join("cache/download").join(module).join("@v");
        let target = dir.join(format!("{version}.{ext}"));
        if target.exists() {
            out.present += 1;
            continue;
        }
        create_owned_dirs(modcache, &dir, owner)?;
        install(file, &target, owner)?;
        if *ext == "zip" {
            // What Go would compute and check against go.sum itself.
            let ziphash = dir.join(format!("{version}.ziphash"));
            if !ziphash.exists() {
                let tmp = tempfile::NamedTempFile::new_in(&dir)?;
                std::fs::write(tmp.path(), hash.as_bytes())?;
                finish(tmp, &ziphash, owner)?;
            }
        }
        out.added += 1;
    }
    if out.added > 0 {
        info!(
            added = out.added,
            present = out.present,
            refused = out.refused,
            "module files shared"
        );
    }
    Ok(out)
}

/// Creates `dir` and its missing parents below `root`, owned by `owner`, mode 0755,
/// never through a symbolic link.
fn create_owned_dirs(root: &Path, dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let rel = dir.strip_prefix(root).map_err(std::io::Error::other)?;
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory",
                    at.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match std::fs::create_dir(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&at, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Copies `from` to `target` through a temporary file in the target's directory.
fn install(from: &Path, target: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::copy(from, tmp.path())?;
    finish(tmp, target, owner)
}

fn finish(
    tmp: tempfile::NamedTempFile,
    target: &Path,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file().sync_all()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o444))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(tmp.path(), Some(uid), Some(gid))?;
    }
    tmp.persist(target).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_files_are_recognised() {
        assert_eq!(
            module_file("example.com/!foo/@v/v1.2.3.zip"),
            Some(("example.com/!foo".into(), "v1.2.3".into(), "zip"))
        );
        assert_eq!(module_file("example.com/foo/@v/list"), None);
        assert_eq!(module_file("example.com/foo/@latest"), None);
        assert_eq!(module_file("sumdb/sum.golang.org/supported"), None);
        assert!(clean("example.com/foo/@v/v1.0.0.mod"));
        assert!(!clean("example.com/../etc/passwd"));
        assert!(!clean("a//b"));
        assert!(!clean("a/b?c"));
    }

    #[test]
    fn only_module_files_that_match_go_sum_are_shared() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let zip_of = |name: &str, go_mod: &str| {
            let p = dir.path().join(name);
            let mut w = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
            w.start_file(
                "example.com/m@v1.0.0/go.mod",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            w.write_all(go_mod.as_bytes()).unwrap();
            w.finish().unwrap();
            p
        };
        let zip_path = zip_of("zip", "module example.com/m\n");
        // Same names, other contents.
        let tampered = zip_of("tampered", "module example.com/evil\n");
        let go_sum = format!(
            "example.com/m v1.0.0 {}\nexample.com/m v1.0.0/go.mod {}\nexample.com/n v1.0.0 {}\nexample.com/n v1.0.0/go.mod {}\n",
            hash_zip(&zip_path).unwrap().unwrap(),
            hash_mod(b"module example.com/m\n"),
            hash_zip(&zip_path).unwrap().unwrap(),
            hash_mod(b"module example.com/n\n"),
        );
        let key = |m: &str, ext: &'static str| (m.to_owned(), "v1.0.0".to_owned(), ext);
        let kept = HashMap::from([
            (key("example.com/m", "zip"), zip_path.clone()),
            (
                key("example.com/m", "mod"),
                file("m.mod", "module example.com/m\n"),
            ),
            (
                key("example.com/m", "info"),
                file("m.info", r#"{"Version":"v1.0.0"}"#),
            ),
            // Bytes go.sum does not vouch for: a zip whose hash differs, another go.mod, an
            // .info that names another version, a module go.sum does not name.
            (key("example.com/n", "zip"), tampered),
            (
                key("example.com/n", "mod"),
                file("n.mod", "module example.com/evil\n"),
            ),
            (
                key("example.com/n", "info"),
                file("n.info", r#"{"Version":"v9.9.9"}"#),
            ),
            (
                key("example.com/o", "mod"),
                file("o.mod", "module example.com/o\n"),
            ),
        ]);
        let cache = tempfile::tempdir().unwrap();
        let published = publish(&kept, &go_sum, cache.path(), None).unwrap();
        assert_eq!(
            published,
            Published {
                added: 3,
                present: 0,
                refused: 4
            }
        );
        let v = cache.path().join("cache/download/example.com/m/@v");
        for f in ["v1.0.0.zip", "v1.0.0.mod", "v1.0.0.info", "v1.0.0.ziphash"] {
            let meta = std::fs::metadata(v.join(f)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{f}");
        }
        assert!(!cache.path().join("cache/download/example.com/n").exists());
        assert!(!cache.path().join("cache/download/example.com/o").exists());
        // Again: nothing new, nothing replaced.
        let again = publish(&kept, &go_sum, cache.path(), None).unwrap();
        assert_eq!((again.added, again.present), (0, 3));
    }
}
