//! `Watch`: inotify on a directory (and its subdirectories with `recursive`, including ones made
//! later), each change sent as a `WatchEvent` frame on the watch's id until the host's `Unwatch`.
//! The inotify fd is polled only while the out queue has room, so a host that reads slowly
//! leaves the changes in the kernel's queue; what overflows it becomes one `OVERFLOW` event.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use protocol::{watch_kind, ErrorMsg, Message, Watch, WatchEvent};

use crate::fs::{checked, err};
use crate::outq::OutQueue;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR;

/// Most directories one recursive watch follows (each is an inotify watch in the guest kernel).
const MAX_DIRS: usize = 8192;

pub struct Watcher {
    fd: OwnedFd,
    /// Watch descriptor → the directory it watches.
    dirs: HashMap<i32, PathBuf>,
    root: String,
    recursive: bool,
}

impl Watcher {
    /// Starts watching and queues the `READY` event: changes from then on are reported.
    pub fn start(id: u32, req: &Watch, out: &mut OutQueue) -> Result<Watcher, ErrorMsg> {
        let root = checked(&req.path)?;
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(err("watch", &req.path)(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = Watcher { fd, dirs: HashMap::new(), root: req.path.clone(), recursive: req.recursive };
        w.add(root).map_err(err("watch", &req.path))?;
        if w.recursive {
            w.add_tree(root, id, out, false);
        }
        out.msg(id, Message::WatchEvent(WatchEvent { kind: watch_kind::READY, path: req.path.clone() }));
        Ok(w)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn add(&mut self, dir: &Path) -> io::Result<()> {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated path that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_owned());
        Ok(())
    }

    /// Watches the directories below `dir`; with `report`, queues a `CREATE` for each entry found,
    /// and a `WRITE` for each file that already has contents (a directory made under a watched one
    /// may have filled before its own watch began; such a write may then be reported twice).
    fn add_tree(&mut self, dir: &Path, id: u32, out: &mut OutQueue, report: bool) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let meta = e.metadata().ok();
            if report {
                out.msg(id, event(watch_kind::CREATE, &path));
                if meta.as_ref().is_some_and(|m| m.is_file() && m.len() > 0) {
                    out.msg(id, event(watch_kind::WRITE, &path));
                }
            }
            let is_dir = meta.is_some_and(|m| m.is_dir());
            if is_dir && self.dirs.len() < MAX_DIRS && self.add(&path).is_ok() {
                self.add_tree(&path, id, out, report);
            }
        }
    }

    /// Reads what inotify has and queues the events.
    pub fn ready(&mut self, id: u32, out: &mut OutQueue) {
        let mut buf = [0u8; 16 << 10];
        loop {
            // SAFETY: reads into our own buffer, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return; // EAGAIN: all read
            }
            let mut at = 0usize;
            let n = n as usize;
            // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
            while at + 16 <= n {
                let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().expect("4 bytes"));
                let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
                let name_bytes = &buf[(at + 16).min(n)..(at + 16 + len).min(n)];
                let name = &name_bytes[..name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len())];
                at += 16 + len;
                self.one(id, wd, mask, name, out);
            }
        }
    }

    fn one(&mut self, id: u32, wd: i32, mask: u32, name: &[u8], out: &mut OutQueue) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            out.msg(id, Message::WatchEvent(WatchEvent { kind: watch_kind::OVERFLOW, path: self.root.clone() }));
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            return;
        }
        let Some(dir) = self.dirs.get(&wd) else { return };
        let path = if name.is_empty() {
            dir.clone()
        } else {
            dir.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name))
        };
        let kind = if mask & libc::IN_CREATE != 0 {
            watch_kind::CREATE
        } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
            watch_kind::WRITE
        } else if mask & libc::IN_DELETE != 0 {
            watch_kind::REMOVE
        } else if mask & (libc::IN_MOVED_FROM | libc::IN_MOVED_TO) != 0 {
            watch_kind::RENAME
        } else if mask & libc::IN_ATTRIB != 0 {
            watch_kind::CHMOD
        } else {
            return;
        };
        out.msg(id, event(kind, &path));
        let new_dir = mask & libc::IN_ISDIR != 0 && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
        if self.recursive && new_dir && self.dirs.len() < MAX_DIRS && self.add(&path).is_ok() {
            self.add_tree(&path, id, out, true);
        }
    }
}

fn event(kind: u8, path: &Path) -> Message {
    Message::WatchEvent(WatchEvent { kind, path: path.to_string_lossy().into_owned() })
}
