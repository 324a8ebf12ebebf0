//! Byte-identical round trips of tars with every odd feature we know of,
//! docker save layouts, and inputs that are not tars at all.

mod common;
use common::*;
use wharf_format::synth::{self, Layout, Scale, TarWriter, Version};

const T: u64 = 1_700_000_000;

fn odd_layer() -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    w.dir("etc/", 0o755, T).unwrap();
    w.file("etc/hostname", 0o644, T, b"box\n").unwrap();
    w.file("etc/empty", 0o644, T, b"").unwrap();
    w.file("usr/lib/libbig.so", 0o755, T, &file_bytes(300_000, 1))
        .unwrap();
    w.symlink("usr/lib/libbig.so.1", "libbig.so", T).unwrap();
    w.hardlink("usr/lib/libbig-hard.so", "usr/lib/libbig.so", T)
        .unwrap();
    let long = format!("usr/share/{}/{}", "d".repeat(90), "f".repeat(120));
    w.file(&long, 0o644, T, b"long name via PAX\n").unwrap();
    w.gnu_longname_file(
        &format!("opt/{}", "g".repeat(150)),
        0o644,
        T,
        b"gnu long name\n",
    )
    .unwrap();
    w.pax_file(
        "opt/pax-with-mtime",
        &[("mtime", "1700000000.123456789"), ("comment", "hello")],
        0o644,
        T,
        &file_bytes(5000, 2),
    )
    .unwrap();
    w.file(
        "opt/données/naïve.txt",
        0o644,
        T,
        "non-ASCII ✓\n".as_bytes(),
    )
    .unwrap();
    w.whiteout("usr/share/doc/.wh.removed-pkg", T).unwrap();
    w.whiteout("tmp/.wh..wh..opq", T).unwrap();
    w.file("var/lib/exact-512", 0o644, T, &file_bytes(512, 3))
        .unwrap();
    w.file("var/lib/exact-1024", 0o644, T, &file_bytes(1024, 4))
        .unwrap();
    w.finish().unwrap();
    w.into_inner()
}

#[test]
fn odd_tar_features_round_trip() {
    let (_d, store) = new_store();
    let layer = odd_layer();
    assert_round_trip(&store, "odd", &layer);
}

#[test]
fn trailing_zero_blocks_and_garbage_round_trip() {
    let (_d, store) = new_store();
    let mut zeros = odd_layer();
    zeros.extend_from_slice(&[0u8; 512 * 18]);
    assert_round_trip(&store, "zeros", &zeros);
    let mut garbage = odd_layer();
    garbage.extend_from_slice(b"this is not a tar block, just junk after the end marker");
    garbage.extend_from_slice(&file_bytes(70_000, 9));
    assert_round_trip(&store, "garbage", &garbage);
}

#[test]
fn tar_inside_tar_is_split_and_round_trips() {
    let (_d, store) = new_store();
    let layer = odd_layer();
    let mut outer = TarWriter::new(Vec::new());
    outer.dir("abc/", 0o755, T).unwrap();
    outer.file("abc/layer.tar", 0o644, T, &layer).unwrap();
    outer.file("manifest.json", 0o644, T, b"[]").unwrap();
    outer.finish().unwrap();
    let bytes = outer.into_inner();
    let rep = assert_round_trip(&store, "nested", &bytes);
    assert_eq!(rep.layers, 1, "the inner tar became its own node");
}

#[test]
fn docker_save_layouts_round_trip() {
    let (_d, store) = new_store();
    for layout in [Layout::Legacy, Layout::Oci] {
        for version in [Version::V1, Version::V2] {
            let mut img = Vec::new();
            synth::write_image(&mut img, layout, version, Scale::tiny(), 7).unwrap();
            let rep = assert_round_trip(&store, &format!("{layout:?}-{version:?}"), &img);
            assert!(rep.layers >= 3, "{layout:?}: layers found: {}", rep.layers);
        }
    }
}

/// `docker save` of two images sharing a layer writes the second copy as a
/// symlink to the first one's layer.tar.
#[test]
fn legacy_save_with_symlinked_layer_round_trips() {
    let (_d, store) = new_store();
    let layer = odd_layer();
    let id1 = "a".repeat(64);
    let id2 = "b".repeat(64);
    let mut w = TarWriter::new(Vec::new());
    w.dir(&format!("{id1}/"), 0o755, T).unwrap();
    w.file(&format!("{id1}/VERSION"), 0o644, T, b"1.0").unwrap();
    w.file(&format!("{id1}/json"), 0o644, T, b"{}").unwrap();
    w.file(&format!("{id1}/layer.tar"), 0o644, T, &layer)
        .unwrap();
    w.dir(&format!("{id2}/"), 0o755, T).unwrap();
    w.file(&format!("{id2}/VERSION"), 0o644, T, b"1.0").unwrap();
    w.file(&format!("{id2}/json"), 0o644, T, b"{}").unwrap();
    w.symlink(
        &format!("{id2}/layer.tar"),
        &format!("../{id1}/layer.tar"),
        T,
    )
    .unwrap();
    w.file("manifest.json", 0o644, 0, b"[]").unwrap();
    w.finish().unwrap();
    assert_round_trip(&store, "symlinked", &w.into_inner());
}

