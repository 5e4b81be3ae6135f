//! The QEMU engine: `qemu-system-x86_64 -M microvm` as a child process.
//!
//! - Machine `microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off`: with `acpi=off` QEMU puts
//!   the `virtio_mmio.device=` entries on the kernel command line itself; `rtc=on` saves ~1 s of
//!   RTC polling under TCG (docs/guest.md).
//! - Accelerator: `-enable-kvm -cpu host` on hardware KVM, `-accel tcg` elsewhere (on PVM
//!   `-cpu host` fails and a stock kernel does not boot under KVM). `MICROCELL_QEMU_ACCEL=kvm|tcg`
//!   overrides.
//! - Root disk: each VM writes to its own copy of the cached image in its per-VM directory
//!   (reflink or sparse copy, as the kvm engine does), so a snapshot can take the disk with it.
//! - Monitor: QMP on a second socketpair, fd 4 (`-mon mode=control`), for snapshots: `stop`,
//!   `migrate exec:cat > FILE`, `cont`. A restore starts QEMU with `-incoming exec:cat FILE`; it
//!   runs the guest as soon as the migration stream is in.
//! - Control channel: `virtio-serial-device` + a port named `agent` whose chardev is one end of a
//!   socketpair, passed to QEMU as fd 3 (`-chardev socket,fd=3`). No socket files, no connect
//!   polling: the other end is the channel the engine hands back at once.
//! - Console: the serial port on QEMU's stdout (`-chardev stdio`), read by a thread into the
//!   console sink (file and/or queue) and a tail; QEMU's stderr is kept for error messages.
//! - No orphans, ever: QEMU runs in its own process group, gets SIGKILL when this process dies
//!   (`PR_SET_PDEATHSIG`, set from a long-lived spawner thread), and `kill()`/drop send SIGKILL
//!   to the group and reap it. The process is reaped only by the monitor thread and only after
//!   `kill()` can no longer signal it (`waitid(WNOWAIT)` first), so a recycled pid is never hit.
//! - `-no-reboot`: a guest reset (the agent's poweroff, `reboot=t`) ends QEMU with status 0.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::qmp::Qmp;
use super::{
    clone_image, clone_image_replacing, passt, spawn, BootSpec, Engine, EngineKind, ExitSlot, RunDir, RunningVm, Tail,
    TailWriter, VmExit, CONSOLE_TAIL_BYTES, CONSOLE_TAIL_LINES,
};
use crate::console::{self, ConsoleHandle, ConsoleOptions, ConsoleReader, ConsoleSink, ConsoleStats};
use crate::error::{Result, SandboxError};

/// The QEMU binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The machine type and its options.
pub const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off";
/// QEMU's own seccomp filter (`-sandbox`): no obsolete calls, no privilege changes (setuid,
/// capabilities), no scheduler/resource changes. `spawn` stays allowed: snapshots migrate
/// through `exec:cat` (QEMU 7.2 has no `file:` migration).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny";
/// The machine's kernel arguments (before [`super::GUEST_CMDLINE`]). `reboot=t`: the microvm
/// machine has no i8042, and `reboot=k` would spend ~1.2 s in fallbacks before the triple fault.
pub const MACHINE_CMDLINE: &str = "console=ttyS0 reboot=t panic=1";
/// The fd number QEMU finds the control channel's socket at.
const CHANNEL_FD: RawFd = 3;
/// The fd number QEMU finds its QMP monitor socket at.
const QMP_FD: RawFd = 4;
/// The network's frame stream in QEMU (`-netdev socket,fd=`), when the spec has one.
const NET_FD: RawFd = 5;
/// In a snapshot directory: QEMU's migration stream and the root disk.
pub const MIGRATION_FILE: &str = "qemu.mig";
pub const SNAPSHOT_DISK: &str = "rootfs.img";

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm (`-enable-kvm -cpu host`).
    Kvm,
    /// Software emulation (TCG): works everywhere, ~1 s to boot the guest here.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// KVM on hardware-KVM hosts, TCG elsewhere; `MICROCELL_QEMU_ACCEL` overrides.
    pub fn for_host(host: &vmm::host::HostInfo) -> (Accel, String) {
        match std::env::var("MICROCELL_QEMU_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "MICROCELL_QEMU_ACCEL=kvm".into()),
            Ok("tcg") => return (Accel::Tcg, "MICROCELL_QEMU_ACCEL=tcg".into()),
            _ => {}
        }
        if host.kvm_device && host.kvm_flavour == vmm::host::KvmFlavour::Hardware {
            (Accel::Kvm, "hardware KVM".into())
        } else {
            (Accel::Tcg, format!("no hardware KVM; KVM flavour: {}", format!("{:?}", host.kvm_flavour).to_lowercase()))
        }
    }
}

