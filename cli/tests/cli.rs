//! The `wharf` binary end to end: crash safety under SIGKILL, the demo,
//! JSON output, error messages, and skopeo's opinion of what we rebuild.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn wharf(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.arg("--store").arg(store).arg("--quiet");
    c
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

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half-compressible, like binaries.
        v.extend_from_slice(&x.to_le_bytes()[..4]);
        v.extend_from_slice(&[0, 0, (x >> 60) as u8, 1]);
    }
    v.truncate(len);
    v
}

/// `wharf --json demo --keep DIR`: the two synthetic image versions as
/// tars in DIR and added to DIR/store; returns what the demo printed.
fn run_demo(dir: &Path) -> String {
    ok(Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["--json", "demo", "--keep"])
        .arg(dir)
        .output()
        .unwrap())
}

fn demo_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    run_demo(d.path());
    d
}

fn write(dir: &Path, name: &str, b: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn killed_add_leaves_a_store_that_verifies_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(wharf(&store).arg("init").output().unwrap());
    let old = write(d.path(), "old.bin", &bytes(3_000_000, 1));
    ok(wharf(&store)
        .args(["add"])
        .arg(&old)
        .args(["--name", "old"])
        .output()
        .unwrap());
    let big = write(d.path(), "big.bin", &bytes(120_000_000, 2));
    let mut killed_mid_way = 0;
    for (i, ms) in [5u64, 40, 90, 150, 250, 400].iter().enumerate() {
        let mut child = wharf(&store)
            .arg("add")
            .arg(&big)
            .args(["--name", "big"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        let finished = child.try_wait().unwrap().is_some();
        // SAFETY: plain FFI call sending SIGKILL to our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        child.wait().unwrap();
        if !finished {
            killed_mid_way += 1;
        }
        let v = wharf(&store).args(["verify", "--full"]).output().unwrap();
        assert!(
            v.status.success(),
            "after kill {i} at {ms} ms the store does not verify:\n{}",
            String::from_utf8_lossy(&v.stdout)
        );
        let out = d.path().join("old.out");
        ok(wharf(&store)
            .args(["extract", "old", "-o"])
            .arg(&out)
            .output()
            .unwrap());
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&old).unwrap());
        // Until an add completes, the name does not exist.
        let ls = ok(wharf(&store).args(["--json", "ls"]).output().unwrap());
        let names: serde_json::Value = serde_json::from_str(&ls).unwrap();
        let has_big = names.as_array().unwrap().iter().any(|n| n["name"] == "big");
        if has_big {
            let out = d.path().join("big.out");
            ok(wharf(&store)
                .args(["extract", "big", "-o"])
                .arg(&out)
                .output()
                .unwrap());
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&big).unwrap());
        }
    }
    assert!(
        killed_mid_way >= 2,
        "only {killed_mid_way} kills landed during the add"
    );
    ok(wharf(&store)
        .arg("add")
        .arg(&big)
        .args(["--name", "big"])
        .output()
        .unwrap());
    let out = d.path().join("big.out");
    ok(wharf(&store)
        .args(["extract", "big", "-o"])
        .arg(&out)
        .output()
        .unwrap());
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&big).unwrap());
    ok(wharf(&store).arg("gc").output().unwrap());
    let v = ok(wharf(&store).args(["verify", "--full"]).output().unwrap());
    assert!(!v.contains("note:"), "gc left leftovers: {v}");
}

#[test]
fn demo_proves_a_byte_identical_rebuild() {
    let d = tempfile::tempdir().unwrap();
    let text = run_demo(d.path());
    let v: serde_json::Value = serde_json::from_str(&text).expect("demo --json prints JSON");
    assert_eq!(v["byte_identical"], true, "{text}");
    let full = v["v2_bytes"].as_u64().unwrap();
    let new = v["v2_new_bytes"].as_u64().unwrap();
    assert!(full > 10_000_000, "{text}");
    assert!(
        new * 4 < full,
        "v2 should cost well under a quarter of its size: {text}"
    );
}

