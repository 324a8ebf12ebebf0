//! The protocol over HTTP against a real server on 127.0.0.1 (an ephemeral
//! port, loopback only): exact round trips, only missing chunks sent,
//! tokens enforced, and hostile requests refused with nothing named.

use std::sync::Arc;
use wharf_format::ingest::{self, AddOptions};
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::{self, Layout, Scale, Version};
use wharf_transport::http::{self, HttpClient, Tokens};
use wharf_transport::send::DeltaOptions;

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

fn tokens(push: Option<&str>, read: Option<&str>) -> Tokens {
    Tokens {
        push: push.map(String::from),
        read: read.map(String::from),
    }
}

fn serve(s: &Arc<Store>, t: Tokens) -> String {
    let addr = http::spawn(s.clone(), "127.0.0.1:0", t).unwrap();
    assert!(addr.ip().is_loopback());
    format!("http://{addr}")
}

fn client(url: &str, token: Option<&str>) -> HttpClient {
    HttpClient::connect(url, token.map(String::from)).unwrap()
}

/// Packs in a store: a refused request must not leave any.
fn packs(d: &tempfile::TempDir, name: &str) -> usize {
    std::fs::read_dir(d.path().join(name).join("packs"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn push_and_pull_over_http_rebuild_exactly_and_send_only_what_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, third) = (store(&d, "src"), store(&d, "dst"), store(&d, "third"));
    let v1 = image(Layout::Legacy, Version::V1);
    let v2 = image(Layout::Legacy, Version::V2);
    add(&src, "v1", &v1);
    add(&src, "v2", &v2);
    let url = serve(&dst, tokens(Some("push-secret"), None));
    let c = client(&url, Some("push-secret"));
    assert!(!c.server.read_only);
    let r1 = c
        .push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
        .unwrap();
    assert!(r1.chunks_sent > 0 && r1.chunks_skipped == 0, "{r1:?}");
    assert!(r1.wire_bytes_out >= r1.payload_bytes);
    assert_eq!(extract(&dst, "v1"), v1);
    let c = client(&url, Some("push-secret"));
    let r2 = c
        .push(&src, "v2", "v2", DeltaOptions::default(), &|_| {})
        .unwrap();
    assert_eq!(extract(&dst, "v2"), v2);
    assert!(r2.layers_skipped >= 1, "{r2:?}");
    assert!(
        r2.wire_bytes_out * 3 < r1.wire_bytes_out,
        "v2 sent {} bytes, v1 {}",
        r2.wire_bytes_out,
        r1.wire_bytes_out
    );
    // The same image again: no chunk moves, only a few hashes.
    let c = client(&url, Some("push-secret"));
    let r3 = c
        .push(&src, "v2", "again", DeltaOptions::default(), &|_| {})
        .unwrap();
    assert_eq!((r3.chunks_sent, r3.payload_bytes), (0, 0), "{r3:?}");
    assert!(r3.wire_bytes_out < 4096, "{r3:?}");
    assert_eq!(extract(&dst, "again"), v2);
    // Pull into a third store, with small batches so several requests are in flight.
    let c = client(&url, None);
    let p = c.pull(&third, "v2", "copy", &|_| {}).unwrap();
    assert_eq!(extract(&third, "copy"), v2);
    assert!(p.chunks_sent > 0 && p.wire_bytes_in >= p.payload_bytes);
    // A second pull of what is already here fetches nothing.
    let p2 = client(&url, None)
        .pull(&third, "v2", "copy2", &|_| {})
        .unwrap();
    assert_eq!(p2.chunks_sent, 0, "{p2:?}");
    // With v1 here, a pull of v2 comes as deltas against it, and costs
    // less than the same pull without them.
    let fourth = store(&d, "fourth");
    client(&url, None)
        .pull(&fourth, "v1", "v1", &|_| {})
        .unwrap();
    let fifth = store(&d, "fifth");
    client(&url, None)
        .pull(&fifth, "v1", "v1", &|_| {})
        .unwrap();
    let with = client(&url, None)
        .pull_with(&fourth, "v2", "v2", DeltaOptions::default(), &|_| {})
        .unwrap();
    let without = client(&url, None)
        .pull_with(
            &fifth,
            "v2",
            "v2",
            DeltaOptions {
                enabled: false,
                ..Default::default()
            },
            &|_| {},
        )
        .unwrap();
    assert!(with.delta_chunks > 0, "{with:?}");
    assert_eq!(without.delta_chunks, 0, "{without:?}");
    assert!(
        with.wire_bytes_in < without.wire_bytes_in,
        "{with:?} vs {without:?}"
    );
    assert_eq!(extract(&fourth, "v2"), v2);
    assert_eq!(extract(&fifth, "v2"), v2);
    assert!(wharf_format::maintenance::verify(&fourth, true)
        .unwrap()
        .errors
        .is_empty());
    assert!(wharf_format::maintenance::verify(&third, true)
        .unwrap()
        .errors
        .is_empty());
}

fn status_of(e: wharf_transport::Error) -> String {
    match e {
        wharf_transport::Error::Remote(m) => m,
        other => panic!("expected an HTTP error from the server, got {other}"),
    }
}

#[test]
fn tokens_are_enforced_and_refused_pushes_store_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst, ro) = (store(&d, "src"), store(&d, "dst"), store(&d, "ro"));
    add(&src, "v1", &image(Layout::Legacy, Version::V1));
    let url = serve(&dst, tokens(Some("push-secret"), Some("read-secret")));
    for (token, want) in [
        (None, "HTTP 401"),
        (Some("wrong"), "HTTP 403"),
        (Some("push-secre"), "HTTP 403"),
        (Some("read-secret"), "HTTP 403"),
    ] {
        let e = client(&url, token)
            .push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
            .unwrap_err();
        let m = status_of(e);
        assert!(m.starts_with(want), "token {token:?}: {m}");
    }
    assert!(dst.list_refs().unwrap().is_empty());
    assert_eq!(packs(&d, "dst"), 0, "a refused push stored something");
    client(&url, Some("push-secret"))
        .push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
        .unwrap();
    // Reads need the read token here.
    let third = store(&d, "third");
    let m = status_of(
        client(&url, None)
            .pull(&third, "v1", "v1", &|_| {})
            .unwrap_err(),
    );
    assert!(m.starts_with("HTTP 401"), "{m}");
    let m = status_of(
        client(&url, Some("wrong"))
            .pull(&third, "v1", "v1", &|_| {})
            .unwrap_err(),
    );
    assert!(m.starts_with("HTTP 403"), "{m}");
    assert!(third.list_refs().unwrap().is_empty());
    client(&url, Some("read-secret"))
        .pull(&third, "v1", "v1", &|_| {})
        .unwrap();
    assert_eq!(extract(&third, "v1"), extract(&src, "v1"));
    // No push token: read-only, whatever the client sends.
    let ro_url = serve(&ro, tokens(None, None));
    let c = client(&ro_url, Some("push-secret"));
    assert!(c.server.read_only);
    let m = status_of(
        c.push(&src, "v1", "v1", DeltaOptions::default(), &|_| {})
            .unwrap_err(),
    );
    assert!(m.starts_with("HTTP 403") && m.contains("read-only"), "{m}");
    // Deltas are writes too, with or without a token.
    for t in [None, Some("push-secret")] {
        let (status, _) = raw(&ro_url, "/v1/put-delta", t, b"\x00").unwrap();
        assert_eq!(status, 403, "put-delta on a read-only server, token {t:?}");
    }
    assert!(ro.list_refs().unwrap().is_empty());
    assert_eq!(packs(&d, "ro"), 0);
}

