//! Intel MultiProcessor Specification 1.4 table: how an SMP guest finds its CPUs and IOAPIC.

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::error::{Error, Result};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// One interrupt entry per IOAPIC pin: Linux only routes pins the table lists, and virtio
/// devices use GSIs 5..=23.
const IOAPIC_PINS: u8 = 24;
/// Room the table may take below 640 KiB.
const MAX_TABLE_SIZE: usize = 0xa0000 - EBDA_START as usize;

/// Most vCPUs the VMM offers (Firecracker's bound); their table fits below 640 KiB.
pub const MAX_CPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// The floating pointer followed by the configuration table, laid out for `EBDA_START`.
pub fn build(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 2;
    for irq in 0..IOAPIC_PINS {
        // type 3 (I/O interrupt), INT, conforming polarity/trigger, ISA bus 0 → IOAPIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT, LINT1 = NMI, to every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MICROCEL");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev 1.4
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&table);
    fp
}

pub fn write(mem: &GuestRam, num_cpus: u8) -> Result<()> {
    let bytes = build(num_cpus);
    if bytes.len() > MAX_TABLE_SIZE {
        return Err(Error::Config(format!("{num_cpus} vCPUs do not fit in the MP table")));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| Error::Config(format!("cannot write the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_cpus_are_listed() {
        let t = build(4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 2 + 24 + 2);
        // First processor entry is the BSP with APIC id 0.
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOTSTRAP]);
    }

    #[test]
    fn the_largest_table_fits_the_ebda() {
        assert!(build(MAX_CPUS).len() <= MAX_TABLE_SIZE);
    }
}
