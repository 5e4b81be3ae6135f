//! A sandbox: a microVM booted on an engine, with the guest agent ready on its control channel.
//!
//! `Sandbox::create` validates the configuration, resolves the guest images, picks the engine
//! (`auto` | `kvm` | `qemu`, the choice and its reason logged and kept in [`ReadyInfo`]), boots,
//! sends `Hello` and returns once the agent answered `Ready` — or fails with a coded error in
//! bounded time: `E_BOOT_TIMEOUT` when the agent stays silent past `bootTimeoutMs`,
//! `E_AGENT_EXITED` (with the console tail) when the VM ends first, `E_PROTOCOL` when the
//! channel carries something else. Every failure path kills the VM before returning.

mod config;
pub(crate) mod snapshot;
pub mod watchdog;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use crate::limits::{
    DEFAULT_BOOT_TIMEOUT_MS, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_BOOT_TIMEOUT_MS, MAX_VCPUS, MIN_BOOT_TIMEOUT_MS,
    MIN_MEMORY_MIB,
};
pub(crate) use config::check_console_output;
pub use config::{
    default_kernel, default_kernel_source, default_rootfs, default_rootfs_source, guest_cache_dir, set_packaged_guest,
    validate_sandbox_config_json, GuestImages, NetworkConfig, NetworkUpdate, SandboxConfig, Volume, GUEST_PACKAGE,
};
pub use snapshot::{snapshot_info, RestoreOptions as SandboxRestoreOptions, SnapshotInfo, SANDBOX_FILE};

use crate::agent_client::{ready_from, AgentClient};
use crate::console::{ConsoleReader, ConsoleStats};
use crate::engine::{self, Engine, EngineKind, EngineSelection, ExitFuture, RunningVm, VmExit};
use crate::error::{Result, SandboxError};
use crate::exec::{ExecHandle, ExecOutput, ExecRequest};
use crate::fs::{CopyStats, DirEntryInfo, FileReadStream, FileStat, FileWriteStream, WriteOptions};

pub use crate::limits::CONSOLE_QUEUE_BYTES;
/// How often the boot wait looks at whether the VM has ended (only while the agent is silent).
const BOOT_POLL: Duration = Duration::from_millis(20);

/// What a sandbox is running and how it came up.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyInfo {
    pub name: Option<String>,
    pub engine: EngineKind,
    /// Why this engine (`auto: ...`, `asked for`).
    pub engine_reason: String,
    /// The engine in one line (QEMU binary and accelerator, or the built-in VMM).
    pub engine_detail: String,
    /// The QEMU process; `None` on the built-in VMM (in this process).
    pub pid: Option<u32>,
    pub kernel: std::path::PathBuf,
    pub rootfs: std::path::PathBuf,
    /// `uname -r` of the guest, e.g. `6.1.192`.
    pub kernel_release: String,
    /// The agent's name and version.
    pub agent: String,
    pub hostname: String,
    pub protocol_version: u16,
    /// `protocol::features` bits.
    pub features: u64,
    /// Host wall time from the start of `create` to `Ready`, in milliseconds.
    pub boot_ms: f64,
    /// The guest's CLOCK_BOOTTIME at `Ready` and when the agent started (ns).
    pub guest_boot_ns: u64,
    pub agent_start_ns: u64,
}

/// A running sandbox. Dropping it kills the VM (and reaps QEMU) if it still runs.
pub struct Sandbox {
    config: SandboxConfig,
    /// The network in force: the configuration's, then each `update_network`'s.
    network: Mutex<Option<NetworkConfig>>,
    info: ReadyInfo,
    agent: Arc<AgentClient>,
    vm: Arc<dyn RunningVm>,
    /// Ends the VM when its guest stops serving without the engine seeing an end.
    watchdog: watchdog::Watchdog,
}

impl Sandbox {
    /// Validates `config`, boots it on the engine it asks for and returns once the agent is
    /// ready. Blocks for the boot (~1 s under TCG here; call it off any event loop thread).
    pub fn create(config: SandboxConfig) -> Result<Sandbox> {
        let config = config.validate()?;
        let selection = engine::select_for_devices(config.engine, config.qemu_only_devices())?;
        let engine = engine::engine(selection.kind).map_err(|e| match e {
            SandboxError::QemuNotFound(m) => {
                SandboxError::QemuNotFound(format!("{m} (engine qemu: {})", selection.reason))
            }
            e => e,
        })?;
        Self::create_on(config, engine.as_ref(), selection)
    }