fn zstd_frame(b: &[u8]) -> Vec<u8> {
    // A valid zstd frame of raw content (see transfer.rs).
    let mut v = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, b.len() as u8];
    let block = ((b.len() as u32) << 3) | 1;
    v.extend_from_slice(&block.to_le_bytes()[..3]);
    v.extend_from_slice(b);
    v
}

fn entry(id: [u8; 32], raw: &[u8]) -> Vec<u8> {
    let z = zstd_frame(raw);
    let mut e = id.to_vec();
    e.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    e.extend_from_slice(&(z.len() as u32).to_le_bytes());
    e.extend_from_slice(&z);
    e
}

/// Sends one raw request; `Ok(status, body)`, or `Err` when the server
/// closed the connection (what an oversized body may get instead of a reply).
fn raw(url: &str, path: &str, token: Option<&str>, body: &[u8]) -> Result<(u16, String), String> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut r = agent.post(format!("{url}{path}"));
    if let Some(t) = token {
        r = r.header("Authorization", format!("Bearer {t}"));
    }
    let mut res = r.send(body).map_err(|e| e.to_string())?;
    let text = res.body_mut().read_to_string().unwrap_or_default();
    Ok((res.status().as_u16(), text))
}

#[test]
fn hostile_requests_get_4xx_and_nothing_is_named() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let url = serve(&dst, tokens(Some("t"), None));
    let good = b"hello, chunk";
    let good_id = wharf_format::ChunkId::of(good);
    let publish =
        |recipe: &str| format!(r#"{{"name":"x","recipe":"{recipe}","len":1}}"#).into_bytes();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "truncated entry",
            "/v1/put",
            entry(good_id.0, good)[..30].to_vec(),
            400,
        ),
        (
            "entry longer than the body",
            "/v1/put",
            {
                let e = entry(good_id.0, good);
                e[..e.len() - 3].to_vec()
            },
            400,
        ),
        (
            "bad hash",
            "/v1/put",
            [entry(good_id.0, good), entry([7; 32], b"evil")].concat(),
            400,
        ),
        (
            "not zstd",
            "/v1/put",
            {
                // An id the server does not hold: one it holds is dropped unread.
                let mut e = wharf_format::ChunkId::of(b"never stored here").0.to_vec();
                e.extend_from_slice(&12u32.to_le_bytes());
                e.extend_from_slice(&4u32.to_le_bytes());
                e.extend_from_slice(b"junk");
                e
            },
            400,
        ),
        (
            "publish of nothing",
            "/v1/publish",
            publish(&"ab".repeat(32)),
            409,
        ),
        (
            "publish of bad json",
            "/v1/publish",
            b"{not json".to_vec(),
            400,
        ),
        ("publish with a bad id", "/v1/publish", publish("zz"), 400),
        ("ids not a multiple of 32", "/v1/has", vec![1; 33], 400),
        (
            "too many ids",
            "/v1/has",
            vec![0; 32 * (wharf_transport::frame::MAX_IDS + 1)],
            400,
        ),
        (
            "too many layer ids",
            "/v1/has-layers",
            vec![0; 32 * (wharf_transport::frame::MAX_IDS + 1)],
            400,
        ),
        ("get of a chunk not here", "/v1/get", vec![9; 32], 404),
        ("get of a broken id list", "/v1/get", vec![9; 31], 400),
        ("no such endpoint", "/v1/nope", vec![], 404),
    ];
    for (what, path, body, want) in cases {
        let got = raw(&url, path, Some("t"), &body);
        assert_eq!(got.as_ref().map(|g| g.0), Ok(want), "{what}: {got:?}");
        let msg = got.map(|g| g.1).unwrap_or_default();
        assert!(!msg.is_empty(), "{what}: no message");
    }
    // The bad-hash batch held a good chunk too: the batch is refused and no
    // name can point at anything.
    assert!(dst.list_refs().unwrap().is_empty());
    // Oversized: refused by the body limit (413), or the connection is cut
    // before the server reads it all; either way, nothing stored.
    let big = vec![0u8; http::MAX_BODY + 1024];
    match raw(&url, "/v1/put", Some("t"), &big) {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(e) => eprintln!("oversized body: connection closed ({e})"),
    }
    match raw(&url, "/v1/has", Some("t"), &big) {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(e) => eprintln!("oversized body: connection closed ({e})"),
    }
    // The server is still there and says so.
    let c = client(&url, None);
    assert_eq!(c.server.protocol, wharf_transport::PROTOCOL_VERSION);
    assert!(dst.list_refs().unwrap().is_empty());
    assert!(!dst.contains(&wharf_format::ChunkId([7; 32])));
    assert!(wharf_format::maintenance::verify(&dst, true)
        .unwrap()
        .errors
        .is_empty());
}

