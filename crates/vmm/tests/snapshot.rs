//! T1 for snapshots, clones and restore (issue "Snapshots, clones and restore pools", items 7
//! and 8): test guests (crates/testguest) snapshotted mid-run on /dev/kvm, PVM included, and
//! restored as clones in this process and in a fresh one; incremental snapshots, pause/resume,
//! damaged snapshot files, and failed snapshots.
//!
//! Two guests: `compute` (a deterministic computation in steps whose `TG result` the host
//! computes too: `testguest::compute_expected`), and `virtio` with `tg.con_first=1 tg.clone=1`
//! (it waits for the host's greeting on the control channel before any disk I/O, so a snapshot
//! taken there has the whole device exchange ahead of it, and then overwrites pages with a byte
//! that each clone gets from the host). A restored compute guest must print exactly what an
//! uninterrupted run prints after the point the snapshot was taken at: the host pauses the VM,
//! reads the console so far (the prefix), snapshots, and expects the rest.
//!
//! The last tests pin VMM bugs these tests found (each failed before its fix): a restored
//! virtio-console never read its socket; a snapshot whose state file could not be written left
//! the new memory file under the old state; a failed incremental snapshot lost the dirty log;
//! an incremental snapshot built on whatever file later took its base's path; a full snapshot
//! of a clone left pages the host had dropped from its page cache as zeros; a moved snapshot
//! directory with disks could not be restored.
//!
//! Every test holds `CPU` shared; the pause test holds it alone, so that the process's CPU time
//! it reads is its own VM's.

mod common;

use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use common::{require_kvm, Capture};
use testguest::{compute_cmdline, virtio_cmdline, Compute, Report, VIRTIO_ECHO_XOR, VIRTIO_GREETING};
use vmm::{BlockDeviceConfig, ExitReason, LoadedSnapshot, RestoreOptions, Vm, VmConfig};

static CPU: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|p| p.into_inner())
}

/// ~50 ms of guest time per step here (PVM): 12 steps, 1 MiB of pages touched.
const C: Compute = Compute { seed: 0x5eed_0001, pages: 256, steps: 12, rounds: 2 };
const MEMORY_MIB: u32 = 128;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("mc-snapshot-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compute_config(c: &Compute, track_dirty_pages: bool) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        kernel: testguest::path(testguest::COMPUTE),
        cmdline: compute_cmdline(c),
        track_dirty_pages,
        ..Default::default()
    }
}

/// Everything an uninterrupted compute run prints.
fn expected_output(c: &Compute) -> String {
    let mut s = format!("TG compute seed={:#x} pages={} steps={} rounds={}\n", c.seed, c.pages, c.steps, c.rounds);
    for i in 1..=c.steps {
        s += &format!("TG step {i}\n");
    }
    s + &testguest::compute_result_line(c) + "\n"
}

