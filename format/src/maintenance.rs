//! `verify`, `gc` and the per-image figures of `ls` and `info`.

use crate::backend::ObjectKind;
use crate::error::{Error, Result};
use crate::extract::{load_node, load_recipe};
use crate::hash::ChunkId;
use crate::list::{ListReader, StreamRef};
use crate::pack::{self, IndexEntry, PackId, PackWriter};
use crate::recipe::{NodeBody, Recipe};
use crate::store::{decompress, Store};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Calls `visit(id, raw_len)` for every chunk an object tree uses: the
/// object itself, list pieces, data chunks, and children, each node once.
pub fn walk_node(
    store: &Store,
    id: &ChunkId,
    seen_nodes: &mut HashSet<ChunkId>,
    visit: &mut dyn FnMut(&ChunkId, u32),
) -> Result<()> {
    if !seen_nodes.insert(*id) {
        return Ok(());
    }
    let raw = store.read_chunk(id)?;
    visit(id, raw.len() as u32);
    let node = crate::recipe::Node::decode(&raw, id)?;
    if let Some(b) = &node.blocks {
        let len = store.lookup(b).map(|l| l.raw_len).unwrap_or(0);
        visit(b, len);
    }
    let stream = |s: &StreamRef, visit: &mut dyn FnMut(&ChunkId, u32)| -> Result<()> {
        let mut pieces = Vec::new();
        let mut data = Vec::new();
        ListReader::new(s, |c| store.read_chunk(c)).walk(|p| pieces.push(*p), |e| data.push(*e))?;
        for p in pieces {
            let len = store.lookup(&p).map(|l| l.raw_len).unwrap_or(0);
            visit(&p, len);
        }
        for e in data {
            visit(&e.0, e.1);
        }
        Ok(())
    };
    match &node.body {
        NodeBody::Raw { data } => stream(data, visit)?,
        NodeBody::Tar {
            skeleton,
            data,
            children,
        } => {
            stream(skeleton, visit)?;
            stream(data, visit)?;
            for c in children {
                walk_node(store, c, seen_nodes, visit)?;
            }
        }
        NodeBody::Gzip { plain, recon, .. } => {
            stream(recon, visit)?;
            walk_node(store, plain, seen_nodes, visit)?;
        }
    }
    Ok(())
}

/// Every chunk a recipe uses, the recipe object included.
pub fn walk_recipe(
    store: &Store,
    recipe_id: &ChunkId,
    visit: &mut dyn FnMut(&ChunkId, u32),
) -> Result<Recipe> {
    let raw = store.read_chunk(recipe_id)?;
    visit(recipe_id, raw.len() as u32);
    let recipe = Recipe::decode(&raw, recipe_id)?;
    walk_node(store, &recipe.root, &mut HashSet::new(), visit)?;
    Ok(recipe)
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub indexes: usize,
    pub packs: usize,
    pub chunks_checked: u64,
    pub names: usize,
    /// Problems that make the store wrong: corrupt or missing data.
    pub errors: Vec<String>,
    /// Things that are not wrong but worth knowing (leftovers gc removes).
    pub notes: Vec<String>,
}

