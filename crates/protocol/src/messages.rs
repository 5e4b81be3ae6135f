//! The messages of the control channel and their kinds.
//!
//! Every frame carries an `id`: the request or stream it belongs to. The host picks ids for
//! its requests (`0` is reserved for the handshake); everything the guest sends about a
//! request (a response, output chunks, the exit) carries the request's id.
//!
//! | kind | message | direction | answer |
//! |---|---|---|---|
//! | `0x0001` | [`Hello`] | host → guest | [`Ready`] or [`ErrorMsg`] |
//! | `0x0002` | [`Ready`] | guest → host | |
//! | `0x0003` | `Ping(u64)` | host → guest | `Pong` with the same nonce |
//! | `0x0004` | `Pong(u64)` | guest → host | |
//! | `0x0005` | [`ErrorMsg`] | both | the request with this id failed |
//! | `0x0006` | `Ok` | guest → host | the request with this id succeeded |
//! | `0x0007` | `Poweroff` | host → guest | `Ok`, then the VM ends |
//! | `0x0008` | `Cancel` | host → guest | none: (on a `ReadFile`/`ReadTree` id) the agent closes that reader and forgets the id ([`features::CANCEL`]) |
//! | `0x0100` | [`Exec`] | host → guest | [`Started`] or [`ErrorMsg`], later [`Exit`] |
//! | `0x0101` | [`Started`] | guest → host | |
//! | `0x0102` | `Stdin(Chunk)` | host → guest | |
//! | `0x0103` | `Stdout(Chunk)` | guest → host | |
//! | `0x0104` | `Stderr(Chunk)` | guest → host | |
//! | `0x0105` | `CloseStdin` | host → guest | |
//! | `0x0106` | [`Exit`] | guest → host | last frame of the exec |
//! | `0x0107` | [`Signal`] | host → guest | |
//! | `0x0108` | [`Credit`] | both | |
//! | `0x0109` | [`Resize`] | host → guest | |
//! | `0x0200` | [`ReadFile`] | host → guest | `FileData` chunks (last one `FLAG_FINAL`) or [`ErrorMsg`] |
//! | `0x0201` | [`WriteFile`] | host → guest | host then sends `FileData` chunks (last `FLAG_FINAL`); `Ok` |
//! | `0x0202` | [`Stat`] | host → guest | [`StatResult`] |
//! | `0x0203` | [`ReadDir`] | host → guest | [`DirEntries`] |
//! | `0x0204` | [`Mkdir`] | host → guest | `Ok` |
//! | `0x0205` | [`Remove`] | host → guest | `Ok` |
//! | `0x0206` | [`Rename`] | host → guest | `Ok` |
//! | `0x0207` | [`ReadTree`] | host → guest | `FileData` chunks of a [`crate::tree`] stream (last `FLAG_FINAL`) or [`ErrorMsg`] |
//! | `0x0208` | [`WriteTree`] | host → guest | `Credit{File}` (go ahead), the host sends a tree stream as `FileData`; `Ok` |
//! | `0x0210` | `FileData(Chunk)` | both | |
//! | `0x0211` | [`StatResult`] | guest → host | |
//! | `0x0212` | [`DirEntries`] | guest → host | |
//! | `0x0213` | [`Watch`] | host → guest | [`WatchEvent`]s (the first: `READY`, once watching) until the host's `Unwatch`, then `Ok`; or [`ErrorMsg`] |
//! | `0x0214` | [`WatchEvent`] | guest → host | |
//! | `0x0215` | `Unwatch` | host → guest | (on the watch's id) the agent stops and answers `Ok` |
//! | `0x0300` | `WaitWorkload` | host → guest | [`WorkloadExit`] when the boot workload ended, or [`ErrorMsg`] |
//! | `0x0301` | [`WorkloadExit`] | guest → host | |
//! | `0x0302` | `SignalWorkload(`[`Signal`]`)` | host → guest | `Ok`, or [`ErrorMsg`] (`BAD_STATE`: no workload, or it has ended) |
//! | `0x0303` | `StartWorkload(`[`WorkloadSpec`]`)` | host → guest | `Ok` once started (a program that cannot start is reported by `WaitWorkload`), or [`ErrorMsg`] (`BAD_STATE`: one was started already) |
//!
//! ## Streams and flow control
//! A request that streams keeps its id for every frame about it; the last frame the sender
//! sends for it carries `FLAG_FINAL` (an `Exit`, the last `FileData`, or an `Error` that ends the
//! request). An `Error` *without* `FLAG_FINAL` on a stream id complains about one frame (e.g.
//! `Stdin` for an exec without a stdin pipe) and does not end the stream.
//!
//! Every byte stream is sent only within the window its receiver granted:
//! - guest → host (`Stdout`, `Stderr`, `FileData` of `ReadFile`/`ReadTree`): the request's
//!   `window` to start with, plus every [`Credit`] the host sends since (per stream);
//! - host → guest (`Stdin`, `FileData` of `WriteFile`/`WriteTree`): nothing until the agent
//!   grants it with a [`Credit`] (`Stdin`: right after `Started`; `File`: as the answer that
//!   the file is open), then what later `Credit`s add.
//!
//! So a receiver buffers at most its window per stream, and a stream whose reader stops
//! stalls only itself (its producer stops reading its pipe or file), never the channel.
//! A host that gives up on a guest → host file stream before its end sends `Cancel` on its id
//! (agents with [`features::CANCEL`]): the agent closes the reader; what it had queued before
//! still arrives and the host drops it.

