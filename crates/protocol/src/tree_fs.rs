//! Tree streams ([`crate::tree`]) from and to a real file system: the agent reads and writes
//! guest trees with it, the host its own (copy to/from the host).
//!
//! Kept: regular files (contents, permission bits, mtime; holes: all-zero 4 KiB blocks are not
//! written), directories (permission bits, mtime), symlinks (target, verbatim). Setuid and
//! setgid bits only with [`WriterOptions::keep_setuid`]. Not kept: owners (what is written
//! belongs to the writer), hard links (each name becomes its own file), special files (FIFOs,
//! sockets, devices: skipped by the reader; the stream has no record for them, so a writer
//! never makes one). A file that shrinks while it is read is padded with zeros to the size
//! announced in its header (as tar does); one that grows is cut there.
//!
//! The writer treats the stream as untrusted (a guest makes it for `copyToHost`):
//! - paths are checked by the decoder (relative, no `.`, `..`, empty component or NUL);
//! - the first record is the root (empty path); after a root file or symlink only END may
//!   follow, and no second root record is taken;
//! - every entry is made with `*at` calls from the root directory's fd, each directory on the
//!   way opened with `O_NOFOLLOW | O_DIRECTORY`: nothing is written through a symlink, file or
//!   anything else that is not a real directory inside the destination, whoever made it;
//! - files are created `O_CREAT | O_EXCL` after unlinking a file or symlink of that name (a
//!   hard link is replaced, never written through); a directory is never replaced;
//! - [`WriterOptions::max_bytes`] bounds the data written; a file the stream did not finish
//!   (an error, a limit, a stream cut short) is removed.
//!
//! The root itself may be a symlink to a directory that the caller put there before the copy.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::tree::{self, TreeDecoder, TreeEvent};

/// What went wrong, and at which path.
#[derive(Debug)]
pub enum TreeFsError {
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// The stream is not valid, or asks for something the writer refuses.
    Invalid(String),
    /// Writing on would pass [`WriterOptions::max_bytes`] (at `path`, which was removed).
    Limit {
        max: u64,
        path: PathBuf,
    },
}

impl TreeFsError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TreeFsError + 'a {
        move |source| TreeFsError::Io { path: path.to_owned(), op, source }
    }

    /// The errno behind it (`EINVAL` for an invalid stream).
    pub fn errno(&self) -> i32 {
        match self {
            TreeFsError::Io { source, .. } => source.raw_os_error().unwrap_or(5),
            TreeFsError::Invalid(_) => libc::EINVAL,
            TreeFsError::Limit { .. } => libc::EFBIG,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            TreeFsError::Io { path, .. } | TreeFsError::Limit { path, .. } => Some(path),
            TreeFsError::Invalid(_) => None,
        }
    }
}

