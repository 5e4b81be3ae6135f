//! Processes in a sandbox: `NativeSandbox.execStart` → `NativeExec` (events, stdin, signals,
//! terminal size) and `NativeSandbox.execCollect` (run to the end, output in memory). No logic:
//! each call is one `sandbox::ExecHandle` / `Sandbox::exec` call.
//!
//! - Starting a process waits for the agent's `Started` (bounded: 30 s), and writing stdin waits
//!   for the agent's stdin credit (bounded: [`STDIN_TIMEOUT`] per piece): both run on tokio's
//!   blocking pool.
//! - `nextEvent()` is `ExecHandle::next_event` — a future the channel's reader thread wakes; no
//!   thread waits for output. Output credit goes back to the agent only as JS takes events, so a
//!   process whose consumer stops calling `nextEvent()` is stopped by back-pressure in the guest
//!   (its pipes fill), and nothing else on the channel is.
//! - A `NativeExec` dropped (GC) before its exit kills the process group, from a thread of its own.

use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::{ExecEvent, ExecExit, ExecHandle, ExecRequest};

use super::coded;
use crate::sandboxes::NativeSandbox;
use crate::tasks::{blocking, drop_off_thread, sandbox_error};

/// How long one piece of a stdin write may wait for the process to read (the agent's stdin
/// buffer to have room): then `E_AGENT_TIMEOUT`.
pub const STDIN_TIMEOUT: Duration = Duration::from_secs(120);

/// How a process ended.
#[napi(object)]
pub struct ExecExitInfo {
    /// The exit code, when it exited (null when a signal killed it).
    pub exit_code: Option<i32>,
    /// The signal that killed it (`SIGKILL`, ...), when one did.
    pub signal: Option<String>,
    pub signal_number: Option<i32>,
    /// Killed because its `timeoutMs` passed.
    pub timed_out: bool,
    /// From spawn to exit, measured in the guest.
    pub duration_ms: f64,
}

fn exit_info(e: ExecExit) -> ExecExitInfo {
    ExecExitInfo {
        exit_code: e.code,
        signal: e.signal_name.clone().or_else(|| e.signal.map(|s| format!("SIG{s}"))),
        signal_number: e.signal,
        timed_out: e.timed_out,
        duration_ms: e.duration.as_secs_f64() * 1e3,
    }
}

/// One event of a running process.
#[napi(object)]
pub struct ExecEventInfo {
    /// `stdout` | `stderr` | `exit`
    #[napi(js_name = "type")]
    pub kind: String,
    /// Output bytes (`stdout`, `stderr`).
    pub data: Option<Buffer>,
    /// How it ended (`exit`: the last event).
    pub exit: Option<ExecExitInfo>,
}

fn event_info(ev: ExecEvent) -> ExecEventInfo {
    let out = |kind: &str, data: Vec<u8>| ExecEventInfo { kind: kind.into(), data: Some(data.into()), exit: None };
    match ev {
        ExecEvent::Stdout(d) => out("stdout", d),
        ExecEvent::Stderr(d) => out("stderr", d),
        ExecEvent::Exit(e) => ExecEventInfo { kind: "exit".into(), data: None, exit: Some(exit_info(e)) },
    }
}

/// What `execCollect` returns.
#[napi(object)]
pub struct ExecCollected {
    pub exit: ExecExitInfo,
    pub stdout: Buffer,
    pub stderr: Buffer,
}

fn request(json: &str) -> Result<ExecRequest> {
    serde_json::from_str(json).map_err(|e| coded("E_INVALID_ARGUMENT", format!("exec request: {e}")))
}

/// `exec()`'s output limit per stream when none is given.
const DEFAULT_MAX_OUTPUT: usize = sandbox::limits::DEFAULT_OUTPUT_MAX_BYTES as usize;

async fn start(sandbox: &NativeSandbox, request_json: String) -> Result<Arc<ExecHandle>> {
    let sb = sandbox.sandbox()?;
    let req = request(&request_json)?;
    let handle = blocking("exec start", move || sb.exec(&req).map_err(sandbox_error)).await?;
    Ok(Arc::new(handle))
}

#[napi]
impl NativeSandbox {
    /// Starts a process (an `ExecRequest` as JSON: `argv`, `env` as pairs, `clearEnv`, `cwd`,
    /// `user`, `stdin`, `tty: [rows, cols]`, `timeoutMs`, `rlimits`, `window`) with the
    /// sandbox's `env` and `workdir` as defaults; resolves once it runs. Rejects with `ENOENT` /
    /// `EACCES` (a program or cwd that cannot be used, with the guest path),
    /// `E_INVALID_ARGUMENT` (an empty argv, an unknown user, ...), `E_CHANNEL_CLOSED`, ...
    #[napi]
    pub async fn exec_start(&self, request_json: String) -> Result<NativeExec> {
        Ok(NativeExec { handle: Some(start(self, request_json).await?) })
    }

