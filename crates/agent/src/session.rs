//! One conversation with the host: the handshake, the dispatch of every request, and the state
//! of what runs (execs, file streams, the workload). Every request is checked; a bad one gets
//! an `Error` answer and the agent carries on.

use std::collections::{HashMap, HashSet};
use std::os::fd::RawFd;
use std::time::Instant;

use protocol::{
    features, negotiate, Credit, ErrorCode, ErrorMsg, Frame, FrameError, Message, Ready, StreamKind, FLAG_FINAL,
};

use crate::cgroup::{Cgroup, Cgroups};
use crate::exec::{Fd, Proc};
use crate::fs::{self, ReadStream, WriteSink, WRITE_WINDOW};
use crate::outq::OutQueue;
use crate::sys;
use crate::watch::Watcher;
use crate::workload::Workload;

const NO_WORKLOAD: &str = "this VM has no boot workload (the host sent no StartWorkload)";

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
    execs: HashMap<u32, Proc>,
    reads: HashMap<u32, ReadStream>,
    writes: HashMap<u32, WriteSink>,
    /// Write streams that failed: their remaining `FileData` is dropped without answers.
    dead_writes: HashSet<u32>,
    watches: HashMap<u32, Watcher>,
    pub workload: Option<Workload>,
    /// Test mode on stdio: stdout is the channel, so a workload writes to stderr.
    pub console_is_channel: bool,
    cgroups: Cgroups,
    /// Cgroups of ended execs that a daemon of theirs still occupies: removed once empty.
    lingering: Vec<Cgroup>,
}

fn code_error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorMsg { code, errno: 0, message: message.into(), path: None })
}

impl Session {
    pub fn new(init: bool, start_ns: u64, cgroups: Cgroups) -> Session {
        Session {
            init,
            version: None,
            start_ns,
            execs: HashMap::new(),
            reads: HashMap::new(),
            writes: HashMap::new(),
            dead_writes: HashSet::new(),
            watches: HashMap::new(),
            workload: None,
            console_is_channel: false,
            cgroups,
            lingering: Vec::new(),
        }
    }

    /// A workload from the kernel command line (a VM without a control channel) or `--exec-spec`.
    pub fn start_workload_from_cmdline(&mut self, value: &str) {
        self.workload = Some(Workload::start_from_cmdline(value, self.console_is_channel, &mut self.cgroups));
    }

    /// The host went away: the next one starts with a new handshake, and what the old one
    /// started is ended (its processes killed, its streams dropped).
    pub fn reset(&mut self) {
        self.version = None;
        self.shutdown();
        if let Some(w) = &mut self.workload {
            w.reset();
        }
    }

    /// Kills every exec's process group and drops every stream.
    pub fn shutdown(&mut self) {
        for p in self.execs.values_mut() {
            p.kill_group();
            self.lingering.extend(p.take_cgroup());
        }
        self.execs.clear();
        self.reads.clear();
        self.writes.clear();
        self.dead_writes.clear();
        self.watches.clear();
    }

    fn busy(&self, id: u32) -> bool {
        self.execs.contains_key(&id)
            || self.reads.contains_key(&id)
            || self.writes.contains_key(&id)
            || self.watches.contains_key(&id)
    }

