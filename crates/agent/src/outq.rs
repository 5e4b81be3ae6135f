//! The agent's write queue: encoded frames waiting for the channel to take them.
//!
//! The channel is non-blocking; the main loop writes what the host takes and polls for
//! POLLOUT while bytes remain. Stream data (process output, file chunks) is only produced
//! while the queue is below [`HIGH_WATER`], and each stream only within its host-granted
//! credit, so the queue stays bounded (`HIGH_WATER` + one chunk + small replies); the
//! channel is not even read while the queue is above [`HARD_LIMIT`] (a host that floods
//! requests without reading answers).

use std::io;
use std::os::fd::RawFd;

use protocol::{Frame, FrameError, Header, Message, HEADER_LEN, MAX_PAYLOAD};

use crate::sys;

/// Stream data is produced only while fewer bytes than this wait.
pub const HIGH_WATER: usize = 1 << 20;
/// Above this, the channel is not read until the host has taken some.
pub const HARD_LIMIT: usize = 16 << 20;
/// The largest stream chunk per frame.
pub const CHUNK: usize = 256 << 10;

#[derive(Default)]
pub struct OutQueue {
    buf: Vec<u8>,
    pos: usize,
    /// The most bytes ever waiting (for tests of boundedness).
    pub peak: usize,
}

impl OutQueue {
    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether stream data may be produced now.
    pub fn has_room(&self) -> bool {
        self.len() < HIGH_WATER
    }

    pub fn push(&mut self, f: Frame) {
        if let Err(e) = f.encode(&mut self.buf) {
            // Only a frame over the cap can fail; say so instead.
            debug_assert!(matches!(e, FrameError::TooLarge { .. }));
            Frame::new(f.id, Message::error(protocol::ErrorCode::TOO_LARGE, 0, e.to_string()))
                .with_flags(protocol::FLAG_FINAL)
                .encode(&mut self.buf)
                .expect("small frame");
        }
        self.note_peak();
    }

    pub fn msg(&mut self, id: u32, msg: Message) {
        self.push(Frame::new(id, msg));
    }

    pub fn final_msg(&mut self, id: u32, msg: Message) {
        self.push(Frame::new(id, msg).with_flags(protocol::FLAG_FINAL));
    }

    /// Appends a frame of raw-bytes kind `kind` (Stdout, Stderr, FileData) whose payload `fill`
    /// appends to the buffer (at most [`MAX_PAYLOAD`] bytes) and whose flags it returns. On error
    /// nothing is queued.
    pub fn push_raw<E>(
        &mut self,
        id: u32,
        kind: u16,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<u8, E>,
    ) -> Result<usize, E> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER_LEN]);
        match fill(&mut self.buf) {
            Ok(flags) => {
                let len = self.buf.len() - start - HEADER_LEN;
                assert!(len <= MAX_PAYLOAD, "stream chunk over the cap");
                let h = Header { flags, kind, id, len: len as u32 };
                self.buf[start..start + HEADER_LEN].copy_from_slice(&h.to_bytes());
                self.note_peak();
                Ok(len)
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Writes as much as `fd` takes without blocking; `Ok(true)` when the queue is empty.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        while self.pos < self.buf.len() {
            match sys::write(fd, &self.buf[self.pos..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "channel took no bytes")),
                Ok(n) => self.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.compact();
        Ok(self.is_empty())
    }

    /// Forgets everything queued (the host went away).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > 2 * HARD_LIMIT {
                self.buf.shrink_to(HIGH_WATER * 2);
            }
        } else if self.pos >= HIGH_WATER && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.len());
    }
}
