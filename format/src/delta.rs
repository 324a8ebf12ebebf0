//! Deltas: a chunk carried as a zstd frame that refers back to bytes the
//! receiver already holds.
//!
//! A rebuilt image changes a few bytes inside many chunks (a `.pyc` header's
//! mtime, a line of dpkg's status file, every tar header's mtime). Chunk-level
//! dedup must then send each such chunk whole; a delta sends only what
//! changed. The encoding is plain zstd: the target chunk compressed with the
//! concatenation of its *bases* as a raw prefix (`ZSTD_CCtx_refPrefix`), so
//! any zstd library can decode it given the same bytes.
//!
//! Bases are named, never shipped: either a whole chunk by its id, or a byte
//! range of one stream (skeleton, data, or gzip reconstruction stream) of a
//! node, the node named by its id. Naming a range costs a few bytes where
//! naming every chunk under it would cost 32 bytes each. The receiver
//! rebuilds the chunk, checks its BLAKE3 against the check value sent with it,
//! and stores it as an ordinary chunk, so reading it later costs nothing
//! extra. The byte layout is in `spec/PROTOCOL.md` §9.2.

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::list::{decode_entries, Entry, ListReader, StreamRef, ENTRY_LEN};
use crate::recipe::{Node, NodeBody};
use crate::skeleton::put_varint;
use crate::store::{Store, MAX_CHUNK_LEN};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use zstd::zstd_safe::{CCtx, CParameter, DCtx, DParameter};

/// Most base bytes one delta may refer to. A receiver refuses more, so a
/// hostile sender cannot make it assemble gigabytes for one chunk.
pub const MAX_BASE_BYTES: u64 = 8 << 20;
/// Most base references in one delta.
pub const MAX_BASES: usize = 64;
/// Most node ids in one frame's table.
pub const MAX_NODES: usize = 65_536;
/// Bytes of the target's BLAKE3 sent with a delta: the receiver computes the
/// full hash of what it rebuilt and compares this prefix. A wrong rebuild is
/// caught with probability 1 - 2^-64, and even a rebuild that slipped through
/// would be stored under its own true id, referenced by nothing.
pub const CHECK_LEN: usize = 8;

/// Which stream of a node a base range lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    /// A tar node's skeleton (headers, padding, records).
    Skeleton = 0,
    /// A tar node's file contents, or a raw node's bytes.
    Data = 1,
    /// A gzip node's reconstruction stream.
    Recon = 2,
}

impl StreamKind {
    fn from_u8(b: u8) -> Option<StreamKind> {
        match b {
            0 => Some(StreamKind::Skeleton),
            1 => Some(StreamKind::Data),
            2 => Some(StreamKind::Recon),
            _ => None,
        }
    }

    /// The stream of this kind in `node`, if it has one.
    pub fn of(self, node: &Node) -> Option<&StreamRef> {
        match (&node.body, self) {
            (NodeBody::Tar { skeleton, .. }, StreamKind::Skeleton) => Some(skeleton),
            (NodeBody::Tar { data, .. }, StreamKind::Data) => Some(data),
            (NodeBody::Raw { data }, StreamKind::Data) => Some(data),
            (NodeBody::Gzip { recon, .. }, StreamKind::Recon) => Some(recon),
            _ => None,
        }
    }
}

/// Bytes the receiver already holds, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseRef {
    /// A whole chunk.
    Chunk(ChunkId),
    /// `len` bytes at offset `off` of one stream of node `node`.
    Range {
        node: ChunkId,
        stream: StreamKind,
        off: u64,
        len: u64,
    },
    /// The ids and lengths of `count` chunks rebuilt from deltas earlier in
    /// the same frame, from the `first`-th: as list entries (32-byte id, u32
    /// LE length) or, with `json`, as a node's JSON spells them
    /// (`["<hex>",<len>],`). A new list piece or node names mostly chunks
    /// sent just before it; this base spares it 32 bytes for each.
    Sent { first: u32, count: u32, json: bool },
}

/// Most entries one `Sent` base may span.
pub const MAX_SENT: u32 = 8192;

/// The chunks rebuilt so far in one frame, in order: what `Sent` bases
/// refer to.
#[derive(Default)]
pub struct SentIndex {
    pub entries: Vec<(ChunkId, u32)>,
    pub pos: HashMap<ChunkId, usize>,
}

impl SentIndex {
    pub fn push(&mut self, id: ChunkId, len: u32) {
        self.pos.entry(id).or_insert(self.entries.len());
        self.entries.push((id, len));
    }

