//! Frame codec tests: round trips, piecewise delivery, caps, garbage, truncation, and
//! property-style loops over random messages and random bytes (a tiny xorshift, no crates).

use protocol::wire::Wire;
use protocol::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    /// Integers biased towards the edges where encodings change length.
    fn u64(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(300),
            1 => u64::MAX - self.below(3),
            2 => 1u64 << self.below(64),
            _ => self.next(),
        }
    }
    fn u32(&mut self) -> u32 {
        self.u64() as u32
    }
    fn u16(&mut self) -> u16 {
        self.u64() as u16
    }
    fn i32(&mut self) -> i32 {
        self.u64() as i32
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        const PIECES: &[&str] = &["a", "Z", "/", " ", "=", "\0", "é", "€", "😀", "\n", "ls", "-la"];
        let n = self.below(12);
        (0..n).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
    }
    fn strings(&mut self) -> Vec<String> {
        (0..self.below(5)).map(|_| self.string()).collect()
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.bool() {
            Some(f(self))
        } else {
            None
        }
    }
    fn stream(&mut self) -> StreamKind {
        [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr, StreamKind::File][self.below(4) as usize]
    }
    fn file_type(&mut self) -> FileType {
        [FileType::File, FileType::Dir, FileType::Symlink, FileType::Other][self.below(4) as usize]
    }
    fn tty(&mut self) -> TtySize {
        TtySize { rows: self.u16(), cols: self.u16() }
    }

    fn error_msg(&mut self) -> ErrorMsg {
        ErrorMsg { code: ErrorCode(self.u16()), errno: self.i32(), message: self.string(), path: self.opt(Rng::string) }
    }

    /// A random message of the given kind.
    fn message(&mut self, k: u16) -> Message {
        match k {
            kind::HELLO => Message::Hello(Hello {
                version: self.u16(),
                min_version: self.u16(),
                client: self.string(),
                realtime_ns: self.u64(),
                entropy: self.bytes(64),
            }),
            kind::READY => Message::Ready(Ready {
                version: self.u16(),
                agent: self.string(),
                kernel_release: self.string(),
                hostname: self.string(),
                boot_ns: self.u64(),
                agent_start_ns: self.u64(),
                features: self.u64(),
            }),
            kind::PING => Message::Ping(self.u64()),
            kind::PONG => Message::Pong(self.u64()),
            kind::ERROR => Message::Error(self.error_msg()),
            kind::OK => Message::Ok(()),
            kind::POWEROFF => Message::Poweroff(()),
            kind::CANCEL => Message::Cancel(()),
            kind::EXEC => Message::Exec(Exec {
                argv: self.strings(),
                env: (0..self.below(4)).map(|_| (self.string(), self.string())).collect(),
                clear_env: self.bool(),
                cwd: self.opt(Rng::string),
                user: self.opt(Rng::string),
                uid: self.opt(Rng::u32),
                gid: self.opt(Rng::u32),
                tty: self.opt(Rng::tty),
                stdin: self.bool(),
                window: self.u32(),
                timeout_ms: self.opt(Rng::u64),
                rlimits: (0..self.below(3))
                    .map(|_| Rlimit { resource: self.u32(), soft: self.u64(), hard: self.u64() })
                    .collect(),
            }),
            kind::STARTED => Message::Started(Started { pid: self.u32() }),
            kind::STDIN => Message::Stdin(self.bytes(300).into()),
            kind::STDOUT => Message::Stdout(self.bytes(300).into()),
            kind::STDERR => Message::Stderr(self.bytes(300).into()),
            kind::CLOSE_STDIN => Message::CloseStdin(()),
            kind::EXIT => Message::Exit(Exit {
                code: self.opt(Rng::i32),
                signal: self.opt(Rng::i32),
                duration_ns: self.u64(),
                timed_out: self.bool(),
            }),
            kind::SIGNAL => Message::Signal(Signal { signal: self.i32(), group: self.bool() }),
            kind::CREDIT => Message::Credit(Credit { stream: self.stream(), bytes: self.u32() }),
            kind::RESIZE => Message::Resize(Resize { size: self.tty() }),
            kind::READ_FILE => Message::ReadFile(ReadFile {
                path: self.string(),
                offset: self.u64(),
                len: self.opt(Rng::u64),
                window: self.u32(),
            }),
            kind::WRITE_FILE => Message::WriteFile(WriteFile {
                path: self.string(),
                mode: self.opt(Rng::u32),
                append: self.bool(),
                parents: self.bool(),
            }),
            kind::STAT => Message::Stat(Stat { path: self.string(), follow: self.bool() }),
            kind::READ_DIR => Message::ReadDir(ReadDir { path: self.string() }),
            kind::MKDIR => Message::Mkdir(Mkdir { path: self.string(), mode: self.u32(), parents: self.bool() }),
            kind::REMOVE => Message::Remove(Remove { path: self.string(), recursive: self.bool() }),
            kind::RENAME => Message::Rename(Rename { from: self.string(), to: self.string() }),
            kind::FILE_DATA => Message::FileData(self.bytes(300).into()),
            kind::STAT_RESULT => Message::StatResult(StatResult {
                file_type: self.file_type(),
                size: self.u64(),
                mode: self.u32(),
                uid: self.u32(),
                gid: self.u32(),
                mtime_ns: self.u64() as i64,
                link_target: self.opt(Rng::string),
            }),
            kind::DIR_ENTRIES => Message::DirEntries(DirEntries {
                entries: (0..self.below(4))
                    .map(|_| DirEntry {
                        name: self.string(),
                        file_type: self.file_type(),
                        size: self.u64(),
                        mode: self.u32(),
                        mtime_ns: self.u64() as i64,
                    })
                    .collect(),
            }),
            kind::READ_TREE => Message::ReadTree(ReadTree { path: self.string(), window: self.u32() }),
            kind::WRITE_TREE => Message::WriteTree(WriteTree { path: self.string(), parents: self.bool() }),
            kind::WAIT_WORKLOAD => Message::WaitWorkload(()),
            kind::WORKLOAD_EXIT => Message::WorkloadExit(WorkloadExit {
                code: self.opt(Rng::i32),
                signal: self.opt(Rng::i32),
                duration_ns: self.u64(),
                error: self.opt(Rng::error_msg),
            }),
            kind::WATCH => Message::Watch(Watch { path: self.string(), recursive: self.bool() }),
            kind::WATCH_EVENT => Message::WatchEvent(WatchEvent { kind: self.u32() as u8, path: self.string() }),
            kind::UNWATCH => Message::Unwatch(()),
            kind::SIGNAL_WORKLOAD => Message::SignalWorkload(Signal { signal: self.i32(), group: self.bool() }),
            kind::START_WORKLOAD => Message::StartWorkload(WorkloadSpec {
                argv: (0..1 + self.below(3)).map(|_| self.string()).collect(),
                env: (0..self.below(3)).map(|_| (self.string(), self.string())).collect(),
                cwd: self.opt(Rng::string),
                rlimits: (0..self.below(2))
                    .map(|_| Rlimit { resource: self.u32(), soft: self.u64(), hard: self.u64() })
                    .collect(),
                user: self.opt(Rng::string),
            }),
            other => panic!("test generator misses kind 0x{other:04x}"),
        }
    }

    fn frame(&mut self) -> Frame {
        let k = kind::ALL[self.below(kind::ALL.len() as u64) as usize];
        let flags = if self.bool() { FLAG_FINAL } else { 0 };
        Frame::new(self.u32(), self.message(k)).with_flags(flags)
    }
}