#[test]
fn a_client_of_another_protocol_version_is_told_so() {
    let d = tempfile::tempdir().unwrap();
    let dst = store(&d, "dst");
    let url = serve(&dst, tokens(None, None));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut res = agent
        .post(format!("{url}/v1/has"))
        .header(http::VERSION_HEADER, "99")
        .send(&[0u8; 32][..])
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    let msg = res.body_mut().read_to_string().unwrap();
    assert!(msg.contains("version 99"), "{msg}");
    // And a URL that is not http:// is refused before any connection.
    assert!(HttpClient::connect("https://127.0.0.1:1", None).is_err());
    assert!(HttpClient::connect("ftp://127.0.0.1:1", None).is_err());
}

/// The HTTP client's pull dry run: held layers, missing bytes bounding the
/// pull, and no name set.
#[test]
fn pull_dry_run_over_http() {
    let d = tempfile::tempdir().unwrap();
    let (remote, local) = (store(&d, "remote"), store(&d, "local"));
    let v1 = image(Layout::Legacy, Version::V1);
    let v2 = image(Layout::Legacy, Version::V2);
    add(&remote, "v1", &v1);
    add(&remote, "v2", &v2);
    add(&local, "v1", &v1);
    let url = serve(&remote, tokens(None, None));
    let plan = client(&url, None).plan_pull(&local, "v2").unwrap();
    assert!(plan.uncompressed);
    assert!(local.get_ref("v2").unwrap().is_none());
    assert!(
        plan.layers.iter().any(|l| l.whole_layer_present),
        "{plan:?}"
    );
    assert!(plan.total_missing_bytes > 0, "{plan:?}");
    let rep = client(&url, None)
        .pull_with(&local, "v2", "v2", DeltaOptions::none(), &|_| {})
        .unwrap();
    assert_eq!(extract(&local, "v2"), v2);
    assert!(
        rep.payload_bytes <= plan.total_missing_bytes,
        "{rep:?} {plan:?}"
    );
    let err = client(&url, None).plan_pull(&local, "nope").unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
