//! `push`, `pull`, `serve --stdio`, `serve --listen`, `bundle`, `unbundle`, `have`.

use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use wharf_format::Store;
use wharf_transport::bundle;
use wharf_transport::http::{self, HttpClient};
use wharf_transport::send::DeltaOptions;
use wharf_transport::session::{self, Client, TransferReport};

/// Starts `wharf serve --stdio` for a destination: over ssh for
/// `ssh://[user@]host[:port]/path`, as a local child for a directory.
fn spawn_server(dest: &str) -> Result<Child> {
    let mut cmd = if let Some(rest) = dest.strip_prefix("ssh://") {
        let (authority, path) = rest
            .split_once('/')
            .with_context(|| format!("{dest}: expected ssh://[user@]host[:port]/path/to/store"))?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
            _ => (authority, None),
        };
        let remote_bin = std::env::var("WHARF_REMOTE_BIN").unwrap_or_else(|_| "wharf".into());
        // $WHARF_SSH replaces the ssh command, as RSYNC_RSH and BORG_RSH do:
        // e.g. WHARF_SSH="ssh -i ~/.ssh/deploy -o StrictHostKeyChecking=accept-new".
        let ssh = std::env::var("WHARF_SSH").unwrap_or_else(|_| "ssh".into());
        let mut words = ssh.split_whitespace();
        let program = words.next().unwrap_or("ssh");
        let mut c = Command::new(program);
        c.args(words);
        if let Some(p) = port {
            c.args(["-p", p]);
        }
        // The remote path is passed as one shell word.
        let quoted = format!("'/{}'", path.replace('\'', "'\\''"));
        c.arg("--").arg(host).arg(format!(
            "{remote_bin} --store {quoted} --quiet serve --stdio"
        ));
        c
    } else if wharf_objstore::is_object_url(dest) {
        // A bucket needs no wharf server: this machine runs one against it.
        let mut c = Command::new(std::env::current_exe().context("find the wharf binary")?);
        c.arg("--store")
            .arg(dest)
            .args(["--quiet", "serve", "--stdio"]);
        c
    } else {
        let path = dest.strip_prefix("file://").unwrap_or(dest);
        if !Path::new(path).join("config.json").exists() {
            bail!(
                "{path} is not a wharf store (create one there with `wharf --store {path} init`)"
            );
        }
        let mut c = Command::new(std::env::current_exe().context("find the wharf binary")?);
        c.arg("--store")
            .arg(path)
            .args(["--quiet", "serve", "--stdio"]);
        c
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd.spawn()
        .with_context(|| format!("start the wharf server for {dest}"))
}

/// ", 812 as deltas (1.2 MB instead of 14.1 MB)" when any chunk went as a delta.
fn delta_note(rep: &TransferReport) -> String {
    if rep.delta_chunks == 0 {
        return String::new();
    }
    // A pull's receiver does not learn what the chunks would have cost.
    let instead = if rep.delta_instead_of > 0 {
        format!(" instead of {}", HumanBytes(rep.delta_instead_of))
    } else {
        String::new()
    };
    format!(
        ", {} as deltas ({}{instead})",
        rep.delta_chunks,
        HumanBytes(rep.delta_bytes),
    )
}

fn report(rep: &TransferReport, verb: &str, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(rep)?);
    } else {
        out!(
            "{}: {verb} {} chunks{} ({} on the wire), skipped {} chunks and {} whole layers the other side had; image {}, {:.1} s",
            rep.name,
            rep.chunks_sent,
            delta_note(rep),
            HumanBytes(rep.wire_bytes_out + rep.wire_bytes_in),
            rep.chunks_skipped,
            rep.layers_skipped,
            HumanBytes(rep.image_bytes),
            rep.seconds
        );
    }
    Ok(())
}

/// A spinner on stderr while a transfer runs (only on a terminal): chunks
/// and payload moved, chunks skipped, rate. Cleared when dropped.
struct TransferBar(Option<indicatif::ProgressBar>);

impl TransferBar {
    fn new(show: bool, verb: &'static str) -> Self {
        TransferBar(show.then(|| {
            let pb = indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            pb.set_prefix(verb);
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        }))
    }

    fn update(&self, r: &TransferReport) {
        if let Some(pb) = &self.0 {
            let secs = pb.elapsed().as_secs_f64().max(0.001);
            pb.set_message(format!(
                "{} chunks, {} moved, {} skipped, {}/s",
                r.chunks_sent,
                HumanBytes(r.payload_bytes),
                r.chunks_skipped,
                HumanBytes((r.payload_bytes as f64 / secs) as u64)
            ));
        }
    }
}