    pub fn handle(&mut self, frame: Frame, out: &mut OutQueue) -> Action {
        let id = frame.id;
        let is_final = frame.is_final();
        match frame.msg {
            Message::Hello(hello) => match negotiate(&hello) {
                Ok(version) => {
                    if self.init && hello.realtime_ns != 0 {
                        if let Err(e) = sys::set_realtime_ns(hello.realtime_ns) {
                            log!("setting the clock: {e}");
                        }
                    }
                    // Every handshake after a restore brings fresh host entropy: reseed, so
                    // clones of one snapshot do not share their random numbers.
                    if self.init && !hello.entropy.is_empty() {
                        if let Err(e) = sys::reseed_rng(&hello.entropy) {
                            log!("reseeding the RNG: {e}");
                        }
                    }
                    self.version = Some(version);
                    out.msg(id, Message::Ready(self.ready(version)));
                }
                Err(e) => {
                    log!("handshake refused: {}", e.message);
                    out.msg(id, Message::Error(e));
                }
            },
            // The host's own error reports get no answer (no error ping-pong).
            Message::Error(e) => log!("host reports error {} on id {id}: {}", e.code.0, e.message),
            msg if self.version.is_none() => {
                out.final_msg(id, code_error(ErrorCode::BAD_STATE, format!("{} before Hello", msg.name())))
            }
            msg if !msg.is_host_to_guest() => out.final_msg(
                id,
                code_error(ErrorCode::BAD_STATE, format!("{} is sent by the agent, not to it", msg.name())),
            ),
            Message::Ping(nonce) => out.msg(id, Message::Pong(nonce)),
            Message::Poweroff(()) => {
                out.final_msg(id, Message::Ok(()));
                return Action::Poweroff;
            }
            msg @ (Message::Exec(_)
            | Message::ReadFile(_)
            | Message::ReadTree(_)
            | Message::WriteFile(_)
            | Message::WriteTree(_)
            | Message::Watch(_))
                if self.busy(id) =>
            {
                out.final_msg(
                    id,
                    code_error(ErrorCode::BAD_STATE, format!("{}: id {id} is in use by a running request", msg.name())),
                )
            }
            Message::Exec(req) => match Proc::start(id, &req, &mut self.cgroups, out) {
                Ok(p) => {
                    self.execs.insert(id, p);
                }
                Err(e) => out.final_msg(id, Message::Error(e)),
            },
            Message::Stdin(chunk) => self.with_exec(id, out, |p, out| p.stdin_data(&chunk, out)),
            Message::CloseStdin(()) => self.with_exec(id, out, |p, out| p.close_stdin(out)),
            Message::Signal(s) => self.with_exec(id, out, |p, _| {
                p.signal(s.signal, s.group).map_err(|e| format!("signal {}: {e}", s.signal))
            }),
            Message::Resize(r) => self.with_exec(id, out, |p, _| p.resize(r.size)),
            Message::Credit(Credit { stream, bytes }) => match stream {
                StreamKind::Stdout | StreamKind::Stderr => {
                    if let Some(p) = self.execs.get_mut(&id) {
                        let _ = p.add_credit(stream, bytes);
                    }
                    // Credit for a stream that has just ended is normal: no answer.
                }
                StreamKind::File => {
                    if let Some(r) = self.reads.get_mut(&id) {
                        r.credit = r.credit.saturating_add(u64::from(bytes));
                    }
                }
                StreamKind::Stdin => {
                    out.msg(id, code_error(ErrorCode::BAD_STATE, "the agent grants stdin credit, the host does not"))
                }
            },
            // The host abandoned a read stream (its limit, an error on its side, a dropped
            // reader): close the reader now rather than hold it, and its credit, until the
            // channel closes. No answer: the host has forgotten the id. An id whose stream has
            // just ended (its last chunk crossed the Cancel) is no error either.
            Message::Cancel(()) => {
                self.reads.remove(&id);
            }
            Message::ReadFile(req) => match ReadStream::file(&req) {
                Ok(r) => {
                    self.reads.insert(id, r);
                }
                Err(e) => out.final_msg(id, Message::Error(e)),
            },
            Message::ReadTree(req) => match ReadStream::tree(&req.path, req.window) {
                Ok(r) => {
                    self.reads.insert(id, r);
                }
                Err(e) => out.final_msg(id, Message::Error(e)),
            },
            Message::WriteFile(req) => self.open_write(id, WriteSink::file(&req), out),
            Message::WriteTree(req) => self.open_write(id, WriteSink::tree(&req.path, req.parents), out),
            Message::FileData(chunk) => self.file_data(id, &chunk, is_final, out),
            Message::Stat(req) => match fs::stat(&req) {
                Ok(s) => out.final_msg(id, Message::StatResult(s)),
                Err(e) => out.final_msg(id, Message::Error(e)),
            },
            Message::ReadDir(req) => {
                if let Err(e) = fs::read_dir(id, &req.path, out) {
                    out.final_msg(id, Message::Error(e));
                }
            }
            Message::Mkdir(req) => Self::done(id, fs::mkdir(&req), out),
            Message::Remove(req) => Self::done(id, fs::remove(&req), out),
            Message::Rename(req) => Self::done(id, fs::rename(&req), out),
            Message::Watch(req) => match Watcher::start(id, &req, out) {
                Ok(w) => {
                    self.watches.insert(id, w);
                }
                Err(e) => out.final_msg(id, Message::Error(e)),
            },
            Message::Unwatch(()) => match self.watches.remove(&id) {
                Some(_) => out.final_msg(id, Message::Ok(())),
                None => out.final_msg(id, code_error(ErrorCode::BAD_STATE, format!("Unwatch: id {id} is no watch"))),
            },
            Message::WaitWorkload(()) => match &mut self.workload {
                Some(w) => w.wait_request(id, out),
                None => out.final_msg(id, code_error(ErrorCode::BAD_STATE, NO_WORKLOAD)),
            },
            // One per boot: a restored VM's workload runs on, and its host sees WORKLOAD in Ready.
            Message::StartWorkload(_) if self.workload.is_some() => out.final_msg(
                id,
                code_error(ErrorCode::BAD_STATE, "StartWorkload: this VM's workload was started already"),
            ),
            Message::StartWorkload(spec) => {
                self.workload = Some(Workload::start(&spec, self.console_is_channel, &mut self.cgroups));
                out.final_msg(id, Message::Ok(()));
            }
            Message::SignalWorkload(s) => {
                let r = match &self.workload {
                    Some(w) => w.signal(s.signal, s.group),
                    None => Err(NO_WORKLOAD.to_owned()),
                };
                match r {
                    Ok(()) => out.final_msg(id, Message::Ok(())),
                    Err(m) => out.final_msg(id, code_error(ErrorCode::BAD_STATE, m)),
                }
            }
            // Guest → host kinds were refused above.
            Message::Ready(_)
            | Message::Pong(_)
            | Message::Ok(_)
            | Message::Started(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exit(_)
            | Message::StatResult(_)
            | Message::DirEntries(_)
            | Message::WatchEvent(_)
            | Message::WorkloadExit(_) => unreachable!("guest-to-host kinds are refused above"),
        }
        Action::Continue
    }

    fn done(id: u32, r: Result<(), ErrorMsg>, out: &mut OutQueue) {
        match r {
            Ok(()) => out.final_msg(id, Message::Ok(())),
            Err(e) => out.final_msg(id, Message::Error(e)),
        }
    }

    /// A stream-control frame for exec `id`: a problem with it is a non-final error (the exec
    /// goes on); an unknown id a final one.
    fn with_exec(
        &mut self,
        id: u32,
        out: &mut OutQueue,
        f: impl FnOnce(&mut Proc, &mut OutQueue) -> Result<(), String>,
    ) {
        match self.execs.get_mut(&id) {
            Some(p) => {
                if let Err(m) = f(p, out) {
                    out.msg(id, code_error(ErrorCode::BAD_STATE, m));
                }
            }
            None => out.final_msg(id, code_error(ErrorCode::BAD_STATE, format!("no running exec with id {id}"))),
        }
    }

    fn open_write(&mut self, id: u32, sink: Result<WriteSink, ErrorMsg>, out: &mut OutQueue) {
        match sink {
            Ok(s) => {
                self.writes.insert(id, s);
                out.msg(id, Message::Credit(Credit { stream: StreamKind::File, bytes: WRITE_WINDOW }));
            }
            Err(e) => {
                out.final_msg(id, Message::Error(e));
                self.dead_writes.insert(id);
            }
        }
    }

    fn file_data(&mut self, id: u32, chunk: &[u8], is_final: bool, out: &mut OutQueue) {
        if let Some(w) = self.writes.get_mut(&id) {
            match w.write(chunk) {
                Ok(credit) => {
                    if let (Some(n), false) = (credit, is_final) {
                        out.msg(id, Message::Credit(Credit { stream: StreamKind::File, bytes: n }));
                    }
                    if is_final {
                        let w = self.writes.remove(&id).expect("present");
                        Self::done(id, w.finish(), out);
                    }
                }
                Err(e) => {
                    self.writes.remove(&id);
                    out.final_msg(id, Message::Error(e));
                    if !is_final {
                        self.dead_writes.insert(id);
                    }
                }
            }
        } else if self.dead_writes.contains(&id) {
            if is_final {
                self.dead_writes.remove(&id);
            }
        } else {
            out.final_msg(
                id,
                code_error(ErrorCode::BAD_STATE, format!("FileData for id {id}, which is no write in progress")),
            );
        }
    }

    /// The answer to a frame the decoder skipped (`None` for fatal errors, which have no id).
    pub fn frame_error(&self, e: &FrameError) -> Option<Frame> {
        let code = match e {
            FrameError::UnknownKind { .. } => ErrorCode::UNKNOWN_KIND,
            FrameError::UnknownFlags { .. } | FrameError::Malformed { .. } => ErrorCode::MALFORMED,
            _ => return None,
        };
        Some(Frame::new(e.frame_id()?, code_error(code, e.to_string())).with_flags(FLAG_FINAL))
    }

    /// A child of the agent ended: an exec's process, the workload, or (as PID 1) an orphan.
    pub fn child_exited(&mut self, pid: i32, status: i32, now: Instant, out: &mut OutQueue) {
        if let Some(p) = self.execs.values_mut().find(|p| p.pid == pid) {
            p.reaped(status, now);
            return;
        }
        if let Some(w) = self.workload.as_mut().filter(|w| w.pid == Some(pid)) {
            w.reaped(status);
            w.answer(out);
        }
    }

    /// After a round of reaping: the cgroups of ended execs that have emptied go.
    pub fn reaped_all(&mut self) {
        self.lingering.retain(|cg| !cg.remove());
    }

    /// Descriptors to poll for the execs.
    pub fn poll_fds(&self, room: bool, fds: &mut Vec<(RawFd, i16)>, tokens: &mut Vec<(u32, Fd)>) {
        for p in self.execs.values() {
            p.poll_fds(room, fds, tokens);
        }
        if room {
            for (&id, w) in &self.watches {
                fds.push((w.fd(), libc::POLLIN));
                tokens.push((id, Fd::Watch));
            }
        }
    }

    pub fn fd_ready(&mut self, id: u32, which: Fd, out: &mut OutQueue) {
        if which == Fd::Watch {
            if let Some(w) = self.watches.get_mut(&id) {
                w.ready(id, out);
            }
        } else if let Some(p) = self.execs.get_mut(&id) {
            p.ready(which, out);
        }
    }

    /// Whether a read stream could make progress now (then the loop must not sleep).
    pub fn reads_ready(&self) -> bool {
        self.reads.values().any(|r| r.credit > 0)
    }

    /// One chunk of every read stream that has credit, while the queue has room.
    pub fn pump_reads(&mut self, out: &mut OutQueue) {
        let mut ended = Vec::new();
        for (&id, r) in self.reads.iter_mut() {
            if !out.has_room() {
                break;
            }
            match r.pump(id, out) {
                Ok(true) => ended.push(id),
                Ok(false) => {}
                Err(e) => {
                    out.final_msg(id, Message::Error(e));
                    ended.push(id);
                }
            }
        }
        for id in ended {
            self.reads.remove(&id);
        }
    }

    /// Timeouts and finished execs.
    pub fn tick(&mut self, now: Instant, out: &mut OutQueue) {
        let lingering = &mut self.lingering;
        self.execs.retain(|_, p| {
            if !p.tick(now, out) {
                return true;
            }
            lingering.extend(p.take_cgroup().filter(|cg| !cg.remove()));
            false
        });
    }

    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        self.execs.values().filter_map(|p| p.next_wake(now)).min()
    }

    fn ready(&self, version: u16) -> Ready {
        let (kernel_release, hostname) = sys::uname();
        let mut f = features::EXEC | features::FS | features::START_WORKLOAD | features::CANCEL;
        if self.init {
            f |= features::INIT;
        }
        if self.workload.is_some() {
            f |= features::WORKLOAD;
        }
        Ready {
            version,
            agent: concat!("microcell-agent ", env!("CARGO_PKG_VERSION")).into(),
            kernel_release,
            hostname,
            boot_ns: sys::clock_ns(libc::CLOCK_BOOTTIME),
            agent_start_ns: self.start_ns,
            features: f,
        }
    }
}
