//! A small OCI distribution client over reqwest: manifests, blob streams with `Range`,
//! monolithic blob uploads, and the auth dance (anonymous, Basic, Bearer token challenge
//! with username/password or an identity/refresh token).
//!
//! One [`Registry`] talks to one repository. Requests that get `401` are retried once per
//! credential after answering the `WWW-Authenticate` challenge; the token is cached.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;

use crate::error::{ImageError, Result};
use crate::keyring::Credentials;
use crate::manifest::MAX_MANIFEST_BYTES;
use crate::media_types as mt;
use crate::reference::Reference;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Credentials to try, in order (empty: anonymous).
    pub credentials: Vec<Credentials>,
    /// Use `http://` instead of `https://`.
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub insecure: bool,
}

#[derive(Debug, Default)]
struct AuthState {
    header: Option<String>,
    cred_idx: usize,
    obtained: Option<Instant>,
}

/// A client for one repository of one registry.
#[derive(Debug)]
pub struct Registry {
    http: reqwest::Client,
    base: String,
    registry: String,
    repository: String,
    creds: Vec<Credentials>,
    push: bool,
    auth: Mutex<AuthState>,
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

fn http_client(opts: &RegistryOptions) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("vz-kubelet/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .tls_danger_accept_invalid_certs(opts.insecure)
        .build()
        .map_err(|e| ImageError::Registry {
            registry: String::new(),
            what: "create HTTP client".into(),
            detail: error_chain(&e),
        })
}

/// A reqwest error with its causes (reqwest's Display alone hides them).
pub(crate) use vzk_core::error_chain;

impl Registry {
    /// A client for `reference`'s repository; `push` asks tokens for `pull,push`.
    pub fn new(reference: &Reference, opts: &RegistryOptions, push: bool) -> Result<Registry> {
        let scheme = if opts.plain_http { "http" } else { "https" };
        Ok(Registry {
            http: http_client(opts)?,
            base: format!("{scheme}://{}", reference.api_host()),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            creds: opts.credentials.clone(),
            push,
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// The registry host, for messages.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn err(&self, what: impl Into<String>, detail: impl Into<String>) -> ImageError {
        ImageError::Registry {
            registry: self.registry.clone(),
            what: what.into(),
            detail: detail.into(),
        }
    }

    fn unauthorized(&self, detail: impl Into<String>) -> ImageError {
        ImageError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            detail: detail.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{}", self.base, self.repository, path)
    }

    /// Send a request built by `mk`, answering auth challenges. `mk` may be called more than once.
    async fn send(&self, what: &str, mk: &(dyn Fn() -> RequestBuilder + Sync)) -> Result<Response> {
        for _ in 0..self.creds.len() + 3 {
            let header = self.auth.lock().await.header.clone();
            let mut rb = mk();
            if let Some(h) = &header {
                rb = rb.header(AUTHORIZATION, h);
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| self.err(what, error_chain(&e)))?;
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
        .map_err(|e| self.err(&what, error_chain(&e)))?;
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
                registry: self.registry.clone(),
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

    /// Fetch a manifest by tag or digest. Verifies the digest when fetched by digest.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let what = format!("GET manifest {}:{reference}", self.repository);
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [
            mt::OCI_MANIFEST,
            mt::OCI_INDEX,
            mt::DOCKER_MANIFEST,
            mt::DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let resp = self
            .send(&what, &|| self.http.get(&url).header(ACCEPT, &accept))
            .await?;
        let mut resp = self.check(&what, resp).await?;
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES)
        {
            return Err(self.err(&what, "manifest larger than 4 MiB"));
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
            .map_err(|e| self.err(&what, error_chain(&e)))?
        {
            buf.extend_from_slice(&chunk);
            if buf.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(self.err(&what, "manifest larger than 4 MiB"));
            }
        }
        let digest = sha256_digest(&buf);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(ImageError::DigestMismatch {
                digest: reference.to_string(),
                file: "manifest".into(),
                reason: format!("the registry sent a manifest whose digest is {digest}"),
            });
        }
        Ok(FetchedManifest {
            bytes: buf.into(),
            digest,
            media_type,
        })
    }

    /// Resolve a tag to its manifest digest without downloading the manifest (HEAD).
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<String>> {
        let what = format!("HEAD manifest {}:{reference}", self.repository);
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [mt::OCI_MANIFEST, mt::OCI_INDEX].join(", ");
        let resp = self
            .send(&what, &|| self.http.head(&url).header(ACCEPT, &accept))
            .await?;
        let resp = self.check(&what, resp).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }

    /// Start a blob download at `offset` (a `Range` request when non-zero).
    /// Returns the response and whether the server honoured the range.
    pub async fn get_blob(&self, digest: &str, offset: u64) -> Result<(Response, bool)> {
        let what = format!("GET blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self
            .send(&what, &|| {
                let rb = self.http.get(&url);
                if offset > 0 {
                    rb.header(RANGE, format!("bytes={offset}-"))
                } else {
                    rb
                }
            })
            .await?;
        let resp = self.check(&what, resp).await?;
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
                    &what,
                    format!(
                        "asked for bytes from {offset}, got Content-Range starting at {start:?}"
                    ),
                ));
            }
        }
        Ok((resp, partial))
    }

    /// Whether a blob exists.
    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        let what = format!("HEAD blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.send(&what, &|| self.http.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => self.check(&what, resp).await.map(|_| false),
        }
    }

    /// Upload a blob in one request; `body` is called for the bytes (after auth is settled).
    pub async fn put_blob<F>(&self, digest: &str, size: u64, body: F) -> Result<()>
    where
        F: FnOnce() -> reqwest::Body,
    {
        let what = format!("upload blob {digest}");
        let url = self.url("blobs/uploads/");
        let resp = self
            .send(&what, &|| self.http.post(&url).header(CONTENT_LENGTH, "0"))
            .await?;
        let resp = self.check(&what, resp).await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.err(&what, "no Location in the upload response"))?;
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
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
        let resp = rb
            .send()
            .await
            .map_err(|e| self.err(&what, error_chain(&e)))?;
        self.check(&what, resp).await.map(|_| ())
    }

    /// Upload a manifest under a tag (or digest); returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String> {
        let what = format!("PUT manifest {}:{reference}", self.repository);
        let url = self.url(&format!("manifests/{reference}"));
        let body = Bytes::copy_from_slice(bytes);
        let resp = self
            .send(&what, &|| {
                self.http
                    .put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        self.check(&what, resp).await?;
        Ok(sha256_digest(bytes))
    }

    /// Delete a manifest by digest (registries may refuse).
    pub async fn delete_manifest(&self, digest: &str) -> Result<()> {
        let what = format!("DELETE manifest {digest}");
        let url = self.url(&format!("manifests/{digest}"));
        let resp = self.send(&what, &|| self.http.delete(&url)).await?;
        self.check(&what, resp).await.map(|_| ())
    }
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.len() > 300 {
        format!("{}…", &s[..s.floor_char_boundary(300)])
    } else {
        s.to_string()
    }
}

fn urlencode(s: &str) -> String {
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

/// Parse `Scheme k="v",k2=v2` (values may contain commas inside quotes).
pub(crate) fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
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
