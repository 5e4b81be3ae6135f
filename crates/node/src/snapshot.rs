//! Snapshots and restore: `NativeVm.pause/resume/snapshot`, `loadSnapshot` → `NativeSnapshot`
//! (`config`, `createShell` → `NativeShell`, `restore` → the `NativeVm` that `startVm` returns).
//! No logic: each call is one `sandbox::MicroVm` / `vmm::LoadedSnapshot` call.
//!
//! Everything that may take more than a few microseconds (waiting for vCPUs to park, writing a
//! snapshot, reading one, making a shell, restoring) runs on tokio's blocking pool, never on the
//! JS thread or a libuv pool thread. A shell that JS drops unused (GC) is torn down on a thread
//! of its own: closing a VM fd with an irqchip sleeps 16-23 ms in the kernel (HOST.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::{LoadedSnapshot, RestoreOptions, VmShell};

use super::tasks::{blocking, drop_off_thread};
use super::{coded, guard, panic_error, NativeVm};

fn vmm_error(e: vmm::Error) -> Error {
    coded(e.code(), e)
}

#[napi]
impl NativeVm {
    /// Stops every vCPU outside the guest; resolves once they have stopped. `E_VM_STATE` when
    /// the VM has ended.
    #[napi]
    pub async fn pause(&self) -> Result<()> {
        let vm = self.vm.clone();
        blocking("pause", move || vm.pause().map_err(|e| coded(e.code(), e))).await
    }

    /// Lets a paused VM run again (nothing to do when it is not paused).
    #[napi]
    pub fn resume(&self) -> Result<()> {
        guard(|| {
            self.vm.resume();
            Ok(())
        })
    }

    #[napi]
    pub fn is_paused(&self) -> Result<bool> {
        guard(|| Ok(self.vm.is_paused()))
    }

    /// Writes a snapshot to `dir` (`vm.state`, `vm.mem`, copies of writable disks); a running VM
    /// is paused for the duration and runs on after. Resolves with the memory bytes written.
    #[napi]
    pub async fn snapshot(&self, dir: String, incremental: Option<bool>) -> Result<f64> {
        let vm = self.vm.clone();
        blocking("snapshot", move || {
            vm.snapshot(&PathBuf::from(dir), incremental.unwrap_or(false))
                .map(|n| n as f64)
                .map_err(|e| coded(e.code(), e))
        })
        .await
    }
}

/// How a restored VM's console is set up (as `startVm`'s options and the config's
/// `consoleOutput` do for a started one).
#[napi(object)]
pub struct RestoreVmOptions {
    /// Keep console bytes for `readConsole()`.
    pub console_stream: Option<bool>,
    /// Size of the console queue in bytes (the oldest bytes are dropped beyond it).
    pub console_queue_bytes: Option<u32>,
    /// Host file that receives the console (created, or truncated).
    pub console_output: Option<String>,
}

/// Reads `dir/vm.state` (magic, version, checksum, host CPU) and opens `dir/vm.mem`.
/// `E_SNAPSHOT_IO`, `E_SNAPSHOT_CORRUPT`, `E_SNAPSHOT_VERSION`, `E_SNAPSHOT_HOST`.
#[napi]
pub async fn load_snapshot(dir: String) -> Result<NativeSnapshot> {
    let path = PathBuf::from(&dir);
    let snapshot = blocking("snapshot load", move || LoadedSnapshot::load(&path).map_err(vmm_error)).await?;
    // No spare shell yet: a snapshot that is never restored (most of those `vm.snapshot()` writes
    // in a loop) costs no VM; the first restore's `refillSpare` makes one.
    Ok(NativeSnapshot { snapshot: Arc::new(snapshot), dir, spare: Arc::default() })
}

/// One shell made ahead for a `restore()` without a shell of its own: made after each restore
/// (`refillSpare`), on the blocking pool, so that every plain restore after the first does not
/// make one on its latency path (the pools keep shells of their own).
#[derive(Default)]
struct Spare {
    shell: Mutex<Option<VmShell>>,
    making: AtomicBool,
}

impl Spare {
    fn take(&self) -> Option<VmShell> {
        self.shell.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Makes a shell in the background unless one is there or being made. A failure is left to
    /// the next restore, which makes its shell inline and says why.
    fn refill(self: &Arc<Self>, snapshot: &Arc<LoadedSnapshot>) {
        if self.making.swap(true, Ordering::SeqCst) {
            return;
        }
        let (spare, snapshot) = (self.clone(), snapshot.clone());
        spawn_blocking(move || {
            let mut slot = spare.shell.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = snapshot.shell().ok();
            }
            drop(slot);
            spare.making.store(false, Ordering::SeqCst);
        });
    }
}

