//! Config loading: template, YAML, defaults and the messages of every error.

use super::*;
use std::collections::HashMap;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_str_with_env(text, Path::new("test.yml"), move |name| {
        env.get(name).cloned()
    })
}

fn err(text: &str, env: &[(&str, &str)]) -> String {
    load(text, env)
        .expect_err("config must be refused")
        .to_string()
}

#[test]
fn env_and_env_or_expand() {
    let cfg = load(
        "database:\n  url: \"postgres://u@{{ env('DB_HOST') }}:5432/x\"\n  pool_size: {{ env_or('POOL', '3') }}\napi:\n  listen: \"{{ env_or('LISTEN', '0.0.0.0:9000') }}\"\n",
        &[("DB_HOST", "db.internal"), ("LISTEN", "127.0.0.1:7000")],
    )
    .unwrap();
    assert_eq!(cfg.database.url.expose(), "postgres://u@db.internal:5432/x");
    assert_eq!(cfg.database.pool_size, 3);
    assert_eq!(cfg.api.listen.to_string(), "127.0.0.1:7000");
}

#[test]
fn unset_variable_is_named_with_its_line() {
    let msg = err(
        "log:\n  filter: info\ndatabase:\n  url: \"{{ env('NOPE_DB_URL') }}\"\n",
        &[],
    );
    assert!(msg.starts_with("config file test.yml: "), "{msg}");
    assert!(
        msg.contains("environment variable NOPE_DB_URL is not set"),
        "{msg}"
    );
    assert!(msg.contains("line 4"), "{msg}");
}

#[test]
fn unknown_key_is_named_with_path_and_line() {
    let msg = err("api:\n  listen: 127.0.0.1:1\n  lisen: 127.0.0.1:2\n", &[]);
    assert!(msg.starts_with("config file test.yml: "), "{msg}");
    assert!(msg.contains("key `api.lisen`"), "{msg}");
    assert!(msg.contains("unknown field `lisen`"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");

    let msg = err("databse: {}\n", &[]);
    assert!(msg.contains("unknown field `databse`"), "{msg}");
}

#[test]
fn wrong_types_are_named() {
    let cases = [
        ("worker:\n  lease: soon\n", "key `worker.lease`"),
        ("api:\n  listen: nowhere\n", "key `api.listen`"),
        ("database:\n  pool_size: -1\n", "key `database.pool_size`"),
        ("log:\n  format: xml\n", "key `log.format`"),
        ("{{ broken\n", "template error at line 1"),
    ];
    for (text, want) in cases {
        let msg = err(text, &[]);
        assert!(msg.contains(want), "{text:?}: {msg}");
    }
}

#[test]
fn empty_file_means_defaults() {
    let cfg = load("# nothing here\n\n", &[]).unwrap();
    assert_eq!(cfg.api.listen.port(), 8234);
    assert_eq!(cfg.worker.lease, Duration::from_secs(60));
}

#[test]
fn example_and_test_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["config.example.yml", "config.test.yml"] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        let cfg = Config::from_str_with_env(&text, Path::new(name), |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.database.pool_size > 0, "{name}");
    }
}

#[test]
fn example_documents_every_key() {
    // Every key of the defaults appears in config.example.yml (documented there).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("config.example.yml")).unwrap();
    let keys = [
        "database:",
        "url:",
        "password:",
        "pool_size:",
        "connect_timeout:",
        "notify:",
        "poll_interval:",
        "max_reconnect_backoff:",
        "api:",
        "listen:",
        "shutdown_grace:",
        "max_long_poll:",
        "download_wait:",
        "header_read_timeout:",
        "submissions_per_minute:",
        "submission_burst:",
        "worker:",
        "id:",
        "lease:",
        "claim_poll_interval:",
        "executor:",
        "max_concurrent_builds:",
        "build_dir:",
        "cache_dir:",
        "command_timeout:",
        "local_go:",
        "docker:",
        "host:",
        "image:",
        "path:",
        "user:",
        "memory_bytes:",
        "cpus:",
        "pids_limit:",
        "tmpfs_size:",
        "build_cache:",
        "local_max_bytes:",
        "shared_max_bytes:",
        "share_plugin_builds:",
        "go:",
        "proxy:",
        "sumdb:",
        "resolve_timeout:",
        "cache_ttl:",
        "storage:",
        "packages:",
        "catalog_only:",
        "deny:",
        "catalog:",
        "repo:",
        "description:",
        "modules:",
        "name:",
        "docs:",
        "dir:",
        "janitor:",
        "migrate_on_start:",
        "log:",
        "format:",
        "filter:",
    ];
    for key in keys {
        assert!(text.contains(key), "config.example.yml lacks {key}");
    }
}

#[test]
fn secrets_never_show_in_debug() {
    let cfg = load(
        "database:\n  url: postgres://app:hunter2@db/x?sslmode=disable&password=hunter3\n  password: hunter4\nstorage:\n  s3:\n    secret_access_key: hunter5\nsigning:\n  password: hunter6\n",
        &[],
    )
    .unwrap();
    let dbg = format!("{cfg:?} {}", cfg.database.url);
    for secret in ["hunter2", "hunter3", "hunter4", "hunter5", "hunter6"] {
        assert!(!dbg.contains(secret), "{secret} leaked: {dbg}");
    }
    assert!(dbg.contains("postgres://app:[redacted]@db/x"), "{dbg}");
    assert_eq!(cfg.database.password.unwrap().expose(), "hunter4");
}

