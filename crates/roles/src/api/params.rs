//! Build requests as clients send them: a JSON body, or query parameters as the
//! caddyserver.com pages and `caddy upgrade` send them (`?os&arch&arm&version&p=module[@v]
//! ...&r=old=new[@v]...`). Both become a checked `BuildSpec`.

use cbs_api_types::{ArmValue, BuildSubmission};
use cbs_domain::BuildSpec;

use super::error::ApiError;

/// Longest query string accepted, in bytes.
pub const MAX_QUERY: usize = 8 * 1024;

/// A parsed request: the spec, and whether a failed build may be built again.
#[derive(Debug)]
pub struct Parsed {
    pub spec: BuildSpec,
    pub force: bool,
}

/// Checks a JSON body's request.
fn parsed(body: BuildSubmission) -> Result<Parsed, ApiError> {
    let arm = body.arm.map(|a| match a {
        ArmValue::Number(n) => n.to_string(),
        ArmValue::Text(t) => t,
    });
    let plugins: Vec<(&str, Option<&str>)> = body
        .plugins
        .iter()
        .map(|p| (p.module.as_str(), p.version.as_deref()))
        .collect();
    let replacements: Vec<(&str, &str, Option<&str>)> = body
        .replacements
        .iter()
        .map(|r| (r.old.as_str(), r.new.as_str(), r.version.as_deref()))
        .collect();
    let spec = BuildSpec::parse(
        &body.os,
        &body.arch,
        arm.as_deref(),
        body.caddy_version.as_deref(),
        &plugins,
        &replacements,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Parsed {
        spec,
        force: body.force,
    })
}

/// Parses a JSON body.
pub fn from_json(body: &[u8]) -> Result<Parsed, ApiError> {
    let body: BuildSubmission = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    parsed(body)
}

/// Splits `module[@version]`.
fn split_at_version(s: &str) -> (&str, Option<&str>) {
    match s.split_once('@') {
        Some((m, v)) => (m, Some(v)),
        None => (s, None),
    }
}

/// Parses query parameters. Unknown parameters are errors (a typo must not silently build
/// something else); `idempotency` is accepted and ignored, as caddyserver.com does.
pub fn from_query(query: Option<&str>) -> Result<Parsed, ApiError> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY {
        return Err(ApiError::new(
            axum::http::StatusCode::URI_TOO_LONG,
            format!("query string longer than {MAX_QUERY} bytes"),
        ));
    }
    let mut os = None;
    let mut arch = None;
    let mut arm = None;
    let mut version = None;
    let mut force = false;
    let mut plugins: Vec<String> = Vec::new();
    let mut replacements: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let once = |slot: &mut Option<String>, name: &str| -> Result<(), ApiError> {
            if slot.replace(v.to_string()).is_some() {
                return Err(ApiError::bad_request(format!(
                    "parameter {name} is given twice"
                )));
            }
            Ok(())
        };
        match k.as_ref() {
            "os" => once(&mut os, "os")?,
            "arch" => once(&mut arch, "arch")?,
            "arm" => once(&mut arm, "arm")?,
            "version" | "caddy_version" => once(&mut version, "version")?,
            "p" => plugins.push(v.to_string()),
            "r" => replacements.push(v.to_string()),
            "force" => force = matches!(v.as_ref(), "1" | "true" | "yes"),
            "idempotency" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                "unknown parameter {:?}; known: os, arch, arm, version, p, r, force, idempotency",
                other.chars().take(40).collect::<String>()
            )))
            }
        }
    }
    let os =
        os.ok_or_else(|| ApiError::bad_request("parameter os is required (for example os=linux)"))?;
    let arch = arch.ok_or_else(|| {
        ApiError::bad_request("parameter arch is required (for example arch=amd64)")
    })?;
    let plugin_pairs: Vec<(&str, Option<&str>)> =
        plugins.iter().map(|p| split_at_version(p)).collect();
    let mut replacement_triples = Vec::with_capacity(replacements.len());
    for r in &replacements {
        let (old, rest) = r.split_once('=').ok_or_else(|| {
            ApiError::bad_request(format!(
                "replacement {:?} must look like old=new@version",
                r.chars().take(80).collect::<String>()
            ))
        })?;
        let (new, v) = split_at_version(rest);
        replacement_triples.push((old, new, v));
    }
    let spec = BuildSpec::parse(
        &os,
        &arch,
        arm.as_deref(),
        version.as_deref(),
        &plugin_pairs,
        &replacement_triples,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Parsed { spec, force })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config())]

        /// Any query string and any JSON-ish body: a request or a 4xx that says why; never a
        /// panic or a server error (property test; CBS_FUZZ_CASES sets the number of inputs).
        #[test]
        fn any_query_or_body(
            query in proptest::prop_oneof![
                "(os=[a-z]{0,8}|arch=[a-z0-9]{0,6}|arm=[0-9a-z]{0,2}|version=[a-z0-9.v-]{0,8}|p=[a-z./@%0-9A-F-]{0,30}|r=[a-z./=@%-]{0,30}|force=[a-z0-9]{0,4}|[a-z%]{0,5}=[^&]{0,8})(&(os=[a-z]{0,8}|arch=[a-z0-9]{0,6}|p=[a-z./@-]{0,30}|[a-z%]{0,5}=[^&]{0,8})){0,6}",
                proptest::prelude::any::<String>(),
            ],
            body in proptest::prop_oneof![
                r#"\{"os":"[a-z]{0,6}","arch":"[a-z0-9]{0,5}"(,"plugins":\[\{"module":"[a-z./]{0,20}"\}\])?(,"arm":[0-9]{1,3})?\}"#,
                proptest::prelude::any::<String>(),
            ],
        ) {
            for r in [from_query(Some(&query)), from_json(body.as_bytes())] {
                if let Err(e) = r {
                    proptest::prop_assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
                    proptest::prop_assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn query_and_json_give_the_same_spec() {
        let q = from_query(Some(
            "os=linux&arch=arm&arm=7&version=v2.8.4&p=github.com%2Facme%2Falpha%40v1.0.0&p=example.com/b&r=example.com/x=example.com/y@v1.0.0&idempotency=3",
        ))
        .unwrap();
        let j = from_json(
            br#"{"os":"linux","arch":"arm","arm":7,"caddy_version":"v2.8.4","plugins":[{"module":"github.com/acme/alpha","version":"v1.0.0"},{"module":"example.com/b"}],"replacements":[{"old":"example.com/x","new":"example.com/y","new_version":"v1.0.0"}]}"#,
        )
        .unwrap();
        assert_eq!(q.spec, j.spec);
        assert!(!q.force);
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        let cases = [
            ("", "parameter os is required"),
            ("os=linux", "parameter arch is required"),
            ("os=linux&os=darwin&arch=amd64", "os is given twice"),
            (
                "os=linux&arch=amd64&colour=red",
                "unknown parameter \"colour\"",
            ),
            (
                "os=linux&arch=amd64&r=nonsense",
                "must look like old=new@version",
            ),
            ("os=linux&arch=amd64&p=bad%0Apath", "plugins[0].module"),
        ];
        for (q, want) in cases {
            let err = from_query(Some(q)).unwrap_err();
            assert!(err.message.contains(want), "{q}: {}", err.message);
        }
    }
}
