//! Reads the Go build information embedded in a binary: the data `go version -m` prints.
//!
//! Works for every GOOS/GOARCH we build (not wasm, see `platform`) without running the
//! (untrusted) binary. Since Go 1.18 the linker writes a blob that starts with the magic
//! `\xff Go buildinf:`, then the pointer size, a flags byte (bit 1: strings inline), padding
//! to 32 bytes, and two strings each prefixed by its length as a varint: the Go version and
//! the module information. The module information is framed by 16 sentinel bytes on each
//! side and holds tab-separated lines: `path`, `mod`, `dep` (and `=>` for a replacement of
//! the line before), `build`.
//!
//! The blob is looked for only where Go's own `debug/buildinfo` looks: in the data area the
//! executable format designates for it (ELF: the `.go.buildinfo` section; PE: the first
//! initialized read-write data section; Mach-O: the `__go_buildinfo` section), at a 16-byte
//! aligned offset. Searching the whole file would find a look-alike first: any plugin can
//! put a forged blob in a string constant, which lands in read-only data before the real
//! one, and the forged module list would then be verified, signed and written into the
//! provenance.

use std::collections::BTreeMap;

const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER: usize = 32;
const FLAG_INLINE: u8 = 0x2;
/// The blob starts at an offset of the data area aligned to this.
const ALIGN: usize = 16;

/// A module line of the build information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    pub path: String,
    pub version: String,
    /// The go.sum hash (`h1:...`), when the binary records one (local replacements have none).
    pub sum: Option<String>,
    /// The module it was replaced with, if any.
    pub replace: Option<Box<ModuleInfo>>,
}

/// What a Go binary says it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// `go1.27.3`.
    pub go_version: String,
    /// The main package's path (`caddy` for our builds).
    pub path: String,
    pub main: Option<ModuleInfo>,
    pub deps: Vec<ModuleInfo>,
    /// `build` settings such as `GOOS`, `GOARCH`, `-trimpath`, `CGO_ENABLED`.
    pub settings: BTreeMap<String, String>,
}

/// Why build information could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildInfoError {
    #[error("not a Go binary: no build information found")]
    NotFound,
    #[error("not an executable this server reads (ELF, PE or Mach-O): {0}")]
    NotExecutable(String),
    #[error(
        "build information is in the old (pre Go 1.18) pointer format, which is not supported"
    )]
    OldFormat,
    #[error("build information is truncated or malformed")]
    Malformed,
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((x, i + 1));
        }
    }
    None
}

fn read_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, n) = uvarint(b)?;
    let len = usize::try_from(len).ok()?;
    let rest = b.get(n..)?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

impl BuildInfo {
    /// What differs between two binaries' build information, each as `what: this, that`
    /// (`here` is `self`, `there` is `other`): Go version, build settings, modules. Empty
    /// when they record the same build.
    pub fn differences(&self, other: &BuildInfo, here: &str, there: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, a: Option<&str>, b: Option<&str>| {
            if a != b {
                let show = |v: Option<&str>| v.map_or("unset".to_owned(), |v| format!("{v:?}"));
                out.push(format!("{what}: {} {here}, {} {there}", show(a), show(b)));
            }
        };
        differ(
            "Go version",
            Some(&self.go_version),
            Some(&other.go_version),
        );
        let keys: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(other.settings.keys()).collect();
        for k in keys {
            differ(
                &format!("build setting {k}"),
                self.settings.get(k).map(String::as_str),
                other.settings.get(k).map(String::as_str),
            );
        }
        let line = |m: &ModuleInfo| match &m.replace {
            Some(r) => format!("{} => {}@{}", m.version, r.path, r.version),
            None => m.version.clone(),
        };
        let mods = |i: &BuildInfo| -> BTreeMap<String, String> {
            i.deps.iter().map(|m| (m.path.clone(), line(m))).collect()
        };
        let (a, b) = (mods(self), mods(other));
        let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for p in paths {
            differ(
                &format!("module {p}"),
                a.get(p).map(String::as_str),
                b.get(p).map(String::as_str),
            );
        }
        out
    }

    /// Finds and parses the build information of an executable (ELF, PE or Mach-O), in the
    /// data area its format designates (see the module documentation).
    pub fn from_binary(data: &[u8]) -> Result<BuildInfo, BuildInfoError> {
        let area = data_area(data)?;
        BuildInfo::from_data_area(area)
    }

