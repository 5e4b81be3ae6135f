//! The control channel between the microcell host and the guest agent: frames, messages
//! and the handshake. Both sides use it. Pure (no I/O) except [`tree_fs`], which reads and
//! writes tree streams (the agent in the guest, the host on its own file system; `libc` for
//! the `*at` calls that keep a writer inside its destination).
//!
//! - [`frame`]: the 12-byte header, the payload cap, the incremental [`Decoder`];
//! - [`messages`]: every message, its kind number and the version handshake;
//! - [`wire`]: the compact binary encoding of payloads;
//! - [`tree`]: the stream format of directory trees (`ReadTree` / `WriteTree`);
//! - [`workload`]: the boot workload spec (`microcell.exec=`) and its console status line;
//! - [`errno`]: Linux errno, signal and rlimit names.

pub mod errno;
pub mod frame;
pub mod messages;
pub mod tree;
pub mod tree_fs;
pub mod wire;
pub mod workload;

pub use frame::{Decoder, Frame, FrameError, Header, FLAG_FINAL, HEADER_LEN, MAGIC, MAX_PAYLOAD};
pub use messages::*;
pub use wire::Chunk;