/// Waits until the console shows `needle`; panics if the VM ends first or it takes too long.
fn wait_for(vm: &Vm, console: &Capture, needle: &str) {
    let t = Instant::now();
    loop {
        if console.text().contains(needle) {
            return;
        }
        if let Some(reason) = vm.try_exit() {
            if console.text().contains(needle) {
                return;
            }
            panic!("VM ended ({reason:?}) before printing {needle:?}; console:\n{}", console.text());
        }
        assert!(t.elapsed() < TIMEOUT, "no {needle:?} within {TIMEOUT:?}; console:\n{}", console.text());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for the end of the run, which must be the guest's reset; returns the console.
fn finish(vm: &Vm, console: &Capture) -> String {
    let reason = vm.wait_timeout(TIMEOUT).unwrap_or_else(|| {
        vm.kill();
        panic!("guest did not end within {TIMEOUT:?}; console:\n{}", console.text())
    });
    assert_eq!(reason, ExitReason::Reset, "console:\n{}", console.text());
    console.text()
}

/// A snapshot taken: what the guest had printed when it was paused, and its cost.
struct Taken {
    prefix: String,
    took: Duration,
    written: u64,
}

/// Pauses `vm` (once it has printed `after`), snapshots it into `dir` and leaves it paused.
fn snapshot_after(vm: &Vm, console: &Capture, after: &str, dir: &Path, incremental: bool) -> Taken {
    wait_for(vm, console, after);
    vm.pause().expect("pause");
    let prefix = console.text();
    let t = Instant::now();
    let written = vm.snapshot(dir, incremental).expect("snapshot");
    Taken { prefix, took: t.elapsed(), written }
}

/// Starts the compute guest and snapshots it into `dir` once it has printed `after`; returns
/// the VM (paused) too.
fn compute_snapshot(c: &Compute, track_dirty: bool, after: &str, dir: &Path) -> (Vm, Capture, Taken) {
    let console = Capture::default();
    let vm = Vm::start(&compute_config(c, track_dirty), Box::new(console.clone())).expect("VM starts");
    let taken = snapshot_after(&vm, &console, after, dir, false);
    assert!(!taken.prefix.contains("TG result"), "the guest finished before the snapshot:\n{}", taken.prefix);
    (vm, console, taken)
}

/// Asserts that `out` is exactly what an uninterrupted run prints after `prefix`.
fn assert_continues(c: &Compute, prefix: &str, out: &str, who: &str) {
    let full = expected_output(c);
    assert!(full.starts_with(prefix), "{who}: the output before the snapshot is not the expected one:\n{prefix}");
    assert_eq!(out, &full[prefix.len()..], "{who}: the output after the snapshot differs (prefix:\n{prefix})");
}

fn restore(snap: &LoadedSnapshot) -> (Vm, Capture) {
    let console = Capture::default();
    let vm = Vm::restore(snap, Box::new(console.clone()), RestoreOptions::default()).expect("restore");
    (vm, console)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn file_hash(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// utime + stime of this process, in clock ticks (/proc/self/stat fields 14 and 15).
fn process_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

// ---- compute guest ----

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn compute_guest_prints_the_host_computed_result() {
    require_kvm();
    let _cpu = shared();
    let t = Instant::now();
    let console = Capture::default();
    let vm = Vm::start(&compute_config(&C, false), Box::new(console.clone())).expect("VM starts");
    let out = finish(&vm, &console);
    println!("compute guest, uninterrupted: {:.0} ms, {}", ms(t.elapsed()), testguest::compute_result_line(&C));
    assert_eq!(out, expected_output(&C));
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn ten_clones_of_a_mid_run_snapshot_finish_with_the_uninterrupted_result() {
    require_kvm();
    let _cpu = shared();
    let t0 = Instant::now();
    let dir = TempDir::new("clones");
    let (vm, _, taken) = compute_snapshot(&C, false, "TG step 4\n", &dir.0);
    drop(vm);
    let mem_file = std::fs::metadata(dir.join("vm.mem")).unwrap();
    println!(
        "snapshot: {:.2} ms, memory bytes written {} (file {} bytes apparent), state file {} bytes",
        ms(taken.took),
        taken.written,
        mem_file.len(),
        std::fs::metadata(dir.join("vm.state")).unwrap().len()
    );

    let t = Instant::now();
    let snap = LoadedSnapshot::load(&dir.0).expect("load");
    let load = t.elapsed();
    // Half the clones restore into shells made ahead of time (the restore pool's fast path).
    let t = Instant::now();
    let mut shells: Vec<_> = (0..5).map(|_| snap.shell().expect("shell")).collect();
    let shell_time = t.elapsed() / 5;
    let mut clones = Vec::new();
    let (mut plain, mut in_shell) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let console = Capture::default();
        let t = Instant::now();
        let vm = if i % 2 == 0 {
            let vm = Vm::restore(&snap, Box::new(console.clone()), RestoreOptions::default()).expect("restore");
            plain.push(t.elapsed());
            vm
        } else {
            let shell = shells.pop().unwrap();
            let t = Instant::now();
            let vm =
                Vm::restore_in(shell, &snap, Box::new(console.clone()), RestoreOptions::default()).expect("restore_in");
            in_shell.push(t.elapsed());
            vm
        };
        clones.push((vm, console));
    }
    // All ten run at once; each must finish the computation on its own copy of the memory.
    for (i, (vm, console)) in clones.iter().enumerate() {
        let out = finish(vm, console);
        assert_continues(&C, &taken.prefix, &out, &format!("clone {i}"));
    }
    let list = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", ms(*d))).collect::<Vec<_>>().join(" ");
    println!(
        "load {:.2} ms; Vm::restore ms: {}; shell {:.2} ms each, then Vm::restore_in ms: {}",
        ms(load),
        list(&plain),
        ms(shell_time),
        list(&in_shell)
    );
    println!(
        "10 clones from after step 4 all printed {}; {:.0} ms in all",
        testguest::compute_result_line(&C),
        ms(t0.elapsed())
    );
}

const CHILD_ENV: &str = "MC_SNAPSHOT_CHILD_DIR";

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_new_process_restores_from_the_snapshot_files_alone() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("child");
    let first = work.join("taken");
    let (vm, _, taken) = compute_snapshot(&C, false, "TG step 3\n", &first);
    drop(vm);
    // Somewhere else than where it was written: only the files travel.
    let moved = work.join("moved");
    std::fs::rename(&first, &moved).unwrap();

    let t = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["helper_child_process_restore", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, &moved)
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let console = stdout
        .split_once("CHILD-CONSOLE-BEGIN\n")
        .and_then(|(_, rest)| rest.split_once("CHILD-CONSOLE-END"))
        .map(|(c, _)| c)
        .unwrap_or_else(|| panic!("no console in the child's output:\n{stdout}"));
    assert_continues(&C, &taken.prefix, console, "child process");
    let line = stdout.lines().find_map(|l| l.split_once("CHILD restore: ")).map_or("", |(_, r)| r);
    println!("child process (whole run {:.0} ms): {line}", ms(t.elapsed()));
}

/// Run by `a_new_process_restores_from_the_snapshot_files_alone` in a child process, with the
/// snapshot directory in MC_SNAPSHOT_CHILD_DIR; does nothing without it.
#[test]
#[ignore = "helper: run in a child process by a_new_process_restores_from_the_snapshot_files_alone"]
fn helper_child_process_restore() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        println!("nothing to do without {CHILD_ENV}");
        return;
    };
    let t = Instant::now();
    let snap = LoadedSnapshot::load(Path::new(&dir)).expect("load");
    let load = t.elapsed();
    let (vm, console) = restore(&snap);
    let restored = t.elapsed();
    let out = finish(&vm, &console);
    println!("CHILD restore: load {:.2} ms, load + restore {:.2} ms", ms(load), ms(restored));
    println!("CHILD-CONSOLE-BEGIN\n{out}CHILD-CONSOLE-END");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn incremental_snapshot_writes_only_dirtied_pages_and_restores_to_the_result() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("incremental");
    let (full_dir, inc_dir, again_dir) = (work.join("full"), work.join("inc"), work.join("again"));
    let (vm, console, full) = compute_snapshot(&C, true, "TG step 3\n", &full_dir);
    vm.resume();
    let inc = snapshot_after(&vm, &console, "TG step 6\n", &inc_dir, true);
    drop(vm);
    let allocated = |dir: &Path| std::fs::metadata(dir.join("vm.mem")).unwrap().blocks() * 512;
    println!(
        "full snapshot after step 3: {} bytes of guest memory written in {:.2} ms; incremental after step 6: {} bytes \
         in {:.2} ms (its memory file, a copy of the full one plus those, allocates {} bytes without reflinks)",
        full.written,
        ms(full.took),
        inc.written,
        ms(inc.took),
        allocated(&inc_dir)
    );
    // Steps 4-6 rewrite 2 pages each, plus the guest's stack and data; the full one holds the
    // guest image, its page tables and all 257 pages.
    assert!(inc.written > 0, "the incremental snapshot wrote nothing");
    assert!(inc.written * 8 < full.written, "incremental {} bytes is not far below full {}", inc.written, full.written);

    for (dir, taken) in [(&inc_dir, &inc), (&full_dir, &full)] {
        let snap = LoadedSnapshot::load(dir).expect("load");
        let (vm, console) = restore(&snap);
        assert_continues(&C, &taken.prefix, &finish(&vm, &console), &format!("restore of {}", dir.display()));
    }

    // A restored VM (dirty tracking comes with the snapshot's config) snapshots incrementally
    // on top of the snapshot it came from.
    let snap = LoadedSnapshot::load(&inc_dir).expect("load");
    let (vm, console) = restore(&snap);
    let again = snapshot_after(&vm, &console, "TG step 8\n", &again_dir, true);
    drop(vm);
    println!("incremental snapshot of a restored VM after step 8: {} bytes in {:.2} ms", again.written, ms(again.took));
    assert!(again.written * 8 < full.written);
    let snap = LoadedSnapshot::load(&again_dir).expect("load");
    let (vm, console2) = restore(&snap);
    let prefix = inc.prefix.clone() + &again.prefix;
    assert_continues(&C, &prefix, &finish(&vm, &console2), "restore of the incremental snapshot of a restored VM");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_paused_vm_uses_no_cpu_and_resumes_to_the_result() {
    require_kvm();
    // Alone in the process: its CPU time is this VM's.
    let _cpu = CPU.write().unwrap_or_else(|p| p.into_inner());
    let c = Compute { rounds: 4, ..C }; // ~100 ms per step
    let console = Capture::default();
    let vm = Vm::start(&compute_config(&c, false), Box::new(console.clone())).expect("VM starts");
    wait_for(&vm, &console, "TG step 1\n");
    let window = Duration::from_millis(300);
    let hz = ticks_per_second();
    let before = process_cpu_ticks();
    std::thread::sleep(window);
    let running = process_cpu_ticks() - before;
    vm.pause().expect("pause");
    assert!(vm.is_paused());
    let printed = console.text();
    let before = process_cpu_ticks();
    std::thread::sleep(window);
    let paused = process_cpu_ticks() - before;
    assert_eq!(console.text(), printed, "the guest printed while paused");
    println!(
        "process CPU over {} ms: running {} ms, paused {} ms",
        window.as_millis(),
        running * 1000 / hz,
        paused * 1000 / hz
    );
    assert!(!printed.contains("TG result"), "the guest finished before it was paused");
    assert!(paused * 1000 / hz <= 30, "a paused VM used {} ms of CPU in {window:?}", paused * 1000 / hz);
    vm.resume();
    assert!(!vm.is_paused());
    assert_eq!(finish(&vm, &console), expected_output(&c));
}

// ---- virtio guest ----

/// Deterministic disk content (an LCG), `sectors` * 512 bytes.
fn image_content(sectors: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..sectors * 512)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// A virtio guest snapshotted while it waits for the host's greeting.
struct VirtioSnapshot {
    work: TempDir,
    dir: PathBuf,
    rw: Vec<u8>,
    taken: Taken,
}

fn virtio_snapshot(tag: &str) -> VirtioSnapshot {
    let work = TempDir::new(tag);
    let rw = image_content(256, 11);
    let ro = image_content(100, 12);
    std::fs::write(work.join("rw.img"), &rw).unwrap();
    std::fs::write(work.join("ro.img"), &ro).unwrap();
    // Consoles first: the guest waits for the greeting before any disk I/O. Waits of 30 s: the
    // host holds it there across the snapshot and restore.
    let cmdline = virtio_cmdline(&[(&rw, false), (&ro, true)], 1) + " tg.con_first=1 tg.clone=1 tg.wait_ms=30000";
    let config = VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: testguest::path(testguest::VIRTIO),
        cmdline,
        block_devices: vec![
            BlockDeviceConfig { path: work.join("rw.img"), read_only: false },
            BlockDeviceConfig { path: work.join("ro.img"), read_only: true },
        ],
        control_channel: true,
        ..Default::default()
    };
    let console = Capture::default();
    let vm = Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let channel = vm.take_channel().expect("control channel");
    let dir = work.join("snap");
    let taken = snapshot_after(&vm, &console, "TG ok con0.guest_open\n", &dir, false);
    assert!(!taken.prefix.contains("FAIL"), "{}", taken.prefix);
    drop(vm);
    drop(channel);
    VirtioSnapshot { work, dir, rw, taken }
}

/// Echoes the channel back XOR VIRTIO_ECHO_XOR until the VM closes its end; keeps what came.
fn echo(mut channel: UnixStream, received: Arc<Mutex<Vec<u8>>>) {
    channel.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = match channel.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        received.lock().unwrap().extend_from_slice(&buf[..n]);
        let reply: Vec<u8> = buf[..n].iter().map(|b| b ^ VIRTIO_ECHO_XOR).collect();
        if channel.write_all(&reply).is_err() {
            return;
        }
    }
}

