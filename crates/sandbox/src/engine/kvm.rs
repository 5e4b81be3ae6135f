//! The built-in engine: our VMM (`crates/vmm`) in this process.
//!
//! - The root disk is virtio-blk `/dev/vda`, the control channel the VMM's virtio-console port
//!   named `agent` (`VmConfig::control_channel`), the serial console goes to the console sink.
//! - Command line: `vmm::DEFAULT_CMDLINE` (serial console, `reboot=k`: the VMM ends the VM on the
//!   i8042 reset) + [`super::GUEST_CMDLINE`] (root disk, `no_timer_check`) + the spec's extras.
//! - **Writable root, never shared:** each VM gets its own copy of the cached image in a per-VM
//!   directory (`$TMPDIR/microcell-<pid>-<n>-kvm/rootfs.img`), removed when the VM is dropped.
//!   The copy is a reflink where the file system has them (btrfs, XFS: instant, blocks shared
//!   until written) and otherwise a sparse copy of the data extents only (the 64 MiB image holds
//!   ~3.5 MB of data: a few milliseconds). The QEMU engine does the same: the guest sees an
//!   ordinary writable disk and the image stays as built. (A read-only root would
//!   need the agent to set up an overlay; a block-level copy-on-write device in the VMM would
//!   remove the copy altogether — both later, if the copy ever shows in profiles.)
//! - Network (`spec.net`): the VMM's virtio-net device, its frame stream handed to a passt
//!   process (`passt.rs`): the same NAT, gateway, DNS and forwarded ports as on the qemu engine;
//!   the device applies the egress policy itself.
//! - Linux boots here only on hardware KVM; [`super::select`] refuses `kvm` elsewhere, and the
//!   VMM itself refuses a Linux kernel on such hosts (`E_UNSUPPORTED_GUEST`). Freestanding
//!   guests (crates/testguest) run everywhere KVM does, which the tests use for the plumbing.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{
    clone_image, passt, BootSpec, Engine, EngineKind, ExitSlot, RunDir, RunningVm, Tail, TailWriter,
    CONSOLE_TAIL_BYTES, CONSOLE_TAIL_LINES,
};
use crate::console::{self, ConsoleHandle, ConsoleOptions, ConsoleReader, ConsoleStats};
use crate::error::{Result, SandboxError};

/// The built-in VMM as an engine.
#[derive(Debug, Clone, Default)]
pub struct KvmEngine {
    _private: (),
}

impl KvmEngine {
    pub fn new() -> KvmEngine {
        KvmEngine::default()
    }

    /// The kernel command line for a spec.
    pub fn cmdline(spec: &BootSpec) -> String {
        super::guest_cmdline(vmm::DEFAULT_CMDLINE, spec)
    }
}

impl Engine for KvmEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kvm
    }

    fn describe(&self) -> String {
        format!("built-in VMM ({:?} KVM)", vmm::host::cached().kvm_flavour).to_lowercase()
    }

    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn RunningVm>> {
        refuse_missing_devices(spec)?;
        let dir = run_dir()?;
        let disk = dir.path().join("rootfs.img");
        let t = std::time::Instant::now();
        let reflink = clone_image(&spec.rootfs, &disk).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && !spec.rootfs.exists() {
                SandboxError::GuestImageMissing {
                    what: "root disk",
                    path: spec.rootfs.clone(),
                    hint: "give an existing ext4 image, or run scripts/setup.sh to build the default one".into(),
                }
            } else {
                SandboxError::HostIo {
                    what: format!("cannot copy the root disk {} to {}", spec.rootfs.display(), disk.display()),
                    source,
                }
            }
        })?;
        tracing::debug!(reflink, us = t.elapsed().as_micros() as u64, "root disk cloned");

        let config = vmm::VmConfig {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: None,
            cmdline: Self::cmdline(spec),
            block_devices: vec![vmm::BlockDeviceConfig { path: disk, read_only: false }],
            control_channel: true,
            network: spec.net.as_ref().map(passt::network_config),
            allow_unsupported_host: false,
            ..Default::default()
        };
        launch(spec, dir, |console| vmm::Vm::start(&config, console))
    }

    fn restore(&self, dir: &Path, spec: &BootSpec) -> Result<Box<dyn RunningVm>> {
        refuse_missing_devices(spec)?;
        let snapshot = vmm::LoadedSnapshot::load(dir)?;
        // The VMM gives the clone its own copy of the snapshot's root disk; the run directory
        // holds what else the clone needs on the host (passt's pid file).
        // The network's policy follows the spec (a clone may forward ports of its own).
        let options =
            vmm::RestoreOptions { network: spec.net.as_ref().map(passt::network_config), ..Default::default() };
        launch(spec, run_dir()?, |console| vmm::Vm::restore(&snapshot, console, options))
    }
}

/// What a guest asks for that the built-in VMM has no device for (virtio-9p for volumes), said
/// the same in its refusal and in `auto`'s reason; `None` when it has all it needs.
pub fn missing_devices(shares: bool) -> Option<String> {
    shares.then(|| "volumes were asked for and the built-in VMM has no shared-directory device (virtio-9p) yet".into())
}

fn run_dir() -> Result<RunDir> {
    RunDir::create("kvm").map_err(|source| SandboxError::HostIo {
        what: format!("cannot create a per-VM directory in {}", std::env::temp_dir().display()),
        source,
    })
}

fn refuse_missing_devices(spec: &BootSpec) -> Result<()> {
    match missing_devices(!spec.shares.is_empty()) {
        Some(reason) => Err(SandboxError::EngineUnavailable { engine: EngineKind::Kvm.name(), reason }),
        None => Ok(()),
    }
}