    fn bytes(&self, first: u32, count: u32, json: bool, out: &mut Vec<u8>) -> Result<()> {
        let end = (first as usize)
            .checked_add(count as usize)
            .filter(|&e| e <= self.entries.len() && count <= MAX_SENT)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "delta base names sent entries {first}+{count}, but only {} came before it",
                    self.entries.len()
                ))
            })?;
        for (id, len) in &self.entries[first as usize..end] {
            if json {
                out.extend_from_slice(format!("[\"{}\",{}],", id.to_hex(), len).as_bytes());
            } else {
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
        Ok(())
    }
}

/// Most chunks one delta may carry.
pub const MAX_GROUP: usize = 64;

/// One or more chunks as one delta: what a sender puts on the wire.
/// Neighbouring chunks of a stream share their bases, so one zstd frame of
/// their concatenation costs less, and less time, than one frame each.
#[derive(Clone, Debug)]
pub struct DeltaChunk {
    /// The chunks, in order, with their lengths.
    pub targets: Vec<(ChunkId, u32)>,
    pub bases: Vec<BaseRef>,
    /// A zstd frame of the chunks' concatenation, compressed with the bases
    /// as prefix.
    pub delta: Vec<u8>,
}

/// A delta as read from the wire: the chunk's id is known only by its check
/// prefix until it has been rebuilt.
#[derive(Clone, Debug)]
pub struct WireDelta {
    /// Per chunk: its check prefix and length.
    pub targets: Vec<([u8; CHECK_LEN], u32)>,
    pub bases: Vec<BaseRef>,
    pub delta: Vec<u8>,
}

fn zstd_err(what: &str, code: usize) -> Error {
    Error::Corrupt(format!("{what}: {}", zstd::zstd_safe::get_error_name(code)))
}

/// Compresses `target` with `base` as prefix at zstd `level`, zstd's own
/// parameters otherwise.
pub fn encode(base: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>> {
    compress(base, target, &[CParameter::CompressionLevel(level)])
}

/// One zstd frame of `target` with `base` as prefix: no checksum (the
/// receiver checks BLAKE3), no dictionary id, the content size written.
fn compress(base: &[u8], target: &[u8], params: &[CParameter]) -> Result<Vec<u8>> {
    let mut cctx = CCtx::create();
    let wlog = window_log(base, target);
    let set = |c: &mut CCtx, p| c.set_parameter(p).map_err(|e| zstd_err("zstd setup", e));
    for p in params {
        set(&mut cctx, *p)?;
    }
    set(&mut cctx, CParameter::WindowLog(wlog))?;
    set(&mut cctx, CParameter::ChecksumFlag(false))?;
    set(&mut cctx, CParameter::ContentSizeFlag(true))?;
    set(&mut cctx, CParameter::DictIdFlag(false))?;
    cctx.ref_prefix(base)
        .map_err(|e| zstd_err("zstd prefix", e))?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(target.len()));
    cctx.compress2(&mut out, target)
        .map_err(|e| zstd_err("zstd delta", e))?;
    // The buffer was sized for the target; the delta is usually a few
    // percent of that, and a frame's worth of deltas waits in memory before
    // it is sent (a 5.6 GB push peaked at 382 MB before this).
    out.shrink_to_fit();
    Ok(out)
}

/// Window log zstd needs to reach back over `base` from any byte of
/// `target`.
fn window_log(base: &[u8], target: &[u8]) -> u32 {
    let window = (base.len() + target.len()).max(1 << 10);
    (usize::BITS - (window - 1).leading_zeros()).clamp(10, 27)
}

/// Compresses file contents against their previous version: at levels 1
/// to 4 (zstd's `fast` and `dfast` strategies) with hash tables of a
/// quarter of the window, one slot per four bytes of base, where zstd's
/// default for those levels (2^13 to 2^16 slots, made for streams that
/// forget their past) would let most of the base go unindexed. Other levels
/// use zstd's parameters. (Which level is used, and why: `similar.rs`,
/// `DEFAULT_LEVEL`.)
pub fn encode_data(base: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut params = vec![CParameter::CompressionLevel(level)];
    if level <= 4 {
        let hlog = window_log(base, target).saturating_sub(2).clamp(10, 25);
        params.push(CParameter::HashLog(hlog));
        if level >= 2 {
            // dfast's second table, for short matches.
            params.push(CParameter::ChainLog(hlog));
        }
    }
    if level >= 16 {
        // With the optimal parsers a large target length lets a match run
        // on past 256 bytes instead of being cut there.
        params.push(CParameter::TargetLength(4096));
    }
    compress(base, target, &params)
}

