//! Transfers between two stores over an in-process byte stream: exact
//! results, only missing chunks sent, resume, and hostile input refused.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use wharf_format::ingest::{self, AddOptions};
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::{self, Layout, Scale, Version};
use wharf_transport::bundle;
use wharf_transport::send::DeltaOptions;
use wharf_transport::session::{self, Client};

fn store(dir: &tempfile::TempDir, name: &str) -> Arc<Store> {
    Arc::new(Store::init(&dir.path().join(name), StoreConfig::default()).unwrap())
}

fn image(layout: Layout, v: Version) -> Vec<u8> {
    let mut b = Vec::new();
    synth::write_image(&mut b, layout, v, Scale::tiny(), 3).unwrap();
    b
}

fn add(s: &Arc<Store>, name: &str, b: &[u8]) {
    let mut r: &[u8] = b;
    ingest::add(s, &mut r, name, &AddOptions::default()).unwrap();
}

fn extract(s: &Arc<Store>, name: &str) -> Vec<u8> {
    wharf_format::extract::extract_to_vec(s, name).unwrap()
}

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

/// Runs a server on `dst` in a thread and a client on the other end.
fn with_session<T>(
    dst: &Arc<Store>,
    role: &str,
    f: impl FnOnce(&mut Client<UnixStream, UnixStream>) -> T,
) -> T {
    let (a, server) = spawn_server(dst);
    let mut client = Client::connect(a.try_clone().unwrap(), a, role).unwrap();
    let out = f(&mut client);
    drop(client);
    let _ = server.join().unwrap();
    out
}

#[test]
fn push_sends_only_what_is_missing_and_rebuilds_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (store(&d, "src"), store(&d, "dst"));
    let v1 = image(Layout::Legacy, Version::V1);
    let v2 = image(Layout::Legacy, Version::V2);
    add(&src, "v1", &v1);
    add(&src, "v2", &v2);
    let r1 = with_session(&dst, "push", |c| {
        c.push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
            .unwrap()
    });
    assert_eq!(extract(&dst, "v1"), v1);
    assert!(r1.chunks_sent > 0 && r1.chunks_skipped == 0);
    let r2 = with_session(&dst, "push", |c| {
        c.push(&src, "v2", "v2", DeltaOptions::default(), &|_| {})
            .unwrap()
    });
    assert_eq!(extract(&dst, "v2"), v2);
    assert!(
        r2.layers_skipped >= 1,
        "the unchanged base layer should be skipped whole: {r2:?}"
    );
    assert!(
        r2.payload_bytes * 3 < r1.payload_bytes,
        "v2 sent {} vs v1 {}",
        r2.payload_bytes,
        r1.payload_bytes
    );
    // Nothing new: almost nothing on the wire.
    let r3 = with_session(&dst, "push", |c| {
        c.push(&src, "v2", "again", DeltaOptions::default(), &|_| {})
            .unwrap()
    });
    assert_eq!(r3.chunks_sent, 0, "{r3:?}");
    assert!(r3.wire_bytes_out < 4096, "{r3:?}");
    assert_eq!(extract(&dst, "again"), v2);
}

/// Without deltas, a push still learns which images the receiver holds
/// whole and asks only about the chunks outside them: what crosses the wire
/// is the new chunks as stored plus a bounded cost per chunk sent, not 32
/// bytes for every chunk of every changed layer.
#[test]
fn push_without_deltas_costs_about_the_new_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (store(&d, "src"), store(&d, "dst"));
    let v1 = image(Layout::Legacy, Version::V1);
    let v2 = image(Layout::Legacy, Version::V2);
    add(&src, "v1", &v1);
    add(&src, "v2", &v2);
    with_session(&dst, "push", |c| {
        c.push(&src, "v1", "v1", DeltaOptions::none(), &|_| {})
            .unwrap()
    });
    let r2 = with_session(&dst, "push", |c| {
        c.push(&src, "v2", "v2", DeltaOptions::none(), &|_| {})
            .unwrap()
    });
    assert_eq!(extract(&dst, "v2"), v2);
    // Per chunk sent: its id asked about once (32) and its entry header
    // (40); then a fixed cost for the handshake, the layer and base
    // questions, PUBLISH and BYE.
    let per_chunk = 32 + 40;
    let fixed = 1024;
    let bound = r2.payload_bytes + r2.chunks_sent * per_chunk + fixed;
    assert!(
        r2.wire_bytes_out <= bound,
        "{} bytes out for {} of payload in {} chunks (bound {bound}): {r2:?}",
        r2.wire_bytes_out,
        r2.payload_bytes,
        r2.chunks_sent
    );
}