/// Finds QEMU: `MICROCELL_QEMU` (a path), else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf> {
    spawn::find_program("MICROCELL_QEMU", QEMU_BINARY).map_err(|e| {
        SandboxError::QemuNotFound(format!(
            "{e}, and the QEMU engine needs it: install it with `apt-get install qemu-system-x86` (Debian/Ubuntu) \
             or your distribution's qemu-system-x86 package, or set MICROCELL_QEMU to the binary"
        ))
    })
}

/// Single-quotes a path for the `/bin/sh -c` QEMU runs `exec:` migration commands with.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is written twice).
fn qemu_opt_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU engine.
#[derive(Debug, Clone)]
pub struct QemuEngine {
    binary: PathBuf,
    accel: Accel,
    accel_reason: String,
}

impl QemuEngine {
    /// Finds QEMU ([`find_qemu`]) and picks the accelerator for this host ([`Accel::for_host`]).
    pub fn locate() -> Result<QemuEngine> {
        let binary = find_qemu()?;
        let (accel, accel_reason) = Accel::for_host(vmm::host::cached());
        Ok(QemuEngine { binary, accel, accel_reason })
    }

    /// A given binary and accelerator.
    pub fn new(binary: impl Into<PathBuf>, accel: Accel) -> QemuEngine {
        QemuEngine { binary: binary.into(), accel, accel_reason: "given".into() }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The kernel command line for a spec.
    pub fn cmdline(spec: &BootSpec) -> String {
        super::guest_cmdline(MACHINE_CMDLINE, spec)
    }

    /// QEMU's arguments for a spec (the control channel is fd 3, QMP fd 4), booting from
    /// `disk` (the per-VM copy), or from a migration stream when `incoming` is given.
    pub fn args(&self, spec: &BootSpec, disk: &Path, incoming: Option<&Path>) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-M");
        push(MACHINE);
        push("-sandbox");
        push(SANDBOX);
        match self.accel {
            Accel::Kvm => ["-enable-kvm", "-cpu", "host"].iter().for_each(|s| push(s)),
            Accel::Tcg => ["-accel", "tcg"].iter().for_each(|s| push(s)),
        }
        push("-m");
        push(&spec.memory_mib.to_string());
        push("-smp");
        push(&spec.vcpus.to_string());
        push("-kernel");
        a.push(spec.kernel.clone().into_os_string());
        let mut push = |s: &str| a.push(s.into());
        push("-append");
        push(&Self::cmdline(spec));
        push("-drive");
        push(&format!("if=none,id=root,file={},format=raw", qemu_opt_value(disk)));
        push("-chardev");
        push(&format!("socket,id=qmp,fd={QMP_FD}"));
        push("-mon");
        push("chardev=qmp,mode=control");
        // Restores run whatever the run state of the VM the snapshot was taken of (a paused one).
        push("-global");
        push("migration.store-global-state=off");
        if spec.net.is_some() {
            // The frames go over a socket (fd NET_FD) through the egress policy to passt, as on
            // the built-in VMM: one network, one policy, whichever engine.
            push("-netdev");
            push(&format!("socket,id=net0,fd={NET_FD}"));
            push("-device");
            let mac = passt::GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
            push(&format!("virtio-net-device,netdev=net0,mac={mac}"));
        }
        for share in &spec.shares {
            // mapped-xattr: files the guest makes are the QEMU process's on the host, their
            // guest owner and mode kept in xattrs (no setuid files appear on the host).
            let mut fsdev =
                format!("local,id={0},path={1},security_model=mapped-xattr", share.tag, qemu_opt_value(&share.host));
            if share.read_only {
                fsdev.push_str(",readonly=on");
            }
            push("-fsdev");
            push(&fsdev);
            push("-device");
            push(&format!("virtio-9p-device,fsdev={0},mount_tag={0}", share.tag));
        }
        if let Some(file) = incoming {
            push("-incoming");
            push(&format!("exec:cat {}", shell_quote(file)));
        }
        for s in [
            "-device",
            "virtio-blk-device,drive=root",
            "-device",
            "virtio-serial-device",
            "-chardev",
            &format!("socket,id=agent,fd={CHANNEL_FD}"),
            "-device",
            "virtserialport,chardev=agent,name=agent",
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
        ] {
            push(s);
        }
        a
    }
}

