//! The host side of the control channel: frames to and from the guest agent over one byte
//! stream (a `UnixStream`: QEMU's virtio-serial socket or the VMM's virtio-console port).
//!
//! - One reader thread decodes frames and routes each to the request that waits for its id, so
//!   any number of requests and streams are in flight at once. Id 0 is the handshake's.
//! - Each request's frames queue in its own inbox, which is read blocking (with a deadline) or
//!   as a future ([`Pending::recv`]); `Credit` frames do not queue but add to the inbox's credit
//!   counters, which writers take from ([`Pending::take_credit`]). The agent sends stream data
//!   only within the credit the host granted, so an inbox holds at most its window.
//! - Every wait has a deadline. The end of the stream (`E_CHANNEL_CLOSED`, also when it ends
//!   inside a frame: a VM killed while it sent), a fatal framing error (bad magic, a length
//!   over the cap) or a malformed reply is a coded error for every waiter at once, never a hang.
//! - Writes use `MSG_NOSIGNAL` (no SIGPIPE in a host process such as Node) and a send timeout.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::{
    Decoder, ErrorCode, ErrorMsg, Frame, Header, Hello, Message, Ready, StreamKind, FLAG_FINAL, HEADER_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::error::{Result, SandboxError};

/// What this client calls itself in `Hello`.
pub const CLIENT_NAME: &str = concat!("microcell-sandbox/", env!("CARGO_PKG_VERSION"));
/// Host entropy sent with each `Hello` (the guest reseeds its RNG from it).
pub const HELLO_ENTROPY_BYTES: usize = 32;
/// A write that cannot proceed for this long fails (the agent stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame for a waiter, or why the frame with its id could not be decoded.
type Delivery = std::result::Result<Frame, String>;

#[derive(Clone, Debug)]
enum Closed {
    /// The agent's side hung up (the VM ended or the agent closed the port).
    Eof,
    /// The same, with this many bytes of a frame unread.
    EofInFrame(usize),
    /// The byte stream cannot be trusted any more.
    Protocol(String),
    Io(String),
    /// [`AgentClient::close`].
    Local,
}

impl Closed {
    fn error(&self) -> SandboxError {
        match self {
            Closed::Eof => SandboxError::ChannelClosed("the agent's end hung up".into()),
            Closed::EofInFrame(n) => {
                SandboxError::ChannelClosed(format!("the agent's end hung up inside a frame, {n} bytes into it"))
            }
            Closed::Protocol(m) => SandboxError::Protocol(m.clone()),
            Closed::Io(m) => SandboxError::ChannelClosed(format!("read error: {m}")),
            Closed::Local => SandboxError::ChannelClosed("closed by the host".into()),
        }
    }
}

/// The error a request's `Error` answer becomes: an errno with a known name becomes that code
/// (`ENOENT`, `EACCES`, ... with the guest path), a request the agent found invalid
/// `E_INVALID_ARGUMENT`, anything else `E_AGENT_ERROR`.
pub fn agent_error(request: &'static str, e: ErrorMsg) -> SandboxError {
    if e.errno != 0 {
        if let Some(code) = protocol::errno::name(e.errno) {
            return SandboxError::Guest { request, code, errno: e.errno, path: e.path, message: e.message };
        }
    }
    if e.code == ErrorCode::INVALID {
        return SandboxError::InvalidArgument(format!("{request}: {}", e.message));
    }
    SandboxError::Agent { request, agent_code: e.code.0, message: e.message }
}

fn kind_index(k: StreamKind) -> usize {
    match k {
        StreamKind::Stdin => 0,
        StreamKind::Stdout => 1,
        StreamKind::Stderr => 2,
        StreamKind::File => 3,
    }
}

#[derive(Default)]
struct InboxState {
    queue: VecDeque<Delivery>,
    /// Stream payload bytes queued now, and the most ever queued.
    queued_bytes: usize,
    peak_bytes: usize,
    /// Credit the agent granted per stream kind and the host has not used yet.
    credit: [u64; 4],
    /// A frame with `FLAG_FINAL` arrived: nothing more comes for this id.
    finished: bool,
    closed: bool,
    wakers: Vec<Waker>,
}

/// Where the frames of one request wait for their reader.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    cv: Condvar,
}

