//! Sandboxes (the guest platform: kernel + root disk + agent, on engine `kvm` or `qemu`):
//! `validateSandboxConfig`, `engineInfo`, `createSandbox` → `NativeSandbox` (`info`, `stop`,
//! `kill`, `wait`, `exitStatus`, `readConsole`, `consoleStats`, `consoleTail`). No logic: each
//! call is one `sandbox::Sandbox` call.
//!
//! - `createSandbox` (a boot, ~1 s under TCG, bounded by `bootTimeoutMs`) and `stop` (bounded by
//!   its timeout, then a kill) run on tokio's blocking pool, never on the JS thread or a libuv
//!   pool thread.
//! - `wait()` and `readConsole()`, which may take forever, are futures woken by the engine's
//!   threads: they hold no thread while they wait.
//! - Once a sandbox's end has been seen (`stop()` or `wait()` resolved), the `Sandbox` is
//!   released (QEMU reaped, the agent client's thread joined, per-VM files removed) on the
//!   blocking pool; what JS may still ask (exit status, console rest and counters, tail) is kept.
//! - A `NativeSandbox` that JS drops (GC) while its VM runs kills the VM at once; the rest of
//!   the teardown happens on a thread of its own, never on the JS thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::console::ConsoleReader;
use sandbox::{Sandbox, SandboxConfig, VmExit};

use super::tasks::{blocking, sandbox_error};
use super::{coded, guard, ConsoleStats, ExitInfo};

/// Parses and validates a SandboxConfig given as JSON; returns it normalised (defaults filled
/// in) as JSON. Throws `E_CONFIG_*`. The guest images are checked by `createSandbox`.
#[napi]
pub fn validate_sandbox_config(config_json: String) -> Result<String> {
    guard(|| sandbox::validate_sandbox_config_json(&config_json).map_err(sandbox_error))
}

/// What `engine: 'auto'` picks on this host and why, and whether QEMU is there:
/// `{ autoEngine, autoEngineReason, qemu, qemuUnavailable }`.
#[napi(ts_return_type = "Record<string, unknown>")]
pub fn engine_info() -> Result<serde_json::Value> {
    guard(|| serde_json::to_value(sandbox::engine::report()).map_err(|e| coded("E_INTERNAL", e)))
}

/// Validates a SandboxConfig JSON, boots it and resolves once the guest agent is ready.
/// Rejects with `E_CONFIG_*`, `E_GUEST_IMAGE_MISSING`, `E_QEMU_NOT_FOUND`, `E_NO_KVM`,
/// `E_ENGINE_UNAVAILABLE`, `E_BOOT_TIMEOUT`, `E_AGENT_EXITED`, ... (the VM is gone by then).
#[napi]
pub async fn create_sandbox(config_json: String) -> Result<NativeSandbox> {
    let sandbox = blocking("sandbox create", move || {
        let config = SandboxConfig::from_json(&config_json).map_err(sandbox_error)?;
        Sandbox::create(config).map_err(sandbox_error)
    })
    .await?;
    NativeSandbox::wrap(sandbox)
}

/// Starts a sandbox from a snapshot directory (`NativeSandbox.snapshot`) and resolves once its
/// agent answers; rejects with `E_SNAPSHOT*`, `E_QEMU_NOT_FOUND`, `E_BOOT_TIMEOUT`, ...
#[napi]
pub async fn restore_sandbox(
    dir: String,
    console_output: Option<String>,
    ports: Option<Vec<String>>,
) -> Result<NativeSandbox> {
    let sandbox = blocking("sandbox restore", move || {
        let options =
            sandbox::SandboxRestoreOptions { console_output: console_output.map(Into::into), timeout: None, ports };
        Sandbox::restore(std::path::Path::new(&dir), options).map_err(sandbox_error)
    })
    .await?;
    NativeSandbox::wrap(sandbox)
}

