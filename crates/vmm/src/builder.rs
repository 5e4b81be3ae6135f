//! Building a VM: its KVM shell, its devices (fresh, or from a snapshot's state), then the
//! vCPU threads. The boot path (`Vm::start`) and the restore path (`Vm::restore`) share it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{self, KernelKind};
use crate::arch::{layout, mptable};
use crate::config::{RestoreOptions, VmConfig, CONTROL_PORT_NAME};
use crate::device_manager::DeviceManager;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::legacy::{i8042, serial, Serial, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::devices::virtio::net::{size_stream_buffers, Net};
use crate::devices::virtio::persist::TransportState;
use crate::devices::virtio::MmioTransport;
use crate::devices::Bus;
use crate::egress::LivePolicy;
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::exit::ExitReason;
use crate::handle::{lock, HostEnds, Machine, Vm};
use crate::host;
use crate::memory::{self, GuestRam};
use crate::persist::LoadedSnapshot;
use crate::run_dir::RunDir;
use crate::seccomp::{FilteredThread, ThreadFilter};
use crate::snapshot;
use crate::state::Persist;
use crate::vstate::lifecycle::{monotonic_ns, Lifecycle};
use crate::vstate::vcpu::{RunContext, Vcpu};
use crate::vstate::vm;
use crate::vstate::vm::kvm;

/// A VM's devices, before any vCPU runs: what `start` and `restore` share.
struct Assembly {
    memory: GuestRam,
    lifecycle: Arc<Lifecycle>,
    pio_bus: Bus,
    mmio_bus: Bus,
    event_loop: EventLoop,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    host_ends: HostEnds,
    /// The devices' ends of the host streams (clones), shut down when the VM ends.
    device_ends: Vec<UnixStream>,
    egress: Option<LivePolicy>,
    cmdline_entries: Vec<String>,
}

/// Device state to start from (a snapshot's), or None for fresh devices.
struct DeviceStates<'a> {
    serial: &'a SerialState,
    i8042: &'a I8042State,
    /// By device id (`VmConfig::virtio_ids`).
    virtio: &'a BTreeMap<String, TransportState>,
}

fn assemble(
    vm: &vm::Vm,
    config: &VmConfig,
    memory: GuestRam,
    console: Box<dyn Write + Send>,
    states: Option<DeviceStates<'_>>,
) -> Result<Assembly> {
    let lifecycle = Arc::new(Lifecycle::new(usize::from(config.vcpus)));

    let mut pio_bus = Bus::default();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::Thread)?;
    vm.fd().register_irqfd(&serial_irq, serial::COM1_IRQ).map_err(Error::kvm("KVM_IRQFD"))?;
    let mut serial = Serial::new(serial_irq, console);
    if let Some(s) = &states {
        serial.restore(s.serial)?;
    }
    let serial = Arc::new(Mutex::new(serial));
    let weak = Arc::downgrade(&lifecycle);
    let mut i8042 = I8042::new(Box::new(move || {
        if let Some(l) = weak.upgrade() {
            l.request_exit(ExitReason::Reset);
        }
    }));
    if let Some(s) = &states {
        i8042.restore(s.i8042)?;
    }
    let i8042 = Arc::new(Mutex::new(i8042));
    // Fixed, disjoint port ranges: insertion cannot overlap.
    pio_bus.insert(serial.clone(), serial::COM1_PORT, serial::COM1_PORT_LEN).ok();
    pio_bus.insert(i8042.clone(), i8042::I8042_PORT, i8042::I8042_PORT_LEN).ok();

    let mut mmio_bus = Bus::default();
    let mut event_loop = EventLoop::new().map_err(Error::Thread)?;
    let mut devices = DeviceManager::default();
    let mut virtio = Vec::new();
    let mut device_ends = Vec::new();
    let ids = config.virtio_ids();
    if let Some(s) = &states {
        if let Some(id) = s.virtio.keys().find(|id| !ids.contains(id)) {
            return Err(Error::Snapshot(format!("the snapshot has a virtio device {id} that the configuration lacks")));
        }
    }
    let mut ids = ids.iter();
    // The state of the next device attached (in `virtio_ids` order), by its id.
    let mut next_state = || -> Result<Option<&TransportState>> {
        let id = ids.next().expect("one id per configured device");
        match &states {
            Some(s) => s
                .virtio
                .get(id)
                .map(Some)
                .ok_or_else(|| Error::Snapshot(format!("the snapshot has no state for virtio device {id}"))),
            None => Ok(None),
        }
    };
    for (i, disk) in config.block_devices.iter().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|e| Error::Config(format!("disk image {} cannot be opened: {e}", disk.path.display())))?;
        let block = Block::new(file, disk.read_only, &format!("microcell-vd{i}")).map_err(Error::Thread)?;
        let state = next_state()?;
        virtio.push(devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(block), state)?);
    }
    let channel = if config.control_channel {
        let (host_end, device_end) = UnixStream::pair().map_err(Error::Thread)?;
        device_ends.push(device_end.try_clone().map_err(Error::Thread)?);
        let fd = device_end.as_raw_fd();
        let console = Console::new(CONTROL_PORT_NAME, device_end, event_loop.interest(fd)).map_err(Error::Thread)?;
        let state = next_state()?;
        virtio.push(devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(console), state)?);
        Some(host_end)
    } else {
        None
    };
    let (network, egress) = match &config.network {
        Some(net) => {
            let (host_end, device_end) = UnixStream::pair().map_err(Error::Thread)?;
            size_stream_buffers(&host_end);
            size_stream_buffers(&device_end);
            device_ends.push(device_end.try_clone().map_err(Error::Thread)?);
            let fd = device_end.as_raw_fd();
            let egress = LivePolicy::new(net.egress.clone());
            let device =
                Net::new(net.mac, egress.clone(), device_end, event_loop.interest(fd)).map_err(Error::Thread)?;
            let state = next_state()?;
            virtio.push(devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(device), state)?);
            (Some(host_end), Some(egress))
        }
        None => (None, None),
    };
    Ok(Assembly {
        memory,
        lifecycle,
        pio_bus,
        mmio_bus,
        event_loop,
        serial,
        i8042,
        virtio,
        host_ends: HostEnds { channel, network },
        device_ends,
        egress,
        cmdline_entries: devices.cmdline_entries,
    })
}

