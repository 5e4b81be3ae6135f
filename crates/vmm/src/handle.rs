//! The handle of a running VM: wait, stop, pause, its host streams. It is built in
//! `builder` (boot, restore) and snapshotted in `persist`.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use serde::Serialize;

use crate::config::VmConfig;
use crate::devices::legacy::{Serial, I8042};
use crate::devices::virtio::MmioTransport;
use crate::egress::{EgressPolicy, LivePolicy};
use crate::error::{Error, Result};
use crate::event_loop::EventLoopHandle;
use crate::exit::ExitReason;
use crate::memory::GuestRam;
use crate::run_dir::RunDir;
use crate::vstate::lifecycle::Lifecycle;
use crate::vstate::vm;

/// Timestamps on CLOCK_MONOTONIC (ns), the clock callers time against.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// When `Vm::start` was called.
    pub start_ns: u64,
    /// When the guest first touched a port or MMIO address (its first observable instruction).
    pub first_exit_ns: Option<u64>,
    /// When `Vm::start` returned with the vCPUs running.
    pub running_ns: u64,
}

/// Everything a VM owns, shared by its vCPU threads and its handle. Field order is drop
/// order: vCPUs and the VM fd go before the devices and the memory they use. The last owner
/// drops it off the caller's thread (closing a VM with an irqchip sleeps 16-23 ms, HOST.md).
pub(crate) struct Machine {
    pub(crate) vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) vm: vm::Vm,
    /// Kept for its Drop, which stops the event thread.
    pub(crate) _event_loop: Option<EventLoopHandle>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) virtio: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) memory: GuestRam,
    pub(crate) config: VmConfig,
    /// Per-VM files (a clone's disk copies), removed with the machine.
    pub(crate) scratch: Mutex<Option<RunDir>>,
    /// The memory file of the last snapshot taken (or restored from), open: an incremental
    /// snapshot copies it and writes the pages dirtied since. Held open rather than by path, so
    /// that another snapshot written over that path later cannot change what it builds on.
    pub(crate) base_memory: Mutex<Option<File>>,
    /// The memory file a restored VM's RAM is mapped from (MAP_PRIVATE): the pages the VM has
    /// not written come from it, resident or not, so a full snapshot starts from a copy of it.
    pub(crate) backing_memory: Option<File>,
    /// Pages dirtied since `base_memory` that a failed snapshot took from the dirty logs: the
    /// next snapshot adds them back (per region, one bit per page).
    pub(crate) carried_dirty: Mutex<Vec<Vec<u64>>>,
}

/// A `Vm::hold`, released on drop.
pub(crate) struct Held<'a>(&'a Lifecycle);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The host ends of the VM's sockets, until their users take them.
#[derive(Default)]
pub(crate) struct HostEnds {
    pub(crate) channel: Option<UnixStream>,
    pub(crate) network: Option<UnixStream>,
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running (or ended) VM. Dropping it kills the VM.
pub struct Vm {
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) machine: Option<Arc<Machine>>,
    pub(crate) host_ends: Mutex<HostEnds>,
    /// The network device's policy (shared with it), when the VM has one.
    pub(crate) egress: Option<LivePolicy>,
    pub(crate) start_ns: u64,
    pub(crate) running_ns: u64,
}

