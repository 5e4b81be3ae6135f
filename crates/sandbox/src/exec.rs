//! Running processes in the guest: [`AgentClient::exec`] → [`ExecHandle`].
//!
//! The handle is pull-based: the consumer reads events ([`ExecHandle::read_event`], blocking
//! with an optional deadline, or [`ExecHandle::next_event`], a future woken by the channel's
//! reader thread — no thread waits for it). Output credit goes back to the agent as the
//! consumer takes bytes, so each output stream holds at most its window (default 256 KiB) on
//! the host; a consumer that stops reading stalls only its own process (the agent stops
//! reading that pipe), never the channel or other commands.
//!
//! All methods take `&self`: one thread may read events while another writes stdin or sends a
//! signal (the napi layer keeps handles in `Arc`s).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::{kind, Credit, Exec, Message, Rlimit, Signal, StreamKind, TtySize};
use serde::{Deserialize, Serialize};

use crate::agent_client::{agent_error, AgentClient, CreditWait, Pending};
use crate::config::LinuxRlimit;
use crate::error::{Result, SandboxError};

/// The output window per stream when the request gives none.
pub const DEFAULT_WINDOW: u32 = 256 << 10;
/// How long `exec` waits for the agent to say the process started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Stdin bytes per frame.
const STDIN_CHUNK: usize = 64 << 10;

/// What to run (camelCase JSON for the napi layer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ExecRequest {
    /// `argv[0]` is the program: a path, or a name looked up in `PATH`.
    pub argv: Vec<String>,
    /// Added to the environment (the sandbox's `env`, then the agent's `PATH`/`HOME`).
    pub env: Vec<(String, String)>,
    /// Start from an empty environment (then only `env`).
    pub clear_env: bool,
    /// Working directory (absolute guest path); default: the sandbox's `workdir`, else `/`.
    pub cwd: Option<String>,
    /// A user name from the guest's `/etc/passwd`, or `"uid"` / `"uid:gid"`.
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Pipe stdin (write it with [`ExecHandle::write_stdin`]); otherwise it is `/dev/null`.
    pub stdin: bool,
    /// Run on a pseudo-terminal of `(rows, cols)`; stdout and stderr then merge into stdout.
    pub tty: Option<(u16, u16)>,
    /// Kill the process group this long after the start; the exit says `timed_out`.
    pub timeout_ms: Option<u64>,
    /// `"RLIMIT_NOFILE=1024:1024"`, as in the MicroVm config.
    pub rlimits: Vec<String>,
    /// Output bytes per stream the host buffers before the consumer reads (default 256 KiB).
    pub window: Option<u32>,
}

impl ExecRequest {
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ExecRequest {
        ExecRequest { argv: argv.into_iter().map(Into::into).collect(), ..Default::default() }
    }

