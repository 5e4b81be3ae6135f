//! Bad-input battery for snapshot files (issue 15, finding 5): a snapshot directory is input
//! from anyone, so every mutated, truncated, extended or non-regular file must end in a clean
//! error (or a VM that restores and can be killed) — never a panic, an abort, a hang or a huge
//! allocation.
//!
//! The same deterministic mutations (xorshift64, fixed seeds) run twice: over a synthetic
//! snapshot through `LoadedSnapshot::load` (parse + validate, no KVM: always runs), and over a
//! real test-guest snapshot where every one that loads is also restored and run (T1). Each
//! case runs on a thread of its own with a deadline; the process's peak RSS is checked after.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::{require_kvm, Capture};
use vmm::devices::legacy::i8042::I8042State;
use vmm::devices::legacy::serial::SerialState;
use vmm::devices::virtio::persist::{DeviceState, TransportState};
use vmm::snapshot::{self, CpuFingerprint, MachineState, MemoryRegionState};
use vmm::{BlockDeviceConfig, LoadedSnapshot, NetworkConfig, RestoreOptions, Vm, VmConfig};

/// No case may take longer than this (a FIFO opened blocking never returns).
const CASE_DEADLINE: Duration = Duration::from_secs(10);
/// Peak RSS allowed over the whole battery: the snapshots are a few MiB of state.
const MAX_PEAK_RSS_MIB: u64 = 1024;
const SYNTH_MIB: u32 = 16;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("mc-snapbad-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot of nothing in particular: the layout, CPU and devices are right, the register
/// contents are KVM's zeros. It loads (parse + validate) without KVM.
fn synthetic_snapshot(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = u64::from(SYNTH_MIB) << 20;
    let state = MachineState {
        config: VmConfig {
            vcpus: 1,
            memory_mib: SYNTH_MIB,
            kernel: "/nonexistent/kernel".into(),
            ..Default::default()
        },
        cpu: CpuFingerprint::of_this_host(),
        memory: vec![MemoryRegionState { guest_addr: 0, size: bytes, file_offset: 0 }],
        memory_id: 0x1234_5678_9abc_def0,
        vm: vmm::arch::vm_state::VmState {
            pit: Default::default(),
            clock: Default::default(),
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
        },
        vcpus: vec![vmm::arch::vcpu_state::VcpuState {
            cpuid: vec![Default::default(); 4],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 8],
            vcpu_events: Default::default(),
            tsc_khz: None,
        }],
        serial: SerialState { registers: [0; 10], in_buffer: Vec::new() },
        i8042: I8042State::default(),
        virtio: Default::default(),
    };
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    let mem = std::fs::File::create(dir.join("vm.mem")).unwrap();
    mem.set_len(bytes).unwrap();
    snapshot::memory::write_id(&mem, bytes, state.memory_id, &dir.join("vm.mem")).unwrap();
}