impl Engine for QemuEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Qemu
    }

    fn describe(&self) -> String {
        format!("{}, accel {} ({})", self.binary.display(), self.accel.name(), self.accel_reason)
    }

    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn RunningVm>> {
        self.start(spec, &spec.rootfs, None)
    }

    fn restore(&self, dir: &Path, spec: &BootSpec) -> Result<Box<dyn RunningVm>> {
        // Both must be regular files: a FIFO would hang the disk copy or QEMU's `cat`, a device
        // would stream endless bytes into the guest's disk.
        for name in [MIGRATION_FILE, SNAPSHOT_DISK] {
            let path = dir.join(name);
            vmm::snapshot::open_regular(&path).map_err(|e| {
                SandboxError::Snapshot(format!(
                    "{} is not a QEMU sandbox snapshot ({}: {e})",
                    dir.display(),
                    path.display()
                ))
            })?;
        }
        self.start(spec, &dir.join(SNAPSHOT_DISK), Some(&dir.join(MIGRATION_FILE)))
    }
}

impl QemuEngine {
    /// Starts QEMU on a per-VM copy of `disk`, from a migration stream when `incoming` is set.
    fn start(&self, spec: &BootSpec, disk: &Path, incoming: Option<&Path>) -> Result<Box<dyn RunningVm>> {
        let start_err = |what: &str, e: std::io::Error| SandboxError::EngineStart {
            engine: EngineKind::Qemu.name(),
            message: format!("{what}: {e}"),
        };
        // A missing QEMU is the likelier mistake; say so before copying any disk.
        if !spawn::is_executable(&self.binary) {
            return Err(SandboxError::QemuNotFound(format!(
                "{} cannot be executed: install it with `apt-get install qemu-system-x86` or set MICROCELL_QEMU",
                self.binary.display()
            )));
        }
        let run_dir = RunDir::create("qemu").map_err(|source| SandboxError::HostIo {
            what: format!("cannot create a per-VM directory in {}", std::env::temp_dir().display()),
            source,
        })?;
        let vm_disk = run_dir.path().join("rootfs.img");
        clone_image(disk, &vm_disk).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && !disk.exists() {
                SandboxError::GuestImageMissing {
                    what: "root disk",
                    path: disk.to_owned(),
                    hint: "give an existing ext4 image, or run scripts/setup.sh to build the default one".into(),
                }
            } else {
                SandboxError::HostIo {
                    what: format!("cannot copy the root disk {} to {}", disk.display(), vm_disk.display()),
                    source,
                }
            }
        })?;
        // The network first: a host port that cannot be forwarded fails before QEMU starts.
        let network = match &spec.net {
            Some(net) => {
                let (ours, qemu_end) =
                    UnixStream::pair().map_err(|e| start_err("cannot create the network socketpair", e))?;
                vmm::size_stream_buffers(&qemu_end);
                let egress = vmm::LivePolicy::new(passt::network_config(net).egress);
                let for_passt = passt::filter(ours, egress.clone())
                    .map_err(|e| start_err("cannot start the network's filter threads", e))?;
                Some((passt::Passt::start(for_passt, net, run_dir.path(), EngineKind::Qemu)?, egress, qemu_end))
            }
            None => None,
        };
        let (host_end, guest_end) =
            UnixStream::pair().map_err(|e| start_err("cannot create the control socketpair", e))?;
        let (qmp_host, qmp_guest) =
            UnixStream::pair().map_err(|e| start_err("cannot create the monitor socketpair", e))?;
        let (sink, console) = console::channel(&ConsoleOptions {
            file: spec.console_file.clone(),
            queue_capacity: spec.console_queue_bytes,
        })
        .map_err(|source| SandboxError::ConsoleOutput {
            path: spec.console_file.clone().unwrap_or_default(),
            source,
        })?;
        let reader = console.reader();

        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args(spec, &vm_disk, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0);
        let parent = std::process::id();
        let moves = [
            (guest_end.as_raw_fd(), CHANNEL_FD),
            (qmp_guest.as_raw_fd(), QMP_FD),
            (network.as_ref().map_or(-1, |(_, _, qemu_end)| qemu_end.as_raw_fd()), NET_FD),
        ];
        // SAFETY: only async-signal-safe calls (prctl, getppid, dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                spawn::die_with_parent(parent)?;
                // Lift every fd above the targets first (close-on-exec), so that no dup2 below
                // lands on one still to be moved; dup2 then leaves each target open across exec.
                let mut lifted = [-1; 3];
                for (slot, (from, _)) in lifted.iter_mut().zip(moves) {
                    if from >= 0 {
                        *slot = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 16);
                        if *slot < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (from, (_, to)) in lifted.into_iter().zip(moves) {
                    if from >= 0 && libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = spawn::spawn(cmd).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SandboxError::QemuNotFound(format!(
                    "{} cannot be executed ({e}): install it with `apt-get install qemu-system-x86` or set MICROCELL_QEMU",
                    self.binary.display()
                ))
            } else {
                start_err(&format!("cannot start {}", self.binary.display()), e)
            }
        })?;
        drop(guest_end);
        drop(qmp_guest);
        let network = network.map(|(passt, egress, _qemu_end)| (passt, egress));
        let pid = child.id();
        tracing::debug!(pid, accel = self.accel.name(), "qemu started");

        let proc = Arc::new(Proc { pid, reaped: Mutex::new(false), killed: AtomicBool::new(false) });
        let exit = Arc::new(ExitSlot::default());
        let tail = Tail::new(CONSOLE_TAIL_BYTES);
        let stderr_tail = Tail::new(4 << 10);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let monitor = {
            let (proc, exit, console, tail, stderr_tail) =
                (proc.clone(), exit.clone(), console.clone(), tail.clone(), stderr_tail.clone());
            let sink = TailWriter { inner: sink, tail };
            std::thread::Builder::new()
                .name(format!("mc-qemu-{pid}"))
                .spawn(move || monitor(child, stdout, stderr, sink, stderr_tail, proc, console, exit))
        };
        let monitor = match monitor {
            Ok(h) => h,
            Err(e) => {
                // The child was moved into the failed closure and dropped: kill the group and
                // reap it here.
                // SAFETY: the child has not been reaped (nobody waited for it).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                    libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
                }
                return Err(SandboxError::Thread { what: "QEMU monitor", source: e });
            }
        };
        Ok(Box::new(QemuVm {
            proc,
            exit,
            qmp: Mutex::new(QmpState::Unconnected(qmp_host)),
            paused: AtomicBool::new(false),
            network,
            _run_dir: run_dir,
            channel: Mutex::new(Some(host_end)),
            console,
            reader,
            tail,
            stderr_tail,
            monitor: Mutex::new(Some(monitor)),
        }))
    }
}

