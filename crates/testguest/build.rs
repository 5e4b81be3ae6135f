//! Builds the test guests from guest/ with the host's gcc and ld (no cross toolchain needed:
//! they are x86_64 ELF objects linked freestanding at 1 MiB by guest/guest.ld), and packages
//! bootcheck as a bzImage. Outputs: $OUT_DIR/guests/<name>, see src/lib.rs.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// Setup header values of bootcheck.bzimage, also passed to the C code so that it can check the
/// copy the VMM puts in the zero page.
const SETUP_SECTS: u32 = 1;
const BOOT_VERSION: u32 = 0x020c; // 2.12: xloadflags (XLF_KERNEL_64), init_size
const LOAD_ADDR: u64 = 0x100000;

const SOURCES: &[&str] = &[
    "guest.ld",
    "tg.h",
    "entry.S",
    "pvh_note.S",
    "tiny.S",
    "setup.S",
    "ioloop.c",
    "rt.c",
    "bootcheck.c",
    "memtouch.c",
    "compute.c",
    "virtio.c",
];

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mno-red-zone",       // the exception stubs and entry code push on the same stack
    "-mgeneral-regs-only", // no SSE: the PVH path never enables it (CR4.OSFXSR)
    "-mcmodel=small",      // linked below 2 GiB, where it runs (identity map)
];

fn main() {
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let objs = out.join("obj");
    let guests = out.join("guests");
    fs::create_dir_all(&objs).unwrap();
    fs::create_dir_all(&guests).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
    for s in SOURCES {
        println!("cargo:rerun-if-changed=guest/{s}");
    }
    println!("cargo:rustc-env=TESTGUEST_DIR={}", guests.display());

    let defines = [format!("-DTG_SETUP_SECTS={SETUP_SECTS}"), format!("-DTG_BOOT_VERSION={BOOT_VERSION:#x}")];
    let cc = |source: &str, obj: &str, extra: &[&str]| -> PathBuf {
        let o = objs.join(obj);
        run(Command::new("gcc")
            .args(CFLAGS)
            .args(&defines)
            .args(extra)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(source))
            .arg("-o")
            .arg(&o));
        o
    };
    let ld = |name: &str, entry: &str, inputs: &[&PathBuf]| -> PathBuf {
        let elf = guests.join(name);
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none"])
            // max-page-size: a smaller one makes ld load the ELF headers below 1 MiB
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack", "-z", "noseparate-code"])
            .arg("-T")
            .arg(src.join("guest.ld"))
            .args(["-e", entry])
            .args(inputs)
            .arg("-o")
            .arg(&elf));
        elf
    };

    let entry = cc("entry.S", "entry.o", &[]);
    let note = cc("pvh_note.S", "pvh_note.o", &[]);
    let rt = cc("rt.c", "rt.o", &[]);
    let bootcheck = cc("bootcheck.c", "bootcheck.o", &[]);
    let memtouch = cc("memtouch.c", "memtouch.o", &[]);
    let virtio = cc("virtio.c", "virtio.o", &[]);
    let compute = cc("compute.c", "compute.o", &[]);

    // bootcheck: the same program three times. e_entry is the Linux 64-bit entry in both ELFs;
    // the PVH note (pvh_note.o) is what makes a VMM take the 32-bit PVH entry instead.
    let elf = ld("bootcheck.elf", "linux64_entry", &[&entry, &rt, &bootcheck]);
    ld("bootcheck.pvh.elf", "linux64_entry", &[&entry, &rt, &bootcheck, &note]);
    ld("memtouch.pvh.elf", "pvh_entry", &[&entry, &rt, &memtouch, &note]);
    ld("virtio.pvh.elf", "pvh_entry", &[&entry, &rt, &virtio, &note]);
    ld("compute.pvh.elf", "pvh_entry", &[&entry, &rt, &compute, &note]);
    for (name, def) in
        [("hello", "-DTG_HELLO"), ("halt", "-DTG_HALT"), ("spin", "-DTG_SPIN"), ("triplefault", "-DTG_TRIPLEFAULT")]
    {
        let o = cc("tiny.S", &format!("tiny_{name}.o"), &[def]);
        ld(&format!("{name}.pvh.elf"), "pvh_entry", &[&o, &note]);
    }
    let ioloop = cc("ioloop.c", "ioloop.o", &[]);
    ld("ioloop.pvh.elf", "pvh_entry", &[&entry, &rt, &ioloop, &note]);

    // bootcheck.bzimage = setup area + bootcheck.elf flattened from 1 MiB.
    let flat = flatten(&fs::read(&elf).unwrap());
    // .bss included, to the page: guest.ld ends the image (__image_end) page aligned too
    let init_size = load_end(&fs::read(&elf).unwrap()).next_multiple_of(4096) - LOAD_ADDR;
    let setup_o = cc(
        "setup.S",
        "setup.o",
        &[&format!("-DTG_SYSSIZE={}", flat.len().div_ceil(16)), &format!("-DTG_INIT_SIZE={init_size:#x}")],
    );
    let setup_bin = objs.join("setup.bin");
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "--oformat", "binary", "-Ttext=0", "-e", "_start"])
        .arg(&setup_o)
        .arg("-o")
        .arg(&setup_bin));
    let mut bz = fs::read(&setup_bin).unwrap();
    assert_eq!(bz.len(), (SETUP_SECTS as usize + 1) * 512, "setup area size");
    bz.extend_from_slice(&flat);
    fs::write(guests.join("bootcheck.bzimage"), bz).unwrap();
}

fn run(cmd: &mut Command) {
    let status =
        cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (the test guests need gcc and binutils)"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// The PT_LOAD segments of a little-endian ELF64: (p_offset, p_paddr, p_filesz, p_memsz).
fn loads(elf: &[u8]) -> Vec<(usize, u64, usize, u64)> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .map(|ph| (u64_at(ph + 8) as usize, u64_at(ph + 0x18), u64_at(ph + 0x20) as usize, u64_at(ph + 0x28)))
        .collect()
}

/// The loaded image as one flat blob from LOAD_ADDR (what a bzImage carries), .bss left out.
fn flatten(elf: &[u8]) -> Vec<u8> {
    let mut flat = Vec::new();
    for (off, paddr, filesz, _) in loads(elf) {
        assert!(paddr >= LOAD_ADDR, "segment below the load address");
        let at = (paddr - LOAD_ADDR) as usize;
        if flat.len() < at + filesz {
            flat.resize(at + filesz, 0);
        }
        flat[at..at + filesz].copy_from_slice(&elf[off..off + filesz]);
    }
    flat
}

/// Where the loaded image ends in memory (.bss included).
fn load_end(elf: &[u8]) -> u64 {
    loads(elf).iter().map(|&(_, paddr, _, memsz)| paddr + memsz).max().unwrap()
}
