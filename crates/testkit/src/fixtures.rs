//! Fixture Go modules that mimic Caddy's layout, packed in the module proxy layout.
//!
//! - `github.com/caddyserver/caddy/v2` (v2.7.6, v2.8.4, v2.9.0-beta.1): a module registry,
//!   `cmd.Main()` with `version` and `list-modules` commands (versions read from the
//!   binary's build info, as real Caddy does), and `modules/standard`.
//! - Plugins that register modules: `github.com/acme/alpha` (v1.0.0, v1.1.0),
//!   `github.com/Acme/Beta` (upper case: escaped paths), `example.com/gamma/v2` (major
//!   suffix; v2.0.0, v2.1.0), and `example.com/broken` (does not compile).
//! - `example.com/forger` (v1.0.0): a plugin that carries a forged Go build-information blob
//!   in a string constant, claiming modules the binary does not contain (see
//!   [`FORGED_MODULE`]); a reader that searches the whole file finds it first.
//! - `example.com/liar` (v1.0.0): does not compile, and prints text that looks like a
//!   network failure (`connection refused`, `503 Service Unavailable`) while it fails.

use std::io::Write;
use std::path::Path;

/// One module version: path, version and files (name, contents).
pub(crate) struct Fixture {
    pub(crate) path: std::borrow::Cow<'static, str>,
    pub(crate) version: &'static str,
    pub(crate) files: Vec<(std::borrow::Cow<'static, str>, String)>,
}

impl Fixture {
    pub(crate) fn owned(
        path: String,
        version: &'static str,
        files: Vec<(String, String)>,
    ) -> Fixture {
        Fixture {
            path: path.into(),
            version,
            files: files.into_iter().map(|(n, c)| (n.into(), c)).collect(),
        }
    }
}

pub(crate) const CADDY: &str = "github.com/caddyserver/caddy/v2";

pub(crate) fn caddy(version: &'static str) -> Fixture {
    Fixture {
        path: CADDY.into(),
        version,
        files: static_files(vec![
            ("go.mod", format!("module {CADDY}\n\ngo 1.21\n")),
            (
                "caddy.go",
                r#"// Package caddy is a test fixture that mimics Caddy's module registry.
package caddy

import "sort"

var modules = map[string]string{}

// RegisterModule records a module ID and the Go module that provides it.
func RegisterModule(id, goModule string) { modules[id] = goModule }

// Modules lists the registered module IDs with their Go modules, sorted by ID.
func Modules() [][2]string {
	out := make([][2]string, 0, len(modules))
	for id, m := range modules {
		out = append(out, [2]string{id, m})
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out
}
"#
                .to_owned(),
            ),
            (
                "cmd/main.go",
                r#"// Package caddycmd is the fixture's command line.
package caddycmd

import (
	"fmt"
	"os"
	"runtime/debug"

	caddy "github.com/caddyserver/caddy/v2"
)

// Main runs the command named by the first argument.
func Main() {
	versions := map[string]string{}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, d := range info.Deps {
			v := d.Version
			if d.Replace != nil {
				v = d.Replace.Version
			}
			versions[d.Path] = v
		}
	}
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "version":
			fmt.Println(versions["github.com/caddyserver/caddy/v2"])
			return
		case "list-modules":
			for _, m := range caddy.Modules() {
				fmt.Println(m[0], m[1], versions[m[1]])
			}
			return
		}
	}
	fmt.Println("fixture caddy: commands are version and list-modules")
}
"#
                .to_owned(),
            ),
            (
                "modules/standard/standard.go",
                format!(
                    "// Package standard registers the fixture's standard modules.\npackage standard\n\nimport caddy \"{CADDY}\"\n\nfunc init() {{ caddy.RegisterModule(\"http.handlers.file_server\", \"{CADDY}\") }}\n"
                ),
            ),
        ]),
    }
}

