//! Which labels a node may set on itself under the NodeRestriction admission plugin.
//!
//! Mirrors `plugin/pkg/admission/noderestriction`: labels under `kubernetes.io` or
//! `k8s.io` (and their subdomains) are refused unless they are one of the well-known
//! kubelet labels or under an allowed prefix; `node-restriction.kubernetes.io/` is always
//! refused. Labels outside those domains (e.g. `type=virtual-kubelet`) are allowed.

/// A label the node is not allowed to set on itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "label {key:?} cannot be set by the node itself under the NodeRestriction admission plugin; \
     an operator must set it (e.g. `kubectl label node <node> {key}=...`)"
)]
pub struct LabelError {
    /// The refused label key.
    pub key: String,
}

const ALLOWED_KUBERNETES_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

const ALLOWED_KUBERNETES_PREFIXES: &[&str] = &["kubelet.kubernetes.io", "node.kubernetes.io"];

/// Checks that the node may set label `key` on its own Node object.
pub fn check_self_settable(key: &str) -> Result<(), LabelError> {
    let refuse = || {
        Err(LabelError {
            key: key.to_owned(),
        })
    };
    let Some((prefix, _)) = key.split_once('/') else {
        return Ok(());
    };
    if prefix == "node-restriction.kubernetes.io"
        || prefix.ends_with(".node-restriction.kubernetes.io")
    {
        return refuse();
    }
    let in_k8s_domain = |d: &str| prefix == d || prefix.ends_with(&format!(".{d}"));
    if !in_k8s_domain("kubernetes.io") && !in_k8s_domain("k8s.io") {
        return Ok(());
    }
    if ALLOWED_KUBERNETES_LABELS.contains(&key) {
        return Ok(());
    }
    let allowed_prefix = ALLOWED_KUBERNETES_PREFIXES
        .iter()
        .any(|p| prefix == *p || prefix.ends_with(&format!(".{p}")));
    if allowed_prefix { Ok(()) } else { refuse() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_and_refused_labels() {
        for ok in [
            "type",
            "kubernetes.io/hostname",
            "kubernetes.io/os",
            "kubernetes.io/arch",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "kubelet.kubernetes.io/x",
            "topology.kubernetes.io/zone",
            "example.com/pool",
            "vz-kubelet/vm",
        ] {
            assert_eq!(check_self_settable(ok), Ok(()), "{ok}");
        }
        for bad in [
            "node-role.kubernetes.io/ci",
            "kubernetes.io/role",
            "node-restriction.kubernetes.io/pool",
            "foo.k8s.io/bar",
            "k8s.io/x",
            "topology.kubernetes.io/rack",
        ] {
            assert!(check_self_settable(bad).is_err(), "{bad}");
        }
    }
}
