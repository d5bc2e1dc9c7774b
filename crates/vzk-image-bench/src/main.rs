//! `vzk-image-bench`: push a 2 GiB macOS-style image (40% zero extents, 30% random,
//! 30% compressible text) to a local `docker-registry` in both formats, then time:
//!
//! * (a) our agoda (gzip) pull into a verified raw disk vs
//!   `curl blob | gzip -dc | tee disk | sha256sum`;
//! * (b) our vzk (chunked zstd) pull vs `skopeo copy docker://… oci:DIR`;
//! * (c) `curl` of the blobs to /dev/null, the transfer floor;
//!
//! and print one table. Run: `cargo run --release -p vzk-image-bench [-- --size-mib N]`.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sha2::Digest as _;
use vzk_image::manifest::Manifest;
use vzk_image::media_types as mt;
use vzk_image::{Format, ImageStore, PullOptions, PushOptions, Reference, RegistryOptions};

struct Registry {
    child: Child,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &Path) -> anyhow::Result<Registry> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        dir.join("data").display()
    );
    std::fs::write(dir.join("config.yml"), cfg)?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start docker-registry")?;
    let reg = Registry { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&reg.addr).is_err() {
        ensure!(Instant::now() < deadline, "docker-registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(reg)
}

/// xorshift bytes.
fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn fill_text(buf: &mut [u8], seed: &mut u64) {
    const WORDS: [&str; 16] = [
        "the ",
        "kernel ",
        "virtual ",
        "machine ",
        "image ",
        "disk ",
        "Library/",
        "System/",
        "Frameworks/",
        "xcode ",
        "swift ",
        "0x7fff ",
        "/usr/lib/",
        "error: ",
        "warning ",
        "\n",
    ];
    let mut i = 0;
    while i < buf.len() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let w = WORDS[(*seed % 16) as usize].as_bytes();
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// A disk of `size` bytes made of extents of 1–16 MiB: 40% zero, 30% random, 30% text.
fn make_disk(path: &Path, size: u64) -> anyhow::Result<(u64, u64, u64)> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut seed = 0x2545F4914F6CDD1Du64;
    let (mut z, mut r, mut t) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 16 << 20];
    let mut off = 0u64;
    while off < size {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = ((1 + seed % 16) << 20).min(size - off);
        let n = len as usize;
        // Keep the running mix close to 40/30/30.
        let total = (z + r + t).max(1) as f64;
        let kind = if (z as f64) / total < 0.4 {
            0
        } else if (r as f64) / total < 0.3 {
            1
        } else {
            2
        };
        match kind {
            0 => z += len,
            1 => {
                fill_random(&mut buf[..n], &mut seed);
                f.write_all_at(&buf[..n], off)?;
                r += len;
            }
            _ => {
                fill_text(&mut buf[..n], &mut seed);
                f.write_all_at(&buf[..n], off)?;
                t += len;
            }
        }
        off += len;
    }
    f.sync_all()?;
    Ok((z, r, t))
}

/// CPU seconds (user + system) used so far by this process, and by its reaped children.
fn cpu_times() -> (f64, f64) {
    cpu_times_of("self")
}

/// CPU seconds (user + system) of process `pid` (`"self"` or a number), and of its reaped
/// children.
fn cpu_times_of(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (
        (ticks(11) + ticks(12)) / 100.0,
        (ticks(13) + ticks(14)) / 100.0,
    )
}

fn cpu_secs() -> f64 {
    cpu_times().0
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(p)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Run a shell command; returns wall seconds, CPU seconds of the command, stdout.
fn sh(cmd: &str) -> anyhow::Result<(f64, f64, String)> {
    let t = Instant::now();
    let c0 = cpu_times().1;
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_times().1 - c0;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, cpu, String::from_utf8_lossy(&out.stdout).to_string()))
}

