//! How a VM pauses and ends. Both kick every vCPU thread out of KVM_RUN (signal +
//! `immediate_exit`). Pausing parks each vCPU thread outside KVM_RUN until resumed; ending
//! records the first exit reason, and waiters wake when the last vCPU thread has stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::exit::ExitReason;

/// Offset of our kick signal above SIGRTMIN (glibc reserves none of these for itself).
const KICK_SIGNAL_OFFSET: i32 = 2;

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler is `vcpu`'s).
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

#[derive(Default)]
struct State {
    reason: Option<ExitReason>,
    running_vcpus: usize,
    /// vCPU threads parked by a pause.
    parked_vcpus: usize,
    threads: Vec<JoinHandle<()>>,
}

pub struct Lifecycle {
    state: Mutex<State>,
    /// Signalled whenever a vCPU parks, unparks or stops, and on resume.
    changed: Condvar,
    exit_requested: AtomicBool,
    pause_requested: AtomicBool,
    /// Holds taken by the host to read vCPU state (`hold`): the vCPUs stay parked while any
    /// is held, whatever `pause`/`resume` say, and a release never resumes a paused VM.
    holds: AtomicUsize,
    first_exit_ns: AtomicU64,
    /// Run once when the last vCPU thread has stopped (the VMM hangs up the devices' host
    /// streams there, so their readers see the end as they would a QEMU process's exit).
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `Timings`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Lifecycle {
    /// A lifecycle for `vcpus` vCPU threads, each of which must call `vcpu_stopped` once
    /// (the starter calls it for threads it failed to spawn).
    pub fn new(vcpus: usize) -> Self {
        Lifecycle {
            state: Mutex::new(State { running_vcpus: vcpus, ..State::default() }),
            changed: Condvar::new(),
            exit_requested: AtomicBool::new(false),
            pause_requested: AtomicBool::new(false),
            holds: AtomicUsize::new(0),
            first_exit_ns: AtomicU64::new(0),
            on_end: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the handle of a running vCPU thread so that `request_exit` can kick it.
    pub fn add_vcpu_thread(&self, handle: JoinHandle<()>) {
        let mut st = self.lock();
        if self.exit_requested() {
            let _ = handle.kill(kick_signal());
        }
        st.threads.push(handle);
    }

    pub fn exit_requested(&self) -> bool {
        self.exit_requested.load(Ordering::SeqCst)
    }

    /// Ends the VM with `reason` unless it already has one; kicks every vCPU.
    pub fn request_exit(&self, reason: ExitReason) {
        let st = &mut *self.lock();
        if st.reason.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            st.reason = Some(reason);
        }
        self.exit_requested.store(true, Ordering::SeqCst);
        Self::kick(st);
        // Parked vCPUs wake up to see the exit.
        self.changed.notify_all();
    }

    fn kick(st: &State) {
        for t in &st.threads {
            // A thread that already returned ignores the signal; its handle is still valid.
            let _ = t.kill(kick_signal());
        }
    }

    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Parks every vCPU outside KVM_RUN; returns false if the VM ended instead, or had not
    /// parked within `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        let st = self.lock();
        self.pause_requested.store(true, Ordering::SeqCst);
        Self::kick(&st);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.running_vcpus > 0 && st.parked_vcpus < st.running_vcpus)
            .unwrap_or_else(|p| p.into_inner());
        st.running_vcpus > 0 && st.parked_vcpus == st.running_vcpus
    }

    pub fn resume(&self) {
        let _st = self.lock();
        self.pause_requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Whether a vCPU thread must park: a pause, or a hold.
    pub fn park_requested(&self) -> bool {
        self.pause_requested() || self.holds.load(Ordering::SeqCst) > 0
    }

    /// Parks every vCPU outside KVM_RUN so that the caller can read their state, like `pause`
    /// but counted apart from it: a `resume` meanwhile does not let them run, and `release`
    /// resumes only a VM nobody paused. Returns false (and holds nothing) if the VM ended, or
    /// had not parked within `timeout`.
    pub fn hold(&self, timeout: Duration) -> bool {
        let st = self.lock();
        self.holds.fetch_add(1, Ordering::SeqCst);
        Self::kick(&st);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.running_vcpus > 0 && st.parked_vcpus < st.running_vcpus)
            .unwrap_or_else(|p| p.into_inner());
        let parked = st.running_vcpus > 0 && st.parked_vcpus == st.running_vcpus;
        drop(st);
        if !parked {
            self.release();
        }
        parked
    }

    /// Ends a successful `hold`.
    pub fn release(&self) {
        let _st = self.lock();
        self.holds.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that saw a pause request or a hold: blocks until neither is
    /// left, or the VM ended.
    pub fn park(&self) {
        let mut st = self.lock();
        st.parked_vcpus += 1;
        self.changed.notify_all();
        while self.park_requested() && !self.exit_requested() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked_vcpus -= 1;
        self.changed.notify_all();
    }

    pub fn vcpu_stopped(&self) {
        let mut st = self.lock();
        if st.running_vcpus == 1 {
            // The last one: the end hook runs before any waiter can see the exit, so whoever
            // sees the VM ended also sees its streams end. (No other vCPU is left to count.)
            drop(st);
            let on_end = self.on_end.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = on_end {
                f();
            }
            st = self.lock();
        }
        st.running_vcpus -= 1;
        if st.running_vcpus == 0 {
            // Every vCPU gone without a reason can only mean the VM ended with them.
            st.reason.get_or_insert(ExitReason::Stopped);
            self.changed.notify_all();
        }
    }

    /// Sets what runs once when the VM ends (replacing what was set before).
    pub fn set_on_end(&self, f: Box<dyn FnOnce() + Send>) {
        *self.on_end.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Blocks until every vCPU thread has stopped.
    pub fn wait(&self) -> ExitReason {
        let mut st = self.lock();
        while st.running_vcpus > 0 || st.reason.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.reason.clone().expect("loop exits only with a reason")
    }

    /// Like `wait`, but gives up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.running_vcpus > 0 || st.reason.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if st.running_vcpus == 0 {
            st.reason.clone()
        } else {
            None
        }
    }

    /// The reason, once the VM has fully ended.
    pub fn try_exit(&self) -> Option<ExitReason> {
        let st = self.lock();
        if st.running_vcpus == 0 {
            st.reason.clone()
        } else {
            None
        }
    }

    /// Records the time of the guest's first I/O exit (its first port or MMIO access).
    pub fn note_io_exit(&self) {
        if self.first_exit_ns.load(Ordering::Relaxed) == 0 {
            let _ = self.first_exit_ns.compare_exchange(0, monotonic_ns(), Ordering::SeqCst, Ordering::Relaxed);
        }
    }

    pub fn first_exit_ns(&self) -> Option<u64> {
        Some(self.first_exit_ns.load(Ordering::SeqCst)).filter(|t| *t != 0)
    }
}