impl std::fmt::Display for TreeFsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeFsError::Io { path, op, source } => write!(f, "{op} {}: {source}", path.display()),
            TreeFsError::Invalid(m) => f.write_str(m),
            TreeFsError::Limit { max, path } => {
                write!(
                    f,
                    "the copy would write more than {max} bytes (maxBytes), at {}: raise maxBytes or copy less",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for TreeFsError {}

pub type Result<T> = std::result::Result<T, TreeFsError>;

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

#[cfg(test)]
fn system_time(ns: i64) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

struct DirIter {
    rel: Vec<u8>,
    names: std::vec::IntoIter<Vec<u8>>,
}

/// Produces the tree stream of the file, directory or symlink at a path, a piece at a time.
pub struct TreeReader {
    root: PathBuf,
    started: bool,
    stack: Vec<DirIter>,
    file: Option<(File, u64, PathBuf)>,
    pending: Vec<u8>,
    pending_pos: usize,
    done: bool,
    /// Entries and content bytes so far.
    pub entries: u64,
    pub bytes: u64,
}

impl TreeReader {
    /// Checks that `root` exists (without following a final symlink).
    pub fn open(root: &Path) -> Result<TreeReader> {
        fs::symlink_metadata(root).map_err(TreeFsError::io("stat", root))?;
        Ok(TreeReader {
            root: root.to_owned(),
            started: false,
            stack: Vec::new(),
            file: None,
            pending: Vec::new(),
            pending_pos: 0,
            done: false,
            entries: 0,
            bytes: 0,
        })
    }

    /// Appends up to `max` bytes of the stream to `buf`; `Ok(true)` once the whole stream
    /// (through its END record) has been appended.
    pub fn fill(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<bool> {
        let start = buf.len();
        loop {
            let room = max - (buf.len() - start);
            if self.pending_pos < self.pending.len() {
                if room == 0 {
                    return Ok(false);
                }
                let n = room.min(self.pending.len() - self.pending_pos);
                buf.extend_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                continue;
            }
            if let Some((f, left, path)) = &mut self.file {
                if *left == 0 {
                    self.file = None;
                    continue;
                }
                if room == 0 {
                    return Ok(false);
                }
                let want = (*left).min(room as u64);
                // Read straight into the output (zeroed first: no libc here to read into spare
                // capacity), in as few read(2) calls as the file gives.
                let start = buf.len();
                buf.resize(start + want as usize, 0);
                let mut got = 0;
                while got < want as usize {
                    match f.read(&mut buf[start + got..]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            buf.truncate(start);
                            return Err(TreeFsError::io("read", path)(e));
                        }
                    }
                }
                buf.truncate(start + got);
                let n = got as u64;
                let n = if n == 0 {
                    // The file shrank: keep the stream valid.
                    buf.resize(buf.len() + want as usize, 0);
                    want
                } else {
                    n
                };
                *left -= n;
                self.bytes += n;
                continue;
            }
            if self.done {
                return Ok(true);
            }
            self.pending.clear();
            self.pending_pos = 0;
            self.advance()?;
        }
    }

    /// Puts the next record header into `pending` (or END).
    fn advance(&mut self) -> Result<()> {
        if !self.started {
            self.started = true;
            let root = self.root.clone();
            if !self.entry(&root, Vec::new())? {
                return Err(TreeFsError::Invalid(format!("{} is not a file, directory or symlink", root.display())));
            }
            return Ok(());
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                tree::encode_end(&mut self.pending);
                self.done = true;
                return Ok(());
            };
            let Some(name) = top.names.next() else {
                self.stack.pop();
                continue;
            };
            let mut rel = top.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
            let full = join(&self.root, &rel);
            if self.entry(&full, rel)? {
                return Ok(());
            }
        }
    }

    /// The record of one entry; `false` when it is skipped (special file, vanished).
    fn entry(&mut self, full: &Path, rel: Vec<u8>) -> Result<bool> {
        let m = match fs::symlink_metadata(full) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.is_empty() => return Ok(false),
            Err(e) => return Err(TreeFsError::io("stat", full)(e)),
        };
        let ft = m.file_type();
        let mode = m.permissions().mode() & 0o7777;
        if ft.is_dir() {
            let mut names = Vec::new();
            for e in fs::read_dir(full).map_err(TreeFsError::io("read directory", full))? {
                names.push(e.map_err(TreeFsError::io("read directory", full))?.file_name().as_bytes().to_vec());
            }
            names.sort();
            tree::encode_dir(&mut self.pending, &rel, mode, mtime_ns(&m));
            self.stack.push(DirIter { rel, names: names.into_iter() });
        } else if ft.is_file() {
            let f = File::open(full).map_err(TreeFsError::io("open", full))?;
            tree::encode_file_header(&mut self.pending, &rel, mode, mtime_ns(&m), m.len());
            self.file = Some((f, m.len(), full.to_owned()));
        } else if ft.is_symlink() {
            let target = fs::read_link(full).map_err(TreeFsError::io("read link", full))?;
            tree::encode_symlink(&mut self.pending, &rel, target.as_os_str().as_bytes());
        } else {
            return Ok(false);
        }
        self.entries += 1;
        Ok(true)
    }
}

/// How a [`TreeWriter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Create the destination's missing parent directories.
    pub parents: bool,
    /// Keep setuid and setgid bits (by default they are dropped: a tree from an untrusted
    /// side must not plant setuid files where it lands).
    pub keep_setuid: bool,
    /// The most file data bytes written for the whole stream (holes are not written and do
    /// not count), each entry counting [`ENTRY_COST`] more for its inode and name; passing it
    /// fails the stream with [`TreeFsError::Limit`].
    pub max_bytes: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions { parents: true, keep_setuid: false, max_bytes: None }
    }
}

/// What each entry (file, directory, symlink) counts toward [`WriterOptions::max_bytes`]
/// besides its data: a stream of empty entries fills a disk's inodes too.
pub const ENTRY_COST: u64 = 512;

/// Blocks of this size (aligned in the file) that are all zero are left as holes.
const HOLE_BLOCK: u64 = 4096;

/// What the root record made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Root {
    /// No record yet.
    Pending,
    /// A directory: records below it follow.
    Dir,
    /// A file or symlink: only END may follow.
    Leaf,
}

/// The file being written.
struct OpenFile {
    file: File,
    /// The directory it is in and its name there (to remove it if the stream fails).
    dir: OwnedFd,
    name: CString,
    full: PathBuf,
    mode: u32,
    mtime_ns: i64,
    size: u64,
    /// Bytes of content so far (written or skipped as holes).
    at: u64,
}

