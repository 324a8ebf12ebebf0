//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sha2::Digest;
use std::sync::Arc;
use wharf_format::ingest::{self, AddOptions, AddReport};
use wharf_format::store::{Store, StoreConfig};

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
