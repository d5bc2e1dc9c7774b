//! Registry hosts: mirrors, TLS and endpoints per registry, configured as containerd
//! configures them (`/etc/containerd/certs.d/<host>/hosts.toml`, see containerd's
//! `docs/hosts.md`).
//!
//! A configuration directory (vz-kubelet's default: [`DEFAULT_CONFIG_DIR`]) holds one
//! directory per registry host (`registry.example.com`, `127.0.0.1:5000` or
//! `127.0.0.1_5000_`; `_default` for every host without its own), each with a
//! `hosts.toml`:
//!
//! ```toml
//! server = "https://registry.example.com"      # the upstream; default: the image's own registry
//!
//! [host."https://mirror.internal:5000"]         # mirrors, tried in the order written
//!   capabilities = ["pull", "resolve"]          # push goes only to hosts with "push"
//!   ca = "mirror-ca.pem"                        # or a list; relative to this directory
//!   client = [["client.pem", "client-key.pem"]] # or "both.pem" (certificate and key in one)
//!
//! [host."http://10.0.0.5:5000"]                # plain HTTP
//!   capabilities = ["pull"]                     # never trusted to resolve a tag
//!   skip_verify = true                          # (TLS only) accept any certificate
//!   override_path = true                        # the URL's path is the API root (no /v2)
//! ```
//!
//! As in containerd: the `[host]` entries come first, in file order, then `server` (or,
//! without one, the image's own registry); a host without `capabilities` has all three;
//! a tag is resolved only by hosts with `resolve`, content is fetched from hosts with
//! `pull`; a host's URL without `/v2` gets it appended unless `override_path`; root-level
//! `ca`, `client`, `skip_verify`, `header`, `dial_timeout` and `proxy` apply to the
//! server; a directory without `hosts.toml` is read in Docker's `certs.d` layout (`*.crt`
//! CA bundles, `*.cert` + `*.key` client pairs). Requests to a host other than the
//! image's registry carry `?ns=<registry>`.
//!
//! Unlike containerd, which skips a file it cannot parse and ignores keys it does not
//! know, a bad file is an error naming the file, line and column ([`HostsError`]), and
//! the CA and client files are read when the configuration is loaded, so that a node
//! with a broken configuration does not start. Only one client certificate per host is
//! supported, `proxy` takes `http://` and `https://` proxies (not SOCKS), and an
//! `http://` host is spoken to in plain HTTP even with TLS settings (containerd would
//! try HTTPS first).
//!
//! ```
//! use vzk_image::hosts::{HostDefaults, RegistryHosts};
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::create_dir(dir.path().join("registry.example.com")).unwrap();
//! std::fs::write(
//!     dir.path().join("registry.example.com/hosts.toml"),
//!     "[host.\"http://127.0.0.1:5001\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
//! ).unwrap();
//! let hosts = RegistryHosts::load(dir.path()).unwrap();
//! let order: Vec<String> = hosts
//!     .hosts("registry.example.com", HostDefaults::default())
//!     .iter()
//!     .map(|h| h.url())
//!     .collect();
//! assert_eq!(order, ["http://127.0.0.1:5001/v2", "https://registry.example.com/v2"]);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::reference::{DOCKER_HUB, DOCKER_HUB_API};

mod parse;

use parse::{cert_files, parse_file};

/// vz-kubelet's default configuration directory.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/vz-kubelet/certs.d";
/// The directory that applies to every registry without a directory of its own.
pub const DEFAULT_NAMESPACE: &str = "_default";
/// The file read in each registry's directory.
pub const FILE_NAME: &str = "hosts.toml";

/// A configuration that cannot be used; the message names the file (and line).
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// A `hosts.toml` is malformed or names something unusable.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The `hosts.toml`.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A certificate file of Docker's `certs.d` layout (no `hosts.toml`) is unusable.
    #[error("{}: {message}", path.display())]
    CertFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The directory or a file could not be read.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What a host may be asked to do (containerd's host capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch content by digest (manifests and blobs).
    pub pull: bool,
    /// Resolve a tag to a manifest (trusted with the name-to-digest mapping).
    pub resolve: bool,
    /// Receive pushes.
    pub push: bool,
}

impl Capabilities {
    /// Pull, resolve and push: a host without `capabilities`.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
    const NONE: Capabilities = Capabilities {
        pull: false,
        resolve: false,
        push: false,
    };

