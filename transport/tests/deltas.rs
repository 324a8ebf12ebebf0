//! Deltas end to end. A rebuilt layer (every tar header with a new mtime,
//! every `.pyc` with a new source timestamp, nothing else changed) must
//! cost about the bytes that changed, over every path (stream push, HTTP
//! push, bundle), and rebuild byte for byte; a base the receiver lacks is
//! never trusted; a corrupted delta is caught by the chunk's BLAKE3; and a
//! push whose deltas cannot be applied still completes, without them.
//!
//! The images are built here, from a seeded generator, so that every figure
//! the assertions compare against (bytes changed, chunks, layers) is
//! computed by the test itself.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use wharf_format::delta::{self, BaseRef, BaseResolver, SentIndex, StreamKind, WireDelta};
use wharf_format::extract::{extract_to_vec, load_recipe};
use wharf_format::ingest::{self, AddOptions};
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::TarWriter;
use wharf_format::ChunkId;
use wharf_transport::bundle;
use wharf_transport::http::{self, HttpClient, Tokens};
use wharf_transport::send::DeltaOptions;
use wharf_transport::session::{self, Client, TransferReport};
use wharf_transport::walk;

// ---------------------------------------------------------------------------
// The images
// ---------------------------------------------------------------------------

/// SplitMix64: deterministic, and good enough that content does not compress
/// away or repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..n.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .collect();
        v.truncate(n);
        v
    }

    /// A size spread the way file sizes are: log-uniform in `lo..hi`.
    fn size(&mut self, lo: usize, hi: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        (l + (h - l) * u).exp() as usize
    }

    /// Python-looking source: keywords and fresh identifiers, so it
    /// compresses like source does (a few times), not to nothing.
    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "def",
            "return",
            "self",
            "import",
            "numpy",
            "torch",
            "tensor",
            "shape",
            "None",
            "if",
            "else:",
            "for",
            "in",
            "range(",
            "len(",
            "class",
            "raise",
            "ValueError(",
            "with",
            "as",
            "yield",
            "lambda",
            "dtype",
            "device",
            "assert",
            "not",
            "and",
            "or",
            "=",
            "==",
            "+=",
            "(",
            ")",
            "[",
            "]",
            ",",
            ":",
            "0",
            "1",
            "-1",
            "\"\"\"",
            "# TODO",
        ];
        let mut out = Vec::with_capacity(n + 64);
        while out.len() < n {
            let indent = 4 * self.below(3) as usize;
            out.extend(std::iter::repeat_n(b' ', indent));
            for _ in 0..3 + self.below(8) {
                if self.below(3) == 0 {
                    out.extend_from_slice(format!("v_{:x}", self.next() & 0xf_ffff).as_bytes());
                } else {
                    out.extend_from_slice(
                        WORDS[self.below(WORDS.len() as u64) as usize].as_bytes(),
                    );
                }
                out.push(b' ');
            }
            out.push(b'\n');
        }
        out.truncate(n);
        out
    }
}

/// Build times of the two versions: a rebuild a week apart. The same number
/// of octal and decimal digits, so every change is in place.
const T1: u64 = 1_700_000_000;
const T2: u64 = 1_700_654_321;
const PKGS: usize = 24;
const MODS: usize = 10;

/// A layer both versions share byte for byte.
fn base_layer() -> Vec<u8> {
    let mut rng = Rng(0xba5e);
    let t = 1_690_000_000;
    let mut w = TarWriter::new(Vec::new());
    for d in ["etc/", "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/"] {
        w.dir(d, 0o755, t).unwrap();
    }
    for i in 0..40 {
        let n = rng.size(200, 4000);
        w.file(&format!("etc/conf{i}.d"), 0o644, t, &rng.text(n))
            .unwrap();
    }
    for i in 0..12 {
        let n = rng.size(10_000, 120_000);
        w.file(
            &format!("usr/lib/x86_64-linux-gnu/libthing{i}.so.1"),
            0o755,
            t,
            &rng.bytes(n),
        )
        .unwrap();
    }
    w.finish().unwrap();
    w.into_inner()
}

/// The layer the rebuild changes, as built at time `t`. Every random draw is
/// the same whatever `t`: only mtimes and `.pyc` timestamps differ.
struct Rebuilt {
    tar: Vec<u8>,
    /// Entries written (each with at least one header carrying an mtime).
    entries: usize,
    /// `.pyc` files, each with a 4-byte source timestamp that changes.
    pyc: usize,
}

fn rebuilt_layer(t: u64) -> Rebuilt {
    let mut rng = Rng(0x5eed);
    let mut w = TarWriter::new(Vec::new());
    let (mut entries, mut pyc) = (0, 0);
    // Per-file jitter of the mtime, the same in both builds.
    let mt = |rng: &mut Rng| t + rng.below(90);
    let sp = "usr/lib/python3.11/site-packages";
    for d in [
        "usr/",
        "usr/bin/",
        "usr/lib/",
        "usr/lib/python3.11/",
        "usr/share/",
    ] {
        w.dir(d, 0o755, mt(&mut rng)).unwrap();
        entries += 1;
    }
    w.dir(sp, 0o755, mt(&mut rng)).unwrap();
    entries += 1;
    for p in 0..PKGS {
        let pkg = format!("{sp}/pkg{p:02}");
        w.dir(&pkg, 0o755, mt(&mut rng)).unwrap();
        w.dir(&format!("{pkg}/__pycache__"), 0o755, mt(&mut rng))
            .unwrap();
        entries += 2;
        for m in 0..MODS {
            let n = rng.size(300, 24_000);
            let py = rng.text(n);
            let py_mtime = mt(&mut rng);
            w.file(&format!("{pkg}/mod{m}.py"), 0o644, py_mtime, &py)
                .unwrap();
            // A .pyc: magic, flags, the source's mtime, its size, then
            // marshalled code (random here).
            let mut c = b"\xa7\x0d\x0d\x0a\0\0\0\0".to_vec();
            c.extend_from_slice(&(py_mtime as u32).to_le_bytes());
            c.extend_from_slice(&(py.len() as u32).to_le_bytes());
            c.extend_from_slice(&rng.bytes(py.len() * 2 / 3 + 64));
            w.file(
                &format!("{pkg}/__pycache__/mod{m}.cpython-311.pyc"),
                0o644,
                mt(&mut rng),
                &c,
            )
            .unwrap();
            entries += 2;
            pyc += 1;
        }
        let n = rng.size(8_000, 160_000);
        w.file(
            &format!("{pkg}/_native.so"),
            0o755,
            mt(&mut rng),
            &rng.bytes(n),
        )
        .unwrap();
        entries += 1;
    }
    // The odd corners of tar.
    let doc = "usr/share/doc/a-package-with-a-rather-long-directory-name";
    w.dir(doc, 0o755, mt(&mut rng)).unwrap();
    // One path component over 100 bytes cannot be split: a PAX path record.
    let long = format!("{doc}/{}.txt", "a-very-long-file-name-".repeat(6));
    let n = rng.size(500, 5000);
    w.file(&long, 0o644, mt(&mut rng), &rng.text(n)).unwrap();
    // A PAX header forced, with a sub-second mtime that the rebuild changes.
    let precise = format!("{}.123456789", mt(&mut rng));
    w.pax_file(
        &format!("{doc}/precise.txt"),
        &[("mtime", &precise)],
        0o644,
        mt(&mut rng),
        &rng.text(2000),
    )
    .unwrap();
    // A non-ASCII name: PAX again.
    w.file(
        &format!("{doc}/naïve-résumé.txt"),
        0o644,
        mt(&mut rng),
        &rng.text(700),
    )
    .unwrap();
    // A GNU long name ('L' entry).
    w.gnu_longname_file(
        &format!("{doc}/{}", "gnu-style-long-name-".repeat(8)),
        0o644,
        mt(&mut rng),
        &rng.bytes(5000),
    )
    .unwrap();
    // Empty files.
    w.file(&format!("{doc}/EMPTY"), 0o644, mt(&mut rng), &[])
        .unwrap();
    w.file(&format!("{sp}/pkg00/py.typed"), 0o644, mt(&mut rng), &[])
        .unwrap();
    // A binary, a hard link to it and a symlink.
    w.file(
        "usr/bin/python3.11",
        0o755,
        mt(&mut rng),
        &rng.bytes(40_000),
    )
    .unwrap();
    w.hardlink("usr/bin/python3", "usr/bin/python3.11", mt(&mut rng))
        .unwrap();
    w.symlink("usr/bin/python", "python3", mt(&mut rng))
        .unwrap();
    // Whiteouts: a deleted package and an opaque directory.
    w.whiteout(&format!("{sp}/.wh.old_package"), mt(&mut rng))
        .unwrap();
    w.whiteout("usr/share/.wh..wh..opq", mt(&mut rng)).unwrap();
    entries += 12;
    w.finish().unwrap();
    Rebuilt {
        tar: w.into_inner(),
        entries,
        pyc,
    }
}