/// Compresses tar headers against the previous version's: zstd's optimal
/// parser with a shallow search, matches of at least 4 bytes, and matches
/// allowed to run on. A rebuild changes a few bytes (mtime, checksum) in
/// every 512-byte header; the optimal parser spends one cheap sequence on
/// each such change where the lazy parsers of the middle levels spend
/// several. Measured on the small corpus rebuild: skeleton deltas 138 KB at
/// level 9, 104 KB this way, at about the same speed.
pub fn encode_headers(base: &[u8], target: &[u8]) -> Result<Vec<u8>> {
    compress(
        base,
        target,
        &[
            CParameter::CompressionLevel(9),
            CParameter::Strategy(zstd::zstd_safe::Strategy::ZSTD_btopt),
            CParameter::TargetLength(4096),
            CParameter::SearchLog(1),
            CParameter::MinMatch(4),
        ],
    )
}

/// Rebuilds a chunk of `raw_len` bytes from its delta and base: a zstd
/// frame, or a header delta ([`crate::hdrdelta`]) by its magic.
pub fn decode(base: &[u8], delta: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    if raw_len > MAX_CHUNK_LEN {
        return Err(Error::Corrupt(format!(
            "delta of a {raw_len}-byte chunk: larger than any chunk"
        )));
    }
    if let Some(body) = delta.strip_prefix(crate::hdrdelta::MAGIC) {
        return crate::hdrdelta::decode(base, body, raw_len);
    }
    let out = decode_at_most(base, delta, raw_len)?;
    if out.len() != raw_len {
        return Err(Error::Corrupt(format!(
            "delta rebuilt {} bytes where {raw_len} were announced",
            out.len()
        )));
    }
    Ok(out)
}

/// Decompresses one zstd frame with `base` as prefix into at most `cap`
/// bytes.
pub(crate) fn decode_at_most(base: &[u8], delta: &[u8], cap: usize) -> Result<Vec<u8>> {
    let raw_len = cap;
    let mut dctx = DCtx::create();
    dctx.set_parameter(DParameter::WindowLogMax(27))
        .map_err(|e| zstd_err("zstd setup", e))?;
    dctx.ref_prefix(base)
        .map_err(|e| zstd_err("zstd prefix", e))?;
    let mut out = Vec::with_capacity(raw_len);
    dctx.decompress(&mut out, delta)
        .map_err(|e| zstd_err("cannot decode delta", e))?;
    Ok(out)
}

pub(crate) fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let x = *b
            .get(*pos)
            .ok_or_else(|| Error::Corrupt("delta frame ends inside a number".into()))?;
        *pos += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Error::Corrupt("delta frame: number too long".into()))
}

pub(crate) fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8]> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| Error::Corrupt("delta frame is truncated".into()))?;
    let s = &b[*pos..end];
    *pos = end;
    Ok(s)
}

/// Encodes deltas into one frame payload: a table of the node ids that
/// ranges refer to, then the deltas.
pub fn encode_frame(chunks: &[DeltaChunk]) -> Vec<u8> {
    let mut nodes: Vec<ChunkId> = Vec::new();
    let mut index: HashMap<ChunkId, u64> = HashMap::new();
    for c in chunks {
        for b in &c.bases {
            if let BaseRef::Range { node, .. } = b {
                index.entry(*node).or_insert_with(|| {
                    nodes.push(*node);
                    nodes.len() as u64 - 1
                });
            }
        }
    }
    let mut out = Vec::new();
    put_varint(&mut out, nodes.len() as u64);
    for n in &nodes {
        out.extend_from_slice(&n.0);
    }
    for c in chunks {
        put_varint(&mut out, c.targets.len() as u64);
        for (id, len) in &c.targets {
            out.extend_from_slice(&id.0[..CHECK_LEN]);
            put_varint(&mut out, *len as u64);
        }
        put_varint(&mut out, c.bases.len() as u64);
        for b in &c.bases {
            match b {
                BaseRef::Chunk(id) => {
                    out.push(0);
                    out.extend_from_slice(&id.0);
                }
                BaseRef::Range {
                    node,
                    stream,
                    off,
                    len,
                } => {
                    out.push(1);
                    put_varint(&mut out, index[node]);
                    out.push(*stream as u8);
                    put_varint(&mut out, *off);
                    put_varint(&mut out, *len);
                }
                BaseRef::Sent { first, count, json } => {
                    out.push(if *json { 3 } else { 2 });
                    put_varint(&mut out, *first as u64);
                    put_varint(&mut out, *count as u64);
                }
            }
        }
        put_varint(&mut out, c.delta.len() as u64);
        out.extend_from_slice(&c.delta);
    }
    out
}

fn read_id(b: &[u8], pos: &mut usize) -> Result<ChunkId> {
    let mut id = [0u8; 32];
    id.copy_from_slice(take(b, pos, 32)?);
    Ok(ChunkId(id))
}

