//! The `hosts.toml` file format and Docker's `certs.d` layout, read into [`Namespace`]s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use toml::Spanned;

use super::{Capabilities, Entry, HostUrl, HostsError, Namespace};

/// One table of a `hosts.toml`: the root (which may also hold `server` and `host`) or a
/// `[host."…"]` entry (which may not).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    server: Option<Spanned<String>>,
    host: Option<Spanned<BTreeMap<Spanned<String>, Spanned<RawHost>>>>,
    capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    ca: Option<Spanned<OneOrMany>>,
    client: Option<Spanned<RawClient>>,
    skip_verify: Option<bool>,
    header: Option<BTreeMap<Spanned<String>, Spanned<OneOrMany>>>,
    override_path: Option<bool>,
    dial_timeout: Option<Spanned<String>>,
    proxy: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a path, a list of paths, or a list of [certificate, key] pairs"
)]
enum RawClient {
    One(String),
    Many(Vec<RawClientEntry>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawClientEntry {
    Path(String),
    Pair(Vec<String>),
}

/// What the parser of one file needs to report errors and resolve paths.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    dir: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> HostsError {
        let (line, column) = line_col(self.text, span.start);
        HostsError::Invalid {
            path: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn origin(&self, span: std::ops::Range<usize>) -> String {
        format!(
            "{}:{}",
            self.file.display(),
            line_col(self.text, span.start).0
        )
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, l)| l)
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Parses one `hosts.toml` (`file`, in directory `dir`), reading the files it names.
pub(super) fn parse_file(text: &str, file: &Path, dir: &Path) -> Result<Namespace, HostsError> {
    let cx = Ctx { text, file, dir };
    let mut raw: RawHost = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        cx.err(span, e.message().trim().to_owned())
    })?;
    let mut hosts: Vec<(Spanned<String>, Spanned<RawHost>)> = raw
        .host
        .take()
        .map(|h| h.into_inner().into_iter().collect())
        .unwrap_or_default();
    // containerd tries the hosts in the order the file lists them.
    hosts.sort_by_key(|(k, _)| k.span().start);
    let mut mirrors = Vec::with_capacity(hosts.len());
    for (key, table) in hosts {
        let span = key.span();
        let table = table.into_inner();
        if let Some(s) = &table.server {
            return Err(cx.err(
                s.span(),
                "`server` belongs at the top of the file, not in a [host] table",
            ));
        }
        if let Some(h) = &table.host {
            return Err(cx.err(h.span(), "[host] tables cannot be nested"));
        }
        mirrors.push(entry(&cx, &table, Some((key.get_ref(), span)))?);
    }
    let server = match &raw.server {
        Some(s) => entry(&cx, &raw, Some((s.get_ref(), s.span())))?,
        None => {
            let mut e = entry(&cx, &raw, None)?;
            e.origin = None;
            e
        }
    };
    Ok(Namespace {
        file: Some(file.to_path_buf()),
        mirrors,
        server,
    })
}

