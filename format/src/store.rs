//! The chunk store: open or create one, look chunks up, read them back
//! verified, write new ones in parallel, and keep names (refs).

use crate::backend::{Backend, LocalBackend};
use crate::chunker::ChunkParams;
use crate::error::{Error, IoContext, Result};
use crate::hash::ChunkId;
use crate::pack::{self, IndexFile, Location, PackWriter};
use crossbeam_channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

pub const STORE_VERSION: u64 = 1;
/// No chunk, node, list piece or block map wharf writes is larger; a
/// received one that claims to be is refused (spec/FORMAT.md).
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// Index files are merged into one when a store has more than this many, so
/// a lookup never probes more than a few files.
pub const MAX_INDEX_FILES: usize = 8;
/// The zstd level of a new store (`wharf init --zstd-level` overrides it).
///
/// 4, not zstd's own default of 3: on inputs of at most 128 KiB (every chunk
/// at the default chunk sizes) libzstd 1.5.7's level 4 is level 3's
/// double-fast matcher with a minimum match of 4 bytes instead of 5 (and
/// larger tables, which alone gain nothing): it finds the short repeats that
/// level 3 skips. Measured on the pyml-small corpus
/// (benches/, legacy tars): the new chunks of a v2 1.7-2.0 % smaller (dep-bump
/// 21.46 -> 21.05 MB, rebuild 11.28 -> 11.08, base-upgrade 28.77 -> 28.29;
/// dep-bump with gzip layers 1.9 %), a whole v1 1.4 % smaller (169.8 -> 167.4
/// MB), for 15-25 % more compression CPU: 10-15 % more CPU in an add of new
/// data, 2 MB more memory, extract unchanged. Level 5 (greedy matcher) would
/// save another 2 % at over twice level 3's compression time.
///
/// Measured and not done: tar skeletons, lists and nodes are 1-7 % of the
/// stored bytes and already compress 12-19:1 at level 3; level 9 for them
/// alone saves only 0.02-0.35 % of the store for 2-3 % more CPU. Frames carry
/// no checksum already; leaving out their content size would save 1 byte a
/// chunk (0.01 %).
pub const DEFAULT_ZSTD_LEVEL: i32 = 4;

/// The store's settings, fixed at `wharf init`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreConfig {
    pub wharf_store: u64,
    pub chunking: ChunkParams,
    pub zstd_level: i32,
    pub pack_target: u64,
    /// How deep a gzip compressor's match finder writers model before they
    /// store a layer as it is (`wharf init --gzip-deep`); absent: the stock
    /// [`crate::gzip::FAST_CHAIN`]. Absent from stores made without it, so
    /// their `config.json` stays as it was; readers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gzip_max_chain: Option<u32>,
}

impl StoreConfig {
    fn validate(&self) -> Result<()> {
        self.chunking.validate()?;
        if !(1..=22).contains(&self.zstd_level) {
            return Err(Error::Invalid(format!(
                "zstd level must be 1..=22, got {}",
                self.zstd_level
            )));
        }
        if self.pack_target < (1 << 20) || self.pack_target > (3u64 << 30) {
            return Err(Error::Invalid("pack target must be 1 MiB..3 GiB".into()));
        }
        if let Some(chain) = self.gzip_max_chain {
            if !(1..=crate::gzip::DEEP_CHAIN).contains(&chain) {
                return Err(Error::Invalid(format!(
                    "gzip_max_chain must be 1..={}, got {chain}",
                    crate::gzip::DEEP_CHAIN
                )));
            }
        }
        Ok(())
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            wharf_store: STORE_VERSION,
            chunking: ChunkParams::DEFAULT,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            pack_target: pack::DEFAULT_PACK_TARGET,
            gzip_max_chain: None,
        }
    }
}

/// What a name points at.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RefValue {
    pub recipe: ChunkId,
    /// Unix seconds.
    pub added: u64,
    /// Length of the image tar.
    pub len: u64,
}

pub struct Store {
    backend: Arc<dyn Backend>,
    pub config: StoreConfig,
    index: RwLock<Vec<Arc<IndexFile>>>,
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

impl Store {
    /// Creates a store at `root` (the directory may exist but must not hold a store).
    pub fn init(root: &Path, config: StoreConfig) -> Result<Store> {
        config.validate()?;
        std::fs::create_dir_all(root).ctx("create store directory", root)?;
        Store::init_backend(Arc::new(LocalBackend::open(root)?), config)
    }

    /// Creates a store on any backend (an object store, say).
    pub fn init_backend(backend: Arc<dyn Backend>, config: StoreConfig) -> Result<Store> {
        config.validate()?;
        if backend.read_config()?.is_some() {
            return Err(Error::Invalid(format!(
                "{} already holds a wharf store",
                backend.location()
            )));
        }
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::Invalid(format!("encode config: {e}")))?;
        backend.create_config(&json)?;
        Store::open_backend(backend)
    }

