//! `add`: read an image tar once, from a file or a pipe, and store it.
//!
//! The walk is recursive: the outer tar of `docker save` is split into a
//! skeleton and a data stream, and each member whose content is itself a tar
//! (a layer) becomes a child node split the same way. Members that are large
//! but not tars (gzip layers, say) become raw child nodes, so a blob seen
//! before is stored once whatever image it arrives in. Anything that stops
//! being a well-formed tar is stored from that point on as plain bytes: format
//! awareness only ever decides how bytes are grouped, never which bytes are
//! kept.

use crate::chanread::ChannelReader;
use crate::chunker::{ChunkParams, Chunker};
use crate::error::{Error, Result};
use crate::hash::{sha256_hex, ChunkId};
use crate::list::{Entry, ListWriter, StreamRef};
use crate::recipe::{
    Compression, LayerInfo, Node, NodeBody, Recipe, BLOCK_MAP_BLOCK, RECIPE_VERSION,
};
use crate::skeleton::SkeletonWriter;
use crate::store::{ChunkWriter, RefValue, Store};
use crate::tarhdr::{self, EntryKind, BLOCK};
use crossbeam_channel::{bounded, Sender};
use sha2::Digest;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Smallest layer worth guessing by its size alone (see `KnownLayers`).
const SIZE_ONLY_MIN: u64 = 1 << 20;

/// Tars nested deeper than this are stored as plain bytes.
pub const MAX_DEPTH: u32 = 3;
/// Members of the outer tar at least this large get a node of their own even
/// when they are not tars, so the same blob in two images is one node.
pub const BLOB_NODE_MIN: u64 = 64 << 10;
/// PAX and GNU long-name contents up to this size are parsed and kept in the
/// skeleton; larger ones (pathological) are stored as data, unparsed.
const META_MAX: u64 = 1 << 20;
const READ_BUF: usize = 256 << 10;