/// One host's settings. `url`: its URL text and span (`None`: the registry itself).
fn entry(
    cx: &Ctx<'_>,
    raw: &RawHost,
    url: Option<(&String, std::ops::Range<usize>)>,
) -> Result<Entry, HostsError> {
    let override_path = raw.override_path.unwrap_or(false);
    let parsed_url = match &url {
        Some((text, span)) => {
            Some(parse_url(text, override_path).map_err(|m| cx.err(span.clone(), m))?)
        }
        None => None,
    };
    let capabilities = match &raw.capabilities {
        None => Capabilities::ALL,
        Some(list) if list.get_ref().is_empty() => Capabilities::ALL,
        Some(list) => {
            let mut caps = Capabilities::NONE;
            for c in list.get_ref() {
                match c.get_ref().to_ascii_lowercase().as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => caps.push = true,
                    other => {
                        return Err(cx.err(
                            c.span(),
                            format!(
                                "unknown capability {other:?} (expected \"pull\", \"resolve\" or \"push\")"
                            ),
                        ));
                    }
                }
            }
            caps
        }
    };
    let mut ca_files = Vec::new();
    let mut roots = Vec::new();
    if let Some(ca) = &raw.ca {
        for p in ca.get_ref().clone_vec() {
            let path = cx.path(&p);
            let bytes = std::fs::read(&path).map_err(|e| {
                cx.err(
                    ca.span(),
                    format!("ca: cannot read {}: {e}", path.display()),
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&bytes).map_err(|e| {
                cx.err(
                    ca.span(),
                    format!(
                        "ca: {} is not a PEM certificate bundle: {e}",
                        path.display()
                    ),
                )
            })?;
            if certs.is_empty() {
                return Err(cx.err(
                    ca.span(),
                    format!("ca: {} holds no PEM certificate", path.display()),
                ));
            }
            roots.extend(certs);
            ca_files.push(path);
        }
    }
    let (client_files, identity) = match &raw.client {
        None => (None, None),
        Some(client) => {
            let pairs: Vec<(String, Option<String>)> = match client.get_ref() {
                RawClient::One(p) => vec![(p.clone(), None)],
                RawClient::Many(list) => list
                    .iter()
                    .map(|e| match e {
                        RawClientEntry::Path(p) => Ok((p.clone(), None)),
                        RawClientEntry::Pair(v) => match v.as_slice() {
                            [c, k] => Ok((c.clone(), Some(k.clone()).filter(|k| !k.is_empty()))),
                            _ => Err(cx.err(
                                client.span(),
                                format!(
                                    "client: {v:?} is not a [certificate, key] pair (two paths)"
                                ),
                            )),
                        },
                    })
                    .collect::<Result<_, _>>()?,
            };
            match pairs.as_slice() {
                [] => (None, None),
                [(cert, key)] => {
                    let cert = cx.path(cert);
                    let key = key.as_deref().map(|k| cx.path(k));
                    let identity = load_identity(&cert, key.as_deref())
                        .map_err(|m| cx.err(client.span(), format!("client: {m}")))?;
                    (Some((cert, key)), Some(identity))
                }
                _ => {
                    return Err(cx.err(
                        client.span(),
                        "client: only one client certificate per host is supported",
                    ));
                }
            }
        }
    };
    let mut header = HeaderMap::new();
    for (name, values) in raw.header.iter().flatten() {
        let n = HeaderName::from_bytes(name.get_ref().as_bytes()).map_err(|_| {
            cx.err(
                name.span(),
                format!("{:?} is not a header name", name.get_ref()),
            )
        })?;
        for v in values.get_ref().clone_vec() {
            let v = HeaderValue::from_str(&v)
                .map_err(|_| cx.err(values.span(), format!("{v:?} is not a header value")))?;
            header.append(n.clone(), v);
        }
    }
    let dial_timeout = match &raw.dial_timeout {
        None => None,
        Some(d) => Some(
            parse_go_duration(d.get_ref())
                .map_err(|m| cx.err(d.span(), format!("dial_timeout: {m}")))?,
        ),
    };
    let proxy = match &raw.proxy {
        None => None,
        Some(p) => {
            Some(check_proxy(p.get_ref()).map_err(|m| cx.err(p.span(), format!("proxy: {m}")))?)
        }
    };
    Ok(Entry {
        url: parsed_url,
        capabilities,
        skip_verify: raw.skip_verify,
        ca_files,
        roots,
        client_files,
        identity,
        header,
        dial_timeout,
        proxy,
        origin: url.map(|(_, span)| cx.origin(span)),
    })
}

impl OneOrMany {
    fn clone_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A client identity from a certificate file and a key file (or one file with both).
fn load_identity(cert: &Path, key: Option<&Path>) -> Result<reqwest::Identity, String> {
    let mut pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    if let Some(key) = key {
        let k = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        pem.push(b'\n');
        pem.extend_from_slice(&k);
    }
    let names = match key {
        Some(k) => format!("{} and {}", cert.display(), k.display()),
        None => cert.display().to_string(),
    };
    reqwest::Identity::from_pem(&pem).map_err(|e| {
        format!(
            "{names}: not a PEM certificate and private key: {}",
            vzk_core::error_chain(&e)
        )
    })
}

/// A host URL as containerd reads it: `https://` when no scheme is given, `/v2` appended
/// to the path unless it ends with it or `override_path`.
pub(super) fn parse_url(text: &str, override_path: bool) -> Result<HostUrl, String> {
    let full = if text.contains("://") {
        text.to_owned()
    } else {
        format!("https://{text}")
    };
    let u = reqwest::Url::parse(&full).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let scheme = match u.scheme() {
        "http" => "http",
        "https" => "https",
        s => return Err(format!("{text:?}: scheme {s:?} is not http or https")),
    };
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "{text:?}: credentials in the URL are not supported (use a docker config or a pull secret)"
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("{text:?}: a query or fragment is not allowed"));
    }
    let host = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = clean_path(u.path());
    let path = if path.is_empty() {
        if override_path {
            String::new()
        } else {
            "/v2".to_owned()
        }
    } else if override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    Ok(HostUrl { scheme, host, path })
}

