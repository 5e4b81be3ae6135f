//! T2: sandbox snapshots on the QEMU engine (migration to a file): a running sandbox is
//! snapshotted, restored twice, and each clone's agent answers on its own channel while the
//! original runs on. (State checks through exec are added with the exec API.)

mod common;

use std::time::Duration;

use common::*;
use sandbox::engine::{EngineChoice, EngineKind};
use sandbox::{Sandbox, SandboxRestoreOptions};

#[test]
fn t2_snapshot_restore_twice() {
    let _g = serial();
    require_qemu();
    images();
    let dir = tempfile::tempdir().unwrap();
    let original = Sandbox::create(config(EngineChoice::Qemu)).expect("boots");
    let t = std::time::Instant::now();
    original.snapshot(dir.path()).expect("snapshot");
    println!("snapshot took {:?}", t.elapsed());
    for f in ["qemu.mig", "rootfs.img", "sandbox.json"] {
        assert!(dir.path().join(f).is_file(), "{f} in the snapshot directory");
    }
    original.ping(Duration::from_secs(5)).expect("the original runs on after its snapshot");

    let clones: Vec<Sandbox> = (0..2)
        .map(|_| Sandbox::restore(dir.path(), SandboxRestoreOptions::default()).expect("restores"))
        .collect();
    for c in &clones {
        println!("restore took {:.1} ms", c.info().boot_ms);
        assert_eq!(c.info().engine, EngineKind::Qemu);
        assert_eq!(c.info().kernel_release, original.info().kernel_release);
        c.ping(Duration::from_secs(5)).expect("a clone's agent answers");
    }
    assert_ne!(clones[0].info().pid, clones[1].info().pid, "each clone is its own QEMU");
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
