//! `/exec`, `/attach` and `/portForward`: request parsing, then the SPDY or WebSocket
//! upgrade, then a session task that translates streams to one provider call.
//!
//! Query parameters are the ones the API server sends the kubelet (`input`, `output`,
//! `error`, `tty`, repeated `command`); the public names `stdin`/`stdout`/`stderr` are
//! accepted too for direct clients. With `tty`, stderr is forced off. A request
//! without any of stdin/stdout/stderr, or an exec without a command, is a 400 before
//! any upgrade; so is a request that is not an upgrade.

pub(crate) mod negotiate;
pub(crate) mod portforward;
pub(crate) mod remotecommand;
pub(crate) mod status;
pub(crate) mod websocket;

use std::collections::HashMap;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info_span};
use vzk_core::PodKey;
use vzk_core::streams::ContainerRef;

use crate::error::ApiError;
use crate::query;
use crate::server::AppState;
use negotiate::{PORTFORWARD_PROTOCOLS, REMOTECOMMAND_PROTOCOLS, UpgradeKind};

/// Which remotecommand operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Run a new command.
    Exec,
    /// Attach to the main process.
    Attach,
}

/// A parsed exec/attach request.
#[derive(Debug, Clone)]
pub(crate) struct ExecRequest {
    pub(crate) op: Op,
    pub(crate) target: ContainerRef,
    pub(crate) command: Vec<String>,
    pub(crate) stdin: bool,
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
    pub(crate) tty: bool,
}

fn path_part(p: &HashMap<String, String>, k: &str) -> Result<String, ApiError> {
    p.get(k)
        .cloned()
        .ok_or_else(|| ApiError::BadRequest(format!("missing {k} in path")))
}

pub(crate) fn parse_exec(
    op: Op,
    p: &HashMap<String, String>,
    raw: Option<&str>,
) -> Result<ExecRequest, ApiError> {
    let q = query::pairs(raw)?;
    let flag = |a: &str, b: &str| -> Result<bool, ApiError> {
        Ok(query::bool_of(&q, a)? || query::bool_of(&q, b)?)
    };
    let tty = query::bool_of(&q, "tty")?;
    let stdin = flag("input", "stdin")?;
    let stdout = flag("output", "stdout")?;
    let stderr = flag("error", "stderr")? && !tty;
    if !stdin && !stdout && !stderr {
        return Err(ApiError::BadRequest(
            "you must specify at least 1 of stdin, stdout, stderr".into(),
        ));
    }
    let command = query::all(&q, "command");
    if op == Op::Exec && command.is_empty() {
        return Err(ApiError::BadRequest("you must specify a command".into()));
    }
    Ok(ExecRequest {
        op,
        target: ContainerRef {
            namespace: path_part(p, "ns")?,
            pod: path_part(p, "pod")?,
            uid: p.get("uid").cloned(),
            container: path_part(p, "container")?,
        },
        command,
        stdin,
        stdout,
        stderr,
        tty,
    })
}

fn upgrade_required() -> Response {
    (StatusCode::BAD_REQUEST, "Upgrade request required\n").into_response()
}

pub(crate) async fn exec(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    req: Request,
) -> Response {
    remote_command(st, Op::Exec, &p, req).await
}

pub(crate) async fn attach(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    req: Request,
) -> Response {
    remote_command(st, Op::Attach, &p, req).await
}

async fn remote_command(
    st: AppState,
    op: Op,
    p: &HashMap<String, String>,
    mut req: Request,
) -> Response {
    let parsed = match parse_exec(op, p, req.uri().query()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match negotiate::upgrade_kind(req.headers()) {
        Some(UpgradeKind::Spdy) => {
            let protocol = match negotiate::negotiate(req.headers(), &REMOTECOMMAND_PROTOCOLS) {
                Ok(p) => p,
                Err(refusal) => return refusal.into_response(),
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            let span = info_span!("remotecommand", op = ?parsed.op, pod.ns = %parsed.target.namespace, pod.name = %parsed.target.pod, container = %parsed.target.container, protocol);
            tokio::spawn(
                async move {
                    match on_upgrade.await {
                        Ok(up) => {
                            remotecommand::serve(TokioIo::new(up), st, parsed, protocol).await
                        }
                        Err(error) => debug!(%error, "remotecommand: upgrade failed"),
                    }
                }
                .instrument(span),
            );
            negotiate::spdy_switching(protocol)
        }
        Some(UpgradeKind::WebSocket) => websocket::remote_command(st, parsed, req).await,
        None => upgrade_required(),
    }
}

pub(crate) async fn port_forward(
    State(st): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    mut req: Request,
) -> Response {
    let pod = match (path_part(&p, "ns"), path_part(&p, "pod")) {
        (Ok(namespace), Ok(name)) => PodKey {
            namespace,
            name,
            uid: p.get("uid").cloned().unwrap_or_default(),
        },
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    match negotiate::upgrade_kind(req.headers()) {
        Some(UpgradeKind::Spdy) => {
            let protocol = match negotiate::negotiate(req.headers(), &PORTFORWARD_PROTOCOLS) {
                Ok(p) => p,
                Err(refusal) => return refusal.into_response(),
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            let span = info_span!("portforward", pod.ns = %pod.namespace, pod.name = %pod.name);
            tokio::spawn(
                async move {
                    match on_upgrade.await {
                        Ok(up) => {
                            portforward::serve(
                                TokioIo::new(up),
                                st,
                                pod,
                                crate::metrics::Transport::Spdy,
                            )
                            .await
                        }
                        Err(error) => debug!(%error, "portforward: upgrade failed"),
                    }
                }
                .instrument(span),
            );
            negotiate::spdy_switching(protocol)
        }
        Some(UpgradeKind::WebSocket) => websocket::port_forward(st, pod, req).await,
        None => upgrade_required(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(uid: bool) -> HashMap<String, String> {
        let mut p = HashMap::new();
        p.insert("ns".into(), "n".into());
        p.insert("pod".into(), "p".into());
        p.insert("container".into(), "c".into());
        if uid {
            p.insert("uid".into(), "u".into());
        }
        p
    }

    #[test]
    fn exec_query_follows_the_api_server_rewrite() {
        let r = parse_exec(
            Op::Exec,
            &path(true),
            Some("command=sh&command=-c&command=true&input=1&output=1&error=1&tty=1"),
        )
        .expect("valid");
        assert_eq!(r.command, vec!["sh", "-c", "true"]);
        assert!(r.stdin && r.stdout && r.tty);
        assert!(!r.stderr, "tty forces stderr off");
        assert_eq!(r.target.uid.as_deref(), Some("u"));
        let r = parse_exec(Op::Attach, &path(false), Some("stdout=true"))
            .expect("public names accepted");
        assert!(r.stdout && r.command.is_empty());
        assert!(
            parse_exec(Op::Exec, &path(false), Some("command=ls")).is_err(),
            "no stream requested"
        );
        assert!(
            parse_exec(Op::Exec, &path(false), Some("output=1")).is_err(),
            "exec without command"
        );
    }
}
