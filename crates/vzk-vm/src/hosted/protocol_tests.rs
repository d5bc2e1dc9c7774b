//! Unit tests of [`super`]: request parsing (garbage included), framing, message shapes
//! and the error mappings.

use super::*;

fn err_of(frame: &[u8]) -> (Option<u64>, WireError) {
    match parse_request(frame) {
        Ok(ok) => panic!("{:?} parsed as {ok:?}", String::from_utf8_lossy(frame)),
        Err(e) => e,
    }
}

#[test]
fn every_op_round_trips() {
    let ops = [
        Op::Hello { version: VERSION },
        Op::State,
        Op::Ip,
        Op::Subscribe,
        Op::Start,
        Op::RequestStop,
        Op::ForceStop,
        Op::SaveState,
        Op::Remove,
        Op::ConsolePath,
        Op::Usage,
    ];
    assert_eq!(ops.len(), OP_NAMES.len());
    for (i, op) in ops.into_iter().enumerate() {
        let id = u64::try_from(i).unwrap_or(0) + 40;
        assert_eq!(parse_request(&op.to_request(id)).ok(), Some((id, op)));
    }
    assert_eq!(
        parse_request(br#"{"id":1,"op":"hello","version":1}"#).ok(),
        Some((1, Op::Hello { version: 1 }))
    );
    // Unknown fields are tolerated (a newer client may add some).
    assert_eq!(
        parse_request(br#"{"id":2,"op":"state","trace":"x"}"#).ok(),
        Some((2, Op::State))
    );
}

#[test]
fn garbage_frames_get_clear_errors() {
    for frame in [
        &b"not json"[..],
        b"{",
        b"\xff\xfe\x00garbage",
        b"[1,2,3]",
        b"42",
        b"null",
        b"\"state\"",
        b"{}",
        br#"{"op":"state"}"#,
        br#"{"id":-1,"op":"state"}"#,
        br#"{"id":"1","op":"state"}"#,
        br#"{"id":1.5,"op":"state"}"#,
    ] {
        let (id, e) = err_of(frame);
        assert_eq!(id, None, "{}", String::from_utf8_lossy(frame));
        assert_eq!(e.kind, ErrorKind::Malformed);
        assert!(!e.message.is_empty());
    }
    let (id, e) = err_of(br#"{"id":7}"#);
    assert_eq!((id, e.kind), (Some(7), ErrorKind::Malformed));
    assert!(e.message.contains("\"op\""), "{e}");
    let (id, e) = err_of(br#"{"id":7,"op":3}"#);
    assert_eq!((id, e.kind), (Some(7), ErrorKind::Malformed));
    let (id, e) = err_of(br#"{"id":8,"op":"frobnicate"}"#);
    assert_eq!((id, e.kind), (Some(8), ErrorKind::UnknownOp));
    assert!(
        e.message.contains("frobnicate") && e.message.contains("requestStop"),
        "{e}"
    );
    let (id, e) = err_of(br#"{"id":9,"op":"hello"}"#);
    assert_eq!((id, e.kind), (Some(9), ErrorKind::Malformed));
    assert!(e.message.contains("version"), "{e}");
    let (_, e) = err_of(br#"{"id":9,"op":"hello","version":99999999999}"#);
    assert_eq!(e.kind, ErrorKind::Malformed);
    // A huge op name is cut in the message.
    let long = format!(r#"{{"id":1,"op":"{}"}}"#, "x".repeat(10_000));
    let (_, e) = err_of(long.as_bytes());
    assert!(e.message.len() < 400, "{}", e.message.len());
}

#[test]
fn messages_have_the_documented_shape() {
    let m = ServerMessage::Reply {
        id: Some(3),
        result: Outcome::Ok(Answer::State {
            state: VmState::Running,
        }),
    };
    let v: serde_json::Value = serde_json::from_slice(&encode(&m)).unwrap_or_default();
    assert_eq!(
        v,
        serde_json::json!({"type":"reply","id":3,"result":{"ok":{"kind":"state","state":{"state":"running"}}}})
    );
    let e = ServerMessage::Reply {
        id: None,
        result: Outcome::Err(WireError::new(ErrorKind::Malformed, "bad")),
    };
    let v: serde_json::Value = serde_json::from_slice(&encode(&e)).unwrap_or_default();
    assert_eq!(
        v,
        serde_json::json!({"type":"reply","id":null,"result":{"err":{"kind":"malformed","message":"bad"}}})
    );
    let ip = ServerMessage::Ip {
        ip: Some(Ipv4Addr::new(192, 0, 2, 10)),
    };
    let v: serde_json::Value = serde_json::from_slice(&encode(&ip)).unwrap_or_default();
    assert_eq!(v, serde_json::json!({"type":"ip","ip":"192.0.2.10"}));
    for m in [
        m,
        e,
        ip,
        ServerMessage::State {
            state: VmState::Failed { reason: "x".into() },
        },
        ServerMessage::Reply {
            id: Some(1),
            result: Outcome::Ok(Answer::Usage {
                host: Some(WireUsage {
                    cpu_ns: u64::MAX,
                    rss_bytes: 1,
                }),
                vm: None,
            }),
        },
        ServerMessage::Reply {
            id: Some(2),
            result: Outcome::Ok(Answer::Hello {
                version: 1,
                vm_id: "v".into(),
                pid: 5,
            }),
        },
    ] {
        let back: Result<ServerMessage, _> = serde_json::from_slice(&encode(&m));
        assert_eq!(back.ok(), Some(m));
    }
}

#[test]
fn vm_errors_survive_the_wire() {
    let state = VmState::Stopped;
    let e = VmError::InvalidState {
        id: "v".into(),
        operation: "start",
        state: state.clone(),
    };
    let back = WireError::from_vm_error(&e).into_vm_error("v", Op::Start);
    assert!(
        matches!(back, VmError::InvalidState { state: s, operation: "start", .. } if s == state)
    );
    let e = VmError::LimitReached {
        id: "v".into(),
        detail: "VZErrorDomain 6".into(),
    };
    let back = WireError::from_vm_error(&e).into_vm_error("v", Op::Start);
    assert!(matches!(back, VmError::LimitReached { detail, .. } if detail == "VZErrorDomain 6"));
    let e = VmError::Unsupported {
        backend: BackendKind::Vz,
        operation: "request stop",
    };
    let back = WireError::from_vm_error(&e).into_vm_error("v", Op::RequestStop);
    assert!(matches!(
        back,
        VmError::Unsupported {
            backend: BackendKind::Vz,
            operation: "request stop"
        }
    ));
    let e = VmError::Start {
        id: "v".into(),
        source: "no disk".into(),
    };
    let w = WireError::from_vm_error(&e);
    assert_eq!(w.kind, ErrorKind::Failed);
    let back = w.into_vm_error("v", Op::Start);
    assert!(matches!(&back, VmError::Start { .. }));
    assert!(chain(&back).contains("no disk"), "{}", chain(&back));
    // An invalidState without a state (a confused host) is still an error of the op.
    let w = WireError::new(ErrorKind::InvalidState, "?");
    assert!(matches!(
        w.into_vm_error("v", Op::Remove),
        VmError::Remove { .. }
    ));
}

async fn frames(input: &[u8], max: usize) -> Vec<Frame> {
    let mut r = tokio::io::BufReader::with_capacity(7, input);
    let mut out = Vec::new();
    while let Ok(Some(f)) = read_frame(&mut r, max).await {
        out.push(f);
    }
    out
}

#[tokio::test]
async fn framing_discards_long_lines_and_keeps_sync() {
    let input = b"short\nthis line is far too long\n\nok\nlast-without-newline";
    assert_eq!(
        frames(input, 10).await,
        vec![
            Frame::Line(b"short".to_vec()),
            Frame::TooLong(25),
            Frame::Line(Vec::new()),
            Frame::Line(b"ok".to_vec()),
            Frame::TooLong(20),
        ]
    );
    assert_eq!(
        frames(b"a\nbb", 10).await,
        vec![Frame::Line(b"a".to_vec()), Frame::Line(b"bb".to_vec())]
    );
    assert!(frames(b"", 10).await.is_empty());
    // Bytes that are not UTF-8 are a frame; parsing it is the caller's business.
    assert_eq!(
        frames(b"\xff\xfe\n", 10).await,
        vec![Frame::Line(vec![0xff, 0xfe])]
    );
}
