//! The store under stress: corruption, concurrent writers, gc, many indexes.

mod common;
use common::*;
use std::sync::Arc;
use wharf_format::backend::ObjectKind;
use wharf_format::maintenance;
use wharf_format::store::{Store, DEFAULT_ZSTD_LEVEL};
use wharf_format::synth::{self, Layout, Scale, Version};

fn image(version: Version, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    synth::write_image(&mut v, Layout::Legacy, version, Scale::tiny(), seed).unwrap();
    v
}

fn pack_paths(store: &Store) -> Vec<std::path::PathBuf> {
    store
        .backend()
        .list(ObjectKind::Pack)
        .unwrap()
        .iter()
        .filter_map(|n| {
            store
                .backend()
                .local_path(ObjectKind::Pack, n)
                .ok()
                .flatten()
        })
        .collect()
}

#[test]
fn flipped_byte_in_a_pack_is_found_and_named() {
    let (_d, store) = new_store();
    let a = image(Version::V1, 1);
    add(&store, "victim", &a);
    let b = file_bytes(300_000, 77);
    add(&store, "bystander", &b);
    // Corrupt the pack holding the first image's chunks, in the middle of
    // its data (past the header of the first entry).
    let packs = pack_paths(&store);
    let biggest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(biggest, &bytes).unwrap();

    let rep = maintenance::verify(&store, true).unwrap();
    assert!(!rep.errors.is_empty(), "verify --full found nothing");
    let text = rep.errors.join("\n");
    assert!(
        text.contains("victim"),
        "error does not name the image: {text}"
    );
    assert!(
        text.contains("chunk"),
        "error does not name the chunk: {text}"
    );

    let err = wharf_format::extract::extract_to_vec(&store, "victim").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("victim"),
        "extract error does not name the image: {msg}"
    );
    assert!(msg.contains("chunk") || msg.contains("sha256"), "{msg}");

    // The other image lives in another pack and is unharmed.
    assert_eq!(extract(&store, "bystander"), b);
}

#[test]
fn extract_to_file_leaves_nothing_on_failure() {
    let (d, store) = new_store();
    add(&store, "x", &image(Version::V1, 2));
    // Damage the largest entry of every pack, in the middle of its data:
    // file contents, which extract must read. (A pack's last bytes, where
    // this test once flipped a bit, may belong to a block map, which
    // extract does not need and only `verify` reads.)
    for p in pack_paths(&store) {
        let mut bytes = std::fs::read(&p).unwrap();
        let (mut at, mut largest, mut best) = (16usize, 0usize, None);
        while at + 40 <= bytes.len() {
            let stored = u32::from_le_bytes(bytes[at + 36..at + 40].try_into().unwrap()) as usize;
            if stored > largest {
                (largest, best) = (stored, Some(at + 40 + stored / 2));
            }
            at += 40 + stored;
        }
        bytes[best.expect("a pack with an entry")] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
    }
    let out = d.path().join("out.tar");
    assert!(wharf_format::extract::extract_to_file(&store, "x", &out, None).is_err());
    assert!(!out.exists(), "a corrupt extract left its output behind");
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "temporary file left: {leftovers:?}");
}

/// A pack entry's header repeats the lengths the index gives; a header
/// that disagrees is damage, reported by extract and verify, even though
/// the index alone would still find the chunk's bytes.
#[test]
fn a_damaged_entry_header_is_reported() {
    let (_d, store) = new_store();
    let img = image(Version::V1, 3);
    add(&store, "x", &img);
    let p = pack_paths(&store)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    // The first entry's raw length, top byte: the chunk's data is untouched.
    bytes[16 + 35] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let err = wharf_format::extract::extract_to_vec(&store, "x").unwrap_err();
    assert!(err.to_string().contains("entry header"), "{err}");
    let rep = maintenance::verify(&store, true).unwrap();
    assert!(!rep.errors.is_empty(), "verify --full found nothing");
}

#[test]
fn two_writers_at_once_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    Store::init(&root, Default::default()).unwrap();
    let imgs: Vec<Vec<u8>> = (0..2).map(|i| image(Version::V1, 10 + i)).collect();
    std::thread::scope(|s| {
        for (i, img) in imgs.iter().enumerate() {
            let root = root.clone();
            s.spawn(move || {
                // Each writer opens the store on its own, as two processes would.
                let store = Arc::new(Store::open(&root).unwrap());
                add(&store, &format!("w{i}"), img);
            });
        }
    });
    let store = Arc::new(Store::open(&root).unwrap());
    for (i, img) in imgs.iter().enumerate() {
        assert_eq!(&extract(&store, &format!("w{i}")), img);
    }
    let rep = maintenance::verify(&store, true).unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
}