/// A VM with its memory slots, irqchip, PIT and vCPUs created but nothing loaded: the slow,
/// snapshot-independent part of building a VM, done ahead of time (a pool of shells). Its RAM is
/// reserved, untouched anonymous memory that a restore maps the snapshot's memory file over.
pub struct VmShell {
    vm: vm::Vm,
    memory: GuestRam,
    vcpus: Vec<Vcpu>,
    threads: ShellThreads,
    memory_mib: u32,
    track_dirty: bool,
}

/// The VM's threads, started with the shell (their seccomp filters installed meanwhile) and
/// given their work at launch.
struct ShellThreads {
    vcpus: Vec<FilteredThread>,
    /// Only for a VM with virtio devices: nothing else has events to wait for (`run_on` starts
    /// one late for a shell made for a config without them).
    events: Option<FilteredThread>,
}

impl ShellThreads {
    fn spawn(config: &VmConfig) -> Result<ShellThreads> {
        let seccomp = ThreadFilter::for_vmm_threads().map_err(|e| Error::Thread(std::io::Error::other(e)))?;
        let vcpus = (0..config.vcpus)
            .map(|i| FilteredThread::spawn(format!("mc-vcpu{i}"), seccomp))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::Thread)?;
        let events = if config.virtio_ids().is_empty() {
            None
        } else {
            Some(EventLoop::spawn_thread(seccomp).map_err(Error::Thread)?)
        };
        Ok(ShellThreads { vcpus, events })
    }
}

impl VmShell {
    /// A shell for VMs of `config`'s size (memory, vCPUs, dirty tracking), ready to boot.
    pub fn new(config: &VmConfig) -> Result<VmShell> {
        Self::build(config, true)
    }

    /// `boot`: vCPUs get their boot CPUID, MSRs, FPU and LINTs; otherwise they keep KVM's reset
    /// state, which a restore overwrites anyway (saves ~0.1 ms per vCPU).
    fn build(config: &VmConfig, boot: bool) -> Result<VmShell> {
        config.check()?;
        let (memory_mib, vcpus) = (config.memory_mib, config.vcpus);
        let kvm = kvm()?;
        let memory = memory::create(memory_mib, &layout::ram_regions(u64::from(memory_mib) << 20))?;
        let vm = vm::Vm::new(kvm, &memory, config.track_dirty_pages)?;
        let vcpus = if boot {
            let cpuid = supported_cpuid(kvm)?;
            (0..vcpus).map(|i| Vcpu::new(vm.fd(), i, vcpus, cpuid)).collect::<Result<Vec<_>>>()?
        } else {
            (0..vcpus).map(|i| Vcpu::new_bare(vm.fd(), i)).collect::<Result<Vec<_>>>()?
        };
        let threads = ShellThreads::spawn(config)?;
        Ok(VmShell { vm, memory, vcpus, threads, memory_mib, track_dirty: config.track_dirty_pages })
    }
}

