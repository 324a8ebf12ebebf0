//! Chunk lists as hash-split trees.
//!
//! A 40 GB layer cut into 16 KiB chunks has 2.5 million chunk references:
//! too many to hold in one object, and a flat list would change entirely when
//! one chunk near the front changes its boundaries. So a list is cut the way
//! data is: a piece ends after an entry whose hash has its low bits clear
//! (about every `FANOUT` entries), each piece is stored as a chunk, and the
//! pieces' own references form the next level up. Equal runs of chunks give
//! equal pieces, so two versions of a layer share most of their list too, and
//! memory while writing or reading is one piece per level.

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use serde::{Deserialize, Serialize};

/// A reference to a chunk (or a list piece) and its uncompressed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry(pub ChunkId, pub u32);

pub const ENTRY_LEN: usize = 36;
/// Average entries per piece (a power of two): hash-chosen boundaries.
pub const FANOUT: u64 = 256;
/// No piece is cut before this many entries (bounds piece overhead on runs
/// of a repeated chunk, whose every entry would otherwise be a boundary).
pub const MIN_PIECE: usize = 16;
pub const MAX_PIECE: usize = 2048;

/// A byte stream stored as chunks: `entries` are data chunks when `level` is
/// 0, else pieces whose contents are entries of the level below.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StreamRef {
    pub len: u64,
    pub level: u8,
    pub entries: Vec<Entry>,
}

fn is_boundary(e: &Entry, count: usize) -> bool {
    count >= MAX_PIECE || (count >= MIN_PIECE && e.0.prefix_u64().is_multiple_of(FANOUT))
}

pub fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.extend_from_slice(&e.0 .0);
        out.extend_from_slice(&e.1.to_le_bytes());
    }
    out
}

pub fn decode_entries(piece: &[u8], id: &ChunkId) -> Result<Vec<Entry>> {
    if !piece.len().is_multiple_of(ENTRY_LEN) {
        return Err(Error::Corrupt(format!(
            "list piece {id}: length {} is not a multiple of {ENTRY_LEN}",
            piece.len()
        )));
    }
    Ok(piece
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&c[..32]);
            Entry(ChunkId(h), u32::from_le_bytes([c[32], c[33], c[34], c[35]]))
        })
        .collect())
}

/// Builds a StreamRef from data chunk entries pushed in order; `store_piece`
/// stores a piece's bytes and returns its id.
pub struct ListWriter {
    levels: Vec<Vec<Entry>>,
    len: u64,
}

impl Default for ListWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ListWriter {
    pub fn new() -> Self {
        ListWriter {
            levels: vec![Vec::new()],
            len: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(
        &mut self,
        e: Entry,
        store_piece: &mut dyn FnMut(&[u8]) -> Result<ChunkId>,
    ) -> Result<()> {
        self.len += e.1 as u64;
        self.push_at(0, e, store_piece)
    }

    fn push_at(
        &mut self,
        level: usize,
        e: Entry,
        store_piece: &mut dyn FnMut(&[u8]) -> Result<ChunkId>,
    ) -> Result<()> {
        if self.levels.len() <= level {
            self.levels.push(Vec::new());
        }
        self.levels[level].push(e);
        if is_boundary(&e, self.levels[level].len()) {
            let piece = std::mem::take(&mut self.levels[level]);
            let bytes = encode_entries(&piece);
            let id = store_piece(&bytes)?;
            self.push_at(level + 1, Entry(id, bytes.len() as u32), store_piece)?;
        }
        Ok(())
    }

    pub fn finish(
        mut self,
        store_piece: &mut dyn FnMut(&[u8]) -> Result<ChunkId>,
    ) -> Result<StreamRef> {
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            if top && self.levels[level].len() <= MAX_PIECE {
                return Ok(StreamRef {
                    len: self.len,
                    level: level as u8,
                    entries: std::mem::take(&mut self.levels[level]),
                });
            }
            let piece = std::mem::take(&mut self.levels[level]);
            if !piece.is_empty() {
                let bytes = encode_entries(&piece);
                let id = store_piece(&bytes)?;
                if self.levels.len() <= level + 1 {
                    self.levels.push(Vec::new());
                }
                self.levels[level + 1].push(Entry(id, bytes.len() as u32));
            }
            level += 1;
        }
    }
}

/// Walks the data chunk entries of a StreamRef in order, loading one piece
/// per level at a time.
/// Loads a list piece by id.
type PieceLoader<'a> = Box<dyn FnMut(&ChunkId) -> Result<Vec<u8>> + Send + 'a>;

pub struct ListReader<'a> {
    load: PieceLoader<'a>,
    /// Per level, top first: entries and the position of the next one. The
    /// last frame holds data entries when the stack is `levels` deep.
    stack: Vec<(Vec<Entry>, usize)>,
    levels: usize,
}

