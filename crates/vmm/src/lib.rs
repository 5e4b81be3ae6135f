//! microcell's VMM: guest memory, vCPUs, devices and boot on KVM, built on the rust-vmm crates.
//!
//! Layout (Firecracker's `src/vmm` is the model): `arch/` (layout, boot protocols, CPU state),
//! `vstate/` (VM, memory, vCPU threads, lifecycle), `devices/` (one bus, one device trait),
//! `host` (what this host's KVM can run), `config` (what a VM is made of), `builder` (boot and
//! restore), `persist` (snapshots), `handle` (the running VM's handle).

pub mod arch;
mod builder;
mod config;
mod device_manager;
pub mod devices;
pub mod egress;
mod error;
pub mod event_loop;
mod exit;
mod handle;
pub mod host;
pub mod memory;
mod persist;
pub mod run_dir;
mod seccomp;
pub mod snapshot;
pub mod state;
pub mod vstate;

pub use builder::VmShell;
pub use config::{
    BlockDeviceConfig, NetworkConfig, RestoreOptions, VmConfig, CONTROL_PORT_NAME, DEFAULT_CMDLINE, MIN_MEMORY_MIB,
};
pub use devices::virtio::net::{size_stream_buffers, MAX_FRAME};
pub use egress::{EgressPolicy, Ipv4Net, LivePolicy};
pub use error::{Error, Result};
pub use exit::ExitReason;
pub use handle::{Timings, Vm};
pub use persist::{LoadedSnapshot, SNAPSHOT_MEMORY_FILE, SNAPSHOT_STATE_FILE};
