//! Loading a kernel (ELF vmlinux with or without a PVH note, or bzImage), its initrd and command
//! line, and writing what the chosen boot protocol hands the kernel.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::memory::GuestRam;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::regs::EntryMode;
use crate::error::{Error, Result};

const E820_RAM: u32 = 1;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// What kind of program a kernel image holds, read from the file without loading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// A Linux kernel: an ELF with a "Linux" note, or a bzImage that names its version.
    Linux,
    /// Anything else that boots through the same protocols (e.g. our test guests).
    Other,
}

/// The kernel after loading: where to enter, and where its image ends.
pub struct LoadedKernel {
    pub entry: EntryMode,
    pub kernel_end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn format_error(path: &Path, reason: impl ToString) -> Error {
    Error::KernelFormat { path: path.to_owned(), reason: reason.to_string() }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::KernelNotFound { path: path.to_owned(), source })
}

/// Reads the ELF notes or the bzImage header to tell a Linux kernel from other guests.
pub fn kernel_kind(path: &Path) -> Result<KernelKind> {
    let mut f = open(path)?;
    let mut ident = [0u8; 64];
    let n = f.read(&mut ident).map_err(|e| format_error(path, e))?;
    if n >= 64 && ident[..4] == *b"\x7fELF" {
        return elf_has_linux_note(&mut f, &ident).map_err(|e| format_error(path, e)).map(|linux| {
            if linux {
                KernelKind::Linux
            } else {
                KernelKind::Other
            }
        });
    }
    // bzImage: kernel_version (0x20e) points at a version string when the image is Linux.
    let mut hdr = [0u8; 0x10];
    f.seek(SeekFrom::Start(0x202)).and_then(|_| f.read_exact(&mut hdr)).map_err(|e| format_error(path, e))?;
    if u32::from_le_bytes(hdr[0..4].try_into().unwrap()) != HDR_MAGIC {
        return Err(format_error(path, "neither ELF magic nor a bzImage 'HdrS' header"));
    }
    let kernel_version = u16::from_le_bytes([hdr[0xc], hdr[0xd]]);
    Ok(if kernel_version != 0 { KernelKind::Linux } else { KernelKind::Other })
}

fn elf_has_linux_note(f: &mut File, ehdr: &[u8; 64]) -> std::io::Result<bool> {
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(ehdr, 0x20), u16_at(ehdr, 0x36), u16_at(ehdr, 0x38));
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))?;
        f.read_exact(&mut ph)?;
        const PT_NOTE: u32 = 4;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(1 << 20));
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut notes)?;
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let namesz = u32_at(&notes, pos) as usize;
            let descsz = u32_at(&notes, pos + 4) as usize;
            let name = notes.get(pos + 12..pos + 12 + namesz).unwrap_or_default();
            if name.strip_suffix(b"\0").unwrap_or(name) == b"Linux" {
                return Ok(true);
            }
            pos += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(false)
}

/// Loads the kernel into guest memory at the addresses its image asks for.
pub fn load_kernel(mem: &GuestRam, path: &Path) -> Result<LoadedKernel> {
    let mut f = open(path)?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf = Elf::load(mem, None, &mut f, highmem);
    let result: KernelLoaderResult = match elf {
        Ok(r) => r,
        Err(linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            BzImage::load(mem, None, &mut f, highmem).map_err(|e| format_error(path, e))?
        }
        Err(e) => return Err(format_error(path, e)),
    };
    let entry = match (result.setup_header, result.pvh_boot_cap) {
        (Some(_), _) => EntryMode::Linux64 { entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET },
        (None, PvhBootCapability::PvhEntryPresent(addr)) => EntryMode::Pvh { entry: addr.0 },
        (None, _) => EntryMode::Linux64 { entry: result.kernel_load.0 },
    };
    if let Some(hdr) = result.setup_header {
        const XLF_KERNEL_64: u16 = 1;
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(format_error(
                path,
                "the bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)",
            ));
        }
    }
    Ok(LoadedKernel { entry, kernel_end: result.kernel_end, setup_header: result.setup_header })
}

