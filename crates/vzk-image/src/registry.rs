//! A small OCI distribution client over reqwest: manifests, blob streams with `Range`,
//! monolithic blob uploads, and the auth dance (anonymous, Basic, Bearer token challenge
//! with username/password or an identity/refresh token).
//!
//! One [`Registry`] talks to one repository through the hosts [`crate::hosts`] lists for
//! its registry: mirrors first, in order, then the upstream. A tag is resolved only by
//! hosts with the `resolve` capability, content by digest is fetched from hosts with
//! `pull`, pushes go to the first host with `push`. A host that is down (connection
//! refused, timeout, TLS failure, 5xx), refuses us or lacks the content (404) hands the
//! request to the next one; one that was down or refused us is skipped for the rest of
//! this client's life (one pull). A digest mismatch is never a reason to try another
//! host: it is an error naming the host that sent the bytes.
//!
//! Requests that get `401` are retried once per credential after answering the
//! `WWW-Authenticate` challenge; the token is cached per host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::Response;
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;

mod endpoint;

use endpoint::{AuthState, Endpoint};

use crate::error::{ImageError, Result};
use crate::hosts::{
    Capabilities, DEFAULT_CONFIG_DIR, FILE_NAME, HostDefaults, HostRole, RegistryHosts,
};
use crate::keyring::{Credentials, Keyring};
use crate::reference::Reference;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Credentials for the image's own registry, tried in order (empty: anonymous).
    pub credentials: Vec<Credentials>,
    /// Speak plain HTTP to the image's own registry (unless a `hosts.toml` `server`
    /// names another URL).
    pub plain_http: bool,
    /// Accept any TLS certificate (from hosts whose `hosts.toml` does not set
    /// `skip_verify`).
    pub insecure: bool,
    /// Mirrors, TLS and endpoints per registry (`hosts.toml`); empty: the registry itself.
    pub hosts: RegistryHosts,
    /// Credentials for hosts other than the image's registry (mirrors, another
    /// `server`), looked up by that host's own name.
    pub keyring: Keyring,
}

impl RegistryOptions {
    /// Plain HTTP to the registry itself, nothing else configured.
    pub fn plain() -> RegistryOptions {
        RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        }
    }
}

const PULL: Capabilities = Capabilities {
    pull: true,
    resolve: false,
    push: false,
};
const RESOLVE: Capabilities = Capabilities {
    pull: true,
    resolve: true,
    push: false,
};
const PUSH: Capabilities = Capabilities {
    pull: false,
    resolve: false,
    push: true,
};

/// What hosts served, for the log and for naming the host behind a bad blob.
#[derive(Debug, Default)]
struct Served {
    manifests: Vec<u32>,
    blobs: Vec<u32>,
    by_digest: HashMap<String, usize>,
}

/// A client for one repository of one registry (and its mirrors).
#[derive(Debug)]
pub struct Registry {
    registry: String,
    repository: String,
    endpoints: Vec<Endpoint>,
    served: std::sync::Mutex<Served>,
    config: String,
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Raw bytes (their sha256 is the digest).
    pub bytes: Bytes,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// Content-Type the registry gave.
    pub media_type: String,
}

/// A reqwest error with its causes (reqwest's Display alone hides them).
pub(crate) use vzk_core::error_chain;

/// Whether another host should be asked after `e`: it is down, refused us or lacks
/// the content. Bad content is never a reason.
fn falls_back(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::Registry { .. } | ImageError::NotFound { .. } | ImageError::Unauthorized { .. }
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Blob,
}

