//! Copy-on-write copies of disk images: a reflink where the filesystem supports it (instant,
//! shares blocks), else a sparse copy of the data ranges only.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

/// FICLONE from linux/fs.h: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

pub fn clone_file(src: &Path, dst: &Path) -> std::io::Result<u64> {
    let mut to = OpenOptions::new().write(true).create(true).truncate(true).open(dst)?;
    clone_into(src, &mut to)
}

/// `clone_file` into an open, empty file.
pub fn clone_into(src: &Path, to: &mut File) -> std::io::Result<u64> {
    let mut from = File::open(src)?;
    let len = from.metadata()?.len();
    // SAFETY: both fds are open for the duration of the call; FICLONE only reads the int arg.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(len);
    }
    to.set_len(len)?;
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: plain lseek on an open fd.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        from.seek(SeekFrom::Start(data as u64))?;
        to.seek(SeekFrom::Start(data as u64))?;
        std::io::copy(&mut (&mut from).take((end - data) as u64), to)?;
        pos = end;
    }
    to.sync_all()?;
    Ok(len)
}



#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