use crate::wire::{Chunk, Reader, Wire, WireResult};
use crate::wire_struct;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version this crate still speaks (version 1 had no exec/fs payloads in use, and
/// its `Exec`, `Exit`, `ErrorMsg`, `WriteFile`, `StatResult` and `DirEntry` were shorter).
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// host → guest, id 0: the first frame on a fresh channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The newest protocol version the host speaks.
    pub version: u16,
    /// The oldest protocol version the host speaks.
    pub min_version: u16,
    /// Who is talking, e.g. `microcell-sandbox 0.1.0`.
    pub client: String,
    /// The host's wall clock (ns since the Unix epoch); the guest sets its clock from it
    /// (microVMs have no RTC). `0`: leave the clock alone.
    pub realtime_ns: u64,
    /// Fresh random bytes from the host. The guest mixes them into its RNG and reseeds from
    /// them at once: clones restored from one snapshot would otherwise start from the same
    /// RNG state and hand out the same "random" numbers. Empty: leave the RNG alone.
    pub entropy: Vec<u8>,
}
// `entropy` came after the first v2 agents: it is written only when there is some, and a Hello
// that ends before it decodes with none, so hosts and agents from either side of that change
// still shake hands (and every Hello keeps exactly one encoding: an empty list is not written).
impl crate::wire::Wire for Hello {
    fn put(&self, out: &mut Vec<u8>) {
        self.version.put(out);
        self.min_version.put(out);
        self.client.put(out);
        self.realtime_ns.put(out);
        if !self.entropy.is_empty() {
            self.entropy.put(out);
        }
    }
    fn get(r: &mut crate::wire::Reader<'_>) -> crate::wire::WireResult<Self> {
        use crate::wire::Wire;
        Ok(Hello {
            version: Wire::get(r)?,
            min_version: Wire::get(r)?,
            client: Wire::get(r)?,
            realtime_ns: Wire::get(r)?,
            entropy: if r.remaining() > 0 {
                let e: Vec<u8> = Wire::get(r)?;
                if e.is_empty() {
                    return Err("an empty entropy list is written as none");
                }
                e
            } else {
                Vec::new()
            },
        })
    }
}

/// guest → host, id 0: the answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The version both sides will speak from now on.
    pub version: u16,
    /// e.g. `microcell-agent 0.1.0`.
    pub agent: String,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    pub hostname: String,
    /// CLOCK_BOOTTIME when the agent answered (ns since the guest kernel started).
    pub boot_ns: u64,
    /// CLOCK_BOOTTIME when the agent (PID 1) started.
    pub agent_start_ns: u64,
    /// Capability bits, see [`features`].
    pub features: u64,
}
wire_struct!(Ready { version, agent, kernel_release, hostname, boot_ns, agent_start_ns, features });

