//! Guest RAM: anonymous private mappings laid out around the MMIO gap, with a bitmap of the
//! pages the VMM itself writes (device DMA), which incremental snapshots add to KVM's dirty log.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM as every part of the VMM sees it.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

use crate::arch::layout::ram_regions;
use crate::error::{Error, Result};

pub fn create(memory_mib: u32) -> Result<GuestRam> {
    let bytes = u64::from(memory_mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(bytes).into_iter().map(|(addr, size)| (GuestAddress(addr), size as usize)).collect();
    GuestRam::from_ranges(&ranges).map_err(|e| Error::Memory { mib: memory_mib, reason: e.to_string() })
}
