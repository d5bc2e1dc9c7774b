//! Resolving container environment variables as the kubelet does, before a pod reaches
//! the provider: `valueFrom` (configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef),
//! `envFrom` (with prefix), and `$(VAR)` expansion.
//!
//! Only the Secrets and ConfigMaps a pod names are read, one `GET` each (the Node
//! authorizer allows exactly that); nothing is listed or watched.
//!
//! Every missing object or key, failed read and skipped `envFrom` key is also pushed as a
//! [`RefProblem`], which the pod controller reports as a Warning event with
//! virtual-kubelet's reason (`OptionalSecretNotFound`, `MandatoryConfigMapKeyNotFound`,
//! …). An optional reference to a missing object or key is skipped (the var is omitted,
//! the `envFrom` source ignored), as the kubelet does; a read that fails blocks the pod
//! whether or not the reference is optional (the kubelet's rule too).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

use crate::quantity;
use crate::volumes::ObjectReader;
use crate::volumes::sources::{ObjectKind, Problem, RefProblem};

/// Why a container's environment could not be resolved. The pod stays Pending with
/// reason `CreateContainerConfigError` and this message, as with the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A referenced ConfigMap or Secret does not exist (and the reference is not optional).
    #[error("{kind} {name:?} not found")]
    ObjectNotFound {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// A referenced key is missing (and the reference is not optional).
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyNotFound {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// The missing key.
        key: String,
    },
    /// Reading a referenced object failed (e.g. the API server refused).
    #[error("reading {kind} {name:?}")]
    Fetch {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A `fieldRef` path that is not supported.
    #[error("unsupported fieldRef {0:?}")]
    UnsupportedField(String),
    /// A `resourceFieldRef` that is malformed or not supported.
    #[error("invalid resourceFieldRef {resource:?} of container {container:?}")]
    Resource {
        /// The resource.
        resource: String,
        /// The container named.
        container: String,
    },
    /// The pod lacks a namespace.
    #[error("pod has no namespace")]
    NoNamespace,
}

type Data = BTreeMap<String, String>;

/// The ConfigMaps and Secrets of one pod's namespace, read through the node's one reader
/// ([`ObjectReader`], shared with the volumes; it caches and retries) and decoded as env
/// values (UTF-8, lossy), with the problems met on the way.
struct Objects<'a> {
    reader: &'a mut ObjectReader,
    namespace: String,
    problems: &'a mut Vec<RefProblem>,
}

