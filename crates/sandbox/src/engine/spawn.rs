//! Spawning engine processes so that they never outlive this process.
//!
//! A child gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the *thread* that forked
//! the child ends, not the process: a child spawned from a short-lived thread (a napi worker, a
//! test thread) would be killed with it. So every child is forked by one process-wide spawner
//! thread that lives as long as the process.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<io::Result<Child>>);

fn spawner() -> io::Result<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(tx.lock().unwrap_or_else(|e| e.into_inner()).clone());
    }
    let (tx, rx) = mpsc::channel::<Request>();
    let tx = Mutex::new(tx);
    // A race may start two threads; the loser's receiver then ends and its thread with it.
    std::thread::Builder::new().name("microcell-spawner".into()).spawn(move || {
        for (mut cmd, reply) in rx {
            let _ = reply.send(cmd.spawn());
        }
    })?;
    let tx = SPAWNER.get_or_init(|| tx);
    Ok(tx.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Spawns `cmd` from the spawner thread. Whatever `pre_exec` it carries runs in the child.
pub(crate) fn spawn(cmd: Command) -> io::Result<Child> {
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()?.send((cmd, reply_tx)).map_err(|_| io::Error::other("the spawner thread has ended"))?;
    reply_rx.recv().map_err(|_| io::Error::other("the spawner thread has ended"))?
}

/// In a child between fork and exec: asks for SIGKILL when this process ends, and fails if it
/// already has (then nobody would ever kill the child). Async-signal-safe.
pub(crate) fn die_with_parent(parent: u32) -> io::Result<()> {
    // SAFETY: prctl and getppid take no pointers and are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() as u32 != parent {
            return Err(io::Error::other("the parent process ended"));
        }
    }
    Ok(())
}

/// Finds a helper program: the path in `env_var` if set, else `name` on `PATH`. The error says
/// which was tried.
pub(crate) fn find_program(env_var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!("{env_var}={} is not an executable file", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("{name} was not found on PATH"))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
