//! T3: the T2 suite on the built-in VMM (engine `kvm`). `#[ignore]`d: scripts/test.sh runs it
//! where a stock Linux kernel boots on this host's KVM (hardware KVM), or inside the nested VM
//! (`MICROCELL_NESTED=1`); elsewhere it counts as skipped, with the reason libtest prints.
//!
//! Also here, because they run on every host with /dev/kvm (PVM included): the kvm engine's
//! plumbing with freestanding test guests (crates/testguest) in place of Linux — root disk
//! clone and cleanup, console, exit reasons, and the sandbox's boot errors on that engine.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sandbox::engine::kvm::KvmEngine;
use sandbox::engine::{self, BootSpec, Engine, EngineChoice, EngineKind, EngineSelection, VmExit};
use sandbox::{Sandbox, SandboxConfig};

const ENGINE: EngineChoice = EngineChoice::Kvm;

/// T3's lock, after checking the host can run it (the T3 tests are #[ignore]d elsewhere).
fn t3() -> std::sync::MutexGuard<'static, ()> {
    require_linux_kvm();
    let guard = serial();
    images();
    guard
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_create_ready_stop() {
    let _g = t3();
    create_ready_stop(ENGINE, EngineKind::Kvm);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_exec_and_files() {
    let _g = t3();
    exec_and_files(ENGINE);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_workload() {
    let _g = t3();
    workload(ENGINE);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_twenty_cycles_leak_nothing() {
    let _g = t3();
    cycles(ENGINE, EngineKind::Kvm, 20);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_missing_kernel() {
    let _g = t3();
    missing_kernel(ENGINE);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_corrupt_root_disk() {
    let _g = t3();
    corrupt_root(ENGINE);
}

#[test]
#[ignore = "T3: needs KVM that boots Linux; scripts/test.sh runs it on such a host, or in the nested VM with MICROCELL_NESTED=1"]
fn t3_silent_agent_times_out() {
    let _g = t3();
    silent_agent(ENGINE);
}

#[test]
fn engine_kvm_where_linux_cannot_boot_is_e_engine_unavailable() {
    let host = vmm::host::cached();
    let e = Sandbox::create(config(ENGINE)).err();
    match (host.kvm_device, host.can_boot_linux) {
        (_, true) => return, // T3 covers it
        (false, _) => assert_eq!(e.unwrap().code(), "E_NO_KVM"),
        (true, false) => {
            let e = e.unwrap();
            assert_eq!(e.code(), "E_ENGINE_UNAVAILABLE");
            assert!(e.to_string().contains(&host.reason) && e.to_string().contains("'qemu'"), "{e}");
        }
    }
    // And `auto` says why it picks QEMU.
    let s = engine::select(EngineChoice::Auto).unwrap();
    assert_eq!(s.kind, EngineKind::Qemu);
    assert!(s.reason.contains(&host.reason), "{}", s.reason);
}

// ---- the kvm engine's plumbing with freestanding test guests (T1 level) ----

/// A small root disk for the test guests (they do not read it; the engine clones it).
fn scratch_disk(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"microcell test disk", 0).unwrap();
    p
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn kvm_engine_runs_a_guest_on_a_private_disk_copy_and_cleans_up() {
    require_kvm();
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path());
    let mut spec = BootSpec::new(testguest::path(testguest::HELLO), &disk);
    spec.memory_mib = 64;
    spec.console_queue_bytes = Some(4096);
    spec.console_file = Some(dir.path().join("console.log"));
    let engine = KvmEngine::new();
    assert_eq!(engine.kind(), EngineKind::Kvm);
    let vm = engine.boot(&spec).unwrap();
    assert_eq!(vm.pid(), None);
    assert!(vm.take_channel().is_some(), "the control channel");
    assert!(vm.take_channel().is_none());
    let dirs = run_dirs();
    assert_eq!(dirs.len(), 1, "one per-VM directory while it runs: {dirs:?}");
    let copy = std::env::temp_dir().join(&dirs[0]).join("rootfs.img");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap(), "the guest's disk is a copy of the image");
    assert_eq!(vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::GuestReset));
    assert!(vm.console_tail().contains("Hello from a microcell test guest"), "{}", vm.console_tail());
    let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(log.contains("Hello from a microcell test guest"), "{log}");
    drop(vm);
    assert_nothing_left("a kvm engine VM");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn kvm_engine_kill_and_drop_end_a_running_guest() {
    require_kvm();
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let disk = scratch_disk(dir.path());
    let mut spec = BootSpec::new(testguest::path(testguest::SPIN), &disk);
    spec.memory_mib = 64;
    let engine = KvmEngine::new();
    let vm = engine.boot(&spec).unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(200)), None, "spinning");
    vm.kill();
    assert_eq!(vm.wait_timeout(Duration::from_secs(5)), Some(VmExit::Killed));
    drop(vm);
    let vm = engine.boot(&spec).unwrap();
    drop(vm); // still running: dropping kills it and removes the disk copy
    assert_nothing_left("dropping a running kvm engine VM");
}

fn kvm_selection() -> EngineSelection {
    EngineSelection { kind: EngineKind::Kvm, reason: "test".into() }
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn sandbox_on_kvm_a_guest_that_resets_is_e_agent_exited_with_its_console() {
    require_kvm();
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SandboxConfig {
        kernel: Some(testguest::path(testguest::HELLO)),
        rootfs: Some(scratch_disk(dir.path())),
        memory_mib: 64,
        ..Default::default()
    };
    let t = Instant::now();
    let e = Sandbox::create_on(cfg, &KvmEngine::new(), kvm_selection()).err().expect("no agent in a test guest");
    assert_eq!(e.code(), "E_AGENT_EXITED", "{e}");
    assert!(e.to_string().contains("Hello from a microcell test guest"), "the console tail is in the message: {e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_nothing_left("E_AGENT_EXITED on kvm");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn sandbox_on_kvm_a_guest_that_never_answers_is_e_boot_timeout() {
    require_kvm();
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SandboxConfig {
        kernel: Some(testguest::path(testguest::HALT)),
        rootfs: Some(scratch_disk(dir.path())),
        memory_mib: 64,
        boot_timeout_ms: 500,
        ..Default::default()
    };
    let t = Instant::now();
    let e = Sandbox::create_on(cfg, &KvmEngine::new(), kvm_selection()).err().expect("no agent in a test guest");
    let took = t.elapsed();
    assert_eq!(e.code(), "E_BOOT_TIMEOUT", "{e}");
    assert!(e.to_string().contains("TG halt"), "the console tail is in the message: {e}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500), "took {took:?}");
    assert_nothing_left("E_BOOT_TIMEOUT on kvm");
}
