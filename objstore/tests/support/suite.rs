//! The store's behaviour on an object store, written once over a factory of
//! backends so that it runs against an in-memory object store in every test
//! run and against a real Garage cluster where one can be started.
//!
//! `open()` must return a new backend on the same bucket and prefix each
//! call: two backends stand for two processes (or machines) sharing a store.

use std::sync::Arc;
use std::time::Duration;
use wharf_format::backend::{Backend, ObjectKind};
use wharf_format::extract::extract_to_vec;
use wharf_format::ingest::{self, AddOptions};
use wharf_format::maintenance;
use wharf_format::store::{RefValue, Store, StoreConfig};
use wharf_format::synth::{self, Layout, Scale, Version};
use wharf_format::ChunkId;

pub fn image(layout: Layout, version: Version, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    synth::write_image(&mut v, layout, version, Scale::tiny(), seed).expect("synth image");
    v
}

/// Small packs so that a few MB of images spread over several packs (and,
/// with the multipart threshold, some uploads go up in parts elsewhere).
pub fn config() -> StoreConfig {
    StoreConfig {
        pack_target: 1 << 20,
        ..StoreConfig::default()
    }
}

pub fn add(store: &Arc<Store>, tar: &[u8], name: &str) {
    let mut r: &[u8] = tar;
    ingest::add(store, &mut r, name, &AddOptions::default())
        .unwrap_or_else(|e| panic!("add {name}: {e}"));
}

pub fn assert_clean(store: &Store) {
    let rep = maintenance::verify(store, true).expect("verify runs");
    assert!(rep.errors.is_empty(), "verify found: {:?}", rep.errors);
}

/// add, extract byte-identical, verify, rm + gc, extract again.
pub fn round_trip(open: &dyn Fn() -> Arc<dyn Backend>) {
    let store = Arc::new(Store::init_backend(open(), config()).expect("init"));
    assert!(
        Store::init_backend(open(), config()).is_err(),
        "a second init on the same location must fail"
    );
    let v1 = image(Layout::Legacy, Version::V1, 7);
    // Another seed: v1's chunks are its own, so removing it frees packs.
    let v2 = image(Layout::Oci, Version::V2, 8);
    add(&store, &v1, "app:v1");
    add(&store, &v2, "app:v2");
    // A second process sees what the first wrote.
    let other = Arc::new(Store::open_backend(open()).expect("open"));
    assert_eq!(extract_to_vec(&other, "app:v1").expect("extract v1"), v1);
    assert_eq!(extract_to_vec(&other, "app:v2").expect("extract v2"), v2);
    assert_clean(&other);
    let packs_before = open().list(ObjectKind::Pack).expect("list").len();
    other.remove_ref("app:v1").expect("rm");
    let dry = maintenance::gc_with_grace(&other, true, Some(Duration::ZERO)).expect("gc dry");
    assert!(
        dry.bytes_freed > 0,
        "dry run must find v1's chunks: {dry:?}"
    );
    assert_eq!(
        open().list(ObjectKind::Pack).expect("list").len(),
        packs_before,
        "a dry run deletes nothing"
    );
    let rep = maintenance::gc_with_grace(&other, false, Some(Duration::ZERO)).expect("gc");
    assert!(rep.packs_deleted + rep.packs_rewritten > 0, "{rep:?}");
    let third = Arc::new(Store::open_backend(open()).expect("open"));
    assert_eq!(
        extract_to_vec(&third, "app:v2").expect("extract v2 after gc"),
        v2
    );
    assert!(extract_to_vec(&third, "app:v1").is_err());
    assert_clean(&third);
}

