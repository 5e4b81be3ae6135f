//! What a VM is made of: the configuration a boot takes, and what a restore may change.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::mptable;
use crate::egress::EgressPolicy;
use crate::error::{Error, Result};
use crate::host;

/// Firecracker's default kernel command line, with the serial console on.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The name of the control channel's virtio-console port, which the guest looks for.
pub const CONTROL_PORT_NAME: &str = "agent";

/// Smallest guest the boot layout fits in (boot structures, kernel at 1 MiB, initrd).
pub const MIN_MEMORY_MIB: u32 = 2;

/// A raw disk image the guest sees as `/dev/vda`, `/dev/vdb`, ... in this order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// The guest's network interface. The network behind it is whatever process the caller connects
/// to `Vm::take_network()` (a user-mode network such as passt).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    pub mac: [u8; 6],
    /// What the guest may send; enforced by the device on every frame.
    #[serde(default)]
    pub egress: EgressPolicy,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Used as given, followed by one `virtio_mmio.device=` entry per virtio device.
    pub cmdline: String,
    #[serde(default)]
    pub block_devices: Vec<BlockDeviceConfig>,
    /// Adds a virtio-console port named `CONTROL_PORT_NAME`: the host end is `Vm::take_channel()`.
    #[serde(default)]
    pub control_channel: bool,
    /// Adds a virtio-net device: the host end of its frame stream is `Vm::take_network()`.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Boot a Linux kernel even where `host::detect()` says it cannot run (to study how far it gets).
    #[serde(default)]
    pub allow_unsupported_host: bool,
    /// Log the pages the guest writes, so that a snapshot after the first writes only those.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl VmConfig {
    /// Each virtio device's id, in the order they are attached (MMIO slots, `/dev/vdX`): a
    /// snapshot keys device states by these.
    pub fn virtio_ids(&self) -> Vec<String> {
        let disks = (0..self.block_devices.len()).map(|i| format!("block{i}"));
        let console = self.control_channel.then(|| "console0".to_owned());
        let net = self.network.as_ref().map(|_| "net0".to_owned());
        disks.chain(console).chain(net).collect()
    }

    /// The limits every VM meets, booted or restored (a snapshot's config is checked by this
    /// too, before any memory is reserved for it).
    pub(crate) fn check(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_CPUS {
            return Err(Error::Config(format!("vcpus must be 1..={}, got {}", mptable::MAX_CPUS, self.vcpus)));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "memory must be at least {MIN_MEMORY_MIB} MiB, got {}",
                self.memory_mib
            )));
        }
        // More than the host has cannot be backed, and its page bitmaps alone could exhaust the
        // host (2^31 MiB wants a 64 GiB bitmap: the allocation aborts the process).
        let host_mib = host::cached().host_memory_mib;
        if host_mib > 0 && u64::from(self.memory_mib) > host_mib {
            return Err(Error::Config(format!(
                "memory is {} MiB but this host has {host_mib} MiB of RAM (MemTotal): give at most {host_mib} MiB",
                self.memory_mib
            )));
        }
        Ok(())
    }
}

/// What the restored VM may differ in from the snapshotted one.
#[derive(Default)]
pub struct RestoreOptions {
    /// Disk images to use instead of the snapshot's (e.g. per-clone copies), by index.
    pub block_devices: Option<Vec<BlockDeviceConfig>>,
    /// The network device's MAC and policy instead of the snapshot's (a clone's own forwarded
    /// ports); `E_CONFIG` when the snapshot has no network device.
    pub network: Option<NetworkConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_ids_follow_the_attach_order() {
        let disk = BlockDeviceConfig { path: "/d".into(), read_only: false };
        let config = VmConfig {
            block_devices: vec![disk.clone(), disk],
            control_channel: true,
            network: Some(NetworkConfig::default()),
            ..Default::default()
        };
        assert_eq!(config.virtio_ids(), ["block0", "block1", "console0", "net0"]);
        assert!(VmConfig::default().virtio_ids().is_empty());
    }
}
