//! A running microVM on the built-in VMM: start (or restore from a snapshot), wait (blocking or
//! as a future), stop, kill, pause, resume, snapshot, console, timings.
//!
//! One watcher thread per VM waits for its end, closes the console (so the console file is
//! complete and readers see the end of the stream), lets go of the VM (its memory and KVM
//! objects are freed then, not when the handle is dropped: a JS handle lives until the garbage
//! collector gets to it) and then publishes the exit reason. Waiting from the host is therefore
//! never a blocked thread of the caller's: [`MicroVm::wait_async`] is a future woken by the
//! watcher.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::config::MicroVmConfig;
use crate::console::{self, ConsoleHandle, ConsoleOptions, ConsoleReader, ConsoleStats};
use crate::error::{ConfigError, Result, SandboxError};
use crate::workload::WorkloadStatus;
use vmm::VmShell;
use vmm::{ExitReason, LoadedSnapshot, Timings};

/// How a microVM is started.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Keep console bytes for [`MicroVm::console`] to read.
    pub console_stream: bool,
    /// The reader's queue size in bytes (default [`console::DEFAULT_QUEUE_CAPACITY`]).
    pub console_queue_bytes: Option<usize>,
    /// Log the pages the guest writes, so that an incremental snapshot writes only those.
    pub track_dirty_pages: bool,
}

/// How a microVM is restored from a snapshot: its console, as [`StartOptions`] and the config's
/// `consoleOutput` set it for a started one (a snapshot keeps no console settings).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Keep console bytes for [`MicroVm::console`] to read.
    pub console_stream: bool,
    /// The reader's queue size in bytes (default [`console::DEFAULT_QUEUE_CAPACITY`]).
    pub console_queue_bytes: Option<usize>,
    /// Host file that receives the restored guest's console (created, or truncated).
    pub console_output: Option<PathBuf>,
}

/// The VM while it may run; only its timings once it has ended.
enum Slot {
    Running(Arc<vmm::Vm>),
    Ended(Timings),
}

/// A started microVM. Dropping it kills the VM if it still runs.
pub struct MicroVm {
    slot: Arc<Mutex<Slot>>,
    exit: Arc<ExitSlot>,
    console: ConsoleHandle,
    reader: Option<ConsoleReader>,
    /// The workload's status, once its line went by on the console (VMs with `execPath`).
    workload: Option<Arc<Mutex<Option<protocol::WorkloadExit>>>>,
}

/// Passes console bytes on and watches them for the workload's status line.
struct StatusScanner {
    inner: Box<dyn Write + Send>,
    line: Vec<u8>,
    status: Arc<Mutex<Option<protocol::WorkloadExit>>>,
}

impl StatusScanner {
    /// Longest line looked at (the status line is far shorter; longer lines are skipped).
    const MAX_LINE: usize = 4096;

