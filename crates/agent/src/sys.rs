//! Thin safe wrappers over the few system calls the agent makes.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a path")
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Nanoseconds on `clock` (CLOCK_BOOTTIME, CLOCK_MONOTONIC, ...).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn set_realtime_ns(ns: u64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long };
    // SAFETY: valid pointer.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length of a live buffer.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// `(release, nodename)` from uname(2).
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.nodename))
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() }
}

/// reboot(2) with `cmd` (`RB_AUTOBOOT`, `RB_POWER_OFF`); returns only on failure.
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: plain syscall.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

pub fn getpid() -> i32 {
    // SAFETY: plain syscall.
    unsafe { libc::getpid() }
}

/// Blocks `signals` in this thread (and the threads it creates later) and returns a
/// signalfd that reports them.
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<RawFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        check(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()))?;
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        check(fd)?;
        Ok(fd)
    }
}

/// Drains a signalfd (the signals themselves carry nothing the agent needs).
pub fn drain_signalfd(fd: RawFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reading into a buffer of the right size.
    while unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) } == info.len() as isize {}
}

/// Reaps every child that has exited; returns `(pid, wait status)` pairs.
pub fn reap_all() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status));
    }
}

/// poll(2) on `fds` (`(fd, events)`); returns the `revents` in the same order.
pub fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|&(fd, events)| libc::pollfd { fd, events, revents: 0 }).collect();
    loop {
        // SAFETY: pointer and length of a live array.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(p.iter().map(|p| p.revents).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
