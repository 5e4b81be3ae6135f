//! Launch configuration: the options of a microVM, their JSON form and their validation.

pub mod fields;
pub mod microvm;
pub mod types;
pub mod workload_spec;

pub use crate::error::ConfigError;
pub use microvm::{
    console_file_problem, host_memory_mib, HostLimits, LogLevel, MicroVmConfig, NetworkScope, ParsedOptions, Rootfs,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_CMDLINE_LEN, MAX_VCPUS,
};
pub use types::{EnvPair, Ipv4Subnet, LinuxRlimit, PathPair, PortPair, RLIMIT_NAMES};
