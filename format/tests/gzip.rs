//! gzip layers: stored by their plaintext and rebuilt to the exact compressed
//! bytes (preflate), or stored as they are when that cannot be done. Every
//! case must round-trip byte for byte whichever way it went.

mod common;
use common::*;
use flate2::{Compression as Level, GzBuilder};
use sha2::Digest;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use wharf_format::recipe::LayerInfo;
use wharf_format::store::Store;

fn gzip_with(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = GzBuilder::new().write(Vec::new(), Level::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn assert_preflate(name: &str, l: &LayerInfo) {
    let c = l.compression.as_ref().expect("compression recorded");
    assert_eq!(
        (l.kind.as_str(), c.format.as_str(), c.method.as_str()),
        ("gzip", "gzip", "preflate"),
        "{name}: stored as {l:?}"
    );
    let recon = c.recon_len.expect("recon_len");
    assert!(
        recon * 10 <= l.len,
        "{name}: reconstruction data {recon} bytes for {} compressed",
        l.len
    );
}

#[test]
fn zlib_levels_round_trip_through_preflate() {
    let (_d, store) = new_store();
    let tar = layer(60, 1_700_000_000, 1);
    for level in [1, 6, 9] {
        let gz = gzip_with(&tar, level);
        let name = format!("zlib-{level}");
        let l = round_trip_blob(&store, &name, &gz);
        assert_preflate(&name, &l);
        let c = l.compression.unwrap();
        assert_eq!(
            c.plain_len,
            Some(tar.len() as u64),
            "{name}: plaintext length"
        );
        assert_eq!(c.members, Some(1));
        eprintln!(
            "{name}: {} compressed, {} bytes of reconstruction data ({:.3}%)",
            gz.len(),
            c.recon_len.unwrap_or(0),
            100.0 * c.recon_len.unwrap_or(0) as f64 / gz.len() as f64
        );
    }
}

/// The tests' flate2 uses zlib itself: the deflate bytes equal what Python's
/// gzip module writes (the corpus' `oci-gzip-py`), so the case above is that one.
#[test]
fn flate2_in_tests_writes_what_python_writes() {
    if !have("python3") {
        eprintln!("SKIPPED: python3 not installed");
        return;
    }
    let tar = layer(20, 1_700_000_000, 2);
    let py = pipe(
        "python3",
        &[
            "-c",
            "import sys,gzip; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read(), 6, mtime=0))",
        ],
        &tar,
    );
    let ours = gzip_with(&tar, 6);
    assert!(
        py[10..] == ours[10..],
        "deflate streams differ: python {} bytes, flate2 {} bytes",
        py.len(),
        ours.len()
    );
}

#[test]
fn header_fields_are_kept() {
    let (_d, store) = new_store();
    let tar = layer(40, 1_700_000_000, 3);
    let mut e = GzBuilder::new()
        .mtime(1_234_567_890)
        .filename("layer.tar")
        .comment("made for a test")
        .extra(b"AB\x02\x00hi".to_vec())
        .operating_system(3)
        .write(Vec::new(), Level::new(6));
    e.write_all(&tar).unwrap();
    let gz = e.finish().unwrap();
    assert_eq!(gz[3], 0x04 | 0x08 | 0x10, "FEXTRA, FNAME, FCOMMENT set");
    let l = round_trip_blob(&store, "fields", &gz);
    assert_preflate("fields", &l);
    // FHCRC too (no common tool writes it): set the flag and insert the CRC16.
    let mut hc = gz[..10].to_vec();
    hc[3] = 0x02;
    let crc = (crc32(&hc) & 0xffff) as u16;
    hc.extend_from_slice(&crc.to_le_bytes());
    let body_start = header_end(&gz);
    hc.extend_from_slice(&gz[body_start..]);
    let l = round_trip_blob(&store, "fhcrc", &hc);
    assert_preflate("fhcrc", &l);
}

fn header_end(gz: &[u8]) -> usize {
    wharf_format::gzip::header_len(gz)
        .expect("header")
        .expect("complete")
}

fn crc32(b: &[u8]) -> u32 {
    let mut h = flate2::Crc::new();
    h.update(b);
    h.sum()
}

#[test]
fn multi_member_and_garbage_after() {
    let (_d, store) = new_store();
    let a = layer(30, 1_700_000_000, 4);
    let b = layer(30, 1_700_000_000, 5);
    let mut gz = gzip_with(&a, 6);
    gz.extend_from_slice(&gzip_with(&b, 9));
    let l = round_trip_blob(&store, "two-members", &gz);
    assert_preflate("two-members", &l);
    let c = l.compression.unwrap();
    assert_eq!(c.members, Some(2));
    assert_eq!(c.plain_len, Some((a.len() + b.len()) as u64));

    // Bytes after the last member that are not a member (zero padding,
    // garbage) are kept verbatim in the reconstruction stream.
    let mut padded = gzip_with(&a, 6);
    padded.extend_from_slice(&[0u8; 1000]);
    padded.extend_from_slice(b"\x1f\x8b trailing garbage");
    let l = round_trip_blob(&store, "garbage-after", &padded);
    assert_preflate("garbage-after", &l);
}

#[test]
fn broken_gzip_round_trips() {
    let (_d, store) = new_store();
    let tar = layer(40, 1_700_000_000, 6);
    let gz = gzip_with(&tar, 6);

    // Truncated in the middle of the deflate stream: stored as it is.
    let cut = &gz[..gz.len() * 2 / 3];
    let l = round_trip_blob(&store, "truncated", cut);
    assert_raw_because("truncated", &l, "gzip", "cut short");
    // Cut inside the trailer.
    let l = round_trip_blob(&store, "no-trailer", &gz[..gz.len() - 3]);
    assert_raw_because("no-trailer", &l, "gzip", "trailer");

    // A wrong CRC: the deflate stream is intact and the trailer is kept as
    // it is, so the member still goes through preflate and rebuilds exactly.
    let mut bad_crc = gz.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    let l = round_trip_blob(&store, "bad-crc", &bad_crc);
    assert_preflate("bad-crc", &l);

    // Corrupt deflate data in the middle.
    let mut corrupt = gz.clone();
    for i in (gz.len() / 2..gz.len() / 2 + 64).step_by(3) {
        corrupt[i] ^= 0x5a;
    }
    // Either way is right as long as it is exact: damaged deflate data may
    // still parse (as other plaintext, ending early, the rest kept as bytes
    // after the member), and add only keeps that after rebuilding it.
    let l = round_trip_blob(&store, "corrupt", &corrupt);
    eprintln!("corrupt deflate data stored as {:?}", l.compression);

    // Reserved header flags: not a gzip header this reads.
    let mut reserved = gz.clone();
    reserved[3] = 0x80;
    let l = round_trip_blob(&store, "reserved-flags", &reserved);
    assert_raw_because("reserved-flags", &l, "gzip", "reserved flag");
}

/// A valid stream preflate cannot reproduce: set the unused bits after the
/// final deflate block (zlib ignores them; preflate models only zero
/// padding). The fallback stores it as it is, still byte-identical.
#[test]
fn stream_preflate_cannot_model_falls_back() {
    let (_d, store) = new_store();
    let tar = layer(40, 1_700_000_000, 7);
    let gz = gzip_with(&tar, 6);
    let last = gz.len() - 9; // final byte of the deflate stream
    let mut odd = None;
    for bit in (1..8).rev() {
        let mut g = gz.clone();
        g[last] |= 0xff << bit;
        if g == gz {
            continue;
        }
        let mut d = flate2::read::GzDecoder::new(&g[..]);
        let mut out = Vec::new();
        if std::io::Read::read_to_end(&mut d, &mut out).is_ok() && out == tar {
            odd = Some(g);
            break;
        }
    }
    let Some(odd) = odd else {
        panic!("the final deflate byte has no unused bits to set for this input; change the input")
    };
    let l = round_trip_blob(&store, "odd-padding", &odd);
    assert_raw_because("odd-padding", &l, "gzip", "preflate");
}

#[test]
fn gzip_and_pigz_binaries_round_trip() {
    let (_d, store) = new_store();
    // Large enough that pigz splits it into several 128 KiB blocks.
    let tar = layer(80, 1_700_000_000, 8);
    let mut ran = 0;
    for (tool, args) in [
        ("gzip", &["-6", "-n", "-c"][..]),
        ("gzip", &["-9", "-c"][..]),
        ("gzip", &["-1", "-c"][..]),
        ("pigz", &["-6", "-n", "-c"][..]),
        ("pigz", &["-6", "-c"][..]),
    ] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} {args:?}: {tool} not installed");
            continue;
        }
        let gz = pipe(tool, args, &tar);
        let name = format!("{tool}{}", args.join(""));
        let l = round_trip_blob(&store, &name, &gz);
        assert_preflate(&name, &l);
        ran += 1;
    }
    eprintln!("{ran} of 5 compressor runs done");
}