impl<'a> ListReader<'a> {
    pub fn new(
        stream: &StreamRef,
        load: impl FnMut(&ChunkId) -> Result<Vec<u8>> + Send + 'a,
    ) -> Self {
        ListReader {
            load: Box::new(load),
            stack: vec![(stream.entries.clone(), 0)],
            levels: stream.level as usize + 1,
        }
    }

    /// The next data chunk entry, or None at the end.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        loop {
            let depth = self.stack.len();
            let Some((entries, pos)) = self.stack.last_mut() else {
                return Ok(None);
            };
            if *pos >= entries.len() {
                self.stack.pop();
                continue;
            }
            let e = entries[*pos];
            *pos += 1;
            if depth == self.levels {
                return Ok(Some(e));
            }
            let bytes = (self.load)(&e.0)?;
            let children = decode_entries(&bytes, &e.0)?;
            self.stack.push((children, 0));
        }
    }

    /// Every piece id this reader passes through (for gc and verify), with
    /// data entries given to `data`.
    pub fn walk(
        mut self,
        mut piece: impl FnMut(&ChunkId),
        mut data: impl FnMut(&Entry),
    ) -> Result<()> {
        for (entries, _) in &self.stack {
            if self.levels > 1 {
                entries.iter().for_each(|e| piece(&e.0));
            }
        }
        loop {
            let depth = self.stack.len();
            let Some((entries, pos)) = self.stack.last_mut() else {
                return Ok(());
            };
            if *pos >= entries.len() {
                self.stack.pop();
                continue;
            }
            let e = entries[*pos];
            *pos += 1;
            if depth == self.levels {
                data(&e);
                continue;
            }
            let bytes = (self.load)(&e.0)?;
            let children = decode_entries(&bytes, &e.0)?;
            if depth + 1 < self.levels {
                children.iter().for_each(|c| piece(&c.0));
            }
            self.stack.push((children, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn build(n: usize, store: &mut HashMap<ChunkId, Vec<u8>>) -> StreamRef {
        let mut w = ListWriter::new();
        let mut sp = |b: &[u8]| -> Result<ChunkId> {
            let id = ChunkId::of(b);
            store.insert(id, b.to_vec());
            Ok(id)
        };
        for i in 0..n {
            w.push(
                Entry(ChunkId::of(&(i as u64).to_le_bytes()), i as u32),
                &mut sp,
            )
            .unwrap();
        }
        w.finish(&mut sp).unwrap()
    }

    #[test]
    fn round_trip_at_every_size() {
        for n in [0, 1, 15, 16, 300, 2048, 2049, 10_000, 700_000] {
            let mut store = HashMap::new();
            let s = build(n, &mut store);
            assert!(s.entries.len() <= MAX_PIECE);
            let mut r = ListReader::new(&s, |id: &ChunkId| Ok(store[id].clone()));
            let mut i = 0usize;
            while let Some(e) = r.next_entry().unwrap() {
                assert_eq!(e, Entry(ChunkId::of(&(i as u64).to_le_bytes()), i as u32));
                i += 1;
            }
            assert_eq!(i, n);
            if n >= 700_000 {
                assert!(s.level >= 2, "a long list must nest, got level {}", s.level);
            }
        }
    }

    #[test]
    fn insert_near_front_keeps_most_pieces() {
        let mut a = HashMap::new();
        build(100_000, &mut a);
        let mut b = HashMap::new();
        let mut w = ListWriter::new();
        let mut sp = |bytes: &[u8]| -> Result<ChunkId> {
            let id = ChunkId::of(bytes);
            b.insert(id, bytes.to_vec());
            Ok(id)
        };
        for i in 0..100_000u64 {
            if i == 10 {
                w.push(Entry(ChunkId::of(b"inserted"), 1), &mut sp).unwrap();
            }
            w.push(Entry(ChunkId::of(&i.to_le_bytes()), i as u32), &mut sp)
                .unwrap();
        }
        w.finish(&mut sp).unwrap();
        let shared = b.keys().filter(|k| a.contains_key(k)).count();
        assert!(
            shared * 10 >= b.len() * 9,
            "only {shared} of {} pieces shared",
            b.len()
        );
    }

    #[test]
    fn bad_piece_length_is_an_error() {
        assert!(decode_entries(&[0u8; 37], &ChunkId::default()).is_err());
    }
}