impl Vm {
    pub(crate) fn machine(&self) -> &Machine {
        self.machine.as_ref().expect("present until drop")
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> ExitReason {
        self.lifecycle.wait()
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.lifecycle.wait_timeout(timeout)
    }

    pub fn try_exit(&self) -> Option<ExitReason> {
        self.lifecycle.try_exit()
    }

    /// Asks the VM to end; `wait` then reports `Stopped` (unless it had already ended).
    pub fn stop(&self) {
        self.lifecycle.request_exit(ExitReason::Stopped);
    }

    /// Ends the VM at once; `wait` then reports `Killed` (unless it had already ended).
    pub fn kill(&self) {
        self.lifecycle.request_exit(ExitReason::Killed);
    }

    /// Stops every vCPU outside the guest; a paused VM uses no CPU.
    pub fn pause(&self) -> Result<()> {
        if self.lifecycle.pause(Duration::from_secs(5)) {
            Ok(())
        } else {
            self.lifecycle.resume();
            Err(Error::VmState("the VM has ended (or its vCPUs did not stop within 5 s); it cannot be paused".into()))
        }
    }

    pub fn resume(&self) {
        self.lifecycle.resume();
    }

    pub fn is_paused(&self) -> bool {
        self.lifecycle.pause_requested()
    }

    /// Parks every vCPU until the guard drops, apart from `pause`/`resume` (so a `resume`
    /// meanwhile, or a halt check beside a snapshot, cannot let them run mid-read).
    pub(crate) fn hold(&self, what: &str) -> Result<Held<'_>> {
        if self.lifecycle.hold(Duration::from_secs(5)) {
            Ok(Held(&self.lifecycle))
        } else {
            Err(Error::VmState(format!("the VM has ended (or its vCPUs did not stop within 5 s); it cannot be {what}")))
        }
    }

    /// Whether the guest has halted for good: every vCPU it started is in HLT with interrupts
    /// off (what `cli; hlt`, Linux's `halt -f`/`poweroff -f` without a power-off device,
    /// leave), and the others never started (no running one is left to send them a SIPI).
    /// Nothing but an NMI, which this VMM never sends, can wake it. False while paused, once
    /// ended, or when a vCPU's state cannot be read. The vCPUs are held outside KVM_RUN for
    /// the reads (microseconds) and the state is read on the caller's thread: the vCPU
    /// threads make no new system call for it.
    pub fn is_halted(&self) -> bool {
        if self.is_paused() {
            return false;
        }
        let Ok(_held) = self.hold("checked") else { return false };
        let mut halted = 0;
        for fd in &self.machine().vcpus {
            let fd = lock(fd);
            let Ok(mp) = fd.get_mp_state() else { return false };
            match mp.mp_state {
                kvm_bindings::KVM_MP_STATE_HALTED => {
                    // RFLAGS.IF (bit 9): with it set, an interrupt ends the halt (an idle CPU).
                    let Ok(regs) = fd.get_regs() else { return false };
                    if regs.rflags & (1 << 9) != 0 {
                        return false;
                    }
                    halted += 1;
                }
                kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => {}
                _ => return false,
            }
        }
        halted > 0
    }

    /// The host end of the control channel (once; later calls return None).
    pub fn take_channel(&self) -> Option<UnixStream> {
        lock(&self.host_ends).channel.take()
    }

    /// The host end of the network device's frame stream (once; later calls return None): each
    /// frame after its length as a 4-byte big-endian number, as passt's `--fd` expects.
    pub fn take_network(&self) -> Option<UnixStream> {
        lock(&self.host_ends).network.take()
    }

    /// Replaces the network device's egress policy, from the next frame the guest sends (and in
    /// snapshots taken after). `E_CONFIG` for a VM without a network device.
    pub fn set_egress(&self, policy: EgressPolicy) -> Result<()> {
        let live = self
            .egress
            .as_ref()
            .ok_or_else(|| Error::Config("the VM has no network device: its policy cannot be set".into()))?;
        live.set(policy);
        Ok(())
    }

    pub fn timings(&self) -> Timings {
        Timings { start_ns: self.start_ns, first_exit_ns: self.lifecycle.first_exit_ns(), running_ns: self.running_ns }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.lifecycle.request_exit(ExitReason::Killed);
        // Whoever holds the machine last closes the VM fd (slow): never this thread.
        if let Some(machine) = self.machine.take() {
            let _ = std::thread::Builder::new().name("mc-teardown".into()).spawn(move || drop(machine));
        }
    }
}
