//! A client of the Go module proxy protocol (`$base/$module/@v/list`, `/@v/$version.info`,
//! `/@latest`, as `go help goproxy` documents it), used to turn the
//! versions a user asks for (`latest`, a branch, a tag) into absolute versions before a
//! build is keyed and queued.
//!
//! - `GOPROXY`-style lists: `https://a,https://b` falls through to the next proxy on 404 and
//!   410 only; `https://a|https://b` on any error. `direct` and `off` are refused: builds
//!   never fetch from version control.
//! - `latest` means what the go command means: the highest release in `@v/list`, else the
//!   highest pre-release, else `@latest` (a pseudo-version).
//! - Answers are cached for a short time; a proxy that cannot be reached is our problem
//!   ([`ResolveError::is_retryable`]), an unknown module or version is the user's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cbs_domain::{
    BuildRequest, BuildSpec, ModulePath, ModuleVersion, Plugin, Replacement, VersionQuery,
};
use serde::Deserialize;
use tracing::debug;

pub use cbs_domain::goproxy::redact;
use cbs_domain::goproxy::{host, Fallthrough};

/// Why a version could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The user's error: no such module or version on any proxy.
    #[error("{module}@{query}: not found on the module proxy{}", detail_suffix(.detail))]
    NotFound {
        module: String,
        query: String,
        detail: String,
    },
    /// Ours: the proxy could not be reached or answered with an error.
    #[error("module proxy {proxy} is unavailable: {detail}")]
    Unavailable { proxy: String, detail: String },
    /// The proxy answered with something that is not a valid version for the module.
    #[error("{module}@{query}: the module proxy answered {answer:?}, which is not a valid version for this module")]
    BadAnswer {
        module: String,
        query: String,
        answer: String,
    },
    /// Not a list of proxy URLs (the message says why; it never quotes credentials).
    #[error("{0}")]
    BadSetting(String),
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" ({d})")
    }
}

impl ResolveError {
    /// Trying again later may help (the proxy was unavailable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ResolveError::Unavailable { .. })
    }
}

/// Basic-auth credentials for the proxies on one host.
#[derive(Clone)]
pub struct Credential {
    /// Host name, compared without regard to case and port (as netrc's `machine`).
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credential({}, {}, [redacted])",
            self.host, self.username
        )
    }
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// A GOPROXY value: `https://proxy.golang.org` or a list.
    pub goproxy: String,
    /// Credentials sent to the proxies of their host (and only to those).
    pub credentials: Vec<Credential>,
    /// Extra certificate authorities (PEM) for the proxies' HTTPS certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
    /// How long answers are reused.
    pub cache_ttl: Duration,
}

/// Resolves versions through the module proxy. Cheap to share (`Arc`) across tasks.
#[derive(Debug)]
pub struct Resolver {
    /// Each proxy URL, how it falls through, and the credentials for its host.
    proxies: Vec<(String, Fallthrough, Option<Credential>)>,
    http: reqwest::Client,
    cache_ttl: Duration,
    cache: Mutex<Cache>,
}

/// Largest answer read from a proxy for a version list, `.info` or `@latest`.
pub const MAX_ANSWER: usize = 1 << 20;

/// Answers kept at most (in two generations: when the newer one is full, the older one
/// is dropped, so memory is bounded and every operation is O(1)).
const CACHE_ENTRIES: usize = 10_000;

/// The resolver's cache of answers, bounded, each answer valid for the TTL.
#[derive(Debug, Default)]
struct Cache {
    current: HashMap<String, Cached>,
    old: HashMap<String, Cached>,
}

impl Cache {
    fn get(&mut self, key: &str, ttl: Duration) -> Option<Result<ModuleVersion, ResolveError>> {
        let (at, r) = self.current.get(key).or_else(|| self.old.get(key))?;
        (at.elapsed() < ttl).then(|| r.clone())
    }

