//! Snapshots of a running VM (`Vm::snapshot`) and loading them back (`LoadedSnapshot`); the
//! restore itself is `builder`'s.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::arch::{vcpu_state, vm_state};
use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::persist::TransportState;
use crate::error::{Error, Result};
use crate::handle::{lock, Vm};
use crate::snapshot::{self, MachineState};
use crate::state::Persist;

/// The legacy devices' states, as one snapshot takes them.
struct LegacyStates {
    serial: SerialState,
    i8042: I8042State,
}

/// Held while a snapshot is written into a directory (see `snapshot_paused`).
struct DirLock(PathBuf);

static SNAPSHOT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

static SNAPSHOT_DIR_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl DirLock {
    fn take(dir: &Path) -> DirLock {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let mut held = lock(&SNAPSHOT_DIRS);
        while held.contains(&dir) {
            held = SNAPSHOT_DIR_FREED.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push(dir.clone());
        DirLock(dir)
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        lock(&SNAPSHOT_DIRS).retain(|d| d != &self.0);
        SNAPSHOT_DIR_FREED.notify_all();
    }
}

/// ORs per-region page bitmaps `b` into `a`, growing `a` as needed.
fn or_into(a: &mut Vec<Vec<u64>>, b: &[Vec<u64>]) {
    if a.len() < b.len() {
        a.resize(b.len(), Vec::new());
    }
    for (x, y) in a.iter_mut().zip(b) {
        if x.len() < y.len() {
            x.resize(y.len(), 0);
        }
        for (w, v) in x.iter_mut().zip(y) {
            *w |= v;
        }
    }
}

/// A snapshot read from disk and checked, ready to restore any number of times.
pub struct LoadedSnapshot {
    pub(crate) state: MachineState,
    pub(crate) memory_path: PathBuf,
    pub(crate) memory_file: std::fs::File,
}

pub const SNAPSHOT_STATE_FILE: &str = "vm.state";

pub const SNAPSHOT_MEMORY_FILE: &str = "vm.mem";

impl LoadedSnapshot {
    /// Reads `dir/vm.state` (magic, version, checksum, host CPU) and checks `dir/vm.mem` exists.
    /// The directory may have been moved since it was written (disk copies are found in it).
    pub fn load(dir: &Path) -> Result<LoadedSnapshot> {
        let mut state = snapshot::load_state(&dir.join(SNAPSHOT_STATE_FILE))?;
        // The snapshot's own disk copies are named relative to its directory (`validate` made
        // sure they are bare file names). Each must be a regular file: a FIFO would hang the
        // copy or the open, a device would be handed to the guest.
        for disk in &mut state.config.block_devices {
            if disk.path.is_relative() {
                disk.path = dir.join(&disk.path);
            }
            snapshot::open_snapshot_file(&disk.path)?;
        }
        let memory_path = dir.join(SNAPSHOT_MEMORY_FILE);
        let io = |source| Error::SnapshotIo { path: memory_path.clone(), source };
        let memory_file = snapshot::open_snapshot_file(&memory_path)?;
        let len = memory_file.metadata().map_err(io)?.len();
        // `validate` checked the layout: these sums cannot overflow.
        let end: u64 = state.memory.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
        let needed = end + snapshot::memory::TRAILER_LEN;
        if len != needed {
            return Err(Error::SnapshotCorrupt {
                path: memory_path,
                reason: format!("memory file is {len} bytes, the state says {needed} (guest RAM + trailer)"),
            });
        }
        snapshot::memory::check_id(&memory_file, end, state.memory_id, &memory_path)?;
        Ok(LoadedSnapshot { state, memory_path, memory_file })
    }

    /// The configuration the snapshot was taken with.
    pub fn config(&self) -> &VmConfig {
        &self.state.config
    }
}

impl Vm {
    /// Writes `dir/vm.state` and `dir/vm.mem` (each atomically) and leaves the VM as it was
    /// (a running VM is paused for the duration). Returns the memory bytes written.
    ///
    /// `incremental` (needs `track_dirty_pages` and an earlier snapshot of, or restore into,
    /// this VM): the memory file starts as a copy of the earlier one and only the pages written
    /// since are written; the result is a complete, mappable snapshot all the same.
    pub fn snapshot(&self, dir: &Path, incremental: bool) -> Result<u64> {
        let _held = self.hold("snapshotted")?;
        self.snapshot_paused(dir, incremental)
    }

    fn snapshot_paused(&self, dir: &Path, incremental: bool) -> Result<u64> {
        let m = self.machine();
        std::fs::create_dir_all(dir).map_err(|source| Error::SnapshotIo { path: dir.to_owned(), source })?;
        // Two VMs of this process snapshotting into one directory would share temporary file
        // names (`<file>.tmp-<pid>`): one at a time per directory.
        let _dir_lock = DirLock::take(dir);
        let base = lock(&m.base_memory)
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(|source| Error::SnapshotIo { path: dir.to_owned(), source })?;
        if incremental && (base.is_none() || !m.config.track_dirty_pages) {
            return Err(Error::VmState(
                "an incremental snapshot needs track_dirty_pages and an earlier snapshot of this VM".into(),
            ));
        }
        // Hold every device lock across state and memory, so the event thread cannot move a
        // queue between the two.
        let transports: Vec<_> = m.virtio.iter().map(|t| lock(t)).collect();
        let vm = m.vm.save()?;
        let vcpus = m.vcpus.iter().map(|fd| lock(fd).save()).collect::<Result<Vec<_>>>()?;
        let serial = lock(&m.serial).save()?;
        let i8042 = lock(&m.i8042).save()?;
        let virtio = m
            .config
            .virtio_ids()
            .into_iter()
            .zip(&transports)
            .map(|(id, t)| Ok((id, t.save()?)))
            .collect::<Result<_>>()?;
        // The pages written since the base (which a full snapshot replaces, so that the next
        // incremental one starts from here): the logs are read (and cleared) now; if the
        // snapshot fails they are carried over to the next one.
        let dirty = if m.config.track_dirty_pages {
            let mut dirty = m.vm.take_dirty_log()?;
            or_into(&mut dirty, &snapshot::memory::take_vmm_dirty(&m.memory));
            or_into(&mut dirty, &std::mem::take(&mut *lock(&m.carried_dirty)));
            Some(dirty)
        } else {
            None
        };
        let base = base.filter(|_| incremental);
        let legacy = LegacyStates { serial, i8042 };
        let result = self.write_snapshot(dir, base, dirty.as_deref(), vm, vcpus, legacy, virtio);
        if let (Err(_), Some(dirty)) = (&result, dirty) {
            or_into(&mut lock(&m.carried_dirty), &dirty);
        }
        result
    }

    /// Writes every file of the snapshot beside its final name, then renames them into place,
    /// the state file last: a failure before that leaves the previous snapshot in `dir` whole.
    #[allow(clippy::too_many_arguments)]
    fn write_snapshot(
        &self,
        dir: &Path,
        incremental_base: Option<File>,
        dirty: Option<&[Vec<u64>]>,
        vm: vm_state::VmState,
        vcpus: Vec<vcpu_state::VcpuState>,
        legacy: LegacyStates,
        virtio: BTreeMap<String, TransportState>,
    ) -> Result<u64> {
        let m = self.machine();
        let memory_path = dir.join(SNAPSHOT_MEMORY_FILE);
        let io = |source| Error::SnapshotIo { path: memory_path.clone(), source };
        let mut memory = snapshot::Staged::create(&memory_path)?;
        let written = match incremental_base {
            Some(base) => {
                // Start from the earlier memory (instant with reflinks), then overwrite.
                snapshot::disk::copy_into(&base, memory.file()).map_err(io)?;
                let dirty = dirty.expect("incremental snapshots track dirty pages");
                snapshot::memory::dump_dirty(&m.memory, dirty, memory.file(), &memory_path)?
            }
            None => {
                // A restored VM's pages that it has not written live in the file its RAM is
                // mapped from, whether or not they are resident here: start from a copy of it.
                if let Some(backing) = &m.backing_memory {
                    snapshot::disk::copy_into(backing, memory.file()).map_err(io)?;
                }
                snapshot::memory::dump(&m.memory, memory.file(), &memory_path)?;
                memory.file().metadata().map(|md| md.blocks() * 512).unwrap_or(0)
            }
        };
        let layout = snapshot::memory::layout(&m.memory);
        let memory_id = snapshot::memory::new_memory_id();
        let end = layout.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
        snapshot::memory::write_id(memory.file(), end, memory_id, &memory_path)?;
        memory.sync()?;
        // Writable disks are copied (copy-on-write where possible) while the VM cannot write,
        // and named relative to the snapshot directory (`load` resolves them), so that the
        // directory can be moved or copied whole. Read-only disks stay where they are.
        let mut config = m.config.clone();
        // The policy in force now, which may have changed since the start.
        if let (Some(net), Some(live)) = (config.network.as_mut(), &self.egress) {
            net.egress = live.get();
        }
        let mut disks = Vec::new();
        let mut writable = 0;
        for disk in config.block_devices.iter_mut() {
            if disk.read_only {
                disk.path = std::path::absolute(&disk.path)
                    .map_err(|source| Error::SnapshotIo { path: disk.path.clone(), source })?;
                continue;
            }
            let name = format!("disk{writable}.img");
            writable += 1;
            let copy = dir.join(&name);
            let mut staged = snapshot::Staged::create(&copy)?;
            snapshot::disk::clone_into(&disk.path, staged.file())
                .map_err(|source| Error::SnapshotIo { path: copy.clone(), source })?;
            staged.sync()?;
            disk.path = PathBuf::from(name);
            disks.push(staged);
        }
        let state = MachineState {
            config,
            cpu: snapshot::CpuFingerprint::of_this_host(),
            memory: layout,
            memory_id,
            vm,
            vcpus,
            serial: legacy.serial,
            i8042: legacy.i8042,
            virtio,
        };
        let state = snapshot::stage_state(&dir.join(SNAPSHOT_STATE_FILE), &state)?;
        let memory = memory.commit()?;
        for disk in disks {
            disk.commit()?;
        }
        state.commit()?;
        lock(&m.base_memory).replace(memory);
        Ok(written)
    }
}
