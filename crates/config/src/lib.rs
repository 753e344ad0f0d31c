//! Typed configuration.
//!
//! The file (`./config.yml`, or the one named by `CONFIG_PATH`) is first rendered as a
//! minijinja template with two functions, `env("NAME")` (an error naming the variable when it
//! is unset) and `env_or("NAME", "default")`, then parsed as YAML into the structs below.
//! Every key has a default, unknown keys are errors, and every error names the file, the key
//! and, where the parser knows it, the line. Secrets are wrapped in [`Secret`] and the database
//! URL in [`DatabaseUrl`], whose `Debug` and `Display` never show a password.

mod secret;
mod template;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use secret::{DatabaseUrl, Secret};

/// The environment variable naming the config file.
pub const CONFIG_PATH_VAR: &str = "CONFIG_PATH";
/// The config file read when `CONFIG_PATH` is unset.
pub const DEFAULT_PATH: &str = "config.yml";

/// The whole configuration of every role.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub notify: NotifyConfig,
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub go: GoConfig,
    pub storage: StorageConfig,
    pub signing: SigningConfig,
    pub packages: PackagesConfig,
    pub janitor: JanitorConfig,
    pub log: LogConfig,
    pub access: AccessConfig,
    pub metrics: MetricsConfig,
}

/// Prometheus metrics (`GET /metrics`). The api (and `all`) serves them on its own port;
/// the worker and janitor roles, which have no HTTP port, on this listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the worker's or janitor's metrics listener, e.g. `0.0.0.0:9235`; empty
    /// (the default): none.
    pub listen: String,
}

impl MetricsConfig {
    /// The listener's address, if one is configured.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let s = self.listen.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|e| {
            format!("metrics.listen {s:?}: {e} (expected an address such as 0.0.0.0:9235)")
        })
    }
}

/// Who may do what through the API. Off by default (public mode, as caddyserver.com).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// `public`: anyone may read and build; `token`: submitting needs a token with the
    /// `build` scope. In both modes `force`, cancelling, replacements beyond
    /// `packages.replaceable` and the admin endpoints need the `admin` scope.
    pub mode: AccessMode,
    /// In token mode: status, progress, history and downloads need no token.
    pub public_reads: bool,
    /// API tokens, sent as `Authorization: Bearer <secret>`.
    pub tokens: Vec<TokenConfig>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            mode: AccessMode::Public,
            public_reads: true,
            tokens: Vec::new(),
        }
    }
}

/// Access-control mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    Public,
    Token,
}

/// One API token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and events instead of the secret.
    pub name: String,
    /// The token itself (at least 16 characters); never logged.
    pub secret: Secret<String>,
    pub scopes: Vec<Scope>,
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Submit builds.
    Build,
    /// Everything: force, cancel, replacements, the admin endpoints.
    Admin,
}

/// Postgres, used by every role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user[:password]@host:port/dbname[?options]`.
    pub url: DatabaseUrl,
    /// Password, when it is not in the URL (keeps it out of the URL and of logs).
    pub password: Option<Secret<String>>,
    /// Connections in the pool of each process (the listening connection is extra).
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to the server, as libpq's `sslmode` (which the URL must not set).
    pub sslmode: SslMode,
    /// PEM file of the certificate authorities that sign the server's certificate. Empty:
    /// the system's roots. With `require`, giving it makes the mode `verify-ca` (as libpq).
    pub ssl_root_cert: PathBuf,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DatabaseUrl::new("postgres://postgres@127.0.0.1:5432/caddy_builds"),
            password: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            sslmode: SslMode::Prefer,
            ssl_root_cert: PathBuf::new(),
        }
    }
}

/// TLS to Postgres (libpq's `sslmode` values and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it; its certificate is not checked (an active attacker on
    /// the path can still read everything).
    Prefer,
    /// Always; the certificate is not checked unless `ssl_root_cert` is given.
    Require,
    /// Always, with a certificate signed by `ssl_root_cert` (any host name).
    VerifyCa,
    /// Always, with a certificate signed by `ssl_root_cert` and naming the URL's host.
    VerifyFull,
}

