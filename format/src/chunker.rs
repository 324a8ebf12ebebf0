//! Content-defined chunking of a byte stream that arrives in pieces.
//!
//! wharf feeds the chunker from a tar walk: file contents arrive one file at a
//! time, in arbitrary slice sizes. FastCDC (v2020) decides a cut point only from
//! the bytes since the previous cut, so cutting a prefix of the stream and
//! carrying the last, possibly unfinished, chunk into the next round gives the
//! same boundaries as cutting the whole stream at once. That property is what
//! the golden-vector tests pin down: boundaries are part of the on-disk
//! contract, because a moved boundary silently kills dedup against old stores.

use crate::error::{Error, Result};
use fastcdc::v2020::FastCDC;
use serde::{Deserialize, Serialize};

/// Chunk size bounds in bytes. A store records its own; they are powers of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// 16 KiB average (4 KiB min, 64 KiB max): chosen from the corpus
    /// measurements in benches/RESULTS.md.
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 4 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };

    /// Checks the bounds are powers of two, ordered, and inside what FastCDC accepts.
    pub fn validate(&self) -> Result<()> {
        let ok = |v: u32| v.is_power_of_two();
        if !(ok(self.min) && ok(self.avg) && ok(self.max)) {
            return Err(Error::Invalid(format!(
                "chunk sizes must be powers of two, got {self:?}"
            )));
        }
        if !(self.min < self.avg && self.avg < self.max) {
            return Err(Error::Invalid(format!(
                "chunk sizes must satisfy min < avg < max, got {self:?}"
            )));
        }
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        use fastcdc::v2020 as f;
        if !(f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&min)
            || !(f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&avg)
            || !(f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&max)
        {
            return Err(Error::Invalid(format!(
                "chunk sizes out of FastCDC's range: {self:?}"
            )));
        }
        Ok(())
    }
}

/// Cuts a stream pushed in pieces into content-defined chunks.
pub struct Chunker {
    params: ChunkParams,
    buf: Vec<u8>,
    /// Cut when this many bytes are buffered; a few max-size chunks' worth, so
    /// the carried tail is a small fraction of each round.
    high_water: usize,
}

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        let high_water = (params.max as usize * 8).max(1 << 20);
        Chunker {
            params,
            buf: Vec::with_capacity(high_water + params.max as usize),
            high_water,
        }
    }

    /// Adds bytes; calls `emit` for every chunk whose end is now certain.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let room = self.high_water - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() >= self.high_water {
                self.cut(false, emit)?;
            }
        }
        Ok(())
    }

    /// Emits everything still buffered: the end of the stream is a cut point.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        self.cut(true, emit)
    }

    fn cut<E>(
        &mut self,
        at_end: bool,
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let p = self.params;
        let mut consumed = 0usize;
        {
            let mut chunks =
                FastCDC::new(&self.buf, p.min as usize, p.avg as usize, p.max as usize).peekable();
            while let Some(c) = chunks.next() {
                // The last chunk of a non-final round may end only because the
                // buffer did; it is carried into the next round.
                if chunks.peek().is_none() && !at_end {
                    break;
                }
                emit(&self.buf[c.offset..c.offset + c.length])?;
                consumed = c.offset + c.length;
            }
        }
        self.buf.drain(..consumed);
        Ok(())
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    pub fn lengths(data: &[u8], piece: usize) -> Vec<usize> {
        let mut c = Chunker::new(ChunkParams::DEFAULT);
        let mut out = Vec::new();
        let mut emit = |b: &[u8]| -> Result<(), ()> {
            out.push(b.len());
            Ok(())
        };
        for p in data.chunks(piece.max(1)) {
            c.push(p, &mut emit).unwrap();
        }
        c.finish(&mut emit).unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn piece_size_does_not_move_boundaries() {
        let data = pseudo_random(5 << 20, 7);
        let whole = lengths(&data, data.len());
        assert_eq!(whole.iter().sum::<usize>(), data.len());
        for piece in [1, 511, 4096, 65536, 1 << 20, 3_000_001] {
            assert_eq!(lengths(&data, piece), whole, "piece size {piece}");
        }
    }

    /// Golden vector: if these numbers change, every existing store loses
    /// dedup against new adds. Do not update them without a format version bump.
    #[test]
    fn golden_boundaries() {
        let data = pseudo_random(1 << 20, 0x5eed);
        let l = lengths(&data, 100_000);
        let digest = blake3::hash(
            &l.iter()
                .flat_map(|x| (*x as u32).to_le_bytes())
                .collect::<Vec<_>>(),
        );
        assert_eq!(l.len(), GOLDEN_COUNT, "chunk count moved: {l:?}");
        assert_eq!(&l[..8], &GOLDEN_FIRST, "first boundaries moved");
        assert_eq!(digest.to_hex().as_str(), GOLDEN_DIGEST);
    }

    const GOLDEN_COUNT: usize = 53;
    const GOLDEN_FIRST: [usize; 8] = [24884, 7460, 37147, 25093, 21340, 22785, 5231, 8959];
    const GOLDEN_DIGEST: &str = "b2f021715bef5b1c850b44bee5071a7acfbf3d31e499f9bb9485b72f8ab1d8c7";

    #[test]
    fn params_are_checked() {
        assert!(ChunkParams::DEFAULT.validate().is_ok());
        let bad = ChunkParams {
            min: 3000,
            avg: 16384,
            max: 65536,
        };
        assert!(bad.validate().is_err());
        let unordered = ChunkParams {
            min: 65536,
            avg: 16384,
            max: 65536,
        };
        assert!(unordered.validate().is_err());
    }
}
