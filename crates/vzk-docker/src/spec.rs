//! Pure translation of a Kubernetes container into a Docker container: names, labels,
//! image references, pull policy, `command`/`args` with `$(VAR)` expansion, env, binds,
//! resources.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use k8s_openapi::api::core::v1::Container;
use vzk_core::PodKey;

use crate::error::DockerError;

/// Label: the pod UID a container belongs to.
pub const LABEL_POD_UID: &str = "vz-kubelet.io/pod-uid";
/// Label: the pod namespace.
pub const LABEL_NAMESPACE: &str = "vz-kubelet.io/namespace";
/// Label: the pod name.
pub const LABEL_POD: &str = "vz-kubelet.io/pod";
/// Label: the container name within the pod.
pub const LABEL_CONTAINER: &str = "vz-kubelet.io/container";
/// Label: the node (agent) that owns the container. Cleanup only ever looks at
/// containers carrying this node's name.
pub const LABEL_NODE: &str = "vz-kubelet.io/node";
/// Label: the attempt number (0 for the first run, +1 per restart).
pub const LABEL_ATTEMPT: &str = "vz-kubelet.io/attempt";

/// The image pull policy (Kubernetes `imagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Ask the registry every time.
    Always,
    /// Pull only when the image is not present.
    IfNotPresent,
    /// Never pull; the image must be present.
    Never,
}

impl PullPolicy {
    /// `Always`/`IfNotPresent`/`Never`; when unset (or unknown), Kubernetes' default:
    /// `Always` for `:latest` or an untagged image without digest, else `IfNotPresent`.
    pub fn from_k8s(policy: Option<&str>, image: &str) -> PullPolicy {
        match policy {
            Some("Always") => PullPolicy::Always,
            Some("Never") => PullPolicy::Never,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ => match ImageRef::parse(image) {
                Ok(r) if r.digest.is_none() && r.tag.as_deref().is_none_or(|t| t == "latest") => {
                    PullPolicy::Always
                }
                Ok(_) => PullPolicy::IfNotPresent,
                Err(_) => PullPolicy::Always,
            },
        }
    }
}

/// An image name split the way the Docker pull API wants it: the name as the user
/// spelled it (`busybox`, not `docker.io/library/busybox`), its tag and digest. The
/// grammar is the image crate's ([`vzk_image::Reference`]): one parser for VM and
/// side-car images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Everything before the tag/digest (`127.0.0.1:5000/team/app`, `busybox`).
    pub name: String,
    /// The tag, if given.
    pub tag: Option<String>,
    /// The digest (`sha256:…`), if given.
    pub digest: Option<String>,
    registry: String,
}

impl ImageRef {
    /// Parses `[host[:port]/]path[:tag][@digest]`.
    pub fn parse(image: &str) -> Result<ImageRef, DockerError> {
        let r = vzk_image::Reference::parse(image).map_err(|e| DockerError::InvalidImage {
            image: image.to_owned(),
            reason: match e {
                vzk_image::ImageError::InvalidReference { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        let s = image.trim();
        let rest = s.split_once('@').map_or(s, |(n, _)| n);
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], r.tag),
            None => (rest, None),
        };
        Ok(ImageRef {
            name: name.to_owned(),
            tag,
            digest: r.digest,
            registry: r.registry,
        })
    }

    /// `(fromImage, tag)` for `POST /images/create`: a digest goes into `fromImage`,
    /// a missing tag means `latest` (an empty tag would pull every tag).
    pub fn pull_args(&self) -> (String, String) {
        match &self.digest {
            Some(d) => (format!("{}@{d}", self.name), String::new()),
            None => (
                self.name.clone(),
                self.tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }

    /// The registry host part (`docker.io` when the name has none).
    pub fn registry(&self) -> &str {
        &self.registry
    }
}

/// A host directory or file bound into a side-car (volumes are built by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Path on the host.
    pub host_path: PathBuf,
    /// Path in the container.
    pub container_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What to create: one container of one pod.
#[derive(Debug, Clone)]
pub struct SidecarSpec<'a> {
    /// The pod.
    pub pod: &'a PodKey,
    /// The container, with env already resolved to literal values.
    pub container: &'a Container,
    /// Volume binds.
    pub binds: &'a [Bind],
    /// 0 for the first run, +1 per restart (part of the name and a label).
    pub attempt: u32,
}

/// Docker's name for attempt `attempt` of `container` of `pod`:
/// `vzk_<ns>_<pod>_<container>_<uid8>_<attempt>`.
pub fn container_name(pod: &PodKey, container: &str, attempt: u32) -> String {
    let uid8: String = pod
        .uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!(
        "vzk_{}_{}_{}_{uid8}_{attempt}",
        clean(&pod.namespace),
        clean(&pod.name),
        clean(container)
    )
}

/// The labels that mark a container as ours.
pub fn labels(pod: &PodKey, container: &str, node: &str, attempt: u32) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_POD_UID.to_owned(), pod.uid.clone()),
        (LABEL_NAMESPACE.to_owned(), pod.namespace.clone()),
        (LABEL_POD.to_owned(), pod.name.clone()),
        (LABEL_CONTAINER.to_owned(), container.to_owned()),
        (LABEL_NODE.to_owned(), node.to_owned()),
        (LABEL_ATTEMPT.to_owned(), attempt.to_string()),
    ])
}

