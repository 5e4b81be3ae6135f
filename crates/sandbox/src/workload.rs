//! Workload mode: a VM whose one job is a program (a MicroVm's `execPath` + `args`, `env`,
//! `workdirPath`, `rlimits`). The spec travels over the control channel (`StartWorkload`,
//! right after the handshake), never on the kernel command line: its env may hold secrets, and
//! the command line is readable in the host's `/proc/<qemu pid>/cmdline` and the guest's
//! `/proc/cmdline`. The agent (PID 1) runs it with the console as stdout/stderr, prints a status
//! line on the console, answers `WaitWorkload` on the control channel, and ends the VM.
//!
//! [`Workload::start`] boots it on an engine and returns at once; [`Workload::wait`] /
//! [`Workload::wait_async`] give the [`WorkloadStatus`]: from the channel, or — when the
//! channel gave nothing (no channel, a VM that ended first) — from the console's status line.
//! A program that does not exist or cannot run is a status with an error (`ENOENT`,
//! `EACCES`), reported within the boot time, never a hung VM. [`Workload::signal`] reaches the
//! program (`SignalWorkload`); [`Workload::snapshot`] / [`Workload::restore`] checkpoint the VM
//! on its engine, and each restore's program runs on from where it was.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use protocol::workload::parse_status_line;
use protocol::WorkloadSpec;
use protocol::{Message, Signal, WorkloadExit};
use serde::Serialize;

use crate::agent_client::{agent_error, ready_from, AgentClient};
pub use crate::config::workload_spec::{
    check_spec, cmdline_with_spec, cmdline_word, spec_from_microvm_config, spec_from_parts, MAX_SPEC_BYTES,
    MAX_SPEC_WORD,
};
use crate::console::ConsoleReader;
use crate::engine::{self, Engine, EngineSelection, RunningVm, VmExit};
use crate::error::{Result, SandboxError};
use crate::sandbox::snapshot::{io, refuse_volumes, SnapshotInfo, SnapshotMeta};
use crate::sandbox::SandboxConfig;

/// How long the VM may take to end after the agent reported the status.
const END_GRACE: Duration = Duration::from_secs(5);
/// After the VM's end, how long its control channel may take to deliver what is left.
const VM_END_DRAIN: Duration = Duration::from_secs(2);

/// How the workload ended (camelCase JSON for the napi layer).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    pub signal_name: Option<String>,
    /// From spawn to exit, in the guest.
    pub duration_ms: f64,
    /// Why it could not start (then `code` and `signal` are absent).
    pub error: Option<WorkloadError>,
    /// Where the status came from: `channel` or `console`.
    pub source: &'static str,
}

/// A workload that could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadError {
    /// `ENOENT`, `EACCES`, ... (`E_WORKLOAD` when the errno has no name).
    pub code: String,
    pub errno: i32,
    pub message: String,
    pub path: Option<String>,
}

impl WorkloadStatus {
    pub fn from_exit(e: WorkloadExit, source: &'static str) -> WorkloadStatus {
        WorkloadStatus {
            code: e.code,
            signal: e.signal,
            signal_name: e.signal.and_then(protocol::errno::signal_name),
            duration_ms: e.duration_ns as f64 / 1e6,
            error: e.error.map(|m| WorkloadError {
                code: protocol::errno::name(m.errno).unwrap_or("E_WORKLOAD").to_owned(),
                errno: m.errno,
                message: m.message,
                path: m.path,
            }),
            source,
        }
    }