    /// Opens the store in the directory `root`.
    pub fn open(root: &Path) -> Result<Store> {
        // Checked before the backend creates its subdirectories, so that a
        // mistyped path is reported rather than half-initialised.
        if !root.join("config.json").exists() {
            return Err(Error::NoStore(root.to_path_buf()));
        }
        Store::open_backend(Arc::new(LocalBackend::open(root)?))
    }

    /// Opens the store a backend holds.
    pub fn open_backend(backend: Arc<dyn Backend>) -> Result<Store> {
        let location = backend.location();
        let raw = backend
            .read_config()?
            .ok_or_else(|| Error::NoStore(PathBuf::from(&location)))?;
        let cfg_name = format!("{location}/config.json");
        let v: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| Error::Corrupt(format!("{cfg_name}: {e}")))?;
        let version = v.get("wharf_store").and_then(|x| x.as_u64()).unwrap_or(0);
        if version != STORE_VERSION {
            return Err(Error::UnsupportedVersion {
                path: cfg_name,
                what: "store",
                found: version,
                supported: STORE_VERSION,
            });
        }
        let config: StoreConfig =
            serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("{cfg_name}: {e}")))?;
        config.chunking.validate()?;
        let store = Store {
            backend,
            config,
            index: RwLock::new(Vec::new()),
        };
        store.reload_index()?;
        Ok(store)
    }

    /// Where the store is, for messages: a directory or an object-store URL.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// Re-reads the list of index files (after another process wrote some).
    pub fn reload_index(&self) -> Result<()> {
        // A concurrent writer's compaction publishes its merged index before
        // deleting the ones it merged, so a file that vanished between the
        // listing and the open is covered by a newer one: list again.
        let mut attempt = 0;
        let files = loop {
            attempt += 1;
            let mut files = Vec::new();
            let mut vanished = false;
            for name in self.backend.list(crate::backend::ObjectKind::Index)? {
                match IndexFile::open(&*self.backend, &name) {
                    Ok(f) => files.push(Arc::new(f)),
                    Err(Error::Io { cause, .. })
                        if cause.kind() == std::io::ErrorKind::NotFound && attempt < 5 =>
                    {
                        vanished = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !vanished {
                break files;
            }
        };
        let mut files = files;
        // Larger files first: most lookups end in the big merged index.
        files.sort_by_key(|f| std::cmp::Reverse(f.len()));
        *self.index_mut()? = files;
        Ok(())
    }

    fn index_mut(&self) -> Result<std::sync::RwLockWriteGuard<'_, Vec<Arc<IndexFile>>>> {
        self.index
            .write()
            .map_err(|_| Error::Corrupt("index lock poisoned".into()))
    }

    pub fn index_files(&self) -> Vec<Arc<IndexFile>> {
        self.index.read().map(|v| v.clone()).unwrap_or_default()
    }

    fn add_index(&self, name: &str) -> Result<()> {
        let f = Arc::new(IndexFile::open(&*self.backend, name)?);
        self.index_mut()?.push(f);
        Ok(())
    }

    pub fn lookup(&self, id: &ChunkId) -> Option<Location> {
        let files = self.index.read().ok()?;
        files.iter().find_map(|f| f.lookup(id))
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lookup(id).is_some()
    }

    /// Where a chunk lies, or `MissingChunk` when the store lacks it.
    fn locate(&self, id: &ChunkId) -> Result<Location> {
        self.lookup(id).ok_or_else(|| Error::MissingChunk {
            chunk: id.to_hex(),
            context: String::new(),
        })
    }

    /// A chunk's compressed bytes as stored, and its uncompressed length,
    /// for sending to another store without recompressing.
    pub fn read_stored(&self, id: &ChunkId) -> Result<(u32, Vec<u8>)> {
        let loc = self.locate(id)?;
        Ok((loc.raw_len, pack::read_stored(&*self.backend, id, &loc)?))
    }

    /// Many chunks as stored (see `read_stored`), read in the backend's
    /// fewest requests; in the order asked.
    pub fn read_stored_many(&self, ids: &[ChunkId]) -> Result<Vec<(u32, Vec<u8>)>> {
        let (locs, bufs) = self.read_entries(ids)?;
        bufs.into_iter()
            .zip(ids.iter().zip(&locs))
            .map(|(buf, (id, loc))| Ok((loc.raw_len, pack::check_entry(buf, id, loc)?)))
            .collect()
    }

    /// Appends the pack entries of chunks `ids` (40-byte header, then the
    /// compressed bytes: FORMAT.md §4.1, which is also how chunks travel),
    /// in order, to `out`, each checked against the index, until `out`
    /// holds `limit` bytes or more. Entries next to each other in a pack
    /// are read at once, with no copy but the read. Returns how many of
    /// `ids` were appended and their compressed bytes.
    pub fn read_entries_into(
        &self,
        ids: &[ChunkId],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(usize, u64)> {
        const H: u64 = pack::PACK_ENTRY_HEADER_LEN;
        let mut locs = Vec::new();
        let mut size = out.len();
        for id in ids {
            if size >= limit {
                break;
            }
            let loc = self.locate(id)?;
            size += H as usize + loc.stored_len as usize;
            locs.push(loc);
        }
        // Runs of entries back to back in one pack become one read.
        let mut runs: Vec<(pack::PackId, u64, usize)> = Vec::new();
        for l in &locs {
            let start = l.offset as u64 - H;
            let len = H as usize + l.stored_len as usize;
            match runs.last_mut() {
                Some((p, s, n)) if *p == l.pack && *s + *n as u64 == start => *n += len,
                _ => runs.push((l.pack, start, len)),
            }
        }
        let names: Vec<String> = runs.iter().map(|r| r.0.name()).collect();
        let reads: Vec<crate::backend::RangeRead<'_>> = runs
            .iter()
            .zip(&names)
            .map(|(r, n)| (n.as_str(), r.1, r.2))
            .collect();
        let from = out.len();
        out.resize(size, 0);
        self.backend.read_ranges_into(
            crate::backend::ObjectKind::Pack,
            &reads,
            &mut out[from..],
        )?;
        let mut at = from;
        let mut stored = 0;
        for (id, loc) in ids.iter().zip(&locs) {
            let len = H as usize + loc.stored_len as usize;
            pack::check_header(&out[at..at + len], id, loc)?;
            at += len;
            stored += loc.stored_len as u64;
        }
        Ok((locs.len(), stored))
    }

    fn read_entries(&self, ids: &[ChunkId]) -> Result<(Vec<Location>, Vec<Vec<u8>>)> {
        let mut locs = Vec::with_capacity(ids.len());
        for id in ids {
            locs.push(self.locate(id)?);
        }
        let names: Vec<String> = locs.iter().map(|l| l.pack.name()).collect();
        let reads: Vec<crate::backend::RangeRead<'_>> = locs
            .iter()
            .zip(&names)
            .map(|(l, n)| {
                (
                    n.as_str(),
                    l.offset as u64 - pack::PACK_ENTRY_HEADER_LEN,
                    pack::PACK_ENTRY_HEADER_LEN as usize + l.stored_len as usize,
                )
            })
            .collect();
        let bufs = self
            .backend
            .read_ranges(crate::backend::ObjectKind::Pack, &reads)?;
        Ok((locs, bufs))
    }

    /// Reads many chunks (in the backend's fewest requests), decompresses
    /// them in parallel and checks each one's BLAKE3; in the order asked.
    pub fn read_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        let (locs, bufs) = self.read_entries(ids)?;
        use rayon::prelude::*;
        bufs.into_par_iter()
            .zip(ids.par_iter().zip(locs.par_iter()))
            .map(|(buf, (id, loc))| {
                let stored = pack::check_entry(buf, id, loc)?;
                decode_checked(id, loc, &stored)
            })
            .collect()
    }

    /// Reads a chunk, decompresses it and checks its BLAKE3.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let stored = pack::read_stored(&*self.backend, id, &loc)?;
        decode_checked(id, &loc, &stored)
    }

    /// Takes the store's lock: shared for writers that only add, exclusive
    /// for gc, which must not delete what a concurrent add is about to use.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        Ok(StoreLock {
            _guard: self.backend.lock(exclusive)?,
        })
    }

    pub fn get_ref(&self, name: &str) -> Result<Option<RefValue>> {
        match self.backend.read_ref(name)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("ref {name:?}: {e}"))),
        }
    }

    pub fn require_ref(&self, name: &str) -> Result<RefValue> {
        self.get_ref(name)?
            .ok_or_else(|| Error::NoSuchName(name.to_string()))
    }

    pub fn set_ref(&self, name: &str, value: &RefValue) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Invalid("an image name cannot be empty".into()));
        }
        let b = serde_json::to_vec(value).map_err(|e| Error::Invalid(e.to_string()))?;
        self.backend.write_ref(name, Some(&b))
    }

    pub fn remove_ref(&self, name: &str) -> Result<()> {
        self.require_ref(name)?;
        self.backend.write_ref(name, None)
    }

    pub fn list_refs(&self) -> Result<Vec<(String, RefValue)>> {
        let mut out = Vec::new();
        for n in self.backend.list_refs()? {
            if let Some(v) = self.get_ref(&n)? {
                out.push((n, v));
            }
        }
        Ok(out)
    }

    /// Merges all index files into one when there are too many. Called with
    /// the store locked; the merged index is published before the old ones
    /// are removed, so a crash in between only leaves duplicates.
    pub fn compact_index(&self, force: bool) -> Result<bool> {
        let files = self.index_files();
        if files.len() <= 1 || (!force && files.len() <= MAX_INDEX_FILES) {
            return Ok(false);
        }
        let name = merge_indexes(&*self.backend, &files)?;
        for f in &files {
            if f.name != name {
                self.backend
                    .delete(crate::backend::ObjectKind::Index, &f.name)?;
            }
        }
        self.reload_index()?;
        Ok(true)
    }
}

