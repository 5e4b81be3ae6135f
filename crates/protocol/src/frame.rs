//! Frames: a fixed 12-byte header and a payload.
//!
//! ```text
//! offset  size  field
//!      0     1  magic: 0xC1 ("microcell frame format 1"; a new format takes a new byte)
//!      1     1  flags: bit 0 FLAG_FINAL; other bits must be 0
//!      2     2  kind     (u16, little endian)  -> crate::messages::kind
//!      4     4  id       (u32, little endian)  request / stream id
//!      8     4  length   (u32, little endian)  payload bytes, at most MAX_PAYLOAD
//!     12     …  payload  (crate::wire encoding of the message)
//! ```

use std::fmt;

use crate::messages::{Message, MessageError};

/// First byte of every frame.
pub const MAGIC: u8 = 0xC1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 12;
/// The largest payload either side sends or accepts (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The sender sends no more frames with this id (end of a stream).
pub const FLAG_FINAL: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_FINAL;

/// One frame: the message plus the header fields that are not derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: u32,
    pub flags: u8,
    pub msg: Message,
}

impl Frame {
    pub fn new(id: u32, msg: Message) -> Frame {
        Frame { id, flags: 0, msg }
    }

    pub fn with_flags(mut self, flags: u8) -> Frame {
        self.flags = flags;
        self
    }

    pub fn is_final(&self) -> bool {
        self.flags & FLAG_FINAL != 0
    }

    /// Appends the encoded frame to `out`. On error `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        self.msg.encode_payload(out);
        let len = out.len() - start - HEADER_LEN;
        let kind = self.msg.kind();
        if len > MAX_PAYLOAD {
            out.truncate(start);
            return Err(FrameError::TooLarge { len: len as u64, max: MAX_PAYLOAD as u32 });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            out.truncate(start);
            return Err(FrameError::UnknownFlags { id: self.id, kind, flags: self.flags });
        }
        let header = Header { flags: self.flags, kind, id: self.id, len: len as u32 };
        out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(())
    }

    /// The encoded frame as a new vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FrameError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }
}

/// The fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub kind: u16,
    pub id: u32,
    pub len: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses a header; fails on a bad magic byte or a length over `max_payload` (the two
    /// errors after which the byte stream cannot be trusted any more).
    pub fn parse(b: &[u8; HEADER_LEN], max_payload: usize) -> Result<Header, FrameError> {
        if b[0] != MAGIC {
            return Err(FrameError::BadMagic(b[0]));
        }
        let h = Header {
            flags: b[1],
            kind: u16::from_le_bytes([b[2], b[3]]),
            id: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        };
        if h.len as usize > max_payload {
            return Err(FrameError::TooLarge { len: u64::from(h.len), max: max_payload as u32 });
        }
        Ok(h)
    }
}

/// What went wrong with a frame.
///
/// [`FrameError::is_fatal`] errors (bad magic, over the cap, truncated at the end) leave the
/// byte stream unusable: the channel should be dropped. The others name the frame
/// (`id`, `kind`), which was skipped whole; decoding goes on with the next frame, and a
/// receiver answers the request with an error frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The first byte of a header was not [`MAGIC`].
    BadMagic(u8),
    /// A payload length over the cap.
    TooLarge { len: u64, max: u32 },
    /// The stream ended inside a frame.
    Truncated { buffered: usize },
    /// Flag bits this version does not know.
    UnknownFlags { id: u32, kind: u16, flags: u8 },
    /// A kind this version does not know.
    UnknownKind { id: u32, kind: u16 },
    /// A known kind whose payload did not decode.
    Malformed { id: u32, kind: u16, reason: &'static str },
}