/// Bits of [`Ready::features`].
pub mod features {
    /// The agent runs as PID 1 of a VM (not a test process on a host).
    pub const INIT: u64 = 1 << 0;
    /// `Exec` and its streams are implemented.
    pub const EXEC: u64 = 1 << 1;
    /// The fs messages are implemented.
    pub const FS: u64 = 1 << 2;
    /// The agent runs a boot workload (started by `StartWorkload`, or `microcell.exec=` on the
    /// kernel command line of a VM without a control channel).
    pub const WORKLOAD: u64 = 1 << 3;
    /// The agent takes its boot workload over the channel (`StartWorkload`): the spec, its
    /// environment with it, never goes on the kernel command line, where the host's
    /// `/proc/<pid>/cmdline` of QEMU and the guest's `/proc/cmdline` would show it.
    pub const START_WORKLOAD: u64 = 1 << 4;
    /// The agent takes `Cancel` for a read stream the host abandons (a limit reached, an error
    /// on the host's side, a reader dropped): it closes the file or tree reader at once instead
    /// of holding it, and up to one window of credit, until the channel closes. Hosts send
    /// `Cancel` only to agents with this bit (an older one would answer `UNKNOWN_KIND`).
    pub const CANCEL: u64 = 1 << 5;
}

/// An error answer to the request with the frame's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    /// One of [`ErrorCode`]'s constants (kept as a number: a newer peer may send others).
    pub code: ErrorCode,
    /// The OS error number behind it, `0` if none (Linux numbering; see [`crate::errno`]).
    pub errno: i32,
    pub message: String,
    /// The guest path the error is about, when there is one.
    pub path: Option<String>,
}
wire_struct!(ErrorMsg { code, errno, message, path });

/// Error codes of [`ErrorMsg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The frame's kind is not one the receiver knows.
    pub const UNKNOWN_KIND: ErrorCode = ErrorCode(1);
    /// The frame's payload did not decode.
    pub const MALFORMED: ErrorCode = ErrorCode(2);
    /// Known, but not implemented by this agent.
    pub const UNSUPPORTED: ErrorCode = ErrorCode(3);
    /// No protocol version in common.
    pub const VERSION: ErrorCode = ErrorCode(4);
    /// An OS call failed (`errno` says which error).
    pub const IO: ErrorCode = ErrorCode(5);
    /// The request does not fit the state (e.g. no handshake yet, unknown stream id).
    pub const BAD_STATE: ErrorCode = ErrorCode(6);
    /// Something is larger than the receiver allows.
    pub const TOO_LARGE: ErrorCode = ErrorCode(7);
    /// A bug on the receiving side.
    pub const INTERNAL: ErrorCode = ErrorCode(8);
    /// A request whose values do not make sense (empty argv, a relative path, ...).
    pub const INVALID: ErrorCode = ErrorCode(9);
}

impl Wire for ErrorCode {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out)
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        u16::get(r).map(ErrorCode)
    }
}

/// Terminal size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}
wire_struct!(TtySize { rows, cols });

/// A resource limit for a process (`setrlimit(2)`): `resource` is Linux's `RLIMIT_*` number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    /// `u64::MAX`: unlimited (`RLIM_INFINITY`).
    pub soft: u64,
    pub hard: u64,
}
wire_struct!(Rlimit { resource, soft, hard });