/// A state file with the CRC32 recomputed over its (mutated) header and body.
fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 4 {
        let end = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

const HEADER_LEN: usize = 20;

/// What one case writes into the snapshot directory.
enum Case {
    /// The state file's bytes (vm.mem stays the good one).
    State(Vec<u8>),
    /// The memory file's new length, and bytes to XOR in at offsets (vm.state stays good).
    Memory { len: u64, flips: Vec<(u64, u8)> },
    /// vm.state or vm.mem replaced by something that is not a regular file.
    Special { file: &'static str, kind: &'static str },
}

/// Structured mutations: the state decoded, one field changed, written back by this build
/// (valid magic, version and CRC). Returns what was changed.
fn mutate_field(state: &mut MachineState, rng: &mut XorShift) -> String {
    let host_mib = vmm::host::cached().host_memory_mib;
    match rng.below(19) {
        0 => {
            let v = [0, 1, (1 << 31) - 1, u32::MAX, (host_mib + 1) as u32, rng.next() as u32][rng.below(6) as usize];
            state.config.memory_mib = v;
            format!("config.memory_mib = {v}")
        }
        1 => {
            let v = [0u8, 33, 255, 2][rng.below(4) as usize];
            state.config.vcpus = v;
            format!("config.vcpus = {v}")
        }
        2 => {
            let n = rng.below(4) as usize;
            state.vcpus.truncate(n.min(state.vcpus.len()));
            if n > 1 {
                state.vcpus.push(clone_vcpu(&state.vcpus[0]));
            }
            format!("{} vCPU states", state.vcpus.len())
        }
        3 => {
            let v = 1u64 << (30 + rng.below(34));
            state.memory[0].size = v;
            format!("memory[0].size = {v:#x}")
        }
        4 => {
            let v = rng.next();
            state.memory[0].file_offset = v;
            format!("memory[0].file_offset = {v:#x}")
        }
        5 => {
            state.memory[0].guest_addr = rng.next() & !0xfff;
            "memory[0].guest_addr moved".into()
        }
        6 => {
            let r = state.memory[0].clone();
            state.memory.push(r);
            "memory region duplicated".into()
        }
        7 => {
            state.memory.clear();
            "no memory regions".into()
        }
        8 => {
            state.memory_id ^= 1 + rng.below(u64::MAX - 1);
            "memory_id of another snapshot".into()
        }
        9 => {
            let path =
                ["../../../etc/passwd", "/dev/zero", "/nonexistent.img", "a/b.img", "fifo.img"][rng.below(5) as usize];
            state.config.block_devices.push(BlockDeviceConfig { path: path.into(), read_only: rng.below(2) == 0 });
            format!("a disk at {path}")
        }
        10 => {
            state.config.control_channel = !state.config.control_channel;
            "control_channel toggled".into()
        }
        11 => {
            state.config.network = Some(NetworkConfig { mac: [2, 0, 0, 0, 0, 1], ..Default::default() });
            "a network device".into()
        }
        12 => {
            let t = transport_state(
                rng.below(5) as u32,
                rng.below(2) == 0,
                if rng.below(2) == 0 { DeviceState::Block } else { DeviceState::Net },
            );
            state.virtio.insert(format!("extra{}", rng.below(4)), t);
            "an extra virtio device state".into()
        }
        13 => {
            let n = 257 + rng.below(2000) as usize;
            let e = state.vcpus[0].cpuid[0];
            state.vcpus[0].cpuid = vec![e; n];
            format!("{n} CPUID entries")
        }
        14 => {
            let n = 4097 + rng.below(20_000) as usize;
            let e = state.vcpus[0].msrs.first().copied().unwrap_or_default();
            state.vcpus[0].msrs = vec![e; n];
            format!("{n} MSRs")
        }
        15 => {
            let n = rng.below(4096) as usize;
            state.serial.in_buffer = vec![b'x'; n];
            format!("serial FIFO of {n} bytes")
        }
        16 => {
            let n = rng.below(1 << 20) as usize;
            state.config.cmdline = "x".repeat(n);
            format!("cmdline of {n} bytes")
        }
        17 => match rng.below(3) {
            0 => {
                let n = 17 + rng.below(1 << 16) as usize;
                state.i8042.output = vec![0x55; n];
                format!("i8042 output of {n} bytes")
            }
            1 => {
                state.i8042.status = 1 << (4 + rng.below(4));
                format!("i8042 status {:#04x}", state.i8042.status)
            }
            _ => {
                state.i8042.awaiting = Some(0xaa);
                "i8042 awaiting a parameter of 0xaa".into()
            }
        },
        _ => {
            if let Some(m) = state.vcpus[0].msrs.get_mut(0) {
                m.data = rng.next();
            }
            state.vcpus[0].regs.rip = rng.next();
            "rip and an MSR changed".into()
        }
    }
}

fn clone_vcpu(v: &vmm::arch::vcpu_state::VcpuState) -> vmm::arch::vcpu_state::VcpuState {
    let bytes = bincode::serialize(v).unwrap();
    bincode::deserialize(&bytes).unwrap()
}

/// The battery: 50 raw state mutations, 150 with the CRC made to fit (90 byte-level, 60
/// field-level), 40 memory-file mutations, and the non-regular files.
fn cases(good: &Path) -> Vec<(String, Case)> {
    let state = std::fs::read(good.join("vm.state")).unwrap();
    let mem_len = std::fs::metadata(good.join("vm.mem")).unwrap().len();
    let mut rng = XorShift(0x5eed_1505);
    let mut out = Vec::new();
    for i in 0..50 {
        let mut b = state.clone();
        let what = match rng.below(5) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] ^= 1 << rng.below(8);
                }
                "bits flipped"
            }
            1 => {
                b.truncate(rng.below(b.len() as u64) as usize);
                "truncated"
            }
            2 => {
                for _ in 0..1 + rng.below(4096) {
                    b.push(rng.next() as u8);
                }
                "extended"
            }
            3 => {
                b[12..20].copy_from_slice(&rng.next().to_le_bytes());
                "length field"
            }
            _ => {
                let at = rng.below(b.len() as u64) as usize;
                let n = (rng.below(64) as usize).min(b.len() - at);
                for x in &mut b[at..at + n] {
                    *x = rng.next() as u8;
                }
                "random run"
            }
        };
        out.push((format!("raw {i}: {what}"), Case::State(b)));
    }
    for i in 0..90 {
        let mut b = state.clone();
        let body = HEADER_LEN..b.len() - 4;
        let what = match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = body.start + rng.below(body.len() as u64) as usize;
                    b[at] ^= 1 << rng.below(8);
                }
                "body bits flipped"
            }
            1 => {
                // Length fields are u64 LE in this encoding: an 0xff run makes one huge.
                let at = body.start + rng.below(body.len() as u64) as usize;
                let n = (1 + rng.below(8) as usize).min(body.end - at);
                b[at..at + n].fill(0xff);
                "0xff run in the body"
            }
            _ => {
                let at = body.start + rng.below(body.len() as u64) as usize;
                let n = (1 + rng.below(16) as usize).min(body.end - at);
                b[at..at + n].fill(0);
                "zero run in the body"
            }
        };
        out.push((format!("crc {i}: {what}"), Case::State(with_crc(b))));
    }
    let decoded = snapshot::load_state(&good.join("vm.state")).expect("the good state loads");
    for i in 0..60 {
        let mut s = bincode::deserialize::<MachineState>(&bincode::serialize(&decoded).unwrap()).unwrap();
        let what = mutate_field(&mut s, &mut rng);
        out.push((format!("field {i}: {what}"), Case::State(snapshot::encode_state(&s).unwrap())));
    }
    for i in 0..40 {
        let (len, flips, what) = match rng.below(5) {
            0 => (rng.below(mem_len), Vec::new(), "truncated"),
            1 => (mem_len + 1 + rng.below(1 << 20), Vec::new(), "extended"),
            2 => (mem_len, vec![(mem_len - 1 - rng.below(16), 1 << rng.below(8))], "trailer byte flipped"),
            3 => (mem_len - 4096, Vec::new(), "one page short"),
            _ => (mem_len, vec![(rng.below(mem_len - 16), 0x80)], "guest RAM byte flipped"),
        };
        out.push((format!("memory {i}: {what}"), Case::Memory { len, flips }));
    }
    for file in ["vm.state", "vm.mem"] {
        for kind in ["fifo", "dir", "socket", "link-dev-zero", "link-dev-null", "link-proc-self-mem", "dangling-link"] {
            out.push((format!("{file} as {kind}"), Case::Special { file, kind }));
        }
    }
    out
}

