//! The one error type of the host core (config validation, microVMs, sandboxes, their engines,
//! the agent client): [`SandboxError`], with typed configuration errors ([`ConfigError`]).
//!
//! Every variant has a stable code (`code()`, from the variant) that crosses the napi boundary
//! unchanged, and a message that says what went wrong and what to do about it. The lists of
//! codes (`CODES`) are what the addon's `errorCodes()` returns and the TS lists are checked
//! against. This module sits below every other one: it imports only [`crate::limits`].

use std::path::PathBuf;

use crate::limits;

/// A launch configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The JSON does not describe a `MicroVmConfig` (syntax, unknown option, wrong type).
    #[error("the configuration is not a valid MicroVmConfig: {0}; build it with MicroVm.builder() or pass the JSON that build() returns")]
    Json(String),

    /// `numVcpus` is not a whole number from 1 to [`limits::MAX_VCPUS`].
    #[error("numVcpus is {0}: give a whole number of vCPUs from 1 to {max}", max = limits::MAX_VCPUS)]
    Vcpus(String),

    /// `memoryMib` is zero or not a whole number.
    #[error("memoryMib is {0}: give the guest memory as a whole number of MiB, at least 1 (default 512)")]
    Memory(String),

    /// `memoryMib` is more than the host has.
    #[error("memoryMib is {requested} but this host has only {host} MiB of RAM (MemTotal in /proc/meminfo): give at most {host} MiB")]
    MemoryAboveHost { requested: u64, host: u64 },

    /// A required option is missing.
    #[error("{what} is required: {hint}")]
    Missing { what: &'static str, hint: &'static str },

    /// A host path does not exist.
    #[error("{what} {path:?} does not exist on the host: fix the path (relative paths are resolved against the current directory {cwd:?})")]
    PathNotFound { what: String, path: String, cwd: String },

    /// A host path exists but is the wrong kind of file.
    #[error("{what} {path:?} is not {expected}: give the path of {expected}")]
    PathKind { what: String, path: String, expected: &'static str },

    /// A string that must be printable ASCII is not (exec path, args, working directory, host paths).
    #[error("{what} {value:?} contains characters that are not allowed: use printable ASCII only (0x20 space to 0x7e '~'; no NUL, newline, tab, other control characters or non-ASCII)")]
    InvalidString { what: String, value: String },

    /// A guest path is relative or leaves the root.
    #[error("{what} {path:?} is not a usable guest path: {reason}")]
    GuestPath { what: String, path: String, reason: &'static str },

    /// Two mapped directories would be mounted at the same place or one inside the other.
    #[error("mappedDirs: guest paths {first:?} and {second:?} conflict (the same path, or one inside the other, after normalisation): mount each directory at its own, separate guest path")]
    GuestPathConflict { first: String, second: String },

    /// A `host:guest` pair has the wrong shape.
    #[error("{what} entry {value:?} is malformed: write {expected}")]
    Pair { what: &'static str, value: String, expected: &'static str },

    /// A port number is out of range or repeated.
    #[error("portMap entry {value:?}: {reason}")]
    Port { value: String, reason: String },

    /// An rlimit entry is malformed.
    #[error("rlimits entry {value:?}: {reason}")]
    Rlimit { value: String, reason: String },

    /// An environment entry is malformed.
    #[error("env entry {value:?}: {reason}")]
    Env { value: String, reason: String },

    /// `ip` / `subnet` are malformed or do not fit together.
    #[error("{0}")]
    Network(String),

    /// The kernel command line cannot be given to the guest.
    #[error("cmdline: {0}")]
    Cmdline(String),

    /// `consoleOutput` names something other than a regular file (see `console_file_problem`).
    #[error("consoleOutput: {0}")]
    Console(String),

    /// `consoleQueueBytes` is out of range.
    #[error("consoleQueueBytes is {0}: give 1 to {max} bytes (default {default})", max = limits::MAX_CONSOLE_QUEUE_BYTES, default = limits::CONSOLE_QUEUE_BYTES)]
    ConsoleQueue(String),

    /// The JSON does not describe a `SandboxConfig`.
    #[error("the configuration is not a valid SandboxConfig: {0}; build it with the Sandbox builder or pass the JSON it produces")]
    SandboxJson(String),

    /// A sandbox's `cpus` is not a whole number from 1 to [`limits::MAX_VCPUS`].
    #[error("cpus is {0}: give a whole number of vCPUs from 1 to {max}", max = limits::MAX_VCPUS)]
    Cpus(String),

    /// A sandbox's `memoryMib` is below [`limits::MIN_MEMORY_MIB`] or not a whole number.
    #[error("memoryMib is {0}: give at least {min} MiB (default {default})", min = limits::MIN_MEMORY_MIB, default = limits::DEFAULT_MEMORY_MIB)]
    MemoryBelowMin(String),

    /// A sandbox's `name` is not a usable hostname.
    #[error("name {0:?} is not usable: give 1 to 63 letters, digits and '-', not starting or ending with '-' (it becomes the guest's hostname)")]
    Name(String),

    /// `bootTimeoutMs` or `maxDurationMs` is out of range.
    #[error("{0}")]
    Timeout(String),

    /// A volume cannot be shared (missing host directory, unusable or overlapping guest path, too many).
    #[error("{0}")]
    Volume(String),

    /// `metadata` is malformed (too many entries, keys or values too long or not printable).
    #[error("{0}")]
    Metadata(String),
}

impl ConfigError {
    /// The stable code of this error (it never changes between releases).
    pub fn code(&self) -> &'static str {
        match self {
            ConfigError::Json(_) => "E_CONFIG_JSON",
            ConfigError::Vcpus(_) => "E_CONFIG_VCPUS",
            ConfigError::Memory(_) | ConfigError::MemoryAboveHost { .. } => "E_CONFIG_MEMORY",
            ConfigError::Missing { .. } => "E_CONFIG_MISSING",
            ConfigError::PathNotFound { .. } => "E_CONFIG_PATH_NOT_FOUND",
            ConfigError::PathKind { .. } => "E_CONFIG_PATH_KIND",
            ConfigError::InvalidString { .. } => "E_CONFIG_INVALID_STRING",
            ConfigError::GuestPath { .. } => "E_CONFIG_GUEST_PATH",
            ConfigError::GuestPathConflict { .. } => "E_CONFIG_GUEST_PATH_CONFLICT",
            ConfigError::Pair { .. } => "E_CONFIG_PAIR",
            ConfigError::Port { .. } => "E_CONFIG_PORT",
            ConfigError::Rlimit { .. } => "E_CONFIG_RLIMIT",
            ConfigError::Env { .. } => "E_CONFIG_ENV",
            ConfigError::Network(_) => "E_CONFIG_NETWORK",
            ConfigError::Cmdline(_) => "E_CONFIG_CMDLINE",
            ConfigError::Console(_) | ConfigError::ConsoleQueue(_) => "E_CONFIG_CONSOLE",
            ConfigError::SandboxJson(_) => "E_CONFIG_JSON",
            ConfigError::Cpus(_) => "E_CONFIG_VCPUS",
            ConfigError::MemoryBelowMin(_) => "E_CONFIG_MEMORY",
            ConfigError::Name(_) => "E_CONFIG_NAME",
            ConfigError::Timeout(_) => "E_CONFIG_TIMEOUT",
            ConfigError::Volume(_) => "E_CONFIG_VOLUME",
            ConfigError::Metadata(_) => "E_CONFIG_METADATA",
        }
    }

    /// Every code this type produces, from `MicroVmConfig` or `SandboxConfig` validation (the TS
    /// `CONFIG_ERROR_CODES`).
    pub const CODES: &'static [&'static str] = &[
        "E_CONFIG_JSON",
        "E_CONFIG_VCPUS",
        "E_CONFIG_MEMORY",
        "E_CONFIG_MISSING",
        "E_CONFIG_PATH_NOT_FOUND",
        "E_CONFIG_PATH_KIND",
        "E_CONFIG_INVALID_STRING",
        "E_CONFIG_GUEST_PATH",
        "E_CONFIG_GUEST_PATH_CONFLICT",
        "E_CONFIG_PAIR",
        "E_CONFIG_PORT",
        "E_CONFIG_RLIMIT",
        "E_CONFIG_ENV",
        "E_CONFIG_NETWORK",
        "E_CONFIG_CMDLINE",
        "E_CONFIG_CONSOLE",
        "E_CONFIG_NAME",
        "E_CONFIG_TIMEOUT",
        "E_CONFIG_VOLUME",
        "E_CONFIG_METADATA",
    ];
}

