//! microcell-agent: PID 1 of a microcell guest, or (for tests) a plain process that speaks
//! the control protocol on a given descriptor.
//!
//! ```text
//! microcell-agent                      as PID 1: set up the guest, find the channel, serve
//! microcell-agent --channel-fd N       serve on descriptor N (a socket), as a plain process
//! microcell-agent --stdio              serve on stdin/stdout, as a plain process
//! microcell-agent --channel PATH       serve on a device or FIFO-like path
//!   --no-init                          never act as PID 1 (no mounts; Poweroff exits)
//! ```

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use protocol::{Decoder, Frame, FrameError, Message};

/// One line on stderr (the console, as PID 1), written with a single write(2).
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::console_line(&format!("microcell-agent: {}\n", format_args!($($arg)*)))
    };
}

fn console_line(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(line.as_bytes());
}


mod channel;
mod init;
mod session;
mod sys;

use channel::Channel;
use session::{Action, Session};

enum ChannelArg {
    Discover,
    Fd(RawFd),
    Stdio,
    Path(PathBuf),
}

struct Args {
    init: bool,
    channel: ChannelArg,
}

const USAGE: &str = "usage: microcell-agent [--no-init] [--channel-fd N | --stdio | --channel PATH]";

fn parse_args() -> Result<Args, String> {
    let mut init = sys::getpid() == 1;
    let mut channel = ChannelArg::Discover;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--no-init" => init = false,
            "--stdio" => channel = ChannelArg::Stdio,
            "--channel-fd" => {
                let n = args.next().ok_or("--channel-fd needs a number")?;
                channel = ChannelArg::Fd(n.parse().map_err(|_| format!("bad descriptor {n:?}"))?);
            }
            "--channel" => channel = ChannelArg::Path(args.next().ok_or("--channel needs a path")?.into()),
            "--version" => {
                println!("microcell-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown command-line words to init as arguments.
            _ if init => {}
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    if !init && matches!(channel, ChannelArg::Discover) {
        return Err(format!("not PID 1: say which channel to use\n{USAGE}"));
    }
    Ok(Args { init, channel })
}

fn main() -> ExitCode {
    let start_ns = sys::clock_ns(libc::CLOCK_BOOTTIME);
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.init {
        init::install_panic_hook();
    }
    let result = run(&args, start_ns);
    match (&result, args.init) {
        (Ok(()), false) => ExitCode::SUCCESS,
        (Err(e), false) => {
            log!("{e}");
            ExitCode::FAILURE
        }
        (r, true) => {
            if let Err(e) = r {
                log!("{e}");
            }
            init::power_off()
        }
    }
}

fn run(args: &Args, start_ns: u64) -> io::Result<()> {
    let (cmdline, sigfd) = if args.init {
        (init::setup(), Some(sys::signalfd(&[libc::SIGCHLD])?))
    } else {
        (init::Cmdline::default(), None)
    };
    let mut chan = match &args.channel {
        ChannelArg::Discover => {
            let path = channel::discover(&cmdline)?;
            channel::open_retrying(&path)?
        }
        // SAFETY: the caller handed this descriptor to the agent.
        ChannelArg::Fd(fd) => unsafe { Channel::from_fd(*fd, format!("fd {fd}"))? },
        ChannelArg::Stdio => Channel::stdio()?,
        ChannelArg::Path(p) => Channel::open(p)?,
    };
    let (release, _) = sys::uname();
    console_line(&format!("microcell-agent ready (kernel {release}) on {}\n", chan.description));
    serve(&mut chan, Session::new(args.init, start_ns), sigfd, args.init)
}

/// Serves the host until it asks for a power-off (or, outside init, until it hangs up).
fn serve(chan: &mut Channel, mut session: Session, sigfd: Option<RawFd>, init: bool) -> io::Result<()> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out_frames = Vec::new();
    let mut out = Vec::new();
    // A virtio port with no host connected reads as end-of-stream and polls as readable:
    // then wait, with a short back-off, instead of spinning.
    let mut host_wait: Option<Duration> = None;
    let mut backoff = Duration::from_micros(500);
    loop {
        let mut fds = Vec::with_capacity(2);
        if let Some(s) = sigfd {
            fds.push((s, libc::POLLIN));
        }
        let chan_slot = host_wait.is_none().then(|| {
            fds.push((chan.read_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let timeout = host_wait.map_or(-1, |d| d.as_millis() as i32);
        let revents = sys::poll(&fds, timeout)?;
        if let Some(s) = sigfd {
            if revents[0] != 0 {
                sys::drain_signalfd(s);
                for (pid, status) in sys::reap_all() {
                    session.child_exited(pid, status);
                }
            }
        }
        let Some(slot) = chan_slot else {
            // The back-off is over: look at the channel again.
            host_wait = None;
            continue;
        };
        if revents[slot] == 0 {
            continue;
        }
        let n = chan.read(&mut buf)?;
        if n == 0 {
            if let Err(e) = decoder.finish() {
                log!("host hung up: {e}");
            }
            if !init {
                return Ok(());
            }
            decoder.reset();
            session.reset();
            backoff = (backoff * 2).min(Duration::from_millis(10));
            host_wait = Some(backoff);
            continue;
        }
        backoff = Duration::from_micros(500);
        decoder.feed(&buf[..n]);
        let mut action = Action::Continue;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if session.handle(frame, &mut out_frames) == Action::Poweroff {
                        action = Action::Poweroff;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    if init {
                        log!("control channel: {e}");
                    }
                    out_frames.push(Frame::new(0, Message::error(protocol::ErrorCode::MALFORMED, 0, e.to_string())));
                    flush(chan, &mut out_frames, &mut out)?;
                    if !init {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    decoder.reset();
                    session.reset();
                    break;
                }
                Err(e) => out_frames.extend(session.frame_error(&e)),
            }
        }
        flush(chan, &mut out_frames, &mut out)?;
        if action == Action::Poweroff {
            if init {
                log!("powering off");
                init::power_off();
            }
            return Ok(());
        }
    }
}

fn flush(chan: &mut Channel, frames: &mut Vec<Frame>, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    for f in frames.drain(..) {
        if let Err(e) = f.encode(out) {
            // Only a reply over the cap can fail; say so instead.
            debug_assert!(matches!(e, FrameError::TooLarge { .. }));
            Frame::new(f.id, Message::error(protocol::ErrorCode::TOO_LARGE, 0, e.to_string())).encode(out).expect("small frame");
        }
    }
    if !out.is_empty() {
        chan.write_all(out)?;
    }
    Ok(())
}