/// Writes `case` into `dir` (a copy of `good`'s shape: vm.mem a link to the good one unless the
/// case changes it).
fn prepare(good: &Path, dir: &Path, case: &Case) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let link_mem = || symlink(good.join("vm.mem"), dir.join("vm.mem")).unwrap();
    // The fifo.img disk of field mutation 9, in case it gets as far as opening it.
    nix_mkfifo(&dir.join("fifo.img"));
    match case {
        Case::State(bytes) => {
            std::fs::write(dir.join("vm.state"), bytes).unwrap();
            link_mem();
        }
        Case::Memory { len, flips } => {
            std::fs::copy(good.join("vm.state"), dir.join("vm.state")).unwrap();
            let path = dir.join("vm.mem");
            std::fs::copy(good.join("vm.mem"), &path).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            f.set_len(*len).unwrap();
            use std::os::unix::fs::FileExt;
            for &(at, x) in flips {
                let mut b = [0u8];
                f.read_exact_at(&mut b, at).unwrap();
                f.write_all_at(&[b[0] ^ x], at).unwrap();
            }
        }
        Case::Special { file, kind } => {
            if *file == "vm.mem" {
                std::fs::copy(good.join("vm.state"), dir.join("vm.state")).unwrap();
            } else {
                link_mem();
            }
            let path = dir.join(file);
            match *kind {
                "fifo" => nix_mkfifo(&path),
                "dir" => std::fs::create_dir(&path).unwrap(),
                "socket" => std::mem::forget(std::os::unix::net::UnixListener::bind(&path).unwrap()),
                "link-dev-zero" => symlink("/dev/zero", &path).unwrap(),
                "link-dev-null" => symlink("/dev/null", &path).unwrap(),
                "link-proc-self-mem" => symlink("/proc/self/mem", &path).unwrap(),
                _ => symlink(dir.join("nowhere"), &path).unwrap(),
            }
        }
    }
}

