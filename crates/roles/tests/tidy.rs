//! Tidy tests, in the spirit of rust-analyzer's: they read the repository's own files and fail
//! when one of its stated invariants breaks, naming the file, the line and the rule.
//!
//! std only, no database, no network: `cargo test -p cbs-roles --test tidy`. Each rule is one
//! test; each failure message starts with the rule and why it exists, then lists every
//! offending `path:line`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Rule 1: SQL lives in crates/store.
// ---------------------------------------------------------------------------------------------

const SQL_RULE: &str = "no SQL outside crates/store: SQL belongs in crates/store \
    (one place to review queries and migrations, one place that knows the schema)";

/// Case-sensitive tokens that only SQL statements contain. `UPDATE <table> SET` is matched
/// separately (see `sql_in`).
const SQL_TOKENS: &[&str] = &[
    "SELECT ",
    "INSERT INTO",
    "DELETE FROM",
    "CREATE TABLE",
    "pg_notify",
    "LISTEN ",
];

/// Crates whose `src` may hold SQL. Test code is not scanned at all: `crates/*/tests/` and
/// crates/testkit set up and inspect databases, which takes SQL.
const SQL_CRATES: &[&str] = &["crates/store", "crates/testkit"];

#[test]
fn no_sql_outside_store() {
    let root = root();
    let mut failures = Vec::new();
    for krate in crate_dirs(&root) {
        if SQL_CRATES.contains(&rel(&root, &krate).as_str()) {
            continue;
        }
        for file in rs_files(&krate.join("src")) {
            let src = read(&file);
            // Only string literals: comments (doc comments in prose included) may talk about
            // SELECT or LISTEN/NOTIFY.
            for &(start, end) in &lex(&src).strings {
                if let Some((at, token)) = sql_in(&src[start..end]) {
                    failures.push(format!(
                        "{}:{}: string literal contains SQL ({token:?})",
                        rel(&root, &file),
                        line_of(&src, start + at)
                    ));
                }
            }
        }
    }
    check(SQL_RULE, failures);
}

/// The first SQL token in a string literal's text, with its offset.
fn sql_in(text: &str) -> Option<(usize, String)> {
    let mut hits: Vec<(usize, String)> = SQL_TOKENS
        .iter()
        .filter_map(|t| text.find(t).map(|at| (at, t.trim().to_owned())))
        .collect();
    // `UPDATE table SET`: an identifier (schema-qualified or not), whitespace (newlines and
    // their escapes in a literal's source included), then `SET`.
    for (at, _) in text.match_indices("UPDATE ") {
        let rest = &text[at + "UPDATE ".len()..];
        let ident = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        if ident == 0 {
            continue;
        }
        let mut after = &rest[ident..];
        let before = after.len();
        loop {
            if let Some(r) = after.strip_prefix([' ', '\t', '\r', '\n']) {
                after = r;
            } else if let Some(r) = ["\\n", "\\t", "\\r", "\\\n"]
                .iter()
                .find_map(|e| after.strip_prefix(e))
            {
                after = r;
            } else {
                break;
            }
        }
        if after.len() < before && after.starts_with("SET") {
            hits.push((at, format!("UPDATE {} SET", &rest[..ident])));
        }
    }
    hits.into_iter().min_by_key(|(at, _)| *at)
}

// ---------------------------------------------------------------------------------------------
// Rule 2: HTTP server crates only in the api (and the listed exceptions).
// ---------------------------------------------------------------------------------------------

const HTTP_RULE: &str = "no axum/hyper/tower outside the api: HTTP belongs to the api role in \
    crates/roles/src/api (the other crates stay usable and testable without it); \
    exceptions, each with its reason, are in HTTP_EXCEPTIONS in crates/roles/tests/tidy.rs";

/// Where axum, hyper, hyper-util and tower may appear besides crates/roles/src/api/ (path
/// prefixes, relative to the workspace root). Dev-dependencies and test code are exempt:
/// tests may start HTTP servers.
const HTTP_EXCEPTIONS: &[&str] = &[
    // The HTTP API itself: the router, its handlers and its server loop.
    "crates/roles/src/api/",
    // The api role's dependencies (the binary's crate).
    "crates/roles/Cargo.toml",
    // The per-build module-proxy gate: an HTTP server on a Unix socket inside the worker,
    // serving a build's module downloads (docs/security.md, "Isolation in depth").
    "crates/executor/src/gate.rs",
    // The gate's dependency on axum.
    "crates/executor/Cargo.toml",
    // Test servers: the fixture module proxy the tests build against (src/proxy.rs).
    "crates/testkit/",
];

