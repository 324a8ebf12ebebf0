//! `wharf serve --listen` as a real process on 127.0.0.1: push and pull by
//! the CLI, tokens from a file and $WHARF_TOKEN, and a push whose server is
//! SIGKILLed mid-way that, resumed, sends less than a whole push.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_transport::http::HttpClient;
use wharf_transport::send::DeltaOptions;

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

/// A server killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `wharf serve --listen 127.0.0.1:0` and reads the address it bound.
fn serve(store: &Path, push_token: Option<&Path>) -> Server {
    let mut c = wharf(store);
    c.args(["serve", "--listen", "127.0.0.1:0"]);
    if let Some(t) = push_token {
        c.arg("--push-token-file").arg(t);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    // One line; the server prints it once it accepts connections.
    out.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Server { child, url }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// The demo's store and tars, made once per test.
fn demo(d: &Path) -> std::path::PathBuf {
    ok(Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["--json", "demo", "--keep"])
        .arg(d)
        .output()
        .unwrap());
    d.join("store")
}

#[test]
fn cli_push_and_pull_over_http_with_tokens() {
    let d = tempfile::tempdir().unwrap();
    let src = demo(d.path());
    let dst = d.path().join("dst");
    ok(wharf(&dst).arg("init").output().unwrap());
    let token = d.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let empty = d.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    // An empty token file is refused by the server and by the client.
    let out = wharf(&dst)
        .args(["serve", "--listen", "127.0.0.1:0", "--push-token-file"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let server = serve(&dst, Some(&token));
    let out = wharf(&src)
        .args(["push", "wharf-demo:v1", &server.url, "--token-file"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // No token: a clear 401, nothing named.
    let out = wharf(&src)
        .args(["push", "wharf-demo:v1", &server.url])
        .env_remove("WHARF_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("401"), "{err}");
    assert!(ok(wharf(&dst).arg("ls").output().unwrap())
        .lines()
        .all(|l| !l.contains("wharf-demo")));
    let p1 = json(&ok(wharf(&src)
        .args([
            "--json",
            "push",
            "wharf-demo:v1",
            &server.url,
            "--token-file",
        ])
        .arg(&token)
        .output()
        .unwrap()));
    let p2 = json(&ok(wharf(&src)
        .args(["--json", "push", "wharf-demo:v2", &server.url])
        .env("WHARF_TOKEN", "s3cret")
        .output()
        .unwrap()));
    let p3 = json(&ok(wharf(&src)
        .args([
            "--json",
            "push",
            "wharf-demo:v2",
            &server.url,
            "--as",
            "again",
        ])
        .env("WHARF_TOKEN", "s3cret")
        .output()
        .unwrap()));
    let w = |j: &serde_json::Value| j["wire_bytes_out"].as_u64().unwrap();
    assert!(w(&p2) * 4 < w(&p1), "v2 sent {}, v1 {}", w(&p2), w(&p1));
    assert_eq!(p3["chunks_sent"].as_u64(), Some(0), "{p3}");
    assert!(w(&p3) < 4096, "{p3}");
    // Pull into a third store: byte-identical to the original tar.
    let third = d.path().join("third");
    ok(wharf(&third).arg("init").output().unwrap());
    ok(wharf(&third)
        .args(["pull", &server.url, "wharf-demo:v2", "--as", "copy"])
        .output()
        .unwrap());
    let out = wharf(&third)
        .args(["extract", "copy", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == std::fs::read(d.path().join("wharf-demo_v2.tar")).unwrap());
}

#[test]
fn push_interrupted_by_a_killed_server_resumes_without_resending() {
    let d = tempfile::tempdir().unwrap();
    let src_path = demo(d.path());
    let src = Arc::new(wharf_format::Store::open(&src_path).unwrap());
    let token = d.path().join("token");
    std::fs::write(&token, "s3cret").unwrap();
    // A whole push, to a fresh store, for reference.
    let full_dst = d.path().join("full");
    ok(wharf(&full_dst).arg("init").output().unwrap());
    let full = {
        let s = serve(&full_dst, Some(&token));
        HttpClient::connect(&s.url, Some("s3cret".into()))
            .unwrap()
            .push(
                &src,
                "wharf-demo:v1",
                "v1",
                DeltaOptions::default(),
                &|_| {},
            )
            .unwrap()
    };
    // Small PUTs, one at a time; the server is SIGKILLed after the third.
    let dst = d.path().join("dst");
    ok(wharf(&dst).arg("init").output().unwrap());
    let server = Mutex::new(Some(serve(&dst, Some(&token))));
    let url = server.lock().unwrap().as_ref().unwrap().url.clone();
    let mut c = HttpClient::connect(&url, Some("s3cret".into())).unwrap();
    c.put_bytes = 1 << 20;
    c.in_flight = 1;
    let puts = Mutex::new(0u32);
    let started = Instant::now();
    let res = c.push(
        &src,
        "wharf-demo:v1",
        "v1",
        DeltaOptions::default(),
        &|_| {
            let mut n = puts.lock().unwrap();
            *n += 1;
            if *n == 3 {
                // Dropping the server kills it (SIGKILL) and reaps it.
                drop(server.lock().unwrap().take());
            }
        },
    );
    assert!(res.is_err(), "the push survived its server's death");
    assert!(started.elapsed() < Duration::from_secs(60));
    let (first_out, _) = c.wire_bytes();
    assert!(*puts.lock().unwrap() >= 3);
    // Nothing was named; what arrived is there.
    assert!(ok(wharf(&dst).arg("ls").output().unwrap())
        .lines()
        .all(|l| !l.contains("v1")));
    ok(wharf(&dst).args(["verify"]).output().unwrap());
    // Resume against a new server on the same store.
    let again = serve(&dst, Some(&token));
    let resumed = json(&ok(wharf(&src_path)
        .args(["--json", "push", "wharf-demo:v1", &again.url, "--as", "v1"])
        .env("WHARF_TOKEN", "s3cret")
        .output()
        .unwrap()));
    let resumed_out = resumed["wire_bytes_out"].as_u64().unwrap();
    let skipped = resumed["chunks_skipped"].as_u64().unwrap();
    assert!(
        skipped > 0 && resumed_out < full.wire_bytes_out,
        "resumed push sent {resumed_out} bytes, skipping {skipped} chunks; a whole push sends {}",
        full.wire_bytes_out
    );
    // What the first attempt got across is not sent again.
    assert!(
        resumed_out + first_out >= full.wire_bytes_out,
        "resumed {resumed_out} + first {first_out} < whole {}",
        full.wire_bytes_out
    );
    let out = wharf(&dst)
        .args(["extract", "v1", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == std::fs::read(d.path().join("wharf-demo_v1.tar")).unwrap());
}