fn decode_all(d: &mut Decoder) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = d.next_frame().expect("valid stream") {
        out.push(f);
    }
    out
}

#[test]
fn every_kind_round_trips_and_has_a_unique_number() {
    let mut seen = std::collections::HashSet::new();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for &k in kind::ALL {
        assert!(seen.insert(k), "kind 0x{k:04x} used twice");
        for _ in 0..50 {
            let f = Frame::new(rng.u32(), rng.message(k));
            assert_eq!(f.msg.kind(), k);
            let bytes = f.to_bytes().unwrap();
            assert_eq!(bytes[0], MAGIC);
            assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, bytes.len() - HEADER_LEN);
            let mut d = Decoder::new();
            d.feed(&bytes);
            assert_eq!(d.next_frame().unwrap(), Some(f));
            assert_eq!(d.next_frame().unwrap(), None);
            d.finish().unwrap();
        }
    }
}

#[test]
fn cancel_is_kind_8_with_an_empty_payload_sent_by_the_host() {
    let bytes = Frame::new(7, Message::Cancel(())).to_bytes().unwrap();
    assert_eq!(bytes, [0xC1, 0x00, 0x08, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]);
    assert_eq!(Message::decode(kind::CANCEL, &[]), Ok(Message::Cancel(())));
    // A payload where none belongs is malformed, not ignored.
    assert!(matches!(Message::decode(kind::CANCEL, &[0]), Err(protocol::MessageError::Malformed(_))));
    assert!(Message::Cancel(()).is_host_to_guest());
    assert_eq!(Message::Cancel(()).name(), "Cancel");
    // A bit of its own in Ready::features: hosts send Cancel only to agents that have it.
    use protocol::features as f;
    assert_eq!(f::CANCEL.count_ones(), 1);
    assert_eq!(f::CANCEL & (f::INIT | f::EXEC | f::FS | f::WORKLOAD | f::START_WORKLOAD), 0);
}

