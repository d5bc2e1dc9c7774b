#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::proto::*;
use super::*;

const SIZE: u64 = 1 << 20;

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// In-memory export; reads overlapping `fail_at` fail.
struct Mem {
    fail_at: Option<u64>,
}

#[async_trait::async_trait]
impl Export for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self
            .fail_at
            .is_some_and(|f| (offset..offset + buf.len() as u64).contains(&f))
        {
            return Err(io::Error::other("registry fetch failed"));
        }
        buf.copy_from_slice(&pattern(offset, buf.len()));
        Ok(())
    }
}

/// Chunk `i` may complete only after chunk `i + 1` did: replies come back in reverse order, and
/// serving the requests one at a time would deadlock.
struct Chained {
    done: Vec<Semaphore>,
}
const CHUNK: u64 = 4096;

#[async_trait::async_trait]
impl Export for Chained {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let i = (offset / CHUNK) as usize;
        if let Some(next) = self.done.get(i + 1) {
            next.acquire().await.unwrap().forget();
        }
        buf.copy_from_slice(&pattern(offset, buf.len()));
        self.done[i].add_permits(1);
        Ok(())
    }
}

fn start(export: impl Export, opts: ServerOptions) -> (Client, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move { serve_connection(server, Arc::new(export), &opts).await });
    (Client(client), task)
}

struct Client(DuplexStream);

impl Client {
    async fn greet(&mut self) {
        assert_eq!(self.0.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(self.0.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            self.0.read_u16().await.unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        self.0
            .write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.0.write_u64(IHAVEOPT).await.unwrap();
        self.0.write_u32(option).await.unwrap();
        self.0.write_u32(data.len() as u32).await.unwrap();
        self.0.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (reply type, data).
    async fn opt_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.0.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        assert_eq!(self.0.read_u32().await.unwrap(), option);
        let kind = self.0.read_u32().await.unwrap();
        let mut data = vec![0; self.0.read_u32().await.unwrap() as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// NBD_OPT_INFO/GO for `name` asking for block sizes; returns the replies up to the final one.
    async fn info(&mut self, option: u32, name: &str) -> Vec<(u32, Vec<u8>)> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&[0, 1, 0, 3]); // one request: NBD_INFO_BLOCK_SIZE
        self.option(option, &data).await;
        let mut replies = vec![self.opt_reply(option).await];
        while replies.last().unwrap().0 == REP_INFO {
            replies.push(self.opt_reply(option).await);
        }
        replies
    }

    async fn go(&mut self) {
        self.greet().await;
        let replies = self.info(OPT_GO, "disk").await;
        assert_eq!(replies.last().unwrap().0, REP_ACK);
    }

    async fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) {
        self.0.write_u32(REQUEST_MAGIC).await.unwrap();
        self.0.write_u16(0).await.unwrap();
        self.0.write_u16(cmd).await.unwrap();
        self.0.write_u64(handle).await.unwrap();
        self.0.write_u64(offset).await.unwrap();
        self.0.write_u32(len).await.unwrap();
    }

    /// Reads a simple reply header: (error, handle).
    async fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (
            self.0.read_u32().await.unwrap(),
            self.0.read_u64().await.unwrap(),
        )
    }

    async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, handle, offset, len).await;
        let (error, got) = self.reply().await;
        assert_eq!(got, handle);
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0; len as usize];
        self.0.read_exact(&mut data).await.unwrap();
        Ok(data)
    }

    async fn disconnect(mut self, task: JoinHandle<Result<(), NbdError>>) {
        self.request(CMD_DISC, 0, 0, 0).await;
        task.await.unwrap().unwrap();
        assert_eq!(
            self.0.read(&mut [0; 1]).await.unwrap(),
            0,
            "server closed the stream"
        );
    }
}

#[tokio::test]
async fn go_then_reads_match_the_export() {
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    let replies = c.info(OPT_GO, "disk").await;
    let kinds: Vec<u32> = replies.iter().map(|r| r.0).collect();
    assert_eq!(kinds, [REP_INFO, REP_INFO, REP_ACK]);
    let tflags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&SIZE.to_be_bytes());
    export.extend_from_slice(&tflags.to_be_bytes());
    assert_eq!(replies[0].1, export);
    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        block.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(replies[1].1, block);

    for (offset, len) in [(0, 512), (4096, 65536), (12345, 1), (SIZE - 100, 100)] {
        assert_eq!(
            c.read(offset, offset, len).await.unwrap(),
            pattern(offset, len as usize)
        );
    }
    c.request(CMD_FLUSH, 7, 0, 0).await;
    assert_eq!(c.reply().await, (0, 7));
    c.disconnect(task).await;
}