/// The process's single listening connection and its fan-out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Backstop: how often the listener reads the log's tail even without notifications, so
    /// that a lost notification delays a waiter by at most this much.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest wait between reconnection attempts of the listening connection.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_backoff: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            poll_interval: Duration::from_secs(5),
            max_reconnect_backoff: Duration::from_secs(5),
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How long open connections may take to finish after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Longest `wait` a status long-poll may ask for.
    #[serde(with = "humantime_serde")]
    pub max_long_poll: Duration,
    /// How long `/api/download` and `/api/compat` wait for a build to finish. When it runs
    /// out they answer 503 with `Retry-After` (never a 2xx without the binary: Caddy's CLI
    /// would install that body as its executable).
    #[serde(with = "humantime_serde")]
    pub download_wait: Duration,
    /// The `Retry-After` of that 503.
    #[serde(with = "humantime_serde")]
    pub download_retry_after: Duration,
    /// How long a client may take to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Submissions that create work (a new build, or reopening one) per client (IPv4
    /// address or IPv6 /64) and minute; joining a build and downloading are not counted.
    /// 0 turns the limit off.
    pub submissions_per_minute: u32,
    /// How many submissions a client may make at once before the rate applies.
    pub submission_burst: u32,
    /// Builds one client (an API token, or else an IPv4 address or IPv6 /64) may have
    /// queued or running at once; a request for another new build is answered 429. Callers
    /// with the admin scope are not limited. 0: no limit.
    pub max_queued_per_client: usize,
    /// Waiting requests (long-polls, event streams, download waits) one client may hold
    /// open at once (429 beyond); 0: no limit.
    pub max_waits_per_client: usize,
    /// Waiting requests of all clients together (503 with Retry-After beyond); 0: no limit.
    pub max_waits: usize,
    /// How long a client may take to send a request body (408 and the connection closed
    /// beyond).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Open connections of all clients together; more are closed at once. 0: no limit.
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per /64); more are closed at once. 0: no
    /// limit. Connections from `trusted_proxies` are not counted per client.
    pub max_connections_per_client: usize,
    /// Addresses or CIDR blocks of reverse proxies whose `X-Forwarded-For` / `Forwarded`
    /// header names the client; from anyone else those headers are ignored.
    pub trusted_proxies: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8234)),
            shutdown_grace: Duration::from_secs(10),
            max_long_poll: Duration::from_secs(60),
            download_wait: Duration::from_secs(15 * 60),
            download_retry_after: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            submissions_per_minute: 60,
            submission_burst: 20,
            max_queued_per_client: 20,
            trusted_proxies: Vec::new(),
            max_waits_per_client: 100,
            max_waits: 50_000,
            body_timeout: Duration::from_secs(10),
            max_connections: 60_000,
            max_connections_per_client: 256,
        }
    }
}

/// Build workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's id in leases and events; empty means `<hostname>-<pid>`.
    pub id: String,
    /// How long a claim is valid without renewal.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Backstop: an idle worker tries to claim this often even without a notification.
    #[serde(with = "humantime_serde")]
    pub claim_poll_interval: Duration,
    /// `docker` (isolated; the default) or `local` (host go, no isolation, development only).
    pub executor: ExecutorKind,
    /// Builds this worker runs at once.
    pub max_concurrent_builds: usize,
    /// Where each build gets its private temporary directory; empty means
    /// `<cache_dir>/builds` (see [`WorkerConfig::build_root`]). It must be owned by the
    /// worker's user and not writable by others (the worker refuses to start otherwise).
    pub build_dir: PathBuf,
    /// Where the shared Go module cache and this worker's build cache live.
    pub cache_dir: PathBuf,
    /// Longest time one Go command may run (each command of a phase has its own).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Longest time one build attempt may take from claim to publication.
    #[serde(with = "humantime_serde")]
    pub build_timeout: Duration,
    pub docker: DockerConfig,
    /// The `go` binary of the local executor (the real one: `$GOROOT/bin/go`).
    pub local_go: PathBuf,
    /// On SIGTERM/SIGINT: how long running builds may go on before they are stopped and
    /// released to other workers.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    pub preemption: PreemptionConfig,
    /// How often a worker removes what dead workers left on its host: containers of ours
    /// whose build no longer runs under the worker that made them, and their build
    /// directories.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    pub build_cache: BuildCacheConfig,
    /// Most output one build attempt keeps, in bytes; what it prints beyond is counted, not
    /// kept, and a marker says how much was left out.
    pub output_cap_bytes: u64,
}