fn nix_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path; mkfifo reads it only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// How one case ended.
enum Outcome {
    Refused(&'static str, String),
    Loaded(Box<LoadedSnapshot>),
    Panicked(String),
}

/// Runs `f` on a thread of its own; None if it does not finish within `CASE_DEADLINE`.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<std::thread::Result<T>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    rx.recv_timeout(CASE_DEADLINE).ok()
}

fn load(dir: &Path, what: &str) -> Outcome {
    let d = dir.to_owned();
    match bounded(move || LoadedSnapshot::load(&d)) {
        None => panic!("{what}: Snapshot load did not return within {CASE_DEADLINE:?} (a hang)"),
        Some(Err(p)) => Outcome::Panicked(format!("{p:?}")),
        Some(Ok(Ok(s))) => Outcome::Loaded(Box::new(s)),
        Some(Ok(Err(e))) => Outcome::Refused(e.code(), e.to_string()),
    }
}

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

const LOAD_CODES: [&str; 4] = ["E_SNAPSHOT_CORRUPT", "E_SNAPSHOT_VERSION", "E_SNAPSHOT_HOST", "E_SNAPSHOT_IO"];

/// Per group (`raw`, `crc`, `field`, `memory`, special files): how many ended how.
#[derive(Default)]
struct Tally(BTreeMap<String, BTreeMap<String, usize>>);

impl Tally {
    fn add(&mut self, what: &str, outcome: &str) {
        let group = what.split([' ', ':']).next().unwrap_or(what);
        let group = if group.starts_with("vm.") { "non-regular" } else { group };
        *self.0.entry(group.into()).or_default().entry(outcome.into()).or_default() += 1;
    }
    fn print(&self, title: &str) {
        for (group, outcomes) in &self.0 {
            let total: usize = outcomes.values().sum();
            let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
            println!("{title}: {total} {group}: {}", parts.join(", "));
        }
    }
}

/// Runs every case through `load`, then `after_load` for those that load. Returns the tally.
fn battery(good: &Path, work: &Path, mut after_load: impl FnMut(&str, LoadedSnapshot) -> String) -> Tally {
    let mut tally = Tally::default();
    let dir = work.join("case");
    for (what, case) in cases(good) {
        prepare(good, &dir, &case);
        let outcome = match load(&dir, &what) {
            Outcome::Panicked(p) => panic!("{what}: load panicked: {p}"),
            Outcome::Refused(code, msg) => {
                assert!(LOAD_CODES.contains(&code), "{what}: unexpected code {code}: {msg}");
                if matches!(case, Case::Special { .. }) {
                    // Every non-regular file is named as such, none is read.
                    assert!(msg.contains("not a regular file") || code == "E_SNAPSHOT_IO", "{what}: {code} {msg}");
                }
                format!("refused with {code}")
            }
            Outcome::Loaded(snap) => after_load(&what, *snap),
        };
        tally.add(&what, &outcome);
    }
    let peak = peak_rss_mib();
    println!("peak RSS over the battery: {peak} MiB");
    assert!(peak < MAX_PEAK_RSS_MIB, "peak RSS {peak} MiB: some input made the loader allocate that much");
    tally
}