/// A restored virtio guest and the host end of its control channel.
struct VirtioClone {
    vm: Vm,
    console: Capture,
    channel: UnixStream,
    value: u8,
    /// What the guest printed before the snapshot: the report is that and the clone's output.
    prefix: String,
    echo: Option<std::thread::JoinHandle<()>>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl VirtioClone {
    /// Restored, greeted, and given `value` (the guest has written it over its clone pages when
    /// this returns).
    fn new(vm: Vm, console: Capture, value: u8, prefix: &str) -> VirtioClone {
        let mut channel = vm.take_channel().expect("control channel");
        channel.write_all(VIRTIO_GREETING).unwrap();
        wait_for(&vm, &console, "TG ok con0.host_first\n");
        // Only now: with the greeting still unread it could share a receive buffer with it.
        channel.write_all(&[value]).unwrap();
        wait_for(&vm, &console, &format!("TG info clone wrote={value:#x}\n"));
        VirtioClone { vm, console, channel, value, prefix: prefix.into(), echo: None, received: Arc::default() }
    }

    /// The go: the guest checks its pages, then runs the echo rounds and the disk checks.
    fn go(&mut self) {
        self.channel.write_all(b"g").unwrap();
        let (channel, received) = (self.channel.try_clone().unwrap(), self.received.clone());
        self.echo = Some(std::thread::spawn(move || echo(channel, received)));
    }

    /// Waits for the end; every check passed; returns the report.
    fn finish(self) -> Report {
        let out = self.prefix + &finish(&self.vm, &self.console);
        drop(self.vm);
        drop(self.channel);
        self.echo.unwrap().join().unwrap();
        let report = Report::parse(&out);
        assert!(report.all_passed(), "clone {:#x}: {:?}\nconsole:\n{out}", self.value, report.failed);
        let mut sent: Vec<u8> = (0..=255u8).collect();
        sent.extend_from_slice(b"ping\n");
        sent.extend((0..6000u32).map(|i| (i * 131 + (i >> 8) + 1) as u8));
        assert!(*self.received.lock().unwrap() == sent, "clone {:#x}: channel bytes differ", self.value);
        report
    }
}

/// The disk image as the virtio guest leaves it: its pattern in the last sectors.
fn assert_written_by_guest(before: &[u8], after: &[u8], who: &str) {
    let sectors = before.len() / 512;
    let first = sectors - testguest::VIRTIO_WRITTEN_SECTORS;
    assert_eq!(after.len(), before.len(), "{who}");
    assert!(after[..first * 512] == before[..first * 512], "{who}: sectors the guest did not write changed");
    for s in first..sectors {
        for i in 0..512 {
            assert_eq!(after[s * 512 + i], testguest::virtio_blk_pattern(s as u64, i), "{who}: sector {s} byte {i}");
        }
    }
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn virtio_devices_and_interrupts_work_after_restore() {
    require_kvm();
    let _cpu = shared();
    let vs = virtio_snapshot("virtio");
    let snap = LoadedSnapshot::load(&vs.dir).expect("load");
    // The writable disk through an explicit copy of the snapshot's, to look at afterwards.
    let disk = vs.work.join("clone-rw.img");
    std::fs::copy(vs.dir.join("disk0.img"), &disk).unwrap();
    let mut disks = snap.config().block_devices.clone();
    disks[0].path = disk.clone();
    let shell = snap.shell().expect("shell");
    let console = Capture::default();
    let t = Instant::now();
    let vm = Vm::restore_in(
        shell,
        &snap,
        Box::new(console.clone()),
        RestoreOptions { block_devices: Some(disks), ..Default::default() },
    )
    .expect("restore_in");
    let restore = t.elapsed();
    let mut clone = VirtioClone::new(vm, console, 0x5a, &vs.taken.prefix);
    clone.go();
    let report = clone.finish();
    println!(
        "virtio snapshot {:.2} ms ({} bytes); restore_in {:.2} ms; {} checks passed, {} of them after the restore",
        ms(vs.taken.took),
        vs.taken.written,
        ms(restore),
        report.passed.len(),
        report.passed.len() - Report::parse(&vs.taken.prefix).passed.len()
    );
    for check in [
        "con0.host_first",
        "con0.clone",
        "con0.echo",
        "con0.echo_multi",
        "con0.interrupts",
        "blk0.read",
        "blk0.batch",
        "blk0.write",
        "blk0.flush",
        "blk0.readback",
        "blk0.get_id",
        "blk0.reinit",
        "blk0.interrupts",
        "blk1.ro_write",
        "blk1.ro_unchanged",
        "blk1.reinit",
        "blk1.interrupts",
        "interrupts.stray",
    ] {
        assert!(report.passed.iter().any(|c| c == check), "check {check} missing: {:?}", report.passed);
    }
    // The disks were first touched after the restore: their interrupts are the restored VM's.
    for dev in ["blk0", "blk1", "con0"] {
        let line = report.info.iter().find(|l| l.starts_with(&format!("irq {dev} "))).expect("interrupt counts");
        let count: u32 = line.split(' ').find_map(|w| w.strip_prefix("count=")?.parse().ok()).unwrap();
        assert!(count > 0, "{dev} took no interrupts: {line}");
    }
    assert_written_by_guest(&vs.rw, &std::fs::read(&disk).unwrap(), "the clone's disk");
    assert!(std::fs::read(vs.dir.join("disk0.img")).unwrap() == vs.rw, "the snapshot's disk copy changed");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn concurrent_clones_see_only_their_own_memory_and_leave_the_snapshot_unchanged() {
    require_kvm();
    let _cpu = shared();
    let vs = virtio_snapshot("isolation");
    let (mem, disk) = (vs.dir.join("vm.mem"), vs.dir.join("disk0.img"));
    let (mem_hash, disk_hash) = (file_hash(&mem), file_hash(&disk));
    let snap = LoadedSnapshot::load(&vs.dir).expect("load");
    // Four at once: two with the snapshot's disks (each gets its own copy), two with copies the
    // test makes, in shells made ahead.
    let mut clones = Vec::new();
    let mut copies = Vec::new();
    for i in 0..4u8 {
        let console = Capture::default();
        let vm = if i < 2 {
            Vm::restore(&snap, Box::new(console.clone()), RestoreOptions::default()).expect("restore")
        } else {
            let copy = vs.work.join(&format!("clone{i}-rw.img"));
            std::fs::copy(&disk, &copy).unwrap();
            let mut disks = snap.config().block_devices.clone();
            disks[0].path = copy.clone();
            copies.push(copy);
            let shell = snap.shell().expect("shell");
            Vm::restore_in(
                shell,
                &snap,
                Box::new(console.clone()),
                RestoreOptions { block_devices: Some(disks), ..Default::default() },
            )
            .expect("restore_in")
        };
        clones.push((vm, console));
    }
    // Each writes its own byte over the same guest pages; only when all four have, do they look.
    let mut clones: Vec<VirtioClone> = clones
        .into_iter()
        .enumerate()
        .map(|(i, (vm, console))| VirtioClone::new(vm, console, 0xa0 + i as u8, &vs.taken.prefix))
        .collect();
    for clone in &mut clones {
        clone.go();
    }
    for clone in clones {
        let value = clone.value;
        let report = clone.finish();
        assert!(report.passed.iter().any(|c| c == "con0.clone"), "clone {value:#x}: {:?}", report.passed);
        assert!(report.info.iter().any(|l| *l == format!("clone wrote={value:#x}")));
    }
    for copy in &copies {
        assert_written_by_guest(&vs.rw, &std::fs::read(copy).unwrap(), &copy.display().to_string());
    }
    drop(snap);
    assert_eq!(file_hash(&mem), mem_hash, "the snapshot's memory file changed");
    assert_eq!(file_hash(&disk), disk_hash, "the snapshot's disk copy changed");
    assert!(std::fs::read(&disk).unwrap() == vs.rw);
    println!("4 concurrent clones each saw only their own write; vm.mem and disk0.img unchanged");
}

// ---- bad input ----

fn expect_code(dir: &Path, code: &str, what: &str) {
    match LoadedSnapshot::load(dir) {
        Ok(_) => panic!("{what}: the snapshot loaded"),
        Err(e) => {
            println!("{what}: {} {e}", e.code());
            assert_eq!(e.code(), code, "{what}: {e}");
        }
    }
}

/// A copy of the snapshot in `from`, to damage.
fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["vm.state", "vm.mem"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// The state file's header and body with a CRC32 that fits them.
fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let body_end = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..body_end]);
    bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn damaged_snapshots_are_refused_with_a_code_before_any_guest_code_runs() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("bad");
    let good = work.join("good");
    let (vm, _, _) = compute_snapshot(&C, false, "TG step 1\n", &good);
    drop(vm);
    let state = std::fs::read(good.join("vm.state")).unwrap();
    LoadedSnapshot::load(&good).expect("the undamaged snapshot loads");
    let case = |name: &str| {
        let dir = work.join(name);
        copy_snapshot(&good, &dir);
        dir
    };

    let dir = case("truncated");
    std::fs::write(dir.join("vm.state"), &state[..state.len() / 2]).unwrap();
    expect_code(&dir, "E_SNAPSHOT_CORRUPT", "state file cut in half");
    std::fs::write(dir.join("vm.state"), &state[..10]).unwrap();
    expect_code(&dir, "E_SNAPSHOT_CORRUPT", "state file shorter than its header");
    std::fs::write(dir.join("vm.state"), &state[..state.len() - 1]).unwrap();
    expect_code(&dir, "E_SNAPSHOT_CORRUPT", "state file one byte short");

    let dir = case("flipped");
    for (at, what) in [(state.len() / 2, "body"), (2, "magic"), (13, "length field"), (state.len() - 1, "checksum")] {
        let mut bad = state.clone();
        bad[at] ^= 0x01;
        std::fs::write(dir.join("vm.state"), &bad).unwrap();
        expect_code(&dir, "E_SNAPSHOT_CORRUPT", &format!("one bit flipped in the {what} (byte {at})"));
    }

    // Layout: magic (8) | version u32 LE | length u64 LE | body | CRC32: a valid file of
    // another version.
    let dir = case("version");
    let mut bad = state.clone();
    bad[8..12].copy_from_slice(&(vmm::snapshot::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(dir.join("vm.state"), with_crc(bad)).unwrap();
    expect_code(&dir, "E_SNAPSHOT_VERSION", "format version + 1 (checksum recomputed)");

    // Another host CPU: the state as this build reads it, with another family/model/stepping,
    // written back by this build (valid magic, version, checksum).
    let dir = case("host");
    let mut machine = vmm::snapshot::load_state(&dir.join("vm.state")).expect("state loads");
    machine.cpu.family_model_stepping ^= 0x10; // another model
    vmm::snapshot::save_state(&dir.join("vm.state"), &machine).unwrap();
    expect_code(&dir, "E_SNAPSHOT_HOST", "another CPU model");
    machine.cpu.family_model_stepping ^= 0x10;
    machine.cpu.vendor = "AnotherVendor".into();
    vmm::snapshot::save_state(&dir.join("vm.state"), &machine).unwrap();
    expect_code(&dir, "E_SNAPSHOT_HOST", "another CPU vendor");

    let dir = case("short-memory");
    let mem = std::fs::OpenOptions::new().write(true).open(dir.join("vm.mem")).unwrap();
    let len = mem.metadata().unwrap().len();
    mem.set_len(len - 4096).unwrap();
    expect_code(&dir, "E_SNAPSHOT_CORRUPT", "memory file one page short");
    mem.set_len(0).unwrap();
    expect_code(&dir, "E_SNAPSHOT_CORRUPT", "empty memory file");

    let dir = case("missing");
    std::fs::remove_file(dir.join("vm.mem")).unwrap();
    expect_code(&dir, "E_SNAPSHOT_IO", "no memory file");
    std::fs::remove_file(dir.join("vm.state")).unwrap();
    expect_code(&dir, "E_SNAPSHOT_IO", "no state file");
    expect_code(&work.join("does-not-exist"), "E_SNAPSHOT_IO", "no snapshot directory");

    // A shell of another size is refused too (and nothing runs).
    let snap = LoadedSnapshot::load(&good).unwrap();
    let other = VmConfig { memory_mib: MEMORY_MIB / 2, ..compute_config(&C, false) };
    let shell = vmm::VmShell::new(&other).unwrap();
    let console = Capture::default();
    let e = Vm::restore_in(shell, &snap, Box::new(console.clone()), RestoreOptions::default()).err().expect("refused");
    println!("shell of another memory size: {} {e}", e.code());
    assert_eq!(e.code(), "E_CONFIG");
    assert_eq!(console.text(), "");
}

// ---- failed snapshots ----

/// Runs `mount` (we are root in CI); None with the reason when it is not permitted.
fn mount_tmpfs(at: &Path, size: u64) -> Result<(), String> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "mc-snapshot-test"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        // A dropped VM lets go of its memory mapping on a teardown thread: retry for a while.
        for _ in 0..100 {
            if Command::new("umount")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn used_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct; `c` is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_snapshot_that_runs_out_of_space_leaves_the_previous_one_intact() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("nospace");
    let dir = work.join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    if let Err(why) = mount_tmpfs(&dir, 64 << 20) {
        println!("SKIP snapshot out of space: {why}");
        return;
    }
    let mounted = Mounted(dir.clone());
    let (vm, console, a) = compute_snapshot(&C, false, "TG step 2\n", &dir);
    // Shrink the filesystem to what snapshot A uses plus half of it: the next one cannot fit.
    let used = used_bytes(&dir);
    let size = used + used / 2;
    let out = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    vm.resume();
    wait_for(&vm, &console, "TG step 5\n");
    vm.pause().unwrap();
    let e = vm.snapshot(&dir, false).expect_err("a snapshot larger than the free space");
    println!("snapshot A: {} bytes used; second snapshot into a {size}-byte tmpfs: {} {e}", used, e.code());
    drop(vm);
    let names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| n == "vm.state" || n == "vm.mem"), "left behind: {names:?}");

    let snap = LoadedSnapshot::load(&dir).expect("snapshot A loads");
    let (vm, console) = restore(&snap);
    assert_continues(&C, &a.prefix, &finish(&vm, &console), "snapshot A after the failed one");
    drop(snap);
    drop(vm);
    drop(mounted);
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_two_vcpu_vm_restores_mid_run() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("two-vcpus");
    let dir = work.join("snap");
    let console = Capture::default();
    // vCPU 1 waits for INIT/SIPI (the contract): its MP state goes through the snapshot too.
    let config = VmConfig { vcpus: 2, ..compute_config(&C, false) };
    let vm = Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let a = snapshot_after(&vm, &console, "TG step 3\n", &dir, false);
    drop(vm);
    let snap = LoadedSnapshot::load(&dir).expect("load");
    assert_eq!(snap.config().vcpus, 2);
    let (vm, console) = restore(&snap);
    assert_continues(&C, &a.prefix, &finish(&vm, &console), "restore of a 2-vCPU VM");
}

// ---- VMM bugs found by these tests ----

/// The temporary file a snapshot writes `name` through (snapshot/mod.rs `write_atomically`).
fn tmp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.tmp-{}", std::process::id()))
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_snapshot_that_fails_writing_its_state_file_leaves_the_previous_one_intact() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("fail-state");
    let dir = work.join("snap");
    let (vm, console, a) = compute_snapshot(&C, false, "TG step 2\n", &dir);
    vm.resume();
    wait_for(&vm, &console, "TG step 5\n");
    vm.pause().unwrap();
    // The memory file can be written, the state file cannot (a directory where its temporary
    // file goes): the snapshot fails last.
    std::fs::create_dir(tmp_name(&dir, "vm.state")).unwrap();
    let e = vm.snapshot(&dir, false).expect_err("the state file cannot be written");
    println!("second snapshot with an unwritable state file: {} {e}", e.code());
    drop(vm);
    std::fs::remove_dir(tmp_name(&dir, "vm.state")).unwrap();
    let snap = LoadedSnapshot::load(&dir).expect("snapshot A loads");
    let (vm, console) = restore(&snap);
    assert_continues(&C, &a.prefix, &finish(&vm, &console), "snapshot A after the failed one");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_failed_incremental_snapshot_does_not_lose_dirty_pages() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("fail-incremental");
    let (full_dir, failed_dir, inc_dir) = (work.join("full"), work.join("failed"), work.join("inc"));
    let (vm, console, _) = compute_snapshot(&C, true, "TG step 2\n", &full_dir);
    vm.resume();
    wait_for(&vm, &console, "TG step 5\n");
    vm.pause().unwrap();
    std::fs::create_dir_all(tmp_name(&failed_dir, "vm.mem")).unwrap();
    let e = vm.snapshot(&failed_dir, true).expect_err("the memory file cannot be written");
    println!("incremental snapshot with an unwritable memory file: {} {e}", e.code());
    vm.resume();
    // Pages written in steps 3-5 (before the failed attempt) must still be in the next one.
    let inc = snapshot_after(&vm, &console, "TG step 7\n", &inc_dir, true);
    drop(vm);
    let snap = LoadedSnapshot::load(&inc_dir).expect("load");
    let (vm, console) = restore(&snap);
    assert_continues(&C, &inc.prefix, &finish(&vm, &console), "incremental snapshot after a failed one");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn an_incremental_snapshot_of_a_clone_builds_on_its_own_snapshot_even_when_that_is_replaced() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("replaced-base");
    let (dir, inc_dir) = (work.join("snap"), work.join("inc"));
    let (vm, _, a) = compute_snapshot(&C, true, "TG step 2\n", &dir);
    drop(vm);
    let snap = LoadedSnapshot::load(&dir).expect("load");
    let (v, v_console) = restore(&snap);
    v.pause().unwrap();
    // Another clone of the same snapshot replaces it with a later one of its own.
    let (w, w_console) = restore(&snap);
    let _ = snapshot_after(&w, &w_console, "TG step 8\n", &dir, false);
    drop(w);
    v.resume();
    let inc = snapshot_after(&v, &v_console, "TG step 5\n", &inc_dir, true);
    drop(v);
    let snap = LoadedSnapshot::load(&inc_dir).expect("load");
    let (vm, console) = restore(&snap);
    let prefix = a.prefix + &inc.prefix;
    assert_continues(&C, &prefix, &finish(&vm, &console), "incremental snapshot of a clone whose base was replaced");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_full_snapshot_of_a_clone_keeps_pages_the_host_dropped_from_its_page_cache() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("evicted");
    let (dir, again) = (work.join("snap"), work.join("again"));
    let (vm, _, a) = compute_snapshot(&C, false, "TG step 2\n", &dir);
    drop(vm);
    let snap = LoadedSnapshot::load(&dir).expect("load");
    let (clone, clone_console) = restore(&snap);
    clone.pause().unwrap();
    let printed = clone_console.text();
    // The memory file's clean pages that the clone has not touched leave the page cache (as
    // they may any time under memory pressure): the clone still reads them from the file.
    let f = std::fs::File::open(dir.join("vm.mem")).unwrap();
    // SAFETY: plain fadvise on an open fd.
    assert_eq!(unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let taken = clone.snapshot(&again, false).expect("snapshot of the clone");
    println!("full snapshot of a clone after page cache eviction: {taken} bytes written");
    drop(clone);
    let snap = LoadedSnapshot::load(&again).expect("load");
    let (vm, console) = restore(&snap);
    let prefix = a.prefix + &printed;
    assert_continues(&C, &prefix, &finish(&vm, &console), "full snapshot of a clone");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_snapshot_directory_with_disks_can_be_moved() {
    require_kvm();
    let _cpu = shared();
    let vs = virtio_snapshot("moved");
    let moved = vs.work.join("moved");
    std::fs::rename(&vs.dir, &moved).unwrap();
    let snap = LoadedSnapshot::load(&moved).expect("load");
    // The writable disk's copy is found in the directory where it is now.
    assert_eq!(snap.config().block_devices[0].path, moved.join("disk0.img"));
    assert_eq!(snap.config().block_devices[1].path, vs.work.join("ro.img"));
    let (vm, console) = restore(&snap);
    let mut clone = VirtioClone::new(vm, console, 0x33, &vs.taken.prefix);
    clone.go();
    let report = clone.finish();
    assert!(report.passed.iter().any(|c| c == "blk0.readback"));
    assert!(std::fs::read(moved.join("disk0.img")).unwrap() == vs.rw, "the snapshot's disk copy changed");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_memory_file_from_another_snapshot_is_refused() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("mixed");
    let (a, b) = (work.join("a"), work.join("b"));
    let (vm, console, _) = compute_snapshot(&C, false, "TG step 1\n", &a);
    vm.resume();
    snapshot_after(&vm, &console, "TG step 2\n", &b, false);
    drop(vm);
    // What a crash between the renames of two snapshots into one directory could leave.
    std::fs::copy(b.join("vm.mem"), a.join("vm.mem")).unwrap();
    expect_code(&a, "E_SNAPSHOT_CORRUPT", "the memory file of another snapshot");
    LoadedSnapshot::load(&b).expect("the untouched snapshot still loads");
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn two_vms_snapshotting_into_one_directory_at_once_both_succeed() {
    require_kvm();
    let _cpu = shared();
    let work = TempDir::new("samedir");
    let dir = work.join("s");
    let (a, _, _) = compute_snapshot(&C, false, "TG step 1\n", &work.join("a"));
    let (b, _, _) = compute_snapshot(&C, false, "TG step 1\n", &work.join("b"));
    std::thread::scope(|s| {
        let ta = s.spawn(|| a.snapshot(&dir, false));
        let tb = s.spawn(|| b.snapshot(&dir, false));
        ta.join().unwrap().expect("first snapshot");
        tb.join().unwrap().expect("second snapshot");
    });
    LoadedSnapshot::load(&dir).expect("the directory holds one whole snapshot");
}

const SWEEP_CHILD_ENV: &str = "MC_SWEEP_CHILD_SNAPSHOT";

/// A clone's writable disks are copied into a per-VM run directory of the VMM; a process
/// SIGKILLed with a clone running (no Drop) leaves it behind, and the next sweep removes it
/// (the same sweep as the sandbox's run directories), never while that process lives.
#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn a_killed_process_clone_disk_directory_is_swept() {
    require_kvm();
    let _cpu = shared();
    let vs = virtio_snapshot("sweep");
    let base = vs.work.join("tmp");
    std::fs::create_dir(&base).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["helper_child_restores_and_waits", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(SWEEP_CHILD_ENV, &vs.dir)
        .env("TMPDIR", &base)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("CHILD restored") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "the child ended before restoring");
    }
    let prefix = format!("microcell-{}-s", child.id());
    let dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(&base)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
            .map(|e| e.path())
            .collect()
    };
    let found = dirs();
    assert_eq!(
        found.len(),
        1,
        "one run directory of the child's in {}: {:?}",
        base.display(),
        std::fs::read_dir(&base).unwrap().flatten().map(|e| e.file_name()).collect::<Vec<_>>()
    );
    assert!(found[0].to_str().unwrap().ends_with("-clone") && found[0].join("disk0.img").exists(), "{found:?}");
    assert_eq!(vmm::run_dir::remove_stale_run_dirs(&base), 0, "a live process's directory is kept");
    assert!(found[0].exists());
    child.kill().unwrap(); // SIGKILL: no Drop runs in the child
    child.wait().unwrap();
    assert!(found[0].join("disk0.img").exists(), "SIGKILL left the directory behind");
    assert_eq!(vmm::run_dir::remove_stale_run_dirs(&base), 1);
    assert!(dirs().is_empty());
}

/// Run by `a_killed_process_clone_disk_directory_is_swept` in a child process: restores the
/// snapshot in MC_SWEEP_CHILD_SNAPSHOT, says so, and waits to be killed; does nothing without it.
#[test]
#[ignore = "helper: run in a child process by a_killed_process_clone_disk_directory_is_swept"]
fn helper_child_restores_and_waits() {
    let Some(dir) = std::env::var_os(SWEEP_CHILD_ENV) else {
        println!("nothing to do without {SWEEP_CHILD_ENV}");
        return;
    };
    let snap = LoadedSnapshot::load(Path::new(&dir)).expect("load");
    let (_vm, _console) = restore(&snap);
    println!("CHILD restored");
    std::thread::sleep(Duration::from_secs(60));
}
