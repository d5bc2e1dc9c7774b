#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::parse::{line_col, parse_file, parse_go_duration, parse_url};
use super::*;

/// A CA, and a client certificate and key it signed, as PEM.
struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        ca: issuer.pem(),
        client_cert: client.pem(),
        client_key: key.serialize_pem(),
    }
}

/// A config dir with `files` (path relative to the dir → contents).
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, text) in files {
        let p = d.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    d
}

fn urls(hosts: &[RegistryHost]) -> Vec<String> {
    hosts.iter().map(RegistryHost::url).collect()
}

fn parse(text: &str) -> Result<Namespace, HostsError> {
    parse_file(
        text,
        Path::new("/cfg/r.io/hosts.toml"),
        Path::new("/cfg/r.io"),
    )
}

#[test]
fn every_field_is_read() {
    let p = pki();
    let d = dir_with(&[
        ("r.io/ca.pem", &p.ca),
        ("r.io/client.pem", &p.client_cert),
        ("r.io/client-key.pem", &p.client_key),
        ("both.pem", &format!("{}{}", p.client_cert, p.client_key)),
    ]);
    let abs_both = d.path().join("both.pem");
    let text = format!(
        r#"server = "https://upstream.example:8443"
ca = "ca.pem"
skip_verify = false
dial_timeout = "1m30s"
proxy = "http://127.0.0.1:3128"

[header]
  x-one = "1"
  x-two = ["a", "b"]

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."https://mirror.example/some/path"]
  capabilities = ["Pull"]
  ca = ["ca.pem", "ca.pem"]
  client = [["client.pem", "client-key.pem"]]
  override_path = true

[host."mirror2.example"]
  client = "{}"
  [host."mirror2.example".header]
    x-three = "3"
"#,
        abs_both.display()
    );
    std::fs::write(d.path().join("r.io/hosts.toml"), text).unwrap();
    let cfg = RegistryHosts::load(d.path()).unwrap();
    assert_eq!(cfg.namespaces(), ["r.io"]);
    let hosts = cfg.hosts("r.io", HostDefaults::default());
    assert_eq!(
        urls(&hosts),
        [
            "http://127.0.0.1:5001/v2",
            "https://mirror.example/some/path",
            "https://mirror2.example/v2",
            "https://upstream.example:8443/v2",
        ]
    );
    let [m1, m2, m3, server] = hosts.as_slice() else {
        panic!("four hosts: {hosts:?}")
    };
    // [host] 1: plain HTTP, pull + resolve, skip_verify.
    assert_eq!(
        m1.capabilities,
        Capabilities {
            pull: true,
            resolve: true,
            push: false
        }
    );
    assert!(m1.skip_verify);
    assert_eq!(m1.role, HostRole::Mirror);
    assert_eq!(
        m1.origin.as_deref(),
        Some(format!("{}:11", d.path().join("r.io/hosts.toml").display()).as_str())
    );
    // [host] 2: capabilities are case-insensitive, a CA list relative to the directory,
    // a certificate/key pair, override_path keeps the path as the API root.
    assert_eq!(
        m2.capabilities,
        Capabilities {
            pull: true,
            resolve: false,
            push: false
        }
    );
    assert_eq!(
        m2.ca_files,
        [d.path().join("r.io/ca.pem"), d.path().join("r.io/ca.pem")]
    );
    assert_eq!(m2.roots.len(), 2);
    assert_eq!(
        m2.client_files,
        Some((
            d.path().join("r.io/client.pem"),
            Some(d.path().join("r.io/client-key.pem"))
        ))
    );
    assert!(m2.identity.is_some());
    assert!(!m2.skip_verify);
    // [host] 3: no scheme means https, no capabilities means all, one file with both
    // certificate and key (an absolute path), a header table of its own.
    assert_eq!(m3.capabilities, Capabilities::ALL);
    assert_eq!(m3.client_files, Some((abs_both, None)));
    assert!(m3.identity.is_some());
    assert_eq!(m3.header.get("x-three").unwrap(), "3");
    assert!(
        m3.header.get("x-one").is_none(),
        "root headers are the server's"
    );
    // The server: root-level settings.
    assert_eq!(server.role, HostRole::Server);
    assert_eq!(server.capabilities, Capabilities::ALL);
    assert_eq!(server.ca_files, [d.path().join("r.io/ca.pem")]);
    assert_eq!(server.dial_timeout, Some(Duration::from_secs(90)));
    assert_eq!(server.proxy.as_deref(), Some("http://127.0.0.1:3128"));
    let x_two: Vec<_> = server.header.get_all("x-two").iter().collect();
    assert_eq!(x_two, ["a", "b"]);
    assert_eq!(server.header.get("x-one").unwrap(), "1");
    // Every host gets an HTTP client built from this.
    for h in &hosts {
        h.http_client().unwrap();
    }
}

