//! Processes the host runs (`Exec`) and the boot workload: spawning, output streams within
//! the host's credit, stdin with credit back, signals, timeouts, terminals.
//!
//! Every process gets a session and process group of its own (`setsid`), so a signal reaches
//! its whole tree, and (as PID 1) a cgroup of its own ([`crate::cgroup`]), so a timeout or a
//! kill reaches what left the group too. Its `Exit` goes out once it has been reaped and
//! its pipes are drained: at end of file, or — when a daemonised grandchild keeps a pipe open —
//! once everything that was in the pipe when the child exited has been sent and [`GRACE`] has
//! passed since the exit.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::{kind, Credit, ErrorCode, ErrorMsg, Exec, Exit, Message, Rlimit, StreamKind, TtySize};

use crate::cgroup::{self, Cgroup, Cgroups};
use crate::outq::{OutQueue, CHUNK};
use crate::sys;
use crate::users::{self, Ids};

/// How long output pipes held open by a process's descendants are read after it exited.
pub const GRACE: Duration = Duration::from_millis(100);
/// Stdin bytes the agent buffers per process (the host's initial stdin credit).
pub const STDIN_WINDOW: u32 = 256 << 10;
/// Stdin credit goes back in batches of at least this much (or when the buffer ran empty).
const CREDIT_BATCH: u64 = 32 << 10;

/// An error answer about an OS failure, with the path it concerns.
pub fn os_error(e: &io::Error, message: String, path: Option<&str>) -> ErrorMsg {
    ErrorMsg { code: ErrorCode::IO, errno: sys::errno_of(e), message, path: path.map(str::to_owned) }
}

pub fn invalid(message: impl Into<String>) -> ErrorMsg {
    ErrorMsg { code: ErrorCode::INVALID, errno: 0, message: message.into(), path: None }
}

/// What to start.
pub struct Launch<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub clear_env: bool,
    pub cwd: Option<&'a str>,
    pub user: Option<&'a str>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub rlimits: &'a [Rlimit],
}

/// Where the child's standard streams go.
pub enum StdioMode {
    /// Pipes for stdout and stderr; stdin a pipe or `/dev/null`.
    Pipes { stdin: bool },
    /// A new terminal; stdout and stderr merge on it.
    Tty(TtySize),
    /// The agent's own (the console), stdin `/dev/null`: the boot workload. With
    /// `stdout_to_stderr` (test mode on stdio, where stdout is the channel) both go to stderr.
    Console { stdout_to_stderr: bool },
}

/// A started child: its pid and the host ends of its streams (non-blocking).
pub struct Child {
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub stdin: Option<OwnedFd>,
    pub tty: bool,
}

fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