/// The Go build cache builds get through GOCACHEPROG (docker executor): a local tier on the
/// worker's disk and a shared tier in the artifact storage, both content-addressed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildCacheConfig {
    /// On (the default): every compile step's go command (Go >= 1.24 in the builder image)
    /// asks the worker for build cache entries. Off: each build sees this worker's own
    /// build cache directory through an overlay of its own, as before.
    pub enabled: bool,
    /// Largest size of the local tier (`<cache_dir>/prog`), in bytes; the least recently
    /// used objects go first when it is exceeded.
    pub local_max_bytes: u64,
    /// Whether the fleet shares entries through the artifact storage (`buildcache/v1/`).
    pub shared: bool,
    /// Largest size of the shared tier, in bytes; the janitor removes the oldest objects
    /// beyond it.
    pub shared_max_bytes: u64,
    /// Whether builds with plugins or replacements publish what they compiled (after they
    /// succeeded and their binary was verified). Off (the default): only builds of Caddy
    /// alone do, whose code the operator trusts (docs/security.md says why).
    pub share_plugin_builds: bool,
}

impl Default for BuildCacheConfig {
    fn default() -> Self {
        BuildCacheConfig {
            enabled: true,
            local_max_bytes: 10 << 30,
            shared: true,
            shared_max_bytes: 50 << 30,
            share_plugin_builds: false,
        }
    }
}

impl WorkerConfig {
    /// The build directory in effect: `build_dir`, or `<cache_dir>/builds` when it is empty.
    pub fn build_root(&self) -> PathBuf {
        if self.build_dir.as_os_str().is_empty() {
            self.cache_dir.join("builds")
        } else {
            self.build_dir.clone()
        }
    }
}

/// How a worker on a spot/preemptible VM learns that its VM is going away.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreemptionConfig {
    pub detector: PreemptionDetector,
    /// Base URL of the metadata service; empty for the provider's own
    /// (gcp: http://metadata.google.internal, aws and azure: http://169.254.169.254).
    pub metadata_url: String,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for PreemptionConfig {
    fn default() -> Self {
        PreemptionConfig {
            detector: PreemptionDetector::None,
            metadata_url: String::new(),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// Which preemption notice a worker watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptionDetector {
    None,
    Gcp,
    Aws,
    Azure,
    /// SIGUSR1 (for platforms that forward their own notice as a signal).
    Signal,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: String::new(),
            lease: Duration::from_secs(60),
            claim_poll_interval: Duration::from_secs(5),
            executor: ExecutorKind::Docker,
            max_concurrent_builds: 2,
            build_dir: PathBuf::new(),
            cache_dir: PathBuf::from("/var/cache/caddy-build-server"),
            command_timeout: Duration::from_secs(600),
            build_timeout: Duration::from_secs(3600),
            docker: DockerConfig::default(),
            local_go: PathBuf::from("/usr/local/go/bin/go"),
            stop_timeout: Duration::from_secs(25),
            preemption: PreemptionConfig::default(),
            cleanup_interval: Duration::from_secs(300),
            build_cache: BuildCacheConfig::default(),
            output_cap_bytes: 10 << 20,
        }
    }
}

/// Which executor runs the Go commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    Docker,
    Local,
}

/// The docker executor's containers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine: `unix:///var/run/docker.sock`, `tcp://host:2375`; empty means DOCKER_HOST
    /// or the local socket.
    pub host: String,
    /// The builder image: any image with `go` on `path` (e.g. golang:1.26-alpine).
    pub image: String,
    /// PATH inside the image.
    pub path: String,
    /// Numeric `uid:gid` of the commands; never root.
    pub user: String,
    /// Memory limit per container, in bytes (also the swap limit).
    pub memory_bytes: i64,
    /// CPUs per container.
    pub cpus: f64,
    pub pids_limit: i64,
    /// Size of each container's /tmp.
    pub tmpfs_size: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: String::new(),
            image: "golang:1.26-alpine".into(),
            path: "/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin".into(),
            user: "65532:65532".into(),
            memory_bytes: 4 << 30,
            cpus: 2.0,
            pids_limit: 1024,
            tmpfs_size: "2g".into(),
        }
    }
}

