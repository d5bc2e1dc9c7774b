//! The provider's command-line flags ([`ProviderArgs`]), flattened into
//! `vz-kubelet run`. Every flag has a `VZK_*` environment variable; the SSH flags keep
//! macos-vz-kubelet's `VZ_SSH_*` names.

use std::path::{Path, PathBuf};

use vzk_image::{HostsError, RegistryHosts};
use vzk_vm::NetworkAttachment;

/// Flags of the VM provider.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderArgs {
    /// Root of the provider's state: `images/` (cache), `pods/<uid>/` (disk clones,
    /// console logs); the hypervisor backend keeps its own state beside them (`qemu/`).
    #[arg(long, env = "VZK_DATA_DIR", default_value = "/var/lib/vz-kubelet")]
    pub data_dir: PathBuf,

    /// At most this many VMs at once (VM slots); extra pods wait Pending.
    #[arg(long, env = "VZK_MAX_VMS", default_value_t = 2)]
    pub max_vms: u32,

    /// VM network: `nat` (agent-owned bridge + DHCP + masquerade) or
    /// `bridged:<iface>` (join an existing bridge).
    #[arg(long, env = "VZK_NETWORK", default_value = "nat", value_parser = parse_network)]
    pub network: NetworkAttachment,

    /// Image cache budget in bytes (least recently used unpinned images are evicted).
    #[arg(long, env = "VZK_IMAGE_CACHE_BYTES", default_value_t = 200 << 30)]
    pub image_cache_bytes: u64,

    /// Registries (`host[:port]`) spoken to over plain HTTP, as `server = "http://…"` in
    /// their `hosts.toml` would (mirrors keep the scheme their `hosts.toml` gives).
    #[arg(
        long = "insecure-registry",
        env = "VZK_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// The node's docker `config.json` with registry credentials, tried after the
    /// pod's `imagePullSecrets`.
    #[arg(long, env = "VZK_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,

    /// VM image registry hosts in containerd's layout: `<dir>/<registry>/hosts.toml`
    /// (mirrors tried in order, CA bundles, client certificates; `_default` for every
    /// registry). Read at start-up: a bad file stops the agent. Default:
    /// /etc/vz-kubelet/certs.d when it exists.
    #[arg(long, env = "VZK_REGISTRY_CONFIG_DIR")]
    pub registry_config_dir: Option<PathBuf>,

    /// Default guest SSH user (a pod's container 0 env `VZ_SSH_USER` overrides it).
    #[arg(long, env = "VZ_SSH_USER")]
    pub ssh_user: Option<String>,

    /// Default guest SSH private key file.
    #[arg(long, env = "VZ_SSH_PRIVATE_KEY_PATH")]
    pub ssh_private_key_path: Option<PathBuf>,

    /// Default guest SSH private key, base64 of its text.
    #[arg(long, env = "VZ_SSH_PRIVATE_KEY_BASE64", hide_env_values = true)]
    pub ssh_private_key_base64: Option<String>,

    /// Default guest SSH password.
    #[arg(long, env = "VZ_SSH_PASSWORD", hide_env_values = true)]
    pub ssh_password: Option<String>,

    /// How long a VM may take from launch to answering SSH before the pod fails.
    #[arg(long, env = "VZK_READY_TIMEOUT_SECS", default_value_t = 300)]
    pub ready_timeout_secs: u64,

    /// Docker is optional on this node (e.g. a Mac without Docker for VM-only pods): when
    /// dockerd does not answer, the DockerReady node condition says so but the node stays
    /// Ready (pods with side-cars wait). By default a silent dockerd makes the node NotReady.
    #[arg(long, env = "VZK_DOCKER_OPTIONAL")]
    pub docker_optional: bool,

    /// vCPUs when neither the pod nor the image says.
    #[arg(long, env = "VZK_DEFAULT_CPUS", default_value_t = 1)]
    pub default_cpus: u32,

    /// Memory in MiB when neither the pod nor the image says.
    #[arg(long, env = "VZK_DEFAULT_MEMORY_MIB", default_value_t = 512)]
    pub default_memory_mib: u64,

    /// Start pods by restoring a booted VM (a template per image and VM shape, made in
    /// the background by the first pod of each) instead of booting them; see
    /// `vzk_provider::templates`. Pods opt out with `vz-kubelet.io/snapshot-start: "false"`.
    #[arg(long, env = "VZK_SNAPSHOT_START")]
    pub snapshot_start: bool,

    /// Templates made ahead of time, when the agent starts (with `--snapshot-start`), so
    /// that even the first pod of an image starts by restore: `IMAGE[,cpu=Q][,memory=Q]`
    /// with the CPU and memory its pods ask for (Kubernetes quantities, as in their
    /// `resources`; left out: what a pod asking for nothing gets). Repeat the flag, or
    /// separate them by `;` in the variable.
    #[arg(
        long = "snapshot-template",
        env = "VZK_SNAPSHOT_TEMPLATES",
        value_delimiter = ';',
        value_parser = TemplateAsk::parse
    )]
    pub snapshot_templates: Vec<TemplateAsk>,

    /// Boot before the download ends: a pod's VM disk is served on demand (NBD, fetched
    /// frame by frame from the registry) while the image downloads in the background.
    /// Needs a vzk image pushed with a frame index and the QEMU backend; others are
    /// pulled in full first. `off`; `opt-in`: pods annotated
    /// `vz-kubelet.io/lazy-disk: "true"`; `on`: every pod but those annotated "false".
    #[arg(long, env = "VZK_LAZY_DISKS", value_enum, default_value_t = LazyDisks::Off)]
    pub lazy_disks: LazyDisks,

    /// Bytes per second a lazy disk's background download may take (0: no limit). The
    /// guest's own reads are never limited and always go first.
    #[arg(long, env = "VZK_LAZY_BACKGROUND_BYTES_PER_SEC", default_value_t = 0)]
    pub lazy_background_rate: u64,
}