#[test]
fn header_layout_is_fixed() {
    let bytes = Frame::new(0x0403_0201, Message::Ping(5)).with_flags(FLAG_FINAL).to_bytes().unwrap();
    assert_eq!(bytes, [0xC1, 0x01, 0x03, 0x00, 0x01, 0x02, 0x03, 0x04, 0x01, 0x00, 0x00, 0x00, 0x05]);
    let hello = Frame::new(
        0,
        Message::Hello(Hello {
            version: 1,
            min_version: 1,
            client: "h".into(),
            realtime_ns: 300,
            entropy: vec![0, 255, 7],
        }),
    );
    assert_eq!(&hello.to_bytes().unwrap()[HEADER_LEN..], [1, 1, 1, b'h', 0xac, 0x02, 3, 0, 255, 7]);
}

#[test]
fn every_byte_value_survives_in_data_and_strings() {
    let all: Vec<u8> = (0..=255).collect();
    for msg in [
        Message::Stdout(all.clone().into()),
        Message::Stderr(all.clone().into()),
        Message::Stdin(all.clone().into()),
        Message::FileData(all.clone().into()),
    ] {
        let f = Frame::new(9, msg);
        let mut d = Decoder::new();
        d.feed(&f.to_bytes().unwrap());
        assert_eq!(d.next_frame().unwrap(), Some(f));
    }
    let s: String = (0..=0x7fu8).map(char::from).chain(['\u{80}', '\u{7ff}', '\u{ffff}', '\u{10ffff}']).collect();
    let f = Frame::new(1, Message::Rename(Rename { from: s.clone(), to: s }));
    let mut d = Decoder::new();
    d.feed(&f.to_bytes().unwrap());
    assert_eq!(d.next_frame().unwrap(), Some(f));
}

#[test]
fn byte_by_byte_and_many_frames_per_read() {
    let mut rng = Rng(42);
    let frames: Vec<Frame> = (0..300).map(|_| rng.frame()).collect();
    let mut stream = Vec::new();
    for f in &frames {
        f.encode(&mut stream).unwrap();
    }

    // One byte at a time.
    let mut d = Decoder::new();
    let mut got = Vec::new();
    for b in &stream {
        d.feed(std::slice::from_ref(b));
        got.extend(decode_all(&mut d));
    }
    assert_eq!(got, frames);
    d.finish().unwrap();

    // Everything in one read.
    let mut d = Decoder::new();
    d.feed(&stream);
    assert_eq!(decode_all(&mut d), frames);

    // Random split points, many times.
    for _ in 0..50 {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = (rng.below(700) as usize + 1).min(stream.len() - at);
            d.feed(&stream[at..at + n]);
            at += n;
            got.extend(decode_all(&mut d));
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
    }
}