/// The Go module proxy, for resolving versions (api) and for resolve steps (worker).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoConfig {
    /// GOPROXY: proxy URLs separated by ',' (fall through on 404/410) or '|' (on any
    /// error). Never `direct`.
    pub proxy: String,
    /// GOSUMDB (`off` only for private modules the checksum database cannot know).
    pub sumdb: String,
    /// Timeout of one request to the proxy when resolving versions.
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// How long resolved versions (and `latest`) are reused.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Private modules: path patterns (Go's GOPRIVATE syntax, e.g. `corp.example.com/*`)
    /// of modules the public checksum database is not asked about (GONOSUMDB). They are
    /// still fetched through `proxy`; every other module is still checked.
    pub private: Vec<String>,
    /// Credentials for authenticated module proxies, by host: added by the worker's gate
    /// to resolve steps' requests (never given to a build container), and used by the
    /// api's resolver.
    pub proxy_credentials: Vec<ProxyCredential>,
    /// PEM file of the certificate authorities a private proxy's HTTPS certificate chains
    /// to, added to the system's roots by the worker's gate and the api's resolver.
    /// Empty: the system's roots.
    pub proxy_ca_file: PathBuf,
}

/// Basic-auth credentials for one module proxy host (netrc's `machine`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyCredential {
    /// The proxy's host name, as in `proxy` (without scheme or port).
    pub host: String,
    pub username: String,
    /// Never logged.
    pub password: Secret<String>,
}

impl Default for GoConfig {
    fn default() -> Self {
        GoConfig {
            proxy: "https://proxy.golang.org".into(),
            sumdb: "sum.golang.org".into(),
            resolve_timeout: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(60),
            private: Vec::new(),
            proxy_credentials: Vec::new(),
            proxy_ca_file: PathBuf::new(),
        }
    }
}

impl GoConfig {
    /// The hosts of the `proxy` URLs, lower case. An error when `proxy` is not a list of
    /// proxy URLs (see [`cbs_domain::goproxy`]: no `direct`, no `off`, no credentials in
    /// URLs: they would reach every log).
    pub fn proxy_hosts(&self) -> Result<Vec<String>, String> {
        Ok(self.proxy_list()?.iter().map(|e| e.host()).collect())
    }

    fn proxy_list(&self) -> Result<Vec<cbs_domain::goproxy::ProxyEntry>, String> {
        use cbs_domain::goproxy::{parse, GoProxyError};
        parse(&self.proxy).map_err(|e| match e {
            GoProxyError::Credentials(_) => "go.proxy: a proxy URL carries credentials; put them in go.proxy_credentials (in the URL they would reach every log)".to_owned(),
            e => format!("go.proxy: {e}"),
        })
    }

    /// GONOSUMDB's value for `private`.
    pub fn gonosumdb(&self) -> String {
        self.private.join(",")
    }

    /// Checks `private` and `proxy_credentials`: patterns Go can read, credentials a netrc
    /// file can hold, for hosts `proxy` names. Messages never quote a password.
    pub fn check(&self) -> Result<(), String> {
        let hosts = self.proxy_hosts()?;
        for p in &self.private {
            if p.is_empty() || p.contains(|c: char| c == ',' || c.is_whitespace()) {
                return Err(format!(
                    "go.private: {p:?} is not a module path pattern (one pattern per entry, like corp.example.com/*)"
                ));
            }
        }
        for c in &self.proxy_credentials {
            let token = |v: &str| !v.is_empty() && !v.contains(|c: char| c.is_whitespace());
            if !token(&c.host) || !token(&c.username) {
                return Err(format!(
                    "go.proxy_credentials: host {:?} and username {:?} must be non-empty, without spaces",
                    c.host, c.username
                ));
            }
            if !token(c.password.expose()) {
                return Err(format!(
                    "go.proxy_credentials: the password for {} must be non-empty, without spaces (netrc cannot hold them)",
                    c.host
                ));
            }
            if !hosts.contains(&c.host.to_ascii_lowercase()) {
                return Err(format!(
                    "go.proxy_credentials: {} is not the host of any go.proxy URL (credentials are sent only to the proxies listed there)",
                    c.host
                ));
            }
        }
        Ok(())
    }

