//! A MicroVm that runs its workload on the guest platform: `startWorkload` (a MicroVmConfig with
//! `rootfs: { disk }` and `execPath`) → `NativeWorkload` (`wait`, `exitStatus`, `stop`, `kill`,
//! `readConsole`, `consoleStats`, `info`). No logic beyond mapping the MicroVm options to the
//! sandbox engine's: each call is one `sandbox::Workload` call.
//!
//! - `startWorkload` (validation, the engine's spawn: bounded) runs on tokio's blocking pool;
//!   `wait()` is `Workload::wait_async` (a future the workload's watcher thread wakes) and
//!   `readConsole()` the console queue's future: no thread waits.
//! - Once the end has been seen, the `Workload` (QEMU's reap, the per-VM root disk copy) is let go
//!   on the blocking pool; what JS may still ask (exit, console rest and counters) is kept. A
//!   handle the GC drops while its VM runs kills it; the teardown happens on a thread of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::config::{MicroVmConfig, ParsedOptions};
use sandbox::console::{ConsoleReader, ConsoleStats as CoreConsoleStats};
use sandbox::sandbox::{NetworkConfig, Volume};
use sandbox::{EngineChoice, SandboxConfig, VmExit, Workload, WorkloadStatus};

use super::{coded, ConsoleStats};
use crate::tasks::{blocking, drop_off_thread, sandbox_error};

#[napi(object)]
pub struct WorkloadStartOptions {
    /// `auto` (default: the built-in VMM where it boots Linux, else QEMU) | `kvm` | `qemu`.
    pub engine: Option<String>,
    /// How long the guest agent has to come up (default 30000 ms).
    pub boot_timeout_ms: Option<u32>,
    /// Console bytes kept for a slow reader of the console stream (default 64 KiB).
    pub console_queue_bytes: Option<u32>,
}

/// Why a workload could not start.
#[napi(object)]
pub struct WorkloadErrorInfo {
    /// `ENOENT`, `EACCES`, ... (`E_WORKLOAD` for an errno without a name).
    pub code: String,
    pub errno: i32,
    pub message: String,
    /// The guest path it concerns.
    pub path: Option<String>,
}

/// How the workload ended.
#[napi(object)]
pub struct WorkloadStatusInfo {
    /// Its exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it (`SIGKILL`, ...), when one did.
    pub signal: Option<String>,
    pub signal_number: Option<i32>,
    /// From spawn to exit, measured in the guest.
    pub duration_ms: f64,
    /// Why it could not start (then there is no exit code or signal).
    pub error: Option<WorkloadErrorInfo>,
}

/// How a workload VM ended: the VM's end as for any MicroVm, and the workload's status.
#[napi(object)]
pub struct WorkloadEnd {
    /// `reset` (the agent powered off after the workload ended) | `stopped` | `killed` | `crashed`
    pub reason: String,
    pub code: Option<String>,
    pub message: Option<String>,
    /// Null when the VM ended before the workload's status was known (stopped, killed, crashed).
    pub workload: Option<WorkloadStatusInfo>,
    /// Then: why there is no status (`E_AGENT_EXITED`, ...).
    pub workload_error_code: Option<String>,
    pub workload_error_message: Option<String>,
}

fn status_info(s: WorkloadStatus) -> WorkloadStatusInfo {
    WorkloadStatusInfo {
        exit_code: s.code,
        signal: s.signal_name.clone().or_else(|| s.signal.map(|n| format!("SIG{n}"))),
        signal_number: s.signal,
        duration_ms: s.duration_ms,
        error: s.error.map(|e| WorkloadErrorInfo { code: e.code, errno: e.errno, message: e.message, path: e.path }),
    }
}

fn end_info(exit: &VmExit, stop_requested: bool, status: &sandbox::Result<WorkloadStatus>) -> WorkloadEnd {
    let (reason, code, message) = match exit {
        VmExit::GuestReset => ("reset", None, None),
        VmExit::Stopped => ("stopped", None, None),
        // stop() kills a workload VM whose program did not end in time (or was not up yet).
        VmExit::Killed if stop_requested => ("stopped", None, None),
        VmExit::Killed => ("killed", None, None),
        VmExit::Crashed { code, message } => ("crashed", Some(code.clone()), Some(message.clone())),
    };
    let (workload, err_code, err_message) = match status {
        Ok(s) => (Some(status_info(s.clone())), None, None),
        Err(e) => (None, Some(e.code().to_owned()), Some(e.to_string())),
    };
    WorkloadEnd {
        reason: reason.into(),
        code,
        message,
        workload,
        workload_error_code: err_code,
        workload_error_message: err_message,
    }
}

