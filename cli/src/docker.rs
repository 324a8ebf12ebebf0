//! `wharf save` and `wharf load`: wharf beside a Docker engine.
//!
//! Both run the `docker` command found on PATH, which talks to the engine
//! named by `$DOCKER_HOST` (or its default socket), and stream: `docker save`'s
//! stdout goes straight into [`ingest::add`], and the tar rebuilt by
//! [`extract::extract`] goes straight into `docker load`'s stdin. No image tar
//! is ever written to disk.
//!
//! # Never a half-loaded image under a name
//!
//! **save.** `add` sets the name only after it has read its input to the end.
//! The reader handed to it reports that end only once `docker save` has exited
//! with status 0; a non-zero exit becomes a read error instead, so a tar that
//! Docker abandoned (or wrote in full and then declared failed) is never named.
//!
//! **load.** What Docker does with a stream that stops early was checked
//! against dockerd 20.10 (Debian's `docker.io`, legacy loader; see
//! `cli/tests/docker.rs`, `docker_names_an_image_only_from_a_complete_stream`):
//!
//! - Docker reads the whole request body (unpacking it to a scratch directory)
//!   before it looks at `manifest.json` or registers a layer, and only then
//!   tags. If the `docker load` client is killed before it has closed its
//!   stdin, the body is cut (no final HTTP chunk), the daemon fails the load,
//!   and no image, tag or layer is left behind, even when every byte of the
//!   archive had already been sent.
//! - But "the end" is simply the end of the body, and Go's tar reader takes an
//!   end of input at a member boundary as a normal end of archive. A stream
//!   with its two zero blocks missing loads and is tagged; so is one cut just
//!   before `repositories`, since `manifest.json` alone is enough. A stream cut
//!   just before `manifest.json` makes Docker fall back to its pre-1.10 loader,
//!   which registers the layers as untagged images and then fails.
//!
//! So closing `docker load`'s stdin early is never safe, and wharf does not:
//! the last [`HOLD_BACK`] bytes of the archive (which hold `manifest.json`,
//! `repositories` and the end-of-archive blocks, always the last members of a
//! `docker save` tar) are kept back until the whole tar has been rebuilt and
//! verified (every chunk, every layer's SHA-256, the whole tar's SHA-256 and
//! BLAKE3). On any error `docker load` is killed, its stdin still open, so
//! Docker sees a broken request rather than an early end. If wharf itself is
//! killed, the pipe closes with that tail missing: Docker then has no
//! `manifest.json` and names nothing.