    /// [`Sandbox::create`] on a given engine (tests; callers that keep an engine around).
    pub fn create_on(config: SandboxConfig, engine: &dyn Engine, selection: EngineSelection) -> Result<Sandbox> {
        let t0 = Instant::now();
        let config = config.validate()?;
        let images = config.guest_images()?;
        let name = config.name.as_deref().unwrap_or("-");
        let detail = engine.describe();
        tracing::info!(sandbox = name, engine = %selection.kind, reason = %selection.reason, detail = %detail, "booting a sandbox");
        let spec = config.boot_spec(images.kernel.clone(), images.rootfs.clone(), config.console_output.clone());
        let vm = engine.boot(&spec)?;
        let timeout = Duration::from_millis(u64::from(config.boot_timeout_ms));
        let agent = match connect(vm.as_ref(), &detail, t0 + timeout, timeout) {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(sandbox = name, code = e.code(), "sandbox boot failed");
                return Err(e);
            }
        };
        let (agent, ready) = agent;
        let boot_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(sandbox = name, engine = %selection.kind, boot_ms, kernel = %ready.kernel_release, "sandbox ready");
        let info = ReadyInfo {
            name: config.name.clone(),
            engine: selection.kind,
            engine_reason: selection.reason,
            engine_detail: detail,
            pid: vm.pid(),
            kernel: images.kernel,
            rootfs: images.rootfs,
            kernel_release: ready.kernel_release,
            agent: ready.agent,
            hostname: ready.hostname,
            protocol_version: ready.version,
            features: ready.features,
            boot_ms,
            guest_boot_ns: ready.boot_ns,
            agent_start_ns: ready.agent_start_ns,
        };
        Ok(Sandbox::assemble(config, info, agent, vm))
    }

    pub(crate) fn assemble(
        config: SandboxConfig,
        info: ReadyInfo,
        agent: AgentClient,
        vm: Box<dyn RunningVm>,
    ) -> Sandbox {
        let (agent, vm): (Arc<AgentClient>, Arc<dyn RunningVm>) = (Arc::new(agent), Arc::from(vm));
        let watchdog = watchdog::Watchdog::start(agent.clone(), vm.clone(), watchdog::Bounds::default());
        Sandbox { network: Mutex::new(config.network.clone()), config, info, agent, vm, watchdog }
    }

    /// While the returned guard lives the agent watchdog counts no silence (the host holds
    /// the guest stopped: a snapshot).
    pub(crate) fn hold_watchdog(&self) -> watchdog::Hold {
        self.watchdog.hold()
    }

    /// How the sandbox came up (engine and why, kernel release, boot time, ...).
    pub fn info(&self) -> &ReadyInfo {
        &self.info
    }

    /// The validated configuration it was made with (its network as at the start: see
    /// [`Sandbox::network`]).
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The network in force now (`None`: the sandbox has none).
    pub fn network(&self) -> Option<NetworkConfig> {
        self.network.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes where the guest may send, while it runs: from the next frame it sends, and in
    /// snapshots taken after. Fields left out keep their value; forwarded ports cannot change.
    /// `E_CONFIG_NETWORK` for a policy that does not validate, `E_VM_STATE` for a sandbox made
    /// without a network. Returns the network now in force.
    pub fn update_network(&self, update: &NetworkUpdate) -> Result<NetworkConfig> {
        let mut current = self.network.lock().unwrap_or_else(|e| e.into_inner());
        let Some(net) = current.as_ref() else {
            return Err(crate::engine::no_network());
        };
        let next = NetworkConfig {
            outbound: update.outbound.unwrap_or(net.outbound),
            ports: net.ports.clone(),
            deny: update.deny.clone().unwrap_or_else(|| net.deny.clone()),
            allow: update.allow.clone().unwrap_or_else(|| net.allow.clone()),
        };
        let spec = next.net_spec()?;
        self.vm.set_egress(crate::engine::passt::network_config(&spec).egress)?;
        *current = Some(next.clone());
        Ok(next)
    }

    /// The configuration as it stands now (the network in force), for snapshots.
    pub(crate) fn current_config(&self) -> SandboxConfig {
        SandboxConfig { network: self.network(), ..self.config.clone() }
    }

    /// The agent client, for requests beyond the lifecycle.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// One round trip to the agent.
    pub fn ping(&self, timeout: Duration) -> Result<Duration> {
        self.agent.ping(timeout)
    }

    /// The request with the sandbox's `env` (before the request's own) and `workdir` (when
    /// the request gives no `cwd`).
    fn with_defaults(&self, req: &ExecRequest) -> ExecRequest {
        let mut r = req.clone();
        if !r.clear_env && !self.config.env.is_empty() {
            let mut env: Vec<(String, String)> = self.config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            env.append(&mut r.env);
            r.env = env;
        }
        if r.cwd.is_none() {
            r.cwd = self.config.workdir.clone();
        }
        r
    }

    /// Starts a process in the guest ([`AgentClient::exec`]) with the sandbox's `env` and
    /// `workdir` as defaults; returns once it runs.
    pub fn exec(&self, req: &ExecRequest) -> Result<ExecHandle> {
        self.agent.exec(&self.with_defaults(req))
    }

    /// Runs a process to its end: exit, stdout, stderr ([`AgentClient::exec_collect`]).
    pub fn exec_collect(&self, req: &ExecRequest, timeout: Option<Duration>) -> Result<ExecOutput> {
        self.agent.exec_collect(&self.with_defaults(req), timeout)
    }

    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.agent.read_file(path)
    }

    /// A whole guest file, at most `max_bytes` ([`AgentClient::read_file_max`]).
    pub fn read_file_max(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        self.agent.read_file_max(path, max_bytes)
    }

    pub fn write_file(&self, path: &str, data: &[u8], opts: WriteOptions) -> Result<()> {
        self.agent.write_file(path, data, opts)
    }

    /// A guest file as a stream of chunks ([`FileReadStream`]).
    pub fn open_read(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileReadStream> {
        self.agent.open_read(path, offset, len)
    }

    /// A guest file opened for writing ([`FileWriteStream`]).
    pub fn open_write(&self, path: &str, opts: WriteOptions) -> Result<FileWriteStream> {
        self.agent.open_write(path, opts)
    }

    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntryInfo>> {
        self.agent.list_dir(path)
    }

    pub fn mkdir(&self, path: &str, mode: u32, parents: bool) -> Result<()> {
        self.agent.mkdir(path, mode, parents)
    }

    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.agent.remove(path, recursive)
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.agent.rename(from, to)
    }

    pub fn stat(&self, path: &str, follow: bool) -> Result<FileStat> {
        self.agent.stat(path, follow)
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        self.agent.exists(path)
    }

    /// Watches a guest directory ([`AgentClient::watch`]).
    pub fn watch(&self, path: &str, recursive: bool) -> Result<crate::fs::DirWatch> {
        self.agent.watch(path, recursive)
    }

    /// Copies a host file or tree into the guest ([`AgentClient::copy_from_host`]).
    pub fn copy_from_host(&self, host: &std::path::Path, guest: &str) -> Result<CopyStats> {
        self.agent.copy_from_host(host, guest)
    }

    /// Copies a guest file or tree to the host ([`AgentClient::copy_to_host`]).
    pub fn copy_to_host(
        &self,
        guest: &str,
        host: &std::path::Path,
        opts: crate::CopyToHostOptions,
    ) -> Result<CopyStats> {
        self.agent.copy_to_host(guest, host, opts)
    }

    /// Powers the guest off gracefully (the agent syncs and resets the VM) and waits for the VM
    /// to end; kills it when that has not happened within `timeout`. Returns how it ended:
    /// [`VmExit::GuestReset`] when graceful, [`VmExit::Killed`] after the timeout.
    pub fn stop(&self, timeout: Duration) -> VmExit {
        if let Some(exit) = self.vm.try_wait() {
            return exit;
        }
        // The host ends it now: its silence and closed channel are expected.
        self.watchdog.stand_down();
        // A paused guest cannot power itself off.
        if self.vm.is_paused() {
            if let Err(e) = self.vm.resume() {
                tracing::debug!(code = e.code(), "resume before stop: {e}");
            }
        }
        let deadline = Instant::now() + timeout;
        if let Err(e) = self.agent.poweroff(timeout) {
            tracing::debug!(code = e.code(), "poweroff not acknowledged: {e}");
        }
        if let Some(exit) = self.vm.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
            return exit;
        }
        tracing::warn!(
            sandbox = self.config.name.as_deref().unwrap_or("-"),
            ?timeout,
            "the guest did not power off in time: killing it"
        );
        self.vm.kill();
        self.vm.wait()
    }

    /// Ends the VM at once. Idempotent.
    pub fn kill(&self) {
        self.watchdog.stand_down();
        self.vm.kill();
    }

    /// Stops the guest's vCPUs: the sandbox keeps its memory, processes and files and uses no
    /// CPU until [`Sandbox::resume`]. Requests to the agent wait meanwhile (the napi layer
    /// refuses new ones); `snapshot` works and leaves it paused; `stop` resumes it first.
    pub fn pause(&self) -> Result<()> {
        self.vm.pause()
    }

    /// Lets a paused sandbox run again (its clock jumps: the guest sees the pause as lost time).
    pub fn resume(&self) -> Result<()> {
        self.vm.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> VmExit {
        self.vm.wait()
    }

    /// Resolves when the VM has ended; holds no thread while it waits (for async callers such
    /// as the napi binding). It keeps only the exit slot alive, not the sandbox.
    pub fn wait_async(&self) -> ExitFuture {
        self.vm.wait_async()
    }

    /// [`Sandbox::wait`] with a limit; `None` when it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.vm.wait_timeout(timeout)
    }

    /// How the VM ended, if it has.
    pub fn try_wait(&self) -> Option<VmExit> {
        self.vm.try_wait()
    }

    /// The guest console (the last `consoleQueueBytes` not yet read).
    pub fn console(&self) -> Option<ConsoleReader> {
        self.vm.console()
    }

    pub fn console_stats(&self) -> ConsoleStats {
        self.vm.console_stats()
    }

    /// The last console lines (and QEMU's stderr), as in error messages.
    pub fn console_tail(&self) -> String {
        self.vm.console_tail()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // First: its thread holds the agent and the VM, which are torn down below.
        self.watchdog.shutdown();
        self.agent.close();
        self.vm.kill();
        // The VM's own drop (after this) waits for QEMU to be reaped and removes its files.
    }
}

