//! The one error type of configuration validation.
//!
//! Every variant has a stable code ([`ConfigError::code`]) that crosses the napi boundary
//! unchanged, and a message that says what is wrong and what to do about it.

/// A launch configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The JSON does not describe a `MicroVmConfig` (syntax, unknown option, wrong type).
    #[error("the configuration is not a valid MicroVmConfig: {0}; build it with MicroVm.builder() or pass the JSON that build() returns")]
    Json(String),

    /// `numVcpus` is not a whole number from 1 to [`super::MAX_VCPUS`].
    #[error("numVcpus is {0}: give a whole number of vCPUs from 1 to {max}", max = super::MAX_VCPUS)]
    Vcpus(String),

    /// `memoryMib` is zero or not a whole number.
    #[error("memoryMib is {0}: give the guest memory as a whole number of MiB, at least 1 (default 512)")]
    Memory(String),

    /// `memoryMib` is more than the host has.
    #[error("memoryMib is {requested} but this host has only {host} MiB of RAM (MemTotal in /proc/meminfo): give at most {host} MiB")]
    MemoryAboveHost { requested: u64, host: u64 },

    /// A required option is missing.
    #[error("{what} is required: {hint}")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },

    /// A host path does not exist.
    #[error("{what} {path:?} does not exist on the host: fix the path (relative paths are resolved against the current directory {cwd:?})")]
    PathNotFound {
        what: String,
        path: String,
        cwd: String,
    },

    /// A host path exists but is the wrong kind of file.
    #[error("{what} {path:?} is not {expected}: give the path of {expected}")]
    PathKind {
        what: String,
        path: String,
        expected: &'static str,
    },

    /// A string that must be printable ASCII is not (exec path, args, working directory, host paths).
    #[error("{what} {value:?} contains characters that are not allowed: use printable ASCII only (0x20 space to 0x7e '~'; no NUL, newline, tab, other control characters or non-ASCII)")]
    InvalidString { what: String, value: String },

    /// A guest path is relative or leaves the root.
    #[error("{what} {path:?} is not a usable guest path: {reason}")]
    GuestPath {
        what: String,
        path: String,
        reason: &'static str,
    },

    /// Two mapped directories would be mounted at the same place or one inside the other.
    #[error("mappedDirs: guest paths {first:?} and {second:?} conflict (the same path, or one inside the other, after normalisation): mount each directory at its own, separate guest path")]
    GuestPathConflict { first: String, second: String },

    /// A `host:guest` pair has the wrong shape.
    #[error("{what} entry {value:?} is malformed: write {expected}")]
    Pair {
        what: &'static str,
        value: String,
        expected: &'static str,
    },

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
            ConfigError::Console(_) => "E_CONFIG_CONSOLE",
        }
    }

    /// Every code this type can produce (documentation and tests).
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
    ];
}
