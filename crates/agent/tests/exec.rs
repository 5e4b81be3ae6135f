//! Exec end to end without a VM: the agent as a host process over a socketpair, driven by the
//! real host client (`sandbox::agent_client` + `sandbox::exec`). Same code path as in the
//! guest, minus the virtio port.

mod common;

use std::time::{Duration, Instant};

use common::{say, Agent};
use sandbox::exec::{ExecEvent, ExecRequest};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn sh(script: &str) -> ExecRequest {
    ExecRequest::shell(script)
}

#[test]
fn exit_codes_stdout_and_stderr_apart() {
    let a = Agent::spawn();
    let out = a.client.exec_collect(&sh("echo hi; exit 3"), T).unwrap();
    assert_eq!((out.exit.code, out.exit.signal, out.exit.timed_out), (Some(3), None, false));
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.stderr.is_empty());
    let out = a.client.exec_collect(&sh("echo out; echo err >&2; echo out2; exit 0"), T).unwrap();
    assert_eq!(out.stdout_str(), "out\nout2\n");
    assert_eq!(out.stderr_str(), "err\n");
    assert_eq!(out.code(), Some(0));
    assert!(out.exit.duration > Duration::ZERO && out.exit.duration < Duration::from_secs(10));
    let out = a.client.exec_collect(&sh("kill -SEGV $$"), T).unwrap();
    assert_eq!((out.exit.code, out.exit.signal, out.exit.signal_name.as_deref()), (None, Some(11), Some("SIGSEGV")));
    // A program without a shell, found in PATH.
    let out = a.client.exec_collect(&ExecRequest::new(["printf", "%s|", "a b", "", "c\"d"]), T).unwrap();
    assert_eq!(out.stdout_str(), "a b||c\"d|");
}

#[test]
fn env_cwd_and_user() {
    let a = Agent::spawn();
    let dir = tempfile::tempdir().unwrap();
    let req = sh("echo \"$GREETING|$EMPTY|$HOME\"; pwd")
        .env("GREETING", "hello world \"quoted\" 'x' $y")
        .env("EMPTY", "")
        .cwd(dir.path().to_str().unwrap());
    let out = a.client.exec_collect(&req, T).unwrap();
    let want = format!(
        "hello world \"quoted\" 'x' $y||{}\n{}\n",
        std::env::var("HOME").unwrap_or_default(),
        dir.path().display()
    );
    assert_eq!(out.stdout_str(), want);
    // clear_env: only what is given.
    let mut req = ExecRequest::new(["/usr/bin/env"]).env("ONLY", "1");
    req.clear_env = true;
    assert_eq!(a.client.exec_collect(&req, T).unwrap().stdout_str(), "ONLY=1\n");
    // A user by name from /etc/passwd (this host's, in test mode): uid, gid, HOME, USER.
    let mut req = sh("echo $(id -u) $(id -g) $USER $HOME");
    req.user = Some("nobody".into());
    let out = a.client.exec_collect(&req, T).unwrap();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let nobody: Vec<&str> = passwd.lines().find(|l| l.starts_with("nobody:")).unwrap().split(':').collect();
    assert_eq!(out.stdout_str(), format!("{} {} nobody {}\n", nobody[2], nobody[3], nobody[5]));
    let mut req = sh("id -u; id -g");
    req.user = Some("4242:4343".into());
    assert_eq!(a.client.exec_collect(&req, T).unwrap().stdout_str(), "4242\n4343\n");
    // rlimits are applied in the child.
    let mut req = sh("ulimit -n; ulimit -Hn");
    req.rlimits = vec!["RLIMIT_NOFILE=123:456".into()];
    assert_eq!(a.client.exec_collect(&req, T).unwrap().stdout_str(), "123\n456\n");
}

