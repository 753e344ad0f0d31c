//! The fleet's Go build cache, answered by the worker as the go command's GOCACHEPROG
//! (Go >= 1.24).
//!
//! In a compile container `GOCACHEPROG` is `/cbs/runner cacheprog /cbs/cache.sock`: the
//! runner only carries the protocol (JSON lines on its stdin and stdout) to a Unix socket
//! of the build's sandbox, where [`Session`] answers. The container has no network and
//! mounts the local tier read-only: it reads objects at the paths it is told, and writes
//! nothing but through the socket.
//!
//! Two tiers, the same layout in both: `a/<xx>/<action id>` holds `v1 <output id> <size>`,
//! `o/<xx>/<output id>` the object, whose SHA-256 is its output ID (Go computes output IDs
//! that way).
//! - local: `<cache_dir>/prog` on the worker's disk, bounded by `local_max_bytes` (least
//!   recently used objects go first);
//! - shared: the artifact storage under `buildcache/v1/`, bounded by the janitor.
//!
//! Integrity. A put's contents must hash to its output ID (else the put is refused and the
//! go command fails the build); an object read from the shared tier, or found on disk by a
//! new worker process, is hashed before it is used. Objects are immutable and
//! content-addressed, so they may be written at put time. What cannot be checked is the
//! action entry (action ID -> output ID: the action ID is a hash of inputs only the go
//! command knows): a build's own entries serve only that build until [`CacheWrites::publish`]
//! is called, which the worker does after the build succeeded and its binary was verified,
//! and only for builds it trusts. Entries are never replaced: the first writer wins, in
//! both tiers.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use cbs_metrics::{CacheLabels, DirectionLabel};
use futures::StreamExt as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The socket, as compile containers see it.
pub(crate) const CACHE_SOCKET: &str = "/cbs/cache.sock";
/// The local tier, as compile containers see it (read-only).
pub(crate) const LOCAL_TIER: &str = "/cache/prog";
/// Where the shared tier lives in the artifact storage.
pub const SHARED_PREFIX: &str = "buildcache/v1";
/// The largest object accepted (Go's largest entries are linked binaries).
const MAX_OBJECT: u64 = 512 << 20;
/// The longest request line (a request without its body is about 200 bytes).
const MAX_LINE: usize = 64 << 10;
/// Objects used this recently are never evicted (a running build may be reading them).
const EVICTION_GRACE: Duration = Duration::from_secs(600);
/// Shared-tier uploads at once when a build publishes.
const UPLOADS: usize = 16;

/// A 32-byte ID (action or output), as Go's cache names them.
type Id = [u8; 32];

/// One entry: the output ID and the object's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    output: Id,
    size: u64,
}

impl Entry {
    fn encode(&self) -> String {
        format!("v1 {} {}\n", hex::encode(self.output), self.size)
    }

    fn decode(text: &str) -> Option<Entry> {
        let mut parts = text.split_ascii_whitespace();
        if parts.next()? != "v1" {
            return None;
        }
        let output = parse_id(parts.next()?)?;
        let size = parts.next()?.parse().ok()?;
        (parts.next().is_none() && size <= MAX_OBJECT).then_some(Entry { output, size })
    }
}

fn parse_id(hex_id: &str) -> Option<Id> {
    let v = hex::decode(hex_id).ok()?;
    v.try_into().ok()
}

/// `xx/<hex>` of an ID.
fn rel(id: &Id) -> String {
    let h = hex::encode(id);
    format!("{}/{h}", &h[..2])
}

/// The cache settings of a worker.
#[derive(Debug, Clone)]
pub struct BuildCacheSettings {
    /// The local tier's directory (created if missing).
    pub dir: PathBuf,
    pub local_max_bytes: u64,
    /// The shared tier, if any.
    pub shared: Option<cbs_storage::Storage>,
}

/// A worker's build cache: the local tier and, if configured, the shared one. Cheap to
/// share between builds.
#[derive(Debug)]
pub struct BuildCache {
    dir: PathBuf,
    max: u64,
    shared: Option<cbs_storage::Storage>,
    /// Objects this process wrote or hashed: not hashed again.
    verified: Mutex<HashSet<Id>>,
    /// About how many bytes the local tier holds (a scan at start, then what was added).
    size: AtomicU64,
    evicting: AtomicBool,
}