    /// The netrc file's text for `proxy_credentials` (a secret: write it to a private file).
    /// Each credential gets a `machine` line for its host and one per `host:port` of the
    /// proxy URLs on that host (the go command matches the URL's host with its port).
    pub fn netrc(&self) -> Option<Secret<String>> {
        if self.proxy_credentials.is_empty() {
            return None;
        }
        let authorities: Vec<(String, String)> = self
            .proxy_list()
            .unwrap_or_default()
            .iter()
            .map(|e| (e.authority().to_ascii_lowercase(), e.host()))
            .collect();
        let mut text = String::new();
        for c in &self.proxy_credentials {
            let mut machines = vec![c.host.to_ascii_lowercase()];
            for (a, host) in &authorities {
                if *host == machines[0] && !machines.contains(a) {
                    machines.push(a.clone());
                }
            }
            for m in machines {
                text.push_str(&format!(
                    "machine {m} login {} password {}\n",
                    c.username,
                    c.password.expose()
                ));
            }
        }
        Some(Secret::new(text))
    }
}

/// The plugin catalog (`GET /api/packages`) and which modules may be built.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackagesConfig {
    /// Build only modules listed in `catalog` (an allowlist).
    pub catalog_only: bool,
    /// Modules never built, as plugins or in replacements (old or new): exact module
    /// paths, or prefixes ending in `/`; compared without regard to case.
    pub deny: Vec<String>,
    /// Modules anyone may replace (`old` of a replacement): exact paths or prefixes ending
    /// in `/`. Empty (the default): only callers with the `admin` scope may replace.
    pub replaceable: Vec<String>,
    pub catalog: Vec<CatalogEntry>,
}

/// One plugin module of the catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The Go module path.
    pub path: String,
    /// Its source repository.
    #[serde(default)]
    pub repo: String,
    #[serde(default)]
    pub description: String,
    /// The Caddy modules it provides.
    #[serde(default)]
    pub modules: Vec<CatalogModule>,
}

/// A Caddy module of a catalog entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogModule {
    /// The module ID, like `dns.providers.cloudflare`.
    pub name: String,
    /// Link to its documentation.
    #[serde(default)]
    pub docs: String,
}

impl PackagesConfig {
    /// Why `module` may not be built here, if it may not. Deny rules ignore case (a case
    /// variant names the same repository on most hosts); the catalog matches exactly.
    pub fn refusal(&self, module: &str) -> Option<String> {
        if let Some(why) = self.denial(module) {
            return Some(why);
        }
        if self.catalog_only && !self.catalog.iter().any(|e| e.path == module) {
            return Some(format!(
                "module {module} is not in this server's catalog; GET /api/packages lists what can be built"
            ));
        }
        None
    }

    /// Why `module` is denied (the deny rules alone, without the catalog), if it is.
    pub fn denial(&self, module: &str) -> Option<String> {
        matches_any(&self.deny, module)
            .then(|| format!("module {module} may not be built on this server"))
    }

    /// Whether anyone (not only an admin) may replace `module`.
    pub fn anyone_may_replace(&self, module: &str) -> bool {
        matches_any(&self.replaceable, module)
    }
}

/// `module` is one of `rules` (exact paths, or prefixes ending in `/`), ignoring case.
fn matches_any(rules: &[String], module: &str) -> bool {
    let module = module.to_lowercase();
    rules.iter().any(|rule| {
        let rule = rule.to_lowercase();
        module == rule.trim_end_matches('/') || (rule.ends_with('/') && module.starts_with(&rule))
    })
}

/// Where artifacts are published: a directory (local disk or NFS) or an S3-compatible bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// The directory of the `fs` backend.
    pub dir: PathBuf,
    pub s3: S3Config,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Fs,
            dir: PathBuf::from("/var/lib/caddy-build-server/artifacts"),
            s3: S3Config::default(),
        }
    }
}

/// Which storage backend holds artifacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    Fs,
    S3,
}