/// Why a sandbox could not be created or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The configuration is invalid (`E_CONFIG_*`: the code names the option).
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The guest kernel or root disk is not there.
    #[error("{what} {path:?} is missing (not an existing file): {hint}")]
    GuestImageMissing { what: &'static str, path: PathBuf, hint: String },

    /// The QEMU engine was chosen but `qemu-system-x86_64` cannot be found.
    #[error("{0}")]
    QemuNotFound(String),

    /// `/dev/kvm` is missing or unusable and the `kvm` engine was asked for.
    #[error("engine 'kvm' needs /dev/kvm, which {reason}: load the kvm_intel or kvm_amd module and make /dev/kvm accessible to this user (e.g. the kvm group), or use engine 'qemu' (software emulation)")]
    NoKvm { reason: String },

    /// The engine asked for cannot boot the guest on this host.
    #[error("engine '{engine}' cannot boot a Linux guest on this host: {reason}. Use engine 'qemu' (or 'auto', which picks it here)")]
    EngineUnavailable { engine: &'static str, reason: String },

    /// The engine could not be started (QEMU failed to spawn, a socket could not be made).
    #[error("engine '{engine}' could not start: {message}")]
    EngineStart { engine: &'static str, message: String },

    /// A snapshot could not be taken or restored (QEMU's migration failed, not a snapshot
    /// directory, ...). The VMM's own snapshot errors keep their codes (`E_SNAPSHOT_CORRUPT`, ...).
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// The built-in VMM refused or failed to start the VM (`E_KERNEL_FORMAT`, `E_KVM`, ...).
    #[error(transparent)]
    Vmm(#[from] vmm::Error),

    /// A host file operation failed (per-sandbox directory, root disk clone).
    #[error("{what}: {source}; check free space and permissions of the temporary directory (TMPDIR)")]
    HostIo { what: String, source: std::io::Error },

    /// The console output file cannot be created.
    #[error(
        "cannot create consoleOutput file {path:?}: {source}; give a path in a directory this process may write to"
    )]
    ConsoleOutput { path: PathBuf, source: std::io::Error },

    /// The agent did not answer `Hello` within the boot timeout.
    #[error("the guest agent did not become ready within {timeout_ms} ms on engine '{engine}'{accel}: the guest may be stuck before the agent runs (see the console below) or the host is slow (raise bootTimeoutMs). Console tail:\n{console_tail}")]
    BootTimeout { timeout_ms: u64, engine: &'static str, accel: String, console_tail: String },

    /// The VM ended before the agent was ready (kernel panic, bad root disk, QEMU error, ...).
    #[error("the VM ended before the guest agent was ready ({exit}): check the kernel, the root disk and the console below. Console tail:\n{console_tail}")]
    AgentExited { exit: String, console_tail: String },

    /// The agent sent something that is not the protocol (bad frame, unexpected reply).
    #[error("protocol error on the control channel: {0}; the guest agent and this host library may be from different builds (rebuild the root disk with scripts/guest/build-rootfs.sh)")]
    Protocol(String),

    /// The agent answered a request with an error.
    #[error("the guest agent refused {request}: {message} (agent error code {agent_code})")]
    Agent { request: &'static str, agent_code: u16, message: String },

    /// The control channel is closed (the VM ended or the sandbox was stopped).
    #[error("the control channel to the guest agent is closed ({0}): the sandbox has ended; create a new one")]
    ChannelClosed(String),

    /// The agent did not answer a request in time.
    #[error("the guest agent did not answer {request} within {timeout_ms} ms: the guest may be overloaded or stuck; stop or kill the sandbox")]
    AgentTimeout { request: &'static str, timeout_ms: u64 },

    /// A guest operation failed with an OS error: the code is the errno's name (`ENOENT`,
    /// `EACCES`, `EISDIR`, `ENOTDIR`, `EEXIST`, `ENOTEMPTY`, ...; see `protocol::errno::ERRNOS`),
    /// with the guest path it concerns.
    #[error("{request} failed in the guest: {message} ({code}{})", path.as_deref().map(|p| format!(", guest path {p}")).unwrap_or_default())]
    Guest { request: &'static str, code: &'static str, errno: i32, path: Option<String>, message: String },

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
    Thread { what: &'static str, source: std::io::Error },
}

impl SandboxError {
    /// The stable code of this error (it never changes between releases).
    pub fn code(&self) -> &'static str {
        match self {
            SandboxError::Config(e) => e.code(),
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

    /// Every code this type produces itself, beside [`ConfigError`]'s (`Vmm` errors carry the
    /// VMM's codes, `vmm::Error::code`; guest OS errors carry their errno's name,
    /// `protocol::errno::ERRNOS`; `Reported` repeats an earlier error's).
    pub const CODES: &'static [&'static str] = &[
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

    pub(crate) fn thread(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
        move |source| SandboxError::Thread { what, source }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// One value of every variant whose code is its own (not a wrapped or reported one).
    fn samples() -> Vec<SandboxError> {
        let s = || String::from("x");
        let io = || std::io::Error::other("x");
        let config = [
            ConfigError::Json(s()),
            ConfigError::Vcpus(s()),
            ConfigError::Memory(s()),
            ConfigError::MemoryAboveHost { requested: 2, host: 1 },
            ConfigError::Missing { what: "x", hint: "x" },
            ConfigError::PathNotFound { what: s(), path: s(), cwd: s() },
            ConfigError::PathKind { what: s(), path: s(), expected: "x" },
            ConfigError::InvalidString { what: s(), value: s() },
            ConfigError::GuestPath { what: s(), path: s(), reason: "x" },
            ConfigError::GuestPathConflict { first: s(), second: s() },
            ConfigError::Pair { what: "x", value: s(), expected: "x" },
            ConfigError::Port { value: s(), reason: s() },
            ConfigError::Rlimit { value: s(), reason: s() },
            ConfigError::Env { value: s(), reason: s() },
            ConfigError::Network(s()),
            ConfigError::Cmdline(s()),
            ConfigError::Console(s()),
            ConfigError::ConsoleQueue(s()),
            ConfigError::SandboxJson(s()),
            ConfigError::Cpus(s()),
            ConfigError::MemoryBelowMin(s()),
            ConfigError::Name(s()),
            ConfigError::Timeout(s()),
            ConfigError::Volume(s()),
            ConfigError::Metadata(s()),
        ];
        let mut all: Vec<SandboxError> = config.into_iter().map(SandboxError::from).collect();
        all.extend([
            SandboxError::GuestImageMissing { what: "x", path: PathBuf::new(), hint: s() },
            SandboxError::QemuNotFound(s()),
            SandboxError::NoKvm { reason: s() },
            SandboxError::EngineUnavailable { engine: "kvm", reason: s() },
            SandboxError::EngineStart { engine: "qemu", message: s() },
            SandboxError::Snapshot(s()),
            SandboxError::HostIo { what: s(), source: io() },
            SandboxError::ConsoleOutput { path: PathBuf::new(), source: io() },
            SandboxError::BootTimeout { timeout_ms: 1, engine: "qemu", accel: s(), console_tail: s() },
            SandboxError::AgentExited { exit: s(), console_tail: s() },
            SandboxError::Protocol(s()),
            SandboxError::Agent { request: "x", agent_code: 1, message: s() },
            SandboxError::ChannelClosed(s()),
            SandboxError::AgentTimeout { request: "x", timeout_ms: 1 },
            SandboxError::InvalidArgument(s()),
            SandboxError::HostFile(s()),
            SandboxError::OutputLimit(s()),
            SandboxError::Thread { what: "x", source: io() },
        ]);
        all
    }

    #[test]
    fn every_code_comes_from_its_variant_and_is_listed_once() {
        let listed: Vec<&str> = ConfigError::CODES.iter().chain(SandboxError::CODES).copied().collect();
        let mut distinct = listed.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), listed.len(), "a code is listed twice: {listed:?}");
        let produced: std::collections::BTreeSet<&str> = samples().iter().map(SandboxError::code).collect();
        for code in &produced {
            assert!(listed.contains(code), "{code} is produced but not listed in CODES");
        }
        for code in &listed {
            assert!(produced.contains(code), "{code} is listed in CODES but no variant produces it");
        }
        assert!(ConfigError::CODES.iter().all(|c| c.starts_with("E_CONFIG_")));
        assert!(!SandboxError::CODES.iter().any(|c| c.starts_with("E_CONFIG_")));
    }

    #[test]
    fn messages_are_not_empty_and_do_not_repeat_the_code() {
        for e in samples() {
            let m = e.to_string();
            assert!(!m.starts_with("E_"), "{m}");
            assert!(!m.is_empty());
        }
    }
}
