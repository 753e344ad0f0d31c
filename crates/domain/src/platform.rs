//! Target platforms: the GOOS/GOARCH pairs Go builds with cgo off, and GOARM.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every `GOOS/GOARCH` pair of `go tool dist list` (Go 1.27) that links without cgo.
/// Left out: android/386, android/amd64, android/arm, ios/amd64 and ios/arm64, which Go can
/// only link externally, with cgo (checked by building a program for every pair); and
/// js/wasm and wasip1/wasm, whose binaries carry no readable build information (not even
/// `go version -m` reads them), so a build could not be verified, and where Caddy cannot
/// listen on a socket anyway.
pub const PLATFORMS: &[(&str, &str)] = &[
    ("aix", "ppc64"),
    ("android", "arm64"),
    ("darwin", "amd64"),
    ("darwin", "arm64"),
    ("dragonfly", "amd64"),
    ("freebsd", "386"),
    ("freebsd", "amd64"),
    ("freebsd", "arm"),
    ("freebsd", "arm64"),
    ("illumos", "amd64"),
    ("linux", "386"),
    ("linux", "amd64"),
    ("linux", "arm"),
    ("linux", "arm64"),
    ("linux", "loong64"),
    ("linux", "mips"),
    ("linux", "mips64"),
    ("linux", "mips64le"),
    ("linux", "mipsle"),
    ("linux", "ppc64"),
    ("linux", "ppc64le"),
    ("linux", "riscv64"),
    ("linux", "s390x"),
    ("netbsd", "386"),
    ("netbsd", "amd64"),
    ("netbsd", "arm"),
    ("netbsd", "arm64"),
    ("openbsd", "386"),
    ("openbsd", "amd64"),
    ("openbsd", "arm"),
    ("openbsd", "arm64"),
    ("openbsd", "ppc64"),
    ("openbsd", "riscv64"),
    ("plan9", "386"),
    ("plan9", "amd64"),
    ("plan9", "arm"),
    ("solaris", "amd64"),
    ("windows", "386"),
    ("windows", "amd64"),
    ("windows", "arm64"),
];

/// A target: GOOS, GOARCH and, for `arm` only, GOARM (5, 6 or 7).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawPlatform", into = "RawPlatform")]
pub struct Platform {
    os: &'static str,
    arch: &'static str,
    arm: Option<u8>,
}

#[derive(Serialize, Deserialize)]
struct RawPlatform {
    os: String,
    arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arm: Option<u8>,
}

/// Why a platform is refused; the message lists the valid choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error("unsupported os/arch {os:?}/{arch:?}; valid choices: {}", valid_list())]
    Unsupported { os: String, arch: String },
    #[error("arm {0} is not a GOARM value; use 5, 6 or 7")]
    BadArm(String),
    #[error("arm (GOARM) is only for arch \"arm\", not {0:?}")]
    ArmWithoutArm(String),
}

fn valid_list() -> String {
    PLATFORMS
        .iter()
        .map(|(o, a)| format!("{o}/{a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Platform {
    /// Checks a requested platform. `arm` is GOARM as the user wrote it (`"7"`), if given.
    pub fn new(os: &str, arch: &str, arm: Option<&str>) -> Result<Platform, PlatformError> {
        let &(os_s, arch_s) = PLATFORMS
            .iter()
            .find(|(o, a)| *o == os && *a == arch)
            .ok_or_else(|| PlatformError::Unsupported {
                os: os.chars().take(40).collect(),
                arch: arch.chars().take(40).collect(),
            })?;
        let arm = match arm.filter(|a| !a.is_empty()) {
            None => None,
            Some(_) if arch != "arm" => {
                return Err(PlatformError::ArmWithoutArm(arch.to_owned()));
            }
            Some(a @ ("5" | "6" | "7")) => Some(a.as_bytes()[0] - b'0'),
            Some(a) => return Err(PlatformError::BadArm(a.chars().take(20).collect())),
        };
        Ok(Platform {
            os: os_s,
            arch: arch_s,
            arm,
        })
    }

    pub fn os(&self) -> &'static str {
        self.os
    }

    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// GOARM, when the arch is `arm` and one was asked for.
    pub fn arm(&self) -> Option<u8> {
        self.arm
    }

    /// The binary's file name: `caddy.exe` on Windows, `caddy` elsewhere.
    pub fn binary_name(&self) -> &'static str {
        if self.os == "windows" {
            "caddy.exe"
        } else {
            "caddy"
        }
    }

    /// GOOS, GOARCH and (if set) GOARM for a build's environment.
    pub fn go_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("GOOS", self.os.to_owned()),
            ("GOARCH", self.arch.to_owned()),
        ];
        if let Some(arm) = self.arm {
            env.push(("GOARM", arm.to_string()));
        }
        env
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(arm) = self.arm {
            write!(f, "/v{arm}")?;
        }
        Ok(())
    }
}

impl TryFrom<RawPlatform> for Platform {
    type Error = PlatformError;
    fn try_from(r: RawPlatform) -> Result<Self, Self::Error> {
        let arm = r.arm.map(|a| a.to_string());
        Platform::new(&r.os, &r.arch, arm.as_deref())
    }
}

impl From<Platform> for RawPlatform {
    fn from(p: Platform) -> Self {
        RawPlatform {
            os: p.os.to_owned(),
            arch: p.arch.to_owned(),
            arm: p.arm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_and_arm() {
        let ok = [
            ("linux", "amd64", None, "linux/amd64"),
            ("linux", "arm", Some("7"), "linux/arm/v7"),
            ("linux", "arm", None, "linux/arm"),
            ("windows", "amd64", None, "windows/amd64"),
            ("darwin", "arm64", Some(""), "darwin/arm64"),
        ];
        for (os, arch, arm, want) in ok {
            assert_eq!(Platform::new(os, arch, arm).unwrap().to_string(), want);
        }
        let bad = [
            ("linux", "amd64", Some("7"), "only for arch \"arm\""),
            ("linux", "arm", Some("8"), "use 5, 6 or 7"),
            ("linux", "arm", Some("7;id"), "use 5, 6 or 7"),
            ("android", "amd64", None, "unsupported os/arch"),
            ("ios", "arm64", None, "unsupported os/arch"),
            ("js", "wasm", None, "unsupported os/arch"),
            ("Linux", "amd64", None, "unsupported os/arch"),
            ("linux", "x86_64", None, "valid choices: aix/ppc64"),
            ("linux\n", "amd64", None, "unsupported"),
            ("", "", None, "unsupported"),
        ];
        for (os, arch, arm, want) in bad {
            let err = Platform::new(os, arch, arm).unwrap_err().to_string();
            assert!(err.contains(want), "{os}/{arch}/{arm:?}: {err}");
        }
    }

    #[test]
    fn binary_name_and_env() {
        let w = Platform::new("windows", "amd64", None).unwrap();
        assert_eq!(w.binary_name(), "caddy.exe");
        let a = Platform::new("linux", "arm", Some("6")).unwrap();
        assert_eq!(a.binary_name(), "caddy");
        assert_eq!(
            a.go_env(),
            vec![
                ("GOOS", "linux".into()),
                ("GOARCH", "arm".into()),
                ("GOARM", "6".into())
            ]
        );
    }
}
