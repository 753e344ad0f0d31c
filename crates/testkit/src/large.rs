//! A generated fixture that compiles like real Caddy: a Caddy-like main module with many
//! packages of generated Go code (real work for the compiler: structs with JSON tags,
//! methods, generics, closures, and plenty of standard-library imports such as net/http,
//! crypto/tls, encoding/json and text/template), several dependency modules, and plugins
//! for a mixed workload. Our own generated code, written into the fixture proxy only when
//! asked ([`crate::FixtureProxy::start_large`]): the small fixtures keep tests fast.
//!
//! - `github.com/caddyserver/caddy/v2` at [`LARGE_CADDY_VERSION`] (a pre-release, so that
//!   `latest` still resolves to the small fixture's release): `cmd`, `modules/standard`
//!   (imports every generated package), [`Scale::caddy_packages`] generated packages, and
//!   requires the dependency modules;
//! - `example.com/largedep<N>` v1.0.0 ([`Scale::deps`] of them), each with
//!   [`Scale::dep_packages`] packages;
//! - `example.com/largeplugin<NN>` v1.0.0 ([`LARGE_PLUGINS`] of them), each with
//!   [`Scale::plugin_packages`] packages, registering a module with Caddy.
//!
//! Calibrated (docs/benchmarks.md) so that a cold linux/amd64 build on the 2-core machine
//! takes minutes, as real Caddy with a few plugins does.

use std::fmt::Write as _;

use crate::fixtures::{Fixture, CADDY};

/// The large Caddy's version.
pub const LARGE_CADDY_VERSION: &str = "v2.10.0-large.1";
/// How many plugins there are (`example.com/largeplugin01` ...).
pub const LARGE_PLUGINS: usize = 30;

/// How much code to generate.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub caddy_packages: usize,
    pub deps: usize,
    pub dep_packages: usize,
    pub plugin_packages: usize,
    /// Types (each with its methods) per generated package.
    pub types_per_package: usize,
}

impl Scale {
    /// The calibrated size (see docs/benchmarks.md).
    pub const CALIBRATED: Scale = Scale {
        caddy_packages: 600,
        deps: 6,
        dep_packages: 50,
        plugin_packages: 40,
        types_per_package: 12,
    };

    /// A few packages, for a test that the generator's code compiles.
    pub const TINY: Scale = Scale {
        caddy_packages: 2,
        deps: 2,
        dep_packages: 1,
        plugin_packages: 1,
        types_per_package: 1,
    };
}

/// The path of plugin `n` (1-based).
pub fn large_plugin(n: usize) -> String {
    format!("example.com/largeplugin{n:02}")
}

fn dep_path(n: usize) -> String {
    format!("example.com/largedep{n}")
}