#[test]
fn oversized_frames_are_refused_both_ways() {
    // Encoding: a chunk one byte over the cap.
    let big = Frame::new(1, Message::Stdout(vec![7u8; MAX_PAYLOAD + 1].into()));
    let mut out = vec![1, 2, 3];
    assert_eq!(
        big.encode(&mut out),
        Err(FrameError::TooLarge { len: MAX_PAYLOAD as u64 + 1, max: MAX_PAYLOAD as u32 })
    );
    assert_eq!(out, [1, 2, 3], "a failed encode leaves the buffer alone");
    // Exactly at the cap is fine.
    let max = Frame::new(1, Message::Stdout(vec![7u8; MAX_PAYLOAD].into()));
    let bytes = max.to_bytes().unwrap();
    let mut d = Decoder::new();
    d.feed(&bytes);
    assert_eq!(d.next_frame().unwrap(), Some(max));

    // Decoding: the header alone is enough to refuse, before any payload arrives.
    let h = Header { flags: 0, kind: kind::STDOUT, id: 3, len: MAX_PAYLOAD as u32 + 1 };
    let mut d = Decoder::new();
    d.feed(&h.to_bytes());
    let e = d.next_frame().unwrap_err();
    assert!(matches!(e, FrameError::TooLarge { .. }) && e.is_fatal(), "{e}");
    d.feed(&Frame::new(1, Message::Ping(1)).to_bytes().unwrap());
    assert_eq!(d.next_frame().unwrap_err(), e, "a fatal error sticks");

    // A smaller cap of the decoder's own.
    let mut d = Decoder::with_max_payload(4);
    d.feed(&Frame::new(1, Message::Stdout(vec![0; 5].into())).to_bytes().unwrap());
    assert_eq!(d.next_frame().unwrap_err(), FrameError::TooLarge { len: 5, max: 4 });
}

#[test]
fn garbage_is_refused_at_the_first_byte() {
    let mut d = Decoder::new();
    d.feed(b"G");
    assert_eq!(d.next_frame(), Err(FrameError::BadMagic(b'G')));
    assert!(d.next_frame().unwrap_err().is_fatal());
    assert!(d.finish().is_err());
    d.reset();
    d.feed(&Frame::new(1, Message::Ping(1)).to_bytes().unwrap());
    assert_eq!(d.next_frame().unwrap(), Some(Frame::new(1, Message::Ping(1))), "reset recovers");
}

#[test]
fn unknown_kinds_flags_and_bad_payloads_skip_one_frame() {
    let ping = Frame::new(5, Message::Ping(77)).to_bytes().unwrap();
    let mut stream = Vec::new();
    // unknown kind with a payload
    stream.extend(Header { flags: 0, kind: 0x7777, id: 11, len: 3 }.to_bytes());
    stream.extend([1, 2, 3]);
    // unknown flag bit
    stream.extend(Header { flags: 0x80, kind: kind::PING, id: 12, len: 1 }.to_bytes());
    stream.push(0);
    // known kind, trailing byte in the payload
    stream.extend(Header { flags: 0, kind: kind::PING, id: 13, len: 2 }.to_bytes());
    stream.extend([0, 0]);
    // known kind, truncated payload (varint continues past the end)
    stream.extend(Header { flags: 0, kind: kind::STARTED, id: 14, len: 1 }.to_bytes());
    stream.push(0x80);
    // bool out of range
    stream.extend(Header { flags: 0, kind: kind::SIGNAL, id: 15, len: 2 }.to_bytes());
    stream.extend([2, 2]);
    stream.extend(&ping);

    let mut d = Decoder::new();
    d.feed(&stream);
    let e = d.next_frame().unwrap_err();
    assert_eq!(e, FrameError::UnknownKind { id: 11, kind: 0x7777 });
    assert!(!e.is_fatal());
    assert_eq!(e.frame_id(), Some(11));
    assert_eq!(d.next_frame(), Err(FrameError::UnknownFlags { id: 12, kind: kind::PING, flags: 0x80 }));
    assert_eq!(
        d.next_frame(),
        Err(FrameError::Malformed { id: 13, kind: kind::PING, reason: "trailing bytes in payload" })
    );
    assert_eq!(d.next_frame(), Err(FrameError::Malformed { id: 14, kind: kind::STARTED, reason: "truncated payload" }));
    assert_eq!(d.next_frame(), Err(FrameError::Malformed { id: 15, kind: kind::SIGNAL, reason: "bool is not 0 or 1" }));
    assert_eq!(d.next_frame(), Ok(Some(Frame::new(5, Message::Ping(77)))));
    assert_eq!(d.next_frame(), Ok(None));
}

