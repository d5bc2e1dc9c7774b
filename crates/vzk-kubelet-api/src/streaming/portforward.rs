//! port-forward over SPDY (`portforward.k8s.io`), also used inside the WebSocket
//! `SPDY/3.1+portforward.k8s.io` tunnel.
//!
//! Each forwarded connection is a pair of streams sharing a `requestID` header: `error`
//! (half-closed by the client at once) and `data`, both with a `port` header. Pairs
//! are matched by `requestID` (derived from the stream IDs for clients that send
//! none); a pair incomplete after the stream-creation timeout is dropped with a message
//! on its error stream. A complete pair becomes one provider `port_forward` call; a
//! failure is reported as `{"closeConnection":..,"message":..}` on the error stream.
//! One session carries any number of concurrent pairs until the client disconnects.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};
use vzk_core::PodKey;
use vzk_core::ProviderError;

use crate::metrics::{StreamKind, Transport};
use crate::server::AppState;
use crate::spdy::frame::rst;
use crate::spdy::{IncomingStream, Session, SessionConfig, SessionError, SpdyStream};

struct Pending {
    port: u16,
    since: Instant,
    error: Option<SpdyStream>,
    data: Option<SpdyStream>,
}

/// The error-stream message for a failed forward.
pub(crate) fn error_message(pod: &PodKey, port: u16, err: &ProviderError) -> String {
    let msg = format!(
        "error forwarding port {port} to pod {}, uid {}: {}",
        pod,
        pod.uid,
        crate::error_chain(err)
    );
    // Connection resets and broken pipes leave the session usable; the rest do not.
    let close = !matches!(err, ProviderError::Failed { reason, .. } if reason == "ConnectionReset" || reason == "BrokenPipe");
    let mut v = serde_json::json!({ "message": msg });
    if close {
        v["closeConnection"] = serde_json::Value::Bool(true);
    }
    format!("{v}\n")
}

async fn forward(st: AppState, pod: PodKey, port: u16, data: SpdyStream, mut error: SpdyStream) {
    debug!(port, stream = data.id(), "portforward: forwarding");
    if let Err(e) = st.runtime.port_forward(&pod, port, Box::pin(data)).await {
        debug!(port, error = %crate::error_chain(&e), "portforward: forward failed");
        let _ = error
            .write_all(error_message(&pod, port, &e).as_bytes())
            .await;
    }
    let _ = error.shutdown().await;
}

fn classify(incoming: &IncomingStream) -> Result<(bool, u16, String), &'static str> {
    let h = incoming.headers();
    let is_error = match h.get("streamtype") {
        Some("error") => true,
        Some("data") => false,
        _ => return Err("invalid or missing streamType"),
    };
    let port = h
        .get("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0)
        .ok_or("invalid or missing port")?;
    let id = match h.get("requestid") {
        Some(r) if !r.is_empty() => r.to_owned(),
        // Very old clients: the error stream comes first, two IDs before its data stream.
        _ if is_error => incoming.id().to_string(),
        _ => incoming.id().saturating_sub(2).to_string(),
    };
    Ok((is_error, port, id))
}

/// Serves one port-forward SPDY session on `io`.
pub(crate) async fn serve<T>(io: T, st: AppState, pod: PodKey, transport: Transport)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    serve_session(
        Session::start(io, SessionConfig::default()),
        st,
        pod,
        transport,
    )
    .await
}

/// Serves one port-forward SPDY session, started by the caller on its transport.
pub(crate) async fn serve_session(
    session: Result<Session, SessionError>,
    st: AppState,
    pod: PodKey,
    transport: Transport,
) {
    let _open = st.metrics.session(StreamKind::PortForward, transport);
    let mut session = match session {
        Ok(s) => s,
        Err(error) => {
            warn!(error = %crate::error_chain(&error), "portforward: cannot start SPDY session");
            return;
        }
    };
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            next = session.next_stream() => {
                let Some(incoming) = next else { break };
                let (is_error, port, id) = match classify(&incoming) {
                    Ok(c) => c,
                    Err(why) => {
                        debug!(why, "portforward: rejecting stream");
                        incoming.reject(rst::PROTOCOL_ERROR);
                        continue;
                    }
                };
                let Some(stream) = incoming.accept() else { continue };
                let p = pending.entry(id.clone()).or_insert_with(|| Pending { port, since: Instant::now(), error: None, data: None });
                if is_error { p.error = Some(stream) } else { p.data = Some(stream) }
                if p.error.is_some() && p.data.is_some()
                    && let Some(Pending { port, error: Some(e), data: Some(d), .. }) = pending.remove(&id)
                {
                    tasks.spawn(forward(st.clone(), pod.clone(), port, d, e));
                }
            }
            _ = tick.tick() => {
                let timeout = st.stream_creation_timeout;
                let stale: Vec<String> = pending.iter().filter(|(_, p)| p.since.elapsed() > timeout).map(|(k, _)| k.clone()).collect();
                for k in stale {
                    if let Some(p) = pending.remove(&k) {
                        debug!(request_id = %k, port = p.port, "portforward: stream pair incomplete, dropped");
                        if let Some(mut e) = p.error {
                            let msg = format!("timed out waiting for the data stream of request {k} after {timeout:?}");
                            let _ = e.write_all(msg.as_bytes()).await;
                        }
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = st.shutdown.cancelled() => break,
        }
    }
    tasks.abort_all();
    session.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_closes_the_connection_unless_reset() {
        let pod = PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let m = error_message(
            &pod,
            80,
            &ProviderError::failed("ConnectionRefused", "refused"),
        );
        let v: serde_json::Value = serde_json::from_str(m.trim_end()).expect("json");
        assert_eq!(v["closeConnection"], true);
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("error forwarding port 80 to pod ns/p, uid u:"))
        );
        let m = error_message(&pod, 80, &ProviderError::failed("ConnectionReset", "reset"));
        let v: serde_json::Value = serde_json::from_str(m.trim_end()).expect("json");
        assert!(v.get("closeConnection").is_none());
    }
}
