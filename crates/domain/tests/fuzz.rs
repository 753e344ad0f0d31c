//! Property tests ("fuzzing" on stable Rust) of the parsers that take untrusted input: module
//! paths and versions, build keys, platforms, whole build requests and GOPROXY lists. Each
//! property runs `CBS_FUZZ_CASES` generated inputs (default 3,000; a few seconds). The long
//! run is a documented command (docs/benchmarks.md, "Fuzzing"):
//! `CBS_FUZZ_CASES=1000000 cargo test --release -p cbs-domain`.
//!
//! Every parser must answer every input with a value or an error, never a panic; what it
//! accepts must survive a round trip through its text form.

use cbs_domain::{goproxy, BuildKey, BuildSpec, ModulePath, ModuleVersion, Platform};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("CBS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings near the grammar (module-path and version characters, separators, and a few
/// hostile ones), so that inputs often get past the first check.
fn nearly_valid() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9./~_+@!-]{0,40}",
        "(github\\.com|example\\.com|gopkg\\.in|[a-z]{1,8}\\.[a-z]{2,3})(/[a-zA-Z0-9._~-]{1,12}){0,4}(/v[0-9]{1,2})?",
        "v[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(-[0-9A-Za-z.-]{0,12})?(\\+[0-9A-Za-z.-]{0,8})?",
        "v0\\.0\\.0-[0-9]{14}-[0-9a-f]{12}",
        any::<String>(),
        "[\\x00-\\x7f]{0,64}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn module_paths(s in nearly_valid()) {
        if let Ok(p) = s.parse::<ModulePath>() {
            let again: ModulePath = p.to_string().parse().expect("a parsed path parses again");
            prop_assert_eq!(&again, &p);
            // The proxy's case escaping leaves no upper case letters.
            prop_assert!(!p.escaped().chars().any(|c| c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn module_versions(s in nearly_valid()) {
        if let Ok(v) = s.parse::<ModuleVersion>() {
            let again: ModuleVersion = v.to_string().parse().expect("a parsed version parses again");
            prop_assert_eq!(&again, &v);
        }
    }

    #[test]
    fn build_keys(s in prop_oneof!["[0-9a-fA-F]{60,68}", any::<String>()]) {
        if let Ok(k) = s.parse::<BuildKey>() {
            prop_assert_eq!(k.as_str().len(), 64);
            prop_assert!(k.as_str().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn platforms(
        os in prop_oneof!["linux|windows|darwin|freebsd|openbsd", any::<String>()],
        arch in prop_oneof!["amd64|arm64|arm|386|riscv64|s390x", any::<String>()],
        arm in proptest::option::of(prop_oneof!["[5-7]", any::<String>()]),
    ) {
        if let Ok(p) = Platform::new(&os, &arch, arm.as_deref()) {
            prop_assert_eq!(p.os(), os.as_str());
            prop_assert_eq!(p.arch(), arch.as_str());
        }
    }

    #[test]
    fn build_requests(
        os in "linux|windows|[a-z]{0,8}",
        arch in "amd64|arm|[a-z0-9]{0,8}",
        arm in proptest::option::of("[0-9]{0,2}"),
        caddy in proptest::option::of(nearly_valid()),
        plugins in proptest::collection::vec((nearly_valid(), proptest::option::of(nearly_valid())), 0..4),
        replacements in proptest::collection::vec((nearly_valid(), nearly_valid(), proptest::option::of(nearly_valid())), 0..3),
    ) {
        let plugins: Vec<(&str, Option<&str>)> =
            plugins.iter().map(|(m, v)| (m.as_str(), v.as_deref())).collect();
        let replacements: Vec<(&str, &str, Option<&str>)> = replacements
            .iter()
            .map(|(o, n, v)| (o.as_str(), n.as_str(), v.as_deref()))
            .collect();
        let _ = BuildSpec::parse(&os, &arch, arm.as_deref(), caddy.as_deref(), &plugins, &replacements);
    }

    #[test]
    fn goproxy_lists(
        list in proptest::collection::vec(
            prop_oneof![
                "https?://[a-z0-9.:-]{1,20}(/[a-z0-9/]{0,10})?",
                "https?://[a-z]{1,6}:[a-z]{1,6}@[a-z.]{1,12}",
                "direct|off|file:///x|[a-z]{0,5}",
                any::<String>(),
            ],
            0..4,
        ),
        seps in proptest::collection::vec("[,|]", 4),
        secret in "[A-Z]{12}",
    ) {
        let mut value = String::new();
        for (i, e) in list.iter().enumerate() {
            if i > 0 {
                value.push_str(&seps[i % seps.len()]);
            }
            value.push_str(e);
        }
        match goproxy::parse(&value) {
            Ok(entries) => {
                prop_assert!(!entries.is_empty());
                for e in &entries {
                    prop_assert!(e.url.starts_with("http://") || e.url.starts_with("https://"));
                    prop_assert!(!e.authority().contains('@'));
                }
            }
            Err(_) => {
                // An error never quotes a password: one placed in the list does not show.
                let with_secret = format!("https://user:{secret}@proxy.example,{value}");
                let e = goproxy::parse(&with_secret).unwrap_err().to_string();
                prop_assert!(!e.contains(&secret), "{}", e);
            }
        }
    }
}