    fn insert(&mut self, key: String, value: Cached) {
        if self.current.len() >= CACHE_ENTRIES / 2 {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

/// A cached answer and when it was fetched.
type Cached = (Instant, Result<ModuleVersion, ResolveError>);

#[derive(Deserialize)]
struct Info {
    #[serde(rename = "Version")]
    version: String,
}

/// Outcome of asking one proxy for one URL path.
enum Fetch {
    Body(String),
    Missing(String),
}

/// Parses a GOPROXY value into proxies and how each falls through to the next.
fn parse_goproxy(value: &str) -> Result<Vec<(String, Fallthrough)>, ResolveError> {
    cbs_domain::goproxy::parse(value)
        .map(|list| list.into_iter().map(|e| (e.url, e.fallthrough)).collect())
        .map_err(|e| ResolveError::BadSetting(e.to_string()))
}

use cbs_domain::module::escape;

impl Resolver {
    pub fn new(config: &ProxyConfig) -> Result<Resolver, ResolveError> {
        let proxies = parse_goproxy(&config.goproxy)?
            .into_iter()
            .map(|(url, mode)| {
                let h = host(&url);
                let credential = config
                    .credentials
                    .iter()
                    .find(|c| c.host.eq_ignore_ascii_case(&h))
                    .cloned();
                (url, mode, credential)
            })
            .collect();
        let mut http = reqwest::Client::builder();
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ResolveError::BadSetting(format!("the proxy CA file: {e}")))?;
            if certs.is_empty() {
                return Err(ResolveError::BadSetting(
                    "the proxy CA file holds no PEM certificate".into(),
                ));
            }
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("caddy-build-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ResolveError::Unavailable {
                proxy: redact(&config.goproxy),
                detail: format!("HTTP client: {e}"),
            })?;
        Ok(Resolver {
            proxies,
            http,
            cache_ttl: config.cache_ttl,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// The configured GOPROXY list with proxy `i` replaced by `{base}/{i}`, separators kept:
    /// what a sandbox that reaches the proxies only through a forwarder at `base` uses
    /// (fall-through between proxies stays Go's own).
    pub fn forwarded_goproxy(&self, base: &str) -> String {
        let mut out = String::new();
        for i in 0..self.proxies.len() {
            if i > 0 {
                out.push(match self.proxies[i - 1].1 {
                    Fallthrough::AnyError => '|',
                    Fallthrough::NotFound => ',',
                });
            }
            out.push_str(&format!("{base}/{i}"));
        }
        out
    }

    /// How many proxies the GOPROXY list names.
    pub fn proxy_count(&self) -> usize {
        self.proxies.len()
    }

    /// GETs `path` (already escaped, relative to the proxy's root) from proxy `index` with
    /// that proxy's credentials, for a forwarder. The error names the proxy without
    /// credentials and says why it could not be reached.
    pub async fn forward(
        &self,
        index: usize,
        path: &str,
        user_agent: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let Some((proxy, _, credential)) = self.proxies.get(index) else {
            return Err(format!("no proxy number {index}"));
        };
        let mut get = self.http.get(format!("{proxy}/{path}"));
        if let Some(c) = credential {
            get = get.basic_auth(&c.username, Some(&c.password));
        }
        if let Some(ua) = user_agent {
            get = get.header(reqwest::header::USER_AGENT, ua);
        }
        get.send().await.map_err(|e| {
            let e = e.without_url();
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            format!("cannot reach the module proxy {} ({why})", redact(proxy))
        })
    }

    /// Answers cached now (bounded by [`CACHE_ENTRIES`]).
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    /// GETs `path` from the proxies in order, falling through as configured.
    async fn fetch(&self, path: &str) -> Result<Fetch, ResolveError> {
        // What the last proxy tried said: missing (with the proxy's words) or an error.
        let mut last: Result<String, ResolveError> = Ok(String::new());
        for (proxy, mode, credential) in &self.proxies {
            let url = format!("{proxy}/{path}");
            let unavailable = |detail: String| ResolveError::Unavailable {
                proxy: proxy.clone(),
                detail,
            };
            let mut get = self.http.get(&url);
            if let Some(c) = credential {
                get = get.basic_auth(&c.username, Some(&c.password));
            }
            let error = match get.send().await {
                Err(e) if e.is_timeout() => unavailable("timed out".to_owned()),
                // Without the URL (reqwest's message has it; ours names the proxy).
                Err(e) => unavailable(format!("cannot connect ({})", e.without_url())),
                Ok(resp) => {
                    let status = resp.status();
                    let body = match read_capped(resp).await {
                        Ok(b) => b,
                        Err(detail) => {
                            let error = unavailable(detail);
                            match mode {
                                Fallthrough::AnyError => {
                                    last = Err(error);
                                    continue;
                                }
                                Fallthrough::NotFound => return Err(error),
                            }
                        }
                    };
                    if status.is_success() {
                        return Ok(Fetch::Body(body));
                    }
                    if status.as_u16() == 404 || status.as_u16() == 410 {
                        debug!(%url, %status, "not on this proxy");
                        last = Ok(body
                            .lines()
                            .next()
                            .unwrap_or("")
                            .chars()
                            .take(200)
                            .collect());
                        continue;
                    }
                    if status.as_u16() == 401 || status.as_u16() == 403 {
                        unavailable(format!(
                            "HTTP {status}: the proxy refused {} (go.proxy_credentials)",
                            if credential.is_some() {
                                "the configured credentials"
                            } else {
                                "a request without credentials"
                            }
                        ))
                    } else {
                        unavailable(format!("HTTP {status}"))
                    }
                }
            };
            match mode {
                Fallthrough::AnyError => last = Err(error),
                Fallthrough::NotFound => return Err(error),
            }
        }
        last.map(Fetch::Missing)
    }

    /// Resolves one module's version query to an absolute version.
    pub async fn resolve(
        &self,
        module: &ModulePath,
        query: &VersionQuery,
    ) -> Result<ModuleVersion, ResolveError> {
        let cache_key = format!("{module}@{query}");
        if let Some(r) = self
            .cache
            .lock()
            .expect("cache lock")
            .get(&cache_key, self.cache_ttl)
        {
            return r;
        }
        let result = self.resolve_uncached(module, query).await;
        // Unavailability is not cached: the next request should try again.
        if !matches!(result, Err(ResolveError::Unavailable { .. })) {
            let mut cache = self.cache.lock().expect("cache lock");
            cache.insert(cache_key, (Instant::now(), result.clone()));
        }
        result
    }

    async fn resolve_uncached(
        &self,
        module: &ModulePath,
        query: &VersionQuery,
    ) -> Result<ModuleVersion, ResolveError> {
        let base = module.escaped();
        let not_found = |detail: String| ResolveError::NotFound {
            module: module.to_string(),
            query: query.to_string(),
            detail,
        };
        let answer = match query {
            VersionQuery::Latest => match self.fetch(&format!("{base}/@v/list")).await? {
                Fetch::Body(list) => match highest(module, &list) {
                    Some(v) => return Ok(v),
                    None => match self.fetch(&format!("{base}/@latest")).await? {
                        Fetch::Body(b) => b,
                        Fetch::Missing(d) => return Err(not_found(d)),
                    },
                },
                Fetch::Missing(d) => return Err(not_found(d)),
            },
            VersionQuery::Exact(v) => {
                match self
                    .fetch(&format!("{base}/@v/{}.info", escape(v.as_str())))
                    .await?
                {
                    Fetch::Body(b) => b,
                    Fetch::Missing(d) => return Err(not_found(d)),
                }
            }
            VersionQuery::Query(q) => {
                match self.fetch(&format!("{base}/@v/{}.info", escape(q))).await? {
                    Fetch::Body(b) => b,
                    Fetch::Missing(d) => return Err(not_found(d)),
                }
            }
        };
        let bad = |answer: &str| ResolveError::BadAnswer {
            module: module.to_string(),
            query: query.to_string(),
            answer: answer.chars().take(100).collect(),
        };
        let info: Info = serde_json::from_str(&answer).map_err(|_| bad(&answer))?;
        let version: ModuleVersion = info.version.parse().map_err(|_| bad(&info.version))?;
        version.check_fits(module).map_err(|_| bad(&info.version))?;
        if let VersionQuery::Exact(asked) = query {
            if &version != asked {
                return Err(bad(&info.version));
            }
        }
        Ok(version)
    }

    /// Every version the proxies list for `module` (its `@v/list`), newest first, releases
    /// before pre-releases; versions that do not fit the module's major version are left
    /// out. Not cached: the caller keeps the answer as long as it likes.
    pub async fn list_versions(
        &self,
        module: &ModulePath,
    ) -> Result<Vec<ModuleVersion>, ResolveError> {
        match self.fetch(&format!("{}/@v/list", module.escaped())).await? {
            Fetch::Body(list) => Ok(sorted_versions(module, &list)),
            Fetch::Missing(_) => Ok(Vec::new()),
        }
    }

    /// Asks the proxies, uncached, for every module version of `request` (Caddy, plugins,
    /// replacements): `Err(Unavailable)` if one could not be asked (unreachable, timed out,
    /// a server error), `Ok(())` if the proxies answered every request, found or not. The
    /// worker uses this after a failed resolve step to tell whose fault it was.
    pub async fn probe_request(&self, request: &BuildRequest) -> Result<(), ResolveError> {
        let caddy = cbs_domain::caddy_module();
        let mut wanted: Vec<(&ModulePath, &ModuleVersion)> =
            vec![(&caddy, request.caddy_version())];
        wanted.extend(request.plugins().iter().map(|p| (&p.module, &p.version)));
        wanted.extend(request.replacements().iter().map(|r| (&r.new, &r.version)));
        futures::future::try_join_all(wanted.into_iter().map(|(m, v)| async move {
            self.fetch(&format!("{}/@v/{}.info", m.escaped(), escape(v.as_str())))
                .await
                .map(|_| ())
        }))
        .await
        .map(|_| ())
    }

    /// Resolves every version of a spec (concurrently) into a request ready to be keyed.
    pub async fn resolve_spec(&self, spec: &BuildSpec) -> Result<BuildRequest, ResolveError> {
        let caddy = cbs_domain::caddy_module();
        let caddy_version = self.resolve(&caddy, &spec.caddy);
        let plugins = futures::future::try_join_all(spec.plugins.iter().map(|p| async move {
            Ok::<_, ResolveError>(Plugin {
                module: p.module.clone(),
                version: self.resolve(&p.module, &p.version).await?,
            })
        }));
        let replacements =
            futures::future::try_join_all(spec.replacements.iter().map(|r| async move {
                Ok::<_, ResolveError>(Replacement {
                    old: r.old.clone(),
                    new: r.new.clone(),
                    version: self.resolve(&r.new, &r.version).await?,
                })
            }));
        let (caddy_version, plugins, replacements) =
            futures::try_join!(caddy_version, plugins, replacements)?;
        BuildRequest::new(spec.platform.clone(), caddy_version, plugins, replacements).map_err(
            |e| ResolveError::BadAnswer {
                module: "request".into(),
                query: String::new(),
                answer: e.to_string(),
            },
        )
    }
}

/// A proxy's answer as text, at most [`MAX_ANSWER`] bytes (a larger one is an error).
async fn read_capped(mut resp: reqwest::Response) -> Result<String, String> {
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(format!("its answer is larger than {MAX_ANSWER} bytes"));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Err(format!("its answer is larger than {MAX_ANSWER} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(format!("reading its answer: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The version `latest` means in a `@v/list` answer: the highest release, else the highest
/// pre-release; only versions valid for the module count.
/// The valid versions of a `@v/list` answer: releases newest first, then pre-releases
/// newest first, without duplicates.
fn sorted_versions(module: &ModulePath, list: &str) -> Vec<ModuleVersion> {
    let mut valid: Vec<ModuleVersion> = list
        .lines()
        .filter_map(|l| l.trim().parse::<ModuleVersion>().ok())
        .filter(|v| v.check_fits(module).is_ok())
        .collect();
    valid.sort_by(|a, b| {
        let pre = |v: &ModuleVersion| v.as_str().contains('-');
        pre(a).cmp(&pre(b)).then_with(|| b.cmp(a))
    });
    valid.dedup();
    valid
}

fn highest(module: &ModulePath, list: &str) -> Option<ModuleVersion> {
    let valid: Vec<ModuleVersion> = list
        .lines()
        .filter_map(|l| l.trim().parse::<ModuleVersion>().ok())
        .filter(|v| v.check_fits(module).is_ok())
        .collect();
    let is_release = |v: &ModuleVersion| !v.as_str().contains('-');
    valid
        .iter()
        .filter(|v| is_release(v))
        .max()
        .or_else(|| valid.iter().max())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_versions_are_releases_newest_first_then_prereleases() {
        let caddy: ModulePath = "github.com/caddyserver/caddy/v2".parse().unwrap();
        let list = "v2.7.6\nv2.9.0-beta.1\nnot-a-version\nv2.8.4\nv1.0.0\nv2.8.4\nv2.10.0-rc.1\n";
        let got: Vec<String> = sorted_versions(&caddy, list)
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect();
        assert_eq!(
            got,
            ["v2.8.4", "v2.7.6", "v2.10.0-rc.1", "v2.9.0-beta.1"],
            "v1.0.0 does not fit a /v2 module; duplicates and junk are dropped"
        );
    }

    #[test]
    fn a_proxy_ca_file_without_certificates_is_refused() {
        for pem in [
            &b""[..],
            b"not a certificate",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n",
        ] {
            let e = Resolver::new(&ProxyConfig {
                goproxy: "https://proxy.example".into(),
                credentials: vec![],
                ca_pem: Some(pem.to_vec()),
                timeout: Duration::from_secs(1),
                cache_ttl: Duration::from_secs(1),
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("proxy CA file"), "{e}");
        }
    }

    #[test]
    fn goproxy_lists_are_read_by_the_domain_parser() {
        let e = parse_goproxy("https://a,direct").unwrap_err().to_string();
        assert!(e.contains("'direct' and 'off' are not allowed"), "{e}");
        let e = parse_goproxy("https://u:secret@b.example")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("must not carry credentials") && !e.contains("secret"),
            "{e}"
        );
        assert_eq!(parse_goproxy("https://a/").unwrap()[0].0, "https://a");
    }

    #[test]
    fn latest_prefers_releases_then_prereleases() {
        let m: ModulePath = "example.com/m".parse().unwrap();
        let v = |s: &str| highest(&m, s).map(|v| v.to_string());
        assert_eq!(
            v("v1.0.0\nv1.10.0\nv1.2.0\nv2.0.0\n"),
            Some("v1.10.0".into())
        );
        assert_eq!(v("v1.0.0\nv1.1.0-rc.1\n"), Some("v1.0.0".into()));
        assert_eq!(v("v1.1.0-rc.1\nv1.1.0-beta\n"), Some("v1.1.0-rc.1".into()));
        assert_eq!(v("garbage\n\n"), None);
        let m2: ModulePath = "example.com/m/v2".parse().unwrap();
        assert_eq!(highest(&m2, "v2.1.0\nv3.0.0\n").unwrap().as_str(), "v2.1.0");
    }

    #[test]
    fn the_cache_is_bounded_and_answers_expire() {
        let mut c = Cache::default();
        let v: ModuleVersion = "v1.0.0".parse().unwrap();
        for i in 0..100_000 {
            c.insert(format!("m{i}"), (Instant::now(), Ok(v.clone())));
            assert!(c.len() <= CACHE_ENTRIES);
        }
        assert!(c.get("m99999", Duration::from_secs(60)).is_some());
        assert!(c.get("m0", Duration::from_secs(60)).is_none(), "forgotten");
        assert!(c.get("m99999", Duration::ZERO).is_none(), "expired");
    }

    #[test]
    fn escapes_queries() {
        assert_eq!(escape("Master"), "!master");
        assert_eq!(escape("v1.2.3"), "v1.2.3");
    }
}
