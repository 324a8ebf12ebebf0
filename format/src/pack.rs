//! Pack files and their indexes: the byte layouts of spec/FORMAT.md.
//!
//! A pack is an append-only sequence of zstd-compressed chunks, each preceded
//! by its hash and lengths, so a pack can be checked (or its index rebuilt)
//! on its own. An index maps chunk hashes to places in packs; it is sorted by
//! hash with a 256-entry fan-out table in front, so a lookup in a memory-mapped
//! index touches a handful of pages whatever the number of chunks.

use crate::backend::{Backend, ObjectKind, ScratchFile};
use crate::error::{Error, IoContext, Result};
use crate::hash::ChunkId;
use memmap2::Mmap;
use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

pub const PACK_MAGIC: &[u8; 8] = b"WHARFPK\0";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: u64 = 16;
/// hash (32) + raw length (4) + stored length (4)
pub const PACK_ENTRY_HEADER_LEN: u64 = 40;

pub const INDEX_MAGIC: &[u8; 8] = b"WHARFIX\0";
pub const INDEX_VERSION: u32 = 1;
pub const INDEX_HEADER_LEN: usize = 24;
pub const INDEX_ENTRY_LEN: usize = 48;
const FANOUT_LEN: usize = 256 * 4;

/// Packs stop growing at this size; offsets are 32-bit, so never past 4 GiB.
pub const DEFAULT_PACK_TARGET: u64 = 256 << 20;

/// Where a chunk is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    /// Offset of the compressed payload (after the entry header).
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// A pack's name: the BLAKE3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    pub fn name(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(name: &str) -> Option<Self> {
        ChunkId::from_hex(name).map(|c| PackId(c.0))
    }
}

/// One index entry, as laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub pack_no: u32,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl IndexEntry {
    fn encode(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.id.0);
        out[32..36].copy_from_slice(&self.pack_no.to_le_bytes());
        out[36..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        out[44..48].copy_from_slice(&self.raw_len.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[r]);
            u32::from_le_bytes(a)
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        IndexEntry {
            id: ChunkId(id),
            pack_no: u(32..36),
            offset: u(36..40),
            stored_len: u(40..44),
            raw_len: u(44..48),
        }
    }
}

/// A file written through a 1 MiB buffer that is also hashed with BLAKE3.
///
/// Why not `BufWriter` plus `Hasher::update` on every write: a pack is
/// written as 40-byte entry headers between compressed chunks, and each
/// small update leaves BLAKE3 with a partly filled 1 KiB chunk, which it then
/// finishes one 64-byte block at a time. Hashing the buffer whole keeps it on
/// the SIMD path that hashes many chunks at once: 5-8x faster here, and the
/// pack writer was the receiving side's bottleneck for incompressible data.
struct HashingFile {
    file: File,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
}

const HASHING_BUF: usize = 1 << 20;

impl HashingFile {
    fn new(file: File) -> Self {
        HashingFile {
            file,
            buf: Vec::with_capacity(HASHING_BUF),
            hasher: blake3::Hasher::new(),
        }
    }