/// K-way merge of sorted index files into one; memory is one cursor per file.
pub fn merge_indexes(backend: &dyn Backend, files: &[Arc<IndexFile>]) -> Result<String> {
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BinaryHeap};
    let mut packs: BTreeMap<pack::PackId, u32> = BTreeMap::new();
    for f in files {
        for p in f.packs() {
            let n = packs.len() as u32;
            packs.entry(*p).or_insert(n);
        }
    }
    let pack_list: Vec<pack::PackId> = {
        let mut v: Vec<_> = packs.iter().map(|(p, n)| (*n, *p)).collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    };
    let mut heap = BinaryHeap::new();
    for (fi, f) in files.iter().enumerate() {
        if !f.is_empty() {
            heap.push(Reverse((f.entry(0).id, fi, 0usize)));
        }
    }
    let iter = std::iter::from_fn(move || {
        let Reverse((_, fi, i)) = heap.pop()?;
        let f = &files[fi];
        let mut e = f.entry(i);
        let Some(pack) = f.packs().get(e.pack_no as usize) else {
            return Some(Err(Error::Corrupt(format!(
                "index {}: entry names a pack it does not list",
                f.name
            ))));
        };
        e.pack_no = packs[pack];
        if i + 1 < f.len() {
            heap.push(Reverse((f.entry(i + 1).id, fi, i + 1)));
        }
        Some(Ok(e))
    });
    pack::write_index(backend, &pack_list, iter)
}

