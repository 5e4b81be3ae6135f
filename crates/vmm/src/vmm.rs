//! The public face of the VMM: a config in, a running VM out.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use crate::vstate::memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{self, KernelKind};
use crate::arch::{mptable, vcpu_state, vm_state};
use crate::device_manager::DeviceManager;
use crate::devices::legacy::serial::SerialState;
use crate::devices::legacy::{i8042, serial, I8042, Serial};
use crate::devices::virtio::persist::TransportState;
use crate::devices::virtio::MmioTransport;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::devices::virtio::net::egress::{EgressPolicy, LivePolicy};
use crate::devices::virtio::net::{size_stream_buffers, Net};
use crate::event_loop::{EventLoop, EventLoopHandle};
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::host;
use crate::run_dir::RunDir;
use crate::seccomp::ThreadFilter;
use crate::snapshot::{self, MachineState};
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

/// The guest's network interface. The network behind it is whatever process the caller connects
/// to `Vm::take_network()` (passt in microcell's sandboxes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    pub mac: [u8; 6],
    /// What the guest may send; enforced by the device on every frame.
    #[serde(default)]
    pub egress: EgressPolicy,
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
    /// Adds a virtio-net device: the host end of its frame stream is `Vm::take_network()`.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Boot a Linux kernel even where `host::detect()` says it cannot run (to study how far it gets).
    #[serde(default)]
    pub allow_unsupported_host: bool,
    /// Log the pages the guest writes, so that a snapshot after the first writes only those.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl VmConfig {
    /// The limits every VM meets, booted or restored (a snapshot's config is checked by this
    /// too, before any memory is reserved for it).
    pub(crate) fn check(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_CPUS {
            return Err(Error::Config(format!("vcpus must be 1..={}, got {}", mptable::MAX_CPUS, self.vcpus)));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!("memory must be at least {MIN_MEMORY_MIB} MiB, got {}", self.memory_mib)));
        }
        // More than the host has cannot be backed, and its page bitmaps alone could exhaust the
        // host (2^31 MiB wants a 64 GiB bitmap: the allocation aborts the process).
        let host_mib = host::cached().host_memory_mib;
        if host_mib > 0 && u64::from(self.memory_mib) > host_mib {
            return Err(Error::Config(format!(
                "memory is {} MiB but this host has {host_mib} MiB of RAM (MemTotal): give at most {host_mib} MiB",
                self.memory_mib
            )));
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

/// Everything a VM owns, shared by its vCPU threads and its handle. Field order is drop
/// order: vCPUs and the VM fd go before the devices and the memory they use. The last owner
/// drops it off the caller's thread (closing a VM with an irqchip sleeps 16-23 ms, HOST.md).
struct Machine {
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    vm: vm::Vm,
    /// Kept for its Drop, which stops the event thread.
    _event_loop: Option<EventLoopHandle>,
    serial: Arc<Mutex<Serial>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    memory: GuestRam,
    config: VmConfig,
    /// Per-VM files (a clone's disk copies), removed with the machine.
    scratch: Mutex<Option<RunDir>>,
    /// The memory file of the last snapshot taken (or restored from), open: an incremental
    /// snapshot copies it and writes the pages dirtied since. Held open rather than by path, so
    /// that another snapshot written over that path later cannot change what it builds on.
    base_memory: Mutex<Option<File>>,
    /// The memory file a restored VM's RAM is mapped from (MAP_PRIVATE): the pages the VM has
    /// not written come from it, resident or not, so a full snapshot starts from a copy of it.
    backing_memory: Option<File>,
    /// Pages dirtied since `base_memory` that a failed snapshot took from the dirty logs: the
    /// next snapshot adds them back (per region, one bit per page).
    carried_dirty: Mutex<Vec<Vec<u64>>>,
}

/// Held while a snapshot is written into a directory (see `snapshot_paused`).
struct DirLock(PathBuf);

static SNAPSHOT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static SNAPSHOT_DIR_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl DirLock {
    fn take(dir: &Path) -> DirLock {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let mut held = lock(&SNAPSHOT_DIRS);
        while held.contains(&dir) {
            held = SNAPSHOT_DIR_FREED.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push(dir.clone());
        DirLock(dir)
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        lock(&SNAPSHOT_DIRS).retain(|d| d != &self.0);
        SNAPSHOT_DIR_FREED.notify_all();
    }
}

/// A `Vm::hold`, released on drop.
struct Held<'a>(&'a Lifecycle);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A VM's devices, before any vCPU runs: what `start` and `restore` share.
struct Assembly {
    memory: GuestRam,
    lifecycle: Arc<Lifecycle>,
    pio_bus: Bus,
    mmio_bus: Bus,
    event_loop: EventLoop,
    serial: Arc<Mutex<Serial>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    host_ends: HostEnds,
    /// The devices' ends of the host streams (clones), shut down when the VM ends.
    device_ends: Vec<UnixStream>,
    egress: Option<LivePolicy>,
    cmdline_entries: Vec<String>,
}

/// The host ends of the VM's sockets, until their users take them.
#[derive(Default)]
struct HostEnds {
    channel: Option<UnixStream>,
    network: Option<UnixStream>,
}

/// Device state to start from (a snapshot's), or None for fresh devices.
struct DeviceStates<'a> {
    serial: &'a SerialState,
    virtio: &'a [TransportState],
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// ORs per-region page bitmaps `b` into `a`, growing `a` as needed.
fn or_into(a: &mut Vec<Vec<u64>>, b: &[Vec<u64>]) {
    if a.len() < b.len() {
        a.resize(b.len(), Vec::new());
    }
    for (x, y) in a.iter_mut().zip(b) {
        if x.len() < y.len() {
            x.resize(y.len(), 0);
        }
        for (w, v) in x.iter_mut().zip(y) {
            *w |= v;
        }
    }
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
    let serial = match &states {
        Some(s) => Serial::from_state(s.serial, serial_irq, console).map_err(|e| Error::Snapshot(e.to_string()))?,
        None => Serial::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    let weak = Arc::downgrade(&lifecycle);
    let i8042 = I8042::new(Box::new(move || {
        if let Some(l) = weak.upgrade() {
            l.request_exit(ExitReason::Reset);
        }
    }));
    // Fixed, disjoint port ranges: insertion cannot overlap.
    pio_bus.insert(serial.clone(), serial::COM1_PORT, serial::COM1_PORT_LEN).ok();
    pio_bus.insert(Arc::new(Mutex::new(i8042)), i8042::I8042_PORT, i8042::I8042_PORT_LEN).ok();

    let mut mmio_bus = Bus::default();
    let mut event_loop = EventLoop::new().map_err(Error::Thread)?;
    let mut devices = DeviceManager::default();
    let mut virtio = Vec::new();
    let mut device_ends = Vec::new();
    let mut transport_states = states.as_ref().map(|s| s.virtio.iter());
    let mut next_state = || transport_states.as_mut().and_then(Iterator::next);
    for (i, disk) in config.block_devices.iter().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|e| Error::Config(format!("disk image {} cannot be opened: {e}", disk.path.display())))?;
        let block = Block::new(file, disk.read_only, &format!("microcell-vd{i}")).map_err(Error::Thread)?;
        let state = next_state();
        virtio.push(devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(block), state)?);
    }
    let channel = if config.control_channel {
        let (host_end, device_end) = UnixStream::pair().map_err(Error::Thread)?;
        device_ends.push(device_end.try_clone().map_err(Error::Thread)?);
        let fd = device_end.as_raw_fd();
        let console = Console::new(CONTROL_PORT_NAME, device_end, event_loop.interest(fd)).map_err(Error::Thread)?;
        let state = next_state();
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
            let device = Net::new(net.mac, egress.clone(), device_end, event_loop.interest(fd)).map_err(Error::Thread)?;
            let state = next_state();
            virtio.push(devices.attach(vm.fd(), &memory, &mut mmio_bus, &mut event_loop, Box::new(device), state)?);
            (Some(host_end), Some(egress))
        }
        None => (None, None),
    };
    if next_state().is_some() {
        return Err(Error::Snapshot("the snapshot has more virtio devices than the configuration".into()));
    }
    Ok(Assembly {
        memory,
        lifecycle,
        pio_bus,
        mmio_bus,
        event_loop,
        serial,
        virtio,
        host_ends: HostEnds { channel, network },
        device_ends,
        egress,
        cmdline_entries: devices.cmdline_entries,
    })
}

