//! Finding bases for deltas: for each chunk of an image, bytes a receiver
//! holds that are likely to resemble it.
//!
//! Measured on real rebuilds (`shared/notes/dedup-prototype.md`), the best
//! base for a changed chunk is nearly always the same file in the
//! corresponding layer of the previous version, and for a tar header the
//! same entry's header there. So the planner pairs the new image's nodes
//! with nodes of the base images (layers by their member path, else by how
//! many file paths they share), reads every paired tar's skeleton to learn
//! where each file's header and contents sit, and matches files by path
//! (exactly, else with digit runs masked, so `pyarrow-18.1.0.dist-info`
//! finds `pyarrow-19.0.0.dist-info`). A chunk's base is then the byte
//! ranges its files occupy in the old streams; where no file matches, the
//! same relative position of the paired stream. Nodes, block maps, list
//! pieces and the recipe are small objects whose old counterpart is known
//! and serve as whole-chunk bases.
//!
//! The choice is measured, not guessed: a delta is kept only when it is
//! smaller than the chunk as stored, and a second candidate is tried when
//! the first is poor. Every base is bounded in size, so the cost per chunk is.

use crate::delta::{self, BaseRef, BaseResolver, DeltaChunk, SentIndex, StreamKind};
use crate::error::Result;
use crate::extract::load_recipe;
use crate::hash::ChunkId;
use crate::hdrdelta;
use crate::list::{decode_entries, Entry, StreamRef};
use crate::recipe::{Node, NodeBody};
use crate::skeleton::{Record, SkeletonReader};
use crate::tarhdr::{parse_header, parse_pax, EntryKind, BLOCK};
use rayon::prelude::*;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::sync::Arc;

/// Old files up to this size are offered whole as base.
const WHOLE_FILE: u64 = 256 << 10;
/// Bytes added on each side of a mapped range: content shifts a little
/// when a line is added to a file.
const SLACK: u64 = 16 << 10;
/// Bytes around the proportional position when nothing better is known.
const BLIND_SLACK: u64 = 64 << 10;
/// Most base bytes the planner offers one chunk.
const PLAN_BASE_BYTES: u64 = 1 << 20;
/// Most bytes of chunks (estimated by position) in one grouped delta.
const GROUP_BYTES: u64 = 1 << 20;
/// Most base bytes a grouped delta may use.
const GROUP_BASE_BYTES: u64 = 4 << 20;
/// A delta above this share of the stored chunk is poor enough to try the
/// second candidate.
const POOR: usize = 4;
/// A header delta at most 1/this of its skeleton chunk (2 bytes a 512-byte
/// header) is taken without also trying zstd's optimal parser. On the small
/// corpus (legacy rebuild, dep-bump, base-upgrade) trying both everywhere
/// saved 6, 34 and 56 bytes of 20, 10 and 37 KB of skeleton deltas.
const HEADER_DELTA_GOOD: usize = 256;
/// Most old list pieces a new piece's delta refers to.
const MAX_PIECE_BASES: usize = 4;
/// Bytes a delta costs on the wire beside its zstd frame (check, lengths,
/// base references): a delta must beat the stored chunk by more.
const DELTA_OVERHEAD: usize = 24;

/// The default zstd level for deltas of file contents (skeletons have their
/// own settings below 16: [`delta::encode_headers`]).
/// Measured against level 9 for everything (delta bytes; user CPU of both
/// ends of a push): small corpus rebuild 188 KB against 181, dep-bump
/// 3.10 MB against 2.80, base-upgrade 6.46 against 6.02 (all still under
/// xdelta3's), app-change 2.1 KB either way; the 5.6 GB dep-bump pair
/// 9.06 MB against 8.51 at 6.9 CPU-s against 12.3. Level 9 is within 3-5 %
/// of level 12 at a fifth to a tenth of its time (levels above 9 switch
/// zstd to binary-tree match finders that index the whole base for every
/// chunk).
///
/// A second pass at level 9 over deltas that came out poor (over a quarter
/// of the stored chunk) was tried and dropped: on the 5.6 GB major-upgrade
/// pair it took 25.5 s (39.9 CPU-s) for a bundle of 1,134.8 MB where
/// level 1 alone takes 16.2 s (23.1 CPU-s) for 1,137.5 MB (+0.24 %); on the
/// small corpus it saved under 0.1 % on every pair but the 2.6 KB app change.
pub const DEFAULT_LEVEL: i32 = 1;