fn hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// A `docker save` archive in the legacy layout: config, one directory per
/// layer (ids derived from content, as Docker's are), manifest.json.
fn image(t: u64) -> (Vec<u8>, Rebuilt) {
    let a = base_layer();
    let b = rebuilt_layer(t);
    let (da, db) = (hex(&a), hex(&b.tar));
    let config = format!(
        r#"{{"architecture":"amd64","created":{t},"os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{da}","sha256:{db}"]}}}}"#
    );
    let cfg = hex(config.as_bytes());
    let ida = hex(da.as_bytes());
    let idb = hex(format!("{ida}{db}").as_bytes());
    let mut w = TarWriter::new(Vec::new());
    w.file(&format!("{cfg}.json"), 0o644, t, config.as_bytes())
        .unwrap();
    for (id, parent, layer) in [(&ida, "", &a), (&idb, ida.as_str(), &b.tar)] {
        let json = format!(r#"{{"id":"{id}","parent":"{parent}","created":{t}}}"#);
        w.dir(id, 0o755, t).unwrap();
        w.file(&format!("{id}/VERSION"), 0o644, t, b"1.0").unwrap();
        w.file(&format!("{id}/json"), 0o644, t, json.as_bytes())
            .unwrap();
        w.file(&format!("{id}/layer.tar"), 0o644, t, layer).unwrap();
    }
    let manifest = format!(
        r#"[{{"Config":"{cfg}.json","RepoTags":["app:latest"],"Layers":["{ida}/layer.tar","{idb}/layer.tar"]}}]"#
    );
    w.file("manifest.json", 0o644, 0, manifest.as_bytes())
        .unwrap();
    let repos = format!(r#"{{"app":{{"latest":"{idb}"}}}}"#);
    w.file("repositories", 0o644, 0, repos.as_bytes()).unwrap();
    w.finish().unwrap();
    (w.into_inner(), b)
}

struct Images {
    v1: Vec<u8>,
    v2: Vec<u8>,
    /// Entries of the rebuilt layer, and its `.pyc` files.
    entries: usize,
    pyc: usize,
}

fn images() -> &'static Images {
    static I: OnceLock<Images> = OnceLock::new();
    I.get_or_init(|| {
        let (v1, r1) = image(T1);
        let (v2, r2) = image(T2);
        assert_eq!((r1.entries, r1.pyc), (r2.entries, r2.pyc));
        Images {
            v1,
            v2,
            entries: r2.entries,
            pyc: r2.pyc,
        }
    })
}

// ---------------------------------------------------------------------------
// Stores and sessions
// ---------------------------------------------------------------------------

fn store(dir: &tempfile::TempDir, name: &str) -> Arc<Store> {
    Arc::new(Store::init(&dir.path().join(name), StoreConfig::default()).unwrap())
}

fn add(s: &Arc<Store>, name: &str, b: &[u8]) {
    let mut r: &[u8] = b;
    ingest::add(s, &mut r, name, &AddOptions::default()).unwrap();
}

/// A sender holding both builds.
fn sender(d: &tempfile::TempDir) -> Arc<Store> {
    let s = store(d, "src");
    add(&s, "app:v1", &images().v1);
    add(&s, "app:v2", &images().v2);
    s
}

/// A receiver holding v1 only.
fn receiver(d: &tempfile::TempDir, name: &str) -> Arc<Store> {
    let s = store(d, name);
    add(&s, "app:v1", &images().v1);
    s
}

const NO_DELTAS: DeltaOptions = DeltaOptions {
    enabled: false,
    level: wharf_format::similar::DEFAULT_LEVEL,
    header_deltas: false,
};

type ServerThread = std::thread::JoinHandle<Result<(), wharf_transport::Error>>;

/// A server on `dst` in a thread; returns the client's end of the stream.
fn spawn_server(dst: &Arc<Store>) -> (UnixStream, ServerThread) {
    let (a, b) = UnixStream::pair().unwrap();
    let s = dst.clone();
    let server = std::thread::spawn(move || {
        let mut input = b.try_clone().unwrap();
        let mut output = b;
        session::serve(s, &mut input, &mut output, false)
    });
    (a, server)
}

/// Pushes `app:v2` from `src` to a server on `dst` over a byte stream.
fn push_stream(src: &Arc<Store>, dst: &Arc<Store>, opts: DeltaOptions) -> TransferReport {
    let (a, server) = spawn_server(dst);
    let mut client = Client::connect(a.try_clone().unwrap(), a, "push").unwrap();
    let rep = client.push(src, "app:v2", "app:v2", opts, &|_| {}).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
    rep
}

/// Pushes `app:v2` from `src` to an HTTP server on `dst`.
fn push_http(src: &Arc<Store>, dst: &Arc<Store>, opts: DeltaOptions) -> TransferReport {
    let tokens = Tokens {
        push: Some("push-secret".into()),
        read: None,
    };
    let addr = http::spawn(dst.clone(), "127.0.0.1:0", tokens).unwrap();
    let c = HttpClient::connect(&format!("http://{addr}"), Some("push-secret".into())).unwrap();
    c.push(src, "app:v2", "app:v2", opts, &|_| {}).unwrap()
}

/// The chunks of image `new` that image `old` does not have, in closure order.
fn new_chunks(s: &Store, old: &ChunkId, new: &ChunkId) -> Vec<ChunkId> {
    let old: HashSet<ChunkId> = walk::image_chunks(s, old, &HashSet::new())
        .unwrap()
        .into_iter()
        .collect();
    walk::image_chunks(s, new, &HashSet::new())
        .unwrap()
        .into_iter()
        .filter(|c| !old.contains(c))
        .collect()
}

fn write_bundle(src: &Arc<Store>, have: &[&str], opts: DeltaOptions) -> (Vec<u8>, TransferReport) {
    let have: Vec<String> = have.iter().map(|s| s.to_string()).collect();
    let mut out = Vec::new();
    let rep = bundle::write_bundle(src, "app:v2", &have, &HashSet::new(), opts, &mut out).unwrap();
    (out, rep)
}

/// `name` in `s` extracts to exactly `want`.
fn assert_extracts(s: &Arc<Store>, name: &str, want: &[u8]) {
    let got = extract_to_vec(s, name).unwrap();
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{name} extracts to {} bytes, expected {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

fn assert_verifies(s: &Store) {
    let v = wharf_format::maintenance::verify(s, true).unwrap();
    assert!(v.errors.is_empty(), "verify: {:?}", v.errors);
}

/// Frames of a bundle (after its magic) or of a session stream:
/// (offset of the payload, type byte, payload length).
fn frames(b: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= b.len() {
        let len = u32::from_le_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
        assert!(len >= 1 && pos + 4 + len <= b.len(), "bad frame at {pos}");
        out.push((pos + 5, b[pos + 4], len - 1));
        pos += 4 + len;
    }
    assert_eq!(pos, b.len(), "trailing bytes after the last frame");
    out
}

const PUT_DELTA: u8 = 0x1a;

/// Bytes a delta rebuilds: all the chunks it carries.
fn raw_total(d: &WireDelta) -> usize {
    d.targets.iter().map(|t| t.1 as usize).sum()
}

/// The deltas of every PUT_DELTA frame of a bundle, each with the offset of
/// its zstd frame inside the bundle.
fn bundle_deltas(b: &[u8]) -> Vec<(usize, WireDelta)> {
    assert!(
        &b[..8] == bundle::BUNDLE_MAGIC_DELTAS || &b[..8] == bundle::BUNDLE_MAGIC_HEADER_DELTAS,
        "not a bundle with deltas: {:?}",
        &b[..8]
    );
    let mut out = Vec::new();
    for (off, kind, len) in frames(&b[8..]) {
        if kind != PUT_DELTA {
            continue;
        }
        let payload = &b[8 + off..8 + off + len];
        // Deltas follow each other in the payload: find each one's bytes
        // after the previous one's.
        let mut from = 0;
        for d in delta::decode_frame(payload).unwrap() {
            let n = d.delta.len();
            let at = from
                + payload[from..]
                    .windows(n)
                    .position(|w| w == &d.delta[..])
                    .unwrap();
            from = at + n;
            out.push((8 + off + at, d));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// A rebuild that changed a few bytes in every header and every `.pyc`
/// costs a small multiple of those bytes, and far less than without deltas.
#[test]
fn a_rebuild_costs_about_the_bytes_that_changed() {
    let img = images();
    // Every change is in place (same lengths, same layout), so the bytes that
    // changed are exactly the positions where the two tars differ: the 4-byte
    // `.pyc` timestamps, the mtime and checksum digits of every header (PAX
    // records included), and the outer tar's ids and config.
    assert_eq!(img.v1.len(), img.v2.len());
    let changed = img.v1.iter().zip(&img.v2).filter(|(a, b)| a != b).count() as u64;
    // At least one byte per .pyc timestamp and per header mtime.
    assert!(
        changed >= (img.pyc + img.entries) as u64,
        "only {changed} bytes differ: the generator is broken"
    );
    // At most what the generator changed: 4 bytes per .pyc, per header the
    // 11 mtime and 6 checksum digits (20 with a PAX record's), and a few KB of
    // ids in the outer tar.
    assert!(changed <= (4 * img.pyc + 20 * img.entries + 4096) as u64);

    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let (with, without) = (receiver(&d, "with"), receiver(&d, "without"));
    let rep = push_stream(&src, &with, DeltaOptions::default());
    let plain = push_stream(&src, &without, NO_DELTAS);
    assert_extracts(&with, "app:v2", &img.v2);
    assert_extracts(&without, "app:v2", &img.v2);
    assert_verifies(&with);
    assert!(rep.delta_chunks > 0, "{rep:?}");
    assert_eq!(plain.delta_chunks, 0, "{plain:?}");
    assert_eq!(
        rep.chunks_sent, plain.chunks_sent,
        "deltas must not change which chunks are sent"
    );

    // What a push costs besides the chunks: HELLO (~100 bytes), HAS_LAYERS
    // and HAS for each candidate base's root and recipe, HAS_LAYERS for each
    // layer, then HAS for at most every chunk id of v2 once (32 bytes each),
    // PUBLISH (~200 bytes of JSON), BYE, and 5 bytes per frame (a handful:
    // 4096 ids per HAS, 8 MiB per PUT).
    let recipe = src.require_ref("app:v2").unwrap().recipe;
    let n_chunks = walk::image_chunks(&src, &recipe, &HashSet::new())
        .unwrap()
        .len() as u64;
    let n_layers = load_recipe(&src, &recipe).unwrap().layers.len() as u64 + 1;
    let n_bases = src.list_refs().unwrap().len() as u64;
    let negotiation = 32 * (n_chunks + n_layers + 2 * n_bases) + 1024;
    eprintln!(
        "rebuild: {} byte image, {} bytes changed ({} .pyc, {} entries); {} chunks in v2, \
         {} sent ({} as deltas: {} bytes of delta frames for {} raw bytes, {} as stored); \
         wire out with deltas {} bytes, without {} bytes; negotiation allowance {negotiation}",
        img.v2.len(),
        changed,
        img.pyc,
        img.entries,
        n_chunks,
        rep.chunks_sent,
        rep.delta_chunks,
        rep.delta_bytes,
        rep.delta_raw_bytes,
        rep.delta_instead_of,
        rep.wire_bytes_out,
        plain.wire_bytes_out,
    );
    assert!(
        rep.wire_bytes_out <= 8 * changed + negotiation,
        "{} bytes on the wire for {changed} bytes changed (allowance {negotiation})",
        rep.wire_bytes_out
    );
    assert!(
        rep.wire_bytes_out * 10 < plain.wire_bytes_out,
        "with deltas {} bytes, without {}",
        rep.wire_bytes_out,
        plain.wire_bytes_out
    );
    assert!(rep.delta_bytes < rep.delta_instead_of / 10, "{rep:?}");
}

/// Skeleton chunks of a rebuild travel as header deltas (references to the
/// old headers with their new mtimes) when the receiver decodes them: far
/// smaller than zstd's own delta of the same bytes, byte-identical on
/// arrival, and never sent to a receiver that did not say it decodes them.
#[test]
fn header_deltas_are_smaller_and_go_only_to_receivers_that_decode_them() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let older = DeltaOptions {
        header_deltas: false,
        ..DeltaOptions::default()
    };
    let (b_old, rep_old) = write_bundle(&src, &["app:v1"], older);
    let (b_new, rep_new) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    assert_eq!(&b_old[..8], bundle::BUNDLE_MAGIC_DELTAS);
    assert_eq!(&b_new[..8], bundle::BUNDLE_MAGIC_HEADER_DELTAS);
    let is_hdr = |d: &WireDelta| d.delta.starts_with(wharf_format::hdrdelta::MAGIC);
    assert!(
        !bundle_deltas(&b_old).iter().any(|(_, d)| is_hdr(d)),
        "a header delta in a bundle for a receiver that does not decode them"
    );
    assert_eq!(rep_old.chunks_sent, rep_new.chunks_sent);

    // Each header delta against zstd's delta of the same chunk and base.
    let resolver = BaseResolver::new(src.clone());
    let none = SentIndex::default();
    let (mut n, mut hdr_bytes, mut zstd_bytes, mut raw_bytes) = (0, 0, 0, 0);
    for (_, d) in bundle_deltas(&b_new) {
        if !is_hdr(&d) {
            continue;
        }
        let base = resolver.base_bytes(&d.bases, &none).unwrap();
        let raw = delta::decode(&base, &d.delta, raw_total(&d)).unwrap();
        n += 1;
        hdr_bytes += d.delta.len();
        zstd_bytes += delta::encode_headers(&base, &raw).unwrap().len();
        raw_bytes += raw.len();
    }
    eprintln!(
        "{n} header deltas: {hdr_bytes} bytes for {raw_bytes} bytes of skeleton \
         (zstd's delta of the same: {zstd_bytes}); bundle {} bytes, {} without header deltas",
        b_new.len(),
        b_old.len()
    );
    assert!(n > 0, "no skeleton chunk went as a header delta");
    assert!(
        hdr_bytes * 4 < zstd_bytes,
        "header deltas {hdr_bytes} bytes, zstd deltas {zstd_bytes}"
    );
    assert!(b_new.len() < b_old.len());

    for (b, name) in [(&b_old, "older"), (&b_new, "newer")] {
        let r = receiver(&d, name);
        bundle::read_bundle(&r, &mut &b[..]).unwrap();
        assert_extracts(&r, "app:v2", &img.v2);
        assert_verifies(&r);
    }

    // A peer's HELLO decides: without the feature, no header deltas.
    let peer = |features: &[&str]| session::Hello {
        protocol: wharf_transport::PROTOCOL_VERSION,
        software: "wharf test".into(),
        role: "server".into(),
        read_only: false,
        features: features.iter().map(|f| f.to_string()).collect(),
    };
    let opts = DeltaOptions::default();
    assert!(!opts.for_peer(&peer(&["deltas"])).header_deltas);
    assert!(!opts.for_peer(&peer(&[session::HEADER_DELTAS])).enabled);
    let both = opts.for_peer(&peer(&["deltas", session::HEADER_DELTAS]));
    assert!(both.enabled && both.header_deltas);
}

/// An HTTP server makes header deltas for a pull only when the get-delta
/// request says its client decodes them: a client from before header deltas
/// sends no query and must get zstd deltas only.
#[test]
fn an_http_server_sends_header_deltas_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let v1 = src.require_ref("app:v1").unwrap().recipe;
    let v2 = src.require_ref("app:v2").unwrap().recipe;
    let want = new_chunks(&src, &v1, &v2);
    // k = 1 base, the target, the base, then the wanted ids
    // (PROTOCOL-HTTP.md, POST /v1/get-delta).
    let mut body = 1u32.to_le_bytes().to_vec();
    for id in [v2, v1].iter().chain(&want) {
        body.extend_from_slice(&id.0);
    }
    let addr = http::spawn(src.clone(), "127.0.0.1:0", Tokens::default()).unwrap();
    let header_deltas_in = |query: &str| -> usize {
        let mut res = ureq::post(&format!("http://{addr}/v1/get-delta{query}"))
            .header(
                http::VERSION_HEADER,
                &wharf_transport::PROTOCOL_VERSION.to_string(),
            )
            .send(&body[..])
            .unwrap();
        let reply = res
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap();
        let mut n = 0;
        for (off, kind, len) in frames(&reply) {
            if kind == PUT_DELTA {
                n += delta::decode_frame(&reply[off..off + len])
                    .unwrap()
                    .iter()
                    .filter(|d| d.delta.starts_with(wharf_format::hdrdelta::MAGIC))
                    .count();
            }
        }
        n
    };
    assert_eq!(
        header_deltas_in(""),
        0,
        "header deltas for a client that did not ask"
    );
    assert!(
        header_deltas_in("?header-deltas=1") > 0,
        "no header delta when asked"
    );
}

/// Objects that name other objects (a node its list's pieces) are encoded
/// in a later wave than those, so that their deltas can name them with a
/// `Sent` base instead of spelling every id.
#[test]
fn objects_come_after_the_objects_they_name() {
    // Small chunks: the rebuilt layer's data list then has more entries
    // than a node holds, and is cut into pieces that its node names.
    let d = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        chunking: wharf_format::chunker::ChunkParams {
            min: 256,
            avg: 1024,
            max: 4096,
        },
        ..StoreConfig::default()
    };
    let s = Arc::new(Store::init(&d.path().join("small"), cfg).unwrap());
    let img = images();
    add(&s, "app:v1", &img.v1);
    add(&s, "app:v2", &img.v2);
    let v1 = s.require_ref("app:v1").unwrap().recipe;
    let v2 = s.require_ref("app:v2").unwrap().recipe;
    let planner = wharf_transport::send::planner(
        &s,
        &v2,
        &wharf_transport::send::Bases {
            images: vec![v1],
            recipes_held: true,
        },
        DeltaOptions::default(),
    )
    .unwrap()
    .expect("a planner");
    // Parents first: the order that would keep them from naming children.
    let mut objects: Vec<ChunkId> = new_chunks(&s, &v1, &v2)
        .into_iter()
        .filter(|c| planner.is_object(c))
        .collect();
    objects.reverse();
    let names = |id: &ChunkId| -> Vec<ChunkId> {
        let b = s.read_chunk(id).unwrap();
        match wharf_format::recipe::Node::decode(&b, id) {
            Ok(n) => [StreamKind::Skeleton, StreamKind::Data, StreamKind::Recon]
                .iter()
                .filter_map(|k| k.of(&n))
                .flat_map(|r| r.entries.iter().map(|e| e.0))
                .collect(),
            Err(_) => wharf_format::list::decode_entries(&b, id)
                .map(|es| es.iter().map(|e| e.0).collect())
                .unwrap_or_default(),
        }
    };
    let waves = planner.object_waves(&objects).unwrap();
    let wave_of: std::collections::HashMap<ChunkId, usize> = waves
        .iter()
        .enumerate()
        .flat_map(|(w, ids)| ids.iter().map(move |id| (*id, w)))
        .collect();
    assert_eq!(wave_of.len(), objects.len(), "every object in one wave");
    assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), objects.len());
    let mut edges = 0;
    for o in &objects {
        for n in names(o) {
            if let Some(w) = wave_of.get(&n) {
                edges += 1;
                assert!(
                    w < &wave_of[o],
                    "{o} is sent with or before {n}, which it names"
                );
            }
        }
    }
    assert!(
        edges > 0,
        "no object names another: the test image is too small"
    );
}

/// The two images of [`deep_lists`]: a tar of one 12 MiB file of random
/// bytes, and the same with `changes` 4-byte changes at random places.
fn deep_list_tars(changes: usize) -> [Vec<u8>; 2] {
    let mut rng = Rng(0xdee9);
    let v1 = rng.bytes(12 << 20);
    let mut v2 = v1.clone();
    for _ in 0..changes {
        let at = rng.below(v2.len() as u64 - 4) as usize;
        v2[at..at + 4].copy_from_slice(&rng.bytes(4));
    }
    [v1, v2].map(|data| {
        let mut w = TarWriter::new(Vec::new());
        w.file("big.bin", 0o644, T1, &data).unwrap();
        w.finish().unwrap();
        w.into_inner()
    })
}

/// The planner pairs only what changed: a layer both images share is held
/// by the receiver whole, so nothing of it is read or planned (on a
/// multi-GB image that was most of the planner's time).
#[test]
fn the_planner_leaves_alone_layers_the_receiver_holds() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let v1 = src.require_ref("app:v1").unwrap().recipe;
    let v2 = src.require_ref("app:v2").unwrap().recipe;
    // The images share their first layer (same node), not their second.
    let (l1, l2) = (
        load_recipe(&src, &v1).unwrap().layers,
        load_recipe(&src, &v2).unwrap().layers,
    );
    assert_eq!(l1[0].node, l2[0].node);
    assert_ne!(l1[1].node, l2[1].node);
    let resolver = Arc::new(BaseResolver::new(src.clone()));
    let p = wharf_format::similar::DeltaPlanner::new(
        resolver,
        &v2,
        &[v1],
        wharf_format::similar::DEFAULT_LEVEL,
    )
    .unwrap();
    // The outer tar and the rebuilt layer; not the shared base layer.
    assert_eq!(p.stats.nodes_paired, 2, "{:?}", p.stats);
    // Files with contents: the rebuilt layer's and the outer tar's seven
    // (config, two VERSION, two json, manifest.json, repositories); the
    // base layer's 52 are not looked at.
    let outer_files = 7;
    assert!(
        p.stats.files_total <= (img.entries + outer_files) as u64,
        "{:?}",
        p.stats
    );
}

