//! The agent's own metrics for `/metrics` (Prometheus text): requests by route and
//! status code, and open streaming sessions by kind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// Counters of the kubelet API.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    exec: AtomicI64,
    attach: AtomicI64,
    port_forward: AtomicI64,
    sessions_total: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
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
pub struct SessionGuard<'a>(&'a AtomicI64);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ApiMetrics {
    /// Counts one finished request.
    pub fn request(&self, route: &'static str, code: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, code)).or_default() += 1;
        }
    }

    /// Counts a streaming session and marks it open until the guard drops.
    pub fn session(&self, kind: StreamKind, transport: Transport) -> SessionGuard<'_> {
        let (g, k) = match kind {
            StreamKind::Exec => (&self.exec, "exec"),
            StreamKind::Attach => (&self.attach, "attach"),
            StreamKind::PortForward => (&self.port_forward, "portforward"),
        };
        let t = match transport {
            Transport::Spdy => "spdy",
            Transport::WebSocket => "websocket",
        };
        if let Ok(mut m) = self.sessions_total.lock() {
            *m.entry((k, t)).or_default() += 1;
        }
        g.fetch_add(1, Ordering::Relaxed);
        SessionGuard(g)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP vzk_kubelet_api_requests_total Kubelet API requests by route and HTTP status code.\n");
        out.push_str("# TYPE vzk_kubelet_api_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, code), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "vzk_kubelet_api_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
                );
            }
        }
        out.push_str(
            "# HELP vzk_kubelet_api_streaming_sessions Open exec/attach/port-forward sessions.\n",
        );
        out.push_str("# TYPE vzk_kubelet_api_streaming_sessions gauge\n");
        for (kind, g) in [
            ("exec", &self.exec),
            ("attach", &self.attach),
            ("portforward", &self.port_forward),
        ] {
            let _ = writeln!(
                out,
                "vzk_kubelet_api_streaming_sessions{{kind=\"{kind}\"}} {}",
                g.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP vzk_kubelet_api_streaming_sessions_total Streaming sessions started, by kind and transport.\n");
        out.push_str("# TYPE vzk_kubelet_api_streaming_sessions_total counter\n");
        if let Ok(m) = self.sessions_total.lock() {
            for ((kind, transport), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "vzk_kubelet_api_streaming_sessions_total{{kind=\"{kind}\",transport=\"{transport}\"}} {n}"
                );
            }
        }
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
        assert!(text.contains("vzk_kubelet_api_streaming_sessions{kind=\"exec\"} 1"));
        assert!(text.contains(
            "vzk_kubelet_api_streaming_sessions_total{kind=\"exec\",transport=\"websocket\"} 1"
        ));
        drop(g);
        assert!(
            m.render()
                .contains("vzk_kubelet_api_streaming_sessions{kind=\"exec\"} 0")
        );
    }
}
