//! Guest RAM to and from the memory file. Saving writes only the pages that hold data, in RAM
//! or swapped out (/proc/self/pagemap), so the file is sparse; restoring maps the file
//! `MAP_PRIVATE` over the VM's RAM, so pages load on first touch from the shared page cache and
//! each clone's writes stay its own (copy-on-write).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::MemoryRegionState;
use crate::error::{Error, Result};

const PAGE: usize = 4096;

/// Which pages of `[host, host + len)` hold data (1) — in RAM or swapped out — and which were
/// never touched (0, they read as zeros). `/proc/self/pagemap` knows both; mincore(2), the
/// fallback, only knows what is in RAM; None if neither can say.
fn pages_with_data(host: *mut u8, len: usize) -> Option<Vec<u8>> {
    let pages = len.div_ceil(PAGE);
    if let Some(v) = pagemap(host as usize, pages) {
        return Some(v);
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `host..host+len` is one live mapping owned by the guest memory; `vec` has one
    // byte per page of it, as mincore(2) requires.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

fn pagemap(host: usize, pages: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let f = File::open("/proc/self/pagemap").ok()?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (host / PAGE * 8) as u64).ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|e| u8::from(u64::from_le_bytes(e.try_into().unwrap()) & (PRESENT | SWAPPED) != 0))
            .collect(),
    )
}

/// Where each region sits in a memory file: region after region.
pub fn layout(mem: &GuestRam) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let s = MemoryRegionState { guest_addr: r.start_addr().0, size: r.len(), file_offset: offset };
            offset += r.len();
            s
        })
        .collect()
}

/// Writes guest RAM to `file` (region after region) and returns the layout.
pub fn dump(mem: &GuestRam, file: &mut File, path: &Path) -> Result<Vec<MemoryRegionState>> {
    let io = |source| Error::SnapshotIo { path: path.to_owned(), source };
    let mut layout = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, size) = (region.start_addr(), region.len());
        let host = mem.get_host_address(start).map_err(|e| Error::Snapshot(e.to_string()))?;
        let resident = pages_with_data(host, size as usize).unwrap_or_else(|| vec![1; (size as usize).div_ceil(PAGE)]);
        // Copy runs of pages with data; the holes stay sparse (they read as zeros).
        let mut page = 0usize;
        while page < resident.len() {
            if resident[page] & 1 == 0 {
                page += 1;
                continue;
            }
            let run_start = page;
            while page < resident.len() && resident[page] & 1 == 1 {
                page += 1;
            }
            let (from, len) =
                ((run_start * PAGE) as u64, ((page - run_start) * PAGE).min(size as usize - run_start * PAGE));
            file.seek(SeekFrom::Start(offset + from)).map_err(io)?;
            mem.write_all_volatile_to(GuestAddress(start.0 + from), file, len)
                .map_err(|e| Error::Snapshot(format!("cannot write guest memory: {e}")))?;
        }
        layout.push(MemoryRegionState { guest_addr: start.0, size, file_offset: offset });
        offset += size;
    }
    file.set_len(offset).map_err(io)?;
    Ok(layout)
}

/// Writes the pages set in `dirty` (per region, one bit per page) into `file`, which already
/// holds the previous snapshot's memory (a copy of it). Returns the bytes written.
pub fn dump_dirty(mem: &GuestRam, dirty: &[Vec<u64>], file: &mut File, path: &Path) -> Result<u64> {
    let io = |source| Error::SnapshotIo { path: path.to_owned(), source };
    let mut offset = 0u64;
    let mut written = 0u64;
    for (region, bits) in mem.iter().zip(dirty) {
        let (start, size) = (region.start_addr(), region.len());
        let pages = (size as usize).div_ceil(PAGE);
        let is_dirty = |p: usize| bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
        let mut page = 0usize;
        while page < pages {
            if !is_dirty(page) {
                page += 1;
                continue;
            }
            let run_start = page;
            while page < pages && is_dirty(page) {
                page += 1;
            }
            let from = (run_start * PAGE) as u64;
            let len = ((page - run_start) * PAGE).min(size as usize - run_start * PAGE);
            file.seek(SeekFrom::Start(offset + from)).map_err(io)?;
            mem.write_all_volatile_to(GuestAddress(start.0 + from), file, len)
                .map_err(|e| Error::Snapshot(format!("cannot write guest memory: {e}")))?;
            written += len as u64;
        }
        offset += size;
    }
    Ok(written)
}

