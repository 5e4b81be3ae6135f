//! Measures create→Ready on an engine: `cargo run -p microcell-sandbox --example boot_p50 --
//! [runs] [auto|kvm|qemu] [memoryMib]` (defaults: 20, auto, 256). Prints each run and the
//! p50/p90/min/max. Needs the guest images (scripts/setup.sh).

use std::time::{Duration, Instant};

use sandbox::engine::EngineChoice;
use sandbox::{Sandbox, SandboxConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map_or(20, |a| a.parse().expect("runs: a number"));
    let engine: EngineChoice = args
        .next()
        .map_or(EngineChoice::Auto, |a| serde_json::from_str(&format!("\"{a}\"")).expect("engine: auto|kvm|qemu"));
    let memory_mib: u32 = args.next().map_or(256, |a| a.parse().expect("memoryMib: a number"));
    let mut ms = Vec::with_capacity(runs);
    let mut stop_ms = Vec::with_capacity(runs);
    let t = Instant::now();
    for i in 0..runs {
        let sb = Sandbox::create(SandboxConfig { engine, memory_mib, ..Default::default() })
            .unwrap_or_else(|e| panic!("run {i}: [{}] {e}", e.code()));
        let info = sb.info().clone();
        let ts = Instant::now();
        let exit = sb.stop(Duration::from_secs(10));
        stop_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        drop(sb);
        println!(
            "run {i:2}: ready {:7.1} ms ({}, kernel {}), stop {:5.1} ms ({exit})",
            info.boot_ms, info.engine, info.kernel_release, stop_ms[i]
        );
        if i == 0 {
            println!("engine {}: {} [{}]", info.engine, info.engine_detail, info.engine_reason);
        }
        ms.push(info.boot_ms);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    stop_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "create->Ready over {runs} runs: p50 {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms; stop p50 {:.1} ms; total {:.1} s",
        p(&ms, 0.5),
        p(&ms, 0.9),
        ms[0],
        ms[runs - 1],
        p(&stop_ms, 0.5),
        t.elapsed().as_secs_f64()
    );
}
