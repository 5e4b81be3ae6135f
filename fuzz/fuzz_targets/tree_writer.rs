//! The host's tree writer (`copyToHost`) fed a stream a guest made: whatever it contains, the
//! writer creates nothing outside its destination (a canary directory beside it stays empty).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::tree_fs::TreeWriter;

#[path = "scratch.rs"]
mod scratch;

fn base() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch::scratch_dir("tree");
        std::fs::create_dir_all(d.join("outside")).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let dest = base.join("dest");
    let _ = std::fs::remove_dir_all(&dest);
    let _ = std::fs::remove_file(&dest);
    if let Ok(mut w) = TreeWriter::new(&dest, true) {
        // Split as the channel would, at a point the input picks.
        let split = data.first().map_or(1, |&b| usize::from(b).max(1));
        let mut ok = true;
        for piece in data.chunks(split) {
            if w.feed(piece).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            let _ = w.finish();
        }
    }
    let outside: Vec<_> = std::fs::read_dir(base.join("outside")).unwrap().collect();
    assert!(outside.is_empty(), "the stream wrote outside its destination: {outside:?}");
    let stray: Vec<_> = std::fs::read_dir(base)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "dest" && n != "outside")
        .collect();
    assert!(stray.is_empty(), "the stream wrote beside its destination: {stray:?}");
});