/// Decodes a frame payload written by [`encode_frame`], checking every
/// bound before trusting it.
pub fn decode_frame(b: &[u8]) -> Result<Vec<WireDelta>> {
    let mut pos = 0usize;
    let n_nodes = get_varint(b, &mut pos)? as usize;
    if n_nodes > MAX_NODES {
        return Err(Error::Corrupt(format!(
            "delta frame names {n_nodes} nodes (at most {MAX_NODES})"
        )));
    }
    let mut nodes = Vec::with_capacity(n_nodes);
    for _ in 0..n_nodes {
        nodes.push(read_id(b, &mut pos)?);
    }
    let mut out: Vec<WireDelta> = Vec::new();
    // Chunks before the current delta: what a Sent base may span.
    let mut chunks_before = 0u64;
    while pos < b.len() {
        let n = get_varint(b, &mut pos)? as usize;
        if n == 0 || n > MAX_GROUP {
            return Err(Error::Corrupt(format!(
                "delta of {n} chunks (1 to {MAX_GROUP})"
            )));
        }
        let mut targets = Vec::with_capacity(n);
        let mut raw_total = 0u64;
        for _ in 0..n {
            let mut check = [0u8; CHECK_LEN];
            check.copy_from_slice(take(b, &mut pos, CHECK_LEN)?);
            let raw_len = get_varint(b, &mut pos)?;
            if raw_len > MAX_CHUNK_LEN as u64 {
                return Err(Error::Corrupt(format!(
                    "delta of a {raw_len}-byte chunk (at most {MAX_CHUNK_LEN})"
                )));
            }
            raw_total += raw_len;
            targets.push((check, raw_len as u32));
        }
        if raw_total > MAX_CHUNK_LEN as u64 {
            return Err(Error::Corrupt(format!(
                "delta of {raw_total} bytes of chunks (at most {MAX_CHUNK_LEN})"
            )));
        }
        let n_bases = get_varint(b, &mut pos)? as usize;
        if n_bases == 0 || n_bases > MAX_BASES {
            return Err(Error::Corrupt(format!(
                "delta with {n_bases} bases (1 to {MAX_BASES})"
            )));
        }
        let mut bases = Vec::with_capacity(n_bases);
        let mut total = 0u64;
        for _ in 0..n_bases {
            let tag = *take(b, &mut pos, 1)?.first().unwrap_or(&255);
            match tag {
                0 => bases.push(BaseRef::Chunk(read_id(b, &mut pos)?)),
                1 => {
                    let i = get_varint(b, &mut pos)? as usize;
                    let node = *nodes.get(i).ok_or_else(|| {
                        Error::Corrupt(format!("delta base names node {i} of {n_nodes}"))
                    })?;
                    let s = *take(b, &mut pos, 1)?.first().unwrap_or(&255);
                    let stream = StreamKind::from_u8(s).ok_or_else(|| {
                        Error::Corrupt(format!("delta base in unknown stream kind {s}"))
                    })?;
                    let off = get_varint(b, &mut pos)?;
                    let len = get_varint(b, &mut pos)?;
                    total = total.saturating_add(len);
                    bases.push(BaseRef::Range {
                        node,
                        stream,
                        off,
                        len,
                    });
                }
                2 | 3 => {
                    let first = get_varint(b, &mut pos)?;
                    let count = get_varint(b, &mut pos)?;
                    if first.saturating_add(count) > chunks_before || count > MAX_SENT as u64 {
                        return Err(Error::Corrupt(format!(
                            "delta base names sent chunks {first}+{count}, but {chunks_before} came before it"
                        )));
                    }
                    total = total.saturating_add(count * 100);
                    bases.push(BaseRef::Sent {
                        first: first as u32,
                        count: count as u32,
                        json: tag == 3,
                    });
                }
                t => return Err(Error::Corrupt(format!("delta base with unknown tag {t}"))),
            }
        }
        if total > MAX_BASE_BYTES {
            return Err(Error::Corrupt(format!(
                "delta refers to {total} base bytes (at most {MAX_BASE_BYTES})"
            )));
        }
        let dlen = get_varint(b, &mut pos)? as usize;
        let delta = take(b, &mut pos, dlen)?.to_vec();
        chunks_before += n as u64;
        out.push(WireDelta {
            targets,
            bases,
            delta,
        });
    }
    Ok(out)
}