fn decode_checked(id: &ChunkId, loc: &Location, stored: &[u8]) -> Result<Vec<u8>> {
    let raw = decompress(stored, loc.raw_len as usize).map_err(|e| {
        Error::Corrupt(format!(
            "chunk {id} in pack {}: cannot decompress: {e}",
            loc.pack.name()
        ))
    })?;
    if raw.len() != loc.raw_len as usize || ChunkId::of(&raw) != *id {
        return Err(Error::Corrupt(format!(
            "chunk {id} in pack {} at offset {}: content does not match its hash",
            loc.pack.name(),
            loc.offset
        )));
    }
    Ok(raw)
}

pub struct StoreLock {
    _guard: crate::backend::LockGuard,
}

pub fn decompress(stored: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(dec) => dec.decompress(stored, raw_len),
            None => Err(std::io::Error::other("no decompressor")),
        }
    })
}

/// Counters of one write session.
#[derive(Default, Debug)]
pub struct WriteStats {
    /// Chunks offered, duplicates included.
    pub chunks_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub chunks_new: AtomicU64,
    pub bytes_new: AtomicU64,
    pub bytes_stored: AtomicU64,
}

impl WriteStats {
    pub fn get(&self, f: impl Fn(&WriteStats) -> &AtomicU64) -> u64 {
        f(self).load(Ordering::Relaxed)
    }
}

enum ToWriter {
    Chunk(ChunkId, u32, Vec<u8>),
    /// Verified received entries, laid out as in a pack in the buffer, and
    /// the buffer's share of the received-bytes budget.
    Entries(Vec<u8>, Vec<ReceivedEntry>, Lease),
}

/// Received buffers held between [`ChunkWriter::put_received`] and the pack
/// writer: queues count buffers, and a sender chooses their size (a frame
/// may be up to 64 MiB), so bytes are bounded here. A buffer larger than the
/// whole budget is admitted once nothing else is held, so any frame the
/// protocol allows still goes through, alone.
pub const RECEIVED_BYTES: u64 = 32 << 20;

/// Bytes of received buffers alive in the pipeline, and the most there ever
/// were (for tests and reports).
#[derive(Default)]
struct ByteBudget {
    held: Mutex<u64>,
    freed: std::sync::Condvar,
    peak: AtomicU64,
}

/// A received buffer, its entries, and its share of the budget.
type Received = (Vec<u8>, Vec<ReceivedEntry>, Lease);

