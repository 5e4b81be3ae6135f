//! microcell's host core: the launch configuration and its validation, the guest console, and
//! running microVMs on the built-in VMM (`crates/vmm`).
//!
//! Nothing here knows about JavaScript: `crates/node` maps these types to JS one to one.

pub mod agent_client;
pub mod config;
pub mod console;
pub mod engine;
mod error;
pub mod exec;
pub mod fs;
pub mod limits;
pub mod sandbox;
pub mod vm;
pub mod workload;

pub use config::MicroVmConfig;
pub use engine::{EngineChoice, EngineKind, VmExit};
pub use error::{ConfigError, Result, SandboxError};
pub use exec::{ExecEvent, ExecExit, ExecHandle, ExecOutput, ExecRequest};
pub use fs::{CopyStats, CopyToHostOptions, DirEntryInfo, FileReadStream, FileStat, FileWriteStream, WriteOptions};
pub use sandbox::{validate_sandbox_config_json, ReadyInfo, Sandbox, SandboxConfig, SandboxRestoreOptions};
pub use vm::{MicroVm, RestoreOptions, StartOptions};
pub use vmm::VmShell;
pub use vmm::{ExitReason, LoadedSnapshot, Timings};
pub use workload::{Workload, WorkloadStatus};

/// Parses and validates a configuration given as JSON and returns it normalised (defaults
/// filled in, empty options left out): the JSON that `MicroVm.builder().build()` returns.
pub fn validate_config_json(json: &str) -> std::result::Result<String, ConfigError> {
    let config = MicroVmConfig::from_json(json)?;
    config.validate()?;
    Ok(config.to_json())
}

/// What this host's KVM is and what it can run.
pub fn host_info() -> vmm::host::HostInfo {
    vmm::host::detect()
}