#[derive(Clone, Default)]
pub struct AddOptions {
    /// Compression threads (0 = all cores).
    pub threads: usize,
    /// Counts input bytes read, for progress display.
    pub progress: Option<Arc<AtomicU64>>,
    /// gzip effort: how deep a match finder preflate may model before a gzip
    /// member is stored as it is (`None`: the store's `gzip_max_chain`, else
    /// [`gzip::FAST_CHAIN`]).
    pub gzip_max_chain: Option<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AddReport {
    pub name: String,
    pub recipe: ChunkId,
    pub len: u64,
    pub sha256: String,
    /// Uncompressed bytes of chunks that were not in the store before.
    pub new_bytes: u64,
    /// What those took on disk, compressed, with pack entry headers.
    pub stored_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub layers: usize,
    pub seconds: f64,
}

/// Stores the tar read from `input` under `name`. The name is set only after
/// every chunk, node and the recipe are durable in published packs.
pub fn add(
    store: &Arc<Store>,
    input: &mut (dyn Read + Send),
    name: &str,
    opts: &AddOptions,
) -> Result<AddReport> {
    if name.is_empty() {
        return Err(Error::Invalid("an image name cannot be empty".into()));
    }
    let started = Instant::now();
    let _lock = store.lock(false)?;
    // Another writer may have published packs since this store was opened.
    store.reload_index()?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        opts.threads
    };
    let writer = ChunkWriter::new(store.clone(), threads)?;
    let gzip_max_chain = opts
        .gzip_max_chain
        .or(store.config.gzip_max_chain)
        .unwrap_or(crate::gzip::FAST_CHAIN);
    let mut ing = Ingester {
        w: &writer,
        params: store.config.chunking,
        layers: Vec::new(),
        known: KnownLayers::load(store, gzip_max_chain)?,
        compression: None,
        gzip_max_chain,
    };
    // The whole tar's SHA-256 and BLAKE3 are computed on a reader thread, so
    // they overlap with the walk instead of adding to it.
    let (root, node, blake3) = std::thread::scope(|scope| -> Result<(ChunkId, Node, String)> {
        let (tx, rx) = bounded::<std::io::Result<Vec<u8>>>(8);
        let (dtx, drx) = bounded::<(String, String)>(1);
        let progress = opts.progress.clone();
        scope.spawn(move || read_and_hash(input, tx, dtx, progress));
        let mut chan = ChannelReader::new(rx);
        let blake3 = std::cell::RefCell::new(String::new());
        let digest = || -> Result<String> {
            let (sha, b3) = drx
                .recv()
                .map_err(|_| Error::Invalid("input reader stopped before the end".into()))?;
            *blake3.borrow_mut() = b3;
            Ok(sha)
        };
        let mut root_reader = HashingReader::new(&mut chan, false, None);
        root_reader.sha = None;
        root_reader.digest_source = Some(&digest);
        let (root, node) = ing.node(&mut root_reader, 0, b"")?;
        drop(root_reader);
        drop(chan);
        let b3 = blake3.borrow().clone();
        Ok((root, node, b3))
    })?;
    let recipe = Recipe {
        wharf_recipe: RECIPE_VERSION,
        len: node.len,
        sha256: node.sha256.clone(),
        blake3,
        root,
        layers: std::mem::take(&mut ing.layers),
        created: 0,
    };
    let layers = recipe.layers.len();
    let recipe_id = writer.put(&recipe.encode())?;
    let stats = writer.finish()?;
    store.set_ref(
        name,
        &RefValue {
            recipe: recipe_id,
            added: now_secs(),
            len: recipe.len,
        },
    )?;
    Ok(AddReport {
        name: name.to_string(),
        recipe: recipe_id,
        len: recipe.len,
        sha256: recipe.sha256,
        new_bytes: stats.get(|s| &s.bytes_new),
        stored_bytes: stats.get(|s| &s.bytes_stored),
        chunks: stats.get(|s| &s.chunks_in),
        new_chunks: stats.get(|s| &s.chunks_new),
        layers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts and hashes every byte that passes through.
pub struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    pub len: u64,
    sha: Option<sha2::Sha256>,
    /// Where the SHA-256 comes from when another thread computes it.
    digest_source: Option<&'a dyn Fn() -> Result<String>>,
    blake3: Option<blake3::Hasher>,
    progress: Option<Arc<AtomicU64>>,
    block_map: Option<BlockMap>,
}

/// BLAKE3 of each consecutive `BLOCK_MAP_BLOCK` bytes of a stream.
#[derive(Default)]
pub struct BlockMap {
    hasher: blake3::Hasher,
    in_block: usize,
    pub hashes: Vec<u8>,
}

impl BlockMap {
    pub fn update(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let n = (BLOCK_MAP_BLOCK - self.in_block).min(b.len());
            self.hasher.update(&b[..n]);
            self.in_block += n;
            b = &b[n..];
            if self.in_block == BLOCK_MAP_BLOCK {
                self.hashes
                    .extend_from_slice(self.hasher.finalize().as_bytes());
                self.hasher.reset();
                self.in_block = 0;
            }
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        if self.in_block > 0 {
            self.hashes
                .extend_from_slice(self.hasher.finalize().as_bytes());
        }
        self.hashes
    }
}

impl<'a> HashingReader<'a> {
    pub fn new(inner: &'a mut dyn Read, blake3: bool, progress: Option<Arc<AtomicU64>>) -> Self {
        HashingReader {
            inner,
            len: 0,
            sha: Some(sha2::Sha256::new()),
            digest_source: None,
            blake3: blake3.then(blake3::Hasher::new),
            progress,
            block_map: None,
        }
    }

    fn with_block_map(mut self) -> Self {
        self.block_map = Some(BlockMap::default());
        self
    }

    pub fn sha256(&self) -> Result<String> {
        match (&self.sha, self.digest_source) {
            (Some(h), _) => Ok(sha256_hex(h.clone())),
            (None, Some(f)) => f(),
            (None, None) => Err(Error::Invalid("no digest for this stream".into())),
        }
    }
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.sha.as_mut() {
            h.update(&buf[..n]);
        }
        if let Some(b) = self.blake3.as_mut() {
            b.update(&buf[..n]);
        }
        if let Some(m) = self.block_map.as_mut() {
            m.update(&buf[..n]);
        }
        self.len += n as u64;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// The input side of `add`: reads in large blocks, hashes the whole tar,
/// and hands the blocks on.
/// How much of the input the reader thread hands on at a time.
const READ_CHUNK: usize = 1 << 20;

fn read_and_hash(
    input: &mut (dyn Read + Send),
    tx: Sender<std::io::Result<Vec<u8>>>,
    digests: Sender<(String, String)>,
    progress: Option<Arc<AtomicU64>>,
) {
    let mut sha = sha2::Sha256::new();
    let mut b3 = blake3::Hasher::new();
    loop {
        // Not `vec![0; ..]`: no need to zero what the read overwrites (the
        // memset showed as 3 % of an add's samples; wall time moved ~1 %).
        let mut buf = Vec::with_capacity(READ_CHUNK);
        // read_to_end retries interrupted reads itself.
        let n = match (&mut *input).take(READ_CHUNK as u64).read_to_end(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        sha.update(&buf);
        b3.update(&buf);
        if let Some(p) = &progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        if n == 0 {
            break;
        }
        if tx.send(Ok(buf)).is_err() {
            return;
        }
    }
    drop(tx);
    let _ = digests.send((sha256_hex(sha), b3.finalize().to_hex().to_string()));
}

/// Reads until `buf` is full or the input ends; returns the count.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// A byte stream being cut into chunks and listed.
struct DataStream {
    chunker: Chunker,
    list: ListWriter,
}

impl DataStream {
    fn new(params: ChunkParams) -> Self {
        DataStream {
            chunker: Chunker::new(params),
            list: ListWriter::new(),
        }
    }

    fn push(&mut self, w: &ChunkWriter, bytes: &[u8]) -> Result<()> {
        let list = &mut self.list;
        self.chunker.push(bytes, &mut |c: &[u8]| {
            let id = w.put(c)?;
            list.push(Entry(id, c.len() as u32), &mut |p| w.put(p))
        })
    }

    fn finish(mut self, w: &ChunkWriter) -> Result<StreamRef> {
        let list = &mut self.list;
        self.chunker.finish(&mut |c: &[u8]| {
            let id = w.put(c)?;
            list.push(Entry(id, c.len() as u32), &mut |p| w.put(p))
        })?;
        self.list.finish(&mut |p| w.put(p))
    }
}

struct Ingester<'w> {
    w: &'w ChunkWriter,
    params: ChunkParams,
    layers: Vec<LayerInfo>,
    known: KnownLayers,
    /// How the compressed member just stored was handled, for its layers entry.
    compression: Option<Compression>,
    gzip_max_chain: u32,
}

/// Layers of the images already in the store, for the whole-layer fast path.
#[derive(Default)]
pub struct KnownLayers {
    by_sha: HashMap<String, ChunkId>,
    by_path_len: HashMap<(String, u64), ChunkId>,
    /// Layers of at least `SIZE_ONLY_MIN` bytes by size alone: in the legacy
    /// layout an unchanged layer moves to a new `<id>/` when a layer below it
    /// changes. A wrong guess costs one block's hash before the normal path.
    by_len: HashMap<u64, ChunkId>,
    /// How each compressed layer was stored, carried over when it is reused.
    compression: HashMap<ChunkId, Compression>,
}

impl KnownLayers {
    /// `gzip_max_chain`: the model depth of this add. A gzip layer stored as
    /// it is by a shallower model is left out, so that it is modelled again
    /// (`wharf add --gzip-deep` after a plain add of the same image).
    pub fn load(store: &Store, gzip_max_chain: u32) -> Result<KnownLayers> {
        let mut layers = Vec::new();
        for (_, r) in store.list_refs()? {
            // A name whose recipe cannot be read gives no candidates; verify reports it.
            let Ok(rec) = crate::extract::load_recipe(store, &r.recipe) else {
                continue;
            };
            layers.extend(rec.layers.into_iter().filter(|l| {
                !l.compression.as_ref().is_some_and(|c| {
                    c.format == "gzip"
                        && c.method == "raw"
                        && c.max_chain.unwrap_or(crate::gzip::FAST_CHAIN) < gzip_max_chain
                })
            }));
        }
        // One layer stored both ways (a plain add, then a deep one): the
        // form stored by content wins, as it shares chunks with its versions.
        layers.sort_by_key(|l| l.compression.as_ref().is_none_or(|c| c.method != "raw"));
        let mut k = KnownLayers::default();
        for l in layers {
            k.by_sha.insert(l.sha256.clone(), l.node);
            k.by_path_len.insert((l.path.clone(), l.len), l.node);
            if l.len >= SIZE_ONLY_MIN {
                k.by_len.insert(l.len, l.node);
            }
            if let Some(c) = l.compression {
                k.compression.insert(l.node, c);
            }
        }
        Ok(k)
    }

    /// A stored layer this member probably is: by the digest in its name
    /// (OCI layout `blobs/sha256/<hex>`), else by the same path and size
    /// (legacy layout `<id>/layer.tar`, whose id derives from the content),
    /// else by size alone for large members.
    fn candidate(&self, path: &[u8], size: u64) -> Option<ChunkId> {
        let path = String::from_utf8_lossy(path);
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            if let Some(id) = self.by_sha.get(hex) {
                return Some(*id);
            }
        }
        self.by_path_len
            .get(&(path.into_owned(), size))
            .or_else(|| self.by_len.get(&size))
            .copied()
    }
}

impl Ingester<'_> {
    /// The whole-layer fast path: compares the member block by block with
    /// a stored layer's block map (BLAKE3 per MiB) and its SHA-256; if all
    /// match, the stored node is referenced and nothing is chunked or
    /// compressed. At the first differing block, the bytes already read
    /// are rebuilt from the stored layer and the member is ingested as usual,
    /// so the input is still read only once.
    fn reuse_or_ingest(
        &mut self,
        candidate: ChunkId,
        member: &mut dyn Read,
        size: u64,
        depth: u32,
        path: &[u8],
    ) -> Result<(ChunkId, Node)> {
        let store = self.w.store().clone();
        let usable = crate::extract::load_node(&store, &candidate)
            .ok()
            .filter(|n| n.len == size)
            .and_then(|n| {
                let blocks = store.read_chunk(&n.blocks?).ok()?;
                let expect = (size as usize).div_ceil(BLOCK_MAP_BLOCK);
                (blocks.len() == expect * 32).then_some((n, blocks))
            });
        let Some((node, blocks)) = usable else {
            let mut hr = HashingReader::new(member, false, None).with_block_map();
            let out = self.node(&mut hr, depth + 1, path)?;
            copy_rest(&mut hr, &mut |_| Ok(()))?;
            return Ok(out);
        };
        let mut sha = sha2::Sha256::new();
        let mut buf = vec![0u8; BLOCK_MAP_BLOCK];
        let mut i = 0usize;
        let mut read = 0u64;
        loop {
            let n = read_full(member, &mut buf)?;
            read += n as u64;
            if n == 0 && read == size {
                break;
            }
            // A member cut short (truncated input) differs from the stored
            // layer even when every block read so far matched.
            let same = n > 0
                && blocks
                    .get(i * 32..i * 32 + 32)
                    .is_some_and(|want| blake3::hash(&buf[..n]).as_bytes() == want);
            if !same {
                // Rebuild the i matching blocks from the store, then the
                // block in hand, then the rest of the member.
                let prefix = crate::extract::node_prefix_reader(
                    store.clone(),
                    candidate,
                    (i * BLOCK_MAP_BLOCK) as u64,
                );
                buf.truncate(n);
                let mut replay = prefix.chain(Cursor::new(buf)).chain(member);
                let mut hr = HashingReader::new(&mut replay, false, None).with_block_map();
                let out = self.node(&mut hr, depth + 1, path)?;
                copy_rest(&mut hr, &mut |_| Ok(()))?;
                return Ok(out);
            }
            sha.update(&buf[..n]);
            i += 1;
        }
        if sha256_hex(sha) != node.sha256 {
            return Err(Error::Corrupt(format!(
                "layer {}: every block matched stored node {candidate} but the SHA-256 did not; the store may be damaged (run `wharf verify --full`)",
                String::from_utf8_lossy(path)
            )));
        }
        Ok((candidate, node))
    }

    /// Stores everything `r` yields as one node; returns its id.
    fn node(&mut self, r: &mut HashingReader, depth: u32, _path: &[u8]) -> Result<(ChunkId, Node)> {
        let mut first = vec![0u8; BLOCK];
        let n = read_full(r, &mut first)?;
        first.truncate(n);
        let split = if depth == 0 {
            n == BLOCK && !tarhdr::is_zero_block(&first) && tarhdr::parse_header(&first).is_some()
        } else {
            tarhdr::looks_like_tar(&first)
        };
        let mut version = None;
        let body = if split && depth <= MAX_DEPTH {
            self.split_tar(first, r, depth)?
        } else if (1..=MAX_DEPTH).contains(&depth) && crate::gzip::is_gzip(&first) {
            self.gzip_or_raw(first, r, depth)?
        } else if (1..=MAX_DEPTH).contains(&depth) && crate::gzip::is_zstd(&first) {
            let body = self.zstd_or_raw(first, r, depth)?;
            if matches!(body, NodeBody::Gzip { .. }) {
                version = Some(crate::recipe::ZSTD_NODE_VERSION);
            }
            body
        } else {
            let mut data = DataStream::new(self.params);
            data.push(self.w, &first)?;
            copy_rest(r, &mut |b| data.push(self.w, b))?;
            NodeBody::Raw {
                data: data.finish(self.w)?,
            }
        };
        let blocks = match r.block_map.take() {
            Some(m) => Some(self.w.put(&m.finish())?),
            None => None,
        };
        let node = Node {
            wharf_node: version.unwrap_or_else(|| Node::version_for(&body)),
            len: r.len,
            sha256: r.sha256()?,
            blocks,
            body,
        };
        let id = self.w.put(&node.encode())?;
        Ok((id, node))
    }

    fn split_tar(&mut self, first: Vec<u8>, r: &mut HashingReader, depth: u32) -> Result<NodeBody> {
        let w = self.w;
        let mut skel = SkeletonWriter::new();
        let mut skel_stream = DataStream::new(self.params);
        let mut data = DataStream::new(self.params);
        let mut children: Vec<ChunkId> = Vec::new();
        let mut block = first;
        let mut pax = tarhdr::PaxOverrides::default();
        let mut long_name: Option<Vec<u8>> = None;
        let mut buf = vec![0u8; READ_BUF];
        loop {
            skel_stream.push(w, &skel.drain())?;
            let header = if block.len() == BLOCK && !tarhdr::is_zero_block(&block) {
                tarhdr::parse_header(&block)
            } else {
                None
            };
            let Some(h) = header else {
                // End of archive, or the first thing that is not a header we
                // can walk past: everything from here on is plain data.
                data.push(w, &block)?;
                skel.data(block.len() as u64);
                copy_rest(r, &mut |b| {
                    skel.data(b.len() as u64);
                    data.push(w, b)
                })?;
                break;
            };
            skel.literal(&block);
            if h.gnu_sparse_extended {
                loop {
                    let mut ext = vec![0u8; BLOCK];
                    let n = read_full(r, &mut ext)?;
                    skel.literal(&ext[..n]);
                    if n < BLOCK || ext[504] == 0 {
                        break;
                    }
                }
            }
            let size = match h.kind {
                EntryKind::HeaderOnly => 0,
                EntryKind::Meta => h.size,
                EntryKind::Content => pax.size.take().unwrap_or(h.size),
            };
            let path = match h.kind {
                EntryKind::Meta => Vec::new(),
                _ => long_name
                    .take()
                    .or_else(|| pax.path.take())
                    .unwrap_or_else(|| h.path.clone()),
            };
            if h.kind != EntryKind::Meta {
                pax = tarhdr::PaxOverrides::default();
            }
            match h.kind {
                EntryKind::Meta if size <= META_MAX => {
                    let mut content = vec![0u8; size as usize];
                    let n = read_full(r, &mut content)?;
                    content.truncate(n);
                    skel.literal(&content);
                    match h.typeflag {
                        b'x' | b'X' => pax = tarhdr::parse_pax(&content),
                        b'L' => {
                            let end = content
                                .iter()
                                .position(|&c| c == 0)
                                .unwrap_or(content.len());
                            long_name = Some(content[..end].to_vec());
                        }
                        _ => {}
                    }
                }
                EntryKind::Meta | EntryKind::Content => {
                    let is_file = matches!(h.typeflag, b'0' | 0 | b'7');
                    let sniff_len = size.min(BLOCK as u64) as usize;
                    let mut sniff = vec![0u8; sniff_len];
                    let n = read_full(r, &mut sniff)?;
                    sniff.truncate(n);
                    let nested_tar = size >= 2 * BLOCK as u64 && tarhdr::looks_like_tar(&sniff);
                    let own_node = h.kind == EntryKind::Content
                        && is_file
                        && depth < MAX_DEPTH
                        && (nested_tar || (depth == 0 && size >= BLOB_NODE_MIN));
                    if own_node {
                        let rest = size - sniff.len() as u64;
                        let mut member = Cursor::new(sniff).chain((&mut *r).take(rest));
                        let candidate = if depth == 0 {
                            self.known.candidate(&path, size)
                        } else {
                            None
                        };
                        let (child, node) = match candidate {
                            Some(c) => self.reuse_or_ingest(c, &mut member, size, depth, &path)?,
                            None => {
                                let mut hr = HashingReader::new(&mut member, false, None);
                                if depth == 0 {
                                    hr = hr.with_block_map();
                                }
                                let out = self.node(&mut hr, depth + 1, &path)?;
                                // A child stops only at the end of its bytes.
                                copy_rest(&mut hr, &mut |_| Ok(()))?;
                                out
                            }
                        };
                        skel.child(children.len() as u64);
                        children.push(child);
                        if depth == 0 {
                            self.layers.push(LayerInfo {
                                path: String::from_utf8_lossy(&path).into_owned(),
                                len: node.len,
                                sha256: node.sha256.clone(),
                                node: child,
                                kind: node.kind().to_string(),
                                compression: self
                                    .compression
                                    .take()
                                    .or_else(|| self.known.compression.get(&child).cloned()),
                            });
                        }
                    } else {
                        data.push(w, &sniff)?;
                        skel.data(sniff.len() as u64);
                        let mut left = size - sniff.len() as u64;
                        while left > 0 {
                            let want = left.min(buf.len() as u64) as usize;
                            let n = read_full(r, &mut buf[..want])?;
                            if n == 0 {
                                break;
                            }
                            data.push(w, &buf[..n])?;
                            skel.data(n as u64);
                            left -= n as u64;
                        }
                    }
                }
                EntryKind::HeaderOnly => {}
            }
            let pad = tarhdr::padding(size) as usize;
            if pad > 0 {
                let mut p = vec![0u8; pad];
                let n = read_full(r, &mut p)?;
                skel.literal(&p[..n]);
            }
            let mut next = vec![0u8; BLOCK];
            let n = read_full(r, &mut next)?;
            next.truncate(n);
            block = next;
        }
        skel_stream.push(w, &skel.finish())?;
        Ok(NodeBody::Tar {
            skeleton: skel_stream.finish(w)?,
            data: data.finish(w)?,
            children,
        })
    }
}

fn copy_rest(r: &mut dyn Read, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        f(&buf[..n])?;
    }
}

