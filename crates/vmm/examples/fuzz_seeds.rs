//! Writes the `snapshot_state` fuzz target's seeds: real state files of the spin test guest
//! (1 vCPU; 2 vCPUs with a control channel), each as a whole file (first byte odd) and as a
//! body (first byte even: the target frames it with a valid header and CRC). Run it after a
//! change of the state format, on a host whose /dev/kvm runs the test guests:
//! `cargo run -p microcell-vmm --example fuzz_seeds -- fuzz/corpus/snapshot_state`.

use std::path::Path;
use std::time::Duration;

/// magic (8), version (4), body length (8) before the body; CRC32 (4) after it.
const HEADER: usize = 20;
const TRAILER: usize = 4;

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: fuzz_seeds OUT_DIR");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    std::fs::create_dir_all(out).expect("the output directory");
    for (name, vcpus, control_channel) in [("spin-1cpu", 1, false), ("spin-2cpu-console", 2, true)] {
        let config = vmm::VmConfig {
            vcpus,
            memory_mib: 32,
            kernel: testguest::path(testguest::SPIN),
            control_channel,
            ..Default::default()
        };
        let vm = vmm::Vm::start(&config, Box::new(std::io::sink())).unwrap_or_else(|e| {
            eprintln!("{}: {e}", e.code());
            std::process::exit(1)
        });
        std::thread::sleep(Duration::from_millis(200)); // past the guest's banner: it spins
        let dir = std::env::temp_dir().join(format!("microcell-seed-{}-{name}", std::process::id()));
        vm.pause().expect("pause");
        vm.snapshot(&dir, false).expect("snapshot");
        vm.kill();
        let file = std::fs::read(dir.join(vmm::SNAPSHOT_STATE_FILE)).expect("the state file");
        std::fs::remove_dir_all(&dir).ok();
        let body = &file[HEADER..file.len() - TRAILER];
        std::fs::write(out.join(format!("seed-{name}-file")), [&[1u8][..], &file].concat()).unwrap();
        std::fs::write(out.join(format!("seed-{name}-body")), [&[0u8][..], body].concat()).unwrap();
        println!("seed-{name}: state file {} bytes", file.len());
    }
}
