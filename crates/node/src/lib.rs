//! The napi-rs binding of microcell: JS ⇄ Rust types, Promises and error codes; no logic.
//!
//! Conventions (relied on by `src/internal/native.ts`):
//! - Every error thrown or rejected here has the message `"<CODE>: <message>"`, where CODE is a
//!   stable `E_*` code; the TS layer turns it into a `MicrocellError` with `code`.
//! - Nothing blocks a libuv threadpool thread: `startVm` runs on tokio's blocking pool (it is
//!   bounded: validation and ~1 ms of VM set-up); `wait()` and `readConsole()`, which may take
//!   forever, are futures woken by the VM's threads and hold no thread while they wait.
//! - No panic crosses the FFI boundary: sync functions run under `catch_unwind`, and napi polls
//!   every future under `catch_unwind`.

// In a test build nothing calls the exported functions (JS does).
#![cfg_attr(test, allow(dead_code))]

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::{ExitReason, MicroVmConfig, StartOptions, VmExit};

mod exec;
mod fs;
mod logging;
mod sandboxes;
mod snapshot;
mod tasks;
mod workload;

fn coded(code: &str, message: impl Display) -> Error {
    Error::new(Status::GenericFailure, format!("{code}: {message}"))
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    coded("E_INTERNAL", format!("microcell hit an internal error ({what}); please report it"))
}

/// Runs a synchronous binding body, turning a panic into an `E_INTERNAL` error.
fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(p)))
}

/// Parses and validates a MicroVmConfig given as JSON; returns it normalised (defaults filled
/// in) as JSON. Throws `E_CONFIG_*`.
#[napi]
pub fn validate_config(config_json: String) -> Result<String> {
    guard(|| sandbox::validate_config_json(&config_json).map_err(|e| coded(e.code(), e)))
}

/// Every error code the host core produces itself, by its Rust list: `{ config, sandbox, vmm }`
/// (`ConfigError::CODES`, `SandboxError::CODES`, `vmm::Error::CODES`). The TS lists are
/// checked against it.
#[napi(ts_return_type = "{ config: string[]; sandbox: string[]; vmm: string[] }")]
pub fn error_codes() -> serde_json::Value {
    serde_json::json!({
        "config": sandbox::ConfigError::CODES,
        "sandbox": sandbox::SandboxError::CODES,
        "vmm": vmm::Error::CODES,
    })
}

/// The JSON keys of the config structs, by their TS interface's name (read from the serde
/// derives): the TS interfaces are checked against them.
#[napi(ts_return_type = "Record<string, string[]>")]
pub fn config_fields() -> serde_json::Value {
    use sandbox::config::fields::json_fields;
    serde_json::json!({
        "MicroVmConfig": json_fields::<sandbox::MicroVmConfig>(),
        "SandboxConfig": json_fields::<sandbox::SandboxConfig>(),
        "Volume": json_fields::<sandbox::sandbox::Volume>(),
        "NetworkConfig": json_fields::<sandbox::sandbox::NetworkConfig>(),
        "NetworkUpdate": json_fields::<sandbox::sandbox::NetworkUpdate>(),
    })
}

/// The host core's limits and defaults by name (`sandbox::limits::ALL`): the TS mirrors are
/// checked against it.
#[napi(ts_return_type = "Record<string, number>")]
pub fn limits() -> serde_json::Value {
    sandbox::limits::ALL.iter().map(|&(name, value)| (name.to_string(), serde_json::Value::from(value))).collect()
}

/// What this host's KVM is and what it can run (the VMM's `HostInfo`, camelCase).
#[napi(ts_return_type = "Record<string, unknown>")]
pub fn host_info() -> Result<serde_json::Value> {
    guard(|| serde_json::to_value(sandbox::host_info()).map_err(|e| coded("E_INTERNAL", e)))
}

#[napi(object)]
pub struct StartVmOptions {
    /// Keep console bytes for `readConsole()`.
    pub console_stream: Option<bool>,
    /// Size of the console queue in bytes (the oldest bytes are dropped beyond it).
    pub console_queue_bytes: Option<u32>,
    /// Log the pages the guest writes (for incremental snapshots).
    pub track_dirty_pages: Option<bool>,
}

/// How a VM ended.
#[napi(object)]
pub struct ExitInfo {
    /// `reset` | `stopped` | `killed` | `crashed`
    pub reason: String,
    /// For `crashed`: a stable code such as `E_GUEST_TRIPLE_FAULT`.
    pub code: Option<String>,
    pub message: Option<String>,
}

/// How a VM ended, the same for a MicroVm and a sandbox: `reset` (the guest powered off or
/// rebooted: a graceful stop), `stopped`, `killed`, `crashed` (with a code).
impl From<VmExit> for ExitInfo {
    fn from(exit: VmExit) -> Self {
        let plain = |r: &str| ExitInfo { reason: r.into(), code: None, message: None };
        match exit {
            VmExit::GuestReset => plain("reset"),
            VmExit::Stopped => plain("stopped"),
            VmExit::Killed => plain("killed"),
            VmExit::Crashed { code, message } => {
                ExitInfo { reason: "crashed".into(), code: Some(code), message: Some(message) }
            }
        }
    }
}

