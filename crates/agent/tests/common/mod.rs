//! Host side of the control channel for tests: frames over any Read + Write.
#![allow(dead_code)]

use std::io::{Read, Write};

use protocol::{Decoder, Frame, Hello, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub struct Conn<R: Read, W: Write> {
    pub r: R,
    pub w: W,
    decoder: Decoder,
}

impl<R: Read, W: Write> Conn<R, W> {
    pub fn new(r: R, w: W) -> Self {
        Conn { r, w, decoder: Decoder::new() }
    }

    pub fn send(&mut self, f: Frame) {
        self.w.write_all(&f.to_bytes().unwrap()).unwrap();
        self.w.flush().unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
        self.w.flush().unwrap();
    }

    /// The next frame, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("agent sent a bad frame") {
                return Some(f);
            }
            let n = self.r.read(&mut buf).expect("read from agent");
            if n == 0 {
                self.decoder.finish().expect("agent's stream ended inside a frame");
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    pub fn request(&mut self, id: u32, msg: Message) -> Frame {
        self.send(Frame::new(id, msg));
        self.recv().expect("agent hung up")
    }

    pub fn hello() -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            client: "agent-test".into(),
            realtime_ns: 0,
        })
    }
}
