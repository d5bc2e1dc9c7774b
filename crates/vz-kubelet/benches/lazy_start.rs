//! Lazy disks against full pulls (issue 19), in one run: prints a table.
//!
//! The registry runs in a network namespace of its own behind a veth pair whose
//! registry-side end is shaped with `tc tbf` (the link a node pulls over). The image is
//! the busybox test guest with its disk grown to `VZK_BENCH_LAZY_GIB` GiB (default 2)
//! of compressible data (≈2:1 with zstd, like a used disk); the guest boots from its
//! initramfs and reads only the first blocks of its disk (partition probe), as a CI
//! image reads a small part of its disk at boot.
//!
//! Measured, median of `VZK_BENCH_RUNS` (default 3) pods each, by the real `vz-kubelet
//! run` (`--lazy-disks opt-in`) against a private kube-apiserver:
//! * the baseline: create → Ready with the image already cached (warm);
//! * at each rate of `VZK_BENCH_RATES` (default `1gbit,200mbit`): create → Ready after
//!   the image was removed from the cache, pulled in full first, then served on demand
//!   (the pod annotated `vz-kubelet.io/lazy-disk: "true"`), with the bytes that crossed
//!   the link before Ready (all of them: small files, frames read, and the background
//!   download, which is not rate-limited here). After a lazy pod the bench waits for
//!   the background download to finish, so runs do not overlap.
//!
//! `cargo bench -p vz-kubelet --bench lazy_start` (root; what the tests need, plus tc).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use vzk_testenv::{ControlPlane, Netns, Registry, RegistryConfig, guest};

mod common;
use common::{
    AgentSetup, delete_and_wait, die, env_or, is_ready, median, spawn_agent, wait_node_registered,
};

fn run(cmd: &mut Command) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => die(format!("{cmd:?}: {other:?}")),
    }
}

/// The veth pair between the host and the registry's namespace.
struct Link {
    host: String,
    inner: String,
    netns: String,
    registry_ip: String,
}

impl Link {
    fn new(netns: &Netns) -> Link {
        let n = rand::random::<u16>() % 250 + 1;
        let (host, inner) = (format!("vzklh{n}"), format!("vzkln{n}"));
        run(Command::new("ip").args([
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            &netns.name,
        ]));
        run(Command::new("ip").args(["addr", "add", &format!("10.251.{n}.1/30"), "dev", &host]));
        run(Command::new("ip").args(["link", "set", &host, "up"]));
        run(Command::new("ip").args([
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("10.251.{n}.2/30"),
            "dev",
            &inner,
        ]));
        run(Command::new("ip").args(["-n", &netns.name, "link", "set", &inner, "up"]));
        Link {
            host,
            inner,
            netns: netns.name.clone(),
            registry_ip: format!("10.251.{n}.2"),
        }
    }

    /// Shape what the registry sends to `rate` (`tc` units, e.g. `200mbit`).
    fn shape(&self, rate: &str) {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.inner,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "4mb",
            "latency",
            "100ms",
        ]));
    }

    /// Bytes the host received from the registry so far.
    fn received(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/rx_bytes", self.host))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .status();
    }
}

/// `gib` GiB of data that zstd compresses about 2:1, written in 4 MiB pieces.
fn grow_disk(path: &Path, gib: u64) {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap_or_else(|e| die(e)));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..(gib << 8) {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Four bits of entropy per byte.
            *b = b'a' + (x & 15) as u8;
        }
        f.write_all(&buf).unwrap_or_else(|e| die(e));
    }
    f.flush().unwrap_or_else(|e| die(e));
}

fn pod(name: &str, node: &str, image: &str, lazy: bool) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "annotations": { "vz-kubelet.io/lazy-disk": lazy.to_string() } },
        "spec": {
            "nodeName": node,
            "tolerations": [{ "operator": "Exists" }],
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } }
            }]
        }
    }))
    .unwrap_or_else(|e| die(e))
}