/// A snapshot read from disk and checked: restore it any number of times.
#[napi]
pub struct NativeSnapshot {
    snapshot: Arc<LoadedSnapshot>,
    dir: String,
    spare: Arc<Spare>,
}

impl Drop for NativeSnapshot {
    fn drop(&mut self) {
        // A GC finalizer, on the JS thread: a VM fd's close may sleep for milliseconds.
        if let Some(shell) = self.spare.take() {
            drop_off_thread(shell);
        }
    }
}

#[napi]
impl NativeSnapshot {
    /// The directory it was loaded from.
    #[napi(getter)]
    pub fn dir(&self) -> String {
        self.dir.clone()
    }

    /// The VM configuration the snapshot was taken with (the VMM's, camelCase).
    #[napi(ts_return_type = "Record<string, unknown>")]
    pub fn config(&self) -> Result<serde_json::Value> {
        guard(|| serde_json::to_value(self.snapshot.config()).map_err(|e| coded("E_INTERNAL", e)))
    }

    /// An empty VM shaped for this snapshot (VM, memory slots, irqchip, PIT, vCPUs), to restore
    /// into later: the slow part of a restore, done ahead of time.
    #[napi]
    pub async fn create_shell(&self) -> Result<NativeShell> {
        let snapshot = self.snapshot.clone();
        let shell = blocking("shell", move || snapshot.shell().map_err(vmm_error)).await?;
        Ok(NativeShell { shell: Mutex::new(Some(shell)) })
    }

    /// Makes the spare shell in the background unless it is there or being made. JS calls it
    /// once a restore has resolved: made earlier, it would compete for the CPU with the restore
    /// it is for.
    #[napi]
    pub fn refill_spare(&self) {
        self.spare.refill(&self.snapshot);
    }

    /// Restores the snapshot, into `shell` when given (it is used up, whatever the outcome), else
    /// into the spare shell made ahead (`refillSpare`), else into one made now. Resolves once the
    /// vCPUs run.
    #[napi(ts_return_type = "Promise<NativeVm>")]
    pub fn restore<'env>(
        &self,
        env: &'env Env,
        shell: Option<&NativeShell>,
        options: Option<RestoreVmOptions>,
    ) -> Result<PromiseRaw<'env, NativeVm>> {
        let shell = match shell {
            Some(s) => Some(s.take().ok_or_else(|| {
                coded(
                    "E_VM_STATE",
                    "this shell was used by an earlier restore or destroyed: make a new one with createShell()",
                )
            })?),
            None => None,
        };
        let options = RestoreOptions {
            console_stream: options.as_ref().and_then(|o| o.console_stream).unwrap_or(false),
            console_queue_bytes: options.as_ref().and_then(|o| o.console_queue_bytes).map(|n| n as usize),
            console_output: options.as_ref().and_then(|o| o.console_output.clone()).map(PathBuf::from),
        };
        let shell = shell.or_else(|| self.spare.take());
        let snapshot = self.snapshot.clone();
        env.spawn_future(async move {
            // Bounded work (~1 ms) on the runtime's own worker, which hands its other tasks to
            // the other workers meanwhile: one thread hop less than spawn_blocking, on the
            // latency path of every restore.
            let vm = napi::tokio::task::block_in_place(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    sandbox::MicroVm::restore(&snapshot, shell, &options).map_err(|e| coded(e.code(), e))
                }))
                .unwrap_or_else(|p| Err(panic_error(p)))
            })?;
            Ok(NativeVm { vm: Arc::new(vm) })
        })
    }
}

/// An empty VM made for one snapshot's shape; used up by one restore.
#[napi]
pub struct NativeShell {
    shell: Mutex<Option<VmShell>>,
}

impl NativeShell {
    fn lock(&self) -> MutexGuard<'_, Option<VmShell>> {
        self.shell.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<VmShell> {
        self.lock().take()
    }
}

#[napi]
impl NativeShell {
    /// False once a restore has used it or it was destroyed.
    #[napi(getter)]
    pub fn usable(&self) -> bool {
        self.lock().is_some()
    }

    /// Frees the shell (its VM and reserved memory); resolves when it is gone.
    #[napi]
    pub async fn destroy(&self) -> Result<()> {
        let shell = self.take();
        blocking("shell teardown", move || {
            drop(shell);
            Ok(())
        })
        .await
    }
}

impl Drop for NativeShell {
    fn drop(&mut self) {
        // Dropped by the JS garbage collector, on the JS thread: tear down elsewhere.
        if let Some(shell) = self.take() {
            let _ = std::thread::Builder::new().name("mc-shell-drop".into()).spawn(move || drop(shell));
        }
    }
}