/// A sandbox as long as its VM runs; once its end has been seen (`stop`, `wait`), only what
/// is left to read about it: the `Sandbox` itself (its per-VM files, the agent client's
/// thread) is released then, not when the GC gets to this object.
enum State {
    Live(Arc<Sandbox>),
    Ended { exit: VmExit, stats: sandbox::console::ConsoleStats, tail: String },
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Once the VM has ended: keeps its final state and drops the `Sandbox` (here: callers are on
/// the blocking pool, or hand it there).
fn release(state: &Mutex<State>) -> Option<Arc<Sandbox>> {
    let mut s = lock(state);
    let State::Live(sandbox) = &*s else {
        return None;
    };
    let exit = sandbox.try_wait()?;
    let ended = State::Ended { exit, stats: sandbox.console_stats(), tail: sandbox.console_tail() };
    match std::mem::replace(&mut *s, ended) {
        State::Live(sandbox) => Some(sandbox),
        State::Ended { .. } => None,
    }
}

/// A sandbox whose agent was ready. Made by `createSandbox`; dropping it (GC) kills the VM.
#[napi]
pub struct NativeSandbox {
    info: serde_json::Value,
    config: String,
    /// The console queue's reader; it outlives the `Sandbox` (the rest can still be read).
    console: Option<ConsoleReader>,
    state: Shared,
}

impl NativeSandbox {
    fn wrap(sandbox: Sandbox) -> Result<NativeSandbox> {
        let info = serde_json::to_value(sandbox.info()).map_err(|e| coded("E_INTERNAL", e))?;
        Ok(NativeSandbox {
            info,
            config: sandbox.config().to_json(),
            console: sandbox.console(),
            state: Arc::new(Mutex::new(State::Live(Arc::new(sandbox)))),
        })
    }

    /// The live sandbox, or `None` once it has ended and was released.
    fn live(&self) -> Option<Arc<Sandbox>> {
        match &*lock(&self.state) {
            State::Live(s) => Some(s.clone()),
            State::Ended { .. } => None,
        }
    }

    /// The sandbox, for the other binding modules' calls (exec, files): once it has ended,
    /// `E_CHANNEL_CLOSED` (what the agent client says to a request after the end); while it is
    /// paused, `E_VM_STATE` (its agent cannot answer).
    pub(crate) fn sandbox(&self) -> Result<Arc<Sandbox>> {
        let sandbox = self.any_state()?;
        if sandbox.is_paused() {
            return Err(coded(
                "E_VM_STATE",
                "the sandbox is paused: resume() it before running commands or using its files",
            ));
        }
        Ok(sandbox)
    }

    /// The sandbox, paused or not (snapshots, pause, resume); `E_CHANNEL_CLOSED` once it has ended.
    /// A VM whose end is known but not yet released (`wait()` hands the release to the blocking
    /// pool) counts as ended too, so a call right after `wait()` names the end, not the channel.
    fn any_state(&self) -> Result<Arc<Sandbox>> {
        let ended =
            |exit: &VmExit| coded("E_CHANNEL_CLOSED", format!("the sandbox has ended ({exit}): create a new one"));
        match &*lock(&self.state) {
            State::Live(s) => match s.try_wait() {
                Some(exit) => Err(ended(&exit)),
                None => Ok(s.clone()),
            },
            State::Ended { exit, .. } => Err(ended(exit)),
        }
    }
}

#[napi]
impl NativeSandbox {
    /// Writes a snapshot of the sandbox into `dir` (memory, devices, root disk, config); it runs
    /// on (or stays paused). `restoreSandbox(dir)` starts copies of it, running.
    #[napi]
    pub async fn snapshot(&self, dir: String) -> Result<()> {
        let sandbox = self.any_state()?;
        blocking("sandbox snapshot", move || sandbox.snapshot(std::path::Path::new(&dir)).map_err(sandbox_error)).await
    }

    /// Stops the guest's vCPUs (memory, processes and files kept; no CPU used); resolves once
    /// they have stopped. `E_VM_STATE` once the sandbox has ended.
    #[napi]
    pub async fn pause(&self) -> Result<()> {
        let sandbox =
            self.any_state().map_err(|_| coded("E_VM_STATE", "the sandbox has ended: it cannot be paused"))?;
        blocking("sandbox pause", move || sandbox.pause().map_err(sandbox_error)).await
    }

    /// Lets a paused sandbox run again; nothing to do when it is not paused.
    #[napi]
    pub async fn resume(&self) -> Result<()> {
        let sandbox =
            self.any_state().map_err(|_| coded("E_VM_STATE", "the sandbox has ended: it cannot be resumed"))?;
        if !sandbox.is_paused() {
            return Ok(());
        }
        blocking("sandbox resume", move || sandbox.resume().map_err(sandbox_error)).await
    }

    #[napi]
    pub fn is_paused(&self) -> bool {
        self.live().is_some_and(|s| s.is_paused())
    }

    /// The network in force now as JSON (`NetworkConfig`), or null for a sandbox without one.
    #[napi]
    pub fn network(&self) -> Result<Option<String>> {
        let sandbox = self.any_state()?;
        sandbox.network().map(|n| serde_json::to_string(&n).map_err(|e| coded("E_INTERNAL", e))).transpose()
    }

    /// Changes the network policy (JSON `{ outbound?, deny?, allow? }`) from the guest's next
    /// frame; resolves with the network now in force (JSON). `E_CONFIG_JSON` / `E_CONFIG_NETWORK`
    /// for a bad update, `E_VM_STATE` without a network.
    #[napi]
    pub async fn update_network(&self, update_json: String) -> Result<String> {
        let update: sandbox::sandbox::NetworkUpdate =
            serde_json::from_str(&update_json).map_err(|e| coded("E_CONFIG_JSON", format!("network update: {e}")))?;
        let sandbox = self.any_state()?;
        blocking("network update", move || {
            let net = sandbox.update_network(&update).map_err(sandbox_error)?;
            serde_json::to_string(&net).map_err(|e| coded("E_INTERNAL", e))
        })
        .await
    }

    /// How the sandbox came up (`ReadyInfo`, camelCase): engine, engineReason, engineDetail,
    /// pid, kernel, rootfs, kernelRelease, agent, hostname, protocolVersion, features, bootMs,
    /// guestBootNs, agentStartNs, name.
    #[napi(ts_return_type = "Record<string, unknown>")]
    pub fn info(&self) -> serde_json::Value {
        self.info.clone()
    }

    /// The validated configuration, as JSON.
    #[napi]
    pub fn config(&self) -> String {
        self.config.clone()
    }

    /// Powers the guest off (the agent syncs and resets the VM) and resolves when the VM has
    /// ended: `reset` when graceful, `killed` when it had not ended after `timeoutMs` and was
    /// killed. Resolves at once with how it ended when it already has.
    #[napi]
    pub async fn stop(&self, timeout_ms: u32) -> Result<ExitInfo> {
        let state = self.state.clone();
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        blocking("sandbox stop", move || {
            let live = match &*lock(&state) {
                State::Live(s) => s.clone(),
                State::Ended { exit, .. } => return Ok(exit.clone().into()),
            };
            let exit = live.stop(timeout);
            drop(live);
            drop(release(&state));
            Ok(exit.into())
        })
        .await
    }

    /// Ends the VM at once (SIGKILL to QEMU; the VMM's kill). Returns at once; `wait()` then
    /// resolves `killed` (unless it had ended another way). Idempotent.
    #[napi]
    pub fn kill(&self) -> Result<()> {
        guard(|| {
            if let Some(s) = self.live() {
                s.kill();
            }
            Ok(())
        })
    }

    /// Resolves when the VM has ended (its console is complete by then).
    #[napi]
    pub async fn wait(&self) -> Result<ExitInfo> {
        let exit = match &*lock(&self.state) {
            State::Live(s) => s.wait_async(),
            State::Ended { exit, .. } => return Ok(exit.clone().into()),
        };
        let exit = exit.await;
        let state = self.state.clone();
        // The teardown joins a thread and removes files: not on this (runtime) thread. It is
        // awaited, so when `wait()` resolves the VM's files are gone, as after `stop()`.
        let _ = spawn_blocking(move || drop(release(&state))).await;
        Ok(exit.into())
    }

    /// How the VM ended, or null while it runs.
    #[napi]
    pub fn exit_status(&self) -> Result<Option<ExitInfo>> {
        guard(|| {
            Ok(match &*lock(&self.state) {
                State::Live(s) => s.try_wait().map(ExitInfo::from),
                State::Ended { exit, .. } => Some(exit.clone().into()),
            })
        })
    }

    /// The next console bytes (up to `maxBytes`, default 64 KiB), or null at the end of the
    /// stream (the VM has ended and everything was read). The sandbox keeps the last 64 KiB not
    /// yet read; older bytes are dropped and counted in `consoleStats().droppedBytes`.
    #[napi]
    pub async fn read_console(&self, max_bytes: Option<u32>) -> Result<Option<Buffer>> {
        super::read_console(self.console.clone(), "this sandbox keeps no console stream", max_bytes).await
    }

    #[napi]
    pub fn console_stats(&self) -> Result<ConsoleStats> {
        guard(|| {
            let s = match &*lock(&self.state) {
                State::Live(sb) => sb.console_stats(),
                State::Ended { stats, .. } => stats.clone(),
            };
            Ok(s.into())
        })
    }

    /// The last console lines (and QEMU's stderr), as error messages show them.
    #[napi]
    pub fn console_tail(&self) -> Result<String> {
        guard(|| {
            Ok(match &*lock(&self.state) {
                State::Live(s) => s.console_tail(),
                State::Ended { tail, .. } => tail.clone(),
            })
        })
    }
}

impl Drop for NativeSandbox {
    fn drop(&mut self) {
        let sandbox = match std::mem::replace(
            &mut *lock(&self.state),
            State::Ended { exit: VmExit::Killed, stats: Default::default(), tail: String::new() },
        ) {
            State::Live(s) => s,
            State::Ended { .. } => return,
        };
        // Runs on the JS thread (GC finalizer): kill now (a signal, microseconds), and leave
        // the waiting parts of the teardown to another thread.
        let _ = catch_unwind(AssertUnwindSafe(|| sandbox.kill()));
        let spawned = std::thread::Builder::new().name("mc-sandbox-drop".into()).spawn(move || drop(sandbox));
        if let Err(e) = spawned {
            // No thread to be had: the VM is killed already; its teardown waits for the reap.
            eprintln!("microcell: cannot start a teardown thread ({e}); tearing down inline");
        }
    }
}