fn cstring(name: &[u8]) -> CString {
    // Tree paths have no NUL (the decoder checks); a root name comes from a `Path`.
    CString::new(name).expect("no NUL in a checked name")
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat(dir, name, O_DIRECTORY | (O_NOFOLLOW unless follow))`.
fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr, follow: bool) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | if follow { 0 } else { libc::O_NOFOLLOW };
    // SAFETY: a valid dirfd and NUL-terminated name; the new fd is owned by the result only.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the file type bits, `None` if nothing is there.
fn type_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::mode_t>> {
    // SAFETY: all-zero is a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dirfd, NUL-terminated name and a `stat` to fill.
    match cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st.st_mode & libc::S_IFMT)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }).map(drop)
}

fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid dirfd and NUL-terminated name; without AT_REMOVEDIR it never removes a directory.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated target and name, a valid dirfd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// A new regular file `name` in `dir`: `O_CREAT | O_EXCL | O_NOFOLLOW`, so never an existing
/// file, hard link or symlink.
fn create_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid dirfd and NUL-terminated name; the new fd is owned by the result only.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn set_mode_time(fd: BorrowedFd<'_>, mode: u32, mtime_ns: i64) -> io::Result<()> {
    // SAFETY: a valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    let ts = |sec, nsec| libc::timespec { tv_sec: sec, tv_nsec: nsec };
    let times = [
        ts(0, libc::UTIME_OMIT),
        ts(mtime_ns.div_euclid(1_000_000_000) as libc::time_t, mtime_ns.rem_euclid(1_000_000_000) as _),
    ];
    // SAFETY: a valid fd and two timespecs (atime untouched, mtime set).
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

fn all_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Creates what a tree stream describes at a destination path, never outside it.
///
/// The destination's parent is opened once, at the start; every entry is then created with
/// `*at` calls from the root directory's fd, walking the components of its parent with
/// `O_DIRECTORY | O_NOFOLLOW` (a symlink or file on the way is refused, whoever made it), and
/// final components are made with `O_CREAT | O_EXCL`, `mkdirat` and `symlinkat`, which never
/// follow a link. The first record must be the root (empty path); after a root file or
/// symlink only END may follow. An entry over an existing file or symlink replaces it (a hard
/// link is unlinked, never written through); over a directory it is refused. All-zero blocks
/// stay holes. A file the stream did not finish is removed.
pub struct TreeWriter {
    root: PathBuf,
    opts: WriterOptions,
    /// The directory that holds the root, and the root's name in it.
    parent: OwnedFd,
    base: CString,
    state: Root,
    /// The root directory, once made.
    root_dir: Option<OwnedFd>,
    /// The last parent directory walked to: its path (relative to the root) and fd.
    last_dir: Option<(Vec<u8>, OwnedFd)>,
    decoder: TreeDecoder,
    file: Option<OpenFile>,
    /// Directories to give their mode and mtime at the end, in creation order.
    dirs: Vec<(Vec<u8>, u32, i64)>,
    pub entries: u64,
    /// File content bytes (holes included).
    pub bytes: u64,
    /// File data bytes actually written (holes not included): what `max_bytes` bounds,
    /// with [`ENTRY_COST`] per record in `records`.
    pub written: u64,
    records: u64,
}

impl TreeWriter {
    /// Writes to `root` (its parent must exist, or is created with `parents`); setuid/setgid
    /// bits dropped, no size limit.
    pub fn new(root: &Path, parents: bool) -> Result<TreeWriter> {
        TreeWriter::with_options(root, WriterOptions { parents, ..WriterOptions::default() })
    }

    pub fn with_options(root: &Path, opts: WriterOptions) -> Result<TreeWriter> {
        let base = match root.file_name() {
            Some(n) if !root.ends_with("..") => cstring(n.as_bytes()),
            _ => {
                return Err(TreeFsError::Invalid(format!(
                    "the destination {} does not name a file or directory",
                    root.display()
                )))
            }
        };
        let parent = root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if opts.parents {
            fs::create_dir_all(parent).map_err(TreeFsError::io("create directory", parent))?;
        }
        // The caller chose the destination: its parent is resolved as given, once.
        let parent_fd = File::open(parent).map_err(TreeFsError::io("open directory", parent))?;
        if !parent_fd.metadata().map_err(TreeFsError::io("stat", parent))?.is_dir() {
            return Err(TreeFsError::Io {
                path: parent.to_owned(),
                op: "open directory",
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(TreeWriter {
            root: root.to_owned(),
            opts,
            parent: parent_fd.into(),
            base,
            state: Root::Pending,
            root_dir: None,
            last_dir: None,
            decoder: TreeDecoder::new(),
            file: None,
            dirs: Vec::new(),
            entries: 0,
            bytes: 0,
            written: 0,
            records: 0,
        })
    }

    /// Consumes the next piece of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while let Some(ev) = self.decoder.next(&mut data).map_err(|e| TreeFsError::Invalid(e.to_string()))? {
            self.event(ev)?;
        }
        Ok(())
    }

    /// The stream has ended: checks it was complete and applies directory modes and times.
    pub fn finish(&mut self) -> Result<()> {
        self.decoder.finish().map_err(|e| TreeFsError::Invalid(e.to_string()))?;
        self.last_dir = None;
        for (rel, mode, mtime) in std::mem::take(&mut self.dirs).into_iter().rev() {
            let full = join(&self.root, &rel);
            let fd = if rel.is_empty() {
                self.root_dir()?.try_clone_to_owned().map_err(TreeFsError::io("dup", &full))?
            } else {
                self.walk(&rel, true)?
            };
            set_mode_time(fd.as_fd(), self.mode(mode), mtime).map_err(TreeFsError::io("chmod", &full))?;
        }
        Ok(())
    }

    fn mode(&self, mode: u32) -> u32 {
        if self.opts.keep_setuid {
            mode & 0o7777
        } else {
            mode & 0o1777
        }
    }

    fn root_dir(&self) -> Result<BorrowedFd<'_>> {
        self.root_dir.as_ref().map(|f| f.as_fd()).ok_or_else(|| TreeFsError::Invalid("no root directory".into()))
    }

    fn refused(&self, rel: &[u8], why: &str) -> TreeFsError {
        TreeFsError::Invalid(format!("{}: {why}: refused", join(&self.root, rel).display()))
    }

    /// The directory `rel` (relative to the root): each component opened with `O_NOFOLLOW`
    /// from the one before, so it is a real directory inside the destination.
    fn walk(&self, rel: &[u8], last_too: bool) -> Result<OwnedFd> {
        let root = self.root_dir()?;
        let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
        let upto = if last_too { comps.len() } else { comps.len() - 1 };
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps[..upto].iter().enumerate() {
            let at = cur.as_ref().map_or(root, |f| f.as_fd());
            match open_dir_at(at, &cstring(c), false) {
                Ok(fd) => cur = Some(fd),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    let prefix = comps[..=i].join(&b'/');
                    return Err(
                        self.refused(&prefix, "not a directory (a symlink or file) and the stream writes below it")
                    );
                }
                Err(e) => return Err(TreeFsError::io("open directory", &join(&self.root, rel))(e)),
            }
        }
        match cur {
            Some(fd) => Ok(fd),
            None => root.try_clone_to_owned().map_err(TreeFsError::io("dup", &self.root)),
        }
    }

    /// Whether `extra` more bytes would pass `max_bytes`; the limit if so.
    fn over(&self, extra: u64) -> Option<u64> {
        let used = self.written.saturating_add(self.records.saturating_mul(ENTRY_COST));
        self.opts.max_bytes.filter(|&m| used.saturating_add(extra) > m)
    }

    /// Where the entry `rel` goes: its directory's fd and its name, checked against the root
    /// record's rules and the limit.
    fn place(&mut self, rel: &[u8]) -> Result<(OwnedFd, CString)> {
        if let Some(max) = self.over(ENTRY_COST) {
            return Err(TreeFsError::Limit { max, path: join(&self.root, rel) });
        }
        self.records += 1;
        match (self.state, rel.is_empty()) {
            (Root::Pending, true) => {
                let fd = self.parent.try_clone().map_err(TreeFsError::io("dup", &self.root))?;
                return Ok((fd, self.base.clone()));
            }
            (Root::Pending, false) => return Err(self.refused(rel, "the first record is not the root (empty path)")),
            (_, true) => return Err(self.refused(rel, "a second record for the root")),
            (Root::Leaf, false) => return Err(self.refused(rel, "an entry below a root that is a file or symlink")),
            (Root::Dir, false) => {}
        }
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        let fd = match &self.last_dir {
            Some((p, fd)) if p == dir => fd.try_clone().map_err(TreeFsError::io("dup", &self.root))?,
            _ => {
                let fd = if dir.is_empty() { self.walk(b"", false)? } else { self.walk(dir, true)? };
                self.last_dir = Some((dir.to_vec(), fd.try_clone().map_err(TreeFsError::io("dup", &self.root))?));
                fd
            }
        };
        Ok((fd, cstring(name)))
    }

    /// Makes room for a file or symlink: removes a file or symlink there (never follows it),
    /// refuses a directory.
    fn clear(&self, dir: BorrowedFd<'_>, name: &CStr, full: &Path, rel: &[u8]) -> Result<()> {
        match type_at(dir, name).map_err(TreeFsError::io("stat", full))? {
            None => Ok(()),
            Some(libc::S_IFDIR) => Err(TreeFsError::Io {
                path: full.to_owned(),
                op: if rel.is_empty() { "write" } else { "replace" },
                source: io::Error::from_raw_os_error(libc::EISDIR),
            }),
            Some(_) => unlink_at(dir, name).map_err(TreeFsError::io("remove", full)),
        }
    }

    fn event(&mut self, ev: TreeEvent<'_>) -> Result<()> {
        match ev {
            TreeEvent::Dir { path, mode, mtime_ns } => {
                let (dir, name) = self.place(&path)?;
                let full = join(&self.root, &path);
                match mkdir_at(dir.as_fd(), &name) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let t = type_at(dir.as_fd(), &name).map_err(TreeFsError::io("stat", &full))?;
                        // The root may be a symlink to a directory, if the caller put it there
                        // (nothing of the stream's exists yet); anything below must be real.
                        let ok = t == Some(libc::S_IFDIR)
                            || (path.is_empty() && open_dir_at(dir.as_fd(), &name, true).is_ok());
                        if !ok {
                            return Err(TreeFsError::Io { path: full, op: "create directory", source: e });
                        }
                    }
                    Err(e) => return Err(TreeFsError::io("create directory", &full)(e)),
                }
                if path.is_empty() {
                    self.root_dir =
                        Some(open_dir_at(dir.as_fd(), &name, true).map_err(TreeFsError::io("open directory", &full))?);
                    self.state = Root::Dir;
                }
                self.dirs.push((path, mode, mtime_ns));
                self.entries += 1;
            }
            TreeEvent::File { path, mode, mtime_ns, size } => {
                let (dir, name) = self.place(&path)?;
                let full = join(&self.root, &path);
                self.clear(dir.as_fd(), &name, &full, &path)?;
                let file = create_at(dir.as_fd(), &name).map_err(TreeFsError::io("create", &full))?;
                if path.is_empty() {
                    self.state = Root::Leaf;
                }
                self.file = Some(OpenFile { file, dir, name, full, mode, mtime_ns, size, at: 0 });
            }
            TreeEvent::Data(b) => self.data(b)?,
            TreeEvent::FileEnd => {
                let f = self.file.take().expect("decoder: file end after a file");
                let done =
                    f.file.set_len(f.size).map_err(TreeFsError::io("set the length of", &f.full)).and_then(|()| {
                        set_mode_time(f.file.as_fd(), self.mode(f.mode), f.mtime_ns)
                            .map_err(TreeFsError::io("chmod", &f.full))
                    });
                if let Err(e) = done {
                    let _ = unlink_at(f.dir.as_fd(), &f.name);
                    return Err(e);
                }
                self.entries += 1;
            }
            TreeEvent::Symlink { path, target } => {
                let (dir, name) = self.place(&path)?;
                let full = join(&self.root, &path);
                self.clear(dir.as_fd(), &name, &full, &path)?;
                symlink_at(&cstring(&target), dir.as_fd(), &name).map_err(TreeFsError::io("create symlink", &full))?;
                if path.is_empty() {
                    self.state = Root::Leaf;
                }
                self.entries += 1;
            }
            TreeEvent::End => {}
        }
        Ok(())
    }

    /// File content: runs of data written at their offsets, all-zero aligned blocks skipped
    /// (holes; the length is set at the file's end).
    fn data(&mut self, b: &[u8]) -> Result<()> {
        let start = self.file.as_ref().expect("decoder: data only inside a file").at;
        let mut run: Option<usize> = None;
        let mut i = 0;
        while i <= b.len() {
            let end =
                if i == b.len() { i } else { b.len().min(i + (HOLE_BLOCK - (start + i as u64) % HOLE_BLOCK) as usize) };
            let zero = i == b.len() || all_zero(&b[i..end]);
            if zero {
                if let Some(r) = run.take() {
                    let n = (i - r) as u64;
                    let over = self.over(n);
                    let f = self.file.as_ref().expect("inside a file");
                    if let Some(max) = over {
                        return Err(TreeFsError::Limit { max, path: f.full.clone() });
                    }
                    f.file.write_all_at(&b[r..i], start + r as u64).map_err(TreeFsError::io("write", &f.full))?;
                    self.written += n;
                }
            } else if run.is_none() {
                run = Some(i);
            }
            if i == b.len() {
                break;
            }
            i = end;
        }
        self.file.as_mut().expect("inside a file").at += b.len() as u64;
        self.bytes += b.len() as u64;
        Ok(())
    }
}

impl Drop for TreeWriter {
    fn drop(&mut self) {
        // A file the stream did not finish must not look like a whole one.
        if let Some(f) = self.file.take() {
            let _ = unlink_at(f.dir.as_fd(), &f.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("microcell-treefs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn stream_of(path: &Path, piece: usize) -> Vec<u8> {
        let mut r = TreeReader::open(path).unwrap();
        let mut out = Vec::new();
        while !r.fill(&mut out, piece).unwrap() {}
        out
    }

    fn write_stream(dest: &Path, s: &[u8], piece: usize) -> Result<()> {
        write_with(dest, s, piece, WriterOptions::default())
    }

    fn write_with(dest: &Path, s: &[u8], piece: usize, opts: WriterOptions) -> Result<()> {
        let mut w = TreeWriter::with_options(dest, opts)?;
        for c in s.chunks(piece) {
            w.feed(c)?;
        }
        w.finish()
    }

    const KEEP: WriterOptions = WriterOptions { parents: true, keep_setuid: true, max_bytes: None };

    #[test]
    fn a_tree_round_trips_with_modes_times_and_symlinks() {
        let d = tmp("rt");
        let src = d.join("src");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::write(src.join("a.txt"), b"hello").unwrap();
        fs::write(src.join("sub/x.bin"), (0..=255u8).cycle().take(100_000).collect::<Vec<_>>()).unwrap();
        fs::write(src.join("empty"), b"").unwrap();
        fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o4751)).unwrap();
        fs::set_permissions(src.join("sub/deeper"), fs::Permissions::from_mode(0o500)).unwrap();
        std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
        let t = system_time(1_600_000_000_123_456_789);
        File::options().write(true).open(src.join("a.txt")).unwrap().set_modified(t).unwrap();
        for piece in [1usize, 7, 4096, 1 << 20] {
            let s = stream_of(&src, piece);
            let dst = d.join(format!("dst{piece}"));
            write_with(&dst, &s, piece.max(3), KEEP).unwrap();
            assert_eq!(stream_of(&dst, 1 << 20), stream_of(&src, 1 << 20), "piece {piece}");
            let m = fs::symlink_metadata(dst.join("a.txt")).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o4751);
            assert_eq!(m.modified().unwrap(), t);
            assert_eq!(fs::read_link(dst.join("sub/link")).unwrap(), Path::new("../a.txt"));
            assert_eq!(fs::symlink_metadata(dst.join("sub/deeper")).unwrap().permissions().mode() & 0o7777, 0o500);
        }
        // A single file and a single symlink as the root.
        let s = stream_of(&src.join("sub/x.bin"), 1000);
        write_stream(&d.join("one.bin"), &s, 333).unwrap();
        assert_eq!(fs::read(d.join("one.bin")).unwrap(), fs::read(src.join("sub/x.bin")).unwrap());
        write_stream(&d.join("one.link"), &stream_of(&src.join("dangling"), 10), 5).unwrap();
        assert_eq!(fs::read_link(d.join("one.link")).unwrap(), Path::new("/nonexistent/target"));
        let _ = fs::set_permissions(d.join("dst1/sub/deeper"), fs::Permissions::from_mode(0o700));
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn streams_cannot_write_through_symlinks() {
        let d = tmp("evil");
        let outside = d.join("outside");
        fs::create_dir_all(&outside).unwrap();
        let mut s = Vec::new();
        tree::encode_dir(&mut s, b"", 0o755, 0);
        tree::encode_symlink(&mut s, b"esc", outside.as_os_str().as_bytes());
        tree::encode_file_header(&mut s, b"esc/pwned", 0o644, 0, 1);
        s.push(b'x');
        tree::encode_end(&mut s);
        let e = write_stream(&d.join("dst"), &s, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(!outside.join("pwned").exists());
        // A file record over an existing directory is refused, not a recursive delete.
        fs::create_dir_all(d.join("dst2/keep")).unwrap();
        fs::write(d.join("dst2/keep/precious"), b"1").unwrap();
        let mut s = Vec::new();
        tree::encode_dir(&mut s, b"", 0o755, 0);
        tree::encode_file_header(&mut s, b"keep", 0o644, 0, 0);
        tree::encode_end(&mut s);
        let e = write_stream(&d.join("dst2"), &s, 1 << 20).unwrap_err();
        assert_eq!(e.errno(), 21, "{e}");
        assert!(d.join("dst2/keep/precious").exists());
        fs::remove_dir_all(&d).ok();
    }

    /// One record of a crafted stream (mode 0o644/0o755, mtime 0).
    enum R<'a> {
        D(&'a [u8]),
        F(&'a [u8], &'a [u8]),
        L(&'a [u8], &'a [u8]),
    }

    fn crafted(recs: &[R<'_>]) -> Vec<u8> {
        let mut s = Vec::new();
        for r in recs {
            match *r {
                R::D(p) => tree::encode_dir(&mut s, p, 0o755, 0),
                R::F(p, data) => {
                    tree::encode_file_header(&mut s, p, 0o644, 0, data.len() as u64);
                    s.extend_from_slice(data);
                }
                R::L(p, t) => tree::encode_symlink(&mut s, p, t),
            }
        }
        tree::encode_end(&mut s);
        s
    }

    /// `(name, content or link target)` of everything under `dir`, sorted.
    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                let what = if m.file_type().is_symlink() {
                    fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()
                } else if m.is_dir() {
                    stack.push(p.clone());
                    b"<dir>".to_vec()
                } else {
                    fs::read(&p).unwrap()
                };
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), what));
            }
        }
        out.sort();
        out
    }

    /// A case directory with `outside/victim` ("original") beside where `dst` goes.
    fn case(d: &Path, i: usize) -> (PathBuf, PathBuf) {
        let c = d.join(format!("case{i}"));
        fs::create_dir_all(c.join("outside")).unwrap();
        fs::write(c.join("outside/victim"), b"original").unwrap();
        (c.join("outside"), c.join("dst"))
    }

    #[test]
    fn crafted_streams_never_write_outside_the_destination() {
        let d = tmp("battery");
        let out_path = |o: &Path, rest: &str| [o.as_os_str().as_bytes(), rest.as_bytes()].concat();
        // Each builds a stream from the case's outside dir; all must be refused.
        type Case = (&'static str, fn(&[u8], &[u8]) -> Vec<u8>);
        let refused: &[Case] = &[
            ("root symlink, then a file below it", |o, _| crafted(&[R::L(b"", o), R::F(b"pwned", b"x")])),
            ("root symlink, then a directory below it", |o, _| crafted(&[R::L(b"", o), R::D(b"sub")])),
            ("root symlink, then the root as a directory", |o, _| {
                crafted(&[R::L(b"", o), R::D(b""), R::F(b"pwned", b"x")])
            }),
            ("root file, then an entry below it", |_, _| crafted(&[R::F(b"", b"x"), R::F(b"pwned", b"y")])),
            ("root file, then the root as a symlink", |o, _| crafted(&[R::F(b"", b"x"), R::L(b"", o)])),
            ("root directory, then the root as a symlink", |o, _| {
                crafted(&[R::D(b""), R::L(b"", o), R::F(b"pwned", b"x")])
            }),
            ("a first record that is not the root", |_, _| crafted(&[R::F(b"pwned", b"x")])),
            ("a symlinked parent", |o, _| crafted(&[R::D(b""), R::L(b"esc", o), R::F(b"esc/pwned", b"x")])),
            ("a symlinked parent, deeper, then a directory", |o, _| {
                crafted(&[R::D(b""), R::D(b"a"), R::L(b"a/esc", o), R::D(b"a/esc/pwned")])
            }),
            ("a symlinked parent, then a symlink", |o, _| {
                crafted(&[R::D(b""), R::L(b"esc", o), R::L(b"esc/pwned", b"/etc")])
            }),
            ("a directory swapped for a symlink", |o, _| crafted(&[R::D(b""), R::D(b"d"), R::L(b"d", o)])),
            ("a symlink swapped for a directory, then a file in it", |o, _| {
                crafted(&[R::D(b""), R::L(b"d", o), R::D(b"d"), R::F(b"d/pwned", b"x")])
            }),
            ("a file swapped for a directory", |_, _| {
                crafted(&[R::D(b""), R::F(b"f", b"1"), R::D(b"f"), R::F(b"f/x", b"2")])
            }),
            ("a '..' name", |_, _| crafted(&[R::D(b""), R::F(b"../outside/pwned", b"x")])),
            ("a '..' inside a name", |_, _| crafted(&[R::D(b""), R::D(b"a"), R::F(b"a/../../outside/pwned", b"x")])),
            ("an absolute name", |_, abs| crafted(&[R::D(b""), R::F(abs, b"x")])),
            ("a '.' component", |_, _| crafted(&[R::D(b""), R::F(b"./pwned", b"x")])),
        ];
        for (i, (what, make)) in refused.iter().enumerate() {
            let (outside, dst) = case(&d, i);
            let before = snapshot(&outside);
            let s = make(outside.as_os_str().as_bytes(), &out_path(&outside, "/pwned"));
            for piece in [1usize, 5, 1 << 20] {
                let e = write_stream(&dst, &s, piece).expect_err(what);
                assert!(
                    matches!(e, TreeFsError::Invalid(_)) || matches!(e.errno(), libc::EEXIST | libc::EISDIR),
                    "{what}: {e}"
                );
                assert_eq!(snapshot(&outside), before, "{what}: outside changed (pieces of {piece})");
                if dst.is_dir() && !fs::symlink_metadata(&dst).unwrap().file_type().is_symlink() {
                    fs::remove_dir_all(&dst).unwrap();
                } else {
                    let _ = fs::remove_file(&dst);
                }
            }
        }
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn replaced_entries_are_never_written_through() {
        let d = tmp("replace");
        // A symlink of the stream's (or one already there) replaced by a file: the link goes,
        // its target stays.
        let (outside, dst) = case(&d, 0);
        let victim = outside.join("victim");
        let s = crafted(&[R::D(b""), R::L(b"v", victim.as_os_str().as_bytes()), R::F(b"v", b"new")]);
        write_stream(&dst, &s, 3).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert!(fs::symlink_metadata(dst.join("v")).unwrap().is_file());
        assert_eq!(fs::read(dst.join("v")).unwrap(), b"new");
        // A hard link to an outside file in the destination is replaced, not written through.
        let (outside, dst) = case(&d, 1);
        fs::create_dir_all(&dst).unwrap();
        fs::hard_link(outside.join("victim"), dst.join("h")).unwrap();
        write_stream(&dst, &crafted(&[R::D(b""), R::F(b"h", b"pwned")]), 7).unwrap();
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"original");
        assert_eq!(fs::read(dst.join("h")).unwrap(), b"pwned");
        // A symlink someone else put in the destination is no way out either.
        let (outside, dst) = case(&d, 2);
        fs::create_dir_all(&dst).unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("pre")).unwrap();
        for s in [crafted(&[R::D(b""), R::F(b"pre/pwned", b"x")]), crafted(&[R::D(b""), R::D(b"pre")])] {
            assert!(write_stream(&dst, &s, 100).is_err());
        }
        assert_eq!(snapshot(&outside), vec![("victim".into(), b"original".to_vec())]);
        // Duplicates: the last record wins.
        let (_, dst) = case(&d, 3);
        let s = crafted(&[
            R::D(b""),
            R::F(b"a", b"1"),
            R::F(b"a", b"22"),
            R::D(b"d"),
            R::D(b"d"),
            R::L(b"l", b"t1"),
            R::L(b"l", b"t2"),
            R::F(b"d/x", b"3"),
        ]);
        write_stream(&dst, &s, 2).unwrap();
        assert_eq!(
            snapshot(&dst),
            vec![
                ("a".into(), b"22".to_vec()),
                ("d".into(), b"<dir>".to_vec()),
                ("d/x".into(), b"3".to_vec()),
                ("l".into(), b"t2".to_vec())
            ]
        );
        // The caller's own destination may be a symlink to a directory (the stream's may not).
        let (outside, dst) = case(&d, 4);
        std::os::unix::fs::symlink(&outside, &dst).unwrap();
        write_stream(&dst, &crafted(&[R::D(b""), R::F(b"mine", b"ok")]), 9).unwrap();
        assert_eq!(fs::read(outside.join("mine")).unwrap(), b"ok");
        // A root file over it replaces the link, not its target.
        write_stream(&dst, &crafted(&[R::F(b"", b"file")]), 9).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"file");
        assert!(outside.join("mine").exists());
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn no_special_files_and_no_setuid_by_default() {
        let d = tmp("special");
        // No record makes a FIFO, socket or device: unknown tags and type bits in modes are refused.
        for tag in [4u8, 5, 6, 0x10, 0xff] {
            let mut s = vec![tag, 1, b'x'];
            s.extend_from_slice(&[0; 8]);
            assert!(write_stream(&d.join("dst"), &s, 4).is_err(), "tag {tag}");
        }
        for mode in [libc::S_IFIFO | 0o644, libc::S_IFCHR | 0o666, libc::S_IFBLK | 0o660, libc::S_IFSOCK | 0o777] {
            let mut s = vec![2u8, 0];
            crate::wire::put_varint(&mut s, u64::from(mode));
            s.extend_from_slice(&[0, 0, 0]);
            let e = write_stream(&d.join("dst"), &s, 4).unwrap_err();
            assert!(e.to_string().contains("mode"), "{e}");
        }
        assert!(fs::symlink_metadata(d.join("dst")).is_err(), "nothing was made");
        // setuid/setgid dropped unless asked for; sticky kept.
        let mut s = Vec::new();
        tree::encode_dir(&mut s, b"", 0o3755, 0);
        tree::encode_file_header(&mut s, b"su", 0o6755, 0, 1);
        s.push(b'x');
        tree::encode_dir(&mut s, b"sticky", 0o1777, 0);
        tree::encode_end(&mut s);
        let mode = |p: PathBuf| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        write_stream(&d.join("drop"), &s, 5).unwrap();
        assert_eq!(
            (mode(d.join("drop")), mode(d.join("drop/su")), mode(d.join("drop/sticky"))),
            (0o1755, 0o755, 0o1777)
        );
        write_with(&d.join("keep"), &s, 5, KEEP).unwrap();
        assert_eq!((mode(d.join("keep")), mode(d.join("keep/su"))), (0o3755, 0o6755));
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn holes_stay_holes_and_max_bytes_bounds_what_is_written() {
        let d = tmp("sparse");
        // 8 MiB, data only in two blocks (one unaligned across a block boundary).
        let size = 8usize << 20;
        let mut content = vec![0u8; size];
        content[..4096].fill(1);
        content[(5 << 20) + 100..(5 << 20) + 4196].fill(2);
        content[size - 1] = 3;
        let mut s = Vec::new();
        tree::encode_file_header(&mut s, b"", 0o644, 0, size as u64);
        s.extend_from_slice(&content);
        tree::encode_end(&mut s);
        for piece in [3333usize, 1 << 20] {
            let dst = d.join(format!("sparse{piece}"));
            let mut w = TreeWriter::new(&dst, true).unwrap();
            for c in s.chunks(piece) {
                w.feed(c).unwrap();
            }
            w.finish().unwrap();
            // Whole non-zero blocks are written: 4 of them hold the 8193 bytes of data.
            assert_eq!(w.bytes, size as u64);
            assert!((8193..=4 * 4096).contains(&w.written), "{} bytes written", w.written);
            assert!(fs::read(&dst).unwrap() == content, "content changed");
            let blocks = fs::metadata(&dst).unwrap().blocks();
            assert!(blocks * 512 <= 64 << 10, "{blocks} blocks allocated for 12 KiB of data");
        }
        // The limit counts data written: the sparse file passes 1 MiB, 1.5 MiB of data does not.
        let lim = WriterOptions { max_bytes: Some(1 << 20), ..WriterOptions::default() };
        write_with(&d.join("under"), &s, 1 << 16, lim).unwrap();
        let a = vec![7u8; 512 << 10];
        let b = vec![8u8; 1 << 20];
        let e = write_with(&d.join("over"), &crafted(&[R::D(b""), R::F(b"a", &a), R::F(b"b", &b)]), 1 << 16, lim)
            .unwrap_err();
        assert!(matches!(e, TreeFsError::Limit { max: 1048576, .. }), "{e}");
        assert_eq!(e.errno(), libc::EFBIG);
        assert_eq!(fs::read(d.join("over/a")).unwrap(), a, "finished files stay");
        assert!(!d.join("over/b").exists(), "the file cut short is removed");
        let e = write_with(&d.join("over1"), &crafted(&[R::F(b"", &[b.as_slice(), &b].concat())]), 1 << 16, lim)
            .unwrap_err();
        assert!(e.to_string().contains("maxBytes"), "{e}");
        assert!(fs::symlink_metadata(d.join("over1")).is_err(), "no partial root file");
        // Empty entries count too (inodes): 64 KiB buys 128 of them.
        let names: Vec<String> = (0..200).map(|i| format!("e{i}")).collect();
        let recs: Vec<R<'_>> =
            std::iter::once(R::D(b"")).chain(names.iter().map(|n| R::F(n.as_bytes(), b""))).collect();
        let small = WriterOptions { max_bytes: Some(64 << 10), ..WriterOptions::default() };
        let e = write_with(&d.join("many"), &crafted(&recs), 1 << 16, small).unwrap_err();
        assert!(matches!(e, TreeFsError::Limit { .. }), "{e}");
        assert_eq!(fs::read_dir(d.join("many")).unwrap().count(), 127, "the root and 127 files fit");
        // A stream that stops inside a file leaves no file that looks whole.
        let s = crafted(&[R::D(b""), R::F(b"cut", &b)]);
        let mut w = TreeWriter::new(&d.join("cut"), true).unwrap();
        w.feed(&s[..s.len() / 2]).unwrap();
        assert!(d.join("cut/cut").exists());
        assert!(w.finish().is_err());
        drop(w);
        assert!(!d.join("cut/cut").exists());
        fs::remove_dir_all(&d).ok();
    }
}
