//! The agent as a plain host process over a socketpair (and over stdio): the handshake,
//! the dispatch of known, unknown and malformed requests, and the power-off request.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Conn;
use protocol::*;

const AGENT: &str = env!("CARGO_BIN_EXE_microcell-agent");

/// Spawns the agent with one end of a socketpair as its descriptor 3.
fn spawn_on_socketpair() -> (Child, Conn<UnixStream, UnixStream>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(AGENT);
    cmd.args(["--no-init", "--channel-fd", "3"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let w = ours.try_clone().unwrap();
    (child, Conn::new(ours, w))
}

fn wait(mut child: Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("agent did not exit");
}

fn handshake<R: std::io::Read, W: std::io::Write>(conn: &mut Conn<R, W>) -> Ready {
    let f = conn.request(0, Conn::<R, W>::hello());
    assert_eq!(f.id, 0);
    match f.msg {
        Message::Ready(r) => r,
        other => panic!("expected Ready, got {other:?}"),
    }
}

fn expect_error(f: Frame, id: u32, code: ErrorCode) -> ErrorMsg {
    assert_eq!(f.id, id, "{f:?}");
    match f.msg {
        Message::Error(e) if e.code == code => e,
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

#[test]
fn handshake_requests_and_poweroff_over_a_socketpair() {
    let (child, mut conn) = spawn_on_socketpair();

    // Nothing but Hello before the handshake.
    let f = conn.request(1, Message::Ping(1));
    expect_error(f, 1, ErrorCode::BAD_STATE);

    let ready = handshake(&mut conn);
    assert_eq!(ready.version, PROTOCOL_VERSION);
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(ready.kernel_release, String::from_utf8_lossy(&uname.stdout).trim());
    assert!(ready.agent.starts_with("microcell-agent "), "{}", ready.agent);
    assert_eq!(ready.features & features::INIT, 0, "a test process is not init");
    assert!(ready.boot_ns >= ready.agent_start_ns && ready.agent_start_ns > 0);

    assert_eq!(conn.request(7, Message::Ping(0xfeed)), Frame::new(7, Message::Pong(0xfeed)));

    assert_ne!(ready.features & features::EXEC, 0);
    assert_ne!(ready.features & features::FS, 0);
    assert_eq!(ready.features & features::WORKLOAD, 0, "no workload asked for");

    // A request that makes no sense is answered, not fatal.
    let exec = Message::Exec(Exec {
        argv: vec![],
        env: vec![],
        clear_env: false,
        cwd: None,
        user: None,
        uid: None,
        gid: None,
        tty: None,
        stdin: false,
        window: 65536,
        timeout_ms: None,
        rlimits: vec![],
    });
    let e = expect_error(conn.request(8, exec), 8, ErrorCode::INVALID);
    assert!(e.message.contains("argv"), "{}", e.message);
    let e = expect_error(conn.request(8, Message::WaitWorkload(())), 8, ErrorCode::BAD_STATE);
    assert!(e.message.contains("no boot workload"), "{}", e.message);

    // Unknown kind, unknown flags, malformed payload: an error each, and the channel lives on.
    conn.send_raw(&Header { flags: 0, kind: 0x7abc, id: 9, len: 2 }.to_bytes());
    conn.send_raw(&[1, 2]);
    expect_error(conn.recv().unwrap(), 9, ErrorCode::UNKNOWN_KIND);
    conn.send_raw(&Header { flags: 0x40, kind: kind::PING, id: 10, len: 1 }.to_bytes());
    conn.send_raw(&[0]);
    expect_error(conn.recv().unwrap(), 10, ErrorCode::MALFORMED);
    conn.send_raw(&Header { flags: 0, kind: kind::PING, id: 11, len: 0 }.to_bytes());
    expect_error(conn.recv().unwrap(), 11, ErrorCode::MALFORMED);
    // Guest-to-host messages are refused.
    expect_error(conn.request(12, Message::Stdout(b"x".to_vec().into())), 12, ErrorCode::BAD_STATE);
    // Many frames in one write, answered in order.
    let mut burst = Vec::new();
    for i in 0..100u32 {
        Frame::new(100 + i, Message::Ping(u64::from(i))).encode(&mut burst).unwrap();
    }
    conn.send_raw(&burst);
    for i in 0..100u32 {
        assert_eq!(conn.recv().unwrap(), Frame::new(100 + i, Message::Pong(u64::from(i))));
    }

    // Poweroff: acknowledged, then (in test mode) the process exits cleanly.
    assert_eq!(conn.request(13, Message::Poweroff(())), Frame::new(13, Message::Ok(())).with_flags(FLAG_FINAL));
    assert_eq!(conn.recv(), None, "the agent closes the channel");
    assert!(wait(child).success());
}

#[test]
fn version_mismatch_is_refused() {
    let (child, mut conn) = spawn_on_socketpair();
    let hello = Message::Hello(Hello {
        version: 999,
        min_version: 900,
        client: "future".into(),
        realtime_ns: 0,
        entropy: vec![],
    });
    let e = expect_error(conn.request(0, hello), 0, ErrorCode::VERSION);
    assert!(e.message.contains("900..=999"), "{}", e.message);
    // Still no session: requests are refused until a Hello succeeds.
    expect_error(conn.request(1, Message::Ping(1)), 1, ErrorCode::BAD_STATE);
    handshake(&mut conn);
    drop(conn);
    assert!(wait(child).success(), "host hang-up ends a test-mode agent cleanly");
}

#[test]
fn garbage_ends_a_test_mode_agent_with_an_error() {
    let (child, mut conn) = spawn_on_socketpair();
    handshake(&mut conn);
    conn.send_raw(b"GET / HTTP/1.1\r\n\r\n");
    let e = expect_error(conn.recv().unwrap(), 0, ErrorCode::MALFORMED);
    assert!(e.message.contains("magic"), "{}", e.message);
    assert_eq!(conn.recv(), None);
    assert!(!wait(child).success());
}

#[test]
fn oversized_frame_header_is_refused() {
    let (child, mut conn) = spawn_on_socketpair();
    handshake(&mut conn);
    conn.send_raw(&Header { flags: 0, kind: kind::STDIN, id: 1, len: MAX_PAYLOAD as u32 + 1 }.to_bytes());
    let e = expect_error(conn.recv().unwrap(), 0, ErrorCode::MALFORMED);
    assert!(e.message.contains("exceeds the cap"), "{}", e.message);
    assert!(!wait(child).success());
}

#[test]
fn stdio_mode() {
    let mut child = Command::new(AGENT)
        .args(["--no-init", "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut conn = Conn::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let ready = handshake(&mut conn);
    assert_eq!(ready.version, PROTOCOL_VERSION);
    assert_eq!(conn.request(5, Message::Poweroff(())), Frame::new(5, Message::Ok(())).with_flags(FLAG_FINAL));
    assert!(wait(child).success());
}

#[test]
fn refuses_to_run_without_a_channel_when_not_pid_1() {
    let out = Command::new(AGENT).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not PID 1"));
}

#[test]
fn bad_stream_frames_and_random_payloads_never_end_the_agent() {
    let (child, mut conn) = spawn_on_socketpair();
    handshake(&mut conn);
    // Stream frames for ids nothing runs under.
    expect_error(conn.request(40, Message::Stdin(b"x".to_vec().into())), 40, ErrorCode::BAD_STATE);
    expect_error(conn.request(41, Message::CloseStdin(())), 41, ErrorCode::BAD_STATE);
    expect_error(conn.request(42, Message::Signal(Signal { signal: 9, group: true })), 42, ErrorCode::BAD_STATE);
    expect_error(conn.request(43, Message::FileData(b"x".to_vec().into())), 43, ErrorCode::BAD_STATE);
    expect_error(
        conn.request(44, Message::Resize(Resize { size: TtySize { rows: 1, cols: 1 } })),
        44,
        ErrorCode::BAD_STATE,
    );
    // Credit for a stream that ended is normal: no answer (the next answer is the Pong).
    conn.send(Frame::new(45, Message::Credit(Credit { stream: StreamKind::Stdout, bytes: 10 })));
    assert_eq!(conn.request(46, Message::Ping(9)), Frame::new(46, Message::Pong(9)));
    expect_error(
        conn.request(47, Message::Credit(Credit { stream: StreamKind::Stdin, bytes: 10 })),
        47,
        ErrorCode::BAD_STATE,
    );
    // A bad signal number on a running exec: a non-final error, the exec goes on.
    let exec = Exec {
        argv: vec!["sleep".into(), "10".into()],
        env: vec![],
        clear_env: false,
        cwd: None,
        user: None,
        uid: None,
        gid: None,
        tty: None,
        stdin: false,
        window: 1024,
        timeout_ms: None,
        rlimits: vec![],
    };
    assert!(matches!(conn.request(50, Message::Exec(exec.clone())).msg, Message::Started(_)));
    let f = conn.request(50, Message::Signal(Signal { signal: 999, group: false }));
    assert!(!f.is_final(), "{f:?}");
    expect_error(f, 50, ErrorCode::BAD_STATE);
    let f = conn.request(50, Message::Stdin(b"no stdin".to_vec().into()));
    assert!(!f.is_final());
    // The same id again while it runs.
    expect_error(conn.request(50, Message::Exec(exec)), 50, ErrorCode::BAD_STATE);
    conn.send(Frame::new(50, Message::Signal(Signal { signal: 9, group: true })));
    loop {
        let f = conn.recv().unwrap();
        let last = f.is_final();
        if let Message::Exit(e) = f.msg {
            assert!(last);
            assert_eq!(e.signal, Some(9));
            break;
        }
    }

    // Random payloads under every host kind: answered (or, when they happen to decode into a
    // harmless request, served); never fatal. Payloads that decode into requests that change
    // files or run programs are not sent.
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let kinds: Vec<u16> = kind::ALL.iter().copied().filter(|&k| k != kind::POWEROFF && k != kind::HELLO).collect();
    let mut sent = 0;
    for i in 0..3000u32 {
        let k = kinds[(rnd() % kinds.len() as u64) as usize];
        let len = (rnd() % 24) as usize;
        let payload: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if let Ok(m) = Message::decode(k, &payload) {
            if matches!(
                m,
                Message::Exec(_)
                    | Message::WriteFile(_)
                    | Message::WriteTree(_)
                    | Message::Mkdir(_)
                    | Message::Remove(_)
                    | Message::Rename(_)
                    | Message::FileData(_)
            ) {
                continue;
            }
        }
        let id = 1000 + i;
        conn.send_raw(&Header { flags: 0, kind: k, id, len: len as u32 }.to_bytes());
        conn.send_raw(&payload);
        sent += 1;
    }
    assert!(sent > 1000);
    // Everything before the Ping is answered first or ignored; the Pong still comes.
    conn.send(Frame::new(7, Message::Ping(77)));
    loop {
        let f = conn.recv().expect("the agent lives");
        if f.id == 7 {
            assert_eq!(f.msg, Message::Pong(77));
            break;
        }
    }
    assert_eq!(conn.request(8, Message::Poweroff(())).msg, Message::Ok(()));
    assert!(wait(child).success());
}
