//! Image pulls: presence checks, pull policies, registry credentials.

use std::time::{Duration, Instant};

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt as _;
use tracing::{debug, warn};

use crate::{DockerError, ImageRef, PullPolicy, SidecarRuntime};

/// Registry credentials for a pull (the caller resolves pull secrets and the node's
/// docker config and passes what matches the image's registry, in order).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// OAuth2 identity (refresh) token, used instead of the password when set.
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What [`SidecarRuntime::ensure_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullOutcome {
    /// The image was present and the policy did not ask for a pull.
    AlreadyPresent,
    /// The image was pulled (or confirmed current) from its registry.
    Pulled {
        /// How long the pull took.
        elapsed: Duration,
    },
}

impl SidecarRuntime {
    /// Whether `image` is present locally.
    pub async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match DockerError::api("inspect image", image, e) {
                DockerError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Makes `image` available per `policy`: `Never` only checks presence,
    /// `IfNotPresent` pulls when absent, `Always` asks the registry every time. Each
    /// credential is tried in order (anonymous when there is none).
    pub async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryAuth],
    ) -> Result<PullOutcome, DockerError> {
        let r = ImageRef::parse(image)?;
        let present = self.image_present(image).await?;
        match policy {
            PullPolicy::Never if present => return Ok(PullOutcome::AlreadyPresent),
            PullPolicy::Never => {
                return Err(DockerError::ImageNeverPull {
                    image: image.to_owned(),
                });
            }
            PullPolicy::IfNotPresent if present => return Ok(PullOutcome::AlreadyPresent),
            _ => {}
        }
        let (from_image, tag) = r.pull_args();
        let attempts: Vec<Option<DockerCredentials>> = if credentials.is_empty() {
            vec![None]
        } else {
            credentials
                .iter()
                .map(|c| {
                    Some(DockerCredentials {
                        username: Some(c.username.clone()).filter(|u| !u.is_empty()),
                        password: Some(c.password.clone()).filter(|p| !p.is_empty()),
                        identitytoken: c.identity_token.clone(),
                        serveraddress: Some(r.registry().to_owned()),
                        ..Default::default()
                    })
                })
                .collect()
        };
        let t0 = Instant::now();
        let mut last = String::new();
        for creds in attempts {
            let mut b = CreateImageOptionsBuilder::default().from_image(&from_image);
            if !tag.is_empty() {
                b = b.tag(&tag);
            }
            let mut stream = self.docker.create_image(Some(b.build()), None, creds);
            let mut failed = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(s) = info.status {
                            debug!(image, status = %s, "pull");
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    return Ok(PullOutcome::Pulled {
                        elapsed: t0.elapsed(),
                    });
                }
                Some(e) => {
                    let err = DockerError::api("pull", image, e);
                    if let DockerError::Unreachable { .. } = err {
                        return Err(err);
                    }
                    last = match &err {
                        DockerError::Api { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    warn!(image, error = %last, "pull attempt failed");
                }
            }
        }
        Err(DockerError::Pull {
            image: image.to_owned(),
            message: last,
        })
    }
}