pub use vzk_core::expand::expand;

/// CPU quantity (`500m`, `1`, `0.25`) in millicores (rounded up, as Kubernetes does).
pub fn cpu_millis(q: &str) -> Option<i64> {
    vzk_core::quantity::cpu_millis(q)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
}

/// Memory quantity (`64Mi`, `1G`, `128974848`, `129e6`) in bytes (rounded up).
pub fn memory_bytes(q: &str) -> Option<i64> {
    vzk_core::quantity::bytes(q)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
}

/// The Docker create body for `spec` on `node`. Kubernetes semantics: `command`
/// replaces the image's entrypoint, `args` its cmd (with only `args`, the image's
/// entrypoint runs with them); `$(VAR)` is expanded from the container's env.
/// Docker's restart policy stays `no`: the provider restarts per the pod's policy.
pub fn create_body(spec: &SidecarSpec<'_>, node: &str) -> Result<ContainerCreateBody, DockerError> {
    let c = spec.container;
    let image = c
        .image
        .clone()
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| DockerError::InvalidSpec(format!("container {:?} has no image", c.name)))?;
    ImageRef::parse(&image)?;
    let mut vars = HashMap::new();
    let mut env = Vec::new();
    for e in c.env.iter().flatten() {
        if e.value_from.is_some() && e.value.is_none() {
            return Err(DockerError::InvalidSpec(format!(
                "env {:?} of container {:?} is not resolved",
                e.name, c.name
            )));
        }
        let v = e.value.clone().unwrap_or_default();
        env.push(format!("{}={v}", e.name));
        vars.insert(e.name.clone(), v);
    }
    let exp = |v: &Option<Vec<String>>| {
        v.as_ref()
            .map(|l| l.iter().map(|s| expand(s, &vars)).collect::<Vec<_>>())
    };
    let entrypoint = exp(&c.command);
    let mut cmd = exp(&c.args);
    if entrypoint.is_some() && cmd.is_none() {
        // `command` without `args` must not run the image's CMD as arguments.
        cmd = Some(Vec::new());
    }
    let binds: Vec<String> = spec
        .binds
        .iter()
        .map(|b| {
            if b.container_path.contains(':') || b.host_path.to_string_lossy().contains(':') {
                return Err(DockerError::InvalidSpec(format!(
                    "bind {} -> {}: paths with ':' cannot be bound",
                    b.host_path.display(),
                    b.container_path
                )));
            }
            Ok(format!(
                "{}:{}{}",
                b.host_path.display(),
                b.container_path,
                if b.read_only { ":ro" } else { "" }
            ))
        })
        .collect::<Result<_, _>>()?;
    let mut host = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    if let Some(r) = &c.resources {
        let get =
            |m: &Option<
                std::collections::BTreeMap<
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                >,
            >,
             k: &str| { m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()) };
        let bad = |what: &str, v: &str| {
            DockerError::InvalidSpec(format!(
                "{what} {v:?} of container {:?} is not a quantity",
                c.name
            ))
        };
        if let Some(v) = get(&r.limits, "memory") {
            host.memory = Some(memory_bytes(&v).ok_or_else(|| bad("memory limit", &v))?);
        }
        if let Some(v) = get(&r.limits, "cpu") {
            let m = cpu_millis(&v).ok_or_else(|| bad("cpu limit", &v))?;
            host.nano_cpus = Some(m * 1_000_000);
        }
        if let Some(v) = get(&r.requests, "cpu") {
            let m = cpu_millis(&v).ok_or_else(|| bad("cpu request", &v))?;
            // The kubelet's shares: 1024 per core, at least 2.
            host.cpu_shares = Some((m * 1024 / 1000).max(2));
        }
    }
    let tty = c.tty.unwrap_or(false);
    let stdin = c.stdin.unwrap_or(false);
    let hostname: String = spec.pod.name.chars().take(63).collect();
    Ok(ContainerCreateBody {
        image: Some(image),
        entrypoint,
        cmd,
        env: Some(env),
        working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
        tty: Some(tty),
        open_stdin: Some(stdin),
        stdin_once: Some(stdin && c.stdin_once.unwrap_or(false)),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        hostname: Some(hostname.trim_end_matches('-').to_owned()),
        labels: Some(labels(spec.pod, &c.name, node, spec.attempt)),
        host_config: Some(host),
        ..Default::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    fn key() -> PodKey {
        PodKey {
            namespace: "ns".into(),
            name: "web-1".into(),
            uid: "0b7c6a7e-6f1e-4c39-9f67-2d2b6f0b1a11".into(),
        }
    }

    #[test]
    fn names_and_labels_identify_the_pod_and_attempt() {
        assert_eq!(
            container_name(&key(), "side", 2),
            "vzk_ns_web-1_side_0b7c6a7e_2"
        );
        let l = labels(&key(), "side", "node-a", 1);
        assert_eq!(l[LABEL_POD_UID], key().uid);
        assert_eq!(l[LABEL_NODE], "node-a");
        assert_eq!(l[LABEL_ATTEMPT], "1");
    }

    #[test]
    fn pull_policy_defaults_follow_kubernetes() {
        use PullPolicy::*;
        assert_eq!(PullPolicy::from_k8s(None, "busybox"), Always);
        assert_eq!(PullPolicy::from_k8s(None, "busybox:latest"), Always);
        assert_eq!(
            PullPolicy::from_k8s(None, "127.0.0.1:5000/bb:v1"),
            IfNotPresent
        );
        assert_eq!(PullPolicy::from_k8s(Some(""), "127.0.0.1:5000/bb"), Always);
        assert_eq!(
            PullPolicy::from_k8s(None, &format!("bb@sha256:{}", "a".repeat(64))),
            IfNotPresent
        );
        assert_eq!(PullPolicy::from_k8s(Some("Never"), "bb"), Never);
    }

    #[test]
    fn image_refs_split_for_the_pull_api() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!(
            r.pull_args(),
            ("127.0.0.1:5000/team/app".into(), "latest".into())
        );
        assert_eq!(r.registry(), "127.0.0.1:5000");
        let r = ImageRef::parse("busybox:1.36").unwrap();
        assert_eq!(r.pull_args(), ("busybox".into(), "1.36".into()));
        assert_eq!(r.registry(), "docker.io");
        let d = format!("sha256:{}", "b".repeat(64));
        let r = ImageRef::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!(r.pull_args(), (format!("localhost/x@{d}"), String::new()));
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("Bad/Name").is_err());
        assert!(ImageRef::parse("a:b:c").is_err());
        assert!(ImageRef::parse("x@sha256:12").is_err());
    }

    #[test]
    fn expansion_is_the_kubelets() {
        let vars = HashMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("cost $5", &vars), "cost $5");
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(cpu_millis("x"), None);
        assert_eq!(memory_bytes("64Mi"), Some(64 << 20));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("129e6"), Some(129_000_000));
        assert_eq!(memory_bytes("-1"), None);
    }

    #[test]
    fn command_is_entrypoint_and_args_are_cmd() {
        let c = Container {
            name: "side".into(),
            image: Some("127.0.0.1:5000/bb:v1".into()),
            command: Some(vec!["/bin/sh".into(), "-c".into()]),
            args: Some(vec!["echo $(GREETING)".into()]),
            env: Some(vec![EnvVar {
                name: "GREETING".into(),
                value: Some("hi".into()),
                ..Default::default()
            }]),
            working_dir: Some("/tmp".into()),
            tty: Some(true),
            stdin: Some(true),
            stdin_once: Some(true),
            resources: Some(ResourceRequirements {
                limits: Some(
                    [
                        ("memory".to_owned(), Quantity("64Mi".into())),
                        ("cpu".to_owned(), Quantity("250m".into())),
                    ]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let binds = [Bind {
            host_path: "/srv/data".into(),
            container_path: "/data".into(),
            read_only: true,
        }];
        let pod = key();
        let spec = SidecarSpec {
            pod: &pod,
            container: &c,
            binds: &binds,
            attempt: 0,
        };
        let b = create_body(&spec, "node-a").unwrap();
        assert_eq!(b.entrypoint.unwrap(), ["/bin/sh", "-c"]);
        assert_eq!(b.cmd.unwrap(), ["echo hi"]);
        assert_eq!(b.env.unwrap(), ["GREETING=hi"]);
        assert_eq!(b.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(
            (b.tty, b.open_stdin, b.stdin_once),
            (Some(true), Some(true), Some(true))
        );
        let h = b.host_config.unwrap();
        assert_eq!(h.binds.unwrap(), ["/srv/data:/data:ro"]);
        assert_eq!(h.memory, Some(64 << 20));
        assert_eq!(h.nano_cpus, Some(250_000_000));
        assert_eq!(
            h.restart_policy.and_then(|r| r.name),
            Some(RestartPolicyNameEnum::NO)
        );
        // command without args: the image's CMD must not be appended.
        let c2 = Container {
            args: None,
            ..c.clone()
        };
        let spec = SidecarSpec {
            container: &c2,
            ..spec
        };
        assert_eq!(create_body(&spec, "n").unwrap().cmd, Some(vec![]));
        // no image: a clear error.
        let c3 = Container {
            image: None,
            ..c.clone()
        };
        let spec = SidecarSpec {
            container: &c3,
            ..spec
        };
        assert!(matches!(
            create_body(&spec, "n"),
            Err(DockerError::InvalidSpec(_))
        ));
    }
}