fn payload_len(d: &Delivery) -> usize {
    match d {
        Ok(Frame { msg: Message::Stdout(c) | Message::Stderr(c) | Message::FileData(c), .. }) => c.len(),
        _ => 0,
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, mut s: MutexGuard<'_, InboxState>) {
        let wakers = std::mem::take(&mut s.wakers);
        drop(s);
        self.cv.notify_all();
        wakers.into_iter().for_each(Waker::wake);
    }

    fn push(&self, d: Delivery) {
        let mut s = self.lock();
        if let Ok(Frame { msg: Message::Credit(c), .. }) = &d {
            let slot = &mut s.credit[kind_index(c.stream)];
            *slot = slot.saturating_add(u64::from(c.bytes));
            return self.notify(s);
        }
        if matches!(&d, Ok(f) if f.is_final()) {
            s.finished = true;
        }
        s.queued_bytes += payload_len(&d);
        s.peak_bytes = s.peak_bytes.max(s.queued_bytes);
        s.queue.push_back(d);
        self.notify(s);
    }

    fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        self.notify(s);
    }

    fn pop(s: &mut InboxState) -> Option<Delivery> {
        let d = s.queue.pop_front()?;
        s.queued_bytes -= payload_len(&d);
        Some(d)
    }
}

/// What a wait for credit ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum CreditWait {
    /// This many bytes may be sent now (taken from the credit).
    Granted(u64),
    /// The request has ended (its final frame is queued): no more credit comes.
    Finished,
    /// Nothing within the timeout.
    Timeout,
}

#[derive(Default)]
struct State {
    pending: HashMap<u32, Arc<Inbox>>,
    closed: Option<Closed>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// `Ready::features` of the last handshake (whichever call made it): what the host may
    /// send this agent (`Cancel` only with `features::CANCEL`).
    features: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the channel closed (the first reason wins) and wakes every waiter.
    fn close(&self, why: Closed) {
        let inboxes: Vec<Arc<Inbox>> = {
            let mut s = self.lock();
            if s.closed.is_none() {
                s.closed = Some(why);
            }
            s.pending.drain().map(|(_, i)| i).collect()
        };
        for i in inboxes {
            i.close();
        }
    }

    fn deliver(&self, id: u32, d: Delivery) {
        if let (0, Ok(Frame { msg: Message::Ready(r), .. })) = (id, &d) {
            self.features.store(r.features, Ordering::Relaxed);
        }
        let inbox = self.lock().pending.get(&id).cloned();
        match inbox {
            Some(i) => i.push(d),
            None => match d {
                Ok(Frame { msg: Message::Error(e), .. }) => {
                    tracing::debug!(id, code = e.code.0, "agent error frame for no request: {}", e.message)
                }
                Ok(f) => tracing::debug!(id, kind = f.msg.name(), "frame for no request dropped"),
                Err(e) => tracing::warn!(id, "undecodable frame for no request: {e}"),
            },
        }
    }
}

/// The writing side of the channel, shared by the client and every request handle.
struct Conn {
    stream: UnixStream,
    write_lock: Mutex<()>,
    shared: Arc<Shared>,
}

impl Conn {
    fn closed_error(&self) -> Option<SandboxError> {
        self.shared.lock().closed.as_ref().map(Closed::error)
    }

    /// One frame: the header and a payload slice in one `sendmsg` (no copy of the payload).
    fn send_parts(&self, header: &[u8; HEADER_LEN], payload: &[u8], what: &'static str) -> Result<()> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let r = {
            let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            send_all(&self.stream, header, payload)
        };
        r.map_err(|e| {
            let err = SandboxError::ChannelClosed(format!("cannot send {what}: {e}"));
            self.shared.close(Closed::Io(e.to_string()));
            err
        })
    }

    fn send_frame(&self, frame: &Frame) -> Result<()> {
        let what = frame.msg.name();
        let bytes = frame.to_bytes().map_err(|e| SandboxError::Protocol(format!("cannot encode {what}: {e}")))?;
        let (h, p) = bytes.split_at(HEADER_LEN);
        self.send_parts(h.try_into().expect("header"), p, what)
    }

    /// A raw-bytes frame (`Stdin`, `FileData`) without copying `data`.
    fn send_data(&self, id: u32, kind: u16, flags: u8, data: &[u8], what: &'static str) -> Result<()> {
        let h = Header { flags, kind, id, len: data.len() as u32 };
        self.send_parts(&h.to_bytes(), data, what)
    }
}