    /// The last status line in console text.
    pub fn from_console(text: &str) -> Option<WorkloadStatus> {
        text.lines().rev().find_map(parse_status_line).map(|e| WorkloadStatus::from_exit(e, "console"))
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl AgentClient {
    /// Waits for the boot workload's status (`WaitWorkload`), at most `timeout`.
    pub fn wait_workload(&self, timeout: Duration) -> Result<WorkloadExit> {
        match self.send(Message::WaitWorkload(()))?.wait(timeout)?.msg {
            Message::WorkloadExit(e) => Ok(e),
            Message::Error(e) => Err(agent_error("WaitWorkload", e)),
            other => Err(SandboxError::Protocol(format!("expected WorkloadExit, got {}", other.name()))),
        }
    }
}

type Outcome = std::result::Result<WorkloadStatus, (&'static str, String)>;

#[derive(Default)]
struct Slot {
    state: Mutex<(Option<Outcome>, Vec<Waker>)>,
    cv: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, (Option<Outcome>, Vec<Waker>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, o: Outcome) {
        let wakers = {
            let mut s = self.lock();
            s.0 = Some(o);
            std::mem::take(&mut s.1)
        };
        self.cv.notify_all();
        wakers.into_iter().for_each(Waker::wake);
    }
}

fn to_result(o: &Outcome) -> Result<WorkloadStatus> {
    o.clone().map_err(|(code, message)| SandboxError::Reported { code, message })
}

/// The agent once the watcher's handshake is over: `Some(client)` when it is up, `None` when
/// there is none (no channel, an old agent, a VM that ended first). What
/// [`Workload::signal`] talks to.
#[derive(Default)]
struct AgentSlot {
    state: Mutex<Option<Option<Arc<AgentClient>>>>,
    cv: Condvar,
}

impl AgentSlot {
    /// Settles the slot (the first call wins).
    fn settle(&self, agent: Option<Arc<AgentClient>>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(agent);
            self.cv.notify_all();
        }
    }

    /// The agent, waiting for the handshake to settle, at most `timeout` (then `None`).
    fn get(&self, timeout: Duration) -> Option<Arc<AgentClient>> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (s, _) = self.cv.wait_timeout_while(s, timeout, |s| s.is_none()).unwrap_or_else(|e| e.into_inner());
        s.clone().flatten()
    }
}

/// How long a signal request may take to be answered.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM running its workload. Dropping it kills the VM.
pub struct Workload {
    vm: Arc<dyn RunningVm>,
    slot: Arc<Slot>,
    agent: Arc<AgentSlot>,
    /// The boot timeout: how long [`Workload::signal`] waits for the agent to come up.
    boot_timeout: Duration,
    selection: EngineSelection,
    /// What a snapshot records beside the engine's files.
    meta: SnapshotMeta,
}

/// What a restored workload VM may change.
#[derive(Debug, Default, Clone)]
pub struct WorkloadRestoreOptions {
    /// Console to a host file.
    pub console_output: Option<PathBuf>,
    /// Console bytes kept for a slow console-stream reader (default: the snapshot's).
    pub console_queue_bytes: Option<u32>,
}

impl Workload {
    /// Boots `config`'s guest (engine `auto` | `kvm` | `qemu`) with `spec` as its workload;
    /// returns once the VM runs. `config.bootTimeoutMs` bounds the wait for the agent.
    pub fn start(spec: &WorkloadSpec, config: SandboxConfig) -> Result<Workload> {
        let config = config.validate()?;
        let selection = engine::select_for_devices(config.engine, config.qemu_only_devices())?;
        let engine = engine::engine(selection.kind)?;
        Self::start_on(spec, config, engine.as_ref(), selection)
    }

    /// [`Workload::start`] on a given engine.
    pub fn start_on(
        spec: &WorkloadSpec,
        config: SandboxConfig,
        engine: &dyn Engine,
        selection: EngineSelection,
    ) -> Result<Workload> {
        let config = config.validate()?;
        let images = config.guest_images()?;
        check_spec(spec)?;
        let program = spec.argv[0].clone();
        let meta = SnapshotMeta {
            config,
            engine: selection.kind,
            kernel: images.kernel,
            rootfs: images.rootfs,
            workload: Some(program),
        };
        let boot = meta.boot_spec(meta.config.console_output.clone());
        tracing::info!(engine = %selection.kind, argv0 = %spec.argv[0], "booting a workload VM");
        let vm: Arc<dyn RunningVm> = Arc::from(engine.boot(&boot)?);
        Self::spawn_watcher(vm, meta, selection, Some(spec.clone()))
    }