/// One generated package: `types` types with methods that use the standard library,
/// importing `imports` (package paths of earlier generated packages).
fn package(name: &str, seed: usize, types: usize, imports: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "// Package {name} is generated fixture code.");
    let _ = writeln!(s, "package {name}\n");
    s.push_str("import (\n\t\"bytes\"\n\t\"crypto/sha256\"\n\t\"crypto/tls\"\n\t\"encoding/hex\"\n\t\"encoding/json\"\n\t\"errors\"\n\t\"fmt\"\n\t\"net/http\"\n\t\"sort\"\n\t\"strconv\"\n\t\"strings\"\n\t\"sync\"\n\t\"text/template\"\n\t\"time\"\n");
    for (i, imp) in imports.iter().enumerate() {
        let _ = writeln!(s, "\tdep{i} \"{imp}\"");
    }
    s.push_str(")\n\n");
    // Uses of the imported generated packages, so they are linked.
    for i in 0..imports.len() {
        let _ = writeln!(s, "var _ = dep{i}.Checksum");
    }
    let _ = writeln!(
        s,
        r#"
var errInvalid = errors.New("{name}: invalid configuration")

// Number is what the generic helpers work on.
type Number interface {{ ~int | ~int64 | ~float64 }}

// Sum adds xs.
func Sum[T Number](xs []T) T {{
	var t T
	for _, x := range xs {{
		t += x
	}}
	return t
}}

// Map applies f to every element.
func Map[T, U any](xs []T, f func(T) U) []U {{
	out := make([]U, 0, len(xs))
	for _, x := range xs {{
		out = append(out, f(x))
	}}
	return out
}}

// Checksum hashes s.
func Checksum(s string) string {{
	h := sha256.Sum256([]byte(s + "{name}"))
	return hex.EncodeToString(h[:])
}}
"#
    );
    for t in 0..types {
        let k = seed * 1000 + t;
        let _ = writeln!(
            s,
            r#"
// Handler{t} is a generated HTTP handler with a JSON configuration.
type Handler{t} struct {{
	Name     string            `json:"name,omitempty"`
	Hosts    []string          `json:"hosts,omitempty"`
	Timeout  time.Duration     `json:"timeout,omitempty"`
	Weights  map[string]int    `json:"weights,omitempty"`
	Headers  http.Header       `json:"headers,omitempty"`
	Children []*Handler{t}      `json:"children,omitempty"`
	mu       sync.Mutex
	hits     map[string]int64
}}

var tmpl{t} = template.Must(template.New("h{k}").Funcs(template.FuncMap{{"upper": strings.ToUpper}}).Parse(
	"{{{{.Name | upper}}}} {{{{range $i, $h := .Hosts}}}}{{{{if $i}}}}, {{{{end}}}}{{{{$h}}}}{{{{end}}}} ({k})"))

// Validate checks the configuration.
func (h *Handler{t}) Validate() error {{
	if h.Name == "" {{
		return fmt.Errorf("handler {k}: %w: no name", errInvalid)
	}}
	seen := map[string]bool{{}}
	for i, host := range h.Hosts {{
		host = strings.ToLower(strings.TrimSpace(host))
		if host == "" || strings.ContainsAny(host, " /\\") {{
			return fmt.Errorf("handler {k}: host %d %q: %w", i, host, errInvalid)
		}}
		if seen[host] {{
			return fmt.Errorf("handler {k}: duplicate host %q", host)
		}}
		seen[host] = true
	}}
	total := 0
	for name, w := range h.Weights {{
		if w < 0 || w > {k} + 100 {{
			return fmt.Errorf("handler {k}: weight %s=%d out of range", name, w)
		}}
		total += w
	}}
	for _, c := range h.Children {{
		if err := c.Validate(); err != nil {{
			return fmt.Errorf("child of %s: %w", h.Name, err)
		}}
	}}
	if total > 0 && h.Timeout <= 0 {{
		h.Timeout = time.Duration(total) * time.Millisecond
	}}
	return nil
}}

// ServeHTTP answers with the handler's state as JSON.
func (h *Handler{t}) ServeHTTP(w http.ResponseWriter, r *http.Request) {{
	h.mu.Lock()
	if h.hits == nil {{
		h.hits = map[string]int64{{}}
	}}
	h.hits[r.URL.Path]++
	n := h.hits[r.URL.Path]
	h.mu.Unlock()
	for k, vs := range h.Headers {{
		for _, v := range vs {{
			w.Header().Add(k, v)
		}}
	}}
	keys := make([]string, 0, len(h.Weights))
	for k := range h.Weights {{
		keys = append(keys, k)
	}}
	sort.Strings(keys)
	body := map[string]any{{
		"name":    h.Name,
		"hits":    n,
		"weights": Map(keys, func(k string) string {{ return k + "=" + strconv.Itoa(h.Weights[k]) }}),
		"sum":     Sum(Map(keys, func(k string) int {{ return h.Weights[k] }})),
		"render":  h.Render(),
		"id":      {k},
	}}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(body); err != nil {{
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}}
}}

// TLSConfig is the handler's TLS configuration.
func (h *Handler{t}) TLSConfig() *tls.Config {{
	return &tls.Config{{
		ServerName: h.Name,
		MinVersion: tls.VersionTLS12,
		NextProtos: append([]string{{"h2", "http/1.1"}}, h.Hosts...),
		VerifyConnection: func(cs tls.ConnectionState) error {{
			if cs.ServerName != "" && !strings.HasSuffix(cs.ServerName, h.Name) {{
				return fmt.Errorf("handler {k}: unexpected server name %q", cs.ServerName)
			}}
			return nil
		}},
	}}
}}

// Render renders the handler's template.
func (h *Handler{t}) Render() string {{
	var b bytes.Buffer
	if err := tmpl{t}.Execute(&b, h); err != nil {{
		return err.Error()
	}}
	return b.String()
}}

// Decode{t} parses a configuration and validates it.
func Decode{t}(data []byte) (*Handler{t}, error) {{
	var h Handler{t}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {{
		return nil, fmt.Errorf("handler {k}: %w", err)
	}}
	return &h, h.Validate()
}}

// Score{t} is arithmetic for the optimizer.
func Score{t}(xs []int64) int64 {{
	var acc int64 = {k}
	for i, x := range xs {{
		switch {{
		case x%3 == 0:
			acc += x * int64(i+1)
		case x%5 == 0:
			acc -= x / 2
		case x > acc:
			acc ^= x << 3
		default:
			acc = acc*31 + x
		}}
	}}
	return acc + Sum(xs)
}}
"#
        );
    }
    s
}

