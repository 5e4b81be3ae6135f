//! Boots the real guest (kernel + rootfs + agent as PID 1) under QEMU's microvm machine and
//! talks to the agent over the virtio-serial port named `agent`.
//!
//! Needs qemu-system-x86_64 and the cached kernel and rootfs: run it with
//! `scripts/guest/smoke-qemu.sh`, which builds those first. Paths can be given with
//! MICROCELL_KERNEL and MICROCELL_ROOTFS; MICROCELL_QEMU_ACCEL picks `tcg` (default) or `kvm`.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Conn;
use protocol::{features, Frame, Message};

fn cache() -> PathBuf {
    std::env::var_os("MICROCELL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/microcell"))
}

fn path_from(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The machine and kernel command line; MICROCELL_QEMU_MACHINE / MICROCELL_QEMU_APPEND override.
/// `rtc=on`: without a CMOS RTC the kernel spends ~1 s (TCG) polling for one at boot.
/// `reboot=t`: QEMU's microvm has no i8042, so `reboot=k` spends ~1.2 s in fallbacks
/// before the triple fault that ends the VM (with `-no-reboot`); see docs/guest.md.
const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off";
const APPEND: &str = "console=ttyS0 root=/dev/vda rw reboot=t panic=1";

#[test]
#[ignore = "boots a VM under QEMU: needs qemu-system-x86 and the guest kernel/rootfs; run scripts/guest/smoke-qemu.sh"]
fn qemu_boots_to_ready_and_powers_off() {
    let kernel = path_from("MICROCELL_KERNEL", cache().join("kernel-current/vmlinux"));
    let rootfs = path_from("MICROCELL_ROOTFS", cache().join("rootfs-current/rootfs.ext4"));
    let accel = std::env::var("MICROCELL_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    let machine = std::env::var("MICROCELL_QEMU_MACHINE").unwrap_or_else(|_| MACHINE.into());
    let append = std::env::var("MICROCELL_QEMU_APPEND").unwrap_or_else(|_| APPEND.into());
    assert!(kernel.exists(), "no kernel at {} (run scripts/guest/build-kernel.sh)", kernel.display());
    assert!(rootfs.exists(), "no rootfs at {} (run scripts/guest/build-rootfs.sh)", rootfs.display());

    let dir = std::env::temp_dir().join(format!("microcell-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let console = dir.join("console.log");

    let t0 = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", &machine])
        .args(["-accel", &accel, "-m", "256", "-smp", "1"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", &append])
        // snapshot=on: the guest's writes go to a throwaway overlay, the cached image stays as built.
        .arg("-drive")
        .arg(format!("if=none,id=d0,file={},format=raw,snapshot=on", rootfs.display()))
        .args(["-device", "virtio-blk-device,drive=d0", "-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("socket,id=ag,path={},server=on,wait=off", sock.display()))
        .args(["-device", "virtserialport,chardev=ag,name=agent", "-nographic", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");

    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("QEMU's socket {}: {e}", sock.display()),
        }
    };
    let t_connect = t0.elapsed();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut conn = Conn::new(stream.try_clone().unwrap(), stream);

    // The Hello waits in the socket until the agent opens its port.
    let ready = match conn.request(0, Conn::<UnixStream, UnixStream>::hello()).msg {
        Message::Ready(r) => r,
        other => {
            panic!("expected Ready, got {other:?}\nconsole:\n{}", std::fs::read_to_string(&console).unwrap_or_default())
        }
    };
    let t_ready = t0.elapsed();
    assert!(ready.kernel_release.starts_with("6.1."), "{ready:?}");
    assert_ne!(ready.features & features::INIT, 0, "the agent runs as PID 1");
    // microcell.hostname= on the cmdline wins over the image's /etc/hostname.
    let hostname = append.split_whitespace().filter_map(|w| w.strip_prefix("microcell.hostname=")).next_back();
    assert_eq!(ready.hostname, hostname.unwrap_or("microcell"));

    let tp = Instant::now();
    assert_eq!(conn.request(1, Message::Ping(7)), Frame::new(1, Message::Pong(7)));
    let ping = tp.elapsed();

    let tp = Instant::now();
    assert_eq!(conn.request(2, Message::Poweroff(())), Frame::new(2, Message::Ok(())).with_flags(protocol::FLAG_FINAL));
    let status = loop {
        if let Some(s) = qemu.try_wait().unwrap() {
            break s;
        }
        if tp.elapsed() > Duration::from_secs(60) {
            qemu.kill().unwrap();
            panic!("QEMU did not exit after Poweroff\nconsole:\n{}", std::fs::read_to_string(&console).unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let t_exit = tp.elapsed();
    let mut log = String::new();
    std::fs::File::open(&console).unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "QEMU exit status {status}\nconsole:\n{log}");
    assert!(
        log.contains(&format!("microcell-agent ready (kernel {})", ready.kernel_release)),
        "banner missing:\n{log}"
    );

    let report = format!(
        "accel={accel} machine={machine} append={append:?} kernel={} release={} socket_after_ms={} ready_after_ms={} guest_boot_ns_at_ready={} \
         agent_start_ns={} ping_us={} poweroff_to_exit_ms={}",
        kernel.display(),
        ready.kernel_release,
        t_connect.as_millis(),
        t_ready.as_millis(),
        ready.boot_ns,
        ready.agent_start_ns,
        ping.as_micros(),
        t_exit.as_millis()
    );
    println!("SMOKE {report}");
    if let Some(path) = std::env::var_os("MICROCELL_SMOKE_REPORT") {
        std::fs::write(path, format!("{report}\n--- console ---\n{log}")).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
