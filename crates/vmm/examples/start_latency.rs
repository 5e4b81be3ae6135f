//! Starts a guest N times in one process and prints start→running and start→first I/O
//! percentiles: `cargo run --release -p microcell-vmm --example start_latency -- KERNEL [N] [MEM_MIB]`.

use std::time::Duration;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kernel = args.get(1).expect("usage: start_latency KERNEL [N] [MEM_MIB]");
    let n: usize = args.get(2).map_or(50, |v| v.parse().unwrap());
    let config = vmm::VmConfig {
        vcpus: 1,
        memory_mib: args.get(3).map_or(256, |v| v.parse().unwrap()),
        kernel: kernel.into(),
        cmdline: "console=ttyS0".into(),
        ..Default::default()
    };
    let (mut running, mut first) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let vm = vmm::Vm::start(&config, Box::new(std::io::sink())).expect("start");
        while vm.timings().first_exit_ns.is_none() && vm.try_exit().is_none() {
            std::hint::spin_loop();
        }
        let t = vm.timings();
        running.push((t.running_ns - t.start_ns) as f64 / 1e6);
        first.push((t.first_exit_ns.expect("guest did I/O") - t.start_ns) as f64 / 1e6);
        vm.kill();
        vm.wait_timeout(Duration::from_secs(5)).expect("VM ends");
    }
    println!("n={n} start->running p50 {:.3} ms p90 {:.3} ms", pct(&mut running, 0.5), pct(&mut running, 0.9));
    println!("n={n} start->first I/O p50 {:.3} ms p90 {:.3} ms", pct(&mut first, 0.5), pct(&mut first, 0.9));
}