impl Ingester<'_> {
    /// A member that starts with gzip magic: stored by its plaintext plus
    /// reconstruction data when the compressed bytes rebuild exactly from
    /// what is stored, else as plain chunks (the body `node` would give it
    /// anyway). The member is spooled to the scratch directory, since the
    /// input cannot be read twice.
    fn gzip_or_raw(
        &mut self,
        first: Vec<u8>,
        r: &mut HashingReader,
        depth: u32,
    ) -> Result<NodeBody> {
        use crate::gzip;
        let scratch = self.w.store().backend().scratch_dir().to_path_buf();
        let (spool, spool_file) = crate::backend::ScratchFile::create(&scratch, "gzip")?;
        let (recon, recon_file) = crate::backend::ScratchFile::create(&scratch, "gzip-recon")?;
        let mut spool_w = std::io::BufWriter::with_capacity(1 << 20, spool_file);
        let mut recon_w = std::io::BufWriter::with_capacity(1 << 20, recon_file);
        let mut input = Cursor::new(first).chain(&mut *r);
        let analysis = gzip::analyze(&mut input, &mut spool_w, &mut recon_w, self.gzip_max_chain)?;
        std::io::Write::flush(&mut spool_w).map_err(Error::Stream)?;
        std::io::Write::flush(&mut recon_w).map_err(Error::Stream)?;
        drop((spool_w, recon_w));
        let reason = match analysis.outcome {
            Err(reason) => reason,
            Ok(plan) => match self.gzip_plain(&spool.path, &recon.path, &plan, r, depth)? {
                Ok(body) => {
                    if depth == 1 {
                        self.compression = Some(Compression {
                            format: "gzip".into(),
                            method: "preflate".into(),
                            recon_len: Some(plan.recon_len),
                            plain_len: Some(plan.plain_len),
                            members: Some(plan.deflate.len() as u64),
                            params: None,
                            reason: None,
                            max_chain: None,
                        });
                    }
                    return Ok(body);
                }
                Err(reason) => reason,
            },
        };
        self.raw_from_spool(&spool.path, "gzip", &reason, depth)
    }

    /// The fallback for a compressed member: exactly the raw node it would
    /// have been, its bytes read back from the spool, and why (at depth 1,
    /// where `info` shows it).
    fn raw_from_spool(
        &mut self,
        spool: &std::path::Path,
        format: &str,
        reason: &str,
        depth: u32,
    ) -> Result<NodeBody> {
        let mut data = DataStream::new(self.params);
        let mut f = std::fs::File::open(spool).map_err(Error::Stream)?;
        copy_rest(&mut f, &mut |b| data.push(self.w, b))?;
        if depth == 1 {
            let mut c = Compression::raw(format, reason);
            if format == "gzip" {
                c.max_chain = Some(self.gzip_max_chain);
            }
            self.compression = Some(c);
        }
        Ok(NodeBody::Raw {
            data: data.finish(self.w)?,
        })
    }

    /// Pass two: stores the plaintext as a node (split like any layer),
    /// rebuilding the compressed bytes from it and the reconstruction stream
    /// as it goes; keeps the result only if they match the member exactly.
    fn gzip_plain(
        &mut self,
        spool: &std::path::Path,
        recon: &std::path::Path,
        plan: &crate::gzip::Plan,
        r: &mut HashingReader,
        depth: u32,
    ) -> Result<std::result::Result<NodeBody, String>> {
        // Checked first as extract will rebuild it fastest, its pieces in
        // parallel; where that differs, one piece after another (the
        // plaintext is then walked twice; its chunks are stored once).
        let mut why = String::new();
        let modes: &[bool] = if plan.zstd { &[false] } else { &[true, false] };
        for &independent in modes {
            let plain_id = match self.gzip_check(spool, plan, recon, r, depth, independent)? {
                Ok(id) => id,
                Err(w) => {
                    why = w;
                    continue;
                }
            };
            {
                let mut stream = DataStream::new(self.params);
                let mut f = std::fs::File::open(recon).map_err(Error::Stream)?;
                copy_rest(&mut f, &mut |b| stream.push(self.w, b))?;
                return Ok(Ok(NodeBody::Gzip {
                    plain: plain_id,
                    recon: stream.finish(self.w)?,
                    independent,
                }));
            }
        }
        Ok(Err(why))
    }

    /// Stores the plaintext of a compressed member and rebuilds the member
    /// from it and the reconstruction stream; the plaintext's node if the
    /// rebuilt bytes are the original's.
    fn gzip_check(
        &mut self,
        spool: &std::path::Path,
        plan: &crate::gzip::Plan,
        recon: &std::path::Path,
        r: &mut HashingReader,
        depth: u32,
        independent: bool,
    ) -> Result<std::result::Result<ChunkId, String>> {
        let mut plain = crate::gzip::PlainReader::new(spool, recon, plan, independent)?;
        let mut hr = HashingReader::new(&mut plain, false, None);
        let stored = self
            .node(&mut hr, depth + 1, b"")
            .and_then(|out| copy_rest(&mut hr, &mut |_| Ok(())).map(|_| out));
        drop(hr);
        let (plain_id, plain_node) = match (stored, plain.failure.take()) {
            (_, Some(why)) => return Ok(Err(format!("rebuilding the gzip bytes failed: {why}"))),
            (Err(e), None) => return Err(e),
            (Ok(out), None) => out,
        };
        let (len, sha) = plain.rebuilt()?;
        #[cfg(test)]
        let sha = if independent && tests::SPOIL_INDEPENDENT_CHECK.with(|s| s.get()) {
            format!("spoiled {sha}")
        } else {
            sha
        };
        if len != r.len || sha != r.sha256()? || plain_node.len != plan.plain_len {
            return Ok(Err(format!(
                "the bytes rebuilt from the plaintext differ from the original ({len} bytes, sha256 {sha})"
            )));
        }
        Ok(Ok(plain_id))
    }
}

