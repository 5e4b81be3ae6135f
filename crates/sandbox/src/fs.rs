//! Files in the guest: one-shot operations (stat, exists, list, mkdir, remove, rename), file
//! streams both ways, and copies of files and trees between host and guest.
//!
//! Guest paths are absolute. A guest OS error is a [`SandboxError::Guest`] whose code is the
//! errno's name (`ENOENT`, `EACCES`, `EISDIR`, `ENOTDIR`, `EEXIST`, ...) with the guest path.
//!
//! Streams are flow-controlled like exec output: reading, the host grants a window (default
//! 4 MiB) and gives credit back as the consumer takes chunks; writing, the agent grants its
//! window and the host never sends beyond it. Copies use the tree stream
//! (`protocol::tree`): modes, mtimes and symlinks are kept; owners, hard links and special
//! files are not (see `protocol::tree_fs`). A tree from the guest is untrusted: nothing is
//! written outside the host destination, through a symlink or otherwise; setuid/setgid bits
//! are dropped unless asked for; holes stay holes; the data written is bounded
//! ([`CopyToHostOptions::max_bytes`]). Whole-file reads into host memory are bounded too
//! ([`AgentClient::read_file_max`]). Passing a bound is `E_OUTPUT_LIMIT`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use protocol::tree_fs::{TreeFsError, TreeReader, TreeWriter, WriterOptions};
use protocol::{
    kind, Credit, DirEntry, FileType, Message, Mkdir, ReadDir, ReadFile, ReadTree, Remove, Rename, Stat, StatResult,
    StreamKind, WriteFile, WriteTree,
};
use serde::Serialize;

use crate::agent_client::{agent_error, AgentClient, CreditWait, Pending};
use crate::error::{Result, SandboxError};

/// How long one step of a file operation (an answer, a chunk, some credit) may take.
pub const FS_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// The window for guest → host streams.
pub const READ_WINDOW: u32 = 4 << 20;
/// Bytes per host → guest `FileData` frame.
const WRITE_CHUNK: usize = 256 << 10;
/// The most a whole-file read collects into host memory unless told otherwise (as exec's
/// `maxOutputBytes`).
pub const DEFAULT_READ_MAX_BYTES: u64 = crate::limits::DEFAULT_OUTPUT_MAX_BYTES;
/// The most file data one copy to the host writes unless told otherwise (holes not counted).
pub use crate::limits::DEFAULT_COPY_MAX_BYTES;

/// How [`AgentClient::copy_to_host`] writes on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyToHostOptions {
    /// Keep setuid and setgid bits (dropped by default: the guest's files are untrusted).
    pub keep_setuid: bool,
    /// The most file data bytes written (holes are not written and do not count; each entry
    /// counts `protocol::tree_fs::ENTRY_COST`, 512 bytes); beyond it the copy stops with
    /// `E_OUTPUT_LIMIT` and the file it was writing is removed.
    pub max_bytes: u64,
}

impl Default for CopyToHostOptions {
    fn default() -> CopyToHostOptions {
        CopyToHostOptions { keep_setuid: false, max_bytes: DEFAULT_COPY_MAX_BYTES }
    }
}

/// `stat` of a guest path (camelCase JSON for the napi layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStat {
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub file_type: &'static str,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub link_target: Option<String>,
}

/// One entry of [`AgentClient::list_dir`] (from `lstat`: a symlink is `symlink`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirEntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: &'static str,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
}

/// How [`AgentClient::write_file`] writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits, set exactly; `None`: 0o644 for a new file, an existing one keeps its own.
    pub mode: Option<u32>,
    pub append: bool,
    /// Create missing parent directories.
    pub parents: bool,
}

/// What a copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyStats {
    /// Files, directories and symlinks.
    pub entries: u64,
    /// File content bytes.
    pub bytes: u64,
}