fn static_files(
    files: Vec<(&'static str, String)>,
) -> Vec<(std::borrow::Cow<'static, str>, String)> {
    files.into_iter().map(|(n, c)| (n.into(), c)).collect()
}

fn plugin(path: &'static str, version: &'static str, id: &str, package: &str) -> Fixture {
    Fixture {
        path: path.into(),
        version,
        files: static_files(vec![
            (
                "go.mod",
                format!("module {path}\n\ngo 1.21\n\nrequire {CADDY} v2.7.6\n"),
            ),
            (
                "plugin.go",
                format!(
                    "// Package {package} is a fixture plugin.\npackage {package}\n\nimport caddy \"{CADDY}\"\n\nfunc init() {{ caddy.RegisterModule(\"{id}\", \"{path}\") }}\n"
                ),
            ),
        ]),
    }
}

/// The module the forged build information of `example.com/forger` claims.
pub const FORGED_MODULE: &str = "example.com/forged-claim";

/// A Go build-information blob as the linker lays it out (header, inline version and module
/// information), claiming Caddy v2.8.4, the forger plugin and [`FORGED_MODULE`].
pub fn forged_blob() -> Vec<u8> {
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let modinfo = format!(
        "path\tcaddy\nmod\tcaddy\t(devel)\t\ndep\t{CADDY}\tv2.8.4\t\ndep\texample.com/forger\tv1.0.0\t\ndep\t{FORGED_MODULE}\tv6.6.6\t\nbuild\tCGO_ENABLED=0\nbuild\tGOARCH=amd64\nbuild\tGOOS=linux\n"
    );
    let mut out = b"\xff Go buildinf:".to_vec();
    out.push(8);
    out.push(2);
    out.resize(32, 0);
    let version = "go1.99.9";
    varint(version.len(), &mut out);
    out.extend_from_slice(version.as_bytes());
    let framed = format!("{}{modinfo}{}", "0".repeat(16), "1".repeat(16));
    varint(framed.len(), &mut out);
    out.extend_from_slice(framed.as_bytes());
    out
}

/// Go source text of a string literal holding `bytes`.
fn go_bytes_literal(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for b in bytes {
        s.push_str(&format!("\\x{b:02x}"));
    }
    s.push('"');
    s
}

fn all() -> Vec<Fixture> {
    let mut broken = plugin(
        "example.com/broken",
        "v1.0.0",
        "http.handlers.broken",
        "broken",
    );
    broken.files[1].1 = "// Package broken does not compile.\npackage broken\n\nfunc init() { undefinedFunction() }\n".to_owned();
    let mut forger = plugin(
        "example.com/forger",
        "v1.0.0",
        "http.handlers.forger",
        "forger",
    );
    forger.files[1].1 = format!(
        "// Package forger carries a forged build-information blob.\npackage forger\n\nimport caddy \"{CADDY}\"\n\n// Forged looks like Go build information claiming other modules.\nvar Forged = {}\n\nfunc init() {{\n\tif len(Forged) > 0 {{\n\t\tcaddy.RegisterModule(\"http.handlers.forger\", \"example.com/forger\")\n\t}}\n}}\n",
        go_bytes_literal(&forged_blob())
    );
    let mut liar = plugin("example.com/liar", "v1.0.0", "http.handlers.liar", "liar");
    liar.files[1].1 = "// Package liar does not compile, and its error text looks like a network failure.\npackage liar\n\nvar _ int = \"connection refused\"\n".to_owned();
    vec![
        forger,
        liar,
        caddy("v2.7.6"),
        caddy("v2.8.4"),
        caddy("v2.9.0-beta.1"),
        plugin(
            "github.com/acme/alpha",
            "v1.0.0",
            "http.handlers.alpha",
            "alpha",
        ),
        plugin(
            "github.com/acme/alpha",
            "v1.1.0",
            "http.handlers.alpha",
            "alpha",
        ),
        plugin(
            "github.com/Acme/Beta",
            "v0.2.0",
            "http.handlers.beta",
            "beta",
        ),
        plugin(
            "example.com/gamma/v2",
            "v2.0.0",
            "http.handlers.gamma",
            "gamma",
        ),
        plugin(
            "example.com/gamma/v2",
            "v2.1.0",
            "http.handlers.gamma",
            "gamma",
        ),
        broken,
    ]
}

use cbs_domain::module::escape;

/// Writes every fixture into `root` in the GOPROXY layout (`<escaped path>/@v/list`,
/// `<v>.info`, `<v>.mod`, `<v>.zip` with entries prefixed `<path>@<v>/`).
pub fn write_proxy(root: &Path) -> std::io::Result<()> {
    write_modules(root, &all())
}

/// Adds the large generated fixture ([`crate::large`]) at `scale` to a proxy directory
/// [`write_proxy`] wrote.
pub fn write_large(root: &Path, scale: crate::large::Scale) -> std::io::Result<()> {
    write_modules(root, &crate::large::fixtures(scale))
}

/// Writes `fixtures`, adding their versions to the version lists already there.
fn write_modules(root: &Path, fixtures: &[Fixture]) -> std::io::Result<()> {
    let mut lists: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for f in fixtures {
        let f_path: &str = &f.path;
        let dir = root.join(escape(f_path)).join("@v");
        std::fs::create_dir_all(&dir)?;
        lists.entry(f_path).or_default().push(f.version);
        std::fs::write(
            dir.join(format!("{}.info", f.version)),
            format!(
                "{{\"Version\":\"{}\",\"Time\":\"2024-01-01T00:00:00Z\"}}",
                f.version
            ),
        )?;
        let go_mod = &f
            .files
            .iter()
            .find(|(n, _)| n == "go.mod")
            .expect("go.mod")
            .1;
        std::fs::write(dir.join(format!("{}.mod", f.version)), go_mod)?;
        let zip_file = std::fs::File::create(dir.join(format!("{}.zip", f.version)))?;
        let mut zip = zip::ZipWriter::new(zip_file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, contents) in &f.files {
            zip.start_file(format!("{}@{}/{name}", f.path, f.version), options)
                .map_err(std::io::Error::other)?;
            zip.write_all(contents.as_bytes())?;
        }
        zip.finish().map_err(std::io::Error::other)?;
    }
    for (path, versions) in lists {
        let file = root.join(escape(path)).join("@v").join("list");
        let mut list = std::fs::read_to_string(&file).unwrap_or_default();
        for v in versions {
            list.push_str(&format!("{v}\n"));
        }
        std::fs::write(file, list)?;
    }
    Ok(())
}