    /// A workload VM from a snapshot directory ([`Workload::snapshot`]): the engine resumes it
    /// where it was, and the program runs on; returns once the VM runs (the agent's handshake
    /// follows, within the snapshot's boot timeout). `E_SNAPSHOT` for a directory that holds no
    /// workload snapshot.
    pub fn restore(dir: &Path, options: WorkloadRestoreOptions) -> Result<Workload> {
        // The config's check, before anything is read or booted.
        crate::sandbox::check_console_output(options.console_output.as_deref())?;
        let mut meta = SnapshotMeta::read(dir)?;
        if meta.workload.is_none() {
            return Err(SandboxError::Snapshot(format!(
                "{} is a snapshot of a sandbox, not of a workload VM: restore it with Sandbox.fromSnapshot(dir)",
                dir.display()
            )));
        }
        if let Some(n) = options.console_queue_bytes {
            meta.config.console_queue_bytes = Some(n);
        }
        meta.config = meta.config.validate()?;
        let engine = engine::engine(meta.engine)?;
        let boot = meta.boot_spec(options.console_output);
        let selection = EngineSelection { kind: meta.engine, reason: format!("restored from {}", dir.display()) };
        let vm: Arc<dyn RunningVm> = Arc::from(engine.restore(dir, &boot)?);
        // Its workload runs on from the snapshot: nothing to start.
        Self::spawn_watcher(vm, meta, selection, None)
    }

    /// Writes a snapshot of the VM into `dir` (created if needed): the engine's (memory,
    /// devices, root disk) and `sandbox.json` with the workload; the VM runs on (a paused one
    /// stays paused). [`Workload::restore`] starts copies of it, each running the program on
    /// from where it was. Returns what `sandbox.json` says (as [`snapshot_info`] would read it).
    ///
    /// [`snapshot_info`]: crate::sandbox::snapshot_info
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo> {
        if self.wait_timeout(Duration::ZERO).is_some() {
            return Err(vmm::Error::VmState("the workload VM has ended: there is nothing to snapshot".into()).into());
        }
        refuse_volumes(&self.meta.config)?;
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create snapshot directory {}", dir.display())))?;
        self.vm.snapshot(dir)?;
        self.meta.write(dir)?;
        Ok(self.meta.info())
    }

    /// The watcher thread of a booted VM (which it sends `spec` to) or a restored one: the status
    /// over the channel, else from the console.
    fn spawn_watcher(
        vm: Arc<dyn RunningVm>,
        meta: SnapshotMeta,
        selection: EngineSelection,
        spec: Option<WorkloadSpec>,
    ) -> Result<Workload> {
        let slot = Arc::new(Slot::default());
        let agent = Arc::new(AgentSlot::default());
        let timeout = Duration::from_millis(u64::from(meta.config.boot_timeout_ms));
        let (v, s, a) = (vm.clone(), slot.clone(), agent.clone());
        std::thread::Builder::new()
            .name("mc-workload".into())
            .spawn(move || {
                let o = watch(v.as_ref(), &a, timeout, spec);
                // The Workload holds the last reference: its drop reaps QEMU and removes the
                // VM's files before it returns.
                drop(v);
                s.set(o);
            })
            .map_err(|e| {
                vm.kill();
                SandboxError::Thread { what: "workload watcher", source: e }
            })?;
        Ok(Workload { vm, slot, agent, boot_timeout: timeout, selection, meta })
    }

    /// Boots, runs the workload to its end and returns its status.
    pub fn run(spec: &WorkloadSpec, config: SandboxConfig) -> Result<WorkloadStatus> {
        Workload::start(spec, config)?.wait()
    }

