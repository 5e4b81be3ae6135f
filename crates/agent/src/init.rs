//! What the agent does as PID 1: file systems, hostname, the end of the VM.

use std::io;

use crate::sys;

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// `(source, target, fstype, flags, data)`, mounted in this order.
const MOUNTS: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
    ("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", NOSUID | NODEV | NOEXEC, ""),
    // The kernel mounts it already with CONFIG_DEVTMPFS_MOUNT (then this is EBUSY).
    ("devtmpfs", "/dev", "devtmpfs", NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", NOSUID | NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV, "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", NOSUID | NODEV, "mode=0755"),
];

/// Mounts the API file systems and sets up the rest of a minimal Linux userland; returns
/// the kernel command line (readable once /proc is there).
pub fn setup() -> Cmdline {
    for &(source, target, fstype, flags, data) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        match sys::mount(source, target, fstype, flags, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log!("mount {fstype} on {target}: {e}"),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    let cmdline = Cmdline::read();
    let hostname = cmdline
        .get("microcell.hostname")
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "microcell".to_owned());
    if let Err(e) = sys::sethostname(&hostname) {
        log!("sethostname {hostname}: {e}");
    }
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");
    if let Err(e) = sys::link_up("lo") {
        log!("loopback: {e}");
    }
    if let Some(net) = cmdline.get("microcell.net") {
        network(net);
    }
    if let Some(volumes) = cmdline.get("microcell.volumes") {
        mount_volumes(volumes);
    }
    cmdline
}

/// `microcell.volumes=TAG:PATH:rw|ro,...`: host directories the engine shares over virtio-9p,
/// mounted at PATH (made if missing). A failure is logged and the VM runs on without it.
fn mount_volumes(list: &str) {
    for entry in list.split(',') {
        let [tag, path, mode] = entry.split(':').collect::<Vec<_>>()[..] else {
            log!("microcell.volumes: {entry:?} is not TAG:PATH:rw|ro");
            continue;
        };
        let flags = if mode == "ro" { libc::MS_RDONLY } else { 0 };
        let _ = std::fs::create_dir_all(path);
        if let Err(e) = sys::mount(tag, path, "9p", flags, "trans=virtio,version=9p2000.L,msize=262144") {
            log!("volume {tag} on {path}: {e}");
        }
    }
}

/// `microcell.net=ADDR/PREFIX,GATEWAY,DNS`: the host gave the VM a network interface (`eth0`);
/// configured with the root disk's `ip` (busybox), `/etc/resolv.conf` written. A failure is
/// logged and the VM runs on without it.
fn network(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let [addr, gateway, dns] = parts[..] else {
        log!("microcell.net={spec}: expected ADDR/PREFIX,GATEWAY,DNS");
        return;
    };
    let steps: [&[&str]; 3] = [
        &["link", "set", "eth0", "up"],
        &["addr", "add", addr, "dev", "eth0"],
        &["route", "add", "default", "via", gateway],
    ];
    for args in steps {
        match std::process::Command::new("/bin/ip").args(args).status() {
            Ok(s) if s.success() => {}
            Ok(s) => return log!("ip {}: {s}", args.join(" ")),
            Err(e) => return log!("ip {}: {e}", args.join(" ")),
        }
    }
    if let Err(e) = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n")) {
        log!("/etc/resolv.conf: {e}");
    }
    // Ask for the gateway once: the host's network learns our MAC from it (passt sends to the
    // guest's learned address; until then a forwarded connection would reach nobody, and a guest
    // without outbound access may never send anything else), and our ARP cache gets the gateway.
    let ip = addr.split('/').next().unwrap_or(addr);
    match std::process::Command::new("/bin/arping")
        .args(["-q", "-f", "-c", "1", "-w", "1", "-I", "eth0", "-s", ip, gateway])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => log!("arping {gateway}: {s} (no answer from the host's network)"),
        Err(e) => log!("arping {gateway}: {e}"),
    }
}

/// The kernel command line, as `key=value` words.
#[derive(Default, Debug, Clone)]
pub struct Cmdline(Vec<(String, String)>);

impl Cmdline {
    pub fn read() -> Cmdline {
        Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    pub fn parse(s: &str) -> Cmdline {
        Cmdline(
            s.split_whitespace()
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (w.to_owned(), String::new()),
                })
                .collect(),
        )
    }

    /// The value of the last `key=...` word.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Ends the VM: sync, then reboot(2). Never returns.
///
/// The agent restarts rather than powers off: a microVM without ACPI has no power-off
/// device (with `RB_POWER_OFF` such a kernel turns it into a halt and the VM hangs), while
/// a reset ends the VM under both engines (`-no-reboot` in QEMU; the i8042 reset or the
/// triple fault in the microcell VMM). Boot with `reboot=t` (triple fault): QEMU's microvm
/// has no i8042, and `reboot=k` then takes ~1.2 s of fallbacks before it gets there.
pub fn power_off() -> ! {
    sys::sync();
    let e = sys::reboot(libc::RB_AUTOBOOT);
    log!("reboot: {e}");
    loop {
        // SAFETY: plain syscall.
        unsafe { libc::pause() };
    }
}

/// As PID 1 an agent panic must end the VM (the host then sees it) instead of leaving a
/// guest without an agent (or, by exiting, a kernel panic).
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        log!("panic: powering off");
        power_off();
    }));
}

/// Whether `e` is an error worth retrying a device open for.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO | libc::ENODEV | libc::EBUSY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parsing() {
        let c = Cmdline::parse(
            "console=ttyS0 root=/dev/vda rw microcell.channel=/dev/hvc1 quiet microcell.channel=/dev/x\n",
        );
        assert_eq!(c.get("root"), Some("/dev/vda"));
        assert_eq!(c.get("rw"), Some(""));
        assert_eq!(c.get("microcell.channel"), Some("/dev/x"));
        assert_eq!(c.get("nope"), None);
    }
}
