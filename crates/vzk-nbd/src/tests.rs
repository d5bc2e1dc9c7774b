#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Size of [`MemRw`]: several of the default `write_zeroes`' 1 MiB pieces.
const RW_SIZE: u64 = 4 << 20;

/// Writable in-memory export, starting as `pattern`; records what the server calls.
struct MemRw {
    data: Mutex<Vec<u8>>,
    /// `write_at` / `write_zeroes` / `flush` calls, in order.
    log: Mutex<Vec<&'static str>>,
    flushes: AtomicUsize,
    /// Largest `write_at` buffer seen.
    largest_write: AtomicUsize,
    /// The next `write_at` / `flush` fails with this kind.
    fail_write: Mutex<Option<io::ErrorKind>>,
    fail_flush: Mutex<Option<io::ErrorKind>>,
    /// If set, `write_at` waits for a permit of it first.
    write_gate: Option<Semaphore>,
}

impl MemRw {
    fn new() -> Self {
        Self {
            data: Mutex::new(pattern(0, RW_SIZE as usize)),
            log: Mutex::default(),
            flushes: AtomicUsize::new(0),
            largest_write: AtomicUsize::new(0),
            fail_write: Mutex::default(),
            fail_flush: Mutex::default(),
            write_gate: None,
        }
    }
    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..][..len].to_vec()
    }
    fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Export for MemRw {
    fn size(&self) -> u64 {
        RW_SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.bytes(offset, buf.len()));
        Ok(())
    }
    fn writable(&self) -> bool {
        true
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if let Some(gate) = &self.write_gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(kind) = self.fail_write.lock().unwrap().take() {
            return Err(io::Error::new(kind, "disk trouble"));
        }
        self.largest_write.fetch_max(buf.len(), Ordering::SeqCst);
        self.data.lock().unwrap()[offset as usize..][..buf.len()].copy_from_slice(buf);
        self.log.lock().unwrap().push("write");
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        if let Some(kind) = self.fail_flush.lock().unwrap().take() {
            return Err(io::Error::new(kind, "disk trouble"));
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push("flush");
        Ok(())
    }
}

/// Says it is writable but implements none of the write methods.
struct WritableButDefaults;

#[async_trait::async_trait]
impl Export for WritableButDefaults {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&pattern(offset, buf.len()));
        Ok(())
    }
    fn writable(&self) -> bool {
        true
    }
}

fn start(export: impl Export, opts: ServerOptions) -> (Client, JoinHandle<Result<(), NbdError>>) {
    start_shared(Arc::new(export), opts)
}