/// A snapshot read from disk and checked, ready to restore any number of times.
pub struct LoadedSnapshot {
    state: MachineState,
    memory_path: PathBuf,
    memory_file: std::fs::File,
}

pub const SNAPSHOT_STATE_FILE: &str = "vm.state";
pub const SNAPSHOT_MEMORY_FILE: &str = "vm.mem";

impl LoadedSnapshot {
    /// Reads `dir/vm.state` (magic, version, checksum, host CPU) and checks `dir/vm.mem` exists.
    /// The directory may have been moved since it was written (disk copies are found in it).
    pub fn load(dir: &Path) -> Result<LoadedSnapshot> {
        let mut state = snapshot::load_state(&dir.join(SNAPSHOT_STATE_FILE))?;
        // The snapshot's own disk copies are named relative to its directory (`validate` made
        // sure they are bare file names). Each must be a regular file: a FIFO would hang the
        // copy or the open, a device would be handed to the guest.
        for disk in &mut state.config.block_devices {
            if disk.path.is_relative() {
                disk.path = dir.join(&disk.path);
            }
            snapshot::open_snapshot_file(&disk.path)?;
        }
        let memory_path = dir.join(SNAPSHOT_MEMORY_FILE);
        let io = |source| Error::SnapshotIo { path: memory_path.clone(), source };
        let memory_file = snapshot::open_snapshot_file(&memory_path)?;
        let len = memory_file.metadata().map_err(io)?.len();
        // `validate` checked the layout: these sums cannot overflow.
        let end: u64 = state.memory.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
        let needed = end + snapshot::memory::TRAILER_LEN;
        if len != needed {
            return Err(Error::SnapshotCorrupt {
                path: memory_path,
                reason: format!("memory file is {len} bytes, the state says {needed} (guest RAM + trailer)"),
            });
        }
        snapshot::memory::check_id(&memory_file, end, state.memory_id, &memory_path)?;
        Ok(LoadedSnapshot { state, memory_path, memory_file })
    }