impl BuildCache {
    /// Opens (creates) the local tier and measures it.
    pub async fn open(settings: BuildCacheSettings) -> std::io::Result<Arc<BuildCache>> {
        let dir = settings.dir.clone();
        let size = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            for sub in ["a", "o"] {
                create_dir_readable(&dir.join(sub))?;
            }
            Ok(objects(&dir)?.iter().map(|o| o.size).sum())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Arc::new(BuildCache {
            dir: settings.dir,
            max: settings.local_max_bytes,
            shared: settings.shared,
            verified: Mutex::new(HashSet::new()),
            size: AtomicU64::new(size),
            evicting: AtomicBool::new(false),
        }))
    }

    /// The local tier's directory on the host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn object_path(&self, id: &Id) -> PathBuf {
        self.dir.join("o").join(rel(id))
    }

    fn action_path(&self, id: &Id) -> PathBuf {
        self.dir.join("a").join(rel(id))
    }

    fn is_verified(&self, id: &Id) -> bool {
        self.verified.lock().expect("not poisoned").contains(id)
    }

    fn mark_verified(&self, id: Id) {
        self.verified.lock().expect("not poisoned").insert(id);
    }

    /// Whether the local object `e` is there, whole and (hashed once per process) correct.
    /// A wrong one is removed.
    fn local_object_ok(&self, e: &Entry) -> bool {
        let path = self.object_path(&e.output);
        let Ok(meta) = std::fs::metadata(&path) else {
            return false;
        };
        if meta.len() != e.size {
            return false;
        }
        if self.is_verified(&e.output) {
            return true;
        }
        match std::fs::read(&path) {
            Ok(data) if Sha256::digest(&data).as_slice() == e.output => {
                self.mark_verified(e.output);
                true
            }
            Ok(_) => {
                warn!(object = %path.display(), "a local build cache object does not match its name; removed");
                cbs_metrics::metrics().build_cache_rejected.inc();
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(_) => false,
        }
    }

    /// The local tier's entry for `action`, if its object is there and correct.
    fn local_get(&self, action: &Id) -> Option<Entry> {
        let text = std::fs::read_to_string(self.action_path(action)).ok()?;
        let e = Entry::decode(&text)?;
        if !self.local_object_ok(&e) {
            return None;
        }
        // Recently used: spared by eviction (best effort).
        if let Ok(f) = std::fs::File::options()
            .append(true)
            .open(self.object_path(&e.output))
        {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(e)
    }

    /// Writes an object whose contents were checked against `id` (unless it is there).
    fn local_put_object(&self, id: &Id, data: &[u8]) -> std::io::Result<()> {
        let path = self.object_path(id);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64)
            && self.is_verified(id)
        {
            return Ok(());
        }
        let dir = path.parent().expect("an object path has a parent");
        create_dir_readable(dir)?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
        tmp.write_all(data)?;
        set_readable(tmp.path(), 0o644)?;
        // Same name, same contents: replacing one is harmless.
        tmp.persist(&path).map_err(|e| e.error)?;
        self.mark_verified(*id);
        self.size.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes an action entry unless there is one (never replaced).
    fn local_put_action(&self, action: &Id, e: &Entry) -> std::io::Result<()> {
        let path = self.action_path(action);
        if path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("an action path has a parent");
        create_dir_readable(dir)?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
        tmp.write_all(e.encode().as_bytes())?;
        set_readable(tmp.path(), 0o644)?;
        // A hard link fails if the name exists: the first writer wins.
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The shared tier's entry for `action`, copied into the local tier (object checked).
    /// Returns the entry and the bytes fetched (0 when the object was here already).
    async fn shared_get(self: &Arc<Self>, action: &Id) -> Option<(Entry, u64)> {
        let shared = self.shared.as_ref()?;
        let key = format!("{SHARED_PREFIX}/a/{}", rel(action));
        let text = match shared.get(&key, None).await {
            Ok(obj) => obj.bytes(256).await.ok()?,
            Err(e) if e.is_not_found() => return None,
            Err(e) => {
                debug!(error = %e, "shared build cache unavailable");
                return None;
            }
        };
        let e = Entry::decode(std::str::from_utf8(&text).ok()?)?;
        let this = self.clone();
        let have = tokio::task::spawn_blocking(move || this.local_object_ok(&e))
            .await
            .unwrap_or(false);
        let mut fetched = 0;
        if !have {
            let okey = format!("{SHARED_PREFIX}/o/{}", rel(&e.output));
            let data = match shared.get(&okey, None).await {
                Ok(obj) => obj.bytes(e.size).await.ok()?,
                Err(_) => return None,
            };
            cbs_metrics::metrics()
                .build_cache_bytes
                .get_or_create(&DirectionLabel { direction: "down" })
                .inc_by(data.len() as u64);
            if data.len() as u64 != e.size || Sha256::digest(&data).as_slice() != e.output {
                warn!(key = %okey, "a shared build cache object does not match its name; not used");
                cbs_metrics::metrics().build_cache_rejected.inc();
                return None;
            }
            fetched = data.len() as u64;
            let this = self.clone();
            let id = e.output;
            tokio::task::spawn_blocking(move || this.local_put_object(&id, &data))
                .await
                .ok()?
                .ok()?;
        }
        let this = self.clone();
        let a = *action;
        let _ = tokio::task::spawn_blocking(move || this.local_put_action(&a, &e)).await;
        Some((e, fetched))
    }

    /// Removes the least recently used objects (and entries pointing at them) until the
    /// local tier is below 90% of its bound. One eviction at a time.
    pub async fn evict_if_needed(self: &Arc<Self>) {
        if self.size.load(Ordering::Relaxed) <= self.max
            || self.evicting.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || this.evict()).await;
        self.evicting.store(false, Ordering::SeqCst);
        match done {
            Ok(Ok((n, freed))) if n > 0 => info!(
                objects = n,
                bytes = freed,
                "build cache: least recently used objects removed"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "build cache eviction failed"),
            Err(e) => warn!(error = %e, "build cache eviction failed"),
        }
    }

    fn evict(&self) -> std::io::Result<(usize, u64)> {
        let mut all = objects(&self.dir)?;
        let mut total: u64 = all.iter().map(|o| o.size).sum();
        let target = self.max / 10 * 9;
        all.sort_by_key(|o| o.used);
        let grace = SystemTime::now() - EVICTION_GRACE;
        let (mut n, mut freed) = (0, 0);
        let mut removed = HashSet::new();
        for o in all {
            if total <= target || o.used > grace {
                break;
            }
            if std::fs::remove_file(&o.path).is_ok() {
                total -= o.size;
                freed += o.size;
                n += 1;
                removed.insert(o.id);
                self.verified.lock().expect("not poisoned").remove(&o.id);
            }
        }
        self.size.store(total, Ordering::Relaxed);
        if !removed.is_empty() {
            // Entries whose object is gone.
            for shard in std::fs::read_dir(self.dir.join("a"))? {
                for entry in std::fs::read_dir(shard?.path())? {
                    let path = entry?.path();
                    let gone = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| Entry::decode(&t))
                        .is_none_or(|e| removed.contains(&e.output));
                    if gone {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        Ok((n, freed))
    }
}

/// One local object, for eviction.
struct Object {
    id: Id,
    path: PathBuf,
    size: u64,
    used: SystemTime,
}

fn objects(dir: &Path) -> std::io::Result<Vec<Object>> {
    let mut out = Vec::new();
    let root = dir.join("o");
    let Ok(shards) = std::fs::read_dir(&root) else {
        return Ok(out);
    };
    for shard in shards {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(shard.path())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = parse_id(&name) else {
                continue;
            };
            let meta = entry.metadata()?;
            out.push(Object {
                id,
                path: entry.path(),
                size: meta.len(),
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(out)
}

fn create_dir_readable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

fn set_readable(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// What one build's go commands asked and were given.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the build's own entries, the local tier, the shared tier; misses.
    pub build_hits: AtomicU64,
    pub local_hits: AtomicU64,
    pub shared_hits: AtomicU64,
    pub misses: AtomicU64,
    pub puts: AtomicU64,
    /// Bytes the build put.
    pub put_bytes: AtomicU64,
    /// Bytes fetched from the shared tier.
    pub fetched_bytes: AtomicU64,
}

/// A build's conversation with the cache: the socket and what the build put.
#[derive(Debug)]
pub(crate) struct Session {
    cache: Arc<BuildCache>,
    socket: PathBuf,
    /// Whether the build may read entries other builds published (off for an independent
    /// rebuild, which sees only its own).
    reads: bool,
    state: Arc<SessionState>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct SessionState {
    puts: Mutex<HashMap<Id, Entry>>,
    stats: CacheStats,
}

impl Session {
    /// Listens on `dir/cache.sock` (`dir` is made, private to the worker).
    pub(crate) async fn start(
        cache: Arc<BuildCache>,
        dir: &Path,
        reads: bool,
    ) -> std::io::Result<Session> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.join("cache.sock");
        let listener = UnixListener::bind(&socket)?;
        // The builder's uid connects through the bind mount of the socket itself.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
        let state = Arc::new(SessionState::default());
        let accept = tokio::spawn({
            let (cache, state) = (cache.clone(), state.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (cache, state) = (cache.clone(), state.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve(cache, state, reads, stream).await {
                            debug!(error = %e, "build cache connection ended");
                        }
                    });
                }
            }
        });
        Ok(Session {
            cache,
            socket,
            reads,
            state,
            accept,
        })
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn local_dir(&self) -> &Path {
        self.cache.dir()
    }

    /// Stops listening; what the build put, for the worker to publish (or not).
    pub(crate) fn finish(self) -> CacheWrites {
        self.accept.abort();
        let puts = std::mem::take(&mut *self.state.puts.lock().expect("not poisoned"));
        CacheWrites {
            cache: self.cache.clone(),
            puts,
            independent: !self.reads,
            stats: self.state.stats_snapshot(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl SessionState {
    fn stats_snapshot(&self) -> CacheReport {
        let s = &self.stats;
        CacheReport {
            build_hits: s.build_hits.load(Ordering::Relaxed),
            local_hits: s.local_hits.load(Ordering::Relaxed),
            shared_hits: s.shared_hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            puts: s.puts.load(Ordering::Relaxed),
            put_bytes: s.put_bytes.load(Ordering::Relaxed),
            fetched_bytes: s.fetched_bytes.load(Ordering::Relaxed),
            published: 0,
            uploaded_bytes: 0,
        }
    }
}

/// Figures of one build's cache use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheReport {
    pub build_hits: u64,
    pub local_hits: u64,
    pub shared_hits: u64,
    pub misses: u64,
    pub puts: u64,
    pub put_bytes: u64,
    /// Bytes fetched from the shared tier.
    pub fetched_bytes: u64,
    /// Entries published (new in the local tier or the shared one) and bytes uploaded.
    pub published: u64,
    pub uploaded_bytes: u64,
}

impl CacheReport {
    /// Lookups answered by another build's entries, of all lookups.
    pub fn hit_rate(&self) -> f64 {
        let all = self.build_hits + self.local_hits + self.shared_hits + self.misses;
        if all == 0 {
            0.0
        } else {
            (self.local_hits + self.shared_hits) as f64 / all as f64
        }
    }
}

/// The entries a finished build put, which serve nobody else until published.
#[derive(Debug)]
pub struct CacheWrites {
    cache: Arc<BuildCache>,
    puts: HashMap<Id, Entry>,
    independent: bool,
    stats: CacheReport,
}

impl CacheWrites {
    /// How the build used the cache.
    pub fn report(&self) -> CacheReport {
        self.stats
    }

    /// Makes the build's entries everyone's: the local tier, then the shared tier (object
    /// first, then the entry; neither replaces what is there). Call only for a build that
    /// succeeded, whose binary was verified, and whose code is trusted. An independent
    /// rebuild never publishes.
    pub async fn publish(self) -> CacheReport {
        let mut report = self.stats;
        if self.independent || self.puts.is_empty() {
            return report;
        }
        let cache = self.cache.clone();
        let puts: Vec<(Id, Entry)> = self.puts.into_iter().collect();
        let local = {
            let (cache, puts) = (cache.clone(), puts.clone());
            tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                for (a, e) in &puts {
                    if !cache.action_path(a).exists() && cache.local_put_action(a, e).is_ok() {
                        n += 1;
                    }
                }
                n
            })
            .await
            .unwrap_or(0)
        };
        report.published = local;
        if let Some(shared) = cache.shared.clone() {
            let uploads = futures::stream::iter(puts.into_iter().map(|(a, e)| {
                let (cache, shared) = (cache.clone(), shared.clone());
                async move { upload(&cache, &shared, &a, &e).await }
            }))
            .buffer_unordered(UPLOADS)
            .collect::<Vec<_>>()
            .await;
            for r in uploads {
                match r {
                    Ok(bytes) => report.uploaded_bytes += bytes,
                    Err(e) => {
                        warn!(error = %e, "cannot publish to the shared build cache");
                        break;
                    }
                }
            }
            cbs_metrics::metrics()
                .build_cache_bytes
                .get_or_create(&DirectionLabel { direction: "up" })
                .inc_by(report.uploaded_bytes);
        }
        cache.evict_if_needed().await;
        report
    }
}

/// Uploads one entry: its object unless the tier has it, then the entry unless it has one.
async fn upload(
    cache: &BuildCache,
    shared: &cbs_storage::Storage,
    action: &Id,
    e: &Entry,
) -> Result<u64, cbs_storage::StorageError> {
    let okey = format!("{SHARED_PREFIX}/o/{}", rel(&e.output));
    let mut sent = 0;
    if shared.head(&okey).await?.is_none() {
        let data = tokio::fs::read(cache.object_path(&e.output))
            .await
            .map_err(|err| cbs_storage::StorageError::Failed(format!("{okey}: {err}")))?;
        if data.len() as u64 != e.size {
            return Ok(0);
        }
        if shared.put_bytes_if_absent(&okey, Bytes::from(data)).await? {
            sent = e.size;
        }
    }
    let akey = format!("{SHARED_PREFIX}/a/{}", rel(action));
    shared
        .put_bytes_if_absent(&akey, Bytes::from(e.encode()))
        .await?;
    Ok(sent)
}

/// Keeps the shared tier under `max_bytes`: removes the oldest objects (by when they were
/// written: storage keeps no read times) until it is below 90% of it, then the entries
/// written before the newest removed object (most point at removed objects; one that does
/// not is written again by the next build that compiles it). Returns the objects removed
/// and their bytes. For the janitor; any entry may go at any time (a miss costs a compile).
pub async fn trim_shared(
    storage: &cbs_storage::Storage,
    max_bytes: u64,
) -> Result<(u64, u64), cbs_storage::StorageError> {
    let mut objects = storage.list(&format!("{SHARED_PREFIX}/o")).await?;
    let mut total: u64 = objects.iter().map(|o| o.size).sum();
    if total <= max_bytes {
        return Ok((0, 0));
    }
    let target = max_bytes / 10 * 9;
    objects.sort_by_key(|o| o.modified);
    let (mut n, mut freed) = (0, 0);
    let mut cutoff = SystemTime::UNIX_EPOCH;
    for o in objects {
        if total <= target {
            break;
        }
        storage.delete_prefix(&o.key).await?;
        total -= o.size;
        freed += o.size;
        n += 1;
        cutoff = cutoff.max(o.modified);
    }
    for a in storage.list(&format!("{SHARED_PREFIX}/a")).await? {
        if a.modified <= cutoff {
            storage.delete_prefix(&a.key).await?;
        }
    }
    Ok((n, freed))
}

/// A request of the go command (cmd/go/internal/cacheprog.Request). IDs are base64.
#[derive(Debug, Deserialize)]
struct Request {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "Command")]
    command: String,
    #[serde(rename = "ActionID", default)]
    action_id: Option<String>,
    #[serde(rename = "OutputID", default)]
    output_id: Option<String>,
    /// The older name of OutputID.
    #[serde(rename = "ObjectID", default)]
    object_id: Option<String>,
    #[serde(rename = "BodySize", default)]
    body_size: i64,
}

fn decode_id(b64: Option<&str>) -> Result<Id, String> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(b64.unwrap_or_default())
        .map_err(|e| format!("bad ID: {e}"))?;
    v.try_into()
        .map_err(|_| "an ID must be 32 bytes".to_owned())
}

/// Serves one go command: announces the commands, then answers each request (gets at
/// once, in any order; a put after its body is read).
async fn serve(
    cache: Arc<BuildCache>,
    state: Arc<SessionState>,
    reads: bool,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(1 << 16, rd);
    let (tx, mut rx) = mpsc::unbounded_channel::<serde_json::Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            let mut line = serde_json::to_vec(&v).expect("a JSON value serializes");
            line.push(b'\n');
            wr.write_all(&line).await?;
        }
        wr.shutdown().await
    });
    let _ = tx.send(serde_json::json!({"ID": 0, "KnownCommands": ["get", "put", "close"]}));
    let mut pending = tokio::task::JoinSet::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(&mut rd, &mut line, MAX_LINE).await? == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req: Request = serde_json::from_slice(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let id = req.id;
        match req.command.as_str() {
            "get" => {
                let action = match decode_id(req.action_id.as_deref()) {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = tx.send(serde_json::json!({"ID": id, "Err": e}));
                        continue;
                    }
                };
                let (cache, state, tx) = (cache.clone(), state.clone(), tx.clone());
                pending.spawn(async move {
                    let _ = tx.send(get(&cache, &state, reads, id, &action).await);
                });
            }
            "put" => {
                let size = req.body_size.max(0) as u64;
                let body = if size > 0 {
                    if size > MAX_OBJECT {
                        let _ = tx.send(serde_json::json!({"ID": id, "Err": "object too large"}));
                        return Ok(());
                    }
                    // "<base64>" and a newline.
                    let limit = (size as usize).div_ceil(3) * 4 + 8;
                    let mut body = Vec::with_capacity(limit);
                    loop {
                        body.clear();
                        if read_line(&mut rd, &mut body, limit).await? == 0 {
                            return Ok(());
                        }
                        if !body.iter().all(u8::is_ascii_whitespace) {
                            break;
                        }
                    }
                    let text: String = serde_json::from_slice(&body)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
                } else {
                    Vec::new()
                };
                let ids = decode_id(req.action_id.as_deref()).and_then(|a| {
                    decode_id(req.output_id.as_deref().or(req.object_id.as_deref())).map(|o| (a, o))
                });
                let (cache, state, tx) = (cache.clone(), state.clone(), tx.clone());
                pending.spawn(async move {
                    let answer = match ids {
                        Ok((a, o)) => put(&cache, &state, id, a, o, size, body).await,
                        Err(e) => serde_json::json!({"ID": id, "Err": e}),
                    };
                    let _ = tx.send(answer);
                });
            }
            "close" => {
                while pending.join_next().await.is_some() {}
                let _ = tx.send(serde_json::json!({"ID": id}));
                break;
            }
            other => {
                let _ = tx.send(
                    serde_json::json!({"ID": id, "Err": format!("unknown command {other:?}")}),
                );
            }
        }
    }
    while pending.join_next().await.is_some() {}
    drop(tx);
    writer.await.map_err(std::io::Error::other)?
}

