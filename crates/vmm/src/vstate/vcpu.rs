//! One vCPU: its architectural set-up and the thread that runs `KVM_RUN`.
//!
//! Kicking: `Lifecycle::request_exit` sends `kick_signal()` to the thread; the handler sets
//! `immediate_exit` in this thread's `kvm_run`, so a signal that lands just before `KVM_RUN`
//! still makes it return at once (the loop then sees the exit request).

use std::cell::Cell;
use std::sync::{Arc, Mutex, Once};

use crate::memory::GuestRam;
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::register_signal_handler;

use super::lifecycle::{kick_signal, Lifecycle};
use crate::arch::vcpu_state::{self, VcpuState};
use crate::arch::{cpuid, interrupts, msr, regs};
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::exit::ExitReason;
use crate::seccomp;
use crate::state::Persist;

thread_local! {
    /// This thread's `kvm_run`, while it runs a vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by `run_loop` while it owns
        // the VcpuFd and cleared before the VcpuFd is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Thread(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// Devices and memory the vCPU threads share while the VM runs.
pub struct RunContext {
    pub pio_bus: Bus,
    pub mmio_bus: Bus,
    pub lifecycle: Arc<Lifecycle>,
    /// Keeps guest memory (and whatever else the VM owns) alive while any vCPU runs.
    pub _keep_alive: Box<dyn Send + Sync>,
}

pub struct Vcpu {
    index: u8,
    /// Locked by the vCPU thread around each KVM_RUN; a paused VM's state is read and written
    /// through it from other threads.
    fd: Arc<Mutex<VcpuFd>>,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` with its CPUID, MSRs, FPU and LAPIC LINTs set.
    pub fn new(vm: &VmFd, index: u8, count: u8, supported_cpuid: &CpuId) -> Result<Vcpu> {
        let vcpu = Self::new_bare(vm, index)?;
        vcpu.configure(count, supported_cpuid)?;
        Ok(vcpu)
    }

    /// Creates vCPU `index` with KVM's reset state: for a restore, which sets all of it.
    pub fn new_bare(vm: &VmFd, index: u8) -> Result<Vcpu> {
        install_kick_handler()?;
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { index, fd: Arc::new(Mutex::new(fd)) })
    }

    fn configure(&self, count: u8, supported_cpuid: &CpuId) -> Result<()> {
        let (index, fd) = (self.index, self.fd.lock().unwrap_or_else(|p| p.into_inner()));
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        msr::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        interrupts::set_lint(&fd)
    }

    /// Puts the boot vCPU at the kernel's entry point.
    pub fn configure_boot(&self, mem: &GuestRam, mode: regs::EntryMode) -> Result<()> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        regs::setup_sregs(&fd, mem, mode)?;
        regs::setup_regs(&fd, mode)
    }

    /// The shared vCPU fd, for reading and writing state while the VM is paused.
    pub fn fd(&self) -> Arc<Mutex<VcpuFd>> {
        self.fd.clone()
    }

    /// Runs until the VM ends. Always reports to the lifecycle, whatever happens.
    /// Runs on the vCPU's thread; `filter`: whether the thread's seccomp filter went in (a
    /// thread without it never enters the guest: the VM ends with `E_SECCOMP`).
    pub fn run_loop(mut self, ctx: Arc<RunContext>, filter: std::result::Result<(), String>) {
        // The kvm_run mapping lives as long as the VcpuFd, which this thread keeps alive.
        let kvm_run = self.fd.lock().unwrap_or_else(|p| p.into_inner()).get_kvm_run() as *mut kvm_run;
        KVM_RUN.with(|p| p.set(kvm_run));
        let thread = format!("vCPU {} thread", self.index);
        let outcome = match filter {
            Err(e) => Ok(Some(ExitReason::crashed(seccomp::Refused::CODE, format!("{thread}: {e}")))),
            Ok(_) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_until_exit(&ctx))),
        };
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        // A refused system call explains whatever came of it (an error, a panic).
        match (seccomp::take_refused_exit(&thread), outcome) {
            (Some(reason), _) | (None, Ok(Some(reason))) => ctx.lifecycle.request_exit(reason),
            (None, Ok(None)) => {}
            (None, Err(_)) => ctx.lifecycle.request_exit(ExitReason::crashed(
                "E_VMM_PANIC",
                format!("vCPU {} thread panicked; the VM was stopped", self.index),
            )),
        }
        ctx.lifecycle.vcpu_stopped();
    }

    /// Returns the reason this vCPU ends the VM, or None when something else ended it.
    fn run_until_exit(&mut self, ctx: &RunContext) -> Option<ExitReason> {
        let index = self.index;
        loop {
            if ctx.lifecycle.exit_requested() {
                return None;
            }
            // The exit just handled made a call the filter refused: the device it drove is
            // suspect, the VM ends.
            if let Some(reason) = seccomp::take_refused_exit(format_args!("vCPU {index} thread")) {
                return Some(reason);
            }
            if ctx.lifecycle.park_requested() {
                ctx.lifecycle.park();
                continue;
            }
            let mut fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
            let exit = match fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => return Some(ExitReason::crashed("E_KVM", format!("KVM_RUN failed on vCPU {index}: {e}"))),
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    ctx.lifecycle.note_io_exit();
                    ctx.pio_bus.write(u64::from(port), data);
                }
                VcpuExit::IoIn(port, data) => {
                    ctx.lifecycle.note_io_exit();
                    ctx.pio_bus.read(u64::from(port), data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.lifecycle.note_io_exit();
                    ctx.mmio_bus.write(addr, data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.lifecycle.note_io_exit();
                    ctx.mmio_bus.read(addr, data);
                }
                VcpuExit::Intr => {}
                VcpuExit::Shutdown => {
                    let rip = fd.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "?".into());
                    return Some(ExitReason::crashed(
                        "E_GUEST_TRIPLE_FAULT",
                        format!("the guest triple-faulted on vCPU {index} (rip {rip}): it hit an exception it could not handle"),
                    ));
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Reset,
                        other => ExitReason::crashed(
                            "E_GUEST_CRASHED",
                            format!("the guest reported system event {other} (crash) on vCPU {index}"),
                        ),
                    });
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Some(ExitReason::crashed(
                        "E_KVM_FAIL_ENTRY",
                        format!(
                            "KVM could not enter the guest on vCPU {index} (hardware reason {reason:#x}, cpu {cpu})"
                        ),
                    ));
                }
                VcpuExit::InternalError => {
                    let rip = fd.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "?".into());
                    return Some(ExitReason::crashed(
                        "E_KVM_INTERNAL_ERROR",
                        format!("KVM hit an internal error emulating the guest on vCPU {index} (rip {rip}); on PVM hosts this is where a stock Linux kernel stops (see hostInfo())"),
                    ));
                }
                other => {
                    return Some(ExitReason::crashed(
                        "E_UNKNOWN_EXIT",
                        format!("unexpected KVM exit on vCPU {index}: {other:?}"),
                    ));
                }
            }
        }
    }
}

/// The MSRs this host's KVM saves, listed once per process.
fn msr_indices() -> Result<&'static [u32]> {
    static MSRS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(m) = MSRS.get() {
        return Ok(m);
    }
    let m = vcpu_state::msrs_to_save(super::vm::kvm()?)?;
    Ok(MSRS.get_or_init(|| m))
}

/// A vCPU's registers, LAPIC, MSRs and events (`arch::vcpu_state`), read and written while it
/// is outside `KVM_RUN`.
impl Persist for VcpuFd {
    type State = VcpuState;
    type Error = Error;

    fn save(&self) -> Result<VcpuState> {
        vcpu_state::save(self, msr_indices()?)
    }

    fn restore(&mut self, state: &VcpuState) -> Result<()> {
        vcpu_state::restore(self, state)
    }
}