    /// The configuration the snapshot was taken with.
    pub fn config(&self) -> &VmConfig {
        &self.state.config
    }

    /// An empty VM shaped for this snapshot, to restore into later (see `VmShell`).
    pub fn shell(&self) -> Result<VmShell> {
        VmShell::build(&self.state.config, false)
    }
}

/// A VM with its memory slots, irqchip, PIT and vCPUs created but nothing loaded: the slow,
/// snapshot-independent part of building a VM, done ahead of time (`RestorePool`). Its RAM is
/// reserved, untouched anonymous memory that a restore maps the snapshot's memory file over.
pub struct VmShell {
    vm: vm::Vm,
    memory: GuestRam,
    vcpus: Vec<Vcpu>,
    memory_mib: u32,
    track_dirty: bool,
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
        let memory = memory::create(memory_mib)?;
        let vm = vm::Vm::new(kvm, &memory, config.track_dirty_pages)?;
        let vcpus = if boot {
            let cpuid = supported_cpuid(kvm)?;
            (0..vcpus).map(|i| Vcpu::new(vm.fd(), i, vcpus, cpuid)).collect::<Result<Vec<_>>>()?
        } else {
            (0..vcpus).map(|i| Vcpu::new_bare(vm.fd(), i)).collect::<Result<Vec<_>>>()?
        };
        Ok(VmShell { vm, memory, vcpus, memory_mib, track_dirty: config.track_dirty_pages })
    }
}