#[test]
fn many_adds_keep_the_index_compact() {
    let (_d, store) = new_store();
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| file_bytes(100_000, 500 + i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        add(&store, &format!("b{i}"), b);
    }
    let n = store.index_files().len();
    assert!(n <= wharf_format::store::MAX_INDEX_FILES, "{n} index files");
    let reopened = Arc::new(Store::open(std::path::Path::new(&store.location())).unwrap());
    for (i, b) in blobs.iter().enumerate() {
        assert_eq!(&extract(&reopened, &format!("b{i}")), b);
    }
}

#[test]
fn rm_and_gc_free_space_and_keep_the_rest() {
    let (_d, store) = new_store();
    let keep = image(Version::V1, 3);
    let drop = file_bytes(2_000_000, 4);
    add(&store, "keep", &keep);
    add(&store, "drop", &drop);
    let before: u64 = pack_paths(&store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    store.remove_ref("drop").unwrap();
    let dry = maintenance::gc(&store, true).unwrap();
    assert!(
        dry.bytes_freed > 500_000,
        "dry run frees {}",
        dry.bytes_freed
    );
    let after_dry: u64 = pack_paths(&store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(before, after_dry, "dry run changed the store");
    maintenance::gc(&store, false).unwrap();
    let after: u64 = pack_paths(&store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        after + 500_000 < before,
        "gc freed only {} bytes",
        before - after
    );
    assert_eq!(extract(&store, "keep"), keep);
    let rep = maintenance::verify(&store, true).unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert!(rep.notes.is_empty(), "{:?}", rep.notes);
    // Adding the dropped bytes again works and stores them anew.
    let r = add(&store, "drop", &drop);
    assert!(r.new_bytes >= drop.len() as u64 / 2);
    assert_eq!(extract(&store, "drop"), drop);
}

fn outer_tar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = synth::TarWriter::new(Vec::new());
    for (n, b) in members {
        w.file(n, 0o644, 1_700_000_000, b).unwrap();
    }
    w.finish().unwrap();
    w.into_inner()
}

#[test]
fn gc_rewrites_a_pack_that_is_partly_dead() {
    let (_d, store) = new_store();
    let x = file_bytes(1_500_000, 11);
    let y = file_bytes(1_500_000, 12);
    // One add puts X and Y in one pack; B only references X.
    let a = outer_tar(&[("x.bin", &x), ("y.bin", &y)]);
    let b = outer_tar(&[("x.bin", &x), ("readme", b"b")]);
    add(&store, "a", &a);
    add(&store, "b", &b);
    store.remove_ref("a").unwrap();
    let before: u64 = pack_paths(&store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let rep = maintenance::gc(&store, false).unwrap();
    assert_eq!(rep.packs_rewritten, 1, "{rep:?}");
    let after: u64 = pack_paths(&store)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        after * 10 < before * 7,
        "rewrite freed too little: {before} -> {after}"
    );
    assert_eq!(extract(&store, "b"), b);
    let v = maintenance::verify(&store, true).unwrap();
    assert!(v.errors.is_empty() && v.notes.is_empty(), "{v:?}");
}

#[test]
fn missing_name_and_missing_store_say_what_to_do() {
    let (d, store) = new_store();
    let e = wharf_format::extract::extract_to_vec(&store, "nope").unwrap_err();
    assert!(
        e.to_string().contains("nope") && e.to_string().contains("wharf ls"),
        "{e}"
    );
    let e = Store::open(&d.path().join("elsewhere")).err().unwrap();
    assert!(e.to_string().contains("wharf init"), "{e}");
}

#[test]
fn a_newer_store_version_is_refused_clearly() {
    let (_d, store) = new_store();
    let cfg = std::path::PathBuf::from(store.location()).join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"wharf_store\": 1", "\"wharf_store\": 99");
    std::fs::write(&cfg, text).unwrap();
    let e = Store::open(std::path::Path::new(&store.location()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("newer") && e.contains("99"), "{e}");
}

/// A reused layer (same OCI digest) must still round-trip, and a layer at
/// the same legacy path with different bytes must not be taken for it.
#[test]
fn whole_layer_reuse_is_exact() {
    let (_d, store) = new_store();
    let mut oci1 = Vec::new();
    synth::write_image(&mut oci1, Layout::Oci, Version::V1, Scale::tiny(), 9).unwrap();
    let mut oci2 = Vec::new();
    synth::write_image(&mut oci2, Layout::Oci, Version::V2, Scale::tiny(), 9).unwrap();
    assert_round_trip(&store, "o1", &oci1);
    let rep = assert_round_trip(&store, "o2", &oci2);
    assert!(rep.new_bytes < oci2.len() as u64 / 2);
    // Same bytes but one flipped in the middle of the largest member: the
    // block map must catch it and the result must still be exact.
    let mut tweaked = oci1.clone();
    let mid = tweaked.len() / 2;
    tweaked[mid] ^= 0x01;
    assert_round_trip(&store, "tweaked", &tweaked);
}

fn oci_like(layer: &[u8]) -> Vec<u8> {
    outer_tar(&[
        (&format!("blobs/sha256/{}", sha(layer)), layer),
        ("index.json", b"{}"),
    ])
}

fn big_layer(seed: u64) -> Vec<u8> {
    let mut w = synth::TarWriter::new(Vec::new());
    for i in 0..12 {
        w.file(
            &format!("usr/lib/f{i}"),
            0o644,
            1_700_000_000,
            &file_bytes(300_000, seed + i),
        )
        .unwrap();
    }
    w.finish().unwrap();
    w.into_inner()
}

/// A stored layer that arrives again cut short exactly at a block-map
/// boundary matches every block read: it must still be stored as what it is.
#[test]
fn known_layer_truncated_at_a_block_boundary_is_stored_exactly() {
    let (_d, store) = new_store();
    let layer = big_layer(1);
    assert!(layer.len() > 3 << 20);
    let img = oci_like(&layer);
    assert_round_trip(&store, "whole", &img);
    for cut in [512 + (1 << 20), 512 + (2 << 20), 512 + layer.len() - 1] {
        assert_round_trip(&store, &format!("cut-{cut}"), &img[..cut]);
    }
    assert!(maintenance::verify(&store, true).unwrap().errors.is_empty());
}

/// gc keeps the block maps of live layers, so the whole-layer fast path
/// keeps working after a gc.
#[test]
fn gc_keeps_block_maps_of_live_layers() {
    let (_d, store) = new_store();
    let keep = oci_like(&big_layer(2));
    add(&store, "keep", &keep);
    add(&store, "drop", &oci_like(&big_layer(3)));
    store.remove_ref("drop").unwrap();
    maintenance::gc(&store, false).unwrap();
    let r = store.require_ref("keep").unwrap();
    // The ref, not the (reproducible) recipe, records when it was added.
    assert!(r.added > 1_700_000_000, "added = {}", r.added);
    let recipe = wharf_format::extract::load_recipe(&store, &r.recipe).unwrap();
    assert!(!recipe.layers.is_empty());
    for l in &recipe.layers {
        let node = wharf_format::extract::load_node(&store, &l.node).unwrap();
        let blocks = node.blocks.expect("layers carry a block map");
        assert!(
            store.contains(&blocks),
            "gc dropped the block map of {}",
            l.path
        );
    }
    assert_round_trip(&store, "again", &keep);
}

/// In the legacy layout an unchanged layer moves to a new `<id>/layer.tar`
/// when a layer below it changes: it is still recognised whole, by size and
/// block map, and not chunked again; a same-size layer with other bytes is
/// still stored exactly.
#[test]
fn a_known_layer_under_a_new_path_is_reused_whole() {
    let (_d, store) = new_store();
    let layer = big_layer(7);
    let first = outer_tar(&[("aaaa/layer.tar", &layer), ("manifest.json", b"[]")]);
    let r1 = add(&store, "first", &first);
    let moved = outer_tar(&[("bbbb/layer.tar", &layer), ("manifest.json", b"[]")]);
    let r2 = assert_round_trip(&store, "moved", &moved);
    assert!(
        r2.chunks * 10 < r1.chunks,
        "the moved layer was chunked again: {} chunks offered vs {} the first time",
        r2.chunks,
        r1.chunks
    );
    let mut other = layer.clone();
    let n = other.len();
    other[n / 2] ^= 0x20;
    let same_size = outer_tar(&[("cccc/layer.tar", &other), ("manifest.json", b"[]")]);
    assert_round_trip(&store, "same size, other bytes", &same_size);
}

/// Every chunk is stored as libzstd compresses it at the store's level, and a
/// new store's default level stores image data smaller than zstd's own
/// default, 3 (why 4: `DEFAULT_ZSTD_LEVEL`).
#[test]
fn chunks_are_stored_at_the_store_level_and_the_default_beats_level_3() {
    let (_d, store) = new_store();
    assert_eq!(store.config.zstd_level, DEFAULT_ZSTD_LEVEL);
    add(&store, "img", &image(Version::V1, 5));
    let (mut stored_total, mut level3_total, mut chunks) = (0, 0, 0);
    for f in store.index_files() {
        for i in 0..f.len() {
            let id = f.entry(i).id;
            let (_, stored) = store.read_stored(&id).unwrap();
            let raw = store.read_chunk(&id).unwrap();
            assert!(
                stored == zstd::bulk::compress(&raw, store.config.zstd_level).unwrap(),
                "chunk {id} is not compressed at the store's level"
            );
            stored_total += stored.len();
            level3_total += zstd::bulk::compress(&raw, 3).unwrap().len();
            chunks += 1;
        }
    }
    assert!(chunks > 100, "only {chunks} chunks");
    assert!(
        stored_total < level3_total,
        "stored {stored_total} bytes, level 3 would take {level3_total}"
    );
}

/// A PUT payload (PROTOCOL.md §9.1): pack entries back to back, each a
/// 40-byte header (id, raw length, stored length) and one zstd frame.
fn received_payload(chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<wharf_format::store::ReceivedEntry>) {
    use wharf_format::hash::ChunkId;
    let mut buf = Vec::new();
    let mut entries = Vec::new();
    for raw in chunks {
        let z = zstd::bulk::compress(raw, 1).unwrap();
        let id = ChunkId::of(raw);
        buf.extend_from_slice(&id.0);
        buf.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(z.len() as u32).to_le_bytes());
        entries.push(wharf_format::store::ReceivedEntry {
            id,
            raw_len: raw.len() as u32,
            at: buf.len(),
            len: z.len(),
        });
        buf.extend_from_slice(&z);
    }
    buf.shrink_to_fit();
    (buf, entries)
}