    /// `sh -c script`.
    pub fn shell(script: impl Into<String>) -> ExecRequest {
        ExecRequest::new(["/bin/sh".to_owned(), "-c".to_owned(), script.into()])
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> ExecRequest {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> ExecRequest {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn stdin(mut self) -> ExecRequest {
        self.stdin = true;
        self
    }

    pub fn timeout(mut self, d: Duration) -> ExecRequest {
        self.timeout_ms = Some(d.as_millis() as u64);
        self
    }

    pub(crate) fn to_message(&self) -> Result<Exec> {
        if self.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(SandboxError::InvalidArgument("exec: argv is empty: give the program as argv[0]".into()));
        }
        let rlimits = self
            .rlimits
            .iter()
            .map(|r| {
                LinuxRlimit::parse(r)
                    .map(|l| Rlimit { resource: l.resource, soft: l.soft, hard: l.hard })
                    .map_err(|e| SandboxError::InvalidArgument(format!("exec: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let window = self.window.unwrap_or(DEFAULT_WINDOW);
        if window == 0 {
            return Err(SandboxError::InvalidArgument("exec: window must be at least 1 byte".into()));
        }
        Ok(Exec {
            argv: self.argv.clone(),
            env: self.env.clone(),
            clear_env: self.clear_env,
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            uid: self.uid,
            gid: self.gid,
            tty: self.tty.map(|(rows, cols)| TtySize { rows, cols }),
            stdin: self.stdin || self.tty.is_some(),
            window,
            timeout_ms: self.timeout_ms,
            rlimits,
        })
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecExit {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it (e.g. 9), when one did.
    pub signal: Option<i32>,
    /// `SIGKILL`, ... for `signal`.
    pub signal_name: Option<String>,
    /// Killed because its `timeoutMs` passed.
    pub timed_out: bool,
    /// From spawn to exit, measured in the guest.
    #[serde(rename = "durationMs", serialize_with = "ser_ms")]
    pub duration: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// One event of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event: the process exited and its output has all been delivered.
    Exit(ExecExit),
}

/// What [`AgentClient::exec_collect`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit: ExecExit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn code(&self) -> Option<i32> {
        self.exit.code
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

struct ReadSide {
    /// Output bytes handed to the consumer and not yet credited back, per stream.
    consumed: [u64; 2],
    exit: Option<ExecExit>,
}

/// A running process in the guest. Dropping it before the exit kills the process group.
pub struct ExecHandle {
    pending: Pending,
    pid: u32,
    window: u32,
    read: Mutex<ReadSide>,
    /// Serialises stdin writers (so chunks do not interleave).
    stdin: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExecHandle {
    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The request id on the channel.
    pub fn id(&self) -> u32 {
        self.pending.id()
    }

    /// How the process ended, once [`ExecEvent::Exit`] has been read.
    pub fn exit(&self) -> Option<ExecExit> {
        lock(&self.read).exit.clone()
    }

    /// Output bytes buffered on the host for this process now, and the most ever (at most
    /// about two windows: stdout and stderr).
    pub fn buffered_bytes(&self) -> (usize, usize) {
        self.pending.queued_bytes()
    }

    /// Turns one frame into an event (`None`: a frame that is no event, e.g. a non-final
    /// error about one stdin chunk).
    fn event(&self, frame: protocol::Frame, r: &mut ReadSide) -> Result<Option<ExecEvent>> {
        let is_final = frame.is_final();
        match frame.msg {
            Message::Stdout(c) => {
                self.consumed(r, 0, c.len())?;
                Ok(Some(ExecEvent::Stdout(c.0)))
            }
            Message::Stderr(c) => {
                self.consumed(r, 1, c.len())?;
                Ok(Some(ExecEvent::Stderr(c.0)))
            }
            Message::Exit(e) => {
                let exit = ExecExit {
                    code: e.code,
                    signal: e.signal,
                    signal_name: e.signal.and_then(protocol::errno::signal_name),
                    timed_out: e.timed_out,
                    duration: Duration::from_nanos(e.duration_ns),
                };
                r.exit = Some(exit.clone());
                Ok(Some(ExecEvent::Exit(exit)))
            }
            Message::Error(e) if is_final => Err(agent_error("Exec", e)),
            Message::Error(e) => {
                tracing::debug!(id = self.id(), "agent: {}", e.message);
                Ok(None)
            }
            other => {
                tracing::debug!(id = self.id(), kind = other.name(), "unexpected frame for an exec");
                Ok(None)
            }
        }
    }

    /// Gives credit back once half a window has been consumed.
    fn consumed(&self, r: &mut ReadSide, i: usize, n: usize) -> Result<()> {
        r.consumed[i] += n as u64;
        if r.consumed[i] >= u64::from(self.window / 2).max(1) {
            let stream = if i == 0 { StreamKind::Stdout } else { StreamKind::Stderr };
            let bytes = r.consumed[i] as u32;
            r.consumed[i] = 0;
            // After the exit there is nothing left to credit; a closed channel shows up on the
            // next read.
            if r.exit.is_none() {
                let _ = self.pending.send(Message::Credit(Credit { stream, bytes }));
            }
        }
        Ok(())
    }

    /// The next event, waiting at most `timeout` (`None`: no limit); `Ok(None)` once the
    /// stream is over (after `Exit` was returned). A timeout is `E_AGENT_TIMEOUT`.
    pub fn read_event(&self, timeout: Option<Duration>) -> Result<Option<ExecEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut r = lock(&self.read);
        loop {
            if r.exit.is_some() {
                return Ok(None);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            let frame = match self.pending.wait_timeout(left)? {
                Some(f) => f,
                None if deadline.is_some() => {
                    return Err(SandboxError::AgentTimeout {
                        request: "Exec output",
                        timeout_ms: timeout.unwrap_or_default().as_millis() as u64,
                    })
                }
                None => continue,
            };
            if let Some(ev) = self.event(frame, &mut r)? {
                return Ok(Some(ev));
            }
        }
    }

    /// An event if one is queued now (never waits); `Ok(None)` also after the end — tell the
    /// two apart with [`ExecHandle::exit`].
    pub fn try_read_event(&self) -> Result<Option<ExecEvent>> {
        let mut r = lock(&self.read);
        while r.exit.is_none() {
            let Some(frame) = self.pending.try_next()? else { return Ok(None) };
            if let Some(ev) = self.event(frame, &mut r)? {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    }

    /// The next event as a future: `Ok(None)` once the stream is over. No thread waits; the
    /// channel's reader thread wakes it. (Hold no other reader of this handle meanwhile.)
    pub async fn next_event(&self) -> Result<Option<ExecEvent>> {
        loop {
            if lock(&self.read).exit.is_some() {
                return Ok(None);
            }
            let frame = self.pending.recv().await?;
            let mut r = lock(&self.read);
            if let Some(ev) = self.event(frame, &mut r)? {
                return Ok(Some(ev));
            }
        }
    }

    /// [`ExecHandle::next_event`] on a shared handle: a `Send + 'static` future (what napi's
    /// `execute_tokio_future` takes).
    pub async fn next_event_owned(self: std::sync::Arc<Self>) -> Result<Option<ExecEvent>> {
        self.next_event().await
    }

    /// Writes to the process's stdin, waiting (at most `timeout` for each piece) while the
    /// agent's stdin buffer is full. `E_EXEC_STDIN`-style failures: the process has exited
    /// (`E_INVALID_ARGUMENT` when the exec has no stdin pipe).
    pub fn write_stdin(&self, mut data: &[u8], timeout: Duration) -> Result<()> {
        let closed = lock(&self.stdin);
        if *closed {
            return Err(SandboxError::InvalidArgument("write_stdin after close_stdin".into()));
        }
        while !data.is_empty() {
            match self.pending.take_credit(StreamKind::Stdin, data.len().min(STDIN_CHUNK) as u64, timeout)? {
                CreditWait::Granted(n) => {
                    let (now, rest) = data.split_at(n as usize);
                    self.pending.send_data(kind::STDIN, now, false)?;
                    data = rest;
                }
                CreditWait::Finished => {
                    return Err(SandboxError::InvalidArgument(
                        "write_stdin: the process has ended (or has no stdin pipe: start it with stdin)".into(),
                    ))
                }
                CreditWait::Timeout => {
                    return Err(SandboxError::AgentTimeout {
                        request: "Stdin (the process does not read its stdin)",
                        timeout_ms: timeout.as_millis() as u64,
                    })
                }
            }
        }
        Ok(())
    }

    /// Closes stdin (after everything written so far); a terminal gets ^D.
    pub fn close_stdin(&self) -> Result<()> {
        let mut closed = lock(&self.stdin);
        if *closed || self.pending.is_finished() {
            *closed = true;
            return Ok(());
        }
        *closed = true;
        self.pending.send(Message::CloseStdin(()))
    }

    /// Sends a signal (`"SIGTERM"`, `"TERM"`, `"15"`) to the process group.
    pub fn signal(&self, name: &str) -> Result<()> {
        let sig = protocol::errno::signal_number(name).ok_or_else(|| {
            SandboxError::InvalidArgument(format!("signal {name:?}: give a name like SIGTERM or a number 1-64"))
        })?;
        self.signal_number(sig)
    }

    pub fn signal_number(&self, sig: i32) -> Result<()> {
        if self.pending.is_finished() {
            return Ok(());
        }
        self.pending.send(Message::Signal(Signal { signal: sig, group: true }))
    }

    /// SIGKILL to the process group.
    pub fn kill(&self) -> Result<()> {
        self.signal_number(libc::SIGKILL)
    }

    /// The terminal's new size (exec with `tty`).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.pending.send(Message::Resize(protocol::Resize { size: TtySize { rows, cols } }))
    }

    /// Reads everything until the exit.
    pub fn collect(&self, timeout: Option<Duration>) -> Result<ExecOutput> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.read_event(left)? {
                Some(ExecEvent::Stdout(b)) => stdout.extend_from_slice(&b),
                Some(ExecEvent::Stderr(b)) => stderr.extend_from_slice(&b),
                Some(ExecEvent::Exit(exit)) => return Ok(ExecOutput { exit, stdout, stderr }),
                None => {
                    let exit = self.exit().expect("the stream ends with the exit");
                    return Ok(ExecOutput { exit, stdout, stderr });
                }
            }
        }
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if !self.pending.is_finished() {
            let _ = self.kill();
        }
    }
}

impl AgentClient {
    /// Starts a process in the guest; returns once it runs (or with its error: `ENOENT` /
    /// `EACCES` for a program that cannot run, `ENOENT`/`ENOTDIR` with the path for a bad
    /// cwd, `E_INVALID_ARGUMENT` for an empty argv or an unknown user).
    pub fn exec(&self, req: &ExecRequest) -> Result<ExecHandle> {
        let msg = req.to_message()?;
        let window = msg.window;
        let pending = self.send(Message::Exec(msg))?;
        let frame = pending.wait(START_TIMEOUT)?;
        match frame.msg {
            Message::Started(s) => Ok(ExecHandle {
                pending,
                pid: s.pid,
                window,
                read: Mutex::new(ReadSide { consumed: [0; 2], exit: None }),
                stdin: Mutex::new(!req.stdin && req.tty.is_none()),
            }),
            Message::Error(e) => Err(agent_error("Exec", e)),
            other => Err(SandboxError::Protocol(format!("expected Started in answer to Exec, got {}", other.name()))),
        }
    }

    /// Runs a process to its end and returns its exit and output (`timeout`: for the whole run,
    /// after which the process group is killed and `E_AGENT_TIMEOUT` returned; prefer the
    /// request's `timeout_ms`, which reports `timed_out` instead).
    pub fn exec_collect(&self, req: &ExecRequest, timeout: Option<Duration>) -> Result<ExecOutput> {
        self.exec(req)?.collect(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owned_event_future_is_send_and_static() {
        fn send_static<T: Send + 'static>(_: &T) {}
        fn check(h: std::sync::Arc<ExecHandle>) {
            send_static(&h.next_event_owned());
        }
        let _ = check;
    }

    #[test]
    fn requests_are_checked_before_anything_is_sent() {
        assert_eq!(ExecRequest::default().to_message().unwrap_err().code(), "E_INVALID_ARGUMENT");
        let mut r = ExecRequest::shell("true");
        r.rlimits = vec!["RLIMIT_NOFILE=1:2".into()];
        assert_eq!(r.to_message().unwrap().rlimits, [Rlimit { resource: 7, soft: 1, hard: 2 }]);
        r.rlimits = vec!["NOFILE".into()];
        assert_eq!(r.to_message().unwrap_err().code(), "E_INVALID_ARGUMENT");
        let r: ExecRequest = serde_json::from_str(r#"{"argv":["ls","-l"],"env":[["A","b"]],"cwd":"/tmp","stdin":true,"tty":[24,80],"timeoutMs":500,"rlimits":["RLIMIT_NOFILE=1024:1024"]}"#).unwrap();
        let m = r.to_message().unwrap();
        assert_eq!((m.tty, m.timeout_ms, m.window), (Some(TtySize { rows: 24, cols: 80 }), Some(500), DEFAULT_WINDOW));
        assert!(serde_json::from_str::<ExecRequest>(r#"{"argv":["ls"],"bogus":1}"#).is_err());
    }
}