/// Create a pod and wait until Ready: seconds, and bytes received over the link.
async fn create_ready(pods: &Api<Pod>, p: &Pod, link: &Link) -> (f64, u64) {
    let name = p.metadata.name.clone().unwrap_or_default();
    let (t0, b0) = (Instant::now(), link.received());
    pods.create(&PostParams::default(), p)
        .await
        .unwrap_or_else(|e| die(format!("create {name}: {e}")));
    let deadline = t0 + Duration::from_secs(1800);
    loop {
        if pods.get(&name).await.ok().is_some_and(|p| is_ready(&p)) {
            return (t0.elapsed().as_secs_f64(), link.received() - b0);
        }
        if Instant::now() > deadline {
            die(format!("{name} not Ready in 30 min"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `guest_bytes` of the agent's log lines saying a lazily served image completed, in order.
fn guest_bytes(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("lazily served image complete"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            v["fields"]["guest_bytes"]
                .as_f64()
                .or(v["guest_bytes"].as_f64())
        })
        .collect()
}

/// Images in the agent's cache.
fn cached(data: &Path) -> usize {
    std::fs::read_dir(data.join("images/images/sha256"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("meta.json").exists())
                .count()
        })
        .unwrap_or(0)
}

fn image_rm(bin: &str, data: &Path, image: &str) {
    run(Command::new(bin)
        .args(["image", "rm", "--root"])
        .arg(data.join("images"))
        .arg(image)
        .stdout(Stdio::null()));
    if cached(data) != 0 {
        die("the image is still cached after image rm");
    }
}

#[tokio::main]
async fn main() {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .ok();
    let runs: usize = env_or("VZK_BENCH_RUNS", 3);
    let gib: u64 = env_or("VZK_BENCH_LAZY_GIB", 2);
    let rates: Vec<String> = std::env::var("VZK_BENCH_RATES")
        .unwrap_or_else(|_| "1gbit,200mbit".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let cp = ControlPlane::start().unwrap_or_else(|e| die(vzk_testenv::error_chain(&e)));
    let node = "lazy-node";
    let id = cp.node_identity(node);
    let regns = Netns::new();
    let link = Link::new(&regns);
    let registry = Registry::start_with(&RegistryConfig {
        netns: Some((regns.name.clone(), link.registry_ip.clone())),
        ..Default::default()
    });
    let target_tmp = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tmp");
    let work = tempfile::tempdir().unwrap_or_else(|e| die(e));
    let g = guest(&target_tmp);
    let img = work.path().join("image");
    g.image_dir(&img);
    grow_disk(&img.join("disk.img"), gib);
    let image = format!("{}/bench/lazy:v1", registry.addr);
    let bin = env!("CARGO_BIN_EXE_vz-kubelet");
    let t = Instant::now();
    run(Command::new(bin)
        .args(["image", "push", "--root"])
        .arg(work.path().join("push-cache"))
        .arg("--plain-http")
        .arg(&img)
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null()));
    let pushed_bytes = dir_size(&registry.dir.path().join("data"));
    eprintln!(
        "pushed {gib} GiB as {:.0} MiB in {:.1} s",
        pushed_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let netns = Netns::new();
    let data = work.path().join("data");
    let log = work.path().join("agent.log");
    let _agent = spawn_agent(
        &AgentSetup {
            cp: &cp,
            id: &id,
            data: &data,
            netns: &netns.name,
            registry: &registry.addr,
            ssh_key: &g.openssh_key,
            log: &log,
        },
        &["--max-vms", "1", "--lazy-disks", "opt-in"],
    );
    let admin = cp.admin_client().await;
    let ns = cp.create_namespace("bench").await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    wait_node_registered(&admin, node).await;

    // Baseline: the image cached (the first pod pulls it unshaped and is not counted).
    let mut n = 0;
    let mut next = |prefix: &str| {
        n += 1;
        format!("{prefix}-{n}")
    };
    let first = next("fill");
    create_ready(&pods, &pod(&first, node, &image, false), &link).await;
    delete_and_wait(&pods, &first).await;
    let mut warm = Vec::new();
    for _ in 0..runs {
        let name = next("warm");
        warm.push(
            create_ready(&pods, &pod(&name, node, &image, false), &link)
                .await
                .0,
        );
        delete_and_wait(&pods, &name).await;
    }
    let warm = median(warm);

    let mut rows = Vec::new();
    for rate in &rates {
        link.shape(rate);
        let (mut full, mut lazy, mut full_b, mut lazy_b) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let seen = guest_bytes(&log).len();
        for _ in 0..runs {
            image_rm(bin, &data, &image);
            let name = next("full");
            let (s, b) = create_ready(&pods, &pod(&name, node, &image, false), &link).await;
            full.push(s);
            full_b.push(b as f64);
            delete_and_wait(&pods, &name).await;
            image_rm(bin, &data, &image);
            let name = next("lazy");
            let (s, b) = create_ready(&pods, &pod(&name, node, &image, true), &link).await;
            lazy.push(s);
            lazy_b.push(b as f64);
            delete_and_wait(&pods, &name).await;
            // The background download ends before the next run starts.
            let deadline = Instant::now() + Duration::from_secs(1800);
            while cached(&data) == 0 {
                if Instant::now() > deadline {
                    die("the lazy image did not complete in 30 min");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let on_demand = median(guest_bytes(&log).split_off(seen));
        rows.push((
            rate.clone(),
            median(full),
            median(full_b),
            median(lazy),
            median(lazy_b),
            on_demand,
        ));
    }

    let mib = |b: f64| b / 1048576.0;
    println!();
    println!(
        "Lazy disk vs full pull: test guest with a {gib} GiB disk ({:.0} MiB compressed in the registry), TCG, median of {runs} each; warm-cache create → Ready {warm:.2} s (same run)",
        mib(pushed_bytes as f64)
    );
    println!();
    println!(
        "| link | full pull: create → Ready (s) | MiB before Ready | lazy: create → Ready (s) | MiB before Ready | of which the guest's reads (MiB, compressed, whole run) | lazy / warm | lazy / full |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (rate, full, full_b, lazy, lazy_b, on_demand) in &rows {
        println!(
            "| {rate} | {full:.2} | {:.0} | {lazy:.2} | {:.0} | {:.2} | {:.2} | {:.3} |",
            mib(*full_b),
            mib(*lazy_b),
            mib(*on_demand),
            lazy / warm,
            lazy / full
        );
    }
    println!();
    println!(
        "Physical limit of a full pull: the compressed image over the link ({:.0} MiB at each rate); lazy: the boot's own reads, plus what the background download takes of the link meanwhile.",
        mib(pushed_bytes as f64)
    );
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
