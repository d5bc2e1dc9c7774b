//! Test fixture: a REAL dropbear SSH server on a free loopback port.
//!
//! It runs as root in private mount and PID namespaces (`unshare -m -p -f`), where a
//! copy of `/etc/passwd` (root's home → the test's temp dir) and of `/etc/shadow`
//! (root's password → a known one) are bind-mounted. The host's `/root`, passwd and
//! shadow are never touched. `setpriv --pdeathsig KILL` plus `unshare --kill-child`
//! make the server die with the test process; killing the `unshare` process kills
//! the whole PID namespace (dropbear, its connection children and their commands).

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vzk_guest::{CredentialSource, Credentials, GuestConfig, GuestSession, HostKeyStore};

pub(crate) const PASSWORD: &str = "s3cret pass'word";
pub(crate) const PASSPHRASE: &str = "open sesame";

pub(crate) struct Dropbear {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    host_key: PathBuf,
    child: Option<Child>,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port()
}

/// Generates an OpenSSH-format ed25519 user key at `path` (with `passphrase`).
pub(crate) fn user_key(path: &Path, passphrase: &str) {
    run(Command::new("ssh-keygen")
        .args([
            "-q", "-t", "ed25519", "-C", "vzk-test", "-N", passphrase, "-f",
        ])
        .arg(path));
}

/// Whether something listens on 127.0.0.1:`port` (read from /proc, so no
/// connection is made and none is counted by the server).
fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == needle && f[3] == "0A"
        })
    })
}

/// Logs to the test output when `RUST_LOG` is set.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl Dropbear {
    pub(crate) fn start() -> Self {
        init_logging();
        let dir = tempfile::Builder::new()
            .prefix("vzk-guest-dropbear-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        let home = d.join("home");
        fs::create_dir_all(home.join(".ssh")).unwrap_or_else(|e| panic!("mkdir: {e}"));
        for p in [&home, &home.join(".ssh")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700))
                .unwrap_or_else(|e| panic!("chmod: {e}"));
        }
        user_key(&d.join("id"), "");
        user_key(&d.join("id_enc"), PASSPHRASE);
        let mut auth = String::new();
        for k in ["id.pub", "id_enc.pub"] {
            auth.push_str(&fs::read_to_string(d.join(k)).unwrap_or_else(|e| panic!("read: {e}")));
        }
        let ak = home.join(".ssh/authorized_keys");
        fs::write(&ak, auth).unwrap_or_else(|e| panic!("write: {e}"));
        fs::set_permissions(&ak, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod: {e}"));

        // passwd with root's home moved to our temp dir; shadow with a known password.
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_else(|e| panic!("passwd: {e}"));
        let passwd: Vec<String> = passwd
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(':').collect();
                let h = home.display().to_string();
                if f.first() == Some(&"root") && f.len() == 7 {
                    f[5] = &h;
                    f.join(":")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        fs::write(d.join("passwd"), passwd.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
        let hash = Command::new("openssl")
            .args(["passwd", "-6", PASSWORD])
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        let hash = String::from_utf8_lossy(&hash.stdout).trim().to_owned();
        assert!(hash.starts_with("$6$"), "openssl passwd: {hash}");
        let shadow = fs::read_to_string("/etc/shadow").unwrap_or_else(|e| panic!("shadow: {e}"));
        let shadow: Vec<String> = shadow
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(':').collect();
                if f.first() == Some(&"root") && f.len() > 2 {
                    f[1] = &hash;
                    f.join(":")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        fs::write(d.join("shadow"), shadow.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(d.join("shadow"), fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod: {e}"));

        let host_key = d.join("host_a");
        run(Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&host_key));
        let mut db = Self {
            port: free_port(),
            dir,
            host_key,
            child: None,
        };
        db.spawn();
        db
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let script = format!(
            "mount --bind {passwd} /etc/passwd && mount --bind {shadow} /etc/shadow && \
             exec dropbear -F -E -p 127.0.0.1:{port} -r {key}",
            passwd = d.join("passwd").display(),
            shadow = d.join("shadow").display(),
            port = self.port,
            key = self.host_key.display(),
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dropbear.log"))
            .unwrap_or_else(|e| panic!("log: {e}"));
        let child = Command::new("setpriv")
            .args([
                "--pdeathsig",
                "KILL",
                "unshare",
                "--mount",
                "--pid",
                "--fork",
            ])
            .args(["--kill-child", "--mount-proc", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning dropbear: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(self.port) {
            assert!(
                Instant::now() < deadline,
                "dropbear did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and everything it started (the whole PID namespace).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while listening(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and starts the server again on the same port and host key.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Restarts the server with a freshly generated host key (a "different machine").
    pub(crate) fn restart_with_new_host_key(&mut self) {
        self.stop();
        self.host_key = self.dir.path().join("host_b");
        run(Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&self.host_key));
        self.spawn();
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dropbear.log")).unwrap_or_default()
    }

    /// Connections the server accepted (one "Child connection from" line each).
    pub(crate) fn connections(&self) -> usize {
        self.log().matches("Child connection from").count()
    }

    pub(crate) fn key_path(&self) -> PathBuf {
        self.dir.path().join("id")
    }

    pub(crate) fn creds(&self) -> Credentials {
        let source = CredentialSource {
            user: Some("root".into()),
            private_key_path: Some(self.key_path()),
            ..CredentialSource::default()
        };
        Credentials::load(&source).unwrap_or_else(|e| panic!("loading test key: {e}"))
    }

    /// A session with an in-memory host-key pin and a short dial timeout.
    pub(crate) fn session(&self) -> GuestSession {
        GuestSession::new(
            self.addr(),
            self.creds(),
            HostKeyStore::in_memory(),
            test_config(),
        )
    }
}

pub(crate) fn test_config() -> GuestConfig {
    GuestConfig {
        dial_timeout: Duration::from_secs(10),
        ..GuestConfig::default()
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        self.stop();
    }
}