/// The `s3` backend: any S3-compatible service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:9000`); empty for AWS's own endpoints.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every object key (`caddy/` puts artifacts under `caddy/builds/...`).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), what most S3-compatible servers need.
    pub path_style: bool,
    /// Static credentials; when empty, the SDK's default chain (environment, profile, web
    /// identity, instance metadata) is used.
    pub access_key_id: String,
    pub secret_access_key: Option<Secret<String>>,
    /// Objects at least this large are uploaded in parts of this size (min 5 MiB).
    pub part_size: u64,
    /// Attempts per request (the SDK retries with exponential backoff and jitter).
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Per-request timeout of small operations (head, delete, part upload has its own).
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// The api answers downloads with a redirect to a short-lived presigned URL instead
    /// of streaming the object itself.
    pub presign_downloads: bool,
    #[serde(with = "humantime_serde")]
    pub presign_ttl: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: true,
            access_key_id: String::new(),
            secret_access_key: None,
            part_size: 16 * 1024 * 1024,
            max_attempts: 4,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(60),
            presign_downloads: false,
            presign_ttl: Duration::from_secs(600),
        }
    }
}

/// How artifacts are signed (by the worker; the api only reads the public key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// The minisign secret key file (`caddy-build-server keygen` or `minisign -G` writes one).
    pub key_file: PathBuf,
    /// Its password; empty for an unencrypted key.
    pub password: Option<Secret<String>>,
    /// The public key file; empty means `<key_file>.pub`.
    pub public_key_file: PathBuf,
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig {
            key_file: PathBuf::from("/etc/caddy-build-server/minisign.key"),
            password: None,
            public_key_file: PathBuf::new(),
        }
    }
}

impl SigningConfig {
    /// The public key file in effect.
    pub fn public_key_path(&self) -> PathBuf {
        if self.public_key_file.as_os_str().is_empty() {
            let mut s = self.key_file.as_os_str().to_owned();
            s.push(".pub");
            PathBuf::from(s)
        } else {
            self.public_key_file.clone()
        }
    }
}

/// The janitor (migrations, rescue, retries, clean-up).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JanitorConfig {
    /// Run database migrations when the janitor starts.
    pub migrate_on_start: bool,
    /// Backstop: the janitor looks for expired leases and failed builds this often even
    /// without a notification.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A standby janitor tries to take over this often; the leader checks its lock as often.
    #[serde(with = "humantime_serde")]
    pub leader_check_interval: Duration,
    /// Attempts (failed or rescued) after which a build gives up.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further failure, with +-20% jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest delay between retries.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Artifacts neither built nor downloaded for this long are deleted (the build shows as
    /// `expired`; a new request rebuilds it). 0 keeps them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the janitor looks for such artifacts.
    #[serde(with = "humantime_serde")]
    pub retention_check_interval: Duration,
    /// How long builds' output is kept after they finished (checked as often as
    /// artifact retention); then it is removed and the build's history says so.
    pub output_retention: OutputRetention,
    /// Which succeeded builds a second worker builds again, to check that it gets the same
    /// bytes: `off`, `all`, or a fraction of them (`0.1` or `10%`; chosen by build key, so
    /// the same builds on every janitor). Operators may ask for any one build with
    /// `POST /api/admin/build/{key}/reproduce` whatever this says.
    pub reproduce: Reproduce,
}

/// `janitor.output_retention`: per outcome; 0 keeps output forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputRetention {
    /// Succeeded builds (and those whose artifact expired since).
    #[serde(with = "humantime_serde")]
    pub succeeded: Duration,
    /// Failed, given up and cancelled builds (their output is what explains them).
    #[serde(with = "humantime_serde")]
    pub failed: Duration,
}