/// host → guest: run a process. The frame id names it for all later frames.
///
/// The process runs in a session and process group of its own (`setsid`); the agent answers
/// [`Started`] (then, with `stdin`, a `Credit{Stdin}`), streams `Stdout`/`Stderr` within the
/// window, and ends with [`Exit`] (`FLAG_FINAL`) once the process has exited and its pipes are
/// drained — or, for pipes that a daemonised grandchild keeps open, a short grace period after
/// the exit. A process that cannot start is one `Error` (`FLAG_FINAL`) with its errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    /// `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Added to (or, with `clear_env`, replacing) the agent's environment.
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<String>,
    /// A user name (looked up in the guest's `/etc/passwd` and `/etc/group`, no NSS), or
    /// `"uid"` / `"uid:gid"` in digits. A name also sets `HOME`, `USER` and `LOGNAME` unless
    /// `env` does.
    pub user: Option<String>,
    /// Override the user's uid / gid.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Run on a new pseudo-terminal of this size (stdout and stderr merge into `Stdout`).
    pub tty: Option<TtySize>,
    /// `false`: stdin is `/dev/null`.
    pub stdin: bool,
    /// Bytes of output the host accepts before its first [`Credit`], per output stream.
    pub window: u32,
    /// Kill the process group (SIGKILL) this long after the start; [`Exit::timed_out`] says so.
    pub timeout_ms: Option<u64>,
    /// Applied in the child before it runs.
    pub rlimits: Vec<Rlimit>,
}
wire_struct!(Exec { argv, env, clear_env, cwd, user, uid, gid, tty, stdin, window, timeout_ms, rlimits });

/// guest → host: the process of [`Exec`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
}
wire_struct!(Started { pid });

/// guest → host: the process ended (after all its output frames).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// CLOCK_MONOTONIC time from spawn to exit.
    pub duration_ns: u64,
    /// The exec's `timeout_ms` passed and the agent killed its process group.
    pub timed_out: bool,
}
wire_struct!(Exit { code, signal, duration_ns, timed_out });

/// host → guest: send a signal to the process (group) of an exec, or (`SignalWorkload`) of the
/// boot workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    pub signal: i32,
    /// Signal the whole process group, not only the process.
    pub group: bool,
}
wire_struct!(Signal { signal, group });

/// Which stream of a request a [`Credit`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    File,
}

impl Wire for StreamKind {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(match self {
            StreamKind::Stdin => 0,
            StreamKind::Stdout => 1,
            StreamKind::Stderr => 2,
            StreamKind::File => 3,
        })
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        Ok(match r.byte()? {
            0 => StreamKind::Stdin,
            1 => StreamKind::Stdout,
            2 => StreamKind::Stderr,
            3 => StreamKind::File,
            _ => return Err("unknown stream kind"),
        })
    }
}

/// The receiver of a stream grants the sender `bytes` more of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credit {
    pub stream: StreamKind,
    pub bytes: u32,
}
wire_struct!(Credit { stream, bytes });

/// host → guest: the terminal of a tty exec changed size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    pub size: TtySize,
}
wire_struct!(Resize { size });

/// host → guest: stream a file's bytes as `FileData` (the last chunk `FLAG_FINAL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadFile {
    pub path: String,
    pub offset: u64,
    /// At most this many bytes; `None`: to the end.
    pub len: Option<u64>,
    /// Bytes the host accepts before its first [`Credit`].
    pub window: u32,
}
wire_struct!(ReadFile { path, offset, len, window });

/// host → guest: write a file from `FileData` frames (the last one `FLAG_FINAL`).
///
/// The agent opens the file and answers `Credit{File}` (the window it accepts) or an `Error`;
/// the host sends no data before that credit. After the final chunk the agent answers `Ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFile {
    pub path: String,
    /// Permission bits (`0o7777` at most), set exactly (no umask). `None`: `0o644` for a new
    /// file, an existing file keeps its own.
    pub mode: Option<u32>,
    pub append: bool,
    /// Create missing parent directories.
    pub parents: bool,
}
wire_struct!(WriteFile { path, mode, append, parents });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub path: String,
    /// Follow a final symlink.
    pub follow: bool,
}
wire_struct!(Stat { path, follow });

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