/// Names: set, replace, remove, list; old versions do not pile up.
pub fn names(open: &dyn Fn() -> Arc<dyn Backend>) {
    let b = open();
    let store = Store::init_backend(b.clone(), config()).expect("init");
    let val = |n: u8| RefValue {
        recipe: ChunkId([n; 32]),
        added: n as u64,
        len: n as u64 * 10,
    };
    assert_eq!(store.get_ref("a").expect("get"), None);
    for i in 1..=5 {
        store.set_ref("a", &val(i)).expect("set");
    }
    store.set_ref("ghcr.io/org/b:1.0", &val(9)).expect("set");
    let other = Store::open_backend(open()).expect("open");
    assert_eq!(other.get_ref("a").expect("get"), Some(val(5)));
    let names: Vec<String> = other
        .list_refs()
        .expect("list")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        vec!["a".to_string(), "ghcr.io/org/b:1.0".to_string()]
    );
    other.remove_ref("a").expect("rm");
    assert_eq!(store.get_ref("a").expect("get"), None);
    assert_eq!(store.list_refs().expect("list").len(), 1);
    store.set_ref("a", &val(6)).expect("set again");
    assert_eq!(other.get_ref("a").expect("get"), Some(val(6)));
}

/// Writers share; gc excludes everyone.
pub fn locks(open: &dyn Fn() -> Arc<dyn Backend>) {
    let a = open();
    let b = open();
    Store::init_backend(a.clone(), config()).expect("init");
    let s1 = a.lock(false).expect("shared");
    let s2 = b.lock(false).expect("a second writer shares");
    let err = b.lock(true).expect_err("gc must wait for writers");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(s1);
    drop(s2);
    let x = a.lock(true).expect("exclusive once writers are gone");
    let err = b.lock(false).expect_err("writers must wait for gc");
    assert!(err.to_string().contains("gc is running"), "{err}");
    drop(x);
    b.lock(false).expect("shared again after gc");
}

/// A pack nobody names yet (a writer's upload before its index and name)
/// survives gc within the grace period and goes after it.
pub fn grace(open: &dyn Fn() -> Arc<dyn Backend>) {
    let store = Arc::new(Store::init_backend(open(), config()).expect("init"));
    add(&store, &image(Layout::Legacy, Version::V1, 3), "a");
    store.remove_ref("a").expect("rm");
    let packs = open().list(ObjectKind::Pack).expect("list").len();
    assert!(packs > 0);
    let rep = maintenance::gc_with_grace(&store, false, Some(Duration::from_secs(3600)))
        .expect("gc with grace");
    assert_eq!(rep.packs_deleted, 0, "{rep:?}");
    assert_eq!(rep.packs_too_young, packs);
    assert_eq!(open().list(ObjectKind::Pack).expect("list").len(), packs);
    assert_clean(&store);
    let rep = maintenance::gc_with_grace(&store, false, Some(Duration::ZERO)).expect("gc");
    assert_eq!(rep.packs_deleted, packs, "{rep:?}");
    assert_eq!(open().list(ObjectKind::Pack).expect("list").len(), 0);
    assert_clean(&store);
}

/// Two writers adding at once, each through its own backend: both succeed,
/// both images come back byte-identical, the store verifies.
pub fn concurrent_writers(open: &dyn Fn() -> Arc<dyn Backend>) {
    Store::init_backend(open(), config()).expect("init");
    let imgs: Vec<Vec<u8>> = (0..2u64)
        .map(|i| image(Layout::Legacy, Version::V1, 100 + i))
        .collect();
    let stores: Vec<Arc<Store>> = (0..2)
        .map(|_| Arc::new(Store::open_backend(open()).expect("open")))
        .collect();
    std::thread::scope(|s| {
        for (i, (st, img)) in stores.iter().zip(&imgs).enumerate() {
            s.spawn(move || add(st, img, &format!("w{i}")));
        }
    });
    let reader = Arc::new(Store::open_backend(open()).expect("open"));
    for (i, img) in imgs.iter().enumerate() {
        assert_eq!(
            &extract_to_vec(&reader, &format!("w{i}")).expect("extract"),
            img
        );
    }
    assert_clean(&reader);
}