struct Proc {
    pid: u32,
    /// Set (under this lock) just before the pid is released by reaping.
    reaped: Mutex<bool>,
    killed: AtomicBool,
}

impl Proc {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: the pid (and so the group, whose leader it is) is not reaped yet: it
            // cannot have been reused.
            unsafe {
                libc::kill(-(self.pid as i32), libc::SIGKILL);
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Pumps QEMU's stdout into the console and its stderr into a tail until both end, then reaps
/// QEMU and publishes how it ended (after the console is complete).
#[allow(clippy::too_many_arguments)]
fn monitor(
    mut child: Child,
    mut stdout: std::process::ChildStdout,
    mut stderr: std::process::ChildStderr,
    mut sink: TailWriter<ConsoleSink>,
    stderr_tail: Tail,
    proc: Arc<Proc>,
    console: ConsoleHandle,
    exit: Arc<ExitSlot>,
) {
    let mut buf = vec![0u8; 16 << 10];
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let mut fds = [
            libc::pollfd { fd: if out_open { stdout.as_raw_fd() } else { -1 }, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: if err_open { stderr.as_raw_fd() } else { -1 }, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if out_open && fds[0].revents != 0 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    let _ = sink.write_all(&buf[..n]);
                }
            }
        }
        if err_open && fds[1].revents != 0 {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    stderr_tail.push(&buf[..n]);
                    tracing::debug!(pid = proc.pid, "qemu stderr: {}", String::from_utf8_lossy(&buf[..n]).trim_end());
                }
            }
        }
    }
    // Wait without reaping, so that `kill()` never signals a recycled pid; then reap under the
    // lock that `kill()` takes.
    // SAFETY: a zeroed siginfo_t is a valid out-parameter.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        while libc::waitid(libc::P_PID, proc.pid, &mut info, libc::WEXITED | libc::WNOWAIT) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
    let status = {
        let mut reaped = proc.reaped.lock().unwrap_or_else(|e| e.into_inner());
        let status = child.wait();
        *reaped = true;
        status
    };
    drop(sink);
    console.close();
    let stderr_text = stderr_tail.text(10);
    let vm_exit = match status {
        Ok(s) if s.success() => VmExit::GuestReset,
        Ok(s) if s.signal() == Some(libc::SIGKILL) && proc.killed.load(Ordering::SeqCst) => VmExit::Killed,
        Ok(s) => VmExit::Crashed {
            code: "E_QEMU_EXIT".into(),
            message: match (s.code(), s.signal()) {
                (Some(c), _) => format!("QEMU exited with status {c}: {stderr_text}"),
                (_, Some(sig)) => format!("QEMU was killed by signal {sig}: {stderr_text}"),
                _ => format!("QEMU ended ({s}): {stderr_text}"),
            },
        },
        Err(e) => VmExit::Crashed { code: "E_QEMU_EXIT".into(), message: format!("cannot wait for QEMU: {e}") },
    };
    tracing::debug!(pid = proc.pid, exit = %vm_exit, "qemu ended");
    exit.set(vm_exit);
}

