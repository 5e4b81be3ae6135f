//! Boots a kernel image and copies its serial console to stdout:
//! `cargo run -p microcell-vmm --example boot -- KERNEL [MEM_MIB] [VCPUS] [CMDLINE]`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(kernel) = args.get(1) else {
        eprintln!("usage: boot KERNEL [MEM_MIB] [VCPUS] [CMDLINE]");
        std::process::exit(2);
    };
    let config = vmm::VmConfig {
        vcpus: args.get(3).map_or(1, |v| v.parse().expect("VCPUS")),
        memory_mib: args.get(2).map_or(128, |v| v.parse().expect("MEM_MIB")),
        kernel: kernel.into(),
        initrd: None,
        cmdline: args.get(4).cloned().unwrap_or_else(|| vmm::DEFAULT_CMDLINE.into()),
        allow_unsupported_host: std::env::var_os("MICROCELL_ALLOW_UNSUPPORTED").is_some(),
        ..Default::default()
    };
    let vm = match vmm::Vm::start(&config, Box::new(std::io::stdout())) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("{}: {e}", e.code());
            std::process::exit(1);
        }
    };
    let reason = vm
        .wait_timeout(std::time::Duration::from_secs(
            std::env::var("BOOT_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(10),
        ))
        .unwrap_or_else(|| {
            vm.kill();
            vm.wait()
        });
    let t = vm.timings();
    eprintln!(
        "exit: {reason:?}; start->running {:.3} ms, start->first I/O {:?} ms",
        (t.running_ns - t.start_ns) as f64 / 1e6,
        t.first_exit_ns.map(|f| (f - t.start_ns) as f64 / 1e6)
    );
}