fn send_all(stream: &UnixStream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let (mut h, mut p) = (header, payload);
    while !h.is_empty() || !p.is_empty() {
        let mut iov = [
            libc::iovec { iov_base: h.as_ptr() as *mut _, iov_len: h.len() },
            libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() },
        ];
        // SAFETY: a zeroed msghdr with two iovecs over live slices.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 2;
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        let take = n.min(h.len());
        h = &h[take..];
        n -= take;
        p = &p[n..];
    }
    Ok(())
}

/// A request in flight: its answers arrive here (and its stream frames go out from here).
/// Dropping it stops routing its id.
pub struct Pending {
    conn: Arc<Conn>,
    id: u32,
    inbox: Arc<Inbox>,
    what: &'static str,
}

impl Pending {
    pub fn id(&self) -> u32 {
        self.id
    }

    fn closed_error(&self) -> SandboxError {
        self.conn.shared.lock().closed.clone().unwrap_or(Closed::Local).error()
    }

    fn delivered(&self, d: Delivery) -> Result<Frame> {
        d.map_err(|reason| SandboxError::Protocol(format!("the answer to {} was malformed: {reason}", self.what)))
    }

    /// The next frame for this request: `Ok(None)` if none came within `timeout`; an error if
    /// the channel closed or the frame was malformed.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<Frame>> {
        let deadline = Instant::now() + timeout;
        let mut s = self.inbox.lock();
        loop {
            if let Some(d) = Inbox::pop(&mut s) {
                drop(s);
                return self.delivered(d).map(Some);
            }
            if s.closed {
                drop(s);
                return Err(self.closed_error());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            s = self.inbox.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The next frame, or `E_AGENT_TIMEOUT` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Frame> {
        self.wait_timeout(timeout)?
            .ok_or(SandboxError::AgentTimeout { request: self.what, timeout_ms: timeout.as_millis() as u64 })
    }

    /// The next frame, if one is queued.
    pub fn try_next(&self) -> Result<Option<Frame>> {
        let d = {
            let mut s = self.inbox.lock();
            match Inbox::pop(&mut s) {
                Some(d) => d,
                None if s.closed => {
                    drop(s);
                    return Err(self.closed_error());
                }
                None => return Ok(None),
            }
        };
        self.delivered(d).map(Some)
    }

    /// The next frame, as a future (no thread waits; the reader thread wakes it).
    pub fn recv(&self) -> Recv<'_> {
        Recv { pending: self }
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        let mut s = self.inbox.lock();
        if let Some(d) = Inbox::pop(&mut s) {
            drop(s);
            return Poll::Ready(self.delivered(d));
        }
        if s.closed {
            drop(s);
            return Poll::Ready(Err(self.closed_error()));
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Takes up to `max` bytes of `stream` credit, waiting up to `timeout` for some.
    pub fn take_credit(&self, stream: StreamKind, max: u64, timeout: Duration) -> Result<CreditWait> {
        let deadline = Instant::now() + timeout;
        let mut s = self.inbox.lock();
        loop {
            let c = &mut s.credit[kind_index(stream)];
            if *c > 0 {
                let n = (*c).min(max);
                *c -= n;
                return Ok(CreditWait::Granted(n));
            }
            if s.finished {
                return Ok(CreditWait::Finished);
            }
            if s.closed {
                drop(s);
                return Err(self.closed_error());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(CreditWait::Timeout);
            }
            s = self.inbox.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Whether the final frame of this request has arrived (it may still be queued).
    pub fn is_finished(&self) -> bool {
        self.inbox.lock().finished
    }

    /// Stream payload bytes queued now, and the most ever queued (host memory per request).
    pub fn queued_bytes(&self) -> (usize, usize) {
        let s = self.inbox.lock();
        (s.queued_bytes, s.peak_bytes)
    }

    /// Sends a frame on this request's id (stream control: `Stdin`, `Credit`, `Signal`, ...).
    pub fn send(&self, msg: Message) -> Result<()> {
        self.conn.send_frame(&Frame::new(self.id, msg))
    }

    /// Sends a raw-bytes frame (`Stdin`, `FileData`) on this id without copying `data`.
    pub fn send_data(&self, kind: u16, data: &[u8], last: bool) -> Result<()> {
        let flags = if last { FLAG_FINAL } else { 0 };
        self.conn.send_data(self.id, kind, flags, data, self.what)
    }

    /// The request's name (for errors).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Whether the agent of the last handshake has feature bit `bit` (`protocol::features`).
    pub fn agent_has(&self, bit: u64) -> bool {
        self.conn.shared.features.load(Ordering::Relaxed) & bit != 0
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.conn.shared.lock().pending.remove(&self.id);
    }
}

/// See [`Pending::recv`].
pub struct Recv<'a> {
    pending: &'a Pending,
}

impl Future for Recv<'_> {
    type Output = Result<Frame>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        self.pending.poll_recv(cx)
    }
}

/// The client end of the control channel.
pub struct AgentClient {
    conn: Arc<Conn>,
    next_id: AtomicU32,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl AgentClient {
    /// Takes over the channel and starts its reader thread.
    pub fn new(stream: UnixStream) -> Result<AgentClient> {
        let io_err = |e: io::Error| SandboxError::ChannelClosed(format!("cannot set up the channel: {e}"));
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io_err)?;
        // Room for a few data frames in the socket (fewer wakeups per MiB moved); a failure
        // only costs speed.
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let v: libc::c_int = 2 << 20;
            // SAFETY: setsockopt with a pointer to a live int of the right size.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
        }
        let read_half = stream.try_clone().map_err(io_err)?;
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mc-agent-rx".into())
                .spawn(move || read_loop(read_half, &shared))
                .map_err(SandboxError::thread("agent channel reader"))?
        };
        Ok(AgentClient {
            conn: Arc::new(Conn { stream, write_lock: Mutex::new(()), shared }),
            next_id: AtomicU32::new(1),
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Whether the channel has closed, and why.
    pub fn closed(&self) -> Option<SandboxError> {
        self.conn.closed_error()
    }

    /// Sends `msg` on a new request id; its answers arrive at the returned [`Pending`].
    pub fn send(&self, msg: Message) -> Result<Pending> {
        let id = {
            let s = self.conn.shared.lock();
            loop {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                if id != 0 && !s.pending.contains_key(&id) {
                    break id;
                }
            }
        };
        self.send_on(id, msg)
    }

    /// Sends `Hello` on id 0; the agent answers `Ready` (or an error).
    pub fn hello(&self) -> Result<Pending> {
        let realtime_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut entropy = vec![0u8; HELLO_ENTROPY_BYTES];
        // SAFETY: the buffer is valid for its length; getrandom(2) writes at most that many bytes.
        let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        entropy.truncate(got.max(0) as usize);
        self.send_on(
            0,
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                client: CLIENT_NAME.into(),
                realtime_ns,
                entropy,
            }),
        )
    }

    fn send_on(&self, id: u32, msg: Message) -> Result<Pending> {
        let what = msg.name();
        let inbox = Arc::new(Inbox::default());
        {
            let mut s = self.conn.shared.lock();
            if let Some(c) = &s.closed {
                return Err(c.error());
            }
            s.pending.insert(id, inbox.clone());
        }
        let pending = Pending { conn: self.conn.clone(), id, inbox, what };
        self.conn.send_frame(&Frame::new(id, msg))?;
        Ok(pending)
    }

    /// Sends `msg` and waits for its first answer; an `Error` answer is a coded error
    /// ([`agent_error`]).
    pub fn request(&self, msg: Message, timeout: Duration) -> Result<Frame> {
        let what = msg.name();
        let frame = self.send(msg)?.wait(timeout)?;
        match frame.msg {
            Message::Error(e) => Err(agent_error(what, e)),
            _ => Ok(frame),
        }
    }

    /// `Hello` → `Ready`, within `timeout`.
    pub fn handshake(&self, timeout: Duration) -> Result<Ready> {
        ready_from(self.hello()?.wait(timeout)?)
    }

    /// One round trip.
    pub fn ping(&self, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        let nonce = t.elapsed().as_nanos() as u64 ^ 0x6d63_7069_6e67;
        match self.request(Message::Ping(nonce), timeout)?.msg {
            Message::Pong(n) if n == nonce => Ok(t.elapsed()),
            other => Err(SandboxError::Protocol(format!("expected Pong({nonce}), got {other:?}"))),
        }
    }

    /// Asks the agent to sync and end the VM; returns when it acknowledged (the VM ends a few
    /// milliseconds later).
    pub fn poweroff(&self, timeout: Duration) -> Result<()> {
        match self.request(Message::Poweroff(()), timeout)?.msg {
            Message::Ok(()) => Ok(()),
            other => Err(SandboxError::Protocol(format!("expected Ok to Poweroff, got {}", other.name()))),
        }
    }

    /// Closes the channel: the reader thread ends and every waiter gets `E_CHANNEL_CLOSED`.
    pub fn close(&self) {
        self.conn.shared.close(Closed::Local);
        let _ = self.conn.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.close();
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The `Ready` in an answer to `Hello`.
pub fn ready_from(frame: Frame) -> Result<Ready> {
    match frame.msg {
        Message::Ready(r) => Ok(r),
        Message::Error(e) => Err(SandboxError::Protocol(format!(
            "the agent refused the handshake: {} (agent error code {})",
            e.message, e.code.0
        ))),
        other => Err(SandboxError::Protocol(format!("expected Ready in answer to Hello, got {}", other.name()))),
    }
}

fn read_loop(mut stream: UnixStream, shared: &Shared) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 1 << 20];
    let why = loop {
        let n = match stream.read(&mut buf) {
            // A peer that closes with our bytes unread resets the connection: also its end.
            Ok(0) => 0,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Closed::Io(e.to_string()),
        };
        if n == 0 {
            // A peer that ends inside a frame has still ended (a VM killed while it sent):
            // the waiters learn that the channel closed, as with any other end.
            break match decoder.finish() {
                Ok(()) => Closed::Eof,
                Err(protocol::FrameError::Truncated { buffered }) => Closed::EofInFrame(buffered),
                Err(e) => Closed::Protocol(e.to_string()),
            };
        }
        let mut fatal = None;
        decoder.decode_from(&buf[..n], |r| match r {
            Ok(frame) => {
                shared.deliver(frame.id, Ok(frame));
                true
            }
            Err(e) => match e.frame_id() {
                Some(id) if !e.is_fatal() => {
                    shared.deliver(id, Err(e.to_string()));
                    true
                }
                _ => {
                    fatal = Some(Closed::Protocol(e.to_string()));
                    false
                }
            },
        });
        if let Some(why) = fatal {
            break why;
        }
    };
    tracing::debug!(?why, "agent channel closed");
    shared.close(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ErrorCode, ErrorMsg};
    use std::io::Write;

    /// A scripted agent on the other end of a socketpair.
    struct Fake {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl Fake {
        fn recv(&mut self) -> Option<Frame> {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(f) = self.decoder.next_frame().unwrap() {
                    return Some(f);
                }
                let n = self.stream.read(&mut buf).unwrap();
                if n == 0 {
                    return None;
                }
                self.decoder.feed(&buf[..n]);
            }
        }

        fn send(&mut self, f: Frame) {
            self.stream.write_all(&f.to_bytes().unwrap()).unwrap();
        }
    }

    fn pair() -> (AgentClient, Fake) {
        let (a, b) = UnixStream::pair().unwrap();
        (AgentClient::new(a).unwrap(), Fake { stream: b, decoder: Decoder::new() })
    }

    fn ready() -> Ready {
        Ready {
            version: PROTOCOL_VERSION,
            agent: "fake".into(),
            kernel_release: "6.1.0-test".into(),
            hostname: "h".into(),
            boot_ns: 1,
            agent_start_ns: 2,
            features: 1,
        }
    }

    #[test]
    fn handshake_returns_ready() {
        let (client, mut agent) = pair();
        let t = std::thread::spawn(move || {
            let f = agent.recv().unwrap();
            assert_eq!(f.id, 0);
            match f.msg {
                Message::Hello(h) => {
                    assert!(h.client.starts_with("microcell-sandbox/") && h.realtime_ns > 0)
                }
                other => panic!("{other:?}"),
            }
            agent.send(Frame::new(0, Message::Ready(ready())));
            agent
        });
        assert_eq!(client.handshake(Duration::from_secs(5)).unwrap(), ready());
        drop(t.join().unwrap());
    }

    #[test]
    fn silence_times_out_with_a_coded_error() {
        let (client, _agent) = pair();
        let t = Instant::now();
        let e = client.handshake(Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.code(), "E_AGENT_TIMEOUT");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn eof_before_ready_is_a_coded_error_at_once() {
        let (client, agent) = pair();
        let pending = client.hello().unwrap();
        drop(agent);
        let t = Instant::now();
        let e = pending.wait(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.code(), "E_CHANNEL_CLOSED", "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // Later requests fail at once too.
        assert_eq!(client.send(Message::Ping(1)).err().unwrap().code(), "E_CHANNEL_CLOSED");
    }

    #[test]
    fn garbage_is_a_protocol_error_at_once() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        agent.stream.write_all(b"Linux version 6.1 garbage").unwrap();
        let e = pending.wait(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.code(), "E_PROTOCOL");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_a_closed_channel() {
        // What a VM killed in the middle of a large FileData frame looks like: the end of the
        // VM, not a protocol error.
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        let bytes = Frame::new(0, Message::Ready(ready())).to_bytes().unwrap();
        agent.stream.write_all(&bytes[..bytes.len() - 3]).unwrap();
        drop(agent);
        let e = pending.wait(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.code(), "E_CHANNEL_CLOSED", "{e}");
        assert!(e.to_string().contains("inside a frame"), "{e}");
    }

    #[test]
    fn a_malformed_ready_is_a_protocol_error_for_that_request() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        // A Ready header with a payload that does not decode.
        let header = protocol::Header { flags: 0, kind: protocol::kind::READY, id: 0, len: 3 };
        agent.stream.write_all(&header.to_bytes()).unwrap();
        agent.stream.write_all(&[0xff, 0xff, 0xff]).unwrap();
        let e = pending.wait(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.code(), "E_PROTOCOL");
        assert!(e.to_string().contains("Hello"), "{e}");
        // The stream is still usable after a skipped frame.
        assert!(matches!(agent.recv().unwrap().msg, Message::Hello(_)));
        let p = client.send(Message::Ping(5)).unwrap();
        let f = agent.recv().unwrap();
        agent.send(Frame::new(f.id, Message::Pong(5)));
        assert_eq!(p.wait(Duration::from_secs(5)).unwrap().msg, Message::Pong(5));
    }

    #[test]
    fn an_unexpected_answer_to_hello_is_a_protocol_error() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        agent.send(Frame::new(0, Message::Pong(1)));
        assert_eq!(ready_from(pending.wait(Duration::from_secs(5)).unwrap()).unwrap_err().code(), "E_PROTOCOL");
        let pending = client.hello().unwrap();
        agent.send(Frame::new(0, Message::error(ErrorCode::VERSION, 0, "no common version")));
        let e = ready_from(pending.wait(Duration::from_secs(5)).unwrap()).unwrap_err();
        assert!(e.to_string().contains("no common version"), "{e}");
    }

    #[test]
    fn requests_are_multiplexed_and_answered_out_of_order() {
        let (client, mut agent) = pair();
        let client = Arc::new(client);
        let agent = std::thread::spawn(move || {
            let a = agent.recv().unwrap();
            let b = agent.recv().unwrap();
            let c = agent.recv().unwrap();
            // Answer in reverse order; the Poweroff with an error.
            agent.send(Frame::new(
                c.id,
                Message::Error(ErrorMsg { code: ErrorCode::IO, errno: 5, message: "disk".into(), path: None }),
            ));
            for f in [b, a] {
                let Message::Ping(n) = f.msg else { panic!("{f:?}") };
                agent.send(Frame::new(f.id, Message::Pong(n)));
            }
            agent
        });
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let c = client.clone();
                std::thread::spawn(move || c.ping(Duration::from_secs(5)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let e = client.poweroff(Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.code(), "EIO", "an errno answer carries its name");
        assert!(e.to_string().contains("disk"), "{e}");
        for t in threads {
            t.join().unwrap().unwrap();
        }
        drop(agent.join().unwrap());
    }

    #[test]
    fn close_wakes_waiters_and_ends_the_reader() {
        let (client, _agent) = pair();
        let pending = client.hello().unwrap();
        client.close();
        assert_eq!(pending.wait(Duration::from_secs(5)).unwrap_err().code(), "E_CHANNEL_CLOSED");
        drop(pending);
        let t = Instant::now();
        drop(client); // joins the reader
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