impl Drop for TransferBar {
    fn drop(&mut self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

type StreamClient = Client<
    std::io::BufReader<std::process::ChildStdout>,
    std::io::BufWriter<std::process::ChildStdin>,
>;

/// Starts the server for `dest`, runs `f` on a connected client, and waits
/// for the server to exit (its failure is reported only if `f` succeeded,
/// since `f`'s own error says more).
fn with_stream_client<T>(
    dest: &str,
    role: &str,
    f: impl FnOnce(&mut StreamClient) -> wharf_transport::Result<T>,
) -> Result<wharf_transport::Result<T>> {
    let mut child = spawn_server(dest)?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("no pipes to the wharf server");
    };
    widen_pipe(&stdin);
    let res = Client::connect(
        std::io::BufReader::new(stdout),
        std::io::BufWriter::new(stdin),
        role,
    )
    .and_then(|mut c| f(&mut c));
    finish_child(child, res.is_ok())?;
    Ok(res)
}

/// Grows the pipe to the server to 1 MiB (Linux): a push writes 8 MiB
/// frames, which through the default 64 KiB pipe cost the two processes a
/// wake-up every 64 KiB. Best effort: the pipe works the same without.
fn widen_pipe(stdin: &std::process::ChildStdin) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on a descriptor this process owns; it only
        // resizes the pipe's buffer, and a failure is ignored.
        unsafe {
            libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stdin;
}

fn finish_child(mut child: Child, ok: bool) -> Result<()> {
    drop(child.stdin.take());
    let status = child.wait()?;
    if ok && !status.success() {
        bail!("the wharf server exited with {status}");
    }
    Ok(())
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The client's token: --token-file, else $WHARF_TOKEN, else none. Never
/// taken from the command line itself.
fn client_token(token_file: Option<&Path>) -> Result<Option<String>> {
    if let Some(p) = token_file {
        return Ok(Some(http::read_token_file(p)?));
    }
    match std::env::var("WHARF_TOKEN") {
        Ok(t) if !t.is_empty() => Ok(Some(
            http::check_token(t.trim_end_matches(['\n', '\r'])).context("$WHARF_TOKEN")?,
        )),
        _ => Ok(None),
    }
}

fn http_client(url: &str, token_file: Option<&Path>) -> Result<HttpClient> {
    HttpClient::connect(url, client_token(token_file)?).with_context(|| format!("connect to {url}"))
}

/// Prints what a push or bundle would send, per layer.
fn print_plan(plan: &wharf_transport::walk::Plan, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(plan)?);
        return Ok(());
    }
    if plan.uncompressed {
        out!(
            "{}: would fetch at most {} of a {} image (uncompressed sizes; dry run: only the \
             image's index objects were fetched, no name changed)",
            plan.name,
            HumanBytes(plan.total_missing_bytes),
            HumanBytes(plan.image_bytes)
        );
    } else {
        out!(
            "{}: would send {} of a {} image (dry run: nothing was sent)",
            plan.name,
            HumanBytes(plan.total_missing_bytes),
            HumanBytes(plan.image_bytes)
        );
    }
    for l in &plan.layers {
        let what = if l.whole_layer_present {
            "the receiver has this layer".to_string()
        } else {
            let deltas = if l.delta_chunks > 0 {
                format!(
                    " ({} as deltas: {} instead of {})",
                    l.delta_chunks,
                    HumanBytes(l.delta_bytes),
                    HumanBytes(l.delta_instead_of)
                )
            } else {
                String::new()
            };
            format!(
                "{} of {} chunks missing, {}{deltas}",
                l.missing_chunks,
                l.chunks,
                HumanBytes(l.missing_bytes)
            )
        };
        out!(
            "  {:<72} {:>10}  {what}",
            l.path,
            HumanBytes(l.len).to_string()
        );
    }
    out!(
        "  {:<72} {:>10}  {} chunks missing, {}",
        "(recipe, outer tar, small members)",
        "",
        plan.other_missing_chunks,
        HumanBytes(plan.other_missing_bytes)
    );
    if !plan.delta_bases.is_empty() {
        out!(
            "  deltas against {} held by the receiver: {} chunks, {}",
            plan.delta_bases.join(", "),
            plan.delta_chunks,
            HumanBytes(plan.delta_bytes)
        );
    }
    Ok(())
}