/// What the restored VM may differ in from the snapshotted one.
#[derive(Default)]
pub struct RestoreOptions {
    /// Disk images to use instead of the snapshot's (e.g. per-clone copies), by index.
    pub block_devices: Option<Vec<BlockDeviceConfig>>,
    /// The network device's MAC and policy instead of the snapshot's (a clone's own forwarded
    /// ports); `E_CONFIG` when the snapshot has no network device.
    pub network: Option<NetworkConfig>,
}

/// A running (or ended) VM. Dropping it kills the VM.
pub struct Vm {
    lifecycle: Arc<Lifecycle>,
    machine: Option<Arc<Machine>>,
    host_ends: Mutex<HostEnds>,
    /// The network device's policy (shared with it), when the VM has one.
    egress: Option<LivePolicy>,
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

fn msr_indices(kvm: &Kvm) -> Result<&'static [u32]> {
    static MSRS: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(m) = MSRS.get() {
        return Ok(m);
    }
    let m = vcpu_state::msrs_to_save(kvm)?;
    Ok(MSRS.get_or_init(|| m))
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
        Self::launch(shell.vm, a, shell.vcpus, config.clone(), start_ns, None)
    }

    /// Builds a VM from a loaded snapshot and runs it from where the snapshot was taken.
    /// Guest memory maps the snapshot's memory file privately: nothing is copied up front.
    pub fn restore(snapshot: &LoadedSnapshot, console: Box<dyn Write + Send>, options: RestoreOptions) -> Result<Vm> {
        let start_ns = monotonic_ns();
        Self::restore_into(snapshot.shell()?, snapshot, console, options, start_ns)
    }

    /// `restore` into a shell made earlier (`LoadedSnapshot::shell`): the fast path.
    pub fn restore_in(shell: VmShell, snapshot: &LoadedSnapshot, console: Box<dyn Write + Send>, options: RestoreOptions) -> Result<Vm> {
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
            // A run directory: swept with the sandbox's if this process dies before its Drop.
            let dir = RunDir::create("clone").map_err(|source| Error::SnapshotIo { path: std::env::temp_dir(), source })?;
            for (i, disk) in config.block_devices.iter_mut().enumerate().filter(|(_, d)| !d.read_only) {
                let copy = dir.path().join(format!("disk{i}.img"));
                snapshot::disk::clone_file(&disk.path, &copy).map_err(|source| Error::SnapshotIo { path: copy.clone(), source })?;
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
                return Err(Error::Config("the snapshot has no network device: a network cannot be given to its clone".into()));
            }
            config.network = Some(network);
        }
        if shell.memory_mib != config.memory_mib
            || shell.vcpus.len() != usize::from(config.vcpus)
            || shell.track_dirty != config.track_dirty_pages
        {
            return Err(Error::Config("the VM shell was made for a different memory size, vCPU count or dirty tracking".into()));
        }
        if state.vcpus.len() != usize::from(config.vcpus) {
            return Err(Error::SnapshotCorrupt { path: snapshot.memory_path.clone(), reason: "vCPU count mismatch".into() });
        }
        snapshot::memory::map_over(&shell.memory, &snapshot.memory_file, &snapshot.memory_path, &state.memory)?;
        let states = DeviceStates { serial: &state.serial, virtio: &state.virtio };
        let a = assemble(&shell.vm, &config, shell.memory, console, Some(states))?;
        vm_state::restore(shell.vm.fd(), &state.vm)?;
        for (vcpu, s) in shell.vcpus.iter().zip(&state.vcpus) {
            vcpu_state::restore(&lock(&vcpu.fd()), s)?;
        }
        let path = &snapshot.memory_path;
        let dup = || snapshot.memory_file.try_clone().map_err(|source| Error::SnapshotIo { path: path.clone(), source });
        let (backing, base) = (dup()?, dup()?);
        let vm = Self::launch(shell.vm, a, shell.vcpus, config, start_ns, Some(backing))?;
        if let Some(dir) = scratch {
            lock(&vm.machine().scratch).replace(dir);
        }
        // The restored memory is the snapshot's: an incremental snapshot can build on it.
        lock(&vm.machine().base_memory).replace(base);
        Ok(vm)
    }

    /// Starts the event loop and one thread per vCPU. `backing_memory`: the snapshot memory
    /// file a restored VM's RAM is mapped from.
    fn launch(
        vm: vm::Vm,
        a: Assembly,
        vcpus: Vec<Vcpu>,
        config: VmConfig,
        start_ns: u64,
        backing_memory: Option<File>,
    ) -> Result<Vm> {
        let seccomp = ThreadFilter::for_vmm_threads().map_err(|e| Error::Thread(std::io::Error::other(e)))?;
        let loop_lifecycle = a.lifecycle.clone();
        let event_loop = a
            .event_loop
            .spawn_if_needed("mc-events".into(), seccomp, Box::new(move |reason| loop_lifecycle.request_exit(reason)))
            .map_err(Error::Thread)?;
        let machine = Arc::new(Machine {
            vcpus: vcpus.iter().map(Vcpu::fd).collect(),
            vm,
            _event_loop: event_loop,
            serial: a.serial,
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
            keep_alive: Box::new(machine.clone()),
            seccomp,
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
                    return Err(Error::Thread(e));
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

    fn machine(&self) -> &Machine {
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

    /// Writes `dir/vm.state` and `dir/vm.mem` (each atomically) and leaves the VM as it was
    /// (a running VM is paused for the duration). Returns the memory bytes written.
    ///
    /// `incremental` (needs `track_dirty_pages` and an earlier snapshot of, or restore into,
    /// this VM): the memory file starts as a copy of the earlier one and only the pages written
    /// since are written; the result is a complete, mappable snapshot all the same.
    pub fn snapshot(&self, dir: &Path, incremental: bool) -> Result<u64> {
        let _held = self.hold("snapshotted")?;
        self.snapshot_paused(dir, incremental)
    }

    /// Parks every vCPU until the guard drops, apart from `pause`/`resume` (so a `resume`
    /// meanwhile, or a halt check beside a snapshot, cannot let them run mid-read).
    fn hold(&self, what: &str) -> Result<Held<'_>> {
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

    fn snapshot_paused(&self, dir: &Path, incremental: bool) -> Result<u64> {
        let m = self.machine();
        let kvm = kvm()?;
        std::fs::create_dir_all(dir).map_err(|source| Error::SnapshotIo { path: dir.to_owned(), source })?;
        // Two VMs of this process snapshotting into one directory would share temporary file
        // names (`<file>.tmp-<pid>`): one at a time per directory.
        let _dir_lock = DirLock::take(dir);
        let base = lock(&m.base_memory)
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(|source| Error::SnapshotIo { path: dir.to_owned(), source })?;
        if incremental && (base.is_none() || !m.config.track_dirty_pages) {
            return Err(Error::VmState(
                "an incremental snapshot needs track_dirty_pages and an earlier snapshot of this VM".into(),
            ));
        }
        // Hold every device lock across state and memory, so the event thread cannot move a
        // queue between the two.
        let transports: Vec<_> = m.virtio.iter().map(|t| lock(t)).collect();
        let vm = vm_state::save(m.vm.fd())?;
        let indices = msr_indices(kvm)?;
        let vcpus = m.vcpus.iter().map(|fd| vcpu_state::save(&lock(fd), indices)).collect::<Result<Vec<_>>>()?;
        let serial = lock(&m.serial).state();
        let virtio = transports.iter().map(|t| t.state()).collect();
        // The pages written since the base (which a full snapshot replaces, so that the next
        // incremental one starts from here): the logs are read (and cleared) now; if the
        // snapshot fails they are carried over to the next one.
        let dirty = if m.config.track_dirty_pages {
            let mut dirty = m.vm.take_dirty_log()?;
            or_into(&mut dirty, &snapshot::memory::take_vmm_dirty(&m.memory));
            or_into(&mut dirty, &std::mem::take(&mut *lock(&m.carried_dirty)));
            Some(dirty)
        } else {
            None
        };
        let base = base.filter(|_| incremental);
        let result = self.write_snapshot(dir, base, dirty.as_deref(), vm, vcpus, serial, virtio);
        if let (Err(_), Some(dirty)) = (&result, dirty) {
            or_into(&mut lock(&m.carried_dirty), &dirty);
        }
        result
    }

    /// Writes every file of the snapshot beside its final name, then renames them into place,
    /// the state file last: a failure before that leaves the previous snapshot in `dir` whole.
    #[allow(clippy::too_many_arguments)]
    fn write_snapshot(
        &self,
        dir: &Path,
        incremental_base: Option<File>,
        dirty: Option<&[Vec<u64>]>,
        vm: vm_state::VmState,
        vcpus: Vec<vcpu_state::VcpuState>,
        serial: SerialState,
        virtio: Vec<TransportState>,
    ) -> Result<u64> {
        let m = self.machine();
        let memory_path = dir.join(SNAPSHOT_MEMORY_FILE);
        let io = |source| Error::SnapshotIo { path: memory_path.clone(), source };
        let mut memory = snapshot::Staged::create(&memory_path)?;
        let written = match incremental_base {
            Some(base) => {
                // Start from the earlier memory (instant with reflinks), then overwrite.
                snapshot::disk::copy_into(&base, memory.file()).map_err(io)?;
                let dirty = dirty.expect("incremental snapshots track dirty pages");
                snapshot::memory::dump_dirty(&m.memory, dirty, memory.file(), &memory_path)?
            }
            None => {
                // A restored VM's pages that it has not written live in the file its RAM is
                // mapped from, whether or not they are resident here: start from a copy of it.
                if let Some(backing) = &m.backing_memory {
                    snapshot::disk::copy_into(backing, memory.file()).map_err(io)?;
                }
                snapshot::memory::dump(&m.memory, memory.file(), &memory_path)?;
                memory.file().metadata().map(|md| md.blocks() * 512).unwrap_or(0)
            }
        };
        let layout = snapshot::memory::layout(&m.memory);
        let memory_id = snapshot::memory::new_memory_id();
        let end = layout.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
        snapshot::memory::write_id(memory.file(), end, memory_id, &memory_path)?;
        memory.sync()?;
        // Writable disks are copied (copy-on-write where possible) while the VM cannot write,
        // and named relative to the snapshot directory (`load` resolves them), so that the
        // directory can be moved or copied whole. Read-only disks stay where they are.
        let mut config = m.config.clone();
        // The policy in force now, which may have changed since the start.
        if let (Some(net), Some(live)) = (config.network.as_mut(), &self.egress) {
            net.egress = live.get();
        }
        let mut disks = Vec::new();
        let mut writable = 0;
        for disk in config.block_devices.iter_mut() {
            if disk.read_only {
                disk.path = std::path::absolute(&disk.path)
                    .map_err(|source| Error::SnapshotIo { path: disk.path.clone(), source })?;
                continue;
            }
            let name = format!("disk{writable}.img");
            writable += 1;
            let copy = dir.join(&name);
            let mut staged = snapshot::Staged::create(&copy)?;
            snapshot::disk::clone_into(&disk.path, staged.file())
                .map_err(|source| Error::SnapshotIo { path: copy.clone(), source })?;
            staged.sync()?;
            disk.path = PathBuf::from(name);
            disks.push(staged);
        }
        let state = MachineState {
            config,
            cpu: snapshot::CpuFingerprint::of_this_host(),
            memory: layout,
            memory_id,
            vm,
            vcpus,
            serial,
            virtio,
        };
        let state = snapshot::stage_state(&dir.join(SNAPSHOT_STATE_FILE), &state)?;
        let memory = memory.commit()?;
        for disk in disks {
            disk.commit()?;
        }
        state.commit()?;
        lock(&m.base_memory).replace(memory);
        Ok(written)
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
        let live = self.egress.as_ref().ok_or_else(|| Error::Config("the VM has no network device: its policy cannot be set".into()))?;
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
