//! Values that must never reach logs, `Debug` output or responses.

use std::fmt;

use serde::Deserialize;

/// A secret: deserializes like `T`, prints as `[redacted]`. Read it with [`Secret::expose`],
/// only where it is handed to the thing that needs it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A Postgres connection URL. `Debug` and `Display` show it with any password replaced by
/// `[redacted]`, so the URL can be logged; [`DatabaseUrl::expose`] gives the real one.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password (also a `password=` query option).
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let mut out = match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                let userinfo = &url[scheme_end + 3..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        format!("{}{user}:[redacted]{}", &url[..scheme_end + 3], &url[at..])
                    }
                    None => url.clone(),
                }
            }
            _ => url.clone(),
        };
        // A `password=` option, in a URL query (`&`-separated) or a key/value string
        // (space-separated).
        if let Some(i) = out.find("password=") {
            let end = out[i..].find(['&', ' ']).map_or(out.len(), |j| i + j);
            out.replace_range(i..end, "password=[redacted]");
        }
        out
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}