#[test]
fn pull_fetches_only_what_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let (remote, local) = (store(&d, "remote"), store(&d, "local"));
    let v1 = image(Layout::Oci, Version::V1);
    let v2 = image(Layout::Oci, Version::V2);
    add(&remote, "v1", &v1);
    add(&remote, "v2", &v2);
    let r1 = with_session(&remote, "pull", |c| {
        c.pull(&local, "v1", "v1", &|_| {}).unwrap()
    });
    let r2 = with_session(&remote, "pull", |c| {
        c.pull(&local, "v2", "v2", &|_| {}).unwrap()
    });
    assert_eq!(extract(&local, "v1"), v1);
    assert_eq!(extract(&local, "v2"), v2);
    assert!(r2.payload_bytes * 3 < r1.payload_bytes, "{r1:?} {r2:?}");
    let err = with_session(&remote, "pull", |c| {
        c.pull(&local, "nope", "nope", &|_| {}).err().unwrap()
    });
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn bundle_with_have_applies_on_a_receiver_holding_v1() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (store(&d, "src"), store(&d, "dst"));
    let v1 = image(Layout::Legacy, Version::V1);
    let v2 = image(Layout::Legacy, Version::V2);
    add(&src, "v1", &v1);
    add(&src, "v2", &v2);
    add(&dst, "v1", &v1);
    let mut full = Vec::new();
    bundle::write_bundle(
        &src,
        "v2",
        &[],
        &HashSet::new(),
        DeltaOptions::default(),
        &mut full,
    )
    .unwrap();
    let mut by_name = Vec::new();
    bundle::write_bundle(
        &src,
        "v2",
        &["v1".into()],
        &HashSet::new(),
        DeltaOptions::default(),
        &mut by_name,
    )
    .unwrap();
    let mut have = Vec::new();
    bundle::write_have(&dst, &mut have).unwrap();
    let have_ids = bundle::read_have(&mut &have[..]).unwrap();
    let mut by_file = Vec::new();
    bundle::write_bundle(
        &src,
        "v2",
        &[],
        &have_ids,
        DeltaOptions::default(),
        &mut by_file,
    )
    .unwrap();
    assert!(
        by_name.len() * 3 < full.len(),
        "{} vs {}",
        by_name.len(),
        full.len()
    );
    assert!(by_file.len() <= by_name.len() + 4096);
    let names = bundle::read_bundle(&dst, &mut &by_file[..]).unwrap();
    assert_eq!(names, vec!["v2".to_string()]);
    assert_eq!(extract(&dst, "v2"), v2);
    // A delta bundle on a store without v1 cannot publish, and says why.
    let empty = store(&d, "empty");
    let err = bundle::read_bundle(&empty, &mut &by_name[..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing") && err.contains("--have"), "{err}");
    assert!(empty.get_ref("v2").unwrap().is_none());
    // A truncated bundle keeps what arrived and publishes nothing.
    let cut = &full[..full.len() / 2];
    assert!(bundle::read_bundle(&empty, &mut &cut[..]).is_err());
    assert!(empty.get_ref("v2").unwrap().is_none());
    assert!(wharf_format::maintenance::verify(&empty, true)
        .unwrap()
        .errors
        .is_empty());
}

/// A push cut off mid-way keeps what arrived; the next push sends the rest.
#[test]
fn interrupted_push_resumes_without_resending() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (store(&d, "src"), store(&d, "dst"));
    let mut big = Vec::new();
    synth::write_image(&mut big, Layout::Legacy, Version::V1, Scale::demo(), 5).unwrap();
    add(&src, "img", &big);
    let full = with_session(&store(&d, "probe"), "push", |c| {
        c.push(&src, "img", "img", DeltaOptions::default(), &|_| {})
            .unwrap()
    });
    // A stream that breaks after ~60% of the bytes a full push writes.
    let (a, server) = spawn_server(&dst);
    struct Breaking {
        inner: UnixStream,
        left: u64,
    }
    impl Write for Breaking {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                let _ = self.inner.shutdown(std::net::Shutdown::Both);
                return Err(std::io::Error::other("cable pulled"));
            }
            let n = (buf.len() as u64).min(self.left) as usize;
            self.left -= n as u64;
            self.inner.write(&buf[..n])
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let out = Breaking {
        inner: a.try_clone().unwrap(),
        left: full.wire_bytes_out * 6 / 10,
    };
    let mut client = Client::connect(a, out, "push").unwrap();
    assert!(client
        .push(&src, "img", "img", DeltaOptions::default(), &|_| {})
        .is_err());
    drop(client);
    let _ = server.join().unwrap();
    assert!(
        dst.get_ref("img").unwrap().is_none(),
        "a partial push published a name"
    );
    assert!(wharf_format::maintenance::verify(&dst, true)
        .unwrap()
        .errors
        .is_empty());
    let again = with_session(&dst, "push", |c| {
        c.push(&src, "img", "img", DeltaOptions::default(), &|_| {})
            .unwrap()
    });
    assert_eq!(extract(&dst, "img"), big);
    assert!(
        again.payload_bytes * 10 < full.payload_bytes * 7,
        "the second push resent too much: {} of {}",
        again.payload_bytes,
        full.payload_bytes
    );
}

fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(payload);
    v
}

/// Hostile or broken clients get an error; nothing is stored or named.
#[test]
fn hostile_messages_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let hello = br#"{"protocol":1,"software":"test","role":"push"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "huge length",
            [&raw_frame(0x01, hello)[..], &[0xff, 0xff, 0xff, 0x7f, 0x17]].concat(),
        ),
        (
            "unknown type",
            [raw_frame(0x01, hello), raw_frame(0x7e, b"")].concat(),
        ),
        ("bad chunk hash", {
            let mut chunk = vec![7u8; 32];
            let z = zstd_frame(b"hello");
            chunk.extend_from_slice(&5u32.to_le_bytes());
            chunk.extend_from_slice(&(z.len() as u32).to_le_bytes());
            chunk.extend_from_slice(&z);
            [raw_frame(0x01, hello), raw_frame(0x17, &chunk)].concat()
        }),
        (
            "publish of nothing",
            [
                raw_frame(0x01, hello),
                raw_frame(
                    0x18,
                    format!(r#"{{"name":"x","recipe":"{}","len":1}}"#, "ab".repeat(32)).as_bytes(),
                ),
            ]
            .concat(),
        ),
        (
            "garbage delta frame",
            [raw_frame(0x01, hello), raw_frame(0x1a, b"\x05\xff\xff")].concat(),
        ),
        (
            "wrong protocol",
            raw_frame(
                0x01,
                br#"{"protocol":99,"software":"future","role":"push"}"#,
            ),
        ),
    ];
    for (what, bytes) in cases {
        let (a, server) = spawn_server(&dst);
        let mut w = a.try_clone().unwrap();
        w.write_all(&bytes).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        let mut r = a;
        let _ = r.read_to_end(&mut reply);
        let res = server.join().unwrap();
        // An incomplete PUBLISH is answered with ERROR and the session may
        // go on (the client can send what is missing); the rest end it.
        if what != "publish of nothing" {
            assert!(res.is_err(), "{what}: the server accepted it");
        }
        assert!(
            frames(&reply).contains(&0x02),
            "{what}: the server did not answer with an ERROR frame: {:?}",
            frames(&reply)
        );
        assert!(
            dst.list_refs().unwrap().is_empty(),
            "{what}: a name appeared"
        );
    }
    assert!(wharf_format::maintenance::verify(&dst, true)
        .unwrap()
        .errors
        .is_empty());
}