    /// Blocks until the status is known and the VM has ended.
    pub fn wait(&self) -> Result<WorkloadStatus> {
        let mut s = self.slot.lock();
        loop {
            if let Some(o) = &s.0 {
                return to_result(o);
            }
            s = self.slot.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// [`Workload::wait`] with a limit; `None` while it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<WorkloadStatus>> {
        let deadline = Instant::now() + timeout;
        let mut s = self.slot.lock();
        loop {
            if let Some(o) = &s.0 {
                return Some(to_result(o));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            s = self.slot.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Resolves with the status once the VM has ended (no thread of the caller's waits).
    pub fn wait_async(&self) -> WorkloadFuture {
        WorkloadFuture { slot: self.slot.clone() }
    }

    /// Sends `signal` to the program's process group (SIGTERM: the graceful stop); waits for
    /// the agent to come up first (within the boot timeout). `Ok(false)` when there is no
    /// program to signal: no agent, or the program has ended (its status is then known, or
    /// about to be).
    pub fn signal(&self, signal: i32) -> Result<bool> {
        if self.is_paused() {
            return Err(vmm::Error::VmState("the workload VM is paused: resume() it first".into()).into());
        }
        let Some(agent) = self.agent.get(self.boot_timeout + Duration::from_secs(1)) else { return Ok(false) };
        if self.wait_timeout(Duration::ZERO).is_some() {
            return Ok(false);
        }
        match agent.request(Message::SignalWorkload(Signal { signal, group: true }), SIGNAL_TIMEOUT)?.msg {
            Message::Ok(()) => Ok(true),
            // It ended between the check and the request.
            Message::Error(e) if e.code == protocol::ErrorCode::BAD_STATE => Ok(false),
            Message::Error(e) => Err(agent_error("SignalWorkload", e)),
            other => Err(SandboxError::Protocol(format!("expected Ok, got {}", other.name()))),
        }
    }

    /// Stops the guest's vCPUs (the program with them) until [`Workload::resume`].
    pub fn pause(&self) -> Result<()> {
        self.vm.pause()
    }

    pub fn resume(&self) -> Result<()> {
        self.vm.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    /// Ends the VM now (the status is then taken from the console, or the wait fails with
    /// `E_AGENT_EXITED`).
    pub fn kill(&self) {
        self.vm.kill();
    }

    /// How the VM ended, once it has.
    pub fn vm_exit(&self) -> Option<VmExit> {
        self.vm.try_wait()
    }

    pub fn pid(&self) -> Option<u32> {
        self.vm.pid()
    }

    /// The engine that runs it and why.
    pub fn engine(&self) -> &EngineSelection {
        &self.selection
    }

    /// The console (the workload's stdout and stderr, with the kernel's and agent's lines).
    pub fn console(&self) -> Option<ConsoleReader> {
        self.vm.console()
    }

    pub fn console_tail(&self) -> String {
        self.vm.console_tail()
    }

    /// Console counters (bytes written, dropped for a slow reader, queued, closed).
    pub fn console_stats(&self) -> crate::console::ConsoleStats {
        self.vm.console_stats()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.vm.kill();
    }
}

/// See [`Workload::wait_async`].
pub struct WorkloadFuture {
    slot: Arc<Slot>,
}

impl Future for WorkloadFuture {
    type Output = Result<WorkloadStatus>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock();
        match &s.0 {
            Some(o) => Poll::Ready(to_result(o)),
            None => {
                if !s.1.iter().any(|w| w.will_wake(cx.waker())) {
                    s.1.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// The watcher: the status over the channel, else from the console; then the VM's end.
fn watch(vm: &dyn RunningVm, agent: &AgentSlot, boot_timeout: Duration, spec: Option<WorkloadSpec>) -> Outcome {
    let from_channel = channel_status(vm, agent, boot_timeout, spec);
    // No agent came up (or it did and is done): nobody to signal from now on.
    agent.settle(None);
    // The agent ends the VM right after it reported; make sure it has ended.
    let exit = match vm.wait_timeout(END_GRACE) {
        Some(e) => e,
        None => {
            if from_channel.is_ok() {
                tracing::warn!("the workload VM did not end {END_GRACE:?} after its status: killing it");
            }
            vm.kill();
            vm.wait()
        }
    };
    match from_channel {
        Ok(status) => Ok(status),
        Err(why) => match WorkloadStatus::from_console(&vm.console_tail()) {
            Some(status) => Ok(status),
            None => {
                let e = SandboxError::AgentExited {
                    exit: exit.to_string(),
                    console_tail: format!("({why})\n{}", vm.console_tail()),
                };
                Err((e.code(), e.to_string()))
            }
        },
    }
}

/// Hello → Ready → StartWorkload (unless the agent runs it already: a restored VM) → Ok, within
/// the boot timeout → WaitWorkload → WorkloadExit (no limit: the workload runs as long as it
/// runs, or until the VM ends).
fn channel_status(
    vm: &dyn RunningVm,
    agent: &AgentSlot,
    boot_timeout: Duration,
    spec: Option<WorkloadSpec>,
) -> std::result::Result<WorkloadStatus, String> {
    let chan = vm.take_channel().ok_or("no control channel")?;
    let client = Arc::new(AgentClient::new(chan).map_err(|e| e.to_string())?);
    let deadline = Instant::now() + boot_timeout;
    let hello = client.hello().map_err(|e| e.to_string())?;
    let ready = loop {
        match hello.wait_timeout(Duration::from_millis(50)).map_err(|e| e.to_string())? {
            Some(f) => break ready_from(f).map_err(|e| e.to_string())?,
            None if vm.try_wait().is_some() => return Err("the VM ended before the agent answered".into()),
            None if Instant::now() >= deadline => {
                vm.kill();
                return Err(format!("the agent did not answer within {} ms", boot_timeout.as_millis()));
            }
            None => {}
        }
    };
    if ready.features & protocol::features::WORKLOAD == 0 {
        let Some(spec) = spec else {
            return Err("the restored agent runs no workload: the snapshot is not one of a workload VM".into());
        };
        if ready.features & protocol::features::START_WORKLOAD == 0 {
            return Err("the agent cannot take its workload over the channel (an old root disk? rebuild it with scripts/guest/build-rootfs.sh)".into());
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match client.request(Message::StartWorkload(spec), left).map_err(|e| e.to_string())?.msg {
            Message::Ok(()) => {}
            Message::Error(e) => return Err(agent_error("StartWorkload", e).to_string()),
            other => return Err(format!("expected Ok to StartWorkload, got {}", other.name())),
        }
    }
    let pending = client.send(Message::WaitWorkload(())).map_err(|e| e.to_string())?;
    agent.settle(Some(client.clone()));
    let mut ended = false;
    loop {
        // The agent reports, then ends the VM: its report may still be on the way to the
        // reader thread when the end is seen. So after the end, read on until the channel
        // closes (the VM's end closes it; a queued frame still comes first), within a bound.
        let wait = if ended { VM_END_DRAIN } else { Duration::from_millis(100) };
        match pending.wait_timeout(wait) {
            Ok(Some(f)) => {
                return match f.msg {
                    Message::WorkloadExit(e) => Ok(WorkloadStatus::from_exit(e, "channel")),
                    Message::Error(e) => Err(agent_error("WaitWorkload", e).to_string()),
                    other => Err(format!("expected WorkloadExit, got {}", other.name())),
                }
            }
            Ok(None) if ended => return Err("the VM ended before the status came".into()),
            Ok(None) => ended = vm.try_wait().is_some(),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_the_console() {
        let text = "[ 0.1] boot\nhello\nmicrocell-workload-exit: exited code=3 duration_ns=5000000\nmicrocell-agent: workload ended\n[ 0.2] reboot: Restarting system\n";
        let s = WorkloadStatus::from_console(text).unwrap();
        assert_eq!((s.code, s.signal, s.duration_ms, s.source), (Some(3), None, 5.0, "console"));
        let s = WorkloadStatus::from_console("microcell-workload-exit: signaled signal=9 duration_ns=1\n").unwrap();
        assert_eq!(s.signal_name.as_deref(), Some("SIGKILL"));
        assert_eq!(WorkloadStatus::from_console("nothing"), None);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["signalName"], "SIGKILL");
    }
}