fn package_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:03}")
}

/// Every module of the large fixture at `scale`.
pub(crate) fn fixtures(scale: Scale) -> Vec<Fixture> {
    let mut out = Vec::new();
    let mut dep_pkgs = Vec::new();
    for d in 1..=scale.deps {
        let path = dep_path(d);
        let mut files = vec![("go.mod".to_owned(), format!("module {path}\n\ngo 1.21\n"))];
        for p in 0..scale.dep_packages {
            let name = package_name("dep", p);
            // A chain inside the module, so that packages wait for each other.
            let imports: Vec<String> = if p > 0 {
                vec![format!("{path}/{}", package_name("dep", p - 1))]
            } else {
                vec![]
            };
            files.push((
                format!("{name}/{name}.go"),
                package(&name, d * 100 + p, scale.types_per_package, &imports),
            ));
            dep_pkgs.push(format!("{path}/{name}"));
        }
        out.push(Fixture::owned(path, "v1.0.0", files));
    }
    let mut requires = String::new();
    for d in 1..=scale.deps {
        let _ = writeln!(requires, "\t{} v1.0.0", dep_path(d));
    }
    let mut files = vec![(
        "go.mod".to_owned(),
        format!("module {CADDY}\n\ngo 1.21\n\nrequire (\n{requires})\n"),
    )];
    let small = crate::fixtures::caddy("v2.8.4");
    for (name, contents) in small.files {
        if name != "go.mod" && name != "modules/standard/standard.go" {
            files.push((name.into_owned(), contents));
        }
    }
    let mut standard = format!(
        "// Package standard registers the fixture's standard modules.\npackage standard\n\nimport (\n\tcaddy \"{CADDY}\"\n"
    );
    for p in 0..scale.caddy_packages {
        let name = package_name("gen", p);
        // Each package imports the last package of one dependency module and an earlier
        // package of its own module.
        let mut imports = Vec::new();
        if !dep_pkgs.is_empty() {
            imports.push(dep_pkgs[(p * 7) % dep_pkgs.len()].clone());
        }
        if p > 0 {
            imports.push(format!("{CADDY}/modules/{}", package_name("gen", p / 2)));
        }
        files.push((
            format!("modules/{name}/{name}.go"),
            package(&name, 10_000 + p, scale.types_per_package, &imports),
        ));
        let _ = writeln!(standard, "\t_ \"{CADDY}/modules/{name}\"");
    }
    let _ = write!(
        standard,
        ")\n\nfunc init() {{ caddy.RegisterModule(\"http.handlers.file_server\", \"{CADDY}\") }}\n"
    );
    files.push(("modules/standard/standard.go".to_owned(), standard));
    out.push(Fixture::owned(CADDY.to_owned(), LARGE_CADDY_VERSION, files));
    for n in 1..=LARGE_PLUGINS {
        let path = large_plugin(n);
        let mut files = vec![(
            "go.mod".to_owned(),
            format!("module {path}\n\ngo 1.21\n\nrequire {CADDY} {LARGE_CADDY_VERSION}\n"),
        )];
        let mut main = format!(
            "// Package largeplugin{n:02} is a generated fixture plugin.\npackage largeplugin{n:02}\n\nimport (\n\tcaddy \"{CADDY}\"\n"
        );
        for p in 0..scale.plugin_packages {
            let name = package_name("part", p);
            let imports = if p > 0 {
                vec![format!("{path}/{}", package_name("part", p - 1))]
            } else {
                vec![]
            };
            files.push((
                format!("{name}/{name}.go"),
                package(
                    &name,
                    50_000 + n * 100 + p,
                    scale.types_per_package,
                    &imports,
                ),
            ));
            let _ = writeln!(main, "\t_ \"{path}/{name}\"");
        }
        let _ = write!(
            main,
            ")\n\nfunc init() {{ caddy.RegisterModule(\"http.handlers.largeplugin{n:02}\", \"{path}\") }}\n"
        );
        files.push(("plugin.go".to_owned(), main));
        out.push(Fixture::owned(path, "v1.0.0", files));
    }
    out
}