impl Ingester<'_> {
    /// A member that starts with zstd magic: stored by its plaintext plus
    /// the parameters that recompress each frame to its exact bytes, when
    /// libzstd made it with parameters wharf finds (`crate::zstdlayer`),
    /// else as plain chunks. Spooled first, since the input cannot be read
    /// twice and detection reads the frames several times.
    fn zstd_or_raw(
        &mut self,
        first: Vec<u8>,
        r: &mut HashingReader,
        depth: u32,
    ) -> Result<NodeBody> {
        use crate::backend::ScratchFile;
        let scratch = self.w.store().backend().scratch_dir().to_path_buf();
        let (spool, spool_file) = ScratchFile::create(&scratch, "zstd")?;
        let mut spool_w = std::io::BufWriter::with_capacity(1 << 20, spool_file);
        std::io::Write::write_all(&mut spool_w, &first).map_err(Error::Stream)?;
        copy_rest(r, &mut |b| {
            std::io::Write::write_all(&mut spool_w, b).map_err(Error::Stream)
        })?;
        std::io::Write::flush(&mut spool_w).map_err(Error::Stream)?;
        drop(spool_w);
        let reason = match crate::zstdlayer::analyze(&spool.path, r.len)? {
            Err(reason) => reason,
            Ok(zplan) => {
                let (recon, recon_file) = ScratchFile::create(&scratch, "zstd-recon")?;
                let mut recon_w = std::io::BufWriter::with_capacity(1 << 20, recon_file);
                let recon_len = write_zstd_recon(&spool.path, &zplan, r.len, &mut recon_w)?;
                std::io::Write::flush(&mut recon_w).map_err(Error::Stream)?;
                drop(recon_w);
                let plan = crate::gzip::Plan {
                    deflate: zplan.frames.iter().map(|(f, _)| (f.off, f.len)).collect(),
                    zstd: true,
                    recon_len,
                    plain_len: zplan.plain_len,
                    tail_len: zplan.tail_len,
                };
                match self.gzip_plain(&spool.path, &recon.path, &plan, r, depth)? {
                    Ok(body) => {
                        if depth == 1 {
                            self.compression = Some(Compression {
                                format: "zstd".into(),
                                method: "libzstd".into(),
                                recon_len: Some(recon_len),
                                plain_len: Some(plan.plain_len),
                                members: Some(plan.deflate.len() as u64),
                                params: Some(zplan.describe()),
                                reason: None,
                                max_chain: None,
                            });
                        }
                        return Ok(body);
                    }
                    Err(reason) => reason,
                }
            }
        };
        self.raw_from_spool(&spool.path, "zstd", &reason, depth)
    }
}