/// The set of chunks a receiver holding base images need not be asked
/// about is exactly every chunk of those images.
#[test]
fn the_closure_of_base_images_is_every_chunk_of_them() {
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let v1 = src.require_ref("app:v1").unwrap().recipe;
    let v2 = src.require_ref("app:v2").unwrap().recipe;
    let mut want: HashSet<ChunkId> = HashSet::new();
    for r in [v1, v2] {
        want.extend(walk::image_chunks(&src, &r, &HashSet::new()).unwrap());
    }
    let got = walk::closure_of(&src, &[v1, v2]).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(want.iter().all(|id| got.contains(id)));
    let only_v1 = walk::closure_of(&src, &[v1]).unwrap();
    let in_v1: HashSet<ChunkId> = walk::image_chunks(&src, &v1, &HashSet::new())
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(only_v1.len(), in_v1.len());
    let v2_only: Vec<ChunkId> = walk::image_chunks(&src, &v2, &HashSet::new())
        .unwrap()
        .into_iter()
        .filter(|id| !in_v1.contains(id))
        .collect();
    assert!(!v2_only.is_empty());
    assert!(v2_only.iter().all(|id| !only_v1.contains(id)));
}

/// Only bases the receiver holds are used: none when it holds no version,
/// and a bundle made with `--have` of an image the store lacks fails
/// cleanly.
#[test]
fn bases_the_receiver_lacks_are_never_used() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let empty = store(&d, "empty");
    let rep = push_stream(&src, &empty, DeltaOptions::default());
    assert_eq!(rep.delta_chunks, 0, "{rep:?}");
    assert_extracts(&empty, "app:v2", &img.v2);
    assert_verifies(&empty);
    // Nor were deltas tried and then dropped by the fallback (whose report
    // would also show none): the push cost what one without deltas costs,
    // plus only the question about the candidate base (its root and recipe).
    let plain = push_stream(&src, &store(&d, "empty2"), NO_DELTAS);
    let n_bases = src.list_refs().unwrap().len() as u64;
    assert!(
        rep.wire_bytes_out <= plain.wire_bytes_out + n_bases * 2 * (32 + 5),
        "with deltas allowed {} bytes, without {}",
        rep.wire_bytes_out,
        plain.wire_bytes_out
    );

    // A bundle that assumes v1 on a store without it.
    let (b, brep) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    assert!(brep.delta_chunks > 0, "{brep:?}");
    let lacking = store(&d, "lacking");
    let err = bundle::read_bundle(&lacking, &mut &b[..])
        .expect_err("a bundle against a missing base was applied")
        .to_string();
    assert!(
        err.contains("could not be applied") && err.contains("missing"),
        "{err}"
    );
    assert!(lacking.list_refs().unwrap().is_empty(), "a name appeared");
    assert_verifies(&lacking);

    // That store now holds some of v2's chunks but no published image: still
    // no base, and a push fills in the rest.
    let rep = push_stream(&src, &lacking, DeltaOptions::default());
    assert_eq!(rep.delta_chunks, 0, "{rep:?}");
    assert!(rep.chunks_sent < rep.chunks_total, "{rep:?}");
    assert_extracts(&lacking, "app:v2", &img.v2);
    assert_verifies(&lacking);
}

