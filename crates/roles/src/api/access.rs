//! Access control: API tokens with scopes, and who the client is.
//!
//! Off by default (public mode). Tokens come as `Authorization: Bearer <secret>`; the
//! secrets are kept only as SHA-256 digests and compared in constant time, every token
//! every time, so neither a token nor which token matched leaks through timing. A token
//! that is presented but unknown is always a 401, also in public mode: a client that
//! believes it is authenticated must learn that it is not.
//!
//! The client's address is the connection's peer, or, when the peer is one of
//! `api.trusted_proxies`, the nearest address in `X-Forwarded-For` (else `Forwarded`) that
//! is not itself a trusted proxy.

use std::net::IpAddr;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cbs_config::{AccessConfig, AccessMode, Scope};
use sha2::Digest;

use super::error::ApiError;
use super::limit::ClientAddr;

/// The configured tokens, as digests.
#[derive(Debug, Default)]
pub struct Tokens {
    mode: Option<AccessMode>,
    public_reads: bool,
    tokens: Vec<([u8; 32], String, Scope)>,
}

/// Who is asking: a token's name and its highest scope, or nobody.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub token: Option<(String, Scope)>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self.token, Some((_, Scope::Admin)))
    }

    /// The token's name, for logs and events.
    pub fn name(&self) -> Option<&str> {
        self.token.as_ref().map(|(n, _)| n.as_str())
    }
}

fn digest(secret: &str) -> [u8; 32] {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Equality of two digests that takes the same time wherever they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

impl Tokens {
    /// Digests of the configured tokens; an error names a token that is unusable.
    pub fn new(access: &AccessConfig) -> anyhow::Result<Tokens> {
        let mut tokens = Vec::new();
        for t in &access.tokens {
            let secret = t.secret.expose();
            if secret.len() < 16 {
                anyhow::bail!(
                    "access.tokens: token {:?} is shorter than 16 characters",
                    t.name
                );
            }
            let Some(scope) = t.scopes.iter().max().copied() else {
                anyhow::bail!("access.tokens: token {:?} has no scopes", t.name);
            };
            tokens.push((digest(secret), t.name.clone(), scope));
        }
        if access.mode == AccessMode::Token && tokens.is_empty() {
            anyhow::bail!("access.mode is token but access.tokens lists none");
        }
        Ok(Tokens {
            mode: Some(access.mode),
            public_reads: access.public_reads,
            tokens,
        })
    }

    fn token_mode(&self) -> bool {
        self.mode == Some(AccessMode::Token)
    }

    /// The caller a request's `Authorization` header names (nobody without one).
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::default());
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let presented = digest(presented);
        let mut found = None;
        for (d, name, scope) in &self.tokens {
            if same(d, &presented) && found.is_none() {
                found = Some((name.clone(), *scope));
            }
        }
        match found {
            Some(token) => Ok(Caller { token: Some(token) }),
            None => Err(unauthorized("unknown API token")),
        }
    }

    /// The caller, who must be allowed to submit builds.
    pub fn submitter(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = self.caller(headers)?;
        if self.token_mode() && caller.token.is_none() {
            return Err(unauthorized(
                "this server builds only for API tokens: send `Authorization: Bearer <token>`",
            ));
        }
        Ok(caller)
    }

    /// The caller, who must have the admin scope; `what` says what needs it.
    pub fn admin(&self, headers: &HeaderMap, what: &str) -> Result<Caller, ApiError> {
        let caller = self.caller(headers)?;
        if caller.token.is_none() {
            return Err(unauthorized(format!(
                "{what} needs an API token with the admin scope"
            )));
        }
        if !caller.is_admin() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("{what} needs the admin scope, which this token does not have"),
            ));
        }
        Ok(caller)
    }

    /// Whether a read needs a token here, and if so whether the request has a valid one.
    pub fn check_read(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let caller = self.caller(headers)?;
        if self.token_mode() && !self.public_reads && caller.token.is_none() {
            return Err(unauthorized(
                "reading needs an API token on this server: send `Authorization: Bearer <token>`",
            ));
        }
        Ok(())
    }

    /// Whether `force` is the caller's to use: in token mode only with the admin scope.
    pub fn may_force(&self, caller: &Caller) -> bool {
        !self.token_mode() || caller.is_admin()
    }
}

/// Adds `WWW-Authenticate` to a 401.
pub fn challenge(mut resp: Response) -> Response {
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"caddy-build-server\""),
        );
    }
    resp
}

/// Routes that are always public (health, the public key, the API's description).
fn always_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/api/public-key" | "/api/openapi.json"
    )
}

/// Middleware: reads need a token when the server says so (submissions and admin routes
/// check their own scopes).
pub async fn read_access(
    axum::extract::State(tokens): axum::extract::State<std::sync::Arc<Tokens>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !always_public(req.uri().path()) {
        if let Err(e) = tokens.check_read(req.headers()) {
            return challenge(e.into_response());
        }
    }
    challenge(next.run(req).await)
}

