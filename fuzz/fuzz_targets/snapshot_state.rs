//! A snapshot's state file (`vm.state`) as `Snapshot.load()` reads it: any bytes give a
//! `MachineState` that passed validation or a coded error — never a panic or an allocation
//! the file asked for. A state that loads is then loaded as a whole snapshot directory, with a
//! (sparse) memory file of the size it names, as `LoadedSnapshot::load` would be.
//!
//! Input: a first byte, then bytes. An even first byte makes the bytes a body that gets a valid
//! header and checksum (so the search reaches the decoder and `validate`, as a crafted file
//! with its CRC recomputed would); an odd one writes them as the whole file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "scratch.rs"]
mod scratch;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch::scratch_dir("snapshot"))
}

/// `body` framed as `encode_state` frames a body: magic, version, length, body, CRC32.
fn with_header(body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 24);
    b.extend_from_slice(vmm::snapshot::MAGIC);
    b.extend_from_slice(&vmm::snapshot::FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(body);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let state = d.join("vm.state");
    let Some((&mode, bytes)) = data.split_first() else { return };
    let file = if mode % 2 == 0 { with_header(bytes) } else { bytes.to_vec() };
    std::fs::write(&state, file).unwrap();
    let Ok(machine) = vmm::snapshot::load_state(&state) else { return };
    let mib = u64::from(machine.config.memory_mib);
    if mib > 256 {
        return;
    }
    let mem = std::fs::File::create(d.join("vm.mem")).unwrap();
    mem.set_len(mib << 20).unwrap();
    drop(mem);
    let _ = vmm::LoadedSnapshot::load(d);
});
