//! T1: our VMM boots our test guests (crates/testguest) on /dev/kvm, PVM included, and every
//! boot-contract check the guest makes passes.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{require_kvm, Capture};
use testguest::{bootcheck_cmdline, Report};
use vmm::{ExitReason, Vm, VmConfig};

fn config(guest: &str, memory_mib: u32, vcpus: u8, cmdline: &str) -> VmConfig {
    VmConfig { vcpus, memory_mib, kernel: testguest::path(guest), cmdline: cmdline.into(), ..Default::default() }
}

fn run_to_end(config: &VmConfig) -> (ExitReason, String) {
    let console = Capture::default();
    let vm = Vm::start(config, Box::new(console.clone())).expect("VM starts");
    let reason = vm.wait_timeout(Duration::from_secs(30)).unwrap_or_else(|| {
        vm.kill();
        panic!("guest did not end within 30 s; console:\n{}", console.text())
    });
    (reason, console.text())
}

fn initrd(len: usize, tag: &str) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = std::env::temp_dir().join(format!("mc-tg-initrd-{}-{tag}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn bootcheck(guest: &str, memory_mib: u32, vcpus: u8, initrd_len: Option<usize>) {
    require_kvm();
    let rd = initrd_len.map(|n| initrd(n, &format!("{guest}-{memory_mib}-{vcpus}")));
    let cmdline = bootcheck_cmdline(memory_mib.into(), vcpus.into(), rd.as_ref().map(|r| r.1.as_slice()));
    let mut cfg = config(guest, memory_mib, vcpus, &cmdline);
    cfg.initrd = rd.as_ref().map(|r| r.0.clone());
    let (reason, out) = run_to_end(&cfg);
    if let Some((path, _)) = rd {
        std::fs::remove_file(path).ok();
    }
    let report = Report::parse(&out);
    assert!(report.all_passed(), "{guest} {memory_mib} MiB {vcpus} vCPUs: {:?}\nconsole:\n{out}", report.failed);
    assert!(report.passed.len() >= 30, "too few checks ran: {}", report.passed.len());
    assert_eq!(report.cmdline.as_deref(), Some(cmdline.as_str()), "the guest read the command line exactly");
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn bootcheck_pvh_all_layouts() {
    bootcheck(testguest::BOOTCHECK_PVH, 256, 1, None);
    bootcheck(testguest::BOOTCHECK_PVH, 64, 2, Some(100_001));
    bootcheck(testguest::BOOTCHECK_PVH, 3600, 4, Some(4096));
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn bootcheck_elf_linux64_all_layouts() {
    bootcheck(testguest::BOOTCHECK_ELF, 256, 1, None);
    bootcheck(testguest::BOOTCHECK_ELF, 1536, 3, Some(100_001));
    bootcheck(testguest::BOOTCHECK_ELF, 4096, 2, Some(12_345));
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn bootcheck_bzimage_all_layouts() {
    bootcheck(testguest::BOOTCHECK_BZIMAGE, 128, 1, Some(1));
    bootcheck(testguest::BOOTCHECK_BZIMAGE, 3400, 4, Some(65_536));
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn hello_prints_through_the_serial_port_and_resets() {
    require_kvm();
    let (reason, out) = run_to_end(&config(testguest::HELLO, 32, 1, "console=ttyS0"));
    assert_eq!(out, "Hello from a microcell test guest\n");
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn triple_fault_ends_the_vm_with_an_error() {
    require_kvm();
    let (reason, out) = run_to_end(&config(testguest::TRIPLEFAULT, 32, 1, ""));
    assert_eq!(out, "TG triplefault\n");
    match reason {
        ExitReason::Crashed { code, message } => {
            assert_eq!(code, "E_GUEST_TRIPLE_FAULT");
            assert!(message.contains("triple-fault"), "{message}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
}

/// Starts `guest`, waits for its banner, ends it with `end`, and checks it ended promptly.
fn ends_promptly(guest: &str, banner: &str, end: fn(&Vm), expected: ExitReason) {
    let console = Capture::default();
    let vm = Vm::start(&config(guest, 32, 2, ""), Box::new(console.clone())).unwrap();
    let t = Instant::now();
    while !console.text().contains(banner) {
        assert!(t.elapsed() < Duration::from_secs(10), "no banner; console: {}", console.text());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(vm.try_exit(), None, "still running");
    let t = Instant::now();
    end(&vm);
    let reason = vm.wait_timeout(Duration::from_secs(5)).expect("VM ends within 5 s");
    assert_eq!(reason, expected);
    assert!(t.elapsed() < Duration::from_millis(500), "ending took {:?}", t.elapsed());
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn stop_and_kill_end_halted_and_spinning_guests() {
    require_kvm();
    ends_promptly(testguest::HALT, "TG halt\n", Vm::stop, ExitReason::Stopped);
    ends_promptly(testguest::SPIN, "TG spin\n", Vm::stop, ExitReason::Stopped);
    ends_promptly(testguest::SPIN, "TG spin\n", Vm::kill, ExitReason::Killed);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn dropping_a_running_vm_ends_it() {
    require_kvm();
    for _ in 0..5 {
        let vm = Vm::start(&config(testguest::SPIN, 32, 1, ""), Box::new(std::io::sink())).unwrap();
        drop(vm);
    }
    // The vCPU threads end on their own; nothing to join. Give them a moment and make sure
    // the process can still start VMs (no leaked, spinning vCPUs holding locks).
    let (reason, _) = run_to_end(&config(testguest::HELLO, 32, 1, ""));
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn memtouch_writes_the_pages_it_is_asked_to() {
    require_kvm();
    let console = Capture::default();
    let vm = Vm::start(&config(testguest::MEMTOUCH, 64, 1, "tg.pages=200"), Box::new(console.clone())).unwrap();
    let t = Instant::now();
    while !console.text().contains("TG touched 200") {
        assert!(t.elapsed() < Duration::from_secs(10), "console: {}", console.text());
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.kill();
    assert_eq!(vm.wait(), ExitReason::Killed);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn bad_inputs_get_coded_errors_before_anything_runs() {
    require_kvm();
    let start = |c: &VmConfig| Vm::start(c, Box::new(std::io::sink())).err().expect("refused").code();
    let dir = std::env::temp_dir();
    let garbage = dir.join(format!("mc-garbage-{}", std::process::id()));
    std::fs::write(
        &garbage,
        b"this is not a kernel, just some bytes that are long enough to read a header from............",
    )
    .unwrap();
    let mut c = config(testguest::HELLO, 32, 1, "");
    c.kernel = garbage.clone();
    assert_eq!(start(&c), "E_KERNEL_FORMAT");
    c.kernel = dir.join("mc-no-such-kernel");
    assert_eq!(start(&c), "E_KERNEL_NOT_FOUND");
    let c = config(testguest::HELLO, 32, 0, "");
    assert_eq!(start(&c), "E_CONFIG");
    let c = config(testguest::HELLO, 1, 1, "");
    assert_eq!(start(&c), "E_CONFIG");
    let c = config(testguest::HELLO, 32, 1, &"x".repeat(5000));
    assert_eq!(start(&c), "E_CONFIG");
    let (big, _) = initrd(40 << 20, "too-big");
    let mut c = config(testguest::HELLO, 32, 1, "");
    c.initrd = Some(big.clone());
    assert_eq!(start(&c), "E_INITRD");
    let mut c = config(testguest::HELLO, 32, 1, "");
    c.initrd = Some(dir.join("mc-no-such-initrd"));
    assert_eq!(start(&c), "E_INITRD");
    std::fs::remove_file(big).ok();
    std::fs::remove_file(garbage).ok();
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn an_ended_vm_hangs_up_its_host_streams() {
    require_kvm();
    // The guest never touches the console device: the host's end must still see the VM's end
    // as end-of-stream (the agent client's E_CHANNEL_CLOSED), not silence.
    let config = VmConfig { control_channel: true, ..config(testguest::HELLO, 32, 1, "console=ttyS0") };
    let vm = Vm::start(&config, Box::new(Capture::default())).expect("VM starts");
    let mut channel = vm.take_channel().expect("a control channel");
    assert_eq!(vm.wait_timeout(Duration::from_secs(30)), Some(ExitReason::Reset));
    channel.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(std::io::Read::read(&mut channel, &mut buf).expect("EOF, not a timeout"), 0);
}

/// The `Seccomp:` line of a thread of this process (0 off, 2 filtered).
fn seccomp_mode(task: &std::path::Path) -> String {
    let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap_or("?").trim().to_owned()
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn vmm_threads_run_under_seccomp_and_the_callers_do_not() {
    require_kvm();
    let console = Capture::default();
    let config = VmConfig { control_channel: true, ..config(testguest::SPIN, 32, 2, "") };
    let vm = Vm::start(&config, Box::new(console.clone())).unwrap();
    let t = Instant::now();
    while !console.text().contains("TG spin\n") {
        assert!(t.elapsed() < Duration::from_secs(10), "no banner; console: {}", console.text());
        std::thread::sleep(Duration::from_millis(2));
    }
    // Other tests' VMs run in this process too: every vCPU and event thread must be filtered,
    // and this VM's are among them (a thread takes its name once it first runs: look again for
    // a moment until all three are there).
    let wanted = ["mc-events", "mc-vcpu0", "mc-vcpu1"];
    let t = Instant::now();
    loop {
        let mut seen = std::collections::BTreeSet::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default().trim().to_owned();
            if name.starts_with("mc-vcpu") || name == "mc-events" {
                // Another test's thread may be between its start and its first instruction
                // (where it installs the filter): give it a moment. A thread that ended reads "?".
                let t = Instant::now();
                let mut mode = seccomp_mode(&task);
                while mode == "0" && t.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(5));
                    mode = seccomp_mode(&task);
                }
                assert!(mode == "2" || mode == "?", "{name} is filtered (Seccomp: {mode})");
                seen.insert(name);
            }
        }
        if wanted.iter().all(|n| seen.contains(*n)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{wanted:?} running: {seen:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(seccomp_mode(std::path::Path::new("/proc/thread-self")), "0", "the caller's thread is not");
    vm.kill();
}

/// A console sink that makes a forbidden system call on the vCPU thread that writes to it, as
/// a device's host side taken over by a guest might.
struct HostileSink;

impl std::io::Write for HostileSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: a valid C string; the filter refuses the call before the kernel looks at it.
        let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: opened just above (only when the filter is off).
            unsafe { libc::close(fd) };
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_forbidden_system_call_on_a_vcpu_thread_ends_only_that_vm_with_e_seccomp() {
    require_kvm();
    let vm = Vm::start(&config(testguest::HELLO, 32, 1, ""), Box::new(HostileSink)).unwrap();
    match vm.wait_timeout(Duration::from_secs(10)).expect("the VM ends") {
        ExitReason::Crashed { code, message } => {
            assert_eq!(code, "E_SECCOMP");
            assert!(message.contains("vCPU 0 thread") && message.contains("SYS_open"), "{message}");
        }
        other => panic!("expected E_SECCOMP, got {other:?}"),
    }
    // The process goes on: the same call works here, and the next VM runs to its end.
    // SAFETY: as in HostileSink.
    let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "unfiltered here");
    // SAFETY: opened just above.
    unsafe { libc::close(fd) };
    let (reason, console) = run_to_end(&config(testguest::HELLO, 32, 1, ""));
    assert_eq!(reason, ExitReason::Reset, "{console}");
}

/// The halt check the agent watchdog asks on engine kvm: `halt.pvh.elf` (cli; hlt) is halted,
/// with one vCPU and with a second that never started; `spin.pvh.elf` is not, nor a paused or
/// ended VM. The check leaves a running VM running.
#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_guest_halted_with_interrupts_off_is_told_from_a_running_one() {
    require_kvm();
    let started = |guest: &str, vcpus: u8, banner: &str| {
        let console = Capture::default();
        let vm = Vm::start(&config(guest, 32, vcpus, ""), Box::new(console.clone())).unwrap();
        let t = Instant::now();
        while !console.text().contains(banner) {
            assert!(t.elapsed() < Duration::from_secs(10), "no banner; console: {}", console.text());
            std::thread::sleep(Duration::from_millis(2));
        }
        vm
    };
    for vcpus in [1, 2] {
        let vm = started(testguest::HALT, vcpus, "TG halt\n");
        // The banner comes just before the hlt: give it the moment to get there.
        let t = Instant::now();
        while !vm.is_halted() {
            assert!(t.elapsed() < Duration::from_secs(5), "halt.pvh.elf with {vcpus} vCPU(s) never seen halted");
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        for _ in 0..100 {
            assert!(vm.is_halted());
        }
        eprintln!("is_halted on a halted {vcpus}-vCPU guest: {:?} per call", t.elapsed() / 100);
        vm.pause().unwrap();
        assert!(!vm.is_halted(), "a paused VM is not asked");
        vm.resume();
        assert!(vm.is_halted());
        vm.kill();
        vm.wait_timeout(Duration::from_secs(5)).expect("ends");
        assert!(!vm.is_halted(), "an ended VM is not halted");
    }
    let vm = started(testguest::SPIN, 2, "TG spin\n");
    let t = Instant::now();
    for _ in 0..100 {
        assert!(!vm.is_halted(), "a spinning guest is not halted");
    }
    eprintln!("is_halted on a spinning 2-vCPU guest: {:?} per call", t.elapsed() / 100);
    assert_eq!(vm.try_exit(), None, "the check left it running");
    assert!(!vm.is_paused());
    vm.stop();
    assert_eq!(vm.wait_timeout(Duration::from_secs(5)), Some(ExitReason::Stopped));
}