#[test]
fn non_tar_inputs_round_trip() {
    let (_d, store) = new_store();
    assert_round_trip(&store, "empty", b"");
    assert_round_trip(&store, "tiny", b"x");
    assert_round_trip(&store, "random", &file_bytes(1_000_000, 42));
    assert_round_trip(&store, "zeros", &vec![0u8; 200_000]);
    assert_round_trip(&store, "one block", &[7u8; 512]);
}

#[test]
fn truncated_tars_round_trip_at_every_kind_of_cut() {
    let (_d, store) = new_store();
    let mut img = Vec::new();
    synth::write_image(&mut img, Layout::Legacy, Version::V1, Scale::tiny(), 1).unwrap();
    // Inside the first header, at a block boundary, inside file content,
    // inside a nested layer, and one byte short of the end.
    let cuts = [
        100,
        512,
        1536,
        5000,
        img.len() / 3,
        img.len() / 2 + 77,
        img.len() - 1,
    ];
    for (i, &cut) in cuts.iter().enumerate() {
        assert_round_trip(&store, &format!("cut{i}"), &img[..cut]);
    }
}

#[test]
fn corrupt_headers_fall_back_to_plain_bytes() {
    let (_d, store) = new_store();
    let mut layer = odd_layer();
    // Break the checksum of a header in the middle: the rest is stored plainly.
    let at = layer.len() / 2 / 512 * 512;
    layer[at + 148] = b'9';
    layer[at + 10] ^= 0x55;
    assert_round_trip(&store, "bad header", &layer);
    // An unknown entry type: same.
    let mut w = TarWriter::new(Vec::new());
    w.file("a", 0o644, T, b"aaaa").unwrap();
    let mut bytes = w.into_inner();
    let mut unknown = TarWriter::new(Vec::new());
    unknown.file("b", 0o644, T, b"bbbb").unwrap();
    let mut u = unknown.into_inner();
    u[156] = b'Q';
    let sum: u32 = u[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    u[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    bytes.extend_from_slice(&u);
    bytes.extend_from_slice(&[0u8; 1024]);
    assert_round_trip(&store, "unknown type", &bytes);
}

/// A directory holding a sparse file with more holes than an old GNU header
/// describes (so extension blocks follow it) and, after it in name order,
/// many small files; archived by GNU tar in `format` with `--sparse`.
fn gnu_tar_with_sparse_file(dir: &std::path::Path, format: &str, mtime: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let root = dir.join(format!("root-{format}"));
    if !root.exists() {
        std::fs::create_dir_all(&root).unwrap();
        let sparse = std::fs::File::create(root.join("a-sparse.bin")).unwrap();
        sparse.set_len(40 << 20).unwrap();
        for i in 0..12u64 {
            sparse
                .write_all_at(&file_bytes(3_000, 100 + i), i * (3 << 20) + 4096)
                .unwrap();
        }
        for i in 0..200u64 {
            std::fs::write(root.join(format!("f{i:03}.py")), file_bytes(20_000, i)).unwrap();
        }
    }
    let out = std::process::Command::new("tar")
        .args([
            "--sparse",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg(format!("--format={format}"))
        .arg(format!("--mtime=@{mtime}"))
        .args(["-cf", "-", "-C"])
        .arg(&root)
        .arg(".")
        .output()
        .expect("GNU tar (Debian's tar package) runs");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Sparse files, as GNU tar writes them: old GNU 'S' entries whose sparse
/// map continues in extension blocks, and PAX sparse format 1.0. Both must
/// round-trip, and the walk must go on past them: a v2 that only changes
/// every mtime costs its headers, not the files after the sparse one.
#[test]
fn gnu_and_pax_sparse_files_round_trip_and_keep_the_walk_going() {
    let dir = tempfile::tempdir().unwrap();
    for (format, marker) in [("gnu", None), ("posix", Some(&b"GNU.sparse.major=1"[..]))] {
        let v1 = gnu_tar_with_sparse_file(dir.path(), format, T);
        match marker {
            // Typeflag 'S' at offset 156 of a header block, with the
            // "isextended" byte (482) set.
            None => assert!(
                v1.chunks(512).any(|b| b[156] == b'S' && b[482] == 1),
                "tar wrote no extended GNU sparse header"
            ),
            Some(m) => assert!(
                v1.windows(m.len()).any(|w| w == m),
                "tar wrote no PAX sparse 1.0 entry"
            ),
        }
        let v2 = gnu_tar_with_sparse_file(dir.path(), format, T + 86_400);
        assert_ne!(v1, v2);
        let (_d, store) = new_store();
        assert_round_trip(&store, &format!("{format}-v1"), &v1);
        let rep = assert_round_trip(&store, &format!("{format}-v2"), &v2);
        assert!(
            rep.new_bytes * 10 < v2.len() as u64,
            "{format}: new mtimes cost {} new bytes of {}: the files after the sparse one were not split",
            rep.new_bytes,
            v2.len()
        );
    }
}