#[test]
fn database_urls_print_without_passwords() {
    let cases = [
        (
            "postgres://u:pw@h:5432/db",
            "postgres://u:[redacted]@h:5432/db",
        ),
        ("postgres://u@h/db", "postgres://u@h/db"),
        (
            "postgres://h/db?password=pw&sslmode=disable",
            "postgres://h/db?password=[redacted]&sslmode=disable",
        ),
        (
            "host=/tmp port=5432 password=pw user=u",
            "host=/tmp port=5432 password=[redacted] user=u",
        ),
        ("postgres://u:p@ss@h/db", "postgres://u:[redacted]@h/db"),
    ];
    for (url, want) in cases {
        let u = DatabaseUrl::new(url);
        assert_eq!(u.to_string(), want, "{url}");
        assert_eq!(format!("{u:?}"), format!("{want:?}"), "{url}");
        assert_eq!(u.expose(), url);
    }
}

#[test]
fn private_modules_and_proxy_credentials() {
    let cfg = load(
        r#"
go:
  proxy: "https://goproxy.corp.example:8443/mod|https://proxy.golang.org"
  private: ["corp.example/*", "github.com/corp/private"]
  proxy_credentials:
    - host: GoProxy.Corp.Example
      username: builder
      password: s3cret-value
"#,
        &[],
    )
    .unwrap();
    cfg.go.check().unwrap();
    assert_eq!(cfg.go.gonosumdb(), "corp.example/*,github.com/corp/private");
    let netrc = cfg.go.netrc().unwrap();
    // The go command matches the URL's host with its port; other matchers the host alone.
    assert_eq!(
        netrc.expose(),
        "machine goproxy.corp.example login builder password s3cret-value\n\
         machine goproxy.corp.example:8443 login builder password s3cret-value\n"
    );
    assert!(!format!("{cfg:?}").contains("s3cret-value"));

    let mut bad = cfg.go.clone();
    bad.proxy_credentials[0].host = "proxy.golang.org.evil".into();
    assert!(bad
        .check()
        .unwrap_err()
        .contains("not the host of any go.proxy URL"));
    let mut bad = cfg.go.clone();
    bad.proxy_credentials[0].password = crate::Secret::new("two words".into());
    let e = bad.check().unwrap_err();
    assert!(
        e.contains("without spaces") && !e.contains("two words"),
        "{e}"
    );
    let mut bad = cfg.go.clone();
    bad.private = vec!["a.example/*,b.example".into()];
    assert!(bad.check().unwrap_err().contains("go.private"));
    let mut bad = cfg.go.clone();
    bad.proxy = "https://builder:pw@goproxy.corp.example".into();
    let e = bad.check().unwrap_err();
    assert!(
        e.contains("go.proxy_credentials") && !e.contains("pw@"),
        "{e}"
    );
    // Builds fetch through proxies only.
    for list in ["direct", "https://goproxy.corp.example,direct", "off"] {
        let mut bad = cfg.go.clone();
        bad.proxy = list.into();
        let e = bad.check().unwrap_err();
        assert!(e.contains("'direct' and 'off' are not allowed"), "{e}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("CBS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any config text (template syntax, YAML, or neither): a config or an error that names the
    /// file; never a panic (property test; CBS_FUZZ_CASES sets the number of inputs).
    #[test]
    fn any_config_text(
        text in proptest::prop_oneof![
            "(api:\n  listen: \"[0-9.:]{0,21}\"\n|worker:\n  lease: [0-9a-z ]{0,6}\n|go:\n  proxy: \"[a-z:/,|.]{0,30}\"\n|\\{\\{ ?(env|env_or)\\(['\"][A-Z_]{0,8}['\"](, ?['\"][a-z]{0,4}['\"])?\\) ?\\}\\}|\\{% ?[a-z]{0,6} ?%\\}|[a-z_]{0,8}: [^\n]{0,12}\n){0,6}",
            proptest::prelude::any::<String>(),
        ],
    ) {
        if let Err(e) = load(&text, &[("HOME", "/root")]) {
            proptest::prop_assert!(e.to_string().contains("test.yml"), "{}", e);
        }
    }
}

#[test]
fn metrics_listen_is_an_address_or_nothing() {
    let m = |s: &str| crate::MetricsConfig { listen: s.into() }.listen_addr();
    assert_eq!(m("").unwrap(), None);
    assert_eq!(m("  ").unwrap(), None);
    assert_eq!(
        m("0.0.0.0:9235").unwrap(),
        Some("0.0.0.0:9235".parse().unwrap())
    );
    for bad in [
        "9235",
        "localhost:9235",
        "0.0.0.0:99999",
        "http://x:1",
        "[::1]",
        "a\nb",
    ] {
        let e = m(bad).unwrap_err();
        assert!(e.starts_with("metrics.listen "), "{bad}: {e}");
    }
}

#[test]
fn reproduce_is_off_all_or_a_fraction() {
    let r =
        |v: &str| load(&format!("janitor:\n  reproduce: {v}\n"), &[]).map(|c| c.janitor.reproduce);
    assert_eq!(r("off").unwrap(), Reproduce::Off);
    assert_eq!(r("all").unwrap(), Reproduce::All);
    assert_eq!(r("0.25").unwrap(), Reproduce::Sample(0.25));
    assert_eq!(r("\"10%\"").unwrap(), Reproduce::Sample(0.1));
    assert_eq!(r("1").unwrap(), Reproduce::All);
    assert_eq!(r("0").unwrap(), Reproduce::Off);
    for bad in ["sometimes", "1.5", "-0.1", "\"150%\"", ".nan"] {
        let e = r(bad).unwrap_err().to_string();
        assert!(
            e.contains("janitor.reproduce is `off`, `all`, or a fraction"),
            "{bad}: {e}"
        );
    }
    assert!(Reproduce::Sample(0.25).selects(0.2) && !Reproduce::Sample(0.25).selects(0.3));
}