    /// Parses the blob at the first 16-byte aligned magic of a data area.
    fn from_data_area(area: &[u8]) -> Result<BuildInfo, BuildInfoError> {
        let start = find_aligned(area, MAGIC).ok_or(BuildInfoError::NotFound)?;
        let blob = &area[start..];
        let header = blob.get(..HEADER).ok_or(BuildInfoError::Malformed)?;
        if header[15] & FLAG_INLINE == 0 {
            return Err(BuildInfoError::OldFormat);
        }
        let (version, rest) = read_string(&blob[HEADER..]).ok_or(BuildInfoError::Malformed)?;
        let (modinfo, _) = read_string(rest).ok_or(BuildInfoError::Malformed)?;
        // Strip the 16-byte sentinels around the module information.
        let modinfo = if modinfo.len() >= 33 && modinfo[modinfo.len() - 17] == b'\n' {
            &modinfo[16..modinfo.len() - 16]
        } else {
            &[][..]
        };
        let go_version =
            String::from_utf8(version.to_vec()).map_err(|_| BuildInfoError::Malformed)?;
        let text = std::str::from_utf8(modinfo).map_err(|_| BuildInfoError::Malformed)?;
        Ok(BuildInfo::parse_modinfo(go_version, text))
    }

    /// Parses the module-information text (as `go version -m` prints it, minus indentation).
    pub fn parse_modinfo(go_version: String, text: &str) -> BuildInfo {
        let mut info = BuildInfo {
            go_version,
            path: String::new(),
            main: None,
            deps: Vec::new(),
            settings: BTreeMap::new(),
        };
        let module = |f: &[&str]| ModuleInfo {
            path: f.get(1).copied().unwrap_or_default().to_owned(),
            version: f.get(2).copied().unwrap_or_default().to_owned(),
            sum: f.get(3).filter(|s| !s.is_empty()).map(|s| (*s).to_owned()),
            replace: None,
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f[0] {
                "path" => info.path = f.get(1).copied().unwrap_or_default().to_owned(),
                "mod" => info.main = Some(module(&f)),
                "dep" => info.deps.push(module(&f)),
                "=>" => {
                    let repl = Box::new(module(&f));
                    match info.deps.last_mut() {
                        Some(last) => last.replace = Some(repl),
                        None => {
                            if let Some(m) = info.main.as_mut() {
                                m.replace = Some(repl);
                            }
                        }
                    }
                }
                "build" => {
                    if let Some((k, v)) = f.get(1).and_then(|kv| kv.split_once('=')) {
                        info.settings.insert(k.to_owned(), v.to_owned());
                    }
                }
                _ => {}
            }
        }
        info
    }

    /// Checks that the binary was built from `request`: Caddy and every plugin at their
    /// versions, replacements applied, the target platform, cgo off. Returns every mismatch.
    pub fn check_matches(&self, request: &crate::BuildRequest) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut expect = |path: &str, version: &str| match self.dep(path) {
            None => problems.push(format!("{path} is missing from the binary")),
            Some(d) if d.version != version => problems.push(format!(
                "{path} is at {} in the binary, {version} was requested",
                d.version
            )),
            Some(_) => {}
        };
        expect(crate::CADDY_MODULE, request.caddy_version().as_str());
        for p in request.plugins() {
            expect(p.module.as_str(), p.version.as_str());
        }
        for r in request.replacements() {
            // A replaced module that the build does not use does not appear at all.
            if let Some(d) = self.dep(r.old.as_str()) {
                let ok = d.replace.as_ref().is_some_and(|to| {
                    to.path == r.new.as_str() && to.version == r.version.as_str()
                });
                if !ok {
                    problems.push(format!(
                        "{} is not replaced by {}@{} in the binary",
                        r.old, r.new, r.version
                    ));
                }
            }
        }
        let platform = request.platform();
        let mut setting = |key: &str, want: Option<String>| {
            let have = self.settings.get(key).cloned();
            if have != want {
                problems.push(format!(
                    "build setting {key} is {}, expected {}",
                    have.as_deref().unwrap_or("unset"),
                    want.as_deref().unwrap_or("unset")
                ));
            }
        };
        setting("GOOS", Some(platform.os().to_owned()));
        setting("GOARCH", Some(platform.arch().to_owned()));
        if let Some(arm) = platform.arm() {
            setting("GOARM", Some(arm.to_string()));
        }
        setting("CGO_ENABLED", Some("0".to_owned()));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The dependency with this module path.
    pub fn dep(&self, path: &str) -> Option<&ModuleInfo> {
        self.deps.iter().find(|d| d.path == path)
    }
}

