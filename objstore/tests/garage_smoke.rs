//! Smoke test of the Garage test cluster: S3 PUT/GET through object_store,
//! still working with one of three nodes killed. Skipped (with a message)
//! when no garage binary is found; set WHARF_GARAGE_BIN to run it.

mod common;

use common::garage::GarageCluster;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use std::time::Instant;

fn store_from_env(cluster: &GarageCluster, bucket: &str) -> Result<impl ObjectStore, String> {
    let mut b = AmazonS3Builder::new().with_bucket_name(bucket);
    for (k, v) in cluster.env() {
        let key: AmazonS3ConfigKey = k
            .to_ascii_lowercase()
            .parse()
            .map_err(|e| format!("object_store does not know {k}: {e}"))?;
        b = b.with_config(key, v);
    }
    b.build()
        .map_err(|e| format!("building an S3 store from env(): {e}"))
}

fn store_for(
    cluster: &GarageCluster,
    node: usize,
    bucket: &str,
) -> Result<impl ObjectStore, String> {
    AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(cluster.endpoint(node))
        .with_access_key_id(cluster.key_id())
        .with_secret_access_key(cluster.secret())
        .with_region(cluster.region())
        .with_allow_http(true)
        .build()
        .map_err(|e| format!("building an S3 store for node {node}: {e}"))
}

async fn put_get(store: &impl ObjectStore, key: &str, body: &[u8]) -> Result<(), String> {
    let path = ObjPath::from(key);
    store
        .put(&path, PutPayload::from(body.to_vec()))
        .await
        .map_err(|e| format!("PUT {key}: {e}"))?;
    let got = store
        .get(&path)
        .await
        .map_err(|e| format!("GET {key}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("GET {key} body: {e}"))?;
    if got.as_ref() != body {
        return Err(format!(
            "GET {key} returned {} bytes, not the {} put",
            got.len(),
            body.len()
        ));
    }
    Ok(())
}

/// Two `PutMode::Create` on one key; says whether the second was refused.
async fn report_conditional_create(store: &impl ObjectStore, key: &str, when: &str) {
    let path = ObjPath::from(key);
    let first = store
        .put_opts(
            &path,
            PutPayload::from_static(b"first"),
            PutMode::Create.into(),
        )
        .await;
    if let Err(e) = first {
        eprintln!("conditional create ({when}): the first Create PUT failed: {e}");
        return;
    }
    let second = store
        .put_opts(
            &path,
            PutPayload::from_static(b"second"),
            PutMode::Create.into(),
        )
        .await;
    let verdict = match &second {
        Ok(_) => "NOT honoured: the second Create PUT succeeded (object overwritten)".to_string(),
        Err(object_store::Error::AlreadyExists { .. }) => {
            "honoured: the second Create PUT failed with AlreadyExists".to_string()
        }
        Err(object_store::Error::Precondition { .. }) => {
            "honoured: the second Create PUT failed with Precondition".to_string()
        }
        Err(e) => format!("unclear: the second Create PUT failed otherwise: {e}"),
    };
    let kept = match store.get(&path).await {
        Ok(r) => match r.bytes().await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("(body error: {e})"),
        },
        Err(e) => format!("(GET error: {e})"),
    };
    eprintln!("conditional create ({when}): {verdict}; object now holds {kept:?}");
}

#[test]
fn garage_cluster_put_get_with_one_node_down() {
    let Some(bin) = GarageCluster::binary() else {
        eprintln!("SKIPPED: no garage binary (set WHARF_GARAGE_BIN)");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bucket = "wharf-smoke";

    let t0 = Instant::now();
    let mut cluster = GarageCluster::start(&bin, bucket)
        .unwrap_or_else(|e| panic!("starting a garage cluster with {}: {e}", bin.display()));
    eprintln!(
        "garage cluster (3 nodes) started in {:.2?}; S3 at {}, {}, {}",
        t0.elapsed(),
        cluster.endpoint(0),
        cluster.endpoint(1),
        cluster.endpoint(2)
    );
    let env = cluster.env();
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP",
    ] {
        assert!(
            env.iter().any(|(name, _)| name == k),
            "env() lacks {k}: {env:?}"
        );
    }
    assert_eq!(cluster.region(), "garage");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("building a tokio runtime: {e}"));

    rt.block_on(async {
        let s0 = store_from_env(&cluster, bucket).unwrap_or_else(|e| panic!("{e}"));
        let s1 = store_for(&cluster, 1, bucket).unwrap_or_else(|e| panic!("{e}"));
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        put_get(&s0, "smoke/all-up", &body)
            .await
            .unwrap_or_else(|e| panic!("3 nodes up, via node 0: {e}"));
        // Written via node 0, read via node 1.
        let got = s1
            .get(&ObjPath::from("smoke/all-up"))
            .await
            .unwrap_or_else(|e| panic!("3 nodes up, GET via node 1: {e}"))
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("3 nodes up, GET body via node 1: {e}"));
        assert_eq!(got.as_ref(), &body[..], "node 1 sees what node 0 stored");
        report_conditional_create(&s0, "smoke/create-3-up", "3 of 3 nodes up").await;
    });

    cluster.kill_node(2);
    eprintln!("killed garage node 2");

    rt.block_on(async {
        let s0 = store_for(&cluster, 0, bucket).unwrap_or_else(|e| panic!("{e}"));
        let s1 = store_for(&cluster, 1, bucket).unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        put_get(&s0, "smoke/two-up", b"written with 2 of 3 nodes")
            .await
            .unwrap_or_else(|e| panic!("2 of 3 nodes up, via node 0: {e}"));
        put_get(
            &s1,
            "smoke/two-up-1",
            b"written via node 1 with 2 of 3 nodes",
        )
        .await
        .unwrap_or_else(|e| panic!("2 of 3 nodes up, via node 1: {e}"));
        let got = s1
            .get(&ObjPath::from("smoke/all-up"))
            .await
            .unwrap_or_else(|e| panic!("2 of 3 nodes up, GET older object: {e}"))
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("2 of 3 nodes up, GET older body: {e}"));
        assert_eq!(got.len(), 200_000);
        // The first write after a SIGKILL can stall ~9 s: Garage's open RPC
        // connection to the dead node is only found broken on a later send.
        eprintln!("PUT/GET with 2 of 3 nodes took {:.2?}", t.elapsed());
        report_conditional_create(&s0, "smoke/create-2-up", "2 of 3 nodes up").await;
    });
}
