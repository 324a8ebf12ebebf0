//! push and pull over a real sshd on loopback, started by the test with
//! keys it makes. Skipped, visibly, where sshd or ssh is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Starts sshd on 127.0.0.1 with a fresh host key, accepting a fresh user
/// key for the current user; None (after saying why) where it cannot run.
fn start_sshd(dir: &Path) -> Option<Sshd> {
    let Some(sshd) = find(&["/usr/sbin/sshd", "/usr/bin/sshd"]) else {
        eprintln!("SKIPPED: ssh tests: sshd is not installed (.ci/run installs openssh-server)");
        return None;
    };
    if Command::new("ssh").arg("-V").output().is_err() {
        eprintln!("SKIPPED: ssh tests: the ssh client is not installed");
        return None;
    }
    let keygen = |path: &Path| {
        ok(
            "ssh-keygen",
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .output()
                .expect("run ssh-keygen"),
        )
    };
    let host_key = dir.join("host_key");
    let user_key = dir.join("user_key");
    keygen(&host_key);
    keygen(&user_key);
    let auth = dir.join("authorized_keys");
    std::fs::copy(dir.join("user_key.pub"), &auth).unwrap();
    // Privilege separation needs this directory on Debian.
    let _ = std::fs::create_dir_all("/run/sshd");
    for attempt in 0..5u16 {
        let port = 20000 + (std::process::id() as u16 % 20000) + attempt * 7;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n",
                host_key.display(),
                auth.display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new(&sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("SKIPPED: ssh tests: sshd would not start");
            return None;
        };
        let mut s = Sshd {
            child,
            port,
            key: user_key.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = s.child.try_wait() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = s.child.kill();
    }
    eprintln!("SKIPPED: ssh tests: sshd did not come up on a loopback port (not root?)");
    None
}

fn wharf(store: &Path, sshd: &Sshd) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.env("WHARF_REMOTE_BIN", env!("CARGO_BIN_EXE_wharf"))
        .env(
            "WHARF_SSH",
            format!(
                "ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
                sshd.key.display()
            ),
        )
        .arg("--store")
        .arg(store)
        .arg("--quiet");
    c
}

#[test]
fn push_and_pull_over_real_ssh() {
    let d = tempfile::tempdir().unwrap();
    let Some(sshd) = start_sshd(d.path()) else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["--json", "demo", "--keep"])
        .arg(d.path().join("demo"))
        .output()
        .unwrap();
    ok("wharf demo", out);
    let src = d.path().join("demo/store");
    let remote = d.path().join("remote");
    ok("init", wharf(&remote, &sshd).arg("init").output().unwrap());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let url = format!("ssh://{user}@127.0.0.1:{}{}", sshd.port, remote.display());
    let p1 = ok(
        "push v1 over ssh",
        wharf(&src, &sshd)
            .args(["--json", "push", "wharf-demo:v1", &url])
            .output()
            .unwrap(),
    );
    let p2 = ok(
        "push v2 over ssh",
        wharf(&src, &sshd)
            .args(["--json", "push", "wharf-demo:v2", &url])
            .output()
            .unwrap(),
    );
    let j1: serde_json::Value = serde_json::from_str(&p1).unwrap();
    let j2: serde_json::Value = serde_json::from_str(&p2).unwrap();
    let (w1, w2) = (
        j1["wire_bytes_out"].as_u64().unwrap(),
        j2["wire_bytes_out"].as_u64().unwrap(),
    );
    let payload2 = j2["payload_bytes"].as_u64().unwrap();
    // What crossed the wire for v2 is its new chunks plus a small overhead
    // for negotiation and framing, far below v1's full push.
    assert!(
        w2 >= payload2 && w2 < payload2 + payload2 / 100 + 64 * 1024,
        "v2 wire {w2}, payload {payload2}"
    );
    assert!(w2 * 4 < w1, "v2 push {w2} bytes vs v1 {w1}");
    // Pull it back into a third store, over ssh, and compare with the original tar.
    let third = d.path().join("third");
    ok("init", wharf(&third, &sshd).arg("init").output().unwrap());
    ok(
        "pull over ssh",
        wharf(&third, &sshd)
            .args(["pull", &url, "wharf-demo:v2"])
            .output()
            .unwrap(),
    );
    let out = wharf(&third, &sshd)
        .args(["extract", "wharf-demo:v2", "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == std::fs::read(d.path().join("demo/wharf-demo_v2.tar")).unwrap());
    // A wrong remote path fails with the remote side's words, and names nothing.
    let bad = format!(
        "ssh://{user}@127.0.0.1:{}{}/nope",
        sshd.port,
        remote.display()
    );
    let e = wharf(&src, &sshd)
        .args(["push", "wharf-demo:v2", &bad])
        .output()
        .unwrap();
    assert!(!e.status.success());
    let said = String::from_utf8_lossy(&e.stderr);
    assert!(
        said.contains("nope") && said.contains("wharf init"),
        "{said}"
    );
}