/// Like [`start`], the test keeping a handle on the export.
fn start_shared(
    export: Arc<dyn Export>,
    opts: ServerOptions,
) -> (Client, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move { serve_connection(server, export, &opts).await });
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

    /// Handshake with NBD_OPT_GO; returns the transmission flags.
    async fn go(&mut self) -> u16 {
        self.greet().await;
        let replies = self.info(OPT_GO, "disk").await;
        assert_eq!(replies.last().unwrap().0, REP_ACK);
        let export = &replies[0];
        assert_eq!((export.0, &export.1[..2]), (REP_INFO, &[0, 0][..]));
        u16::from_be_bytes([export.1[10], export.1[11]])
    }

    async fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) {
        self.request_with(0, cmd, handle, offset, len).await;
    }

    async fn request_with(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
        self.0.write_u32(REQUEST_MAGIC).await.unwrap();
        self.0.write_u16(flags).await.unwrap();
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

    /// NBD_CMD_WRITE of `data`; returns the reply's error.
    async fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.request_with(flags, CMD_WRITE, handle, offset, data.len() as u32)
            .await;
        self.0.write_all(data).await.unwrap();
        let (error, got) = self.reply().await;
        assert_eq!(got, handle);
        error
    }

    /// A command without payload or reply data; returns the reply's error.
    async fn command(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> u32 {
        self.request_with(flags, cmd, handle, offset, len).await;
        let (error, got) = self.reply().await;
        assert_eq!(got, handle);
        error
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

const WRITABLE_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;

#[tokio::test]
async fn transmission_flags_of_read_only_and_writable_exports() {
    // Bits 0, 2, 3, 6 and 8 of the protocol document, and no NBD_FLAG_READ_ONLY (bit 1).
    assert_eq!(WRITABLE_FLAGS, 0b1_0100_1101);
    let (mut c, task) = start(Mem { fail_at: None }, ServerOptions::default());
    assert_eq!(
        c.go().await,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    );
    c.disconnect(task).await;

    let (mut c, task) = start(MemRw::new(), ServerOptions::default());
    assert_eq!(c.go().await, WRITABLE_FLAGS);
    c.disconnect(task).await;

    let (mut c, task) = start(MemRw::new(), ServerOptions::default());
    c.greet().await;
    c.option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.0.read_u64().await.unwrap(), RW_SIZE);
    assert_eq!(c.0.read_u16().await.unwrap(), WRITABLE_FLAGS);
    c.disconnect(task).await;
}

#[tokio::test]
async fn writes_read_back_at_odd_offsets() {
    let export = Arc::new(MemRw::new());
    let (mut c, task) = start_shared(export.clone(), ServerOptions::default());
    c.go().await;
    let mut model = pattern(0, RW_SIZE as usize);
    let writes = [
        (1, 1),
        (4095, 2),
        (12345, 77777),
        (RW_SIZE - 3, 3),
        (7, 2 * 65536 + 1),
    ];
    for (i, (offset, len)) in writes.into_iter().enumerate() {
        let data: Vec<u8> = (0..len)
            .map(|k| (k as u8).wrapping_mul(7) ^ (0x5a + i as u8))
            .collect();
        assert_eq!(c.write(0, i as u64, offset, &data).await, 0);
        model[offset as usize..][..len].copy_from_slice(&data);
        assert_eq!(
            c.read(100 + i as u64, offset, len as u32).await.unwrap(),
            data
        );
    }
    for (offset, len) in [(0, 200_000), (4000, 300), (RW_SIZE - 100, 100)] {
        assert!(
            c.read(offset, offset, len as u32).await.unwrap() == model[offset as usize..][..len],
            "bytes at {offset}"
        );
    }
    assert!(
        *export.data.lock().unwrap() == model,
        "the export differs from the writes"
    );
    assert_eq!(export.flushes.load(Ordering::SeqCst), 0);
    c.disconnect(task).await;
}

#[tokio::test]
async fn bad_writes_are_refused_and_the_connection_keeps_serving() {
    let export = Arc::new(MemRw::new());
    let (mut c, task) = start_shared(export.clone(), ServerOptions::default());
    c.go().await;
    // A payload that looks like a request: it must be consumed, never parsed.
    let mut payload = vec![0xab; 1000];
    payload[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Past the end: ENOSPC, as the protocol recommends for writes.
    assert_eq!(c.write(0, 1, RW_SIZE - 999, &payload).await, ENOSPC);
    assert_eq!(c.write(0, 2, RW_SIZE, &payload[..1]).await, ENOSPC);
    assert_eq!(c.write(0, 3, u64::MAX - 10, &payload).await, ENOSPC);
    assert_eq!(
        c.command(0, CMD_WRITE_ZEROES, 4, RW_SIZE - 10, 11).await,
        ENOSPC
    );
    // Zero lengths, flags not valid for the command, commands not advertised: EINVAL.
    assert_eq!(c.write(0, 5, 0, &[]).await, EINVAL);
    assert_eq!(c.write(CMD_FLAG_NO_HOLE, 6, 0, &payload).await, EINVAL);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 7, 0, 0).await, EINVAL);
    let fast_zero = 1 << 4;
    assert_eq!(
        c.command(fast_zero, CMD_WRITE_ZEROES, 8, 0, 4096).await,
        EINVAL
    );
    assert_eq!(c.command(0, CMD_TRIM, 9, 0, 4096).await, EINVAL);
    assert_eq!(
        c.command(CMD_FLAG_NO_HOLE, CMD_FLUSH, 10, 0, 0).await,
        EINVAL
    );
    assert_eq!(c.read(11, RW_SIZE - 1, 2).await, Err(EINVAL));
    assert!(
        *export.data.lock().unwrap() == pattern(0, RW_SIZE as usize),
        "a refused write changed the export"
    );
    assert!(export.log().is_empty());

    assert_eq!(c.write(0, 12, RW_SIZE - 1000, &payload).await, 0);
    assert_eq!(c.read(13, RW_SIZE - 1000, 1000).await.unwrap(), payload);
    c.disconnect(task).await;
}