/// Wires a VM the VMM starts (`start` gets the console writer) to the console sink, the exit
/// slot, a watcher thread and, with a network, passt.
fn launch(
    spec: &BootSpec,
    dir: RunDir,
    start: impl FnOnce(Box<dyn std::io::Write + Send>) -> vmm::Result<vmm::Vm>,
) -> Result<Box<dyn RunningVm>> {
    let (sink, console) =
        console::channel(&ConsoleOptions { file: spec.console_file.clone(), queue_capacity: spec.console_queue_bytes })
            .map_err(|source| SandboxError::ConsoleOutput {
                path: spec.console_file.clone().unwrap_or_default(),
                source,
            })?;
    let reader = console.reader();
    let tail = Tail::new(CONSOLE_TAIL_BYTES);
    let vm = match start(Box::new(TailWriter { inner: sink, tail: tail.clone() })) {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            console.close();
            return Err(e.into());
        }
    };
    let network = match attach_network(spec, &vm, dir.path()) {
        Ok(network) => network,
        Err(e) => {
            vm.kill();
            let _ = vm.wait();
            console.close();
            return Err(e);
        }
    };
    let channel = vm.take_channel();
    let exit = Arc::new(ExitSlot::default());
    let watcher = {
        let (vm, exit, console) = (vm.clone(), exit.clone(), console.clone());
        std::thread::Builder::new().name("mc-kvm-wait".into()).spawn(move || {
            let reason = vm.wait();
            console.close();
            exit.set(reason.into());
            // Tearing a VM down takes milliseconds: here, not on the caller's thread.
            drop(vm);
        })
    };
    if let Err(e) = watcher {
        vm.kill();
        let _ = vm.wait();
        console.close();
        return Err(SandboxError::Thread { what: "VM watcher", source: e });
    }
    Ok(Box::new(KvmVm { vm, exit, channel: Mutex::new(channel), console, reader, tail, network, _dir: dir }))
}

/// Starts passt on the VM's network socket when the spec has a network.
fn attach_network(spec: &BootSpec, vm: &vmm::Vm, run_dir: &Path) -> Result<Option<passt::Passt>> {
    match (&spec.net, vm.take_network()) {
        (Some(net), Some(socket)) => passt::Passt::start(socket, net, run_dir, EngineKind::Kvm).map(Some),
        (None, None) => Ok(None),
        _ => Err(SandboxError::Snapshot(
            "the snapshot and the configuration disagree on the network: restore with the network the VM was snapshotted with".into(),
        )),
    }
}

/// A VM on the built-in VMM.
struct KvmVm {
    vm: Arc<vmm::Vm>,
    exit: Arc<ExitSlot>,
    channel: Mutex<Option<UnixStream>>,
    console: ConsoleHandle,
    reader: Option<ConsoleReader>,
    tail: Tail,
    /// passt, killed once the VM is (it also exits when its socket closes).
    network: Option<passt::Passt>,
    /// Dropped last: the root disk copy goes when the VM does (a restored VM's copy is the
    /// VMM's own).
    _dir: RunDir,
}

impl RunningVm for KvmVm {
    fn engine(&self) -> EngineKind {
        EngineKind::Kvm
    }

    fn snapshot(&self, dir: &Path) -> Result<()> {
        // The VMM pauses, writes memory + state, copies the writable root disk, resumes.
        self.vm.snapshot(dir, false)?;
        Ok(())
    }

    fn pause(&self) -> Result<()> {
        Ok(self.vm.pause()?)
    }

    fn resume(&self) -> Result<()> {
        if self.try_wait().is_some() {
            return Err(super::ended_error("resumed"));
        }
        self.vm.resume();
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    fn set_egress(&self, policy: vmm::EgressPolicy) -> Result<()> {
        if self.network.is_none() {
            return Err(super::no_network());
        }
        Ok(self.vm.set_egress(policy)?)
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn take_channel(&self) -> Option<UnixStream> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn exit_slot(&self) -> &Arc<ExitSlot> {
        &self.exit
    }

    fn kill(&self) {
        self.vm.kill();
    }

    fn halted(&self) -> Option<String> {
        self.vm.is_halted().then(|| {
            "the guest halted every vCPU with interrupts off (halt -f or poweroff -f: the machine has no power-off device); nothing can wake it".into()
        })
    }

    fn console(&self) -> Option<ConsoleReader> {
        self.reader.clone()
    }

    fn console_stats(&self) -> ConsoleStats {
        self.console.stats()
    }

    fn console_tail(&self) -> String {
        self.tail.text(CONSOLE_TAIL_LINES)
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if self.exit.get().is_none() {
            self.vm.kill();
        }
        // The vCPU threads stop within microseconds of the kick; the VM's resources are then
        // released on the watcher thread. The root disk copy can go right away: an open file
        // stays readable after its name is removed.
        let _ = self.exit.wait_timeout(crate::limits::KILL_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_the_vmm_default_plus_root_and_extra() {
        let mut spec = BootSpec::new("/k", "/r");
        assert_eq!(KvmEngine::cmdline(&spec), format!("{} root=/dev/vda rw no_timer_check", vmm::DEFAULT_CMDLINE));
        spec.extra_cmdline = "init=/bin/sh".into();
        assert_eq!(
            KvmEngine::cmdline(&spec),
            format!("{} root=/dev/vda rw no_timer_check init=/bin/sh", vmm::DEFAULT_CMDLINE)
        );
    }
}