/// The bytes of the data area where Go's linker puts the build information, as Go's
/// `debug/buildinfo` finds it.
fn data_area(data: &[u8]) -> Result<&[u8], BuildInfoError> {
    use object::{Object, ObjectSection, SectionFlags};
    let file =
        object::File::parse(data).map_err(|e| BuildInfoError::NotExecutable(e.to_string()))?;
    let section_data = |name: &str| -> Result<&[u8], BuildInfoError> {
        let section = file.section_by_name(name).ok_or(BuildInfoError::NotFound)?;
        section.data().map_err(|_| BuildInfoError::Malformed)
    };
    match file.format() {
        object::BinaryFormat::Elf => section_data(".go.buildinfo"),
        object::BinaryFormat::MachO => section_data("__go_buildinfo"),
        object::BinaryFormat::Pe => {
            // The first initialized read-write data section (Go's linker puts the blob at
            // the start of .data).
            const INITIALIZED_DATA: u32 = 0x0000_0040;
            const MEM_READ: u32 = 0x4000_0000;
            const MEM_WRITE: u32 = 0x8000_0000;
            const ALIGN_32: u32 = 0x0060_0000;
            for section in file.sections() {
                let SectionFlags::Coff { characteristics } = section.flags() else {
                    continue;
                };
                if section.size() != 0
                    && characteristics & !ALIGN_32 == INITIALIZED_DATA | MEM_READ | MEM_WRITE
                {
                    return section.data().map_err(|_| BuildInfoError::Malformed);
                }
            }
            Err(BuildInfoError::NotFound)
        }
        other => Err(BuildInfoError::NotExecutable(format!(
            "{other:?} files are not built here"
        ))),
    }
}

