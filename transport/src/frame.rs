//! Framing: every message is `length (u32 LE) | type (u8) | payload`, where
//! the length counts the type byte and the payload. See spec/PROTOCOL.md.

use crate::{Error, Result};
use std::io::{Read, Write};

/// Largest frame either side accepts; a bigger length is a protocol error
/// (and never an allocation).
pub const MAX_FRAME: u32 = 64 << 20;
/// Largest number of ids in one HAS, HAS_LAYERS or GET request.
pub const MAX_IDS: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Error = 0x02,
    Ok = 0x03,
    Has = 0x10,
    HasReply = 0x11,
    GetRef = 0x12,
    Ref = 0x13,
    Get = 0x14,
    Chunks = 0x15,
    HasLayers = 0x16,
    Put = 0x17,
    Publish = 0x18,
    Bye = 0x19,
    /// Chunks as deltas against bases the receiver holds (PROTOCOL.md §9.2).
    PutDelta = 0x1a,
    /// A pull client's base images (PROTOCOL.md §8.1).
    DeltaBases = 0x1b,
    /// GET whose reply may carry deltas.
    GetDelta = 0x1c,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Error,
            0x03 => Ok,
            0x10 => Has,
            0x11 => HasReply,
            0x12 => GetRef,
            0x13 => Ref,
            0x14 => Get,
            0x15 => Chunks,
            0x16 => HasLayers,
            0x17 => Put,
            0x18 => Publish,
            0x19 => Bye,
            0x1a => PutDelta,
            0x1b => DeltaBases,
            0x1c => GetDelta,
            _ => return None,
        })
    }
}

pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub fn write_frame(w: &mut dyn Write, kind: Kind, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| Error::Protocol(format!("frame of {} bytes is too large", payload.len())))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = kind as u8;
    w.write_all(&head).map_err(Error::Io)?;
    w.write_all(payload).map_err(Error::Io)?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame(r: &mut dyn Read) -> Result<Option<Frame>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(Error::Protocol(
                    "connection closed inside a frame header".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(e)),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len == 0 || len > MAX_FRAME {
        return Err(Error::Protocol(format!("frame length {len} out of range")));
    }
    let kind = Kind::from_u8(head[4])
        .ok_or_else(|| Error::Protocol(format!("unknown message type 0x{:02x}", head[4])))?;
    let mut payload = vec![0u8; len as usize - 1];
    r.read_exact(&mut payload)
        .map_err(|e| Error::Protocol(format!("connection closed inside a frame: {e}")))?;
    Ok(Some(Frame { kind, payload }))
}

/// Ids travel as concatenated 32-byte hashes.
pub fn encode_ids(ids: &[wharf_format::ChunkId]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.0).collect()
}

pub fn decode_ids(b: &[u8]) -> Result<Vec<wharf_format::ChunkId>> {
    if !b.len().is_multiple_of(32) || b.len() / 32 > MAX_IDS {
        return Err(Error::Protocol(format!("id list of {} bytes", b.len())));
    }
    Ok(b.chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            wharf_format::ChunkId(a)
        })
        .collect())
}

/// One chunk as it travels: compressed, as stored.
pub struct WireChunk {
    pub id: wharf_format::ChunkId,
    pub raw_len: u32,
    pub stored: Vec<u8>,
}

pub fn encode_chunk(out: &mut Vec<u8>, c: &WireChunk) {
    out.extend_from_slice(&c.id.0);
    out.extend_from_slice(&c.raw_len.to_le_bytes());
    out.extend_from_slice(&(c.stored.len() as u32).to_le_bytes());
    out.extend_from_slice(&c.stored);
}

/// The entries of a PUT or CHUNKS payload, checked for framing, as places
/// in it (no copies): an entry is byte for byte a pack entry, so the
/// receiver stores spans of the payload as they are.
pub fn decode_entries(b: &[u8]) -> Result<Vec<wharf_format::store::ReceivedEntry>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let e = &b[at..];
        if e.len() < 40 {
            return Err(Error::Protocol("truncated chunk entry".into()));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let raw_len = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
        let stored_len = u32::from_le_bytes([e[36], e[37], e[38], e[39]]) as usize;
        if e.len() - 40 < stored_len || raw_len > MAX_FRAME {
            return Err(Error::Protocol("chunk entry longer than its frame".into()));
        }
        out.push(wharf_format::store::ReceivedEntry {
            id: wharf_format::ChunkId(id),
            raw_len,
            at: at + 40,
            len: stored_len,
        });
        at += 40 + stored_len;
    }
    Ok(out)
}

pub fn bitmap(bits: impl Iterator<Item = bool>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, b) in bits.enumerate() {
        if i.is_multiple_of(8) {
            out.push(0);
        }
        if b {
            if let Some(last) = out.last_mut() {
                *last |= 1 << (i % 8);
            }
        }
    }
    out
}

pub fn bit(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}
