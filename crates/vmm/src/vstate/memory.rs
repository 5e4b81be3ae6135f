//! Guest RAM: anonymous private mappings laid out around the MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::ram_regions;
use crate::error::{Error, Result};

pub fn create(memory_mib: u32) -> Result<GuestMemoryMmap> {
    let bytes = u64::from(memory_mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(bytes).into_iter().map(|(addr, size)| (GuestAddress(addr), size as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory { mib: memory_mib, reason: e.to_string() })
}