/// The initrd as loaded: guest address and size.
#[derive(Clone, Copy, Debug)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Places the initrd page-aligned at the top of the RAM below the MMIO gap.
pub fn load_initrd(mem: &GuestRam, mem_bytes: u64, kernel_end: u64, path: &Path) -> Result<Initrd> {
    let err = |reason: String| Error::Initrd { path: path.to_owned(), reason };
    let mut f = File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let top = low_ram_end(mem_bytes);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1)).filter(|a| *a >= kernel_end).ok_or_else(|| {
        err(format!(
            "{size} bytes do not fit between the kernel's end ({kernel_end:#x}) and the top of low RAM ({top:#x}); give the VM more memory"
        ))
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(format!("cannot read it into guest memory: {e}")))?;
    Ok(Initrd { addr, size })
}

/// Writes the NUL-terminated command line at `CMDLINE_ADDR`.
pub fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<()> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE || cmdline.as_bytes().contains(&0) {
        return Err(Error::Config(format!(
            "the kernel command line must be at most {} bytes with no NUL",
            CMDLINE_MAX_SIZE - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::Config(format!("cannot write the command line: {e}")))
}

fn guest_write(mem: &GuestRam, bytes: &[u8], addr: u64) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::Config(format!("guest memory too small for boot structures: {e}")))
}

/// Writes what the entry protocol promises: the zero page, or PVH start info + memmap + modules.
pub fn write_boot_info(
    mem: &GuestRam,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<Initrd>,
) -> Result<()> {
    let map = ram_map(mem_bytes);
    match kernel.entry {
        EntryMode::Linux64 { .. } => {
            let mut params = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                params.hdr = hdr;
            } else {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDR_MAGIC;
            params.hdr.type_of_loader = LOADER_TYPE_OTHER;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmdline.len() as u32;
            if let Some(rd) = initrd {
                params.hdr.ramdisk_image = rd.addr as u32;
                params.hdr.ramdisk_size = rd.size as u32;
            }
            for (i, (addr, size)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: E820_RAM };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(|e| Error::Config(format!("cannot write the zero page: {e}")))
        }
        EntryMode::Pvh { .. } => {
            // hvm_start_info, version 1 (56 bytes), little-endian as the guest reads it.
            let mut info = Vec::with_capacity(56);
            info.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
            info.extend_from_slice(&1u32.to_le_bytes()); // version
            info.extend_from_slice(&0u32.to_le_bytes()); // flags
            info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
            info.extend_from_slice(&(if initrd.is_some() { PVH_MODLIST_ADDR } else { 0 }).to_le_bytes());
            info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
            info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
            info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
            info.extend_from_slice(&(map.len() as u32).to_le_bytes());
            info.extend_from_slice(&0u32.to_le_bytes());
            guest_write(mem, &info, PVH_INFO_ADDR)?;

            let mut memmap = Vec::with_capacity(24 * map.len());
            for (addr, size) in &map {
                memmap.extend_from_slice(&addr.to_le_bytes());
                memmap.extend_from_slice(&size.to_le_bytes());
                memmap.extend_from_slice(&E820_RAM.to_le_bytes());
                memmap.extend_from_slice(&0u32.to_le_bytes());
            }
            guest_write(mem, &memmap, PVH_MEMMAP_ADDR)?;

            if let Some(rd) = initrd {
                let mut module = Vec::with_capacity(32);
                module.extend_from_slice(&rd.addr.to_le_bytes());
                module.extend_from_slice(&rd.size.to_le_bytes());
                module.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
                module.extend_from_slice(&0u64.to_le_bytes());
                guest_write(mem, &module, PVH_MODLIST_ADDR)?;
            }
            Ok(())
        }
    }
}
