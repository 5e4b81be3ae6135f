//! The control channel: where it is and how bytes move on it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::init::{is_transient, Cmdline};

/// The virtio-serial port name the host gives the agent's port.
pub const PORT_NAME: &str = "agent";
/// Used when no port is named `agent` (a plain second virtio console).
pub const FALLBACK: &str = "/dev/hvc1";
/// How long to wait for the channel to appear before giving up.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Named ports show up a moment after their device: wait this long for a name before
/// taking the fallback.
const NAME_GRACE: Duration = Duration::from_millis(500);

/// A bidirectional byte stream to the host: one fd (a device or a socket) or two (stdio).
pub struct Channel {
    read: File,
    write: File,
    pub description: String,
}

impl Channel {
    /// Takes ownership of `fd` for both directions.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else owns.
    pub unsafe fn from_fd(fd: RawFd, description: String) -> io::Result<Channel> {
        // Processes the agent starts must not inherit the channel.
        // SAFETY: fcntl on the descriptor the caller handed over.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ownership of fd is passed in by the caller.
        let read = unsafe { File::from_raw_fd(fd) };
        let write = read.try_clone()?;
        Ok(Channel { read, write, description })
    }

    /// Stdin for reading, stdout for writing.
    pub fn stdio() -> io::Result<Channel> {
        // SAFETY: dup'ed descriptors are owned by the Files.
        unsafe {
            let r = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
            let w = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
            if r < 0 || w < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Channel { read: File::from_raw_fd(r), write: File::from_raw_fd(w), description: "stdio".into() })
        }
    }

    pub fn open(path: &Path) -> io::Result<Channel> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Channel { write: f.try_clone()?, read: f, description: path.display().to_string() })
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Both directions non-blocking (the main loop polls; nothing waits on the host).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        crate::sys::set_nonblocking(self.read_fd())?;
        crate::sys::set_nonblocking(self.write_fd())
    }

    /// One read(2); `Ok(0)` is end of stream (for a virtio port: no host connected).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match io::Read::read(&mut self.read, buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// Finds the control channel of a guest, waiting for it to appear:
/// 1. `microcell.channel=<path>` on the kernel command line;
/// 2. the virtio-serial port named `agent` (`/sys/class/virtio-ports/vportNpM/name`),
///    opened as `/dev/vportNpM`;
/// 3. [`FALLBACK`], `/dev/hvc1`, once no port got that name within [`NAME_GRACE`].
pub fn discover(cmdline: &Cmdline) -> io::Result<PathBuf> {
    discover_in(
        Path::new("/sys/class/virtio-ports"),
        Path::new("/dev"),
        cmdline.get("microcell.channel").map(PathBuf::from),
    )
}

fn discover_in(ports: &Path, dev: &Path, explicit: Option<PathBuf>) -> io::Result<PathBuf> {
    let start = Instant::now();
    let mut said = false;
    loop {
        if let Some(p) = &explicit {
            if p.exists() {
                return Ok(p.clone());
            }
        } else {
            if let Some(p) = named_port(ports, dev) {
                return Ok(p);
            }
            let fallback = dev.join("hvc1");
            if start.elapsed() >= NAME_GRACE && fallback.exists() {
                return Ok(fallback);
            }
        }
        if start.elapsed() >= DISCOVERY_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                match &explicit {
                    Some(p) => format!("{} (from microcell.channel=) did not appear", p.display()),
                    None => format!("no virtio port named {PORT_NAME:?} and no {FALLBACK}"),
                },
            ));
        }
        if !said && start.elapsed() >= Duration::from_secs(1) {
            log!("still looking for the control channel…");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn named_port(ports: &Path, dev: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(ports).ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim_end_matches('\n') == PORT_NAME {
            let node = dev.join(entry.file_name());
            if node.exists() {
                return Some(node);
            }
        }
    }
    None
}

/// Opens the channel at `path`, retrying while the device node is not ready.
pub fn open_retrying(path: &Path) -> io::Result<Channel> {
    let start = Instant::now();
    loop {
        match Channel::open(path) {
            Err(e) if is_transient(&e) && start.elapsed() < DISCOVERY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("microcell-agent-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sys")).unwrap();
        std::fs::create_dir_all(d.join("dev")).unwrap();
        d
    }

    #[test]
    fn finds_the_port_named_agent() {
        let d = tmpdir("named");
        for (port, name) in [("vport0p0", ""), ("vport0p1", "other\n"), ("vport1p3", "agent\n")] {
            std::fs::create_dir_all(d.join("sys").join(port)).unwrap();
            std::fs::write(d.join("sys").join(port).join("name"), name).unwrap();
            std::fs::write(d.join("dev").join(port), "").unwrap();
        }
        std::fs::write(d.join("dev/hvc1"), "").unwrap();
        assert_eq!(discover_in(&d.join("sys"), &d.join("dev"), None).unwrap(), d.join("dev/vport1p3"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn falls_back_to_hvc1_and_honours_the_cmdline() {
        let d = tmpdir("fallback");
        std::fs::write(d.join("dev/hvc1"), "").unwrap();
        let t = Instant::now();
        assert_eq!(discover_in(&d.join("sys"), &d.join("dev"), None).unwrap(), d.join("dev/hvc1"));
        assert!(t.elapsed() >= NAME_GRACE);
        std::fs::write(d.join("dev/custom"), "").unwrap();
        assert_eq!(
            discover_in(&d.join("sys"), &d.join("dev"), Some(d.join("dev/custom"))).unwrap(),
            d.join("dev/custom")
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
