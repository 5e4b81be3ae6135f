//! The KVM VM: memory slots first, then TSS, in-kernel irqchip and PIT (HOST.md: registering
//! memory after the irqchip exists costs ~7.6 ms per 256 MiB slot on PVM hosts).

use crate::memory::GuestRam;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDR;
use crate::arch::vm_state::{self, VmState};
use crate::error::{Error, Result};
use crate::state::Persist;

pub struct Vm {
    fd: VmFd,
    /// (slot, size) of each memory slot, for reading dirty logs.
    slots: Vec<(u32, usize)>,
}

impl Vm {
    /// `track_dirty`: KVM logs the pages the guest writes (incremental snapshots).
    pub fn new(kvm: &Kvm, memory: &GuestRam, track_dirty: bool) -> Result<Vm> {
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let mut slots = Vec::new();
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory { mib: 0, reason: e.to_string() })?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if track_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            };
            slots.push((slot as u32, region.len() as usize));
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by the
            // GuestRam, which `VmResources` keeps alive (and drops after this VmFd).
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        Ok(Vm { fd, slots })
    }

    /// Per memory slot, a bitmap (one bit per 4 KiB page) of the pages the guest wrote since
    /// the last call; reading it clears it.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        self.slots
            .iter()
            .map(|&(slot, size)| self.fd.get_dirty_log(slot, size).map_err(Error::kvm("KVM_GET_DIRTY_LOG")))
            .collect()
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

/// The process's one `/dev/kvm` handle, opened on first use.
pub(crate) fn kvm() -> Result<&'static Kvm> {
    static KVM: std::sync::OnceLock<Kvm> = std::sync::OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = Kvm::new().map_err(Error::NoKvm)?;
    Ok(KVM.get_or_init(|| k))
}

/// The irqchip, PIT and clock (`arch::vm_state`).
impl Persist for Vm {
    type State = VmState;
    type Error = Error;

    fn save(&self) -> Result<VmState> {
        vm_state::save(self.fd())
    }

    fn restore(&mut self, state: &VmState) -> Result<()> {
        vm_state::restore(self.fd(), state)
    }
}
