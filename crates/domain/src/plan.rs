//! The build plan: the files and Go commands that turn a [`BuildRequest`] into a binary,
//! the way xcaddy does it (a main package importing Caddy and each plugin, `go mod init`,
//! `go get` of each module at its version, `go build` with `-trimpath` and `CGO_ENABLED=0`). Pure: executors run the plan.
//!
//! Every value that reaches `main.go` or an argv comes from a validated newtype, and every
//! command is an argv (never a shell string). Module paths can hold no quote, newline,
//! whitespace or backslash and cannot start with `-`; versions are canonical semver.

use std::fmt::Write as _;

use crate::request::{BuildRequest, CADDY_MODULE};

/// The module name `go mod init` gives the build.
pub const BUILD_MODULE: &str = "caddy";
/// Build tags xcaddy uses (leave out storage drivers that need cgo or are rarely wanted).
pub const BUILD_TAGS: &str = "nobadger,nomysql,nopgx";

/// What a command needs from its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `go mod` / `go get`: reaches the module proxy; writes the module cache.
    Resolve,
    /// `go build`: no network, module cache read-only, `GOPROXY=off`, `-mod=readonly`.
    Compile,
}

/// One Go command of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoCommand {
    /// The arguments after `go`.
    pub args: Vec<String>,
}

impl GoCommand {
    fn new<I, S>(args: I) -> GoCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GoCommand {
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// `go <args>` as one line, for logs (arguments contain no spaces).
    pub fn display(&self) -> String {
        format!("go {}", self.args.join(" "))
    }
}

/// A named step (xcaddy's step names, shown to users) of commands in one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub phase: Phase,
    pub commands: Vec<GoCommand>,
}

/// Everything a worker needs to build one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// Contents of `main.go`, written into the build directory before the first step.
    pub main_go: String,
    pub steps: Vec<Step>,
    /// The output file in the build directory: `caddy` or `caddy.exe`.
    pub output: &'static str,
    /// GOOS, GOARCH, GOARM.
    pub target_env: Vec<(&'static str, String)>,
    /// Whether what this build compiles may go into the build cache other builds use:
    /// only for Caddy alone (no plugins, no replacements), whose code is trusted. A
    /// plugin's build writes into a layer of its own that is thrown away.
    pub shares_build_cache: bool,
    /// Whether the build may read the build cache other builds filled. Off for a
    /// reproducibility check, which must compile everything itself to be independent of
    /// what the first build (and the cache) did; it then shares nothing either.
    pub reads_build_cache: bool,
}

impl BuildPlan {
    /// The same plan, compiling everything from scratch: no shared build cache is read or
    /// written (the module cache is still used; its files are checked against go.sum).
    pub fn independent(mut self) -> BuildPlan {
        self.reads_build_cache = false;
        self.shares_build_cache = false;
        self
    }
}

/// `main.go`: Caddy's command, the standard modules, `time/tzdata` and one blank import per
/// plugin.
pub fn render_main_go(request: &BuildRequest) -> String {
    let mut s = String::from("package main\n\nimport (\n");
    let _ = writeln!(s, "\tcaddycmd \"{CADDY_MODULE}/cmd\"");
    s.push('\n');
    s.push_str("\t// plug in Caddy modules here\n");
    let _ = writeln!(s, "\t_ \"{CADDY_MODULE}/modules/standard\"");
    for p in request.plugins() {
        let _ = writeln!(s, "\t_ \"{}\"", p.module);
    }
    s.push_str("\t_ \"time/tzdata\"\n");
    s.push_str(")\n\nfunc main() {\n\tcaddycmd.Main()\n}\n");
    s
}