fn hash_path(p: &[u8]) -> u64 {
    let p = p.strip_prefix(b"./").unwrap_or(p);
    let p = p.strip_suffix(b"/").unwrap_or(p);
    let mut h = DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

/// The path with every run of digits masked: versioned names of one
/// package's files then meet.
fn hash_norm(p: &[u8]) -> u64 {
    let p = p.strip_prefix(b"./").unwrap_or(p);
    let mut out = Vec::with_capacity(p.len());
    let mut in_digits = false;
    for &c in p {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push(b'#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    let mut h = DefaultHasher::new();
    out.hash(&mut h);
    h.finish()
}

/// Where one tar's entries sit in its skeleton and data streams.
#[derive(Default)]
struct TarIndex {
    /// (path, masked path, skeleton offset of the header block)
    headers: Vec<(u64, u64, u64)>,
    /// (path, masked path, data offset, length) of file contents
    files: Vec<(u64, u64, u64, u64)>,
    /// The member path of each child node, by child index.
    children: HashMap<u64, u64>,
    skel_len: u64,
}

impl TarIndex {
    fn path_set(&self) -> HashSet<u64> {
        self.headers.iter().map(|h| h.0).collect()
    }
}

/// Reads a stream's bytes in order, one chunk at a time.
struct StreamBytes<'a> {
    resolver: &'a BaseResolver,
    chunks: std::vec::IntoIter<(u64, crate::list::Entry)>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for StreamBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            let Some((_, e)) = self.chunks.next() else {
                return Ok(0);
            };
            self.cur = self
                .resolver
                .store()
                .read_chunk(&e.0)
                .map_err(crate::Error::into_io)?;
            self.pos = 0;
        }
        let n = (self.cur.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn varint_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// Reads a tar node's skeleton and notes every header it can recognise.
/// Anything it does not understand is skipped: a missed header only makes
/// a base less precise, never a result wrong.
fn index_tar(resolver: &BaseResolver, id: &ChunkId, node: &Node) -> Result<TarIndex> {
    let NodeBody::Tar { children, .. } = &node.body else {
        return Ok(TarIndex::default());
    };
    let child_lens: Vec<u64> = children
        .iter()
        .map(|c| {
            resolver
                .chunk(c)
                .and_then(|b| Node::decode(&b, c))
                .map(|n| n.len)
                .unwrap_or(0)
        })
        .collect();
    let mut ix = TarIndex {
        skel_len: resolver.stream_len(id, StreamKind::Skeleton)?,
        ..Default::default()
    };
    let bytes = StreamBytes {
        resolver,
        chunks: resolver
            .stream_chunks(id, StreamKind::Skeleton)?
            .into_iter(),
        cur: Vec::new(),
        pos: 0,
    };
    let mut r = SkeletonReader::new(bytes);
    let mut skel_off = 4u64;
    let mut tar_pos = 0u64;
    let mut data_off = 0u64;
    let mut last_path: Option<Vec<u8>> = None;
    let mut override_path: Option<Vec<u8>> = None;
    while let Some(rec) = r.next_record()? {
        match rec {
            Record::Literal(lit) => {
                let n = lit.len() as u64;
                let body_off = skel_off + 1 + varint_len(n);
                let mut q = tar_pos.div_ceil(BLOCK as u64) * BLOCK as u64;
                while q + BLOCK as u64 <= tar_pos + n {
                    let at = (q - tar_pos) as usize;
                    let mut next = q + BLOCK as u64;
                    if let Some(h) = parse_header(&lit[at..at + BLOCK]) {
                        let content = at + BLOCK..(at + BLOCK).saturating_add(h.size as usize);
                        if h.kind == EntryKind::Meta {
                            if let Some(c) = lit.get(content) {
                                match h.typeflag {
                                    b'x' | b'X' => {
                                        if let Some(p) = parse_pax(c).path {
                                            override_path = Some(p);
                                        }
                                    }
                                    b'L' => override_path = Some(cstr(c).to_vec()),
                                    _ => {}
                                }
                            }
                            next = q + BLOCK as u64 + h.size.div_ceil(BLOCK as u64) * BLOCK as u64;
                        } else {
                            let path = override_path.take().unwrap_or(h.path);
                            ix.headers.push((
                                hash_path(&path),
                                hash_norm(&path),
                                body_off + at as u64,
                            ));
                            last_path = Some(path);
                        }
                    }
                    q = next;
                }
                tar_pos += n;
                skel_off = body_off + n;
            }
            Record::Data(n) => {
                if let Some(p) = last_path.take() {
                    ix.files.push((hash_path(&p), hash_norm(&p), data_off, n));
                }
                data_off += n;
                tar_pos += n;
                skel_off += 1 + varint_len(n);
            }
            Record::Child(i) => {
                if let Some(p) = last_path.take() {
                    ix.children.insert(i, hash_path(&p));
                }
                tar_pos += child_lens.get(i as usize).copied().unwrap_or(0);
                skel_off += 1 + varint_len(i);
            }
        }
    }
    Ok(ix)
}

#[derive(Clone, Copy)]
struct Anchor {
    new_off: u64,
    /// Offset and length of the matching span in the old stream.
    old: Option<(u64, u64)>,
}

/// How one stream of a new node maps onto the same stream of its old node.
struct Mapping {
    old_node: ChunkId,
    kind: StreamKind,
    anchors: Vec<Anchor>,
    new_len: u64,
    old_len: u64,
}

impl Mapping {
    fn anchored(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if self.anchors.is_empty() {
            return out;
        }
        let mut i = self
            .anchors
            .partition_point(|x| x.new_off <= a)
            .saturating_sub(1);
        while i < self.anchors.len() && self.anchors[i].new_off < b {
            let an = self.anchors[i];
            let next = self
                .anchors
                .get(i + 1)
                .map(|x| x.new_off)
                .unwrap_or(self.new_len);
            let (s, e) = (a.max(an.new_off), b.min(next));
            i += 1;
            let (Some((oo, ol)), true) = (an.old, s < e) else {
                continue;
            };
            if ol <= WHOLE_FILE {
                out.push((oo, oo + ol));
            } else {
                let start = oo + (s - an.new_off).min(ol);
                out.push((
                    start.saturating_sub(SLACK).max(oo),
                    (start + (e - s) + SLACK).min(oo + ol),
                ));
            }
        }
        out
    }

    fn blind(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        if self.old_len == 0 || self.new_len == 0 {
            return Vec::new();
        }
        let centre = (a as u128 * self.old_len as u128 / self.new_len as u128) as u64;
        let w = b - a;
        vec![(
            centre.saturating_sub(w + BLIND_SLACK),
            (centre + 2 * w + BLIND_SLACK).min(self.old_len),
        )]
    }

    /// Ranges merged, clamped to the old stream, bounded in total.
    fn refs(&self, ranges: Vec<(u64, u64)>) -> Vec<BaseRef> {
        self.refs_capped(ranges, PLAN_BASE_BYTES)
    }

    fn refs_capped(&self, mut ranges: Vec<(u64, u64)>, cap: u64) -> Vec<BaseRef> {
        ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            let e = e.min(self.old_len);
            if s >= e {
                continue;
            }
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut out = Vec::new();
        let mut total = 0u64;
        for (s, e) in merged {
            if total >= cap || out.len() >= delta::MAX_BASES {
                break;
            }
            let e = e.min(s + (cap - total));
            total += e - s;
            out.push(BaseRef::Range {
                node: self.old_node,
                stream: self.kind,
                off: s,
                len: e - s,
            });
        }
        out
    }
}

enum Ctx {
    /// A data chunk at `off` of a mapped stream.
    Stream { mapping: usize, off: u64 },
    /// An object whose old counterparts are known: node, block map,
    /// recipe (one each), list piece (the old pieces that hold its entries,
    /// the one that holds most of them last, nearest the target in the
    /// prefix).
    Whole(Vec<ChunkId>),
}

/// The chunks `target` (a node or a list piece) names, and whether it
/// spells them as JSON (a node); `None` for anything else.
fn named_chunks(id: &ChunkId, target: &[u8]) -> Option<(Vec<ChunkId>, bool)> {
    match Node::decode(target, id) {
        Ok(n) => {
            let mut ids = Vec::new();
            for k in [StreamKind::Skeleton, StreamKind::Data, StreamKind::Recon] {
                if let Some(s) = k.of(&n) {
                    ids.extend(s.entries.iter().map(|e| e.0));
                }
            }
            Some((ids, true))
        }
        Err(_) => Some((
            decode_entries(target, id)
                .ok()?
                .iter()
                .map(|e| e.0)
                .collect(),
            false,
        )),
    }
}

/// The span of `sent` whose chunks `target` (a node or a list piece)
/// names, as a base in the form the target spells ids.
fn sent_base(id: &ChunkId, target: &[u8], sent: &SentIndex) -> Option<BaseRef> {
    if sent.entries.is_empty() {
        return None;
    }
    let (named, json) = named_chunks(id, target)?;
    let pos: Vec<usize> = named
        .iter()
        .filter_map(|i| sent.pos.get(i).copied())
        .collect();
    let (lo, hi) = (*pos.iter().min()?, *pos.iter().max()?);
    let count = (hi - lo + 1).min(delta::MAX_SENT as usize);
    Some(BaseRef::Sent {
        first: lo as u32,
        count: count as u32,
        json,
    })
}

/// Which old list piece holds each of some chunk ids, as a sorted list (36
/// bytes an id where a hash map costs about three times that).
#[derive(Default)]
struct Owners {
    pieces: Vec<ChunkId>,
    /// Id and index in `pieces` (or [`Owners::INLINE`]), sorted by id and
    /// then by the order pieces were added, once sealed.
    found: Vec<(ChunkId, u32)>,
}

impl Owners {
    /// Held in the old stream's node itself, not in a piece.
    const INLINE: u32 = u32::MAX;

    fn add(&mut self, piece: ChunkId, ids: Vec<ChunkId>) {
        if ids.is_empty() {
            return;
        }
        let at = self.pieces.len() as u32;
        self.pieces.push(piece);
        self.found.extend(ids.into_iter().map(|id| (id, at)));
    }

    /// Sorts, keeping for each id the piece added first.
    fn seal(&mut self) {
        self.found.par_sort_unstable();
        self.found.dedup_by(|b, a| a.0 == b.0);
    }

    /// `None`: not in the old stream; `Some(None)`: in its node.
    fn get(&self, id: &ChunkId) -> Option<Option<ChunkId>> {
        let (fid, at) = self.found.get(self.found.partition_point(|f| f.0 < *id))?;
        if fid != id {
            return None;
        }
        Some(self.pieces.get(*at as usize).copied())
    }
}

/// What [`DeltaPlanner::map_lists`] learnt of a new stream's list tree.
struct Lists<'a> {
    /// Pieces of the new stream the receiver lacks, with their entries.
    changed: &'a HashMap<ChunkId, Vec<Entry>>,
    /// Byte length under each piece of the old stream.
    old_len: &'a HashMap<ChunkId, u64>,
    /// Entries of changed pieces that the old stream holds.
    owner: &'a Owners,
}

impl Lists<'_> {
    /// Appends the offset and id of each chunk under `entries` (pieces of
    /// `level`, or chunks at level 0) that the old stream lacks, stepping
    /// over pieces it holds by their length.
    fn new_leaves(
        &self,
        entries: &[Entry],
        level: u8,
        off: &mut u64,
        out: &mut Vec<(u64, ChunkId)>,
    ) -> Result<()> {
        for e in entries {
            if level == 0 {
                if self.owner.get(&e.0).is_none() {
                    out.push((*off, e.0));
                }
                *off += e.1 as u64;
            } else if let Some(len) = self.old_len.get(&e.0) {
                *off += len;
            } else if let Some(below) = self.changed.get(&e.0) {
                self.new_leaves(below, level - 1, off, out)?;
            } else {
                return Err(crate::error::Error::Corrupt(format!(
                    "list piece {} was neither read nor held",
                    e.0
                )));
            }
        }
        Ok(())
    }
}

/// What the planner did, for reports.
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
pub struct PlannerStats {
    /// New nodes paired with an old node.
    pub nodes_paired: u64,
    /// Files of paired tars whose path (or masked path) was found in the old tar.
    pub files_matched: u64,
    pub files_total: u64,
}

/// Finds bases for the chunks of one image among base images the receiver
/// is known to hold whole, and encodes deltas against them.
pub struct DeltaPlanner {
    resolver: Arc<BaseResolver>,
    ctx: HashMap<ChunkId, Ctx>,
    mappings: Vec<Mapping>,
    level: i32,
    /// Whether the receiver decodes header deltas ([`crate::hdrdelta`]).
    header_deltas: bool,
    pub stats: PlannerStats,
    /// Tar indexes read while pairing: a layer's skeleton is read once,
    /// though pairing by shared paths and mapping its files both need it.
    /// Emptied once the planner is built.
    tars: HashMap<ChunkId, Arc<TarIndex>>,
}

impl DeltaPlanner {
    /// `target`: the recipe being sent; `bases`: recipes of images the
    /// receiver holds completely, most relevant first.
    pub fn new(
        resolver: Arc<BaseResolver>,
        target: &ChunkId,
        bases: &[ChunkId],
        level: i32,
    ) -> Result<DeltaPlanner> {
        let mut p = DeltaPlanner {
            resolver,
            ctx: HashMap::new(),
            mappings: Vec::new(),
            level,
            header_deltas: false,
            stats: PlannerStats::default(),
            tars: HashMap::new(),
        };
        if bases.is_empty() {
            return Ok(p);
        }
        let store = p.resolver.store().clone();
        let rec = load_recipe(&store, target)?;
        // The recipe itself gets no base: the receiver's recipe of the same
        // image may differ (older wharf versions wrote the time into it).
        let mut old_roots = Vec::new();
        for b in bases {
            old_roots.push(load_recipe(&store, b)?.root);
        }
        // Layers may be paired with a layer of any base image; the outer
        // tar with the first's.
        let mut extra: Vec<ChunkId> = Vec::new();
        for r in &old_roots {
            if let Ok(n) = p.node(r) {
                if let NodeBody::Tar { children, .. } = &n.body {
                    extra.extend(children.iter().copied());
                }
            }
        }
        p.pair(&rec.root, &old_roots[0], &extra, 0)?;
        p.tars = HashMap::new();
        Ok(p)
    }

    fn node(&self, id: &ChunkId) -> Result<Node> {
        Node::decode(&self.resolver.chunk(id)?, id)
    }

    fn pair(&mut self, new: &ChunkId, old: &ChunkId, extra: &[ChunkId], depth: u32) -> Result<()> {
        if depth > 8 || self.ctx.contains_key(new) && depth > 0 {
            return Ok(());
        }
        let n = self.node(new)?;
        let o = self.node(old)?;
        self.stats.nodes_paired += 1;
        self.ctx.entry(*new).or_insert(Ctx::Whole(vec![*old]));
        if let (Some(nb), Some(ob)) = (n.blocks, o.blocks) {
            self.ctx.entry(nb).or_insert(Ctx::Whole(vec![ob]));
        }
        match (&n.body, &o.body) {
            (NodeBody::Gzip { plain: np, .. }, NodeBody::Gzip { plain: op, .. }) => {
                self.map_stream(new, old, StreamKind::Recon, Vec::new())?;
                let (np, op) = (*np, *op);
                self.pair(&np, &op, &[], depth + 1)?;
            }
            (NodeBody::Gzip { plain, .. }, _) => {
                let np = *plain;
                self.pair(&np, old, extra, depth + 1)?;
            }
            (_, NodeBody::Gzip { plain, .. }) => {
                let op = *plain;
                self.pair(new, &op, extra, depth + 1)?;
            }
            (NodeBody::Raw { .. }, NodeBody::Raw { .. }) => {
                self.map_stream(new, old, StreamKind::Data, Vec::new())?;
            }
            (NodeBody::Tar { children: nc, .. }, NodeBody::Tar { children: oc, .. }) => {
                self.index_tars(&[*new, *old])?;
                let ni = self.tar_index(new, &n)?;
                let oi = self.tar_index(old, &o)?;
                self.map_tar(new, old, &ni, &oi)?;
                let (nc, oc) = (nc.clone(), oc.clone());
                self.pair_children(&nc, &ni, &oc, &oi, extra, depth)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn pair_children(
        &mut self,
        nc: &[ChunkId],
        ni: &TarIndex,
        oc: &[ChunkId],
        oi: &TarIndex,
        extra: &[ChunkId],
        depth: u32,
    ) -> Result<()> {
        // A child that is one of the base images' own is held by the
        // receiver whole: nothing under it needs a plan, and pairing it
        // would read its skeleton (megabytes on a multi-GB layer) for
        // nothing.
        let held: HashSet<ChunkId> = oc.iter().chain(extra).copied().collect();
        let mut cands: Vec<ChunkId> = oc.to_vec();
        cands.extend(extra.iter().filter(|c| !oc.contains(c)));
        cands.truncate(1024);
        let mut by_path: HashMap<u64, ChunkId> = HashMap::new();
        for (i, c) in oc.iter().enumerate() {
            if let Some(p) = oi.children.get(&(i as u64)) {
                by_path.insert(*p, *c);
            }
        }
        // File paths of each candidate, learnt only when a new child's
        // member path finds no match (a rebuilt layer's does not: its
        // directory is named by its new digest), all at once.
        let unmatched: Vec<ChunkId> = nc
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                !self.ctx.contains_key(*c)
                    && !held.contains(*c)
                    && ni
                        .children
                        .get(&(*i as u64))
                        .and_then(|p| by_path.get(p))
                        .is_none()
            })
            .map(|(_, c)| *c)
            .collect();
        if !unmatched.is_empty() {
            self.index_tars(&[unmatched, cands.clone()].concat())?;
        }
        let mut sets: Vec<Option<HashSet<u64>>> = vec![None; cands.len()];
        for (i, c) in nc.iter().enumerate() {
            if self.ctx.contains_key(c) || held.contains(c) {
                continue;
            }
            if let Some(old) = ni.children.get(&(i as u64)).and_then(|p| by_path.get(p)) {
                let old = *old;
                self.pair(c, &old, &[], depth + 1)?;
                continue;
            }
            let mine = self.tar_paths(c)?;
            let mut best: Option<(usize, ChunkId)> = None;
            if !mine.is_empty() {
                for (j, cand) in cands.iter().enumerate() {
                    if sets[j].is_none() {
                        sets[j] = Some(self.tar_paths(cand)?);
                    }
                    let shared = sets[j]
                        .as_ref()
                        .map(|s| mine.iter().filter(|p| s.contains(p)).count())
                        .unwrap_or(0);
                    if shared > 0 && best.is_none_or(|(b, _)| shared > b) {
                        best = Some((shared, *cand));
                    }
                }
            }
            let fallback = oc.get(i).copied();
            if let Some(old) = best.map(|b| b.1).or(fallback) {
                self.pair(c, &old, &[], depth + 1)?;
            }
        }
        Ok(())
    }

    fn tar_index(&mut self, id: &ChunkId, node: &Node) -> Result<Arc<TarIndex>> {
        if let Some(t) = self.tars.get(id) {
            return Ok(t.clone());
        }
        let t = Arc::new(index_tar(&self.resolver, id, node)?);
        self.tars.insert(*id, t.clone());
        Ok(t)
    }

    /// Reads the indexes of the tars `ids` name (through gzip) that are
    /// not cached yet, side by side: each reads and parses a whole skeleton
    /// stream, which on multi-GB layers is most of the planner's time.
    fn index_tars(&mut self, ids: &[ChunkId]) -> Result<()> {
        let mut todo: Vec<(ChunkId, Node)> = Vec::new();
        for id in ids {
            let mut id = *id;
            for _ in 0..4 {
                let n = self.node(&id)?;
                match &n.body {
                    NodeBody::Gzip { plain, .. } => id = *plain,
                    NodeBody::Tar { .. } => {
                        if !self.tars.contains_key(&id) && todo.iter().all(|t| t.0 != id) {
                            todo.push((id, n));
                        }
                        break;
                    }
                    NodeBody::Raw { .. } => break,
                }
            }
        }
        let r = &self.resolver;
        let done: Vec<Result<TarIndex>> =
            todo.par_iter().map(|(id, n)| index_tar(r, id, n)).collect();
        for ((id, _), ix) in todo.into_iter().zip(done) {
            self.tars.insert(id, Arc::new(ix?));
        }
        Ok(())
    }

    /// File paths inside a node (through gzip), for pairing layers.
    fn tar_paths(&mut self, id: &ChunkId) -> Result<HashSet<u64>> {
        let mut id = *id;
        for _ in 0..4 {
            let n = self.node(&id)?;
            match &n.body {
                NodeBody::Gzip { plain, .. } => id = *plain,
                NodeBody::Tar { .. } => return Ok(self.tar_index(&id, &n)?.path_set()),
                NodeBody::Raw { .. } => break,
            }
        }
        Ok(HashSet::new())
    }

    fn map_tar(
        &mut self,
        new: &ChunkId,
        old: &ChunkId,
        ni: &TarIndex,
        oi: &TarIndex,
    ) -> Result<()> {
        let mut old_files: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut old_norm: HashMap<u64, (u64, u64)> = HashMap::new();
        for f in &oi.files {
            old_files.entry(f.0).or_insert((f.2, f.3));
            old_norm.entry(f.1).or_insert((f.2, f.3));
        }
        let mut data = Vec::with_capacity(ni.files.len());
        for f in &ni.files {
            let old = old_files.get(&f.0).or_else(|| old_norm.get(&f.1)).copied();
            self.stats.files_total += 1;
            if old.is_some() {
                self.stats.files_matched += 1;
            }
            data.push(Anchor { new_off: f.2, old });
        }
        let mut old_hdr: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut old_hdr_norm: HashMap<u64, (u64, u64)> = HashMap::new();
        for (i, h) in oi.headers.iter().enumerate() {
            let end = oi.headers.get(i + 1).map(|x| x.2).unwrap_or(oi.skel_len);
            let span = (h.2, end.saturating_sub(h.2).max(BLOCK as u64));
            old_hdr.entry(h.0).or_insert(span);
            old_hdr_norm.entry(h.1).or_insert(span);
        }
        let skel = ni
            .headers
            .iter()
            .map(|h| Anchor {
                new_off: h.2,
                old: old_hdr
                    .get(&h.0)
                    .or_else(|| old_hdr_norm.get(&h.1))
                    .copied(),
            })
            .collect();
        self.map_stream(new, old, StreamKind::Data, data)?;
        self.map_stream(new, old, StreamKind::Skeleton, skel)?;
        Ok(())
    }

    fn map_stream(
        &mut self,
        new: &ChunkId,
        old: &ChunkId,
        kind: StreamKind,
        anchors: Vec<Anchor>,
    ) -> Result<()> {
        let nn = self.node(new)?;
        let on = self.node(old)?;
        let (Some(ns), Some(os)) = (kind.of(&nn), kind.of(&on)) else {
            return Ok(());
        };
        let m = self.mappings.len();
        self.mappings.push(Mapping {
            old_node: *old,
            kind,
            anchors,
            new_len: ns.len,
            old_len: os.len,
        });
        self.map_lists(ns, os, m)
    }

    /// Plans what of new stream `ns` the receiver lacks, against old stream
    /// `os` (mapping `m`), which it holds whole.
    ///
    /// A list piece of `ns` that `os` also has is held with everything
    /// under it, so only the pieces over changed chunks are read, and the
    /// old stream's leaves are scanned for just their entries: memory
    /// follows the pieces (1/256 of the chunks) and the changes, not the
    /// chunks of a multi-GB layer.
    ///
    /// Each chunk of `ns` not in `os` gets its offset in `ns`; each new
    /// piece gets as bases the old pieces that hold its entries, at most
    /// [`MAX_PIECE_BASES`], most shared last: where pieces were cut
    /// elsewhere than before, a new piece spans two old ones, and with only
    /// the best of them every entry of the other was spelled out (32 bytes
    /// each).
    fn map_lists(&mut self, ns: &StreamRef, os: &StreamRef, m: usize) -> Result<()> {
        let store = self.resolver.store().clone();
        let read = |p: &ChunkId| -> Result<Vec<Entry>> { decode_entries(&store.read_chunk(p)?, p) };
        // The old stream above its leaf pieces, top down; then the leaf
        // pieces' ids.
        let mut old_upper: Vec<(ChunkId, Vec<Entry>)> = Vec::new();
        let mut level: Vec<ChunkId> = os.entries.iter().map(|e| e.0).collect();
        for _ in 1..os.level {
            let mut next = Vec::new();
            for p in level {
                let ents = read(&p)?;
                next.extend(ents.iter().map(|e| e.0));
                old_upper.push((p, ents));
            }
            level = next;
        }
        let old_leaf_pieces: Vec<ChunkId> = if os.level == 0 { Vec::new() } else { level };
        let held: HashSet<ChunkId> = old_upper
            .iter()
            .map(|p| p.0)
            .chain(old_leaf_pieces.iter().copied())
            .collect();
        // The new stream's pieces the receiver lacks, with their entries.
        let mut changed: HashMap<ChunkId, Vec<Entry>> = HashMap::new();
        let mut order: Vec<ChunkId> = Vec::new();
        let mut level: Vec<ChunkId> = match ns.level {
            0 => Vec::new(),
            _ => ns.entries.iter().map(|e| e.0).collect(),
        };
        for depth in (1..=ns.level).rev() {
            let mut next = Vec::new();
            for p in level {
                if held.contains(&p) || changed.contains_key(&p) {
                    continue;
                }
                let ents = read(&p)?;
                if depth > 1 {
                    next.extend(ents.iter().map(|e| e.0));
                }
                changed.insert(p, ents);
                order.push(p);
            }
            level = next;
        }
        // Sorted lists, not hash sets: where scattered changes touch most
        // pieces of a multi-GB layer these hold most of its chunks.
        let mut wanted: Vec<ChunkId> = changed
            .values()
            .flatten()
            .chain(if ns.level == 0 { &ns.entries[..] } else { &[] })
            .map(|e| e.0)
            .collect();
        wanted.par_sort_unstable();
        wanted.dedup();
        let wanted = |id: &ChunkId| wanted.binary_search(id).is_ok();
        // Where in the old stream each wanted entry is, and how long each
        // old piece's subtree is (to step over held pieces of `ns`).
        let mut owner = Owners::default();
        if os.level == 0 {
            for e in os.entries.iter().filter(|e| wanted(&e.0)) {
                owner.found.push((e.0, Owners::INLINE));
            }
        }
        let leaf_scan: Vec<Result<(u64, Vec<ChunkId>)>> = old_leaf_pieces
            .par_iter()
            .map(|p| {
                let ents = read(p)?;
                let len = ents.iter().map(|e| e.1 as u64).sum();
                Ok((
                    len,
                    ents.iter().map(|e| e.0).filter(|e| wanted(e)).collect(),
                ))
            })
            .collect();
        let mut old_len: HashMap<ChunkId, u64> = HashMap::new();
        for (p, r) in old_leaf_pieces.iter().zip(leaf_scan) {
            let (len, hits) = r?;
            old_len.insert(*p, len);
            owner.add(*p, hits);
        }
        for (p, ents) in old_upper.iter().rev() {
            let len = ents.iter().filter_map(|e| old_len.get(&e.0)).sum();
            old_len.insert(*p, len);
            owner.add(*p, ents.iter().map(|e| e.0).filter(|e| wanted(e)).collect());
        }
        owner.seal();
        for p in &order {
            if self.ctx.contains_key(p) {
                continue;
            }
            let mut votes: HashMap<ChunkId, usize> = HashMap::new();
            for e in changed.get(p).into_iter().flatten() {
                if let Some(Some(o)) = owner.get(&e.0) {
                    *votes.entry(o).or_default() += 1;
                }
            }
            let mut ranked: Vec<(usize, ChunkId)> =
                votes.into_iter().map(|(o, n)| (n, o)).collect();
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            ranked.truncate(MAX_PIECE_BASES);
            if !ranked.is_empty() {
                let olds = ranked.into_iter().rev().map(|(_, o)| o).collect();
                self.ctx.insert(*p, Ctx::Whole(olds));
            }
        }
        let lists = Lists {
            changed: &changed,
            old_len: &old_len,
            owner: &owner,
        };
        let mut new_chunks = Vec::new();
        lists.new_leaves(&ns.entries, ns.level, &mut 0, &mut new_chunks)?;
        for (off, id) in new_chunks {
            self.ctx
                .entry(id)
                .or_insert(Ctx::Stream { mapping: m, off });
        }
        Ok(())
    }

    /// What kind of object `id` is to the planner, for diagnostics.
    pub fn describe(&self, id: &ChunkId) -> &'static str {
        match self.ctx.get(id) {
            None => "unknown",
            Some(Ctx::Whole(_)) => "object",
            Some(Ctx::Stream { mapping, .. }) => match self.mappings[*mapping].kind {
                StreamKind::Skeleton => "skeleton",
                StreamKind::Data => "data",
                StreamKind::Recon => "recon",
            },
        }
    }

    /// Lets the recipe being sent travel as a delta against `base`, the
    /// recipe of a base image: only when the receiver is known to hold that
    /// very recipe chunk (recipes written by older wharf versions carry
    /// the time of their add, so the same image may have another recipe
    /// there).
    pub fn with_recipe_base(mut self, target: &ChunkId, base: &ChunkId) -> Self {
        self.ctx.insert(*target, Ctx::Whole(vec![*base]));
        self
    }

    /// Lets skeleton chunks travel as header deltas ([`crate::hdrdelta`]):
    /// only for a receiver that said it decodes them.
    pub fn with_header_deltas(mut self, on: bool) -> Self {
        self.header_deltas = on;
        self
    }

    /// `objects` (ids the planner calls objects) in waves, each object in
    /// a wave after every object of `objects` it names: sent in that order,
    /// an object's delta can name the objects it lists with a `Sent` base.
    pub fn object_waves(&self, objects: &[ChunkId]) -> Result<Vec<Vec<ChunkId>>> {
        let set: HashSet<&ChunkId> = objects.iter().collect();
        let mut needs: HashMap<ChunkId, Vec<ChunkId>> = HashMap::new();
        for id in objects {
            let named = named_chunks(id, &self.resolver.chunk(id)?)
                .map(|(n, _)| n)
                .unwrap_or_default();
            needs.insert(
                *id,
                named
                    .into_iter()
                    .filter(|n| n != id && set.contains(n))
                    .collect(),
            );
        }
        let mut done: HashSet<ChunkId> = HashSet::new();
        let mut left = objects.to_vec();
        let mut waves = Vec::new();
        while !left.is_empty() {
            let (ready, rest): (Vec<ChunkId>, Vec<ChunkId>) = left.iter().partition(|id| {
                needs
                    .get(id)
                    .is_none_or(|n| n.iter().all(|d| done.contains(d)))
            });
            if ready.is_empty() {
                // Ids are hashes of what names them, so no object names
                // itself through others; should one seem to, send the rest
                // as they are.
                waves.push(rest);
                break;
            }
            done.extend(ready.iter().copied());
            waves.push(ready);
            left = rest;
        }
        Ok(waves)
    }

    /// Splits the send into groups that can each go out in a frame of its
    /// own: `content` (stream chunks, in the order they are to be sent) is
    /// cut after about `group_chunks` chunks, at the end of what one of
    /// `leaves` (objects naming no other object, in order) names, and each
    /// group gets the leaves whose content it ends. Sent after its group's
    /// content in the same frame, a leaf's delta can name that content with
    /// a `Sent` base, while the receiver starts on one frame as the sender
    /// encodes the next. Returns, per group, where its content ends
    /// (exclusive) and its leaves; the last group ends at `content.len()`.
    /// Content no leaf names stays where it is.
    pub fn leaf_groups(
        &self,
        content: &[ChunkId],
        leaves: &[ChunkId],
        group_chunks: usize,
    ) -> Result<Vec<(usize, Vec<ChunkId>)>> {
        // Positions of `content` sorted by id, to find a named chunk's place
        // in 4 bytes per chunk rather than a map's 50.
        let mut order: Vec<u32> = (0..content.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| content[a as usize].cmp(&content[b as usize]));
        let place = |id: &ChunkId| {
            order
                .binary_search_by(|&i| content[i as usize].cmp(id))
                .ok()
                .map(|k| order[k] as usize)
        };
        let mut groups = Vec::new();
        let mut start = 0usize;
        // One past the last content position a leaf of this group names.
        let mut end = 0usize;
        let mut group: Vec<ChunkId> = Vec::new();
        for leaf in leaves {
            let named = named_chunks(leaf, &self.resolver.chunk(leaf)?)
                .map(|(n, _)| n)
                .unwrap_or_default();
            if let Some(last) = named.iter().filter_map(place).max() {
                end = end.max(last + 1);
            }
            group.push(*leaf);
            if end - start >= group_chunks {
                groups.push((end, std::mem::take(&mut group)));
                start = end;
            }
        }
        groups.push((content.len(), group));
        Ok(groups)
    }

    /// Whether the planner knows anything about `id`.
    pub fn knows(&self, id: &ChunkId) -> bool {
        self.ctx.contains_key(id)
    }

    fn try_bases(
        &self,
        sent: &SentIndex,
        bases: Vec<BaseRef>,
        target: &[u8],
        skel: bool,
    ) -> Result<Option<(Vec<BaseRef>, Vec<u8>)>> {
        if bases.is_empty() {
            return Ok(None);
        }
        let base = self.resolver.base_bytes(&bases, sent)?;
        if base.is_empty() {
            return Ok(None);
        }
        // Tar headers change a few bytes in every 512: below the optimal
        // parsers' levels they get their own settings, whatever the level
        // chosen for file contents.
        let d = if skel && self.level < 16 {
            // Header references first: cheap, and on a rebuild a fifth of
            // the optimal parser's bytes. The parser runs only when they
            // leave more than a byte or two per header's worth of chunk.
            let refs = if self.header_deltas {
                hdrdelta::encode(&base, target)?
            } else {
                None
            };
            match refs {
                Some(h) if h.len() * HEADER_DELTA_GOOD <= target.len() => h,
                Some(h) => {
                    let z = delta::encode_headers(&base, target)?;
                    if h.len() <= z.len() {
                        h
                    } else {
                        z
                    }
                }
                None => delta::encode_headers(&base, target)?,
            }
        } else {
            delta::encode_data(&base, target, self.level)?
        };
        Ok(Some((bases, d)))
    }

    /// The chunk `id` as a delta, when one is smaller than `stored_len`
    /// (its size as stored, the alternative on the wire); `None` to send it
    /// as it is.
    pub fn encode(&self, id: &ChunkId, stored_len: usize) -> Result<Option<DeltaChunk>> {
        self.encode_after(id, stored_len, &SentIndex::default())
    }

    /// Whether `id` is an object (node, list piece, block map) rather than
    /// stream content: objects name other chunks, and are best sent after
    /// them with a `Sent` base.
    pub fn is_object(&self, id: &ChunkId) -> bool {
        matches!(self.ctx.get(id), Some(Ctx::Whole(_)))
    }

    /// [`DeltaPlanner::encode`] for a delta placed after the chunks in
    /// `sent` in the same frame: an object may then use them as base.
    pub fn encode_after(
        &self,
        id: &ChunkId,
        stored_len: usize,
        sent: &SentIndex,
    ) -> Result<Option<DeltaChunk>> {
        let Some(ctx) = self.ctx.get(id) else {
            return Ok(None);
        };
        let target = self.resolver.chunk(id)?;
        let mut cands: Vec<Vec<BaseRef>> = Vec::new();
        match ctx {
            Ctx::Whole(olds) => {
                let mut bases: Vec<BaseRef> = olds.iter().map(|o| BaseRef::Chunk(*o)).collect();
                bases.extend(sent_base(id, &target, sent));
                cands.push(bases);
            }
            Ctx::Stream { mapping, off } => {
                let m = &self.mappings[*mapping];
                let (a, b) = (*off, off + target.len() as u64);
                let anchored = m.refs(m.anchored(a, b));
                // Headers matched by path leave the blind guess nothing
                // to find: on the small corpus it saved under 0.1 % of the
                // skeleton deltas' bytes, at a base ten times the chunk's.
                let skip_blind = !anchored.is_empty() && m.kind == StreamKind::Skeleton;
                if !anchored.is_empty() {
                    cands.push(anchored);
                }
                if !skip_blind {
                    cands.push(m.refs(m.blind(a, b)));
                }
            }
        }
        let mut best: Option<(Vec<BaseRef>, Vec<u8>)> = None;
        for c in cands {
            if let Some((_, d)) = &best {
                if d.len() * POOR <= stored_len {
                    break;
                }
            }
            let skel = matches!(ctx, Ctx::Stream { mapping, .. }
                if self.mappings[*mapping].kind == StreamKind::Skeleton);
            if let Some((refs, d)) = self.try_bases(sent, c, &target, skel)? {
                if best.as_ref().is_none_or(|(_, bd)| d.len() < bd.len()) {
                    best = Some((refs, d));
                }
            }
        }
        Ok(best.and_then(|(bases, d)| {
            let cost = d.len() + DELTA_OVERHEAD + bases.len() * 8;
            (cost < stored_len).then(|| DeltaChunk {
                targets: vec![(*id, target.len() as u32)],
                bases,
                delta: d,
            })
        }))
    }

    /// Splits `ids` (in sending order) into runs that may travel as one
    /// delta: neighbours in one mapped stream, in stream order, bounded in
    /// count and bytes. Everything else is a run of one.
    pub fn runs(&self, ids: &[ChunkId]) -> Vec<std::ops::Range<usize>> {
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        let mut prev: Option<(usize, u64)> = None;
        let mut bytes = 0u64;
        for (i, id) in ids.iter().enumerate() {
            let here = match self.ctx.get(id) {
                Some(Ctx::Stream { mapping, off })
                    if self.mappings[*mapping].kind != StreamKind::Skeleton =>
                {
                    Some((*mapping, *off))
                }
                _ => None,
            };
            let joins = match (prev, here, out.last()) {
                (Some((pm, po)), Some((m, o)), Some(r)) => {
                    pm == m && o > po && r.len() < delta::MAX_GROUP && bytes < GROUP_BYTES
                }
                _ => false,
            };
            if joins {
                if let Some(r) = out.last_mut() {
                    r.end = i + 1;
                }
            } else {
                out.push(i..i + 1);
                bytes = 0;
            }
            bytes += self
                .resolver
                .store()
                .lookup(id)
                .map(|l| l.raw_len as u64)
                .unwrap_or(0);
            prev = here;
        }
        out
    }

    /// Encodes a run from [`DeltaPlanner::runs`]: one delta for all of it
    /// when that is smaller than its chunks as stored (`stored`), else each
    /// chunk on its own. Returns, in order, the slices of the run and the
    /// delta for each (`None`: send that one chunk as stored).
    pub fn encode_run(
        &self,
        ids: &[ChunkId],
        stored: &[usize],
        sent: &SentIndex,
    ) -> Result<Vec<(std::ops::Range<usize>, Option<DeltaChunk>)>> {
        let singles = |me: &Self| -> Result<Vec<(std::ops::Range<usize>, Option<DeltaChunk>)>> {
            ids.iter()
                .zip(stored)
                .enumerate()
                .map(|(i, (id, st))| Ok((i..i + 1, me.encode_after(id, *st, sent)?)))
                .collect()
        };
        if ids.len() < 2 {
            return singles(self);
        }
        let mut target = Vec::new();
        let mut targets = Vec::with_capacity(ids.len());
        let mut ranges = Vec::new();
        let mut mapping = None;
        for id in ids {
            let Some(Ctx::Stream { mapping: m, off }) = self.ctx.get(id) else {
                return singles(self);
            };
            let c = self.resolver.chunk(id)?;
            let mm = &self.mappings[*m];
            let (a, b) = (*off, off + c.len() as u64);
            let anchored = mm.anchored(a, b);
            ranges.extend(if anchored.is_empty() {
                mm.blind(a, b)
            } else {
                anchored
            });
            targets.push((*id, c.len() as u32));
            target.extend_from_slice(&c);
            mapping = Some(*m);
        }
        let Some(m) = mapping else {
            return singles(self);
        };
        let bases = self.mappings[m].refs_capped(ranges, GROUP_BASE_BYTES);
        let total_stored: usize = stored.iter().sum();
        if let Some((bases, d)) = self.try_bases(sent, bases, &target, false)? {
            let cost = d.len() + DELTA_OVERHEAD + bases.len() * 8 + ids.len() * 10;
            if cost < total_stored {
                return Ok(vec![(
                    0..ids.len(),
                    Some(DeltaChunk {
                        targets,
                        bases,
                        delta: d,
                    }),
                )]);
            }
        }
        singles(self)
    }
}