impl Wire for FileType {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(match self {
            FileType::File => 0,
            FileType::Dir => 1,
            FileType::Symlink => 2,
            FileType::Other => 3,
        })
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        Ok(match r.byte()? {
            0 => FileType::File,
            1 => FileType::Dir,
            2 => FileType::Symlink,
            3 => FileType::Other,
            _ => return Err("unknown file type"),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatResult {
    pub file_type: FileType,
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Where a symlink points (when it is one and `follow` was false).
    pub link_target: Option<String>,
}
wire_struct!(StatResult { file_type, size, mode, uid, gid, mtime_ns, link_target });

/// host → guest: report changes under `path` (a directory; its subdirectories too with
/// `recursive`, including ones made later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    pub path: String,
    pub recursive: bool,
}
wire_struct!(Watch { path, recursive });

/// guest → host: one change ([`watch_kind`]) of the guest path `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: u8,
    pub path: String,
}
wire_struct!(WatchEvent { kind, path });

/// The kinds of [`WatchEvent`].
pub mod watch_kind {
    /// Watching has begun (`path`: the watched directory); nothing before it is reported.
    pub const READY: u8 = 0;
    pub const CREATE: u8 = 1;
    /// Written (and closed after writing).
    pub const WRITE: u8 = 2;
    pub const REMOVE: u8 = 3;
    /// Renamed: one event for the old name, one for the new.
    pub const RENAME: u8 = 4;
    /// Mode, owner or times changed.
    pub const CHMOD: u8 = 5;
    /// Changes were lost (the guest's event queue overflowed while the host read slowly).
    pub const OVERFLOW: u8 = 6;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadDir {
    pub path: String,
}
wire_struct!(ReadDir { path });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    /// From `lstat`: a symlink is `Symlink`, whatever it points to.
    pub file_type: FileType,
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    pub mtime_ns: i64,
}
wire_struct!(DirEntry { name, file_type, size, mode, mtime_ns });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntries {
    pub entries: Vec<DirEntry>,
}
wire_struct!(DirEntries { entries });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mkdir {
    pub path: String,
    pub mode: u32,
    pub parents: bool,
}
wire_struct!(Mkdir { path, mode, parents });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remove {
    pub path: String,
    pub recursive: bool,
}
wire_struct!(Remove { path, recursive });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rename {
    pub from: String,
    pub to: String,
}
wire_struct!(Rename { from, to });

/// host → guest: stream the file, directory tree or symlink at `path` as a [`crate::tree`]
/// stream in `FileData` chunks (the last one `FLAG_FINAL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadTree {
    pub path: String,
    /// Bytes the host accepts before its first [`Credit`].
    pub window: u32,
}
wire_struct!(ReadTree { path, window });

/// host → guest: create what a [`crate::tree`] stream describes at `path` (its root entry
/// becomes `path`). Flow as [`WriteFile`]: `Credit{File}`, `FileData`..., `Ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteTree {
    pub path: String,
    /// Create missing parent directories of `path`.
    pub parents: bool,
}
wire_struct!(WriteTree { path, parents });

/// guest → host: how the boot workload (`microcell.exec=`) ended.
/// What the boot workload runs (sent in `StartWorkload`, or on the kernel command line:
/// [`crate::workload`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// `argv[0]` is the program (a path, or a name looked up in `PATH`).
    pub argv: Vec<String>,
    /// Added to the agent's environment (`PATH`, `HOME`).
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub rlimits: Vec<Rlimit>,
    /// As [`crate::Exec::user`].
    pub user: Option<String>,
}
wire_struct!(WorkloadSpec { argv, env, cwd, rlimits, user });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadExit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// From spawn to exit.
    pub duration_ns: u64,
    /// Why it could not start (then `code` and `signal` are `None`).
    pub error: Option<ErrorMsg>,
}
wire_struct!(WorkloadExit { code, signal, duration_ns, error });

/// Why a payload did not become a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageError {
    UnknownKind(u16),
    Malformed(&'static str),
}

macro_rules! messages {
    ($( $kind:literal $konst:ident => $variant:ident($ty:ty) ),* $(,)?) => {
        /// A decoded frame payload.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $( $variant($ty), )*
        }

        /// The `kind` field of each message.
        pub mod kind {
            $( pub const $konst: u16 = $kind; )*
            /// Every kind this crate knows.
            pub const ALL: &[u16] = &[$($kind),*];
        }

        impl Message {
            pub fn kind(&self) -> u16 {
                match self {
                    $( Message::$variant(_) => $kind, )*
                }
            }

            /// A short name for logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Message::$variant(_) => stringify!($variant), )*
                }
            }

            /// Appends the payload (not the header) to `out`.
            pub fn encode_payload(&self, out: &mut Vec<u8>) {
                match self {
                    $( Message::$variant(m) => m.put(out), )*
                }
            }

            /// Decodes the payload of a frame of kind `kind`; the payload must be consumed
            /// exactly.
            pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, MessageError> {
                let mut r = Reader::new(payload);
                let msg = match kind {
                    $( $kind => Message::$variant(<$ty>::get(&mut r).map_err(MessageError::Malformed)?), )*
                    _ => return Err(MessageError::UnknownKind(kind)),
                };
                r.finish().map_err(MessageError::Malformed)?;
                Ok(msg)
            }
        }
    };
}

