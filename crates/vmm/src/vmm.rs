//! The public face of the VMM: a config in, a running VM out.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{self, KernelKind};
use crate::arch::mptable;
use crate::device_manager::DeviceManager;
use crate::devices::legacy::{i8042, serial, I8042, Serial};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::event_loop::{EventLoop, EventLoopHandle};
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::host;
use crate::vstate::lifecycle::{monotonic_ns, ExitReason, Lifecycle};
use crate::vstate::vcpu::{RunContext, Vcpu};
use crate::vstate::{memory, vm};

/// Firecracker's default kernel command line, with the serial console on.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The virtio-console port the guest agent looks for.
pub const CONTROL_PORT_NAME: &str = "agent";

/// Smallest guest the boot layout fits in (boot structures, kernel at 1 MiB, initrd).
pub const MIN_MEMORY_MIB: u32 = 2;

/// A raw disk image the guest sees as `/dev/vda`, `/dev/vdb`, ... in this order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Used as given, followed by one `virtio_mmio.device=` entry per virtio device.
    pub cmdline: String,
    #[serde(default)]
    pub block_devices: Vec<BlockDeviceConfig>,
    /// Adds a virtio-console port named `agent`: the host end is `Vm::take_channel()`.
    #[serde(default)]
    pub control_channel: bool,
    /// Boot a Linux kernel even where `host::detect()` says it cannot run (to study how far it gets).
    #[serde(default)]
    pub allow_unsupported_host: bool,
}

impl VmConfig {
    fn check(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_CPUS {
            return Err(Error::Config(format!("vcpus must be 1..={}, got {}", mptable::MAX_CPUS, self.vcpus)));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!("memory must be at least {MIN_MEMORY_MIB} MiB, got {}", self.memory_mib)));
        }
        Ok(())
    }
}

/// Timestamps on CLOCK_MONOTONIC (ns), the clock of Node's `process.hrtime.bigint()`.
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

/// Everything the VM owns; dropped on the last vCPU thread, off the caller's thread, because
/// closing a VM with an irqchip sleeps in the kernel for 16-23 ms (HOST.md).
struct VmResources {
    // Field order is drop order: the VM goes before the devices and the memory they use.
    _vm: vm::Vm,
    _event_loop: Option<EventLoopHandle>,
    _memory: GuestMemoryMmap,
}

/// A running (or ended) VM. Dropping it kills the VM.
pub struct Vm {
    lifecycle: Arc<Lifecycle>,
    channel: Mutex<Option<UnixStream>>,
    start_ns: u64,
    running_ns: u64,
}

fn kvm() -> Result<&'static Kvm> {
    static KVM: OnceLock<Kvm> = OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = Kvm::new().map_err(Error::NoKvm)?;
    Ok(KVM.get_or_init(|| k))
}

fn supported_cpuid(kvm: &Kvm) -> Result<&'static CpuId> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c);
    }
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(CPUID.get_or_init(|| c))
}