/// Checks the store. Fast mode: index files (checksums, order), that every
/// indexed pack exists and is long enough, and that every name's recipe is
/// present and readable. Full mode adds: every chunk of every pack is
/// decompressed and re-hashed, and every recipe is resolved down to its
/// last chunk.
pub fn verify(store: &Store, full: bool) -> Result<VerifyReport> {
    // Shared: gc must not delete packs while they are being checked.
    let _lock = store.lock(false)?;
    store.reload_index()?;
    let mut rep = VerifyReport::default();
    let backend = store.backend();
    let files = store.index_files();
    rep.indexes = files.len();
    let mut pack_max: BTreeMap<PackId, u64> = BTreeMap::new();
    for f in &files {
        if let Err(e) = f.check() {
            rep.errors.push(e.to_string());
            continue;
        }
        for i in 0..f.len() {
            let e = f.entry(i);
            let p = f.packs()[e.pack_no as usize];
            let end = e.offset as u64 + e.stored_len as u64;
            let m = pack_max.entry(p).or_insert(0);
            *m = (*m).max(end);
        }
        for p in f.packs() {
            pack_max.entry(*p).or_insert(0);
        }
    }
    let on_disk: HashSet<String> = backend.list(ObjectKind::Pack)?.into_iter().collect();
    rep.packs = pack_max.len();
    for (p, end) in &pack_max {
        let name = p.name();
        if !on_disk.contains(&name) {
            rep.errors
                .push(format!("pack {name} is named by an index but missing"));
            continue;
        }
        let size = backend.size(ObjectKind::Pack, &name)?;
        if size < *end {
            rep.errors.push(format!(
                "pack {name} is {size} bytes, its index needs {end}: truncated"
            ));
        }
    }
    let orphans = on_disk
        .iter()
        .filter(|n| PackId::parse(n).is_none_or(|p| !pack_max.contains_key(&p)))
        .count();
    if orphans > 0 {
        rep.notes.push(format!(
            "{orphans} pack(s) are in no index (left by an interrupted add or gc); `wharf gc` removes them"
        ));
    }
    let mut corrupt: HashMap<ChunkId, String> = HashMap::new();
    if full {
        for p in pack_max.keys() {
            if !on_disk.contains(&p.name()) {
                continue;
            }
            let res = pack::scan_pack(backend, p, |e, stored| {
                rep.chunks_checked += 1;
                let ok = decompress(stored, e.raw_len as usize)
                    .map(|raw| raw.len() == e.raw_len as usize && ChunkId::of(&raw) == e.id)
                    .unwrap_or(false);
                if !ok {
                    corrupt.insert(e.id, p.name());
                }
                Ok(())
            });
            if let Err(e) = res {
                rep.errors.push(e.to_string());
            }
        }
    }
    let refs = store.list_refs()?;
    rep.names = refs.len();
    for (name, r) in &refs {
        if !full {
            if let Err(e) =
                load_recipe(store, &r.recipe).and_then(|rec| load_node(store, &rec.root))
            {
                rep.errors.push(format!("image {name:?}: {e}"));
            }
            continue;
        }
        let mut bad = Vec::new();
        let res = walk_recipe(store, &r.recipe, &mut |id, _| {
            if let Some(p) = corrupt.get(id) {
                bad.push(format!("image {name:?}: chunk {id} in pack {p} is corrupt"));
            } else if !store.contains(id) {
                bad.push(format!("image {name:?}: chunk {id} is missing"));
            }
        });
        rep.errors.extend(bad);
        if let Err(e) = res {
            rep.errors.push(format!("image {name:?}: {e}"));
        }
    }
    if full {
        for (id, p) in &corrupt {
            let msg = format!("chunk {id} in pack {p}");
            if !rep.errors.iter().any(|e| e.contains(&id.to_hex())) {
                rep.errors
                    .push(format!("{msg} is corrupt (used by no image)"));
            }
        }
    }
    Ok(rep)
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub live_chunks: u64,
    pub packs_before: usize,
    pub packs_deleted: usize,
    pub packs_rewritten: usize,
    pub bytes_freed: u64,
    pub temp_files_removed: usize,
    /// Packs left alone because they are younger than the grace period.
    pub packs_too_young: usize,
    /// Names of the packs deleted (or, on a dry run, that would be) and of
    /// those whose live chunks are copied into new packs first.
    pub deleted: Vec<String>,
    pub rewritten: Vec<String>,
    pub grace_secs: u64,
}

/// Packs with at most this fraction of live bytes are rewritten; others are
/// kept whole (rewriting a mostly-live pack costs more I/O than it frees).
const REPACK_LIVE_FRACTION: f64 = 0.8;

/// Frees what no name references. Crash-safe by ordering: new packs and the
/// new index are published before any old index or pack is deleted, so at
/// every instant each live chunk is reachable through some index.
///
/// Packs younger than `grace` (default: the backend's, see
/// [`Backend::default_gc_grace`](crate::backend::Backend::default_gc_grace))
/// are neither deleted nor rewritten, and every chunk in them counts as live:
/// on a shared object store a writer may have uploaded them and not yet the
/// index or the name that makes them reachable.
pub fn gc(store: &Store, dry_run: bool) -> Result<GcReport> {
    gc_with_grace(store, dry_run, None)
}

