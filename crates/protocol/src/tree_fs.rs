//! Tree streams ([`crate::tree`]) from and to a real file system, with `std::fs` only: the
//! agent reads and writes guest trees with it, the host its own (copy to/from the host).
//!
//! Kept: regular files (contents, permission bits incl. setuid/setgid/sticky, mtime),
//! directories (permission bits, mtime), symlinks (target, verbatim). Not kept: owners (what
//! is written belongs to the writer), hard links (each name becomes its own file), special
//! files (FIFOs, sockets, devices: skipped). A file that shrinks while it is read is padded
//! with zeros to the size announced in its header (as tar does); one that grows is cut there.
//!
//! The writer treats the stream as untrusted: paths are checked by the decoder (relative, no
//! `..`), and no entry is written through a symlink or anything else that is not a real
//! directory inside the destination — so a stream cannot reach outside it, whatever symlinks
//! it (or anyone) created there first. The root itself may be given as a symlink by the caller.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::tree::{self, TreeDecoder, TreeEvent};

/// What went wrong, and at which path.
#[derive(Debug)]
pub enum TreeFsError {
    Io { path: PathBuf, op: &'static str, source: io::Error },
    /// The stream is not valid, or asks for something the writer refuses.
    Invalid(String),
}

impl TreeFsError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TreeFsError + 'a {
        move |source| TreeFsError::Io { path: path.to_owned(), op, source }
    }

    /// The errno behind it (`EINVAL` for an invalid stream).
    pub fn errno(&self) -> i32 {
        match self {
            TreeFsError::Io { source, .. } => source.raw_os_error().unwrap_or(5),
            TreeFsError::Invalid(_) => 22,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            TreeFsError::Io { path, .. } => Some(path),
            TreeFsError::Invalid(_) => None,
        }
    }
}

impl std::fmt::Display for TreeFsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeFsError::Io { path, op, source } => write!(f, "{op} {}: {source}", path.display()),
            TreeFsError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TreeFsError {}

pub type Result<T> = std::result::Result<T, TreeFsError>;

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

fn system_time(ns: i64) -> SystemTime {
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

/// Creates what a tree stream describes at a destination path.
pub struct TreeWriter {
    root: PathBuf,
    decoder: TreeDecoder,
    file: Option<(File, PathBuf, u32, i64)>,
    /// Directories to give their mode and mtime at the end, in creation order.
    dirs: Vec<(PathBuf, u32, i64)>,
    pub entries: u64,
    pub bytes: u64,
}

impl TreeWriter {
    /// Writes to `root` (its parent must exist, or is created with `parents`).
    pub fn new(root: &Path, parents: bool) -> Result<TreeWriter> {
        if parents {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(TreeFsError::io("create directory", parent))?;
            }
        }
        Ok(TreeWriter { root: root.to_owned(), decoder: TreeDecoder::new(), file: None, dirs: Vec::new(), entries: 0, bytes: 0 })
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
        for (path, mode, mtime) in self.dirs.drain(..).rev() {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(TreeFsError::io("chmod", &path))?;
            if let Ok(d) = File::open(&path) {
                let _ = d.set_modified(system_time(mtime));
            }
        }
        Ok(())
    }

    /// Every directory between the root and `rel`'s last component must be a real directory
    /// (never a symlink): nothing is written outside the destination.
    fn parent_checked(&self, rel: &[u8]) -> Result<PathBuf> {
        let full = join(&self.root, rel);
        let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
        let mut p = self.root.clone();
        for c in &comps[..comps.len().saturating_sub(1)] {
            p.push(OsStr::from_bytes(c));
            let m = fs::symlink_metadata(&p).map_err(TreeFsError::io("stat", &p))?;
            if !m.file_type().is_dir() {
                return Err(TreeFsError::Invalid(format!(
                    "{} is not a directory (a symlink or file) and the stream writes below it: refused",
                    p.display()
                )));
            }
        }
        Ok(full)
    }

    /// Removes a non-directory at `path` (a file or symlink the stream replaces).
    fn clear_for(&self, path: &Path, rel: &[u8]) -> Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_dir() => Err(TreeFsError::Io {
                path: path.to_owned(),
                op: if rel.is_empty() { "write" } else { "replace" },
                source: io::Error::from_raw_os_error(21), // EISDIR
            }),
            Ok(_) => fs::remove_file(path).map_err(TreeFsError::io("remove", path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TreeFsError::io("stat", path)(e)),
        }
    }

    fn event(&mut self, ev: TreeEvent<'_>) -> Result<()> {
        match ev {
            TreeEvent::Dir { path, mode, mtime_ns } => {
                let full = self.parent_checked(&path)?;
                match fs::symlink_metadata(&full) {
                    Ok(m) if m.file_type().is_dir() => {}
                    // The root may be a symlink to a directory the caller chose.
                    Ok(m) if path.is_empty() && m.file_type().is_symlink() && full.is_dir() => {}
                    Ok(_) => {
                        return Err(TreeFsError::Io {
                            path: full,
                            op: "create directory",
                            source: io::Error::from_raw_os_error(17), // EEXIST
                        })
                    }
                    Err(_) => fs::DirBuilder::new().mode(0o700).create(&full).map_err(TreeFsError::io("create directory", &full))?,
                }
                self.dirs.push((full, mode, mtime_ns));
                self.entries += 1;
            }
            TreeEvent::File { path, mode, mtime_ns, .. } => {
                let full = self.parent_checked(&path)?;
                self.clear_for(&full, &path)?;
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&full)
                    .map_err(TreeFsError::io("create", &full))?;
                self.file = Some((f, full, mode, mtime_ns));
            }
            TreeEvent::Data(b) => {
                let (f, path, ..) = self.file.as_mut().expect("decoder: data only inside a file");
                f.write_all(b).map_err(TreeFsError::io("write", path))?;
                self.bytes += b.len() as u64;
            }
            TreeEvent::FileEnd => {
                let (f, path, mode, mtime) = self.file.take().expect("decoder: file end after a file");
                f.set_permissions(fs::Permissions::from_mode(mode)).map_err(TreeFsError::io("chmod", &path))?;
                f.set_modified(system_time(mtime)).map_err(TreeFsError::io("set the time of", &path))?;
                self.entries += 1;
            }
            TreeEvent::Symlink { path, target } => {
                let full = self.parent_checked(&path)?;
                self.clear_for(&full, &path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full).map_err(TreeFsError::io("create symlink", &full))?;
                self.entries += 1;
            }
            TreeEvent::End => {}
        }
        Ok(())
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
        let mut w = TreeWriter::new(dest, true)?;
        for c in s.chunks(piece) {
            w.feed(c)?;
        }
        w.finish()
    }

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
            write_stream(&dst, &s, piece.max(3)).unwrap();
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
}
