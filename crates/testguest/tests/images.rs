//! Each guest image exists and has the format its entry needs (no KVM involved).

use std::fs;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Program headers of an ELF64: (type, offset, paddr, filesz, memsz, flags).
fn phdrs(elf: &[u8]) -> Vec<(u32, usize, u64, usize, u64, u32)> {
    let (phoff, phentsize, phnum) = (u64_at(elf, 0x20) as usize, u16_at(elf, 0x36) as usize, u16_at(elf, 0x38));
    (0..phnum as usize)
        .map(|i| {
            let p = phoff + i * phentsize;
            let t = u32_at(elf, p);
            (
                t,
                u64_at(elf, p + 8) as usize,
                u64_at(elf, p + 0x18),
                u64_at(elf, p + 0x20) as usize,
                u64_at(elf, p + 0x28),
                u32_at(elf, p + 4),
            )
        })
        .collect()
}

/// The PVH entry from a `XEN_ELFNOTE_PHYS32_ENTRY` note named "Xen", if any.
fn pvh_entry(elf: &[u8]) -> Option<u32> {
    for (t, off, _, filesz, _, _) in phdrs(elf) {
        if t != 4 {
            continue; // PT_NOTE only
        }
        let notes = &elf[off..off + filesz];
        let mut pos = 0;
        while pos + 12 <= notes.len() {
            let (namesz, descsz, ntype) =
                (u32_at(notes, pos) as usize, u32_at(notes, pos + 4) as usize, u32_at(notes, pos + 8));
            let name = &notes[pos + 12..pos + 12 + namesz];
            let desc = pos + 12 + namesz.next_multiple_of(4);
            if ntype == 18 && name == b"Xen\0" && descsz >= 4 {
                return Some(u32_at(notes, desc));
            }
            pos = desc + descsz.next_multiple_of(4);
        }
    }
    None
}

/// The loaded bytes at a physical address (from the PT_LOAD that holds it).
fn bytes_at(elf: &[u8], addr: u64, n: usize) -> &[u8] {
    let (_, off, paddr, ..) = phdrs(elf)
        .into_iter()
        .find(|&(t, _, paddr, filesz, _, _)| t == 1 && addr >= paddr && addr + n as u64 <= paddr + filesz as u64)
        .unwrap_or_else(|| panic!("{addr:#x} is not in a loaded segment"));
    &elf[off + (addr - paddr) as usize..][..n]
}

#[test]
fn every_image_exists() {
    for name in testguest::ALL {
        let p = testguest::path(name);
        assert!(fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false), "{} missing or empty", p.display());
    }
}

#[test]
fn elf_images_load_at_1mib_and_have_the_pvh_note_iff_named_pvh() {
    for name in testguest::ALL.iter().filter(|n| n.ends_with(".elf")) {
        let elf = fs::read(testguest::path(name)).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF", "{name}: ELF magic");
        assert_eq!((elf[4], elf[5]), (2, 1), "{name}: ELF64 little-endian");
        assert_eq!(u16_at(&elf, 0x12), 62, "{name}: EM_X86_64");
        assert_eq!(u32_at(&elf, 0x30), 0, "{name}: e_flags 0 (QEMU refuses others)");
        let loads: Vec<_> = phdrs(&elf).into_iter().filter(|p| p.0 == 1).collect();
        assert_eq!(loads[0].2, 0x100000, "{name}: first PT_LOAD p_paddr");
        assert!(loads.iter().all(|p| p.2 >= 0x100000 && p.3 > 0), "{name}: segments at or above 1 MiB, none empty");
        match (testguest::is_pvh(name), pvh_entry(&elf)) {
            (true, Some(entry)) => {
                let exec = loads.iter().any(|&(_, _, paddr, filesz, _, flags)| {
                    flags & 1 != 0 && (paddr..paddr + filesz as u64).contains(&u64::from(entry))
                });
                assert!(exec, "{name}: PVH entry {entry:#x} is not in an executable segment");
            }
            (false, None) => {}
            (pvh, note) => panic!("{name}: named pvh={pvh} but PVH note {note:x?}"),
        }
    }
}

#[test]
fn hello_first_port_access_is_the_thr_write() {
    let elf = fs::read(testguest::path(testguest::HELLO)).unwrap();
    let entry = pvh_entry(&elf).unwrap();
    // mov $0x3f8,%dx; mov $'H',%al; out %al,(%dx)
    assert_eq!(bytes_at(&elf, entry.into(), 7), [0x66, 0xba, 0xf8, 0x03, 0xb0, b'H', 0xee]);
}

#[test]
fn bootcheck_elfs_differ_only_by_the_note_and_enter_at_linux64_entry() {
    let plain = fs::read(testguest::path(testguest::BOOTCHECK_ELF)).unwrap();
    let pvh = fs::read(testguest::path(testguest::BOOTCHECK_PVH)).unwrap();
    assert_eq!(u64_at(&plain, 0x18), u64_at(&pvh, 0x18), "same e_entry");
    // the 64-bit entries start by saving rax (mov %rax, disp32(%rip): 48 89 05)
    assert_eq!(bytes_at(&plain, u64_at(&plain, 0x18), 3), [0x48, 0x89, 0x05]);
    assert!(pvh_entry(&pvh).is_some() && pvh_entry(&plain).is_none());
}

#[test]
fn bzimage_has_a_64bit_setup_header_and_the_bootcheck_image() {
    let bz = fs::read(testguest::path(testguest::BOOTCHECK_BZIMAGE)).unwrap();
    assert_eq!(&bz[0x202..0x206], b"HdrS");
    assert_eq!(u16_at(&bz, 0x1fe), 0xaa55, "boot_flag");
    assert!(u16_at(&bz, 0x206) >= 0x020c, "boot protocol version");
    assert_eq!(bz[0x211] & 1, 1, "loadflags LOADED_HIGH");
    assert_eq!(u16_at(&bz, 0x236) & 1, 1, "xloadflags XLF_KERNEL_64");
    assert_eq!(u32_at(&bz, 0x214), 0x100000, "code32_start");
    assert_eq!(u16_at(&bz, 0x20e), 0, "kernel_version 0: not Linux");
    let setup = (bz[0x1f1] as usize + 1) * 512;
    let pm = &bz[setup..];
    assert_eq!(u32_at(&bz, 0x1f4) as usize, pm.len().div_ceil(16), "syssize");
    // The protected-mode part is bootcheck.elf as loaded at 1 MiB; its 64-bit entry at +0x200.
    let elf = fs::read(testguest::path(testguest::BOOTCHECK_ELF)).unwrap();
    for (t, off, paddr, filesz, ..) in phdrs(&elf) {
        if t == 1 {
            let at = (paddr - 0x100000) as usize;
            assert_eq!(&pm[at..at + filesz], &elf[off..off + filesz], "segment at {paddr:#x}");
        }
    }
    assert_eq!(&pm[0x200..0x203], [0x48, 0x89, 0x05], "64-bit entry at +0x200");
    let end = phdrs(&elf).iter().filter(|p| p.0 == 1).map(|p| p.2 + p.4).max().unwrap();
    assert!(u64::from(u32_at(&bz, 0x260)) >= end - 0x100000, "init_size covers .bss");
}