pub fn gc_with_grace(
    store: &Store,
    dry_run: bool,
    grace: Option<std::time::Duration>,
) -> Result<GcReport> {
    let _lock = store.lock(true)?;
    store.reload_index()?;
    let backend = store.backend();
    let grace = grace.unwrap_or_else(|| backend.default_gc_grace());
    let mut rep = GcReport {
        dry_run,
        grace_secs: grace.as_secs(),
        ..Default::default()
    };
    let on_disk: Vec<String> = backend.list(ObjectKind::Pack)?;
    let mut young: HashSet<String> = HashSet::new();
    if !grace.is_zero() {
        let now = std::time::SystemTime::now();
        for n in &on_disk {
            // A pack whose age cannot be told is treated as young: gc errs
            // on the side of keeping.
            let is_young = match backend.modified(ObjectKind::Pack, n)? {
                Some(t) => now.duration_since(t).map(|a| a < grace).unwrap_or(true),
                None => true,
            };
            if is_young {
                young.insert(n.clone());
            }
        }
    }
    let mut live: HashSet<ChunkId> = HashSet::new();
    for (name, r) in store.list_refs()? {
        walk_recipe(store, &r.recipe, &mut |id, _| {
            live.insert(*id);
        })
        .map_err(|e| Error::Corrupt(format!("gc stopped, nothing deleted: image {name:?}: {e}")))?;
    }
    rep.live_chunks = live.len() as u64;
    let files = store.index_files();
    for f in &files {
        f.check()
            .map_err(|e| Error::Corrupt(format!("gc stopped, nothing deleted: {e}")))?;
    }
    // Per pack: live and total stored bytes, and the live entries.
    let mut packs: BTreeMap<PackId, (u64, u64, Vec<IndexEntry>)> = BTreeMap::new();
    let mut placed: HashSet<ChunkId> = HashSet::new();
    for f in &files {
        for i in 0..f.len() {
            let e = f.entry(i);
            let p = f.packs()[e.pack_no as usize];
            let slot = packs.entry(p).or_default();
            let bytes = e.stored_len as u64 + pack::PACK_ENTRY_HEADER_LEN;
            slot.1 += bytes;
            let keep_all = !young.is_empty() && young.contains(&p.name());
            if (keep_all || live.contains(&e.id)) && placed.insert(e.id) {
                slot.0 += bytes;
                slot.2.push(e);
            }
        }
        for p in f.packs() {
            packs.entry(*p).or_default();
        }
    }
    rep.packs_before = packs.len();
    let orphans: Vec<String> = on_disk
        .iter()
        .filter(|n| PackId::parse(n).is_none_or(|p| !packs.contains_key(&p)))
        .filter(|n| !young.contains(*n))
        .cloned()
        .collect();
    let mut keep: Vec<(PackId, Vec<IndexEntry>)> = Vec::new();
    let mut rewrite: Vec<(PackId, Vec<IndexEntry>)> = Vec::new();
    let mut drop_packs: Vec<PackId> = Vec::new();
    rep.packs_too_young = young.len();
    for (p, (live_b, total_b, entries)) in packs {
        if young.contains(&p.name()) {
            if !entries.is_empty() {
                keep.push((p, entries));
            }
        } else if entries.is_empty() {
            drop_packs.push(p);
            rep.bytes_freed += total_b;
        } else if (live_b as f64) <= REPACK_LIVE_FRACTION * total_b as f64 {
            rep.bytes_freed += total_b - live_b;
            rewrite.push((p, entries));
        } else {
            keep.push((p, entries));
        }
    }
    for o in &orphans {
        rep.bytes_freed += backend.size(ObjectKind::Pack, o).unwrap_or(0);
    }
    rep.packs_deleted = drop_packs.len() + orphans.len();
    rep.packs_rewritten = rewrite.len();
    rep.deleted = drop_packs
        .iter()
        .map(|p| p.name())
        .chain(orphans.iter().cloned())
        .collect();
    rep.rewritten = rewrite.iter().map(|(p, _)| p.name()).collect();
    // Leftovers of interrupted writers. Safe to delete: gc holds the
    // exclusive lock, so no writer is running.
    let tmp_files = backend.leftovers();
    rep.temp_files_removed = tmp_files.len();
    let nothing_to_do = drop_packs.is_empty() && rewrite.is_empty() && orphans.is_empty();
    if dry_run || (nothing_to_do && files.len() <= 1) {
        if !dry_run {
            for t in tmp_files {
                let _ = std::fs::remove_file(t);
            }
        }
        return Ok(rep);
    }
    // Copy live chunks of sparse packs into new packs, compressed bytes as they are.
    let mut new_packs: Vec<(PackId, Vec<IndexEntry>)> = Vec::new();
    let mut own_indexes: Vec<String> = Vec::new();
    let mut w: Option<PackWriter> = None;
    for (p, entries) in &rewrite {
        for e in entries {
            let loc = pack::Location {
                pack: *p,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
            };
            let stored = pack::read_stored(backend, &e.id, &loc)?;
            // Never carry a damaged chunk into a new pack silently.
            let intact = decompress(&stored, e.raw_len as usize)
                .map(|raw| ChunkId::of(&raw) == e.id)
                .unwrap_or(false);
            if !intact {
                return Err(Error::Corrupt(format!(
                    "gc stopped before deleting anything: chunk {} in pack {} is corrupt (see `wharf verify --full`)",
                    e.id,
                    p.name()
                )));
            }
            let pw = match w.as_mut() {
                Some(pw) => pw,
                None => w.insert(PackWriter::create(backend.scratch_dir())?),
            };
            pw.append(e.id, e.raw_len, &stored)?;
            if pw.len() >= store.config.pack_target {
                if let Some(full) = w.take() {
                    new_packs.push(publish_pack_only(full, backend, &mut own_indexes)?);
                }
            }
        }
    }
    if let Some(pw) = w.take() {
        if pw.is_empty() {
            pw.abandon();
        } else {
            new_packs.push(publish_pack_only(pw, backend, &mut own_indexes)?);
        }
    }
    // One index over every surviving pack.
    let mut all: Vec<(PackId, Vec<IndexEntry>)> = keep;
    all.extend(new_packs);
    let pack_list: Vec<PackId> = all.iter().map(|(p, _)| *p).collect();
    let mut entries: Vec<IndexEntry> = Vec::new();
    for (no, (_, es)) in all.into_iter().enumerate() {
        for mut e in es {
            e.pack_no = no as u32;
            entries.push(e);
        }
    }
    entries.sort_by_key(|e| e.id);
    entries.dedup_by(|a, b| a.id == b.id);
    let new_index = pack::write_index(backend, &pack_list, entries.into_iter().map(Ok))?;
    let old_indexes = files.iter().map(|f| f.name.clone()).chain(own_indexes);
    for name in old_indexes {
        if name != new_index {
            backend.delete(ObjectKind::Index, &name)?;
        }
    }
    for p in drop_packs.iter().chain(rewrite.iter().map(|(p, _)| p)) {
        backend.delete(ObjectKind::Pack, &p.name())?;
    }
    for o in &orphans {
        backend.delete(ObjectKind::Pack, o)?;
    }
    for t in tmp_files {
        let _ = std::fs::remove_file(t);
    }
    store.reload_index()?;
    Ok(rep)
}