use anyhow::{anyhow, bail, Result};
use indicatif::HumanBytes;
use std::io::{Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf_format::extract;
use wharf_format::ingest::{self, AddOptions, AddReport};
use wharf_format::store::Store;

use crate::progress;

/// Bytes at the end of the rebuilt tar that `docker load` sees only after the
/// whole tar has been verified. `manifest.json` and `repositories` (a few KB)
/// sort after every layer directory and blob in a `docker save` tar.
pub const HOLD_BACK: usize = 1 << 20;

/// What Docker printed on one of its output streams, kept up to this size.
const KEEP_OUTPUT: usize = 1 << 20;

/// How long a `docker load` that stopped reading gets to exit on its own.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// `wharf save`: one name per image, or `name` for the whole set.
pub fn save_cmd(
    store: &Arc<Store>,
    images: &[String],
    name: Option<&str>,
    gzip_max_chain: Option<u32>,
    json: bool,
    show_progress: bool,
) -> Result<()> {
    if images.is_empty() {
        bail!("name at least one image to save");
    }
    let jobs: Vec<(Vec<String>, String)> = match name {
        Some(n) => vec![(images.to_vec(), n.to_string())],
        None => images
            .iter()
            .map(|i| (vec![i.clone()], i.clone()))
            .collect(),
    };
    let mut done: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (set, name) in jobs {
        let rep = save(store, &set, &name, gzip_max_chain, show_progress).map_err(|e| {
            if done.is_empty() {
                e
            } else {
                e.context(format!(
                    "(already saved before this failure: {})",
                    done.join(", ")
                ))
            }
        })?;
        if json {
            let mut v = serde_json::to_value(&rep)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("images".into(), serde_json::json!(set));
            }
            out.push(v);
        } else {
            out!(
                "{}: saved {} from Docker, {} in, {} new, {} on disk, {:.1} s",
                rep.name,
                set.join(" "),
                HumanBytes(rep.len),
                HumanBytes(rep.new_bytes),
                HumanBytes(rep.stored_bytes),
                rep.seconds
            );
        }
        done.push(name);
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Runs `docker save IMAGES...` and stores its output under `name`, which is
/// set only if Docker exited 0 and the whole tar was stored.
pub fn save(
    store: &Arc<Store>,
    images: &[String],
    name: &str,
    gzip_max_chain: Option<u32>,
    show_progress: bool,
) -> Result<AddReport> {
    let what = format!("docker save {}", images.join(" "));
    let mut cmd = docker();
    cmd.arg("save")
        .args(images)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut proc = Proc::spawn(cmd, &what, false)?;
    let stdout = proc
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{what}: no pipe to its stdout"))?;
    let bar = progress::Bar::start(show_progress, None, "saving");
    let opts = AddOptions {
        progress: Some(bar.counter()),
        gzip_max_chain,
        ..AddOptions::default()
    };
    let mut input = DockerOutput {
        out: stdout,
        proc: &mut proc,
    };
    let res = ingest::add(store, &mut input, name, &opts);
    drop(input);
    bar.finish();
    match res {
        Ok(rep) => {
            // The reader saw Docker exit 0 before it reported the end.
            proc.finish();
            Ok(rep)
        }
        Err(e) => {
            let docker_failed = matches!(proc.child.try_wait(), Ok(Some(s)) if !s.success());
            if !docker_failed {
                // wharf failed, not Docker: stop docker save.
                let _ = proc.child.kill();
            }
            let (status, said) = proc.finish();
            if docker_failed {
                Err(anyhow!(
                    "{what} failed ({}){}; {name:?} was not named",
                    describe(status),
                    docker_said(&said)
                ))
            } else {
                Err(anyhow::Error::new(e).context(format!(
                    "storing the output of {what} as {name:?}: nothing was named, docker save was stopped{}",
                    docker_said(&said)
                )))
            }
        }
    }
}

/// `wharf load`: streams image `name` into `docker load` and prints what
/// Docker loaded.
pub fn load_cmd(store: &Arc<Store>, name: &str, json: bool, show_progress: bool) -> Result<()> {
    let rep = load(store, name, show_progress)?;
    if json {
        out!(
            "{}",
            serde_json::json!({
                "name": name,
                "len": rep.len,
                "sha256": rep.sha256,
                "loaded": rep.loaded,
                "seconds": rep.seconds,
            })
        );
    } else {
        for l in &rep.docker_stdout {
            out!("{l}");
        }
        eprintln!(
            "{name}: {} verified (sha256:{}) and loaded into Docker in {:.1} s",
            HumanBytes(rep.len),
            rep.sha256,
            rep.seconds
        );
    }
    Ok(())
}

pub struct LoadReport {
    pub len: u64,
    pub sha256: String,
    /// What Docker says it loaded: image references or IDs.
    pub loaded: Vec<String>,
    pub docker_stdout: Vec<String>,
    pub seconds: f64,
}

/// Rebuilds image `name` into `docker load`, holding back the end of the
/// archive until it has been verified; on any failure `docker load` is
/// killed before it can see the end, so Docker names nothing.
pub fn load(store: &Arc<Store>, name: &str, show_progress: bool) -> Result<LoadReport> {
    let started = Instant::now();
    let total = store.require_ref(name)?.len;
    let what = "docker load";
    let mut cmd = docker();
    cmd.arg("load").stdin(Stdio::piped());
    let mut proc = Proc::spawn(cmd, what, true)?;
    let stdin = proc
        .child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("{what}: no pipe to its stdin"))?;
    let mut held = HoldBack::new(stdin, HOLD_BACK);
    let bar = progress::Bar::start(show_progress, Some(total), "loading");
    let res = extract::extract(store, name, &mut held, Some(bar.counter()));
    bar.finish();
    let passed = held.passed;
    let write_failed = held.write_failed;
    let recipe = match res {
        Ok(r) => r,
        Err(e) if write_failed => {
            // Docker stopped reading: its own failure is the story.
            drop(held);
            let (status, said) = proc.finish_within(EXIT_GRACE);
            return Err(anyhow!(
                "{what} stopped reading after {} of {} ({}){}; {name:?} was not loaded ({e})",
                HumanBytes(passed),
                HumanBytes(total),
                describe(status),
                docker_said(&said)
            ));
        }
        Err(e) => {
            // Killed, and reaped, with its stdin still open: Docker sees a
            // broken request, never the end of an archive.
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            drop(held);
            let (_, said) = proc.finish();
            return Err(anyhow::Error::new(e).context(format!(
                "{name:?} failed verification while streaming to Docker: {what} was killed after {} of {}, before the end of the archive, so Docker named no image{}",
                HumanBytes(passed),
                HumanBytes(total),
                docker_said(&said)
            )));
        }
    };
    // Verified: let Docker see the end.
    let released = held.release();
    let (status, said) = if released.is_ok() {
        proc.finish()
    } else {
        proc.finish_within(EXIT_GRACE)
    };
    let stdout = String::from_utf8_lossy(&proc.stdout_text()).into_owned();
    if !matches!(status, Some(s) if s.success()) || released.is_err() {
        bail!(
            "{what} failed ({}){}{}",
            describe(status),
            docker_said(&said),
            match released {
                Err(e) => format!(" (writing the end of the archive: {e})"),
                Ok(()) => String::new(),
            }
        );
    }
    let lines: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let loaded = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("Loaded image: ")
                .or_else(|| l.strip_prefix("Loaded image ID: "))
                .map(|s| s.trim().to_string())
        })
        .collect();
    Ok(LoadReport {
        len: recipe.len,
        sha256: recipe.sha256,
        loaded,
        docker_stdout: lines,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `docker` command on PATH; it finds the engine through `$DOCKER_HOST`
/// (or its context and default socket) by itself.
fn docker() -> Command {
    Command::new("docker")
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "did not exit".to_string(),
    }
}

/// "; Docker said (DOCKER_HOST=...): ...", or nothing when it said nothing.
fn docker_said(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        return String::new();
    }
    let engine = match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => format!("DOCKER_HOST={h}"),
        _ => "DOCKER_HOST unset".to_string(),
    };
    format!("; Docker said ({engine}): {s}")
}

