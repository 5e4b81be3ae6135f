//! One conversation with the host: the handshake and the request dispatch.

use protocol::{features, negotiate, ErrorCode, Frame, FrameError, Message, Ready};

use crate::sys;

/// What the main loop does after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// `Ok` was queued: flush it, then end (the VM, or the process in test mode).
    Poweroff,
}

pub struct Session {
    /// Running as PID 1 of a VM.
    init: bool,
    /// The negotiated version, once the handshake is done.
    version: Option<u16>,
    /// CLOCK_BOOTTIME when the agent started.
    start_ns: u64,
}

impl Session {
    pub fn new(init: bool, start_ns: u64) -> Session {
        Session { init, version: None, start_ns }
    }

    /// The host went away: the next one starts with a new handshake.
    pub fn reset(&mut self) {
        self.version = None;
    }

    pub fn handle(&mut self, frame: Frame, out: &mut Vec<Frame>) -> Action {
        let id = frame.id;
        let reply = |out: &mut Vec<Frame>, msg| out.push(Frame::new(id, msg));
        match frame.msg {
            Message::Hello(hello) => match negotiate(&hello) {
                Ok(version) => {
                    if self.init && hello.realtime_ns != 0 {
                        if let Err(e) = sys::set_realtime_ns(hello.realtime_ns) {
                            log!("setting the clock: {e}");
                        }
                    }
                    self.version = Some(version);
                    reply(out, Message::Ready(self.ready(version)));
                }
                Err(e) => {
                    log!("handshake refused: {}", e.message);
                    reply(out, Message::Error(e));
                }
            },
            // The host's own error reports get no answer (no error ping-pong).
            Message::Error(e) => log!("host reports error {} on id {id}: {}", e.code.0, e.message),
            _ if self.version.is_none() => {
                reply(out, Message::error(ErrorCode::BAD_STATE, 0, format!("{} before Hello", frame.msg.name())))
            }
            Message::Ping(nonce) => reply(out, Message::Pong(nonce)),
            Message::Poweroff(()) => {
                reply(out, Message::Ok(()));
                return Action::Poweroff;
            }
            msg @ (Message::Exec(_)
            | Message::Stdin(_)
            | Message::CloseStdin(_)
            | Message::Signal(_)
            | Message::Credit(_)
            | Message::Resize(_)
            | Message::ReadFile(_)
            | Message::WriteFile(_)
            | Message::Stat(_)
            | Message::ReadDir(_)
            | Message::Mkdir(_)
            | Message::Remove(_)
            | Message::Rename(_)
            | Message::FileData(_)) => {
                reply(out, Message::error(ErrorCode::UNSUPPORTED, 0, format!("{} is not implemented by this agent yet", msg.name())))
            }
            msg @ (Message::Ready(_)
            | Message::Pong(_)
            | Message::Ok(_)
            | Message::Started(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exit(_)
            | Message::StatResult(_)
            | Message::DirEntries(_)) => {
                reply(out, Message::error(ErrorCode::BAD_STATE, 0, format!("{} is sent by the agent, not to it", msg.name())))
            }
        }
        Action::Continue
    }

    /// The answer to a frame the decoder skipped (`None` for fatal errors, which have no id).
    pub fn frame_error(&self, e: &FrameError) -> Option<Frame> {
        let code = match e {
            FrameError::UnknownKind { .. } => ErrorCode::UNKNOWN_KIND,
            FrameError::UnknownFlags { .. } | FrameError::Malformed { .. } => ErrorCode::MALFORMED,
            _ => return None,
        };
        Some(Frame::new(e.frame_id()?, Message::error(code, 0, e.to_string())))
    }

    /// A child of PID 1 ended (an orphan, until exec tracks its own processes).
    pub fn child_exited(&mut self, _pid: i32, _status: i32) {}

    fn ready(&self, version: u16) -> Ready {
        let (kernel_release, hostname) = sys::uname();
        Ready {
            version,
            agent: concat!("microcell-agent ", env!("CARGO_PKG_VERSION")).into(),
            kernel_release,
            hostname,
            boot_ns: sys::clock_ns(libc::CLOCK_BOOTTIME),
            agent_start_ns: self.start_ns,
            features: if self.init { features::INIT } else { 0 },
        }
    }
}
