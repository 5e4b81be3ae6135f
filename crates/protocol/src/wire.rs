//! The compact binary encoding of message payloads.
//!
//! - unsigned integers: LEB128 varints, canonical (no redundant trailing `0x80`/`0x00` groups);
//! - signed integers: zigzag, then as unsigned;
//! - `u8`: one raw byte; `bool`: one byte, `0` or `1`;
//! - strings and byte vectors: varint length, then the bytes (strings are UTF-8);
//! - `Vec<T>`: varint count, then the elements; `Option<T>`: tag byte `0`/`1`, then the value;
//! - structs: their fields in declaration order, nothing else;
//! - [`Chunk`]: the raw rest of the payload (no length: the frame header has it).
//!
//! Decoding is strict: every payload has exactly one encoding, so `encode(decode(b)) == b`
//! for every `b` that decodes (the fuzz-style tests check this).

/// Why a payload did not decode.
pub type WireResult<T> = Result<T, &'static str>;

/// A value with a wire encoding.
pub trait Wire: Sized {
    /// Appends the encoding of `self` to `out`.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value from the front of `r`.
    fn get(r: &mut Reader<'_>) -> WireResult<Self>;
}

/// A cursor over a payload being decoded.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn byte(&mut self) -> WireResult<u8> {
        let (&b, rest) = self.buf.split_first().ok_or("truncated payload")?;
        self.buf = rest;
        Ok(b)
    }

    pub fn take(&mut self, n: usize) -> WireResult<&'a [u8]> {
        if n > self.buf.len() {
            return Err("truncated payload");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn varint(&mut self) -> WireResult<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err("varint overflows u64");
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err("non-canonical varint");
                }
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }

    /// A length or count: bounded by what is left, so no decode allocates more than its input.
    pub fn length_prefix(&mut self) -> WireResult<usize> {
        let n = self.varint()?;
        if n > self.buf.len() as u64 {
            return Err("length exceeds payload");
        }
        Ok(n as usize)
    }

    /// Succeeds only when the whole payload was consumed.
    pub fn finish(self) -> WireResult<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes in payload")
        }
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

impl Wire for u8 {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        r.byte()
    }
}

macro_rules! wire_unsigned {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                put_varint(out, u64::from(*self));
            }
            fn get(r: &mut Reader<'_>) -> WireResult<Self> {
                <$t>::try_from(r.varint()?).map_err(|_| concat!("integer out of range for ", stringify!($t)))
            }
        }
    )*};
}
wire_unsigned!(u16, u32, u64);

macro_rules! wire_signed {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                put_varint(out, zigzag(i64::from(*self)));
            }
            fn get(r: &mut Reader<'_>) -> WireResult<Self> {
                <$t>::try_from(unzigzag(r.varint()?)).map_err(|_| concat!("integer out of range for ", stringify!($t)))
            }
        }
    )*};
}
wire_signed!(i32, i64);

impl Wire for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        match r.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("bool is not 0 or 1"),
        }
    }
}

impl Wire for () {
    fn put(&self, _: &mut Vec<u8>) {}
    fn get(_: &mut Reader<'_>) -> WireResult<Self> {
        Ok(())
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len() as u64);
        out.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        let n = r.length_prefix()?;
        let b = r.take(n)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| "string is not UTF-8")
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len() as u64);
        for x in self {
            x.put(out);
        }
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        // Every element takes at least one byte, except `()`: cap the count anyway.
        let n = r.length_prefix()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::get(r)?);
        }
        Ok(v)
    }
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                x.put(out);
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        match r.byte()? {
            0 => Ok(None),
            1 => Ok(Some(T::get(r)?)),
            _ => Err("option tag is not 0 or 1"),
        }
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        Ok((A::get(r)?, B::get(r)?))
    }
}

/// Opaque bytes that fill the rest of a payload (stream data: no length prefix, no copy
/// beyond the one into the `Vec`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Chunk(pub Vec<u8>);

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({} bytes)", self.0.len())
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(v: Vec<u8>) -> Self {
        Chunk(v)
    }
}

impl From<&[u8]> for Chunk {
    fn from(v: &[u8]) -> Self {
        Chunk(v.to_vec())
    }
}

impl Wire for Chunk {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn get(r: &mut Reader<'_>) -> WireResult<Self> {
        Ok(Chunk(r.rest().to_vec()))
    }
}

/// Implements [`Wire`] for a struct as its fields in order.
#[macro_export]
#[doc(hidden)]
macro_rules! wire_struct {
    ($name:ident { $($field:ident),* $(,)? }) => {
        impl $crate::wire::Wire for $name {
            fn put(&self, _out: &mut Vec<u8>) {
                $( $crate::wire::Wire::put(&self.$field, _out); )*
            }
            fn get(_r: &mut $crate::wire::Reader<'_>) -> $crate::wire::WireResult<Self> {
                Ok($name { $( $field: $crate::wire::Wire::get(_r)?, )* })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt<T: Wire + PartialEq + std::fmt::Debug>(v: T) {
        let mut b = Vec::new();
        v.put(&mut b);
        let mut r = Reader::new(&b);
        assert_eq!(T::get(&mut r).unwrap(), v);
        r.finish().unwrap();
    }

    #[test]
    fn integers_round_trip_at_the_edges() {
        for v in [0u64, 1, 127, 128, 255, 16383, 16384, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            rt(v);
        }
        for v in [0u32, 1, 0x7f, 0x80, u32::MAX] {
            rt(v);
        }
        for v in [0i32, -1, 1, i32::MIN, i32::MAX] {
            rt(v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            rt(v);
        }
        for v in 0..=255u8 {
            rt(v);
        }
        rt(u16::MAX);
    }

    #[test]
    fn varint_strictness() {
        assert_eq!(Reader::new(&[0x80, 0x00]).varint(), Err("non-canonical varint"));
        assert_eq!(Reader::new(&[0x80]).varint(), Err("truncated payload"));
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(Reader::new(&over).varint(), Err("varint overflows u64"));
        assert_eq!(u32::get(&mut Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x10])), Err("integer out of range for u32"));
        assert_eq!(bool::get(&mut Reader::new(&[2])), Err("bool is not 0 or 1"));
        assert_eq!(String::get(&mut Reader::new(&[2, 0xc3, 0x28])), Err("string is not UTF-8"));
        assert_eq!(Vec::<u8>::get(&mut Reader::new(&[5, 1])), Err("length exceeds payload"));
    }

    #[test]
    fn containers_round_trip() {
        rt(String::from("héllo\0"));
        rt(vec![(String::from("A"), String::from("b=c"))]);
        rt(Some(vec![1u8, 2, 3]));
        rt(None::<u32>);
        rt((0..=255u8).collect::<Vec<u8>>());
    }
}