/// A running `docker` command whose stderr (and optionally stdout) is being
/// collected on threads, so it can never block on a full pipe.
struct Proc {
    child: Child,
    stderr: Option<Receiver<Vec<u8>>>,
    stdout: Option<Receiver<Vec<u8>>>,
    stdout_bytes: Vec<u8>,
}

impl Proc {
    /// Runs `cmd` with its stderr collected, and its stdout too when
    /// `collect_stdout` (the caller sets up stdin and stdout otherwise).
    fn spawn(mut cmd: Command, what: &str, collect_stdout: bool) -> Result<Proc> {
        cmd.stderr(Stdio::piped());
        if collect_stdout {
            cmd.stdout(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("{what}: `docker` was not found on PATH; install Docker's command-line client (Debian: apt-get install docker.io)")
            } else {
                anyhow!("{what}: could not run docker: {e}")
            }
        })?;
        let stderr = child.stderr.take().map(collect::<ChildStderr>);
        let stdout = if collect_stdout {
            child.stdout.take().map(collect::<ChildStdout>)
        } else {
            None
        };
        Ok(Proc {
            child,
            stderr,
            stdout,
            stdout_bytes: Vec::new(),
        })
    }

    /// Waits for the command and returns its status and what it wrote on
    /// stderr. The caller must have closed the command's stdin, or killed it.
    fn finish(&mut self) -> (Option<ExitStatus>, String) {
        let status = self.child.wait().ok();
        (status, self.collect())
    }

    /// As `finish`, but kills the command if it has not exited within `grace`.
    fn finish_within(&mut self, grace: Duration) -> (Option<ExitStatus>, String) {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        self.finish()
    }

    /// What the command wrote. A process it left behind may hold its pipes
    /// open, so this waits only briefly once the command itself has exited.
    fn collect(&mut self) -> String {
        let get = |rx: Option<Receiver<Vec<u8>>>| {
            rx.and_then(|rx| rx.recv_timeout(OUTPUT_GRACE).ok())
                .unwrap_or_default()
        };
        if let Some(rx) = self.stdout.take() {
            self.stdout_bytes = get(Some(rx));
        }
        String::from_utf8_lossy(&get(self.stderr.take())).into_owned()
    }

    fn stdout_text(&mut self) -> Vec<u8> {
        self.collect();
        std::mem::take(&mut self.stdout_bytes)
    }
}

