//! Host side of the control channel for tests: frames over any Read + Write.
#![allow(dead_code)]

use std::io::{Read, Write};

use protocol::{Decoder, Frame, Hello, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub struct Conn<R: Read, W: Write> {
    pub r: R,
    pub w: W,
    decoder: Decoder,
}

impl<R: Read, W: Write> Conn<R, W> {
    pub fn new(r: R, w: W) -> Self {
        Conn { r, w, decoder: Decoder::new() }
    }

    pub fn send(&mut self, f: Frame) {
        self.w.write_all(&f.to_bytes().unwrap()).unwrap();
        self.w.flush().unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
        self.w.flush().unwrap();
    }

    /// The next frame, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("agent sent a bad frame") {
                return Some(f);
            }
            let n = self.r.read(&mut buf).expect("read from agent");
            if n == 0 {
                self.decoder.finish().expect("agent's stream ended inside a frame");
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    pub fn request(&mut self, id: u32, msg: Message) -> Frame {
        self.send(Frame::new(id, msg));
        self.recv().expect("agent hung up")
    }

    pub fn hello() -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            client: "agent-test".into(),
            realtime_ns: 0,
            entropy: vec![],
        })
    }
}

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_microcell-agent");

/// The agent as a host process on a socketpair, with the real host client on the other end.
pub struct Agent {
    pub child: std::process::Child,
    pub client: sandbox::agent_client::AgentClient,
    pub ready: protocol::Ready,
}

impl Agent {
    pub fn spawn() -> Agent {
        Self::spawn_with(&[])
    }

    pub fn spawn_with(extra: &[&str]) -> Agent {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(AGENT);
        cmd.args(["--no-init", "--channel-fd", "3"]).args(extra);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        let client = sandbox::agent_client::AgentClient::new(ours).unwrap();
        let ready = client.handshake(std::time::Duration::from_secs(10)).unwrap();
        Agent { child, client, ready }
    }

    /// The agent's peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.client.close();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Prints past the test harness's capture.
pub fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