#[test]
fn received_buffers_are_bounded_in_bytes_not_in_count() {
    use wharf_format::store::{ChunkWriter, RECEIVED_BYTES};
    let (_d, store) = new_store();
    let writer = ChunkWriter::new(store.clone(), 1).unwrap();
    // Ten payloads of 12 MiB of incompressible chunks: the queues between
    // the stages hold up to 17 buffers, which would be 200 MiB.
    let mut ids = Vec::new();
    let mut largest = 0;
    for p in 0..10u64 {
        let chunks: Vec<Vec<u8>> = (0..12u64)
            .map(|c| noise(1 << 20, 2 * (p * 100 + c)))
            .collect();
        let (buf, entries) = received_payload(&chunks);
        ids.extend(entries.iter().map(|e| e.id));
        largest = largest.max(buf.capacity() as u64);
        writer.put_received(buf, entries).unwrap();
    }
    // One payload larger than the whole budget still goes through, alone.
    let huge: Vec<Vec<u8>> = (0..40u64).map(|c| noise(1 << 20, 2 * (5000 + c))).collect();
    let (buf, entries) = received_payload(&huge);
    ids.extend(entries.iter().map(|e| e.id));
    let huge_len = buf.capacity() as u64;
    assert!(huge_len > RECEIVED_BYTES);
    writer.put_received(buf, entries).unwrap();
    let peak = writer.received_bytes_peak();
    writer.finish().unwrap();
    assert!(
        peak >= largest && peak <= RECEIVED_BYTES.max(huge_len),
        "held {peak} bytes at the peak; budget {RECEIVED_BYTES}, largest payload {huge_len}"
    );
    store.reload_index().unwrap();
    for id in &ids {
        assert!(store.contains(id), "chunk {id} was not stored");
    }
}