#[test]
fn candidates_come_in_file_order_then_the_server() {
    // Names out of lexical order: the file's order counts, not the keys'.
    let text = r#"
[host."https://zeta.example"]
[host."https://alpha.example"]
  capabilities = ["pull"]
[host."https://mu.example"]
"#;
    let d = dir_with(&[("r.io/hosts.toml", text)]);
    let cfg = RegistryHosts::load(d.path()).unwrap();
    let hosts = cfg.hosts("r.io", HostDefaults::default());
    assert_eq!(
        urls(&hosts),
        [
            "https://zeta.example/v2",
            "https://alpha.example/v2",
            "https://mu.example/v2",
            "https://r.io/v2",
        ]
    );
    // Without `server` the image's own registry is last, with every capability.
    let last = hosts.last().unwrap();
    assert_eq!(
        (last.role, last.capabilities),
        (HostRole::Upstream, Capabilities::ALL)
    );
    assert_eq!(last.origin, None);
    assert_eq!(
        cfg.file_for("r.io"),
        Some(d.path().join("r.io/hosts.toml").as_path())
    );
}

#[test]
fn directories_are_found_as_containerd_finds_them() {
    let d = dir_with(&[
        ("_default/hosts.toml", "[host.\"http://all-mirror\"]\n"),
        (
            "127.0.0.1:5000/hosts.toml",
            "[host.\"http://colon-mirror\"]\n",
        ),
        (
            "10.0.0.1_5000_/hosts.toml",
            "[host.\"http://underscore-mirror\"]\n",
        ),
        (
            "10.0.0.1:5000/hosts.toml",
            "[host.\"http://colon-loses\"]\n",
        ),
        ("docker.io/hosts.toml", "[host.\"https://hub-mirror\"]\n"),
        // Hidden entries (a ConfigMap's ..data) and files are not registries.
        ("..data/hosts.toml", "not toml ["),
        ("README", "notes"),
    ]);
    let cfg = RegistryHosts::load(d.path()).unwrap();
    let first = |r: &str| urls(&cfg.hosts(r, HostDefaults::default()));
    let plain = HostDefaults {
        plain_http: true,
        skip_verify: false,
    };
    for (registry, defaults, want) in [
        (
            "127.0.0.1:5000",
            plain,
            vec!["http://colon-mirror/v2", "http://127.0.0.1:5000/v2"],
        ),
        (
            "10.0.0.1:5000",
            HostDefaults::default(),
            vec!["http://underscore-mirror/v2", "https://10.0.0.1:5000/v2"],
        ),
        (
            "other.io",
            HostDefaults::default(),
            vec!["http://all-mirror/v2", "https://other.io/v2"],
        ),
        // The image's registry is docker.io; requests go to registry-1.docker.io,
        // always over HTTPS.
        (
            "docker.io",
            plain,
            vec!["https://hub-mirror/v2", "https://registry-1.docker.io/v2"],
        ),
    ] {
        assert_eq!(urls(&cfg.hosts(registry, defaults)), want, "{registry}");
    }
    assert_eq!(first("docker.io")[0], "https://hub-mirror/v2");
    let hub = cfg.hosts("docker.io", HostDefaults::default());
    assert_eq!(hub[1].role, HostRole::Upstream);
    // No configuration at all: just the registry.
    let none = RegistryHosts::empty();
    assert_eq!(
        urls(&none.hosts("127.0.0.1:5000", plain)),
        ["http://127.0.0.1:5000/v2"]
    );
    // `_default` with a server sends everything there: no upstream.
    let d = dir_with(&[("_default/hosts.toml", "server = \"https://only.example\"\n")]);
    let cfg = RegistryHosts::load(d.path()).unwrap();
    let hosts = cfg.hosts("quay.io", HostDefaults::default());
    assert_eq!(urls(&hosts), ["https://only.example/v2"]);
    assert_eq!(hosts[0].role, HostRole::Server);
}