#[test]
fn start_errors_are_coded() {
    let a = Agent::spawn();
    let e = a.client.exec(&ExecRequest::new(["/nonexistent/prog"])).err().unwrap();
    assert_eq!(e.code(), "ENOENT", "{e}");
    assert!(e.to_string().contains("/nonexistent/prog"), "{e}");
    let e = a.client.exec(&ExecRequest::new(["no-such-program-in-path"])).err().unwrap();
    assert_eq!(e.code(), "ENOENT", "{e}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("not-exec");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let e = a.client.exec(&ExecRequest::new([f.to_str().unwrap()])).err().unwrap();
    assert_eq!(e.code(), "EACCES", "{e}");
    let e = a.client.exec(&sh("true").cwd("/nonexistent/dir")).err().unwrap();
    assert_eq!(e.code(), "ENOENT", "{e}");
    assert!(matches!(&e, sandbox::SandboxError::Guest { path: Some(p), .. } if p == "/nonexistent/dir"), "{e:?}");
    let e = a.client.exec(&sh("true").cwd(f.to_str().unwrap())).err().unwrap();
    assert_eq!(e.code(), "ENOTDIR", "{e}");
    let e = a.client.exec(&ExecRequest::new(Vec::<String>::new())).err().unwrap();
    assert_eq!(e.code(), "E_INVALID_ARGUMENT", "{e}");
    let mut req = sh("true");
    req.user = Some("no-such-user-here".into());
    assert_eq!(a.client.exec(&req).err().unwrap().code(), "E_INVALID_ARGUMENT");
    let e = a.client.exec(&sh("true").env("BAD=NAME", "x")).err().unwrap();
    assert_eq!(e.code(), "E_INVALID_ARGUMENT", "{e}");
    // The agent is fine after all that.
    assert_eq!(a.client.exec_collect(&sh("exit 7"), T).unwrap().code(), Some(7));
}

#[test]
fn stdin_round_trip_of_every_byte_value() {
    let a = Agent::spawn();
    let h = a.client.exec(&ExecRequest::new(["cat"]).stdin()).unwrap();
    // 256 values x 4096 = 1 MiB: four times the agent's stdin window, so credit must flow.
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 4096).collect();
    let writer = {
        let data = data.clone();
        let h = &h;
        std::thread::scope(|s| {
            let w = s.spawn(move || {
                h.write_stdin(&data, Duration::from_secs(30)).unwrap();
                h.close_stdin().unwrap();
            });
            let out = h.collect(T).unwrap();
            w.join().unwrap();
            out
        })
    };
    assert_eq!(writer.exit.code, Some(0));
    assert_eq!(writer.stdout.len(), data.len());
    assert!(writer.stdout == data, "stdin came back changed");
    // Writing after the end fails cleanly.
    assert!(h.write_stdin(b"late", Duration::from_secs(1)).is_err());
}

#[test]
fn a_hundred_concurrent_execs() {
    let a = Agent::spawn();
    let t = Instant::now();
    let handles: Vec<_> = (0..100)
        .map(|i| a.client.exec(&sh(&format!("sleep 0.2; echo {i}; echo e{i} >&2; exit {}", i % 7))).unwrap())
        .collect();
    for (i, h) in handles.iter().enumerate() {
        let out = h.collect(T).unwrap();
        assert_eq!(out.stdout_str(), format!("{i}\n"));
        assert_eq!(out.stderr_str(), format!("e{i}\n"));
        assert_eq!(out.code(), Some((i % 7) as i32));
    }
    say(&format!("100 concurrent execs (sleep 0.2 each): {:?}", t.elapsed()));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn a_stalled_stream_blocks_only_its_own_process() {
    let a = Agent::spawn();
    // Endless output that nobody reads.
    let stalled = a.client.exec(&ExecRequest::new(["yes", "stalled"])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Other commands, the channel and pings go on.
    for i in 0..20 {
        let out = a.client.exec_collect(&sh(&format!("echo {i}")), T).unwrap();
        assert_eq!(out.stdout_str(), format!("{i}\n"));
    }
    a.client.ping(Duration::from_secs(5)).unwrap();
    let (now, peak) = stalled.buffered_bytes();
    assert!(peak <= 256 << 10, "host buffers at most the window for the stalled stream: {now}/{peak}");
    // Reading resumes it.
    let mut got = 0;
    while got < 4 << 20 {
        match stalled.read_event(T).unwrap() {
            Some(ExecEvent::Stdout(b)) => got += b.len(),
            other => panic!("{other:?}"),
        }
    }
    stalled.kill().unwrap();
    let out = stalled.collect(T).unwrap();
    assert_eq!(out.exit.signal, Some(9));
    assert!(a.peak_rss_kib() < 64 << 10, "agent peak RSS {} KiB", a.peak_rss_kib());
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 probes.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true);
    exists && !zombie
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let a = Agent::spawn();
    let t = Instant::now();
    let h = a
        .client
        .exec(&sh("sleep 100 & echo $!; (sleep 100; echo never) & echo $!; wait").timeout(Duration::from_millis(500)))
        .unwrap();
    let out = h.collect(T).unwrap();
    let elapsed = t.elapsed();
    assert!(out.exit.timed_out, "{:?}", out.exit);
    assert_eq!(out.exit.signal, Some(9));
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    let pids: Vec<i32> = out.stdout_str().lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(pids.len(), 2, "{}", out.stdout_str());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "grandchildren {pids:?} survived the timeout");
        std::thread::sleep(Duration::from_millis(20));
    }
    say(&format!("timeout 500 ms -> exit reported after {elapsed:?}"));
}

#[test]
fn signals_reach_the_group() {
    let a = Agent::spawn();
    let h = a.client.exec(&sh("trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done")).unwrap();
    assert_eq!(h.read_event(T).unwrap(), Some(ExecEvent::Stdout(b"ready\n".to_vec())));
    h.signal("SIGTERM").unwrap();
    let out = h.collect(T).unwrap();
    assert_eq!(out.stdout_str(), "got-term\n");
    assert_eq!(out.code(), Some(42));
    assert!(h.signal("NOPE").is_err());
    let h = a.client.exec(&ExecRequest::new(["sleep", "100"])).unwrap();
    h.kill().unwrap();
    assert_eq!(h.collect(T).unwrap().exit.signal, Some(9));
}