/// A byte flipped inside a delta: the rebuilt chunk fails its BLAKE3 check,
/// nothing is published, the store stays clean. And a base shifted by one
/// byte gives an error, never a wrong chunk.
#[test]
fn a_corrupted_delta_is_caught_by_the_chunks_hash() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let dst = receiver(&d, "dst");
    let (b, rep) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    let deltas = bundle_deltas(&b);
    let carried: usize = deltas.iter().map(|(_, d)| d.targets.len()).sum();
    assert_eq!(carried as u64, rep.delta_chunks);
    let resolver = BaseResolver::new(dst.clone());
    // Deltas that lean only on what the receiver held before the transfer
    // (no `Sent` base, which names chunks rebuilt earlier in the frame)
    // can be applied one by one.
    let none_sent = SentIndex::default();
    let deltas: Vec<&(usize, WireDelta)> = deltas
        .iter()
        .filter(|(_, d)| !d.bases.iter().any(|b| matches!(b, BaseRef::Sent { .. })))
        .collect();

    // Unit level: each delta that leans on its base (far smaller than the
    // chunk) applies as sent, and fails with its ranges shifted by a byte.
    let mut shifted = 0;
    for (_, d) in deltas.iter().copied() {
        let leans = d.delta.len() * 8 < raw_total(d);
        if !leans || shifted >= 8 {
            continue;
        }
        let good = resolver.apply(d, &none_sent).unwrap();
        assert_eq!(good.len(), d.targets.len());
        for ((id, raw), (check, len)) in good.iter().zip(&d.targets) {
            assert_eq!(
                (&id.0[..check.len()], raw.len()),
                (&check[..], *len as usize)
            );
        }
        let mut bad = d.clone();
        let mut moved = false;
        for base in &mut bad.bases {
            if let BaseRef::Range {
                node,
                stream,
                off,
                len,
            } = base
            {
                let end = resolver.stream_len(node, *stream).unwrap();
                if *off + *len < end {
                    *off += 1;
                } else if *off > 0 {
                    *off -= 1;
                } else {
                    continue;
                }
                moved = true;
            }
        }
        if !moved {
            continue;
        }
        // An error, or (should the delta not read the shifted bytes) the
        // right chunks: never others.
        match resolver.apply(&bad, &none_sent) {
            Ok(got) => assert!(
                got == good,
                "a shifted base rebuilt chunks {:?}, the delta's are {:?}",
                got.iter().map(|c| c.0).collect::<Vec<_>>(),
                good.iter().map(|c| c.0).collect::<Vec<_>>()
            ),
            Err(e) => {
                assert!(
                    e.to_string().contains("delta"),
                    "unexpected error for a shifted base: {e}"
                );
                shifted += 1;
            }
        }
    }
    assert!(shifted > 0, "no delta failed with its range bases shifted");

    // A flip that zstd decodes without complaint (a literal byte: the
    // frames carry no zstd checksum) so that only the BLAKE3 check can
    // catch it.
    let mut flip: Option<usize> = None;
    'find: for (at, d) in deltas.iter().copied() {
        let base = resolver.base_bytes(&d.bases, &none_sent).unwrap();
        let good = delta::decode(&base, &d.delta, raw_total(d)).unwrap();
        for i in (0..d.delta.len()).rev() {
            let mut z = d.delta.clone();
            z[i] ^= 0x01;
            if let Ok(out) = delta::decode(&base, &z, raw_total(d)) {
                if out != good {
                    flip = Some(at + i);
                    break 'find;
                }
            }
        }
    }
    let flip = flip.expect("no byte of any delta decodes to a wrong chunk when flipped");
    let mut bad = b.clone();
    bad[flip] ^= 0x01;
    let err = bundle::read_bundle(&dst, &mut &bad[..])
        .expect_err("a corrupted delta was applied")
        .to_string();
    assert!(
        err.contains("could not be applied") && err.contains("does not start with"),
        "{err}"
    );
    assert!(dst.get_ref("app:v2").unwrap().is_none(), "a name appeared");
    assert_verifies(&dst);

    // The bundle as written still applies on that store: the flip was the
    // only problem, and it left nothing behind that gets in the way.
    let names = bundle::read_bundle(&dst, &mut &b[..]).unwrap();
    assert_eq!(names, vec!["app:v2".to_string()]);
    assert_extracts(&dst, "app:v2", &img.v2);
    assert_verifies(&dst);
}

