//! Exec and file-transfer overhead of the control protocol.
//!
//! ```text
//! cargo build --release -p microcell-agent
//! cargo run --release -p microcell-sandbox --example exec_bench -- [--agent PATH] [--n N] [--mib M] [--no-qemu]
//! ```
//! Part 1, the agent as a host process over a socketpair (the guest's code path minus the
//! virtio port): protocol-only round trip (Ping) p50, `exec true` p50 (spawn included), file
//! write/read and tree copy MB/s (files on /dev/shm, so the disk is not measured; default
//! 256 MiB: on a VM host, first touches of fresh memory make larger sizes measure the
//! hypervisor), and the channel alone (upload to /dev/null, download from /dev/zero).
//! Part 2, in a QEMU guest (TCG here): `exec true` p50 and a 256 MiB copy in and out.
//! Prints one line per measurement and a JSON object at the end.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandbox::agent_client::AgentClient;
use sandbox::exec::ExecRequest;
use sandbox::fs::WriteOptions;
use sandbox::{EngineChoice, Sandbox, SandboxConfig};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Args {
    agent: PathBuf,
    n: usize,
    mib: usize,
    qemu: bool,
}

fn args() -> Args {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/examples/exec_bench -> target/<profile>/microcell-agent
    let default_agent = exe.parent().and_then(|p| p.parent()).map(|p| p.join("microcell-agent")).unwrap_or_default();
    let mut a = Args { agent: default_agent, n: 2000, mib: 256, qemu: true };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--agent" => a.agent = it.next().expect("--agent PATH").into(),
            "--n" => a.n = it.next().expect("--n N").parse().unwrap(),
            "--mib" => a.mib = it.next().expect("--mib M").parse().unwrap(),
            "--no-qemu" => a.qemu = false,
            other => panic!("unknown argument {other:?}"),
        }
    }
    a
}

