//! Which chunks an image consists of, and which of them a store lacks.

use crate::send::{encode_units, Unit};
use crate::Result;
use rayon::prelude::*;
use std::collections::HashMap;
use std::collections::HashSet;
use wharf_format::delta::SentIndex;
use wharf_format::extract::load_recipe;
use wharf_format::list::{ListReader, StreamRef};
use wharf_format::recipe::{Node, NodeBody};
use wharf_format::similar::DeltaPlanner;
use wharf_format::{ChunkId, Store};

/// Every chunk id the image `recipe` uses (recipe, nodes, block maps, list
/// pieces, data), each once, in tree order, skipping the subtrees of nodes
/// in `skip`.
///
/// Only nodes are remembered while walking (a node shared by two layers is
/// walked once); the other chunks are gathered with their repeats and
/// deduplicated at the end by sorting, each kept where it first occurs: a
/// hash set of every chunk of a multi-GB image costs about 100 bytes a
/// chunk, this 36 while it sorts and 32 after.
pub fn image_chunks(
    store: &Store,
    recipe: &ChunkId,
    skip: &HashSet<ChunkId>,
) -> Result<Vec<ChunkId>> {
    let mut out = Vec::new();
    walk_ids(store, recipe, skip, &mut |id| out.push(id))?;
    dedup_keep_first(&mut out)?;
    Ok(out)
}

/// Like [`image_chunks`], but only the chunks not in `known` are listed
/// (those of the base images a receiver holds, which a push never asks
/// about): the list of a new version is then its changes, not the whole
/// image. Also returns how many distinct chunks the walk met in all, the
/// known ones counted in a bitmap over `known` (a bit each).
pub fn image_chunks_beyond(
    store: &Store,
    recipe: &ChunkId,
    skip: &HashSet<ChunkId>,
    known: &IdSet,
) -> Result<(Vec<ChunkId>, u64)> {
    let mut met = vec![0u64; known.len().div_ceil(64)];
    let mut out = Vec::new();
    walk_ids(store, recipe, skip, &mut |id| match known.position(&id) {
        Some(i) => met[i / 64] |= 1 << (i % 64),
        None => out.push(id),
    })?;
    dedup_keep_first(&mut out)?;
    let total = out.len() as u64 + met.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    Ok((out, total))
}

/// Calls `emit` with every chunk id of image `recipe` in tree order, repeats
/// included, skipping the subtrees of nodes in `skip`.
fn walk_ids(
    store: &Store,
    recipe: &ChunkId,
    skip: &HashSet<ChunkId>,
    emit: &mut dyn FnMut(ChunkId),
) -> Result<()> {
    let rec = load_recipe(store, recipe)?;
    let mut nodes_seen: HashSet<ChunkId> = skip.clone();
    emit(*recipe);
    let mut nodes = vec![rec.root];
    while let Some(n) = nodes.pop() {
        if !nodes_seen.insert(n) {
            continue;
        }
        emit(n);
        let node = Node::decode(&store.read_chunk(&n)?, &n)?;
        if let Some(b) = node.blocks {
            emit(b);
        }
        let (children, streams) = node_parts(&node);
        nodes.extend(children.iter().rev().copied());
        for s in streams {
            let emit = std::cell::RefCell::new(&mut *emit);
            ListReader::new(&s, |c| store.read_chunk(c))
                .walk(|p| (emit.borrow_mut())(*p), |e| (emit.borrow_mut())(e.0))?;
        }
    }
    Ok(())
}

/// Removes every repeat from `ids`, keeping each id where it first occurs.
fn dedup_keep_first(ids: &mut Vec<ChunkId>) -> Result<()> {
    let n = u32::try_from(ids.len()).map_err(|_| {
        crate::Error::Protocol(format!("an image of {} chunks is too large", ids.len()))
    })?;
    let mut order: Vec<u32> = (0..n).collect();
    order.par_sort_unstable_by(|&a, &b| ids[a as usize].cmp(&ids[b as usize]).then(a.cmp(&b)));
    let mut repeat = vec![false; ids.len()];
    for w in order.windows(2) {
        if ids[w[0] as usize] == ids[w[1] as usize] {
            repeat[w[1] as usize] = true;
        }
    }
    drop(order);
    let mut at = 0;
    ids.retain(|_| {
        at += 1;
        !repeat[at - 1]
    });
    ids.shrink_to_fit();
    Ok(())
}