/// Stream push, HTTP push and bundle each use deltas and rebuild v2 byte
/// for byte, odd tar entries included.
#[test]
fn every_path_rebuilds_exactly_with_deltas() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);

    let s = receiver(&d, "stream");
    let rep = push_stream(&src, &s, DeltaOptions::default());
    assert!(rep.delta_chunks > 0, "stream: {rep:?}");
    assert_extracts(&s, "app:v2", &img.v2);
    assert_verifies(&s);

    let h = receiver(&d, "http");
    let rep_h = push_http(&src, &h, DeltaOptions::default());
    assert!(rep_h.delta_chunks > 0, "http: {rep_h:?}");
    assert_eq!(
        (rep_h.chunks_sent, rep_h.delta_chunks),
        (rep.chunks_sent, rep.delta_chunks)
    );
    assert_extracts(&h, "app:v2", &img.v2);
    assert_verifies(&h);

    let u = receiver(&d, "bundle");
    let (b, rep_b) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    assert!(rep_b.delta_chunks > 0, "bundle: {rep_b:?}");
    assert_eq!(rep_b.wire_bytes_out, b.len() as u64);
    let names = bundle::read_bundle(&u, &mut &b[..]).unwrap();
    assert_eq!(names, vec!["app:v2".to_string()]);
    assert_extracts(&u, "app:v2", &img.v2);
    assert_verifies(&u);

    // A bundle made from a have file instead of a name finds the same base.
    let f = receiver(&d, "have-file");
    let mut have = Vec::new();
    bundle::write_have(&f, &mut have).unwrap();
    let have = bundle::read_have(&mut &have[..]).unwrap();
    let mut b2 = Vec::new();
    let rep_f =
        bundle::write_bundle(&src, "app:v2", &[], &have, DeltaOptions::default(), &mut b2).unwrap();
    assert!(rep_f.delta_chunks > 0, "have file: {rep_f:?}");
    assert_eq!(
        bundle::read_bundle(&f, &mut &b2[..]).unwrap(),
        vec!["app:v2".to_string()]
    );
    assert_extracts(&f, "app:v2", &img.v2);
    assert_verifies(&f);
    eprintln!(
        "paths: stream {} bytes out ({} deltas), http {} bytes out, bundle {} bytes, \
         bundle from a have file {} bytes",
        rep.wire_bytes_out,
        rep.delta_chunks,
        rep_h.wire_bytes_out,
        b.len(),
        b2.len()
    );
}

