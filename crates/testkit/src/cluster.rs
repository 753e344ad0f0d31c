//! A throwaway Postgres cluster for one test process.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// A running cluster; stopped and removed when the process exits.
#[derive(Debug)]
pub struct Cluster {
    port: u16,
    dir: PathBuf,
}

/// What the exit hook must stop and remove.
static RUNNING: Mutex<Option<(libc::pid_t, PathBuf)>> = Mutex::new(None);

const DIR_PREFIX: &str = "cbs-pg-";

impl Cluster {
    /// Starts a cluster: initdb, then `postgres` on a free loopback port.
    pub fn start() -> Result<Cluster, String> {
        let bin = bindir()?;
        remove_stale_clusters();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("temp dir for postgres: {e}"))?
            .keep();
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())
            .map_err(|e| format!("write owner.pid: {e}"))?;
        let user = RunAs::for_postgres()?;
        user.chown(&dir)?;
        let data = dir.join("data");

        let out = command(&bin.join("initdb"), &user)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }

        let port = free_port()?;
        let postgres = bin.join("postgres");
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (data2, dir2) = (data.clone(), dir.clone());
        // The parent-death signal fires when the THREAD that forked the server ends, so the
        // server is started from a thread that lives as long as the process.
        std::thread::Builder::new()
            .name("test-postgres".into())
            .spawn(move || {
                let mut cmd = command(&postgres, &user);
                cmd.arg("-D")
                    .arg(&data2)
                    .args(["-p", &port.to_string(), "-k"])
                    .arg(&dir2)
                    .args([
                        "-c",
                        "listen_addresses=127.0.0.1",
                        // Throwaway data: no flushes. Benchmarks use a durable cluster.
                        "-c",
                        "fsync=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=400",
                        "-c",
                        "shared_buffers=128MB",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn().map(|mut c| {
                    // The server's log goes to postgres.log; the line that says it accepts
                    // connections is the event `wait_ready` waits for.
                    if let Some(stderr) = c.stderr.take() {
                        let log_path = dir2.join("postgres.log");
                        std::thread::spawn(move || copy_log(stderr, &log_path, ready_tx));
                    }
                    c.id()
                });
                let _ = tx.send(child);
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| format!("spawn postgres thread: {e}"))?;
        let pid = rx
            .recv()
            .map_err(|e| format!("postgres thread: {e}"))?
            .map_err(|e| format!("start postgres: {e}"))?;
        *RUNNING.lock().expect("lock") = Some((pid as libc::pid_t, dir.clone()));
        // SAFETY: registers a plain extern "C" function.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        wait_ready(&ready_rx, &dir)?;
        Ok(Cluster { port, dir })
    }

    /// Connection URL of database `db` (as the `postgres` superuser).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

extern "C" fn stop_at_exit() {
    let Ok(mut guard) = RUNNING.lock() else {
        return;
    };
    if let Some((pid, dir)) = guard.take() {
        // SAFETY: plain syscalls on our own child.
        unsafe {
            libc::kill(pid, libc::SIGQUIT);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes clusters left behind by test processes that were killed.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = owner.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies the server's stderr into `log`, and says when the server is ready.
fn copy_log(stderr: std::process::ChildStderr, log: &Path, ready: std::sync::mpsc::Sender<()>) {
    use std::io::{BufRead, Write};
    let mut file = std::fs::File::create(log).ok();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if line.contains("database system is ready to accept connections") {
            let _ = ready.send(());
        }
    }
    // The server ended: dropping `ready` tells a waiter that it will never be ready.
}

/// Waits for the server's "ready to accept connections", with a deadline.
fn wait_ready(ready: &std::sync::mpsc::Receiver<()>, dir: &Path) -> Result<(), String> {
    ready.recv_timeout(Duration::from_secs(60)).map_err(|e| {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        format!("test postgres did not start ({e}):\n{log}")
    })
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    Ok(l.local_addr()
        .map_err(|e| format!("free port: {e}"))?
        .port())
}

/// Directory of the Postgres server binaries.
fn bindir() -> Result<PathBuf, String> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() && p.join("postgres").exists() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        "no Postgres server binaries (initdb, postgres) found: install the postgresql package, or set TEST_DATABASE_URL".to_string()
    })
}

/// The user the server runs as: `postgres` when we are root (it refuses root), else us.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    ids: Option<(libc::uid_t, libc::gid_t)>,
}

