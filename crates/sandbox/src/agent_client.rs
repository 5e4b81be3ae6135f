//! The host side of the control channel: frames to and from the guest agent over one byte
//! stream (a `UnixStream`: QEMU's virtio-serial socket or the VMM's virtio-console port).
//!
//! - One reader thread decodes frames and routes each to the request that waits for its id, so
//!   any number of requests (and, later, streams) are in flight at once. Id 0 is the handshake's.
//! - Every wait has a deadline. The end of the stream, a fatal framing error (bad magic, a
//!   length over the cap, a stream that ends inside a frame) or a malformed reply is a coded
//!   error for every waiter at once, never a hang.
//! - Writes use `MSG_NOSIGNAL` (no SIGPIPE in a host process such as Node) and a send timeout.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::{Decoder, Frame, Hello, Message, Ready, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::sandbox::{Result, SandboxError};

/// What this client calls itself in `Hello`.
pub const CLIENT_NAME: &str = concat!("microcell-sandbox/", env!("CARGO_PKG_VERSION"));
/// A write that cannot proceed for this long fails (the agent stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame for a waiter, or why the frame with its id could not be decoded.
type Delivery = std::result::Result<Frame, String>;

#[derive(Clone, Debug)]
enum Closed {
    /// The agent's side hung up (the VM ended or the agent closed the port).
    Eof,
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
            Closed::Protocol(m) => SandboxError::Protocol(m.clone()),
            Closed::Io(m) => SandboxError::ChannelClosed(format!("read error: {m}")),
            Closed::Local => SandboxError::ChannelClosed("closed by the host".into()),
        }
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u32, Sender<Delivery>>,
    closed: Option<Closed>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the channel closed (the first reason wins) and wakes every waiter.
    fn close(&self, why: Closed) {
        let mut s = self.lock();
        if s.closed.is_none() {
            s.closed = Some(why);
        }
        s.pending.clear();
    }

    fn deliver(&self, id: u32, d: Delivery) {
        let s = self.lock();
        match s.pending.get(&id) {
            Some(tx) => {
                let _ = tx.send(d);
            }
            None => match d {
                Ok(Frame {
                    msg: Message::Error(e),
                    ..
                }) => {
                    tracing::warn!(
                        id,
                        code = e.code.0,
                        "agent error frame for no request: {}",
                        e.message
                    )
                }
                Ok(f) => tracing::debug!(id, kind = f.msg.name(), "frame for no request dropped"),
                Err(e) => tracing::warn!(id, "undecodable frame for no request: {e}"),
            },
        }
    }
}

/// A request in flight: its answers arrive here. Dropping it stops routing its id.
pub struct Pending {
    shared: Arc<Shared>,
    id: u32,
    rx: Receiver<Delivery>,
    what: &'static str,
}

impl Pending {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next frame for this request: `Ok(None)` if none came within `timeout`; an error if
    /// the channel closed or the frame was malformed.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<Frame>> {
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(frame)) => Ok(Some(frame)),
            Ok(Err(reason)) => Err(SandboxError::Protocol(format!(
                "the answer to {} was malformed: {reason}",
                self.what
            ))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self
                .shared
                .lock()
                .closed
                .clone()
                .unwrap_or(Closed::Local)
                .error()),
        }
    }

    /// The next frame, or `E_AGENT_TIMEOUT` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Frame> {
        self.wait_timeout(timeout)?
            .ok_or(SandboxError::AgentTimeout {
                request: self.what,
                timeout_ms: timeout.as_millis() as u64,
            })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// The client end of the control channel.
