//! Authentication and authorization of kubelet API requests, as the upstream kubelet
//! does them.
//!
//! * **Who**: a verified client certificate (CN = user, O's = groups), else a bearer
//!   token checked with a `TokenReview`, else anonymous (`system:anonymous`), which is
//!   refused with 401 unless explicitly allowed.
//! * **May they**: a `SubjectAccessReview` for resource `nodes`, name = this node,
//!   subresource from the path (`/stats*` → `stats`, `/metrics*` → `metrics`, `/logs*` →
//!   `log`, everything else → `proxy`; `/pods` and `/healthz` try the fine-grained
//!   `pods`/`healthz` first), verb from the method (GET → get, POST → create, …).
//!   The streaming endpoints (`/exec`, `/attach`, `/portForward`) always need `create`,
//!   even over a WebSocket GET, so `get nodes/proxy` alone cannot open a shell.
//! * Decisions are cached: allowed for 5 minutes, denied for 30 s; token reviews for
//!   2 minutes (10 s if rejected).
//! * Without a Kubernetes client (no reviewer), certificates that chain to the client
//!   CA are trusted as authorized, tokens are refused, anonymous follows the flag.

mod cache;
mod review;

use std::sync::Arc;

use http::Method;

pub use review::{ReviewError, Reviewer};

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// User name.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
    /// UID from a token review.
    pub uid: Option<String>,
    /// How it was established.
    pub source: IdentitySource,
}

/// How an [`Identity`] was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    /// A client certificate verified against the client CA.
    ClientCert,
    /// A bearer token accepted by a TokenReview.
    Token,
    /// No credentials.
    Anonymous,
}

impl Identity {
    /// The anonymous identity.
    pub fn anonymous() -> Self {
        Self {
            user: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
            uid: None,
            source: IdentitySource::Anonymous,
        }
    }
}

/// The attributes a request is authorized against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// API verb.
    pub verb: &'static str,
    /// Subresources of `nodes` to try, in order; the first allowed one wins.
    pub subresources: Vec<&'static str>,
}

fn is_subpath(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Maps a request to the attributes the upstream kubelet checks.
pub fn attributes_for(method: &Method, path: &str) -> Attributes {
    let streaming = ["/exec", "/attach", "/portForward"]
        .iter()
        .any(|p| is_subpath(path, p));
    let verb = if streaming {
        "create"
    } else {
        match *method {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "get",
        }
    };
    let subresources = if is_subpath(path, "/stats") {
        vec!["stats"]
    } else if is_subpath(path, "/metrics") {
        vec!["metrics"]
    } else if is_subpath(path, "/logs") {
        vec!["log"]
    } else if is_subpath(path, "/pods") {
        vec!["pods", "proxy"]
    } else if is_subpath(path, "/healthz") {
        vec!["healthz", "proxy"]
    } else {
        vec!["proxy"]
    };
    Attributes { verb, subresources }
}

/// The outcome of checking a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow(Identity),
    /// 401: no acceptable identity.
    Unauthenticated(String),
    /// 403: the identity may not do this.
    Forbidden(String),
}

/// The request checker of one server.
#[derive(Debug, Clone)]
pub struct Auth {
    node_name: String,
    allow_anonymous: bool,
    reviewer: Option<Arc<Reviewer>>,
}

impl Auth {
    /// A checker for `node_name`; without `reviewer` see the module docs.
    pub fn new(node_name: String, allow_anonymous: bool, reviewer: Option<Arc<Reviewer>>) -> Self {
        Self {
            node_name,
            allow_anonymous,
            reviewer,
        }
    }

