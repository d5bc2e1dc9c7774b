//! `vz-kubelet image …`: push, pull, import, convert, list, inspect, remove and prune VM
//! images.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use vzk_image::convert::{Destination, Source};
use vzk_image::hosts::{self, RegistryHosts};
use vzk_image::manifest::{self, Format};
use vzk_image::push::AgodaLayout;
use vzk_image::registry::Registry;
use vzk_image::serde_json;
use vzk_image::{
    Credentials, ImageStore, Keyring, Progress, PullOptions, PullPolicy, PushOptions, Reference,
    RegistryOptions,
};

/// `vz-kubelet image` flags.
#[derive(Debug, Args)]
pub(crate) struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
    /// The image cache directory.
    #[arg(long, global = true, env = "VZK_IMAGE_ROOT")]
    root: Option<PathBuf>,
    /// Cache size budget, e.g. `200G` (least recently used, unpinned images go first).
    #[arg(long, global = true, env = "VZK_IMAGE_BUDGET", value_parser = parse_size)]
    budget: Option<u64>,
    /// Talk plain HTTP to the registry (automatic for localhost and loopback addresses);
    /// mirrors keep the scheme their hosts.toml gives.
    #[arg(long, global = true)]
    plain_http: bool,
    /// Accept any TLS certificate (from every host whose hosts.toml does not set
    /// `skip_verify`).
    #[arg(long, global = true)]
    insecure: bool,
    /// Registry user name.
    #[arg(long, global = true, env = "VZK_REGISTRY_USERNAME")]
    username: Option<String>,
    /// Registry password.
    #[arg(
        long,
        global = true,
        env = "VZK_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Docker config with registry credentials (default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    #[arg(long, global = true)]
    docker_config: Option<PathBuf>,
    /// Registry hosts configuration in containerd's layout: `<dir>/<registry>/hosts.toml`
    /// with mirrors, CA bundles, client certificates (`_default` for every registry).
    /// Default: /etc/vz-kubelet/certs.d when it exists.
    #[arg(long, global = true, env = "VZK_REGISTRY_CONFIG_DIR")]
    registry_config_dir: Option<PathBuf>,
    /// Output of `ls`, `inspect`, `push`, `pull`, `prune`.
    #[arg(long, short, global = true, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FormatArg {
    /// vz-kubelet's chunked zstd format (parallel, resumable, sparse pulls).
    Vzk,
    /// macOS-vz-kubelet's format (one gzip layer per file).
    Agoda,
    /// Tart's format (512 MiB Apple LZ4 chunks), which `tart pull` takes.
    Tart,
}

