//! T2: the real guest (kernel + root disk + agent as PID 1) on the QEMU engine, through the
//! `Sandbox` API. Needs qemu-system-x86_64 and the built guest images; FAILS (saying what to
//! run) when either is missing. TCG here: ~1 s per boot.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sandbox::engine::{EngineChoice, EngineKind};
use sandbox::Sandbox;

const ENGINE: EngineChoice = EngineChoice::Qemu;

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = serial();
    require_qemu();
    images();
    guard
}

#[test]
fn t2_create_ready_stop() {
    let _g = setup();
    create_ready_stop(ENGINE, EngineKind::Qemu);
}

#[test]
fn t2_twenty_cycles_leak_nothing() {
    let _g = setup();
    let boot_ms = cycles(ENGINE, EngineKind::Qemu, 20);
    assert_eq!(boot_ms.len(), 20);
}

#[test]
fn t2_missing_kernel() {
    let _g = setup();
    missing_kernel(ENGINE);
}

#[test]
fn t2_corrupt_root_disk() {
    let _g = setup();
    corrupt_root(ENGINE);
}

#[test]
fn t2_silent_agent_times_out() {
    let _g = setup();
    silent_agent(ENGINE);
}

#[test]
fn t2_missing_qemu_is_a_coded_error() {
    let _g = setup();
    // MICROCELL_QEMU is read when the engine is made; only this test sets it, under the lock.
    std::env::set_var("MICROCELL_QEMU", "/nonexistent/qemu-system-x86_64");
    let e = Sandbox::create(config(ENGINE)).err();
    std::env::remove_var("MICROCELL_QEMU");
    let e = e.expect("no sandbox without QEMU");
    assert_eq!(e.code(), "E_QEMU_NOT_FOUND", "{e}");
    assert!(e.to_string().contains("apt-get install qemu-system-x86"), "{e}");
}

/// Environment variable that turns `t2_helper_create_and_hang` on.
const HELPER_ENV: &str = "MICROCELL_T2_HELPER";

/// Run by `t2_no_orphan_when_the_host_process_dies` in a child test process: creates a
/// sandbox, prints QEMU's pid and hangs until killed.
#[test]
fn t2_helper_create_and_hang() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    // Created on a thread that ends at once: QEMU must survive that (it is tied to the
    // process, not to the creating thread).
    let sb = std::thread::spawn(|| Sandbox::create(config(ENGINE)).unwrap()).join().unwrap();
    println!("QEMU_PID={}", sb.info().pid.unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sb.try_wait(), None, "the sandbox outlived the thread that created it");
    println!("ALIVE");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn t2_no_orphan_when_the_host_process_dies() {
    let _g = setup();
    /// Kills the helper however this test ends (it would otherwise sleep on for minutes).
    struct Helper(std::process::Child);
    impl Drop for Helper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "t2_helper_create_and_hang", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = Helper(child);
    let mut qemu_pid = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        // libtest prints `test NAME ... ` before the test's own output, on the same line.
        if let Some(i) = line.find("QEMU_PID=") {
            qemu_pid = Some(line[i + "QEMU_PID=".len()..].trim().parse::<i32>().unwrap());
        }
        if line.contains("ALIVE") {
            break;
        }
    }
    let qemu_pid = qemu_pid.expect("the helper printed QEMU's pid");
    // SAFETY: signal 0 probes the pid.
    assert_eq!(unsafe { libc::kill(qemu_pid, 0) }, 0, "QEMU runs while its host process lives");
    child.0.kill().unwrap(); // SIGKILL: no destructor runs in the helper
    child.0.wait().unwrap();
    let t = Instant::now();
    // SAFETY: as above. (The dead QEMU is reparented and reaped by init or a subreaper.)
    while unsafe { libc::kill(qemu_pid, 0) } == 0 && !is_zombie(qemu_pid) {
        assert!(t.elapsed() < Duration::from_secs(5), "QEMU {qemu_pid} outlived its host process");
        std::thread::sleep(Duration::from_millis(10));
    }
    say(&format!("host process SIGKILLed -> its QEMU gone in {} ms", t.elapsed().as_millis()));
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

#[test]
fn t2_exec_and_files() {
    let _g = setup();
    exec_and_files(ENGINE);
}

#[test]
fn t2_workload() {
    let _g = setup();
    workload(ENGINE);
}

#[test]
fn t2_watch_reports_changes_in_order() {
    let _g = setup();
    let sb = sandbox::Sandbox::create(config(ENGINE)).expect("boots");
    let run = |s: &str| {
        let out = sb.exec_collect(&sandbox::ExecRequest::shell(s), Some(Duration::from_secs(20))).expect("exec");
        assert_eq!(out.code(), Some(0), "{s}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run("mkdir -p /tmp/w");
    assert_eq!(sb.watch("/tmp/nope", false).err().expect("refused").code(), "ENOENT");
    let w = sb.watch("/tmp/w", true).expect("watch");
    run("echo a > /tmp/w/f; mkdir /tmp/w/sub; echo b > /tmp/w/sub/g; mv /tmp/w/f /tmp/w/h; chmod 600 /tmp/w/h; rm /tmp/w/h");
    let mut seen = Vec::new();
    while let Some(c) = w.next_timeout(Duration::from_secs(5)).expect("event") {
        let item = format!("{} {}", c.kind, c.path);
        if !seen.contains(&item) {
            seen.push(item);
        }
        if c.kind == "remove" {
            break;
        }
    }
    let expect = [
        "create /tmp/w/f",
        "write /tmp/w/f",
        "create /tmp/w/sub",
        "create /tmp/w/sub/g",
        "write /tmp/w/sub/g",
        "rename /tmp/w/f",
        "rename /tmp/w/h",
        "chmod /tmp/w/h",
        "remove /tmp/w/h",
    ];
    let mut at = 0;
    for e in &seen {
        if at < expect.len() && e == expect[at] {
            at += 1;
        }
    }
    assert_eq!(at, expect.len(), "in order: {expect:?}\nseen: {seen:?}");
    w.close().unwrap();
    assert_eq!(w.next_timeout(Duration::from_secs(5)).unwrap(), None, "closed");
    sb.stop(Duration::from_secs(5));
}

#[test]
fn t2_qemu_runs_under_its_own_seccomp_filter() {
    let _g = setup();
    let sb = Sandbox::create(config(ENGINE)).unwrap();
    let pid = sb.info().pid.expect("engine qemu has a process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim);
    assert_eq!(mode, Some("2"), "QEMU {pid} runs with -sandbox (seccomp filter mode)");
    sb.stop(Duration::from_secs(10));
}