#[tokio::test]
async fn fua_and_flush_call_the_export_flush() {
    let export = Arc::new(MemRw::new());
    let (mut c, task) = start_shared(export.clone(), ServerOptions::default());
    c.go().await;
    let flushes = || export.flushes.load(Ordering::SeqCst);
    assert_eq!(c.write(0, 1, 100, &[1; 10]).await, 0);
    assert_eq!(flushes(), 0);
    // Counted when the reply arrives: the flush came after the write and before the reply.
    assert_eq!(c.write(CMD_FLAG_FUA, 2, 200, &[2; 10]).await, 0);
    assert_eq!(flushes(), 1);
    assert_eq!(export.log(), ["write", "write", "flush"]);
    assert_eq!(c.command(0, CMD_FLUSH, 3, 0, 0).await, 0);
    assert_eq!(flushes(), 2);
    assert_eq!(
        c.command(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 4, 300, 10).await,
        0
    );
    assert_eq!(flushes(), 3);
    assert_eq!(export.log()[3..], ["flush", "write", "flush"]);
    // NBD_FLAG_SEND_FUA: the flag is accepted on any command (a flush for a flush, else ignored).
    assert_eq!(c.command(CMD_FLAG_FUA, CMD_FLUSH, 5, 0, 0).await, 0);
    assert_eq!(flushes(), 4);
    c.request_with(CMD_FLAG_FUA, CMD_READ, 6, 100, 10).await;
    assert_eq!(c.reply().await, (0, 6));
    let mut data = [0; 10];
    c.0.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [1; 10]);
    c.disconnect(task).await;
    assert_eq!(flushes(), 4, "nothing is flushed on disconnect");
}

#[tokio::test]
async fn write_zeroes_zeroes_a_range() {
    let export = Arc::new(MemRw::new());
    let opts = ServerOptions {
        max_request: 8192,
        ..Default::default()
    };
    let (mut c, task) = start_shared(export.clone(), opts);
    c.go().await;
    // Longer than max_request (there is no payload) and than the default's 1 MiB pieces.
    let (offset, len) = (12345, 3 * (1 << 20) + 777);
    assert_eq!(
        c.command(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 1, offset, len)
            .await,
        0
    );
    let mut model = pattern(0, RW_SIZE as usize);
    model[offset as usize..][..len as usize].fill(0);
    assert!(*export.data.lock().unwrap() == model);
    assert_eq!(export.log(), ["write"; 4]);
    assert_eq!(export.largest_write.load(Ordering::SeqCst), 1 << 20);
    assert_eq!(
        c.read(2, offset - 1, 2).await.unwrap(),
        [model[offset as usize - 1], 0]
    );
    let end = offset + u64::from(len);
    assert_eq!(
        c.read(3, end - 1, 2).await.unwrap(),
        [0, model[end as usize]]
    );
    c.disconnect(task).await;
}

#[tokio::test]
async fn oversized_write_payloads() {
    let opts = ServerOptions {
        max_request: 8192,
        ..Default::default()
    };
    let export = Arc::new(MemRw::new());
    let (mut c, task) = start_shared(export.clone(), opts.clone());
    c.go().await;
    // Above max_request but at most 32 MiB: read, thrown away and refused; the connection goes on.
    let big = vec![0xcd; 100_000];
    assert_eq!(c.write(0, 1, 0, &big).await, EINVAL);
    assert!(export.log().is_empty());
    assert_eq!(c.write(0, 2, 0, &big[..8192]).await, 0);
    assert_eq!(
        c.read(3, 8190, 4).await.unwrap(),
        [0xcd, 0xcd, pattern(8192, 1)[0], pattern(8193, 1)[0]]
    );
    // Above both: the server hangs up without reading it.
    c.request(CMD_WRITE, 4, 0, (32 << 20) + 1).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::RequestTooLarge(_))
    ));
    assert_eq!(c.0.read(&mut [0; 1]).await.unwrap(), 0);

    // With the default max_request (32 MiB), anything above it is a hang-up.
    let (mut c, task) = start(MemRw::new(), ServerOptions::default());
    c.go().await;
    c.request(CMD_WRITE, 1, 0, (32 << 20) + 1).await;
    assert!(matches!(
        task.await.unwrap(),
        Err(NbdError::RequestTooLarge(_))
    ));

    // A read-only export consumes such a payload too, and answers EPERM as to any write.
    let (mut c, task) = start(Mem { fail_at: None }, opts);
    c.go().await;
    assert_eq!(c.write(0, 1, 0, &big).await, EPERM);
    assert_eq!(c.read(2, 0, 16).await.unwrap(), pattern(0, 16));
    c.disconnect(task).await;
}