/// The sandbox configuration a workload MicroVm boots with: its memory, vCPUs, kernel (default:
/// the guest platform's), root disk, console file, and `cmdline` appended as kernel arguments.
fn sandbox_config(
    c: &MicroVmConfig,
    parsed: &ParsedOptions,
    options: Option<&WorkloadStartOptions>,
) -> Result<SandboxConfig> {
    let disk =
        c.rootfs.as_ref().and_then(|r| r.disk()).ok_or_else(|| {
            coded("E_CONFIG_MISSING", "a workload VM needs rootfs { disk: image } (e.g. defaultGuest())")
        })?;
    let engine = match options.and_then(|o| o.engine.as_deref()) {
        None => EngineChoice::Auto,
        Some(e) => serde_json::from_value(serde_json::Value::String(e.into()))
            .map_err(|_| coded("E_INVALID_ARGUMENT", format!("engine {e:?}: give 'auto', 'kvm' or 'qemu'")))?,
    };
    let mut config = SandboxConfig {
        memory_mib: c.memory_mib,
        cpus: c.num_vcpus,
        engine,
        kernel: c.kernel.clone(),
        rootfs: Some(disk.to_path_buf()),
        console_output: c.console_output.clone(),
        kernel_args: c.cmdline.clone(),
        network: NetworkConfig::for_microvm(c.scope, &c.port_map),
        volumes: parsed
            .mapped_dirs
            .iter()
            .map(|d| Volume { host: d.host.clone().into(), guest: d.guest.clone(), read_only: false })
            .collect(),
        ..Default::default()
    };
    if let Some(ms) = options.and_then(|o| o.boot_timeout_ms) {
        config.boot_timeout_ms = ms;
    }
    config.console_queue_bytes = options.and_then(|o| o.console_queue_bytes);
    Ok(config)
}

/// Validates a MicroVmConfig JSON with `rootfs: { disk }` and `execPath`, and boots it on a
/// sandbox engine with that program as the guest's workload; resolves once the VM runs.
/// Rejects with `E_CONFIG_*`, `E_GUEST_IMAGE_MISSING`, `E_QEMU_NOT_FOUND`, `E_ENGINE_UNAVAILABLE`,
/// ... A program that does not exist or cannot run is the workload's status (`ENOENT`,
/// `EACCES`), known within the boot time.
#[napi]
pub async fn start_workload(config_json: String, options: Option<WorkloadStartOptions>) -> Result<NativeWorkload> {
    let workload = blocking("workload start", move || {
        let c = MicroVmConfig::from_json(&config_json).map_err(|e| coded(e.code(), e))?;
        let parsed = c.validate().map_err(|e| coded(e.code(), e))?;
        let spec = sandbox::workload::spec_from_microvm_config(&c)
            .map_err(sandbox_error)?
            .ok_or_else(|| coded("E_CONFIG_MISSING", "execPath is required for a workload VM"))?;
        let config = sandbox_config(&c, &parsed, options.as_ref())?;
        Workload::start(&spec, config).map_err(sandbox_error)
    })
    .await?;
    Ok(NativeWorkload::wrap(workload))
}

/// How a restored workload VM's console is set up.
#[napi(object)]
pub struct WorkloadRestoreVmOptions {
    /// Host file that receives the restored guest's console.
    pub console_output: Option<String>,
    /// Console bytes kept for a slow reader of the console stream (default: the snapshot's).
    pub console_queue_bytes: Option<u32>,
}

/// A workload VM from a snapshot directory (`NativeWorkload.snapshot`): the engine resumes it
/// and the program runs on. `E_SNAPSHOT` (not a workload snapshot, damaged), the engine's codes.
#[napi]
pub async fn restore_workload(dir: String, options: Option<WorkloadRestoreVmOptions>) -> Result<NativeWorkload> {
    let options = sandbox::workload::WorkloadRestoreOptions {
        console_output: options.as_ref().and_then(|o| o.console_output.clone()).map(Into::into),
        console_queue_bytes: options.as_ref().and_then(|o| o.console_queue_bytes),
    };
    let workload = blocking("workload restore", move || {
        Workload::restore(std::path::Path::new(&dir), options).map_err(sandbox_error)
    })
    .await?;
    Ok(NativeWorkload::wrap(workload))
}

/// What `dir/sandbox.json` says (`kind`: `sandbox` | `workload`, engine, memoryMib, cpus,
/// kernel, rootfs, cmdline), or null when there is none (a built-in VMM snapshot).
#[napi(ts_return_type = "Promise<Record<string, unknown> | null>")]
pub async fn snapshot_info(dir: String) -> Result<Option<serde_json::Value>> {
    let info = blocking("snapshot info", move || {
        sandbox::sandbox::snapshot_info(std::path::Path::new(&dir)).map_err(sandbox_error)
    })
    .await?;
    info.map(info_json).transpose()
}

