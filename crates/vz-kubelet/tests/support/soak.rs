//! The soak: hybrid pods (a VM and a Docker side-car) created and deleted on one node, two
//! at a time, each used through kubectl while it runs (`exec` into both containers, `logs`
//! of both, `port-forward` to the VM's SSH), with a census of everything the node could
//! leak taken before, every `every` pods and after. Shared by the CI variant
//! (`tests/soak.rs`, a few pods, asserting nothing grew) and the bench
//! (`benches/soak.rs`, hundreds of pods, printing the table).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Cluster, processes, run, text};

/// What the node holds at one moment: each counter by name, in table order.
#[derive(Debug, Clone)]
pub(crate) struct Census {
    /// Pods created and deleted so far (after the warm-up).
    pub(crate) pods: usize,
    /// Seconds since the soak started.
    pub(crate) secs: f64,
    pub(crate) counters: Vec<(&'static str, u64)>,
}

/// Counters that must return to their starting value once every pod is gone; the rest
/// (memory, descriptors, events) are reported and judged by their slope.
pub(crate) const MUST_RETURN: &[&str] = &[
    "qemu",
    "helpers",
    "taps",
    "br_ports",
    "leases",
    "nft_lines",
    "pod_dirs",
    "vm_dirs",
    "data_files",
    "containers",
    "networks",
];

impl Census {
    pub(crate) fn get(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// Counts what the node has now.
pub(crate) fn census(c: &Cluster, pods: usize, started: Instant) -> Census {
    let data = c.work.path().join("data");
    let data_s = data.display().to_string();
    let agent = c.agent.as_ref().map(|a| a.child.id());
    let (mut qemu, mut helpers) = (0, 0);
    for (pid, cmd) in processes() {
        if Some(pid) == agent || !cmd.contains(&data_s) {
            continue;
        }
        if cmd.contains("qemu-system") {
            qemu += 1;
        } else {
            helpers += 1;
        }
    }
    let links = ip_links(&c.netns.name);
    let taps = links
        .iter()
        .filter(|l| l.contains("tun") || l.contains("tap"))
        .count();
    let br_ports = links.iter().filter(|l| l.contains(" master ")).count();
    let leases = find_files(&data, "dnsmasq.leases")
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum::<usize>();
    let nft = run({
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &c.netns.name, "nft", "list", "ruleset"]);
        cmd
    });
    let nft_lines = text(&nft.stdout).lines().count();
    let pod_dirs = count_entries(&data.join("pods"));
    let vm_dirs = find_dirs_named(&data, "vms")
        .iter()
        .map(|d| count_entries(d))
        .sum::<usize>();
    let (data_files, data_bytes) = tree_size(&data, &["images"]);
    let containers = text(
        &run({
            let mut cmd = Command::new("docker");
            cmd.args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=vz-kubelet.io/node={}", c.node),
            ]);
            cmd
        })
        .stdout,
    )
    .lines()
    .count();
    let networks = text(
        &run({
            let mut cmd = Command::new("docker");
            cmd.args(["network", "ls", "-q"]);
            cmd
        })
        .stdout,
    )
    .lines()
    .count();
    let (fds, threads, rss, anon) = agent.map_or((0, 0, 0, 0), |pid| {
        (
            count_entries(Path::new(&format!("/proc/{pid}/fd"))) as u64,
            proc_status(pid, "Threads:"),
            proc_status(pid, "VmRSS:"),
            proc_status(pid, "RssAnon:"),
        )
    });
    let events = text(&c.kubectl(&["get", "events", "-o", "name"]).stdout)
        .lines()
        .count();
    Census {
        pods,
        secs: started.elapsed().as_secs_f64(),
        counters: vec![
            ("qemu", qemu),
            ("helpers", helpers),
            ("taps", taps as u64),
            ("br_ports", br_ports as u64),
            ("leases", leases as u64),
            ("nft_lines", nft_lines as u64),
            ("pod_dirs", pod_dirs as u64),
            ("vm_dirs", vm_dirs as u64),
            ("data_files", data_files),
            ("data_KiB", data_bytes / 1024),
            ("containers", containers as u64),
            ("networks", networks as u64),
            ("fds", fds),
            ("threads", threads),
            ("rss_KiB", rss),
            ("anon_KiB", anon),
            ("events", events as u64),
        ],
    }
}

