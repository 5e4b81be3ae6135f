//! Files in a sandbox: one-shot operations (`fsStat`, `fsExists`, `fsList`, `fsMkdir`,
//! `fsRemove`, `fsRename`, `fsRead`, `fsWrite`), file streams (`fsOpenRead` → `NativeFileReader`,
//! `fsOpenWrite` → `NativeFileWriter`) and host ⇄ guest copies of files and trees. No logic: each
//! call is one `sandbox::Sandbox` / stream call.
//!
//! - Every agent wait has a deadline (`sandbox::fs::FS_STEP_TIMEOUT` per step), so the calls that
//!   wait run on tokio's blocking pool; a reader's `readChunk()` is a future the channel's reader
//!   thread wakes (no thread waits), and credit goes back to the agent only as chunks are taken.
//! - Guest OS errors reject with the errno's name as the code (`ENOENT`, `EACCES`, `EISDIR`,
//!   `ENOTDIR`, `EEXIST`, `ENOTEMPTY`, ...) and the guest path in the message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use sandbox::{FileReadStream, FileWriteStream, WriteOptions};

use super::coded;
use crate::sandboxes::NativeSandbox;
use crate::tasks::{blocking, drop_off_thread, sandbox_error, whole};

/// `stat` of a guest path.
#[napi(object)]
pub struct GuestStat {
    /// `file` | `dir` | `symlink` | `other`
    #[napi(js_name = "type")]
    pub kind: String,
    pub size: f64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, milliseconds since the epoch (fractional).
    pub mtime_ms: f64,
    /// Where a symlink points.
    pub link_target: Option<String>,
}

/// One directory entry (from `lstat`: a symlink is `symlink`).
#[napi(object)]
pub struct GuestDirEntry {
    pub name: String,
    #[napi(js_name = "type")]
    pub kind: String,
    pub size: f64,
    pub mode: u32,
    pub mtime_ms: f64,
}

/// What a copy moved.
#[napi(object)]
pub struct CopyInfo {
    /// Files, directories and symlinks.
    pub entries: f64,
    /// File content bytes.
    pub bytes: f64,
}

fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

fn copy_info(s: sandbox::CopyStats) -> CopyInfo {
    CopyInfo { entries: s.entries as f64, bytes: s.bytes as f64 }
}

fn write_options(mode: Option<u32>, append: Option<bool>, parents: Option<bool>) -> Result<WriteOptions> {
    if let Some(m) = mode {
        if m > 0o7777 {
            return Err(coded("E_INVALID_ARGUMENT", format!("mode is {m:#o}: give permission bits from 0 to 0o7777")));
        }
    }
    Ok(WriteOptions { mode, append: append.unwrap_or(false), parents: parents.unwrap_or(false) })
}

/// One change under a watched guest directory.
#[napi(object)]
pub struct WatchChangeInfo {
    /// `create` | `write` | `remove` | `rename` | `chmod` | `overflow`
    pub kind: String,
    pub path: String,
}

#[napi]
impl NativeSandbox {
    /// Watches a guest directory (`recursive`: its subdirectories too); resolves once the guest
    /// watches it. `ENOENT` / `ENOTDIR` with the path.
    #[napi]
    pub async fn fs_watch(&self, path: String, recursive: bool) -> Result<NativeWatch> {
        let sb = self.sandbox()?;
        let watch = blocking("fs watch", move || sb.watch(&path, recursive).map_err(sandbox_error)).await?;
        Ok(NativeWatch { watch: Some(Arc::new(watch)) })
    }

    /// `stat` (`follow`: through a final symlink).
    #[napi]
    pub async fn fs_stat(&self, path: String, follow: bool) -> Result<GuestStat> {
        let sb = self.sandbox()?;
        let s = blocking("fs stat", move || sb.stat(&path, follow).map_err(sandbox_error)).await?;
        Ok(GuestStat {
            kind: s.file_type.into(),
            size: s.size as f64,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            mtime_ms: ms(s.mtime_ns),
            link_target: s.link_target,
        })
    }

    /// Whether something (a dangling symlink included) is at `path`.
    #[napi]
    pub async fn fs_exists(&self, path: String) -> Result<bool> {
        let sb = self.sandbox()?;
        blocking("fs exists", move || sb.exists(&path).map_err(sandbox_error)).await
    }

