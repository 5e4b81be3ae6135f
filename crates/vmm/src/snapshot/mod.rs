//! Snapshots: a state file (everything but guest RAM) and a memory file (guest RAM, sparse).
//!
//! State file: `MAGIC` (8) | format version (u32 LE) | body length (u64 LE) | body (bincode of
//! `MachineState`) | CRC32 of everything before it (u32 LE).
//!
//! Every file of a snapshot (memory, disk copies, state) is first written and synced beside its
//! final name (`Staged`), and only once all of them are is each renamed into place, the state
//! file last: a failed snapshot (disk full, unwritable file) leaves the previous one intact.
//! Writable disks are copied into the directory as `disk<i>.img` and named relative to it in
//! the state (read-only disks by absolute path): a snapshot directory can be moved whole.

pub mod disk;
pub mod memory;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::vcpu_state::VcpuState;
use crate::arch::vm_state::VmState;
use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::persist::TransportState;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"MCELLSNP";
/// 2: the state names its memory file (`memory_id`, matched against the file's trailer).
/// 3: the configuration may have a network device (`VmConfig::network`).
/// 5: virtio states keyed by device id (`VmConfig::virtio_ids`); device states typed.
/// 6: the i8042 controller's state (its configuration byte, unread replies).
pub const FORMAT_VERSION: u32 = 6;
const HEADER_LEN: usize = 8 + 4 + 8;
/// No state file is this big; a larger length field means a damaged file.
const MAX_BODY: u64 = 64 << 20;

/// Enough of the host CPU to refuse a restore that KVM would reject or run wrongly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFingerprint {
    pub vendor: String,
    pub family_model_stepping: u32,
}

impl CpuFingerprint {
    pub fn of_this_host() -> Self {
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        CpuFingerprint { vendor: String::from_utf8_lossy(&vendor).into_owned(), family_model_stepping: l1.eax }
    }
}

/// Where each RAM region sits in the memory file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub config: VmConfig,
    pub cpu: CpuFingerprint,
    pub memory: Vec<MemoryRegionState>,
    /// Also in the memory file's trailer: a state file and a memory file from two different
    /// snapshots (a crash between their renames) are refused instead of restoring garbage.
    pub memory_id: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// By device id (`VmConfig::virtio_ids`), not by position.
    pub virtio: BTreeMap<String, TransportState>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::SnapshotIo { path: path.to_owned(), source }
}

/// A file written beside its final path (`<name>.tmp-<pid>`) and renamed over it by `commit`.
/// Dropped uncommitted, the temporary file is removed.
pub struct Staged {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl Staged {
    pub fn create(path: &Path) -> Result<Staged> {
        let tmp = tmp_path(path);
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
        Ok(Staged { path: path.to_owned(), tmp, file: Some(file) })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// The path it will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the file to disk: do this for every file of a snapshot before committing any.
    pub fn sync(&mut self) -> Result<()> {
        let tmp = self.tmp.clone();
        self.file().sync_all().map_err(io(&tmp))
    }

    /// Renames the file into place; returns it, still open.
    pub fn commit(mut self) -> Result<File> {
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        Ok(self.file.take().expect("present until commit"))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let mut staged = Staged::create(path)?;
    write(staged.file())?;
    staged.sync()?;
    staged.commit().map(drop)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// The state file's bytes: header, body, CRC32.
pub fn encode_state(state: &MachineState) -> Result<Vec<u8>> {
    let body = bincode::serialize(state).map_err(|e| Error::Snapshot(format!("cannot encode the state: {e}")))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// The state file, written and synced but not yet in place.
pub fn stage_state(path: &Path, state: &MachineState) -> Result<Staged> {
    let bytes = encode_state(state)?;
    let mut staged = Staged::create(path)?;
    staged.file().write_all(&bytes).map_err(io(path))?;
    staged.sync()?;
    Ok(staged)
}

pub fn save_state(path: &Path, state: &MachineState) -> Result<()> {
    stage_state(path, state)?.commit().map(drop)
}

/// Opens `path` for reading only if it is a regular file (symlinks followed), without ever
/// blocking: a FIFO would hang `open(2)` and every read, a device or `/proc` file would feed
/// endless or changing bytes. `InvalidInput` (saying what the file is) for anything else.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
    let f = File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    let t = f.metadata()?.file_type();
    if t.is_file() {
        if let Some(fs) = pseudo_filesystem(&f) {
            // /proc/self/mem and friends pass for regular files: what they read is the host's.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is a file of {fs}, not a regular file", path.display()),
            ));
        }
        return Ok(f);
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{} is {what}, not a regular file", path.display()),
    ))
}

/// The kernel's pseudo filesystems (statfs magic numbers), whose files are views of the host.
fn pseudo_filesystem(f: &File) -> Option<&'static str> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs writes one `statfs` into the zeroed struct; the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    match st.f_type as u64 {
        0x9fa0 => Some("/proc"),
        0x6265_6572 => Some("sysfs"),
        0x6462_6720 => Some("debugfs"),
        0x7472_6163 => Some("tracefs"),
        0x7363_6673 => Some("securityfs"),
        0x6367_7270 | 0x0027_e0eb => Some("cgroupfs"),
        0x6265_6570 => Some("configfs"),
        0xcafe_4a11 => Some("bpffs"),
        0xde5e_81e4 => Some("efivarfs"),
        _ => None,
    }
}