messages! {
    0x0001 HELLO => Hello(Hello),
    0x0002 READY => Ready(Ready),
    0x0003 PING => Ping(u64),
    0x0004 PONG => Pong(u64),
    0x0005 ERROR => Error(ErrorMsg),
    0x0006 OK => Ok(()),
    0x0007 POWEROFF => Poweroff(()),
    0x0008 CANCEL => Cancel(()),
    0x0100 EXEC => Exec(Exec),
    0x0101 STARTED => Started(Started),
    0x0102 STDIN => Stdin(Chunk),
    0x0103 STDOUT => Stdout(Chunk),
    0x0104 STDERR => Stderr(Chunk),
    0x0105 CLOSE_STDIN => CloseStdin(()),
    0x0106 EXIT => Exit(Exit),
    0x0107 SIGNAL => Signal(Signal),
    0x0108 CREDIT => Credit(Credit),
    0x0109 RESIZE => Resize(Resize),
    0x0200 READ_FILE => ReadFile(ReadFile),
    0x0201 WRITE_FILE => WriteFile(WriteFile),
    0x0202 STAT => Stat(Stat),
    0x0203 READ_DIR => ReadDir(ReadDir),
    0x0204 MKDIR => Mkdir(Mkdir),
    0x0205 REMOVE => Remove(Remove),
    0x0206 RENAME => Rename(Rename),
    0x0207 READ_TREE => ReadTree(ReadTree),
    0x0208 WRITE_TREE => WriteTree(WriteTree),
    0x0210 FILE_DATA => FileData(Chunk),
    0x0211 STAT_RESULT => StatResult(StatResult),
    0x0212 DIR_ENTRIES => DirEntries(DirEntries),
    0x0213 WATCH => Watch(Watch),
    0x0214 WATCH_EVENT => WatchEvent(WatchEvent),
    0x0215 UNWATCH => Unwatch(()),
    0x0300 WAIT_WORKLOAD => WaitWorkload(()),
    0x0301 WORKLOAD_EXIT => WorkloadExit(WorkloadExit),
    0x0302 SIGNAL_WORKLOAD => SignalWorkload(Signal),
    0x0303 START_WORKLOAD => StartWorkload(WorkloadSpec),
}

impl Message {
    /// An error answer.
    pub fn error(code: ErrorCode, errno: i32, message: impl Into<String>) -> Message {
        Message::Error(ErrorMsg { code, errno, message: message.into(), path: None })
    }

    /// Whether the host sends this kind (the agent refuses the others).
    pub fn is_host_to_guest(&self) -> bool {
        !matches!(
            self,
            Message::Ready(_)
                | Message::Pong(_)
                | Message::Ok(_)
                | Message::Started(_)
                | Message::Stdout(_)
                | Message::Stderr(_)
                | Message::Exit(_)
                | Message::StatResult(_)
                | Message::DirEntries(_)
                | Message::WatchEvent(_)
                | Message::WorkloadExit(_)
        )
    }
}

/// The version to speak with a peer that sent `hello`, or why there is none.
pub fn negotiate(hello: &Hello) -> Result<u16, ErrorMsg> {
    let version = hello.version.min(PROTOCOL_VERSION);
    if hello.min_version > hello.version || version < hello.min_version.max(MIN_PROTOCOL_VERSION) {
        return Err(ErrorMsg {
            code: ErrorCode::VERSION,
            errno: 0,
            message: format!(
                "no common protocol version: host speaks {}..={}, agent speaks {}..={}",
                hello.min_version, hello.version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
            ),
            path: None,
        });
    }
    Ok(version)
}
