//! A per-process scratch directory for targets that need files: in /dev/shm where there is one
//! (no disk I/O per input), else the temp dir.

use std::path::PathBuf;

pub fn scratch_dir(tag: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let d = base.join(format!("microcell-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