fn supported_cpuid(kvm: &Kvm) -> Result<&'static CpuId> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c);
    }
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(CPUID.get_or_init(|| c))
}

impl LoadedSnapshot {
    /// An empty VM shaped for this snapshot, to restore into later (see `VmShell`).
    pub fn shell(&self) -> Result<VmShell> {
        VmShell::build(&self.state.config, false)
    }
}

impl Vm {
    /// Builds the VM, loads the kernel and starts the vCPUs. Returns once they run (~1 ms).
    pub fn start(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm> {
        let start_ns = monotonic_ns();
        config.check()?;
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
        let shell = VmShell::new(config)?;
        let a = assemble(&shell.vm, config, shell.memory, console, None)?;
        let cmdline = std::iter::once(config.cmdline.as_str())
            .chain(a.cmdline_entries.iter().map(String::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let kernel = boot::load_kernel(&a.memory, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&a.memory, mem_bytes, kernel.kernel_end, path)?),
            None => None,
        };
        boot::write_cmdline(&a.memory, &cmdline)?;
        boot::write_boot_info(&a.memory, mem_bytes, &kernel, &cmdline, initrd)?;
        mptable::write(&a.memory, config.vcpus)?;

        shell.vcpus[0].configure_boot(&a.memory, kernel.entry)?;
        Self::launch(shell.vm, a, shell.vcpus, shell.threads, config.clone(), start_ns, None)
    }

    /// Builds a VM from a loaded snapshot and runs it from where the snapshot was taken.
    /// Guest memory maps the snapshot's memory file privately: nothing is copied up front.
    pub fn restore(snapshot: &LoadedSnapshot, console: Box<dyn Write + Send>, options: RestoreOptions) -> Result<Vm> {
        let start_ns = monotonic_ns();
        Self::restore_into(snapshot.shell()?, snapshot, console, options, start_ns)
    }

    /// `restore` into a shell made earlier (`LoadedSnapshot::shell`): the fast path.
    pub fn restore_in(
        shell: VmShell,
        snapshot: &LoadedSnapshot,
        console: Box<dyn Write + Send>,
        options: RestoreOptions,
    ) -> Result<Vm> {
        Self::restore_into(shell, snapshot, console, options, monotonic_ns())
    }

    fn restore_into(
        shell: VmShell,
        snapshot: &LoadedSnapshot,
        console: Box<dyn Write + Send>,
        options: RestoreOptions,
        start_ns: u64,
    ) -> Result<Vm> {
        let state = &snapshot.state;
        let mut config = state.config.clone();
        let mut scratch = None;
        if options.block_devices.is_none() && config.block_devices.iter().any(|d| !d.read_only) {
            // Each clone writes to its own copy of the snapshot's writable disks.
            // A run directory: swept with the others if this process dies before its Drop.
            let dir =
                RunDir::create("clone").map_err(|source| Error::SnapshotIo { path: std::env::temp_dir(), source })?;
            for (i, disk) in config.block_devices.iter_mut().enumerate().filter(|(_, d)| !d.read_only) {
                let copy = dir.path().join(format!("disk{i}.img"));
                snapshot::disk::clone_file(&disk.path, &copy)
                    .map_err(|source| Error::SnapshotIo { path: copy.clone(), source })?;
                disk.path = copy;
            }
            scratch = Some(dir);
        }
        if let Some(disks) = options.block_devices {
            if disks.len() != config.block_devices.len() {
                return Err(Error::Config(format!(
                    "the snapshot has {} disks, {} were given",
                    config.block_devices.len(),
                    disks.len()
                )));
            }
            config.block_devices = disks;
        }
        if let Some(network) = options.network {
            if config.network.is_none() {
                return Err(Error::Config(
                    "the snapshot has no network device: a network cannot be given to its clone".into(),
                ));
            }
            config.network = Some(network);
        }
        if shell.memory_mib != config.memory_mib
            || shell.vcpus.len() != usize::from(config.vcpus)
            || shell.track_dirty != config.track_dirty_pages
        {
            return Err(Error::Config(
                "the VM shell was made for a different memory size, vCPU count or dirty tracking".into(),
            ));
        }
        if state.vcpus.len() != usize::from(config.vcpus) {
            return Err(Error::SnapshotCorrupt {
                path: snapshot.memory_path.clone(),
                reason: "vCPU count mismatch".into(),
            });
        }
        snapshot::memory::map_over(&shell.memory, &snapshot.memory_file, &snapshot.memory_path, &state.memory)?;
        let states = DeviceStates { serial: &state.serial, i8042: &state.i8042, virtio: &state.virtio };
        let a = assemble(&shell.vm, &config, shell.memory, console, Some(states))?;
        let mut kvm_vm = shell.vm;
        kvm_vm.restore(&state.vm)?;
        for (vcpu, s) in shell.vcpus.iter().zip(&state.vcpus) {
            lock(&vcpu.fd()).restore(s)?;
        }
        // Every part is restored: what needs the whole VM runs now, before any vCPU does.
        lock(&a.serial).after_restore()?;
        lock(&a.i8042).after_restore()?;
        for t in &a.virtio {
            lock(t).after_restore()?;
        }
        let path = &snapshot.memory_path;
        let dup =
            || snapshot.memory_file.try_clone().map_err(|source| Error::SnapshotIo { path: path.clone(), source });
        let (backing, base) = (dup()?, dup()?);
        let vm = Self::launch(kvm_vm, a, shell.vcpus, shell.threads, config, start_ns, Some(backing))?;
        if let Some(dir) = scratch {
            lock(&vm.machine().scratch).replace(dir);
        }
        // The restored memory is the snapshot's: an incremental snapshot can build on it.
        lock(&vm.machine().base_memory).replace(base);
        Ok(vm)
    }

    /// Gives the shell's threads their work: the event loop, and each vCPU's loop.
    /// `backing_memory`: the snapshot memory file a restored VM's RAM is mapped from.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        vm: vm::Vm,
        a: Assembly,
        vcpus: Vec<Vcpu>,
        threads: ShellThreads,
        config: VmConfig,
        start_ns: u64,
        backing_memory: Option<File>,
    ) -> Result<Vm> {
        let loop_lifecycle = a.lifecycle.clone();
        let event_loop = a
            .event_loop
            .run_on(threads.events, Box::new(move |reason| loop_lifecycle.request_exit(reason)))
            .map_err(Error::Thread)?;
        let machine = Arc::new(Machine {
            vcpus: vcpus.iter().map(Vcpu::fd).collect(),
            vm,
            _event_loop: event_loop,
            serial: a.serial,
            i8042: a.i8042,
            virtio: a.virtio,
            memory: a.memory,
            config,
            scratch: Mutex::new(None),
            base_memory: Mutex::new(None),
            backing_memory,
            carried_dirty: Mutex::new(Vec::new()),
        });
        let lifecycle = a.lifecycle;
        // An ended VM hangs up its host streams, as an exiting QEMU process does: the other
        // ends read what was sent, then end-of-stream (not silence).
        let device_ends = a.device_ends;
        lifecycle.set_on_end(Box::new(move || {
            for s in &device_ends {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }));
        let ctx = Arc::new(RunContext {
            pio_bus: a.pio_bus,
            mmio_bus: a.mmio_bus,
            lifecycle: lifecycle.clone(),
            _keep_alive: Box::new(machine.clone()),
        });
        let total = vcpus.len();
        for (started, (vcpu, thread)) in vcpus.into_iter().zip(threads.vcpus).enumerate() {
            let thread_ctx = ctx.clone();
            match thread.run(Box::new(move |filter| vcpu.run_loop(thread_ctx, filter))) {
                Ok(handle) => lifecycle.add_vcpu_thread(handle),
                Err(_) => {
                    let why = "a vCPU thread ended before it got its work";
                    lifecycle.request_exit(ExitReason::crashed("E_THREAD", why));
                    for _ in started..total {
                        lifecycle.vcpu_stopped();
                    }
                    return Err(Error::Thread(std::io::Error::other(why)));
                }
            }
        }
        Ok(Vm {
            lifecycle,
            machine: Some(machine),
            host_ends: Mutex::new(a.host_ends),
            egress: a.egress,
            start_ns,
            running_ns: monotonic_ns(),
        })
    }
}
