//! One cgroup v2 per exec (PID 1 only): what a timeout or a kill ends, and what bounds it.
//!
//! A process group is not enough: a child that calls `setsid` leaves it, and a fork bomb
//! outruns a `kill(-pgid)`. So each exec's process enters `/sys/fs/cgroup/microcell-exec/<n>`
//! before it runs anything of its own (in the child, between fork and exec), a timeout or a
//! SIGKILL writes that cgroup's `cgroup.kill` (the kernel kills every member, atomically with
//! respect to fork), and the cgroup is removed once it is empty. Each one has a `pids.max`
//! (about one process per 0.5 MiB of guest memory), and all of them sit under one parent in
//! the cpu controller: together they weigh as one task against the agent, which stays in the
//! root cgroup, so the agent keeps reaping and answering whatever an exec does.
//!
//! Where cgroup2 cannot be had (test mode on a host, a kernel without it), [`Cgroups::none`]:
//! execs are killed by process group, as before, and the agent says so once in its log.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys;

const MOUNT_POINT: &str = "/sys/fs/cgroup";
const PARENT: &str = "microcell-exec";
/// Bounds of the per-exec `pids.max`.
const PIDS_MIN: u64 = 64;
const PIDS_MAX: u64 = 4096;
/// Guest memory per process the default `pids.max` allows for (kernel stack, page tables,
/// task struct and a shell's private pages come to ~100-200 KiB).
const KIB_PER_PID: u64 = 512;

/// The parent of the exec cgroups, or none.
pub struct Cgroups {
    parent: Option<PathBuf>,
    pids_max: u64,
    next: u64,
}

impl Cgroups {
    /// No cgroups: execs are killed by process group.
    pub fn none(why: &str) -> Cgroups {
        log!("cgroups: {why}; a timeout or kill ends an exec's process group only (a child that calls setsid escapes it)");
        Cgroups { parent: None, pids_max: 0, next: 0 }
    }

    /// As PID 1: mounts cgroup2 and makes the parent with the pids and cpu controllers.
    pub fn setup() -> Cgroups {
        match Self::try_setup() {
            Ok(c) => c,
            Err(e) => Self::none(&format!("cgroup2 is not available ({e})")),
        }
    }

    fn try_setup() -> io::Result<Cgroups> {
        let _ = std::fs::create_dir_all(MOUNT_POINT);
        match sys::mount("cgroup2", MOUNT_POINT, "cgroup2", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "") {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("mount cgroup2 on {MOUNT_POINT}: {e}"))),
        }
        let root = Path::new(MOUNT_POINT);
        if !root.join("cgroup.kill").exists() && !root.join("cgroup.procs").exists() {
            return Err(io::Error::other(format!("{MOUNT_POINT} is no cgroup2 file system")));
        }
        let parent = root.join(PARENT);
        match std::fs::create_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        for dir in [root, parent.as_path()] {
            // pids is what bounds a fork bomb: without it, refuse cgroups altogether (the
            // fallback says so); the cpu controller is best effort.
            write(&dir.join("cgroup.subtree_control"), "+pids")?;
            if let Err(e) = write(&dir.join("cgroup.subtree_control"), "+cpu") {
                log!(
                    "cgroups: no cpu controller in {} ({e}): execs compete with the agent task by task",
                    dir.display()
                );
            }
        }
        let pids_max = (mem_total_kib().unwrap_or(512 << 10) / KIB_PER_PID).clamp(PIDS_MIN, PIDS_MAX);
        log!("cgroups: each exec in a cgroup of its own under {}, pids.max {pids_max}", parent.display());
        Ok(Cgroups { parent: Some(parent), pids_max, next: 0 })
    }

    /// A fresh cgroup for one process; `Ok(None)` without cgroups.
    pub fn create(&mut self) -> io::Result<Option<Cgroup>> {
        let Some(parent) = &self.parent else { return Ok(None) };
        self.next += 1;
        let path = parent.join(self.next.to_string());
        std::fs::create_dir(&path)?;
        let cg = Cgroup { procs: None, path };
        write(&cg.path.join("pids.max"), &self.pids_max.to_string()).map_err(|e| cg.failed(e))?;
        let procs = CString::new(cg.path.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL in a cgroup path");
        // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
        let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(cg.failed(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let procs = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Some(Cgroup { procs: Some(procs), ..cg }))
    }
}

/// One exec's cgroup. The session removes it once the exec has ended and it is empty (a
/// daemon the exec left behind keeps it until it ends).
pub struct Cgroup {
    path: PathBuf,
    /// `cgroup.procs`, open for the child to write itself into (closed after the spawn).
    procs: Option<OwnedFd>,
}

impl Cgroup {
    /// The descriptor the child writes `0` (itself) to, between fork and exec.
    pub fn procs_fd(&self) -> Option<i32> {
        self.procs.as_ref().map(|f| f.as_raw_fd())
    }

    /// After the spawn: the parent needs the descriptor no more.
    pub fn spawned(&mut self) {
        self.procs = None;
    }

    /// SIGKILL to every process in it (`cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        write(&self.path.join("cgroup.kill"), "1")
    }

    /// Removes the cgroup; `false` while processes are still in it.
    pub fn remove(&self) -> bool {
        match std::fs::remove_dir(&self.path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(_) => false,
        }
    }

    /// A cgroup that could not be set up is removed again; the error passes through.
    fn failed(&self, e: io::Error) -> io::Error {
        let _ = std::fs::remove_dir(&self.path);
        io::Error::new(e.kind(), format!("exec cgroup {}: {e}", self.path.display()))
    }
}

/// In the child between fork and exec: joins the cgroup whose `cgroup.procs` is `fd`.
/// Async-signal-safe: one write(2).
pub fn join_in_child(fd: i32) -> io::Result<()> {
    // SAFETY: writes two bytes from a static buffer to a descriptor the parent opened.
    if unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn mem_total_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}