/// Appends to `out` every chunk below `node` (itself, block maps, list
/// pieces, data, children) that is not in `seen`, adding each to `seen`:
/// nodes in `seen` beforehand are skipped with their whole subtree.
fn subtree_chunks(
    store: &Store,
    node: &ChunkId,
    seen: &mut HashSet<ChunkId>,
    out: &mut Vec<ChunkId>,
) -> Result<()> {
    let mut nodes = vec![*node];
    while let Some(n) = nodes.pop() {
        if !seen.insert(n) {
            continue;
        }
        out.push(n);
        let node = Node::decode(&store.read_chunk(&n)?, &n)?;
        if let Some(b) = node.blocks {
            if seen.insert(b) {
                out.push(b);
            }
        }
        let (children, streams) = node_parts(&node);
        nodes.extend(children.iter().rev().copied());
        for s in streams {
            let ids = std::cell::RefCell::new(Vec::new());
            ListReader::new(&s, |c| store.read_chunk(c)).walk(
                |p| ids.borrow_mut().push(*p),
                |e| ids.borrow_mut().push(e.0),
            )?;
            for id in ids.into_inner() {
                if seen.insert(id) {
                    out.push(id);
                }
            }
        }
    }
    Ok(())
}

/// The child nodes and chunk streams below a node. Every node kind must be
/// listed here, or transfers would leave part of an image behind.
fn node_parts(node: &Node) -> (Vec<ChunkId>, Vec<StreamRef>) {
    match &node.body {
        NodeBody::Raw { data } => (vec![], vec![data.clone()]),
        NodeBody::Tar {
            skeleton,
            data,
            children,
        } => (children.clone(), vec![skeleton.clone(), data.clone()]),
        NodeBody::Gzip { plain, recon, .. } => (vec![*plain], vec![recon.clone()]),
    }
}

/// Chunk ids held as a sorted list, for sets as large as an image: 32 bytes
/// an id, where a hash set costs about three times that (a 40 GB image has
/// some two million chunks).
#[derive(Default)]
pub struct IdSet(Vec<ChunkId>);

