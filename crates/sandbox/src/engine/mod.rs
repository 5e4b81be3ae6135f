//! Engines: what runs the guest (kernel + root disk + agent as PID 1).
//!
//! One interface, two implementations:
//! - [`kvm::KvmEngine`]: the built-in VMM (`crates/vmm`), in this process. Needs a host where a
//!   stock Linux kernel boots on KVM (hardware KVM; `vmm::host::cached().can_boot_linux`).
//! - [`qemu::QemuEngine`]: `qemu-system-x86_64 -M microvm` as a child process, with KVM
//!   acceleration on hardware-KVM hosts and TCG (software emulation) elsewhere.
//!
//! Either way a booted VM is a [`RunningVm`]: the control channel as one `UnixStream` (the
//! virtio-console port named `agent`), the guest console (a file and/or a queue, plus a tail kept
//! for error messages), `wait`, `try_wait`, `kill`. [`select`] implements `engine: auto`.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::console::{ConsoleReader, ConsoleStats};
use crate::error::{Result, SandboxError};

pub mod kvm;
pub mod passt;
pub mod qemu;
mod qmp;
mod spawn;

/// The `engine` option: which engine boots the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// `kvm` where the built-in VMM can boot Linux (hardware KVM), else `qemu`.
    #[default]
    Auto,
    Kvm,
    Qemu,
}

/// An engine that actually runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The built-in VMM.
    Kvm,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Kvm => "kvm",
            EngineKind::Qemu => "qemu",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine chosen for a sandbox, and why (shown in the sandbox info and logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineSelection {
    pub kind: EngineKind,
    pub reason: String,
}

/// Resolves `engine: auto | kvm | qemu` on this host ([`vmm::host::cached`]).
pub fn select(choice: EngineChoice) -> Result<EngineSelection> {
    select_for(choice, vmm::host::cached())
}

/// [`select`] for a guest that needs devices only `qemu` has (`needs`: what and why, e.g. a
/// network): `auto` then picks `qemu`.
pub fn select_for_devices(choice: EngineChoice, needs: Option<String>) -> Result<EngineSelection> {
    Ok(with_devices(choice, needs, select(choice)?))
}

fn with_devices(choice: EngineChoice, needs: Option<String>, selection: EngineSelection) -> EngineSelection {
    match (choice, needs, selection.kind) {
        (EngineChoice::Auto, Some(why), EngineKind::Kvm) => {
            EngineSelection { kind: EngineKind::Qemu, reason: format!("auto: {why}") }
        }
        _ => selection,
    }
}

/// [`select`] for a given host description.
pub fn select_for(choice: EngineChoice, host: &vmm::host::HostInfo) -> Result<EngineSelection> {
    let selection = match choice {
        EngineChoice::Kvm if !host.kvm_device => {
            return Err(SandboxError::NoKvm { reason: "is missing or cannot be opened by this process".into() })
        }
        EngineChoice::Kvm if !host.can_boot_linux => {
            return Err(SandboxError::EngineUnavailable { engine: EngineKind::Kvm.name(), reason: host.reason.clone() })
        }
        EngineChoice::Kvm => EngineSelection { kind: EngineKind::Kvm, reason: format!("asked for; {}", host.reason) },
        EngineChoice::Qemu => EngineSelection { kind: EngineKind::Qemu, reason: "asked for".into() },
        EngineChoice::Auto if host.can_boot_linux => {
            EngineSelection { kind: EngineKind::Kvm, reason: format!("auto: {}", host.reason) }
        }
        EngineChoice::Auto => EngineSelection {
            kind: EngineKind::Qemu,
            reason: format!("auto: the built-in VMM cannot boot Linux here ({})", host.reason),
        },
    };
    Ok(selection)
}

/// What the engines are on this host: what `engine: auto` picks and why, and whether the QEMU
/// engine can run (for `hostInfo()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineReport {
    /// The engine `auto` picks here.
    pub auto_engine: EngineKind,
    /// Why (`auto: ...`).
    pub auto_engine_reason: String,
    /// The QEMU engine in one line (binary, accelerator and why), `None` when it cannot run.
    pub qemu: Option<String>,
    /// Why the QEMU engine cannot run (QEMU not found), `None` when it can.
    pub qemu_unavailable: Option<String>,
}

