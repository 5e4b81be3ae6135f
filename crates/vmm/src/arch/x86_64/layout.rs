//! Guest physical memory layout. `docs/boot-contract.md` documents the same numbers for guests.

/// Global descriptor table written by the VMM.
pub const GDT_ADDR: u64 = 0x500;
/// One empty IDT entry: any exception before the guest loads its own IDT triple-faults.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the Linux 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the Linux 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: the MP table lives here and RAM entry 1 ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: no RAM in `[MMIO_GAP_START, MMIO_GAP_END)`.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where KVM puts the three pages of its real-mode TSS (inside the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Guest RAM as host mappings: `(guest address, size)` around the MMIO gap.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

/// RAM as the guest is told about it (e820 / PVH memmap): `(start, size)`, type RAM.
pub fn ram_map(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut map = vec![(0, EBDA_START)];
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START));
    }
    if mem_bytes > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START));
    }
    map
}

/// End of the RAM below the MMIO gap.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_two_map_entries() {
        let mib = 1 << 20;
        assert_eq!(ram_regions(256 * mib), vec![(0, 256 * mib)]);
        assert_eq!(ram_map(256 * mib), vec![(0, EBDA_START), (HIMEM_START, 256 * mib - HIMEM_START)]);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let mem = 4u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]);
        let map = ram_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(map[2], (MMIO_GAP_END, mem - MMIO_GAP_START));
        let total: u64 = ram_regions(mem).iter().map(|r| r.1).sum();
        assert_eq!(total, mem);
    }
}