#[test]
fn mutated_snapshot_files_are_refused_cleanly_without_kvm() {
    let work = TempDir::new("synth");
    let good = work.0.join("good");
    synthetic_snapshot(&good);
    LoadedSnapshot::load(&good).expect("the synthetic snapshot loads");
    let tally = battery(&good, &work.0, |what, _| {
        // Only mutations of register contents and guest RAM may pass the checks.
        assert!(
            what.starts_with("crc") || what.contains("rip") || what.contains("RAM") || what.contains("serial"),
            "{what}: loaded"
        );
        "loaded (restore not tried: no KVM in this test)".into()
    });
    tally.print("load without KVM");
    let refused: usize =
        tally.0.values().flat_map(|o| o.iter()).filter(|(k, _)| k.starts_with("refused")).map(|(_, n)| n).sum();
    assert!(refused >= 150, "only {refused} cases refused: the battery does not reach the checks");
}

/// The memory size of a fresh config bounds a snapshot's: 2^31-1 MiB with a valid CRC aborted
/// `restore()` (a failed allocation) before.
#[test]
fn a_snapshot_asking_for_more_memory_than_the_host_has_is_refused_at_load() {
    let work = TempDir::new("huge");
    let dir = work.0.join("s");
    synthetic_snapshot(&dir);
    let mut state = snapshot::load_state(&dir.join("vm.state")).unwrap();
    state.config.memory_mib = (1 << 31) - 1;
    state.memory[0].size = u64::from(state.config.memory_mib) << 20;
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    let e = LoadedSnapshot::load(&dir).err().expect("refused");
    println!("{} {e}", e.code());
    assert_eq!(e.code(), "E_SNAPSHOT_CORRUPT");
    assert!(e.to_string().contains("memory is 2147483647 MiB"), "{e}");
}