/// Go's compress/gzip (what Docker, containerd and BuildKit use). Stock
/// preflate-rs 0.7.6 rejects Go's one-code Huffman trees on some inputs; the
/// member must round-trip either way (preflate, or the fallback).
#[test]
fn go_compress_gzip_round_trips() {
    if !have_go() {
        eprintln!("SKIPPED: go not installed (apt-get install golang-go)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("main.go");
    std::fs::write(
        &src,
        "package main\nimport (\"compress/gzip\"; \"io\"; \"os\"; \"strconv\")\n\
         func main() { l, _ := strconv.Atoi(os.Args[1]); w, _ := gzip.NewWriterLevel(os.Stdout, l)\n\
         if _, err := io.Copy(w, os.Stdin); err != nil { os.Exit(1) }; if w.Close() != nil { os.Exit(1) } }\n",
    )
    .unwrap();
    let bin = dir.path().join("gz");
    let ok = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .env("GOCACHE", dir.path().join("cache"))
        .env("GOPATH", dir.path().join("gopath"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "go build failed");
    let (_d, store) = new_store();
    let mut tar = layer(60, 1_700_000_000, 9);
    // Incompressible content: Go writes blocks without matches there.
    tar.extend_from_slice(&noise(300_000, 9));
    // DefaultCompression, BestSpeed, and HuffmanOnly (blocks with no
    // matches at all: the one-code distance trees stock preflate rejects).
    for level in ["-1", "1", "-2"] {
        let gz = pipe(bin.to_str().unwrap(), &[level], &tar);
        let name = format!("go{level}");
        let l = round_trip_blob(&store, &name, &gz);
        let c = l.compression.clone().expect("compression recorded");
        eprintln!(
            "{name}: {} bytes, stored as {} ({})",
            gz.len(),
            c.method,
            c.reason.clone().unwrap_or_else(|| format!(
                "{} bytes of reconstruction data",
                c.recon_len.unwrap_or(0)
            ))
        );
        // Stock preflate 0.7.6 rejects Go's one-code trees and these fell
        // back to raw bytes; the vendored fix (vendor/preflate-rs/WHARF.md)
        // stores them by their plaintext.
        assert_preflate(&name, &l);
        let recon = c.recon_len.unwrap_or(u64::MAX);
        assert!(
            recon * 20 < gz.len() as u64,
            "{name}: {recon} bytes of reconstruction data for {} compressed",
            gz.len()
        );
    }
}

fn have_go() -> bool {
    Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The point of it all: two builds of a layer that differ only in mtimes
/// share almost all chunks once decompressed, though their gzip bytes differ
/// from the first header on.
#[test]
fn mtime_only_rebuild_of_a_gzip_layer_costs_little() {
    let (_d, store) = new_store();
    let v1 = gzip_with(&layer(150, 1_700_000_000, 10), 6);
    let v2 = gzip_with(&layer(150, 1_700_086_400, 10), 6);
    assert_ne!(v1, v2);
    let (i1, i2) = (image(&[&v1]), image(&[&v2]));
    assert_round_trip(&store, "v1", &i1);
    let rep = assert_round_trip(&store, "v2", &i2);
    assert_preflate("v2", &layers(&store, "v2")[0]);
    let frac = rep.stored_bytes as f64 / v2.len() as f64;
    eprintln!(
        "v2: {} bytes gzip layer, {} new bytes ({} on disk, {:.2}% of the layer)",
        v2.len(),
        rep.new_bytes,
        rep.stored_bytes,
        frac * 100.0
    );
    // The new skeleton and the reconstruction data (~0.2% of the layer), not the content.
    assert!(
        frac < 0.05,
        "v2 stored {:.2}% of its gzip layer",
        frac * 100.0
    );

    // Stored compressed, the same pair shares nothing past the first bytes:
    // what this replaces.
    let (_d2, raw_store) = new_store();
    let mut cut1 = i1.clone();
    let mut cut2 = i2.clone();
    // Not gzip any more (magic broken), so stored as plain chunks.
    for (img, gz) in [(&mut cut1, &v1), (&mut cut2, &v2)] {
        let at = find(img, gz).expect("blob in image");
        img[at] = 0;
    }
    add(&raw_store, "v1", &cut1);
    let raw = add(&raw_store, "v2", &cut2);
    eprintln!(
        "stored compressed, v2 would cost {} bytes on disk",
        raw.stored_bytes
    );
    assert!(raw.stored_bytes > 10 * rep.stored_bytes);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn fast_path_gc_and_verify_keep_gzip_layers() {
    let (_d, store) = new_store();
    let gz = gzip_with(&layer(40, 1_700_000_000, 11), 6);
    let img = image(&[&gz]);
    assert_round_trip(&store, "a", &img);
    // Added again: recognised by its digest and block map, nothing chunked,
    // and the layer still says how it is stored.
    let again = assert_round_trip(&store, "b", &img);
    assert!(
        again.new_bytes < 4096,
        "re-add stored {} new bytes",
        again.new_bytes
    );
    assert_eq!(layers(&store, "b"), layers(&store, "a"));
    // gc must keep the reconstruction stream and the plaintext node.
    wharf_format::maintenance::gc(&store, false).expect("gc");
    store.remove_ref("a").expect("rm");
    wharf_format::maintenance::gc(&store, false).expect("gc");
    let rep = wharf_format::maintenance::verify(&store, true).expect("verify");
    assert!(rep.errors.is_empty(), "verify: {:?}", rep.errors);
    assert_eq!(extract(&store, "b"), img);
    // And info reports the method.
    let info = wharf_format::maintenance::info(&store, "b").expect("info");
    let c = info.layers[0]
        .compression
        .as_ref()
        .expect("compression in info");
    assert_eq!(c.method, "preflate");
}

#[test]
fn damaged_reconstruction_data_fails_extract() {
    use wharf_format::recipe::NodeBody;
    let (_d, store) = new_store();
    let gz = gzip_with(&layer(30, 1_700_000_000, 12), 6);
    let img = image(&[&gz]);
    assert_round_trip(&store, "x", &img);
    let l = &layers(&store, "x")[0];
    let node = wharf_format::extract::load_node(&store, &l.node).expect("node");
    let NodeBody::Gzip { recon, .. } = &node.body else {
        panic!("not a gzip node: {node:?}")
    };
    assert_eq!(node.wharf_node, 2, "gzip nodes are node version 2");
    // A node whose reconstruction stream belongs to another layer rebuilds
    // other bytes: extract must notice, not emit them as this layer.
    let other = gzip_with(&layer(30, 1_700_000_000, 13), 6);
    assert_round_trip(&store, "y", &image(&[&other]));
    let on = wharf_format::extract::load_node(&store, &layers(&store, "y")[0].node).unwrap();
    let NodeBody::Gzip {
        recon: other_recon, ..
    } = on.body
    else {
        panic!("not a gzip node")
    };
    assert_ne!(&other_recon, recon);
    let mut forged = node.clone();
    if let NodeBody::Gzip { recon, .. } = &mut forged.body {
        *recon = other_recon;
    }
    let w = wharf_format::store::ChunkWriter::new(store.clone(), 1).unwrap();
    let id = w.put(&forged.encode()).unwrap();
    w.finish().unwrap();
    let res = wharf_format::extract::emit_node(&store, &id, "forged", &mut |_| Ok(()));
    assert!(
        res.is_err(),
        "a wrong reconstruction stream was not detected"
    );
}

// zstd layers: tests/zstd.rs.

/// A gzip layer as `skopeo copy docker-archive:… oci-archive:…` writes it
/// (skopeo 1.9.3, whose containers/image compresses with klauspost/pgzip,
/// as podman and buildah do): the first 330 KB of a Debian bookworm rootfs
/// layer from the corpus, cut at an entry and closed with two zero blocks.
/// `fixtures/README.md` says how it was made.
const PGZIP_LAYER: &[u8] = include_bytes!("fixtures/pgzip-debian-etc.tar.gz");

/// pgzip's encoder takes matches deeper down the match finder's chain than
/// stock preflate models (here: 15,281 hops, against 4,096), so by default
/// layers written by skopeo are stored as gzip bytes, and `info` says why;
/// with the deep model (`wharf add --gzip-deep`) they are stored by their
/// plaintext and rebuilt exactly.
#[test]
fn pgzip_layers_from_skopeo_round_trip_through_the_deep_model() {
    use wharf_format::gzip::DEEP_CHAIN;
    use wharf_format::ingest::{self, AddOptions};
    let (_d, store) = new_store();
    let stock = round_trip_blob(&store, "stock", PGZIP_LAYER);
    assert_raw_because("stock", &stock, "gzip", "max_chain 15281 is larger");
    // A store of its own: this one would reuse the known layer whole.
    let (_d2, store2) = new_store();
    let archive = image(&[PGZIP_LAYER]);
    let mut r: &[u8] = &archive;
    let opts = AddOptions {
        gzip_max_chain: Some(DEEP_CHAIN),
        ..AddOptions::default()
    };
    ingest::add(&store2, &mut r, "deep", &opts).unwrap();
    assert_eq!(extract(&store2, "deep"), archive, "deep: byte-identical");
    let deep = &layers(&store2, "deep")[0];
    assert_preflate("deep", deep);
    let c = deep.compression.as_ref().expect("compression recorded");
    assert_eq!(c.plain_len, Some(331_264));
}

/// Extract rebuilds the next gzip layer on a second thread while the stream
/// rebuilds the current one: the layers still come out in order and
/// byte-identical, and a layer that fails on that thread fails the extract,
/// naming what is corrupt, with nothing left behind.
#[test]
fn gzip_layers_rebuilt_ahead_stay_in_order_and_verified() {
    use wharf_format::backend::ObjectKind;
    let (_d, store) = new_store();
    let gz: Vec<Vec<u8>> = (0..4)
        .map(|i| gzip_with(&layer(25 + 5 * i, 1_700_000_000, 40 + i as u64), 6))
        .collect();
    let first: Vec<&[u8]> = gz[..3].iter().map(|g| g.as_slice()).collect();
    assert_round_trip(&store, "three", &image(&first));
    let packs_before = store.backend().list(ObjectKind::Pack).unwrap();
    // The same layers in another order, and a fourth whose chunks alone go
    // to a new pack.
    let all: Vec<&[u8]> = vec![&gz[2], &gz[0], &gz[3], &gz[1]];
    let img = image(&all);
    assert_round_trip(&store, "four", &img);
    assert!(layers(&store, "four").iter().all(|l| l
        .compression
        .as_ref()
        .is_some_and(|c| c.method == "preflate")));
    let fresh: Vec<String> = store
        .backend()
        .list(ObjectKind::Pack)
        .unwrap()
        .into_iter()
        .filter(|p| !packs_before.contains(p))
        .collect();
    assert_eq!(fresh.len(), 1, "one new pack: {fresh:?}");
    let path = store
        .backend()
        .local_path(ObjectKind::Pack, &fresh[0])
        .unwrap()
        .expect("a local pack");
    // The fourth layer's content is most of the new pack: damage its middle.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("four.tar");
    let err = wharf_format::extract::extract_to_file(&store, "four", &target, None)
        .expect_err("a damaged chunk of a layer rebuilt ahead was not noticed");
    let msg = err.to_string();
    assert!(
        msg.contains("chunk") && msg.contains("four"),
        "error does not say what is corrupt: {msg}"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "extract left a file behind"
    );
    // Nothing else is harmed.
    assert_eq!(extract(&store, "three"), image(&first));
}

/// Whether `add` found the pieces of a gzip layer rebuildable each from the
/// plaintext before it (so extract rebuilds them in parallel).
fn independent(store: &Arc<Store>, l: &LayerInfo) -> bool {
    match wharf_format::extract::load_node(store, &l.node)
        .expect("node")
        .body
    {
        wharf_format::recipe::NodeBody::Gzip { independent, .. } => independent,
        _ => panic!("{}: not a gzip node", l.path),
    }
}

/// The Rebuilder on its own, on a stream that `analyze` cut into pieces;
/// how many pieces it rebuilt from the plaintext before them.
fn rebuild_by_pieces(gz: &[u8], plain: &[u8], independent: bool) -> u64 {
    use wharf_format::gzip;
    let (mut spool, mut recon) = (Vec::new(), Vec::new());
    let mut input: &[u8] = gz;
    let a = gzip::analyze(&mut input, &mut spool, &mut recon, gzip::FAST_CHAIN).unwrap();
    a.outcome.expect("preflate models it");
    let mut rb = gzip::Rebuilder::with_pieces(std::io::Cursor::new(recon), independent).unwrap();
    let mut out = Vec::new();
    // Plaintext in uneven pieces, as extract pushes it.
    for part in plain.chunks(777_777) {
        rb.push(part, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    }
    let resumed = rb.pieces_resumed();
    rb.finish(&mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert!(
        out == gz,
        "rebuilt bytes differ (independent: {independent})"
    );
    resumed
}

/// zlib at levels 4-9 adds every position to its dictionary, so each piece
/// of a deflate stream can be rebuilt from the 32 KiB of plaintext before it,
/// on a thread of its own: the Rebuilder does so where a node allows it,
/// `add` checks it before it records that a node does, and extract relies on
/// it. Byte-identical either way, with matches reaching back across every
/// piece boundary; a stored node says so.
#[test]
fn pieces_of_a_deflate_stream_are_rebuilt_in_parallel_where_they_can_be() {
    // Several preflate windows (1 MiB of compressed input each) in one member.
    let mut tar = layer(120, 1_700_000_000, 15);
    tar.extend_from_slice(&noise(2_500_000, 15));
    let gz = gzip_with(&tar, 6);
    assert!(
        gz.len() > 3 << 20,
        "want several pieces, got {} bytes",
        gz.len()
    );
    assert!(rebuild_by_pieces(&gz, &tar, true) >= 2, "pieces resumed");
    assert_eq!(
        rebuild_by_pieces(&gz, &tar, false),
        0,
        "one by one when told"
    );
    let (_d, store) = new_store();
    let l = round_trip_blob(&store, "zlib-6", &gz);
    assert_preflate("zlib-6", &l);
    assert_eq!(hex::encode(sha2::Sha256::digest(&gz)), l.sha256);
    assert!(
        independent(&store, &l),
        "add recorded that pieces are independent"
    );
}