/// The plan for `request`.
pub fn plan(request: &BuildRequest) -> BuildPlan {
    let caddy_at = format!("{CADDY_MODULE}@{}", request.caddy_version());
    let mut init = vec![GoCommand::new(["mod", "init", BUILD_MODULE])];
    for r in request.replacements() {
        init.push(GoCommand::new([
            "mod".to_owned(),
            "edit".to_owned(),
            format!("-replace={}={}@{}", r.old, r.new, r.version),
        ]));
    }
    let mut pin = vec![GoCommand::new(["get".to_owned(), caddy_at.clone()])];
    for p in request.plugins() {
        pin.push(GoCommand::new([
            "get".to_owned(),
            format!("{}@{}", p.module, p.version),
            caddy_at.clone(),
        ]));
    }
    pin.push(GoCommand::new(["get"]));
    let output = request.platform().binary_name();
    BuildPlan {
        main_go: render_main_go(request),
        shares_build_cache: request.plugins().is_empty() && request.replacements().is_empty(),
        reads_build_cache: true,
        steps: vec![
            Step {
                name: "initialize_module",
                phase: Phase::Resolve,
                commands: init,
            },
            Step {
                name: "pin_versions",
                phase: Phase::Resolve,
                commands: pin,
            },
            Step {
                name: "tidy_module",
                phase: Phase::Resolve,
                commands: vec![GoCommand::new(["mod", "tidy", "-e"])],
            },
            Step {
                name: "compile",
                phase: Phase::Compile,
                commands: vec![GoCommand::new([
                    "build",
                    "-o",
                    output,
                    "-trimpath",
                    "-buildvcs=false",
                    "-ldflags",
                    "-w -s",
                    "-tags",
                    BUILD_TAGS,
                ])],
            },
        ],
        output,
        target_env: request.platform().go_env(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Platform, Plugin, Replacement};

    fn request() -> BuildRequest {
        BuildRequest::new(
            Platform::new("windows", "amd64", None).unwrap(),
            "v2.8.4".parse().unwrap(),
            vec![
                Plugin {
                    module: "github.com/Acme/plugin/v2".parse().unwrap(),
                    version: "v2.1.0".parse().unwrap(),
                },
                Plugin {
                    module: "example.com/a".parse().unwrap(),
                    version: "v0.1.0".parse().unwrap(),
                },
            ],
            vec![Replacement {
                old: "example.com/old".parse().unwrap(),
                new: "example.com/new".parse().unwrap(),
                version: "v1.0.0".parse().unwrap(),
            }],
        )
        .unwrap()
    }

    #[test]
    fn main_go_imports_caddy_the_standard_modules_and_each_plugin() {
        assert_eq!(
            render_main_go(&request()),
            "package main\n\nimport (\n\tcaddycmd \"github.com/caddyserver/caddy/v2/cmd\"\n\n\t// plug in Caddy modules here\n\t_ \"github.com/caddyserver/caddy/v2/modules/standard\"\n\t_ \"example.com/a\"\n\t_ \"github.com/Acme/plugin/v2\"\n\t_ \"time/tzdata\"\n)\n\nfunc main() {\n\tcaddycmd.Main()\n}\n"
        );
    }

    #[test]
    fn the_xcaddy_sequence_as_argv() {
        let plan = plan(&request());
        let lines: Vec<(&str, String)> = plan
            .steps
            .iter()
            .flat_map(|s| s.commands.iter().map(move |c| (s.name, c.display())))
            .collect();
        let want = [
            ("initialize_module", "go mod init caddy"),
            ("initialize_module", "go mod edit -replace=example.com/old=example.com/new@v1.0.0"),
            ("pin_versions", "go get github.com/caddyserver/caddy/v2@v2.8.4"),
            ("pin_versions", "go get example.com/a@v0.1.0 github.com/caddyserver/caddy/v2@v2.8.4"),
            ("pin_versions", "go get github.com/Acme/plugin/v2@v2.1.0 github.com/caddyserver/caddy/v2@v2.8.4"),
            ("pin_versions", "go get"),
            ("tidy_module", "go mod tidy -e"),
            ("compile", "go build -o caddy.exe -trimpath -buildvcs=false -ldflags -w -s -tags nobadger,nomysql,nopgx"),
        ];
        let got: Vec<(&str, &str)> = lines.iter().map(|(s, l)| (*s, l.as_str())).collect();
        assert_eq!(got, want);
        assert_eq!(plan.output, "caddy.exe");
        assert_eq!(plan.steps[3].phase, Phase::Compile);
        assert!(plan.steps[..3].iter().all(|s| s.phase == Phase::Resolve));
        // -ldflags takes "-w -s" as ONE argument.
        assert!(plan.steps[3].commands[0].args.contains(&"-w -s".to_owned()));
    }

    #[test]
    fn no_argument_can_become_a_flag_or_break_out() {
        let plan = plan(&request());
        for step in &plan.steps {
            for c in &step.commands {
                for (i, a) in c.args.iter().enumerate() {
                    assert!(!a.contains(['\n', '"', '\'', '\\', '`', '$', ';']), "{a:?}");
                    let is_flag_value = i > 0 && c.args[i - 1].starts_with('-');
                    if a.starts_with('-') {
                        // Only our own fixed flags start with '-'.
                        assert!(
                            [
                                "-e",
                                "-o",
                                "-trimpath",
                                "-buildvcs=false",
                                "-ldflags",
                                "-tags",
                                "-w -s"
                            ]
                            .contains(&a.as_str())
                                || a.starts_with("-replace=")
                                || is_flag_value,
                            "{a:?}"
                        );
                    }
                }
            }
        }
    }
}