/// The reconstruction stream of a zstd member (spec/FORMAT.md §8.5): the
/// magic, one ZSTD record per frame, the bytes after the last frame as
/// literals. Returns its length.
fn write_zstd_recon(
    spool: &std::path::Path,
    zplan: &crate::zstdlayer::ZPlan,
    len: u64,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let mut w = crate::gzip::RecordWriter { out, len: 0 };
    w.put(crate::gzip::RECON_MAGIC)?;
    for (f, p) in &zplan.frames {
        w.put(&p.record(f.plain_len))?;
    }
    if zplan.tail_len > 0 {
        let mut f = std::fs::File::open(spool).map_err(Error::Stream)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len - zplan.tail_len))
            .map_err(Error::Stream)?;
        let mut buf = vec![0u8; crate::gzip::MAX_LIT];
        loop {
            let n = read_full(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            w.lit(&buf[..n])?;
        }
    }
    Ok(w.len)
}

#[cfg(test)]
mod tests {
    use crate::ingest::{add, AddOptions};
    use crate::recipe::NodeBody;
    use crate::store::{Store, StoreConfig};
    use crate::synth::TarWriter;
    use sha2::Digest;
    use std::cell::Cell;
    use std::io::Write;
    use std::sync::Arc;

    thread_local! {
        /// Makes the independent-pieces check of a gzip member see bytes
        /// that differ from the original, as a stream the check rejects
        /// would, so that the piece-by-piece fallback is taken.
        pub(super) static SPOIL_INDEPENDENT_CHECK: Cell<bool> = const { Cell::new(false) };
    }

