//! Sandbox snapshots: the engine's snapshot of the VM (memory, devices, root disk) plus the
//! sandbox's configuration, in one directory. A restore boots nothing: the engine resumes the
//! VM where it was, and the agent answers a fresh handshake on the new control channel — which
//! also sets its clock to the host's (the `Hello` carries the time), so a clone does not live in
//! the snapshot's past.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{connect, ReadyInfo, Sandbox, SandboxConfig};
use crate::engine::{self, BootSpec, EngineKind};
use crate::error::{ConfigError, Result, SandboxError};

/// The sandbox's part of a snapshot directory.
pub const SANDBOX_FILE: &str = "sandbox.json";
/// The longest `sandbox.json` read back.
const MAX_META_BYTES: u64 = 1 << 20;

/// What a snapshot directory holds beside the engine's files: `sandbox.json`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SnapshotMeta {
    pub config: SandboxConfig,
    pub engine: EngineKind,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// A workload VM's program (`argv[0]`; its spec went over the channel, env and all, and is
    /// not kept here); `None` for a sandbox. (Older snapshots hold the `microcell.exec=` word.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl SnapshotMeta {
    /// Writes `dir/sandbox.json` (atomically): last, after the engine's files.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| SandboxError::Snapshot(e.to_string()))?;
        let tmp = dir.join(format!("{SANDBOX_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, dir.join(SANDBOX_FILE)))
            .map_err(io(format!("cannot write {}", dir.join(SANDBOX_FILE).display())))
    }

    /// What [`snapshot_info`] says of it.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            kind: if self.workload.is_some() { "workload" } else { "sandbox" },
            engine: self.engine,
            memory_mib: self.config.memory_mib,
            cpus: self.config.cpus,
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
            cmdline: self.boot_spec(None).extra_cmdline,
        }
    }

    /// Reads `dir/sandbox.json`.
    pub fn read(dir: &Path) -> Result<SnapshotMeta> {
        let path = dir.join(SANDBOX_FILE);
        let not_one = |e: std::io::Error| {
            SandboxError::Snapshot(format!(
                "{} is not a snapshot of a sandbox or workload VM ({}: {e})",
                dir.display(),
                path.display()
            ))
        };
        // A regular file (never a FIFO that hangs the read), and small: what this crate writes
        // is a few hundred bytes.
        let file = vmm::snapshot::open_regular(&path).map_err(not_one)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_META_BYTES + 1), &mut bytes).map_err(not_one)?;
        if bytes.len() as u64 > MAX_META_BYTES {
            return Err(SandboxError::Snapshot(format!(
                "{} is longer than {MAX_META_BYTES} bytes: not one this library wrote",
                path.display()
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| SandboxError::Snapshot(format!("{} is damaged: {e}; take the snapshot again", path.display())))
    }

    /// How the engine restores it: the VM's shape and kernel command line as at its boot.
    pub fn boot_spec(&self, console_output: Option<PathBuf>) -> BootSpec {
        let mut spec = self.config.boot_spec(self.kernel.clone(), self.rootfs.clone(), console_output);
        if self.workload.is_some() {
            // `quiet` first: a workload's console is its program's stdout and stderr, where
            // kernel notices would land mid-line (a `loglevel=` in the user's args comes later
            // and wins). The spec itself goes over the channel, never on the command line.
            spec.extra_cmdline = format!("quiet {}", spec.extra_cmdline).trim_end().to_owned();
        }
        spec
    }
}

/// A VM with volumes is not snapshotted: the host directories are not part of it, and QEMU does
/// not migrate a mounted 9p share.
pub(crate) fn refuse_volumes(config: &SandboxConfig) -> Result<()> {
    if config.volumes.is_empty() {
        return Ok(());
    }
    Err(SandboxError::Snapshot(
        "a VM with volumes (or mappedDirs) cannot be snapshotted: its host directories are not part of it and are not migrated; copy what it needs in with fs.copyFromHost() instead".into(),
    ))
}

/// What a snapshot directory's `sandbox.json` says (for callers that pick the restore path).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// `sandbox` (`Sandbox::restore`) or `workload` (`Workload::restore`).
    pub kind: &'static str,
    pub engine: EngineKind,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    /// The root disk the VM booted from (the snapshot holds its own copy).
    pub rootfs: PathBuf,
    /// The guest kernel command line beyond the engine's own options.
    pub cmdline: String,
}