/// axum, hyper, tower and their family (`hyper_util`, `hyper-util`, `tower-http`, ...).
fn is_http_crate(name: &str) -> bool {
    ["axum", "hyper", "tower"].iter().any(|c| {
        name.strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['_', '-']))
    })
}

#[test]
fn no_http_outside_api() {
    let root = root();
    let mut failures = Vec::new();
    // (path, line, what) of every use, allowed or not.
    let mut uses = Vec::new();
    for krate in crate_dirs(&root) {
        let manifest = krate.join("Cargo.toml");
        for dep in dependencies(&read(&manifest)) {
            if dep.table != DepTable::Dev && is_http_crate(&dep.name) {
                let what = format!("depends on `{}`", dep.name);
                uses.push((rel(&root, &manifest), dep.line, what));
            }
        }
        for file in rs_files(&krate.join("src")) {
            let src = read(&file);
            // Code only: comments may name these crates.
            for (at, ident) in identifiers(&lex(&src).code) {
                if is_http_crate(ident) {
                    let what = format!("uses `{ident}`");
                    uses.push((rel(&root, &file), line_of(&src, at), what));
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for (path, line, what) in uses {
        match HTTP_EXCEPTIONS.iter().find(|e| path.starts_with(**e)) {
            Some(e) => {
                used.insert(*e);
            }
            None => failures.push(format!("{path}:{line}: {what}")),
        }
    }
    for e in HTTP_EXCEPTIONS {
        if !used.contains(e) {
            failures.push(format!(
                "crates/roles/tests/tidy.rs: HTTP_EXCEPTIONS lists `{e}`, which no longer uses \
                 these crates: remove the exception"
            ));
        }
    }
    check(HTTP_RULE, failures);
}

// ---------------------------------------------------------------------------------------------
// Rule 3: the pure crates stay pure.
// ---------------------------------------------------------------------------------------------

const PURE_RULE: &str = "no tokio, postgres or HTTP crates in crates/domain, crates/events, \
    crates/projections: they are the pure model every role shares (no IO, no runtime), \
    tested without a database or a network";

const PURE_CRATES: &[&str] = &["crates/domain", "crates/events", "crates/projections"];

/// Runtime, database and network crates. Their [dev-dependencies] may have them (tests only).
fn is_io_crate(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "postgres",
        "postgres-types",
        "deadpool-postgres",
        "reqwest",
        "bollard",
        "refinery",
    ];
    const FAMILIES: &[&str] = &["tokio", "hyper", "axum", "tower", "aws-", "deadpool"];
    EXACT.contains(&name)
        || is_http_crate(name)
        || FAMILIES.iter().any(|f| {
            name.strip_prefix(f).is_some_and(|rest| {
                f.ends_with('-') || rest.is_empty() || rest.starts_with(['_', '-'])
            })
        })
}

#[test]
fn pure_crates_have_no_io() {
    let root = root();
    let mut failures = Vec::new();
    for krate in PURE_CRATES {
        let manifest = root.join(krate).join("Cargo.toml");
        for dep in dependencies(&read(&manifest)) {
            if dep.table != DepTable::Dev && is_io_crate(&dep.name) {
                failures.push(format!(
                    "{}:{}: depends on `{}`",
                    rel(&root, &manifest),
                    dep.line,
                    dep.name
                ));
            }
        }
        let sources = rs_files(&root.join(krate).join("src"));
        assert!(!sources.is_empty(), "{krate}/src has no .rs files");
        for file in sources {
            let src = read(&file);
            let code = lex(&src).code;
            for needle in ["tokio::", "reqwest::"] {
                for (at, _) in code.match_indices(needle) {
                    // `tokio::` itself, not `my_tokio::`.
                    if code[..at].ends_with(is_ident_char) {
                        continue;
                    }
                    failures.push(format!(
                        "{}:{}: uses `{needle}`",
                        rel(&root, &file),
                        line_of(&src, at)
                    ));
                }
            }
        }
    }
    check(PURE_RULE, failures);
}

// ---------------------------------------------------------------------------------------------
// Rule 4: every route is in README's endpoint table.
// ---------------------------------------------------------------------------------------------

const ROUTES_RULE: &str = "every route of the api's router appears in README.md's endpoint \
    table (a `|` row, the full path in backticks, e.g. `GET /api/build/{key}`): the README \
    is the API's reference";

#[test]
fn routes_are_in_readme() {
    let root = root();
    let readme = read(&root.join("README.md"));
    let documented = readme_paths(&readme);
    let mut failures = Vec::new();
    let mut routes = 0;
    for file in rs_files(&root.join("crates/roles/src/api")) {
        let src = read(&file);
        let lexed = lex(&src);
        if let Some(at) = lexed.code.find(".nest(") {
            failures.push(format!(
                "{}:{}: `.nest(` prefixes routes, which this test cannot follow: extend it",
                rel(&root, &file),
                line_of(&src, at)
            ));
        }
        for (at, _) in lexed.code.match_indices(".route(") {
            let after = at + ".route(".len();
            // The path is the first argument: the next string literal, with only whitespace
            // before it.
            let Some(&(start, end)) = lexed.strings.iter().find(|(s, _)| *s > after) else {
                continue;
            };
            if !src[after..start - 1].trim().is_empty() {
                failures.push(format!(
                    "{}:{}: a route whose path is not a string literal: extend this test",
                    rel(&root, &file),
                    line_of(&src, at)
                ));
                continue;
            }
            routes += 1;
            let path = &src[start..end];
            if !documented.contains(path) {
                failures.push(format!(
                    "{}:{}: route `{path}` is not in README.md's endpoint table",
                    rel(&root, &file),
                    line_of(&src, start)
                ));
            }
        }
    }
    assert!(routes > 0, "found no `.route(` in crates/roles/src/api");
    check(ROUTES_RULE, failures);
}

/// The paths in README.md's table rows: in a backticked span, a word starting with `/`,
/// without its query string (`GET /api/events?after=<cursor>` documents `/api/events`).
fn readme_paths(readme: &str) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for line in readme.lines().filter(|l| l.trim_start().starts_with('|')) {
        for span in line.split('`').skip(1).step_by(2) {
            for word in span.split_whitespace() {
                let path = word.split('?').next().unwrap_or(word);
                if path.starts_with('/') {
                    paths.insert(path.to_owned());
                }
            }
        }
    }
    paths
}

// ---------------------------------------------------------------------------------------------
// Rule 5: every event type is in ARCHITECTURE.md.
// ---------------------------------------------------------------------------------------------

const EVENTS_RULE: &str = "every event type appears in ARCHITECTURE.md as `name` (in \
    backticks): the event log is the source of truth for build state, and its vocabulary is \
    documented there";

#[test]
fn event_types_are_in_architecture() {
    let root = root();
    let lib = root.join("crates/events/src/lib.rs");
    let src = read(&lib);
    let architecture = read(&root.join("ARCHITECTURE.md"));
    let names = event_type_names(&src);
    let mut failures = Vec::new();
    for (line, name) in &names {
        if !architecture.contains(&format!("`{name}`")) {
            failures.push(format!(
                "{}:{line}: event type `{name}` is not in ARCHITECTURE.md",
                rel(&root, &lib)
            ));
        }
    }
    check(EVENTS_RULE, failures);
}

/// `(line, name)` of every event type: the arms of `EventType::as_str`, checked against the
/// variants of `enum EventType` so that a change in the code's shape fails loudly instead
/// of checking nothing.
fn event_type_names(src: &str) -> Vec<(usize, String)> {
    let code = lex(src).code;
    let enum_at = code
        .find("enum EventType")
        .expect("crates/events/src/lib.rs: no `enum EventType`");
    let body = block_after(&code, enum_at);
    let variants: BTreeSet<&str> = code[body.clone()]
        .split(',')
        .map(|v| v.split('(').next().unwrap_or(v).trim())
        .filter(|v| !v.is_empty())
        .collect();

    let impl_at = code
        .find("impl EventType")
        .expect("crates/events/src/lib.rs: no `impl EventType`");
    let as_str_at = impl_at
        + code[impl_at..]
            .find("fn as_str(")
            .expect("crates/events/src/lib.rs: no `EventType::as_str`");
    let body = block_after(&code, as_str_at);
    let mut names = Vec::new();
    let mut arms = BTreeSet::new();
    for (at, _) in code[body.clone()].match_indices("EventType::") {
        let at = body.start + at;
        let variant: String = code[at + "EventType::".len()..]
            .chars()
            .take_while(|c| is_ident_char(*c))
            .collect();
        let arrow = code[at..].find("=>").map(|a| at + a);
        let open = arrow.and_then(|a| code[a..].find('"').map(|q| a + q + 1));
        let close = open.and_then(|o| code[o..].find('"').map(|q| o + q));
        let (Some(open), Some(close)) = (open, close) else {
            panic!(
                "crates/events/src/lib.rs:{}: cannot read this arm of EventType::as_str",
                line_of(src, at)
            );
        };
        names.push((line_of(src, at), src[open..close].to_owned()));
        arms.insert(variant);
    }
    let variants: BTreeSet<String> = variants.into_iter().map(str::to_owned).collect();
    assert!(
        !variants.is_empty() && variants == arms,
        "crates/events/src/lib.rs: the variants of EventType ({variants:?}) and the arms of \
         EventType::as_str ({arms:?}) differ: this test no longer understands the file"
    );
    names
}

/// The byte range inside the `{ ... }` block that follows `from` in (comment- and
/// string-free) code.
fn block_after(code: &str, from: usize) -> std::ops::Range<usize> {
    let open = from + code[from..].find('{').expect("no `{` after the item");
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + 1..open + i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after byte {from}")
}

// ---------------------------------------------------------------------------------------------
// Rule 6: no references to documents that are not in the repository.
// ---------------------------------------------------------------------------------------------

const DOCS_RULE: &str = "cite only documents and files that are in this repository: a reader \
    cannot follow a reference to a file they do not have";

/// Documents of another repository or an earlier life of this one; cite what they said here
/// instead (ARCHITECTURE.md, docs/).
const FOREIGN_DOCS: &[&str] = &[
    "REFERENCE.md",
    "REFERENCE section",
    "STYLE.md",
    "../shared/",
];

/// The kinds of file a shortened path in a document (`worker/lease.rs`) names.
const SOURCE_EXTENSIONS: &[&str] = &[".rs", ".go", ".sql", ".sh", ".md", ".toml", ".yml"];

/// This file names the forbidden references to forbid them.
const THIS_FILE: &str = "crates/roles/tests/tidy.rs";

#[test]
fn no_references_to_missing_documents() {
    let root = root();
    let tracked = git_files(&root, &["ls-files"]);
    // What exists: tracked files and new ones not yet added (not ignored ones, nor tracked
    // ones deleted in the working tree).
    let existing: Vec<String> = tracked
        .iter()
        .cloned()
        .chain(git_files(
            &root,
            &["ls-files", "--others", "--exclude-standard"],
        ))
        .filter(|f| root.join(f).exists())
        .collect();
    let basenames: BTreeSet<&str> = existing
        .iter()
        .filter_map(|f| f.rsplit('/').next())
        .collect();
    // The top-level directories: a word starting with one of them is a repository path.
    let top_dirs: BTreeSet<&str> = existing
        .iter()
        .filter_map(|f| f.split_once('/').map(|(d, _)| d))
        .collect();

    assert!(!tracked.is_empty(), "`git ls-files` lists no files");
    let mut failures = Vec::new();
    for file in &tracked {
        let scanned = [".rs", ".md", ".yml", ".toml", ".sh"]
            .iter()
            .any(|e| file.ends_with(e))
            || file.starts_with("scripts/")
            || file.starts_with(".ci/");
        if !scanned || file == THIS_FILE {
            continue;
        }
        // Tracked but deleted in the working tree: nothing to read.
        let Ok(text) = fs::read_to_string(root.join(file)) else {
            continue;
        };
        let markdown = file.ends_with(".md");
        let dir = Path::new(file).parent().unwrap_or(Path::new(""));
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            for needle in FOREIGN_DOCS {
                if line.contains(needle) {
                    failures.push(format!(
                        "{file}:{n}: cites `{needle}`, not in this repository"
                    ));
                }
            }
            let mut missing = BTreeSet::new();
            if markdown {
                for target in markdown_links(line) {
                    if !root.join(dir).join(target).exists() {
                        missing.insert(target.to_owned());
                    }
                }
            }
            for word in path_words(line) {
                if FOREIGN_DOCS
                    .iter()
                    .any(|f| word.contains(f.trim_end_matches('/')))
                {
                    continue; // reported above
                }
                let exists = if word.starts_with("../") {
                    // Relative to the document (markdown only; elsewhere the base is unknown).
                    !markdown || root.join(dir).join(word).exists()
                } else if top_dirs.contains(word.split('/').next().unwrap_or("")) {
                    root.join(word).exists()
                } else if !word.contains('/') {
                    // A bare `X.md`: some file of the repository has that name.
                    !word.ends_with(".md") || basenames.contains(word)
                } else if markdown && SOURCE_EXTENSIONS.iter().any(|e| word.ends_with(e)) {
                    // `worker/lease.rs`, `store/src/tls.rs`: a path shortened from the left
                    // (markdown only: code mentions paths of other repositories, as Go
                    // modules' `cmd/main.go`).
                    existing
                        .iter()
                        .any(|f| f == word || f.ends_with(&format!("/{word}")))
                } else {
                    true
                };
                if !exists {
                    missing.insert(word.to_owned());
                }
            }
            for m in missing {
                failures.push(format!("{file}:{n}: refers to `{m}`, which does not exist"));
            }
        }
    }
    check(DOCS_RULE, failures);
}

/// The targets of a markdown line's relative links `[text](target)`, without `#fragment`.
fn markdown_links(line: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or("").trim();
        let external = target.contains("://") || target.starts_with("mailto:");
        if !target.is_empty() && !external {
            targets.push(target);
        }
        rest = &rest[end..];
    }
    targets
}