#[tokio::test]
async fn export_write_errors_are_replied_and_the_connection_keeps_going() {
    use io::ErrorKind::*;
    let export = Arc::new(MemRw::new());
    let (mut c, task) = start_shared(export.clone(), ServerOptions::default());
    c.go().await;
    for (handle, kind, code) in [
        (1, Other, EIO),
        (2, StorageFull, ENOSPC),
        (3, QuotaExceeded, ENOSPC),
        (4, FileTooLarge, ENOSPC),
        (5, PermissionDenied, EPERM),
    ] {
        *export.fail_write.lock().unwrap() = Some(kind);
        assert_eq!(c.write(0, handle, 4096, &[9; 512]).await, code, "{kind:?}");
    }
    *export.fail_write.lock().unwrap() = Some(Other);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 6, 4096, 512).await, EIO);
    *export.fail_flush.lock().unwrap() = Some(Other);
    assert_eq!(c.command(0, CMD_FLUSH, 7, 0, 0).await, EIO);
    // A FUA write whose flush fails fails (the bytes themselves were written).
    *export.fail_flush.lock().unwrap() = Some(StorageFull);
    assert_eq!(c.write(CMD_FLAG_FUA, 8, 0, &[8; 512]).await, ENOSPC);
    assert_eq!(export.bytes(4096, 512), pattern(4096, 512));

    assert_eq!(c.write(CMD_FLAG_FUA, 9, 4096, &[7; 512]).await, 0);
    assert_eq!(c.read(10, 4096, 512).await.unwrap(), [7; 512]);
    assert_eq!(c.command(0, CMD_FLUSH, 11, 0, 0).await, 0);
    c.disconnect(task).await;
}

#[tokio::test]
async fn writable_export_with_the_default_write_methods() {
    let (mut c, task) = start(WritableButDefaults, ServerOptions::default());
    assert_eq!(c.go().await, WRITABLE_FLAGS);
    // The default write_at refuses with PermissionDenied: EPERM.
    assert_eq!(c.write(0, 1, 0, &[1; 100]).await, EPERM);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 2, 0, 100).await, EPERM);
    assert_eq!(c.command(0, CMD_FLUSH, 3, 0, 0).await, 0);
    assert_eq!(c.read(4, 0, 100).await.unwrap(), pattern(0, 100));
    c.disconnect(task).await;

    // The defaults of a read-only implementor.
    let ro = Mem { fail_at: None };
    assert!(!ro.writable());
    assert_eq!(
        ro.write_at(0, &[1]).await.unwrap_err().kind(),
        io::ErrorKind::PermissionDenied
    );
    ro.flush().await.unwrap();
    let rw = MemRw::new();
    rw.write_zeroes(5, 0).await.unwrap();
    assert!(rw.log().is_empty());
}

#[tokio::test]
async fn write_reply_waits_for_the_export_while_reads_go_on() {
    let export = Arc::new(MemRw {
        write_gate: Some(Semaphore::new(0)),
        ..MemRw::new()
    });
    let (mut c, task) = start_shared(export.clone(), ServerOptions::default());
    c.go().await;
    c.request(CMD_WRITE, 1, 0, 4).await;
    c.0.write_all(&[5; 4]).await.unwrap();
    // The payload was consumed: the next request is parsed, and served while the write waits.
    assert_eq!(c.read(2, 4096, 16).await.unwrap(), pattern(4096, 16));
    let mut byte = [0; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(50), c.0.read(&mut byte))
            .await
            .is_err(),
        "no reply for the write before write_at returned"
    );
    export.write_gate.as_ref().unwrap().add_permits(1);
    assert_eq!(c.reply().await, (0, 1));
    assert_eq!(export.bytes(0, 4), [5; 4]);
    c.disconnect(task).await;
}
