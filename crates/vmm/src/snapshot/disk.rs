//! Copy-on-write copies of disk images: a reflink where the filesystem supports it (instant,
//! shares blocks), else a sparse copy of the data ranges only.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// FICLONE from linux/fs.h: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

pub fn clone_file(src: &Path, dst: &Path) -> std::io::Result<u64> {
    let mut to = OpenOptions::new().write(true).create(true).truncate(true).open(dst)?;
    clone_into(src, &mut to)
}

/// Copies `src` to a new file `dst` (it must not exist; created private, 0600) as cheaply as the
/// filesystem allows; returns whether it was a reflink.
pub fn clone_new(src: &Path, dst: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = File::open(src)?;
    let mut to = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst)?;
    copy(&from, &mut to)
}

/// `clone_file` into an open, empty file.
pub fn clone_into(src: &Path, to: &mut File) -> std::io::Result<u64> {
    copy_into(&File::open(src)?, to)
}

/// Copies an open file into an open, empty one: a reflink where the filesystem can, else its
/// data ranges (holes stay holes). Positioned reads only, so `from` may be an fd shared with
/// other threads (a snapshot's memory file, dup'd into each VM restored from it).
pub fn copy_into(from: &File, to: &mut File) -> std::io::Result<u64> {
    copy(from, to)?;
    Ok(from.metadata()?.len())
}

/// The one copy routine: reflink, else data ranges; returns whether it was a reflink.
fn copy(from: &File, to: &mut File) -> std::io::Result<bool> {
    let len = from.metadata()?.len();
    // SAFETY: both fds are open for the duration of the call; FICLONE only reads the int arg.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(true);
    }
    to.set_len(len)?;
    let mut buf = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: plain lseek on an open fd (each call returns its own result; the shared file
        // offset it moves is not used: reads and writes are positioned).
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                // No SEEK_DATA on this filesystem: copy the rest as it is.
                Some(libc::EINVAL) => {
                    copy_range(from, to, pos as u64, len, &mut buf)?;
                    break;
                }
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { (hole as u64).min(len) };
        copy_range(from, to, data as u64, end, &mut buf)?;
        pos = end as i64;
    }
    to.sync_all()?;
    Ok(false)
}

/// Copies `[at, end)` of `from` to the same offsets of `to`: copy_file_range (in the kernel),
/// else reads and writes. Neither moves a file offset.
fn copy_range(from: &File, to: &File, mut at: u64, end: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    while at < end {
        let (mut off_in, mut off_out) = (at as i64, at as i64);
        // SAFETY: both fds are open; the offsets are valid, writable i64s.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, (end - at) as usize, 0)
        };
        if n > 0 {
            at += n as u64;
            continue;
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => break, // read and write
            _ => return Err(e),
        }
    }
    buf.resize(1 << 20, 0);
    while at < end {
        let n = buf.len().min((end - at) as usize);
        from.read_exact_at(&mut buf[..n], at)?;
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = std::env::temp_dir().join(format!("mc-clone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut f = File::create(&a).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.seek(SeekFrom::Start((8 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        assert_eq!(clone_file(&a, &b).unwrap(), 8 << 20);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 <= 1 << 20, "the holes were filled in");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
