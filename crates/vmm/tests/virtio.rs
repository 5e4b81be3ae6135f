//! T1 for the virtio devices: the virtio test guest (crates/testguest, guest/virtio.c) drives
//! our virtio-mmio transport, virtio-blk and virtio-console with its own interrupt-driven driver
//! (IOAPIC, LAPIC, used rings) on /dev/kvm, PVM included. The host side writes a greeting on the
//! control channel at once, echoes what the guest sends (XOR 0x5a), and checks what the guest
//! cannot: what landed in the disk images, and what crossed the channel.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_kvm, Capture};
use testguest::{virtio_blk_pattern, virtio_cmdline, Report, VIRTIO_ECHO_XOR, VIRTIO_GREETING, VIRTIO_WRITTEN_SECTORS};
use vmm::{BlockDeviceConfig, ExitReason, Vm, VmConfig};

/// Deterministic, non-repeating-looking content (an LCG), `sectors` * 512 bytes.
fn image_content(sectors: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..sectors * 512)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// A temporary file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str, content: &[u8]) -> TempImage {
        let path = std::env::temp_dir().join(format!("mc-virtio-{}-{tag}.img", std::process::id()));
        std::fs::write(&path, content).unwrap();
        TempImage(path)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

/// Echoes the control channel back with every byte XOR VIRTIO_ECHO_XOR until the VM closes its
/// end; keeps everything that arrived.
fn echo(mut channel: UnixStream, received: Arc<Mutex<Vec<u8>>>) {
    channel.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = match channel.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        received.lock().unwrap().extend_from_slice(&buf[..n]);
        let reply: Vec<u8> = buf[..n].iter().map(|b| b ^ VIRTIO_ECHO_XOR).collect();
        if channel.write_all(&reply).is_err() {
            return;
        }
    }
}

#[test]
#[ignore = "T1: needs /dev/kvm; scripts/test.sh runs it (--include-ignored) where /dev/kvm works"]
fn virtio_guest_drives_blk_and_console_with_interrupts() {
    require_kvm();
    let rw_content = image_content(256, 1); // 128 KiB
    let ro_content = image_content(100, 2); // 50 KiB
    let rw = TempImage::new("rw", &rw_content);
    let ro = TempImage::new("ro", &ro_content);
    let cmdline = virtio_cmdline(&[(&rw_content, false), (&ro_content, true)], 1);
    let config = VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: testguest::path(testguest::VIRTIO),
        cmdline: cmdline.clone(),
        block_devices: vec![
            BlockDeviceConfig { path: rw.0.clone(), read_only: false },
            BlockDeviceConfig { path: ro.0.clone(), read_only: true },
        ],
        control_channel: true,
        ..Default::default()
    };

    let t = Instant::now();
    let console = Capture::default();
    let vm = Vm::start(&config, Box::new(console.clone())).expect("VM starts");
    let mut channel = vm.take_channel().expect("control channel");
    // Before the guest has a driver, let alone receive buffers: the device must hold it back.
    channel.write_all(VIRTIO_GREETING).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let echo_thread = {
        let received = received.clone();
        std::thread::spawn(move || echo(channel, received))
    };
    let reason = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        vm.kill();
        panic!("guest did not end within 60 s; console:\n{}", console.text())
    });
    let elapsed = t.elapsed();
    drop(vm);
    // The device end of the channel closes with the VM: the echo thread sees EOF.
    echo_thread.join().unwrap();

    let out = console.text();
    let report = Report::parse(&out);
    // Shown with --nocapture: the report, interrupt counts included.
    print!("{out}");
    println!("virtio guest ran in {elapsed:?}, {} checks passed", report.passed.len());
    assert!(report.all_passed(), "failed: {:?}\nconsole:\n{out}", report.failed);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(report.guest.as_deref(), Some("virtio"));
    let seen = report.cmdline.as_deref().unwrap_or_default();
    assert!(
        seen.starts_with(&cmdline)
            && seen.ends_with(
                "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
            ),
        "command line as the guest read it: {seen}"
    );
    // Every device check ran (the set does not depend on what passes).
    for check in [
        "lapic.timer",
        "virtio.devices",
        "blk0.read",
        "blk0.batch",
        "blk0.write",
        "blk0.flush",
        "blk0.readback",
        "blk0.get_id",
        "blk0.read_past_end",
        "blk0.reinit",
        "blk0.interrupts",
        "blk1.features",
        "blk1.ro_write",
        "blk1.ro_unchanged",
        "blk1.get_id",
        "blk1.reinit",
        "blk1.interrupts",
        "con0.device_add",
        "con0.port_name",
        "con0.port_open",
        "con0.host_first",
        "con0.echo",
        "con0.echo_multi",
        "con0.interrupts",
        "interrupts.stray",
    ] {
        assert!(report.passed.iter().any(|c| c == check), "check {check} missing");
    }
    for dev in ["blk0", "blk1", "con0"] {
        let line = report.info.iter().find(|l| l.starts_with(&format!("irq {dev} "))).expect("interrupt counts");
        let count: u32 = line.split(' ').find_map(|w| w.strip_prefix("count=")?.parse().ok()).unwrap();
        assert!(count > 0, "{dev} took no interrupts: {line}");
    }

    // The writable image: the guest's pattern in its last sectors, everything else as it was.
    let after = std::fs::read(&rw.0).unwrap();
    assert_eq!(after.len(), rw_content.len());
    let sectors = rw_content.len() / 512;
    let first = sectors - VIRTIO_WRITTEN_SECTORS;
    assert!(after[..first * 512] == rw_content[..first * 512], "the guest changed sectors it did not write");
    for s in first..sectors {
        for i in 0..512 {
            assert_eq!(after[s * 512 + i], virtio_blk_pattern(s as u64, i), "sector {s} byte {i}");
        }
    }
    // The read-only image: byte for byte unchanged.
    assert!(std::fs::read(&ro.0).unwrap() == ro_content, "the read-only image changed");

    // The control channel carried both echo rounds, nothing else.
    let mut sent: Vec<u8> = (0..=255u8).collect();
    sent.extend_from_slice(b"ping\n");
    sent.extend((0..6000u32).map(|i| (i * 131 + (i >> 8) + 1) as u8));
    assert!(*received.lock().unwrap() == sent, "bytes on the channel differ from what the guest sent");
}