/// An object above the multipart threshold goes up in parts and reads back
/// exactly, by single ranges and by batches of ranges across two objects.
pub fn large_objects(open: &dyn Fn() -> Arc<dyn Backend>) {
    let b = open();
    let len = wharf_objstore::MULTIPART_ABOVE as usize + (5 << 20) + 123;
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    let small = b"a small pack".to_vec();
    for (name, bytes) in [("aa-large", &data), ("bb-small", &small)] {
        let src = b.scratch_dir().join(name);
        std::fs::write(&src, bytes).expect("write scratch");
        b.put_file(ObjectKind::Pack, name, &src).expect("upload");
        assert!(!src.exists(), "put_file consumes its source");
    }
    let reader = open();
    assert_eq!(
        reader.size(ObjectKind::Pack, "aa-large").expect("size"),
        len as u64
    );
    let mut names = reader.list(ObjectKind::Pack).expect("list");
    names.sort();
    assert_eq!(names, ["aa-large", "bb-small"]);
    let mut buf = vec![0u8; 1000];
    let at = (16 << 20) - 500; // across the first part boundary
    reader
        .read_at(ObjectKind::Pack, "aa-large", at as u64, &mut buf)
        .expect("read_at");
    assert_eq!(buf, data[at..at + 1000]);
    let reads = [
        ("aa-large", 0u64, 10usize),
        ("bb-small", 2, 5),
        ("aa-large", (len - 7) as u64, 7),
        ("aa-large", 12, 100),
    ];
    let got = reader
        .read_ranges(ObjectKind::Pack, &reads)
        .expect("read_ranges");
    for ((name, off, n), g) in reads.iter().zip(&got) {
        let src: &[u8] = if *name == "aa-large" { &data } else { &small };
        assert_eq!(
            &g[..],
            &src[*off as usize..*off as usize + n],
            "{name} at {off}"
        );
    }
    let mut past_end = vec![0u8; 10];
    assert!(reader
        .read_at(ObjectKind::Pack, "bb-small", 8, &mut past_end)
        .is_err());
    reader.delete(ObjectKind::Pack, "aa-large").expect("delete");
    reader
        .delete(ObjectKind::Pack, "aa-large")
        .expect("deleting twice is fine");
    assert_eq!(reader.list(ObjectKind::Pack).expect("list"), ["bb-small"]);
}

/// A pack damaged in the bucket: extract stops with an error naming the
/// chunk instead of writing wrong bytes, and verify --full reports it.
pub fn corruption(open: &dyn Fn() -> Arc<dyn Backend>) {
    let store = Arc::new(Store::init_backend(open(), config()).expect("init"));
    let tar = image(Layout::Legacy, Version::V1, 11);
    add(&store, &tar, "img");
    let b = open();
    let mut packs = b.list(ObjectKind::Pack).expect("list");
    packs.sort();
    // The largest pack holds file contents.
    let name = packs
        .iter()
        .max_by_key(|n| b.size(ObjectKind::Pack, n).unwrap_or(0))
        .expect("a pack")
        .clone();
    let size = b.size(ObjectKind::Pack, &name).expect("size") as usize;
    let mut bytes = vec![0u8; size];
    b.read_at(ObjectKind::Pack, &name, 0, &mut bytes)
        .expect("read pack");
    bytes[size / 2] ^= 0x40;
    let src = b.scratch_dir().join("damaged");
    std::fs::write(&src, &bytes).expect("write");
    b.put_file(ObjectKind::Pack, &name, &src)
        .expect("replace pack");
    let fresh = Arc::new(Store::open_backend(open()).expect("open"));
    let err = extract_to_vec(&fresh, "img").expect_err("a damaged chunk must stop extract");
    let msg = err.to_string();
    assert!(
        msg.contains("does not match") || msg.contains("decompress") || msg.contains("header"),
        "{msg}"
    );
    let rep = maintenance::verify(&fresh, true).expect("verify runs");
    assert!(!rep.errors.is_empty(), "verify --full must see the damage");
}