/// Where each leaf list piece of a base stream starts, for reading byte
/// ranges. The chunks are found through their pieces, read again when a
/// range needs them (through a small cache), so an index costs about 1/256
/// of a flat list of every chunk: tens of KB for a 40 GB layer, not ~100 MB.
struct StreamIndex {
    /// Start of each leaf piece, in stream order.
    starts: Vec<u64>,
    leaves: Vec<Leaves>,
    len: u64,
}

/// The chunks under one entry of a [`StreamIndex`].
enum Leaves {
    /// A list piece whose entries are chunks.
    Piece(ChunkId),
    /// A stream of level 0: its chunks are listed in the node itself.
    Inline(Arc<Vec<Entry>>),
}

/// Bytes of decompressed chunks kept for reuse: neighbouring targets share
/// base chunks, and reading each again would cost a zstd pass every time.
const CHUNK_CACHE_BYTES: usize = 32 << 20;
/// Bytes of rebuilt chunks a receiver holds at once while applying a frame.
///
/// 16 MiB is a thousand chunks of the default size, enough to keep every
/// core busy; at 64 MiB the receiver of a 5.6 GB image's deltas peaked at
/// over 200 MB.
pub const WINDOW_BYTES: u64 = 16 << 20;
/// Stream indexes kept; each is about 40 bytes per leaf piece of its stream.
const STREAM_CACHE: usize = 256;
/// Bytes of decoded leaf pieces kept for reuse (a piece is 36 bytes per
/// chunk: about 9 KB on average, at most 72 KB).
const PIECE_CACHE_BYTES: usize = 8 << 20;

#[derive(Default)]
struct ChunkCache {
    map: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
}

/// Reads base bytes from a store: by both sides, the sender to make deltas
/// and the receiver to apply them. Safe to share between threads.
pub struct BaseResolver {
    store: Arc<Store>,
    streams: Mutex<HashMap<(ChunkId, StreamKind), Arc<StreamIndex>>>,
    chunks: Mutex<ChunkCache>,
    pieces: Mutex<PieceCache>,
}

#[derive(Default)]
struct PieceCache {
    map: HashMap<ChunkId, Arc<Vec<Entry>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
}