#[tokio::test]
async fn info_list_unsupported_options_then_export_name() {
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    assert_eq!(c.info(OPT_INFO, "").await.last().unwrap().0, REP_ACK);
    c.option(OPT_LIST, &[]).await;
    assert_eq!(
        c.opt_reply(OPT_LIST).await,
        (REP_SERVER, b"\0\0\0\x04disk".to_vec())
    );
    assert_eq!(c.opt_reply(OPT_LIST).await.0, REP_ACK);
    c.option(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply(OPT_LIST).await.0, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 0, 9, b'd']).await; // name longer than the data
    assert_eq!(c.opt_reply(OPT_GO).await.0, REP_ERR_INVALID);
    for option in [OPT_STRUCTURED_REPLY, 5, 10, 11, 0xdead] {
        c.option(option, &[]).await;
        assert_eq!(c.opt_reply(option).await.0, REP_ERR_UNSUP);
    }
    c.option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.0.read_u64().await.unwrap(), SIZE);
    assert_eq!(
        c.0.read_u16().await.unwrap() & FLAG_READ_ONLY,
        FLAG_READ_ONLY
    );
    // NO_ZEROES negotiated: the next bytes are already a reply.
    assert_eq!(c.read(1, 0, 16).await.unwrap(), pattern(0, 16));
    c.disconnect(task).await;
}

