//! Registry credentials: Kubernetes `imagePullSecrets` and docker `config.json`,
//! matched to an image the way the kubelet's `BasicDockerKeyring` does.
//!
//! A key such as `registry.example.com:5000/team` matches an image whose registry host is
//! `registry.example.com:5000` (glob segments like `*.example.com` allowed, port must
//! match when the key has one) and whose repository starts with `team` at a path
//! boundary. All matches are returned, most specific first (reverse lexical order of
//! the keys, as the kubelet sorts them); the client tries them in order.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{ImageError, IoContext, Result};
use crate::reference::Reference;

/// Credentials for one registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name (for Basic auth or the token endpoint).
    pub username: String,
    /// Password.
    pub password: String,
    /// OAuth2 refresh token (`identitytoken` in docker config), used with the token realm.
    pub identity_token: Option<String>,
}

impl Credentials {
    /// Username and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
            identity_token: None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A Kubernetes Secret as far as pull secrets go: its type and decoded data.
#[derive(Debug, Clone, Default)]
pub struct PullSecret {
    /// Name, for error messages.
    pub name: String,
    /// `kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg`.
    pub type_: String,
    /// `data`, already base64-decoded (as k8s-openapi's `ByteString` gives it).
    pub data: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
    #[serde(default)]
    identitytoken: String,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    host: String,
    port: Option<String>,
    path: String,
    creds: Credentials,
}

/// A set of credentials keyed by registry (and optional path).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    entries: Vec<Entry>,
}

impl Keyring {
    /// An empty keyring (anonymous pulls).
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Add one credential for a key (`host[:port][/path]`, scheme and trailing `/` ignored).
    pub fn add(&mut self, key: &str, creds: Credentials) {
        let stripped = key
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        // Docker Hub's legacy keys all mean docker.io.
        let stripped = match stripped {
            "index.docker.io/v1" | "index.docker.io" | "registry-1.docker.io" => "docker.io",
            s => s,
        };
        let (hostport, path) = stripped.split_once('/').unwrap_or((stripped, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                (h, Some(p.to_string()))
            }
            _ => (hostport, None),
        };
        self.entries.push(Entry {
            key: stripped.to_string(),
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_string(),
            creds,
        });
        // Most specific first, as the kubelet orders its index.
        self.entries.sort_by(|a, b| b.key.cmp(&a.key));
    }

    /// Parse a docker `config.json` / `.dockerconfigjson` (`{"auths": {...}}`) into this keyring.
    pub fn add_docker_config_json(&mut self, bytes: &[u8], source: &str) -> Result<()> {
        let cfg: DockerConfigJson =
            serde_json::from_slice(bytes).map_err(|e| bad_secret(source, e.to_string()))?;
        self.add_auths(cfg.auths, source)
    }

    /// Parse a legacy `.dockercfg` (a bare map of registry → auth) into this keyring.
    pub fn add_dockercfg(&mut self, bytes: &[u8], source: &str) -> Result<()> {
        let auths: BTreeMap<String, AuthEntry> =
            serde_json::from_slice(bytes).map_err(|e| bad_secret(source, e.to_string()))?;
        self.add_auths(auths, source)
    }

    fn add_auths(&mut self, auths: BTreeMap<String, AuthEntry>, source: &str) -> Result<()> {
        for (key, e) in auths {
            let (mut user, mut pass) = (e.username, e.password);
            if !e.auth.is_empty() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(e.auth.trim())
                    .map_err(|err| bad_secret(source, format!("auth of {key}: {err}")))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| bad_secret(source, format!("auth of {key} is not UTF-8")))?;
                let (u, p) = text.split_once(':').ok_or_else(|| {
                    bad_secret(source, format!("auth of {key} is not user:password"))
                })?;
                (user, pass) = (u.to_string(), p.to_string());
            }
            let token = (!e.identitytoken.is_empty()).then_some(e.identitytoken);
            if user.is_empty() && pass.is_empty() && token.is_none() {
                continue;
            }
            self.add(
                &key,
                Credentials {
                    username: user,
                    password: pass,
                    identity_token: token,
                },
            );
        }
        Ok(())
    }

    /// Build a keyring from pull secrets, in order (pod secrets first, then the service account's).
    ///
    /// Secrets of other types are skipped with a warning; malformed ones are an error.
    pub fn from_pull_secrets<'a>(
        secrets: impl IntoIterator<Item = &'a PullSecret>,
    ) -> Result<Keyring> {
        let mut k = Keyring::new();
        for s in secrets {
            let source = format!("secret {}", s.name);
            match s.type_.as_str() {
                "kubernetes.io/dockerconfigjson" => {
                    let data = s
                        .data
                        .get(".dockerconfigjson")
                        .ok_or_else(|| bad_secret(&source, "no .dockerconfigjson key".into()))?;
                    k.add_docker_config_json(data, &source)?;
                }
                "kubernetes.io/dockercfg" => {
                    if let Some(data) = s.data.get(".dockerconfigjson") {
                        k.add_docker_config_json(data, &source)?;
                    } else {
                        let data = s
                            .data
                            .get(".dockercfg")
                            .ok_or_else(|| bad_secret(&source, "no .dockercfg key".into()))?;
                        k.add_dockercfg(data, &source)?;
                    }
                }
                other => {
                    tracing::warn!(secret = %s.name, r#type = other, "ignoring image pull secret of unsupported type")
                }
            }
        }
        Ok(k)
    }

    /// Read a docker `config.json` (e.g. `$DOCKER_CONFIG/config.json`); a missing file is an empty keyring.
    pub fn from_docker_config_file(path: &Path) -> Result<Keyring> {
        let mut k = Keyring::new();
        match std::fs::read(path) {
            Ok(bytes) => k.add_docker_config_json(&bytes, &path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).io("read", path),
        }
        Ok(k)
    }

    /// Add every entry of another keyring (e.g. node-level credentials after pod secrets).
    pub fn extend(&mut self, other: &Keyring) {
        for e in &other.entries {
            self.entries.push(e.clone());
        }
        self.entries.sort_by(|a, b| b.key.cmp(&a.key));
    }

    /// All credentials matching an image, most specific first.
    pub fn lookup(&self, image: &Reference) -> Vec<Credentials> {
        let (host, port) = match image.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
                (h.to_ascii_lowercase(), Some(p))
            }
            _ => (image.registry.to_ascii_lowercase(), None),
        };
        self.entries
            .iter()
            .filter(|e| {
                e.port.as_deref() == port
                    && host_matches(&e.host, &host)
                    && (e.path.is_empty()
                        || image.repository == e.path
                        || image.repository.starts_with(&format!("{}/", e.path)))
            })
            .map(|e| e.creds.clone())
            .collect()
    }

    /// Whether no credentials are known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn bad_secret(source: &str, reason: String) -> ImageError {
    ImageError::InvalidReference {
        reference: source.to_string(),
        reason: format!("invalid docker credentials: {reason}"),
    }
}