    /// Whether every capability of `needed` is here.
    pub fn has(self, needed: Capabilities) -> bool {
        (self.pull || !needed.pull)
            && (self.resolve || !needed.resolve)
            && (self.push || !needed.push)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.pull, "pull"),
            (self.resolve, "resolve"),
            (self.push, "push"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        write!(f, "[{}]", names.join(", "))
    }
}

/// What a host is to the image's registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// The image's own registry (its credentials apply).
    Upstream,
    /// A `[host]` entry for another host.
    Mirror,
    /// A `server` other than the image's registry.
    Server,
}

/// Settings from the command line that apply where the configuration says nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostDefaults {
    /// The image's own registry (when no `server` names another URL) speaks plain HTTP
    /// (`--insecure-registry`, `--plain-http`).
    pub plain_http: bool,
    /// Accept any certificate from hosts whose configuration does not set `skip_verify`.
    pub skip_verify: bool,
}

/// One host to try for an image, with everything needed to talk to it.
#[derive(Debug, Clone)]
pub struct RegistryHost {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `host[:port]`.
    pub host: String,
    /// The API root: `/v2`, or with `override_path` the URL's own path.
    pub path: String,
    /// What it may be asked to do.
    pub capabilities: Capabilities,
    /// What it is to the image's registry.
    pub role: HostRole,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// CA bundles added to the system's roots.
    pub ca_files: Vec<PathBuf>,
    /// Client certificate (and key, when in a file of its own).
    pub client_files: Option<(PathBuf, Option<PathBuf>)>,
    /// Extra headers on every request.
    pub header: HeaderMap,
    /// Connect timeout (default 30 s).
    pub dial_timeout: Option<Duration>,
    /// HTTP(S) proxy URL.
    pub proxy: Option<String>,
    /// Where it was configured (`file:line`), if anywhere.
    pub origin: Option<String>,
    roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
}

impl RegistryHost {
    /// `scheme://host/path`, the prefix of every API request.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }

    /// The HTTP client for this host: its TLS roots and identity, headers, proxy, timeouts.
    pub(crate) fn http_client(&self) -> reqwest::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("vz-kubelet/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.dial_timeout.unwrap_or(Duration::from_secs(30)))
            .read_timeout(Duration::from_secs(60))
            .tls_danger_accept_invalid_certs(self.skip_verify)
            .default_headers(self.header.clone());
        if !self.roots.is_empty() {
            b = b.tls_certs_merge(self.roots.iter().cloned());
        }
        if let Some(id) = &self.identity {
            b = b.identity(id.clone());
        }
        if let Some(p) = &self.proxy {
            b = b.proxy(reqwest::Proxy::all(p.as_str())?);
        }
        b.build()
    }
}

/// A parsed `hosts.toml` entry (`[host."…"]` or the root's server), not yet tied to an image.
#[derive(Debug, Clone)]
struct Entry {
    /// `None`: the image's own registry.
    url: Option<HostUrl>,
    capabilities: Capabilities,
    skip_verify: Option<bool>,
    ca_files: Vec<PathBuf>,
    roots: Vec<reqwest::Certificate>,
    client_files: Option<(PathBuf, Option<PathBuf>)>,
    identity: Option<reqwest::Identity>,
    header: HeaderMap,
    dial_timeout: Option<Duration>,
    proxy: Option<String>,
    origin: Option<String>,
}

impl Entry {
    fn implicit() -> Entry {
        Entry {
            url: None,
            capabilities: Capabilities::ALL,
            skip_verify: None,
            ca_files: Vec::new(),
            roots: Vec::new(),
            client_files: None,
            identity: None,
            header: HeaderMap::new(),
            dial_timeout: None,
            proxy: None,
            origin: None,
        }
    }