/// The words of a line that may name a file: runs of path characters, `./` and trailing
/// dots taken off, without placeholders or globs (`crates/*/tests`, `builds/<key>/`,
/// `{key}`), URLs' paths (which start with `/`) and absolute paths.
fn path_words(line: &str) -> Vec<&str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || "_-./*{}<>".contains(c)))
        .map(|w| w.trim_start_matches("./").trim_end_matches('.'))
        .filter(|w| {
            !w.is_empty()
                && !w.starts_with('/')
                && !w.contains(['*', '{', '}', '<', '>'])
                && (w.contains('/') || w.ends_with(".md"))
        })
        .collect()
}

/// The files `git <args> -z` lists, relative to the root, with `/` separators. Without a
/// usable git (an exported tree, or a repository git refuses to read as another user), the
/// files of the working tree instead, `target` and `.git` left out.
fn git_files(root: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .arg("-z")
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout)
            .expect("non-UTF-8 file name in git")
            .split('\0')
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect(),
        // `--others` adds nothing to a walk of the whole tree.
        _ if args.contains(&"--others") => Vec::new(),
        _ => {
            let mut files = Vec::new();
            walk(root, root, &mut files);
            files
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            if name != "target" && name != ".git" {
                walk(root, &path, out);
            }
        } else if t.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// Fails with the rule's message and every violation, one a line.