/// Deltas shrink what crosses the pipe to the server. For a bucket, that
/// server is a child on this machine: the bucket still receives whole
/// chunks, and applying deltas reads their bases back from it (10 to 16
/// times the bytes down, measured on Garage), so they only cost there.
fn for_remote(remote: &str, deltas: DeltaOptions) -> DeltaOptions {
    if wharf_objstore::is_object_url(remote) {
        DeltaOptions::none()
    } else {
        deltas
    }
}

/// `push --dry-run`: negotiates like a push, sends no chunk.
pub fn push_dry_run(
    store: &Arc<Store>,
    name: &str,
    dest: &str,
    token_file: Option<&Path>,
    deltas: DeltaOptions,
    json: bool,
) -> Result<()> {
    store.require_ref(name)?;
    let deltas = for_remote(dest, deltas);
    let plan = if is_http(dest) {
        http_client(dest, token_file)?.plan_push(store, name, deltas)?
    } else {
        with_stream_client(dest, "push", |c| c.plan_push(store, name, deltas))?
            .with_context(|| format!("dry run of push {name} to {dest}"))?
    };
    print_plan(&plan, json)
}

pub fn pull_dry_run(
    store: &Arc<Store>,
    src: &str,
    name: &str,
    token_file: Option<&Path>,
    json: bool,
) -> Result<()> {
    let plan = if is_http(src) {
        http_client(src, token_file)?.plan_pull(store, name)
    } else {
        with_stream_client(src, "pull", |c| c.plan_pull(store, name))?
    }
    .with_context(|| format!("dry run of pull {name} from {src}"))?;
    print_plan(&plan, json)
}

pub fn push(
    store: &Arc<Store>,
    name: &str,
    dest: &str,
    (as_name, token_file): (Option<&str>, Option<&Path>),
    deltas: DeltaOptions,
    json: bool,
    show: bool,
) -> Result<()> {
    store.require_ref(name)?;
    let deltas = for_remote(dest, deltas);
    let bar = TransferBar::new(show, "pushing");
    if is_http(dest) {
        let c = http_client(dest, token_file)?;
        if c.server.read_only {
            bail!("{dest} is read-only (the server was started without --push-token-file)");
        }
        let res = c.push(
            store,
            name,
            as_name.unwrap_or(name),
            deltas,
            &|r: &TransferReport| bar.update(r),
        );
        let rep = res.with_context(|| format!("push {name} to {dest}"))?;
        return report(&rep, "sent", json);
    }
    let res = with_stream_client(dest, "push", |c| {
        c.push(
            store,
            name,
            as_name.unwrap_or(name),
            deltas,
            &|r: &TransferReport| bar.update(r),
        )
    })?;
    let rep = res.with_context(|| format!("push {name} to {dest}"))?;
    report(&rep, "sent", json)
}

pub fn pull(
    store: &Arc<Store>,
    src: &str,
    name: &str,
    (as_name, token_file): (Option<&str>, Option<&Path>),
    deltas: DeltaOptions,
    json: bool,
    show: bool,
) -> Result<()> {
    let deltas = for_remote(src, deltas);
    let bar = TransferBar::new(show, "pulling");
    if is_http(src) {
        let res = http_client(src, token_file)?.pull_with(
            store,
            name,
            as_name.unwrap_or(name),
            deltas,
            &|r: &TransferReport| bar.update(r),
        );
        let rep = res.with_context(|| format!("pull {name} from {src}"))?;
        return report(&rep, "fetched", json);
    }
    let res = with_stream_client(src, "pull", |c| {
        c.pull_with(
            store,
            name,
            as_name.unwrap_or(name),
            deltas,
            &|r: &TransferReport| bar.update(r),
        )
    })?;
    let rep = res.with_context(|| format!("pull {name} from {src}"))?;
    report(&rep, "fetched", json)
}

/// Adds seed tars to the store under temporary names, so their chunks count
/// as present during a pull. Returns the names, for `drop_seeds`.
pub fn add_seeds(
    store: &Arc<Store>,
    seeds: &[std::path::PathBuf],
    json: bool,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (i, s) in seeds.iter().enumerate() {
        let name = format!(".seed-{}-{i}", std::process::id());
        let mut f = std::fs::File::open(s).with_context(|| format!("open seed {}", s.display()))?;
        let rep = wharf_format::ingest::add(store, &mut f, &name, &Default::default())
            .with_context(|| format!("chunk seed {}", s.display()))?;
        if !json {
            eprintln!(
                "seed {}: {} chunked locally",
                s.display(),
                HumanBytes(rep.len)
            );
        }
        names.push(name);
    }
    Ok(names)
}