/// A FIFO as vm.state hung `Snapshot.load()` forever before.
#[test]
fn a_fifo_as_the_state_file_is_refused_at_once() {
    let work = TempDir::new("fifo");
    let good = work.0.join("good");
    synthetic_snapshot(&good);
    let dir = work.0.join("case");
    prepare(&good, &dir, &Case::Special { file: "vm.state", kind: "fifo" });
    let t = std::time::Instant::now();
    let (code, msg) = refused(&dir, "a FIFO as vm.state");
    assert_eq!(code, "E_SNAPSHOT_CORRUPT", "{msg}");
    assert!(msg.contains("is a FIFO, not a regular file"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
}

/// A memory file longer than the state says was accepted before.
#[test]
fn a_memory_file_longer_than_the_state_says_is_refused() {
    let work = TempDir::new("long");
    let good = work.0.join("good");
    synthetic_snapshot(&good);
    let dir = work.0.join("case");
    let len = std::fs::metadata(good.join("vm.mem")).unwrap().len();
    prepare(&good, &dir, &Case::Memory { len: len + 4096, flips: Vec::new() });
    let (code, msg) = refused(&dir, "a memory file a page too long");
    assert_eq!(code, "E_SNAPSHOT_CORRUPT", "{msg}");
    assert!(msg.contains("the state says"), "{msg}");
}

/// A disk named `../../x` in the state pointed outside the snapshot directory before.
#[test]
fn a_disk_path_escaping_the_snapshot_directory_is_refused() {
    let work = TempDir::new("escape");
    let dir = work.0.join("s");
    synthetic_snapshot(&dir);
    let mut state = snapshot::load_state(&dir.join("vm.state")).unwrap();
    state.config.block_devices.push(BlockDeviceConfig { path: "../s/vm.mem".into(), read_only: false });
    state.virtio.insert("block0".into(), transport_state(2, false, DeviceState::Block));
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    let e = LoadedSnapshot::load(&dir).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT_CORRUPT", "{e}");
    assert!(e.to_string().contains("blockDevices[0].path"), "{e}");
}

/// Device states are matched to devices by id, not by position: a console's state filed under
/// another id is refused (and the one under its own id loads).
#[test]
fn a_device_state_under_another_id_is_refused() {
    let work = TempDir::new("ids");
    let dir = work.0.join("s");
    synthetic_snapshot(&dir);
    let mut state = snapshot::load_state(&dir.join("vm.state")).unwrap();
    state.config.control_channel = true;
    let console = transport_state(3, false, DeviceState::Console(Default::default()));
    state.virtio.insert("console0".into(), console.clone());
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    LoadedSnapshot::load(&dir).expect("the console's state under its id loads");
    let console = state.virtio.remove("console0").unwrap();
    state.virtio.insert("console1".into(), console);
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    let e = LoadedSnapshot::load(&dir).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT_CORRUPT", "{e}");
    assert!(e.to_string().contains("console1") && e.to_string().contains("console0"), "{e}");
}

/// The i8042 state is checked at load like every other field: an output queue beyond the
/// controller's 16 bytes is refused with the field named.
#[test]
fn an_i8042_state_the_controller_cannot_reach_is_refused_at_load() {
    let work = TempDir::new("i8042");
    let dir = work.0.join("s");
    synthetic_snapshot(&dir);
    let mut state = snapshot::load_state(&dir.join("vm.state")).unwrap();
    state.i8042.output = vec![0x55; 16];
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    LoadedSnapshot::load(&dir).expect("16 unread bytes load");
    state.i8042.output.push(0x55);
    snapshot::save_state(&dir.join("vm.state"), &state).unwrap();
    let e = LoadedSnapshot::load(&dir).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT_CORRUPT", "{e}");
    assert!(e.to_string().contains("i8042") && e.to_string().contains("17 output bytes"), "{e}");
}

/// A transport state with no queues set up: `device_type`, whether it was active, its device's.
fn transport_state(device_type: u32, activated: bool, device: DeviceState) -> TransportState {
    TransportState {
        device_type,
        queues: Vec::new(),
        queue_select: 0,
        device_features_select: 0,
        driver_features_select: 0,
        acked_features: 0,
        status: 0,
        activated,
        config_generation: 0,
        interrupt_status: 0,
        device,
    }
}

/// `load`'s refusal of a case, or a panic naming it.
fn refused(dir: &Path, what: &str) -> (&'static str, String) {
    match load(dir, what) {
        Outcome::Refused(code, msg) => (code, msg),
        Outcome::Loaded(_) => panic!("{what}: loaded"),
        Outcome::Panicked(p) => panic!("{what}: panic {p}"),
    }
}

// ---- T1: restore what loads ----

/// The compute test guest, snapshotted mid-run.
fn real_snapshot(dir: &Path) {
    let c = testguest::Compute { seed: 0x5eed_0015, pages: 64, steps: 40, rounds: 2 };
    let config = VmConfig {
        vcpus: 1,
        memory_mib: 32,
        kernel: testguest::path(testguest::COMPUTE),
        cmdline: testguest::compute_cmdline(&c),
        ..Default::default()
    };
    let console = Capture::default();
    let vm = Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let t = std::time::Instant::now();
    while !console.text().contains("TG step 2\n") {
        assert!(t.elapsed() < Duration::from_secs(30), "no step 2:\n{}", console.text());
        assert!(vm.try_exit().is_none(), "the guest ended:\n{}", console.text());
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().unwrap();
    vm.snapshot(dir, false).expect("snapshot");
    vm.kill();
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn mutated_snapshot_files_are_refused_or_restore_and_run_on_kvm() {
    require_kvm();
    let work = TempDir::new("real");
    let good = work.0.join("good");
    real_snapshot(&good);
    LoadedSnapshot::load(&good).expect("the real snapshot loads");
    let tally = battery(&good, &work.0, |what, snap| {
        let what = what.to_owned();
        let ended = bounded(move || -> String {
            let console = Capture::default();
            match Vm::restore(&snap, Box::new(console), RestoreOptions::default()) {
                Err(e) => format!("loaded, restore refused with {}", e.code()),
                Ok(vm) => {
                    // Whatever the guest does with its mutated state, it ends or is killed.
                    let reason = vm.wait_timeout(Duration::from_millis(300));
                    vm.kill();
                    let end = vm.wait_timeout(Duration::from_secs(5)).expect("a killed VM ends");
                    match reason {
                        Some(r) => format!("restored, ended by itself ({r:?})"),
                        None => format!("restored, ran until killed ({end:?})"),
                    }
                }
            }
        });
        match ended {
            None => panic!("{what}: restore did not return within {CASE_DEADLINE:?}"),
            Some(Err(p)) => panic!("{what}: restore panicked: {p:?}"),
            Some(Ok(o)) => o,
        }
    });
    tally.print("load + restore on KVM");
}