    fn resolve(&self, registry: &str, defaults: HostDefaults, mirror: bool) -> RegistryHost {
        let own = api_host(registry);
        let (scheme, host, path, capabilities) = match &self.url {
            Some(u) => (u.scheme, u.host.clone(), u.path.clone(), self.capabilities),
            // As containerd: the registry itself, every capability, the standard root;
            // Docker Hub is always HTTPS.
            None => (
                if defaults.plain_http && registry != DOCKER_HUB {
                    "http"
                } else {
                    "https"
                },
                own.to_owned(),
                "/v2".to_owned(),
                Capabilities::ALL,
            ),
        };
        let role = if host == registry || host == own {
            HostRole::Upstream
        } else if mirror {
            HostRole::Mirror
        } else {
            HostRole::Server
        };
        RegistryHost {
            scheme,
            host,
            path,
            capabilities,
            role,
            skip_verify: self.skip_verify.unwrap_or(defaults.skip_verify),
            ca_files: self.ca_files.clone(),
            client_files: self.client_files.clone(),
            header: self.header.clone(),
            dial_timeout: self.dial_timeout,
            proxy: self.proxy.clone(),
            origin: self.origin.clone(),
            roots: self.roots.clone(),
            identity: self.identity.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostUrl {
    scheme: &'static str,
    host: String,
    path: String,
}

/// One registry's directory.
#[derive(Debug, Clone)]
struct Namespace {
    /// Its `hosts.toml` (none in Docker's `certs.d` layout).
    file: Option<PathBuf>,
    mirrors: Vec<Entry>,
    server: Entry,
}

/// A loaded configuration directory: which hosts to try, in order, for each registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryHosts {
    dir: Option<PathBuf>,
    namespaces: HashMap<String, Namespace>,
}

impl RegistryHosts {
    /// No configuration: every image is pulled from its own registry.
    pub fn empty() -> RegistryHosts {
        RegistryHosts::default()
    }

    /// Reads every `<dir>/<host>/hosts.toml` (or Docker-style certificate files). The
    /// directory must exist.
    pub fn load(dir: &Path) -> Result<RegistryHosts, HostsError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| HostsError::Io { op, path, source }
        };
        let mut namespaces = HashMap::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io("read", dir))?
            .collect::<std::io::Result<_>>()
            .map_err(io("read", dir))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            // Kubernetes' atomic-writer entries (`..data`) and other hidden names.
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let file = path.join(FILE_NAME);
            let ns = match std::fs::read_to_string(&file) {
                Ok(text) => parse_file(&text, &file, &path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match cert_files(&path)? {
                    Some(ns) => ns,
                    None => continue,
                },
                Err(e) => return Err(io("read", &file)(e)),
            };
            namespaces.insert(name, ns);
        }
        Ok(RegistryHosts {
            dir: Some(dir.to_path_buf()),
            namespaces,
        })
    }

    /// Like [`RegistryHosts::load`], but a missing directory is an empty configuration
    /// (for the default directory, which most nodes do not have).
    pub fn load_if_present(dir: &Path) -> Result<RegistryHosts, HostsError> {
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryHosts::empty()),
            _ => RegistryHosts::load(dir),
        }
    }

    /// The directory it was read from.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The configured registry directories (`_default` included), sorted.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.namespaces.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The directory name that configures `registry`, as containerd looks it up:
    /// `host_port_`, then `host:port`, then `_default`.
    fn namespace_for(&self, registry: &str) -> Option<(&str, &Namespace)> {
        let mut names = Vec::with_capacity(3);
        if let Some((h, p)) = registry.rsplit_once(':')
            && !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
        {
            names.push(format!("{h}_{p}_"));
        }
        names.push(registry.to_owned());
        names.push(DEFAULT_NAMESPACE.to_owned());
        names
            .into_iter()
            .find_map(|n| self.namespaces.get_key_value(&n))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The `hosts.toml` that configures `registry`, if any.
    pub fn file_for(&self, registry: &str) -> Option<&Path> {
        self.namespace_for(registry)
            .and_then(|(_, ns)| ns.file.as_deref())
    }

    /// The hosts to try for an image of `registry` (a reference's registry, e.g.
    /// `docker.io` or `127.0.0.1:5000`), in order: mirrors, then the server.
    pub fn hosts(&self, registry: &str, defaults: HostDefaults) -> Vec<RegistryHost> {
        match self.namespace_for(registry) {
            None => vec![Entry::implicit().resolve(registry, defaults, false)],
            Some((_, ns)) => ns
                .mirrors
                .iter()
                .map(|m| m.resolve(registry, defaults, true))
                .chain(std::iter::once(
                    ns.server.resolve(registry, defaults, false),
                ))
                .collect(),
        }
    }
}

/// The host HTTP requests go to for `registry`.
fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

#[cfg(test)]
mod tests;