#[test]
fn truncated_streams_are_reported_at_the_end() {
    let bytes = Frame::new(1, Message::Stdout(b"hello".to_vec().into())).to_bytes().unwrap();
    for cut in 1..bytes.len() {
        let mut d = Decoder::new();
        d.feed(&bytes[..cut]);
        assert_eq!(d.next_frame(), Ok(None), "cut at {cut}");
        let e = d.finish().unwrap_err();
        assert_eq!(e, FrameError::Truncated { buffered: cut });
        assert!(e.is_fatal());
    }
}

#[test]
fn encoding_refuses_unknown_flags() {
    assert!(matches!(
        Frame::new(1, Message::Ok(())).with_flags(0x40).to_bytes(),
        Err(FrameError::UnknownFlags { flags: 0x40, .. })
    ));
}

/// Random bytes with a valid header: whatever decodes must re-encode to the same bytes,
/// and nothing panics.
#[test]
fn random_payloads_never_panic_and_decoding_is_canonical() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut decoded = 0;
    for i in 0..200_000u32 {
        let k = if rng.below(8) == 0 { rng.u16() } else { kind::ALL[rng.below(kind::ALL.len() as u64) as usize] };
        let payload = rng.bytes(if i % 2 == 0 { 8 } else { 40 });
        let h = Header {
            flags: if rng.bool() { FLAG_FINAL } else { 0 },
            kind: k,
            id: rng.u32(),
            len: payload.len() as u32,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend(&payload);
        let mut d = Decoder::new();
        d.feed(&bytes);
        match d.next_frame() {
            Ok(Some(f)) => {
                decoded += 1;
                assert_eq!(f.to_bytes().unwrap(), bytes, "non-canonical decode of {f:?}");
            }
            Ok(None) => panic!("complete frame not decoded"),
            Err(e) => {
                assert!(!e.is_fatal(), "{e}");
                assert_eq!(e.frame_id(), Some(h.id));
            }
        }
        assert_eq!(d.buffered(), 0);
    }
    assert!(decoded > 10_000, "only {decoded} random payloads decoded: the loop tests little");
}

/// Random byte streams (garbage) fed in random pieces: the decoder fails cleanly or
/// waits, never panics, never buffers more than it was given.
#[test]
fn random_streams_never_panic() {
    let mut rng = Rng(7);
    for _ in 0..20_000 {
        let mut bytes = rng.bytes(64);
        if rng.bool() && !bytes.is_empty() {
            bytes[0] = MAGIC;
        }
        let mut d = Decoder::with_max_payload(if rng.bool() { 16 } else { MAX_PAYLOAD });
        let mut at = 0;
        while at < bytes.len() {
            let n = (rng.below(9) as usize + 1).min(bytes.len() - at);
            d.feed(&bytes[at..at + n]);
            at += n;
            loop {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => break,
                    Err(_) => continue,
                }
            }
            assert!(d.buffered() <= at);
        }
    }
}

