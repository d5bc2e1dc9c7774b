//! Volume sources → file payloads: configMap, secret, downwardAPI and projected
//! (serviceAccountToken, configMap, secret, downwardAPI).
//!
//! Objects are read one `GET` each, as the node (the Node authorizer allows exactly the
//! objects a pod bound to the node references); nothing is listed or watched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume, VolumeProjection,
};
use kube::api::Api;

use super::VolumeError;
use super::atomic::{FileData, Payload};
use super::token::{Clock, PodRef, TokenCache, TokenKey, requested_expiration};
use crate::quantity;

/// The default file mode of configMap, secret, downwardAPI and projected volumes.
pub const DEFAULT_MODE: u32 = 0o644;

type Data = BTreeMap<String, Vec<u8>>;

/// `(kind, namespace, name)` → the object's type (empty for a ConfigMap) and data;
/// `None`: absent.
type Cache = HashMap<(&'static str, String, String), Option<(String, Data)>>;

/// Reads ConfigMaps and Secrets one `GET` at a time, caching within one pass: the
/// node's one reader of them (volumes, env, image pull secrets).
pub struct ObjectReader {
    client: kube::Client,
    cache: Cache,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader")
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl ObjectReader {
    /// A reader with an empty cache.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: HashMap::new(),
        }
    }

    /// The data (`data` and `binaryData`) of ConfigMap `namespace/name`; `None` if absent.
    pub async fn config_map(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<&Data>, kube::Error> {
        let key = ("configmap", namespace.to_owned(), name.to_owned());
        if !self.cache.contains_key(&key) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
            let data = get_admitted(&api, name).await?.map(|cm| {
                let mut d: Data = cm
                    .binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                d.extend(
                    cm.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                (String::new(), d)
            });
            self.cache.insert(key.clone(), data);
        }
        Ok(self
            .cache
            .get(&key)
            .and_then(Option::as_ref)
            .map(|(_, d)| d))
    }

    /// The data of Secret `namespace/name`; `None` if absent.
    pub async fn secret(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<&Data>, kube::Error> {
        Ok(self.secret_typed(namespace, name).await?.map(|(_, d)| d))
    }

    /// The type (`kubernetes.io/dockerconfigjson`, ...) and data of Secret
    /// `namespace/name`; `None` if absent.
    pub async fn secret_typed(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(&str, &Data)>, kube::Error> {
        let key = ("secret", namespace.to_owned(), name.to_owned());
        if !self.cache.contains_key(&key) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let data = get_admitted(&api, name).await?.map(|s| {
                let mut d: Data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                d.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                (s.type_.unwrap_or_default(), d)
            });
            self.cache.insert(key.clone(), data);
        }
        Ok(self
            .cache
            .get(&key)
            .and_then(Option::as_ref)
            .map(|(t, d)| (t.as_str(), d)))
    }
}

/// The two kinds of object a pod's env and volumes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

impl ObjectKind {
    /// `configmap` / `secret`, as the kubelet writes them in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigMap => "configmap",
            Self::Secret => "secret",
        }
    }

    /// `ConfigMap` / `Secret`, as in event reasons.
    pub fn title(self) -> &'static str {
        match self {
            Self::ConfigMap => "ConfigMap",
            Self::Secret => "Secret",
        }
    }
}

/// What is wrong with one referenced object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The object does not exist.
    NotFound,
    /// The object exists without this key.
    KeyNotFound(String),
    /// Reading it failed (the cause, as text).
    ReadFailed(String),
    /// `envFrom`: these keys are not valid env var names and were skipped.
    InvalidEnvNames(Vec<String>),
}

/// A problem with a ConfigMap or Secret a pod references (env `valueFrom`, `envFrom`, a
/// volume or projected source), reported on the pod as a Warning event whose reason is
/// the one virtual-kubelet emits ([`RefProblem::reason`]). An optional reference to a
/// missing object or key is skipped (the env var is omitted, the volume left without
/// those files); a mandatory one blocks the pod until it appears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefProblem {
    /// ConfigMap or Secret.
    pub kind: ObjectKind,
    /// The object's name.
    pub name: String,
    /// Whether the reference says `optional: true`.
    pub optional: bool,
    /// What is wrong.
    pub problem: Problem,
    /// Who refers to it, for the message: `env var "X"`, `envFrom`, `volume "v"`.
    pub referrer: String,
}

