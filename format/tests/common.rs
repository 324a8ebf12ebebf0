//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sha2::Digest;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use wharf_format::ingest::{self, AddOptions, AddReport};
use wharf_format::recipe::LayerInfo;
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::TarWriter;

pub fn new_store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(&dir.path().join("store"), StoreConfig::default()).expect("init");
    (dir, Arc::new(store))
}

pub fn add(store: &Arc<Store>, name: &str, bytes: &[u8]) -> AddReport {
    let mut r: &[u8] = bytes;
    ingest::add(store, &mut r, name, &AddOptions::default()).expect("add")
}

pub fn extract(store: &Arc<Store>, name: &str) -> Vec<u8> {
    wharf_format::extract::extract_to_vec(store, name).expect("extract")
}

pub fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// Adds `bytes`, extracts them, and checks equality byte for byte and by SHA-256.
pub fn assert_round_trip(store: &Arc<Store>, name: &str, bytes: &[u8]) -> AddReport {
    let rep = add(store, name, bytes);
    assert_eq!(rep.len, bytes.len() as u64, "{name}: length recorded");
    assert_eq!(rep.sha256, sha(bytes), "{name}: sha256 recorded");
    let out = extract(store, name);
    assert_eq!(out.len(), bytes.len(), "{name}: rebuilt length");
    assert!(out == bytes, "{name}: rebuilt bytes differ");
    assert_eq!(sha(&out), sha(bytes));
    rep
}

/// Deterministic bytes with some structure (compressible like real files).
pub fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            v.extend_from_slice(b"def function_name(arg):\n    return arg * 2\n");
        } else {
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v.truncate(len);
    v
}

/// Incompressible bytes (xorshift; seeds that differ only in their lowest
/// bit give the same bytes).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An OCI-layout-like image tar holding each blob under its digest, plus a
/// small manifest.
pub fn image(blobs: &[&[u8]]) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    let mut names = Vec::new();
    for b in blobs {
        let name = format!("blobs/sha256/{}", sha(b));
        w.file(&name, 0o444, 0, b).unwrap();
        names.push(name);
    }
    w.file("manifest.json", 0o644, 0, format!("{names:?}").as_bytes())
        .unwrap();
    w.finish().unwrap();
    w.into_inner()
}

pub fn layers(store: &Arc<Store>, name: &str) -> Vec<LayerInfo> {
    let r = store.require_ref(name).expect("ref");
    wharf_format::extract::load_recipe(store, &r.recipe)
        .expect("recipe")
        .layers
}

/// Round-trips an image made of one (compressed) layer blob; returns how it
/// was stored.
pub fn round_trip_blob(store: &Arc<Store>, name: &str, blob: &[u8]) -> LayerInfo {
    assert!(
        blob.len() >= 64 << 10,
        "{name}: blob too small to be a layer"
    );
    assert_round_trip(store, name, &image(&[blob]));
    let l = layers(store, name);
    assert_eq!(l.len(), 1, "{name}: one layer");
    assert_eq!(l[0].sha256, sha(blob), "{name}: layer digest");
    l[0].clone()
}

/// A layer tar of `n` files of varied sizes, all with mtime `mtime`.
pub fn layer(n: usize, mtime: u64, seed: u64) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    for i in 0..n {
        let size = 1_000 + (i * 7919) % 60_000;
        w.file(
            &format!("usr/lib/python3/pkg{}/mod{i}.py", i % 13),
            0o644,
            mtime,
            &file_bytes(size, seed + i as u64),
        )
        .unwrap();
    }
    w.finish().unwrap();
    w.into_inner()
}

/// Checks that a compressed layer of `format` was stored as it is (not by
/// its plaintext), for a reason containing `why`.
pub fn assert_raw_because(name: &str, l: &LayerInfo, format: &str, why: &str) {
    let c = l.compression.as_ref().expect("compression recorded");
    assert_eq!(
        (l.kind.as_str(), c.format.as_str(), c.method.as_str()),
        ("raw", format, "raw"),
        "{name}: stored as {l:?}"
    );
    let reason = c.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains(why),
        "{name}: reason {reason:?}, expected {why:?}"
    );
}

/// Whether `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `tool args` with `input` on stdin; its stdout.
pub fn pipe(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("wait");
    feeder.join().unwrap().expect("write stdin");
    assert!(out.status.success(), "{tool} {args:?} failed");
    out.stdout
}
