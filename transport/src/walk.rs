//! Which chunks an image consists of, and which of them a store lacks.

use crate::Result;
use std::collections::HashSet;
use wharf_format::extract::load_recipe;
use wharf_format::list::{ListReader, StreamRef};
use wharf_format::recipe::{Node, NodeBody};
use wharf_format::{ChunkId, Store};

/// Every chunk id the image `recipe` uses (recipe, nodes, block maps, list
/// pieces, data), each once, skipping the subtrees of nodes in `skip`.
pub fn image_chunks(
    store: &Store,
    recipe: &ChunkId,
    skip: &HashSet<ChunkId>,
) -> Result<Vec<ChunkId>> {
    let mut out = vec![*recipe];
    let mut seen: HashSet<ChunkId> = HashSet::new();
    seen.insert(*recipe);
    let rec = load_recipe(store, recipe)?;
    let mut nodes = vec![rec.root];
    while let Some(n) = nodes.pop() {
        if skip.contains(&n) || !seen.insert(n) {
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
    Ok(out)
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
        NodeBody::Gzip { plain, recon } => (vec![*plain], vec![recon.clone()]),
    }
}

/// Layer nodes of published images: complete by construction, since a
/// name is only set once everything below it is present.
pub fn complete_layers(store: &Store) -> Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    for (_, r) in store.list_refs()? {
        if let Ok(rec) = load_recipe(store, &r.recipe) {
            out.extend(rec.layers.iter().map(|l| l.node));
            out.insert(rec.root);
        }
    }
    Ok(out)
}

/// The chunks of `recipe` the store lacks, each once. Objects needed to
/// walk the tree (recipe, nodes, list pieces) that are missing are reported
/// and their subtree cannot be walked: the caller fetches them and asks again.
pub fn missing(store: &Store, recipe: &ChunkId) -> Result<Vec<ChunkId>> {
    let mut all = missing_with_repeats(store, recipe)?;
    let mut seen = HashSet::new();
    all.retain(|id| seen.insert(*id));
    Ok(all)
}

fn missing_with_repeats(store: &Store, recipe: &ChunkId) -> Result<Vec<ChunkId>> {
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
            missing_in_stream(store, &s, &mut out)?;
        }
    }
    Ok(out)
}

fn missing_in_stream(store: &Store, s: &StreamRef, out: &mut Vec<ChunkId>) -> Result<()> {
    // Walk level by level so a missing piece is reported instead of failing.
    let mut level: Vec<ChunkId> = s.entries.iter().map(|e| e.0).collect();
    for depth in (0..=s.level).rev() {
        if depth == 0 {
            out.extend(level.iter().filter(|id| !store.contains(id)).copied());
            break;
        }
        let mut next = Vec::new();
        for p in &level {
            if !store.contains(p) {
                out.push(*p);
                continue;
            }
            let bytes = store.read_chunk(p)?;
            next.extend(
                wharf_format::list::decode_entries(&bytes, p)?
                    .iter()
                    .map(|e| e.0),
            );
        }
        level = next;
    }
    Ok(())
}
