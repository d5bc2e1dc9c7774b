//! One host of a [`Registry`](super::Registry): its HTTP client, its credentials and
//! token, and the distribution API requests.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;

use super::{FetchedManifest, error_chain, parse_challenge, sha256_digest, short, urlencode};
use crate::error::{ImageError, Result};
use crate::hosts::Capabilities;
use crate::keyring::Credentials;
use crate::manifest::MAX_MANIFEST_BYTES;
use crate::media_types as mt;

#[derive(Debug, Default)]
pub(super) struct AuthState {
    pub(super) header: Option<String>,
    pub(super) cred_idx: usize,
    pub(super) obtained: Option<Instant>,
}

/// One host of a [`Registry`], with its own HTTP client, credentials and token.
#[derive(Debug)]
pub(super) struct Endpoint {
    pub(super) http: reqwest::Client,
    /// `scheme://host/path`: requests go to `<base>/<repository>/…`.
    pub(super) base: String,
    /// `scheme://host`, for relative `Location`s.
    pub(super) origin: String,
    /// How messages name it: the registry, or `host (mirror of registry)`.
    pub(super) label: String,
    pub(super) repository: String,
    pub(super) push: bool,
    pub(super) caps: Capabilities,
    /// `?ns=<registry>` on requests to another host than the registry's (containerd's).
    pub(super) ns: Option<String>,
    pub(super) creds: Vec<Credentials>,
    pub(super) auth: Mutex<AuthState>,
    /// It was down or refused us: skipped while another host can answer.
    pub(super) down: AtomicBool,
    /// Where to configure its CA, for TLS failures.
    pub(super) tls_hint: String,
}