fn spawn_agent(path: &PathBuf) -> (std::process::Child, AgentClient) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(path);
    cmd.args(["--no-init", "--channel-fd", "3"]).stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run the agent {}: {e} (cargo build --release -p microcell-agent)", path.display())
    });
    drop(theirs);
    let client = AgentClient::new(ours).unwrap();
    client.handshake(Duration::from_secs(10)).unwrap();
    (child, client)
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    let a = args();
    let mut json = serde_json::Map::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("host load average: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    json.insert("loadavg".into(), load.split_whitespace().next().unwrap_or("").into());

    // ---- part 1: the agent as a host process ----
    let (mut child, c) = spawn_agent(&a.agent);
    for _ in 0..200 {
        c.ping(Duration::from_secs(5)).unwrap();
    }
    let mut rtt: Vec<f64> = (0..a.n * 5).map(|_| c.ping(Duration::from_secs(5)).unwrap().as_secs_f64() * 1e6).collect();
    let (p50, p90) = (pct(&mut rtt, 0.5), pct(&mut rtt, 0.9));
    println!("socketpair: protocol round trip (Ping) p50 {p50:.1} us, p90 {p90:.1} us ({} runs)", rtt.len());
    json.insert("socketpair_ping_p50_us".into(), p50.into());
    json.insert("socketpair_ping_p90_us".into(), p90.into());

    let t_req = ExecRequest::new(["/bin/true"]);
    for _ in 0..20 {
        c.exec_collect(&t_req, None).unwrap();
    }
    let n_exec = (a.n / 4).max(50);
    let mut ex: Vec<f64> = (0..n_exec)
        .map(|_| {
            let t = Instant::now();
            let out = c.exec_collect(&t_req, None).unwrap();
            assert_eq!(out.code(), Some(0));
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let (e50, e90) = (pct(&mut ex, 0.5), pct(&mut ex, 0.9));
    println!(
        "socketpair: exec /bin/true (start..exit, fork+exec included) p50 {e50:.0} us, p90 {e90:.0} us ({n_exec} runs)"
    );
    json.insert("socketpair_exec_true_p50_us".into(), e50.into());
    json.insert("socketpair_exec_true_p90_us".into(), e90.into());

    let dir = tempfile::Builder::new().prefix("exec-bench").tempdir_in("/dev/shm").unwrap();
    let bytes = a.mib << 20;
    let data: Vec<u8> = (0..bytes).map(|i| (i as u64).wrapping_mul(0x9e3779b97f4a7c15).to_le_bytes()[7]).collect();
    let gp = dir.path().join("f.bin");
    let gp = gp.to_str().unwrap();
    let copy_only = std::env::var_os("EXEC_BENCH_COPY_ONLY").is_some();
    if !copy_only {
        // One warm-up pass (page cache, allocator), then the measured ones.
        c.write_file(gp, &data[..bytes.min(64 << 20)], WriteOptions::default()).unwrap();
        let t = Instant::now();
        c.write_file(gp, &data, WriteOptions::default()).unwrap();
        let w = mbps(bytes, t.elapsed());
        let t = Instant::now();
        let mut s = c.open_read(gp, 0, None).unwrap();
        let mut n = 0;
        while let Some(chunk) = s.read_chunk(Duration::from_secs(30)).unwrap() {
            n += chunk.len();
        }
        let r = mbps(n, t.elapsed());
        assert_eq!(n, bytes);
        println!("socketpair: file write {w:.0} MB/s, read {r:.0} MB/s ({} MiB on /dev/shm)", a.mib);
        json.insert("socketpair_write_mbps".into(), w.into());
        json.insert("socketpair_read_mbps".into(), r.into());
        // The channel alone: upload into /dev/null, download from /dev/zero (no file system cost).
        let t = Instant::now();
        c.write_file("/dev/null", &data, WriteOptions::default()).unwrap();
        let wn = mbps(bytes, t.elapsed());
        let t = Instant::now();
        let mut s = c.open_read("/dev/zero", 0, Some(bytes as u64)).unwrap();
        let mut n = 0;
        while let Some(chunk) = s.read_chunk(Duration::from_secs(30)).unwrap() {
            n += chunk.len();
        }
        let rz = mbps(n, t.elapsed());
        println!("socketpair: channel only: upload to /dev/null {wn:.0} MB/s, download from /dev/zero {rz:.0} MB/s");
        json.insert("socketpair_upload_devnull_mbps".into(), wn.into());
        json.insert("socketpair_download_devzero_mbps".into(), rz.into());
        std::fs::remove_file(gp).unwrap();
    }
    let host_src = dir.path().join("host-src.bin");
    std::fs::write(&host_src, &data).unwrap();
    let t = Instant::now();
    c.copy_from_host(&host_src, &format!("{}/copied.bin", dir.path().display())).unwrap();
    let ci = mbps(bytes, t.elapsed());
    let t = Instant::now();
    c.copy_to_host(&format!("{}/copied.bin", dir.path().display()), &dir.path().join("back.bin"), Default::default())
        .unwrap();
    let co = mbps(bytes, t.elapsed());
    println!("socketpair: copy_from_host {ci:.0} MB/s, copy_to_host {co:.0} MB/s (tree stream, file to file)");
    json.insert("socketpair_copy_in_mbps".into(), ci.into());
    json.insert("socketpair_copy_out_mbps".into(), co.into());
    println!("socketpair: agent peak RSS {} KiB", peak_rss_kib(child.id()));
    drop(c);
    let _ = child.wait();
    drop(dir);

    // ---- part 2: a QEMU guest ----
    if a.qemu {
        let sb = Sandbox::create(SandboxConfig { engine: EngineChoice::Qemu, memory_mib: 1024, ..Default::default() })
            .unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
        println!(
            "qemu: {} ({}), ready in {:.0} ms",
            sb.info().engine_detail,
            sb.info().kernel_release,
            sb.info().boot_ms
        );
        for _ in 0..5 {
            sb.exec_collect(&t_req, None).unwrap();
        }
        let mut pings: Vec<f64> =
            (0..200).map(|_| sb.ping(Duration::from_secs(5)).unwrap().as_secs_f64() * 1e6).collect();
        let q_ping = pct(&mut pings, 0.5);
        let mut ex: Vec<f64> = (0..50)
            .map(|_| {
                let t = Instant::now();
                sb.exec_collect(&t_req, None).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let (q50, q90) = (pct(&mut ex, 0.5), pct(&mut ex, 0.9));
        println!("qemu: ping p50 {q_ping:.0} us; exec /bin/true p50 {q50:.2} ms, p90 {q90:.2} ms (50 runs)");
        json.insert("qemu_ping_p50_us".into(), q_ping.into());
        json.insert("qemu_exec_true_p50_ms".into(), q50.into());
        json.insert("qemu_exec_true_p90_ms".into(), q90.into());
        let mib = 256;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("in.bin");
        std::fs::write(&src, &data[..mib << 20]).unwrap();
        let t = Instant::now();
        sb.copy_from_host(&src, "/tmp/in.bin").unwrap();
        let ci = mbps(mib << 20, t.elapsed());
        let t = Instant::now();
        sb.copy_to_host("/tmp/in.bin", &d.path().join("out.bin"), Default::default()).unwrap();
        let co = mbps(mib << 20, t.elapsed());
        assert_eq!(std::fs::metadata(d.path().join("out.bin")).unwrap().len(), (mib << 20) as u64);
        println!(
            "qemu: 256 MiB copy in {ci:.0} MB/s, out {co:.0} MB/s (guest /tmp is tmpfs; accel {})",
            sb.info().engine_detail
        );
        json.insert("qemu_copy_in_256mib_mbps".into(), ci.into());
        json.insert("qemu_copy_out_256mib_mbps".into(), co.into());
        json.insert("qemu_engine".into(), sb.info().engine_detail.clone().into());
        sb.stop(Duration::from_secs(10));
    }
    println!("{}", serde_json::Value::Object(json));
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