/// A CIDR block (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address or CIDR block like 10.0.0.0/8");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer, or what a trusted proxy in front says.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Hops, nearest last: X-Forwarded-For's addresses, else Forwarded's for= values.
    let mut hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .collect();
    if hops.is_empty() {
        hops = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    if !k.trim().eq_ignore_ascii_case("for") {
                        return None;
                    }
                    let v = v.trim().trim_matches('"');
                    let v = v
                        .strip_prefix('[')
                        .and_then(|v| v.split_once(']'))
                        .map_or(v, |(a, _)| a);
                    // `1.2.3.4:5678`
                    let v = match v.parse::<IpAddr>() {
                        Ok(ip) => return Some(ip),
                        Err(_) => v.rsplit_once(':').map_or(v, |(a, _)| a),
                    };
                    v.parse().ok()
                })
            })
            .collect();
    }
    hops.into_iter()
        .rev()
        .map(canonical)
        .find(|ip| !is_trusted(*ip))
        .unwrap_or(peer)
}

/// Middleware: replaces the connection's peer address by the client's (see [`client_addr`]).
pub async fn real_client(
    axum::extract::State(trusted): axum::extract::State<std::sync::Arc<Vec<Cidr>>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !trusted.is_empty() {
        if let Some(peer) = req.extensions().get::<ClientAddr>().copied() {
            let ip = client_addr(peer.0, req.headers(), &trusted);
            req.extensions_mut().insert(ClientAddr(ip));
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_and_scopes() {
        let access: AccessConfig = serde_json::from_str(
            r#"{"mode": "token", "tokens": [
                {"name": "ci", "secret": "aaaaaaaaaaaaaaaa1", "scopes": ["build"]},
                {"name": "ops", "secret": "bbbbbbbbbbbbbbbb2", "scopes": ["build", "admin"]}]}"#,
        )
        .unwrap();
        let t = Tokens::new(&access).unwrap();
        let none = HeaderMap::new();
        let ci = headers(&[("authorization", "Bearer aaaaaaaaaaaaaaaa1")]);
        let ops = headers(&[("authorization", "bearer bbbbbbbbbbbbbbbb2")]);
        let wrong = headers(&[("authorization", "Bearer nope")]);
        let basic = headers(&[("authorization", "Basic eDp5")]);
        assert_eq!(t.submitter(&none).unwrap_err().status, 401);
        assert_eq!(t.submitter(&ci).unwrap().name(), Some("ci"));
        assert_eq!(t.submitter(&wrong).unwrap_err().status, 401);
        assert_eq!(t.submitter(&basic).unwrap_err().status, 401);
        assert_eq!(t.admin(&ci, "x").unwrap_err().status, 403);
        assert_eq!(t.admin(&none, "x").unwrap_err().status, 401);
        assert!(t.admin(&ops, "x").unwrap().is_admin());
        assert!(t.check_read(&none).is_ok(), "reads are public by default");
        assert!(!t.may_force(&t.caller(&ci).unwrap()));
        assert!(t.may_force(&t.caller(&ops).unwrap()));
        // Public mode: anyone submits, a wrong token is still refused.
        let public = Tokens::new(&AccessConfig::default()).unwrap();
        assert!(public.submitter(&none).is_ok());
        assert_eq!(public.submitter(&wrong).unwrap_err().status, 401);
        assert!(public.may_force(&Caller::default()));
        // Unusable configs.
        let short: AccessConfig = serde_json::from_str(
            r#"{"tokens": [{"name": "x", "secret": "short", "scopes": ["build"]}]}"#,
        )
        .unwrap();
        assert!(Tokens::new(&short).is_err());
        let empty: AccessConfig = serde_json::from_str(r#"{"mode": "token"}"#).unwrap();
        assert!(Tokens::new(&empty).is_err());
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let trusted: Vec<Cidr> = ["10.0.0.0/8", "::1"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 10.1.1.1")]);
        assert_eq!(
            client_addr(ip("10.2.2.2"), &xff, &trusted),
            ip("203.0.113.9")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_addr(ip("198.51.100.1"), &xff, &trusted),
            ip("198.51.100.1")
        );
        // A client cannot hide behind an address it prepends itself.
        let spoof = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9")]);
        assert_eq!(client_addr(ip("::1"), &spoof, &trusted), ip("203.0.113.9"));
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::7]:443\";proto=https")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &fwd, &trusted),
            ip("2001:db8::7")
        );
        let fwd4 = headers(&[("forwarded", "for=192.0.2.60:1234")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &fwd4, &trusted),
            ip("192.0.2.60")
        );
        assert_eq!(
            client_addr(ip("::ffff:10.0.0.1"), &xff, &trusted),
            ip("203.0.113.9")
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
