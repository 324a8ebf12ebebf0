//! The object-store backend against object_store's in-memory store: the
//! same suite as on Garage, in every test run, plus the ref scheme for
//! servers without conditional writes.

#[path = "support/suite.rs"]
mod suite;

use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;
use wharf_format::backend::Backend;
use wharf_format::store::{RefValue, Store};
use wharf_format::synth::{Layout, Version};
use wharf_format::ChunkId;
use wharf_objstore::ObjectBackend;

fn factory() -> impl Fn() -> Arc<dyn Backend> {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    move || {
        Arc::new(ObjectBackend::new(mem.clone(), "team-a", "memory://test").expect("backend"))
            as Arc<dyn Backend>
    }
}

#[test]
fn round_trip() {
    suite::round_trip(&factory());
}

#[test]
fn names() {
    suite::names(&factory());
}

#[test]
fn locks() {
    suite::locks(&factory());
}

#[test]
fn grace() {
    suite::grace(&factory());
}

#[test]
fn corruption() {
    suite::corruption(&factory());
}

#[test]
fn large_objects() {
    suite::large_objects(&factory());
}

#[test]
fn concurrent_writers() {
    suite::concurrent_writers(&factory());
}

/// Two stores under different prefixes of one bucket do not see each other.
#[test]
fn prefixes_are_separate() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = Arc::new(ObjectBackend::new(mem.clone(), "a", "memory://a").expect("backend"));
    let b = Arc::new(ObjectBackend::new(mem.clone(), "a/b", "memory://a/b").expect("backend"));
    let sa = Arc::new(Store::init_backend(a, suite::config()).expect("init a"));
    let sb = Arc::new(Store::init_backend(b, suite::config()).expect("init b"));
    suite::add(&sa, &suite::image(Layout::Legacy, Version::V1, 1), "x");
    assert!(sb.list_refs().expect("list").is_empty());
    assert!(sb.index_files().is_empty());
}

/// Without conditional writes, ref versions carry a timestamp and a random
/// suffix: concurrent setters never overwrite each other's version, and the
/// newest wins.
#[test]
fn names_without_conditional_writes() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let open = || ObjectBackend::new(mem.clone(), "", "memory://nc").expect("backend");
    Store::init_backend(Arc::new(open()), suite::config()).expect("init");
    // As if the probe at init had found a server that ignores If-None-Match.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(mem.put(
        &"objstore.json".into(),
        PutPayload::from_static(br#"{"conditional_put":false}"#),
    ))
    .expect("put");
    let stores: Vec<Store> = (0..4)
        .map(|_| Store::open_backend(Arc::new(open())).expect("open"))
        .collect();
    std::thread::scope(|s| {
        for (i, st) in stores.iter().enumerate() {
            s.spawn(move || {
                for n in 0..5u8 {
                    let v = RefValue {
                        recipe: ChunkId([i as u8 * 10 + n; 32]),
                        added: 0,
                        len: 0,
                    };
                    st.set_ref("shared", &v).expect("set");
                }
            });
        }
    });
    let got = stores[0]
        .get_ref("shared")
        .expect("get")
        .expect("set by someone");
    // Whoever won, it is one of the values written, whole.
    assert!(got.recipe.0.iter().all(|b| *b == got.recipe.0[0]));
    let keys: Vec<String> = rt
        .block_on(async {
            use futures::TryStreamExt;
            mem.list(Some(&"refs".into())).try_collect::<Vec<_>>().await
        })
        .expect("list")
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    assert!(
        keys.iter()
            .all(|k| k.split('/').nth(2).is_some_and(|v| v.len() == 50)),
        "versions must be seq-nanos-random without conditional writes: {keys:?}"
    );
}