#[tokio::test]
async fn unknown_export_name() {
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    assert_eq!(c.info(OPT_GO, "nope").await, [(REP_ERR_UNKNOWN, vec![])]);
    // The session goes on after an option error.
    assert_eq!(c.info(OPT_GO, "").await.last().unwrap().0, REP_ACK);
    c.disconnect(task).await;

    // NBD_OPT_EXPORT_NAME cannot report an error: the server hangs up.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::UnknownExport(n)) if n == "nope"));
    assert_eq!(c.0.read(&mut [0; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn abort_during_haggling() {
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply(OPT_ABORT).await.0, REP_ACK);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_reads_get_einval() {
    let opts = ServerOptions {
        max_request: 8192,
        ..Default::default()
    };
    let (mut c, task) = start(Mem { fail_at: None }, opts);
    c.go().await;
    assert_eq!(c.read(1, SIZE - 511, 512).await, Err(EINVAL));
    assert_eq!(c.read(2, u64::MAX - 10, 512).await, Err(EINVAL));
    assert_eq!(c.read(3, 0, 0).await, Err(EINVAL));
    assert_eq!(c.read(4, 0, 8193).await, Err(EINVAL));
    c.request(0x55, 5, 0, 0).await;
    assert_eq!(c.reply().await, (EINVAL, 5));
    assert_eq!(c.read(6, 0, 8192).await.unwrap(), pattern(0, 8192));
    c.disconnect(task).await;
}

#[tokio::test]
async fn export_error_gives_eio_and_the_connection_keeps_working() {
    let (mut c, task) = start(
        Mem {
            fail_at: Some(5000),
        },
        ServerOptions::default(),
    );
    c.go().await;
    assert_eq!(c.read(1, 4096, 4096).await, Err(EIO));
    assert_eq!(c.read(2, 8192, 4096).await.unwrap(), pattern(8192, 4096));
    assert_eq!(c.read(3, 4096, 4096).await, Err(EIO));
    c.disconnect(task).await;
}

#[tokio::test]
async fn writes_get_eperm_and_stay_in_sync() {
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.go().await;
    c.request(CMD_WRITE, 1, 0, 1000).await;
    // A payload that looks like a request: the server must not parse it as one.
    let mut payload = vec![0xab; 1000];
    payload[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    c.0.write_all(&payload).await.unwrap();
    assert_eq!(c.reply().await, (EPERM, 1));
    for (handle, cmd) in [(2, CMD_TRIM), (3, CMD_WRITE_ZEROES)] {
        c.request(cmd, handle, 0, 4096).await;
        assert_eq!(c.reply().await, (EPERM, handle));
    }
    assert_eq!(c.read(4, 100, 200).await.unwrap(), pattern(100, 200));
    c.disconnect(task).await;

    // A write payload above max_request cannot be answered without reading it all: hang up.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.go().await;
    c.request(CMD_WRITE, 1, 0, (32 << 20) + 1).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::RequestTooLarge(_))
    ));
}

// Single-threaded runtime: chunk `i`'s task sends its reply before chunk `i - 1`'s task can run,
// so the reply order is exactly reversed.
#[tokio::test]
async fn concurrent_reads_complete_out_of_order() {
    const N: u64 = 12;
    let export = Chained {
        done: (0..N).map(|_| Semaphore::new(0)).collect(),
    };
    let (mut c, task) = start(export, ServerOptions::default());
    c.go().await;
    for i in 0..N {
        c.request(CMD_READ, 1000 + i, i * CHUNK, CHUNK as u32).await;
    }
    let replies = async {
        let mut handles = Vec::new();
        for _ in 0..N {
            let (error, handle) = c.reply().await;
            assert_eq!(error, 0);
            let offset = (handle - 1000) * CHUNK;
            let mut data = vec![0; CHUNK as usize];
            c.0.read_exact(&mut data).await.unwrap();
            assert_eq!(data, pattern(offset, CHUNK as usize), "handle {handle}");
            handles.push(handle);
        }
        handles
    };
    // Only a guard against a hang (requests served one by one would deadlock).
    let handles = tokio::time::timeout(Duration::from_secs(30), replies)
        .await
        .unwrap();
    assert_eq!(handles, (1000..1000 + N).rev().collect::<Vec<_>>());
    c.disconnect(task).await;
}

#[tokio::test]
async fn disconnect_waits_for_in_flight_reads() {
    let export = Chained {
        done: (0..3).map(|_| Semaphore::new(0)).collect(),
    };
    let (mut c, task) = start(export, ServerOptions::default());
    c.go().await;
    for i in 0..3 {
        c.request(CMD_READ, i, i * CHUNK, CHUNK as u32).await;
    }
    c.request(CMD_DISC, 99, 0, 0).await;
    let replies = async {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (error, handle) = c.reply().await;
            assert_eq!(error, 0);
            c.0.read_exact(&mut vec![0; CHUNK as usize]).await.unwrap();
            seen.push(handle);
        }
        seen
    };
    // Only a guard against a hang (requests served one by one would deadlock).
    let mut seen = tokio::time::timeout(Duration::from_secs(30), replies)
        .await
        .unwrap();
    seen.sort();
    assert_eq!(seen, [0, 1, 2]);
    task.await.unwrap().unwrap();
    assert_eq!(c.0.read(&mut [0; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn garbage_and_truncated_handshakes_are_errors() {
    // Unknown client flags.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.0.read_exact(&mut [0; 18]).await.unwrap();
    c.0.write_u32(0xffff_ffff).await.unwrap();
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));

    // Truncated client flags, then EOF.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.0.write_all(&[0, 0]).await.unwrap();
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Io(_))));

    // Garbage instead of an option.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    c.0.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));

    // Oversized option: refused with TOO_BIG, then the server hangs up.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    c.0.write_u64(IHAVEOPT).await.unwrap();
    c.0.write_u32(OPT_GO).await.unwrap();
    c.0.write_u32(u32::MAX).await.unwrap();
    assert_eq!(c.opt_reply(OPT_GO).await.0, REP_ERR_TOO_BIG);
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::OptionTooLarge(_))
    ));

    // Option data cut short.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.greet().await;
    c.0.write_u64(IHAVEOPT).await.unwrap();
    c.0.write_u32(OPT_GO).await.unwrap();
    c.0.write_u32(100).await.unwrap();
    c.0.write_all(&[0; 10]).await.unwrap();
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Io(_))));

    // Bad request magic in transmission, and a request cut short.
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.go().await;
    c.0.write_all(&[0x42; 28]).await.unwrap();
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    c.go().await;
    c.0.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Io(_))));
}

#[tokio::test]
async fn invalid_options_are_rejected() {
    let opts = ServerOptions {
        max_in_flight: 0,
        ..Default::default()
    };
    let (_c, task) = start(Mem { fail_at: None }, opts);
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::InvalidOptions(_))
    ));
}