/// Flips a byte of chunk `id` where its pack lies on disk: bit rot.
fn rot_chunk(s: &Store, id: &ChunkId) {
    let loc = s.lookup(id).unwrap();
    let want = format!("{}.pack", loc.pack.name());
    fn find(dir: &std::path::Path, want: &str) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p, want) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == want) {
                return Some(p);
            }
        }
        None
    }
    let path = find(&std::path::PathBuf::from(s.location()).join("packs"), &want)
        .expect("the chunk's pack file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + loc.stored_len as usize / 2] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    assert!(s.read_chunk(id).is_err(), "the rot went unnoticed");
}

/// A data chunk of v1's rebuilt layer, from the middle, that v2 does not use.
fn v1_only_data_chunk(s: &Arc<Store>, src: &Store) -> ChunkId {
    let v1 = load_recipe(s, &s.require_ref("app:v1").unwrap().recipe).unwrap();
    let v2_recipe = src.require_ref("app:v2").unwrap().recipe;
    let v2: HashSet<ChunkId> = walk::image_chunks(src, &v2_recipe, &HashSet::new())
        .unwrap()
        .into_iter()
        .collect();
    let layer = v1
        .layers
        .iter()
        .max_by_key(|l| l.len)
        .expect("a layer")
        .node;
    let resolver = BaseResolver::new(s.clone());
    let data: Vec<ChunkId> = resolver
        .stream_chunks(&layer, StreamKind::Data)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.0)
        .filter(|c| !v2.contains(c))
        .collect();
    assert!(
        data.len() > 10,
        "the rebuilt layer should change every data chunk"
    );
    data[data.len() / 2]
}

