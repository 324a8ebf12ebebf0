//! The object-store suite on a real 3-node Garage cluster (replication
//! factor 3) on loopback. Skipped with a message where no garage binary is
//! found, unless WHARF_REQUIRE_GARAGE=1 (CI), where that fails.

mod common;
#[path = "support/suite.rs"]
mod suite;

use common::garage::{cluster_or_skip, GarageCluster};
use object_store::aws::AmazonS3Builder;
use object_store::ClientOptions;
use std::sync::Arc;
use wharf_format::backend::Backend;
use wharf_objstore::ObjectBackend;

fn factory<'a>(c: &'a GarageCluster, prefix: &'a str) -> impl Fn() -> Arc<dyn Backend> + 'a {
    move || {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(c.bucket())
            .with_endpoint(c.endpoint(0))
            .with_access_key_id(c.key_id())
            .with_secret_access_key(c.secret())
            .with_region(c.region())
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .build()
            .expect("s3 client");
        let location = format!("s3://{}/{prefix}", c.bucket());
        Arc::new(ObjectBackend::new(Arc::new(s3), prefix, &location).expect("backend"))
    }
}

type Part = fn(&dyn Fn() -> Arc<dyn Backend>);

#[test]
fn store_suite_on_garage() {
    let Some(c) = cluster_or_skip("store_suite_on_garage", "wharf") else {
        return;
    };
    // Each part on a prefix of its own: they share one cluster.
    let nonce = format!("{:08x}", rand::random::<u32>());
    let parts: [(&str, Part); 7] = [
        ("round-trip", suite::round_trip),
        ("names", suite::names),
        ("locks", suite::locks),
        ("grace", suite::grace),
        ("concurrent-writers", suite::concurrent_writers),
        ("large-objects", suite::large_objects),
        ("corruption", suite::corruption),
    ];
    for (name, part) in parts {
        let prefix = format!("{nonce}/{name}");
        eprintln!("garage: {name}");
        part(&factory(&c, &prefix));
    }
}