#[test]
fn urls_are_read_as_containerd_reads_them() {
    for (text, override_path, want) in [
        (
            "https://m.example",
            false,
            Ok(("https", "m.example", "/v2")),
        ),
        (
            "m.example:5000",
            false,
            Ok(("https", "m.example:5000", "/v2")),
        ),
        (
            "http://127.0.0.1:5001",
            false,
            Ok(("http", "127.0.0.1:5001", "/v2")),
        ),
        (
            "https://m.example/",
            false,
            Ok(("https", "m.example", "/v2")),
        ),
        (
            "https://m.example/v2",
            false,
            Ok(("https", "m.example", "/v2")),
        ),
        (
            "https://m.example/v2/",
            false,
            Ok(("https", "m.example", "/v2")),
        ),
        (
            "https://m.example/us",
            false,
            Ok(("https", "m.example", "/us/v2")),
        ),
        (
            "https://m.example/a/./b/../c",
            false,
            Ok(("https", "m.example", "/a/c/v2")),
        ),
        (
            "https://m.example/v2/up",
            true,
            Ok(("https", "m.example", "/v2/up")),
        ),
        ("https://m.example", true, Ok(("https", "m.example", ""))),
        (
            "https://m.example:443",
            false,
            Ok(("https", "m.example", "/v2")),
        ),
        (
            "https://[::1]:5000",
            false,
            Ok(("https", "[::1]:5000", "/v2")),
        ),
        ("ftp://m.example", false, Err("is not http or https")),
        (
            "https://u:p@m.example",
            false,
            Err("credentials in the URL"),
        ),
        ("https://m.example/?x=1", false, Err("query or fragment")),
        ("https://", false, Err("is not a URL")),
    ] {
        let got = parse_url(text, override_path);
        match want {
            Ok((scheme, host, path)) => {
                let u = got.unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(
                    (u.scheme, u.host.as_str(), u.path.as_str()),
                    (scheme, host, path),
                    "{text}"
                );
            }
            Err(needle) => {
                let e = got.expect_err(text);
                assert!(e.contains(needle), "{text}: {e}");
            }
        }
    }
}

