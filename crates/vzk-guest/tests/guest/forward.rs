//! Port forwarding to a guest TCP port through the SSH connection (direct-tcpip).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vzk_guest::GuestError;

use crate::support::Dropbear;
use crate::within;

/// A loopback TCP echo server; returns its port.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_tcp_round_trips_bytes_and_refuses_closed_ports() {
    let db = Dropbear::start();
    let s = db.session();
    let port = echo_server().await;
    let data: Vec<u8> = (0..(2usize << 20) + 3)
        .map(|i| (i * 31 + (i >> 10)) as u8)
        .collect();

    for round in 0..2 {
        let (client, ours) = tokio::io::duplex(1 << 16);
        let s2 = s.clone();
        let fwd = tokio::spawn(async move { s2.forward_tcp(port, Box::pin(ours)).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let payload = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&payload)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            wr.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        });
        let mut got = Vec::new();
        within(60, rd.read_to_end(&mut got))
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        within(10, writer).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), data.len(), "round {round}");
        assert!(got == data, "round {round}: bytes differ");
        let (up, down) = within(30, fwd)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((up, down), (data.len() as u64, data.len() as u64));
    }
    assert_eq!(s.dial_count(), 1);

    // Nothing listens on the target port: the guest refuses the channel.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
    };
    let (_client, ours) = tokio::io::duplex(1024);
    let r = within(30, s.forward_tcp(closed, Box::pin(ours))).await;
    assert!(matches!(r, Err(GuestError::ChannelRefused { .. })), "{r:?}");
    // The refusal did not cost the connection.
    assert!(s.ready().await);
    assert_eq!(s.dial_count(), 1);
}