/// A template to make ahead of time ([`ProviderArgs::snapshot_templates`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateAsk {
    /// The image, as pods name it.
    pub image: String,
    /// The CPU quantity its pods ask for.
    pub cpu: Option<String>,
    /// The memory quantity its pods ask for.
    pub memory: Option<String>,
}

impl TemplateAsk {
    /// Parses `IMAGE[,cpu=Q][,memory=Q]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<TemplateAsk, String> {
        let mut parts = text.trim().split(',').map(str::trim);
        let image = parts.next().unwrap_or_default();
        vzk_image::Reference::parse(image).map_err(|e| format!("image {image:?}: {e}"))?;
        let mut ask = TemplateAsk {
            image: image.to_owned(),
            cpu: None,
            memory: None,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("cpu", q)) => {
                    crate::resources::parse_cpus(q).map_err(|e| e.to_string())?;
                    ask.cpu = Some(q.to_owned());
                }
                Some(("memory", q)) => {
                    crate::resources::parse_bytes(q).map_err(|e| e.to_string())?;
                    ask.memory = Some(q.to_owned());
                }
                _ => {
                    return Err(format!(
                        "{part:?}: expected cpu=QUANTITY or memory=QUANTITY after the image"
                    ));
                }
            }
        }
        Ok(ask)
    }

    /// The container resources a pod asking for this shape has.
    pub fn resources(&self) -> k8s_openapi::api::core::v1::ResourceRequirements {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let asked: std::collections::BTreeMap<String, Quantity> =
            [("cpu", self.cpu.as_ref()), ("memory", self.memory.as_ref())]
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_owned(), Quantity(v?.clone()))))
                .collect();
        k8s_openapi::api::core::v1::ResourceRequirements {
            limits: (!asked.is_empty()).then(|| asked.clone()),
            requests: (!asked.is_empty()).then_some(asked),
            ..Default::default()
        }
    }
}

/// When pods' disks are served on demand ([`ProviderArgs::lazy_disks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LazyDisks {
    /// Never: every image is pulled in full before its first pod boots.
    #[default]
    Off,
    /// For pods annotated `vz-kubelet.io/lazy-disk: "true"`.
    OptIn,
    /// For every pod but those annotated `vz-kubelet.io/lazy-disk: "false"`.
    On,
}

/// The pod annotation that opts a pod in or out of a lazy disk.
pub const LAZY_DISK_ANNOTATION: &str = "vz-kubelet.io/lazy-disk";

impl LazyDisks {
    /// Whether a pod with these annotations gets a lazy disk.
    pub fn applies(self, annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
        let said = annotations
            .and_then(|a| a.get(LAZY_DISK_ANNOTATION))
            .map(|v| v.trim().to_ascii_lowercase());
        match self {
            LazyDisks::Off => false,
            LazyDisks::OptIn => said.as_deref() == Some("true"),
            LazyDisks::On => said.as_deref() != Some("false"),
        }
    }
}

