//! Private files written atomically, and the kubeconfig the node writes after bootstrap.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use kube::config::{AuthInfo, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};

use crate::CertError;

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` atomically with mode 0600: a temporary file in the same
/// directory (created 0600, so the key is never readable by others, not even briefly),
/// synced, renamed over `path`, then the directory synced. Readers see the old or the new
/// content, never a mix. Missing parent directories are created (0700).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CertError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err(path))
}

/// Reads a file, `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, CertError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The kubeconfig the kubelet writes after bootstrap: the cluster of `bootstrap` (server,
/// CA, TLS server name), and a user whose `client-certificate` and `client-key` are both
/// `cert_file` (cert + key in one file). Written with [`write_private`].
pub fn write_node_kubeconfig(
    path: &Path,
    bootstrap: &Path,
    cert_file: &Path,
) -> Result<(), CertError> {
    let kc_err = |reason: String| CertError::Kubeconfig {
        path: bootstrap.to_owned(),
        reason,
    };
    let boot = Kubeconfig::read_from(bootstrap).map_err(|e| kc_err(crate::chain(&e)))?;
    let context_name = boot
        .current_context
        .clone()
        .ok_or_else(|| kc_err("no current-context".into()))?;
    let cluster_name = boot
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .ok_or_else(|| kc_err(format!("no context {context_name:?}")))?;
    let cluster = boot
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| kc_err(format!("no cluster {cluster_name:?}")))?;
    let cert = cert_file.to_string_lossy().into_owned();
    let config = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "default-cluster".into(),
            cluster: Some(cluster),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "default-auth".into(),
            auth_info: Some(AuthInfo {
                client_certificate: Some(cert.clone()),
                client_key: Some(cert),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: "default-context".into(),
            context: Some(Context {
                cluster: "default-cluster".into(),
                user: Some("default-auth".into()),
                namespace: Some("default".into()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some("default-context".into()),
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Kubeconfig::default()
    };
    let yaml = serde_yaml::to_string(&config).map_err(|e| CertError::Kubeconfig {
        path: path.to_owned(),
        reason: format!("serialising: {e}"),
    })?;
    write_private(path, yaml.as_bytes())
}

/// `<data_dir>/pki/<file>`.
pub fn pki_path(data_dir: &Path, file: &str) -> PathBuf {
    data_dir.join("pki").join(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn write_private_replaces_the_file_atomically_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("pki/kubelet-client-current.pem");
        write_private(&path, b"first").unwrap_or_else(|e| panic!("{e}"));
        // Another process holds the old file open: it keeps reading the old content.
        let mut old = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        write_private(&path, b"second, longer").unwrap_or_else(|e| panic!("{e}"));
        let mut s = String::new();
        std::io::Read::read_to_string(&mut old, &mut s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s, "first",
            "the old inode is untouched (rename, not rewrite)"
        );
        assert_eq!(
            std::fs::read(&path).unwrap_or_default(),
            b"second, longer".to_vec()
        );
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600, "mode {mode:o}");
        let dir_mode = std::fs::metadata(path.parent().unwrap_or(dir.path()))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(dir_mode, 0o700, "pki dir mode {dir_mode:o}");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap_or(dir.path()))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn write_private_fails_cleanly_when_the_directory_is_not_writable() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A regular file where the directory should be.
        let blocker = dir.path().join("pki");
        std::fs::write(&blocker, b"").unwrap_or_else(|e| panic!("{e}"));
        let err = write_private(&blocker.join("x.pem"), b"k");
        assert!(matches!(err, Err(CertError::Write { .. })), "{err:?}");
    }

    #[test]
    fn node_kubeconfig_keeps_the_bootstrap_cluster_and_names_the_cert_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let boot = dir.path().join("bootstrap.kubeconfig");
        std::fs::write(
            &boot,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: ca.crt\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\nusers:\n- name: u\n  user: {token: abcdef.0123456789abcdef}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = dir.path().join("kubelet.kubeconfig");
        let cert = dir.path().join("pki/kubelet-client-current.pem");
        write_node_kubeconfig(&out, &boot, &cert).unwrap_or_else(|e| panic!("{e}"));
        let kc = Kubeconfig::read_from(&out).unwrap_or_else(|e| panic!("{e}"));
        let cluster = kc.clusters[0].cluster.clone().unwrap_or_default();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some(dir.path().join("ca.crt").to_string_lossy().as_ref()),
            "relative CA path made absolute"
        );
        let user = kc.auth_infos[0].auth_info.clone().unwrap_or_default();
        assert!(user.token.is_none(), "the bootstrap token is not copied");
        let c = cert.to_string_lossy().into_owned();
        assert_eq!(user.client_certificate.as_deref(), Some(c.as_str()));
        assert_eq!(user.client_key.as_deref(), Some(c.as_str()));
    }
}
