//! The agent's own requests to the API server, counted for `/metrics`:
//! `vzk_apiserver_requests_total{verb,code}`, where `verb` is the Kubernetes verb
//! (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`)
//! and `code` the HTTP status (0 when no response came). The node's API writes are the
//! `create`, `update`, `patch` and `delete` series.
//!
//! [`ApiRequestMetrics::layer`] is a tower layer for the client's HTTP stack
//! (`kube::client::ClientBuilder::with_layer`), so every controller's request is
//! counted once, whatever code path made it; [`ApiRequestMetrics::wrap`] does the same
//! around a client already built.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: &'static str,
    code: u16,
}

/// Counts of the agent's API requests.
#[derive(Debug, Clone, Default)]
pub struct ApiRequestMetrics {
    requests: Family<RequestLabels, Counter>,
}

impl ApiRequestMetrics {
    /// Registers `vzk_apiserver_requests_total` into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vzk_apiserver_requests",
            "Requests of this agent to the API server, by verb and HTTP status code (0: no response)",
            self.requests.clone(),
        );
    }

    /// The tower layer that counts every request passing through it.
    pub fn layer(&self) -> CountLayer {
        CountLayer {
            metrics: self.clone(),
        }
    }

    /// `client`, with every request counted (for a client whose HTTP stack is built
    /// elsewhere). Errors pass through unchanged: kube unwraps its own error again.
    pub fn wrap(&self, client: kube::Client) -> kube::Client {
        use tower::Layer as _;
        let namespace = client.default_namespace().to_owned();
        let send = tower::service_fn(move |req: Request<kube::client::Body>| {
            let client = client.clone();
            async move { client.send(req).await }
        });
        kube::Client::new(self.layer().layer(send), namespace)
    }

    /// How many requests of `verb` got `code` so far.
    pub fn count(&self, verb: &'static str, code: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { verb, code })
            .get()
    }

    fn observe(&self, verb: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { verb, code })
            .inc();
    }
}

/// The Kubernetes verb of a request to the API server.
pub fn verb_of(method: &Method, uri: &http::Uri) -> &'static str {
    let watch = uri
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    match *method {
        Method::GET if watch => "watch",
        Method::GET if is_collection(uri.path()) => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if is_collection(uri.path()) => "deletecollection",
        Method::DELETE => "delete",
        _ => "other",
    }
}

/// Whether `path` names a collection (`/api/v1/pods`, `/api/v1/namespaces/ns/pods`,
/// `/apis/g/v1/namespaces`) rather than one object or its subresource.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Past `/api/<version>` or `/apis/<group>/<version>`.
    let skip = if segments.first() == Some(&"api") {
        2
    } else {
        3
    };
    let mut rest = segments.get(skip..).unwrap_or(&[]);
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        rest = &rest[2..];
    }
    rest.len() == 1
}

/// See [`ApiRequestMetrics::layer`].
#[derive(Debug, Clone)]
pub struct CountLayer {
    metrics: ApiRequestMetrics,
}

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;

    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service that counts its requests by verb and response code.
#[derive(Debug, Clone)]
pub struct Count<S> {
    inner: S,
    metrics: ApiRequestMetrics,
}

impl<S, B, R> tower::Service<Request<B>> for Count<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let verb = verb_of(req.method(), req.uri());
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = res.as_ref().map_or(0, |r| r.status().as_u16());
            metrics.observe(verb, code);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    #[test]
    fn verbs_of_requests() {
        let cases = [
            ("GET", "/api/v1/namespaces/ns/pods/p", "get"),
            ("GET", "/api/v1/namespaces/ns/pods", "list"),
            (
                "GET",
                "/api/v1/pods?fieldSelector=spec.nodeName%3Dn",
                "list",
            ),
            ("GET", "/api/v1/pods?watch=true&resourceVersion=1", "watch"),
            ("GET", "/api/v1/nodes/n", "get"),
            ("GET", "/api/v1/namespaces", "list"),
            ("GET", "/api/v1/namespaces/ns", "get"),
            ("GET", "/api/v1/namespaces/ns/pods/p/status", "get"),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n",
                "get",
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n",
                "update",
            ),
            ("PATCH", "/api/v1/namespaces/ns/pods/p/status", "patch"),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                "create",
            ),
            ("DELETE", "/api/v1/namespaces/ns/pods/p", "delete"),
            ("DELETE", "/api/v1/namespaces/ns/pods", "deletecollection"),
        ];
        for (method, uri, want) in cases {
            let m: Method = method.parse().expect("method");
            let u: http::Uri = uri.parse().expect("uri");
            assert_eq!(verb_of(&m, &u), want, "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn the_layer_counts_by_verb_and_code() {
        let metrics = ApiRequestMetrics::default();
        let svc = tower::service_fn(|req: Request<()>| async move {
            let code = if req.uri().path().ends_with("/missing") {
                404
            } else {
                200
            };
            Ok::<_, std::convert::Infallible>(
                Response::builder().status(code).body(()).expect("response"),
            )
        });
        let mut svc = metrics.layer().layer(svc);
        for (method, uri) in [
            ("PATCH", "/api/v1/namespaces/ns/pods/p/status"),
            ("PATCH", "/api/v1/namespaces/ns/pods/q/status"),
            ("GET", "/api/v1/namespaces/ns/secrets/missing"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .expect("request");
            svc.ready().await.expect("ready");
            svc.call(req).await.expect("call");
        }
        assert_eq!(metrics.count("patch", 200), 2);
        assert_eq!(metrics.count("get", 404), 1);
        assert_eq!(metrics.count("get", 200), 0);
        let mut r = Registry::default();
        metrics.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
        assert!(
            text.contains("vzk_apiserver_requests_total{verb=\"patch\",code=\"200\"} 2"),
            "{text}"
        );
    }
}