impl FormatArg {
    fn format(self) -> Format {
        match self {
            FormatArg::Vzk => Format::Vzk,
            FormatArg::Agoda => Format::Agoda,
            FormatArg::Tart => Format::Tart,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OsArg {
    Darwin,
    Linux,
}

/// What `image push` and `image convert` share.
#[derive(Debug, Args)]
struct PushFlags {
    /// Image format.
    #[arg(long, value_enum, default_value = "vzk")]
    format: FormatArg,
    /// Chunk size in MiB (default 64 for vzk; 512 for Tart, as Tart cuts).
    #[arg(long)]
    chunk_size_mib: Option<u64>,
    /// Blobs compressed and uploaded at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// agoda: put config.json in the manifest config (the e2e helper's layout) instead of a layer.
    #[arg(long)]
    config_as_config: bool,
    /// vzk: leave out the disk's frame index (lazy disks need it; agents older than it
    /// refuse images that carry it).
    #[arg(long)]
    no_frame_index: bool,
    /// Extra tags for the same manifest.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PolicyArg {
    Always,
    IfNotPresent,
    Never,
}

impl PolicyArg {
    fn policy(self) -> PullPolicy {
        match self {
            PolicyArg::Always => PullPolicy::Always,
            PolicyArg::IfNotPresent => PullPolicy::IfNotPresent,
            PolicyArg::Never => PullPolicy::Never,
        }
    }
}

#[derive(Debug, Subcommand)]
enum CreateCommand {
    /// A macOS image from a restore image (IPSW), on a Mac with Apple silicon: checks
    /// that this Mac supports the image's hardware model, creates the disk, auxiliary
    /// storage and machine identifier, runs Apple's installer, and writes an image
    /// directory to push. A URL is downloaded once into the cache (`ipsw/`).
    Macos {
        /// The restore image: a path, or an `https://` URL.
        #[arg(long)]
        ipsw: String,
        /// The image directory to make (must not exist).
        dest: PathBuf,
        /// Disk size, e.g. `100G` (default 80G; at least 32G).
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// vCPUs (default: the image's minimum).
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. `8G` (default: the image's minimum).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Push an image directory (config.json + disk.img [+ aux.img | kernel, initrd]).
    Push {
        /// The image directory.
        dir: PathBuf,
        /// Where to push, e.g. `registry:5000/macos:sonoma`, or an OCI image layout
        /// `oci:PATH[:TAG]`.
        reference: String,
        #[command(flatten)]
        push: PushFlags,
    },
    /// Make an image directory from a Tart VM directory, a macosvm bundle (its JSON
    /// spec, disk and aux images), or a raw disk (`--raw` with the flags below); then
    /// `image push` it.
    Import {
        /// The Tart VM directory, the macosvm bundle or spec, or with `--raw` the disk.
        source: PathBuf,
        /// The image directory to make (must not exist, or be empty).
        dest: PathBuf,
        /// SOURCE is a raw disk image.
        #[arg(long)]
        raw: bool,
        /// Raw: the guest OS.
        #[arg(long, value_enum, default_value = "linux", requires = "raw")]
        os: OsArg,
        /// Raw: `arm64` or `amd64` (default: arm64 for macOS, amd64 for Linux).
        #[arg(long, requires = "raw")]
        arch: Option<String>,
        /// Raw: the auxiliary storage (macOS) or EFI variable store (Linux).
        #[arg(long, requires = "raw")]
        aux: Option<PathBuf>,
        /// Raw, Linux: a kernel for direct boot.
        #[arg(long, requires = "raw")]
        kernel: Option<PathBuf>,
        /// Raw, Linux: an initrd for direct boot.
        #[arg(long, requires = "raw")]
        initrd: Option<PathBuf>,
        /// Raw, Linux: the kernel command line.
        #[arg(long, requires = "raw")]
        cmdline: Option<String>,
        /// Raw: default vCPUs.
        #[arg(long, requires = "raw")]
        cpus: Option<u32>,
        /// Raw: default memory, e.g. `4G`.
        #[arg(long, requires = "raw", value_parser = parse_size)]
        memory: Option<u64>,
        /// Raw, macOS: base64 of the hardware model's data representation.
        #[arg(long, requires = "raw")]
        hardware_model: Option<String>,
        /// Raw, macOS: base64 of the machine identifier's data representation.
        #[arg(long, requires = "raw")]
        machine_id: Option<String>,
    },
    /// Make an image from scratch.
    Create {
        #[command(subcommand)]
        what: CreateCommand,
    },
    /// Copy an image from one reference to another in a format of choice (agoda ↔ vzk ↔
    /// Tart), through the cache: the content is pulled and verified, pushed, and the
    /// destination's manifest checked against it part by part.
    Convert {
        /// Source reference, or an OCI image layout `oci:PATH[:TAG]`.
        source: String,
        /// Destination reference, or an OCI image layout `oci:PATH[:TAG]`.
        dest: String,
        #[command(flatten)]
        push: PushFlags,
        /// Pull policy for the source.
        #[arg(long, value_enum, default_value = "if-not-present")]
        policy: PolicyArg,
        /// Skip re-hashing the content against the destination's manifest.
        #[arg(long)]
        no_verify: bool,
    },
    /// Pull an image into the cache and print its directory.
    Pull {
        /// Image reference.
        reference: String,
        /// Pull policy.
        #[arg(long, value_enum, default_value = "always")]
        policy: PolicyArg,
        /// Parts downloaded at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// List cached images.
    Ls,
    /// Show an image: the cached copy, or the registry's manifest with `--remote`.
    Inspect {
        /// Image reference.
        reference: String,
        /// Ask the registry even if the image is cached.
        #[arg(long)]
        remote: bool,
    },
    /// Remove a tag from the cache (and the image when nothing else refers to it).
    Rm {
        /// Image reference.
        reference: String,
    },
    /// Remove untagged images and garbage-collect to the budget.
    Prune,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                u => return Err(format!("unknown unit {u:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    Ok((n * mult as f64) as u64)
}

fn default_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                let h = PathBuf::from(h);
                if cfg!(target_os = "macos") {
                    h.join("Library/Caches")
                } else {
                    h.join(".cache")
                }
            })
        });
    base.unwrap_or_else(std::env::temp_dir)
        .join("vz-kubelet/images")
}

fn is_local(r: &Reference) -> bool {
    let host = r
        .registry
        .rsplit_once(':')
        .map_or(r.registry.as_str(), |(h, _)| h);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ImageArgs {
    /// The docker config's credentials: for the image's registry (unless `--username`
    /// gives them) and for mirrors, by their own names.
    fn keyring(&self) -> anyhow::Result<Keyring> {
        let path = match &self.docker_config {
            Some(p) => p.clone(),
            None => std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .unwrap_or_default()
                .join("config.json"),
        };
        Ok(Keyring::from_docker_config_file(&path)?)
    }

    /// The registry hosts configuration; a bad file stops the command, naming it.
    fn hosts(&self) -> anyhow::Result<RegistryHosts> {
        let loaded = match &self.registry_config_dir {
            Some(dir) => RegistryHosts::load(dir),
            None => RegistryHosts::load_if_present(Path::new(hosts::DEFAULT_CONFIG_DIR)),
        };
        loaded.context("invalid registry configuration")
    }

    fn registry_options(&self, r: &Reference) -> anyhow::Result<RegistryOptions> {
        let keyring = self.keyring()?;
        let credentials = match &self.username {
            Some(u) => vec![Credentials::basic(
                u,
                self.password.clone().unwrap_or_default(),
            )],
            None => keyring.lookup(r),
        };
        Ok(RegistryOptions {
            credentials,
            plain_http: self.plain_http || is_local(r),
            insecure: self.insecure,
            hosts: self.hosts()?,
            keyring,
        })
    }

    /// Registry access for a registry destination; nothing for a layout.
    fn destination_options(&self, d: &Destination) -> anyhow::Result<RegistryOptions> {
        match d {
            Destination::Registry(r) => self.registry_options(r),
            Destination::Layout(_) => Ok(RegistryOptions::default()),
        }
    }

    fn pull_options(
        &self,
        r: &Reference,
        policy: PolicyArg,
        concurrency: usize,
    ) -> anyhow::Result<PullOptions> {
        let reg = self.registry_options(r)?;
        Ok(PullOptions {
            credentials: reg.credentials,
            policy: policy.policy(),
            plain_http: reg.plain_http,
            insecure: reg.insecure,
            hosts: reg.hosts,
            keyring: reg.keyring,
            concurrency,
            progress: Some(progress()),
        })
    }

    fn store(&self) -> anyhow::Result<ImageStore> {
        let root = self.root.clone().unwrap_or_else(default_root);
        ImageStore::open(&root, self.budget.unwrap_or(u64::MAX))
            .with_context(|| format!("cannot open the image cache at {}", root.display()))
    }
}

/// A bar on a terminal, JSON lines on stderr otherwise.
fn progress() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(vzk_image::progress::BarProgress::new())
    } else {
        Arc::new(vzk_image::progress::JsonLinesProgress::default())
    }
}

impl PushFlags {
    fn options(&self, registry: RegistryOptions, work_dir: PathBuf) -> PushOptions {
        let format = self.format.format();
        let default_chunk = if format == Format::Tart {
            vzk_image::media_types::TART_CHUNK_SIZE
        } else {
            vzk_image::media_types::DEFAULT_CHUNK_SIZE
        };
        let mut opts = PushOptions {
            format,
            agoda_layout: if self.config_as_config {
                AgodaLayout::ConfigAsConfig
            } else {
                AgodaLayout::EmptyConfig
            },
            chunk_size: self
                .chunk_size_mib
                .map_or(default_chunk, |m| m.max(1) << 20),
            registry,
            work_dir: Some(work_dir),
            extra_tags: self.tags.clone(),
            progress: Some(progress()),
            frame_index: !self.no_frame_index,
            ..Default::default()
        };
        if let Some(c) = self.concurrency {
            opts.concurrency = c;
        }
        opts
    }
}

fn print_push(r: &impl std::fmt::Display, report: &vzk_image::PushReport, secs: f64) {
    println!(
        "pushed {r}@{} ({} in {} blobs, {} uploaded, {} already there) in {secs:.1}s, {:.0} MB/s",
        report.digest,
        human(report.compressed_bytes),
        report.uploaded_blobs + report.skipped_blobs,
        report.uploaded_blobs,
        report.skipped_blobs,
        report.uncompressed_bytes as f64 / secs / 1e6
    );
}

fn print_json(v: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Run `vz-kubelet image …`.
pub(crate) async fn run(args: ImageArgs) -> anyhow::Result<()> {
    match &args.command {
        ImageCommand::Push {
            dir,
            reference,
            push,
        } => {
            let r = Destination::parse(reference)?;
            let store_tmp = args.store()?.root().join("tmp");
            let opts = push.options(args.destination_options(&r)?, store_tmp);
            let started = std::time::Instant::now();
            let report = vzk_image::push::push_to(dir, &r, &opts)
                .await
                .with_context(|| format!("push {r}"))?;
            let secs = started.elapsed().as_secs_f64();
            if args.output == Output::Json {
                print_json(serde_json::to_value(&report)?)?;
            } else {
                print_push(&r, &report, secs);
            }
        }
        ImageCommand::Import {
            source,
            dest,
            raw,
            os,
            arch,
            aux,
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            hardware_model,
            machine_id,
        } => {
            use vzk_image::import::{ImportSource, RawImport};
            let src = if *raw {
                ImportSource::Raw(RawImport {
                    disk: source.clone(),
                    os: match os {
                        OsArg::Darwin => vzk_image::GuestOs::Darwin,
                        OsArg::Linux => vzk_image::GuestOs::Linux,
                    },
                    arch: arch.clone(),
                    aux: aux.clone(),
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    kernel_cmdline: cmdline.clone(),
                    cpus: *cpus,
                    memory_bytes: *memory,
                    hardware_model_data: hardware_model.clone(),
                    machine_id_data: machine_id.clone(),
                })
            } else {
                ImportSource::detect(source)?
            };
            let (dest, p) = (dest.clone(), progress());
            let report =
                tokio::task::spawn_blocking(move || vzk_image::import::import(&src, &dest, &*p))
                    .await
                    .context("the import stopped")?
                    .with_context(|| format!("import {}", source.display()))?;
            if args.output == Output::Json {
                print_json(serde_json::to_value(&report)?)?;
            } else {
                let files: Vec<String> = report
                    .files
                    .iter()
                    .map(|f| format!("{} ({}, {})", f.name, human(f.size), f.how))
                    .collect();
                println!(
                    "imported a {} {} VM into {}: {}",
                    report.kind,
                    report.config.os.as_str(),
                    report.dir.display(),
                    files.join(", ")
                );
            }
        }
        ImageCommand::Create {
            what:
                CreateCommand::Macos {
                    ipsw,
                    dest,
                    disk_size,
                    cpus,
                    memory,
                },
        } => {
            let store = args.store()?;
            let created = super::create::macos(
                super::create::CreateMacos {
                    ipsw,
                    dest,
                    request: vzk_image::create::MacosRequest {
                        disk_bytes: *disk_size,
                        cpus: *cpus,
                        memory_bytes: *memory,
                    },
                    cache: store.root(),
                },
                progress(),
            )
            .await?;
            if args.output == Output::Json {
                print_json(serde_json::json!({
                    "dir": created.dir, "version": created.version, "config": created.config,
                }))?;
            } else {
                println!(
                    "created macOS {} in {} ({} vCPU, {} MiB): push it with `vz-kubelet image push {} REGISTRY/NAME:TAG`",
                    created.version,
                    created.dir.display(),
                    created.config.cpus.unwrap_or(0),
                    created.config.memory_bytes.unwrap_or(0) >> 20,
                    created.dir.display()
                );
            }
        }
        ImageCommand::Convert {
            source,
            dest,
            push,
            policy,
            no_verify,
        } => {
            let (src, dst) = (Source::parse(source)?, Destination::parse(dest)?);
            let store = args.store()?;
            let pull = match &src {
                Source::Registry(r) => args.pull_options(r, *policy, 4)?,
                Source::Layout(_) => PullOptions::default(),
            };
            let opts = push.options(args.destination_options(&dst)?, store.root().join("tmp"));
            let started = std::time::Instant::now();
            let report = vzk_image::convert::convert(&store, &src, &pull, &dst, &opts, !no_verify)
                .await
                .with_context(|| format!("convert {src} to {dst}"))?;
            let secs = started.elapsed().as_secs_f64();
            if args.output == Output::Json {
                print_json(serde_json::to_value(&report)?)?;
            } else {
                println!(
                    "converted {src} ({}) to {dst} ({})",
                    report.source_format.as_str(),
                    opts.format.as_str()
                );
                print_push(&dst, &report.push, secs);
                if let Some(v) = &report.verified {
                    println!(
                        "verified: {} files, {} parts, {} of content identical to {src}",
                        v.files,
                        v.parts,
                        human(v.bytes)
                    );
                }
            }
        }
        ImageCommand::Pull {
            reference,
            policy,
            concurrency,
        } => {
            let r = Reference::parse(reference)?;
            let store = args.store()?;
            let opts = args.pull_options(&r, *policy, *concurrency)?;
            let img = store
                .pull(&r, &opts)
                .await
                .with_context(|| format!("pull {r}"))?;
            if args.output == Output::Json {
                print_json(serde_json::json!({
                    "reference": img.reference, "digest": img.digest, "dir": img.dir,
                    "format": img.format, "config": img.config,
                }))?;
            } else {
                println!("{}", img.dir.display());
            }
        }
        ImageCommand::Ls => {
            let list = args.store()?.list()?;
            if args.output == Output::Json {
                return print_json(serde_json::to_value(&list)?);
            }
            println!(
                "{:<50} {:<19} {:<6} {:>10} {:>10} PINNED",
                "REFERENCE", "DIGEST", "FORMAT", "SIZE", "ON DISK"
            );
            for i in list {
                let refs = if i.references.is_empty() {
                    vec!["<none>".to_string()]
                } else {
                    i.references.clone()
                };
                for r in refs {
                    println!(
                        "{:<50} {:<19} {:<6} {:>10} {:>10} {}",
                        r,
                        &i.digest[..i.digest.len().min(19)],
                        i.format.as_str(),
                        human(i.size),
                        human(i.disk_usage),
                        if i.pinned { "yes" } else { "" }
                    );
                }
            }
        }
        ImageCommand::Inspect { reference, remote } => {
            let r = Reference::parse(reference)?;
            let store = args.store()?;
            if !remote && let Some(img) = store.get(&r)? {
                let m = std::fs::read(img.dir.join("manifest.json"))?;
                let m: serde_json::Value = serde_json::from_slice(&m)?;
                return print_json(serde_json::json!({
                    "reference": img.reference, "digest": img.digest, "dir": img.dir,
                    "format": img.format, "config": img.config, "manifest": m,
                }));
            }
            let reg = Registry::new(&r, &args.registry_options(&r)?, false)?;
            let fetched = reg.get_manifest(r.manifest_ref()).await?;
            let m = manifest::parse_manifest(&fetched.bytes, &r.to_string())?;
            let plan = manifest::plan(&m, &r.to_string())?;
            let raw: serde_json::Value = serde_json::from_slice(&fetched.bytes)?;
            print_json(serde_json::json!({
                "reference": r.to_string(), "digest": fetched.digest, "format": plan.format,
                "compressedSize": plan.compressed_size(), "uncompressedSize": plan.uncompressed_size(),
                "files": plan.files.iter().map(|f| serde_json::json!({
                    "file": f.role.file_name(), "size": f.size, "parts": f.parts.len()})).collect::<Vec<_>>(),
                "manifest": raw,
            }))?;
        }
        ImageCommand::Rm { reference } => {
            let r = Reference::parse(reference)?;
            if !args.store()?.remove(&r)? {
                bail!("{r} is not in the cache");
            }
            if args.output == Output::Text {
                println!("removed {r}");
            }
        }
        ImageCommand::Prune => {
            let report = args.store()?.prune()?;
            if args.output == Output::Json {
                return print_json(serde_json::to_value(&report)?);
            }
            println!(
                "removed {} image(s), freed {}, {} in use",
                report.removed.len(),
                human(report.freed),
                human(report.remaining)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("200G"), Ok(200 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("3X").is_err());
    }
}