pub fn file_type_name(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

fn host_err(e: TreeFsError) -> SandboxError {
    match e {
        TreeFsError::Limit { .. } => SandboxError::OutputLimit(format!("copy to the host stopped: {e}")),
        e => SandboxError::HostFile(format!("host side of the copy: {e}")),
    }
}

fn guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(SandboxError::InvalidArgument(format!("guest path {path:?} is not absolute: start it with '/'")));
    }
    Ok(())
}

/// A guest → host byte stream (`ReadFile` or `ReadTree`): chunks in order, credit given back as
/// they are taken.
pub struct FileReadStream {
    pending: Pending,
    window: u32,
    consumed: u64,
    done: bool,
}

impl FileReadStream {
    /// The next chunk; `Ok(None)` at the end. Waits at most `timeout` for it.
    pub fn read_chunk(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let f = self.pending.wait(timeout)?;
        self.chunk(f)
    }

    /// [`FileReadStream::read_chunk`] as a future (no thread waits).
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let f = self.pending.recv().await?;
        self.chunk(f)
    }

    fn chunk(&mut self, f: protocol::Frame) -> Result<Option<Vec<u8>>> {
        let last = f.is_final();
        match f.msg {
            Message::FileData(c) => {
                if last {
                    self.done = true;
                } else {
                    self.consumed += c.len() as u64;
                    if self.consumed >= u64::from(self.window / 2) {
                        let bytes = self.consumed as u32;
                        self.consumed = 0;
                        self.pending.send(Message::Credit(Credit { stream: StreamKind::File, bytes }))?;
                    }
                }
                Ok(Some(c.0))
            }
            Message::Error(e) => {
                self.done = true;
                Err(agent_error(self.pending.what(), e))
            }
            other => Err(SandboxError::Protocol(format!("expected FileData, got {}", other.name()))),
        }
    }

    /// Host memory held by this stream now and at most so far.
    pub fn buffered_bytes(&self) -> (usize, usize) {
        self.pending.queued_bytes()
    }
}

impl Drop for FileReadStream {
    fn drop(&mut self) {
        // Abandoned before its end (a limit, an error on the host's side, a reader dropped):
        // the agent would hold the file or tree open, with a window of credit, until the
        // channel closes. What it sent meanwhile is dropped with this request's inbox.
        if !self.done && !self.pending.is_finished() && self.pending.agent_has(protocol::features::CANCEL) {
            let _ = self.pending.send(Message::Cancel(()));
        }
    }
}

/// A host → guest byte stream (`WriteFile` or `WriteTree`).
pub struct FileWriteStream {
    pending: Pending,
    timeout: Duration,
    /// Credit taken from the inbox and not yet used.
    credit: u64,
    finished: bool,
}

impl FileWriteStream {
    fn open(pending: Pending, timeout: Duration) -> Result<FileWriteStream> {
        let mut s = FileWriteStream { pending, timeout, credit: 0, finished: false };
        // The agent answers the open with its window, or an error.
        s.refill()?;
        Ok(s)
    }

    fn fail_from_queue(&self) -> SandboxError {
        match self.pending.try_next() {
            Ok(Some(protocol::Frame { msg: Message::Error(e), .. })) => agent_error(self.pending.what(), e),
            Ok(Some(f)) => SandboxError::Protocol(format!("unexpected {} during a write", f.msg.name())),
            Ok(None) => SandboxError::Protocol("the write ended without an answer".into()),
            Err(e) => e,
        }
    }

