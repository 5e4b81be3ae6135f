//! The guest-platform suite (T2 on QEMU, T3 on the built-in VMM): one set of checks, run per
//! engine by `t2_qemu.rs` and `t3_kvm.rs`.
//!
//! These tests boot the real guest: the kernel and root disk must be built
//! (`scripts/guest/build-kernel.sh`, `scripts/guest/build-rootfs.sh`, or `scripts/setup.sh`);
//! when they are missing the tests FAIL and say so. VM tests in one binary run one at a time
//! (a lock): the host has few cores, and the leak checks count this process's children.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sandbox::engine::{self, EngineChoice, EngineKind, VmExit};
use sandbox::sandbox::{default_kernel, default_rootfs};
use sandbox::{Sandbox, SandboxConfig};

/// Prints past the test harness's capture (SKIP lines, measurements).
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// One VM test at a time in this binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The built guest images, or a failure that says how to build them.
pub fn images() -> (PathBuf, PathBuf) {
    let (kernel, rootfs) = (default_kernel(), default_rootfs());
    assert!(
        kernel.is_file() && rootfs.is_file(),
        "the guest images are not built (kernel {}: {}, rootfs {}: {}): run scripts/guest/build-kernel.sh && \
         scripts/guest/build-rootfs.sh (or scripts/setup.sh), then run the tests again",
        kernel.display(),
        if kernel.is_file() { "ok" } else { "missing" },
        rootfs.display(),
        if rootfs.is_file() { "ok" } else { "missing" },
    );
    (kernel, rootfs)
}

/// QEMU must be installed for T2.
pub fn require_qemu() {
    if let Err(e) = engine::qemu::find_qemu() {
        panic!("T2 needs QEMU: {e}");
    }
}

#[path = "../../../vmm/tests/common/kvm.rs"]
mod kvm;
#[allow(unused_imports)]
pub use kvm::{require_kvm, require_linux_kvm};

pub fn config(engine: EngineChoice) -> SandboxConfig {
    SandboxConfig { engine, memory_mib: 256, ..Default::default() }
}

/// This process's children that are QEMU.
pub fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let ppid: u32 = stat[close + 2..].split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == me && comm.starts_with("qemu-system") {
            out.push(pid);
        }
    }
    out
}