/// The first offset of `needle` in `haystack` that is a multiple of [`ALIGN`].
fn find_aligned(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    (0..haystack.len())
        .step_by(ALIGN)
        .find(|&at| haystack[at..].starts_with(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("CBS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000),
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any bytes after the magic (the inline format's header, lengths and strings, all
        /// the binary's to say) give build information or an error, never a panic.
        #[test]
        fn any_blob_after_the_magic(
            pad in 0usize..3,
            flags in proptest::prelude::any::<u8>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            text in "(path|mod|dep|=>|build)[ \\t][ -~\\t\\n]{0,120}",
        ) {
            let mut area = vec![0u8; pad * 16];
            area.extend_from_slice(MAGIC);
            area.resize(pad * 16 + 15, 0);
            area.push(flags);
            area.resize(pad * 16 + HEADER, 0);
            area.extend_from_slice(&tail);
            let _ = BuildInfo::from_data_area(&area);
            // And well-framed strings whose content is arbitrary.
            let mut framed = area[..pad * 16 + HEADER].to_vec();
            framed[pad * 16 + 15] = FLAG_INLINE;
            let modinfo = format!("{}{text}\n{}", "0".repeat(16), "1".repeat(16));
            for s in [&b"go1.26.0"[..], modinfo.as_bytes()] {
                let mut n = s.len();
                loop {
                    let b = (n & 0x7f) as u8;
                    n >>= 7;
                    if n == 0 {
                        framed.push(b);
                        break;
                    }
                    framed.push(b | 0x80);
                }
                framed.extend_from_slice(s);
            }
            let _ = BuildInfo::from_data_area(&framed);
            let _ = BuildInfo::parse_modinfo("go1.26.0".into(), &text);
        }

        /// Any bytes as a whole binary: an error, never a panic.
        #[test]
        fn any_bytes_as_a_binary(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = BuildInfo::from_binary(&data);
        }
    }

    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// A data area with a blob laid out like the Go linker's, inside other bytes.
    fn binary(version: &str, modinfo: &str) -> Vec<u8> {
        let mut out = vec![0u8; 1024];
        out.extend_from_slice(MAGIC);
        out.push(8);
        out.push(FLAG_INLINE);
        out.resize(out.len() + 16, 0);
        varint(version.len(), &mut out);
        out.extend_from_slice(version.as_bytes());
        let framed = format!("{}{modinfo}{}", "0".repeat(16), "1".repeat(16));
        varint(framed.len(), &mut out);
        out.extend_from_slice(framed.as_bytes());
        out.extend_from_slice(&[0xff; 300]);
        out
    }

    const MODINFO: &str = "path\tcaddy\nmod\tcaddy\t(devel)\t\ndep\tgithub.com/caddyserver/caddy/v2\tv2.8.4\th1:abc=\ndep\texample.com/old\tv1.0.0\t\n=>\texample.com/new\tv1.2.0\th1:def=\nbuild\t-trimpath=true\nbuild\tGOOS=linux\nbuild\tGOARCH=arm\nbuild\tGOARM=7\n";

    #[test]
    fn differences_name_version_settings_and_modules() {
        let a = BuildInfo::from_data_area(&binary("go1.27.3", MODINFO)).unwrap();
        assert!(a.differences(&a, "here", "there").is_empty());
        let mut b = a.clone();
        b.go_version = "go1.27.4".into();
        b.settings.insert("GOAMD64".into(), "v3".into());
        b.deps[0].version = "v2.8.5".into();
        assert_eq!(
            a.differences(&b, "here", "there"),
            vec![
                "Go version: \"go1.27.3\" here, \"go1.27.4\" there".to_owned(),
                "build setting GOAMD64: unset here, \"v3\" there".to_owned(),
                "module github.com/caddyserver/caddy/v2: \"v2.8.4\" here, \"v2.8.5\" there"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn reads_version_modules_replacements_and_settings() {
        let info = BuildInfo::from_data_area(&binary("go1.27.3", MODINFO)).unwrap();
        assert_eq!(info.go_version, "go1.27.3");
        assert_eq!(info.path, "caddy");
        assert_eq!(info.main.as_ref().unwrap().version, "(devel)");
        assert_eq!(
            info.dep("github.com/caddyserver/caddy/v2").unwrap().version,
            "v2.8.4"
        );
        let old = info.dep("example.com/old").unwrap();
        assert_eq!(old.replace.as_ref().unwrap().path, "example.com/new");
        assert_eq!(old.replace.as_ref().unwrap().version, "v1.2.0");
        assert_eq!(info.settings["GOARM"], "7");
        assert_eq!(info.settings["-trimpath"], "true");
    }

    #[test]
    fn checks_a_binary_against_its_request() {
        use crate::{BuildRequest, Platform, Plugin, Replacement};
        let text = "path\tcaddy\nmod\tcaddy\t(devel)\t\ndep\tgithub.com/caddyserver/caddy/v2\tv2.8.4\th1:x=\ndep\texample.com/p\tv1.1.0\th1:y=\ndep\texample.com/old\tv1.0.0\t\n=>\texample.com/new\tv1.2.0\th1:z=\nbuild\tCGO_ENABLED=0\nbuild\tGOARCH=arm\nbuild\tGOOS=linux\nbuild\tGOARM=7\n";
        let info = BuildInfo::parse_modinfo("go1.27.3".into(), text);
        let request = |plugin_version: &str, arm: &str, new_version: &str| {
            BuildRequest::new(
                Platform::new("linux", "arm", Some(arm)).unwrap(),
                "v2.8.4".parse().unwrap(),
                vec![Plugin {
                    module: "example.com/p".parse().unwrap(),
                    version: plugin_version.parse().unwrap(),
                }],
                vec![Replacement {
                    old: "example.com/old".parse().unwrap(),
                    new: "example.com/new".parse().unwrap(),
                    version: new_version.parse().unwrap(),
                }],
            )
            .unwrap()
        };
        assert_eq!(
            info.check_matches(&request("v1.1.0", "7", "v1.2.0")),
            Ok(())
        );
        let problems = info
            .check_matches(&request("v1.0.0", "6", "v1.3.0"))
            .unwrap_err();
        assert_eq!(
            problems,
            vec![
                "example.com/p is at v1.1.0 in the binary, v1.0.0 was requested".to_owned(),
                "example.com/old is not replaced by example.com/new@v1.3.0 in the binary"
                    .to_owned(),
                "build setting GOARM is 7, expected 6".to_owned(),
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_build_info() {
        assert!(matches!(
            BuildInfo::from_binary(b"no go here"),
            Err(BuildInfoError::NotExecutable(_))
        ));
        assert_eq!(
            BuildInfo::from_data_area(b"no go here"),
            Err(BuildInfoError::NotFound)
        );
        let mut b = binary("go1.27.3", MODINFO);
        let at = find_aligned(&b, MAGIC).unwrap();
        b[at + 15] = 0;
        assert_eq!(
            BuildInfo::from_data_area(&b),
            Err(BuildInfoError::OldFormat)
        );
        let b = binary("go1.27.3", MODINFO);
        assert_eq!(
            BuildInfo::from_data_area(&b[..at + 40]),
            Err(BuildInfoError::Malformed)
        );
    }

    #[test]
    fn a_blob_off_the_16_byte_grid_is_not_build_information() {
        let real = binary("go1.27.3", MODINFO);
        let forged = binary("go0.0.0-forged", MODINFO);
        // A look-alike off the grid, before the real blob, is skipped.
        let mut area = vec![0u8; 17];
        area.extend_from_slice(&forged[1024..]);
        area.resize(area.len().div_ceil(16) * 16, 0);
        area.extend_from_slice(&real[1024..]);
        let info = BuildInfo::from_data_area(&area).unwrap();
        assert_eq!(info.go_version, "go1.27.3");
        // Only the misaligned one: none found.
        assert_eq!(
            BuildInfo::from_data_area(&area[..area.len() - (real.len() - 1024)]),
            Err(BuildInfoError::NotFound)
        );
    }
}