impl RefProblem {
    /// The event reason: `{Optional,Mandatory}{ConfigMap,Secret}NotFound`,
    /// `{Optional,Mandatory}{ConfigMap,Secret}KeyNotFound`,
    /// `FailedToRead{Optional,Mandatory}{ConfigMap,Secret}` or
    /// `InvalidEnvironmentVariableNames`.
    pub fn reason(&self) -> String {
        let need = if self.optional {
            "Optional"
        } else {
            "Mandatory"
        };
        let kind = self.kind.title();
        match &self.problem {
            Problem::NotFound => format!("{need}{kind}NotFound"),
            Problem::KeyNotFound(_) => format!("{need}{kind}KeyNotFound"),
            Problem::ReadFailed(_) => format!("FailedToRead{need}{kind}"),
            Problem::InvalidEnvNames(_) => "InvalidEnvironmentVariableNames".into(),
        }
    }

    /// The event message.
    pub fn message(&self) -> String {
        let (kind, name, referrer) = (self.kind.as_str(), &self.name, &self.referrer);
        let what = match &self.problem {
            Problem::NotFound => format!("{kind} {name:?} not found"),
            Problem::KeyNotFound(key) => format!("key {key:?} does not exist in {kind} {name:?}"),
            Problem::ReadFailed(cause) => format!("failed to read {kind} {name:?}: {cause}"),
            Problem::InvalidEnvNames(keys) => {
                return format!(
                    "{referrer}: keys [{}] of {kind} {name:?} were skipped: they are not valid env var names",
                    keys.join(", ")
                );
            }
        };
        if self.optional && !matches!(self.problem, Problem::ReadFailed(_)) {
            format!("{referrer}: skipped, optional {what}")
        } else {
            format!("{referrer}: {what}")
        }
    }

    /// What makes two problems the same event: the reason, the object and the key
    /// (not the referrer: two env vars naming the same missing Secret are one event).
    pub fn identity(&self) -> (String, ObjectKind, String, Option<String>) {
        let key = match &self.problem {
            Problem::KeyNotFound(k) => Some(k.clone()),
            _ => None,
        };
        (self.reason(), self.kind, self.name.clone(), key)
    }
}

