//! The per-pod record on disk (`pods/<uid>/pod.json`, mode 0600): what a restarted
//! agent needs to re-adopt a running VM as a pod (its key, spec and start time).
//!
//! Resolved env values can be secrets: the record keeps only container 0's `VZ_SSH_*`
//! variables (needed to reach the guest again) and drops every other env value (init
//! containers' too).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use vzk_core::PodKey;

/// What is persisted per pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// The pod (env stripped as described above).
    pub pod: Pod,
    /// RFC 3339 time the provider accepted the pod.
    pub start_time: String,
}

impl PodRecord {
    /// A record of `pod` for `key`, with env stripped.
    pub fn new(key: &PodKey, pod: &Pod, start_time: String) -> Self {
        let mut pod = pod.clone();
        if let Some(spec) = pod.spec.as_mut() {
            for (i, c) in spec.containers.iter_mut().enumerate() {
                c.env_from = None;
                match c.env.as_mut() {
                    Some(env) if i == 0 => env.retain(|e| e.name.starts_with("VZ_SSH_")),
                    _ => c.env = None,
                }
            }
            for c in spec.init_containers.iter_mut().flatten() {
                c.env = None;
                c.env_from = None;
            }
        }
        pod.metadata.managed_fields = None;
        Self {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: key.uid.clone(),
            pod,
            start_time,
        }
    }

    /// The pod key.
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    /// Writes the record to `path` (0600).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&json)
    }

    /// Reads the record at `path`.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// The file of a pod's VM history in its directory.
const HISTORY: &str = "history.json";

/// Keeps the VM's `restartCount` and `lastState` in the pod's directory (written to a
/// temporary file and renamed, so a crash leaves the old or the new one).
pub fn save_history(dir: &Path, history: &crate::status::VmHistory) -> std::io::Result<()> {
    let json = serde_json::to_vec(history).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{HISTORY}.tmp"));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join(HISTORY))
}

/// The VM history kept by [`save_history`]; empty when there is none or it is unreadable.
pub fn load_history(dir: &Path) -> crate::status::VmHistory {
    std::fs::read(dir.join(HISTORY))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};

    use super::*;

    #[test]
    fn records_keep_only_ssh_env_and_round_trip() {
        let env = |n: &str| EnvVar {
            name: n.into(),
            value: Some("v".into()),
            ..Default::default()
        };
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    Container {
                        name: "vm".into(),
                        env: Some(vec![env("VZ_SSH_USER"), env("DB_PASSWORD")]),
                        ..Default::default()
                    },
                    Container {
                        name: "side".into(),
                        env: Some(vec![env("VZ_SSH_USER")]),
                        ..Default::default()
                    },
                ],
                init_containers: Some(vec![Container {
                    name: "init".into(),
                    env: Some(vec![env("DB_PASSWORD")]),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let key = PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let r = PodRecord::new(&key, &pod, "2026-01-01T00:00:00Z".into());
        let dir = tempfile::tempdir().ok();
        let path = dir.as_ref().map(|d| d.path().join("pod.json"));
        let back = path
            .as_deref()
            .and_then(|p| r.save(p).ok().and_then(|()| PodRecord::load(p).ok()));
        let back = back.map(|b| {
            let key = b.key();
            let spec = b.pod.spec.unwrap_or_default();
            (key, spec.containers, spec.init_containers)
        });
        let Some((k, cs, init)) = back else {
            panic!("round trip failed")
        };
        assert!(init.unwrap_or_default().iter().all(|c| c.env.is_none()));
        assert_eq!(k, key);
        let names: Vec<_> = cs[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names, ["VZ_SSH_USER"]);
        assert!(cs[1].env.is_none());
    }

    #[test]
    fn vm_history_survives_on_disk_and_junk_reads_as_none() {
        use k8s_openapi::api::core::v1::ContainerStateTerminated;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            load_history(dir.path()),
            crate::status::VmHistory::default()
        );
        let h = crate::status::VmHistory {
            restart_count: 3,
            last_state: Some(ContainerStateTerminated {
                exit_code: 137,
                reason: Some("Error".into()),
                message: Some("Container vm failed liveness probe".into()),
                ..Default::default()
            }),
            started: true,
        };
        save_history(dir.path(), &h).expect("save");
        let back = load_history(dir.path());
        assert_eq!(back.restart_count, 3);
        assert_eq!(back.last_state, h.last_state);
        assert!(
            !back.started,
            "the startup probe runs again for an adopted VM"
        );
        std::fs::write(dir.path().join(HISTORY), b"{not json").expect("write");
        assert_eq!(
            load_history(dir.path()),
            crate::status::VmHistory::default()
        );
    }
}
