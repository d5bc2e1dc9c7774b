//! Real components for end-to-end tests beside the control plane: the cached test guest
//! (scripts/build-test-guest.sh) laid out as a Linux VM image, a `docker-registry` on
//! loopback, and a network namespace owned by one test. Test support: failures panic
//! with a message saying what is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test guest (kernel, initramfs, raw disk, dropbear root key) plus an OpenSSH copy
/// of its root key.
#[derive(Debug)]
pub struct Guest {
    /// Output directory of `build-test-guest.sh`.
    pub dir: PathBuf,
    /// The guest's root key in OpenSSH format (for `VZ_SSH_PRIVATE_KEY_PATH`).
    pub openssh_key: PathBuf,
}

/// Runs `scripts/<script> dir` (a cached guest build); panics with its output if it fails.
fn build_into(script: &str, dir: &Path) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (or finds cached under `cache_dir/vzk-test-guest`) the test guest once per
/// process. Pass `env!("CARGO_TARGET_TMPDIR")` so every test binary shares one cache.
pub fn guest(cache_dir: &Path) -> &'static Guest {
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        let dir = cache_dir.join("vzk-test-guest");
        build_into("build-test-guest.sh", &dir);
        let openssh_key =
            std::env::temp_dir().join(format!("vzk-guest-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&openssh_key);
        let out = Command::new("dropbearconvert")
            .args(["dropbear", "openssh"])
            .arg(dir.join("id_ed25519"))
            .arg(&openssh_key)
            .output()
            .unwrap_or_else(|e| panic!("dropbearconvert (Debian dropbear-bin): {e}"));
        assert!(
            out.status.success(),
            "dropbearconvert: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Guest { dir, openssh_key }
    })
}

impl Guest {
    /// Lays the guest out as a Linux VM image directory (`kernel`, `initrd`, `disk.img`,
    /// `config.json`) ready for `vz-kubelet image push`.
    pub fn image_dir(&self, dest: &Path) {
        std::fs::create_dir_all(dest).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
        for (from, to) in [
            ("vmlinuz", "kernel"),
            ("initramfs.gz", "initrd"),
            ("disk.raw", "disk.img"),
        ] {
            std::fs::copy(self.dir.join(from), dest.join(to))
                .unwrap_or_else(|e| panic!("copying {from}: {e}"));
        }
        let cmdline = std::fs::read_to_string(self.dir.join("cmdline"))
            .unwrap_or_else(|e| panic!("guest cmdline: {e}"));
        let config = serde_json::json!({
            "mediatype": "application/vnd.vz-kubelet.vm.config.v1+json",
            "os": "linux", "arch": "amd64",
            "kernelCmdline": cmdline.trim(),
            "cpus": 1, "memoryBytes": 256u64 << 20,
        });
        std::fs::write(dest.join("config.json"), config.to_string())
            .unwrap_or_else(|e| panic!("config.json: {e}"));
    }
}

/// Builds (or finds cached under `cache_dir/vzk-debian-guest`) the real Debian 12
/// guest of `scripts/build-debian-guest.sh` once per process (systemd, OpenSSH,
/// cloud-init; ~2 min and network to Debian's mirror on the first build) and returns its
/// image directory (`kernel`, `initrd`, `disk.img`, `config.json`), ready for
/// `vz-kubelet image push`. The guest has no key of its own: pods enter it with the
/// per-pod key the agent puts on the cloud-init seed.
pub fn debian_guest(cache_dir: &Path) -> &'static Path {
    static G: OnceLock<PathBuf> = OnceLock::new();
    G.get_or_init(|| {
        let dir = cache_dir.join("vzk-debian-guest");
        build_into("build-debian-guest.sh", &dir);
        dir
    })
}