#[test]
fn json_outputs_parse_and_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let e = wharf(&store).args(["ls"]).output().unwrap();
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("wharf init"), "{msg}");
    ok(wharf(&store).arg("init").output().unwrap());
    let f = write(d.path(), "x.bin", &bytes(100_000, 3));
    let add = ok(wharf(&store)
        .args(["--json", "add"])
        .arg(&f)
        .args(["-n", "x:1"])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&add).unwrap();
    assert_eq!(v["len"], 100_000);
    for args in [
        vec!["ls"],
        vec!["info", "x:1"],
        vec!["verify"],
        vec!["gc", "--dry-run"],
    ] {
        let out = ok(wharf(&store).arg("--json").args(&args).output().unwrap());
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"));
    }
    let e = wharf(&store)
        .args(["extract", "nope", "-o", "-"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("nope"));
    let e = wharf(&store)
        .args(["add", "/definitely/missing", "-n", "m"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("/definitely/missing"));
}

#[test]
fn stdin_and_stdout_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(wharf(&store).arg("init").output().unwrap());
    let data = bytes(5_000_000, 9);
    let f = write(d.path(), "in.bin", &data);
    ok(wharf(&store)
        .args(["add", "-", "--name", "piped"])
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .unwrap());
    let out = wharf(&store)
        .args(["extract", "piped", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data);
}

/// `-o` naming a FIFO or a device (`-o /dev/null`, a pipe into `docker
/// load`) writes into it: the temporary-file-and-rename that protects a
/// regular output file must never replace the special file (it once turned
/// the machine's `/dev/null` into a regular file).
#[test]
fn outputs_that_are_fifos_are_written_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(wharf(&store).arg("init").output().unwrap());
    let data = bytes(3_000_000, 21);
    let f = write(d.path(), "in.bin", &data);
    ok(wharf(&store)
        .args(["add"])
        .arg(&f)
        .args(["--name", "v1"])
        .output()
        .unwrap());
    let mut more = data.clone();
    more.extend_from_slice(&bytes(500_000, 22));
    let f2 = write(d.path(), "in2.bin", &more);
    ok(wharf(&store)
        .args(["add"])
        .arg(&f2)
        .args(["--name", "v2"])
        .output()
        .unwrap());
    for (what, args) in [
        ("extract", vec!["extract", "v1", "-o"]),
        ("bundle", vec!["bundle", "v2", "--have", "v1", "-o"]),
    ] {
        let fifo = d.path().join(format!("{what}.fifo"));
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo failed");
        // Opening a FIFO blocks until the other end opens: read on a thread.
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let out = wharf(&store).args(&args).arg(&fifo).output().unwrap();
        let is_fifo = std::fs::symlink_metadata(&fifo)
            .map(|m| m.file_type().is_fifo())
            .unwrap_or(false);
        // Checked before joining: had the FIFO been replaced, the reader
        // would wait forever on the old one.
        assert!(is_fifo, "{what} -o FIFO replaced the FIFO");
        ok(out);
        let got = reader.join().unwrap();
        match what {
            "extract" => assert!(got == data, "extract into a FIFO: wrong bytes"),
            _ => assert!(
                got.starts_with(b"WHARFBD") && got.len() > 1000,
                "bundle into a FIFO: {} bytes",
                got.len()
            ),
        }
    }
}