/// A buffer's share of a [`ByteBudget`], given back when dropped.
struct Lease {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl ByteBudget {
    /// Waits until `bytes` more fit under `limit`, or nothing is held.
    fn take(self: &Arc<Self>, bytes: u64, limit: u64) -> Result<Lease> {
        let poisoned = || Error::Corrupt("received-bytes budget lock poisoned".into());
        let mut held = self.held.lock().map_err(|_| poisoned())?;
        while *held > 0 && *held + bytes > limit {
            held = self.freed.wait(held).map_err(|_| poisoned())?;
        }
        *held += bytes;
        self.peak.fetch_max(*held, Ordering::Relaxed);
        Ok(Lease {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut held) = self.budget.held.lock() {
            *held -= self.bytes;
        }
        self.budget.freed.notify_all();
    }
}

/// One chunk of a buffer of received entries ([`ChunkWriter::put_received`]):
/// its compressed bytes are `buf[at..at + len]`, preceded by the 40-byte
/// entry header of a pack (FORMAT.md §4.1), which a PUT payload is.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedEntry {
    pub id: ChunkId,
    pub raw_len: u32,
    pub at: usize,
    pub len: usize,
}

/// Received buffers queued for verification, and verified ones queued for
/// the pack writer: each stage works on one while the next is queued, so
/// the caller reads the next payload while the last one is checked, and
/// memory stays at a few payloads.
const RECEIVED_QUEUE: usize = 1;

/// A write session: chunks offered with `put` are hashed by the caller,
/// compressed on a pool of threads (one zstd context each) and appended to
/// packs by one writer thread. Nothing is referenced until the caller sets a
/// ref after `finish`, so an interrupted session leaves only unreferenced
/// packs behind.
pub struct ChunkWriter {
    store: Arc<Store>,
    pending: Arc<Mutex<HashSet<ChunkId>>>,
    to_compress: Option<Sender<(ChunkId, Vec<u8>)>>,
    /// Chunks that arrive already compressed (transfers) skip the workers.
    to_writer: Option<Sender<ToWriter>>,
    /// Received entries go through the verifying stage first.
    to_verify: Option<Sender<Received>>,
    received_bytes: Arc<ByteBudget>,
    verifier: Option<JoinHandle<Result<()>>>,
    workers: Vec<JoinHandle<Result<()>>>,
    writer: Option<JoinHandle<Result<()>>>,
    /// The first error of a pipeline thread, for the caller whose `put` found
    /// the pipeline gone.
    failure: Arc<Mutex<Option<Error>>>,
    pub stats: Arc<WriteStats>,
}

impl ChunkWriter {
    pub fn new(store: Arc<Store>, threads: usize) -> Result<Self> {
        let target = store.config.pack_target;
        Self::with_pack_target(store, threads, target)
    }