impl BaseResolver {
    pub fn new(store: Arc<Store>) -> Self {
        BaseResolver {
            store,
            streams: Mutex::new(HashMap::new()),
            chunks: Mutex::new(ChunkCache::default()),
            pieces: Mutex::new(PieceCache::default()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A chunk's bytes, verified, through the cache.
    pub fn chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Ok(c) = self.chunks.lock() {
            if let Some(b) = c.map.get(id) {
                return Ok(b.clone());
            }
        }
        let b = Arc::new(self.store.read_chunk(id)?);
        if let Ok(mut c) = self.chunks.lock() {
            if c.map.insert(*id, b.clone()).is_none() {
                c.order.push_back(*id);
                c.bytes += b.len();
            }
            while c.bytes > CHUNK_CACHE_BYTES {
                let Some(old) = c.order.pop_front() else {
                    break;
                };
                if let Some(x) = c.map.remove(&old) {
                    c.bytes -= x.len();
                }
            }
        }
        Ok(b)
    }

    fn stream(&self, node: &ChunkId, kind: StreamKind) -> Result<Arc<StreamIndex>> {
        if let Ok(s) = self.streams.lock() {
            if let Some(i) = s.get(&(*node, kind)) {
                return Ok(i.clone());
            }
        }
        let idx = Arc::new(self.read_stream(node, kind)?);
        if let Ok(mut m) = self.streams.lock() {
            if m.len() >= STREAM_CACHE {
                m.clear();
            }
            m.insert((*node, kind), idx.clone());
        }
        Ok(idx)
    }

    fn stream_ref(&self, node: &ChunkId, kind: StreamKind) -> Result<StreamRef> {
        let n = Node::decode(&self.chunk(node)?, node)?;
        kind.of(&n).cloned().ok_or_else(|| {
            Error::Corrupt(format!("delta base: node {node} has no {kind:?} stream"))
        })
    }

    fn read_stream(&self, node: &ChunkId, kind: StreamKind) -> Result<StreamIndex> {
        use rayon::prelude::*;
        let s = self.stream_ref(node, kind)?;
        if s.level == 0 {
            let len = s.entries.iter().map(|e| e.1 as u64).sum();
            return Ok(StreamIndex {
                starts: vec![0],
                leaves: vec![Leaves::Inline(Arc::new(s.entries))],
                len,
            });
        }
        let mut level: Vec<ChunkId> = s.entries.iter().map(|e| e.0).collect();
        for _ in 1..s.level {
            let mut next = Vec::new();
            for p in &level {
                next.extend(
                    decode_entries(&self.store.read_chunk(p)?, p)?
                        .iter()
                        .map(|e| e.0),
                );
            }
            level = next;
        }
        let lens: Vec<Result<u64>> = level
            .par_iter()
            .map(|p| {
                let entries = decode_entries(&self.store.read_chunk(p)?, p)?;
                Ok(entries.iter().map(|e| e.1 as u64).sum())
            })
            .collect();
        let mut starts = Vec::with_capacity(level.len());
        let mut off = 0u64;
        for l in lens {
            starts.push(off);
            off += l?;
        }
        Ok(StreamIndex {
            starts,
            leaves: level.into_iter().map(Leaves::Piece).collect(),
            len: off,
        })
    }

    /// A leaf piece's entries, through the cache.
    fn piece(&self, id: &ChunkId) -> Result<Arc<Vec<Entry>>> {
        if let Ok(c) = self.pieces.lock() {
            if let Some(e) = c.map.get(id) {
                return Ok(e.clone());
            }
        }
        let e = Arc::new(decode_entries(&self.store.read_chunk(id)?, id)?);
        if let Ok(mut c) = self.pieces.lock() {
            if c.map.insert(*id, e.clone()).is_none() {
                c.order.push_back(*id);
                c.bytes += e.len() * ENTRY_LEN;
            }
            while c.bytes > PIECE_CACHE_BYTES {
                let Some(old) = c.order.pop_front() else {
                    break;
                };
                if let Some(x) = c.map.remove(&old) {
                    c.bytes -= x.len() * ENTRY_LEN;
                }
            }
        }
        Ok(e)
    }

    /// Calls `f` with the start and entry of each chunk of stream `s` that
    /// overlaps `off..end`, in order, until it returns false.
    fn chunks_in(
        &self,
        s: &StreamIndex,
        off: u64,
        end: u64,
        f: &mut dyn FnMut(u64, &Entry) -> Result<bool>,
    ) -> Result<()> {
        let mut i = s.starts.partition_point(|&x| x <= off).saturating_sub(1);
        while i < s.leaves.len() && s.starts[i] < end {
            let entries = match &s.leaves[i] {
                Leaves::Piece(p) => self.piece(p)?,
                Leaves::Inline(e) => e.clone(),
            };
            let mut cs = s.starts[i];
            for e in entries.iter() {
                if cs >= end {
                    return Ok(());
                }
                let ce = cs + e.1 as u64;
                if ce > off && !f(cs, e)? {
                    return Ok(());
                }
                cs = ce;
            }
            i += 1;
        }
        Ok(())
    }

    pub fn stream_len(&self, node: &ChunkId, kind: StreamKind) -> Result<u64> {
        Ok(self.stream(node, kind)?.len)
    }

    /// The chunks of a stream with their offsets, read afresh and not
    /// cached: for a skeleton being indexed, which is walked once.
    pub fn stream_chunks(&self, node: &ChunkId, kind: StreamKind) -> Result<Vec<(u64, Entry)>> {
        let s = self.stream_ref(node, kind)?;
        let mut out = Vec::new();
        let mut off = 0u64;
        ListReader::new(&s, |c| self.store.read_chunk(c)).walk(
            |_| {},
            |e| {
                out.push((off, *e));
                off += e.1 as u64;
            },
        )?;
        Ok(out)
    }

    /// The concatenated bytes of `bases`.
    pub fn base_bytes(&self, bases: &[BaseRef], sent: &SentIndex) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for b in bases {
            match b {
                BaseRef::Chunk(id) => out.extend_from_slice(&self.chunk(id)?),
                BaseRef::Sent { first, count, json } => {
                    sent.bytes(*first, *count, *json, &mut out)?
                }
                BaseRef::Range {
                    node,
                    stream,
                    off,
                    len,
                } => {
                    let s = self.stream(node, *stream)?;
                    let end = off
                        .checked_add(*len)
                        .filter(|&e| e <= s.len)
                        .ok_or_else(|| {
                            Error::Corrupt(format!(
                                "delta base {off}+{len} lies past the end of a {}-byte stream",
                                s.len
                            ))
                        })?;
                    self.chunks_in(&s, *off, end, &mut |cs, e| {
                        let c = self.chunk(&e.0)?;
                        let from = off.saturating_sub(cs) as usize;
                        let to = ((end - cs) as usize).min(c.len());
                        if from < to {
                            out.extend_from_slice(&c[from..to]);
                        }
                        Ok(true)
                    })?;
                }
            }
            if out.len() as u64 > MAX_BASE_BYTES {
                return Err(Error::Corrupt("delta base too large".into()));
            }
        }
        Ok(out)
    }

    /// Rebuilds every delta of a frame, in parallel where no `Sent` base
    /// ties one to those before it, handing each result to `sink` in frame
    /// order: its chunks, or why not. At most about `WINDOW_BYTES` of
    /// rebuilt chunks are held at once, however large the frame claims its
    /// chunks are.
    pub fn apply_frame(
        &self,
        deltas: &[WireDelta],
        sink: &mut dyn FnMut(&WireDelta, Result<Rebuilt>) -> Result<()>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let uses_sent = |d: &WireDelta| d.bases.iter().any(|b| matches!(b, BaseRef::Sent { .. }));
        let empty = SentIndex::default();
        let mut sent = SentIndex::default();
        let mut start = 0usize;
        while start < deltas.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < deltas.len() && (end == start || bytes < WINDOW_BYTES) {
                bytes += deltas[end].targets.iter().map(|t| t.1 as u64).sum::<u64>();
                end += 1;
            }
            let window = &deltas[start..end];
            self.prefetch(window);
            let mut out: Vec<Option<Result<Rebuilt>>> = window
                .par_iter()
                .map(|d| (!uses_sent(d)).then(|| self.apply(d, &empty)))
                .collect();
            for (d, slot) in window.iter().zip(out.iter_mut()) {
                let r = match slot.take() {
                    Some(r) => r,
                    None => self.apply(d, &sent),
                };
                // A failed delta still takes its places, so later positions
                // hold; a base spanning them then fails its own check.
                match &r {
                    Ok(chunks) => {
                        for (id, raw) in chunks {
                            sent.push(*id, raw.len() as u32);
                        }
                    }
                    Err(_) => {
                        for _ in &d.targets {
                            sent.push(ChunkId::default(), 0);
                        }
                    }
                }
                sink(d, r)?;
            }
            start = end;
        }
        Ok(())
    }

