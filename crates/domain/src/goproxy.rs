//! GOPROXY lists, in one place: the module proxy client (crates/goproxy), the config's
//! checks and netrc (crates/config) and the worker read `go.proxy` with this parser.
//!
//! Builds only ever fetch modules through proxies: a list holds `http(s)://` URLs separated
//! by `,` (fall through to the next on 404/410) or `|` (on any error). `direct` and `off`
//! are refused (a build must not reach version control hosts, nor be configured to fetch
//! nothing), as are URLs that carry credentials (they would travel with every request and
//! show in every log; credentials are configured separately). Error messages never quote
//! user information.

/// How one proxy entry hands over to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallthrough {
    /// `,`: only when the proxy says 404 or 410.
    NotFound,
    /// `|`: on any error.
    AnyError,
}

/// One entry of a GOPROXY list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyEntry {
    /// The URL, without a trailing `/`.
    pub url: String,
    /// How a failure of this proxy hands over to the next.
    pub fallthrough: Fallthrough,
}

impl ProxyEntry {
    /// The URL's authority (`host:port` as written).
    pub fn authority(&self) -> &str {
        authority(&self.url)
    }

    /// The URL's host, lower case, without port.
    pub fn host(&self) -> String {
        host(&self.url)
    }
}

/// A GOPROXY value that is not a list of proxy URLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoProxyError {
    #[error("invalid GOPROXY setting {0:?}: list proxy URLs (http or https) separated by ',' or '|'; 'direct' and 'off' are not allowed")]
    NotProxies(String),
    #[error("{0}: a proxy URL must not carry credentials (configure them separately)")]
    Credentials(String),
}

/// Parses a GOPROXY value.
pub fn parse(value: &str) -> Result<Vec<ProxyEntry>, GoProxyError> {
    let bad = || GoProxyError::NotProxies(redact(value));
    let mut out = Vec::new();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let end = rest.find([',', '|']).unwrap_or(rest.len());
        let entry = rest[..end].trim().trim_end_matches('/');
        let fallthrough = match rest[end..].chars().next() {
            Some('|') => Fallthrough::AnyError,
            _ => Fallthrough::NotFound,
        };
        if !(entry.starts_with("http://") || entry.starts_with("https://")) {
            return Err(bad());
        }
        if authority(entry).contains('@') {
            return Err(GoProxyError::Credentials(redact(value)));
        }
        out.push(ProxyEntry {
            url: entry.to_owned(),
            fallthrough,
        });
        rest = rest.get(end + 1..).unwrap_or("");
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// The authority (`user@host:port`) of an `http(s)://` URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

/// The host of an `http(s)://` URL, lower case, without port or user information.
pub fn host(url: &str) -> String {
    let a = authority(url);
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    let h = match a.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => a.split(':').next().unwrap_or(""),
    };
    h.to_ascii_lowercase()
}

/// A GOPROXY value with any user information of its URLs replaced by `***`.
pub fn redact(value: &str) -> String {
    value
        .split_inclusive([',', '|'])
        .map(|part| {
            let a = authority(part);
            match a.rsplit_once('@') {
                Some((_, h)) => part.replacen(a, &format!("***@{h}"), 1),
                None => part.to_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        let p = parse("https://a.example, http://b.example/|https://c.example").unwrap();
        let got: Vec<_> = p.iter().map(|e| (e.url.as_str(), e.fallthrough)).collect();
        assert_eq!(
            got,
            vec![
                ("https://a.example", Fallthrough::NotFound),
                ("http://b.example", Fallthrough::AnyError),
                ("https://c.example", Fallthrough::NotFound),
            ]
        );
        for bad in [
            "",
            "direct",
            "https://a,direct",
            "off",
            "file:///tmp/x",
            "ftp://x",
        ] {
            assert!(
                matches!(parse(bad), Err(GoProxyError::NotProxies(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn credentials_are_refused_and_never_echoed() {
        let e = parse("https://a.example,https://u:secret@b.example/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must not carry credentials"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = parse("direct,https://u:secret@b.example")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            redact("https://u:pw@a.example:8443/p|https://b.example"),
            "https://***@a.example:8443/p|https://b.example"
        );
        assert_eq!(host("https://U:p@[::1]:8443/x"), "::1");
        assert_eq!(host("https://Proxy.Example:8443"), "proxy.example");
        let e = &parse("https://Proxy.Example:8443/x").unwrap()[0];
        assert_eq!(
            (e.authority(), e.host().as_str()),
            ("Proxy.Example:8443", "proxy.example")
        );
    }
}