    fn new(inner: Box<dyn Write + Send>, status: Arc<Mutex<Option<protocol::WorkloadExit>>>) -> Self {
        StatusScanner { inner, line: Vec::new(), status }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if let Some(exit) = protocol::workload::parse_status_line(&String::from_utf8_lossy(&self.line)) {
                    *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit);
                }
                self.line.clear();
            } else if self.line.len() < Self::MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for StatusScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl MicroVm {
    /// Validates the configuration and boots it; returns once the vCPUs run.
    ///
    /// With `execPath` the guest runs that program as its workload (`crate::workload`): the
    /// agent reports its status on the console, which [`MicroVm::workload_status`] reads.
    pub fn start(config: &MicroVmConfig, options: &StartOptions) -> Result<MicroVm> {
        let mut vm_config = config.to_vm_config()?;
        vm_config.track_dirty_pages = options.track_dirty_pages;
        let console = ConsoleOptions {
            file: config.console_output.clone(),
            queue_capacity: options
                .console_stream
                .then(|| options.console_queue_bytes.unwrap_or(console::DEFAULT_QUEUE_CAPACITY)),
        };
        if config.exec_path.is_none() {
            return Self::launch(&console, |sink| vmm::Vm::start(&vm_config, sink));
        }
        let status = Arc::new(Mutex::new(None));
        let s = status.clone();
        let mut vm =
            Self::launch(&console, move |sink| vmm::Vm::start(&vm_config, Box::new(StatusScanner::new(sink, s))))?;
        vm.workload = Some(status);
        Ok(vm)
    }

    /// How the workload (`execPath`) ended, from the agent's status line on the console:
    /// `None` while it runs, for a VM without a workload, or when the guest ended without
    /// reporting (then [`MicroVm::try_exit`] says how the VM ended).
    pub fn workload_status(&self) -> Option<WorkloadStatus> {
        let slot = self.workload.as_ref()?;
        let exit = slot.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(WorkloadStatus::from_exit(exit, "console"))
    }

    /// Restores a loaded snapshot, into `shell` when one is given (the fast path: a shell made
    /// earlier by [`LoadedSnapshot::shell`]) or into one made now. Returns once the vCPUs run;
    /// [`Self::timings`] then counts from the restore (`first_exit_ns`: the first guest exit
    /// after it).
    pub fn restore(snapshot: &LoadedSnapshot, shell: Option<VmShell>, options: &RestoreOptions) -> Result<MicroVm> {
        // The config's check (E_CONFIG_CONSOLE), before File::create (which a FIFO would block).
        if let Some(problem) = options.console_output.as_deref().and_then(crate::config::console_file_problem) {
            return Err(ConfigError::Console(problem).into());
        }
        let console = ConsoleOptions {
            file: options.console_output.clone(),
            queue_capacity: options
                .console_stream
                .then(|| options.console_queue_bytes.unwrap_or(console::DEFAULT_QUEUE_CAPACITY)),
        };
        Self::launch(&console, |sink| match shell {
            Some(shell) => vmm::Vm::restore_in(shell, snapshot, sink, Default::default()),
            None => vmm::Vm::restore(snapshot, sink, Default::default()),
        })
    }

    /// Sets up the console, runs `boot` with its sink, and watches the VM it returns.
    fn launch(
        console_options: &ConsoleOptions,
        boot: impl FnOnce(Box<dyn Write + Send>) -> vmm::Result<vmm::Vm>,
    ) -> Result<MicroVm> {
        let (sink, console) = console::channel(console_options).map_err(|source| SandboxError::ConsoleOutput {
            path: console_options.file.clone().unwrap_or_default(),
            source,
        })?;
        let reader = console.reader();
        let vm = match boot(Box::new(sink)) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                console.close();
                return Err(e.into());
            }
        };
        let exit = Arc::new(ExitSlot::default());
        let slot = Arc::new(Mutex::new(Slot::Running(vm.clone())));

        let watcher = {
            let (vm, exit, console, slot) = (vm.clone(), exit.clone(), console.clone(), slot.clone());
            std::thread::Builder::new().name("microcell-wait".into()).spawn(move || {
                let reason = vm.wait();
                console.close();
                // Let go of the VM now: its memory is freed once nobody uses it (a snapshot
                // or pause still running holds it until it returns).
                let timings = vm.timings();
                let held = std::mem::replace(&mut *lock(&slot), Slot::Ended(timings));
                drop(held);
                exit.set(reason);
                // The last reference may be this one: tearing a VM down takes milliseconds,
                // and this thread is the right place for it.
                drop(vm);
            })
        };
        if let Err(e) = watcher {
            vm.kill();
            let _ = vm.wait();
            console.close();
            return Err(SandboxError::thread("the one that waits for the VM")(e));
        }
        Ok(MicroVm { slot, exit, console, reader, workload: None })
    }

    /// The VM, while it has not ended.
    fn running(&self) -> Option<Arc<vmm::Vm>> {
        match &*lock(&self.slot) {
            Slot::Running(vm) => Some(vm.clone()),
            Slot::Ended(_) => None,
        }
    }

    /// The VM for an operation that needs it running (`E_VM_STATE` once it has ended).
    fn running_for(&self, what: &str) -> Result<Arc<vmm::Vm>> {
        self.running()
            .ok_or_else(|| SandboxError::Vmm(vmm::Error::VmState(format!("the VM has ended: it cannot {what}"))))
    }

    /// The exit reason, once the VM has ended (and its console is closed).
    pub fn try_exit(&self) -> Option<ExitReason> {
        self.exit.get()
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> ExitReason {
        self.exit.wait_blocking()
    }

    /// Resolves when the VM has ended; needs no thread of its own.
    pub fn wait_async(&self) -> ExitFuture {
        ExitFuture { slot: self.exit.clone() }
    }

    /// Asks the VM to end; [`Self::wait`] then returns [`ExitReason::Stopped`] (unless it had
    /// already ended another way).
    pub fn stop(&self) {
        if let Some(vm) = self.running() {
            vm.stop();
        }
    }

    /// Ends the VM at once; [`Self::wait`] then returns [`ExitReason::Killed`] (unless it had
    /// already ended another way).
    pub fn kill(&self) {
        if let Some(vm) = self.running() {
            vm.kill();
        }
    }

    /// Stops every vCPU outside the guest (a paused VM uses no CPU); returns once they have
    /// stopped (`E_VM_STATE` when the VM has ended, or its vCPUs did not stop within 5 s).
    pub fn pause(&self) -> Result<()> {
        Ok(self.running_for("be paused")?.pause()?)
    }

    /// Lets a paused VM run again (nothing to do when it is not paused).
    pub fn resume(&self) {
        if let Some(vm) = self.running() {
            vm.resume();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.running().is_some_and(|vm| vm.is_paused())
    }

    /// Writes a snapshot to `dir` (`vm.state`, `vm.mem`, copies of writable disks) and leaves
    /// the VM as it was: a running VM is paused for the duration. Returns the memory bytes
    /// written. `incremental` needs `track_dirty_pages` and an earlier snapshot of (or restore
    /// into) this VM.
    pub fn snapshot(&self, dir: &Path, incremental: bool) -> Result<u64> {
        Ok(self.running_for("be snapshotted")?.snapshot(dir, incremental)?)
    }

    /// The reader of the console queue, when started with `console_stream`.
    pub fn console(&self) -> Option<&ConsoleReader> {
        self.reader.as_ref()
    }

    pub fn console_stats(&self) -> ConsoleStats {
        self.console.stats()
    }

    /// CLOCK_MONOTONIC nanoseconds: when the start began, and the first vCPU exit.
    pub fn timings(&self) -> Timings {
        match &*lock(&self.slot) {
            Slot::Running(vm) => vm.timings(),
            Slot::Ended(timings) => *timings,
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        // A VM nobody holds any more must not run on. The VMM tears it down on its own vCPU
        // threads, never on this (possibly the JS) thread.
        if let Slot::Running(vm) = &*lock(&self.slot) {
            vm.kill();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct ExitSlot {
    state: Mutex<(Option<ExitReason>, Vec<Waker>)>,
    ended: Condvar,
}

impl ExitSlot {
    fn lock(&self) -> MutexGuard<'_, (Option<ExitReason>, Vec<Waker>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, reason: ExitReason) {
        let wakers = {
            let mut s = self.lock();
            s.0 = Some(reason);
            self.ended.notify_all();
            std::mem::take(&mut s.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    fn get(&self) -> Option<ExitReason> {
        self.lock().0.clone()
    }

    fn wait_blocking(&self) -> ExitReason {
        let mut s = self.lock();
        loop {
            if let Some(r) = &s.0 {
                return r.clone();
            }
            s = self.ended.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// See [`MicroVm::wait_async`].
pub struct ExitFuture {
    slot: Arc<ExitSlot>,
}

impl Future for ExitFuture {
    type Output = ExitReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ExitReason> {
        let mut s = self.slot.lock();
        match &s.0 {
            Some(r) => Poll::Ready(r.clone()),
            None => {
                if !s.1.iter().any(|w| w.will_wake(cx.waker())) {
                    s.1.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod workload_tests {
    use super::*;

    #[test]
    fn the_scanner_finds_the_status_line_in_pieces() {
        let status = Arc::new(Mutex::new(None));
        let mut s = StatusScanner::new(Box::new(std::io::sink()), status.clone());
        let text = b"[ 1.0] boot\r\nout\r\nmicrocell-workload-exit: exited code=3 duration_ns=7\r\nreboot\r\n";
        for c in text.chunks(5) {
            s.write_all(c).unwrap();
        }
        let got = status.lock().unwrap().clone().unwrap();
        assert_eq!((got.code, got.duration_ns), (Some(3), 7));
        s.write_all(&vec![b'x'; 10_000]).unwrap();
        s.write_all(b"\n").unwrap();
        assert!(status.lock().unwrap().is_some(), "a long line changes nothing");
    }
}