/// `/a/./b//c/../` → `/a/b`; `/` and `` → ``.
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.iter().map(|s| format!("/{s}")).collect()
}

/// Go's `time.ParseDuration` for what a timeout needs: `1s`, `500ms`, `1m30s`, `1.5h`.
pub(super) fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as \"1s\", \"500ms\" or \"1m30s\"");
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A proxy URL: `http` or `https`, a host, no path, query or fragment.
fn check_proxy(text: &str) -> Result<String, String> {
    let u = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match u.scheme() {
        "http" | "https" => {}
        "socks5" | "socks5h" => {
            return Err(format!("{text:?}: SOCKS proxies are not supported"));
        }
        s => return Err(format!("{text:?}: scheme {s:?} is not http or https")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !(u.path().is_empty() || u.path() == "/") || u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "{text:?}: a path, query or fragment is not allowed"
        ));
    }
    Ok(text.to_owned())
}

/// Docker's `certs.d` layout: `*.crt` CA bundles, `*.cert` client certificates with the
/// `*.key` of the same name. `None` when the directory holds none of them.
pub(super) fn cert_files(dir: &Path) -> Result<Option<Namespace>, HostsError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .and_then(|rd| rd.map(|e| e.map(|e| e.path())).collect())
        .map_err(|source| HostsError::Io {
            op: "read",
            path: dir.to_path_buf(),
            source,
        })?;
    names.sort();
    let mut e = Entry::implicit();
    let mut clients = Vec::new();
    for p in names.iter().filter(|p| p.is_file()) {
        match p.extension().and_then(|x| x.to_str()) {
            Some("crt") => {
                let bytes = std::fs::read(p).map_err(|source| HostsError::Io {
                    op: "read",
                    path: p.clone(),
                    source,
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&bytes)
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| HostsError::CertFile {
                        path: p.clone(),
                        message: "not a PEM certificate bundle".into(),
                    })?;
                e.roots.extend(certs);
                e.ca_files.push(p.clone());
            }
            Some("cert") => {
                let key = p.with_extension("key");
                clients.push((p.clone(), key.is_file().then_some(key)));
            }
            _ => {}
        }
    }
    match clients.as_slice() {
        [] => {}
        [(cert, key)] => {
            let id =
                load_identity(cert, key.as_deref()).map_err(|message| HostsError::CertFile {
                    path: cert.clone(),
                    message,
                })?;
            e.identity = Some(id);
            e.client_files = Some((cert.clone(), key.clone()));
        }
        [(cert, _), ..] => {
            return Err(HostsError::CertFile {
                path: cert.clone(),
                message: "only one client certificate (*.cert) per host is supported".into(),
            });
        }
    }
    if e.ca_files.is_empty() && e.client_files.is_none() {
        return Ok(None);
    }
    Ok(Some(Namespace {
        file: None,
        mirrors: Vec::new(),
        server: e,
    }))
}