fn ip_links(netns: &str) -> Vec<String> {
    let out = run({
        let mut cmd = Command::new("ip");
        cmd.args(["-n", netns, "-d", "-o", "link", "show"]);
        cmd
    });
    text(&out.stdout).lines().map(str::to_owned).collect()
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

fn walk(dir: &Path, skip_top: &[&str], f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if skip_top.iter().any(|s| e.file_name() == *s) {
            continue;
        }
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        f(&p, &md);
        if md.is_dir() {
            walk(&p, &[], f);
        }
    }
}

fn find_files(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(root, &[], &mut |p, md| {
        if md.is_file() && p.file_name().is_some_and(|n| n == name) {
            found.push(p.to_owned());
        }
    });
    found
}

fn find_dirs_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(root, &["images", "pods"], &mut |p, md| {
        if md.is_dir() && p.file_name().is_some_and(|n| n == name) {
            found.push(p.to_owned());
        }
    });
    found
}

/// Files (and sockets, links) under `root`, not under the top-level entries `skip`, and
/// their bytes as allocated on disk (sparse clones count what they hold).
fn tree_size(root: &Path, skip: &[&str]) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let (mut files, mut bytes) = (0, 0);
    walk(root, skip, &mut |_, md| {
        if !md.is_dir() {
            files += 1;
            bytes += md.blocks() * 512;
        }
    });
    (files, bytes)
}

/// A hybrid pod: the VM and a busybox side-car that logs a line every 2 s.
pub(crate) fn hybrid_pod(c: &Cluster, name: &str, sidecar: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "soak" } },
        "spec": {
            "nodeName": c.node,
            "tolerations": [{ "operator": "Exists" }],
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "vm", "image": c.image,
                    "resources": { "requests": { "cpu": "1", "memory": "256Mi" } },
                },
                {
                    "name": "sidecar", "image": sidecar,
                    "command": ["sh", "-c", "echo side-car up; while true; do date; sleep 2; done"],
                },
            ]
        }
    })
}