impl Objects<'_> {
    /// The object's data; `None` if it does not exist (a [`Problem::NotFound`] is
    /// recorded, and the caller decides whether that blocks). A failed read is recorded
    /// and returned as the error.
    async fn get(
        &mut self,
        kind: ObjectKind,
        name: &str,
        optional: bool,
        referrer: &str,
    ) -> Result<Option<Data>, EnvError> {
        let raw = match kind {
            ObjectKind::ConfigMap => self.reader.config_map(&self.namespace, name).await,
            ObjectKind::Secret => self.reader.secret(&self.namespace, name).await,
        };
        let problem = |problem| RefProblem {
            kind,
            name: name.to_owned(),
            optional,
            problem,
            referrer: referrer.to_owned(),
        };
        match raw {
            Ok(Some(d)) => Ok(Some(
                d.iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect(),
            )),
            Ok(None) => {
                self.problems.push(problem(Problem::NotFound));
                Ok(None)
            }
            Err(source) => {
                self.problems
                    .push(problem(Problem::ReadFailed(vzk_core::error_chain(&source))));
                Err(EnvError::Fetch {
                    kind: kind.as_str(),
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }

    fn push(&mut self, p: RefProblem) {
        self.problems.push(p);
    }
}

/// Returns a copy of `pod` whose containers (and init containers) have every env var as
/// a literal value and no `envFrom`. `allocatable` gives the node's `cpu`/`memory`
/// values, used for `limits.*` references of containers without limits. Objects are
/// read through `reader`; every problem met (optional or not, see [`RefProblem`]) is
/// pushed to `problems`, also when resolution then fails.
pub async fn resolve_pod_env(
    reader: &mut ObjectReader,
    pod: &Pod,
    allocatable: &BTreeMap<String, f64>,
    problems: &mut Vec<RefProblem>,
) -> Result<Pod, EnvError> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .ok_or(EnvError::NoNamespace)?;
    let mut objects = Objects {
        reader,
        namespace,
        problems,
    };
    let mut out = pod.clone();
    if let Some(spec) = out.spec.as_mut() {
        // `resourceFieldRef.containerName` may name an init container too.
        let containers: Vec<Container> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .cloned()
            .collect();
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            let env = resolve_container(&mut objects, pod, c, &containers, allocatable).await?;
            c.env = Some(env);
            c.env_from = None;
        }
    }
    Ok(out)
}

async fn resolve_container(
    objects: &mut Objects<'_>,
    pod: &Pod,
    c: &Container,
    all: &[Container],
    allocatable: &BTreeMap<String, f64>,
) -> Result<Vec<EnvVar>, EnvError> {
    // Ordered map: first appearance decides the position, the last value wins.
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    fn set(
        values: &mut HashMap<String, String>,
        order: &mut Vec<String>,
        name: String,
        value: String,
    ) {
        if values.insert(name.clone(), value).is_none() {
            order.push(name);
        }
    }
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = if let Some(r) = &from.config_map_ref {
            (
                ObjectKind::ConfigMap,
                r.name.clone(),
                r.optional.unwrap_or(false),
            )
        } else if let Some(r) = &from.secret_ref {
            (
                ObjectKind::Secret,
                r.name.clone(),
                r.optional.unwrap_or(false),
            )
        } else {
            continue;
        };
        let referrer = format!("envFrom of container {:?}", c.name);
        match objects.get(kind, &name, optional, &referrer).await? {
            Some(data) => {
                let mut invalid = Vec::new();
                for (k, v) in data {
                    let key = format!("{prefix}{k}");
                    if is_env_name(&key) {
                        set(&mut values, &mut order, key, v.clone());
                    } else {
                        invalid.push(key);
                    }
                }
                if !invalid.is_empty() {
                    objects.push(RefProblem {
                        kind,
                        name: name.clone(),
                        optional,
                        problem: Problem::InvalidEnvNames(invalid),
                        referrer,
                    });
                }
            }
            None if optional => {}
            None => {
                return Err(EnvError::ObjectNotFound {
                    kind: kind.as_str(),
                    name,
                });
            }
        }
    }
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                let referrer = format!("env var {:?} of container {:?}", var.name, c.name);
                let resolved =
                    resolve_value_from(objects, pod, c, all, allocatable, from, &referrer).await?;
                match resolved {
                    Some(v) => v,
                    None => continue, // optional reference that is absent
                }
            }
            (Some(v), None) => expand(v, &values),
            (None, None) => String::new(),
        };
        set(&mut values, &mut order, var.name.clone(), value);
    }
    Ok(order
        .into_iter()
        .map(|name| {
            let value = values.get(&name).cloned();
            EnvVar {
                name,
                value,
                value_from: None,
            }
        })
        .collect())
}

async fn resolve_value_from(
    objects: &mut Objects<'_>,
    pod: &Pod,
    c: &Container,
    all: &[Container],
    allocatable: &BTreeMap<String, f64>,
    from: &k8s_openapi::api::core::v1::EnvVarSource,
    referrer: &str,
) -> Result<Option<String>, EnvError> {
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        return key_ref(
            objects,
            ObjectKind::ConfigMap,
            &r.name,
            &r.key,
            optional,
            referrer,
        )
        .await;
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        return key_ref(
            objects,
            ObjectKind::Secret,
            &r.name,
            &r.key,
            optional,
            referrer,
        )
        .await;
    }
    if let Some(r) = &from.field_ref {
        return field_ref(pod, &r.field_path).map(Some);
    }
    if let Some(r) = &from.resource_field_ref {
        let target_name = r
            .container_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| c.name.clone());
        let target = all.iter().find(|x| x.name == target_name).unwrap_or(c);
        let err = || EnvError::Resource {
            resource: r.resource.clone(),
            container: target_name.clone(),
        };
        let (kind, resource) = r.resource.split_once('.').ok_or_else(err)?;
        let res = target.resources.as_ref();
        let map = match kind {
            "limits" => res.and_then(|r| r.limits.as_ref()),
            "requests" => res.and_then(|r| r.requests.as_ref()),
            _ => return Err(err()),
        };
        let value = map
            .and_then(|m| m.get(resource))
            .and_then(|q| quantity::parse(&q.0))
            .or_else(|| {
                if kind == "limits" {
                    allocatable.get(resource).copied()
                } else {
                    None
                }
            })
            .or_else(|| if kind == "requests" { Some(0.0) } else { None })
            .ok_or_else(err)?;
        let divisor = r
            .divisor
            .as_ref()
            .and_then(|d| quantity::parse(&d.0))
            .unwrap_or(1.0);
        if divisor <= 0.0 || !["cpu", "memory", "ephemeral-storage"].contains(&resource) {
            return Err(err());
        }
        let v = (value / divisor).ceil();
        // CPU is at least 1 unit of the divisor when set (the kubelet's rounding).
        return Ok(Some(format!("{}", v as u64)));
    }
    Ok(Some(String::new()))
}