/// The memory file ends with this trailer after the last region: magic + the snapshot's id.
const TRAILER_MAGIC: &[u8; 8] = b"MCELLMID";
pub const TRAILER_LEN: u64 = 16;

/// A fresh random id for a snapshot's memory file.
pub fn new_memory_id() -> u64 {
    let mut id = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes; getrandom(2) writes at most that many.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 8 {
        // No getrandom: the clock is unique enough to tell two snapshots apart.
        return crate::vstate::lifecycle::monotonic_ns();
    }
    u64::from_le_bytes(id)
}

/// Writes the trailer at `end` (the end of the last region), making the file that long + 16.
pub fn write_id(file: &File, end: u64, id: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut t = [0u8; TRAILER_LEN as usize];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..].copy_from_slice(&id.to_le_bytes());
    file.write_all_at(&t, end)
        .and_then(|()| file.set_len(end + TRAILER_LEN))
        .map_err(|source| Error::SnapshotIo { path: path.to_owned(), source })
}

/// Checks that the memory file's trailer names `id`.
pub fn check_id(file: &File, end: u64, id: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut t = [0u8; TRAILER_LEN as usize];
    let corrupt = |reason: &str| Error::SnapshotCorrupt { path: path.to_owned(), reason: reason.into() };
    file.read_exact_at(&mut t, end).map_err(|_| corrupt("the memory file has no trailer (truncated?)"))?;
    if &t[..8] != TRAILER_MAGIC {
        return Err(corrupt("the memory file has no microcell trailer"));
    }
    if u64::from_le_bytes(t[8..].try_into().unwrap()) != id {
        return Err(corrupt(
            "the memory file belongs to another snapshot than the state file (an interrupted snapshot?)",
        ));
    }
    Ok(())
}

/// Takes (and clears) the bitmap of pages the VMM wrote, per region.
pub fn take_vmm_dirty(mem: &GuestRam) -> Vec<Vec<u64>> {
    // The region derefs to its MmapRegion, whose bitmap() is the whole AtomicBitmap.
    mem.iter().map(|region| std::ops::Deref::deref(region).bitmap().get_and_reset()).collect()
}

/// Maps the memory file privately over guest RAM that already exists (a shell's reserved,
/// never-touched anonymous memory), at the same host addresses: KVM's memory slots stay valid.
pub fn map_over(mem: &GuestRam, file: &File, path: &Path, layout: &[MemoryRegionState]) -> Result<()> {
    let file_len = file.metadata().map_err(|source| Error::SnapshotIo { path: path.to_owned(), source })?.len();
    let regions: Vec<_> = mem.iter().collect();
    if regions.len() != layout.len() {
        return Err(Error::Snapshot("the VM's memory layout differs from the snapshot's".into()));
    }
    for (region, r) in regions.iter().zip(layout) {
        if region.start_addr().0 != r.guest_addr || region.len() != r.size {
            return Err(Error::Snapshot("the VM's memory layout differs from the snapshot's".into()));
        }
        // A mapping past the end of the file would SIGBUS on first touch: refuse it up front.
        if r.file_offset.checked_add(r.size).is_none_or(|end| end > file_len) {
            return Err(Error::SnapshotCorrupt {
                path: path.to_owned(),
                reason: format!("memory file is {file_len} bytes, the snapshot needs {}", r.file_offset + r.size),
            });
        }
        let host = mem.get_host_address(region.start_addr()).map_err(|e| Error::Snapshot(e.to_string()))?;
        // SAFETY: `host..host+size` is exactly one region of `mem`, which owns the mapping and
        // keeps it alive; nothing has run in the guest or holds references into it yet, so
        // replacing its pages (MAP_FIXED) cannot invalidate live borrows.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                r.file_offset as libc::off_t,
            )
        };
        if mapped != host.cast() {
            return Err(Error::SnapshotIo { path: path.to_owned(), source: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}
