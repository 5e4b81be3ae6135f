//! The tree stream: a file, a directory tree or a symlink as one byte stream (what `ReadTree`
//! sends and `WriteTree` takes, in `FileData` chunks split anywhere). Tar-like, but small and
//! strict:
//!
//! ```text
//! record := 0x00                                   END (the last record)
//!         | 0x01 path mode mtime                    DIR
//!         | 0x02 path mode mtime size <size bytes>  FILE
//!         | 0x03 path target                        SYMLINK
//! path, target := varint length (1..=4096; a path may be empty) + raw bytes (no NUL)
//! mode   := varint, permission bits (0o7777 at most)
//! mtime  := zigzag varint, ns since the Unix epoch
//! size   := varint
//! ```
//! Paths are relative to the root of the tree, components joined by `/`; the root itself has
//! the empty path (a single file or symlink is one record with the empty path). A directory's
//! record comes before its contents. No component is empty, `.` or `..`; names are raw bytes
//! (Linux file names need not be UTF-8). A writer applies directory modes and times after the
//! contents (so a read-only directory can still be filled) and never follows a symlink that
//! the stream itself (or anything else) put inside the destination.

use crate::wire::put_varint;

/// Longest path or symlink target in a record.
pub const MAX_PATH: usize = 4096;
const TAG_END: u8 = 0;
const TAG_DIR: u8 = 1;
const TAG_FILE: u8 = 2;
const TAG_SYMLINK: u8 = 3;
/// A record header is never longer than this.
const MAX_HEADER: usize = 1 + 2 * (3 + MAX_PATH) + 3 * 10;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub fn encode_dir(out: &mut Vec<u8>, path: &[u8], mode: u32, mtime_ns: i64) {
    out.push(TAG_DIR);
    put_bytes(out, path);
    put_varint(out, u64::from(mode & 0o7777));
    put_varint(out, zigzag(mtime_ns));
}

/// The header of a file record; `size` bytes of content must follow.
pub fn encode_file_header(out: &mut Vec<u8>, path: &[u8], mode: u32, mtime_ns: i64, size: u64) {
    out.push(TAG_FILE);
    put_bytes(out, path);
    put_varint(out, u64::from(mode & 0o7777));
    put_varint(out, zigzag(mtime_ns));
    put_varint(out, size);
}

pub fn encode_symlink(out: &mut Vec<u8>, path: &[u8], target: &[u8]) {
    out.push(TAG_SYMLINK);
    put_bytes(out, path);
    put_bytes(out, target);
}

pub fn encode_end(out: &mut Vec<u8>) {
    out.push(TAG_END);
}

/// Checks a relative tree path: empty (the root) or `/`-joined components that are not
/// empty, `.` or `..`, without NUL.
pub fn check_path(path: &[u8]) -> Result<(), &'static str> {
    if path.len() > MAX_PATH {
        return Err("path too long");
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.contains(&0) {
        return Err("NUL in path");
    }
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" => return Err("empty path component (leading, trailing or doubled '/')"),
            b"." | b".." => return Err("'.' or '..' component in path"),
            _ => {}
        }
    }
    Ok(())
}

/// One step of a decoded tree stream.
#[derive(Debug, PartialEq, Eq)]
pub enum TreeEvent<'a> {
    Dir {
        path: Vec<u8>,
        mode: u32,
        mtime_ns: i64,
    },
    /// The start of a file: `Data` events with exactly `size` bytes follow, then `FileEnd`.
    File {
        path: Vec<u8>,
        mode: u32,
        mtime_ns: i64,
        size: u64,
    },
    Data(&'a [u8]),
    FileEnd,
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    End,
}

/// Why a tree stream is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeError(pub String);

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid tree stream: {}", self.0)
    }
}

impl std::error::Error for TreeError {}

enum Parse {
    Need,
    Bad(String),
}

struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cur<'_> {
    fn byte(&mut self) -> Result<u8, Parse> {
        let v = *self.b.get(self.at).ok_or(Parse::Need)?;
        self.at += 1;
        Ok(v)
    }
    fn varint(&mut self) -> Result<u64, Parse> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return Err(Parse::Bad("varint overflows u64".into()));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Parse::Bad("varint longer than 10 bytes".into()))
    }
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, Parse> {
        let n = self.varint()?;
        if n > MAX_PATH as u64 {
            return Err(Parse::Bad(format!("{what} of {n} bytes is longer than {MAX_PATH}")));
        }
        let n = n as usize;
        if self.b.len() - self.at < n {
            return Err(Parse::Need);
        }
        let v = self.b[self.at..self.at + n].to_vec();
        self.at += n;
        Ok(v)
    }
    fn path(&mut self) -> Result<Vec<u8>, Parse> {
        let p = self.bytes("path")?;
        check_path(&p).map_err(|e| Parse::Bad(format!("{e}: {:?}", String::from_utf8_lossy(&p))))?;
        Ok(p)
    }
    fn mode(&mut self) -> Result<u32, Parse> {
        let m = self.varint()?;
        if m > 0o7777 {
            return Err(Parse::Bad(format!("mode {m:o} has bits beyond 0o7777")));
        }
        Ok(m as u32)
    }
}