fn info_json(info: sandbox::sandbox::SnapshotInfo) -> Result<serde_json::Value> {
    serde_json::to_value(info).map_err(|e| coded("E_INTERNAL", e))
}

enum State {
    Live(Arc<Workload>),
    Ended { end: Arc<(VmExit, sandbox::Result<WorkloadStatus>)>, stats: CoreConsoleStats },
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM running its workload. Made by `startWorkload`; dropping it (GC) kills the VM.
#[napi]
pub struct NativeWorkload {
    info: serde_json::Value,
    console: Option<ConsoleReader>,
    stop_requested: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
}

impl NativeWorkload {
    fn wrap(workload: Workload) -> NativeWorkload {
        let engine = workload.engine();
        let info = serde_json::json!({
            "engine": engine.kind,
            "engineReason": engine.reason,
            "pid": workload.pid(),
        });
        NativeWorkload {
            info,
            console: workload.console(),
            stop_requested: Arc::new(AtomicBool::new(false)),
            state: Arc::new(Mutex::new(State::Live(Arc::new(workload)))),
        }
    }

    fn live(&self) -> Option<Arc<Workload>> {
        match &*lock(&self.state) {
            State::Live(w) => Some(w.clone()),
            State::Ended { .. } => None,
        }
    }

    /// Once the status is known and the VM has ended: keeps both, lets go of the `Workload`.
    fn release(state: &Mutex<State>, status: sandbox::Result<WorkloadStatus>) -> Option<Arc<Workload>> {
        let mut s = lock(state);
        let State::Live(w) = &*s else { return None };
        let exit = w.vm_exit().unwrap_or(VmExit::Killed);
        let ended = State::Ended { end: Arc::new((exit, status)), stats: w.console_stats() };
        match std::mem::replace(&mut *s, ended) {
            State::Live(w) => Some(w),
            State::Ended { .. } => None,
        }
    }
}

#[napi]
impl NativeWorkload {
    /// `{ engine, engineReason, pid }`: the engine that runs it and why, QEMU's pid.
    #[napi(ts_return_type = "Record<string, unknown>")]
    pub fn info(&self) -> serde_json::Value {
        self.info.clone()
    }

    /// Resolves when the workload's status is known and the VM has ended (its console is
    /// complete by then).
    #[napi]
    pub async fn wait(&self) -> Result<WorkloadEnd> {
        let w = match &*lock(&self.state) {
            State::Live(w) => w.clone(),
            State::Ended { end, .. } => {
                return Ok(end_info(&end.0, self.stop_requested.load(Ordering::SeqCst), &end.1))
            }
        };
        let status = w.wait_async().await;
        drop(w);
        let stop = self.stop_requested.load(Ordering::SeqCst);
        let released = Self::release(&self.state, status);
        // The teardown reaps QEMU and removes the VM's root disk copy: not on this thread, and
        // awaited, so when `wait()` resolves nothing of the VM is left.
        if let Some(w) = released {
            let _ = spawn_blocking(move || drop(w)).await;
        }
        match &*lock(&self.state) {
            State::Ended { end, .. } => Ok(end_info(&end.0, stop, &end.1)),
            State::Live(_) => Err(coded("E_INTERNAL", "the workload ended but its state was not kept")),
        }
    }

    /// How the VM ended (and the workload's status), or null while it runs.
    #[napi]
    pub fn exit_status(&self) -> Option<WorkloadEnd> {
        let stop = self.stop_requested.load(Ordering::SeqCst);
        match &*lock(&self.state) {
            State::Ended { end, .. } => Some(end_info(&end.0, stop, &end.1)),
            State::Live(w) => {
                let status = w.wait_timeout(std::time::Duration::ZERO)?;
                let exit = w.vm_exit()?;
                Some(end_info(&exit, stop, &status))
            }
        }
    }

    /// Sends signal number `signal` to the program's process group; resolves with whether it
    /// went out (false: the agent is not up yet, or the program has ended).
    #[napi]
    pub async fn signal(&self, signal: i32) -> Result<bool> {
        let Some(w) = self.live() else { return Ok(false) };
        blocking("workload signal", move || w.signal(signal).map_err(sandbox_error)).await
    }

    /// Writes a snapshot of the VM into `dir` (the engine's files and `sandbox.json` with the
    /// workload); the VM runs on (a paused one stays paused). Resolves with what `snapshotInfo`
    /// would read back. `E_VM_STATE` once it has ended.
    #[napi(ts_return_type = "Promise<Record<string, unknown>>")]
    pub async fn snapshot(&self, dir: String) -> Result<serde_json::Value> {
        let w = self
            .live()
            .ok_or_else(|| coded("E_VM_STATE", "the workload VM has ended: there is nothing to snapshot"))?;
        let info = blocking("workload snapshot", move || w.snapshot(std::path::Path::new(&dir)).map_err(sandbox_error))
            .await?;
        info_json(info)
    }