/// Deltas against a base the receiver cannot read (a rotten chunk of v1):
/// the push goes on without deltas, keeps what the deltas did rebuild, sends
/// the rest whole, and publishes an exact v2. Over the stream and HTTP.
#[test]
fn failed_deltas_fall_back_to_whole_chunks() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    // What a push without deltas sends to a receiver holding v1.
    let full = push_stream(&src, &receiver(&d, "reference"), NO_DELTAS);
    type Push = fn(&Arc<Store>, &Arc<Store>, DeltaOptions) -> TransferReport;
    for (what, push) in [("stream", push_stream as Push), ("http", push_http as Push)] {
        let r = receiver(&d, what);
        let rotten = v1_only_data_chunk(&r, &src);
        rot_chunk(&r, &rotten);
        let rep = push(&src, &r, DeltaOptions::default());
        // The report is the retry's: no deltas, and only what the first
        // attempt could not rebuild (a delta carries a run of chunks, and
        // nodes and list pieces lean on the chunks sent before them, so one
        // rotten base takes more than its own chunk down with it).
        assert_eq!(rep.delta_chunks, 0, "{what}: {rep:?}");
        assert!(
            rep.chunks_sent >= 1 && rep.chunks_sent < full.chunks_sent,
            "{what}: the retry sent {} chunks, a push without deltas {}",
            rep.chunks_sent,
            full.chunks_sent
        );
        assert_extracts(&r, "app:v2", &img.v2);
        // The only thing wrong in that store is the rot itself.
        let v = wharf_format::maintenance::verify(&r, true).unwrap();
        assert!(!v.errors.is_empty(), "{what}: verify missed the rot");
        assert!(
            v.errors.iter().all(|e| e.contains(&rotten.to_hex())),
            "{what}: {:?}",
            v.errors
        );
        eprintln!(
            "fallback over {what}: {} chunks sent whole after the deltas failed, of {}",
            rep.chunks_sent, full.chunks_sent
        );
    }
}

/// The server itself: deltas whose base is missing, then PUBLISH, are
/// answered with an ERROR saying the deltas could not be applied, and the
/// session goes on (a HAS is answered, BYE ends it cleanly).
#[test]
fn a_server_answers_deltas_it_cannot_apply_and_carries_on() {
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let dst = store(&d, "dst");
    let (b, rep) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    assert!(rep.delta_chunks > 0);
    // A bundle's frames are what a push sends: replay them, but for BYE.
    let mut bytes = Vec::new();
    let hello = br#"{"protocol":1,"software":"test","role":"push"}"#;
    let mut frame = |kind: u8, payload: &[u8]| {
        bytes.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
        bytes.push(kind);
        bytes.extend_from_slice(payload);
    };
    frame(0x01, hello);
    let body = &b[8..];
    let fs = frames(body);
    assert_eq!(fs.last().map(|f| f.1), Some(0x19), "a bundle ends with BYE");
    for (off, kind, len) in &fs[..fs.len() - 1] {
        frame(*kind, &body[*off..off + len]);
    }
    let recipe = src.require_ref("app:v2").unwrap().recipe;
    frame(0x10, &recipe.0);
    frame(0x19, b"");
    let (a, server) = spawn_server(&dst);
    let mut w = a.try_clone().unwrap();
    w.write_all(&bytes).unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let mut r = a;
    r.read_to_end(&mut reply).unwrap();
    server
        .join()
        .unwrap()
        .expect("the session should end cleanly");
    let kinds: Vec<u8> = frames(&reply).iter().map(|f| f.1).collect();
    assert_eq!(kinds, vec![0x01, 0x02, 0x11], "HELLO, ERROR, HAS_REPLY");
    let (off, _, len) = frames(&reply)[1];
    let msg = String::from_utf8_lossy(&reply[off..off + len]);
    assert!(msg.contains("could not be applied"), "{msg}");
    // The recipe came whole in a PUT: kept, though the PUBLISH failed.
    let (off, _, len) = frames(&reply)[2];
    assert_eq!(&reply[off..off + len], &[1]);
    assert!(dst.list_refs().unwrap().is_empty(), "a name appeared");
    assert_verifies(&dst);
}

/// Pull over the stream: the server sends deltas against the image the
/// puller holds, and the result is exact.
#[test]
fn a_pull_uses_deltas_and_rebuilds_exactly() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    let local = receiver(&d, "local");
    let (a, server) = spawn_server(&src);
    let mut client = Client::connect(a.try_clone().unwrap(), a, "pull").unwrap();
    let rep = client.pull(&local, "app:v2", "app:v2", &|_| {}).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
    assert!(rep.delta_chunks > 0, "{rep:?}");
    assert_extracts(&local, "app:v2", &img.v2);
    assert_verifies(&local);
    eprintln!(
        "pull: {} bytes in, {} chunks as deltas",
        rep.wire_bytes_in, rep.delta_chunks
    );
}

/// A push with deltas that was cut off, run again, does not send again what
/// arrived: the sender finds out that the receiver holds part of the new
/// content and asks about all of it.
#[test]
fn a_resumed_push_does_not_resend_what_arrived() {
    let img = images();
    let d = tempfile::tempdir().unwrap();
    let src = sender(&d);
    // What an interrupted transfer leaves: the chunks of every frame before
    // the cut, no name. A bundle cut before its PUBLISH leaves just that.
    let (b, full) = write_bundle(&src, &["app:v1"], DeltaOptions::default());
    let cut = frames(&b[8..])
        .iter()
        .rev()
        .find(|(_, kind, _)| *kind == 0x18)
        .map(|(off, _, _)| 8 + off)
        .unwrap();
    let r = receiver(&d, "resumed");
    assert!(bundle::read_bundle(&r, &mut &b[..cut]).is_err());
    assert!(r.get_ref("app:v2").unwrap().is_none());
    let again = push_stream(&src, &r, DeltaOptions::default());
    assert!(
        again.chunks_sent * 4 < full.chunks_sent.max(4),
        "the resumed push sent {} chunks of {}: {again:?}",
        again.chunks_sent,
        full.chunks_sent
    );
    assert_extracts(&r, "app:v2", &img.v2);
    assert_verifies(&r);
}

/// A store of tiny chunks holding two versions of a tar of one 12 MiB
/// file that differ in `changes` places: the file's data list is two
/// levels of pieces deep, as a multi-GB layer's is at the default size.
fn deep_lists(changes: usize) -> (tempfile::TempDir, Arc<Store>, ChunkId, ChunkId) {
    let d = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        chunking: wharf_format::chunker::ChunkParams {
            min: 64,
            avg: 256,
            max: 1024,
        },
        ..StoreConfig::default()
    };
    let s = Arc::new(Store::init(&d.path().join("tiny"), cfg).unwrap());
    let [v1, v2] = deep_list_tars(changes);
    add(&s, "app:v1", &v1);
    add(&s, "app:v2", &v2);
    let v1 = s.require_ref("app:v1").unwrap().recipe;
    let v2 = s.require_ref("app:v2").unwrap().recipe;
    (d, s, v1, v2)
}