    /// Reads the base chunks of `deltas` not yet cached in one batch: on an
    /// object store a few coalesced requests instead of one per chunk. Best
    /// effort: what fails here is read (and its failure reported) by
    /// `apply`; no more than half the cache is filled.
    fn prefetch(&self, deltas: &[WireDelta]) {
        let mut want: Vec<ChunkId> = Vec::new();
        let mut seen: HashSet<ChunkId> = HashSet::new();
        let mut bytes = 0u64;
        let cached = |id: &ChunkId| {
            self.chunks
                .lock()
                .map(|c| c.map.contains_key(id))
                .unwrap_or(false)
        };
        let mut take = |id: ChunkId, len: u64| -> bool {
            if bytes + len > (CHUNK_CACHE_BYTES / 2) as u64 {
                return false;
            }
            if seen.insert(id) && !cached(&id) && self.store.contains(&id) {
                bytes += len;
                want.push(id);
            }
            true
        };
        'all: for d in deltas {
            for b in &d.bases {
                match b {
                    BaseRef::Chunk(id) => {
                        let len = self.store.lookup(id).map_or(0, |l| l.raw_len as u64);
                        if !take(*id, len) {
                            break 'all;
                        }
                    }
                    BaseRef::Range {
                        node,
                        stream,
                        off,
                        len,
                    } => {
                        let Ok(s) = self.stream(node, *stream) else {
                            continue;
                        };
                        let end = off.saturating_add(*len);
                        let mut full = false;
                        let walked = self.chunks_in(&s, *off, end, &mut |_, e| {
                            full = !take(e.0, e.1 as u64);
                            Ok(!full)
                        });
                        if full || walked.is_err() {
                            break 'all;
                        }
                    }
                    BaseRef::Sent { .. } => {}
                }
            }
        }
        if want.len() < 2 {
            return;
        }
        let Ok(bufs) = self.store.read_chunks(&want) else {
            return;
        };
        if let Ok(mut c) = self.chunks.lock() {
            for (id, b) in want.into_iter().zip(bufs) {
                if c.map.insert(id, Arc::new(b)).is_none() {
                    c.order.push_back(id);
                    if let Some(x) = c.map.get(&id) {
                        c.bytes += x.len();
                    }
                }
            }
            while c.bytes > CHUNK_CACHE_BYTES {
                let Some(old) = c.order.pop_front() else {
                    break;
                };
                if let Some(x) = c.map.remove(&old) {
                    c.bytes -= x.len();
                }
            }
        }
    }

    /// Rebuilds the chunks a delta carries and checks each against its
    /// check value. A base this store lacks is a `MissingChunk` error.
    pub fn apply(&self, d: &WireDelta, sent: &SentIndex) -> Result<Rebuilt> {
        let base = self.base_bytes(&d.bases, sent)?;
        let total: usize = d.targets.iter().map(|t| t.1 as usize).sum();
        let raw = decode(&base, &d.delta, total)?;
        let mut out = Vec::with_capacity(d.targets.len());
        let mut at = 0usize;
        for (check, len) in &d.targets {
            let bytes = raw[at..at + *len as usize].to_vec();
            at += *len as usize;
            let id = ChunkId::of(&bytes);
            if id.0[..CHECK_LEN] != check[..] {
                return Err(Error::Corrupt(format!(
                    "a delta rebuilt chunk {id}, whose hash does not start with the {} sent with it: corrupt delta or base",
                    hex::encode(check)
                )));
            }
            out.push((id, bytes));
        }
        Ok(out)
    }
}