    /// The entries of a directory, sorted by name.
    #[napi]
    pub async fn fs_list(&self, path: String) -> Result<Vec<GuestDirEntry>> {
        let sb = self.sandbox()?;
        let entries = blocking("fs list", move || sb.list_dir(&path).map_err(sandbox_error)).await?;
        Ok(entries
            .into_iter()
            .map(|e| GuestDirEntry {
                name: e.name,
                kind: e.file_type.into(),
                size: e.size as f64,
                mode: e.mode,
                mtime_ms: ms(e.mtime_ns),
            })
            .collect())
    }

    /// `mkdir` with `mode` set exactly (`parents`: `-p`; an existing directory is fine then).
    #[napi]
    pub async fn fs_mkdir(&self, path: String, mode: u32, parents: bool) -> Result<()> {
        let sb = self.sandbox()?;
        blocking("fs mkdir", move || sb.mkdir(&path, mode, parents).map_err(sandbox_error)).await
    }

    /// Removes a file, symlink or empty directory; with `recursive` a whole tree.
    #[napi]
    pub async fn fs_remove(&self, path: String, recursive: bool) -> Result<()> {
        let sb = self.sandbox()?;
        blocking("fs remove", move || sb.remove(&path, recursive).map_err(sandbox_error)).await
    }

    #[napi]
    pub async fn fs_rename(&self, from: String, to: String) -> Result<()> {
        let sb = self.sandbox()?;
        blocking("fs rename", move || sb.rename(&from, &to).map_err(sandbox_error)).await
    }

    /// A whole guest file. `maxBytes` (default 64 MiB): a longer (or endless) file rejects
    /// with `E_OUTPUT_LIMIT`; the guest sends at most one byte more.
    #[napi]
    pub async fn fs_read(&self, path: String, max_bytes: Option<f64>) -> Result<Buffer> {
        let sb = self.sandbox()?;
        let max = max_bytes.map(|n| whole("maxBytes", n)).transpose()?.unwrap_or(sandbox::fs::DEFAULT_READ_MAX_BYTES);
        let data = blocking("fs read", move || sb.read_file_max(&path, max).map_err(sandbox_error)).await?;
        Ok(data.into())
    }

    /// Writes a whole guest file (`mode` set exactly; default 0o644 for a new file, an existing
    /// one keeps its own; `append`; `parents`: create missing directories).
    #[napi]
    pub async fn fs_write(
        &self,
        path: String,
        data: Buffer,
        mode: Option<u32>,
        append: Option<bool>,
        parents: Option<bool>,
    ) -> Result<()> {
        let sb = self.sandbox()?;
        let opts = write_options(mode, append, parents)?;
        let data = data.to_vec();
        blocking("fs write", move || sb.write_file(&path, &data, opts).map_err(sandbox_error)).await
    }

    /// Opens a guest file for reading (`length`: at most that many bytes from `offset`).
    /// Errors (a missing file, ...) come with the first `readChunk()`.
    #[napi]
    pub async fn fs_open_read(
        &self,
        path: String,
        offset: Option<f64>,
        length: Option<f64>,
    ) -> Result<NativeFileReader> {
        let sb = self.sandbox()?;
        let offset = whole("start", offset.unwrap_or(0.0))?;
        let length = length.map(|n| whole("length", n)).transpose()?;
        // Sends one frame (no wait for an answer, but the send may wait for room).
        let stream =
            blocking("fs open read", move || sb.open_read(&path, offset, length).map_err(sandbox_error)).await?;
        Ok(NativeFileReader { stream: Arc::new(Mutex::new(Some(stream))) })
    }

    /// Opens a guest file for writing; resolves once the agent has opened it.
    #[napi]
    pub async fn fs_open_write(
        &self,
        path: String,
        mode: Option<u32>,
        append: Option<bool>,
        parents: Option<bool>,
    ) -> Result<NativeFileWriter> {
        let sb = self.sandbox()?;
        let opts = write_options(mode, append, parents)?;
        let stream = blocking("fs open write", move || sb.open_write(&path, opts).map_err(sandbox_error)).await?;
        Ok(NativeFileWriter { stream: Arc::new(Mutex::new(Some(stream))) })
    }

    /// Copies a host file, directory tree or symlink to `guest` (modes, mtimes and symlinks
    /// kept; missing parents created).
    #[napi]
    pub async fn fs_copy_from_host(&self, host: String, guest: String) -> Result<CopyInfo> {
        let sb = self.sandbox()?;
        let host = PathBuf::from(host);
        blocking("fs copy from host", move || sb.copy_from_host(&host, &guest).map(copy_info).map_err(sandbox_error))
            .await
    }

