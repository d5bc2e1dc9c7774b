//! The HTTP side of the streaming endpoints: which upgrade a request asks for and the
//! `X-Stream-Protocol-Version` negotiation of `httpstream.Handshake`.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// SPDY sub-protocols of remotecommand, newest first (v5 is v4 over SPDY).
pub(crate) const REMOTECOMMAND_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// The SPDY sub-protocol of port-forward.
pub(crate) const PORTFORWARD_PROTOCOLS: [&str; 1] = ["portforward.k8s.io"];

/// What kind of upgrade a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeKind {
    /// `Upgrade: SPDY/3.1`.
    Spdy,
    /// `Upgrade: websocket`.
    WebSocket,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The upgrade requested, if `Connection: upgrade` and a known `Upgrade` are present.
pub(crate) fn upgrade_kind(headers: &HeaderMap) -> Option<UpgradeKind> {
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return None;
    }
    if has_token(headers, header::UPGRADE, "SPDY/3.1") {
        Some(UpgradeKind::Spdy)
    } else if has_token(headers, header::UPGRADE, "websocket") {
        Some(UpgradeKind::WebSocket)
    } else {
        None
    }
}

/// A refused upgrade: status, message and (for 403) the protocols we accept.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
    accepted: &'static [&'static str],
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, message: String) -> Self {
        Self {
            status,
            message,
            accepted: &[],
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = (self.status, format!("{}\n", self.message)).into_response();
        for p in self.accepted {
            resp.headers_mut().append(
                "x-accepted-stream-protocol-versions",
                HeaderValue::from_static(p),
            );
        }
        resp
    }
}

/// Picks the first client protocol (in the client's order, all header lines split on
/// `,`) that the server supports. `Err` is the response to send: 400 without the
/// header, 403 listing ours when nothing matches.
pub(crate) fn negotiate(
    headers: &HeaderMap,
    ours: &'static [&'static str],
) -> Result<&'static str, Refusal> {
    let offered: Vec<&str> = headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if offered.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: X-Stream-Protocol-Version header is missing".into(),
        ));
    }
    if let Some(p) = offered.iter().find_map(|o| ours.iter().find(|s| **s == *o)) {
        return Ok(p);
    }
    Err(Refusal {
        status: StatusCode::FORBIDDEN,
        message: format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {ours:?}"
        ),
        accepted: ours,
    })
}

/// The `101 Switching Protocols` answer to a SPDY upgrade.
pub(crate) fn spdy_switching(protocol: &'static str) -> Response {
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn detects_upgrades() {
        assert_eq!(
            upgrade_kind(&headers(&[
                ("connection", "Upgrade"),
                ("upgrade", "SPDY/3.1")
            ])),
            Some(UpgradeKind::Spdy)
        );
        assert_eq!(
            upgrade_kind(&headers(&[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "WebSocket")
            ])),
            Some(UpgradeKind::WebSocket)
        );
        assert_eq!(upgrade_kind(&headers(&[("upgrade", "SPDY/3.1")])), None);
        assert_eq!(
            upgrade_kind(&headers(&[("connection", "upgrade"), ("upgrade", "h2c")])),
            None
        );
    }

    #[test]
    fn negotiation_follows_client_order_across_header_lines() {
        let h = headers(&[
            (
                "x-stream-protocol-version",
                "v9.channel.k8s.io, v4.channel.k8s.io",
            ),
            ("x-stream-protocol-version", "v5.channel.k8s.io"),
        ]);
        assert_eq!(
            negotiate(&h, &REMOTECOMMAND_PROTOCOLS).ok(),
            Some("v4.channel.k8s.io")
        );
        let missing = negotiate(&headers(&[]), &REMOTECOMMAND_PROTOCOLS)
            .err()
            .map(|r| r.status);
        assert_eq!(missing, Some(StatusCode::BAD_REQUEST));
        let none = negotiate(
            &headers(&[("x-stream-protocol-version", "v9.channel.k8s.io")]),
            &REMOTECOMMAND_PROTOCOLS,
        )
        .expect_err("no match")
        .into_response();
        assert_eq!(none.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            none.headers()
                .get_all("x-accepted-stream-protocol-versions")
                .iter()
                .count(),
            5
        );
    }
}