    /// Stops the guest's vCPUs (the program with them); resolves once they have stopped.
    #[napi]
    pub async fn pause(&self) -> Result<()> {
        let w = self.live().ok_or_else(|| coded("E_VM_STATE", "the workload VM has ended: it cannot be paused"))?;
        blocking("workload pause", move || w.pause().map_err(sandbox_error)).await
    }

    /// Lets a paused workload VM run again; nothing to do when it is not paused.
    #[napi]
    pub async fn resume(&self) -> Result<()> {
        let Some(w) = self.live().filter(|w| w.is_paused()) else { return Ok(()) };
        blocking("workload resume", move || w.resume().map_err(sandbox_error)).await
    }

    #[napi]
    pub fn is_paused(&self) -> bool {
        self.live().is_some_and(|w| w.is_paused())
    }

    /// Ends the VM now; `wait()` then says `stopped` (the program gets no signal first: the
    /// graceful stop is `signal(SIGTERM)`, then this).
    #[napi]
    pub fn stop(&self) {
        if let Some(w) = self.live() {
            if w.vm_exit().is_none() {
                self.stop_requested.store(true, Ordering::SeqCst);
            }
            w.kill();
        }
    }

    /// Ends the VM now; `wait()` then says `killed`.
    #[napi]
    pub fn kill(&self) {
        if let Some(w) = self.live() {
            w.kill();
        }
    }

    /// The next console bytes (the workload's stdout and stderr among the kernel's and agent's
    /// lines; up to `maxBytes`, default 64 KiB), or null at the end of the stream.
    #[napi]
    pub async fn read_console(&self, max_bytes: Option<u32>) -> Result<Option<Buffer>> {
        super::read_console(self.console.clone(), "this VM keeps no console stream", max_bytes).await
    }

    #[napi]
    pub fn console_stats(&self) -> ConsoleStats {
        let s = match &*lock(&self.state) {
            State::Live(w) => w.console_stats(),
            State::Ended { stats, .. } => stats.clone(),
        };
        s.into()
    }
}

impl Drop for NativeWorkload {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        if let State::Live(w) = &*s {
            // A signal (QEMU) or the VMM's kick: microseconds. The rest waits: another thread.
            w.kill();
            let w = w.clone();
            *s = State::Ended {
                end: Arc::new((VmExit::Killed, Err(sandbox::SandboxError::InvalidArgument("dropped".into())))),
                stats: Default::default(),
            };
            drop(s);
            drop_off_thread(w);
        }
    }
}

/// The default guest images: where the kernel and root disk of the guest platform are looked
/// for (`MICROCELL_KERNEL` / `MICROCELL_ROOTFS`, else the installed guest package's once
/// registered with `setPackagedGuest`, else `<cache>/kernel-current/vmlinux` and
/// `<cache>/rootfs-current/rootfs.ext4`; `<cache>`: `MICROCELL_CACHE`, else
/// `~/.cache/microcell`), whether or not they exist, and where each comes from (`env`,
/// `package`, `cache`).
#[napi(object)]
pub struct GuestImagePaths {
    pub kernel: String,
    pub rootfs: String,
    pub cache_dir: String,
    pub kernel_source: String,
    pub rootfs_source: String,
}

#[napi]
pub fn guest_images() -> GuestImagePaths {
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let (kernel, kernel_source) = sandbox::sandbox::default_kernel_source();
    let (rootfs, rootfs_source) = sandbox::sandbox::default_rootfs_source();
    GuestImagePaths {
        kernel: s(kernel),
        rootfs: s(rootfs),
        cache_dir: s(sandbox::sandbox::guest_cache_dir()),
        kernel_source: kernel_source.into(),
        rootfs_source: rootfs_source.into(),
    }
}

/// Registers the unpacked images of the installed guest package (`src/guest.ts` unpacks it) as
/// the defaults after the environment; both `null` forgets them.
#[napi]
pub fn set_packaged_guest(kernel: Option<String>, rootfs: Option<String>) -> Result<()> {
    let images = match (kernel, rootfs) {
        (Some(kernel), Some(rootfs)) => {
            Some(sandbox::sandbox::GuestImages { kernel: kernel.into(), rootfs: rootfs.into() })
        }
        (None, None) => None,
        _ => return Err(coded("E_INVALID_ARGUMENT", "setPackagedGuest takes both paths or neither")),
    };
    sandbox::sandbox::set_packaged_guest(images);
    Ok(())
}