struct Row {
    what: String,
    bytes_in: u64,
    bytes_out: u64,
    secs: f64,
    note: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VZK_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut size_mib = 2048u64;
    let mut work: Option<PathBuf> = None;
    let mut only_vzk_pull = false;
    let mut runs = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--work-dir" => work = Some(args.next().context("--work-dir DIR")?.into()),
            // (b) is close enough to the machine's noise that it is run several times,
            // skopeo and ours alternating, and the medians compared.
            "--runs" => runs = args.next().context("--runs N")?.parse::<usize>()?.max(1),
            // For profiling: push and pull the vzk image only.
            "--only-vzk-pull" => only_vzk_pull = true,
            other => {
                bail!("unknown argument {other:?} (use --size-mib N, --work-dir DIR, --runs N)")
            }
        }
    }
    let tmp = match &work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            tempfile::tempdir_in(w)?
        }
        None => tempfile::Builder::new()
            .prefix("vzk-bench")
            .tempdir_in("/var/tmp")?,
    };
    let root = tmp.path();
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    let size = size_mib << 20;
    eprintln!("generating a {size_mib} MiB disk in {}", src.display());
    let (z, r, t) = make_disk(&src.join("disk.img"), size)?;
    let mut aux = vec![0u8; 32 << 20];
    fill_random(&mut aux[..1 << 20], &mut 7u64);
    std::fs::write(src.join("aux.img"), &aux)?;
    std::fs::write(
        src.join("config.json"),
        r#"{"mediatype":"application/vnd.agoda.macosvz.config.v1+json","os":"darwin","hardwareModelData":"YnBsaXN0MDA=","machineIdData":"YnBsaXN0MDA=","storage":[]}"#,
    )?;
    let disk_sha = sha256_file(&src.join("disk.img"))?;
    let reg_dir = root.join("registry");
    std::fs::create_dir_all(&reg_dir)?;
    let reg = start_registry(&reg_dir)?;
    let plain = RegistryOptions {
        plain_http: true,
        ..Default::default()
    };
    let mut rows = Vec::new();

    // Pushes.
    let mut manifests = Vec::new();
    let formats: &[(&str, Format)] = if only_vzk_pull {
        &[("vzk", Format::Vzk)]
    } else {
        &[("agoda", Format::Agoda), ("vzk", Format::Vzk)]
    };
    for &(tag, format) in formats {
        let reference = Reference::parse(&format!("{}/bench/macos:{tag}", reg.addr))?;
        let opts = PushOptions {
            format,
            registry: plain.clone(),
            work_dir: Some(root.to_path_buf()),
            ..Default::default()
        };
        let t0 = Instant::now();
        let rep = vzk_image::push(&src, &reference, &opts).await?;
        let secs = t0.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!("push {tag} (compress + upload)"),
            bytes_in: rep.uncompressed_bytes,
            bytes_out: rep.compressed_bytes,
            secs,
            note: format!("{} blobs", rep.uploaded_blobs + rep.skipped_blobs),
        });
        let m: Manifest = vzk_image::serde_json::from_slice(&rep.manifest)?;
        manifests.push((tag, reference, m));
    }
    let reg_pid = reg.child.id().to_string();
    let reg_cpu = || cpu_times_of(&reg_pid).0;
    if only_vzk_pull {
        let (_, r, _) = &manifests[0];
        let store = ImageStore::open(root.join("cache-vzk"), u64::MAX)?;
        let (t0, c0, r0) = (Instant::now(), cpu_secs(), reg_cpu());
        let img = store
            .pull(
                r,
                &PullOptions {
                    plain_http: true,
                    ..Default::default()
                },
            )
            .await?;
        println!(
            "vzk pull: {:.2} s, {:.2} CPU-s (the registry: {:.2} CPU-s)",
            t0.elapsed().as_secs_f64(),
            cpu_secs() - c0,
            reg_cpu() - r0
        );
        ensure!(
            sha256_file(&img.disk())? == disk_sha,
            "vzk pull produced a different disk"
        );
        return Ok(());
    }
    let (_, agoda_ref, agoda_m) = &manifests[0];
    let (_, vzk_ref, vzk_m) = &manifests[1];
    let blob_url = |d: &str| format!("http://{}/v2/bench/macos/blobs/{d}", reg.addr);
    let disk_blob = agoda_m
        .layers
        .iter()
        .find(|l| l.media_type == mt::AGODA_DISK)
        .context("disk layer")?;
    let agoda_total: u64 = agoda_m.layers.iter().map(|l| l.size).sum();
    let vzk_total: u64 = vzk_m.layers.iter().map(|l| l.size).sum();

    // (c) transfer floor.
    let (secs, cpu, _) = sh(&format!(
        "curl -sf -o /dev/null {}",
        blob_url(&disk_blob.digest)
    ))?;
    rows.push(Row {
        what: "curl agoda disk blob > /dev/null".into(),
        bytes_in: disk_blob.size,
        bytes_out: 0,
        secs,
        note: format!("floor (a); {cpu:.1} CPU-s"),
    });
    let urls: Vec<String> = vzk_m
        .layers
        .iter()
        .map(|l| format!("-o /dev/null {}", blob_url(&l.digest)))
        .collect();
    let (secs, cpu, _) = sh(&format!("curl -sf {}", urls.join(" ")))?;
    rows.push(Row {
        what: "curl vzk blobs > /dev/null".into(),
        bytes_in: vzk_total,
        bytes_out: 0,
        secs,
        note: format!("floor (b); {cpu:.1} CPU-s"),
    });

    // (a) naive gzip pipeline vs our agoda pull.
    let naive_out = root.join("naive-disk.img");
    let (naive_secs, naive_cpu, out) = sh(&format!(
        "curl -sf {} | gzip -dc | tee {} | sha256sum",
        blob_url(&disk_blob.digest),
        naive_out.display()
    ))?;
    ensure!(
        out.starts_with(&disk_sha),
        "naive pipeline produced a different disk"
    );
    std::fs::remove_file(&naive_out)?;
    rows.push(Row {
        what: "naive: curl \\| gzip -dc \\| tee \\| sha256sum".into(),
        bytes_in: disk_blob.size,
        bytes_out: size,
        secs: naive_secs,
        note: format!("baseline (a); {naive_cpu:.1} CPU-s"),
    });

    let store = ImageStore::open(root.join("cache-agoda"), u64::MAX)?;
    let (t0, c0) = (Instant::now(), cpu_secs());
    let img = store
        .pull(
            agoda_ref,
            &PullOptions {
                plain_http: true,
                ..Default::default()
            },
        )
        .await?;
    let agoda_secs = t0.elapsed().as_secs_f64();
    let agoda_cpu = cpu_secs() - c0;
    ensure!(
        sha256_file(&img.disk())? == disk_sha,
        "agoda pull produced a different disk"
    );
    rows.push(Row {
        what: "vz-kubelet pull agoda (gzip)".into(),
        bytes_in: agoda_total,
        bytes_out: size + aux.len() as u64,
        secs: agoda_secs,
        note: format!(
            "{:.2}x naive time, {:.1}x faster; {agoda_cpu:.1} CPU-s",
            agoda_secs / naive_secs,
            naive_secs / agoda_secs
        ),
    });
    drop(store);
    std::fs::remove_dir_all(root.join("cache-agoda"))?;

    // (b) skopeo vs our vzk pull, alternating, `runs` times each.
    let oci = root.join("oci");
    let (mut skopeo_runs, mut vzk_runs) = (Vec::new(), Vec::new());
    let (mut skopeo_cpu, mut vzk_cpu, mut reg_skopeo, mut reg_vzk) = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..runs {
        let r0 = reg_cpu();
        let (secs, cpu, _) = sh(&format!(
            "skopeo copy -q --src-tls-verify=false docker://{vzk_ref} oci:{}",
            oci.display()
        ))?;
        reg_skopeo += reg_cpu() - r0;
        std::fs::remove_dir_all(&oci)?;
        skopeo_runs.push(secs);
        skopeo_cpu += cpu;

        let store = ImageStore::open(root.join("cache-vzk"), u64::MAX)?;
        let (t0, c0, r0) = (Instant::now(), cpu_secs(), reg_cpu());
        let img = store
            .pull(
                vzk_ref,
                &PullOptions {
                    plain_http: true,
                    ..Default::default()
                },
            )
            .await?;
        vzk_runs.push(t0.elapsed().as_secs_f64());
        vzk_cpu += cpu_secs() - c0;
        reg_vzk += reg_cpu() - r0;
        ensure!(
            sha256_file(&img.disk())? == disk_sha,
            "vzk pull produced a different disk"
        );
        drop(store);
        std::fs::remove_dir_all(root.join("cache-vzk"))?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let n = runs as f64;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let skopeo_secs = median(&mut skopeo_runs);
    let vzk_secs = median(&mut vzk_runs);
    rows.push(Row {
        what: format!("skopeo copy docker:// oci: (vzk image), median of {runs}"),
        bytes_in: vzk_total,
        bytes_out: 0,
        secs: skopeo_secs,
        note: format!(
            "baseline (b); runs {}; {:.1} CPU-s, registry {:.1} CPU-s",
            list(&skopeo_runs),
            skopeo_cpu / n,
            reg_skopeo / n
        ),
    });
    rows.push(Row {
        what: format!("vz-kubelet pull vzk (zstd chunks), median of {runs}"),
        bytes_in: vzk_total,
        bytes_out: size + aux.len() as u64,
        secs: vzk_secs,
        note: format!(
            "{:.2}x skopeo time, {:.2}x faster; runs {}; {:.1} CPU-s, registry {:.1} CPU-s",
            vzk_secs / skopeo_secs,
            skopeo_secs / vzk_secs,
            list(&vzk_runs),
            vzk_cpu / n,
            reg_vzk / n
        ),
    });

    println!(
        "\ndisk: {} MiB ({:.0}% zero, {:.0}% random, {:.0}% text); aux 32 MiB; {} CPUs",
        size_mib,
        100.0 * z as f64 / size as f64,
        100.0 * r as f64 / size as f64,
        100.0 * t as f64 / size as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("\n| what | compressed MB | raw MB | seconds | MB/s compressed | MB/s raw | note |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        let raw = if row.what.starts_with("push") {
            row.bytes_in
        } else {
            row.bytes_out
        };
        let comp = if row.what.starts_with("push") {
            row.bytes_out
        } else {
            row.bytes_in
        };
        println!(
            "| {} | {:.0} | {} | {:.2} | {:.0} | {} | {} |",
            row.what,
            comp as f64 / 1e6,
            if raw > 0 {
                format!("{:.0}", raw as f64 / 1e6)
            } else {
                "-".into()
            },
            row.secs,
            comp as f64 / 1e6 / row.secs,
            if raw > 0 {
                format!("{:.0}", raw as f64 / 1e6 / row.secs)
            } else {
                "-".into()
            },
            row.note
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nload average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "(a) agoda pull: {:.2} s vs naive {:.2} s = {:.2}x the time (goal <= 0.25x, i.e. >= 4x faster)",
        agoda_secs,
        naive_secs,
        agoda_secs / naive_secs
    );
    println!(
        "(b) vzk pull: {:.2} s vs skopeo {:.2} s = {:.2}x the time (goal: >= 1.5x faster)",
        vzk_secs,
        skopeo_secs,
        vzk_secs / skopeo_secs
    );
    Ok(())
}
