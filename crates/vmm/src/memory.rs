//! Guest RAM: anonymous private mappings at the ranges the architecture lays out (around the
//! MMIO gap: `arch::layout::ram_regions`), with a bitmap of the pages the VMM itself writes
//! (device DMA), which incremental snapshots add to KVM's dirty log. Every layer sees guest RAM
//! through this one type (the boot code, the devices, the KVM VM), so it sits below them all.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Guest RAM as every part of the VMM sees it.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// `memory_mib` of RAM mapped at `regions` (guest address, bytes), which add up to it.
pub fn create(memory_mib: u32, regions: &[(u64, u64)]) -> Result<GuestRam> {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(addr, size)| (GuestAddress(addr), size as usize)).collect();
    GuestRam::from_ranges(&ranges).map_err(|e| Error::Memory { mib: memory_mib, reason: e.to_string() })
}
