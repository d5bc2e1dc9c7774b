//! Credentials a pod needs: SSH into its guest (container 0's `VZ_SSH_*` env, then the
//! flags) and registry credentials for its image (its `imagePullSecrets`, then the
//! node's Docker config).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use vzk_core::ProviderError;
use vzk_guest::{CredentialSource, Credentials};
use vzk_image::{Keyring, PullSecret, Reference};
use vzk_node::volumes::ObjectReader;

use super::Inner;
use crate::pod::error_chain;

impl Inner {
    /// SSH credentials for a pod: container 0's `VZ_SSH_*` env, then the flags.
    pub(crate) fn credentials(&self, pod: &Pod) -> Result<Credentials, ProviderError> {
        let env: BTreeMap<String, String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        let a = &self.args;
        let flag = |name: &str| -> Option<String> {
            match name {
                "VZ_SSH_USER" => a.ssh_user.clone(),
                "VZ_SSH_PRIVATE_KEY_PATH" => a
                    .ssh_private_key_path
                    .as_ref()
                    .map(|p| p.display().to_string()),
                "VZ_SSH_PRIVATE_KEY_BASE64" => a.ssh_private_key_base64.clone(),
                "VZ_SSH_PASSWORD" => a.ssh_password.clone(),
                _ => None,
            }
        };
        let source = CredentialSource::from_lookup(|n| env.get(n).cloned().or_else(|| flag(n)));
        Credentials::load(&source)
            .map_err(|e| ProviderError::invalid("InvalidSSHCredentials", error_chain(&e)))
    }

    /// Registry credentials for `pod`'s image: its `imagePullSecrets`, then the node's.
    pub(crate) async fn credentials_for(
        &self,
        pod: &Pod,
        reference: &Reference,
    ) -> Result<Vec<vzk_image::Credentials>, String> {
        let (ring, errors) = self.pull_keyring(pod).await;
        if errors.is_empty() {
            Ok(ring.lookup(reference))
        } else {
            Err(errors.join("; "))
        }
    }

    /// Every registry credential `pod` may use: its `imagePullSecrets`, then the node's
    /// docker config; and why a pull secret could not be read, if one could not (the
    /// rest are there all the same).
    pub(crate) async fn pull_keyring(&self, pod: &Pod) -> (Keyring, Vec<String>) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut secrets = Vec::new();
        let mut errors = Vec::new();
        for r in pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.clone())
            .unwrap_or_default()
        {
            // A refused read (the Node authorizer's lag behind the pod's binding) is
            // retried by the reader; a secret not visible yet, briefly here. A reader
            // keeps what it read: a fresh one per try.
            let mut tries = 0;
            let got = loop {
                let mut reader = ObjectReader::new(self.client.clone());
                let got = reader
                    .secret_typed(&ns, &r.name)
                    .await
                    .map(|s| s.map(|(t, d)| (t.to_owned(), d.clone())));
                tries += 1;
                if !matches!(got, Ok(None)) || tries > 8 {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            match got {
                Ok(Some((type_, data))) => secrets.push(PullSecret {
                    name: r.name.clone(),
                    type_,
                    data,
                }),
                Ok(None) => errors.push(format!("secret {ns}/{}: not found", r.name)),
                Err(e) => errors.push(format!("secret {ns}/{}: {e}", r.name)),
            }
        }
        let mut ring = Keyring::from_pull_secrets(secrets.iter()).unwrap_or_else(|e| {
            errors.push(error_chain(&e));
            Keyring::new()
        });
        ring.extend(&self.node_keyring);
        (ring, errors)
    }

    /// How to pull `reference` with `keyring` (from [`Inner::pull_keyring`]) under
    /// `policy`: its registry's credentials, plain HTTP where configured, the hosts.
    pub(crate) fn pull_options(
        &self,
        reference: &Reference,
        keyring: Keyring,
        policy: vzk_image::PullPolicy,
    ) -> vzk_image::PullOptions {
        vzk_image::PullOptions {
            credentials: keyring.lookup(reference),
            policy,
            plain_http: self.plain_http(reference),
            hosts: self.registry_hosts.clone(),
            keyring,
            ..Default::default()
        }
    }

    /// Whether `reference`'s registry is spoken to over plain HTTP.
    pub(crate) fn plain_http(&self, reference: &Reference) -> bool {
        self.args
            .insecure_registries
            .iter()
            .any(|h| h == reference.api_host() || h == &reference.registry)
    }
}
