//! What a second version costs: the dedup promises of tar splitting.

mod common;
use common::*;
use wharf_format::synth::TarWriter;

/// A layer of `n` files of realistic sizes, with the given mtime, and an
/// optional extra file inserted after file `insert_at`.
fn layer(n: usize, mtime: u64, insert: Option<(usize, &[u8])>) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    for i in 0..n {
        let size = 2_000 + (i * 7919) % 120_000;
        w.file(
            &format!("usr/lib/python3/pkg{}/mod{i}.py", i % 17),
            0o644,
            mtime,
            &file_bytes(size, i as u64),
        )
        .unwrap();
        if let Some((at, data)) = insert {
            if at == i {
                w.file("usr/lib/python3/inserted.bin", 0o644, mtime, data)
                    .unwrap();
            }
        }
    }
    w.finish().unwrap();
    w.into_inner()
}

#[test]
fn new_mtimes_everywhere_cost_under_one_percent() {
    let (_d, store) = new_store();
    let v1 = layer(400, 1_700_000_000, None);
    let v2 = layer(400, 1_700_086_400, None);
    assert_ne!(v1, v2);
    assert_round_trip(&store, "v1", &v1);
    let rep = assert_round_trip(&store, "v2", &v2);
    // What the store keeps (and a transfer sends) is the compressed new
    // chunks: the new skeleton, and no file content.
    let frac = rep.stored_bytes as f64 / v2.len() as f64;
    assert!(
        frac < 0.01,
        "mtime-only rebuild stored {} bytes on disk for a {}-byte image ({:.2}%)",
        rep.stored_bytes,
        v2.len(),
        frac * 100.0
    );
    // And of the uncompressed new bytes, none is file content: the
    // skeleton is at most a header block and padding per file.
    assert!(
        rep.new_bytes < 400 * 1024 + 64 * 1024,
        "{} new bytes",
        rep.new_bytes
    );
}

#[test]
fn inserted_file_costs_about_its_size() {
    let (_d, store) = new_store();
    let v1 = layer(300, 1_700_000_000, None);
    let extra = file_bytes(200_000, 999_999);
    let v2 = layer(300, 1_700_000_000, Some((150, &extra)));
    assert_round_trip(&store, "v1", &v1);
    let rep = assert_round_trip(&store, "v2", &v2);
    let max_chunk = store.config.chunking.max as u64;
    // The file itself, plus at most a few chunks around it and the changed
    // skeleton and list pieces.
    let budget = extra.len() as u64 + 4 * max_chunk + 64 * 1024;
    assert!(
        rep.new_bytes <= budget,
        "inserting {} bytes stored {} new bytes (budget {budget})",
        extra.len(),
        rep.new_bytes
    );
    assert!(
        rep.new_bytes >= extra.len() as u64 / 2,
        "suspiciously small: {}",
        rep.new_bytes
    );
}

#[test]
fn same_image_twice_stores_nothing_new_but_its_recipe() {
    let (_d, store) = new_store();
    let v1 = layer(100, 1_700_000_000, None);
    assert_round_trip(&store, "a", &v1);
    let rep = assert_round_trip(&store, "b", &v1);
    assert!(
        rep.new_bytes < 4096,
        "re-adding stored {} bytes",
        rep.new_bytes
    );
}