    /// Copies a guest file, directory tree or symlink to `host` (nothing is written outside it).
    /// `keepSetuid`: keep setuid/setgid bits (dropped by default). `maxBytes` (default 1 GiB):
    /// the most file data written (holes stay holes and do not count; 512 bytes per entry
    /// more); beyond it the copy stops with `E_OUTPUT_LIMIT` and the file being written is
    /// removed.
    #[napi]
    pub async fn fs_copy_to_host(
        &self,
        guest: String,
        host: String,
        keep_setuid: Option<bool>,
        max_bytes: Option<f64>,
    ) -> Result<CopyInfo> {
        let sb = self.sandbox()?;
        let host = PathBuf::from(host);
        let opts = sandbox::CopyToHostOptions {
            keep_setuid: keep_setuid.unwrap_or(false),
            max_bytes: max_bytes
                .map(|n| whole("maxBytes", n))
                .transpose()?
                .unwrap_or(sandbox::fs::DEFAULT_COPY_MAX_BYTES),
        };
        blocking("fs copy to host", move || sb.copy_to_host(&guest, &host, opts).map(copy_info).map_err(sandbox_error))
            .await
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn busy() -> Error {
    coded("E_INVALID_ARGUMENT", "one call at a time: the previous read or write of this stream has not settled")
}

/// A watch on a guest directory. Made by `NativeSandbox.fsWatch`; dropping it (GC) stops it.
#[napi]
pub struct NativeWatch {
    /// `None` only while being dropped.
    watch: Option<Arc<sandbox::fs::DirWatch>>,
}

#[napi]
impl NativeWatch {
    /// The next change, or null once the watch is closed.
    #[napi]
    pub async fn next(&self) -> Result<Option<WatchChangeInfo>> {
        let w = self.watch.clone().ok_or_else(busy)?;
        let change = w.next_owned().await.map_err(sandbox_error)?;
        Ok(change.map(|c| WatchChangeInfo { kind: c.kind.into(), path: c.path }))
    }

    /// Stops the watch: `next()` gives the changes already sent, then null.
    #[napi]
    pub fn close(&self) -> Result<()> {
        match &self.watch {
            Some(w) => w.close().map_err(sandbox_error),
            None => Ok(()),
        }
    }
}

impl Drop for NativeWatch {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            drop_off_thread(w);
        }
    }
}

/// A guest file being read. Made by `NativeSandbox.fsOpenRead`.
#[napi]
pub struct NativeFileReader {
    /// Taken out while a read is in flight.
    stream: Arc<Mutex<Option<FileReadStream>>>,
}

#[napi]
impl NativeFileReader {
    /// The next chunk, or null at the end of the file. Credit goes back to the agent as chunks
    /// are taken: not calling this stops the transfer. One call at a time.
    #[napi]
    pub async fn read_chunk(&self) -> Result<Option<Buffer>> {
        let slot = self.stream.clone();
        let mut stream = lock(&slot).take().ok_or_else(busy)?;
        let r = stream.next_chunk().await;
        *lock(&slot) = Some(stream);
        Ok(r.map_err(sandbox_error)?.map(Buffer::from))
    }
}

impl Drop for NativeFileReader {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.stream).take() {
            drop_off_thread(s);
        }
    }
}

/// A guest file being written. Made by `NativeSandbox.fsOpenWrite`.
#[napi]
pub struct NativeFileWriter {
    stream: Arc<Mutex<Option<FileWriteStream>>>,
}

#[napi]
impl NativeFileWriter {
    /// Sends `data` (within the agent's window; waits for credit, at most 60 s a step). One
    /// call at a time.
    #[napi]
    pub async fn write(&self, data: Buffer) -> Result<()> {
        let slot = self.stream.clone();
        let data = data.to_vec();
        blocking("fs stream write", move || {
            let mut stream = lock(&slot).take().ok_or_else(busy)?;
            let r = stream.write(&data);
            *lock(&slot) = Some(stream);
            r.map_err(sandbox_error)
        })
        .await
    }

    /// Ends the file and resolves once the agent has closed it (its error otherwise).
    #[napi]
    pub async fn finish(&self) -> Result<()> {
        let slot = self.stream.clone();
        blocking("fs stream finish", move || {
            let stream = lock(&slot)
                .take()
                .ok_or_else(|| coded("E_INVALID_ARGUMENT", "the write stream is finished (or a write is in flight)"))?;
            stream.finish().map_err(sandbox_error)
        })
        .await
    }
}

impl Drop for NativeFileWriter {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.stream).take() {
            // An abandoned write: its drop ends the stream (whatever was written stays).
            drop_off_thread(s);
        }
    }
}