impl IdSet {
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.0.binary_search(id).is_ok()
    }

    /// Where `id` is in the sorted list, if it is there.
    pub fn position(&self, id: &ChunkId) -> Option<usize> {
        self.0.binary_search(id).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Every chunk of the images `recipes`: what a receiver holding them whole
/// need not be asked about. Only nodes are remembered while walking (a node
/// shared by two images is walked once); chunks are collected with their
/// repeats and deduplicated by sorting, so no per-chunk hash set is built.
pub fn closure_of(store: &Store, recipes: &[ChunkId]) -> Result<IdSet> {
    let mut seen_nodes: HashSet<ChunkId> = HashSet::new();
    let mut out: Vec<ChunkId> = Vec::new();
    for r in recipes {
        let rec = load_recipe(store, r)?;
        out.push(*r);
        let mut nodes = vec![rec.root];
        while let Some(n) = nodes.pop() {
            if !seen_nodes.insert(n) {
                continue;
            }
            out.push(n);
            let node = Node::decode(&store.read_chunk(&n)?, &n)?;
            out.extend(node.blocks);
            let (children, streams) = node_parts(&node);
            nodes.extend(children);
            for s in streams {
                let ids = std::cell::RefCell::new(&mut out);
                ListReader::new(&s, |c| store.read_chunk(c)).walk(
                    |p| ids.borrow_mut().push(*p),
                    |e| ids.borrow_mut().push(e.0),
                )?;
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out.shrink_to_fit();
    Ok(IdSet(out))
}

/// Layer nodes of published images: complete by construction, since a
/// name is only set once everything below it is present.
pub fn complete_layers(store: &Store) -> Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    // From the tree PUBLISH checked (the root's children), not from the
    // recipe's `layers` list, which nothing ties to the tree for a recipe
    // that arrived from elsewhere.
    for (_, r) in store.list_refs()? {
        let Ok(rec) = load_recipe(store, &r.recipe) else {
            continue;
        };
        let Ok(root) = store
            .read_chunk(&rec.root)
            .and_then(|b| Node::decode(&b, &rec.root))
        else {
            continue;
        };
        out.insert(rec.root);
        let (children, _) = node_parts(&root);
        out.extend(children);
    }
    Ok(out)
}

/// The chunks of `recipe` the store lacks, each once. Objects needed to
/// walk the tree (recipe, nodes, list pieces) that are missing are reported
/// and their subtree cannot be walked: the caller fetches them and asks again.
pub fn missing(store: &Store, recipe: &ChunkId) -> Result<Vec<ChunkId>> {
    let mut all = missing_with_repeats(store, recipe, true)?;
    let mut seen = HashSet::new();
    all.retain(|id| seen.insert(*id));
    Ok(all)
}

/// Like [`missing`], but only the objects needed to walk the tree (recipe,
/// nodes, block maps, list pieces), not the content they describe: what a
/// pull's dry run fetches to tell what the pull would.
pub fn missing_objects(store: &Store, recipe: &ChunkId) -> Result<Vec<ChunkId>> {
    let mut all = missing_with_repeats(store, recipe, false)?;
    let mut seen = HashSet::new();
    all.retain(|id| seen.insert(*id));
    Ok(all)
}

fn missing_with_repeats(store: &Store, recipe: &ChunkId, leaves: bool) -> Result<Vec<ChunkId>> {
    if !store.contains(recipe) {
        return Ok(vec![*recipe]);
    }
    let mut out = Vec::new();
    let rec = load_recipe(store, recipe)?;
    let mut nodes = vec![rec.root];
    let mut seen = HashSet::new();
    while let Some(n) = nodes.pop() {
        if !seen.insert(n) {
            continue;
        }
        if !store.contains(&n) {
            out.push(n);
            continue;
        }
        let node = Node::decode(&store.read_chunk(&n)?, &n)?;
        if let Some(b) = node.blocks {
            if !store.contains(&b) {
                out.push(b);
            }
        }
        let (children, streams) = node_parts(&node);
        nodes.extend(children);
        for s in streams {
            missing_in_stream(store, &s, leaves, &mut out)?;
        }
    }
    Ok(out)
}

fn missing_in_stream(
    store: &Store,
    s: &StreamRef,
    leaves: bool,
    out: &mut Vec<ChunkId>,
) -> Result<()> {
    // Walk level by level so a missing piece is reported instead of failing.
    // Each level keeps every id once: a hostile tree that repeats one piece
    // thousands of times at every level costs one visit, not their product.
    // The leaves, the largest level by far, are never gathered: each leaf
    // piece's entries are looked up as it is read and only the missing
    // ones kept, so memory follows the pieces (1/256 of the chunks), not
    // the chunks of a multi-GB layer. Pieces are read and leaves looked up
    // on every core: this check is the last thing a receiver does before
    // it publishes, while the sender waits.
    if s.level == 0 {
        if leaves {
            out.extend(
                s.entries
                    .iter()
                    .map(|e| e.0)
                    .filter(|id| !store.contains(id)),
            );
        }
        return Ok(());
    }
    let mut level: Vec<ChunkId> = s.entries.iter().map(|e| e.0).collect();
    for depth in (1..=s.level).rev() {
        let mut seen = HashSet::new();
        level.retain(|id| seen.insert(*id));
        // A piece's children that matter: every one above the leaves, the
        // missing ones at the leaves (none when only objects are wanted).
        let below: Vec<Result<Option<Vec<ChunkId>>>> = level
            .par_iter()
            .map(|p| {
                if !store.contains(p) {
                    return Ok(None);
                }
                let bytes = store.read_chunk(p)?;
                let children = wharf_format::list::decode_entries(&bytes, p)?;
                let keep = |id: &ChunkId| depth > 1 || (leaves && !store.contains(id));
                Ok(Some(children.iter().map(|e| e.0).filter(keep).collect()))
            })
            .collect();
        let mut next = Vec::new();
        for (p, b) in level.iter().zip(below) {
            match b? {
                Some(ids) => next.extend(ids),
                None => out.push(*p),
            }
        }
        if depth == 1 {
            out.extend(next);
            break;
        }
        level = next;
    }
    Ok(())
}

/// The two levels of a push: first which layers of the image the receiver
/// holds whole, then, below everything else, which chunks it holds.
/// Returns the chunk ids asked about, whether each is held, and how many
/// layers were skipped whole.
pub fn negotiate_push(
    store: &Store,
    recipe: &ChunkId,
    has: &mut HasOracle<'_>,
) -> Result<(Vec<ChunkId>, Vec<bool>, u64)> {
    let rec = load_recipe(store, recipe)?;
    let layer_ids: Vec<ChunkId> = rec.layers.iter().map(|l| l.node).collect();
    let held = has(&layer_ids, true)?;
    let skip: HashSet<ChunkId> = layer_ids
        .iter()
        .zip(&held)
        .filter(|(_, h)| **h)
        .map(|(i, _)| *i)
        .collect();
    let ids = image_chunks(store, recipe, &skip)?;
    let have = has(&ids, false)?;
    Ok((ids, have, skip.len() as u64))
}

/// What a push would send, per layer: the answer to `--dry-run`.
#[derive(serde::Serialize, Debug, Default, Clone)]
pub struct LayerPlan {
    pub path: String,
    pub len: u64,
    /// The receiver holds this layer in a published image: nothing to send.
    pub whole_layer_present: bool,
    pub chunks: u64,
    pub missing_chunks: u64,
    /// Bytes the missing chunks would cost on the wire: as stored, or as
    /// deltas where those are smaller.
    pub missing_bytes: u64,
    /// Of the missing chunks, those that would go as deltas, their bytes,
    /// and what they would have cost as stored.
    pub delta_chunks: u64,
    pub delta_bytes: u64,
    pub delta_instead_of: u64,
}

#[derive(serde::Serialize, Debug, Default, Clone)]
pub struct Plan {
    pub name: String,
    pub image_bytes: u64,
    pub layers: Vec<LayerPlan>,
    /// Everything outside the layers: the recipe, the outer tar's nodes,
    /// skeleton and small members.
    pub other_missing_chunks: u64,
    pub other_missing_bytes: u64,
    pub total_missing_bytes: u64,
    pub delta_chunks: u64,
    pub delta_bytes: u64,
    /// Images the receiver holds that deltas would be made against.
    pub delta_bases: Vec<String>,
    /// Byte figures are uncompressed lengths (a pull's dry run: the client
    /// does not know how the server stores what it lacks): an upper bound.
    pub uncompressed: bool,
}

/// Answers which of some ids the receiver holds; with `true`, as complete
/// layers of published images.
pub type HasOracle<'a> = dyn FnMut(&[ChunkId], bool) -> Result<Vec<bool>> + 'a;

/// The wire cost of each of `ids` as stored, and as its share of a delta
/// when it would go as one: grouped as a push would group them, objects
/// after content so they may name the content sent before them.
fn costs(
    store: &Store,
    planner: Option<&DeltaPlanner>,
    ids: &[ChunkId],
) -> Result<Vec<(u64, Option<u64>)>> {
    let is_object = |id: &ChunkId| planner.is_some_and(|p| p.is_object(id));
    let content: Vec<ChunkId> = ids.iter().filter(|i| !is_object(i)).copied().collect();
    let objects: Vec<ChunkId> = ids.iter().filter(|i| is_object(i)).copied().collect();
    let mut priced: HashMap<ChunkId, (u64, Option<u64>)> = HashMap::new();
    let mut sent = SentIndex::default();
    for list in [&content, &objects] {
        for u in encode_units(store, planner, list, &sent)? {
            match u {
                Unit::Plain(id, _, stored) => {
                    priced.insert(id, (stored.len() as u64, None));
                }
                Unit::Delta(d, instead) => {
                    // The delta's bytes are shared out by chunk, the first
                    // taking the remainder, so the sum is exact.
                    let total = delta_entry_len(&d) as u64;
                    let n = d.targets.len() as u64;
                    let each = total / n;
                    for (i, (id, len)) in d.targets.iter().enumerate() {
                        let share = if i == 0 { total - each * (n - 1) } else { each };
                        let st = if i == 0 { instead } else { 0 };
                        priced.insert(*id, (st, Some(share)));
                        sent.push(*id, *len);
                    }
                }
            }
        }
    }
    Ok(ids
        .iter()
        .map(|i| priced.get(i).copied().unwrap_or((0, None)))
        .collect())
}

/// Computes what pushing `name` would send, asking `has(ids, layers)` which
/// ids the receiver holds (`layers`: as complete layers). `bases` are images
/// the receiver holds whole (their chunks are not asked about), and with a
/// `planner` the missing chunks are priced as deltas where smaller. Chunks
/// shared by several layers count in the first.
pub fn plan_push(
    store: &Store,
    name: &str,
    bases: &[ChunkId],
    planner: Option<&DeltaPlanner>,
    has: &mut HasOracle<'_>,
) -> Result<Plan> {
    let r = store.require_ref(name)?;
    let rec = load_recipe(store, &r.recipe)?;
    let known = closure_of(store, bases)?;
    let mut ask = |ids: &[ChunkId], whole: bool| -> Result<Vec<bool>> {
        let unknown: Vec<ChunkId> = ids.iter().filter(|i| !known.contains(i)).copied().collect();
        let mut answers = has(&unknown, whole)?.into_iter();
        Ok(ids
            .iter()
            .map(|i| known.contains(i) || answers.next().unwrap_or(false))
            .collect())
    };
    let layer_ids: Vec<ChunkId> = rec.layers.iter().map(|l| l.node).collect();
    let present = ask(&layer_ids, true)?;
    let all_layers: HashSet<ChunkId> = layer_ids.iter().copied().collect();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut plan = Plan {
        name: name.to_string(),
        image_bytes: r.len,
        ..Default::default()
    };
    for (l, whole) in rec.layers.iter().zip(present) {
        let mut lp = LayerPlan {
            path: l.path.clone(),
            len: l.len,
            whole_layer_present: whole,
            ..Default::default()
        };
        if !whole {
            let mut ids = Vec::new();
            subtree_chunks(store, &l.node, &mut seen, &mut ids)?;
            lp.chunks = ids.len() as u64;
            let held = ask(&ids, false)?;
            let missing: Vec<ChunkId> = ids
                .iter()
                .zip(held)
                .filter(|(_, h)| !h)
                .map(|(i, _)| *i)
                .collect();
            lp.missing_chunks = missing.len() as u64;
            for (stored, d) in costs(store, planner, &missing)? {
                match d {
                    Some(d) => {
                        lp.delta_chunks += 1;
                        lp.delta_bytes += d;
                        lp.delta_instead_of += stored;
                        lp.missing_bytes += d;
                    }
                    None => lp.missing_bytes += stored,
                }
            }
        }
        plan.total_missing_bytes += lp.missing_bytes;
        plan.delta_chunks += lp.delta_chunks;
        plan.delta_bytes += lp.delta_bytes;
        plan.layers.push(lp);
    }
    let mut rest = image_chunks(store, &r.recipe, &all_layers)?;
    rest.retain(|id| seen.insert(*id));
    let held = ask(&rest, false)?;
    let missing: Vec<ChunkId> = rest
        .iter()
        .zip(held)
        .filter(|(_, h)| !h)
        .map(|(i, _)| *i)
        .collect();
    plan.other_missing_chunks = missing.len() as u64;
    for (stored, d) in costs(store, planner, &missing)? {
        plan.other_missing_bytes += d.unwrap_or(stored);
        if let Some(d) = d {
            plan.delta_chunks += 1;
            plan.delta_bytes += d;
        }
    }
    plan.total_missing_bytes += plan.other_missing_bytes;
    for b in bases {
        let names: Vec<String> = store
            .list_refs()?
            .into_iter()
            .filter(|(_, r)| r.recipe == *b)
            .map(|(n, _)| n)
            .collect();
        plan.delta_bases.extend(names.into_iter().take(1));
    }
    if planner.is_none() {
        plan.delta_bases.clear();
    }
    Ok(plan)
}

/// What pulling an image would fetch, from a store that holds the image's
/// objects (a pull's dry run fetched those, `fetched`) but maybe not its
/// content. Content is counted uncompressed, the only size a list gives:
/// as the server stores it, it is smaller.
pub fn plan_pull(
    store: &Store,
    name: &str,
    r: &wharf_format::store::RefValue,
    fetched: &HashSet<ChunkId>,
) -> Result<Plan> {
    let rec = load_recipe(store, &r.recipe)?;
    let complete = complete_layers(store)?;
    let missing = |id: &ChunkId| fetched.contains(id) || !store.contains(id);
    // An object fetched for the dry run costs what it did; content its
    // uncompressed length.
    let cost = |id: &ChunkId, raw: u32| -> u64 {
        if fetched.contains(id) {
            store.lookup(id).map_or(raw as u64, |l| l.stored_len as u64)
        } else {
            raw as u64
        }
    };
    let mut plan = Plan {
        name: name.to_string(),
        image_bytes: r.len,
        uncompressed: true,
        ..Default::default()
    };
    let mut counted: HashSet<ChunkId> = HashSet::new();
    let mut seen_nodes: HashSet<ChunkId> = HashSet::new();
    for l in &rec.layers {
        let mut lp = LayerPlan {
            path: l.path.clone(),
            len: l.len,
            whole_layer_present: complete.contains(&l.node),
            ..Default::default()
        };
        if !lp.whole_layer_present {
            wharf_format::maintenance::walk_node(
                store,
                &l.node,
                &mut seen_nodes,
                &mut |id, raw| {
                    if counted.insert(*id) {
                        lp.chunks += 1;
                        if missing(id) {
                            lp.missing_chunks += 1;
                            lp.missing_bytes += cost(id, raw);
                        }
                    }
                },
            )?;
        }
        plan.total_missing_bytes += lp.missing_bytes;
        plan.layers.push(lp);
    }
    let layer_nodes: HashSet<ChunkId> = rec.layers.iter().map(|l| l.node).collect();
    let mut rest = Vec::new();
    wharf_format::maintenance::walk_recipe(store, &r.recipe, &mut |id, raw| {
        rest.push((*id, raw));
    })?;
    // Whole layers the store holds are not walked above; what is under them
    // is held, so only the chunks outside every layer remain.
    let mut under_layers: HashSet<ChunkId> = HashSet::new();
    let mut nodes_seen = HashSet::new();
    for n in &layer_nodes {
        if complete.contains(n) {
            wharf_format::maintenance::walk_node(store, n, &mut nodes_seen, &mut |id, _| {
                under_layers.insert(*id);
            })?;
        }
    }
    for (id, raw) in rest {
        if !under_layers.contains(&id) && counted.insert(id) && missing(&id) {
            plan.other_missing_chunks += 1;
            plan.other_missing_bytes += cost(&id, raw);
        }
    }
    plan.total_missing_bytes += plan.other_missing_bytes;
    Ok(plan)
}

/// Bytes one delta adds to a PUT_DELTA frame, its node table aside.
fn delta_entry_len(d: &wharf_format::delta::DeltaChunk) -> usize {
    let with = wharf_format::delta::encode_frame(std::slice::from_ref(d)).len();
    let nodes: HashSet<ChunkId> = d
        .bases
        .iter()
        .filter_map(|b| match b {
            wharf_format::delta::BaseRef::Range { node, .. } => Some(*node),
            _ => None,
        })
        .collect();
    with - 1 - 32 * nodes.len()
}