/// Takes the channel and does the handshake; kills the VM on any failure.
fn connect(
    vm: &dyn RunningVm,
    detail: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(AgentClient, protocol::Ready)> {
    let result = (|| {
        let channel = vm.take_channel().ok_or_else(|| SandboxError::EngineStart {
            engine: vm.engine().name(),
            message: "the engine handed back no control channel".into(),
        })?;
        let agent = AgentClient::new(channel)?;
        let ready = wait_ready(vm, &agent, detail, deadline, timeout)?;
        Ok((agent, ready))
    })();
    if result.is_err() {
        vm.kill();
        if vm.wait_timeout(crate::limits::KILL_WAIT).is_none() {
            tracing::warn!(engine = %vm.engine(), "the VM did not end within {:?} of kill", crate::limits::KILL_WAIT);
        }
    }
    result
}

fn wait_ready(
    vm: &dyn RunningVm,
    agent: &AgentClient,
    detail: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<protocol::Ready> {
    let pending = match agent.hello() {
        Ok(pending) => pending,
        Err(SandboxError::ChannelClosed(why)) => return Err(closed_before_ready(vm, deadline, &why)),
        Err(e) => return Err(e),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            vm.kill();
            let _ = vm.wait_timeout(crate::limits::KILL_WAIT);
            return Err(SandboxError::BootTimeout {
                timeout_ms: timeout.as_millis() as u64,
                engine: vm.engine().name(),
                accel: format!(" ({detail})"),
                console_tail: vm.console_tail(),
            });
        }
        match pending.wait_timeout(left.min(BOOT_POLL)) {
            Ok(Some(frame)) => return ready_from(frame),
            Ok(None) => {
                if let Some(exit) = vm.try_wait() {
                    return Err(SandboxError::AgentExited { exit: exit.to_string(), console_tail: vm.console_tail() });
                }
            }
            Err(SandboxError::ChannelClosed(why)) => return Err(closed_before_ready(vm, deadline, &why)),
            Err(e) => return Err(e),
        }
    }
}

/// The channel closed during the handshake: the VM's end closes it, so say how the VM ended
/// (giving the engine a moment to report it), with its console.
fn closed_before_ready(vm: &dyn RunningVm, deadline: Instant, why: &str) -> SandboxError {
    let left = deadline.saturating_duration_since(Instant::now());
    match vm.wait_timeout(left.min(Duration::from_secs(2))) {
        Some(exit) => SandboxError::AgentExited { exit: exit.to_string(), console_tail: vm.console_tail() },
        None => SandboxError::Protocol(format!(
            "the control channel closed before the agent was ready ({why}) while the VM still runs"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        // The napi layer keeps sandboxes in `Arc`s and calls them from worker threads.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Sandbox>();
        send_sync::<AgentClient>();
        fn send<T: Send>() {}
        send::<crate::agent_client::Pending>(); // one waiter; moved, not shared
        send_sync::<ExecHandle>(); // read events on one thread, write stdin / signal on another
        send::<FileReadStream>();
        send::<FileWriteStream>();
        send_sync::<SandboxError>();
        send_sync::<ReadyInfo>();
    }
}