#[test]
fn bad_files_are_errors_naming_file_line_and_column() {
    for (text, line, column, needle) in [
        (
            "server = \"https://x\"\nskip_verfy = true\n",
            2,
            1,
            "unknown field `skip_verfy`",
        ),
        ("\n\nserver = \n", 3, 10, ""),
        (
            "[host.\"https://m\"]\n  capabilities = [\"pull\", \"pul\"]\n",
            2,
            27,
            "unknown capability \"pul\"",
        ),
        (
            "[host.\"https://m\"]\n  skip_verify = \"yes\"\n",
            2,
            17,
            "invalid type",
        ),
        ("[host.\"ftp://m\"]\n", 1, 7, "is not http or https"),
        (
            "server = \"https://u:p@x\"\n",
            1,
            10,
            "credentials in the URL",
        ),
        (
            "[host.\"https://m\"]\nserver = \"https://x\"\n",
            2,
            10,
            "belongs at the top",
        ),
        (
            "[host.\"https://m\"]\n[host.\"https://m\".host.\"https://n\"]\n",
            2,
            19,
            "cannot be nested",
        ),
        (
            "[host.\"https://m\"]\n  ca = 5\n",
            2,
            8,
            "a string or a list of strings",
        ),
        (
            "[host.\"https://m\"]\n  ca = \"missing.pem\"\n",
            2,
            8,
            "cannot read /cfg/r.io/missing.pem",
        ),
        (
            "[host.\"https://m\"]\n  client = [[\"a\", \"b\", \"c\"]]\n",
            2,
            12,
            "is not a [certificate, key] pair",
        ),
        (
            "[host.\"https://m\"]\n  client = 5\n",
            2,
            12,
            "a list of [certificate, key] pairs",
        ),
        (
            "[host.\"https://m\"]\n  client = [\"/a.pem\", \"/b.pem\"]\n",
            2,
            12,
            "only one client certificate",
        ),
        ("dial_timeout = \"10 parsecs\"\n", 1, 16, "dial_timeout"),
        (
            "proxy = \"socks5://127.0.0.1:1080\"\n",
            1,
            9,
            "SOCKS proxies are not supported",
        ),
        (
            "proxy = \"http://127.0.0.1:3128/path\"\n",
            1,
            9,
            "path, query or fragment",
        ),
        (
            "[header]\n  \"bad header\" = \"x\"\n",
            2,
            3,
            "not a header name",
        ),
        (
            "[header]\n  x-ok = \"line\\nbreak\"\n",
            2,
            10,
            "not a header value",
        ),
        (
            "server = \"https://é.example\"\nnope = 1\n",
            2,
            1,
            "unknown field `nope`",
        ),
    ] {
        let err = parse(text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {text:?}"));
        let msg = err.to_string();
        let HostsError::Invalid {
            path,
            line: l,
            column: c,
            ..
        } = &err
        else {
            panic!("{text:?}: {err:?}")
        };
        assert_eq!(path, Path::new("/cfg/r.io/hosts.toml"), "{text:?}");
        assert_eq!((*l, *c), (line, column), "{text:?}: {msg}");
        assert!(
            msg.starts_with(&format!("/cfg/r.io/hosts.toml:{line}:{column}: ")),
            "{msg}"
        );
        assert!(msg.contains(needle), "{text:?}: {msg}");
    }
}

#[test]
fn unreadable_certificates_stop_the_load() {
    let d = dir_with(&[
        ("r.io/not-a-ca.pem", "hello"),
        (
            "r.io/hosts.toml",
            "\n[host.\"https://m\"]\nca = \"not-a-ca.pem\"\n",
        ),
    ]);
    let err = RegistryHosts::load(d.path()).unwrap_err().to_string();
    assert!(err.contains("r.io/hosts.toml:3:6: ca: "), "{err}");
    assert!(err.contains("not-a-ca.pem"), "{err}");
    let p = pki();
    let d = dir_with(&[
        ("r.io/cert.pem", &p.client_cert),
        ("r.io/hosts.toml", "client = \"cert.pem\"\n"),
    ]);
    let err = RegistryHosts::load(d.path()).unwrap_err().to_string();
    assert!(err.contains("hosts.toml:1:10: client: "), "{err}");
    assert!(
        err.contains("not a PEM certificate and private key"),
        "{err}"
    );
    // An explicitly named directory must exist; the default one may be missing.
    let missing = d.path().join("nope");
    assert!(matches!(
        RegistryHosts::load(&missing),
        Err(HostsError::Io { .. })
    ));
    assert!(
        RegistryHosts::load_if_present(&missing)
            .unwrap()
            .namespaces()
            .is_empty()
    );
}

#[test]
fn a_directory_without_hosts_toml_is_read_in_dockers_layout() {
    let p = pki();
    let d = dir_with(&[
        ("127.0.0.1:5000/ca.crt", &p.ca),
        ("127.0.0.1:5000/client.cert", &p.client_cert),
        ("127.0.0.1:5000/client.key", &p.client_key),
        ("empty.io/notes.txt", "nothing"),
    ]);
    let cfg = RegistryHosts::load(d.path()).unwrap();
    assert_eq!(
        cfg.namespaces(),
        ["127.0.0.1:5000"],
        "no certificates, no entry"
    );
    let hosts = cfg.hosts("127.0.0.1:5000", HostDefaults::default());
    assert_eq!(urls(&hosts), ["https://127.0.0.1:5000/v2"]);
    assert_eq!(hosts[0].ca_files, [d.path().join("127.0.0.1:5000/ca.crt")]);
    assert!(hosts[0].identity.is_some());
    assert_eq!(cfg.file_for("127.0.0.1:5000"), None);
    let d = dir_with(&[("r.io/bad.crt", "not pem")]);
    let err = RegistryHosts::load(d.path()).unwrap_err().to_string();
    assert!(
        err.contains("bad.crt: not a PEM certificate bundle"),
        "{err}"
    );
}

#[test]
fn defaults_fill_only_what_the_file_leaves_open() {
    let d = dir_with(&[(
        "r.io/hosts.toml",
        "[host.\"https://verified\"]\nskip_verify = false\n[host.\"https://open\"]\n",
    )]);
    let cfg = RegistryHosts::load(d.path()).unwrap();
    let hosts = cfg.hosts(
        "r.io",
        HostDefaults {
            plain_http: true,
            skip_verify: true,
        },
    );
    let got: Vec<_> = hosts.iter().map(|h| (h.url(), h.skip_verify)).collect();
    assert_eq!(
        got,
        [
            ("https://verified/v2".to_owned(), false),
            ("https://open/v2".to_owned(), true),
            // --plain-http / --insecure-registry: the registry itself over HTTP.
            ("http://r.io/v2".to_owned(), true),
        ]
    );
}

#[test]
fn capabilities_combine() {
    let pull = Capabilities {
        pull: true,
        resolve: false,
        push: false,
    };
    let resolve = Capabilities {
        resolve: true,
        ..pull
    };
    assert!(Capabilities::ALL.has(resolve));
    assert!(resolve.has(pull));
    assert!(!pull.has(resolve));
    assert!(!resolve.has(Capabilities {
        push: true,
        ..Capabilities::NONE
    }));
    assert_eq!(resolve.to_string(), "[pull, resolve]");
}

#[test]
fn go_durations() {
    for (text, want) in [
        ("1s", Some(Duration::from_secs(1))),
        ("500ms", Some(Duration::from_millis(500))),
        ("1m30s", Some(Duration::from_secs(90))),
        ("1.5h", Some(Duration::from_secs(5400))),
        ("250us", Some(Duration::from_micros(250))),
        ("0", Some(Duration::ZERO)),
        ("", None),
        ("10", None),
        ("-1s", None),
        ("1d", None),
        ("s", None),
    ] {
        assert_eq!(parse_go_duration(text).ok(), want, "{text:?}");
    }
}

#[test]
fn positions_are_one_based_lines_and_character_columns() {
    let text = "ab\nçd = 1\n";
    assert_eq!(line_col(text, 0), (1, 1));
    assert_eq!(line_col(text, 3), (2, 1));
    assert_eq!(line_col(text, 6), (2, 3)); // after "çd": ç is two bytes
    assert_eq!(line_col(text, 1000), (3, 1));
}
