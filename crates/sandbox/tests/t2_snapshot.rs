//! T2: sandbox snapshots on the QEMU engine (migration to a file): a sandbox with state in
//! memory (tmpfs) and on its root disk is snapshotted and restored twice; both clones see the
//! state, diverge independently of each other and of the original, and do not hand out the
//! same random numbers.

mod common;

use std::time::Duration;

use common::*;
use sandbox::engine::{EngineChoice, EngineKind};
use sandbox::exec::ExecRequest;
use sandbox::{Sandbox, SandboxRestoreOptions};

fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb.exec_collect(&ExecRequest::shell(script), Some(Duration::from_secs(20))).expect("exec");
    assert_eq!(out.code(), Some(0), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout_str()
}

#[test]
fn t2_snapshot_restore_twice() {
    let _g = serial();
    require_qemu();
    images();
    let dir = tempfile::tempdir().unwrap();
    let original = Sandbox::create(config(EngineChoice::Qemu)).expect("boots");
    sh(&original, "echo in-memory > /tmp/mem.txt; echo on-disk > /root/disk.txt; sync");
    let t = std::time::Instant::now();
    original.snapshot(dir.path()).expect("snapshot");
    println!("snapshot took {:?}", t.elapsed());
    for f in ["qemu.mig", "rootfs.img", "sandbox.json"] {
        assert!(dir.path().join(f).is_file(), "{f} in the snapshot directory");
    }
    original.ping(Duration::from_secs(5)).expect("the original runs on after its snapshot");

    let clones: Vec<Sandbox> =
        (0..2).map(|_| Sandbox::restore(dir.path(), SandboxRestoreOptions::default()).expect("restores")).collect();
    for c in &clones {
        println!("restore took {:.1} ms", c.info().boot_ms);
        assert_eq!(c.info().engine, EngineKind::Qemu);
        assert_eq!(c.info().kernel_release, original.info().kernel_release);
        c.ping(Duration::from_secs(5)).expect("a clone's agent answers");
        assert_eq!(sh(c, "cat /tmp/mem.txt /root/disk.txt"), "in-memory\non-disk\n", "the clone sees the state");
    }
    assert_ne!(clones[0].info().pid, clones[1].info().pid, "each clone is its own QEMU");
    // Diverge: each writes its own values; nobody else sees them.
    for (i, c) in clones.iter().enumerate() {
        sh(c, &format!("echo clone{i} > /tmp/mem.txt; echo clone{i} > /root/disk.txt; sync"));
    }
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(sh(c, "cat /tmp/mem.txt /root/disk.txt"), format!("clone{i}\nclone{i}\n"));
    }
    assert_eq!(sh(&original, "cat /tmp/mem.txt /root/disk.txt"), "in-memory\non-disk\n", "the original is untouched");
    let random: Vec<String> = clones.iter().map(|c| sh(c, "od -An -tx1 -N16 /dev/urandom")).collect();
    assert_ne!(random[0], random[1], "two clones must not hand out the same random numbers");
    for c in &clones {
        c.stop(Duration::from_secs(5));
    }
    original.stop(Duration::from_secs(5));
}

#[test]
fn t2_restore_of_a_non_snapshot_is_a_coded_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Sandbox::restore(dir.path(), SandboxRestoreOptions::default()).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT");
    std::fs::write(dir.path().join("sandbox.json"), b"{ not json").unwrap();
    let e = Sandbox::restore(dir.path(), SandboxRestoreOptions::default()).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT");
    assert!(e.to_string().contains("damaged"), "{e}");
}

/// Waits until the console tail of `what` holds `needle`.
fn console_until(tail: impl Fn() -> String, needle: &str) -> String {
    let t = std::time::Instant::now();
    loop {
        let text = tail();
        if text.contains(needle) {
            return text;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no {needle:?} on the console:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn t2_workload_snapshot_restores_the_program_where_it_was() {
    use sandbox::workload::{spec_from_parts, Workload, WorkloadRestoreOptions};
    let _g = serial();
    require_qemu();
    images();
    let dir = tempfile::tempdir().unwrap();
    // ("ti""ck": the agent echoes the command line to the console; the program prints "tick")
    let script = "trap 'echo bye; exit 9' TERM; i=0; while :; do i=$((i+1)); echo ti\"\"ck$i; sleep 0.1; done";
    let spec = spec_from_parts("/bin/sh", &["-c".into(), script.into()], &[], None, &[]).unwrap();
    let original = Workload::start(&spec, config(EngineChoice::Qemu)).expect("boots");
    console_until(|| original.console_tail(), "tick5\n");
    original.snapshot(dir.path()).expect("snapshot");
    assert!(dir.path().join("sandbox.json").is_file());
    assert!(original.vm_exit().is_none(), "the original runs on");
    // Not a sandbox snapshot, and the other way round.
    let e = Sandbox::restore(dir.path(), SandboxRestoreOptions::default()).err().expect("refused");
    assert_eq!(e.code(), "E_SNAPSHOT", "{e}");

    let clone = Workload::restore(dir.path(), WorkloadRestoreOptions::default()).expect("restores");
    assert_eq!(clone.engine().kind, EngineKind::Qemu);
    let text = console_until(|| clone.console_tail(), "tick");
    // The clone's program goes on counting from where the snapshot was: its first tick is past 5.
    let first: u32 =
        text.lines().find_map(|l| l.trim().strip_prefix("tick").and_then(|n| n.parse().ok())).expect("a tick line");
    assert!(first > 5, "the clone started over at tick{first}:\n{text}");
    assert!(clone.signal(15).unwrap(), "the clone's agent answers a fresh handshake");
    let st = clone.wait().expect("the clone's status");
    assert_eq!((st.code, st.source), (Some(9), "channel"), "{st:?}\n{}", clone.console_tail());
    assert!(original.signal(15).unwrap());
    assert_eq!(original.wait().expect("status").code, Some(9));
    println!("workload clone restored; first tick {first}");
}