    /// As `new`, publishing packs once they reach `pack_target` bytes: a
    /// transfer uses a smaller target so an interrupted one keeps more of
    /// what arrived.
    pub fn with_pack_target(store: Arc<Store>, threads: usize, pack_target: u64) -> Result<Self> {
        let threads = threads.max(1);
        let (ctx, crx) = bounded::<(ChunkId, Vec<u8>)>(threads * 16);
        let (wtx, wrx) = bounded::<ToWriter>(threads * 16);
        let level = store.config.zstd_level;
        let failure: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
        // Each pipeline thread only borrows the receiving end of its queue,
        // which its closure owns: the queue closes after the thread's error
        // is on record in `failure`, so a `put` that finds it closed reports
        // that error (a full disk) rather than "stopped unexpectedly".
        let mut workers = Vec::new();
        for _ in 0..threads {
            let crx = crx.clone();
            let wtx = wtx.clone();
            let failure = failure.clone();
            workers.push(std::thread::spawn(move || -> Result<()> {
                let run = || -> Result<()> {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    for (id, raw) in crx.iter() {
                        let z = c.compress(&raw)?;
                        if wtx.send(ToWriter::Chunk(id, raw.len() as u32, z)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                };
                remember_failure(run(), &failure)
            }));
        }
        let pending = Arc::new(Mutex::new(HashSet::new()));
        let stats = Arc::new(WriteStats::default());
        let (vtx, vrx) = bounded::<Received>(RECEIVED_QUEUE);
        let verifier = {
            let store = store.clone();
            let pending = pending.clone();
            let stats = stats.clone();
            let failure = failure.clone();
            let wtx = wtx.clone();
            std::thread::spawn(move || {
                remember_failure(verify_received(store, &vrx, wtx, pending, stats), &failure)
            })
        };
        let writer = {
            let store = store.clone();
            let pending = pending.clone();
            let stats = stats.clone();
            let failure = failure.clone();
            std::thread::spawn(move || {
                remember_failure(
                    write_packs(store, &wrx, pending, stats, pack_target),
                    &failure,
                )
            })
        };
        Ok(ChunkWriter {
            store,
            pending,
            to_compress: Some(ctx),
            to_writer: Some(wtx),
            to_verify: Some(vtx),
            received_bytes: Arc::default(),
            verifier: Some(verifier),
            workers,
            writer: Some(writer),
            failure,
            stats,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// True when the chunk is in the store or already queued in this session.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.store.contains(id) || self.pending.lock().map(|p| p.contains(id)).unwrap_or(false)
    }

    /// Stores `bytes` unless present; returns its id.
    pub fn put(&self, bytes: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(bytes);
        self.put_with_id(id, bytes)?;
        Ok(id)
    }

    /// Stores a chunk whose id the caller computed.
    pub fn put_with_id(&self, id: ChunkId, bytes: &[u8]) -> Result<bool> {
        self.stats.chunks_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.store.contains(&id) {
            return Ok(false);
        }
        {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| Error::Corrupt("pending set lock poisoned".into()))?;
            if !p.insert(id) {
                return Ok(false);
            }
        }
        self.stats.chunks_new.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_new
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let sent = match &self.to_compress {
            Some(tx) => tx.send((id, bytes.to_vec())).is_ok(),
            None => false,
        };
        if !sent {
            // The pipeline stopped: its own error is the one worth reporting.
            let failure = self.failure.lock().ok().and_then(|mut f| f.take());
            return Err(failure
                .unwrap_or_else(|| Error::Corrupt("chunk writer stopped unexpectedly".into())));
        }
        Ok(true)
    }

    /// Stores a chunk that arrived compressed (from another store), after
    /// checking that it decompresses to bytes with the given id. Returns
    /// false when the chunk was already present.
    pub fn put_stored(&self, id: ChunkId, raw_len: u32, stored: Vec<u8>) -> Result<bool> {
        Ok(self.put_stored_many(vec![(id, raw_len, stored)])? == 1)
    }

    /// Stores a batch of received chunks; returns how many were new. Chunks
    /// already here are dropped unread (a sender cannot make the receiver
    /// spend work on bytes it will not keep); the others are verified on all
    /// cores, and the whole batch is refused, before any of it is queued,
    /// if one of them is bad.
    pub fn put_stored_many(&self, items: Vec<(ChunkId, u32, Vec<u8>)>) -> Result<u64> {
        use rayon::prelude::*;
        for (_, raw_len, _) in &items {
            self.stats.chunks_in.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_in
                .fetch_add(*raw_len as u64, Ordering::Relaxed);
        }
        let fresh: Vec<(ChunkId, u32, Vec<u8>)> = items
            .into_iter()
            .filter(|(id, _, _)| !self.has(id))
            .collect();
        fresh
            .par_iter()
            .map(|(id, raw_len, stored)| check_received(id, *raw_len, stored))
            .collect::<Result<Vec<()>>>()?;
        let mut new = 0;
        for (id, raw_len, stored) in fresh {
            {
                let mut p = self
                    .pending
                    .lock()
                    .map_err(|_| Error::Corrupt("pending set lock poisoned".into()))?;
                if !p.insert(id) {
                    continue;
                }
            }
            self.stats.chunks_new.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_new
                .fetch_add(raw_len as u64, Ordering::Relaxed);
            let sent = match &self.to_writer {
                Some(tx) => tx.send(ToWriter::Chunk(id, raw_len, stored)).is_ok(),
                None => false,
            };
            if !sent {
                let failure = self.failure.lock().ok().and_then(|mut f| f.take());
                return Err(failure.unwrap_or_else(|| {
                    Error::Corrupt("chunk writer stopped unexpectedly".into())
                }));
            }
            new += 1;
        }
        Ok(new)
    }

    /// Queues a buffer of received entries (see [`ReceivedEntry`]) to be
    /// verified and stored, and returns at once: entries already here are
    /// skipped, the others are verified on all cores while the caller reads
    /// the next buffer, then written as they are, in spans. The first bad
    /// entry stops the session: the entries before it are kept, it and
    /// those after it are not, and the error is returned by this call or a
    /// later one, or by `finish`.
    pub fn put_received(&self, buf: Vec<u8>, entries: Vec<ReceivedEntry>) -> Result<()> {
        const H: usize = pack::PACK_ENTRY_HEADER_LEN as usize;
        for e in &entries {
            let header =
                e.at.checked_sub(H)
                    .filter(|_| e.at.checked_add(e.len).is_some_and(|end| end <= buf.len()))
                    .map(|start| &buf[start..e.at]);
            let ok = header.is_some_and(|h| {
                h[..32] == e.id.0
                    && h[32..36] == e.raw_len.to_le_bytes()
                    && u32::try_from(e.len).is_ok_and(|l| h[36..40] == l.to_le_bytes())
            });
            if !ok {
                return Err(Error::Invalid(
                    "received entry does not match its header".into(),
                ));
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        let lease = self
            .received_bytes
            .take(buf.capacity() as u64, RECEIVED_BYTES)?;
        let sent = match &self.to_verify {
            Some(tx) if self.failure.lock().map(|f| f.is_none()).unwrap_or(false) => {
                tx.send((buf, entries, lease)).is_ok()
            }
            _ => false,
        };
        if !sent {
            let failure = self.failure.lock().ok().and_then(|mut f| f.take());
            return Err(failure
                .unwrap_or_else(|| Error::Corrupt("chunk writer stopped unexpectedly".into())));
        }
        Ok(())
    }

    /// The most bytes of received buffers this session held at once, from
    /// [`put_received`](Self::put_received) to the pack (see [`RECEIVED_BYTES`]).
    pub fn received_bytes_peak(&self) -> u64 {
        self.received_bytes.peak.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> Result<()> {
        self.to_compress = None;
        self.to_verify = None;
        let mut first_err = None;
        if let Some(v) = self.verifier.take() {
            match v.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Corrupt("verifying thread panicked".into()));
                }
            }
        }
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Corrupt("compression thread panicked".into()));
                }
            }
        }
        // The workers have exited; the last sender closes the writer's queue.
        self.to_writer = None;
        if let Some(w) = self.writer.take() {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Corrupt("pack writer thread panicked".into()));
                }
            }
        }
        if let Some(f) = self.failure.lock().ok().and_then(|mut f| f.take()) {
            first_err = Some(f);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until every chunk is in a published pack and index.
    pub fn finish(mut self) -> Result<Arc<WriteStats>> {
        self.stop()?;
        self.store.compact_index(false)?;
        Ok(self.stats.clone())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A received chunk is exactly one zstd frame, no bigger than zstd's worst
/// case for its length (no padding or extra frames can ride along into a
/// pack), at most `MAX_CHUNK_LEN`, and decompresses to bytes with its id.
fn check_received(id: &ChunkId, raw_len: u32, stored: &[u8]) -> Result<()> {
    let bad = |why: &str| Error::Verify(format!("received chunk {id}: {why}"));
    if raw_len as usize > MAX_CHUNK_LEN {
        return Err(bad("larger than any chunk wharf writes"));
    }
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(stored).ok();
    if frame_len != Some(stored.len())
        || stored.len() > zstd::zstd_safe::compress_bound(raw_len as usize)
    {
        return Err(bad("not a single zstd frame of the expected size"));
    }
    let raw = decompress(stored, raw_len as usize)
        .map_err(|e| bad(&format!("cannot decompress: {e}")))?;
    if raw.len() != raw_len as usize || ChunkId::of(&raw) != *id {
        return Err(bad("content does not match its hash"));
    }
    Ok(())
}

/// The verifying stage of [`ChunkWriter::put_received`]: one buffer at a
/// time, its entries checked in parallel, the good ones before the first
/// bad one passed on to the pack writer.
fn verify_received(
    store: Arc<Store>,
    rx: &Receiver<Received>,
    tx: Sender<ToWriter>,
    pending: Arc<Mutex<HashSet<ChunkId>>>,
    stats: Arc<WriteStats>,
) -> Result<()> {
    use rayon::prelude::*;
    let queued = |id: &ChunkId| pending.lock().map(|p| p.contains(id)).unwrap_or(false);
    for (buf, entries, lease) in rx.iter() {
        // Ok(true): verified and new; Ok(false): already here, not read.
        let checked: Vec<Result<bool>> = entries
            .par_iter()
            .map(|e| {
                if store.contains(&e.id) || queued(&e.id) {
                    return Ok(false);
                }
                check_received(&e.id, e.raw_len, &buf[e.at..e.at + e.len]).map(|()| true)
            })
            .collect();
        let mut keep = Vec::with_capacity(entries.len());
        let mut bad = None;
        {
            let mut p = pending
                .lock()
                .map_err(|_| Error::Corrupt("pending set lock poisoned".into()))?;
            for (e, r) in entries.into_iter().zip(checked) {
                stats.chunks_in.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes_in
                    .fetch_add(e.raw_len as u64, Ordering::Relaxed);
                match r {
                    Ok(true) if p.insert(e.id) => {
                        stats.chunks_new.fetch_add(1, Ordering::Relaxed);
                        stats
                            .bytes_new
                            .fetch_add(e.raw_len as u64, Ordering::Relaxed);
                        keep.push(e);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        bad = Some(err);
                        break;
                    }
                }
            }
        }
        if !keep.is_empty() && tx.send(ToWriter::Entries(buf, keep, lease)).is_err() {
            // The writer stopped; its error is the one reported.
            return Ok(());
        }
        if let Some(err) = bad {
            return Err(err);
        }
    }
    Ok(())
}

/// Keeps a pipeline thread's error where `put` can find it; the thread then
/// returns Ok so the error is reported once.
fn remember_failure(r: Result<()>, slot: &Mutex<Option<Error>>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => match slot.lock() {
            Ok(mut s) => {
                s.get_or_insert(e);
                Ok(())
            }
            Err(_) => Err(e),
        },
    }
}

/// Appends received entries to packs in as few writes as they allow: each
/// run of entries back to back in `buf` is one span, cut where the pack
/// reaches `pack_target` (after the entry that reaches it, as one by one).
fn write_entries(
    buf: &[u8],
    entries: &[ReceivedEntry],
    pack: &mut Option<PackWriter>,
    backend: &dyn Backend,
    stats: &WriteStats,
    pack_target: u64,
    hand_off: &mut dyn FnMut(PackWriter) -> Result<()>,
) -> Result<()> {
    const H: usize = pack::PACK_ENTRY_HEADER_LEN as usize;
    let mut i = 0;
    let mut run = Vec::new();
    while i < entries.len() {
        let p = match pack {
            Some(p) => p,
            None => pack.insert(PackWriter::create(backend.scratch_dir())?),
        };
        let start = entries[i].at - H;
        let mut end = start;
        run.clear();
        for e in &entries[i..] {
            if e.at - H != end || (end > start && p.len() + (end - start) as u64 >= pack_target) {
                break;
            }
            run.push((e.id, e.raw_len, e.len as u32, e.at - start));
            end = e.at + e.len;
        }
        p.append_span(&buf[start..end], &run)?;
        stats
            .bytes_stored
            .fetch_add((end - start) as u64, Ordering::Relaxed);
        i += run.len();
        if p.len() >= pack_target {
            if let Some(full) = pack.take() {
                hand_off(full)?;
            }
        }
    }
    Ok(())
}

fn write_packs(
    store: Arc<Store>,
    rx: &Receiver<ToWriter>,
    pending: Arc<Mutex<HashSet<ChunkId>>>,
    stats: Arc<WriteStats>,
    pack_target: u64,
) -> Result<()> {
    let backend = store.backend.clone();
    let mut pack: Option<PackWriter> = None;
    let publish = {
        let store = store.clone();
        let pending = pending.clone();
        move |p: PackWriter| -> Result<()> {
            let ids: Vec<ChunkId> = p.entries().iter().map(|e| e.id).collect();
            let (_, idx) = p.finish(&*store.backend)?;
            store.add_index(&idx)?;
            // Only now may these leave the pending set: they are findable in the index.
            if let Ok(mut set) = pending.lock() {
                for id in ids {
                    set.remove(&id);
                }
            }
            Ok(())
        }
    };
    // Where publishing a pack is an upload, it runs beside the writing of
    // the next one (at most `depth` at once) instead of stalling it.
    let depth = backend.upload_depth();
    let mut uploads: VecDeque<JoinHandle<Result<()>>> = VecDeque::new();
    let wait = |h: JoinHandle<Result<()>>| -> Result<()> {
        h.join()
            .unwrap_or_else(|_| Err(Error::Corrupt("pack upload thread panicked".into())))
    };
    let hand_off =
        |full: PackWriter, uploads: &mut VecDeque<JoinHandle<Result<()>>>| -> Result<()> {
            if depth == 0 {
                return publish(full);
            }
            while uploads.len() >= depth {
                if let Some(h) = uploads.pop_front() {
                    wait(h)?;
                }
            }
            let publish = publish.clone();
            uploads.push_back(std::thread::spawn(move || publish(full)));
            Ok(())
        };
    let written: Result<()> = (|| {
        for msg in rx.iter() {
            let (id, raw_len, z) = match msg {
                ToWriter::Chunk(id, raw_len, z) => (id, raw_len, z),
                ToWriter::Entries(buf, entries, _lease) => {
                    write_entries(
                        &buf,
                        &entries,
                        &mut pack,
                        &*backend,
                        &stats,
                        pack_target,
                        &mut |full| hand_off(full, &mut uploads),
                    )?;
                    continue;
                }
            };
            if pack.is_none() {
                pack = Some(PackWriter::create(backend.scratch_dir())?);
            }
            if let Some(p) = pack.as_mut() {
                p.append(id, raw_len, &z)?;
                stats.bytes_stored.fetch_add(
                    z.len() as u64 + pack::PACK_ENTRY_HEADER_LEN,
                    Ordering::Relaxed,
                );
                if p.len() >= pack_target {
                    if let Some(full) = pack.take() {
                        hand_off(full, &mut uploads)?;
                    }
                }
            }
        }
        if let Some(p) = pack.take() {
            if !p.is_empty() {
                hand_off(p, &mut uploads)?;
            } else {
                p.abandon();
            }
        }
        Ok(())
    })();
    // Every upload is waited for, even after a failure: none may outlive
    // the writer, whose caller then reports the chunks stored.
    let mut first_err = written.err();
    for h in uploads {
        if let Err(e) = wait(h) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