pub struct AgentClient {
    stream: UnixStream,
    write_lock: Mutex<()>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl AgentClient {
    /// Takes over the channel and starts its reader thread.
    pub fn new(stream: UnixStream) -> Result<AgentClient> {
        let io_err =
            |e: io::Error| SandboxError::ChannelClosed(format!("cannot set up the channel: {e}"));
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(io_err)?;
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
            stream,
            write_lock: Mutex::new(()),
            shared,
            next_id: AtomicU32::new(1),
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Whether the channel has closed, and why.
    pub fn closed(&self) -> Option<SandboxError> {
        self.shared.lock().closed.as_ref().map(Closed::error)
    }

    /// Sends `msg` on a new request id; its answers arrive at the returned [`Pending`].
    pub fn send(&self, msg: Message) -> Result<Pending> {
        let id = {
            let s = self.shared.lock();
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
        let realtime_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.send_on(
            0,
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                client: CLIENT_NAME.into(),
                realtime_ns,
            }),
        )
    }

    fn send_on(&self, id: u32, msg: Message) -> Result<Pending> {
        let what = msg.name();
        let bytes = Frame::new(id, msg)
            .to_bytes()
            .map_err(|e| SandboxError::Protocol(format!("cannot encode {what}: {e}")))?;
        let (tx, rx) = mpsc::channel();
        {
            let mut s = self.shared.lock();
            if let Some(c) = &s.closed {
                return Err(c.error());
            }
            s.pending.insert(id, tx);
        }
        let pending = Pending {
            shared: self.shared.clone(),
            id,
            rx,
            what,
        };
        self.write_all(&bytes).map_err(|e| {
            let err = SandboxError::ChannelClosed(format!("cannot send {what}: {e}"));
            self.shared.close(Closed::Io(e.to_string()));
            err
        })?;
        Ok(pending)
    }

    fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        while !buf.is_empty() {
            // SAFETY: `buf` is valid for its length; the fd is open while `self` lives.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }

    /// Sends `msg` and waits for its first answer; an `Error` answer is `E_AGENT_ERROR`.
    pub fn request(&self, msg: Message, timeout: Duration) -> Result<Frame> {
        let what = msg.name();
        let frame = self.send(msg)?.wait(timeout)?;
        match frame.msg {
            Message::Error(e) => Err(SandboxError::Agent {
                request: what,
                agent_code: e.code.0,
                message: e.message,
            }),
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
            other => Err(SandboxError::Protocol(format!(
                "expected Pong({nonce}), got {other:?}"
            ))),
        }
    }

    /// Asks the agent to sync and end the VM; returns when it acknowledged (the VM ends a few
    /// milliseconds later).
    pub fn poweroff(&self, timeout: Duration) -> Result<()> {
        match self.request(Message::Poweroff(()), timeout)?.msg {
            Message::Ok(()) => Ok(()),
            other => Err(SandboxError::Protocol(format!(
                "expected Ok to Poweroff, got {}",
                other.name()
            ))),
        }
    }

    /// Closes the channel: the reader thread ends and every waiter gets `E_CHANNEL_CLOSED`.
    pub fn close(&self) {
        self.shared.close(Closed::Local);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
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
        other => Err(SandboxError::Protocol(format!(
            "expected Ready in answer to Hello, got {}",
            other.name()
        ))),
    }
}

fn read_loop(mut stream: UnixStream, shared: &Shared) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 << 10];
    let why = 'outer: loop {
        let n = match stream.read(&mut buf) {
            // A peer that closes with our bytes unread resets the connection: also its end.
            Ok(0) => 0,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Closed::Io(e.to_string()),
        };
        if n == 0 {
            break match decoder.finish() {
                Ok(()) => Closed::Eof,
                Err(e) => Closed::Protocol(e.to_string()),
            };
        }
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => shared.deliver(frame.id, Ok(frame)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => break 'outer Closed::Protocol(e.to_string()),
                Err(e) => match e.frame_id() {
                    Some(id) => shared.deliver(id, Err(e.to_string())),
                    None => break 'outer Closed::Protocol(e.to_string()),
                },
            }
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
        (
            AgentClient::new(a).unwrap(),
            Fake {
                stream: b,
                decoder: Decoder::new(),
            },
        )
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
        assert_eq!(
            client.send(Message::Ping(1)).err().unwrap().code(),
            "E_CHANNEL_CLOSED"
        );
    }

    #[test]
    fn garbage_is_a_protocol_error_at_once() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        agent
            .stream
            .write_all(b"Linux version 6.1 garbage")
            .unwrap();
        let e = pending.wait(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.code(), "E_PROTOCOL");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_a_protocol_error() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        let bytes = Frame::new(0, Message::Ready(ready())).to_bytes().unwrap();
        agent.stream.write_all(&bytes[..bytes.len() - 3]).unwrap();
        drop(agent);
        assert_eq!(
            pending.wait(Duration::from_secs(30)).unwrap_err().code(),
            "E_PROTOCOL"
        );
    }

    #[test]
    fn a_malformed_ready_is_a_protocol_error_for_that_request() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        // A Ready header with a payload that does not decode.
        let header = protocol::Header {
            flags: 0,
            kind: protocol::kind::READY,
            id: 0,
            len: 3,
        };
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
        assert_eq!(
            p.wait(Duration::from_secs(5)).unwrap().msg,
            Message::Pong(5)
        );
    }

    #[test]
    fn an_unexpected_answer_to_hello_is_a_protocol_error() {
        let (client, mut agent) = pair();
        let pending = client.hello().unwrap();
        agent.send(Frame::new(0, Message::Pong(1)));
        assert_eq!(
            ready_from(pending.wait(Duration::from_secs(5)).unwrap())
                .unwrap_err()
                .code(),
            "E_PROTOCOL"
        );
        let pending = client.hello().unwrap();
        agent.send(Frame::new(
            0,
            Message::error(ErrorCode::VERSION, 0, "no common version"),
        ));
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
                Message::Error(ErrorMsg {
                    code: ErrorCode::IO,
                    errno: 5,
                    message: "disk".into(),
                }),
            ));
            for f in [b, a] {
                let Message::Ping(n) = f.msg else {
                    panic!("{f:?}")
                };
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
        assert_eq!(e.code(), "E_AGENT_ERROR");
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
        assert_eq!(
            pending.wait(Duration::from_secs(5)).unwrap_err().code(),
            "E_CHANNEL_CLOSED"
        );
        drop(pending);
        let t = Instant::now();
        drop(client); // joins the reader
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