/// Publishes a pack written by gc; its entries go into gc's merged index
/// instead of an index of their own.
/// The pack's own index (written by `finish`) is noted in `own_indexes` and
/// removed once the merged index is published.
fn publish_pack_only(
    pw: PackWriter,
    backend: &dyn crate::backend::Backend,
    own_indexes: &mut Vec<String>,
) -> Result<(PackId, Vec<IndexEntry>)> {
    let entries = pw.entries().to_vec();
    let (id, idx) = pw.finish(backend)?;
    own_indexes.push(idx);
    Ok((id, entries))
}

#[derive(Debug, Serialize, Clone)]
pub struct ImageStats {
    pub name: String,
    pub len: u64,
    pub added: u64,
    /// Uncompressed bytes of distinct chunks this image uses.
    pub chunk_bytes: u64,
    /// Uncompressed bytes of chunks no other image uses: what `rm` + `gc` frees.
    pub unique_bytes: u64,
    pub layers: usize,
}

/// Figures for `ls`: per image, its distinct and unique chunk bytes.
pub fn image_stats(store: &Store) -> Result<Vec<ImageStats>> {
    let refs = store.list_refs()?;
    let mut owners: HashMap<ChunkId, (u32, usize, u32)> = HashMap::new(); // raw_len, first owner, owner count
    let mut recipes = Vec::new();
    for (i, (name, r)) in refs.iter().enumerate() {
        let mut mine: HashSet<ChunkId> = HashSet::new();
        let rec = walk_recipe(store, &r.recipe, &mut |id, len| {
            if mine.insert(*id) {
                let o = owners.entry(*id).or_insert((len, i, 0));
                o.2 += 1;
            }
        })
        .map_err(|e| Error::Corrupt(format!("image {name:?}: {e}")))?;
        recipes.push(rec);
    }
    let mut out: Vec<ImageStats> = refs
        .iter()
        .zip(&recipes)
        .map(|((name, r), rec)| ImageStats {
            name: name.clone(),
            len: r.len,
            added: r.added,
            chunk_bytes: 0,
            unique_bytes: 0,
            layers: rec.layers.len(),
        })
        .collect();
    for (len, first, count) in owners.values() {
        if *count == 1 {
            out[*first].unique_bytes += *len as u64;
        }
    }
    // Distinct bytes per image need a second pass per image; cheap next to the walk.
    for (i, (_, r)) in refs.iter().enumerate() {
        let mut mine: HashSet<ChunkId> = HashSet::new();
        let mut total = 0u64;
        walk_recipe(store, &r.recipe, &mut |id, len| {
            if mine.insert(*id) {
                total += len as u64;
            }
        })?;
        out[i].chunk_bytes = total;
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub path: String,
    pub kind: String,
    pub len: u64,
    pub sha256: String,
    pub node: ChunkId,
    /// Other images holding this very layer.
    pub same_layer_in: Vec<String>,
    /// Uncompressed chunk bytes of this layer also used by other images.
    pub shared_bytes: u64,
    pub chunk_bytes: u64,
    /// For a compressed layer: stored decompressed ("preflate", with the
    /// bytes of reconstruction data) or as it is ("raw", and why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::recipe::Compression>,
}

#[derive(Debug, Serialize)]
pub struct InfoReport {
    pub name: String,
    pub recipe: ChunkId,
    pub len: u64,
    pub sha256: String,
    pub blake3: String,
    pub added: u64,
    pub layers: Vec<LayerReport>,
}

pub fn info(store: &Store, name: &str) -> Result<InfoReport> {
    let r = store.require_ref(name)?;
    let recipe = load_recipe(store, &r.recipe)?;
    // Chunks and layer nodes of every other image.
    let mut others: HashSet<ChunkId> = HashSet::new();
    let mut layer_owners: HashMap<ChunkId, Vec<String>> = HashMap::new();
    for (other, orf) in store.list_refs()? {
        if other == name {
            continue;
        }
        let rec = walk_recipe(store, &orf.recipe, &mut |id, _| {
            others.insert(*id);
        })?;
        for l in rec.layers {
            layer_owners.entry(l.node).or_default().push(other.clone());
        }
    }
    let mut layers = Vec::new();
    for l in &recipe.layers {
        let mut shared = 0u64;
        let mut total = 0u64;
        let mut seen = HashSet::new();
        walk_node(store, &l.node, &mut HashSet::new(), &mut |id, len| {
            if seen.insert(*id) {
                total += len as u64;
                if others.contains(id) {
                    shared += len as u64;
                }
            }
        })?;
        let mut same = layer_owners.get(&l.node).cloned().unwrap_or_default();
        same.dedup();
        layers.push(LayerReport {
            path: l.path.clone(),
            kind: l.kind.clone(),
            len: l.len,
            sha256: l.sha256.clone(),
            node: l.node,
            same_layer_in: same,
            shared_bytes: shared,
            chunk_bytes: total,
            compression: l.compression.clone(),
        });
    }
    Ok(InfoReport {
        name: name.to_string(),
        recipe: r.recipe,
        len: recipe.len,
        sha256: recipe.sha256,
        blake3: recipe.blake3,
        added: r.added,
        layers,
    })
}
