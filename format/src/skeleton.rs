//! The skeleton of a tar: every byte that is not file content, and where the
//! contents go.
//!
//! Encoding (after the 4-byte magic `WSK1`), a sequence of records:
//!
//! | tag  | operands                | meaning                                      |
//! |------|-------------------------|----------------------------------------------|
//! | 0x01 | varint n, n bytes       | literal bytes (headers, padding, end blocks) |
//! | 0x02 | varint n                | the next n bytes of the data stream          |
//! | 0x03 | varint i                | the whole content of child node i            |
//!
//! Varints are unsigned LEB128. The rebuilt tar is the records' bytes in order.

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"WSK1";
pub const LIT: u8 = 1;
pub const DATA: u8 = 2;
pub const CHILD: u8 = 3;
/// Literal runs are split at this size so a reader never buffers more.
pub const MAX_LITERAL: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Literal(Vec<u8>),
    Data(u64),
    Child(u64),
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Builds skeleton records, merging adjacent literals and adjacent data runs.
/// Output is handed out in pieces through `drain` so it can be chunked while
/// the tar is still being read.
#[derive(Default)]
pub struct SkeletonWriter {
    out: Vec<u8>,
    lit: Vec<u8>,
    data: u64,
    started: bool,
}

impl SkeletonWriter {
    pub fn new() -> Self {
        Self::default()
    }

    fn start(&mut self) {
        if !self.started {
            self.out.extend_from_slice(MAGIC);
            self.started = true;
        }
    }

    fn flush_lit(&mut self) {
        self.start();
        if !self.lit.is_empty() {
            self.out.push(LIT);
            put_varint(&mut self.out, self.lit.len() as u64);
            self.out.append(&mut self.lit);
        }
    }

    fn flush_data(&mut self) {
        self.start();
        if self.data > 0 {
            self.out.push(DATA);
            put_varint(&mut self.out, self.data);
            self.data = 0;
        }
    }

    pub fn literal(&mut self, mut b: &[u8]) {
        self.flush_data();
        while !b.is_empty() {
            let room = MAX_LITERAL - self.lit.len();
            let n = room.min(b.len());
            self.lit.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.lit.len() >= MAX_LITERAL {
                self.flush_lit();
            }
        }
    }

    pub fn data(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.flush_lit();
        self.data += n;
    }

    pub fn child(&mut self, i: u64) {
        self.flush_lit();
        self.flush_data();
        self.out.push(CHILD);
        put_varint(&mut self.out, i);
    }

    /// Encoded bytes ready so far.
    pub fn drain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.flush_lit();
        self.flush_data();
        self.out
    }
}

/// Reads records from a skeleton byte stream.
pub struct SkeletonReader<R: std::io::Read> {
    r: R,
    started: bool,
}

impl<R: std::io::Read> SkeletonReader<R> {
    pub fn new(r: R) -> Self {
        SkeletonReader { r, started: false }
    }

    fn byte(&mut self) -> Result<Option<u8>> {
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(b[0])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self
                .byte()?
                .ok_or_else(|| Error::Corrupt("skeleton ends inside a number".into()))?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Corrupt("skeleton number too long".into()))
    }

    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if !self.started {
            let mut m = [0u8; 4];
            self.r
                .read_exact(&mut m)
                .map_err(|_| Error::Corrupt("skeleton too short for its magic".into()))?;
            if &m != MAGIC {
                return Err(Error::Corrupt("skeleton has a bad magic".into()));
            }
            self.started = true;
        }
        let Some(tag) = self.byte()? else {
            return Ok(None);
        };
        match tag {
            LIT => {
                let n = self.varint()?;
                if n as usize > MAX_LITERAL {
                    return Err(Error::Corrupt(format!("skeleton literal of {n} bytes")));
                }
                let mut b = vec![0u8; n as usize];
                self.r
                    .read_exact(&mut b)
                    .map_err(|_| Error::Corrupt("skeleton ends inside a literal".into()))?;
                Ok(Some(Record::Literal(b)))
            }
            DATA => Ok(Some(Record::Data(self.varint()?))),
            CHILD => Ok(Some(Record::Child(self.varint()?))),
            t => Err(Error::Corrupt(format!(
                "skeleton record with unknown tag {t}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_merge() {
        let mut w = SkeletonWriter::new();
        w.literal(b"abc");
        w.literal(b"def");
        w.data(5);
        w.data(7);
        w.child(0);
        w.literal(&vec![9u8; MAX_LITERAL + 3]);
        let mut bytes = w.drain();
        bytes.extend(w.finish());
        let mut r = SkeletonReader::new(&bytes[..]);
        let mut got = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            got.push(rec);
        }
        assert_eq!(
            got,
            vec![
                Record::Literal(b"abcdef".to_vec()),
                Record::Data(12),
                Record::Child(0),
                Record::Literal(vec![9u8; MAX_LITERAL]),
                Record::Literal(vec![9u8; 3]),
            ]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"WSK1\x07"[..],
            b"WSK1\x01\xff",
            b"XXXX",
            b"WSK1\x01\x05ab",
        ] {
            let mut r = SkeletonReader::new(bad);
            let mut res = Ok(None);
            for _ in 0..4 {
                res = r.next_record();
                if !matches!(res, Ok(Some(_))) {
                    break;
                }
            }
            assert!(res.is_err(), "{bad:?}");
        }
    }
}