    fn refill(&mut self) -> Result<()> {
        if self.credit > 0 {
            return Ok(());
        }
        match self.pending.take_credit(StreamKind::File, u64::MAX, self.timeout)? {
            CreditWait::Granted(n) => {
                self.credit = n;
                Ok(())
            }
            CreditWait::Finished => Err(self.fail_from_queue()),
            CreditWait::Timeout => Err(SandboxError::AgentTimeout {
                request: self.pending.what(),
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    /// Sends `data` (in frames within the agent's credit).
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            self.refill()?;
            let n = (self.credit as usize).min(WRITE_CHUNK).min(data.len());
            self.pending.send_data(kind::FILE_DATA, &data[..n], false)?;
            self.credit -= n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends the stream and waits for the agent's `Ok`.
    pub fn finish(mut self) -> Result<()> {
        self.finished = true;
        self.pending.send_data(kind::FILE_DATA, &[], true)?;
        loop {
            let f = self.pending.wait(self.timeout)?;
            match f.msg {
                Message::Ok(()) => return Ok(()),
                Message::Error(e) => return Err(agent_error(self.pending.what(), e)),
                _ => continue,
            }
        }
    }
}

impl Drop for FileWriteStream {
    fn drop(&mut self) {
        if !self.finished && !self.pending.is_finished() {
            // An abandoned write: end it so the agent closes the file (whatever was written stays).
            let _ = self.pending.send_data(kind::FILE_DATA, &[], true);
        }
    }
}

/// One change under a watched guest directory ([`AgentClient::watch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchChange {
    /// `create` | `write` | `remove` | `rename` | `chmod` | `overflow` (changes were lost).
    pub kind: &'static str,
    pub path: String,
}

fn watch_kind_name(kind: u8) -> &'static str {
    use protocol::watch_kind as k;
    match kind {
        k::CREATE => "create",
        k::WRITE => "write",
        k::REMOVE => "remove",
        k::RENAME => "rename",
        k::CHMOD => "chmod",
        k::OVERFLOW => "overflow",
        _ => "unknown",
    }
}

/// A watch on a guest directory: its changes in order, until [`DirWatch::close`] (or drop).
pub struct DirWatch {
    pending: Pending,
    closed: std::sync::atomic::AtomicBool,
}

impl DirWatch {
    /// The next change as a future (no thread waits); `Ok(None)` once the watch is closed.
    pub async fn next(&self) -> Result<Option<WatchChange>> {
        if self.pending.is_finished() {
            return Ok(None);
        }
        let frame = self.pending.recv().await?;
        Self::change(frame)
    }

    /// [`DirWatch::next`] on a shared handle: a `Send + 'static` future.
    pub async fn next_owned(self: std::sync::Arc<Self>) -> Result<Option<WatchChange>> {
        self.next().await
    }

    /// The next change, waiting at most `timeout` (`Ok(None)`: none came, or the watch is closed).
    pub fn next_timeout(&self, timeout: Duration) -> Result<Option<WatchChange>> {
        if self.pending.is_finished() {
            return Ok(None);
        }
        match self.pending.wait_timeout(timeout)? {
            Some(frame) => Self::change(frame),
            None => Ok(None),
        }
    }

    fn change(frame: protocol::Frame) -> Result<Option<WatchChange>> {
        match frame.msg {
            Message::WatchEvent(e) => Ok(Some(WatchChange { kind: watch_kind_name(e.kind), path: e.path })),
            Message::Ok(()) => Ok(None),
            Message::Error(e) => Err(agent_error("Watch", e)),
            other => Err(SandboxError::Protocol(format!("expected WatchEvent, got {}", other.name()))),
        }
    }

    /// Stops the watch (changes already sent still arrive, then `next` gives `None`).
    pub fn close(&self) -> Result<()> {
        if self.pending.is_finished() || self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.pending.send(Message::Unwatch(()))
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl AgentClient {
    /// Watches guest directory `path` (its subdirectories too with `recursive`); returns once
    /// the guest watches it: every change from then on is reported. `ENOENT` / `ENOTDIR` with
    /// the path.
    pub fn watch(&self, path: &str, recursive: bool) -> Result<DirWatch> {
        guest_path(path)?;
        let pending = self.send(Message::Watch(protocol::Watch { path: path.into(), recursive }))?;
        match pending.wait(FS_STEP_TIMEOUT)?.msg {
            Message::WatchEvent(e) if e.kind == protocol::watch_kind::READY => {
                Ok(DirWatch { pending, closed: Default::default() })
            }
            Message::Error(e) => Err(agent_error("Watch", e)),
            other => Err(SandboxError::Protocol(format!("expected WatchEvent READY, got {}", other.name()))),
        }
    }

    fn one_shot(&self, msg: Message) -> Result<protocol::Frame> {
        self.request(msg, FS_STEP_TIMEOUT)
    }

    /// `stat` (`follow`: through a final symlink).
    pub fn stat(&self, path: &str, follow: bool) -> Result<FileStat> {
        guest_path(path)?;
        match self.one_shot(Message::Stat(Stat { path: path.into(), follow }))?.msg {
            Message::StatResult(StatResult { file_type, size, mode, uid, gid, mtime_ns, link_target }) => {
                Ok(FileStat {
                    file_type: file_type_name(file_type),
                    size,
                    mode: mode & 0o7777,
                    uid,
                    gid,
                    mtime_ns,
                    link_target,
                })
            }
            other => Err(SandboxError::Protocol(format!("expected StatResult, got {}", other.name()))),
        }
    }

    /// Whether something (a dangling symlink included) is at `path`.
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.stat(path, false) {
            Ok(_) => Ok(true),
            Err(SandboxError::Guest { code: "ENOENT" | "ENOTDIR", .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entries of a directory, sorted by name.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntryInfo>> {
        guest_path(path)?;
        let p = self.send(Message::ReadDir(ReadDir { path: path.into() }))?;
        let mut out = Vec::new();
        loop {
            let f = p.wait(FS_STEP_TIMEOUT)?;
            let last = f.is_final();
            match f.msg {
                Message::DirEntries(d) => {
                    out.extend(d.entries.into_iter().map(|DirEntry { name, file_type, size, mode, mtime_ns }| {
                        DirEntryInfo { name, file_type: file_type_name(file_type), size, mode: mode & 0o7777, mtime_ns }
                    }))
                }
                Message::Error(e) => return Err(agent_error("ReadDir", e)),
                other => return Err(SandboxError::Protocol(format!("expected DirEntries, got {}", other.name()))),
            }
            if last {
                return Ok(out);
            }
        }
    }

    /// `mkdir` (`parents`: `-p`, and an existing directory is fine). `mode` is set exactly.
    pub fn mkdir(&self, path: &str, mode: u32, parents: bool) -> Result<()> {
        guest_path(path)?;
        self.one_shot(Message::Mkdir(Mkdir { path: path.into(), mode, parents })).map(drop)
    }

    /// Removes a file, symlink or empty directory; with `recursive` a whole tree.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        guest_path(path)?;
        self.one_shot(Message::Remove(Remove { path: path.into(), recursive })).map(drop)
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        guest_path(from)?;
        guest_path(to)?;
        self.one_shot(Message::Rename(Rename { from: from.into(), to: to.into() })).map(drop)
    }

    /// Streams a guest file (`len`: at most that many bytes from `offset`).
    pub fn open_read(&self, path: &str, offset: u64, len: Option<u64>) -> Result<FileReadStream> {
        guest_path(path)?;
        let pending = self.send(Message::ReadFile(ReadFile { path: path.into(), offset, len, window: READ_WINDOW }))?;
        Ok(FileReadStream { pending, window: READ_WINDOW, consumed: 0, done: false })
    }

    /// A whole guest file in memory, at most [`DEFAULT_READ_MAX_BYTES`].
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.read_file_max(path, DEFAULT_READ_MAX_BYTES)
    }

    /// A whole guest file in memory; a longer one (or an endless one: `/dev/zero`) is
    /// `E_OUTPUT_LIMIT`. The agent is asked for one byte more than `max_bytes`, so the guest
    /// stops by itself; more than that from it is not taken either.
    pub fn read_file_max(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let mut s = self.open_read(path, 0, Some(max_bytes.saturating_add(1)))?;
        let mut out = Vec::new();
        while let Some(c) = s.read_chunk(FS_STEP_TIMEOUT)? {
            if out.len() as u64 + c.len() as u64 > max_bytes {
                return Err(SandboxError::OutputLimit(format!(
                    "{path} is longer than {max_bytes} bytes (maxBytes): read it with readStream(), or raise maxBytes"
                )));
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// Streams a guest file into `w`; returns the bytes copied.
    pub fn read_file_to(&self, path: &str, w: &mut impl Write) -> Result<u64> {
        let mut s = self.open_read(path, 0, None)?;
        let mut n = 0;
        while let Some(c) = s.read_chunk(FS_STEP_TIMEOUT)? {
            w.write_all(&c).map_err(|e| SandboxError::HostFile(format!("writing what was read from {path}: {e}")))?;
            n += c.len() as u64;
        }
        Ok(n)
    }

    /// Opens a guest file for writing (the agent has opened it when this returns).
    pub fn open_write(&self, path: &str, opts: WriteOptions) -> Result<FileWriteStream> {
        guest_path(path)?;
        let p = self.send(Message::WriteFile(WriteFile {
            path: path.into(),
            mode: opts.mode,
            append: opts.append,
            parents: opts.parents,
        }))?;
        FileWriteStream::open(p, FS_STEP_TIMEOUT)
    }

    pub fn write_file(&self, path: &str, data: &[u8], opts: WriteOptions) -> Result<()> {
        let mut s = self.open_write(path, opts)?;
        s.write(data)?;
        s.finish()
    }

    /// Writes a guest file from `r`; returns the bytes copied.
    pub fn write_file_from(&self, path: &str, r: &mut impl Read, opts: WriteOptions) -> Result<u64> {
        let mut s = self.open_write(path, opts)?;
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut n = 0;
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SandboxError::HostFile(format!("reading what to write to {path}: {e}"))),
            };
            s.write(&buf[..k])?;
            n += k as u64;
        }
        s.finish()?;
        Ok(n)
    }

    /// Copies a host file, directory tree or symlink to `guest` (which becomes it: a
    /// directory's contents end up under `guest`, merged with what is there). Missing parents
    /// of `guest` are created.
    pub fn copy_from_host(&self, host: &Path, guest: &str) -> Result<CopyStats> {
        guest_path(guest)?;
        let mut reader = TreeReader::open(host).map_err(host_err)?;
        let p = self.send(Message::WriteTree(WriteTree { path: guest.into(), parents: true }))?;
        let mut s = FileWriteStream::open(p, FS_STEP_TIMEOUT)?;
        let mut buf = Vec::with_capacity(WRITE_CHUNK);
        loop {
            buf.clear();
            let done = reader.fill(&mut buf, WRITE_CHUNK).map_err(host_err)?;
            s.write(&buf)?;
            if done {
                break;
            }
        }
        s.finish()?;
        Ok(CopyStats { entries: reader.entries, bytes: reader.bytes })
    }

    /// Copies a guest file, directory tree or symlink to `host` (which becomes it). Missing
    /// parents of `host` are created. Nothing is written outside `host` (`protocol::tree_fs`
    /// says how); `opts` bounds the data and says whether setuid bits stay.
    pub fn copy_to_host(&self, guest: &str, host: &Path, opts: CopyToHostOptions) -> Result<CopyStats> {
        guest_path(guest)?;
        let wopts = WriterOptions { parents: true, keep_setuid: opts.keep_setuid, max_bytes: Some(opts.max_bytes) };
        let mut w = TreeWriter::with_options(host, wopts).map_err(host_err)?;
        let p = self.send(Message::ReadTree(ReadTree { path: guest.into(), window: READ_WINDOW }))?;
        let mut s = FileReadStream { pending: p, window: READ_WINDOW, consumed: 0, done: false };
        while let Some(c) = s.read_chunk(FS_STEP_TIMEOUT)? {
            w.feed(&c).map_err(host_err)?;
        }
        w.finish().map_err(host_err)?;
        Ok(CopyStats { entries: w.entries, bytes: w.bytes })
    }
}
