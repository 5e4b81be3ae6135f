//! Per-VM directories under the temporary directory, and the sweep of those whose process
//! ended without removing them (SIGKILL, abort). One mechanism for its callers' run
//! directories and the VMM's own (a clone's disk copies): the first directory a process makes
//! removes those of ended processes of its user, never a live one's.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A per-VM directory under the temporary directory, `microcell-<pid>-s<start>-<n>-<tag>`,
/// removed (with everything in it) on drop.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create(tag: &str) -> io::Result<RunDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        // The directories of processes that died without their Drop (SIGKILL, abort) go on
        // this process's first VM.
        SWEPT.call_once(|| {
            remove_stale_run_dirs(&base);
        });
        loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{}{n}-{tag}", run_dir_prefix()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a run directory");
        }
    }
}

/// The name prefix of this process's per-VM directories under `std::env::temp_dir()`
/// (`microcell-<pid>-s<start time>-`): tests look for leftovers with it. The start time (in
/// clock ticks since boot, /proc/<pid>/stat) tells this process from a later one with its PID.
pub fn run_dir_prefix() -> String {
    let pid = std::process::id();
    format!("microcell-{pid}-s{}-", process_start_time(pid).unwrap_or(0))
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot; None
/// when there is no such process.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a directory named `microcell-<pid>-...` belongs to a process that has ended: no such
/// PID, or one that started at another time than the name says (the PID was reused). A name
/// without a start time (an older build's) is stale only once its PID is gone.
fn run_dir_is_stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("microcell-") else { return false };
    let mut parts = rest.split('-');
    let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    if pid == std::process::id() {
        return false;
    }
    let recorded = parts.next().and_then(|p| p.strip_prefix('s')).and_then(|t| t.parse::<u64>().ok());
    match (process_start_time(pid), recorded) {
        (None, _) => true,
        (Some(now), Some(then)) => now != then,
        (Some(_), None) => false,
    }
}

/// Removes the per-VM directories in `base` left by processes of this user that have ended;
/// never one of a live process. Returns how many it removed (and logs it).
pub fn remove_stale_run_dirs(base: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let Ok(entries) = std::fs::read_dir(base) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Not through a symlink, and only our own: another user's are theirs to clean.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
        if !meta.is_dir() || meta.uid() != uid || !run_dir_is_stale(name) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::debug!(path = %entry.path().display(), error = %e, "cannot remove a stale per-VM directory")
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %base.display(), "removed per-VM directories left by processes that ended without cleaning up");
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn run_dirs_are_removed_on_drop() {
        let d = RunDir::create("unit").unwrap();
        assert!(d
            .path()
            .to_str()
            .unwrap()
            .contains(&format!("-s{}-", process_start_time(std::process::id()).unwrap())));
        let p = d.path().to_path_buf();
        assert!(p.file_name().unwrap().to_str().unwrap().starts_with(&run_dir_prefix()));
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(d);
        assert!(!p.exists());
    }

    /// A child that made a per-VM directory and was SIGKILLed (no Drop ran) leaves it behind;
    /// the next sweep removes it. A live process's is kept, and so is nothing that merely has
    /// a live PID with another start time (that one is removed: the PID was reused).
    #[test]
    fn stale_run_dirs_of_killed_processes_are_removed_and_live_ones_kept() {
        if std::env::var_os("MC_RUNDIR_CHILD").is_some() {
            let d = RunDir::create("child").unwrap();
            std::fs::write(d.path().join("rootfs.img"), b"x").unwrap();
            // Written beside, then renamed: the parent never reads half a path.
            let (tmp, done) = (std::env::temp_dir().join("child-dir.tmp"), std::env::temp_dir().join("child-dir"));
            std::fs::write(&tmp, d.path().as_os_str().as_encoded_bytes()).unwrap();
            std::fs::rename(tmp, done).unwrap();
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        let base = std::env::temp_dir().join(format!("mc-rundir-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "run_dir::tests::stale_run_dirs_of_killed_processes_are_removed_and_live_ones_kept",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MC_RUNDIR_CHILD", "1")
            .env("TMPDIR", &base)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let dir = loop {
            if let Ok(p) = std::fs::read_to_string(base.join("child-dir")) {
                break PathBuf::from(p);
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the child made no directory");
            std::thread::sleep(Duration::from_millis(5));
        };
        // While it lives, its directory is kept; so is one of this (live) process.
        assert_eq!(remove_stale_run_dirs(&base), 0);
        assert!(dir.exists());
        let mine = base.join(format!("{}0-mine", run_dir_prefix()));
        std::fs::create_dir(&mine).unwrap();
        // A live PID (the child's) with another start time: that PID was reused.
        let child_pid = child.id();
        let reused = base.join(format!("microcell-{child_pid}-s1-0-reused"));
        std::fs::create_dir(&reused).unwrap();
        // An older build's name (no start time) of a live process: kept.
        let old_live = base.join(format!("microcell-{child_pid}-7-qemu"));
        std::fs::create_dir(&old_live).unwrap();
        let not_ours = base.join("microcell-notapid-x");
        std::fs::create_dir(&not_ours).unwrap();
        assert_eq!(remove_stale_run_dirs(&base), 1);
        assert!(!reused.exists() && dir.exists() && mine.exists() && old_live.exists() && not_ours.exists());

        child.kill().unwrap(); // SIGKILL: no Drop runs in the child
        child.wait().unwrap();
        assert!(dir.join("rootfs.img").exists(), "SIGKILL left the directory behind");
        assert_eq!(remove_stale_run_dirs(&base), 2, "the killed child's, and the old-style one of its PID");
        assert!(!dir.exists() && !old_live.exists());
        assert!(mine.exists() && not_ours.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