/// Builds the busybox side-car image and pushes it to the cluster's registry.
pub(crate) fn sidecar_image(c: &Cluster) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-sidecar-image.sh");
    let out = run({
        let mut cmd = Command::new("bash");
        cmd.arg(script).args(["soak/busybox:v1", &c.registry.addr]);
        cmd
    });
    assert!(
        out.status.success(),
        "build-sidecar-image: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// One pod's life: created, Ready, used through kubectl, deleted. Returns why it failed.
pub(crate) fn one_pod(c: &Cluster, name: &str, sidecar: &str) -> Result<(), String> {
    c.apply(&hybrid_pod(c, name, sidecar));
    let r = use_pod(c, name);
    let out = c.kubectl(&["delete", "pod", name, "--wait=true", "--timeout=180s"]);
    r?;
    if !out.status.success() {
        return Err(format!("delete {name}: {}", text(&out.stderr)));
    }
    Ok(())
}

fn use_pod(c: &Cluster, name: &str) -> Result<(), String> {
    let pod = format!("pod/{name}");
    let out = c.kubectl(&["wait", "--for=condition=Ready", &pod, "--timeout=300s"]);
    if !out.status.success() {
        return Err(format!(
            "{name} Ready: {}\n{}",
            text(&out.stderr),
            c.describe(&pod)
        ));
    }
    for (container, word) in [("vm", "vm-ok"), ("sidecar", "sidecar-ok")] {
        let out = c.kubectl(&["exec", name, "-c", container, "--", "echo", word]);
        if !out.status.success() || text(&out.stdout).trim() != word {
            return Err(format!(
                "exec {name}/{container}: {:?} {} {}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            ));
        }
    }
    let out = c.kubectl(&["logs", name, "-c", "sidecar"]);
    if !text(&out.stdout).contains("side-car up") {
        return Err(format!("logs {name}/sidecar: {}", text(&out.stderr)));
    }
    let out = c.kubectl(&["logs", name, "-c", "vm", "--tail=20"]);
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!("logs {name}/vm: {}", text(&out.stderr)));
    }
    let banner = port_forward_banner(c, name)?;
    if !banner.starts_with("SSH-2.0-") {
        return Err(format!("port-forward {name}:22 answered {banner:?}"));
    }
    Ok(())
}

/// `kubectl port-forward <pod> :22`, then the first line the VM's SSH server sends.
fn port_forward_banner(c: &Cluster, name: &str) -> Result<String, String> {
    let mut cmd = c.cp.kubectl();
    cmd.args(["-n", &c.ns, "port-forward", name, ":22"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("kubectl port-forward: {e}"))?;
    // kubectl's stdout stays open until it is killed: Go dies of SIGPIPE when it writes its
    // second "Forwarding from [::1]…" line to a closed pipe.
    let mut stdout = child.stdout.take().map(BufReader::new);
    let result = (|| {
        let stdout = stdout.as_mut().ok_or("no stdout")?;
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        // "Forwarding from 127.0.0.1:PORT -> 22"
        let port: u16 = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| format!("port-forward said {line:?}"))?;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reading the banner: {e}"))?;
        let banner = text(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        if banner.starts_with("SSH-2.0-") {
            Ok(banner)
        } else {
            Err(format!("port-forward {name}:22 answered {banner:?}"))
        }
    })();
    let _ = child.kill();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = child.wait();
    result.map_err(|e| format!("{e} (kubectl port-forward said: {stderr})"))
}

/// Runs `total` pods, `parallel` at a time, calling `row` with a census after every
/// `every` pods (and after the last). Returns the failures (pod name → why).
pub(crate) fn soak(
    c: &Cluster,
    sidecar: &str,
    total: usize,
    parallel: usize,
    every: usize,
    started: Instant,
    row: &(dyn Fn(Census) + Sync),
) -> BTreeMap<String, String> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failures = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    let name = format!("soak-{i}");
                    if let Err(e) = one_pod(c, &name, sidecar)
                        && let Ok(mut f) = failures.lock()
                    {
                        f.insert(name, e);
                    }
                    let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if n.is_multiple_of(every) && n < total {
                        row(census(c, n, started));
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap_or_default()
}

/// Waits until the node holds no pod of the soak (the API server has none, every VM
/// process and side-car container is gone) and its counters have settled.
pub(crate) fn settle(c: &Cluster, baseline: &Census, started: Instant) -> Census {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = census(c, baseline.pods, started);
        let back = MUST_RETURN.iter().all(|k| now.get(k) <= baseline.get(k));
        if back || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The table's header line.
pub(crate) fn header(c: &Census) -> String {
    let mut s = format!("{:>5} {:>7}", "pods", "secs");
    for (n, _) in &c.counters {
        s.push_str(&format!(" {n:>10}"));
    }
    s
}

/// One table line.
pub(crate) fn line(c: &Census) -> String {
    let mut s = format!("{:>5} {:>7.0}", c.pods, c.secs);
    for (_, v) in &c.counters {
        s.push_str(&format!(" {v:>10}"));
    }
    s
}

/// Counters of [`MUST_RETURN`] that ended above their baseline, as `name: before → after`.
pub(crate) fn leaks(before: &Census, after: &Census) -> Vec<String> {
    MUST_RETURN
        .iter()
        .filter(|k| after.get(k) > before.get(k))
        .map(|k| format!("{k}: {} → {}", before.get(k), after.get(k)))
        .collect()
}

/// The least-squares slope of `name` per pod over the rows (0 with fewer than two).
pub(crate) fn slope(rows: &[Census], name: &str) -> f64 {
    let n = rows.len() as f64;
    if rows.len() < 2 {
        return 0.0;
    }
    let xs: Vec<f64> = rows.iter().map(|r| r.pods as f64).collect();
    let ys: Vec<f64> = rows.iter().map(|r| r.get(name) as f64).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}