/// skopeo reads what we rebuild; skipped, visibly, where skopeo is missing.
#[test]
fn skopeo_reads_rebuilt_archives() {
    if Command::new("skopeo").arg("--version").output().is_err() {
        eprintln!("SKIPPED: skopeo is not installed (.ci/run installs it)");
        return;
    }
    let d = demo_dir();
    let store = d.path().join("store");
    for name in ["wharf-demo:v2", "wharf-demo:v2-oci"] {
        let tar = d
            .path()
            .join(format!("{}.rebuilt.tar", name.replace(':', "_")));
        ok(wharf(&store)
            .args(["extract", name, "-o"])
            .arg(&tar)
            .output()
            .unwrap());
        let s = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", tar.display()))
            .output()
            .unwrap();
        assert!(
            s.status.success(),
            "skopeo rejects {name}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
    }
}

/// push, pull, bundle and unbundle through the binary, between local
/// stores (the same `serve --stdio` path that ssh uses).
#[test]
fn push_pull_and_bundle_between_stores() {
    let d = demo_dir();
    let src = d.path().join("store");
    let dst = d.path().join("dst");
    ok(wharf(&dst).arg("init").output().unwrap());
    let p1 = ok(wharf(&src)
        .args(["--json", "push", "wharf-demo:v1"])
        .arg(&dst)
        .output()
        .unwrap());
    let p2 = ok(wharf(&src)
        .args(["--json", "push", "wharf-demo:v2"])
        .arg(&dst)
        .output()
        .unwrap());
    let j1: serde_json::Value = serde_json::from_str(&p1).unwrap();
    let j2: serde_json::Value = serde_json::from_str(&p2).unwrap();
    let (w1, w2) = (
        j1["wire_bytes_out"].as_u64().unwrap(),
        j2["wire_bytes_out"].as_u64().unwrap(),
    );
    assert!(w2 * 4 < w1, "v2 push sent {w2} bytes, v1 {w1}");
    let rebuilt = d.path().join("v2.from-dst.tar");
    ok(wharf(&dst)
        .args(["extract", "wharf-demo:v2", "-o"])
        .arg(&rebuilt)
        .output()
        .unwrap());
    assert!(
        std::fs::read(&rebuilt).unwrap()
            == std::fs::read(d.path().join("wharf-demo_v2.tar")).unwrap()
    );

    // Pull back into a third store.
    let third = d.path().join("third");
    ok(wharf(&third).arg("init").output().unwrap());
    ok(wharf(&third)
        .arg("pull")
        .arg(&dst)
        .args(["wharf-demo:v2", "--as", "copy"])
        .output()
        .unwrap());
    let out = wharf(&third)
        .args(["extract", "copy", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout == std::fs::read(&rebuilt).unwrap());

    // Offline: the receiver says what it has, the sender bundles the rest.
    let fourth = d.path().join("fourth");
    ok(wharf(&fourth).arg("init").output().unwrap());
    ok(wharf(&fourth)
        .arg("pull")
        .arg(&src)
        .arg("wharf-demo:v1")
        .output()
        .unwrap());
    let have = d.path().join("fourth.have");
    ok(wharf(&fourth)
        .args(["have", "-o"])
        .arg(&have)
        .output()
        .unwrap());
    let bundle = d.path().join("v2.wharf");
    ok(wharf(&src)
        .args(["bundle", "wharf-demo:v2", "--have-file"])
        .arg(&have)
        .arg("-o")
        .arg(&bundle)
        .output()
        .unwrap());
    let size = std::fs::metadata(&bundle).unwrap().len();
    assert!(size * 4 < w1, "bundle of {size} bytes is not a delta");
    ok(wharf(&fourth)
        .arg("unbundle")
        .arg(&bundle)
        .output()
        .unwrap());
    let out = wharf(&fourth)
        .args(["extract", "wharf-demo:v2", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout == std::fs::read(&rebuilt).unwrap());

    // Not a store / unknown scheme: clear errors.
    let e = wharf(&src)
        .args(["push", "wharf-demo:v2", "/nonexistent/store"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("not a wharf store"));
    let e = wharf(&src)
        .args(["push", "wharf-demo:v2", "https://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("built without TLS"));
}

/// Two pushes into one store at once, of images that share most chunks:
/// both succeed, both rebuild exactly, the store verifies.
#[test]
fn concurrent_pushes_of_images_sharing_chunks_both_succeed() {
    let d = demo_dir();
    let src = d.path().join("store");
    let dst = d.path().join("dst");
    ok(wharf(&dst).arg("init").output().unwrap());
    let children: Vec<_> = ["wharf-demo:v1", "wharf-demo:v2-oci"]
        .iter()
        .map(|name| {
            wharf(&src)
                .args(["push", name])
                .arg(&dst)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        ok(c.wait_with_output().unwrap());
    }
    for (name, file) in [
        ("wharf-demo:v1", "wharf-demo_v1.tar"),
        ("wharf-demo:v2-oci", "wharf-demo_v2-oci.tar"),
    ] {
        let out = wharf(&dst)
            .args(["extract", name, "-o", "-"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}");
        assert!(
            out.stdout == std::fs::read(d.path().join(file)).unwrap(),
            "{name} differs"
        );
    }
    ok(wharf(&dst).args(["verify", "--full"]).output().unwrap());
}

/// `push --dry-run` and `bundle --dry-run` say per layer what would move,
/// move nothing, and agree with what the real push then sends.
#[test]
fn dry_runs_predict_the_push_and_move_nothing() {
    let d = demo_dir();
    let src = d.path().join("store");
    let dst = d.path().join("dst");
    ok(wharf(&dst).arg("init").output().unwrap());
    ok(wharf(&src)
        .args(["push", "wharf-demo:v1"])
        .arg(&dst)
        .output()
        .unwrap());
    let plan = ok(wharf(&src)
        .args(["--json", "push", "--dry-run", "wharf-demo:v2"])
        .arg(&dst)
        .output()
        .unwrap());
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let layers = plan["layers"].as_array().unwrap();
    assert!(layers.len() >= 3, "{plan}");
    assert!(
        layers.iter().any(|l| l["whole_layer_present"] == true),
        "the unchanged base layer should be present whole: {plan}"
    );
    let names = ok(wharf(&dst).args(["--json", "ls"]).output().unwrap());
    assert!(
        !names.contains("wharf-demo:v2"),
        "a dry run published the name"
    );
    let predicted = plan["total_missing_bytes"].as_u64().unwrap();
    let bundle_plan = ok(wharf(&src)
        .args([
            "--json",
            "bundle",
            "--dry-run",
            "wharf-demo:v2",
            "--have",
            "wharf-demo:v1",
            "-o",
        ])
        .arg(d.path().join("never.wharf"))
        .output()
        .unwrap());
    assert!(
        !d.path().join("never.wharf").exists(),
        "a dry run wrote the bundle"
    );
    let bundle_plan: serde_json::Value = serde_json::from_str(&bundle_plan).unwrap();
    // The same chunks and deltas, but for the recipe: a push learns that
    // the receiver holds v1's very recipe chunk and sends v2's as a delta
    // against it; `--have v1` says only that it holds the image.
    let bundled = bundle_plan["total_missing_bytes"].as_u64().unwrap();
    assert!(
        bundled >= predicted && bundled <= predicted + 2048,
        "bundle {bundle_plan} vs push {plan}"
    );
    let real = ok(wharf(&src)
        .args(["--json", "push", "wharf-demo:v2"])
        .arg(&dst)
        .output()
        .unwrap());
    let real: serde_json::Value = serde_json::from_str(&real).unwrap();
    // The prediction prices deltas layer by layer; the push puts every
    // layer's deltas in one frame with one table of base nodes (33 bytes a
    // node), and a node or list piece there may name content of other
    // layers sent before it. So the two agree closely, not exactly.
    let paid = real["payload_bytes"].as_u64().unwrap();
    assert!(
        paid.abs_diff(predicted) <= predicted / 10 + 1024,
        "dry run {plan} vs push {real}"
    );
    let (pc, rc) = (
        plan["delta_chunks"].as_u64().unwrap(),
        real["delta_chunks"].as_u64().unwrap(),
    );
    assert!(pc.abs_diff(rc) <= 2, "{plan} vs {real}");
    assert!(real["delta_chunks"].as_u64().unwrap() > 0, "{real}");
}

/// No store on the receiver, only last version's tar: used as a seed, the
/// pull fetches about what a store holding v1 would, and leaves no store.
#[test]
fn pull_with_a_seed_tar_and_no_store() {
    let d = demo_dir();
    let src = d.path().join("store");
    let nowhere = d.path().join("no-store-here");
    let out_tar = d.path().join("v2.pulled.tar");
    let seeded = ok(wharf(&nowhere)
        .args(["--json", "pull"])
        .arg(&src)
        .args(["wharf-demo:v2", "--seed"])
        .arg(d.path().join("wharf-demo_v1.tar"))
        .arg("-o")
        .arg(&out_tar)
        .output()
        .unwrap());
    assert!(
        std::fs::read(&out_tar).unwrap()
            == std::fs::read(d.path().join("wharf-demo_v2.tar")).unwrap()
    );
    assert!(
        !nowhere.exists(),
        "a seeded pull to a file left a store behind"
    );
    let unseeded_tar = d.path().join("v2.unseeded.tar");
    let unseeded = ok(wharf(&nowhere)
        .args(["--json", "pull"])
        .arg(&src)
        .arg("wharf-demo:v2")
        .arg("-o")
        .arg(&unseeded_tar)
        .output()
        .unwrap());
    let with: serde_json::Value = serde_json::from_str(&seeded).unwrap();
    let without: serde_json::Value = serde_json::from_str(&unseeded).unwrap();
    let (a, b) = (
        with["wire_bytes_in"].as_u64().unwrap(),
        without["wire_bytes_in"].as_u64().unwrap(),
    );
    assert!(
        a * 4 < b,
        "the seed saved too little: {a} with, {b} without"
    );
}

/// An OCI-layout-like tar holding one layer blob and a manifest.
fn image_with_blob(blob: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let name = format!("blobs/sha256/{}", hex::encode(sha2::Sha256::digest(blob)));
    let mut w = wharf_format::synth::TarWriter::new(Vec::new());
    w.file(&name, 0o444, 0, blob).unwrap();
    w.file("manifest.json", 0o644, 0, format!("[{name:?}]").as_bytes())
        .unwrap();
    w.finish().unwrap();
    w.into_inner()
}

fn layer_methods(store: &Path, name: &str) -> Vec<String> {
    let info: serde_json::Value = serde_json::from_str(&ok(wharf(store)
        .args(["--json", "info", name])
        .output()
        .unwrap()))
    .unwrap();
    info["layers"]
        .as_array()
        .expect("layers in info --json")
        .iter()
        .map(|l| {
            l["compression"]["method"]
                .as_str()
                .unwrap_or("none")
                .to_string()
        })
        .collect()
}

/// `--gzip-deep` reaches ingest from `add`, and `init --gzip-deep` makes it
/// the store's default: a layer written by klauspost/pgzip (skopeo) is then
/// stored by content; without either it is kept as it is, and `info` names
/// the flag. Taking the advice and adding the same image again with the
/// flag models the layer anew instead of reusing it as it was stored.
#[test]
fn gzip_deep_from_add_and_from_the_store_config() {
    const PGZIP_LAYER: &[u8] =
        include_bytes!("../../format/tests/fixtures/pgzip-debian-etc.tar.gz");
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("img.tar");
    let bytes = image_with_blob(PGZIP_LAYER);
    std::fs::write(&tar, &bytes).unwrap();

    let plain = dir.path().join("plain");
    ok(wharf(&plain).arg("init").output().unwrap());
    let config = std::fs::read_to_string(plain.join("config.json")).unwrap();
    assert!(!config.contains("gzip_max_chain"), "{config}");
    ok(wharf(&plain)
        .arg("add")
        .arg(&tar)
        .args(["--name", "stock"])
        .output()
        .unwrap());
    assert_eq!(layer_methods(&plain, "stock"), ["raw"]);
    let text = ok(wharf(&plain).args(["info", "stock"]).output().unwrap());
    assert!(text.contains("--gzip-deep"), "info names the flag:\n{text}");
    ok(wharf(&plain)
        .arg("add")
        .arg(&tar)
        .args(["--name", "deep", "--gzip-deep"])
        .output()
        .unwrap());
    assert_eq!(layer_methods(&plain, "deep"), ["preflate"]);
    // Now known by content, a plain add reuses that form.
    ok(wharf(&plain)
        .arg("add")
        .arg(&tar)
        .args(["--name", "again"])
        .output()
        .unwrap());
    assert_eq!(layer_methods(&plain, "again"), ["preflate"]);

    let deep = dir.path().join("deep");
    ok(wharf(&deep).args(["init", "--gzip-deep"]).output().unwrap());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(deep.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["gzip_max_chain"], 32768, "{config}");
    ok(wharf(&deep)
        .arg("add")
        .arg(&tar)
        .args(["--name", "x"])
        .output()
        .unwrap());
    assert_eq!(layer_methods(&deep, "x"), ["preflate"]);
    let out = dir.path().join("out.tar");
    ok(wharf(&deep)
        .args(["extract", "x", "-o"])
        .arg(&out)
        .output()
        .unwrap());
    assert!(std::fs::read(&out).unwrap() == bytes, "byte-identical");
}

/// Runs `script` (bash, `$1` = the wharf binary, `$2` = a directory to work
/// in) in a mount namespace of its own, where it may mount a small tmpfs to
/// fill. None, after saying why, where no mount namespace can be made.
fn in_mount_namespace(script: &str, dir: &Path) -> Option<Output> {
    let attempts: [&[&str]; 2] = [
        &["--mount", "--propagation", "private"],
        &[
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
        ],
    ];
    let probe = |args: &[&str]| {
        Command::new("unshare")
            .args(args)
            .args(["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let Some(args) = attempts.into_iter().find(|a| probe(a)) else {
        let why = "SKIPPED: full-disk test: cannot mount a tmpfs in a mount namespace here \
                   (needs root or unprivileged user namespaces, and util-linux's unshare)";
        assert!(
            std::env::var_os("WHARF_REQUIRE_FULL_DISK").is_none(),
            "{why}, and WHARF_REQUIRE_FULL_DISK is set"
        );
        eprintln!("{why}");
        return None;
    };
    let path = dir.join("script.sh");
    std::fs::write(&path, script).unwrap();
    Some(
        Command::new("unshare")
            .args(args)
            .arg("bash")
            .arg(&path)
            .arg(env!("CARGO_BIN_EXE_wharf"))
            .arg(dir)
            .output()
            .unwrap(),
    )
}

/// A full disk, met by add, extract -o and a push into the full store: each
/// fails with an error that says so (once), leaves no scratch file behind to
/// keep the disk full, and loses nothing: the store verifies, what it held
/// extracts byte-identical, and once there is room the same commands work.
#[test]
fn a_full_disk_fails_cleanly_and_loses_nothing() {
    use rand::{RngCore, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut noise = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    // v1 fits the 6 MB filesystem; v2 (20 MB of incompressible data) cannot.
    for (name, len) in [("v1", 1_000_000), ("v2", 20_000_000)] {
        let mut w = wharf_format::synth::TarWriter::new(Vec::new());
        w.file("data.bin", 0o644, 1_700_000_000, &noise(len))
            .unwrap();
        w.finish().unwrap();
        std::fs::write(d.join(format!("{name}.tar")), w.into_inner()).unwrap();
    }
    let script = r#"
set -u
W=$1; D=$2
mkdir -p $D/mnt $D/log
mount -t tmpfs -o size=6m tmpfs $D/mnt || exit 90
S=$D/mnt/store; SRC=$D/src
run() { n=$1; shift; "$@" >$D/log/$n.out 2>$D/log/$n.err; echo $? >$D/log/$n.rc; }
left() { find $D/mnt -name '*.tmp' -o -name '*.part' -o -name out.tar | wc -l >$D/log/$1.left; }
run init $W --store $S init
run add-v1 $W --store $S add $D/v1.tar --name v1
run add-v2 $W --store $S add $D/v2.tar --name v2
left add-v2
run verify-1 $W --store $S verify --full
run x-v1 sh -c "$W --store $S extract v1 -o - | cmp - $D/v1.tar"
run src-init $W --store $SRC init
run src-add $W --store $SRC add $D/v2.tar --name v2
run extract-full $W --store $SRC extract v2 -o $D/mnt/out.tar
left extract-full
run push-full $W --store $SRC push v2 $S
left push-full
run verify-2 $W --store $S verify --full
mount -o remount,size=64m $D/mnt
run push-room $W --store $SRC push v2 $S
run x-v2 sh -c "$W --store $S extract v2 -o - | cmp - $D/v2.tar"
run add-room $W --store $S add $D/v2.tar --name v2-again
run verify-3 $W --store $S verify --full
"#;
    let Some(out) = in_mount_namespace(script, d) else {
        return;
    };
    assert!(
        out.status.success(),
        "script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = |step: &str, what: &str| {
        std::fs::read_to_string(d.join("log").join(format!("{step}.{what}")))
            .unwrap_or_else(|e| panic!("{step}.{what}: {e}"))
            .trim()
            .to_string()
    };
    let succeeded =
        |step: &str| assert_eq!(log(step, "rc"), "0", "{step} failed: {}", log(step, "err"));
    let failed_for_space = |step: &str| {
        assert_ne!(log(step, "rc"), "0", "{step} should fail: the disk is full");
        let err = log(step, "err");
        assert_eq!(
            err.matches("No space left on device").count(),
            // A push's receiver is a child on the same stderr: it says it
            // too, and the sender reports what the receiver said.
            if step == "push-full" { 2 } else { 1 },
            "{step}: the error names the cause, once per process:\n{err}"
        );
        assert_eq!(
            log(step, "left"),
            "0",
            "{step} left scratch files or a partial output behind"
        );
    };
    for step in ["init", "add-v1"] {
        succeeded(step);
    }
    failed_for_space("add-v2");
    failed_for_space("extract-full");
    failed_for_space("push-full");
    assert!(
        log("push-full", "err").contains("the other side says"),
        "the sender reports the receiver's reason, not a broken pipe:\n{}",
        log("push-full", "err")
    );
    for step in [
        "verify-1",
        "x-v1",
        "verify-2",
        "push-room",
        "x-v2",
        "add-room",
        "verify-3",
    ] {
        succeeded(step);
    }
}
