//! File operations in the guest: one-shot requests (stat, list, mkdir, remove, rename) answered
//! at once, and streams (read/write a file, read/write a tree) moved a chunk at a time within
//! the credit each side granted.
//!
//! Paths must be absolute. Every OS failure is an `Error{IO}` with its errno and the path.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use protocol::tree_fs::{TreeFsError, TreeReader, TreeWriter, WriterOptions};
use protocol::{
    kind, DirEntries, DirEntry, ErrorMsg, FileType, Message, Mkdir, ReadFile, Remove, Rename, Stat, StatResult,
    WriteFile, FLAG_FINAL, MAX_PAYLOAD,
};

use crate::exec::{invalid, os_error};
use crate::outq::{OutQueue, CHUNK};
use crate::sys;

/// The window the agent grants for host → guest file data.
pub const WRITE_WINDOW: u32 = 4 << 20;
/// File credit goes back in batches of at least this much.
const CREDIT_BATCH: u64 = 1 << 20;

pub(crate) fn checked(path: &str) -> Result<&Path, ErrorMsg> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(invalid(format!("path {path:?} is not absolute: give a guest path starting with '/'")));
    }
    if path.as_bytes().contains(&0) {
        return Err(invalid("path contains a NUL byte"));
    }
    Ok(Path::new(path))
}

pub(crate) fn err<'a>(op: &str, path: &'a str) -> impl FnOnce(io::Error) -> ErrorMsg + 'a {
    let op = op.to_owned();
    move |e| os_error(&e, format!("{op} {path}: {e}"), Some(path))
}

fn tree_err(e: TreeFsError) -> ErrorMsg {
    let path = e.path().map(|p| p.display().to_string());
    ErrorMsg { code: protocol::ErrorCode::IO, errno: e.errno(), message: e.to_string(), path }
}

fn file_type(ft: fs::FileType) -> FileType {
    if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    }
}

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

