//! Provenance of an artifact: an in-toto Statement v1 whose subject is the binary and whose
//! predicate is SLSA provenance v1: what was asked for (the resolved request), every module
//! linked into the binary (from its embedded build information, with go.sum hashes), the
//! builder image, the worker and the times. Signed like the binary, with a detached minisign
//! signature (`provenance.json.minisig`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

/// The statement's type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The predicate's type.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// Our build type: xcaddy's steps, each Go step in a hardened container.
pub const BUILD_TYPE: &str = "urn:caddy-build-server:buildtype:xcaddy-in-docker:v1";

/// A module linked into the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub version: String,
    /// `h1:...` from go.sum, when the binary records it.
    pub sum: Option<String>,
    /// What it was replaced with: path, version and sum.
    pub replaced_by: Option<Box<Module>>,
}

/// Everything the statement says.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub file_name: &'a str,
    pub sha256: &'a str,
    pub build_key: &'a str,
    /// This run: `<build key>/<attempt>`, or `<build key>/reproduction-<n>` for a second
    /// builder's statement about the same binary.
    pub invocation_id: &'a str,
    /// The resolved request as the API shows it.
    pub request: Value,
    /// The Go toolchain that built it (`go1.25.1`).
    pub go_version: &'a str,
    /// The binary's modules: the main module's dependencies in its build information.
    pub modules: &'a [Module],
    /// The builder image (its id, `sha256:...`) and its reference (name:tag).
    pub builder_image_id: &'a str,
    pub builder_image: &'a str,
    pub worker_id: &'a str,
    pub server_version: &'a str,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn module_uri(m: &Module) -> String {
    format!("pkg:golang/{}@{}", m.path, m.version)
}

fn descriptor(m: &Module) -> Value {
    let mut d = json!({ "uri": module_uri(m), "name": m.path });
    let mut ann = serde_json::Map::new();
    ann.insert("version".into(), json!(m.version));
    if let Some(sum) = &m.sum {
        ann.insert("go.sum".into(), json!(sum));
    }
    if let Some(r) = &m.replaced_by {
        let mut repl = json!({ "path": r.path });
        if !r.version.is_empty() {
            repl["version"] = json!(r.version);
        }
        if let Some(sum) = &r.sum {
            repl["go.sum"] = json!(sum);
        }
        ann.insert("replacedBy".into(), repl);
    }
    d["annotations"] = Value::Object(ann);
    d
}

/// The statement as JSON.
pub fn statement(i: &Input<'_>) -> Value {
    let digest_of_image = i
        .builder_image_id
        .strip_prefix("sha256:")
        .map(|h| json!({ "sha256": h }))
        .unwrap_or_else(|| json!({}));
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{ "name": i.file_name, "digest": { "sha256": i.sha256 } }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "buildKey": i.build_key,
                    "request": i.request,
                },
                "internalParameters": {
                    "goVersion": i.go_version,
                },
                "resolvedDependencies": i.modules.iter().map(descriptor).collect::<Vec<_>>(),
            },
            "runDetails": {
                "builder": {
                    "id": format!("urn:caddy-build-server:worker:{}", i.worker_id),
                    "version": { "caddy-build-server": i.server_version },
                    "builderDependencies": [{
                        "uri": format!("docker-image:{}", i.builder_image),
                        "digest": digest_of_image,
                    }],
                },
                "metadata": {
                    "invocationId": i.invocation_id,
                    "startedOn": time(i.started),
                    "finishedOn": time(i.finished),
                },
            },
        },
    })
}

/// The `path@version` of every module a statement lists (for checks against a binary).
pub fn listed_modules(statement: &Value) -> Vec<String> {
    statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .map(|deps| {
            deps.iter()
                .filter_map(|d| {
                    let uri = d["uri"].as_str()?;
                    Some(uri.strip_prefix("pkg:golang/")?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_shape() {
        let modules = vec![
            Module {
                path: "github.com/caddyserver/caddy/v2".into(),
                version: "v2.8.4".into(),
                sum: Some("h1:abc=".into()),
                replaced_by: None,
            },
            Module {
                path: "example.com/x".into(),
                version: "v1.0.0".into(),
                sum: None,
                replaced_by: Some(Box::new(Module {
                    path: "example.com/y".into(),
                    version: "v1.1.0".into(),
                    sum: Some("h1:def=".into()),
                    replaced_by: None,
                })),
            },
        ];
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let s = statement(&Input {
            file_name: "caddy",
            sha256: "00ff",
            build_key: "k",
            invocation_id: "k/2",
            request: json!({"os": "linux"}),
            go_version: "go1.25.1",
            modules: &modules,
            builder_image_id: "sha256:1234",
            builder_image: "builder:1",
            worker_id: "w1",
            server_version: "0.1.0",
            started: t,
            finished: t,
        });
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["subject"][0]["digest"]["sha256"], "00ff");
        assert_eq!(s["predicateType"], PREDICATE_TYPE);
        let deps = &s["predicate"]["buildDefinition"]["resolvedDependencies"];
        assert_eq!(deps[0]["annotations"]["go.sum"], "h1:abc=");
        assert_eq!(
            deps[1]["annotations"]["replacedBy"]["path"],
            "example.com/y"
        );
        assert_eq!(
            s["predicate"]["runDetails"]["builder"]["builderDependencies"][0]["digest"]["sha256"],
            "1234"
        );
        assert_eq!(
            s["predicate"]["runDetails"]["metadata"]["invocationId"],
            "k/2"
        );
        assert_eq!(
            listed_modules(&s),
            vec![
                "github.com/caddyserver/caddy/v2@v2.8.4".to_owned(),
                "example.com/x@v1.0.0".to_owned()
            ]
        );
    }
}