/// `s` without ANSI escape sequences (CSI: ESC `[` … final byte), as a guest's console
/// carries them: systemd colours its status lines.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(ch);
    }
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// How to start a [`Registry`] beyond the defaults (anonymous, plain HTTP, storing what
/// is pushed).
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Require this user and password (htpasswd basic auth).
    pub auth: Option<(String, String)>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: require a client certificate signed by this CA (PEM file).
    pub client_ca: Option<PathBuf>,
    /// Run as a pull-through cache of this registry URL (`proxy.remoteurl`); such a
    /// registry refuses pushes.
    pub proxy_remote_url: Option<String>,
    /// Run inside this network namespace (`ip netns` name), listening on this address
    /// of it (e.g. one end of a veth pair the caller made), instead of on loopback.
    pub netns: Option<(String, String)>,
}

/// A `docker-registry` (Debian's distribution v2) on a free loopback port, killed on drop.
/// Deletion is enabled; with [`Registry::with_auth`] it asks for htpasswd basic auth,
/// [`Registry::start_with`] adds TLS or pull-through caching.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    netns: Option<String>,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Its working directory (config, storage under `data/`, `registry.log`).
    pub dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an anonymous registry and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(&RegistryConfig::default())
    }

    /// Starts a registry that requires `user`/`password` (bcrypt htpasswd, made with
    /// `htpasswd` from Debian's apache2-utils).
    pub fn with_auth(user: &str, password: &str) -> Self {
        Self::start_with(&RegistryConfig {
            auth: Some((user.to_owned(), password.to_owned())),
            ..RegistryConfig::default()
        })
    }

    /// Starts a registry configured by `config` and waits until it accepts connections.
    pub fn start_with(config: &RegistryConfig) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let addr = match &config.netns {
            Some((_, ip)) => format!("{ip}:5000"),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let mut auth_cfg = String::new();
        if let Some((user, password)) = &config.auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap_or_else(|e| panic!("htpasswd (Debian package apache2-utils): {e}"));
            assert!(out.status.success(), "htpasswd failed");
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).unwrap_or_else(|e| panic!("htpasswd file: {e}"));
            auth_cfg = format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                path.display()
            );
        }
        let tls_cfg = config.tls.as_ref().map_or_else(String::new, |(cert, key)| {
            let client_cas = config.client_ca.as_ref().map_or_else(String::new, |ca| {
                format!("    clientcas:\n      - {}\n", ca.display())
            });
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n{client_cas}",
                cert.display(),
                key.display()
            )
        });
        let proxy_cfg = config
            .proxy_remote_url
            .as_ref()
            .map_or_else(String::new, |url| format!("proxy:\n  remoteurl: {url}\n"));
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_cfg}{auth_cfg}{proxy_cfg}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), cfg)
            .unwrap_or_else(|e| panic!("registry config: {e}"));
        let netns = config.netns.as_ref().map(|(n, _)| n.clone());
        let child = Self::spawn(dir.path(), netns.as_deref());
        let reg = Self {
            child,
            netns,
            addr,
            dir,
        };
        reg.wait_listening();
        reg
    }

    fn spawn(dir: &Path, netns: Option<&str>) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))
            .unwrap_or_else(|e| panic!("registry log: {e}"));
        let bin = std::env::var("VZK_DOCKER_REGISTRY").unwrap_or_else(|_| "docker-registry".into());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin} (Debian package docker-registry): {e}"))
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start on {}: {}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry, as an outage would: its address refuses connections, its
    /// storage stays for [`Registry::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same address with the same storage and config
    /// (after [`Registry::stop`]); waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.dir.path(), self.netns.as_deref());
        self.wait_listening();
    }

    /// What the registry logged (errors only).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Path of a blob's data file in the registry's storage (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        let prefix = hex.get(..2).unwrap_or(hex);
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{prefix}/{hex}/data"
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace owned by one test. Drop kills every process in it, then deletes it.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns` name).
    pub name: String,
}

impl Netns {
    /// Creates `vzkt-<random>` with `lo` up.
    pub fn new() -> Self {
        let name = format!("vzkt-{:08x}", rand::random::<u32>());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} (needs root and iproute2)");
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status();
        Self { name }
    }

    /// Whether a link named `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for _ in 0..3 {
            let pids: Vec<String> = Command::new("ip")
                .args(["netns", "pids", &self.name])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if pids.is_empty() {
                break;
            }
            for p in &pids {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