pub fn stat(req: &Stat) -> Result<StatResult, ErrorMsg> {
    let p = checked(&req.path)?;
    let m = if req.follow { fs::metadata(p) } else { fs::symlink_metadata(p) }.map_err(err("stat", &req.path))?;
    let link_target = if m.file_type().is_symlink() {
        Some(fs::read_link(p).map_err(err("readlink", &req.path))?.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(StatResult {
        file_type: file_type(m.file_type()),
        size: m.len(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: mtime_ns(&m),
        link_target,
    })
}

/// Lists a directory (sorted by name) as one or more `DirEntries` frames, the last `FLAG_FINAL`.
pub fn read_dir(id: u32, path: &str, out: &mut OutQueue) -> Result<(), ErrorMsg> {
    let p = checked(path)?;
    let mut entries = Vec::new();
    for e in fs::read_dir(p).map_err(err("read directory", path))? {
        let e = e.map_err(err("read directory", path))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(m) = fs::symlink_metadata(e.path()) else { continue }; // vanished meanwhile
        entries.push(DirEntry {
            name,
            file_type: file_type(m.file_type()),
            size: m.len(),
            mode: m.mode(),
            mtime_ns: mtime_ns(&m),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    // Frames of at most ~half the payload cap: a huge directory is several frames.
    let mut batch = Vec::new();
    let mut size = 0;
    for e in entries {
        let n = e.name.len() + 40;
        if size + n > MAX_PAYLOAD / 2 && !batch.is_empty() {
            out.msg(id, Message::DirEntries(DirEntries { entries: std::mem::take(&mut batch) }));
            size = 0;
        }
        size += n;
        batch.push(e);
    }
    out.final_msg(id, Message::DirEntries(DirEntries { entries: batch }));
    Ok(())
}

pub fn mkdir(req: &Mkdir) -> Result<(), ErrorMsg> {
    let p = checked(&req.path)?;
    if req.mode > 0o7777 {
        return Err(invalid(format!("mode {:o} has bits beyond 0o7777", req.mode)));
    }
    if req.parents && p.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(req.parents).mode(req.mode).create(p).map_err(err("mkdir", &req.path))?;
    // Exactly the mode asked for, whatever the umask.
    fs::set_permissions(p, fs::Permissions::from_mode(req.mode)).map_err(err("chmod", &req.path))
}

pub fn remove(req: &Remove) -> Result<(), ErrorMsg> {
    let p = checked(&req.path)?;
    if p == Path::new("/") {
        return Err(invalid("refusing to remove /"));
    }
    let m = fs::symlink_metadata(p).map_err(err("remove", &req.path))?;
    let r = match (m.file_type().is_dir(), req.recursive) {
        (true, true) => fs::remove_dir_all(p),
        (true, false) => fs::remove_dir(p),
        (false, _) => fs::remove_file(p),
    };
    r.map_err(err("remove", &req.path))
}

pub fn rename(req: &Rename) -> Result<(), ErrorMsg> {
    let from = checked(&req.from)?;
    let to = checked(&req.to)?;
    fs::rename(from, to).map_err(|e| os_error(&e, format!("rename {} to {}: {e}", req.from, req.to), Some(&req.from)))
}

/// A guest → host stream: a file's bytes or a tree stream.
pub struct ReadStream {
    pub credit: u64,
    source: Source,
}

enum Source {
    File { file: File, left: Option<u64> },
    Tree(Box<TreeReader>),
}

impl ReadStream {
    pub fn file(req: &ReadFile) -> Result<ReadStream, ErrorMsg> {
        let p = checked(&req.path)?;
        // Non-blocking: a FIFO or terminal without data is an error (EAGAIN), never a stuck agent.
        let mut file =
            fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(p).map_err(err("open", &req.path))?;
        let m = file.metadata().map_err(err("stat", &req.path))?;
        if m.is_dir() {
            return Err(err("read", &req.path)(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        if req.offset > 0 {
            io::Seek::seek(&mut file, io::SeekFrom::Start(req.offset)).map_err(err("seek", &req.path))?;
        }
        // A regular file is read up to its size at open (no extra empty chunk at the end); files
        // that report no size (/proc, devices, FIFOs) until end of file.
        let size_left = (m.is_file() && m.len() > 0).then(|| m.len().saturating_sub(req.offset));
        let left = match (req.len, size_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(ReadStream { credit: u64::from(req.window), source: Source::File { file, left } })
    }

    pub fn tree(path: &str, window: u32) -> Result<ReadStream, ErrorMsg> {
        let p = checked(path)?;
        let r = TreeReader::open(p).map_err(tree_err)?;
        Ok(ReadStream { credit: u64::from(window), source: Source::Tree(Box::new(r)) })
    }

    /// Queues the next chunk (within the credit); `Ok(true)` when the final chunk was queued.
    pub fn pump(&mut self, id: u32, out: &mut OutQueue) -> Result<bool, ErrorMsg> {
        let max = (self.credit as usize).min(CHUNK);
        if max == 0 {
            return Ok(false);
        }
        let mut done = false;
        let n = match &mut self.source {
            Source::File { file, left } => {
                let fd = file.as_raw_fd();
                let want = left.map_or(max, |l| (l as usize).min(max));
                out.push_raw(id, kind::FILE_DATA, |buf| {
                    let n = if want == 0 {
                        0
                    } else {
                        sys::read_append(fd, buf, want).map_err(|e| os_error(&e, format!("read: {e}"), None))?
                    };
                    if let Some(l) = left {
                        *l -= n as u64;
                    }
                    done = n == 0 || *left == Some(0);
                    Ok(if done { FLAG_FINAL } else { 0 })
                })?
            }
            Source::Tree(t) => out.push_raw(id, kind::FILE_DATA, |buf| {
                done = t.fill(buf, max).map_err(tree_err)?;
                Ok(if done { FLAG_FINAL } else { 0 })
            })?,
        };
        self.credit -= n as u64;
        Ok(done)
    }
}

/// A host → guest stream: a file or a tree being written.
pub struct WriteSink {
    target: Target,
    /// Credit earned (bytes written) and not yet sent back.
    owed: u64,
}

enum Target {
    File { file: File, path: String },
    Tree { w: Box<TreeWriter> },
}

impl WriteSink {
    pub fn file(req: &WriteFile) -> Result<WriteSink, ErrorMsg> {
        let p = checked(&req.path)?;
        if let Some(m) = req.mode.filter(|&m| m > 0o7777) {
            return Err(invalid(format!("mode {m:o} has bits beyond 0o7777")));
        }
        if req.parents {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(err("mkdir", &req.path))?;
            }
        }
        let mut o = fs::OpenOptions::new();
        // Non-blocking: a FIFO without a reader is ENXIO, never a stuck agent.
        o.write(true).create(true).mode(req.mode.unwrap_or(0o644)).custom_flags(libc::O_NONBLOCK);
        if req.append {
            o.append(true);
        } else {
            o.truncate(true);
        }
        let file = o.open(p).map_err(err("open", &req.path))?;
        if let Some(mode) = req.mode {
            file.set_permissions(fs::Permissions::from_mode(mode)).map_err(err("chmod", &req.path))?;
        }
        Ok(WriteSink { target: Target::File { file, path: req.path.clone() }, owed: 0 })
    }

    pub fn tree(path: &str, parents: bool) -> Result<WriteSink, ErrorMsg> {
        let p = checked(path)?;
        // The host's tree is trusted in its own guest: setuid bits kept, no size limit.
        let opts = WriterOptions { parents, keep_setuid: true, max_bytes: None };
        let w = TreeWriter::with_options(p, opts).map_err(tree_err)?;
        Ok(WriteSink { target: Target::Tree { w: Box::new(w) }, owed: 0 })
    }

    /// Writes one chunk; returns credit to send back now, if a batch is due.
    pub fn write(&mut self, data: &[u8]) -> Result<Option<u32>, ErrorMsg> {
        match &mut self.target {
            Target::File { file, path } => file.write_all(data).map_err(err("write", path))?,
            Target::Tree { w } => w.feed(data).map_err(tree_err)?,
        }
        self.owed += data.len() as u64;
        if self.owed >= CREDIT_BATCH {
            let n = self.owed;
            self.owed = 0;
            return Ok(Some(n as u32));
        }
        Ok(None)
    }

    pub fn finish(self) -> Result<(), ErrorMsg> {
        match self.target {
            Target::File { .. } => Ok(()),
            Target::Tree { mut w } => w.finish().map_err(tree_err),
        }
    }
}