    fn write_all(&mut self, mut b: &[u8]) -> std::io::Result<()> {
        while !b.is_empty() {
            if self.buf.is_empty() && b.len() >= HASHING_BUF {
                // Large enough on its own: no copy.
                self.hasher.update(b);
                return self.file.write_all(b);
            }
            let take = b.len().min(HASHING_BUF - self.buf.len());
            self.buf.extend_from_slice(&b[..take]);
            b = &b[take..];
            if self.buf.len() == HASHING_BUF {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.hasher.update(&self.buf);
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and returns the hash of everything written.
    fn finish(mut self) -> std::io::Result<(File, blake3::Hash)> {
        self.flush()?;
        Ok((self.file, self.hasher.finalize()))
    }
}

/// Writes one pack to a scratch file; `finish` publishes it.
pub struct PackWriter {
    /// Removed if the pack is dropped unfinished (a failed write).
    scratch: ScratchFile,
    out: HashingFile,
    len: u64,
    entries: Vec<IndexEntry>,
}

impl PackWriter {
    pub fn create(scratch: &Path) -> Result<Self> {
        let (scratch, f) = ScratchFile::create(scratch, "pack")?;
        let mut w = PackWriter {
            scratch,
            out: HashingFile::new(f),
            len: 0,
            entries: Vec::new(),
        };
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        header[..8].copy_from_slice(PACK_MAGIC);
        header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).ctx("write", &self.scratch.path)?;
        self.len += b.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Appends one compressed chunk.
    pub fn append(&mut self, id: ChunkId, raw_len: u32, compressed: &[u8]) -> Result<()> {
        let stored_len = u32::try_from(compressed.len())
            .map_err(|_| Error::Invalid("compressed chunk over 4 GiB".into()))?;
        let mut h = [0u8; PACK_ENTRY_HEADER_LEN as usize];
        h[..32].copy_from_slice(&id.0);
        h[32..36].copy_from_slice(&raw_len.to_le_bytes());
        h[36..40].copy_from_slice(&stored_len.to_le_bytes());
        self.write(&h)?;
        let offset =
            u32::try_from(self.len).map_err(|_| Error::Invalid("pack grew past 4 GiB".into()))?;
        self.write(compressed)?;
        self.entries.push(IndexEntry {
            id,
            pack_no: 0,
            offset,
            stored_len,
            raw_len,
        });
        Ok(())
    }

    /// Appends entries that are already laid out as in a pack (40-byte
    /// header, then the compressed bytes; a PUT payload is exactly that),
    /// back to back in `span`, in one write. Each of `entries` gives the
    /// chunk's id, raw and stored length, and where its compressed bytes
    /// start in `span`; the caller has checked that the headers in `span`
    /// say the same.
    pub fn append_span(
        &mut self,
        span: &[u8],
        entries: &[(ChunkId, u32, u32, usize)],
    ) -> Result<()> {
        let base = self.len;
        let too_big = || Error::Invalid("pack grew past 4 GiB".into());
        u32::try_from(base + span.len() as u64).map_err(|_| too_big())?;
        for &(id, raw_len, stored_len, at) in entries {
            if at < PACK_ENTRY_HEADER_LEN as usize || at + stored_len as usize > span.len() {
                return Err(Error::Invalid("entry outside its span".into()));
            }
            let offset = u32::try_from(base + at as u64).map_err(|_| too_big())?;
            self.entries.push(IndexEntry {
                id,
                pack_no: 0,
                offset,
                stored_len,
                raw_len,
            });
        }
        self.write(span)
    }

    /// Publishes the pack, then its index, and returns the index's name. The
    /// order matters: an index never names a pack that is not fully on disk.
    pub fn finish(mut self, backend: &dyn Backend) -> Result<(PackId, String)> {
        let (file, hash) = self.out.finish().ctx("write", &self.scratch.path)?;
        let pack = PackId(*hash.as_bytes());
        drop(file);
        backend.put_file(ObjectKind::Pack, &pack.name(), &self.scratch.path)?;
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_by_key(|e| e.id);
        entries.dedup_by(|a, b| a.id == b.id);
        let idx = write_index(backend, &[pack], entries.into_iter().map(Ok))?;
        Ok((pack, idx))
    }

    /// Drops an unfinished pack (nothing was published); what dropping it
    /// does too, said where it is meant.
    pub fn abandon(self) {}
}

/// Writes an index over `packs` from entries sorted by id (each entry's
/// `pack_no` indexes `packs`), publishes it, and returns its name.
pub fn write_index(
    backend: &dyn Backend,
    packs: &[PackId],
    entries: impl Iterator<Item = Result<IndexEntry>>,
) -> Result<String> {
    let scratch = backend.scratch_dir();
    let (tmp_file, f) = ScratchFile::create(scratch, "index")?;
    let tmp = tmp_file.path.clone();
    let mut out = HashingFile::new(f);
    let put =
        |out: &mut HashingFile, b: &[u8]| -> Result<()> { out.write_all(b).ctx("write", &tmp) };
    // The entry count and fan-out are only known at the end; entries are
    // written to a second scratch file first so memory stays bounded.
    let (body_file, bf) = ScratchFile::create(scratch, "index-body")?;
    let body_path = body_file.path.clone();
    let mut fanout = [0u32; 256];
    let mut count: u64 = 0;
    {
        let mut body = BufWriter::with_capacity(1 << 20, bf);
        let mut buf = [0u8; INDEX_ENTRY_LEN];
        let mut last: Option<ChunkId> = None;
        for e in entries {
            let e = e?;
            if let Some(l) = last {
                if e.id <= l {
                    if e.id == l {
                        continue;
                    }
                    return Err(Error::Invalid("index entries out of order".into()));
                }
            }
            last = Some(e.id);
            e.encode(&mut buf);
            body.write_all(&buf).ctx("write", &body_path)?;
            fanout[e.id.0[0] as usize] += 1;
            count += 1;
        }
        body.flush().ctx("write", &body_path)?;
    }
    let mut header = [0u8; INDEX_HEADER_LEN];
    header[..8].copy_from_slice(INDEX_MAGIC);
    header[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(packs.len() as u32).to_le_bytes());
    header[16..24].copy_from_slice(&count.to_le_bytes());
    put(&mut out, &header)?;
    for p in packs {
        put(&mut out, &p.0)?;
    }
    let mut cum = 0u32;
    for f in fanout.iter() {
        cum += f;
        put(&mut out, &cum.to_le_bytes())?;
    }
    {
        let mut body = File::open(&body_path).ctx("open", &body_path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut body, &mut buf).ctx("read", &body_path)?;
            if n == 0 {
                break;
            }
            put(&mut out, &buf[..n])?;
        }
    }
    drop(body_file);
    let (mut file, hash) = out.finish().ctx("write", &tmp)?;
    let digest = *hash.as_bytes();
    file.write_all(&digest).ctx("write", &tmp)?;
    drop(file);
    let name = hex::encode(digest);
    backend.put_file(ObjectKind::Index, &name, &tmp)?;
    Ok(name)
}

/// A memory-mapped index file.
pub struct IndexFile {
    pub name: String,
    map: Mmap,
    packs: Vec<PackId>,
    count: usize,
    entries_at: usize,
}

impl IndexFile {
    /// Maps and checks the structure (not the checksum; see `check_sum`).
    pub fn open(backend: &dyn Backend, name: &str) -> Result<Self> {
        let path = backend
            .local_path(ObjectKind::Index, name)?
            .ok_or_else(|| Error::Invalid("backend cannot map index files".into()))?;
        let f = File::open(&path).ctx("open", &path)?;
        // SAFETY: memmap2 requires `unsafe` because another process could
        // truncate the file under us. Index files are immutable once
        // published (written to scratch, then renamed in), and only `gc`
        // deletes them, under the store's exclusive lock.
        let map = unsafe { Mmap::map(&f) }.ctx("map", &path)?;
        let corrupt = |what: &str| Error::Corrupt(format!("index {name}: {what}"));
        if map.len() < INDEX_HEADER_LEN + FANOUT_LEN + 32 || &map[..8] != INDEX_MAGIC {
            return Err(corrupt("not an index file (bad magic or too short)"));
        }
        let version = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
        if version != INDEX_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.display().to_string(),
                what: "index",
                found: version as u64,
                supported: INDEX_VERSION as u64,
            });
        }
        let npacks = u32::from_le_bytes([map[12], map[13], map[14], map[15]]) as usize;
        let mut c = [0u8; 8];
        c.copy_from_slice(&map[16..24]);
        let count = u64::from_le_bytes(c) as usize;
        let packs_at = INDEX_HEADER_LEN;
        let fanout_at = packs_at + npacks * 32;
        let entries_at = fanout_at + FANOUT_LEN;
        let expect = entries_at
            .checked_add(count.saturating_mul(INDEX_ENTRY_LEN))
            .and_then(|v| v.checked_add(32));
        if expect != Some(map.len()) {
            return Err(corrupt("length does not match its entry count"));
        }
        let packs = (0..npacks)
            .map(|i| {
                let mut p = [0u8; 32];
                p.copy_from_slice(&map[packs_at + i * 32..packs_at + i * 32 + 32]);
                PackId(p)
            })
            .collect();
        let idx = IndexFile {
            name: name.to_string(),
            map,
            packs,
            count,
            entries_at,
        };
        if idx.fanout(255) as usize != count {
            return Err(corrupt("fan-out table does not match its entry count"));
        }
        Ok(idx)
    }

    fn fanout(&self, b: usize) -> u32 {
        let at = INDEX_HEADER_LEN + self.packs.len() * 32 + b * 4;
        u32::from_le_bytes([
            self.map[at],
            self.map[at + 1],
            self.map[at + 2],
            self.map[at + 3],
        ])
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    pub fn entry(&self, i: usize) -> IndexEntry {
        let at = self.entries_at + i * INDEX_ENTRY_LEN;
        IndexEntry::decode(&self.map[at..at + INDEX_ENTRY_LEN])
    }

    fn id_at(&self, i: usize) -> &[u8] {
        let at = self.entries_at + i * INDEX_ENTRY_LEN;
        &self.map[at..at + 32]
    }

    pub fn lookup(&self, id: &ChunkId) -> Option<Location> {
        let b = id.0[0] as usize;
        let mut lo = if b == 0 {
            0
        } else {
            self.fanout(b - 1) as usize
        };
        let mut hi = (self.fanout(b) as usize).min(self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.id_at(mid).cmp(&id.0[..]) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => {
                    let e = self.entry(mid);
                    let pack = *self.packs.get(e.pack_no as usize)?;
                    return Some(Location {
                        pack,
                        offset: e.offset,
                        stored_len: e.stored_len,
                        raw_len: e.raw_len,
                    });
                }
            }
        }
        None
    }

    /// Checks the trailing BLAKE3 of the whole file and the sort order.
    pub fn check(&self) -> Result<()> {
        let n = self.map.len();
        let sum = blake3::hash(&self.map[..n - 32]);
        if sum.as_bytes() != &self.map[n - 32..] {
            return Err(Error::Corrupt(format!(
                "index {}: checksum mismatch",
                self.name
            )));
        }
        for i in 1..self.count {
            if self.id_at(i - 1) >= self.id_at(i) {
                return Err(Error::Corrupt(format!(
                    "index {}: entries out of order",
                    self.name
                )));
            }
        }
        for i in 0..self.count {
            if self.entry(i).pack_no as usize >= self.packs.len() {
                return Err(Error::Corrupt(format!(
                    "index {}: entry names a pack it does not list",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// Reads one stored chunk's compressed bytes and checks its entry header.
pub fn read_stored(backend: &dyn Backend, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
    let start = loc.offset as u64 - PACK_ENTRY_HEADER_LEN;
    let mut buf = vec![0u8; PACK_ENTRY_HEADER_LEN as usize + loc.stored_len as usize];
    backend.read_at(ObjectKind::Pack, &loc.pack.name(), start, &mut buf)?;
    check_entry(buf, id, loc)
}

/// Checks that an entry read from a pack (header and payload) is the chunk
/// the index says, and returns its compressed bytes.
pub fn check_entry(mut buf: Vec<u8>, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
    check_header(&buf, id, loc)?;
    buf.drain(..PACK_ENTRY_HEADER_LEN as usize);
    Ok(buf)
}

/// Checks that an entry read from a pack (header, then payload) is the
/// chunk the index says.
pub fn check_header(buf: &[u8], id: &ChunkId, loc: &Location) -> Result<()> {
    let start = loc.offset as u64 - PACK_ENTRY_HEADER_LEN;
    if buf.len() < PACK_ENTRY_HEADER_LEN as usize || buf[..32] != id.0 {
        return Err(Error::Corrupt(format!(
            "pack {} at offset {}: entry header names another chunk than the index says ({id})",
            loc.pack.name(),
            start
        )));
    }
    // The lengths are redundant with the index, but a pack must stay
    // readable on its own (verify, index rebuilds): a damaged header is
    // damage, even where the index alone would let the chunk be read.
    let le = |r: std::ops::Range<usize>| {
        u32::from_le_bytes([
            buf[r.start],
            buf[r.start + 1],
            buf[r.start + 2],
            buf[r.start + 3],
        ])
    };
    let (raw_len, stored_len) = (le(32..36), le(36..40));
    if raw_len != loc.raw_len || stored_len != loc.stored_len {
        return Err(Error::Corrupt(format!(
            "pack {} at offset {}: entry header of chunk {id} gives lengths {raw_len}/{stored_len}, the index {}/{}",
            loc.pack.name(),
            start,
            loc.raw_len,
            loc.stored_len
        )));
    }
    Ok(())
}

const SCAN_WINDOW: usize = 8 << 20;

/// A sliding read window over one pack.
struct Window<'a> {
    backend: &'a dyn Backend,
    name: &'a str,
    size: u64,
    start: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    fn get(&mut self, at: u64, len: usize) -> Result<&[u8]> {
        let end = at + len as u64;
        if at < self.start || end > self.start + self.buf.len() as u64 {
            let want = (len.max(SCAN_WINDOW) as u64).min(self.size - at) as usize;
            self.buf.resize(want, 0);
            self.backend
                .read_at(ObjectKind::Pack, self.name, at, &mut self.buf)?;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(&self.buf[from..from + len])
    }
}

/// Walks every entry of a pack in order: (entry, compressed bytes). Used by
/// `verify --full` and by gc's repack.
pub fn scan_pack(
    backend: &dyn Backend,
    pack: &PackId,
    mut visit: impl FnMut(IndexEntry, &[u8]) -> Result<()>,
) -> Result<()> {
    let name = pack.name();
    let size = backend.size(ObjectKind::Pack, &name)?;
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    if size < PACK_HEADER_LEN {
        return Err(Error::Corrupt(format!(
            "pack {name}: shorter than its header"
        )));
    }
    backend.read_at(ObjectKind::Pack, &name, 0, &mut header)?;
    if &header[..8] != PACK_MAGIC {
        return Err(Error::Corrupt(format!("pack {name}: bad magic")));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            path: name,
            what: "pack",
            found: version as u64,
            supported: PACK_VERSION as u64,
        });
    }
    // Read in large windows: one request per window rather than two per
    // chunk, which matters where each read is a round trip (object stores).
    let mut win = Window {
        backend,
        name: &name,
        size,
        start: 0,
        buf: Vec::new(),
    };
    let mut at = PACK_HEADER_LEN;
    while at < size {
        if at + PACK_ENTRY_HEADER_LEN > size {
            return Err(Error::Corrupt(format!(
                "pack {name}: truncated entry header at {at}"
            )));
        }
        let h = win.get(at, PACK_ENTRY_HEADER_LEN as usize)?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[..32]);
        let raw_len = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
        let stored_len = u32::from_le_bytes([h[36], h[37], h[38], h[39]]);
        let off = at + PACK_ENTRY_HEADER_LEN;
        if off + stored_len as u64 > size {
            return Err(Error::Corrupt(format!(
                "pack {name}: truncated chunk at {at}"
            )));
        }
        let offset = u32::try_from(off)
            .map_err(|_| Error::Corrupt(format!("pack {name}: larger than 4 GiB")))?;
        let payload = win.get(off, stored_len as usize)?;
        visit(
            IndexEntry {
                id: ChunkId(id),
                pack_no: 0,
                offset,
                stored_len,
                raw_len,
            },
            payload,
        )?;
        at = off + stored_len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the sizes of the writes (small headers, a partly filled
    /// buffer, writes larger than the buffer), the file holds the bytes in
    /// order and the hash is the hash of the file.
    #[test]
    fn hashing_file_hashes_what_it_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = HashingFile::new(File::create(&path).expect("create"));
        let mut want = Vec::new();
        let mut x: u32 = 7;
        for size in [
            40,
            8_000,
            1,
            HASHING_BUF - 3,
            40,
            3 * HASHING_BUF,
            0,
            5,
            HASHING_BUF,
        ] {
            let piece: Vec<u8> = (0..size)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            w.write_all(&piece).expect("write");
            want.extend_from_slice(&piece);
        }
        let (file, hash) = w.finish().expect("finish");
        drop(file);
        let got = std::fs::read(&path).expect("read");
        assert!(got == want, "file bytes differ");
        assert_eq!(hash, blake3::hash(&want));
    }
}