/// Decodes a tree stream that arrives in pieces, without copying file contents.
#[derive(Default)]
pub struct TreeDecoder {
    /// A record header split across pieces.
    partial: Vec<u8>,
    /// Content bytes still to come of the current file; `Some(0)`: `FileEnd` is next.
    file_left: Option<u64>,
    ended: bool,
    records: u64,
}

impl TreeDecoder {
    pub fn new() -> TreeDecoder {
        TreeDecoder::default()
    }

    /// Whether the `END` record was seen.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The next event from `input` (advanced past what it used): `Ok(None)` when `input` is used
    /// up and more is needed.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<TreeEvent<'a>>, TreeError> {
        if let Some(left) = self.file_left {
            if left == 0 {
                self.file_left = None;
                return Ok(Some(TreeEvent::FileEnd));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let n = (left.min(input.len() as u64)) as usize;
            let (data, rest) = input.split_at(n);
            *input = rest;
            self.file_left = Some(left - n as u64);
            return Ok(Some(TreeEvent::Data(data)));
        }
        if self.ended {
            return if input.is_empty() { Ok(None) } else { Err(TreeError("bytes after the END record".into())) };
        }
        if self.partial.is_empty() {
            match Self::parse(input) {
                Ok((ev, used)) => {
                    *input = &input[used..];
                    return Ok(Some(self.took(ev)));
                }
                Err(Parse::Bad(e)) => return Err(TreeError(e)),
                Err(Parse::Need) => {
                    if input.len() > MAX_HEADER {
                        return Err(TreeError("record header too long".into()));
                    }
                    self.partial.extend_from_slice(input);
                    *input = &[];
                    return Ok(None);
                }
            }
        }
        // A header split across pieces: add a byte at a time until it parses (rare, short).
        while let Some((&b, rest)) = input.split_first() {
            self.partial.push(b);
            *input = rest;
            match Self::parse(&self.partial) {
                Ok((ev, used)) => {
                    debug_assert_eq!(used, self.partial.len());
                    self.partial.clear();
                    return Ok(Some(self.took(ev)));
                }
                Err(Parse::Bad(e)) => return Err(TreeError(e)),
                Err(Parse::Need) if self.partial.len() > MAX_HEADER => {
                    return Err(TreeError("record header too long".into()))
                }
                Err(Parse::Need) => {}
            }
        }
        Ok(None)
    }

    /// Call at the end of the stream.
    pub fn finish(&self) -> Result<(), TreeError> {
        if self.ended {
            Ok(())
        } else if self.records == 0 && self.partial.is_empty() {
            Err(TreeError("empty stream".into()))
        } else {
            Err(TreeError("the stream ended before its END record".into()))
        }
    }

