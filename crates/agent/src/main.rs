//! microcell-agent: PID 1 of a microcell guest, or (for tests) a plain process that speaks
//! the control protocol on a given descriptor.
//!
//! ```text
//! microcell-agent                      as PID 1: set up the guest, find the channel, serve
//! microcell-agent --channel-fd N       serve on descriptor N (a socket), as a plain process
//! microcell-agent --stdio              serve on stdin/stdout, as a plain process
//! microcell-agent --channel PATH       serve on a device or FIFO-like path
//!   --no-init                          never act as PID 1 (no mounts; Poweroff exits)
//!   --exec-spec VALUE                  run a boot workload, as `microcell.exec=VALUE` on the
//!                                      kernel command line does (test mode: exits after it)
//! ```

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{Decoder, Message};

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

mod cgroup;
mod channel;
mod exec;
mod fs;
mod init;
mod outq;
mod session;
mod sys;
mod users;
mod watch;
mod workload;

use channel::Channel;
use exec::Fd;
use outq::OutQueue;
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
    exec_spec: Option<String>,
}

const USAGE: &str =
    "usage: microcell-agent [--no-init] [--channel-fd N | --stdio | --channel PATH] [--exec-spec VALUE]";

fn parse_args() -> Result<Args, String> {
    let mut init = sys::getpid() == 1;
    let mut channel = ChannelArg::Discover;
    let mut exec_spec = None;
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
            "--exec-spec" => exec_spec = Some(args.next().ok_or("--exec-spec needs a value")?),
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
    Ok(Args { init, channel, exec_spec })
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

/// Channel discovery (PID 1) on a thread of its own, so that a boot workload runs (and a VM
/// without a channel still ends) while the agent looks; the main loop polls `done`.
struct Discovery {
    done: OwnedFd,
    slot: Arc<Mutex<Option<io::Result<Channel>>>>,
}

impl Discovery {
    fn start(cmdline: init::Cmdline) -> io::Result<Discovery> {
        let (r, w) = sys::pipe()?;
        let slot = Arc::new(Mutex::new(None));
        let s = slot.clone();
        std::thread::Builder::new().name("discovery".into()).spawn(move || {
            let result = channel::discover(&cmdline).and_then(|p| channel::open_retrying(&p));
            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            let _ = sys::write(w.as_raw_fd(), &[1]);
        })?;
        Ok(Discovery { done: r, slot })
    }

    fn take(&self) -> Option<io::Result<Channel>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn run(args: &Args, start_ns: u64) -> io::Result<()> {
    // SIGCHLD is read from a signalfd in the main loop (blocked before any thread starts).
    let sigfd = sys::signalfd(&[libc::SIGCHLD])?;
    let cmdline = if args.init { init::setup() } else { init::Cmdline::default() };
    let cgroups = if args.init { cgroup::Cgroups::setup() } else { cgroup::Cgroups::none("not PID 1 (test mode)") };
    let mut session = Session::new(args.init, start_ns, cgroups);
    session.console_is_channel = matches!(args.channel, ChannelArg::Stdio);
    // Hosts send the spec over the channel (`StartWorkload`); the command line carries one
    // only for a VM without a channel.
    let spec = args.exec_spec.clone().or_else(|| cmdline.get(protocol::workload::CMDLINE_KEY).map(str::to_owned));
    if let Some(v) = spec {
        session.start_workload_from_cmdline(&v);
    }
    let (chan, discovery) = match &args.channel {
        ChannelArg::Discover => (None, Some(Discovery::start(cmdline)?)),
        // SAFETY: the caller handed this descriptor to the agent.
        ChannelArg::Fd(fd) => (Some(unsafe { Channel::from_fd(*fd, format!("fd {fd}"))? }), None),
        ChannelArg::Stdio => (Some(Channel::stdio()?), None),
        ChannelArg::Path(p) => (Some(Channel::open(p)?), None),
    };
    let mut agent = Agent {
        chan: None,
        discovery,
        no_channel: false,
        decoder: Decoder::new(),
        out: OutQueue::default(),
        session,
        sigfd,
        init: args.init,
        host_wait: None,
        backoff: Duration::from_micros(500),
    };
    if let Some(c) = chan {
        agent.attach(c)?;
    }
    let r = agent.serve();
    if !args.init {
        agent.session.shutdown();
    }
    r
}

#[derive(Clone, Copy)]
enum Token {
    Signal,
    Discovery,
    ChanRead,
    ChanWrite,
    Proc(u32, Fd),
}

struct Agent {
    chan: Option<Channel>,
    discovery: Option<Discovery>,
    /// Discovery gave up: there is no host to talk to (a workload still runs).
    no_channel: bool,
    decoder: Decoder,
    out: OutQueue,
    session: Session,
    sigfd: RawFd,
    init: bool,
    /// A virtio port with no host connected reads as end-of-stream and polls as readable:
    /// then wait, with a short back-off, instead of spinning.
    host_wait: Option<Instant>,
    backoff: Duration,
}

impl Agent {
    fn attach(&mut self, chan: Channel) -> io::Result<()> {
        chan.set_nonblocking()?;
        let (release, _) = sys::uname();
        console_line(&format!("microcell-agent ready (kernel {release}) on {}\n", chan.description));
        self.chan = Some(chan);
        Ok(())
    }

    /// Serves the host until it asks for a power-off, the workload has ended and been reported,
    /// or (outside init) the host hangs up.
    fn serve(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut fds: Vec<(RawFd, i16)> = Vec::new();
        let mut tokens: Vec<Token> = Vec::new();
        let mut proc_tokens = Vec::new();
        loop {
            let now = Instant::now();
            self.session.tick(now, &mut self.out);
            if let Some(w) = &self.session.workload {
                if let Some(at) = w.end_at(self.chan.is_some() && !self.no_channel) {
                    if now >= at && (self.out.is_empty() || self.chan.is_none()) {
                        log!("workload ended: {}", if self.init { "powering off" } else { "exiting" });
                        return Ok(());
                    }
                }
            }
            if !self.flush()? {
                return Ok(());
            }

            fds.clear();
            tokens.clear();
            fds.push((self.sigfd, libc::POLLIN));
            tokens.push(Token::Signal);
            if let Some(d) = &self.discovery {
                fds.push((d.done.as_raw_fd(), libc::POLLIN));
                tokens.push(Token::Discovery);
            }
            if let Some(c) = &self.chan {
                if self.host_wait.is_none() && self.out.len() < outq::HARD_LIMIT {
                    fds.push((c.read_fd(), libc::POLLIN));
                    tokens.push(Token::ChanRead);
                }
                if !self.out.is_empty() {
                    fds.push((c.write_fd(), libc::POLLOUT));
                    tokens.push(Token::ChanWrite);
                }
            }
            proc_tokens.clear();
            let first_proc = fds.len();
            self.session.poll_fds(self.out.has_room(), &mut fds, &mut proc_tokens);
            tokens.extend(proc_tokens.iter().map(|&(id, w)| Token::Proc(id, w)));
            debug_assert_eq!(fds.len(), first_proc + proc_tokens.len());

            let mut wake = self.session.next_wake(now);
            if let Some(at) =
                self.session.workload.as_ref().and_then(|w| w.end_at(self.chan.is_some() && !self.no_channel))
            {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if let Some(at) = self.host_wait {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            let timeout = if self.session.reads_ready() && self.out.has_room() {
                0
            } else {
                wake.map_or(-1, |w| w.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1)
            };
            let revents = sys::poll(&fds, timeout)?;
            if self.host_wait.is_some_and(|t| Instant::now() >= t) {
                self.host_wait = None;
            }

            for (i, &tok) in tokens.iter().enumerate() {
                if revents[i] == 0 {
                    continue;
                }
                match tok {
                    Token::Signal => {
                        sys::drain_signalfd(self.sigfd);
                        let now = Instant::now();
                        for (pid, status) in sys::reap_all() {
                            self.session.child_exited(pid, status, now, &mut self.out);
                        }
                        self.session.reaped_all();
                    }
                    Token::Discovery => self.discovered()?,
                    Token::ChanRead => {
                        if self.read_channel(&mut buf)? == Action::Poweroff {
                            self.flush_all();
                            if self.init {
                                log!("powering off");
                                init::power_off();
                            }
                            return Ok(());
                        }
                        if self.chan.is_none() {
                            return Ok(());
                        }
                    }
                    Token::ChanWrite => {}
                    Token::Proc(id, which) => self.session.fd_ready(id, which, &mut self.out),
                }
            }
            if self.out.has_room() {
                self.session.pump_reads(&mut self.out);
            }
        }
    }

    fn discovered(&mut self) -> io::Result<()> {
        let Some(d) = self.discovery.take() else { return Ok(()) };
        match d.take() {
            Some(Ok(chan)) => self.attach(chan),
            Some(Err(e)) if self.session.workload.is_some() => {
                log!("no control channel ({e}): the workload runs on, its status goes to the console only");
                self.no_channel = true;
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => {
                self.discovery = Some(d);
                Ok(())
            }
        }
    }

    /// Writes what the channel takes now; `Ok(false)` when the host is gone in test mode.
    fn flush(&mut self) -> io::Result<bool> {
        let Some(c) = &self.chan else {
            return Ok(true);
        };
        match self.out.flush(c.write_fd()) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                if self.init {
                    self.hung_up();
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Before the end: give the host what is queued (at most a second).
    fn flush_all(&mut self) {
        let Some(c) = &self.chan else { return };
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.out.is_empty() && Instant::now() < deadline {
            match self.out.flush(c.write_fd()) {
                Ok(true) => break,
                Ok(false) => {
                    let _ = sys::poll(&[(c.write_fd(), libc::POLLOUT)], 100);
                }
                Err(_) => break,
            }
        }
    }

    /// The host end closed (init: wait for the next host; test mode: the caller ends).
    fn hung_up(&mut self) {
        if let Err(e) = self.decoder.finish() {
            log!("host hung up: {e}");
        }
        self.decoder.reset();
        self.out.clear();
        self.session.reset();
        if self.init {
            self.backoff = (self.backoff * 2).min(Duration::from_millis(10));
            self.host_wait = Some(Instant::now() + self.backoff);
        } else {
            self.chan = None;
        }
    }

    fn read_channel(&mut self, buf: &mut [u8]) -> io::Result<Action> {
        let Some(chan) = &mut self.chan else { return Ok(Action::Continue) };
        let n = match chan.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Action::Continue),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            self.hung_up();
            return Ok(Action::Continue);
        }
        self.backoff = Duration::from_micros(500);
        let Agent { decoder, session, out, .. } = self;
        let mut action = Action::Continue;
        let mut fatal = None;
        // Frames are decoded in place from the read buffer (no copy into the decoder's).
        decoder.decode_from(&buf[..n], |r| match r {
            Ok(frame) => {
                if session.handle(frame, out) == Action::Poweroff {
                    action = Action::Poweroff;
                    return false;
                }
                true
            }
            Err(e) if e.is_fatal() => {
                fatal = Some(e);
                false
            }
            Err(e) => {
                if let Some(f) = session.frame_error(&e) {
                    out.push(f);
                }
                true
            }
        });
        if let Some(e) = fatal {
            if self.init {
                log!("control channel: {e}");
            }
            self.out.final_msg(0, Message::error(protocol::ErrorCode::MALFORMED, 0, e.to_string()));
            self.flush_all();
            if !self.init {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            self.decoder.reset();
            self.session.reset();
        }
        Ok(action)
    }
}