/// This process's per-VM directories left in the temporary directory.
pub fn run_dirs() -> Vec<String> {
    let prefix = engine::run_dir_prefix();
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

pub fn assert_nothing_left(after: &str) {
    // A dropped sandbox has reaped QEMU and removed its files before drop returns.
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU processes left after {after}");
    assert_eq!(run_dirs(), Vec::<String>::new(), "per-VM directories left after {after}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ---- the suite ----

/// create → Ready (kernel 6.1.x), info, ping, console, graceful stop.
pub fn create_ready_stop(choice: EngineChoice, kind: EngineKind) {
    let (kernel, rootfs) = images();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let cfg = SandboxConfig { name: Some("t-ready".into()), console_output: Some(console.clone()), ..config(choice) };
    let sb = Sandbox::create(cfg).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let info = sb.info().clone();
    assert!(info.kernel_release.starts_with("6.1."), "{info:?}");
    assert_eq!(info.engine, kind);
    assert!(!info.engine_reason.is_empty() && !info.engine_detail.is_empty());
    assert_eq!(info.hostname, "t-ready", "the name becomes the hostname");
    assert_eq!((info.kernel.clone(), info.rootfs.clone()), (kernel, rootfs));
    assert_ne!(info.features & protocol::features::INIT, 0, "the agent runs as PID 1");
    assert!(info.boot_ms > 0.0 && info.boot_ms < 30_000.0, "{info:?}");
    match kind {
        EngineKind::Qemu => assert!(info.pid.is_some()),
        EngineKind::Kvm => assert!(info.pid.is_none()),
    }
    assert_eq!(sb.try_wait(), None);
    let rtt = sb.ping(Duration::from_secs(5)).unwrap();
    // The JSON the napi layer hands to JS.
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["engine"], kind.name());
    assert!(json["bootMs"].is_number() && json["kernelRelease"].is_string());

    let t = Instant::now();
    let exit = sb.stop(Duration::from_secs(10));
    let stop_ms = t.elapsed().as_millis();
    assert_eq!(exit, VmExit::GuestReset, "a graceful poweroff; console:\n{}", sb.console_tail());
    assert_eq!(sb.wait(), VmExit::GuestReset);
    assert_eq!(sb.stop(Duration::from_secs(1)), VmExit::GuestReset, "stop after the end is a no-op");
    assert_eq!(sb.ping(Duration::from_secs(1)).unwrap_err().code(), "E_CHANNEL_CLOSED");
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains(&format!("microcell-agent ready (kernel {})", info.kernel_release)), "{log}");
    assert!(sb.console_tail().contains("microcell-agent ready"));
    let queued = sb.console().unwrap().try_read(1 << 20);
    assert!(matches!(queued, sandbox::console::TryRead::Data(ref d) if !d.is_empty()), "{queued:?}");
    drop(sb);
    assert_nothing_left("one sandbox");
    say(&format!(
        "{kind}: ready in {:.0} ms (kernel {}, {}), ping {:?}, stop {stop_ms} ms",
        info.boot_ms, info.kernel_release, info.engine_detail, rtt
    ));
}

/// `n` sequential create/stop cycles: no processes or files left after each; reports the
/// create→Ready distribution.
pub fn cycles(choice: EngineChoice, kind: EngineKind, n: usize) -> Vec<f64> {
    images();
    let mut boot_ms = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let sb = Sandbox::create(config(choice)).unwrap_or_else(|e| panic!("cycle {i}: [{}] {e}", e.code()));
        assert!(sb.info().kernel_release.starts_with("6.1."));
        boot_ms.push(sb.info().boot_ms);
        let pid = sb.info().pid;
        if kind == EngineKind::Qemu {
            assert_eq!(qemu_children(), vec![pid.unwrap()], "cycle {i}: exactly this sandbox's QEMU runs");
        }
        assert_eq!(sb.stop(Duration::from_secs(10)), VmExit::GuestReset, "cycle {i}");
        drop(sb);
        assert_nothing_left(&format!("cycle {i}"));
    }
    let total = t.elapsed();
    let mut sorted = boot_ms.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    say(&format!(
        "{kind}: {n} create/stop cycles in {:.1} s; create->Ready ms: p50 {:.0}, p90 {:.0}, min {:.0}, max {:.0}",
        total.as_secs_f64(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        sorted[0],
        sorted[n - 1]
    ));
    boot_ms
}

/// A kernel path that does not exist: `E_GUEST_IMAGE_MISSING` before anything starts.
pub fn missing_kernel(choice: EngineChoice) {
    images();
    let t = Instant::now();
    let cfg = SandboxConfig { kernel: Some("/nonexistent/vmlinux".into()), ..config(choice) };
    let e = Sandbox::create(cfg).err().expect("no sandbox without a kernel");
    assert_eq!(e.code(), "E_GUEST_IMAGE_MISSING", "{e}");
    assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_nothing_left("a missing kernel");
}

/// A root disk of random bytes: the kernel cannot mount it and panics; `E_AGENT_EXITED` with the
/// console tail, in bounded time (not a hang until the boot timeout).
pub fn corrupt_root(choice: EngineChoice) {
    images();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("random.img");
    let mut bytes = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&disk, &bytes).unwrap();
    let t = Instant::now();
    let cfg = SandboxConfig { rootfs: Some(disk), boot_timeout_ms: 60_000, ..config(choice) };
    let e = Sandbox::create(cfg).err().expect("no sandbox on a corrupt root disk");
    let took = t.elapsed();
    assert_eq!(e.code(), "E_AGENT_EXITED", "{e}");
    let msg = e.to_string();
    assert!(msg.contains("Kernel panic") || msg.contains("VFS"), "the console tail names the cause:\n{msg}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_nothing_left("a corrupt root disk");
    say(&format!("corrupt root disk -> E_AGENT_EXITED in {} ms", took.as_millis()));
}

/// A guest whose agent never answers (`init=/bin/sh`): `E_BOOT_TIMEOUT` at the configured
/// timeout, the VM killed.
pub fn silent_agent(choice: EngineChoice) {
    images();
    let timeout_ms = 3_000;
    let t = Instant::now();
    let cfg = SandboxConfig { kernel_args: Some("init=/bin/sh".into()), boot_timeout_ms: timeout_ms, ..config(choice) };
    let e = Sandbox::create(cfg).err().expect("no sandbox without an agent");
    let took = t.elapsed();
    assert_eq!(e.code(), "E_BOOT_TIMEOUT", "{e}");
    assert!(e.to_string().contains("3000 ms"), "{e}");
    assert!(took >= Duration::from_millis(timeout_ms as u64), "took {took:?}");
    assert!(took < Duration::from_millis(timeout_ms as u64 + 2_000), "took {took:?}");
    assert_nothing_left("a silent agent");
    say(&format!(
        "silent agent (init=/bin/sh, bootTimeoutMs {timeout_ms}) -> E_BOOT_TIMEOUT in {} ms",
        took.as_millis()
    ));
}

// ---- exec, files and the workload (real guest) ----

const T: Option<Duration> = Some(Duration::from_secs(60));

/// Exec and files in a real guest: exit code, stderr, env/cwd, timeout, stdin, a 16 MiB file.
pub fn exec_and_files(choice: EngineChoice) {
    use sandbox::exec::ExecRequest;
    use sandbox::fs::WriteOptions;
    let cfg = SandboxConfig {
        name: Some("t-exec".into()),
        env: [("FROM_CONFIG".to_owned(), "cfg value".to_owned())].into(),
        workdir: Some("/tmp".into()),
        ..config(choice)
    };
    let sb = Sandbox::create(cfg).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert_ne!(
        sb.info().features & protocol::features::EXEC,
        0,
        "an agent with exec (rebuild the root disk: scripts/guest/build-rootfs.sh)"
    );
    let t = Instant::now();
    let out = sb.exec_collect(&ExecRequest::shell("echo hi; exit 3"), T).unwrap();
    let first = t.elapsed();
    assert_eq!((out.code(), out.stdout_str().as_str(), out.stderr.len()), (Some(3), "hi\n", 0));
    let out = sb.exec_collect(&ExecRequest::shell("echo to-err >&2; echo to-out"), T).unwrap();
    assert_eq!((out.stdout_str().as_str(), out.stderr_str().as_str()), ("to-out\n", "to-err\n"));
    // The sandbox's env and workdir are the defaults; the request's own win.
    let out = sb
        .exec_collect(&ExecRequest::shell("echo \"$FROM_CONFIG|$MINE\"; pwd; hostname").env("MINE", "a 'b' \"c\""), T)
        .unwrap();
    assert_eq!(out.stdout_str(), "cfg value|a 'b' \"c\"\n/tmp\nt-exec\n");
    let out = sb.exec_collect(&ExecRequest::shell("pwd").cwd("/etc"), T).unwrap();
    assert_eq!(out.stdout_str(), "/etc\n");
    // A timeout kills the tree.
    let t2 = Instant::now();
    let out = sb
        .exec_collect(&ExecRequest::shell("sleep 30 & sleep 30; echo never").timeout(Duration::from_millis(500)), T)
        .unwrap();
    assert!(out.exit.timed_out && out.exit.signal == Some(9), "{:?}", out.exit);
    assert!(t2.elapsed() < Duration::from_secs(10), "{:?}", t2.elapsed());
    let left = sb.exec_collect(&ExecRequest::shell("ps -o comm | grep -c '^sleep' || true"), T).unwrap();
    assert_eq!(left.stdout_str().trim(), "0", "sleeps left after the timeout");
    // Stdin: every byte value, through credit.
    let h = sb.exec(&ExecRequest::new(["cat"]).stdin()).unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let out = std::thread::scope(|s| {
        let w = s.spawn(|| {
            h.write_stdin(&data, Duration::from_secs(60)).unwrap();
            h.close_stdin().unwrap();
        });
        let out = h.collect(T).unwrap();
        w.join().unwrap();
        out
    });
    assert!(out.stdout == data && out.code() == Some(0), "stdin round trip ({} bytes back)", out.stdout.len());
    // Errors are coded.
    assert_eq!(sb.exec(&ExecRequest::new(["/no/such/prog"])).err().unwrap().code(), "ENOENT");
    assert_eq!(sb.read_file("/no/such/file").unwrap_err().code(), "ENOENT");
    // A 16 MiB file both ways.
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let t3 = Instant::now();
    sb.write_file("/tmp/big.bin", &big, WriteOptions { mode: Some(0o600), ..Default::default() }).unwrap();
    let up = t3.elapsed();
    let t4 = Instant::now();
    let back = sb.read_file("/tmp/big.bin").unwrap();
    let down = t4.elapsed();
    assert!(back == big, "16 MiB file came back changed ({} bytes)", back.len());
    let st = sb.stat("/tmp/big.bin", false).unwrap();
    assert_eq!((st.size, st.mode, st.file_type), (16 << 20, 0o600, "file"));
    let sum = sb.exec_collect(&ExecRequest::shell("md5sum /tmp/big.bin | cut -d' ' -f1"), T).unwrap();
    assert_eq!(sum.stdout_str().trim().len(), 32);
    assert!(sb.list_dir("/tmp").unwrap().iter().any(|e| e.name == "big.bin"));
    assert!(sb.exists("/etc/passwd").unwrap() && !sb.exists("/nope").unwrap());
    assert_eq!(sb.stop(Duration::from_secs(10)), VmExit::GuestReset);
    say(&format!(
        "exec in the guest: first exec {first:?}; 16 MiB file write {:.0} MB/s, read {:.0} MB/s",
        16.78 / up.as_secs_f64(),
        16.78 / down.as_secs_f64()
    ));
}

fn workload_config(choice: EngineChoice) -> SandboxConfig {
    SandboxConfig { boot_timeout_ms: 60_000, ..config(choice) }
}

/// Workload mode: exit codes, a signal, args/env/workdir/rlimits, a missing program.
pub fn workload(choice: EngineChoice) {
    use sandbox::workload::{spec_from_parts, Workload};
    let s = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let spec = spec_from_parts(
        "/bin/sh",
        &s(&[
            "-c",
            "printf '[%s]' \"$@\"; echo; echo \"env=$GREETING\"; pwd; ulimit -n; exit 0",
            "sh",
            "a b",
            "c \"d\" 'e'",
            "",
            "x=y",
        ]),
        &s(&["GREETING=hello  world \"q\""]),
        Some("/etc"),
        &s(&["RLIMIT_NOFILE=1024:1024"]),
    )
    .unwrap();
    let t = Instant::now();
    let w = Workload::start(&spec, SandboxConfig { console_output: Some(console.clone()), ..workload_config(choice) })
        .unwrap();
    let st = w.wait().unwrap();
    let ms = t.elapsed().as_millis();
    assert_eq!((st.code, st.signal, st.source), (Some(0), None, "channel"), "{st:?}\n{}", w.console_tail());
    assert_eq!(w.vm_exit(), Some(VmExit::GuestReset), "the agent powers off after the report");
    // The serial console turns "\n" into "\r\n". (Workload VMs boot `quiet`; a kernel line that
    // still lands in the middle of the program's output is cut out, as a reader would skip it.)
    let raw = std::fs::read_to_string(&console).unwrap().replace("\r\n", "\n");
    let mut log = String::new();
    let mut rest = raw.as_str();
    while let Some(at) = rest
        .find("[ ")
        .filter(|&i| rest[i..].find("] ").is_some_and(|j| rest[i + 1..i + j].trim().parse::<f64>().is_ok()))
    {
        log.push_str(&rest[..at]);
        rest = rest[at..].split_once('\n').map_or("", |(_, r)| r);
    }
    log.push_str(rest);
    assert!(log.contains("[a b][c \"d\" 'e'][][x=y]\n"), "{log}");
    assert!(log.contains("env=hello  world \"q\"\n/etc\n1024\n"), "{log}");
    assert!(log.contains("microcell-workload-exit: exited code=0"), "{log}");
    drop(w);

    let st = Workload::run(
        &spec_from_parts("/bin/sh", &s(&["-c", "exit 3"]), &[], None, &[]).unwrap(),
        workload_config(choice),
    )
    .unwrap();
    assert_eq!(st.code, Some(3));
    let st = Workload::run(
        &spec_from_parts("/bin/sh", &s(&["-c", "kill -KILL $$"]), &[], None, &[]).unwrap(),
        workload_config(choice),
    )
    .unwrap();
    assert_eq!((st.code, st.signal, st.signal_name.as_deref()), (None, Some(9), Some("SIGKILL")));
    let t2 = Instant::now();
    let st = Workload::run(&spec_from_parts("/no/such/program", &[], &[], None, &[]).unwrap(), workload_config(choice))
        .unwrap();
    let e = st.error.expect("a start error");
    assert_eq!((e.code.as_str(), e.path.as_deref()), ("ENOENT", Some("/no/such/program")), "{e:?}");
    let missing_ms = t2.elapsed().as_millis();
    // signal(): waits for the agent to come up, then reaches the program (SIGTERM: 15); once it
    // has ended there is nothing to signal.
    // ("ar""med": the agent echoes the command line, the shell prints "armed" once the trap is set)
    let spec = spec_from_parts(
        "/bin/sh",
        &s(&["-c", "trap 'exit 42' TERM; echo ar\"\"med; while :; do sleep 0.1; done"]),
        &[],
        None,
        &[],
    )
    .unwrap();
    let w = Workload::start(&spec, workload_config(choice)).unwrap();
    let t3 = Instant::now();
    while !w.console_tail().contains("armed") {
        assert!(t3.elapsed() < Duration::from_secs(60), "the workload never armed its trap:\n{}", w.console_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = w.signal(15).unwrap();
    let st = w.wait().unwrap();
    assert!(sent);
    assert_eq!((st.code, st.signal), (Some(42), None), "{st:?}\n{}", w.console_tail());
    assert!(!w.signal(15).unwrap(), "an ended workload has nothing to signal");
    drop(w);
    assert_nothing_left("workloads");
    say(&format!(
        "{choice:?} workload: boot+run+report+poweroff {ms} ms; missing execPath reported in {missing_ms} ms"
    ));
}