    /// An OCI-like image whose one layer is a gzip member of several
    /// preflate pieces; the layer's gzip node says whether add recorded
    /// its pieces as independent.
    fn add_gzip_image(spoil: bool) -> (bool, Vec<u8>, Vec<u8>) {
        let mut layer = TarWriter::new(Vec::new());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..80 {
            // Compressible but not trivially so: words drawn from a xorshift stream.
            let mut body = Vec::new();
            while body.len() < 100_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.extend_from_slice(format!("w{:x} ", seed % 1_000_000).as_bytes());
            }
            layer
                .file(
                    &format!("usr/lib/pkg/mod{i}.py"),
                    0o644,
                    1_700_000_000,
                    &body,
                )
                .expect("tar");
        }
        layer.finish().expect("tar");
        let plain = layer.into_inner();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&plain).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert!(
            gz.len() > 2 << 20,
            "want several pieces, got {} bytes",
            gz.len()
        );
        let mut image = TarWriter::new(Vec::new());
        let name = format!("blobs/sha256/{}", hex::encode(sha2::Sha256::digest(&gz)));
        image.file(&name, 0o444, 0, &gz).expect("tar");
        image.file("manifest.json", 0o644, 0, b"[]").expect("tar");
        image.finish().expect("tar");
        let image = image.into_inner();

        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Arc::new(Store::init(&dir.path().join("s"), StoreConfig::default()).expect("init"));
        SPOIL_INDEPENDENT_CHECK.with(|s| s.set(spoil));
        let added = add(&store, &mut image.as_slice(), "img", &AddOptions::default());
        SPOIL_INDEPENDENT_CHECK.with(|s| s.set(false));
        added.expect("add");
        let r = store.require_ref("img").expect("ref");
        let recipe = crate::extract::load_recipe(&store, &r.recipe).expect("recipe");
        let layer = recipe.layers.first().expect("one layer").clone();
        let node = crate::extract::load_node(&store, &layer.node).expect("node");
        let independent = match node.body {
            NodeBody::Gzip { independent, .. } => independent,
            other => panic!("layer not stored by its plaintext: {other:?}"),
        };
        let out = crate::extract::extract_to_vec(&store, "img").expect("extract");
        (independent, image, out)
    }

    #[test]
    fn a_gzip_member_whose_independent_rebuild_differs_is_checked_piece_by_piece() {
        let (independent, image, out) = add_gzip_image(false);
        assert!(independent, "the independent check passes on zlib -6");
        assert!(out == image, "rebuilt image differs");

        let (independent, image, out) = add_gzip_image(true);
        assert!(
            !independent,
            "a failed independent check must not flag the node"
        );
        assert_eq!(out.len(), image.len());
        assert!(out == image, "rebuilt image differs after the fallback");
    }
}