/// The chunks one delta rebuilt: ids and bytes.
pub type Rebuilt = Vec<(ChunkId, Vec<u8>)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_round_trip_and_is_small() {
        let base: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i * 7).to_le_bytes())
            .collect();
        let mut target = base[1000..60_000].to_vec();
        target[500..504].copy_from_slice(b"XXXX");
        let d = encode(&base, &target, 9).unwrap();
        assert!(d.len() < 200, "delta is {} bytes", d.len());
        assert_eq!(decode(&base, &d, target.len()).unwrap(), target);
        // The wrong base gives garbage or an error, never the target.
        let mut bad = base.clone();
        bad[20_000] ^= 1;
        assert_ne!(decode(&bad, &d, target.len()).ok(), Some(target.clone()));
        assert!(decode(&base, &d, target.len() + 1).is_err());
    }

    /// The fast levels (the default among them) and the header encoder
    /// find a match at the far end of a base as large as a group's
    /// (`GROUP_BASE_BYTES` in similar.rs), beyond what zstd's own tables for
    /// those levels reach; every level returns a buffer no larger than the
    /// delta (deltas wait in memory by the thousand before they are sent).
    #[test]
    fn data_and_header_deltas_reach_across_a_large_base() {
        // 4 MiB of incompressible base; the target repeats its start.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let base: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut target = base[4096..4096 + 64 * 1024].to_vec();
        target[30_000..30_004].copy_from_slice(b"WXYZ");
        for level in [1, 2, 3, 4, 9, 19] {
            let d = encode_data(&base, &target, level).unwrap();
            if level <= 4 {
                assert!(d.len() < 400, "level {level}: delta is {} bytes", d.len());
            }
            assert!(
                d.capacity() <= d.len() + 64,
                "level {level}: capacity {}",
                d.capacity()
            );
            assert_eq!(decode(&base, &d, target.len()).unwrap(), target);
        }
        let d = encode_headers(&base, &target).unwrap();
        assert!(d.len() < 400, "headers: delta is {} bytes", d.len());
        assert_eq!(decode(&base, &d, target.len()).unwrap(), target);
    }

    #[test]
    fn frame_round_trip_and_garbage() {
        let c = DeltaChunk {
            targets: vec![(ChunkId::of(b"x"), 1), (ChunkId::of(b"y"), 7)],
            bases: vec![
                BaseRef::Chunk(ChunkId::of(b"b")),
                BaseRef::Range {
                    node: ChunkId::of(b"n"),
                    stream: StreamKind::Skeleton,
                    off: 5,
                    len: 99,
                },
            ],
            delta: vec![1, 2, 3],
        };
        let mut c2 = c.clone();
        c2.bases.push(BaseRef::Sent {
            first: 0,
            count: 1,
            json: true,
        });
        let f = encode_frame(&[c.clone(), c2.clone()]);
        let got = decode_frame(&f).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].bases, c.bases);
        assert_eq!(got[1].bases, c2.bases);
        assert_eq!(got[1].targets[1].0[..], ChunkId::of(b"y").0[..CHECK_LEN]);
        assert_eq!(got[1].targets[1].1, 7);
        // A Sent base may not reach past the chunks before its delta.
        let mut c3 = c.clone();
        c3.bases = vec![BaseRef::Sent {
            first: 1,
            count: 1,
            json: false,
        }];
        let mut c4 = c3.clone();
        c4.bases = vec![BaseRef::Sent {
            first: 1,
            count: 2,
            json: false,
        }];
        assert!(decode_frame(&encode_frame(&[c.clone(), c4])).is_err());
        assert!(decode_frame(&encode_frame(&[c3.clone()])).is_err());
        assert!(decode_frame(&encode_frame(&[c.clone(), c3])).is_ok());
        for cut in 1..f.len() {
            // Every truncation is an error, not a panic (some prefixes are
            // whole frames of fewer deltas, which is fine).
            if let Ok(d) = decode_frame(&f[..cut]) {
                assert!(d.len() < 2);
            }
        }
    }
}