/// The message types of a reply stream.
fn frames(mut b: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        kinds.push(b[4]);
        if b.len() < 4 + len {
            break;
        }
        b = &b[4 + len..];
    }
    kinds
}

fn zstd_frame(b: &[u8]) -> Vec<u8> {
    // A valid zstd frame of raw content, written by hand to avoid a
    // dependency: magic, frame header (single segment, 1-byte size), one
    // raw last block.
    let mut v = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, b.len() as u8];
    let block = ((b.len() as u32) << 3) | 1; // last block, raw
    v.extend_from_slice(&block.to_le_bytes()[..3]);
    v.extend_from_slice(b);
    v
}

/// A byte flipped in transit inside a chunk: the receiver rejects it, the
/// push fails saying so, and nothing is named.
#[test]
fn a_chunk_corrupted_in_transit_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (store(&d, "src"), store(&d, "dst"));
    let v1 = image(Layout::Legacy, Version::V1);
    add(&src, "v1", &v1);
    let (client_end, proxy_in) = UnixStream::pair().unwrap();
    let (proxy_out, server) = spawn_server(&dst);
    // Server to client: copied as is.
    let (mut back_from, mut back_to) = (
        proxy_out.try_clone().unwrap(),
        proxy_in.try_clone().unwrap(),
    );
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Write);
    });
    // Client to server: frame by frame, flipping one byte inside the first
    // chunk's compressed bytes of the first PUT.
    let forward = std::thread::spawn(move || {
        let (mut from, mut to) = (proxy_in, proxy_out);
        let mut flipped = false;
        loop {
            let mut head = [0u8; 5];
            if from.read_exact(&mut head).is_err() {
                break;
            }
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let mut payload = vec![0u8; len - 1];
            if from.read_exact(&mut payload).is_err() {
                break;
            }
            if head[4] == 0x17 && !flipped && payload.len() > 48 {
                payload[45] ^= 0x10;
                flipped = true;
            }
            if to
                .write_all(&head)
                .and_then(|_| to.write_all(&payload))
                .is_err()
            {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        flipped
    });
    let mut client = Client::connect(client_end.try_clone().unwrap(), client_end, "push").unwrap();
    let err = client
        .push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
        .expect_err("a corrupted chunk was accepted");
    drop(client);
    assert!(forward.join().unwrap(), "the proxy never saw a PUT");
    let server_err = server
        .join()
        .unwrap()
        .expect_err("the server accepted a corrupted chunk");
    back.join().unwrap();
    let text = format!("{err} / {server_err}");
    assert!(text.contains("received chunk"), "{text}");
    assert!(dst.get_ref("v1").unwrap().is_none(), "a name was published");
    assert!(wharf_format::maintenance::verify(&dst, true)
        .unwrap()
        .errors
        .is_empty());
}

fn put_entry(raw: &[u8], stored: &[u8]) -> Vec<u8> {
    let mut e = blake3::hash(raw).as_bytes().to_vec();
    e.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    e.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    e.extend_from_slice(stored);
    e
}

/// Runs one raw client byte stream against a server; returns the server's result.
fn serve_raw(dst: &Arc<Store>, bytes: Vec<u8>) -> (Result<(), wharf_transport::Error>, Vec<u8>) {
    let (a, server) = spawn_server(dst);
    let mut w = a.try_clone().unwrap();
    w.write_all(&bytes).unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let mut r = a;
    let _ = r.read_to_end(&mut reply);
    (server.join().unwrap(), reply)
}

const HELLO: &[u8] = br#"{"protocol":1,"software":"test","role":"push"}"#;

/// A chunk padded with a skippable zstd frame (or carrying two frames)
/// would let a tiny push fill the receiver's disk: refused.
#[test]
fn padded_or_multi_frame_chunks_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let raw = b"some chunk content".repeat(10);
    let good = zstd::bulk::compress(&raw, 3).unwrap();
    let mut padded = good.clone();
    // A skippable frame: magic 0x184D2A50, 4-byte length, payload.
    padded.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    padded.extend_from_slice(&(1u32 << 20).to_le_bytes());
    padded.extend_from_slice(&vec![0u8; 1 << 20]);
    let half = raw.len() / 2;
    let mut two = zstd::bulk::compress(&raw[..half], 3).unwrap();
    two.extend_from_slice(&zstd::bulk::compress(&raw[half..], 3).unwrap());
    for (what, stored) in [("padded", padded), ("two frames", two)] {
        let bytes = [
            raw_frame(0x01, HELLO),
            raw_frame(0x17, &put_entry(&raw, &stored)),
        ]
        .concat();
        let (res, _) = serve_raw(&dst, bytes);
        let err = res.expect_err(what).to_string();
        assert!(err.contains("single zstd frame"), "{what}: {err}");
    }
    let packs: u64 = walkdir(std::path::Path::new(&dst.location()))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        packs < 100_000,
        "{packs} bytes of packs after refused chunks"
    );
    // The well-formed chunk is accepted.
    let bytes = [
        raw_frame(0x01, HELLO),
        raw_frame(0x17, &put_entry(&raw, &good)),
        raw_frame(0x19, b""),
    ]
    .concat();
    serve_raw(&dst, bytes).0.unwrap();
}