/// Dot-separated host match; each key segment may be a glob with `*`.
fn host_matches(pattern: &str, host: &str) -> bool {
    let ps: Vec<&str> = pattern.split('.').collect();
    let hs: Vec<&str> = host.split('.').collect();
    ps.len() == hs.len()
        && ps
            .iter()
            .zip(&hs)
            .all(|(p, h)| glob(p.as_bytes(), h.as_bytes()))
}

/// Does `p` (`*` = any run of bytes, possibly empty) match all of `s`? One backtrack point
/// (the last `*`), so at most `len(p) * len(s)` steps: a pull secret's key is a tenant's
/// input, and the recursive matcher this replaces took exponential time on a key of many
/// `*` (found by the fuzz target `registry_auth`).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Where the last `*` is in `p`, and where in `s` its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if p.get(pi) == Some(&b'*') {
            star = Some((pi, si));
            pi += 1;
        } else if p.get(pi) == Some(&s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            // Let the last `*` take one more byte and retry from there.
            star = Some((sp, ss + 1));
            pi = sp + 1;
            si = ss + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).expect("ref")
    }

    #[test]
    fn glob_matches_runs_and_takes_linear_time() {
        for (p, s, want) in [
            ("*", "", true),
            ("*", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b", "ab", true),
            ("a*b", "abxb", true),
            ("a*b", "abx", false),
            ("*x*", "abc", false),
            ("a**", "a", true),
            ("", "", true),
            ("", "a", false),
            ("a", "", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p:?} {s:?}");
        }
        // Found by the fuzz target `registry_auth`: exponential before (a pull secret
        // keyed `***…***1.example` hung the lookup).
        let key = format!("{}1****.example.com", "*".repeat(80));
        let mut k = Keyring::new();
        k.add_docker_config_json(
            format!(r#"{{"auths":{{"{key}":{{"username":"u","password":"p"}}}}}}"#).as_bytes(),
            "s",
        )
        .expect("parses");
        let t = std::time::Instant::now();
        assert!(
            k.lookup(&r("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com/x"))
                .is_empty()
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn matches_like_the_kubelet() {
        let json = br#"{"auths":{
            "registry.example.com": {"username":"a","password":"1"},
            "registry.example.com/team": {"auth":"Yjoy"},
            "*.corp.io:5000": {"username":"c","password":"3"},
            "https://index.docker.io/v1/": {"username":"d","password":"4","identitytoken":"tok"},
            "empty.io": {}
        }}"#;
        let secret = PullSecret {
            name: "s".into(),
            type_: "kubernetes.io/dockerconfigjson".into(),
            data: [(".dockerconfigjson".to_string(), json.to_vec())].into(),
        };
        let k = Keyring::from_pull_secrets([&secret]).expect("parses");
        let users = |img: &str| {
            k.lookup(&r(img))
                .into_iter()
                .map(|c| c.username)
                .collect::<Vec<_>>()
        };
        assert_eq!(users("registry.example.com/team/vm:1"), ["b", "a"]);
        assert_eq!(users("registry.example.com/teamx/vm:1"), ["a"]);
        assert_eq!(users("reg.corp.io:5000/vm"), ["c"]);
        assert!(users("reg.corp.io/vm").is_empty(), "port must match");
        assert!(
            users("a.b.corp.io:5000/vm").is_empty(),
            "glob is per segment"
        );
        assert_eq!(users("ubuntu"), ["d"]);
        assert_eq!(
            k.lookup(&r("ubuntu"))[0].identity_token.as_deref(),
            Some("tok")
        );
        assert!(users("empty.io/x").is_empty());
        assert!(
            !format!("{:?}", k.lookup(&r("ubuntu"))).contains('4'),
            "Debug redacts"
        );
    }

    #[test]
    fn legacy_dockercfg_and_bad_json() {
        let secret = PullSecret {
            name: "old".into(),
            type_: "kubernetes.io/dockercfg".into(),
            data: [(
                ".dockercfg".to_string(),
                br#"{"r.io":{"auth":"dTpw"}}"#.to_vec(),
            )]
            .into(),
        };
        let k = Keyring::from_pull_secrets([&secret]).expect("parses");
        assert_eq!(k.lookup(&r("r.io/x"))[0], Credentials::basic("u", "p"));
        let bad = PullSecret {
            data: [(".dockercfg".to_string(), b"{".to_vec())].into(),
            ..secret
        };
        let err = Keyring::from_pull_secrets([&bad]).expect_err("bad json");
        assert!(err.to_string().contains("secret old"), "{err}");
    }
}