impl ProviderArgs {
    /// Defaults with `data_dir`, as the flags would give them.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_vms: 2,
            network: NetworkAttachment::Nat,
            image_cache_bytes: 200 << 30,
            insecure_registries: Vec::new(),
            docker_config: None,
            registry_config_dir: None,
            ssh_user: None,
            ssh_private_key_path: None,
            ssh_private_key_base64: None,
            ssh_password: None,
            ready_timeout_secs: 300,
            docker_optional: false,
            default_cpus: 1,
            default_memory_mib: 512,
            snapshot_start: false,
            snapshot_templates: Vec::new(),
            lazy_disks: LazyDisks::Off,
            lazy_background_rate: 0,
        }
    }
}

impl ProviderArgs {
    /// How lazy disks fetch, per the flags.
    pub fn lazy_options(&self) -> vzk_image::LazyOptions {
        vzk_image::LazyOptions {
            background_rate: (self.lazy_background_rate > 0).then_some(self.lazy_background_rate),
            ..Default::default()
        }
    }

    /// The registry hosts configuration: `--registry-config-dir` (which must exist), else
    /// the default directory if there is one.
    pub fn registry_hosts(&self) -> Result<RegistryHosts, HostsError> {
        match &self.registry_config_dir {
            Some(dir) => RegistryHosts::load(dir),
            None => RegistryHosts::load_if_present(Path::new(vzk_image::hosts::DEFAULT_CONFIG_DIR)),
        }
    }
}

/// Parses `nat` or `bridged:<iface>`.
pub fn parse_network(text: &str) -> Result<NetworkAttachment, String> {
    match text.split_once(':') {
        None if text == "nat" => Ok(NetworkAttachment::Nat),
        Some(("bridged", iface)) if !iface.is_empty() => Ok(NetworkAttachment::Bridged {
            interface: iface.to_owned(),
        }),
        _ => Err(format!("expected nat or bridged:<iface>, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProviderArgs,
    }

    #[test]
    fn templates_made_ahead_parse_with_their_shape_and_bad_ones_are_refused() {
        let cli = Cli::try_parse_from([
            "x",
            "--snapshot-template",
            "reg.local:5000/ci/xcode:16,cpu=4,memory=8Gi",
            "--snapshot-template",
            "ghcr.io/a/b@sha256:0123456789012345678901234567890123456789012345678901234567890123",
        ])
        .map(|c| c.args.snapshot_templates)
        .map_err(|e| e.to_string());
        let asks = cli.expect("parses");
        assert_eq!(asks.len(), 2);
        assert_eq!(asks[0].image, "reg.local:5000/ci/xcode:16");
        assert_eq!(
            (asks[0].cpu.as_deref(), asks[0].memory.as_deref()),
            (Some("4"), Some("8Gi"))
        );
        assert_eq!((asks[1].cpu.clone(), asks[1].memory.clone()), (None, None));
        let r = asks[0].resources();
        assert_eq!(r.limits, r.requests);
        assert_eq!(
            r.limits
                .as_ref()
                .and_then(|l| l.get("memory"))
                .map(|q| q.0.as_str()),
            Some("8Gi")
        );
        assert!(asks[1].resources().limits.is_none());
        for (bad, says) in [
            ("reg.local/x:1,cpu=1.5", "1.5"),
            ("reg.local/x:1,memory=lots", "lots"),
            ("reg.local/x:1,gpu=1", "gpu=1"),
            ("UPPER/Case", "UPPER"),
        ] {
            let err = TemplateAsk::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "x",
            "--network",
            "bridged:br0",
            "--insecure-registry",
            "127.0.0.1:5000,reg.local",
            "--registry-config-dir",
            "/etc/vzk/certs.d",
        ]);
        let args = cli.map(|c| c.args).map_err(|e| e.to_string());
        let args = args.as_ref();
        assert_eq!(args.map(|a| a.max_vms), Ok(2));
        assert_eq!(
            args.map(|a| a.network.clone()),
            Ok(NetworkAttachment::Bridged {
                interface: "br0".into()
            })
        );
        assert_eq!(
            args.map(|a| a.insecure_registries.len()),
            Ok(2),
            "comma-separated list"
        );
        assert_eq!(
            args.map(|a| a.registry_config_dir.clone()),
            Ok(Some(PathBuf::from("/etc/vzk/certs.d")))
        );
        assert!(parse_network("bridged:").is_err());
        assert!(parse_network("host").is_err());
    }
}