/// The receiver verifies a PUT while it reads the next: a bad chunk in a
/// later frame still ends the session with the chunk's error, the chunks
/// before it (earlier frames, and earlier in its frame) are kept, it and
/// everything after it are not, and the store verifies.
#[test]
fn a_bad_chunk_in_a_later_frame_stops_the_session_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let chunk = |i: u32| -> (Vec<u8>, Vec<u8>) {
        let raw: Vec<u8> = format!("chunk {i} ")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(20_000 + i as usize)
            .collect();
        let stored = zstd::bulk::compress(&raw, 3).unwrap();
        (raw, stored)
    };
    let id = |raw: &[u8]| wharf_format::ChunkId(*blake3::hash(raw).as_bytes());
    let mut stream = vec![raw_frame(0x01, HELLO)];
    let mut kept = Vec::new();
    let mut lost = Vec::new();
    let mut n = 0;
    // Four good frames of 50 chunks each.
    for _ in 0..4 {
        let mut payload = Vec::new();
        for _ in 0..50 {
            let (raw, stored) = chunk(n);
            n += 1;
            payload.extend(put_entry(&raw, &stored));
            kept.push(id(&raw));
        }
        stream.push(raw_frame(0x17, &payload));
    }
    // Then a frame whose third chunk decompresses to other bytes than its id.
    let mut payload = Vec::new();
    for k in 0..6 {
        let (raw, stored) = chunk(n);
        n += 1;
        if k == 2 {
            let mut e = put_entry(&raw, &zstd::bulk::compress(b"other", 3).unwrap());
            e[32..36].copy_from_slice(&5u32.to_le_bytes());
            payload.extend(e);
        } else {
            payload.extend(put_entry(&raw, &stored));
        }
        if k < 2 {
            kept.push(id(&raw));
        } else {
            lost.push(id(&raw));
        }
    }
    stream.push(raw_frame(0x17, &payload));
    // And good frames after it, which must not be stored either.
    for _ in 0..3 {
        let mut payload = Vec::new();
        for _ in 0..20 {
            let (raw, stored) = chunk(n);
            n += 1;
            payload.extend(put_entry(&raw, &stored));
            lost.push(id(&raw));
        }
        stream.push(raw_frame(0x17, &payload));
    }
    stream.push(raw_frame(0x19, b""));
    let (res, reply) = serve_raw(&dst, stream.concat());
    let err = res.expect_err("a bad chunk was accepted").to_string();
    assert!(err.contains("received chunk"), "{err}");
    assert!(err.contains("does not match its hash"), "{err}");
    // The client is told, in an ERROR frame after the server's HELLO.
    assert_eq!(frames(&reply), vec![0x01, 0x02]);
    assert!(String::from_utf8_lossy(&reply).contains("received chunk"));
    dst.reload_index().unwrap();
    for i in &kept {
        assert!(dst.contains(i), "a good chunk before the bad one was lost");
        dst.read_chunk(i).unwrap();
    }
    for i in &lost {
        assert!(!dst.contains(i), "a chunk at or after the bad one was kept");
    }
    let report = wharf_format::maintenance::verify(&dst, true).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else if p.extension().is_some_and(|x| x == "pack") {
            out.push(p);
        }
    }
    out
}