/// [`EngineReport`] for this host ([`vmm::host::cached`], QEMU looked up now).
pub fn report() -> EngineReport {
    let auto = select(EngineChoice::Auto).unwrap_or_else(|e| EngineSelection {
        // `auto` never fails today; should it, say so rather than guess.
        kind: EngineKind::Qemu,
        reason: format!("auto: {e}"),
    });
    let (qemu, qemu_unavailable) = match qemu::QemuEngine::locate() {
        Ok(q) => (Some(q.describe()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    EngineReport { auto_engine: auto.kind, auto_engine_reason: auto.reason, qemu, qemu_unavailable }
}

/// Makes the engine of that kind (for QEMU: finds the binary, picks the accelerator).
pub fn engine(kind: EngineKind) -> Result<Box<dyn Engine>> {
    Ok(match kind {
        EngineKind::Kvm => Box::new(kvm::KvmEngine::new()),
        EngineKind::Qemu => Box::new(qemu::QemuEngine::locate()?),
    })
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// The guest kernel (ELF vmlinux with a PVH note; QEMU and the VMM both boot it).
    pub kernel: PathBuf,
    /// The raw root disk image (ext4), the guest's `/dev/vda`. Never written: each VM writes to
    /// its own throwaway copy-on-write clone.
    pub rootfs: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// Appended to the engine's kernel command line (last one wins for repeated options).
    pub extra_cmdline: String,
    /// Host file that receives the console (created or truncated).
    pub console_file: Option<PathBuf>,
    /// Keep up to this many console bytes for [`RunningVm::console`] to read.
    pub console_queue_bytes: Option<usize>,
    /// A network interface (the guest's `eth0`), or none.
    pub net: Option<NetSpec>,
    /// Host directories shared into the guest (virtio-9p), each under its mount tag.
    pub shares: Vec<Share>,
}

/// A host directory the guest mounts (`mount -t 9p TAG`); the guest side is on the kernel
/// command line (`microcell.volumes=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host: PathBuf,
    pub read_only: bool,
}

/// The guest's network: user-mode NAT (passt) behind the engine (guest `10.0.2.15/24`, the
/// host's loopback reachable as `10.0.2.2`, DNS at `10.0.2.3`), with the egress policy between.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetSpec {
    /// Whether the guest may open connections out (to the host and beyond); forwarded ports
    /// work either way.
    pub outbound: bool,
    /// Ports of the host's loopback forwarded to the guest.
    pub ports: Vec<PortForward>,
    /// With `outbound`: networks the guest may not reach, except those in `allow`.
    pub deny: Vec<vmm::Ipv4Net>,
    pub allow: Vec<vmm::Ipv4Net>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
    /// UDP rather than TCP.
    pub udp: bool,
}

/// What both engines put on the guest kernel's command line after their machine's own
/// arguments: the root disk, and `no_timer_check`, which skips the boot-time IO-APIC timer
/// self-test (a 10 ms busy-wait that a loaded TCG or nested host can fail with `IO-APIC + timer
/// doesn't work!`; virtual timers do not need it).
pub const GUEST_CMDLINE: &str = "root=/dev/vda rw no_timer_check";

/// A guest command line: the machine's arguments, [`GUEST_CMDLINE`], then the spec's extras.
pub fn guest_cmdline(machine_args: &str, spec: &BootSpec) -> String {
    let mut s = format!("{machine_args} {GUEST_CMDLINE}");
    let extra = spec.extra_cmdline.trim();
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// The guest side of [`NetSpec`] (slirp's defaults): address/prefix, gateway, DNS server.
pub const GUEST_NET: (&str, &str, &str) = ("10.0.2.15/24", "10.0.2.2", "10.0.2.3");

impl BootSpec {
    /// A spec with 512 MiB, 1 vCPU, no extra command line and no console file.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> BootSpec {
        BootSpec {
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            memory_mib: 512,
            vcpus: 1,
            extra_cmdline: String::new(),
            console_file: None,
            console_queue_bytes: None,
            net: None,
            shares: Vec::new(),
        }
    }
}

/// Boots guests.
pub trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// One line for logs and the sandbox info, e.g. `/usr/bin/qemu-system-x86_64, accel tcg`.
    fn describe(&self) -> String;
    /// Starts a VM; returns as soon as it runs (not when the agent is ready).
    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn RunningVm>>;
    /// Starts a VM from a snapshot directory that [`RunningVm::snapshot`] of this engine wrote;
    /// `spec` must describe the same VM (memory, vCPUs, kernel); its console options apply.
    fn restore(&self, dir: &Path, spec: &BootSpec) -> Result<Box<dyn RunningVm>>;
}