/// Removes the temporary seed names; their chunks stay until `wharf gc`
/// (those the pulled image uses are referenced by it from now on).
pub fn drop_seeds(store: &Arc<Store>, names: &[String]) -> Result<()> {
    for n in names {
        store.remove_ref(n)?;
    }
    Ok(())
}

pub fn serve_stdio(store: &Arc<Store>, read_only: bool) -> Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut input = std::io::BufReader::with_capacity(1 << 20, stdin.lock());
    let mut output = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    session::serve(store.clone(), &mut input, &mut output, read_only)?;
    Ok(())
}

/// `wharf serve --listen ADDR`: runs until killed. The bound address is
/// printed on stdout once connections are accepted.
pub fn serve_http(
    store: &Arc<Store>,
    addr: &str,
    push_token_file: Option<&Path>,
    read_token_file: Option<&Path>,
    json: bool,
) -> Result<()> {
    let tokens = http::Tokens {
        push: push_token_file
            .map(http::read_token_file)
            .transpose()
            .context("--push-token-file")?,
        read: read_token_file
            .map(http::read_token_file)
            .transpose()
            .context("--read-token-file")?,
    };
    let mode = match (&tokens.push, &tokens.read) {
        (None, None) => "read-only, reads open",
        (None, Some(_)) => "read-only, reads need a token",
        (Some(_), None) => "pushes need a token, reads open",
        (Some(_), Some(_)) => "pushes and reads need tokens",
    };
    http::serve(store.clone(), addr, tokens, |a| {
        if json {
            out!(
                "{}",
                serde_json::json!({"listening": format!("http://{a}")})
            );
        } else {
            out!("wharf: serving on http://{a} ({mode})");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    Ok(())
}

pub fn bundle(
    store: &Arc<Store>,
    name: &str,
    output: &Path,
    (have, have_file): (&[String], Option<&Path>),
    deltas: DeltaOptions,
    json: bool,
    dry_run: bool,
) -> Result<()> {
    let have_ids = match have_file {
        Some(p) => {
            let mut f = std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?,
            );
            bundle::read_have(&mut f)?
        }
        None => Default::default(),
    };
    if dry_run {
        return print_plan(
            &bundle::plan_bundle(store, name, have, &have_ids, deltas)?,
            json,
        );
    }
    let rep = if wharf_format::extract::is_special_file(output) {
        // A device or FIFO (`-o /dev/stdout`, a pipe to ssh) is written in
        // place: renaming a file over it would replace it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(output)
            .with_context(|| format!("open {}", output.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let rep = bundle::write_bundle(store, name, have, &have_ids, deltas, &mut w)?;
        std::io::Write::flush(&mut w).with_context(|| format!("write {}", output.display()))?;
        rep
    } else {
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut w = std::io::BufWriter::new(tmp.reopen()?);
        let rep = bundle::write_bundle(store, name, have, &have_ids, deltas, &mut w)?;
        drop(w);
        tmp.as_file().sync_all()?;
        tmp.persist(output)
            .with_context(|| format!("write {}", output.display()))?;
        rep
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        out!(
            "{}: bundle {} ({} chunks{}; {} skipped as the receiver has them), image {}",
            output.display(),
            HumanBytes(rep.wire_bytes_out),
            rep.chunks_sent,
            delta_note(&rep),
            rep.chunks_skipped,
            HumanBytes(rep.image_bytes)
        );
    }
    Ok(())
}

pub fn unbundle(store: &Arc<Store>, input: &Path, json: bool) -> Result<()> {
    let mut f = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(input).with_context(|| format!("open {}", input.display()))?,
    );
    let names = bundle::read_bundle(store, &mut f)
        .with_context(|| format!("unbundle {}", input.display()))?;
    if json {
        out!("{}", serde_json::json!({ "published": names }));
    } else {
        for n in names {
            out!("{n}: published from {}", input.display());
        }
    }
    Ok(())
}

pub fn have(store: &Arc<Store>, output: &Path, json: bool) -> Result<()> {
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(output).with_context(|| format!("create {}", output.display()))?,
    );
    let n = bundle::write_have(store, &mut w)?;
    if json {
        out!("{}", serde_json::json!({ "chunks": n, "output": output }));
    } else {
        out!("{}: {n} chunk ids", output.display());
    }
    Ok(())
}