impl FrameError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::BadMagic(_) | FrameError::TooLarge { .. } | FrameError::Truncated { .. })
    }

    /// The id of the skipped frame, for non-fatal errors.
    pub fn frame_id(&self) -> Option<u32> {
        match *self {
            FrameError::UnknownFlags { id, .. }
            | FrameError::UnknownKind { id, .. }
            | FrameError::Malformed { id, .. } => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic(b) => write!(f, "bad frame magic 0x{b:02x} (expected 0x{MAGIC:02x})"),
            FrameError::TooLarge { len, max } => write!(f, "frame payload of {len} bytes exceeds the cap of {max}"),
            FrameError::Truncated { buffered } => write!(f, "stream ended inside a frame ({buffered} bytes buffered)"),
            FrameError::UnknownFlags { id, kind, flags } => {
                write!(f, "frame id {id} kind 0x{kind:04x} has unknown flags 0x{flags:02x}")
            }
            FrameError::UnknownKind { id, kind } => write!(f, "frame id {id} has unknown kind 0x{kind:04x}"),
            FrameError::Malformed { id, kind, reason } => {
                write!(f, "frame id {id} kind 0x{kind:04x} is malformed: {reason}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Decodes frames from a byte stream that arrives in arbitrary pieces.
///
/// ```
/// use protocol::{Decoder, Frame, Message};
/// let bytes = Frame::new(7, Message::Ping(42)).to_bytes().unwrap();
/// let mut d = Decoder::new();
/// d.feed(&bytes[..5]);
/// assert_eq!(d.next_frame(), Ok(None));
/// d.feed(&bytes[5..]);
/// assert_eq!(d.next_frame(), Ok(Some(Frame::new(7, Message::Ping(42)))));
/// ```
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    max_payload: usize,
    failed: Option<FrameError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

/// One decoding step over the bytes available.
enum Step {
    /// No complete frame yet.
    Need,
    /// The stream cannot be trusted any more.
    Fatal(FrameError),
    /// A frame (or why it was skipped) and the bytes it took.
    Frame(Result<Frame, FrameError>, usize),
}

fn step(avail: &[u8], max_payload: usize) -> Step {
    let Some(hb) = avail.first_chunk::<HEADER_LEN>() else {
        // Reject garbage as soon as its first byte is seen.
        return match avail.first() {
            Some(&b) if b != MAGIC => Step::Fatal(FrameError::BadMagic(b)),
            _ => Step::Need,
        };
    };
    let h = match Header::parse(hb, max_payload) {
        Ok(h) => h,
        Err(e) => return Step::Fatal(e),
    };
    let end = HEADER_LEN + h.len as usize;
    if avail.len() < end {
        return Step::Need;
    }
    if h.flags & !KNOWN_FLAGS != 0 {
        return Step::Frame(Err(FrameError::UnknownFlags { id: h.id, kind: h.kind, flags: h.flags }), end);
    }
    let r = match Message::decode(h.kind, &avail[HEADER_LEN..end]) {
        Ok(msg) => Ok(Frame { id: h.id, flags: h.flags, msg }),
        Err(MessageError::UnknownKind(kind)) => Err(FrameError::UnknownKind { id: h.id, kind }),
        Err(MessageError::Malformed(reason)) => Err(FrameError::Malformed { id: h.id, kind: h.kind, reason }),
    };
    Step::Frame(r, end)
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::with_max_payload(MAX_PAYLOAD)
    }

    /// A decoder with a smaller (or larger) payload cap.
    pub fn with_max_payload(max_payload: usize) -> Decoder {
        Decoder { buf: Vec::new(), pos: 0, max_payload: max_payload.min(u32::MAX as usize), failed: None }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= 64 * 1024) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame: `Ok(None)` when more bytes are needed. After a fatal error
    /// the same error is returned forever.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match step(&self.buf[self.pos..], self.max_payload) {
            Step::Need => Ok(None),
            Step::Fatal(e) => Err(self.fail(e)),
            Step::Frame(r, used) => {
                self.pos += used;
                r.map(Some)
            }
        }
    }

    /// Decodes the frames in `input` (after whatever earlier calls left buffered), handing
    /// each result to `f` in order — the same results as [`Decoder::feed`] followed by
    /// [`Decoder::next_frame`] until `Ok(None)`, but frames that lie whole in `input` are
    /// decoded where they are, without a copy into the decoder's buffer. `f` returns `false`
    /// to stop early: the rest of `input` is then kept for the next call. After a fatal error
    /// (handed to `f`) nothing more is decoded.
    pub fn decode_from(&mut self, mut input: &[u8], mut f: impl FnMut(Result<Frame, FrameError>) -> bool) {
        if let Some(e) = &self.failed {
            f(Err(e.clone()));
            return;
        }
        // First whatever is buffered: complete its frame with just the bytes it needs.
        if self.buffered() > 0 {
            let have = self.buffered();
            if have < HEADER_LEN {
                let take = (HEADER_LEN - have).min(input.len());
                self.feed(&input[..take]);
                input = &input[take..];
            }
            if let Some(hb) = self.buf[self.pos..].first_chunk::<HEADER_LEN>() {
                if let Ok(h) = Header::parse(hb, self.max_payload) {
                    let need = (HEADER_LEN + h.len as usize).saturating_sub(self.buffered());
                    let take = need.min(input.len());
                    self.feed(&input[..take]);
                    input = &input[take..];
                }
            }
            loop {
                let r = match self.next_frame() {
                    Ok(None) => break,
                    Ok(Some(frame)) => Ok(frame),
                    Err(e) => Err(e),
                };
                let fatal = matches!(&r, Err(e) if e.is_fatal());
                if !f(r) || fatal {
                    if !fatal {
                        self.feed(input);
                    }
                    return;
                }
            }
            if self.buffered() > 0 {
                // Still incomplete: all of `input` went into it.
                return;
            }
        }
        // Then frames in place.
        let mut at = 0;
        loop {
            match step(&input[at..], self.max_payload) {
                Step::Need => break,
                Step::Fatal(e) => {
                    f(Err(self.fail(e)));
                    return;
                }
                Step::Frame(r, used) => {
                    at += used;
                    if !f(r) {
                        break;
                    }
                }
            }
        }
        self.feed(&input[at..]);
    }

    /// Call when the stream has ended: fails if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            n => Err(FrameError::Truncated { buffered: n }),
        }
    }

    /// Forgets everything (a new connection on the same channel).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.failed = None;
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        e
    }
}