#[test]
fn a_command_that_leaves_a_daemon_still_returns() {
    let a = Agent::spawn();
    let t = Instant::now();
    // The background job keeps stdout and stderr open for 3 s.
    let out = a.client.exec_collect(&sh("(sleep 3; echo late) & echo early"), T).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(out.stdout_str(), "early\n");
    assert_eq!(out.code(), Some(0));
    assert!(elapsed < Duration::from_secs(2), "waited for the daemon: {elapsed:?}");
    // Output the child wrote just before it exited is never lost.
    let out = a.client.exec_collect(&sh("(sleep 3) & head -c 300000 /dev/zero | tr '\\0' x"), T).unwrap();
    assert_eq!(out.stdout.len(), 300_000);
    say(&format!("exec with a daemon holding its pipes: returned in {elapsed:?}"));
}

#[test]
fn pty_mode_with_resize() {
    let a = Agent::spawn();
    let mut req = sh("tty; stty size; read line; stty size; echo \"got:$line\"");
    req.tty = Some((24, 80));
    let h = a.client.exec(&req).unwrap();
    let mut text = String::new();
    while !text.contains("24 80") {
        match h.read_event(T).unwrap() {
            Some(ExecEvent::Stdout(b)) => text.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("{other:?} after {text:?}"),
        }
    }
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    h.resize(30, 100).unwrap();
    h.write_stdin(b"hello\n", Duration::from_secs(5)).unwrap();
    let out = h.collect(T).unwrap();
    let rest = String::from_utf8_lossy(&out.stdout);
    assert!(rest.contains("30 100"), "{rest:?}");
    assert!(rest.contains("got:hello"), "{rest:?}");
    assert!(out.stderr.is_empty(), "a terminal merges stderr into stdout");
    assert_eq!(out.code(), Some(0));
    // Closing stdin on a terminal sends ^D: `cat` ends.
    let mut req = ExecRequest::new(["cat"]);
    req.tty = Some((24, 80));
    let h = a.client.exec(&req).unwrap();
    h.write_stdin(b"abc\n", Duration::from_secs(5)).unwrap();
    h.close_stdin().unwrap();
    let out = h.collect(T).unwrap();
    assert_eq!(out.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("abc"));
}

#[test]
fn one_gib_of_output_in_bounded_memory() {
    let a = Agent::spawn();
    let t = Instant::now();
    let h = a.client.exec(&ExecRequest::new(["head", "-c", "1073741824", "/dev/zero"])).unwrap();
    let mut total = 0u64;
    let mut peak = 0;
    loop {
        match h.read_event(T).unwrap() {
            Some(ExecEvent::Stdout(b)) => {
                total += b.len() as u64;
                peak = peak.max(h.buffered_bytes().1);
            }
            Some(ExecEvent::Exit(e)) => {
                assert_eq!(e.code, Some(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, 1 << 30);
    let agent_rss = a.peak_rss_kib();
    say(&format!(
        "1 GiB of stdout: {:.2} s ({:.0} MB/s); host buffer peak {} KiB; agent peak RSS {} KiB; test process peak RSS {} KiB",
        secs,
        total as f64 / secs / 1e6,
        peak >> 10,
        agent_rss,
        common::status_kib(std::process::id(), "VmHWM:")
    ));
    assert!(peak <= (256 << 10) + (256 << 10), "host buffered {peak} bytes for one stream");
    assert!(agent_rss < 48 << 10, "agent peak RSS {agent_rss} KiB");
}

#[test]
fn async_reads_need_no_thread() {
    // A minimal executor: the future is polled on this thread and woken by the reader thread.
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    fn block_on<F: Future>(f: F) -> F::Output {
        let waker = Arc::new(Unpark(std::thread::current())).into();
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park_timeout(Duration::from_secs(1));
        }
    }
    let a = Agent::spawn();
    let h = a.client.exec(&sh("echo one; sleep 0.1; echo two >&2; exit 5")).unwrap();
    let mut events = Vec::new();
    while let Some(ev) = block_on(h.next_event()).unwrap() {
        events.push(ev);
    }
    assert_eq!(events[0], ExecEvent::Stdout(b"one\n".to_vec()));
    assert_eq!(events[1], ExecEvent::Stderr(b"two\n".to_vec()));
    assert!(matches!(&events[2], ExecEvent::Exit(e) if e.code == Some(5)));
    assert_eq!(events.len(), 3);
}

#[test]
fn children_inherit_no_agent_descriptors() {
    let a = Agent::spawn();
    // The channel (a socket) and the signalfd stay with the agent. (Descriptors the test
    // harness itself passed down, e.g. cargo's jobserver pipes, may appear: not the agent's.)
    let out = a.client.exec_collect(&ExecRequest::new(["ls", "-l", "/proc/self/fd/"]), T).unwrap();
    let text = out.stdout_str();
    assert!(!text.contains("socket:") && !text.contains("signalfd"), "inherited: {text}");
}