/// The longest data stream of image `recipe`'s nodes, and its node.
fn data_stream(s: &Store, recipe: &ChunkId) -> (ChunkId, wharf_format::list::StreamRef) {
    let node =
        |id: &ChunkId| wharf_format::recipe::Node::decode(&s.read_chunk(id).unwrap(), id).unwrap();
    let mut todo = vec![load_recipe(s, recipe).unwrap().root];
    let mut best: Option<(ChunkId, wharf_format::list::StreamRef)> = None;
    while let Some(id) = todo.pop() {
        let n = node(&id);
        if let wharf_format::recipe::NodeBody::Tar { children, .. } = &n.body {
            todo.extend(children.iter().copied());
        }
        if let Some(d) = StreamKind::Data.of(&n) {
            if best.as_ref().is_none_or(|b| b.1.len < d.len) {
                best = Some((id, d.clone()));
            }
        }
    }
    best.unwrap()
}

#[test]
fn ranges_of_a_deep_list_read_the_bytes_a_flat_walk_reads() {
    let (_d, s, v1, _) = deep_lists(0);
    let (root, stream) = data_stream(&s, &v1);
    assert!(
        stream.level >= 2,
        "the list is {} levels deep",
        stream.level
    );
    let resolver = BaseResolver::new(s.clone());
    let mut flat = Vec::new();
    for (off, e) in resolver.stream_chunks(&root, StreamKind::Data).unwrap() {
        assert_eq!(off, flat.len() as u64);
        flat.extend(s.read_chunk(&e.0).unwrap());
    }
    assert_eq!(flat.len() as u64, stream.len);
    let mut rng = Rng(7);
    let end = stream.len;
    let mut ranges = vec![(0, 1), (0, 70_000), (end - 1, 1), (end - 70_000, 70_000)];
    for _ in 0..300 {
        let len = rng.size(1, 200_000) as u64;
        ranges.push((rng.below(end - len), len));
    }
    for (off, len) in ranges {
        let base = BaseRef::Range {
            node: root,
            stream: StreamKind::Data,
            off,
            len,
        };
        let got = resolver.base_bytes(&[base], &SentIndex::default()).unwrap();
        assert!(
            got == flat[off as usize..(off + len) as usize],
            "range {off}+{len} of a {end}-byte stream"
        );
    }
    let past = BaseRef::Range {
        node: root,
        stream: StreamKind::Data,
        off: end - 10,
        len: 11,
    };
    assert!(resolver.base_bytes(&[past], &SentIndex::default()).is_err());
}

#[test]
fn changes_deep_in_a_long_list_are_found_and_sent_as_small_deltas() {
    let changes = 150;
    let (d, src, v1, v2) = deep_lists(changes);
    assert!(data_stream(&src, &v2).1.level >= 2);
    let planner = wharf_transport::send::planner(
        &src,
        &v2,
        &wharf_transport::send::Bases {
            images: vec![v1],
            recipes_held: true,
        },
        DeltaOptions::default(),
    )
    .unwrap()
    .expect("a planner");
    let new = new_chunks(&src, &v1, &v2);
    let unplanned: Vec<&ChunkId> = new.iter().filter(|c| !planner.knows(c)).collect();
    // The recipe alone is sent without a base.
    assert!(
        unplanned.len() <= 1,
        "{} new chunks have no plan",
        unplanned.len()
    );
    // A receiver holding v1 (as the sender chunked it).
    let dst = store(&d, "dst");
    let push = |name: &str, opts: DeltaOptions| {
        let (a, server) = spawn_server(&dst);
        let mut client = Client::connect(a.try_clone().unwrap(), a, "push").unwrap();
        let rep = client.push(&src, name, name, opts, &|_| {}).unwrap();
        drop(client);
        server.join().unwrap().unwrap();
        rep
    };
    push("app:v1", NO_DELTAS);
    let rep = push("app:v2", DeltaOptions::default());
    // Every changed chunk but the recipe goes as a delta, each against the
    // old bytes at its own offset: a few bytes for each 4 changed, where a
    // base at a wrong offset would leave the random bytes to be sent whole.
    assert!(rep.delta_chunks + 1 >= rep.chunks_sent, "{rep:?}");
    assert!(rep.delta_bytes * 6 < rep.delta_instead_of, "{rep:?}");
    assert_extracts(&dst, "app:v2", &deep_list_tars(changes)[1]);
    assert_verifies(&dst);
}

#[test]
fn many_changed_chunks_go_in_several_frames_each_closed_by_the_pieces_naming_them() {
    // 1000 changes over a 12 MiB file of 256-byte chunks: about as many
    // changed chunks, named by leaf pieces of a list of two levels or more.
    let changes = 1000;
    let (d, src, _, _) = deep_lists(changes);
    let dst = store(&d, "dst");
    let (a, server) = spawn_server(&dst);
    let mut client = Client::connect(a.try_clone().unwrap(), a, "push").unwrap();
    client
        .push(&src, "app:v1", "app:v1", NO_DELTAS, &|_| {})
        .unwrap();
    drop(client);
    server.join().unwrap().unwrap();

    let mut b = Vec::new();
    let have = vec!["app:v1".to_string()];
    let rep = bundle::write_bundle(
        &src,
        "app:v2",
        &have,
        &HashSet::new(),
        DeltaOptions::default(),
        &mut b,
    )
    .unwrap();
    assert!(rep.delta_chunks as usize >= changes / 2, "{rep:?}");
    // One frame for all of it would keep the receiver idle until the
    // sender is done: the deltas are far below a frame's 8 MiB, so only
    // the grouping cuts them.
    let mut per_frame: Vec<Vec<WireDelta>> = Vec::new();
    for (off, kind, len) in frames(&b[8..]) {
        if kind == PUT_DELTA {
            per_frame.push(delta::decode_frame(&b[8 + off..8 + off + len]).unwrap());
        }
    }
    assert!(
        per_frame.len() >= 3,
        "{} delta frames for {} chunks as deltas",
        per_frame.len(),
        rep.delta_chunks
    );
    // In every frame, pieces name the chunks sent before them in it.
    for (i, deltas) in per_frame.iter().enumerate() {
        let sent_based = deltas
            .iter()
            .filter(|d| d.bases.iter().any(|b| matches!(b, BaseRef::Sent { .. })))
            .count();
        assert!(
            sent_based > 0,
            "frame {i} of {}: none of its {} deltas names chunks sent in it",
            per_frame.len(),
            deltas.len()
        );
    }
    assert_eq!(
        bundle::read_bundle(&dst, &mut &b[..]).unwrap(),
        vec!["app:v2".to_string()]
    );
    assert_extracts(&dst, "app:v2", &deep_list_tars(changes)[1]);
    assert_verifies(&dst);
}
