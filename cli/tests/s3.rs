//! `wharf` with its store in a bucket of a real 3-node Garage cluster
//! (replication factor 3) on loopback: init, add, extract, push, pull, ls,
//! verify and gc through `s3://`, byte-identical; a push that loses a node
//! midway; two writers adding at once; two stateless HTTP servers on one
//! bucket. Skipped with a message where no garage binary is found, unless
//! WHARF_REQUIRE_GARAGE=1 (CI), where that fails.

#[path = "../../objstore/tests/common/garage.rs"]
mod garage;

use garage::{cluster_or_skip, GarageCluster};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use wharf_format::synth::{self, Layout, Scale, Version};

struct Env {
    cluster: GarageCluster,
    dir: tempfile::TempDir,
    url: String,
}

impl Env {
    fn start(test: &str) -> Option<Env> {
        let cluster = cluster_or_skip(test, "wharf")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("s3://wharf/{test}-{:08x}", rand_u32());
        Some(Env { cluster, dir, url })
    }

    /// `wharf --store STORE --quiet ...` with the cluster's credentials and
    /// a cache of this test's own.
    fn wharf(&self, store: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
        for (k, v) in self.cluster.env() {
            c.env(k, v);
        }
        c.env("WHARF_CACHE", self.dir.path().join("cache"));
        c.arg("--store").arg(store).arg("--quiet");
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn local(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "wharf failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: Output) -> serde_json::Value {
    let s = ok(out);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn write_image(path: &Path, version: Version, scale: Scale, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    synth::write_image(&mut v, Layout::Oci, version, scale, seed).expect("synth");
    std::fs::write(path, &v).expect("write tar");
    v
}

fn assert_same_file(a: &Path, want: &[u8]) {
    let got = std::fs::read(a).expect("read extracted tar");
    assert!(
        got == want,
        "{} differs from the tar that was added",
        a.display()
    );
}

#[test]
fn s3_store_end_to_end() {
    let Some(e) = Env::start("s3-e2e") else {
        return;
    };
    let url = e.url.clone();
    let v1 = write_image(&e.path("v1.tar"), Version::V1, Scale::tiny(), 1);
    let v2 = write_image(&e.path("v2.tar"), Version::V2, Scale::tiny(), 1);

    ok(e.wharf(&url).arg("init").output().expect("run"));
    let again = e.wharf(&url).arg("init").output().expect("run");
    assert!(!again.status.success(), "a second init must refuse");
    ok(e.wharf(&url)
        .args(["add", "--name", "app:v1"])
        .arg(e.path("v1.tar"))
        .output()
        .expect("run"));
    ok(e.wharf(&url)
        .args(["extract", "app:v1", "-o"])
        .arg(e.path("v1.out"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v1.out"), &v1);
    // An unrelated image whose chunks are its own: removing it frees packs.
    write_image(&e.path("junk.tar"), Version::V1, Scale::tiny(), 99);
    ok(e.wharf(&url)
        .args(["add", "--name", "junk:1"])
        .arg(e.path("junk.tar"))
        .output()
        .expect("run"));

    // push from a local store: only what the bucket lacks goes up.
    let local = e.local("local");
    ok(e.wharf(&local).arg("init").output().expect("run"));
    for (tar, name) in [("v1.tar", "app:v1"), ("v2.tar", "app:v2")] {
        ok(e.wharf(&local)
            .args(["add", "--name", name])
            .arg(e.path(tar))
            .output()
            .expect("run"));
    }
    let rep = json(
        e.wharf(&local)
            .args(["--json", "push", "app:v2", &url])
            .output()
            .expect("run"),
    );
    // Deltas would only shrink the pipe to the local server child while
    // reading their bases back from the bucket: off for s3://.
    assert_eq!(rep["delta_chunks"].as_u64(), Some(0), "{rep}");
    let sent = rep["payload_bytes"].as_u64().expect("payload_bytes");
    assert!(
        sent < v2.len() as u64 / 2,
        "v1 is in the bucket: v2's push must send well under its size ({sent} of {})",
        v2.len()
    );
    // pull on a third machine's store, and straight to a file.
    let other = e.local("other");
    ok(e.wharf(&other).arg("init").output().expect("run"));
    ok(e.wharf(&other)
        .args(["pull", &url, "app:v2", "-o"])
        .arg(e.path("v2.pulled"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v2.pulled"), &v2);
    ok(e.wharf(&url)
        .args(["extract", "app:v2", "-o"])
        .arg(e.path("v2.out"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v2.out"), &v2);

    let ls = json(e.wharf(&url).args(["--json", "ls"]).output().expect("run"));
    let names: Vec<&str> = ls
        .as_array()
        .expect("ls array")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["app:v1", "app:v2", "junk:1"]);

    // gc: the default grace period keeps the fresh packs; --grace 0 frees junk.
    ok(e.wharf(&url).args(["rm", "junk:1"]).output().expect("run"));
    let young = json(
        e.wharf(&url)
            .args(["--json", "gc", "--dry-run"])
            .output()
            .expect("run"),
    );
    assert!(
        young["packs_too_young"].as_u64().unwrap_or(0) > 0,
        "{young}"
    );
    assert_eq!(young["bytes_freed"].as_u64(), Some(0), "{young}");
    let dry = json(
        e.wharf(&url)
            .args(["--json", "gc", "--dry-run", "--grace", "0"])
            .output()
            .expect("run"),
    );
    assert!(dry["bytes_freed"].as_u64().unwrap_or(0) > 0, "{dry}");
    let done = json(
        e.wharf(&url)
            .args(["--json", "gc", "--grace", "0"])
            .output()
            .expect("run"),
    );
    assert_eq!(done["bytes_freed"], dry["bytes_freed"], "{done}");
    // The dry run named exactly the packs gc then deleted or rewrote.
    assert_eq!(done["deleted"], dry["deleted"], "{done}");
    assert_eq!(done["rewritten"], dry["rewritten"], "{done}");
    let named = dry["deleted"].as_array().map_or(0, |a| a.len())
        + dry["rewritten"].as_array().map_or(0, |a| a.len());
    assert!(named > 0, "{dry}");
    ok(e.wharf(&url)
        .args(["extract", "app:v2", "-o"])
        .arg(e.path("v2.after-gc"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v2.after-gc"), &v2);
    ok(e.wharf(&url)
        .args(["extract", "app:v1", "-o"])
        .arg(e.path("v1.after-gc"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v1.after-gc"), &v1);
    let ver = json(
        e.wharf(&url)
            .args(["--json", "verify", "--full"])
            .output()
            .expect("run"),
    );
    assert_eq!(ver["errors"].as_array().map(|a| a.len()), Some(0), "{ver}");
}

#[test]
fn s3_push_survives_losing_a_node() {
    let Some(mut e) = Env::start("s3-node-loss") else {
        return;
    };
    let url = e.url.clone();
    let big = write_image(&e.path("big.tar"), Version::V1, Scale::demo(), 5);
    let local = e.local("local");
    ok(e.wharf(&local).arg("init").output().expect("run"));
    ok(e.wharf(&local)
        .args(["add", "--name", "big:1"])
        .arg(e.path("big.tar"))
        .output()
        .expect("run"));
    ok(e.wharf(&url).arg("init").output().expect("run"));
    let mut push = e
        .wharf(&local)
        .args(["push", "big:1", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start push");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        push.try_wait().expect("poll push").is_none(),
        "the push ended before a node could be stopped under it"
    );
    e.cluster.kill_node(2);
    let started = Instant::now();
    let out = push.wait_with_output().expect("wait push");
    ok(out);
    eprintln!(
        "push finished {:.1}s after node 2 was killed",
        started.elapsed().as_secs_f64()
    );
    ok(e.wharf(&url)
        .args(["extract", "big:1", "-o"])
        .arg(e.path("big.out"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("big.out"), &big);
    let ver = json(
        e.wharf(&url)
            .args(["--json", "verify"])
            .output()
            .expect("run"),
    );
    assert_eq!(ver["errors"].as_array().map(|a| a.len()), Some(0), "{ver}");
}

#[test]
fn s3_two_writers_add_at_once() {
    let Some(e) = Env::start("s3-two-writers") else {
        return;
    };
    let url = e.url.clone();
    ok(e.wharf(&url).arg("init").output().expect("run"));
    let tars: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            write_image(
                &e.path(&format!("w{i}.tar")),
                Version::V1,
                Scale::tiny(),
                40 + i,
            )
        })
        .collect();
    let children: Vec<_> = (0..2)
        .map(|i| {
            e.wharf(&url)
                .args(["add", "--name", &format!("w:{i}")])
                .arg(e.path(&format!("w{i}.tar")))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start add")
        })
        .collect();
    for c in children {
        ok(c.wait_with_output().expect("wait add"));
    }
    for (i, tar) in tars.iter().enumerate() {
        let out = e.path(&format!("w{i}.out"));
        ok(e.wharf(&url)
            .args(["extract", &format!("w:{i}"), "-o"])
            .arg(&out)
            .output()
            .expect("run"));
        assert_same_file(&out, tar);
    }
    let ver = json(
        e.wharf(&url)
            .args(["--json", "verify", "--full"])
            .output()
            .expect("run"),
    );
    assert_eq!(ver["errors"].as_array().map(|a| a.len()), Some(0), "{ver}");
}

/// Two `wharf serve` processes on one bucket, as behind a load balancer:
/// an image pushed through one is pulled through the other.
#[test]
fn s3_stateless_servers() {
    let Some(e) = Env::start("s3-servers") else {
        return;
    };
    let url = e.url.clone();
    ok(e.wharf(&url).arg("init").output().expect("run"));
    std::fs::write(e.path("token"), "s3cret-token\n").expect("token");
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        })
        .collect();
    let mut servers: Vec<_> = ports
        .iter()
        .map(|p| {
            e.wharf(&url)
                .args(["serve", "--listen", &format!("127.0.0.1:{p}")])
                .arg("--push-token-file")
                .arg(e.path("token"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start server")
        })
        .collect();
    for p in &ports {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            assert!(Instant::now() < deadline, "server on {p} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let v1 = write_image(&e.path("v1.tar"), Version::V1, Scale::tiny(), 9);
    let local = e.local("local");
    ok(e.wharf(&local).arg("init").output().expect("run"));
    ok(e.wharf(&local)
        .args(["add", "--name", "app:v1"])
        .arg(e.path("v1.tar"))
        .output()
        .expect("run"));
    ok(e.wharf(&local)
        .args(["push", "app:v1", &format!("http://127.0.0.1:{}", ports[0])])
        .arg("--token-file")
        .arg(e.path("token"))
        .output()
        .expect("run"));
    let other = e.local("other");
    ok(e.wharf(&other).arg("init").output().expect("run"));
    ok(e.wharf(&other)
        .args([
            "pull",
            &format!("http://127.0.0.1:{}", ports[1]),
            "app:v1",
            "-o",
        ])
        .arg(e.path("v1.pulled"))
        .output()
        .expect("run"));
    assert_same_file(&e.path("v1.pulled"), &v1);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// A machine with read-only credentials (deploy boxes that only pull)
/// lists and extracts, and is refused writes with the server's word for it.
#[test]
fn s3_read_only_credentials_read() {
    let Some(e) = Env::start("s3-read-only") else {
        return;
    };
    let url = e.url.clone();
    let v1 = write_image(&e.path("v1.tar"), Version::V1, Scale::tiny(), 21);
    ok(e.wharf(&url).arg("init").output().expect("run"));
    ok(e.wharf(&url)
        .args(["add", "--name", "app:v1"])
        .arg(e.path("v1.tar"))
        .output()
        .expect("run"));
    let (id, secret) = e.cluster.read_only_key().expect("read-only key");
    let reader = |args: &[&str]| {
        let mut c = e.wharf(&url);
        c.env("AWS_ACCESS_KEY_ID", &id)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .args(args);
        c
    };
    let ls = ok(reader(&["ls"]).output().expect("run"));
    assert!(ls.contains("app:v1"), "{ls}");
    let out = e.path("v1.out");
    ok(
        reader(&["extract", "app:v1", "-o", out.to_str().expect("utf-8")])
            .output()
            .expect("run"),
    );
    assert_same_file(&out, &v1);
    let denied = reader(&[
        "add",
        "--name",
        "app:again",
        e.path("v1.tar").to_str().expect("utf-8"),
    ])
    .output()
    .expect("run");
    assert!(!denied.status.success(), "a read-only key must not add");
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("wharf: error"), "{err}");
}