/// The error of a network change for a VM made without a network.
pub(crate) fn no_network() -> crate::error::SandboxError {
    vmm::Error::VmState("the VM has no network: give it one when it is made (network: {...})".into()).into()
}

/// The error of a pause or resume of a VM that has ended.
pub(crate) fn ended_error(what: &str) -> crate::error::SandboxError {
    vmm::Error::VmState(format!("the VM has ended: it cannot be {what}")).into()
}

/// A VM an engine started. Dropping it kills the VM (and, for QEMU, reaps the process) and
/// removes its per-VM files.
pub trait RunningVm: Send + Sync {
    fn engine(&self) -> EngineKind;
    /// Writes the VM's memory, device and disk state into `dir` (which exists) and lets the VM
    /// run on; [`Engine::restore`] starts copies of it.
    fn snapshot(&self, dir: &Path) -> Result<()>;
    /// Stops the guest's vCPUs: it keeps its memory and devices and uses no CPU (a paused VM
    /// can be snapshotted, and stays paused). `E_VM_STATE` once it has ended.
    fn pause(&self) -> Result<()>;
    /// Lets a paused VM run again; nothing to do when it is not paused.
    fn resume(&self) -> Result<()>;
    fn is_paused(&self) -> bool;
    /// Replaces the egress policy of the VM's network, from the next frame the guest sends.
    /// `E_VM_STATE` for a VM without a network.
    fn set_egress(&self, policy: vmm::EgressPolicy) -> Result<()>;
    /// The QEMU process id; `None` for the in-process VMM.
    fn pid(&self) -> Option<u32>;
    /// The host end of the control channel (once; later calls return `None`).
    fn take_channel(&self) -> Option<UnixStream>;
    /// Where the engine publishes how the VM ended; the waits below read it.
    fn exit_slot(&self) -> &Arc<ExitSlot>;
    /// How the VM ended, once it has (and its console is complete).
    fn try_wait(&self) -> Option<VmExit> {
        self.exit_slot().get()
    }
    /// Blocks until the VM has ended.
    fn wait(&self) -> VmExit {
        self.exit_slot().wait()
    }
    /// [`RunningVm::wait`] with a limit; `None` when it still runs.
    fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.exit_slot().wait_timeout(timeout)
    }
    /// Resolves when the VM has ended (after its console is complete); holds no thread.
    fn wait_async(&self) -> ExitFuture {
        self.exit_slot().future()
    }
    /// Ends the VM at once (SIGKILL to QEMU's process group; the VMM's kill). Idempotent.
    fn kill(&self);
    /// [`RunningVm::kill`] for a reason the host found (the agent watchdog): `exit` is
    /// published instead of [`VmExit::Killed`], still after the console is complete.
    fn kill_because(&self, exit: VmExit) {
        self.exit_slot().set_cause(exit);
        self.kill();
    }
    /// Whether the guest has halted for good: every vCPU in HLT with interrupts off (what
    /// `halt -f` / `poweroff -f` leave on a machine with no power-off device), said in words;
    /// `None` when it has not, or when the engine cannot tell. Asked only when the agent is
    /// silent (it may take the engine's monitor).
    fn halted(&self) -> Option<String> {
        None
    }
    /// The reader of the console queue, when the spec asked for one.
    fn console(&self) -> Option<ConsoleReader>;
    fn console_stats(&self) -> ConsoleStats;
    /// The last lines of the console (and of QEMU's stderr), for error messages.
    fn console_tail(&self) -> String;
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum VmExit {
    /// The guest reset the machine: the agent's poweroff, a reboot, or a kernel panic with
    /// `panic=1` (QEMU exited 0 under `-no-reboot`; the VMM saw the reset).
    GuestReset,
    /// The host stopped the VM (the VMM's `stop`).
    Stopped,
    /// The host killed it.
    Killed,
    /// The engine or the guest failed: `code` is stable (`E_QEMU_EXIT`, `E_GUEST_TRIPLE_FAULT`,
    /// `E_KVM_INTERNAL_ERROR`, ...).
    Crashed { code: String, message: String },
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::GuestReset => f.write_str("the guest reset the machine (poweroff, reboot or kernel panic)"),
            VmExit::Stopped => f.write_str("stopped by the host"),
            VmExit::Killed => f.write_str("killed by the host"),
            VmExit::Crashed { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

impl From<vmm::ExitReason> for VmExit {
    fn from(r: vmm::ExitReason) -> VmExit {
        match r {
            vmm::ExitReason::Reset => VmExit::GuestReset,
            vmm::ExitReason::Stopped => VmExit::Stopped,
            vmm::ExitReason::Killed => VmExit::Killed,
            vmm::ExitReason::Crashed { code, message } => VmExit::Crashed { code, message },
        }
    }
}

/// Where a VM's end is published: set once, waited on by any number of threads and futures.
#[derive(Default)]
pub struct ExitSlot {
    state: Mutex<ExitState>,
    ended: Condvar,
}

#[derive(Default)]
struct ExitState {
    exit: Option<VmExit>,
    /// Why the host is killing the VM ([`RunningVm::kill_because`]): published in place of
    /// the engine's `Killed`.
    cause: Option<VmExit>,
    /// Futures waiting for the end ([`ExitFuture`]), woken by `set`.
    wakers: Vec<Waker>,
}

impl ExitSlot {
    fn lock(&self) -> MutexGuard<'_, ExitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, exit: VmExit) {
        let wakers = {
            let mut s = self.lock();
            if s.exit.is_none() {
                let cause = s.cause.take();
                s.exit = Some(match (exit, cause) {
                    (VmExit::Killed, Some(cause)) => cause,
                    (exit, _) => exit,
                });
            }
            self.ended.notify_all();
            std::mem::take(&mut s.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Records why the host is about to kill the VM (the first cause wins; nothing once it
    /// has ended).
    pub(crate) fn set_cause(&self, cause: VmExit) {
        let mut s = self.lock();
        if s.exit.is_none() && s.cause.is_none() {
            s.cause = Some(cause);
        }
    }

    pub(crate) fn get(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    pub(crate) fn wait(&self) -> VmExit {
        let mut s = self.lock();
        loop {
            if let Some(x) = &s.exit {
                return x.clone();
            }
            s = self.ended.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(x) = &s.exit {
                return Some(x.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            s = self.ended.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A future of the end: holds no thread while it waits (the engine's thread that
    /// publishes the end wakes it).
    pub(crate) fn future(self: &Arc<Self>) -> ExitFuture {
        ExitFuture { slot: self.clone() }
    }
}

/// Resolves with how a VM ended ([`RunningVm::wait_async`], `Sandbox::wait_async`). It keeps
/// only the VM's exit slot alive, not the VM.
pub struct ExitFuture {
    slot: Arc<ExitSlot>,
}

impl Future for ExitFuture {
    type Output = VmExit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<VmExit> {
        let mut s = self.slot.lock();
        match &s.exit {
            Some(x) => Poll::Ready(x.clone()),
            None => {
                if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    s.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// The last bytes of a byte stream (console, QEMU's stderr), for error messages.
#[derive(Clone)]
pub(crate) struct Tail {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl Tail {
    pub(crate) fn new(capacity: usize) -> Tail {
        Tail { bytes: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))), capacity }
    }

    pub(crate) fn push(&self, buf: &[u8]) {
        let mut q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let buf = &buf[buf.len().saturating_sub(self.capacity)..];
        let over = (q.len() + buf.len()).saturating_sub(self.capacity);
        q.drain(..over);
        q.extend(buf);
    }

    /// The last `lines` lines (lossy UTF-8, control characters but newlines and tabs removed).
    pub(crate) fn text(&self, lines: usize) -> String {
        let q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = q.as_slices();
        let s = String::from_utf8_lossy(&[a, b].concat()).replace("\r\n", "\n");
        let s: String = s.chars().filter(|c| !c.is_control() || *c == '\n' || *c == '\t').collect();
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A `Write` that keeps a [`Tail`] of what passes through it.
pub(crate) struct TailWriter<W: Write> {
    pub(crate) inner: W,
    pub(crate) tail: Tail,
}

impl<W: Write> Write for TailWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tail.push(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Console bytes kept for error messages.
pub(crate) const CONSOLE_TAIL_BYTES: usize = 8 << 10;
/// Console lines shown in error messages.
pub(crate) const CONSOLE_TAIL_LINES: usize = 30;

// One sweep for every per-VM directory of this process, the VMM's own (a clone's disks)
// included: the VMM crate has it.
pub(crate) use vmm::run_dir::RunDir;
pub use vmm::run_dir::{remove_stale_run_dirs, run_dir_prefix};

/// [`clone_image`] to a temporary name beside `dst`, then renamed over it: a failed copy leaves
/// an older `dst` intact.
pub fn clone_image_replacing(src: &Path, dst: &Path) -> io::Result<bool> {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let result = clone_image(src, &tmp).and_then(|reflink| std::fs::rename(&tmp, dst).map(|()| reflink));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Gives `dst` the contents of `src` as cheaply as the file system allows: a reflink
/// (`FICLONE`: btrfs, XFS, bcachefs — instant, shares blocks until written), else a sparse copy
/// of the data extents only (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`). `dst` must not
/// exist. Returns whether it was a reflink.
pub fn clone_image(src: &Path, dst: &Path) -> io::Result<bool> {
    // One copy routine for the whole project: the VMM's (snapshots copy disks with it too).
    vmm::snapshot::disk::clone_new(src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn host(kvm_device: bool, can_boot_linux: bool) -> vmm::host::HostInfo {
        vmm::host::HostInfo {
            kvm_flavour: if !kvm_device {
                vmm::host::KvmFlavour::None
            } else if can_boot_linux {
                vmm::host::KvmFlavour::Hardware
            } else {
                vmm::host::KvmFlavour::Pvm
            },
            cpu_virtualization: None,
            kvm_device,
            api_version: None,
            capabilities: Vec::new(),
            max_vcpus: None,
            can_boot_linux,
            reason: "REASON".into(),
            host_memory_mib: 1024,
            host_cpus: 2,
        }
    }

    #[test]
    fn a_network_moves_auto_to_qemu_and_only_auto() {
        let hw = select_for(EngineChoice::Auto, &host(true, true)).unwrap();
        assert_eq!(hw.kind, EngineKind::Kvm);
        let net = with_devices(EngineChoice::Auto, Some("volumes were asked for".into()), hw.clone());
        assert_eq!(net.kind, EngineKind::Qemu);
        assert!(net.reason.contains("volumes"), "{}", net.reason);
        assert_eq!(with_devices(EngineChoice::Auto, None, hw.clone()).kind, EngineKind::Kvm);
        let asked = select_for(EngineChoice::Kvm, &host(true, true)).unwrap();
        assert_eq!(
            with_devices(EngineChoice::Kvm, Some("x".into()), asked).kind,
            EngineKind::Kvm,
            "asked for: the engine says no at boot"
        );
    }

    #[test]
    fn auto_picks_kvm_only_where_linux_boots_and_says_why() {
        let s = select_for(EngineChoice::Auto, &host(true, true)).unwrap();
        assert_eq!(s.kind, EngineKind::Kvm);
        assert!(s.reason.contains("REASON"));
        for h in [host(true, false), host(false, false)] {
            let s = select_for(EngineChoice::Auto, &h).unwrap();
            assert_eq!(s.kind, EngineKind::Qemu);
            assert!(s.reason.contains("cannot boot Linux") && s.reason.contains("REASON"), "{}", s.reason);
        }
    }

    #[test]
    fn kvm_where_it_cannot_boot_linux_is_a_coded_error() {
        let e = select_for(EngineChoice::Kvm, &host(true, false)).unwrap_err();
        assert_eq!(e.code(), "E_ENGINE_UNAVAILABLE");
        assert!(e.to_string().contains("REASON") && e.to_string().contains("'qemu'"), "{e}");
        let e = select_for(EngineChoice::Kvm, &host(false, false)).unwrap_err();
        assert_eq!(e.code(), "E_NO_KVM");
        assert_eq!(select_for(EngineChoice::Kvm, &host(true, true)).unwrap().kind, EngineKind::Kvm);
        assert_eq!(select_for(EngineChoice::Qemu, &host(true, true)).unwrap().kind, EngineKind::Qemu);
    }

    #[test]
    fn engine_names_round_trip_through_json() {
        for (c, s) in
            [(EngineChoice::Auto, "\"auto\""), (EngineChoice::Kvm, "\"kvm\""), (EngineChoice::Qemu, "\"qemu\"")]
        {
            assert_eq!(serde_json::to_string(&c).unwrap(), s);
            assert_eq!(serde_json::from_str::<EngineChoice>(s).unwrap(), c);
        }
        assert!(serde_json::from_str::<EngineChoice>("\"firecracker\"").is_err());
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let t = Tail::new(16);
        t.push(b"first line\nsecond\r\nthird\x1b[0m\n");
        assert_eq!(t.text(2), "cond\nthird[0m", "the last 16 bytes, then the last 2 lines");
        let t = Tail::new(64);
        t.push(b"first line\nsecond\r\nthird\n");
        assert_eq!(t.text(2), "second\nthird");
        t.push(&[b'x'; 100]);
        assert_eq!(t.text(5), "x".repeat(64));
    }

    #[test]
    fn exit_slot_wakes_waiters_and_keeps_the_first_exit() {
        let slot = Arc::new(ExitSlot::default());
        assert_eq!(slot.wait_timeout(Duration::from_millis(5)), None);
        let s = slot.clone();
        let t = std::thread::spawn(move || s.wait());
        std::thread::sleep(Duration::from_millis(10));
        slot.set(VmExit::Killed);
        slot.set(VmExit::GuestReset);
        assert_eq!(t.join().unwrap(), VmExit::Killed);
        assert_eq!(slot.get(), Some(VmExit::Killed));
    }

    #[test]
    fn a_kill_cause_replaces_killed_and_only_killed() {
        let slot = ExitSlot::default();
        let lost = VmExit::Crashed { code: "E_AGENT_LOST".into(), message: "m".into() };
        slot.set_cause(lost.clone());
        slot.set_cause(VmExit::Stopped); // the first cause wins
        slot.set(VmExit::Killed);
        assert_eq!(slot.get(), Some(lost));
        // An end of the guest's own comes first: the cause is not used.
        let slot = ExitSlot::default();
        slot.set_cause(VmExit::Stopped);
        slot.set(VmExit::GuestReset);
        assert_eq!(slot.get(), Some(VmExit::GuestReset));
        slot.set_cause(VmExit::Stopped);
        assert_eq!(slot.get(), Some(VmExit::GuestReset));
    }

    #[test]
    fn exit_future_wakes_when_the_end_is_published() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let slot = Arc::new(ExitSlot::default());
        let mut fut = slot.future();
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Pending);
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Pending);
        let s = slot.clone();
        std::thread::spawn(move || s.set(VmExit::GuestReset)).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "one waker, woken once");
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(VmExit::GuestReset));
        // A future made after the end is ready at once.
        assert_eq!(Pin::new(&mut slot.future()).poll(&mut cx), Poll::Ready(VmExit::GuestReset));
    }

    #[test]
    fn clone_image_copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"superblock", 1024).unwrap();
        f.write_all_at(&[7u8; 300_000], 20 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = dir.path().join("dst.img");
        let reflink = clone_image(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        if !reflink {
            // 512-byte blocks: the data plus file-system rounding, far below 64 MiB.
            assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20, "the copy is not sparse");
        }
        assert_eq!(clone_image(&src, &dst).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
    }
}