/// Checks the ConfigMaps and Secrets `pod`'s volumes reference (`configMap` and `secret`
/// volumes, their `projected` sources) without writing anything, as the volume set-up
/// will read them: every missing object, missing `items` key or failed read is pushed
/// to `problems`; the first one that blocks the pod (not optional) is returned as the
/// error its set-up would fail with.
pub async fn check_volume_refs(
    reader: &mut ObjectReader,
    pod: &Pod,
    problems: &mut Vec<RefProblem>,
) -> Result<(), VolumeError> {
    let Some(ns) = pod.metadata.namespace.clone() else {
        return Err(VolumeError::InvalidPod);
    };
    let mut first: Option<VolumeError> = None;
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let mut refs: Vec<(ObjectKind, &str, Option<&Vec<KeyToPath>>, bool)> = Vec::new();
        if let Some(c) = &v.config_map {
            refs.push((
                ObjectKind::ConfigMap,
                &c.name,
                c.items.as_ref(),
                c.optional.unwrap_or(false),
            ));
        }
        if let Some(s) = &v.secret {
            refs.push((
                ObjectKind::Secret,
                s.secret_name.as_deref().unwrap_or_default(),
                s.items.as_ref(),
                s.optional.unwrap_or(false),
            ));
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &p.config_map {
                refs.push((
                    ObjectKind::ConfigMap,
                    &c.name,
                    c.items.as_ref(),
                    c.optional.unwrap_or(false),
                ));
            }
            if let Some(s) = &p.secret {
                refs.push((
                    ObjectKind::Secret,
                    &s.name,
                    s.items.as_ref(),
                    s.optional.unwrap_or(false),
                ));
            }
        }
        for (kind, name, items, optional) in refs {
            if name.is_empty() {
                continue;
            }
            let found = match kind {
                ObjectKind::ConfigMap => reader.config_map(&ns, name).await,
                ObjectKind::Secret => reader.secret(&ns, name).await,
            };
            let problem = |problem| RefProblem {
                kind,
                name: name.to_owned(),
                optional,
                problem,
                referrer: format!("volume {:?}", v.name),
            };
            let blocking = match found {
                Err(e) => {
                    let cause = vzk_core::error_chain(&e);
                    problems.push(problem(Problem::ReadFailed(cause)));
                    Some(fetch_err(&v.name, kind.as_str(), name)(e))
                }
                Ok(None) => {
                    problems.push(problem(Problem::NotFound));
                    (!optional).then(|| VolumeError::ObjectNotFound {
                        volume: v.name.clone(),
                        kind: kind.as_str(),
                        name: name.to_owned(),
                    })
                }
                Ok(Some(data)) => {
                    let missing: Vec<&KeyToPath> = items
                        .into_iter()
                        .flatten()
                        .filter(|it| !data.contains_key(&it.key))
                        .collect();
                    for it in &missing {
                        problems.push(problem(Problem::KeyNotFound(it.key.clone())));
                    }
                    missing
                        .first()
                        .filter(|_| !optional)
                        .map(|it| VolumeError::KeyNotFound {
                            volume: v.name.clone(),
                            kind: kind.as_str(),
                            namespace: ns.clone(),
                            name: name.to_owned(),
                            key: it.key.clone(),
                        })
                }
            };
            if first.is_none() {
                first = blocking;
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// `GET` of one object the node may read. The Node authorizer admits the node only once
/// its graph has the pod that references the object, which lags the pod's binding a
/// little: a refusal (403) is retried briefly (8 × 250 ms) before it is returned.
async fn get_admitted<K>(api: &Api<K>, name: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut tries = 0;
    loop {
        match api.get_opt(name).await {
            Err(kube::Error::Api(s)) if s.code == 403 && tries < 8 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            got => return got,
        }
    }
}

/// Everything one pass over a pod's volumes needs.
pub(crate) struct Ctx<'a> {
    pub(crate) client: &'a kube::Client,
    pub(crate) clock: &'a Arc<dyn Clock>,
    pub(crate) pod: &'a Pod,
    pub(crate) pod_ref: &'a PodRef,
    pub(crate) allocatable: &'a BTreeMap<String, f64>,
    pub(crate) objects: ObjectReader,
    pub(crate) tokens: &'a mut TokenCache,
}

fn mode(m: Option<i32>, default: u32) -> u32 {
    m.and_then(|m| u32::try_from(m).ok())
        .map_or(default, |m| m & 0o7777)
}

/// The payload of `items` (or every key) of an object's data.
#[allow(clippy::too_many_arguments)]
fn key_payload(
    out: &mut Payload,
    volume: &str,
    kind: &'static str,
    namespace: &str,
    name: &str,
    data: Option<&Data>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<(), VolumeError> {
    let Some(data) = data else {
        if optional {
            return Ok(());
        }
        return Err(VolumeError::ObjectNotFound {
            volume: volume.to_owned(),
            kind,
            name: name.to_owned(),
        });
    };
    match items {
        None => {
            for (k, v) in data {
                out.insert(
                    k.clone(),
                    FileData {
                        data: v.clone(),
                        mode: default_mode,
                    },
                );
            }
        }
        Some(items) => {
            for it in items {
                match data.get(&it.key) {
                    Some(v) => {
                        out.insert(
                            it.path.clone(),
                            FileData {
                                data: v.clone(),
                                mode: mode(it.mode, default_mode),
                            },
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(VolumeError::KeyNotFound {
                            volume: volume.to_owned(),
                            kind,
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                            key: it.key.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Go's `%q` of a string (what the kubelet writes for label and annotation values).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `key="value"` lines, sorted by key (the kubelet's downward-API map format).
pub fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}\n", go_quote(v)))
        .collect()
}

/// The value of a downward-API `resourceFieldRef` for container `container`.
pub fn resource_value(
    pod: &Pod,
    container: &str,
    resource: &str,
    divisor: Option<&str>,
    allocatable: &BTreeMap<String, f64>,
) -> Option<String> {
    let c = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?;
    let (kind, res) = resource.split_once('.')?;
    if !["cpu", "memory", "ephemeral-storage"].contains(&res) {
        return None;
    }
    let r = c.resources.as_ref();
    let map = match kind {
        "limits" => r.and_then(|r| r.limits.as_ref()),
        "requests" => r.and_then(|r| r.requests.as_ref()),
        _ => return None,
    };
    let v = map
        .and_then(|m| m.get(res))
        .and_then(|q| quantity::parse(&q.0))
        .or_else(|| match kind {
            "limits" => allocatable.get(res).copied(),
            _ => Some(0.0),
        })?;
    let d = divisor.map_or(Some(1.0), quantity::parse)?;
    if d <= 0.0 {
        return None;
    }
    Some(format!("{}", (v / d).ceil() as u64))
}

fn downward_payload(
    out: &mut Payload,
    volume: &str,
    ctx: &Ctx<'_>,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> Result<(), VolumeError> {
    let pod = ctx.pod;
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            match f.field_path.as_str() {
                "metadata.labels" => format_map(pod.metadata.labels.as_ref()),
                "metadata.annotations" => format_map(pod.metadata.annotations.as_ref()),
                p => crate::env::field_ref(pod, p).map_err(|e| VolumeError::Downward {
                    volume: volume.to_owned(),
                    path: it.path.clone(),
                    reason: e.to_string(),
                })?,
            }
        } else if let Some(r) = &it.resource_field_ref {
            let container = r.container_name.clone().unwrap_or_default();
            resource_value(
                pod,
                &container,
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
                ctx.allocatable,
            )
            .ok_or_else(|| VolumeError::Downward {
                volume: volume.to_owned(),
                path: it.path.clone(),
                reason: format!(
                    "invalid resourceFieldRef {:?} of container {container:?}",
                    r.resource
                ),
            })?
        } else {
            return Err(VolumeError::Downward {
                volume: volume.to_owned(),
                path: it.path.clone(),
                reason: "neither fieldRef nor resourceFieldRef".into(),
            });
        };
        out.insert(
            it.path.clone(),
            FileData {
                data: value.into_bytes(),
                mode: mode(it.mode, default_mode),
            },
        );
    }
    Ok(())
}

fn fetch_err(
    volume: &str,
    kind: &'static str,
    name: &str,
) -> impl FnOnce(kube::Error) -> VolumeError {
    let (volume, name) = (volume.to_owned(), name.to_owned());
    move |source| VolumeError::Fetch {
        volume,
        kind,
        name,
        source: Box::new(source),
    }
}

async fn projection(
    out: &mut Payload,
    volume: &str,
    ctx: &mut Ctx<'_>,
    p: &VolumeProjection,
    default_mode: u32,
) -> Result<(), VolumeError> {
    let ns = ctx.pod_ref.namespace.clone();
    if let Some(t) = &p.service_account_token {
        let sa = ctx
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let key = TokenKey {
            service_account: sa.clone(),
            audience: t.audience.clone().filter(|a| !a.is_empty()),
            expiration_seconds: requested_expiration(t.expiration_seconds),
        };
        let token = ctx
            .tokens
            .get(ctx.client, ctx.clock, ctx.pod_ref, &key)
            .await
            .map_err(|source| VolumeError::TokenRequest {
                volume: volume.to_owned(),
                namespace: ns.clone(),
                service_account: sa,
                source: Box::new(source),
            })?;
        out.insert(
            t.path.clone(),
            FileData {
                data: token.into_bytes(),
                mode: default_mode,
            },
        );
    }
    if let Some(c) = &p.config_map {
        let data = ctx
            .objects
            .config_map(&ns, &c.name)
            .await
            .map_err(fetch_err(volume, "configmap", &c.name))?;
        key_payload(
            out,
            volume,
            "configmap",
            &ns,
            &c.name,
            data,
            c.items.as_ref(),
            default_mode,
            c.optional.unwrap_or(false),
        )?;
    }
    if let Some(s) = &p.secret {
        let data = ctx
            .objects
            .secret(&ns, &s.name)
            .await
            .map_err(fetch_err(volume, "secret", &s.name))?;
        key_payload(
            out,
            volume,
            "secret",
            &ns,
            &s.name,
            data,
            s.items.as_ref(),
            default_mode,
            s.optional.unwrap_or(false),
        )?;
    }
    if let Some(d) = &p.downward_api {
        downward_payload(
            out,
            volume,
            ctx,
            d.items.as_deref().unwrap_or_default(),
            default_mode,
        )?;
    }
    if p.cluster_trust_bundle.is_some() {
        return Err(VolumeError::Unsupported {
            volume: volume.to_owned(),
            what: "projected clusterTrustBundle source".into(),
        });
    }
    if p.pod_certificate.is_some() {
        return Err(VolumeError::Unsupported {
            volume: volume.to_owned(),
            what: "projected podCertificate source".into(),
        });
    }
    Ok(())
}

/// The payload of an atomically written volume (`None` for other volume types).
pub(crate) async fn payload(ctx: &mut Ctx<'_>, v: &Volume) -> Option<Result<Payload, VolumeError>> {
    let mut out = Payload::new();
    let ns = ctx.pod_ref.namespace.clone();
    let name = v.name.as_str();
    let r = if let Some(c) = &v.config_map {
        let default_mode = mode(c.default_mode, DEFAULT_MODE);
        match ctx.objects.config_map(&ns, &c.name).await {
            Ok(data) => key_payload(
                &mut out,
                name,
                "configmap",
                &ns,
                &c.name,
                data,
                c.items.as_ref(),
                default_mode,
                c.optional.unwrap_or(false),
            ),
            Err(e) => Err(fetch_err(name, "configmap", &c.name)(e)),
        }
    } else if let Some(s) = &v.secret {
        let default_mode = mode(s.default_mode, DEFAULT_MODE);
        let secret_name = s.secret_name.clone().unwrap_or_default();
        match ctx.objects.secret(&ns, &secret_name).await {
            Ok(data) => key_payload(
                &mut out,
                name,
                "secret",
                &ns,
                &secret_name,
                data,
                s.items.as_ref(),
                default_mode,
                s.optional.unwrap_or(false),
            ),
            Err(e) => Err(fetch_err(name, "secret", &secret_name)(e)),
        }
    } else if let Some(d) = &v.downward_api {
        let default_mode = mode(d.default_mode, DEFAULT_MODE);
        downward_payload(
            &mut out,
            name,
            ctx,
            d.items.as_deref().unwrap_or_default(),
            default_mode,
        )
    } else if let Some(p) = &v.projected {
        let default_mode = mode(p.default_mode, DEFAULT_MODE);
        let mut r = Ok(());
        for src in p.sources.iter().flatten() {
            r = projection(&mut out, name, ctx, src, default_mode).await;
            if r.is_err() {
                break;
            }
        }
        r
    } else {
        return None;
    };
    Some(r.map(|()| out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_formatted_like_the_kubelet() {
        let m = BTreeMap::from([
            ("b".to_owned(), "two\nlines".to_owned()),
            ("a".to_owned(), "say \"hi\"".to_owned()),
        ]);
        assert_eq!(
            format_map(Some(&m)),
            "a=\"say \\\"hi\\\"\"\nb=\"two\\nlines\"\n"
        );
        assert_eq!(format_map(None), "");
        assert_eq!(go_quote("\x1b\\"), "\"\\x1b\\\\\"");
    }

    #[test]
    fn items_keys_modes_and_optional() {
        let data: Data = BTreeMap::from([
            ("k1".to_owned(), b"v1".to_vec()),
            ("k2".to_owned(), vec![0, 159, 146, 150]),
        ]);
        let mut out = Payload::new();
        key_payload(
            &mut out,
            "v",
            "secret",
            "ns",
            "s",
            Some(&data),
            None,
            0o400,
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.len(), 2);
        assert_eq!(
            out.get("k2").map(|f| (f.data.clone(), f.mode)),
            Some((vec![0, 159, 146, 150], 0o400))
        );

        let items = vec![
            KeyToPath {
                key: "k1".into(),
                path: "dir/one".into(),
                mode: Some(0o600),
            },
            KeyToPath {
                key: "missing".into(),
                path: "x".into(),
                mode: None,
            },
        ];
        let mut out = Payload::new();
        let err = key_payload(
            &mut out,
            "v",
            "secret",
            "ns",
            "s",
            Some(&data),
            Some(&items),
            0o644,
            false,
        );
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("volume \"v\": secret \"ns/s\" has no key \"missing\"")
        );
        let mut out = Payload::new();
        assert!(
            key_payload(
                &mut out,
                "v",
                "secret",
                "ns",
                "s",
                Some(&data),
                Some(&items),
                0o644,
                true
            )
            .is_ok()
        );
        assert_eq!(out.get("dir/one").map(|f| f.mode), Some(0o600));
        assert!(!out.contains_key("x"));

        let mut out = Payload::new();
        let err = key_payload(
            &mut out,
            "v",
            "configmap",
            "ns",
            "c",
            None,
            None,
            0o644,
            false,
        );
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("volume \"v\": configmap \"c\" not found")
        );
        assert!(
            key_payload(
                &mut out,
                "v",
                "configmap",
                "ns",
                "c",
                None,
                None,
                0o644,
                true
            )
            .is_ok()
        );
        assert!(out.is_empty());
    }

    #[test]
    fn problems_carry_virtual_kubelets_reasons() {
        let p = |kind, optional, problem| RefProblem {
            kind,
            name: "obj".into(),
            optional,
            problem,
            referrer: "env var \"X\"".into(),
        };
        let (cm, secret) = (ObjectKind::ConfigMap, ObjectKind::Secret);
        let key = || Problem::KeyNotFound("k".into());
        let read = || Problem::ReadFailed("403".into());
        let table = [
            (
                p(cm, false, Problem::NotFound),
                "MandatoryConfigMapNotFound",
            ),
            (p(cm, true, Problem::NotFound), "OptionalConfigMapNotFound"),
            (
                p(secret, false, Problem::NotFound),
                "MandatorySecretNotFound",
            ),
            (p(secret, true, Problem::NotFound), "OptionalSecretNotFound"),
            (p(cm, false, key()), "MandatoryConfigMapKeyNotFound"),
            (p(cm, true, key()), "OptionalConfigMapKeyNotFound"),
            (p(secret, false, key()), "MandatorySecretKeyNotFound"),
            (p(secret, true, key()), "OptionalSecretKeyNotFound"),
            (p(cm, false, read()), "FailedToReadMandatoryConfigMap"),
            (p(secret, true, read()), "FailedToReadOptionalSecret"),
            (
                p(cm, false, Problem::InvalidEnvNames(vec!["a=b".into()])),
                "InvalidEnvironmentVariableNames",
            ),
        ];
        for (problem, reason) in table {
            assert_eq!(problem.reason(), reason, "{problem:?}");
        }
        assert_eq!(
            p(secret, true, Problem::NotFound).message(),
            "env var \"X\": skipped, optional secret \"obj\" not found"
        );
        assert_eq!(
            p(cm, false, key()).message(),
            "env var \"X\": key \"k\" does not exist in configmap \"obj\""
        );
        // One event per reason, object and key, whoever refers to it.
        let mut other = p(secret, true, Problem::NotFound);
        other.referrer = "volume \"v\"".into();
        assert_eq!(
            other.identity(),
            p(secret, true, Problem::NotFound).identity()
        );
        assert_ne!(
            p(cm, false, key()).identity(),
            p(cm, false, Problem::KeyNotFound("other".into())).identity()
        );
    }

    #[test]
    fn resource_values() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "resources": {
                "requests": {"cpu": "250m", "memory": "64Mi"},
                "limits": {"memory": "128Mi"}
            }}]}
        }))
        .unwrap_or_default();
        let alloc = BTreeMap::from([("cpu".to_owned(), 4.0)]);
        let v = |r: &str, d: Option<&str>| resource_value(&pod, "c", r, d, &alloc);
        assert_eq!(v("requests.cpu", Some("1m")).as_deref(), Some("250"));
        assert_eq!(v("requests.cpu", None).as_deref(), Some("1"));
        assert_eq!(v("limits.memory", Some("1Mi")).as_deref(), Some("128"));
        assert_eq!(v("limits.cpu", None).as_deref(), Some("4"));
        assert_eq!(v("requests.bogus", None), None);
        assert_eq!(
            resource_value(&pod, "nope", "requests.cpu", None, &alloc),
            None
        );
    }
}