enum QmpState {
    Unconnected(UnixStream),
    Ready(Qmp),
    Broken,
}

/// A running QEMU.
struct QemuVm {
    proc: Arc<Proc>,
    exit: Arc<ExitSlot>,
    /// Connected on first use (QEMU sends its greeting once it is up).
    qmp: Mutex<QmpState>,
    /// Stopped by `pause()` (QMP `stop`) and not `cont`inued since.
    paused: AtomicBool,
    /// passt and the policy of the filter threads before it, when the VM has a network.
    network: Option<(passt::Passt, vmm::LivePolicy)>,
    /// The per-VM directory with the root disk copy; removed after QEMU is gone (field order).
    _run_dir: RunDir,
    channel: Mutex<Option<UnixStream>>,
    console: ConsoleHandle,
    reader: Option<ConsoleReader>,
    tail: Tail,
    stderr_tail: Tail,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl QemuVm {
    /// Runs `f` with a connected QMP monitor; its errors become `error(message)`.
    fn with_qmp<T>(
        &self,
        error: fn(String) -> SandboxError,
        f: impl FnOnce(&mut Qmp) -> std::result::Result<T, String>,
    ) -> Result<T> {
        if self.exit.get().is_some() {
            return Err(error("the VM has ended".into()));
        }
        let mut state = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        if let QmpState::Unconnected(_) = &*state {
            let QmpState::Unconnected(stream) = std::mem::replace(&mut *state, QmpState::Broken) else {
                unreachable!()
            };
            *state = QmpState::Ready(Qmp::connect(stream, Duration::from_secs(30)).map_err(error)?);
        }
        match &mut *state {
            QmpState::Ready(qmp) => f(qmp).map_err(|e| error(format!("QEMU monitor: {e}"))),
            _ => Err(error("QEMU's monitor connection was lost earlier".into())),
        }
    }
}

/// In HMP's `info registers -a`: the number of vCPUs when every one is halted (`HLT=1`) with
/// interrupts off (`RFL` without IF, 0x200), else `None`.
fn halted_with_interrupts_off(dump: &str) -> Option<usize> {
    let mut cpus = 0;
    for line in dump.lines().filter(|l| l.starts_with("RIP=")) {
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
        let flags = u64::from_str_radix(field("RFL=")?, 16).ok()?;
        if field("HLT=")? != "1" || flags & 0x200 != 0 {
            return None;
        }
        cpus += 1;
    }
    (cpus > 0).then_some(cpus)
}

fn vm_state(message: String) -> SandboxError {
    vmm::Error::VmState(message).into()
}

impl RunningVm for QemuVm {
    fn engine(&self) -> EngineKind {
        EngineKind::Qemu
    }