/// What kind of engine snapshot `dir` holds; `None` when it has no `sandbox.json` (a snapshot
/// of the built-in VMM alone, or no snapshot). `E_SNAPSHOT` when the file is damaged.
pub fn snapshot_info(dir: &Path) -> Result<Option<SnapshotInfo>> {
    if !dir.join(SANDBOX_FILE).exists() {
        return Ok(None);
    }
    Ok(Some(SnapshotMeta::read(dir)?.info()))
}

/// What a restored sandbox may change.
#[derive(Debug, Default, Clone)]
pub struct RestoreOptions {
    /// Console to a host file (as `consoleOutput`).
    pub console_output: Option<PathBuf>,
    /// How long the agent may take to answer (default: the snapshot's `bootTimeoutMs`).
    pub timeout: Option<Duration>,
    /// Forwarded ports instead of the snapshot's network's (`"HOST:GUEST[/udp]"`): other host
    /// ports let clones of one snapshot run side by side.
    pub ports: Option<Vec<String>>,
}

pub(crate) fn io(what: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::HostIo { what, source }
}

impl Sandbox {
    /// Writes a snapshot of this sandbox into `dir` (created if needed); the sandbox runs on.
    /// Take it while no command is running (in-flight commands do not survive a restore).
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        refuse_volumes(&self.config)?;
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create snapshot directory {}", dir.display())))?;
        {
            // The engine stops the guest while it writes: not the agent's silence.
            let _hold = self.hold_watchdog();
            self.vm.snapshot(dir)?;
        }
        SnapshotMeta {
            config: self.current_config(),
            engine: self.info.engine,
            kernel: self.info.kernel.clone(),
            rootfs: self.info.rootfs.clone(),
            workload: None,
        }
        .write(dir)
    }

    /// Starts a new sandbox from a snapshot directory; returns once its agent answers.
    pub fn restore(dir: &Path, options: RestoreOptions) -> Result<Sandbox> {
        let t0 = Instant::now();
        // The config's check, before anything is read or booted.
        super::config::check_console_output(options.console_output.as_deref())?;
        let mut meta = SnapshotMeta::read(dir)?;
        if meta.workload.is_some() {
            return Err(SandboxError::Snapshot(format!(
                "{} is a snapshot of a workload VM: restore it with Snapshot.load(dir) (Workload::restore), not as a sandbox",
                dir.display()
            )));
        }
        if let Some(ports) = options.ports.clone() {
            let Some(network) = meta.config.network.as_mut() else {
                return Err(ConfigError::Network(format!(
                    "{} has no network: its clones have no ports to forward",
                    dir.display()
                ))
                .into());
            };
            network.ports = ports;
        }
        meta.config = meta.config.validate()?;
        let config = meta.config.clone();
        let engine = engine::engine(meta.engine)?;
        let detail = engine.describe();
        let spec = meta.boot_spec(options.console_output.clone());
        let vm = engine.restore(dir, &spec)?;
        let timeout = options.timeout.unwrap_or(Duration::from_millis(u64::from(config.boot_timeout_ms)));
        let (agent, ready) = connect(vm.as_ref(), &detail, t0 + timeout, timeout)?;
        let info = ReadyInfo {
            name: config.name.clone(),
            engine: meta.engine,
            engine_reason: format!("restored from {}", dir.display()),
            engine_detail: detail,
            pid: vm.pid(),
            kernel: meta.kernel,
            rootfs: meta.rootfs,
            kernel_release: ready.kernel_release,
            agent: ready.agent,
            hostname: ready.hostname,
            protocol_version: ready.version,
            features: ready.features,
            boot_ms: t0.elapsed().as_secs_f64() * 1e3,
            guest_boot_ns: ready.boot_ns,
            agent_start_ns: ready.agent_start_ns,
        };
        Ok(Sandbox::assemble(config, info, agent, vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_json_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SANDBOX_FILE);
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let Err(e) = SnapshotMeta::read(dir.path()) else { panic!("accepted") };
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "a FIFO is refused, not waited on");
        assert_eq!(e.code(), "E_SNAPSHOT");
        assert!(e.to_string().contains("FIFO"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::fs::File::create(&path).unwrap().set_len(MAX_META_BYTES + 1).unwrap();
        let Err(e) = SnapshotMeta::read(dir.path()) else { panic!("accepted") };
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
