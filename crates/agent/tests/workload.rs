//! The boot workload without a VM: `--exec-spec` (what `microcell.exec=` on the kernel command
//! line gives the agent as PID 1), its output on the agent's stdout/stderr (the console), the
//! status line, `WaitWorkload` over the channel, and the agent ending afterwards.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::workload::parse_status_line;
use protocol::WorkloadSpec;
use protocol::{Rlimit, WorkloadExit};
use sandbox::agent_client::AgentClient;

struct Run {
    status: Option<WorkloadExit>,
    stdout: String,
    stderr: String,
    agent_ok: bool,
    elapsed: Duration,
}

/// Runs the agent with a workload; `ask`: a host connects and sends `WaitWorkload`.
fn run(spec_value: &str, ask: bool) -> Run {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(common::AGENT);
    cmd.args(["--no-init", "--channel-fd", "3", "--exec-spec", spec_value])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let client = AgentClient::new(ours).unwrap();
    let mut status = None;
    if ask {
        let ready = client.handshake(Duration::from_secs(10)).unwrap();
        assert_ne!(ready.features & protocol::features::WORKLOAD, 0);
        status = Some(client.wait_workload(Duration::from_secs(30)).unwrap());
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let agent_ok = child.wait().unwrap().success();
    Run { status, stdout, stderr, agent_ok, elapsed: t.elapsed() }
}

fn spec(argv: &[&str]) -> WorkloadSpec {
    WorkloadSpec { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn value(s: &WorkloadSpec) -> String {
    s.to_cmdline_word().split_once('=').unwrap().1.to_owned()
}

fn console_status(r: &Run) -> WorkloadExit {
    r.stderr.lines().find_map(parse_status_line).unwrap_or_else(|| panic!("no status line in {:?}", r.stderr))
}

#[test]
fn exit_code_signal_and_missing_program() {
    let r = run(&value(&spec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])), true);
    let st = r.status.clone().unwrap();
    assert_eq!((st.code, st.signal, st.error.is_none()), (Some(3), None, true));
    assert_eq!(console_status(&r), WorkloadExit { duration_ns: st.duration_ns, ..st.clone() });
    assert_eq!(r.stdout, "out\n");
    assert!(r.stderr.contains("err\n"));
    assert!(r.agent_ok, "the agent ends (powers off) after the report: {}", r.stderr);

    let r = run(&value(&spec(&["/bin/sh", "-c", "kill -9 $$"])), true);
    assert_eq!(r.status.unwrap().signal, Some(9));

    let r = run(&value(&spec(&["/nonexistent/workload", "x"])), true);
    let e = r.status.clone().unwrap().error.expect("an error, not an exit");
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.path.as_deref(), Some("/nonexistent/workload"));
    assert!(e.message.contains("/nonexistent/workload"), "{}", e.message);
    assert_eq!(console_status(&r).error.unwrap().errno, libc::ENOENT);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("not-executable");
    std::fs::write(&f, "#!/bin/sh\n").unwrap();
    let r = run(&value(&spec(&[f.to_str().unwrap()])), true);
    assert_eq!(r.status.unwrap().error.unwrap().errno, libc::EACCES);

    // A spec that does not decode is reported the same way, never a hang.
    let r = run("!!not-base64!!", true);
    assert_eq!(r.status.unwrap().error.unwrap().errno, libc::EINVAL);
}

#[test]
fn args_env_workdir_and_rlimits_reach_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let s = WorkloadSpec {
        argv: [
            "/bin/sh",
            "-c",
            "printf '[%s]' \"$@\"; echo; echo \"$MSG\"; pwd; ulimit -n; ulimit -Hn",
            "sh",
            "a b",
            "c\"d",
            "'e'",
            "",
            "x=y z",
            "é😀",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: vec![("MSG".into(), "hello \"world\" 'quoted' $NOT".into())],
        cwd: Some(dir.path().to_str().unwrap().into()),
        rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: 1024 }],
        user: None,
    };
    let r = run(&value(&s), true);
    assert_eq!(r.status.unwrap().code, Some(0), "{}", r.stderr);
    let want = format!(
        "[a b][c\"d]['e'][][x=y z][é😀]\nhello \"world\" 'quoted' $NOT\n{}\n1024\n1024\n",
        dir.path().display()
    );
    assert_eq!(r.stdout, want);
}

#[test]
fn without_a_host_asking_the_agent_ends_after_the_grace() {
    let r = run(&value(&spec(&["/bin/true"])), false);
    assert!(r.agent_ok);
    assert_eq!(console_status(&r).code, Some(0));
    assert!(r.elapsed >= Duration::from_millis(900) && r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[test]
fn exec_and_fs_work_while_the_workload_runs() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd2 = Command::new(common::AGENT);
    cmd2.args([
        "--no-init",
        "--channel-fd",
        "3",
        "--exec-spec",
        &value(&spec(&["/bin/sh", "-c", "sleep 0.5; exit 5"])),
    ])
    .stdout(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd2.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd2.spawn().unwrap();
    drop(theirs);
    let client = AgentClient::new(ours).unwrap();
    client.handshake(Duration::from_secs(10)).unwrap();
    let pending = client.send(protocol::Message::WaitWorkload(())).unwrap();
    let out = client.exec_collect(&sandbox::ExecRequest::shell("echo side"), Some(Duration::from_secs(10))).unwrap();
    assert_eq!(out.stdout_str(), "side\n");
    let f = pending.wait(Duration::from_secs(10)).unwrap();
    assert!(matches!(f.msg, protocol::Message::WorkloadExit(WorkloadExit { code: Some(5), .. })), "{f:?}");
    assert!(child.wait().unwrap().success());
}

/// What hosts do (the spec, env and all, never on a command line): `StartWorkload` after the
/// handshake. Only once; the workload reads its env; `WaitWorkload` has the status.
#[test]
fn start_workload_over_the_channel() {
    let mut a = common::Agent::spawn_with(&[]);
    assert_ne!(a.ready.features & protocol::features::START_WORKLOAD, 0);
    assert_eq!(a.ready.features & protocol::features::WORKLOAD, 0, "no workload before StartWorkload");
    let mut s = spec(&["/bin/sh", "-c", "test \"$SECRET\" = 's3 cr=t' && exit 5; exit 1"]);
    s.env = vec![("SECRET".into(), "s3 cr=t".into())];
    let ok = a.client.request(protocol::Message::StartWorkload(s.clone()), Duration::from_secs(10)).unwrap();
    assert_eq!(ok.msg, protocol::Message::Ok(()));
    let again = a.client.request(protocol::Message::StartWorkload(s), Duration::from_secs(10)).unwrap_err();
    assert!(again.to_string().contains("started already"), "{again}");
    let st = a.client.wait_workload(Duration::from_secs(30)).unwrap();
    assert_eq!((st.code, st.signal, st.error), (Some(5), None, None));
    assert!(a.child.wait().unwrap().success(), "the agent ends after the report");
}