/// `open_regular` with the snapshot's error codes: `E_SNAPSHOT_CORRUPT` for a file that is not
/// a regular one, `E_SNAPSHOT_IO` for the rest.
pub(crate) fn open_snapshot_file(path: &Path) -> Result<File> {
    open_regular(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::InvalidInput => {
            Error::SnapshotCorrupt { path: path.to_owned(), reason: source.to_string() }
        }
        _ => Error::SnapshotIo { path: path.to_owned(), source },
    })
}

/// Reads and checks a state file: magic, version, length, checksum, the host CPU, then every
/// field against the limits a fresh configuration has (`validate`).
pub fn load_state(path: &Path) -> Result<MachineState> {
    let corrupt = |reason: &str| Error::SnapshotCorrupt { path: path.to_owned(), reason: reason.to_owned() };
    let mut f = open_snapshot_file(path)?;
    let file_len = f.metadata().map_err(io(path))?.len();
    let mut header = [0u8; HEADER_LEN];
    f.read_exact(&mut header).map_err(|_| corrupt("shorter than its header"))?;
    if &header[..8] != MAGIC {
        return Err(corrupt("not a microcell snapshot state file (bad magic)"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(Error::SnapshotVersion { path: path.to_owned(), found: version, supported: FORMAT_VERSION });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap());
    if len > MAX_BODY {
        return Err(corrupt(&format!("implausible length: the body length field is {len}, at most {MAX_BODY}")));
    }
    // The size on disk must match before anything that long is allocated.
    if file_len != HEADER_LEN as u64 + len + 4 {
        return Err(corrupt(&format!(
            "truncated or padded: {file_len} bytes, the header says {}",
            HEADER_LEN as u64 + len + 4
        )));
    }
    let mut rest = vec![0u8; len as usize + 4];
    f.read_exact(&mut rest).map_err(|_| corrupt("truncated while being read"))?;
    let (body, crc) = rest.split_at(len as usize);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header);
    hasher.update(body);
    if hasher.finalize() != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err(corrupt("checksum mismatch"));
    }
    let state = decode_body(body).map_err(|e| corrupt(&format!("undecodable state ({e})")))?;
    let here = CpuFingerprint::of_this_host();
    if state.cpu != here {
        return Err(Error::SnapshotHost(format!(
            "snapshot: {} {:#x}, this host: {} {:#x}",
            state.cpu.vendor, state.cpu.family_model_stepping, here.vendor, here.family_model_stepping
        )));
    }
    validate(&state).map_err(|reason| corrupt(&reason))?;
    Ok(state)
}

/// bincode as `encode_state` writes it (fixed-width integers), bounded by the body's length:
/// no length field inside can make it allocate more than the body holds, and nothing may follow.
fn decode_body(body: &[u8]) -> bincode::Result<MachineState> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(body.len() as u64)
        .deserialize(body)
}

/// At most this many MSRs per vCPU (KVM lists a few hundred at most).
const MAX_MSRS: usize = 4096;

/// Checks a decoded state against the limits of a fresh configuration and of this host, before
/// anything is allocated from it: the error names the field and the limit.
pub(crate) fn validate(state: &MachineState) -> std::result::Result<(), String> {
    let config = &state.config;
    config.check().map_err(|e| format!("config: {e}"))?;
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(format!("vcpus: {} vCPU states for config.vcpus = {}", state.vcpus.len(), config.vcpus));
    }
    // The memory layout is the one `memory::layout` writes for this size, and nothing else.
    let mut offset = 0u64;
    let expected: Vec<(u64, u64, u64)> = crate::arch::layout::ram_regions(u64::from(config.memory_mib) << 20)
        .into_iter()
        .map(|(addr, size)| {
            let r = (addr, size, offset);
            offset += size;
            r
        })
        .collect();
    let found: Vec<(u64, u64, u64)> = state.memory.iter().map(|r| (r.guest_addr, r.size, r.file_offset)).collect();
    if found != expected {
        return Err(format!(
            "memory: regions (guest address, size, file offset) {found:x?} are not the layout of {} MiB, {expected:x?}",
            config.memory_mib
        ));
    }
    // What booted fits the boot layout's command line (the restore does not use it, but the
    // config travels on: `config()`, a later snapshot).
    let max_cmdline = crate::arch::layout::CMDLINE_MAX_SIZE - 1;
    if config.cmdline.len() > max_cmdline {
        return Err(format!("config.cmdline: {} bytes, at most {max_cmdline}", config.cmdline.len()));
    }
    for (i, disk) in config.block_devices.iter().enumerate() {
        // The snapshot's own disk copies are bare names inside its directory; others absolute.
        if disk.path.is_relative() {
            let mut parts = disk.path.components();
            if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
                return Err(format!(
                    "config.blockDevices[{i}].path: {} is neither absolute nor a file name in the snapshot directory",
                    disk.path.display()
                ));
            }
        }
    }
    let ids = config.virtio_ids();
    let wanted: std::collections::BTreeSet<&String> = ids.iter().collect();
    if !state.virtio.keys().eq(wanted) {
        let found: Vec<_> = state.virtio.keys().collect();
        return Err(format!("virtio: device states for {found:?}, the configuration has devices {ids:?}"));
    }
    state.i8042.check().map_err(|e| e.to_string())?;
    for (i, v) in state.vcpus.iter().enumerate() {
        if v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(format!(
                "vcpus[{i}].cpuid: {} entries, at most {}",
                v.cpuid.len(),
                kvm_bindings::KVM_MAX_CPUID_ENTRIES
            ));
        }
        if v.msrs.len() > MAX_MSRS {
            return Err(format!("vcpus[{i}].msrs: {} entries, at most {MAX_MSRS}", v.msrs.len()));
        }
    }
    Ok(())
}
