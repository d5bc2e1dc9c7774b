//! The agent's own metrics for `/metrics`, kept and encoded by `prometheus-client`
//! (OpenMetrics text): `vzk_kubelet_api_requests_total` by route and status code,
//! `vzk_kubelet_api_streaming_sessions_open` by kind, and
//! `vzk_kubelet_api_streaming_sessions_total` (started) by kind and transport; plus
//! whatever the agent's other components registered in the registry handed to the
//! builder (`KubeletServerBuilder::metrics_registry`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`ApiMetrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    kind: &'static str,
    transport: &'static str,
}

/// Counters of the kubelet API.
pub struct ApiMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    open: Family<KindLabels, Gauge>,
    sessions: Family<SessionLabels, Counter>,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics").finish_non_exhaustive()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new(Registry::default())
    }
}

impl ApiMetrics {
    /// Registers the kubelet API's series into `registry`, which [`ApiMetrics::render`]
    /// then encodes whole (other components' series included).
    pub fn new(mut registry: Registry) -> Self {
        let (requests, open, sessions) = (Family::default(), Family::default(), Family::default());
        registry.register(
            "vzk_kubelet_api_requests",
            "Kubelet API requests by route and HTTP status code",
            Family::<RequestLabels, Counter>::clone(&requests),
        );
        registry.register(
            "vzk_kubelet_api_streaming_sessions_open",
            "Open exec/attach/port-forward sessions",
            Family::<KindLabels, Gauge>::clone(&open),
        );
        // A counter's samples are `<name>_total`.
        registry.register(
            "vzk_kubelet_api_streaming_sessions",
            "Streaming sessions started, by kind and transport",
            Family::<SessionLabels, Counter>::clone(&sessions),
        );
        // Every kind is reported, 0 before its first session.
        for kind in ["exec", "attach", "portforward"] {
            let _ = open.get_or_create(&KindLabels { kind });
        }
        Self {
            registry,
            requests,
            open,
            sessions,
        }
    }
}

/// The wire a streaming session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// SPDY/3.1 directly on the upgraded connection.
    Spdy,
    /// WebSocket, including the `SPDY/3.1+portforward.k8s.io` tunnel.
    WebSocket,
}

/// A streaming session kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `/exec`.
    Exec,
    /// `/attach`.
    Attach,
    /// `/portForward`.
    PortForward,
}

/// Decrements the open-session gauge when dropped.
#[derive(Debug)]
pub struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ApiMetrics {
    /// Counts one finished request.
    pub fn request(&self, route: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, code })
            .inc();
    }

    /// Counts a streaming session and marks it open until the guard drops.
    pub fn session(&self, kind: StreamKind, transport: Transport) -> SessionGuard {
        let kind = match kind {
            StreamKind::Exec => "exec",
            StreamKind::Attach => "attach",
            StreamKind::PortForward => "portforward",
        };
        let transport = match transport {
            Transport::Spdy => "spdy",
            Transport::WebSocket => "websocket",
        };
        self.sessions
            .get_or_create(&SessionLabels { kind, transport })
            .inc();
        let open = self.open.get_or_create(&KindLabels { kind }).clone();
        open.inc();
        SessionGuard(open)
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_sessions() {
        let m = ApiMetrics::default();
        m.request("healthz", 200);
        m.request("healthz", 200);
        m.request("exec", 403);
        let g = m.session(StreamKind::Exec, Transport::WebSocket);
        let text = m.render();
        assert!(
            text.contains("vzk_kubelet_api_requests_total{route=\"healthz\",code=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("vzk_kubelet_api_requests_total{route=\"exec\",code=\"403\"} 1"));
        assert!(text.contains("vzk_kubelet_api_streaming_sessions_open{kind=\"exec\"} 1"));
        assert!(text.contains("vzk_kubelet_api_streaming_sessions_open{kind=\"attach\"} 0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains(
            "vzk_kubelet_api_streaming_sessions_total{kind=\"exec\",transport=\"websocket\"} 1"
        ));
        drop(g);
        assert!(
            m.render()
                .contains("vzk_kubelet_api_streaming_sessions_open{kind=\"exec\"} 0")
        );
    }
}