    fn took<'a>(&mut self, ev: TreeEvent<'a>) -> TreeEvent<'a> {
        self.records += 1;
        match &ev {
            TreeEvent::File { size, .. } => self.file_left = Some(*size),
            TreeEvent::End => self.ended = true,
            _ => {}
        }
        ev
    }

    fn parse<'a>(b: &[u8]) -> Result<(TreeEvent<'a>, usize), Parse> {
        let mut c = Cur { b, at: 0 };
        let ev = match c.byte()? {
            TAG_END => TreeEvent::End,
            TAG_DIR => {
                let path = c.path()?;
                let mode = c.mode()?;
                TreeEvent::Dir { path, mode, mtime_ns: unzigzag(c.varint()?) }
            }
            TAG_FILE => {
                let path = c.path()?;
                let mode = c.mode()?;
                let mtime_ns = unzigzag(c.varint()?);
                TreeEvent::File { path, mode, mtime_ns, size: c.varint()? }
            }
            TAG_SYMLINK => {
                let path = c.path()?;
                let target = c.bytes("symlink target")?;
                if target.is_empty() || target.contains(&0) {
                    return Err(Parse::Bad("empty symlink target or NUL in it".into()));
                }
                TreeEvent::Symlink { path, target }
            }
            t => return Err(Parse::Bad(format!("unknown record tag {t}"))),
        };
        Ok((ev, c.at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Dir(Vec<u8>, u32, i64),
        File(Vec<u8>, u32, i64, Vec<u8>),
        Symlink(Vec<u8>, Vec<u8>),
        End,
    }

    fn decode_in_pieces(stream: &[u8], piece: usize) -> Result<Vec<Owned>, TreeError> {
        let mut d = TreeDecoder::new();
        let mut out = Vec::new();
        let mut cur: Option<Owned> = None;
        for chunk in stream.chunks(piece.max(1)) {
            let mut input = chunk;
            while let Some(ev) = d.next(&mut input)? {
                match ev {
                    TreeEvent::Dir { path, mode, mtime_ns } => out.push(Owned::Dir(path, mode, mtime_ns)),
                    TreeEvent::File { path, mode, mtime_ns, .. } => {
                        cur = Some(Owned::File(path, mode, mtime_ns, vec![]))
                    }
                    TreeEvent::Data(b) => match &mut cur {
                        Some(Owned::File(_, _, _, v)) => v.extend_from_slice(b),
                        _ => panic!("data outside a file"),
                    },
                    TreeEvent::FileEnd => out.push(cur.take().unwrap()),
                    TreeEvent::Symlink { path, target } => out.push(Owned::Symlink(path, target)),
                    TreeEvent::End => out.push(Owned::End),
                }
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn round_trip_split_anywhere() {
        let mut s = Vec::new();
        encode_dir(&mut s, b"", 0o755, 1_700_000_000_123_456_789);
        encode_file_header(&mut s, b"a.txt", 0o640, -5, 5);
        s.extend_from_slice(b"hello");
        encode_file_header(&mut s, b"empty", 0o600, 0, 0);
        encode_dir(&mut s, b"sub", 0o700, 7);
        encode_symlink(&mut s, b"sub/link", b"../a.txt");
        let name: Vec<u8> = vec![b'n', 0xff, 0xfe]; // not UTF-8
        encode_file_header(&mut s, &[b"sub/".as_slice(), &name].concat(), 0o4755, 9, 3);
        s.extend_from_slice(&[0, 1, 2]);
        encode_end(&mut s);
        let want = vec![
            Owned::Dir(vec![], 0o755, 1_700_000_000_123_456_789),
            Owned::File(b"a.txt".to_vec(), 0o640, -5, b"hello".to_vec()),
            Owned::File(b"empty".to_vec(), 0o600, 0, vec![]),
            Owned::Dir(b"sub".to_vec(), 0o700, 7),
            Owned::Symlink(b"sub/link".to_vec(), b"../a.txt".to_vec()),
            Owned::File([b"sub/".as_slice(), &name].concat(), 0o4755, 9, vec![0, 1, 2]),
            Owned::End,
        ];
        for piece in 1..s.len() + 1 {
            assert_eq!(decode_in_pieces(&s, piece).unwrap(), want, "pieces of {piece}");
        }
    }

    #[test]
    fn bad_streams_are_refused() {
        let bad_path = |p: &[u8]| {
            let mut s = Vec::new();
            encode_dir(&mut s, p, 0o755, 0);
            encode_end(&mut s);
            decode_in_pieces(&s, 3).unwrap_err()
        };
        for p in [b"../etc".as_slice(), b"/abs", b"a//b", b"a/./b", b"a/", b"a\0b", b".."] {
            assert!(bad_path(p).0.contains("path") || bad_path(p).0.contains("NUL"), "{p:?}");
        }
        // unknown tag, truncated, trailing bytes, mode out of range, no END
        assert!(decode_in_pieces(&[9], 1).is_err());
        let mut s = Vec::new();
        encode_file_header(&mut s, b"f", 0o644, 0, 10);
        s.extend_from_slice(b"short");
        assert!(decode_in_pieces(&s, 4).unwrap_err().0.contains("before its END"));
        let mut s = Vec::new();
        encode_end(&mut s);
        s.push(0);
        assert!(decode_in_pieces(&s, 1).unwrap_err().0.contains("after the END"));
        let mut s = vec![TAG_DIR, 0];
        put_varint(&mut s, 0o10000);
        s.push(0);
        assert!(decode_in_pieces(&s, 2).unwrap_err().0.contains("mode"));
        assert!(decode_in_pieces(&[], 1).unwrap_err().0.contains("empty"));
        let mut s = vec![TAG_SYMLINK, 1, b'l'];
        put_varint(&mut s, MAX_PATH as u64 + 1);
        assert!(decode_in_pieces(&s, 2).unwrap_err().0.contains("longer"));
    }
}
