//! Spawning engine processes so that they never outlive this process.
//!
//! A child gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the *thread* that forked
//! the child ends, not the process: a child spawned from a short-lived thread (a napi worker, a
//! test thread) would be killed with it. So every child is forked by one process-wide spawner
//! thread that lives as long as the process.

use std::io;
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
    std::thread::Builder::new()
        .name("microcell-spawner".into())
        .spawn(move || {
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
    spawner()?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread has ended"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread has ended"))?
}