/// How long to wait for a pipe's end once the command has exited.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// Reads a pipe to its end on a thread, keeping the first `KEEP_OUTPUT` bytes.
fn collect<R: Read + Send + 'static>(mut r: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = KEEP_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

/// `docker save`'s stdout, whose end is reported only once Docker has exited
/// 0: a failed `docker save` turns its end of output into a read error, so
/// `add` fails before it names anything.
struct DockerOutput<'a> {
    out: ChildStdout,
    proc: &'a mut Proc,
}

impl Read for DockerOutput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.out.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        let status = self.proc.child.wait()?;
        if status.success() {
            Ok(0)
        } else {
            Err(std::io::Error::other(format!(
                "docker save failed ({status}): its output is not a complete image"
            )))
        }
    }
}

/// Passes bytes on to `inner` except the last `hold`, which go out only with
/// [`HoldBack::release`]: until then the reader cannot see the end.
struct HoldBack<W: Write> {
    inner: W,
    held: Vec<u8>,
    hold: usize,
    /// Bytes passed on so far.
    passed: u64,
    /// Whether writing to `inner` failed (the reader went away).
    write_failed: bool,
}

impl<W: Write> HoldBack<W> {
    fn new(inner: W, hold: usize) -> Self {
        HoldBack {
            inner,
            held: Vec::with_capacity(hold * 2),
            hold,
            passed: 0,
            write_failed: false,
        }
    }

    /// Writes the held bytes, flushes, and closes `inner` by dropping it.
    fn release(mut self) -> std::io::Result<()> {
        self.inner.write_all(&self.held)?;
        self.inner.flush()
    }
}

impl<W: Write> Write for HoldBack<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.held.extend_from_slice(b);
        if self.held.len() > self.hold {
            let n = self.held.len() - self.hold;
            if let Err(e) = self.inner.write_all(&self.held[..n]) {
                self.write_failed = true;
                return Err(e);
            }
            self.passed += n as u64;
            self.held.drain(..n);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Flushes what was passed on; the held bytes stay held.
        self.inner.flush().inspect_err(|_| self.write_failed = true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_back_keeps_the_tail_until_released() {
        let mut out = Vec::new();
        {
            let mut h = HoldBack::new(&mut out, 10);
            h.write_all(&[1u8; 7]).unwrap();
            assert_eq!(h.passed, 0);
            h.write_all(&[2u8; 7]).unwrap();
            assert_eq!(h.passed, 4);
            h.flush().unwrap();
            assert_eq!(h.passed, 4);
            h.release().unwrap();
        }
        let mut want = vec![1u8; 7];
        want.extend_from_slice(&[2u8; 7]);
        assert_eq!(out, want);
    }

    #[test]
    fn hold_back_without_release_never_passes_the_tail() {
        let mut out = Vec::new();
        {
            let mut h = HoldBack::new(&mut out, 1000);
            for i in 0..100u8 {
                h.write_all(&[i; 50]).unwrap();
            }
            assert_eq!(h.passed, 4000);
        }
        assert_eq!(out.len(), 4000);
    }
}