async fn key_ref(
    objects: &mut Objects<'_>,
    kind: ObjectKind,
    name: &str,
    key: &str,
    optional: bool,
    referrer: &str,
) -> Result<Option<String>, EnvError> {
    let namespace = objects.namespace.clone();
    match objects.get(kind, name, optional, referrer).await? {
        Some(data) => match data.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None => {
                objects.push(RefProblem {
                    kind,
                    name: name.to_owned(),
                    optional,
                    problem: Problem::KeyNotFound(key.to_owned()),
                    referrer: referrer.to_owned(),
                });
                if optional {
                    Ok(None)
                } else {
                    Err(EnvError::KeyNotFound {
                        kind: kind.title(),
                        namespace,
                        name: name.to_owned(),
                        key: key.to_owned(),
                    })
                }
            }
        },
        None if optional => Ok(None),
        None => Err(EnvError::ObjectNotFound {
            kind: kind.as_str(),
            name: name.to_owned(),
        }),
    }
}

/// Resolves a downward-API `fieldRef` path against the pod.
pub fn field_ref(pod: &Pod, path: &str) -> Result<String, EnvError> {
    let m = &pod.metadata;
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let from_map = |map: &Option<BTreeMap<String, String>>, rest: &str| -> Option<String> {
        let key = rest.strip_prefix("['")?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let v = match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        p => {
            if let Some(rest) = p.strip_prefix("metadata.labels") {
                from_map(&m.labels, rest).ok_or_else(|| EnvError::UnsupportedField(p.to_owned()))?
            } else if let Some(rest) = p.strip_prefix("metadata.annotations") {
                from_map(&m.annotations, rest)
                    .ok_or_else(|| EnvError::UnsupportedField(p.to_owned()))?
            } else {
                return Err(EnvError::UnsupportedField(p.to_owned()));
            }
        }
    };
    Ok(v)
}

pub use vzk_core::expand::expand;

/// Kubernetes' relaxed env var name rule (GA in 1.34): printable ASCII without `=`.
fn is_env_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = HashMap::from([
            ("A".to_owned(), "x".to_owned()),
            ("B".to_owned(), "y z".to_owned()),
        ]);
        assert_eq!(expand("$(A)-$(B)", &vars), "x-y z");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(MISSING) $", &vars), "$(MISSING) $");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("no vars", &vars), "no vars");
    }

    #[test]
    fn field_refs() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": "10.0.0.5"}
        }))
        .expect("valid pod");
        assert_eq!(field_ref(&pod, "metadata.name").ok().as_deref(), Some("p"));
        assert_eq!(
            field_ref(&pod, "metadata.labels['app']").ok().as_deref(),
            Some("web")
        );
        assert_eq!(
            field_ref(&pod, "metadata.labels['none']").ok().as_deref(),
            Some("")
        );
        assert_eq!(field_ref(&pod, "spec.nodeName").ok().as_deref(), Some("n1"));
        assert_eq!(
            field_ref(&pod, "status.podIP").ok().as_deref(),
            Some("10.0.0.5")
        );
        assert!(field_ref(&pod, "spec.bogus").is_err());
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("A_B"));
        assert!(is_env_name("a.b-c"));
        assert!(is_env_name("1A"));
        assert!(!is_env_name("A=B"));
        assert!(!is_env_name("tab\t"));
        assert!(!is_env_name(""));
    }
}