impl Endpoint {
    fn err(&self, what: impl Into<String>, detail: impl Into<String>) -> ImageError {
        ImageError::Registry {
            registry: self.label.clone(),
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// A transport error; a TLS failure says where to configure the host's CA.
    fn transport(&self, what: &str, e: &reqwest::Error) -> ImageError {
        let mut detail = error_chain(e);
        if detail.contains("certificate") {
            detail = format!("{detail} ({})", self.tls_hint);
        }
        self.err(what, detail)
    }

    fn unauthorized(&self, detail: impl Into<String>) -> ImageError {
        ImageError::Unauthorized {
            registry: self.label.clone(),
            repository: self.repository.clone(),
            detail: detail.into(),
        }
    }

    /// `<base>/<repository>/<path>`, with `?ns=` for another host than the registry's.
    fn url(&self, path: &str) -> String {
        let ns = self
            .ns
            .as_ref()
            .map(|n| format!("?ns={}", urlencode(n)))
            .unwrap_or_default();
        format!("{}/{}/{path}{ns}", self.base, self.repository)
    }

    /// Send a request built by `mk`, answering auth challenges. `mk` may be called more than once.
    async fn send(&self, what: &str, mk: &(dyn Fn() -> RequestBuilder + Sync)) -> Result<Response> {
        for _ in 0..self.creds.len() + 3 {
            let header = self.auth.lock().await.header.clone();
            let mut rb = mk();
            if let Some(h) = &header {
                rb = rb.header(AUTHORIZATION, h);
            }
            let resp = rb.send().await.map_err(|e| self.transport(what, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp.text().await.unwrap_or_default();
            let mut st = self.auth.lock().await;
            if st.header != header {
                continue; // another request already re-authenticated
            }
            if st.header.is_some() {
                // Our authorization was refused. A token may simply have expired; else try the next credential.
                let fresh = st
                    .obtained
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                if fresh {
                    st.cred_idx += 1;
                }
                if st.cred_idx >= self.creds.len().max(1) {
                    return Err(
                        self.unauthorized(format!("{what}: credentials refused: {}", short(&body)))
                    );
                }
            }
            // A token endpoint that refuses one credential may accept the next.
            let h = loop {
                let cred = self.creds.get(st.cred_idx);
                match self.answer_challenge(&challenge, cred, what).await {
                    Ok(h) => break h,
                    Err(ImageError::Unauthorized { .. }) if st.cred_idx + 1 < self.creds.len() => {
                        st.cred_idx += 1
                    }
                    Err(e) => return Err(e),
                }
            };
            st.header = Some(h);
            st.obtained = Some(Instant::now());
        }
        Err(self.unauthorized(format!("{what}: still unauthorized after authenticating")))
    }
    async fn answer_challenge(
        &self,
        challenge: &str,
        cred: Option<&Credentials>,
        what: &str,
    ) -> Result<String> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let c = cred.ok_or_else(|| {
                    self.unauthorized(format!("{what}: the registry requires credentials"))
                })?;
                use base64::Engine as _;
                let raw = format!("{}:{}", c.username, c.password);
                Ok(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            "bearer" => {
                let realm = params
                    .iter()
                    .find(|(k, _)| k == "realm")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| {
                        self.unauthorized(format!("{what}: bearer challenge without realm"))
                    })?;
                let service = params
                    .iter()
                    .find(|(k, _)| k == "service")
                    .map(|(_, v)| v.clone());
                let actions = if self.push { "pull,push" } else { "pull" };
                let scope = params
                    .iter()
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| format!("repository:{}:{actions}", self.repository));
                let token = self
                    .fetch_token(&realm, service.as_deref(), &scope, cred)
                    .await?;
                Ok(format!("Bearer {token}"))
            }
            _ => {
                Err(self.unauthorized(format!("{what}: unsupported auth challenge {challenge:?}")))
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cred: Option<&Credentials>,
    ) -> Result<String> {
        let what = format!("token from {realm}");
        let resp = match cred.and_then(|c| c.identity_token.as_ref().map(|t| (c, t))) {
            Some((_, refresh)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "vz-kubelet"),
                    ("scope", scope),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                let body = form
                    .iter()
                    .map(|(k, v)| format!("{k}={}", urlencode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                self.http
                    .post(realm)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
            }
            None => {
                let mut q = vec![("scope", scope)];
                if let Some(s) = service {
                    q.push(("service", s));
                }
                let query = q
                    .iter()
                    .map(|(k, v)| format!("{k}={}", urlencode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                let sep = if realm.contains('?') { '&' } else { '?' };
                let mut rb = self.http.get(format!("{realm}{sep}{query}"));
                if let Some(c) = cred {
                    rb = rb.basic_auth(&c.username, Some(&c.password));
                }
                rb.send().await
            }
        }
        .map_err(|e| self.transport(&what, &e))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.err(&what, error_chain(&e)))?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.unauthorized(format!(
                "token endpoint said {status}: {}",
                short(&String::from_utf8_lossy(&body))
            )));
        }
        if !status.is_success() {
            return Err(self.err(
                &what,
                format!("{status}: {}", short(&String::from_utf8_lossy(&body))),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Tok {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Tok = serde_json::from_slice(&body)
            .map_err(|e| self.err(&what, format!("bad token response: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.err(&what, "no token in response"))
    }

    async fn check(&self, what: &str, resp: Response) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::NOT_FOUND {
            return Err(ImageError::NotFound {
                registry: self.label.clone(),
                what: what.to_string(),
            });
        }
        if status == StatusCode::FORBIDDEN {
            let body = resp.text().await.unwrap_or_default();
            return Err(self.unauthorized(format!("{what}: forbidden: {}", short(&body))));
        }
        let body = resp.text().await.unwrap_or_default();
        Err(self.err(what, format!("{status}: {}", short(&body))))
    }

    pub(super) async fn get_manifest(
        &self,
        reference: &str,
        what: &str,
    ) -> Result<FetchedManifest> {
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [
            mt::OCI_MANIFEST,
            mt::OCI_INDEX,
            mt::DOCKER_MANIFEST,
            mt::DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let resp = self
            .send(what, &|| self.http.get(&url).header(ACCEPT, &accept))
            .await?;
        let mut resp = self.check(what, resp).await?;
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES)
        {
            return Err(self.err(what, "manifest larger than 4 MiB"));
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.err(what, error_chain(&e)))?
        {
            buf.extend_from_slice(&chunk);
            if buf.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(self.err(what, "manifest larger than 4 MiB"));
            }
        }
        let digest = sha256_digest(&buf);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(ImageError::DigestMismatch {
                digest: reference.to_string(),
                file: "manifest".into(),
                reason: format!("{} sent a manifest whose digest is {digest}", self.label),
            });
        }
        Ok(FetchedManifest {
            bytes: buf.into(),
            digest,
            media_type,
        })
    }

    pub(super) async fn head_manifest(
        &self,
        reference: &str,
        what: &str,
    ) -> Result<Option<String>> {
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [mt::OCI_MANIFEST, mt::OCI_INDEX].join(", ");
        let resp = self
            .send(what, &|| self.http.head(&url).header(ACCEPT, &accept))
            .await?;
        let resp = self.check(what, resp).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }

    /// GET a blob from `offset`, up to `end` (exclusive) when given: a `Range` request
    /// unless the whole blob is asked for.
    pub(super) async fn get_blob(
        &self,
        digest: &str,
        offset: u64,
        end: Option<u64>,
        what: &str,
    ) -> Result<(Response, bool)> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self
            .send(what, &|| {
                let rb = self.http.get(&url);
                match end {
                    Some(end) => rb.header(RANGE, format!("bytes={offset}-{}", end - 1)),
                    None if offset > 0 => rb.header(RANGE, format!("bytes={offset}-")),
                    None => rb,
                }
            })
            .await?;
        let resp = self.check(what, resp).await?;
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        if partial {
            let start = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(offset) {
                return Err(self.err(
                    what,
                    format!(
                        "asked for bytes from {offset}, got Content-Range starting at {start:?}"
                    ),
                ));
            }
        }
        Ok((resp, partial))
    }

    pub(super) async fn has_blob(&self, digest: &str, what: &str) -> Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.send(what, &|| self.http.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => self.check(what, resp).await.map(|_| false),
        }
    }

    pub(super) async fn put_blob<F>(
        &self,
        digest: &str,
        size: u64,
        body: F,
        what: &str,
    ) -> Result<()>
    where
        F: FnOnce() -> reqwest::Body,
    {
        let url = self.url("blobs/uploads/");
        let resp = self
            .send(what, &|| self.http.post(&url).header(CONTENT_LENGTH, "0"))
            .await?;
        let resp = self.check(what, resp).await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.err(what, "no Location in the upload response"))?;
        let location = if location.starts_with('/') {
            format!("{}{location}", self.origin)
        } else {
            location.to_string()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{sep}digest={}", urlencode(digest));
        let header = self.auth.lock().await.header.clone();
        let mut rb = self
            .http
            .request(Method::PUT, &put_url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body());
        if let Some(h) = header {
            rb = rb.header(AUTHORIZATION, h);
        }
        let resp = rb.send().await.map_err(|e| self.transport(what, &e))?;
        self.check(what, resp).await.map(|_| ())
    }

    pub(super) async fn put_manifest(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
        what: &str,
    ) -> Result<String> {
        let url = self.url(&format!("manifests/{reference}"));
        let body = Bytes::copy_from_slice(bytes);
        let resp = self
            .send(what, &|| {
                self.http
                    .put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        self.check(what, resp).await?;
        Ok(sha256_digest(bytes))
    }

    pub(super) async fn delete_manifest(&self, digest: &str, what: &str) -> Result<()> {
        let url = self.url(&format!("manifests/{digest}"));
        let resp = self.send(what, &|| self.http.delete(&url)).await?;
        self.check(what, resp).await.map(|_| ())
    }
}