impl RunAs {
    fn for_postgres() -> Result<RunAs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs { ids: None });
        }
        let name = CString::new("postgres").expect("no NUL");
        // SAFETY: getpwnam returns a pointer to static storage or NULL; read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(
                "running as root, but there is no `postgres` user to run the test server as".into(),
            );
        }
        // SAFETY: non-null pointer from getpwnam.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(RunAs {
            ids: Some((uid, gid)),
        })
    }

    fn chown(&self, path: &Path) -> Result<(), String> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// A command that runs as `user` (setgid/setuid between fork and exec).
fn command(program: &Path, user: &RunAs) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("PGDATA").env("LC_ALL", "C");
    if let Some((uid, gid)) = user.ids {
        // SAFETY: setgroups/setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

/// A Postgres server of one test, managed with `pg_ctl`, that the test can restart (the
/// shared [`Cluster`] cannot be: other tests use it). Stopped when dropped.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    pub fn start() -> Result<PgServer, String> {
        PgServer::start_with(false)
    }

    /// A server that accepts TCP connections only over TLS (`hostssl` in pg_hba.conf),
    /// with a certificate for `localhost` and 127.0.0.1 signed by a CA made for it
    /// ([`PgServer::ca_cert`]).
    pub fn start_tls() -> Result<PgServer, String> {
        PgServer::start_with(true)
    }

    /// The CA certificate (PEM) that signed a TLS server's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("tls").join("ca.crt")
    }

    fn start_with(tls: bool) -> Result<PgServer, String> {
        let bin = bindir()?;
        let dir = tempfile::Builder::new()
            .prefix("cbs-pgserver-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let user = RunAs::for_postgres()?;
        user.chown(&dir)?;
        let out = command(&bin.join("initdb"), &user)
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb: {}", String::from_utf8_lossy(&out.stderr)));
        }
        if tls {
            let certs = dir.join("tls");
            std::fs::create_dir(&certs).map_err(|e| format!("tls dir: {e}"))?;
            make_ca(&certs, "ca")?;
            make_cert(&certs, "ca", "server", "DNS:localhost,IP:127.0.0.1")?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                certs.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .map_err(|e| format!("server.key: {e}"))?;
            for f in ["server.key", "server.crt"] {
                user.chown(&certs.join(f))?;
            }
            let data = dir.join("data");
            let conf = format!(
                "\nssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\n",
                certs.display()
            );
            append(&data.join("postgresql.conf"), &conf)?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .map_err(|e| format!("pg_hba.conf: {e}"))?;
        }
        let server = PgServer {
            port: free_port()?,
            dir,
            bin,
        };
        server.pg_ctl(&["start"])?;
        Ok(server)
    }

    fn pg_ctl(&self, action: &[&str]) -> Result<(), String> {
        let user = RunAs::for_postgres()?;
        let out = command(&self.bin.join("pg_ctl"), &user)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-t", "60", "-m", "fast", "-l"])
            .arg(self.dir.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.display()
            ))
            .args(action)
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl {action:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Stops the server (fast: every connection is cut) and starts it again; returns when
    /// it accepts connections.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl(&["restart"])
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| format!("run openssl (install it: apt-get install openssl): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Makes a self-signed CA in `dir`: `<name>.crt` and `<name>.key` (P-256).
pub fn make_ca(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &format!("/CN=cbs test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    Ok(dir.join(crt))
}

/// Makes `<name>.crt` and `<name>.key` in `dir`, signed by the CA `<ca>.crt`/`<ca>.key`,
/// for the subject alternative names `san` (e.g. `DNS:localhost,IP:127.0.0.1`).
pub fn make_cert(dir: &Path, ca: &str, name: &str, san: &str) -> Result<PathBuf, String> {
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    )?;
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    )
    .map_err(|e| format!("{ext}: {e}"))?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    )?;
    Ok(dir.join(crt))
}
