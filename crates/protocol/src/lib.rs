//! The control channel between the microcell host and the guest agent: frames, messages
//! and the handshake. Pure: no I/O, no dependencies; both sides use it.
//!
//! - [`frame`]: the 12-byte header, the payload cap, the incremental [`Decoder`];
//! - [`messages`]: every message, its kind number and the version handshake;
//! - [`wire`]: the compact binary encoding of payloads.

pub mod frame;
pub mod messages;
pub mod wire;

pub use frame::{Decoder, Frame, FrameError, Header, FLAG_FINAL, HEADER_LEN, MAGIC, MAX_PAYLOAD};
pub use messages::*;
pub use wire::Chunk;