/// A recipe whose list repeats one piece 2048 times at each of three levels
/// names 8.6 billion chunks; checking it for PUBLISH must stay cheap.
#[test]
fn a_list_bomb_is_checked_in_moments() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let data = b"x".to_vec();
    let mut chunks: Vec<Vec<u8>> = vec![data.clone()];
    let mut below = blake3::hash(&data);
    let mut below_len = data.len() as u32;
    for _ in 0..3 {
        let mut piece = Vec::new();
        for _ in 0..2048 {
            piece.extend_from_slice(below.as_bytes());
            piece.extend_from_slice(&below_len.to_le_bytes());
        }
        below = blake3::hash(&piece);
        below_len = piece.len() as u32;
        chunks.push(piece);
    }
    let node = format!(
        r#"{{"wharf_node":1,"len":8589934592,"sha256":"{}","kind":"raw","data":{{"len":8589934592,"level":3,"entries":[["{}",{}]]}}}}"#,
        "00".repeat(32),
        below.to_hex(),
        below_len
    );
    let node_id = blake3::hash(node.as_bytes());
    chunks.push(node.into_bytes());
    let recipe = format!(
        r#"{{"wharf_recipe":1,"len":8589934592,"sha256":"{}","blake3":"{}","root":"{}","layers":[],"created":0}}"#,
        "00".repeat(32),
        "00".repeat(32),
        node_id.to_hex()
    );
    let recipe_id = blake3::hash(recipe.as_bytes());
    chunks.push(recipe.into_bytes());
    let mut put = Vec::new();
    for c in &chunks {
        put.extend(put_entry(c, &zstd::bulk::compress(c, 3).unwrap()));
    }
    let publish = format!(
        r#"{{"name":"bomb","recipe":"{}","len":8589934592}}"#,
        recipe_id.to_hex()
    );
    let bytes = [
        raw_frame(0x01, HELLO),
        raw_frame(0x17, &put),
        raw_frame(0x18, publish.as_bytes()),
        raw_frame(0x19, b""),
    ]
    .concat();
    let t = std::time::Instant::now();
    let (res, _) = serve_raw(&dst, bytes);
    res.unwrap();
    assert!(
        t.elapsed().as_secs() < 10,
        "checking the bomb took {:?}",
        t.elapsed()
    );
}