    /// Authenticates and authorizes one request. `cert` is the verified client
    /// certificate's identity, `bearer` the `Authorization: Bearer` token.
    pub async fn check(
        &self,
        cert: Option<&crate::tls::ClientCertIdentity>,
        bearer: Option<&str>,
        method: &Method,
        path: &str,
    ) -> Result<Decision, ReviewError> {
        let identity = if let Some(c) = cert {
            Identity {
                user: c.user.clone(),
                groups: c.groups.clone(),
                uid: None,
                source: IdentitySource::ClientCert,
            }
        } else if let Some(token) = bearer {
            let Some(reviewer) = &self.reviewer else {
                return Ok(Decision::Unauthenticated(
                    "bearer tokens are not accepted: no authenticator configured".into(),
                ));
            };
            match reviewer.authenticate(token).await? {
                Some(id) => id,
                None => return Ok(Decision::Unauthenticated("invalid bearer token".into())),
            }
        } else if self.allow_anonymous {
            Identity::anonymous()
        } else {
            return Ok(Decision::Unauthenticated(
                "anonymous requests are not allowed".into(),
            ));
        };
        let attrs = attributes_for(method, path);
        let Some(reviewer) = &self.reviewer else {
            return Ok(Decision::Allow(identity));
        };
        let mut why = String::new();
        for sub in &attrs.subresources {
            let (allowed, reason) = reviewer
                .authorize(&identity, attrs.verb, &self.node_name, sub)
                .await?;
            if allowed {
                return Ok(Decision::Allow(identity));
            }
            why = reason;
        }
        let sub = attrs.subresources.last().copied().unwrap_or("proxy");
        let mut msg = format!(
            "Forbidden (user={}, verb={}, resource=nodes, subresource={sub})",
            identity.user, attrs.verb
        );
        if !why.is_empty() {
            msg.push_str(": ");
            msg.push_str(&why);
        }
        Ok(Decision::Forbidden(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_upstream_subresources_and_verbs() {
        let a = attributes_for(&Method::GET, "/stats/summary");
        assert_eq!((a.verb, a.subresources), ("get", vec!["stats"]));
        let a = attributes_for(&Method::GET, "/metrics/resource");
        assert_eq!(a.subresources, vec!["metrics"]);
        let a = attributes_for(&Method::GET, "/containerLogs/ns/p/c");
        assert_eq!(a.subresources, vec!["proxy"]);
        let a = attributes_for(&Method::POST, "/exec/ns/p/c");
        assert_eq!((a.verb, a.subresources), ("create", vec!["proxy"]));
        let a = attributes_for(&Method::GET, "/exec/ns/p/c");
        assert_eq!(a.verb, "create", "websocket GET exec still needs create");
        let a = attributes_for(&Method::GET, "/pods");
        assert_eq!(a.subresources, vec!["pods", "proxy"]);
        let a = attributes_for(&Method::GET, "/statsx");
        assert_eq!(a.subresources, vec!["proxy"]);
        let a = attributes_for(&Method::DELETE, "/logs/x");
        assert_eq!((a.verb, a.subresources), ("delete", vec!["log"]));
    }

    #[tokio::test]
    async fn anonymous_and_tokens_without_reviewer() {
        let auth = Auth::new("n".into(), false, None);
        let d = auth
            .check(None, None, &Method::GET, "/healthz")
            .await
            .expect("no review");
        assert!(matches!(d, Decision::Unauthenticated(_)));
        let d = auth
            .check(None, Some("tok"), &Method::GET, "/healthz")
            .await
            .expect("no review");
        assert!(matches!(d, Decision::Unauthenticated(_)));
        let cert = crate::tls::ClientCertIdentity {
            user: "u".into(),
            groups: vec!["g".into()],
        };
        let d = auth
            .check(Some(&cert), None, &Method::GET, "/pods")
            .await
            .expect("no review");
        assert!(matches!(d, Decision::Allow(Identity { ref user, .. }) if user == "u"));
        let open = Auth::new("n".into(), true, None);
        let d = open
            .check(None, None, &Method::GET, "/healthz")
            .await
            .expect("no review");
        assert_eq!(d, Decision::Allow(Identity::anonymous()));
    }
}
