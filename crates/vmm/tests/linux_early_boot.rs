//! T1.5: the real guest kernel (ELF vmlinux, PVH entry) on our VMM, checked through the
//! kernel's own early printk lines: the command line as passed, the e820 map matching the
//! configured RAM, the initrd location and size, and KVM detected.
//!
//! On hardware KVM the kernel boots on and panics for want of a root disk (`panic=1` → reset);
//! on PVM hosts it stops where PVM cannot emulate it (`E_KVM_INTERNAL_ERROR`, HOST.md). Both
//! ends are expected; anything else fails. Needs the kernel from `scripts/guest/build-kernel.sh`.

use std::path::PathBuf;
use std::time::Duration;

use vmm::arch::layout::{low_ram_end, MMIO_GAP_START};
use vmm::host::{self, KvmFlavour};
use vmm::{ExitReason, Vm, VmConfig};

mod common;
use common::{require_kvm, Capture};

fn kernel() -> Option<PathBuf> {
    let dir = std::env::var_os("MICROCELL_KERNEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("MICROCELL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/microcell"));
        cache.join("kernel-current")
    });
    Some(dir.join("vmlinux")).filter(|p| p.exists())
}

/// Boots the kernel; with `to_the_end` false, stops it once the early lines are out.
fn run(memory_mib: u32, to_the_end: bool) {
    require_kvm();
    let kernel = kernel().unwrap_or_else(|| {
        panic!("the guest kernel is missing: run scripts/guest/build-kernel.sh (or set MICROCELL_KERNEL_DIR)")
    });
    let initrd_path = std::env::temp_dir().join(format!("mc-initrd-{}-{memory_mib}", std::process::id()));
    let initrd_len = 3 * 4096 + 123;
    std::fs::write(&initrd_path, vec![0x5a; initrd_len]).unwrap();
    let cmdline = "earlyprintk=serial,ttyS0,115200 console=ttyS0 reboot=k panic=1 pci=off tg.marker=\"a b\"";
    let config = VmConfig {
        vcpus: 1,
        memory_mib,
        kernel,
        initrd: Some(initrd_path.clone()),
        cmdline: cmdline.into(),
        allow_unsupported_host: true,
        ..Default::default()
    };
    let console = Capture::default();
    let vm = Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let reason = loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(100)) {
            break Some(reason);
        }
        if !to_the_end && console.text().contains("Zone ranges:") {
            vm.kill();
            vm.wait();
            break None;
        }
        if std::time::Instant::now() > deadline {
            vm.kill();
            panic!("the kernel neither stopped nor reset within 120 s; console:\n{}", console.text());
        }
    };
    std::fs::remove_file(&initrd_path).ok();
    let out = console.text();
    let has = |needle: &str| assert!(out.contains(needle), "console lacks {needle:?}; console:\n{out}");

    has("Linux version 6.");
    has(&format!("Command line: {cmdline}"));
    has("Hypervisor detected: KVM");
    let mem = u64::from(memory_mib) << 20;
    has("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable");
    has(&format!("BIOS-e820: [mem 0x0000000000100000-{:#018x}] usable", low_ram_end(mem) - 1));
    if mem > MMIO_GAP_START {
        has(&format!("BIOS-e820: [mem 0x0000000100000000-{:#018x}] usable", 0x1_0000_0000 + mem - MMIO_GAP_START - 1));
    }
    let initrd_start = (low_ram_end(mem) - initrd_len as u64) & !0xfff;
    // Linux prints the initrd's end rounded up to a page.
    let initrd_end = (initrd_start + initrd_len as u64).next_multiple_of(4096);
    has(&format!("RAMDISK: [mem {:#010x}-{:#010x}]", initrd_start, initrd_end - 1));
    has("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]");

    let last_line = out.lines().rfind(|l| l.starts_with('[')).unwrap_or("");
    println!("{memory_mib} MiB: the kernel got to {last_line:?}; end: {reason:?}");
    let Some(reason) = reason else { return };
    match host::cached().kvm_flavour {
        KvmFlavour::Pvm => assert!(
            matches!(&reason, ExitReason::Crashed { code, .. } if code == "E_KVM_INTERNAL_ERROR"),
            "on PVM the kernel is expected to stop with E_KVM_INTERNAL_ERROR, got {reason:?}"
        ),
        _ => assert_eq!(reason, ExitReason::Reset, "with panic=1 and no root disk the kernel resets; console:\n{out}"),
    }
}

#[test]
fn a_linux_kernel_is_refused_where_it_cannot_boot() {
    let (Some(kernel), false) = (kernel(), host::cached().can_boot_linux) else {
        println!(
            "SKIP a_linux_kernel_is_refused_where_it_cannot_boot: this host boots Linux, or the kernel is not built"
        );
        return;
    };
    let config = VmConfig { vcpus: 1, memory_mib: 128, kernel, cmdline: "console=ttyS0".into(), ..Default::default() };
    let err = Vm::start(&config, Box::new(std::io::sink())).err().expect("refused");
    assert_eq!(err.code(), "E_UNSUPPORTED_GUEST");
    assert!(err.to_string().contains("qemu"), "the message says what to do instead: {err}");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn linux_early_boot_256mib() {
    run(256, true);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn linux_early_boot_above_the_mmio_gap() {
    run(3584, false);
}