    fn snapshot(&self, dir: &Path) -> Result<()> {
        let migration = dir.join(MIGRATION_FILE);
        let uri = format!("exec:cat > {}", shell_quote(&migration));
        self.with_qmp(SandboxError::Snapshot, |qmp| {
            // (Read under the monitor's lock, which pause and resume hold while they change it.)
            let paused = self.paused.load(Ordering::SeqCst);
            // QEMU stops a running guest itself for the final pass and leaves it stopped
            // ("postmigrate"); a paused one is migrated as it is. The stream does not carry the
            // run state (`store-global-state=off`): restores run either way.
            let result = qmp
                .execute("migrate", serde_json::json!({ "uri": uri }))
                .and_then(|_| qmp.wait_migration(Duration::from_secs(120)));
            // Copy the disk while the guest cannot write to it, then let it run on.
            let disk = result.and_then(|()| {
                clone_image_replacing(&self._run_dir.path().join("rootfs.img"), &dir.join(SNAPSHOT_DISK))
                    .map_err(|e| format!("copying the root disk: {e}"))
            });
            if !paused {
                qmp.execute("cont", serde_json::json!({}))?;
            }
            disk.map(|_reflink| ())
        })
    }

    fn pause(&self) -> Result<()> {
        self.with_qmp(vm_state, |qmp| {
            qmp.execute("stop", serde_json::json!({}))?;
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn resume(&self) -> Result<()> {
        self.with_qmp(vm_state, |qmp| {
            qmp.execute("cont", serde_json::json!({}))?;
            self.paused.store(false, Ordering::SeqCst);
            Ok(())
        })
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) && self.exit.get().is_none()
    }

    fn set_egress(&self, policy: vmm::EgressPolicy) -> Result<()> {
        let (_, live) = self.network.as_ref().ok_or_else(super::no_network)?;
        live.set(policy);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.proc.pid)
    }

    fn take_channel(&self) -> Option<UnixStream> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn exit_slot(&self) -> &Arc<ExitSlot> {
        &self.exit
    }

    fn kill(&self) {
        if self.exit.get().is_none() {
            self.proc.kill();
        }
    }

    fn halted(&self) -> Option<String> {
        if self.paused.load(Ordering::SeqCst) {
            return None;
        }
        // QMP has no halted state of its own; HMP's register dump has `HLT=` and the flags.
        let dump = self
            .with_qmp(vm_state, |qmp| {
                qmp.execute("human-monitor-command", serde_json::json!({ "command-line": "info registers -a" }))
            })
            .ok()?;
        let cpus = halted_with_interrupts_off(dump.as_str()?)?;
        Some(format!("the guest halted its {cpus} vCPU(s) with interrupts off (halt -f or poweroff -f: the machine has no power-off device); nothing can wake it"))
    }

    fn console(&self) -> Option<ConsoleReader> {
        self.reader.clone()
    }

    fn console_stats(&self) -> ConsoleStats {
        self.console.stats()
    }

    fn console_tail(&self) -> String {
        let mut s = self.tail.text(CONSOLE_TAIL_LINES);
        let err = self.stderr_tail.text(10);
        if !err.trim().is_empty() {
            s.push_str("\n[qemu stderr]\n");
            s.push_str(&err);
        }
        s
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
        // SIGKILL cannot be ignored: QEMU is gone within milliseconds. Wait for the reap, so
        // that no process outlives its handle.
        if self.exit.wait_timeout(crate::limits::KILL_WAIT).is_some() {
            if let Some(h) = self.monitor.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = h.join();
            }
        } else {
            tracing::warn!(pid = self.proc.pid, "QEMU did not end within 10 s of SIGKILL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{NetSpec, PortForward};

    #[test]
    fn args_follow_the_documented_command_line() {
        let mut spec = BootSpec::new("/k/vmlinux", "/img,with,commas/rootfs.ext4");
        spec.memory_mib = 256;
        spec.vcpus = 2;
        spec.extra_cmdline = " init=/bin/sh ".into();
        let tcg = QemuEngine::new("/usr/bin/qemu-system-x86_64", Accel::Tcg).args(
            &spec,
            Path::new("/img,with,commas/rootfs.ext4"),
            Some(Path::new("/s/it's/qemu.mig")),
        );
        let s: Vec<String> = tcg.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = s.join(" ");
        assert!(joined.starts_with("-M microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off -sandbox on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny -accel tcg -m 256 -smp 2 -kernel /k/vmlinux"), "{joined}");
        assert!(
            s.contains(&"console=ttyS0 reboot=t panic=1 root=/dev/vda rw no_timer_check init=/bin/sh".to_string()),
            "{s:?}"
        );
        assert!(s.contains(&"if=none,id=root,file=/img,,with,,commas/rootfs.ext4,format=raw".to_string()));
        assert!(joined.contains("-chardev socket,id=qmp,fd=4 -mon chardev=qmp,mode=control"));
        assert!(joined.contains("-incoming exec:cat '/s/it'\\''s/qemu.mig'"), "{joined}");
        assert!(joined.contains("-chardev socket,id=agent,fd=3 -device virtserialport,chardev=agent,name=agent"));
        assert!(joined.ends_with("-display none -nodefaults -no-user-config -no-reboot"));
        assert!(!joined.contains("-cpu host"));
        let kvm = QemuEngine::new("q", Accel::Kvm).args(&spec, Path::new("/d"), None);
        let joined = kvm.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        assert!(joined.contains("-enable-kvm -cpu host -m 256"), "{joined}");
    }

    #[test]
    fn a_network_is_a_frame_stream_on_fd_5() {
        let engine = QemuEngine::new("/usr/bin/qemu-system-x86_64", Accel::Tcg);
        let mut spec = BootSpec::new("/k", "/r");
        let joined = |spec: &BootSpec| {
            engine
                .args(spec, Path::new("/d"), None)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(!joined(&spec).contains("netdev"), "no network unless asked for");
        spec.net =
            Some(NetSpec { ports: vec![PortForward { host: 8080, guest: 80, udp: false }], ..Default::default() });
        let a = joined(&spec);
        assert!(
            a.contains("-netdev socket,id=net0,fd=5 -device virtio-net-device,netdev=net0,mac=02:4d:43:00:00:01"),
            "{a}"
        );
    }

    #[test]
    fn a_halted_machine_is_every_vcpu_in_hlt_with_interrupts_off() {
        // As QEMU 7.2 prints it (trimmed) after `poweroff -f` in the guest.
        let cpu = |n: u32, rfl: &str, hlt: u8| {
            format!("CPU#{n}\nRAX=0000000000000000 RBX=ffff88800f815040\nRIP=ffffffff810162dc RFL={rfl} [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\nES =0000 0000000000000000 00000000 00000000\n")
        };
        assert_eq!(halted_with_interrupts_off(&cpu(0, "00000046", 1)), Some(1));
        assert_eq!(halted_with_interrupts_off(&(cpu(0, "00000046", 1) + &cpu(1, "00000002", 1))), Some(2));
        // Idle (HLT with interrupts on), running, or one vCPU of two still up: not halted.
        assert_eq!(halted_with_interrupts_off(&cpu(0, "00000246", 1)), None);
        assert_eq!(halted_with_interrupts_off(&cpu(0, "00000046", 0)), None);
        assert_eq!(halted_with_interrupts_off(&(cpu(0, "00000046", 1) + &cpu(1, "00000246", 0))), None);
        assert_eq!(halted_with_interrupts_off("unknown command"), None);
    }

    #[test]
    fn a_missing_binary_is_e_qemu_not_found() {
        let spec = BootSpec::new("/nonexistent/vmlinux", "/nonexistent/rootfs");
        let e = QemuEngine::new("/nonexistent/qemu-system-x86_64", Accel::Tcg).boot(&spec).err().unwrap();
        assert_eq!(e.code(), "E_QEMU_NOT_FOUND");
        assert!(e.to_string().contains("apt-get install qemu-system-x86"), "{e}");
    }

    /// A fake "QEMU" (a shell script) shows the process plumbing without a VM: the console pipe,
    /// stderr in the tail, the exit status, fd 3, kill of the whole group and reaping.
    #[test]
    fn process_plumbing_with_a_fake_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'console line 1'\necho 'qemu: warning' >&2\n\
             case \"$*\" in *fail*) echo 'qemu: fatal' >&2; exit 3;; *sleep*) sleep 600 & sleep 600;; esac\n\
             cat <&3 >&3 &\nwait\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let engine = QemuEngine::new(&fake, Accel::Tcg);

        // Echo over fd 3, then a clean end when the host closes its side.
        let rootfs = dir.path().join("rootfs.img");
        std::fs::write(&rootfs, b"a disk").unwrap();
        let mut spec = BootSpec::new("/k", &rootfs);
        spec.console_queue_bytes = Some(1024);
        let vm = engine.boot(&spec).unwrap();
        let mut ch = vm.take_channel().unwrap();
        assert!(vm.take_channel().is_none());
        ch.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        ch.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        drop(ch);
        assert_eq!(vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::GuestReset));
        assert_eq!(vm.console().unwrap().try_read(100), console::TryRead::Data(b"console line 1\n".to_vec()));
        assert!(vm.console_tail().contains("console line 1\n[qemu stderr]\nqemu: warning"), "{}", vm.console_tail());

        // A failing QEMU: Crashed with its stderr.
        spec.extra_cmdline = "fail".into();
        let vm = engine.boot(&spec).unwrap();
        match vm.wait_timeout(Duration::from_secs(10)) {
            Some(VmExit::Crashed { code, message }) => {
                assert_eq!(code, "E_QEMU_EXIT");
                assert!(message.contains("status 3") && message.contains("qemu: fatal"), "{message}");
            }
            other => panic!("{other:?}"),
        }

        // kill() ends the whole process group, the background child included.
        spec.extra_cmdline = "sleep".into();
        let vm = engine.boot(&spec).unwrap();
        let pid = vm.pid().unwrap() as i32;
        std::thread::sleep(Duration::from_millis(100));
        vm.kill();
        assert_eq!(vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::Killed));
        // The background `sleep` was reparented; its zombie is reaped by init soon after.
        let t = std::time::Instant::now();
        // SAFETY: probing a process group with signal 0.
        while unsafe { libc::kill(-pid, 0) } == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "a process of the group survived");
            std::thread::sleep(Duration::from_millis(10));
        }
        vm.kill(); // idempotent after the end
        drop(vm);
    }
}