impl Vm {
    /// Builds the VM, loads the kernel and starts the vCPUs. Returns once they run (~1 ms).
    pub fn start(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm> {
        let start_ns = monotonic_ns();
        config.check()?;
        let kvm = kvm()?;
        if boot::kernel_kind(&config.kernel)? == KernelKind::Linux && !config.allow_unsupported_host {
            let host = host::cached();
            if !host.can_boot_linux {
                return Err(Error::UnsupportedGuest(format!(
                    "{} is a Linux kernel, which cannot boot on this host: {}",
                    config.kernel.display(),
                    host.reason
                )));
            }
        }
        let mem_bytes = u64::from(config.memory_mib) << 20;
        let memory = memory::create(config.memory_mib)?;
        let vm = vm::Vm::new(kvm, &memory)?;
        let lifecycle = Arc::new(Lifecycle::new(usize::from(config.vcpus)));

        let mut pio_bus = Bus::default();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Thread(e.into()))?;
        vm.fd().register_irqfd(&serial_irq, serial::COM1_IRQ).map_err(Error::kvm("KVM_IRQFD"))?;
        let serial = Serial::new(serial_irq, console);
        let weak = Arc::downgrade(&lifecycle);
        let i8042 = I8042::new(Box::new(move || {
            if let Some(l) = weak.upgrade() {
                l.request_exit(ExitReason::Reset);
            }
        }));
        // Fixed, disjoint port ranges: insertion cannot overlap.
        pio_bus.insert(Arc::new(std::sync::Mutex::new(serial)), serial::COM1_PORT, serial::COM1_PORT_LEN).ok();
        pio_bus.insert(Arc::new(std::sync::Mutex::new(i8042)), i8042::I8042_PORT, i8042::I8042_PORT_LEN).ok();

        let mut mmio_bus = Bus::default();
        let mut event_loop = EventLoop::new().map_err(Error::Thread)?;
        let mut devices = DeviceManager::default();
        for (i, disk) in config.block_devices.iter().enumerate() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(|e| Error::Config(format!("disk image {} cannot be opened: {e}", disk.path.display())))?;
            let block = Block::new(file, disk.read_only, &format!("microcell-vd{i}")).map_err(Error::Thread)?;
            devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(block), None)?;
        }
        let channel = if config.control_channel {
            let (host_end, device_end) = UnixStream::pair().map_err(Error::Thread)?;
            let fd = device_end.as_raw_fd();
            let console = Console::new(CONTROL_PORT_NAME, device_end, event_loop.interest(fd)).map_err(Error::Thread)?;
            devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(console), Some(fd))?;
            Some(host_end)
        } else {
            None
        };
        let cmdline = std::iter::once(config.cmdline.as_str())
            .chain(devices.cmdline_entries.iter().map(String::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");

        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&memory, mem_bytes, kernel.kernel_end, path)?),
            None => None,
        };
        boot::write_cmdline(&memory, &cmdline)?;
        boot::write_boot_info(&memory, mem_bytes, &kernel, &cmdline, initrd)?;
        mptable::write(&memory, config.vcpus)?;

        let cpuid = supported_cpuid(kvm)?;
        let vcpus = (0..config.vcpus)
            .map(|i| Vcpu::new(vm.fd(), i, config.vcpus, cpuid))
            .collect::<Result<Vec<_>>>()?;
        vcpus[0].configure_boot(&memory, kernel.entry)?;

        let event_loop = event_loop.spawn_if_needed("mc-events".into()).map_err(Error::Thread)?;
        let ctx = Arc::new(RunContext {
            pio_bus,
            mmio_bus,
            lifecycle: lifecycle.clone(),
            keep_alive: Box::new(VmResources { _vm: vm, _event_loop: event_loop, _memory: memory }),
        });
        let total = vcpus.len();
        for (spawned, vcpu) in vcpus.into_iter().enumerate() {
            let thread_ctx = ctx.clone();
            let name = format!("mc-vcpu{}", vcpu.index());
            match std::thread::Builder::new().name(name).spawn(move || vcpu.run_loop(thread_ctx)) {
                Ok(handle) => lifecycle.add_vcpu_thread(handle),
                Err(e) => {
                    lifecycle.request_exit(ExitReason::crashed("E_THREAD", format!("cannot start a vCPU thread: {e}")));
                    for _ in spawned..total {
                        lifecycle.vcpu_stopped();
                    }
                    drop(ctx);
                    return Err(Error::Thread(e));
                }
            }
        }
        Ok(Vm { lifecycle, channel: Mutex::new(channel), start_ns, running_ns: monotonic_ns() })
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

    /// The host end of the control channel (once; later calls return None).
    pub fn take_channel(&self) -> Option<UnixStream> {
        self.channel.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn timings(&self) -> Timings {
        Timings { start_ns: self.start_ns, first_exit_ns: self.lifecycle.first_exit_ns(), running_ns: self.running_ns }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.lifecycle.request_exit(ExitReason::Killed);
    }
}