/// Reads up to and including a newline, at most `limit` bytes; 0 at the end.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    loop {
        let buf = rd.fill_buf().await?;
        if buf.is_empty() {
            return Ok(out.len());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a build cache request line is too long",
            ));
        }
        out.extend_from_slice(&buf[..take]);
        rd.consume(take);
        if done {
            return Ok(out.len());
        }
    }
}

fn hit(id: i64, e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "ID": id,
        "OutputID": base64::engine::general_purpose::STANDARD.encode(e.output),
        "Size": e.size,
        "DiskPath": format!("{LOCAL_TIER}/o/{}", rel(&e.output)),
    })
}

async fn get(
    cache: &Arc<BuildCache>,
    state: &SessionState,
    reads: bool,
    id: i64,
    action: &Id,
) -> serde_json::Value {
    let metrics = cbs_metrics::metrics();
    let count = |tier: &'static str| {
        metrics
            .build_cache_gets
            .get_or_create(&CacheLabels { tier })
            .inc();
    };
    let own = state
        .puts
        .lock()
        .expect("not poisoned")
        .get(action)
        .copied();
    if let Some(e) = own {
        state.stats.build_hits.fetch_add(1, Ordering::Relaxed);
        count("build");
        return hit(id, &e);
    }
    if reads {
        let local = {
            let (cache, a) = (cache.clone(), *action);
            tokio::task::spawn_blocking(move || cache.local_get(&a))
                .await
                .ok()
                .flatten()
        };
        if let Some(e) = local {
            state.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            count("local");
            return hit(id, &e);
        }
        if let Some((e, fetched)) = cache.shared_get(action).await {
            state.stats.shared_hits.fetch_add(1, Ordering::Relaxed);
            state
                .stats
                .fetched_bytes
                .fetch_add(fetched, Ordering::Relaxed);
            count("shared");
            return hit(id, &e);
        }
    }
    state.stats.misses.fetch_add(1, Ordering::Relaxed);
    count("none");
    serde_json::json!({"ID": id, "Miss": true})
}