/// Random valid frames mixed with frames of unknown kind: the valid ones all arrive.
#[test]
fn random_valid_streams_with_unknown_frames_interleaved() {
    let mut rng = Rng(99);
    for _ in 0..200 {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        let mut unknown = 0;
        for _ in 0..rng.below(30) {
            if rng.below(5) == 0 {
                let payload = rng.bytes(20);
                stream.extend(
                    Header { flags: 0, kind: 0xfff0 + rng.below(16) as u16, id: 1, len: payload.len() as u32 }
                        .to_bytes(),
                );
                stream.extend(payload);
                unknown += 1;
            } else {
                let f = rng.frame();
                f.encode(&mut stream).unwrap();
                want.push(f);
            }
        }
        let mut d = Decoder::new();
        let (mut got, mut errs) = (Vec::new(), 0);
        for piece in stream.chunks(rng.below(50) as usize + 1) {
            d.feed(piece);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => got.push(f),
                    Ok(None) => break,
                    Err(FrameError::UnknownKind { .. }) => errs += 1,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(got, want);
        assert_eq!(errs, unknown);
    }
}

#[test]
fn handshake_negotiation() {
    let hello =
        |min_version, version| Hello { version, min_version, client: "t".into(), realtime_ns: 0, entropy: vec![] };
    assert_eq!(negotiate(&hello(1, 2)), Ok(2));
    assert_eq!(negotiate(&hello(1, 9)), Ok(PROTOCOL_VERSION));
    // Version 1 peers (shorter exec/fs payloads) are refused.
    assert_eq!(negotiate(&hello(1, 1)).unwrap_err().code, ErrorCode::VERSION);
    let e = negotiate(&hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3)).unwrap_err();
    assert_eq!(e.code, ErrorCode::VERSION);
    assert!(e.message.contains("no common protocol version"), "{}", e.message);
    assert_eq!(negotiate(&hello(0, 0)).unwrap_err().code, ErrorCode::VERSION);
    assert_eq!(negotiate(&hello(4, 3)).unwrap_err().code, ErrorCode::VERSION);
}

#[test]
fn wire_trait_is_usable_directly() {
    let mut out = Vec::new();
    Exit { code: Some(-1), signal: None, duration_ns: 5, timed_out: true }.put(&mut out);
    assert_eq!(out, [1, 1, 0, 5, 1]);
}

/// `decode_from` gives exactly what `feed` + `next_frame` give, however the stream is cut,
/// with unknown and malformed frames among valid ones, and stops where asked.
#[test]
fn decode_from_matches_feed_and_next_frame() {
    let mut rng = Rng(0x5eed);
    let mut stream = Vec::new();
    for i in 0..400 {
        if i % 17 == 3 {
            stream.extend(Header { flags: 0, kind: 0x7777, id: i, len: 2 }.to_bytes());
            stream.extend([1, 2]);
        } else if i % 23 == 5 {
            stream.extend(Header { flags: 0, kind: kind::PING, id: i, len: 0 }.to_bytes());
        } else {
            rng.frame().encode(&mut stream).unwrap();
        }
    }
    let reference: Vec<Result<Frame, FrameError>> = {
        let mut d = Decoder::new();
        d.feed(&stream);
        let mut v = Vec::new();
        loop {
            match d.next_frame() {
                Ok(None) => break,
                Ok(Some(f)) => v.push(Ok(f)),
                Err(e) => v.push(Err(e)),
            }
        }
        v
    };
    for round in 0..60 {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = if round == 0 { 1 } else { (rng.below(3000) as usize + 1).min(stream.len() - at) };
            d.decode_from(&stream[at..at + n], |r| {
                got.push(r);
                true
            });
            at += n;
        }
        assert_eq!(got, reference, "round {round}");
        assert_eq!(d.buffered(), 0);
    }
    // Stopping early keeps the rest.
    let mut d = Decoder::new();
    let mut first = Vec::new();
    d.decode_from(&stream, |r| {
        first.push(r);
        false
    });
    assert_eq!(first.len(), 1);
    let mut rest = Vec::new();
    d.decode_from(&[], |r| {
        rest.push(r);
        true
    });
    first.extend(rest);
    assert_eq!(first, reference);
    // Garbage is fatal at its first byte, and sticks.
    let mut d = Decoder::new();
    let mut errs = Vec::new();
    d.decode_from(b"G", |r| {
        errs.push(r);
        true
    });
    assert_eq!(errs, [Err(FrameError::BadMagic(b'G'))]);
    assert!(d.next_frame().unwrap_err().is_fatal());
}

#[test]
fn a_hello_without_entropy_still_decodes() {
    // The bytes of a Hello from before the entropy field: version 2, min 2, "h", realtime 300.
    let payload = [2u8, 2, 1, b'h', 0xac, 0x02];
    match Message::decode(kind::HELLO, &payload).unwrap() {
        Message::Hello(h) => assert_eq!((h.version, h.realtime_ns, h.entropy.len()), (2, 300, 0)),
        other => panic!("{other:?}"),
    }
}