fn check(rule: &str, failures: Vec<String>) {
    if failures.is_empty() {
        return;
    }
    let mut msg = format!("rule: {rule}\n");
    for f in &failures {
        let _ = writeln!(msg, "  {f}");
    }
    panic!("{msg}");
}

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
}

/// `path` relative to the root, with `/` separators.
fn rel(root: &Path, path: &Path) -> String {
    let path = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<_> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    parts.join("/")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The workspace's crates: every directory under crates/ with a Cargo.toml, sorted.
fn crate_dirs(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("crates");
    let mut crates: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("reading crates/").path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    crates.sort();
    assert!(!crates.is_empty(), "no crates under {}", dir.display());
    crates
}

/// Every `.rs` file under `dir`, recursively, sorted; none if `dir` does not exist.
fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("reading a directory").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The 1-based line of byte `at`.
fn line_of(src: &str, at: usize) -> usize {
    src.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifiers (and keywords) of code, with their byte offsets.
fn identifiers(code: &str) -> Vec<(usize, &str)> {
    let mut idents = Vec::new();
    let mut start = None;
    for (i, c) in code.char_indices().chain([(code.len(), ' ')]) {
        match (start, is_ident_char(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                idents.push((s, &code[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    idents
        .into_iter()
        .filter(|(_, w)| !w.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// A Rust source, split the way the rules need it.
#[derive(Debug)]
struct Lexed {
    /// The source with comments, and the contents of string and char literals, blanked to
    /// spaces (newlines and byte offsets kept).
    code: String,
    /// The byte ranges of string literals' contents (between the quotes), as in the source.
    strings: Vec<(usize, usize)>,
}

/// Just enough of a Rust lexer: comments (nested block comments too), string literals
/// (`"..."`, `b"..."`, raw `r#"..."#`), char literals and lifetimes.
fn lex(src: &str) -> Lexed {
    let b = src.as_bytes();
    let mut code = b.to_vec();
    let mut strings = Vec::new();
    let blank = |code: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut code[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |i: usize| i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_');
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut code, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut j, mut depth) = (i, 0);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            let j = j.min(b.len());
            blank(&mut code, i, j);
            i = j;
        } else if b[i] == b'r' && raw_string_at(b, i, ident) {
            let mut j = i + 1;
            while b[j] == b'#' {
                j += 1;
            }
            let hashes = j - i - 1;
            let start = j + 1;
            let mut closing = vec![b'"'];
            closing.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[start..]
                .windows(closing.len())
                .position(|w| w == closing.as_slice())
                .map_or(b.len(), |p| start + p);
            strings.push((start, end));
            blank(&mut code, start, end);
            i = end + closing.len();
        } else if b[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = j.min(b.len());
            strings.push((start, end));
            blank(&mut code, start, end);
            i = end + 1;
        } else if b[i] == b'\'' {
            // A char literal (`'a'`, `'\n'`, `'"'`) or a lifetime/label (`'a`, `'static`).
            if b.get(i + 1) == Some(&b'\\') {
                let end = b[i + 3..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(b.len(), |p| i + 3 + p);
                blank(&mut code, i + 1, end);
                i = end + 1;
            } else {
                let after = src[i + 1..].chars().next().map(|c| i + 1 + c.len_utf8());
                match after {
                    Some(after) if b.get(after) == Some(&b'\'') => {
                        blank(&mut code, i + 1, after);
                        i = after + 1;
                    }
                    _ => i += 1,
                }
            }
        } else {
            i += 1;
        }
    }
    Lexed {
        code: String::from_utf8(code).expect("blanking keeps UTF-8"),
        strings,
    }
}

/// Does a raw string literal (`r"`, `r#"`, `br"`, `cr#"`) start with the `r` at `i`?
fn raw_string_at(b: &[u8], i: usize, ident: impl Fn(usize) -> bool) -> bool {
    let starts_token =
        i == 0 || !ident(i - 1) || (matches!(b[i - 1], b'b' | b'c') && (i < 2 || !ident(i - 2)));
    let mut j = i + 1;
    while j < b.len() && b[j] == b'#' {
        j += 1;
    }
    starts_token && b.get(j) == Some(&b'"')
}

/// Which table of a manifest a dependency is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DepTable {
    Normal,
    Dev,
    Build,
}

#[derive(Debug)]
struct Dependency {
    /// The crate's name (its `package = "..."` when renamed).
    name: String,
    line: usize,
    table: DepTable,
}

/// The dependencies of a Cargo.toml, of every table: `[dependencies]`, `[dev-dependencies]`,
/// `[build-dependencies]`, their `[target.'cfg(...)'.*]` forms and `[dependencies.name]`.
fn dependencies(manifest: &str) -> Vec<Dependency> {
    const TABLES: [(&str, DepTable); 3] = [
        ("dev-dependencies", DepTable::Dev),
        ("build-dependencies", DepTable::Build),
        ("dependencies", DepTable::Normal),
    ];
    let mut deps = Vec::new();
    // The table of the current section, if it lists dependencies.
    let mut current = None;
    for (n, line) in manifest.lines().enumerate() {
        let t = line.split(" #").next().unwrap_or(line).trim();
        if t.starts_with('[') {
            let header = t.trim_start_matches('[').trim_end_matches(']').trim();
            current = None;
            for (name, table) in TABLES {
                if header == name || header.ends_with(&format!(".{name}")) {
                    current = Some(table);
                    break;
                }
                // `[dependencies.axum]`: one dependency, named in the header.
                let single = header
                    .strip_prefix(&format!("{name}."))
                    .or_else(|| header.split_once(&format!(".{name}.")).map(|(_, d)| d));
                if let Some(dep) = single {
                    deps.push(Dependency {
                        name: dep.trim_matches('"').to_owned(),
                        line: n + 1,
                        table,
                    });
                    break;
                }
            }
            continue;
        }
        let Some(table) = current else { continue };
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let key = t
            .split(['=', '.'])
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        // A renamed dependency: `key = { package = "name", ... }`.
        let name = t
            .split_once('=')
            .and_then(|(_, value)| value.split_once("package"))
            .and_then(|(_, rest)| rest.split('"').nth(1))
            .unwrap_or(key);
        deps.push(Dependency {
            name: name.to_owned(),
            line: n + 1,
            table,
        });
    }
    deps
}

// ---------------------------------------------------------------------------------------------
// The helpers' own tests: the rules are only as good as their parsers.
// ---------------------------------------------------------------------------------------------

#[test]
fn tidy_helpers() {
    let src = r####"// SELECT in a comment
/* nested /* SELECT */ still comment */
let a = "SELECT id FROM builds";
let b = r#"UPDATE builds
    SET x = 1"#;
let c = '"'; let d: &'static str = "LISTEN x"; let e = '\'';
let f = hyper::x; // axum
"####;
    let lexed = lex(src);
    let literals: Vec<&str> = lexed.strings.iter().map(|&(s, e)| &src[s..e]).collect();
    assert_eq!(
        literals,
        [
            "SELECT id FROM builds",
            "UPDATE builds\n    SET x = 1",
            "LISTEN x"
        ]
    );
    assert!(!lexed.code.contains("SELECT") && !lexed.code.contains("axum"));
    assert!(lexed.code.contains("hyper::x") && lexed.code.contains("'static"));
    assert_eq!(
        sql_in(literals[1]).map(|(_, t)| t).as_deref(),
        Some("UPDATE builds SET")
    );
    assert_eq!(sql_in("UPDATE the record").map(|(_, t)| t), None);
    assert_eq!(
        sql_in("UPDATE builds\\n SET").map(|(_, t)| t).as_deref(),
        Some("UPDATE builds SET")
    );

    let manifest = "[dependencies]\naxum.workspace = true\nfoo = { package = \"hyper\" }\nmy-package-x = \"1\"\n\
        [dev-dependencies]\ntokio.workspace = true\n\
        [target.'cfg(unix)'.dependencies]\ntower = \"0.5\"\n[dependencies.bollard]\nversion = \"1\"\n\
        [lints]\nworkspace = true\n";
    let deps: Vec<(String, DepTable)> = dependencies(manifest)
        .into_iter()
        .map(|d| (d.name, d.table))
        .collect();
    assert_eq!(
        deps,
        [
            ("axum".to_owned(), DepTable::Normal),
            ("hyper".to_owned(), DepTable::Normal),
            ("my-package-x".to_owned(), DepTable::Normal),
            ("tokio".to_owned(), DepTable::Dev),
            ("tower".to_owned(), DepTable::Normal),
            ("bollard".to_owned(), DepTable::Normal),
        ]
    );
    assert!(
        is_io_crate("aws-sdk-s3") && is_io_crate("tokio-postgres") && is_io_crate("hyper_util")
    );
    assert!(!is_io_crate("serde") && !is_io_crate("towering") && !is_http_crate("hyperloop"));

    let paths = readme_paths("| `GET /api/x?a=1`, `/api/y/{key}` | z |\nnot a row: `/api/z`");
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        ["/api/x", "/api/y/{key}"]
    );
    assert_eq!(
        path_words("see `docs/a.md`, ./scripts/test and crates/*/tests, https://x.io/docs/y."),
        ["docs/a.md", "scripts/test"]
    );
    assert_eq!(
        markdown_links("[a](docs/a.md#x) [b](https://x.io) [c](../README.md)"),
        ["docs/a.md", "../README.md"]
    );
}