async fn put(
    cache: &Arc<BuildCache>,
    state: &SessionState,
    id: i64,
    action: Id,
    output: Id,
    size: u64,
    body: Vec<u8>,
) -> serde_json::Value {
    if body.len() as u64 != size || Sha256::digest(&body).as_slice() != output {
        cbs_metrics::metrics().build_cache_rejected.inc();
        warn!("a build put a cache entry whose contents do not match its output ID; refused");
        return serde_json::json!({"ID": id, "Err": "the contents do not hash to the output ID"});
    }
    let stored = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || cache.local_put_object(&output, &body)).await
    };
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return serde_json::json!({"ID": id, "Err": format!("cannot store the object: {e}")})
        }
        Err(e) => {
            return serde_json::json!({"ID": id, "Err": format!("cannot store the object: {e}")})
        }
    }
    state.stats.puts.fetch_add(1, Ordering::Relaxed);
    state.stats.put_bytes.fetch_add(size, Ordering::Relaxed);
    let e = Entry { output, size };
    // The build's own first answer stands, as in Go's own cache.
    state
        .puts
        .lock()
        .expect("not poisoned")
        .entry(action)
        .or_insert(e);
    hit(id, &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    /// Talks to a session the way the go command does (through the runner).
    struct Client {
        rd: BufReader<tokio::net::unix::OwnedReadHalf>,
        wr: tokio::net::unix::OwnedWriteHalf,
        next: i64,
    }

    impl Client {
        async fn connect(s: &Session) -> Client {
            let (rd, wr) = UnixStream::connect(s.socket()).await.unwrap().into_split();
            let mut c = Client {
                rd: BufReader::new(rd),
                wr,
                next: 0,
            };
            let hello = c.answer().await;
            assert_eq!(
                hello["KnownCommands"],
                serde_json::json!(["get", "put", "close"])
            );
            c
        }

        async fn answer(&mut self) -> serde_json::Value {
            let mut line = String::new();
            self.rd.read_line(&mut line).await.unwrap();
            serde_json::from_str(&line).unwrap()
        }

        async fn get(&mut self, action: Id) -> serde_json::Value {
            self.next += 1;
            let req =
                serde_json::json!({"ID": self.next, "Command": "get", "ActionID": b64(&action)});
            self.wr
                .write_all(format!("{req}\n\n").as_bytes())
                .await
                .unwrap();
            self.answer().await
        }

        async fn put(&mut self, action: Id, output: Id, body: &[u8]) -> serde_json::Value {
            self.next += 1;
            let req = serde_json::json!({"ID": self.next, "Command": "put", "ActionID": b64(&action), "OutputID": b64(&output), "BodySize": body.len()});
            self.wr
                .write_all(format!("{req}\n\n\"{}\"\n", b64(body)).as_bytes())
                .await
                .unwrap();
            self.answer().await
        }
    }

    fn id(body: &[u8]) -> Id {
        Sha256::digest(body).into()
    }

    async fn cache(dir: &Path, shared: &Path) -> Arc<BuildCache> {
        BuildCache::open(BuildCacheSettings {
            dir: dir.to_owned(),
            local_max_bytes: 1 << 30,
            shared: Some(
                cbs_storage::Storage::connect(&cbs_config::StorageConfig {
                    dir: shared.to_owned(),
                    ..Default::default()
                })
                .await
                .unwrap(),
            ),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn entries_serve_other_builds_only_once_published_and_are_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        let a = cache(&tmp.path().join("a"), &shared).await;
        let b = cache(&tmp.path().join("b"), &shared).await;
        let (action, body) = ([1u8; 32], b"compiled package".to_vec());

        let s1 = Session::start(a.clone(), &tmp.path().join("s1"), true)
            .await
            .unwrap();
        let mut c1 = Client::connect(&s1).await;
        assert_eq!(c1.get(action).await["Miss"], true);
        // Contents that do not hash to the output ID are refused.
        let refused = c1.put(action, [9; 32], &body).await;
        assert!(
            refused["Err"].as_str().unwrap().contains("hash"),
            "{refused}"
        );
        let put = c1.put(action, id(&body), &body).await;
        let path = put["DiskPath"].as_str().unwrap().to_owned();
        assert!(path.starts_with(LOCAL_TIER), "{path}");
        // The object is in the local tier, where the container sees it.
        let host = a
            .dir()
            .join(path.trim_start_matches(LOCAL_TIER).trim_start_matches('/'));
        assert_eq!(std::fs::read(&host).unwrap(), body);
        // The build sees its own entry; another build on the same worker does not yet.
        assert_eq!(c1.get(action).await["OutputID"], b64(&id(&body)));
        let s2 = Session::start(a.clone(), &tmp.path().join("s2"), true)
            .await
            .unwrap();
        assert_eq!(Client::connect(&s2).await.get(action).await["Miss"], true);

        let report = s1.finish().publish().await;
        assert_eq!((report.puts, report.published), (1, 1));
        assert_eq!(report.uploaded_bytes, body.len() as u64);
        // Now the same worker and another one (through the shared tier) get it.
        assert_eq!(
            Client::connect(&s2).await.get(action).await["Size"],
            body.len()
        );
        let s3 = Session::start(b.clone(), &tmp.path().join("s3"), true)
            .await
            .unwrap();
        let mut c3 = Client::connect(&s3).await;
        assert_eq!(c3.get(action).await["OutputID"], b64(&id(&body)));
        assert_eq!(s3.state.stats.shared_hits.load(Ordering::Relaxed), 1);

        // A later build's other answer for the same action does not replace the first.
        let other = b"other bytes".to_vec();
        let s4 = Session::start(b.clone(), &tmp.path().join("s4"), true)
            .await
            .unwrap();
        let mut c4 = Client::connect(&s4).await;
        c4.put(action, id(&other), &other).await;
        let r = s4.finish().publish().await;
        assert_eq!(r.published, 0);
        let s5 = Session::start(b.clone(), &tmp.path().join("s5"), true)
            .await
            .unwrap();
        assert_eq!(
            Client::connect(&s5).await.get(action).await["OutputID"],
            b64(&id(&body))
        );
        let shared_entry =
            std::fs::read_to_string(shared.join(format!("{SHARED_PREFIX}/a/{}", rel(&action))))
                .unwrap();
        assert_eq!(Entry::decode(&shared_entry).unwrap().output, id(&body));

        // An independent rebuild reads nobody's entries and publishes nothing.
        let s6 = Session::start(b.clone(), &tmp.path().join("s6"), false)
            .await
            .unwrap();
        let mut c6 = Client::connect(&s6).await;
        assert_eq!(c6.get(action).await["Miss"], true);
        c6.put([2; 32], id(&other), &other).await;
        assert_eq!(s6.finish().publish().await.published, 0);
    }

    #[tokio::test]
    async fn the_janitor_keeps_the_shared_tier_below_its_bound_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        let c = cache(&tmp.path().join("a"), &shared).await;
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..4u8 {
            let body = vec![i; 1000];
            let s = Session::start(c.clone(), &tmp.path().join(format!("s{i}")), true)
                .await
                .unwrap();
            Client::connect(&s)
                .await
                .put([i; 32], id(&body), &body)
                .await;
            s.finish().publish().await;
            for kind in [("o", rel(&id(&body))), ("a", rel(&[i; 32]))] {
                let f = std::fs::File::options()
                    .append(true)
                    .open(shared.join(format!("{SHARED_PREFIX}/{}/{}", kind.0, kind.1)))
                    .unwrap();
                f.set_modified(old + Duration::from_secs(u64::from(i)))
                    .unwrap();
            }
        }
        let storage = c.shared.clone().unwrap();
        assert_eq!(trim_shared(&storage, 4000).await.unwrap(), (0, 0));
        assert_eq!(trim_shared(&storage, 2500).await.unwrap(), (2, 2000));
        let left: Vec<String> = storage
            .list(&format!("{SHARED_PREFIX}/a"))
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.iter()
                .all(|k| k.ends_with(&hex::encode([2u8; 32]))
                    || k.ends_with(&hex::encode([3u8; 32]))),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn a_tampered_shared_object_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        let a = cache(&tmp.path().join("a"), &shared).await;
        let (action, body) = ([3u8; 32], b"the real object".to_vec());
        let s = Session::start(a, &tmp.path().join("s"), true)
            .await
            .unwrap();
        Client::connect(&s)
            .await
            .put(action, id(&body), &body)
            .await;
        s.finish().publish().await;
        let object = shared.join(format!("{SHARED_PREFIX}/o/{}", rel(&id(&body))));
        std::fs::write(&object, b"the fake object").unwrap();
        let b = cache(&tmp.path().join("b"), &shared).await;
        let s = Session::start(b.clone(), &tmp.path().join("t"), true)
            .await
            .unwrap();
        let before = cbs_metrics::metrics().build_cache_rejected.get();
        assert_eq!(Client::connect(&s).await.get(action).await["Miss"], true);
        assert!(cbs_metrics::metrics().build_cache_rejected.get() > before);
        assert!(!b.object_path(&id(&body)).exists());
    }

    #[tokio::test]
    async fn the_local_tier_drops_least_recently_used_objects_beyond_its_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let c = BuildCache::open(BuildCacheSettings {
            dir: tmp.path().to_owned(),
            local_max_bytes: 1000,
            shared: None,
        })
        .await
        .unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..5u8 {
            let body = vec![i; 400];
            let e = Entry {
                output: id(&body),
                size: 400,
            };
            c.local_put_object(&e.output, &body).unwrap();
            c.local_put_action(&[i; 32], &e).unwrap();
            // Oldest first; none in the grace period.
            let f = std::fs::File::options()
                .append(true)
                .open(c.object_path(&e.output))
                .unwrap();
            f.set_modified(old + Duration::from_secs(u64::from(i)))
                .unwrap();
        }
        c.evict_if_needed().await;
        let left: Vec<bool> = (0..5u8).map(|i| c.local_get(&[i; 32]).is_some()).collect();
        assert_eq!(left, [false, false, false, true, true]);
        assert!(
            !c.action_path(&[0; 32]).exists(),
            "entries of removed objects go too"
        );
    }

    #[test]
    fn entries_round_trip_and_reject_garbage() {
        let e = Entry {
            output: [7; 32],
            size: 42,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        for bad in [
            "",
            "v2 00 1",
            "v1 zz 1",
            &format!("v1 {} x", hex::encode([1u8; 32])),
            &format!("v1 {} 1 more", hex::encode([1u8; 32])),
            &format!("v1 {} {}", hex::encode([1u8; 32]), u64::MAX),
        ] {
            assert_eq!(Entry::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ids_must_be_32_bytes_of_base64() {
        assert!(decode_id(Some(
            &base64::engine::general_purpose::STANDARD.encode([1u8; 32])
        ))
        .is_ok());
        assert!(decode_id(Some(
            &base64::engine::general_purpose::STANDARD.encode([1u8; 31])
        ))
        .is_err());
        assert!(decode_id(Some("!!")).is_err());
        assert!(decode_id(None).is_err());
    }
}
