//! Initial register state of the boot vCPU: GDT, segments, control registers, page tables.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::error::{Error, Result};

/// How the guest is entered (`docs/boot-contract.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = zero page.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh { entry: u64 },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// GDT entries as the contract lists them.
const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;

/// Decodes a GDT descriptor into the form KVM_SET_SREGS takes.
fn segment(descriptor: u64, index: u16) -> kvm_segment {
    let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
    let raw_limit = (descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16);
    let flag = |bit: u64| ((descriptor >> bit) & 1) as u8;
    let g = flag(55);
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: flag(47),
        dpl: ((descriptor >> 45) & 0x3) as u8,
        db: flag(54),
        s: flag(44),
        l: flag(53),
        g,
        avl: flag(52),
        unusable: 0,
        padding: 0,
    }
}

fn write_u64s(mem: &GuestRam, addr: u64, values: &[u64]) -> Result<()> {
    for (i, v) in values.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(addr + 8 * i as u64))
            .map_err(|e| Error::Config(format!("guest memory too small for boot structures: {e}")))?;
    }
    Ok(())
}

/// Identity map of the first GiB with 2 MiB pages, as the Linux 64-bit entry requires.
fn write_page_tables(mem: &GuestRam) -> Result<()> {
    write_u64s(mem, PML4_ADDR, &[PDPT_ADDR | 0x03])?;
    write_u64s(mem, PDPT_ADDR, &[PD_ADDR | 0x03])?;
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x83).collect();
    write_u64s(mem, PD_ADDR, &pd)
}

/// Sets sregs (and writes the GDT, IDT and page tables they point at) for `mode`.
pub fn setup_sregs(vcpu: &VcpuFd, mem: &GuestRam, mode: EntryMode) -> Result<()> {
    let code = match mode {
        EntryMode::Linux64 { .. } => GDT_CODE64,
        EntryMode::Pvh { .. } => GDT_CODE32,
    };
    let gdt = [GDT_NULL, code, GDT_DATA, GDT_TSS];
    write_u64s(mem, GDT_ADDR, &gdt)?;
    write_u64s(mem, IDT_ADDR, &[0])?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(GDT_DATA, 2);
    sregs.cs = segment(code, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS, 3);

    match mode {
        EntryMode::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

/// General-purpose registers at the entry point.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<()> {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match mode {
        EntryMode::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
    }
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

/// x87 control word and MXCSR at their architectural reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_like_the_contract_says() {
        let cs = segment(GDT_CODE64, 1);
        assert_eq!((cs.selector, cs.l, cs.db, cs.type_, cs.present, cs.s), (0x8, 1, 0, 0xb, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(GDT_CODE32, 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment(GDT_DATA, 2);
        assert_eq!((ds.selector, ds.type_, ds.base), (0x10, 3, 0));
        let tr = segment(GDT_TSS, 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
    }
}