impl Registry {
    /// A client for `reference`'s repository; `push` asks tokens for `pull,push`.
    pub fn new(reference: &Reference, opts: &RegistryOptions, push: bool) -> Result<Registry> {
        let defaults = HostDefaults {
            plain_http: opts.plain_http,
            skip_verify: opts.insecure,
        };
        let file = opts.hosts.file_for(&reference.registry);
        let config = match file {
            Some(f) => f.display().to_string(),
            None => format!(
                "{}/{}/{FILE_NAME}",
                opts.hosts.dir().map_or_else(
                    || DEFAULT_CONFIG_DIR.to_owned(),
                    |d| d.display().to_string()
                ),
                reference.registry
            ),
        };
        let endpoints = opts
            .hosts
            .hosts(&reference.registry, defaults)
            .into_iter()
            .map(|h| {
                let label = match h.role {
                    HostRole::Upstream => reference.registry.clone(),
                    HostRole::Mirror => format!("{} (mirror of {})", h.host, reference.registry),
                    HostRole::Server => format!("{} (server for {})", h.host, reference.registry),
                };
                let http = h.http_client().map_err(|e| ImageError::Registry {
                    registry: label.clone(),
                    what: "create HTTP client".into(),
                    detail: error_chain(&e),
                })?;
                // Pull secrets and docker config entries for the image's registry are
                // for that registry; another host gets what is stored under its name.
                let creds = if h.role == HostRole::Upstream {
                    opts.credentials.clone()
                } else {
                    opts.keyring.lookup(&Reference {
                        registry: h.host.clone(),
                        repository: reference.repository.clone(),
                        tag: None,
                        digest: None,
                    })
                };
                let tls_hint = format!(
                    "to trust a private CA, set `ca = \"<bundle.pem>\"` for {} in {}",
                    h.url(),
                    h.origin.as_deref().unwrap_or(&config)
                );
                Ok(Endpoint {
                    http,
                    base: h.url(),
                    origin: format!("{}://{}", h.scheme, h.host),
                    label,
                    repository: reference.repository.clone(),
                    push,
                    caps: h.capabilities,
                    ns: (h.role != HostRole::Upstream).then(|| reference.registry.clone()),
                    creds,
                    auth: Mutex::new(AuthState::default()),
                    down: AtomicBool::new(false),
                    tls_hint,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = endpoints.len();
        Ok(Registry {
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            endpoints,
            served: std::sync::Mutex::new(Served {
                manifests: vec![0; n],
                blobs: vec![0; n],
                by_digest: HashMap::new(),
            }),
            config,
        })
    }

    /// The registry host, for messages.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The hosts this client tries, in order (`scheme://host/path`).
    pub fn host_urls(&self) -> Vec<&str> {
        self.endpoints.iter().map(|e| e.base.as_str()).collect()
    }

    /// How messages name host `i`.
    pub(crate) fn host_label(&self, i: usize) -> &str {
        self.endpoints.get(i).map_or(&self.registry, |e| &e.label)
    }

    /// Host `i` failed mid-transfer: skip it while another host can answer.
    pub(crate) fn host_failed(&self, i: usize) {
        if self.endpoints.len() > 1
            && let Some(e) = self.endpoints.get(i)
            && !e.down.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(registry = %self.registry, host = %e.label, "host failed mid-transfer; trying the others first from now on");
        }
    }

    /// The host that last served blob `digest`.
    pub(crate) fn served_by(&self, digest: &str) -> Option<&str> {
        let i = self.served.lock().ok()?.by_digest.get(digest).copied()?;
        Some(self.host_label(i))
    }

    /// Which hosts served what so far, e.g. `127.0.0.1:5001 (mirror of r.io): 1
    /// manifest, 12 blobs`.
    pub fn served_summary(&self) -> String {
        let Ok(s) = self.served.lock() else {
            return String::new();
        };
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| s.manifests[*i] + s.blobs[*i] > 0)
            .map(|(i, e)| {
                format!(
                    "{}: {} manifest(s), {} blob request(s)",
                    e.label, s.manifests[i], s.blobs[i]
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn record(&self, kind: Kind, i: usize, digest: Option<&str>) {
        if let Ok(mut s) = self.served.lock() {
            match kind {
                Kind::Manifest => s.manifests[i] += 1,
                Kind::Blob => s.blobs[i] += 1,
            }
            if let Some(d) = digest {
                s.by_digest.insert(d.to_owned(), i);
            }
        }
    }

    /// Runs `f` on the hosts with `needed`, in order, until one answers; returns which.
    async fn on_hosts<'s, T>(
        &'s self,
        needed: Capabilities,
        kind: Kind,
        what: &str,
        f: impl Fn(&'s Endpoint) -> BoxFuture<'s, Result<T>>,
    ) -> Result<(usize, T)> {
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].caps.has(needed))
            .collect();
        if candidates.is_empty() {
            return Err(ImageError::Registry {
                registry: self.registry.clone(),
                what: what.to_owned(),
                detail: format!(
                    "no host configured in {} has the capabilities {needed}",
                    self.config
                ),
            });
        }
        let live: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !self.endpoints[i].down.load(Ordering::Relaxed))
            .collect();
        let order = if live.is_empty() { candidates } else { live };
        let last = order.len() - 1;
        let mut k = 0;
        loop {
            let i = order[k];
            let ep = &self.endpoints[i];
            match f(ep).await {
                Ok(v) => {
                    if kind == Kind::Manifest && (k > 0 || ep.ns.is_some()) {
                        tracing::info!(registry = %self.registry, host = %ep.label, what, "served by");
                    }
                    return Ok((i, v));
                }
                Err(e) if k < last && falls_back(&e) => {
                    let next = &self.endpoints[order[k + 1]].label;
                    if matches!(e, ImageError::NotFound { .. }) {
                        if kind == Kind::Manifest {
                            tracing::info!(registry = %self.registry, host = %ep.label, %next, what, "not on this host; trying the next");
                        } else {
                            tracing::debug!(registry = %self.registry, host = %ep.label, %next, what, "not on this host; trying the next");
                        }
                    } else {
                        ep.down.store(true, Ordering::Relaxed);
                        tracing::warn!(registry = %self.registry, host = %ep.label, %next, error = %e, "host failed; trying the next");
                    }
                    k += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The host pushes go to: the first with `push`.
    fn pusher(&self, what: &str) -> Result<&Endpoint> {
        self.endpoints
            .iter()
            .find(|e| e.caps.has(PUSH))
            .ok_or_else(|| ImageError::Registry {
                registry: self.registry.clone(),
                what: what.to_owned(),
                detail: format!(
                    "no host configured in {} has the push capability",
                    self.config
                ),
            })
    }

    /// Fetch a manifest by tag or digest. Verifies the digest when fetched by digest.
    /// A tag is resolved only by hosts with `resolve`.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let what = format!("GET manifest {}:{reference}", self.repository);
        let needed = if reference.starts_with("sha256:") {
            PULL
        } else {
            RESOLVE
        };
        let (i, m) = self
            .on_hosts(needed, Kind::Manifest, &what, |ep| {
                Box::pin(ep.get_manifest(reference, &what))
            })
            .await?;
        self.record(Kind::Manifest, i, None);
        Ok(m)
    }

    /// Resolve a tag to its manifest digest without downloading the manifest (HEAD).
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<String>> {
        let what = format!("HEAD manifest {}:{reference}", self.repository);
        let needed = if reference.starts_with("sha256:") {
            PULL
        } else {
            RESOLVE
        };
        let (_, d) = self
            .on_hosts(needed, Kind::Manifest, &what, |ep| {
                Box::pin(ep.head_manifest(reference, &what))
            })
            .await?;
        Ok(d)
    }

    /// Start a blob download at `offset` (a `Range` request when non-zero).
    /// Returns the response and whether the server honoured the range.
    pub async fn get_blob(&self, digest: &str, offset: u64) -> Result<(Response, bool)> {
        let (resp, partial, _) = self.get_blob_at(digest, offset).await?;
        Ok((resp, partial))
    }

    /// [`Registry::get_blob`], also saying which host answered.
    pub(crate) async fn get_blob_at(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<(Response, bool, usize)> {
        let what = format!("GET blob {digest}");
        let (i, (resp, partial)) = self
            .on_hosts(PULL, Kind::Blob, &what, |ep| {
                Box::pin(ep.get_blob(digest, offset, None, &what))
            })
            .await?;
        self.record(Kind::Blob, i, Some(digest));
        Ok((resp, partial, i))
    }

    /// Bytes `[start, end)` of a blob, by one `Range` request (`end > start`). A
    /// registry that answers with anything but exactly that range is an error: the
    /// caller verifies what it gets against its own digests.
    pub async fn get_blob_range(&self, digest: &str, start: u64, end: u64) -> Result<Bytes> {
        let what = format!("GET blob {digest} bytes {start}-{}", end.saturating_sub(1));
        if end <= start {
            return Err(ImageError::Registry {
                registry: self.registry.clone(),
                what,
                detail: "an empty range".into(),
            });
        }
        let (i, (resp, partial)) = self
            .on_hosts(PULL, Kind::Blob, &what, |ep| {
                Box::pin(ep.get_blob(digest, start, Some(end), &what))
            })
            .await?;
        self.record(Kind::Blob, i, Some(digest));
        let whole = start == 0 && resp.content_length() == Some(end);
        if !partial && !whole {
            return Err(ImageError::Registry {
                registry: self.registry.clone(),
                what,
                detail: format!(
                    "the registry does not serve byte ranges (status {})",
                    resp.status()
                ),
            });
        }
        let want = end - start;
        let mut body = resp;
        let mut out = bytes::BytesMut::with_capacity(want as usize);
        loop {
            match body.chunk().await {
                Ok(Some(c)) => {
                    if out.len() as u64 + c.len() as u64 > want {
                        return Err(ImageError::Registry {
                            registry: self.registry.clone(),
                            what,
                            detail: format!("more than the {want} bytes asked for"),
                        });
                    }
                    out.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ImageError::Registry {
                        registry: self.registry.clone(),
                        what,
                        detail: format!("reading the body: {e}"),
                    });
                }
            }
        }
        if out.len() as u64 != want {
            return Err(ImageError::Registry {
                registry: self.registry.clone(),
                what,
                detail: format!("{} bytes of the {want} asked for", out.len()),
            });
        }
        Ok(out.freeze())
    }

    /// Whether a blob exists (on the host pushes go to).
    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        let what = format!("HEAD blob {digest}");
        self.pusher(&what)?.has_blob(digest, &what).await
    }

    /// Upload a blob in one request; `body` is called for the bytes (after auth is settled).
    pub async fn put_blob<F>(&self, digest: &str, size: u64, body: F) -> Result<()>
    where
        F: FnOnce() -> reqwest::Body,
    {
        let what = format!("upload blob {digest}");
        self.pusher(&what)?
            .put_blob(digest, size, body, &what)
            .await
    }

    /// Upload a manifest under a tag (or digest); returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String> {
        let what = format!("PUT manifest {}:{reference}", self.repository);
        self.pusher(&what)?
            .put_manifest(reference, bytes, media_type, &what)
            .await
    }

    /// Delete a manifest by digest (registries may refuse).
    pub async fn delete_manifest(&self, digest: &str) -> Result<()> {
        let what = format!("DELETE manifest {digest}");
        self.pusher(&what)?.delete_manifest(digest, &what).await
    }
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn short(s: &str) -> String {
    let s = s.trim();
    if s.len() > 300 {
        format!("{}…", &s[..s.floor_char_boundary(300)])
    } else {
        s.to_string()
    }
}

pub(crate) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse `Scheme k="v",k2=v2` (values may contain commas inside quotes). Public (hidden)
/// for the fuzz target `registry_auth`.
#[doc(hidden)]
pub fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_string();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                val.push(*c);
                chars.next();
            }
        }
        params.push((key.to_ascii_lowercase(), val.trim().to_string()));
    }
    (scheme.to_string(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.docker.io/token".into())
        );
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p[0].1.as_str()), ("Basic", "Registry Realm"));
    }
}