impl Default for OutputRetention {
    fn default() -> Self {
        OutputRetention {
            succeeded: Duration::from_secs(30 * 24 * 3600),
            failed: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// `janitor.reproduce`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(try_from = "ReproduceSetting")]
pub enum Reproduce {
    #[default]
    Off,
    /// This fraction of builds, strictly between 0 and 1.
    Sample(f64),
    All,
}

impl Reproduce {
    /// Is the build whose key hashes to `unit` (uniform in [0, 1)) in the sample?
    pub fn selects(self, unit: f64) -> bool {
        match self {
            Reproduce::Off => false,
            Reproduce::All => true,
            Reproduce::Sample(f) => unit < f,
        }
    }
}

/// How `janitor.reproduce` is written: a word, a number or a percentage.
#[derive(Deserialize)]
#[serde(untagged)]
enum ReproduceSetting {
    Number(f64),
    Text(String),
}

impl TryFrom<ReproduceSetting> for Reproduce {
    type Error = String;

    fn try_from(v: ReproduceSetting) -> Result<Self, Self::Error> {
        let bad = |what: &str| {
            format!(
                "janitor.reproduce is `off`, `all`, or a fraction such as 0.1 or 10%; got {what}"
            )
        };
        let fraction = match v {
            ReproduceSetting::Number(f) => f,
            ReproduceSetting::Text(t) => match t.trim() {
                "off" | "none" => return Ok(Reproduce::Off),
                "all" => return Ok(Reproduce::All),
                other => match other.strip_suffix('%') {
                    Some(p) => p.trim().parse::<f64>().map_err(|_| bad(&t))? / 100.0,
                    None => other.parse::<f64>().map_err(|_| bad(&t))?,
                },
            },
        };
        if !fraction.is_finite() || !(0.0..=1.0).contains(&fraction) {
            return Err(bad(&fraction.to_string()));
        }
        Ok(if fraction == 0.0 {
            Reproduce::Off
        } else if fraction == 1.0 {
            Reproduce::All
        } else {
            Reproduce::Sample(fraction)
        })
    }
}

impl Default for JanitorConfig {
    fn default() -> Self {
        JanitorConfig {
            migrate_on_start: true,
            poll_interval: Duration::from_secs(5),
            leader_check_interval: Duration::from_secs(2),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(10),
            retry_backoff_max: Duration::from_secs(600),
            retention: Duration::from_secs(90 * 24 * 3600),
            retention_check_interval: Duration::from_secs(3600),
            output_retention: OutputRetention::default(),
            reproduce: Reproduce::Off,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for people) or `json` (for log collectors).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,cbs_store=debug`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A config that cannot be used; the message names the file and what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {file}: cannot read it: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {file}: {message}")]
    Template { file: PathBuf, message: String },
    #[error("config file {file}: {message}")]
    Yaml { file: PathBuf, message: String },
}

/// Where the config comes from: `CONFIG_PATH`, else `./config.yml`, else built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl Source {
    /// `CONFIG_PATH` if set (the file must exist), else `./config.yml` if it exists.
    pub fn locate() -> Source {
        match std::env::var_os(CONFIG_PATH_VAR) {
            Some(p) if !p.is_empty() => Source::File(PathBuf::from(p)),
            _ if Path::new(DEFAULT_PATH).exists() => Source::File(PathBuf::from(DEFAULT_PATH)),
            _ => Source::Defaults,
        }
    }
}

impl Config {
    /// Loads the config from where [`Source::locate`] says, with the process environment.
    pub fn load() -> Result<(Config, Source), ConfigError> {
        let source = Source::locate();
        let config = match &source {
            Source::File(path) => Config::from_file(path)?,
            Source::Defaults => Config::default(),
        };
        Ok((config, source))
    }

    /// Reads, renders and parses one file with the process environment.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::from_str_with_env(&text, path, |name| std::env::var(name).ok())
    }

    /// Renders `text` with `env` as the environment, then parses it. `file` names the source
    /// in errors.
    pub fn from_str_with_env(
        text: &str,
        file: &Path,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Result<Config, ConfigError> {
        let rendered =
            template::render(text, file, std::sync::Arc::new(env)).map_err(|message| {
                ConfigError::Template {
                    file: file.to_owned(),
                    message,
                }
            })?;
        parse_yaml(&rendered).map_err(|message| ConfigError::Yaml {
            file: file.to_owned(),
            message,
        })
    }

    /// This worker's id: the configured one, or `<hostname>-<pid>`.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    }
}

/// YAML to [`Config`], with the key path and line of the first error.
fn parse_yaml(text: &str) -> Result<Config, String> {
    // An empty file (or one of only comments) means "all defaults".
    if text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    }) {
        return Ok(Config::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let key = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!("key `{path}`: ")
        };
        format!("{key}{inner}")
    })
}

#[cfg(test)]
mod tests;