fn exit_info(reason: ExitReason) -> ExitInfo {
    VmExit::from(reason).into()
}

/// CLOCK_MONOTONIC nanoseconds (the clock of `process.hrtime.bigint()`).
#[napi(object)]
pub struct VmTimings {
    /// When the start began.
    pub start_ns: BigInt,
    /// The first vCPU exit to the VMM (null until there is one).
    pub first_exit_ns: Option<BigInt>,
    /// When the start returned with the vCPUs running.
    pub running_ns: BigInt,
}

#[napi(object)]
pub struct ConsoleStats {
    pub total_bytes: f64,
    pub dropped_bytes: f64,
    pub queued_bytes: f64,
    pub closed: bool,
    pub file_error: Option<String>,
}

impl From<sandbox::console::ConsoleStats> for ConsoleStats {
    fn from(s: sandbox::console::ConsoleStats) -> Self {
        ConsoleStats {
            total_bytes: s.total_bytes as f64,
            dropped_bytes: s.dropped_bytes as f64,
            queued_bytes: s.queued_bytes as f64,
            closed: s.closed,
            file_error: s.file_error,
        }
    }
}

/// The next console bytes (up to `max_bytes`, default 64 KiB) of a console queue, or None at
/// its end; `E_CONSOLE_NOT_ENABLED` (with `missing` as the message) when there is no queue.
pub(crate) async fn read_console(
    reader: Option<sandbox::console::ConsoleReader>,
    missing: &'static str,
    max_bytes: Option<u32>,
) -> Result<Option<Buffer>> {
    let reader = reader.ok_or_else(|| coded("E_CONSOLE_NOT_ENABLED", missing))?;
    let max = max_bytes.map_or(sandbox::console::DEFAULT_READ_SIZE, |n| n as usize);
    Ok(reader.read(max).await.map(Buffer::from))
}

/// Boots a microVM from a MicroVmConfig JSON. Resolves once its vCPUs run.
#[napi]
pub async fn start_vm(config_json: String, options: Option<StartVmOptions>) -> Result<NativeVm> {
    let options = StartOptions {
        console_stream: options.as_ref().and_then(|o| o.console_stream).unwrap_or(false),
        console_queue_bytes: options.as_ref().and_then(|o| o.console_queue_bytes).map(|n| n as usize),
        track_dirty_pages: options.as_ref().and_then(|o| o.track_dirty_pages).unwrap_or(false),
    };
    let started = spawn_blocking(move || {
        catch_unwind(AssertUnwindSafe(|| {
            let config = MicroVmConfig::from_json(&config_json).map_err(|e| coded(e.code(), e))?;
            sandbox::MicroVm::start(&config, &options).map_err(|e| coded(e.code(), e))
        }))
        .unwrap_or_else(|p| Err(panic_error(p)))
    })
    .await
    .map_err(|e| coded("E_INTERNAL", format!("the start task failed: {e}")))??;
    Ok(NativeVm { vm: Arc::new(started) })
}

/// A running (or ended) microVM. Made by `startVm`; dropping it (GC) kills the VM.
#[napi]
pub struct NativeVm {
    vm: Arc<sandbox::MicroVm>,
}

#[napi]
impl NativeVm {
    /// Resolves when the VM has ended (its console is complete by then).
    #[napi]
    pub async fn wait(&self) -> Result<ExitInfo> {
        Ok(exit_info(self.vm.wait_async().await))
    }

    /// How the VM ended, or null while it runs.
    #[napi]
    pub fn exit_status(&self) -> Result<Option<ExitInfo>> {
        guard(|| Ok(self.vm.try_exit().map(exit_info)))
    }

    /// Asks the VM to end (`wait()` then resolves `stopped`). Returns at once.
    #[napi]
    pub fn stop(&self) -> Result<()> {
        guard(|| {
            self.vm.stop();
            Ok(())
        })
    }

    /// Ends the VM at once (`wait()` then resolves `killed`). Returns at once.
    #[napi]
    pub fn kill(&self) -> Result<()> {
        guard(|| {
            self.vm.kill();
            Ok(())
        })
    }

    /// The next console bytes (up to `maxBytes`, default 64 KiB), or null at the end of the
    /// stream. Only for VMs started with `consoleStream: true` (else `E_CONSOLE_NOT_ENABLED`).
    #[napi]
    pub async fn read_console(&self, max_bytes: Option<u32>) -> Result<Option<Buffer>> {
        read_console(
            self.vm.console().cloned(),
            "this VM keeps no console stream: start it with { consoleStream: true }",
            max_bytes,
        )
        .await
    }

    #[napi]
    pub fn console_stats(&self) -> Result<ConsoleStats> {
        guard(|| {
            let s = self.vm.console_stats();
            Ok(s.into())
        })
    }

    #[napi]
    pub fn timings(&self) -> Result<VmTimings> {
        guard(|| {
            let t = self.vm.timings();
            Ok(VmTimings {
                start_ns: BigInt::from(t.start_ns),
                first_exit_ns: t.first_exit_ns.map(BigInt::from),
                running_ns: BigInt::from(t.running_ns),
            })
        })
    }
}
