//! A dockerd of the test's own (see [`PrivateDockerd`]).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{processes, text};

/// A dockerd of the test's own: its own network namespace, config file (none of the
/// host's), data root, exec root (so its own containerd), pid file and socket; no bridge,
/// no iptables, no sysctls. Neither running nor stopping it touches the host's Docker
/// (its `docker0` included). Stopped on drop.
pub(crate) struct PrivateDockerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    net_args: Vec<String>,
}

impl PrivateDockerd {
    pub(crate) fn start() -> PrivateDockerd {
        Self::start_with(&["--bridge=none"])
    }

    /// [`PrivateDockerd::start`] with `net_args` instead of `--bridge=none` (e.g. none:
    /// dockerd makes its `docker0` bridge inside its own namespace, for containers that
    /// need a network).
    pub(crate) fn start_with(net_args: &[&str]) -> PrivateDockerd {
        // Short: the socket path must fit a sockaddr_un.
        let dir = tempfile::Builder::new()
            .prefix("vzkd")
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::fs::write(dir.path().join("daemon.json"), "{}").unwrap_or_else(|e| panic!("{e}"));
        let mut d = PrivateDockerd {
            dir,
            child: None,
            net_args: net_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        d.restart();
        d
    }

    /// `DOCKER_HOST` for it.
    pub(crate) fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Whether it answers `docker version`.
    pub(crate) fn answers(&self) -> bool {
        Command::new("docker")
            .args([
                "-H",
                &self.host(),
                "version",
                "--format",
                "{{.Server.Version}}",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Copies `image` from the host's dockerd into this one (`docker save | docker load`):
    /// in its own network namespace it cannot reach the test's registry on 127.0.0.1.
    pub(crate) fn load_image(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("docker save: {e}"));
        let saved = save
            .stdout
            .take()
            .unwrap_or_else(|| panic!("docker save: no stdout"));
        let out = Command::new("docker")
            .args(["-H", &self.host(), "load"])
            .stdin(saved)
            .output()
            .unwrap_or_else(|e| panic!("docker load: {e}"));
        let _ = save.wait();
        assert!(
            out.status.success(),
            "docker load of {image}: {}",
            text(&out.stderr)
        );
    }

    /// Starts it (again, on the same directories and socket) and waits until it answers.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "private dockerd already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        // In a network namespace of its own: a dockerd started with `--bridge=none`
        // deletes the `docker0` link it finds (moby's removeDefaultBridgeInterface), which
        // in the host's namespace is the shared dockerd's bridge. `unshare` execs dockerd
        // (same pid); the socket is a file, reachable from every namespace.
        let child = Command::new("unshare")
            .args(["--net", "--", "dockerd"])
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .args(["-H", &self.host()])
            .args(&self.net_args)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--storage-driver=vfs",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting dockerd: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.answers() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("private dockerd exited: {status}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "private dockerd does not answer after 60 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, as `systemctl stop docker` would, and waits for it (and the containerd it
    /// started) to exit; SIGKILL after 30 s.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        // Its containerd (command line under our exec root) goes with it.
        let exec_root = self.dir.path().join("exec").display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<u32> = processes()
                .into_iter()
                .filter(|(_, cmd)| cmd.contains(&exec_root))
                .map(|(pid, _)| pid)
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for pid in left {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- private dockerd log ----\n{}", self.log());
        }
        self.stop();
    }
}