/// Checks the request and starts the process (in `cgroup`, when given: it joins before it
/// runs anything of its own). Every failure is an answer, never a panic.
pub fn launch(l: &Launch<'_>, stdio: StdioMode, cgroup: Option<&Cgroup>) -> Result<Child, ErrorMsg> {
    let Some(program) = l.argv.first().filter(|p| !p.is_empty()) else {
        return Err(invalid("argv is empty: give the program as argv[0]"));
    };
    if let Some(a) = l.argv.iter().find(|a| has_nul(a)) {
        return Err(invalid(format!("argument {a:?} contains a NUL byte")));
    }
    for (k, v) in l.env {
        if k.is_empty() || k.contains('=') || has_nul(k) || has_nul(v) {
            return Err(invalid(format!(
                "environment entry {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    if let Some(cwd) = l.cwd {
        if has_nul(cwd) {
            return Err(invalid("cwd contains a NUL byte"));
        }
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(os_error(
                    &io::Error::from_raw_os_error(libc::ENOTDIR),
                    format!("working directory {cwd}: not a directory"),
                    Some(cwd),
                ))
            }
            Err(e) => return Err(os_error(&e, format!("working directory {cwd}: {e}"), Some(cwd))),
        }
    }
    let ids = users::resolve(Path::new("/etc"), l.user, l.uid, l.gid).map_err(invalid)?;

    let mut cmd = Command::new(program);
    cmd.args(&l.argv[1..]);
    if l.clear_env {
        cmd.env_clear();
    }
    if let Some(Ids { name: Some(name), home, .. }) = &ids {
        let given = |k: &str| l.env.iter().any(|(n, _)| n == k);
        for (k, v) in [("USER", Some(name)), ("LOGNAME", Some(name)), ("HOME", home.as_ref())] {
            if let (false, Some(v)) = (given(k), v) {
                cmd.env(k, v);
            }
        }
    }
    cmd.envs(l.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = l.cwd {
        cmd.current_dir(cwd);
    }

    let mut child = Child { pid: 0, stdout: None, stderr: None, stdin: None, tty: false };
    let spawn_err = |e: io::Error| os_error(&e, format!("cannot start {program}: {e}"), None);
    match &stdio {
        StdioMode::Pipes { stdin } => {
            let (out_r, out_w) = sys::pipe().map_err(spawn_err)?;
            let (err_r, err_w) = sys::pipe().map_err(spawn_err)?;
            cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
            if *stdin {
                let (in_r, in_w) = sys::pipe().map_err(spawn_err)?;
                cmd.stdin(Stdio::from(in_r));
                child.stdin = Some(in_w);
            } else {
                cmd.stdin(Stdio::null());
            }
            child.stdout = Some(out_r);
            child.stderr = Some(err_r);
        }
        StdioMode::Tty(size) => {
            let (master, slave) = sys::openpty(size.rows, size.cols).map_err(spawn_err)?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(spawn_err);
            cmd.stdin(Stdio::from(dup(&slave)?)).stdout(Stdio::from(dup(&slave)?)).stderr(Stdio::from(slave));
            child.stdin = Some(sys::dup(master.as_raw_fd()).map_err(spawn_err)?);
            child.stdout = Some(master);
            child.tty = true;
        }
        StdioMode::Console { stdout_to_stderr } => {
            cmd.stdin(Stdio::null());
            if *stdout_to_stderr {
                cmd.stdout(Stdio::from(io::stderr().as_fd().try_clone_to_owned().map_err(spawn_err)?));
            }
        }
    }
    for fd in [&child.stdout, &child.stderr, &child.stdin].into_iter().flatten() {
        sys::set_nonblocking(fd.as_raw_fd()).map_err(spawn_err)?;
    }

    let tty = child.tty;
    let limits: Vec<(u32, libc::rlimit)> = l
        .rlimits
        .iter()
        .map(|r| {
            let v = |x: u64| if x == u64::MAX { libc::RLIM_INFINITY } else { x as libc::rlim_t };
            (r.resource, libc::rlimit { rlim_cur: v(r.soft), rlim_max: v(r.hard) })
        })
        .collect();
    let switch: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)> =
        ids.as_ref().map(|i| (i.uid, i.gid, i.groups.clone()));
    let cgroup_procs = cgroup.and_then(Cgroup::procs_fd);
    // SAFETY: only async-signal-safe system calls between fork and exec, on data prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // First, while still root: nothing the program does runs outside its cgroup.
            if let Some(fd) = cgroup_procs {
                cgroup::join_in_child(fd)?;
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            for (res, lim) in &limits {
                if libc::setrlimit(*res as _, lim) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &switch {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn().map_err(|e| {
        let path = (e.raw_os_error().is_some()).then_some(program.as_str());
        os_error(&e, format!("cannot run {program}: {e}"), path)
    })?;
    child.pid = spawned.id() as i32;
    // The agent reaps every child itself (signalfd + waitpid(-1)); `spawned` holds no pipes.
    drop(spawned);
    Ok(child)
}

struct OutPipe {
    fd: Option<OwnedFd>,
    kind: u16,
    credit: u64,
    /// Bytes in the pipe when the process exited, and read since.
    pending_at_exit: usize,
    read_since_exit: usize,
}

struct InPipe {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    pos: usize,
    close_requested: bool,
    /// Credit earned (bytes written or dropped) and not yet sent.
    owed: u64,
    tty: bool,
}

/// Which descriptor of a process became ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fd {
    Out(usize),
    In,
    /// A `Watch`'s inotify fd.
    Watch,
}

/// One process of an `Exec`.
pub struct Proc {
    pub id: u32,
    pub pid: i32,
    started: Instant,
    outs: Vec<OutPipe>,
    stdin: Option<InPipe>,
    status: Option<i32>,
    exited_at: Option<Instant>,
    deadline: Option<Instant>,
    timed_out: bool,
    cgroup: Option<Cgroup>,
}

impl Proc {
    /// Starts the process of `req` (in a cgroup of its own where there are cgroups); queues
    /// `Started` (and the stdin credit).
    pub fn start(id: u32, req: &Exec, cgroups: &mut Cgroups, out: &mut OutQueue) -> Result<Proc, ErrorMsg> {
        let started = Instant::now();
        let spec = Launch {
            argv: &req.argv,
            env: &req.env,
            clear_env: req.clear_env,
            cwd: req.cwd.as_deref(),
            user: req.user.as_deref(),
            uid: req.uid,
            gid: req.gid,
            rlimits: &req.rlimits,
        };
        let stdio = match req.tty {
            Some(size) => StdioMode::Tty(size),
            None => StdioMode::Pipes { stdin: req.stdin },
        };
        let mut cgroup = cgroups.create().unwrap_or_else(|e| {
            log!("exec {id}: {e}; it runs without a cgroup of its own");
            None
        });
        let child = launch(&spec, stdio, cgroup.as_ref()).inspect_err(|_| {
            if let Some(cg) = &cgroup {
                cg.remove();
            }
        })?;
        if let Some(cg) = &mut cgroup {
            cg.spawned();
        }
        let window = u64::from(req.window);
        let pipe = |fd: Option<OwnedFd>, kind| {
            fd.map(|fd| OutPipe { fd: Some(fd), kind, credit: window, pending_at_exit: 0, read_since_exit: 0 })
        };
        let outs = [pipe(child.stdout, kind::STDOUT), pipe(child.stderr, kind::STDERR)].into_iter().flatten().collect();
        let stdin = child.stdin.map(|fd| InPipe {
            fd: Some(fd),
            buf: Vec::new(),
            pos: 0,
            close_requested: false,
            owed: 0,
            tty: child.tty,
        });
        out.msg(id, Message::Started(protocol::Started { pid: child.pid as u32 }));
        if stdin.is_some() {
            out.msg(id, Message::Credit(Credit { stream: StreamKind::Stdin, bytes: STDIN_WINDOW }));
        }
        Ok(Proc {
            id,
            pid: child.pid,
            started,
            outs,
            stdin,
            status: None,
            exited_at: None,
            deadline: req.timeout_ms.map(|ms| started + Duration::from_millis(ms)),
            timed_out: false,
            cgroup,
        })
    }

    /// The descriptors to poll: output pipes with credit (while the queue has room), stdin
    /// while it has bytes to write.
    pub fn poll_fds(&self, room: bool, fds: &mut Vec<(RawFd, i16)>, tokens: &mut Vec<(u32, Fd)>) {
        for (i, p) in self.outs.iter().enumerate() {
            if let (Some(fd), true) = (&p.fd, p.credit > 0 && room) {
                fds.push((fd.as_raw_fd(), libc::POLLIN));
                tokens.push((self.id, Fd::Out(i)));
            }
        }
        if let Some(InPipe { fd: Some(fd), buf, pos, .. }) = &self.stdin {
            if *pos < buf.len() {
                fds.push((fd.as_raw_fd(), libc::POLLOUT));
                tokens.push((self.id, Fd::In));
            }
        }
    }

    pub fn ready(&mut self, which: Fd, out: &mut OutQueue) {
        match which {
            Fd::Out(i) => self.read_out(i, out),
            Fd::In => self.write_in(out),
            Fd::Watch => {}
        }
    }

    fn read_out(&mut self, i: usize, out: &mut OutQueue) {
        let id = self.id;
        let p = &mut self.outs[i];
        let Some(fd) = p.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        if p.credit == 0 {
            return;
        }
        let max = (p.credit as usize).min(CHUNK);
        let r = out.push_raw(id, p.kind, |buf| match sys::read_append(fd, buf, max) {
            Ok(0) => Err(None),
            Ok(_) => Ok(0),
            Err(e) => Err(Some(e)),
        });
        match r {
            Ok(n) => {
                p.credit -= n as u64;
                p.read_since_exit += n;
            }
            Err(Some(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            // End of file; EIO is how a terminal's master says every slave closed.
            Err(_) => p.fd = None,
        }
    }

    fn write_in(&mut self, out: &mut OutQueue) {
        let Some(s) = &mut self.stdin else { return };
        while let Some(fd) = s.fd.as_ref().map(|f| f.as_raw_fd()) {
            if s.pos >= s.buf.len() {
                break;
            }
            match sys::write(fd, &s.buf[s.pos..]) {
                Ok(n) => {
                    s.pos += n;
                    s.owed += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // EPIPE: nobody reads stdin any more. Drop what is left, credit it back.
                    s.owed += (s.buf.len() - s.pos) as u64;
                    s.pos = s.buf.len();
                    if !s.tty {
                        s.fd = None;
                    }
                }
            }
        }
        if s.pos >= s.buf.len() {
            s.buf.clear();
            s.pos = 0;
            if s.close_requested && !s.tty {
                s.fd = None;
            }
        }
        if s.owed >= CREDIT_BATCH || (s.owed > 0 && s.buf.is_empty()) {
            out.msg(self.id, Message::Credit(Credit { stream: StreamKind::Stdin, bytes: s.owed as u32 }));
            s.owed = 0;
        }
    }

    /// Host → process stdin bytes.
    pub fn stdin_data(&mut self, data: &[u8], out: &mut OutQueue) -> Result<(), String> {
        let Some(s) = &mut self.stdin else { return Err("this exec has no stdin pipe (start it with stdin)".into()) };
        if s.close_requested {
            return Err("stdin was closed".into());
        }
        if s.fd.is_none() {
            // The process stopped reading: drop the bytes, give the credit back.
            out.msg(self.id, Message::Credit(Credit { stream: StreamKind::Stdin, bytes: data.len() as u32 }));
            return Ok(());
        }
        if s.buf.len() - s.pos + data.len() > 2 * STDIN_WINDOW as usize {
            return Err(format!("stdin data beyond the granted credit ({} bytes buffered)", s.buf.len() - s.pos));
        }
        s.buf.extend_from_slice(data);
        self.write_in(out);
        Ok(())
    }

    pub fn close_stdin(&mut self, out: &mut OutQueue) -> Result<(), String> {
        let Some(s) = &mut self.stdin else { return Err("this exec has no stdin pipe".into()) };
        if s.close_requested {
            return Ok(());
        }
        s.close_requested = true;
        if s.tty {
            // A terminal has no end of file of its own: send the EOF character (^D).
            s.buf.push(4);
        }
        self.write_in(out);
        Ok(())
    }

    pub fn add_credit(&mut self, stream: StreamKind, bytes: u32) -> Result<(), String> {
        let k = match stream {
            StreamKind::Stdout => kind::STDOUT,
            StreamKind::Stderr => kind::STDERR,
            _ => return Err(format!("credit for {stream:?} on an exec")),
        };
        if let Some(p) = self.outs.iter_mut().find(|p| p.kind == k) {
            p.credit = p.credit.saturating_add(u64::from(bytes));
        }
        Ok(())
    }

    pub fn signal(&mut self, sig: i32, group: bool) -> io::Result<()> {
        if !(1..=64).contains(&sig) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // After the exit only the group can still be there (daemons); never the pid alone.
        if group {
            if sig == libc::SIGKILL {
                self.kill_group();
                return Ok(());
            }
            sys::kill(-self.pid, sig)
        } else if self.status.is_none() {
            sys::kill(self.pid, sig)
        } else {
            Ok(())
        }
    }

    pub fn resize(&self, size: TtySize) -> Result<(), String> {
        match &self.stdin {
            Some(InPipe { fd: Some(fd), tty: true, .. }) => {
                sys::set_winsize(fd.as_raw_fd(), size.rows, size.cols).map_err(|e| format!("TIOCSWINSZ: {e}"))
            }
            _ => Err("this exec has no terminal (start it with tty)".into()),
        }
    }

    /// The process was reaped.
    pub fn reaped(&mut self, status: i32, now: Instant) {
        self.status = Some(status);
        self.exited_at = Some(now);
        for p in &mut self.outs {
            p.pending_at_exit = p.fd.as_ref().map_or(0, |f| sys::bytes_readable(f.as_raw_fd()));
            p.read_since_exit = 0;
        }
    }

    /// Timeouts and the end of the streams; `true` when `Exit` was queued (the process is done).
    pub fn tick(&mut self, now: Instant, out: &mut OutQueue) -> bool {
        if let Some(d) = self.deadline {
            if now >= d {
                self.deadline = None;
                if self.status.is_none() {
                    self.timed_out = true;
                    self.kill_group();
                    let _ = sys::kill(self.pid, libc::SIGKILL);
                }
            }
        }
        let (Some(status), Some(at)) = (self.status, self.exited_at) else { return false };
        if now >= at + GRACE {
            for p in &mut self.outs {
                if p.read_since_exit >= p.pending_at_exit {
                    p.fd = None;
                }
            }
        }
        if self.outs.iter().any(|p| p.fd.is_some()) {
            return false;
        }
        let (code, signal) = sys::decode_status(status);
        let exit = Exit { code, signal, duration_ns: (at - self.started).as_nanos() as u64, timed_out: self.timed_out };
        out.final_msg(self.id, Message::Exit(exit));
        if let Some(s) = &mut self.stdin {
            s.fd = None;
        }
        true
    }

    /// When [`Proc::tick`] next has something to do.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let grace =
            self.exited_at.map(|at| at + GRACE).filter(|&t| t > now && self.outs.iter().any(|p| p.fd.is_some()));
        match (self.deadline, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// SIGKILL to everything it started: its cgroup (what left the process group with it), and
    /// its process group (all there is without cgroups). On a timeout, a `kill()`, the host
    /// going away, the agent ending in test mode.
    pub fn kill_group(&self) {
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.kill() {
                log!("exec {}: {e}", self.id);
            }
        }
        let _ = sys::kill(-self.pid, libc::SIGKILL);
    }

    /// Its cgroup, for the session to remove once empty (the process has ended).
    pub fn take_cgroup(&mut self) -> Option<Cgroup> {
        self.cgroup.take()
    }
}