    /// Runs a process to its end: its exit and all of its output. `stdin`: bytes written to its
    /// stdin (then closed) while the output is read, so a process that reads and writes a lot
    /// at once cannot stall. `maxOutputBytes` (per stream, default 64 MiB): a process that
    /// writes more is killed (its process group) and the call rejects with `E_OUTPUT_LIMIT`.
    #[napi]
    pub async fn exec_collect(
        &self,
        request_json: String,
        stdin: Option<Buffer>,
        max_output_bytes: Option<u32>,
    ) -> Result<ExecCollected> {
        let limit = max_output_bytes.map_or(DEFAULT_MAX_OUTPUT, |n| n as usize);
        let handle = start(self, request_json).await?;
        let writer = stdin.map(|data| {
            let (h, data) = (handle.clone(), data.to_vec());
            spawn_blocking(move || {
                // A process that exits without reading all of its stdin is no error (as EPIPE
                // is not for a shell pipeline); a closed channel shows up on the output side.
                let _ = h.write_stdin(&data, STDIN_TIMEOUT);
                let _ = h.close_stdin();
            })
        });
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        // The stream that passed the limit, once one has: the rest is read and dropped until
        // the killed process's exit.
        let mut over: Option<&str> = None;
        let exit = loop {
            let event = handle.clone().next_event_owned().await.map_err(sandbox_error)?;
            let (name, out, b) = match event {
                Some(ExecEvent::Stdout(b)) => ("stdout", &mut stdout, b),
                Some(ExecEvent::Stderr(b)) => ("stderr", &mut stderr, b),
                Some(ExecEvent::Exit(e)) => break e,
                None => match handle.exit() {
                    Some(e) => break e,
                    None => return Err(coded("E_INTERNAL", "the exec stream ended without an exit")),
                },
            };
            if over.is_some() {
                continue;
            }
            if out.len() + b.len() > limit {
                over = Some(name);
                let _ = handle.kill();
                continue;
            }
            out.extend_from_slice(&b);
        };
        if let Some(w) = writer {
            // It ends promptly once the process has: no more credit comes.
            let _ = w.await;
        }
        if let Some(name) = over {
            return Err(coded(
                "E_OUTPUT_LIMIT",
                format!("the process wrote more than {limit} bytes to {name} (maxOutputBytes) and was killed: use execStream() for large output, or raise maxOutputBytes"),
            ));
        }
        Ok(ExecCollected { exit: exit_info(exit), stdout: stdout.into(), stderr: stderr.into() })
    }
}

/// A running process in a sandbox. Made by `NativeSandbox.execStart`.
#[napi]
pub struct NativeExec {
    /// `None` only while being dropped.
    handle: Option<Arc<ExecHandle>>,
}

impl NativeExec {
    fn handle(&self) -> Arc<ExecHandle> {
        self.handle.clone().expect("present until drop")
    }
}

#[napi]
impl NativeExec {
    /// The process id in the guest.
    #[napi(getter)]
    pub fn pid(&self) -> u32 {
        self.handle().pid()
    }

    /// The next event (`stdout`/`stderr` bytes, then `exit`), or null after the exit. Output
    /// credit goes back to the agent as events are taken: not calling this stops the process's
    /// output. One call at a time.
    #[napi]
    pub async fn next_event(&self) -> Result<Option<ExecEventInfo>> {
        let h = self.handle();
        Ok(h.next_event_owned().await.map_err(sandbox_error)?.map(event_info))
    }

    /// How the process ended, once the `exit` event has been taken; else null.
    #[napi]
    pub fn exit_status(&self) -> Option<ExecExitInfo> {
        self.handle().exit().map(exit_info)
    }

    /// Writes to the process's stdin; resolves once the agent has taken it all (waiting while
    /// its stdin buffer is full, at most 120 s a piece: then `E_AGENT_TIMEOUT`).
    /// `E_INVALID_ARGUMENT` after `closeStdin`, for a process without a stdin pipe, or one that
    /// has ended.
    #[napi]
    pub async fn write_stdin(&self, data: Buffer) -> Result<()> {
        let (h, data) = (self.handle(), data.to_vec());
        blocking("exec stdin", move || h.write_stdin(&data, STDIN_TIMEOUT).map_err(sandbox_error)).await
    }

    /// Closes stdin after what was written (a terminal gets ^D). Idempotent.
    #[napi]
    pub async fn close_stdin(&self) -> Result<()> {
        let h = self.handle();
        blocking("exec close stdin", move || h.close_stdin().map_err(sandbox_error)).await
    }

    /// Sends a signal (`SIGTERM`, `TERM`, `15`) to the process group; nothing once it has ended.
    #[napi]
    pub async fn signal(&self, name: String) -> Result<()> {
        let h = self.handle();
        blocking("exec signal", move || h.signal(&name).map_err(sandbox_error)).await
    }

    /// SIGKILL to the process group.
    #[napi]
    pub async fn kill(&self) -> Result<()> {
        let h = self.handle();
        blocking("exec kill", move || h.kill().map_err(sandbox_error)).await
    }

    /// The terminal's new size (a process started with `tty`).
    #[napi]
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let size = |what, n: u32| {
            u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                coded("E_INVALID_ARGUMENT", format!("{what} is {n}: give a whole number from 1 to 65535"))
            })
        };
        let (rows, cols) = (size("rows", rows)?, size("cols", cols)?);
        let h = self.handle();
        blocking("exec resize", move || h.resize(rows, cols).map_err(sandbox_error)).await
    }

    /// Output bytes buffered on the host for this process now, and the most so far (at most
    /// about one window per stream).
    #[napi]
    pub fn buffered_bytes(&self) -> Vec<f64> {
        let (now, peak) = self.handle().buffered_bytes();
        vec![now as f64, peak as f64]
    }
}

impl Drop for NativeExec {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            if h.exit().is_none() {
                // The process may still run: ExecHandle's drop kills it (a frame on the channel).
                drop_off_thread(h);
            }
        }
    }
}