/// A server answering a GET with chunks that were not asked for is cut off:
/// a hostile server cannot make a pull run on and fill the disk.
#[test]
fn pull_refuses_chunks_it_did_not_ask_for() {
    let d = tempfile::tempdir().unwrap();
    let local = store(&d, "local");
    let (a, b) = UnixStream::pair().unwrap();
    let evil = std::thread::spawn(move || {
        let (mut r, mut w) = (b.try_clone().unwrap(), b);
        let mut frames = 0;
        loop {
            let mut head = [0u8; 5];
            if r.read_exact(&mut head).is_err() {
                return frames;
            }
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let mut payload = vec![0u8; len - 1];
            if r.read_exact(&mut payload).is_err() {
                return frames;
            }
            frames += 1;
            let reply = match head[4] {
                0x01 => raw_frame(0x01, br#"{"protocol":1,"software":"evil","role":"server"}"#),
                0x12 => raw_frame(
                    0x13,
                    format!(r#"{{"recipe":"{}","added":0,"len":1}}"#, "ab".repeat(32)).as_bytes(),
                ),
                0x14 => {
                    let fresh = format!("fresh chunk {frames}").into_bytes();
                    raw_frame(
                        0x15,
                        &put_entry(&fresh, &zstd::bulk::compress(&fresh, 3).unwrap()),
                    )
                }
                _ => return frames,
            };
            if w.write_all(&reply).is_err() {
                return frames;
            }
        }
    });
    let mut client = Client::connect(a.try_clone().unwrap(), a, "pull").unwrap();
    let err = client
        .pull(&local, "x", "x", &|_| {})
        .expect_err("pulled from a lying server");
    drop(client);
    assert!(evil.join().unwrap() < 10, "the client kept asking");
    assert!(err.to_string().contains("not asked for"), "{err}");
    assert!(local.get_ref("x").unwrap().is_none());
}

/// A pull's dry run names no image, says which layers are held whole and,
/// per layer, what is missing; the uncompressed figure bounds what the pull
/// then fetches without deltas, and the chunk counts agree with it.
#[test]
fn pull_dry_run_predicts_the_pull() {
    let d = tempfile::tempdir().unwrap();
    let (remote, local) = (store(&d, "remote"), store(&d, "local"));
    let v1 = image(Layout::Oci, Version::V1);
    let v2 = image(Layout::Oci, Version::V2);
    add(&remote, "v1", &v1);
    add(&remote, "v2", &v2);
    add(&local, "v1", &v1);
    let plan = with_session(&remote, "pull", |c| c.plan_pull(&local, "v2").unwrap());
    assert!(plan.uncompressed);
    assert!(
        local.get_ref("v2").unwrap().is_none(),
        "a dry run names nothing"
    );
    assert_eq!(plan.layers.len(), 3);
    let whole = plan.layers.iter().filter(|l| l.whole_layer_present).count();
    assert!(whole >= 1, "v1's base layer is here whole: {plan:?}");
    let changed = plan
        .layers
        .iter()
        .filter(|l| !l.whole_layer_present && l.missing_chunks > 0)
        .count();
    assert!(changed >= 1, "{plan:?}");
    assert!(plan.total_missing_bytes < v2.len() as u64 / 2, "{plan:?}");
    let missing_chunks: u64 =
        plan.layers.iter().map(|l| l.missing_chunks).sum::<u64>() + plan.other_missing_chunks;
    let rep = with_session(&remote, "pull", |c| {
        c.pull_with(&local, "v2", "v2", DeltaOptions::none(), &|_| {})
            .unwrap()
    });
    assert_eq!(extract(&local, "v2"), v2);
    assert!(
        rep.payload_bytes <= plan.total_missing_bytes,
        "the pull fetched {} where the dry run said at most {}",
        rep.payload_bytes,
        plan.total_missing_bytes
    );
    // The dry run already fetched the objects; the pull fetches the rest.
    assert!(
        rep.chunks_sent > 0 && rep.chunks_sent < missing_chunks,
        "{rep:?} {missing_chunks}"
    );
    // Once everything is here, nothing is missing.
    let again = with_session(&remote, "pull", |c| c.plan_pull(&local, "v2").unwrap());
    assert_eq!(again.total_missing_bytes, 0, "{again:?}");
    assert!(again.layers.iter().all(|l| l.whole_layer_present));
}
