//! The one error type of sandboxes, their engines and the agent client.
//!
//! Every variant has a stable code ([`SandboxError::code`]) that crosses the napi boundary
//! unchanged, and a message that says what went wrong and what to do about it.

use std::path::PathBuf;

use crate::engine::{EngineKind, VmExit};

/// Why a sandbox could not be created or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The configuration is invalid (`E_CONFIG_*`: the code names the option).
    #[error("{message}")]
    Config { code: &'static str, message: String },

    /// The guest kernel or root disk is not there.
    #[error("{what} {path:?} is missing (not an existing file): {hint}")]
    GuestImageMissing {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },

    /// The QEMU engine was chosen but `qemu-system-x86_64` cannot be found.
    #[error("{0}")]
    QemuNotFound(String),

    /// `/dev/kvm` is missing or unusable and the `kvm` engine was asked for.
    #[error("engine 'kvm' needs /dev/kvm, which {reason}: load the kvm_intel or kvm_amd module and make /dev/kvm accessible to this user (e.g. the kvm group), or use engine 'qemu' (software emulation)")]
    NoKvm { reason: String },

    /// The engine asked for cannot boot the guest on this host.
    #[error("engine '{engine}' cannot boot a Linux guest on this host: {reason}. Use engine 'qemu' (or 'auto', which picks it here)")]
    EngineUnavailable { engine: EngineKind, reason: String },

    /// The engine could not be started (QEMU failed to spawn, a socket could not be made).
    #[error("engine '{engine}' could not start: {message}")]
    EngineStart { engine: EngineKind, message: String },

    /// A snapshot could not be taken or restored (QEMU's migration failed, not a snapshot
    /// directory, ...). The VMM's own snapshot errors keep their codes (`E_SNAPSHOT_CORRUPT`, ...).
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// The built-in VMM refused or failed to start the VM (`E_KERNEL_FORMAT`, `E_KVM`, ...).
    #[error(transparent)]
    Vmm(#[from] vmm::Error),

    /// A host file operation failed (per-sandbox directory, root disk clone).
    #[error(
        "{what}: {source}; check free space and permissions of the temporary directory (TMPDIR)"
    )]
    HostIo {
        what: String,
        source: std::io::Error,
    },

    /// The console output file cannot be created.
    #[error("cannot create consoleOutput file {path:?}: {source}; give a path in a directory this process may write to")]
    ConsoleOutput {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The agent did not answer `Hello` within the boot timeout.
    #[error("the guest agent did not become ready within {timeout_ms} ms on engine '{engine}'{accel}: the guest may be stuck before the agent runs (see the console below) or the host is slow (raise bootTimeoutMs). Console tail:\n{console_tail}")]
    BootTimeout {
        timeout_ms: u64,
        engine: EngineKind,
        accel: String,
        console_tail: String,
    },

    /// The VM ended before the agent was ready (kernel panic, bad root disk, QEMU error, ...).
    #[error("the VM ended before the guest agent was ready ({exit}): check the kernel, the root disk and the console below. Console tail:\n{console_tail}")]
    AgentExited { exit: VmExit, console_tail: String },

    /// The agent sent something that is not the protocol (bad frame, unexpected reply).
    #[error("protocol error on the control channel: {0}; the guest agent and this host library may be from different builds (rebuild the root disk with scripts/guest/build-rootfs.sh)")]
    Protocol(String),

    /// The agent answered a request with an error.
    #[error("the guest agent refused {request}: {message} (agent error code {agent_code})")]
    Agent {
        request: &'static str,
        agent_code: u16,
        message: String,
    },

    /// The control channel is closed (the VM ended or the sandbox was stopped).
    #[error("the control channel to the guest agent is closed ({0}): the sandbox has ended; create a new one")]
    ChannelClosed(String),

    /// The agent did not answer a request in time.
    #[error("the guest agent did not answer {request} within {timeout_ms} ms: the guest may be overloaded or stuck; stop or kill the sandbox")]
    AgentTimeout {
        request: &'static str,
        timeout_ms: u64,
    },

    /// A guest operation failed with an OS error: the code is the errno's name (`ENOENT`,
    /// `EACCES`, `EISDIR`, `ENOTDIR`, `EEXIST`, `ENOTEMPTY`, ...; see `protocol::errno::ERRNOS`),
    /// with the guest path it concerns.
    #[error("{request} failed in the guest: {message} ({code}{})", path.as_deref().map(|p| format!(", guest path {p}")).unwrap_or_default())]
    Guest {
        request: &'static str,
        code: &'static str,
        errno: i32,
        path: Option<String>,
        message: String,
    },

    /// A request with values that make no sense (empty argv, a relative guest path, an unknown
    /// signal name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An error reported once and handed to every waiter (e.g. of a workload): the code and
    /// message of the original.
    #[error("{message}")]
    Reported { code: &'static str, message: String },

    /// A host file for a copy could not be read or written (`copy_from_host` / `copy_to_host`).
    #[error("{0}")]
    HostFile(String),

    /// A read or copy from the guest passed its byte limit (`maxBytes`) and was stopped.
    #[error("{0}")]
    OutputLimit(String),

    /// No thread could be started.
    #[error("cannot start a thread ({what}): {source}; the process may have hit its thread limit")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

impl SandboxError {
    /// The stable code of this error (it never changes between releases).
    pub fn code(&self) -> &'static str {
        match self {
            SandboxError::Config { code, .. } => code,
            SandboxError::GuestImageMissing { .. } => "E_GUEST_IMAGE_MISSING",
            SandboxError::QemuNotFound(_) => "E_QEMU_NOT_FOUND",
            SandboxError::NoKvm { .. } => "E_NO_KVM",
            SandboxError::EngineUnavailable { .. } => "E_ENGINE_UNAVAILABLE",
            SandboxError::EngineStart { .. } => "E_ENGINE_START",
            SandboxError::Vmm(e) => e.code(),
            SandboxError::Snapshot(_) => "E_SNAPSHOT",
            SandboxError::HostIo { .. } => "E_HOST_IO",
            SandboxError::ConsoleOutput { .. } => "E_CONSOLE_OUTPUT",
            SandboxError::BootTimeout { .. } => "E_BOOT_TIMEOUT",
            SandboxError::AgentExited { .. } => "E_AGENT_EXITED",
            SandboxError::Protocol(_) => "E_PROTOCOL",
            SandboxError::Agent { .. } => "E_AGENT_ERROR",
            SandboxError::ChannelClosed(_) => "E_CHANNEL_CLOSED",
            SandboxError::AgentTimeout { .. } => "E_AGENT_TIMEOUT",
            SandboxError::Thread { .. } => "E_THREAD",
            SandboxError::Guest { code, .. } => code,
            SandboxError::InvalidArgument(_) => "E_INVALID_ARGUMENT",
            SandboxError::HostFile(_) => "E_HOST_FILE",
            SandboxError::OutputLimit(_) => "E_OUTPUT_LIMIT",
            SandboxError::Reported { code, .. } => code,
        }
    }

    /// Every code this type produces itself (the `E_CONFIG_*` codes of [`SandboxConfig`]
    /// validation included; `Vmm` errors carry the VMM's codes, `vmm::Error::code`; guest OS
    /// errors carry their errno's name, `protocol::errno::ERRNOS`).
    ///
    /// [`SandboxConfig`]: crate::sandbox::SandboxConfig
    pub const CODES: &'static [&'static str] = &[
        "E_CONFIG_JSON",
        "E_CONFIG_NAME",
        "E_CONFIG_MEMORY",
        "E_CONFIG_VCPUS",
        "E_CONFIG_ENV",
        "E_CONFIG_GUEST_PATH",
        "E_CONFIG_TIMEOUT",
        "E_CONFIG_CMDLINE",
        "E_CONFIG_CONSOLE",
        "E_CONFIG_NETWORK",
        "E_CONFIG_VOLUME",
        "E_CONFIG_METADATA",
        "E_GUEST_IMAGE_MISSING",
        "E_QEMU_NOT_FOUND",
        "E_NO_KVM",
        "E_ENGINE_UNAVAILABLE",
        "E_ENGINE_START",
        "E_SNAPSHOT",
        "E_HOST_IO",
        "E_CONSOLE_OUTPUT",
        "E_BOOT_TIMEOUT",
        "E_AGENT_EXITED",
        "E_PROTOCOL",
        "E_AGENT_ERROR",
        "E_CHANNEL_CLOSED",
        "E_AGENT_TIMEOUT",
        "E_THREAD",
        "E_INVALID_ARGUMENT",
        "E_HOST_FILE",
        "E_OUTPUT_LIMIT",
    ];

    pub(crate) fn config(code: &'static str, message: impl Into<String>) -> SandboxError {
        SandboxError::Config {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn thread(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
        move |source| SandboxError::Thread { what, source }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
