//! The `wharf` command line: a thin layer over `wharf-format`.

/// `println!` that ends the program quietly when stdout is a closed pipe
/// (`wharf ls | head`) instead of panicking, while other pipes (to ssh, to
/// docker) keep reporting EPIPE as an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(141);
        }
    }};
}

mod demo;
mod docker;
mod progress;
mod remote;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::HumanBytes;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use wharf_format::chunker::ChunkParams;
use wharf_format::ingest::{self, AddOptions};
use wharf_format::store::{Store, StoreConfig, DEFAULT_ZSTD_LEVEL};
use wharf_format::{extract, maintenance};
use wharf_objstore::ObjectBackend;

#[derive(Parser)]
#[command(
    name = "wharf",
    version,
    about = "Store and move Docker image tars by content: only new bytes are kept or sent, and every image rebuilds byte-identical.",
    long_about = "wharf splits `docker save` tars into content-defined chunks (keeping tar headers apart \
from file contents, layer by layer), stores each chunk once, compressed, in a pack store, and rebuilds \
the exact tar on demand, verified end to end.\n\n\
Typical use:\n  wharf init\n  docker save app:v1 | wharf add - --name app:v1\n  wharf add app-v2.tar --name app:v2     \
# stores only what v1 did not have\n  wharf extract app:v2 -o - | docker load\n\n\
Try `wharf demo` for a self-contained run that needs no Docker."
)]
struct Cli {
    /// The store: a directory, or s3://bucket/prefix for a bucket on AWS S3 or any
    /// S3-compatible server (credentials, region and endpoint from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, else from the AWS_PROFILE
    /// profile of ~/.aws/credentials and ~/.aws/config). Default: $WHARF_STORE, else
    /// $XDG_DATA_HOME/wharf, else ~/.local/share/wharf.
    #[arg(long, global = true, env = "WHARF_STORE")]
    store: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// No progress bars, even on a terminal.
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an empty store.
    Init {
        /// Average chunk size in KiB (a power of two; min is a quarter, max four times).
        #[arg(long, default_value_t = ChunkParams::DEFAULT.avg / 1024)]
        avg_chunk_kib: u32,
        /// zstd level for new chunks (1-22): higher is smaller and slower to add; extract speed barely changes.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// Make `--gzip-deep` (see `wharf add --help`) the default of every add, save and push
        /// --from-docker into this store: for archives of skopeo/podman-made images, where every
        /// version should dedup against the last. Recorded in the store's config.json.
        #[arg(long)]
        gzip_deep: bool,
    },
    /// Store an image tar (from `docker save`) under a name. Reads a file, or stdin with `-`.
    Add {
        /// The tar file, or `-` for stdin.
        input: String,
        /// The name to store it under, e.g. `pytorch:v2`. Replaces an existing name.
        #[arg(long, short)]
        name: String,
        #[command(flatten)]
        gzip: GzipArgs,
    },
    /// List stored images with their sizes and what each alone holds.
    Ls,
    /// Show an image's layers, their digests, and what they share with other images.
    Info {
        /// The image's name in this store (see `wharf ls`).
        name: String,
    },
    /// Rebuild an image tar, byte-identical to what was added, verified as it is written.
    Extract {
        /// The image's name in this store (see `wharf ls`).
        name: String,
        /// Output file, or `-` for stdout (e.g. `| docker load`).
        #[arg(long, short)]
        output: String,
    },
    /// Check the store. Without --full: indexes, packs and recipes' presence. With --full: every chunk re-hashed and every recipe resolved.
    Verify {
        /// Also read and re-hash every chunk and resolve every image's recipe (reads the
        /// whole store).
        #[arg(long)]
        full: bool,
    },
    /// Remove names (the data stays until `wharf gc`).
    Rm {
        /// Names to remove (see `wharf ls`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete chunks no name uses and rewrite sparse packs, so the space really returns.
    Gc {
        /// Say what would be freed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave packs younger than this alone (90s, 30m, 2h, 1d). Default: 0 for a
        /// directory, whose lock keeps writers out; 1h for an object store, where a
        /// writer on another machine may have uploaded packs it has not yet named.
        #[arg(long, value_parser = parse_duration)]
        grace: Option<std::time::Duration>,
    },
    /// Run `docker save IMAGE...` and store its output as it streams (no tar on disk).
    ///
    /// Uses the `docker` on PATH and the engine it reaches ($DOCKER_HOST or its default).
    /// Each image is stored under its own reference as given (e.g. `app:v2`); with `--name`,
    /// all the images go through one `docker save` into one tar stored under that name. A name
    /// is set only when `docker save` exited 0 and the whole tar was stored; otherwise wharf
    /// prints what Docker said and names nothing.
    Save {
        /// Images as Docker knows them: `repo:tag`, an image ID, ...
        #[arg(required = true)]
        images: Vec<String>,
        /// Store all the images, saved together, under this one name.
        #[arg(long, short)]
        name: Option<String>,
        #[command(flatten)]
        gzip: GzipArgs,
    },
    /// Rebuild an image and stream it into `docker load`, verified as it goes.
    ///
    /// Uses the `docker` on PATH and the engine it reaches ($DOCKER_HOST or its default).
    /// The end of the archive is held back until every chunk, every layer and the whole tar
    /// have been verified; on any error `docker load` is killed before it sees the end, so
    /// Docker names no image. Docker tags the images recorded in the tar (what `docker save`
    /// was given), whatever the wharf name.
    Load {
        /// The wharf name (see `wharf ls`).
        name: String,
    },
    /// Send an image to another store, sending only the chunks it lacks.
    ///
    /// DEST is `http://host:port` (a `wharf serve --listen` server; the token, if it needs one,
    /// comes from $WHARF_TOKEN or --token-file, never the command line),
    /// `ssh://[user@]host[:port]/path/to/store` (runs `wharf serve --stdio` there over
    /// ssh; the remote `wharf` is $WHARF_REMOTE_BIN or `wharf` on its PATH, and $WHARF_SSH
    /// replaces the `ssh` command, e.g. "ssh -i KEY") or a local store directory. Layers the receiver already holds cost one hash each; the rest is asked
    /// about in batches of thousands of chunk hashes. The name is published on the receiver
    /// only once every chunk is there and verified; run the same command again after an
    /// interruption and what arrived is not sent again.
    Push {
        /// The image's name in this store (with --from-docker: in Docker).
        name: String,
        /// The receiving store: http://host:port, ssh://[user@]host[:port]/path, or a directory.
        dest: String,
        /// Publish under this name on the receiver (default: the same name).
        #[arg(long = "as")]
        as_name: Option<String>,
        /// For http:// servers: a file holding the token (else $WHARF_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// NAME is a Docker image: `docker save` it into this store first (streamed, no
        /// temporary tar), then push it. The whole path from an engine to another store.
        #[arg(long)]
        from_docker: bool,
        /// With --from-docker: see `wharf add --help`.
        #[command(flatten)]
        gzip: GzipArgs,
        /// Negotiate and show, per layer, what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        deltas: DeltaArgs,
    },
    /// Fetch an image from another store (see `push` for SRC), fetching only missing chunks.
    Pull {
        /// The store to fetch from: http://host:port, ssh://[user@]host[:port]/path, or a
        /// directory.
        src: String,
        /// The image's name in that store.
        name: String,
        /// Store under this name here (default: the same name).
        #[arg(long = "as")]
        as_name: Option<String>,
        /// For http:// servers: a file holding the token (else $WHARF_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Then stream the image into `docker load` (verified before Docker sees its end).
        #[arg(long)]
        load: bool,
        /// Tar files this machine already has (last version's tar, a `docker save` of what its
        /// Docker holds): chunked locally first, so only chunks found in no seed are fetched.
        #[arg(long)]
        seed: Vec<PathBuf>,
        /// Also write the image tar here (verified; `-` for stdout). With no store at --store,
        /// a temporary one is used and removed: seeds + pull + this file, no store left behind.
        #[arg(long, short)]
        output: Option<String>,
        /// Show per layer what the pull would fetch, and fetch only the image's index objects
        /// (recipe, nodes, chunk lists: well under 1% of it) to tell; no name changes. Byte
        /// figures are uncompressed: what the server sends is compressed, so it is at most that.
        #[arg(long, conflicts_with_all = ["load", "output"])]
        dry_run: bool,
        #[command(flatten)]
        deltas: DeltaArgs,
    },
    /// Serve this store over stdin/stdout (what `push`/`pull` run on the other side over ssh),
    /// or over HTTP with --listen.
    ///
    /// Over HTTP, pushes need the token in --push-token-file (without one the server is
    /// read-only) and reads need the one in --read-token-file if given. Plain HTTP: put a
    /// TLS proxy or a tunnel in front of it on an untrusted network.
    #[command(group(clap::ArgGroup::new("mode").required(true).args(["stdio", "listen"])))]
    Serve {
        /// Speak the protocol on stdin/stdout.
        #[arg(long)]
        stdio: bool,
        /// Serve HTTP on this address, e.g. 0.0.0.0:7878 (port 0: any free port; the address
        /// is printed on stdout).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// A file holding the token pushes must present (one line).
        #[arg(long, requires = "listen")]
        push_token_file: Option<PathBuf>,
        /// A file holding the token reads must present; without it reads are open.
        #[arg(long, requires = "listen")]
        read_token_file: Option<PathBuf>,
        /// Refuse pushes.
        #[arg(long)]
        read_only: bool,
    },
    /// Write an offline transfer file: the chunks of NAME that the receiver lacks.
    ///
    /// Say what the receiver holds with --have (images in this store that the receiver also
    /// has) and/or --have-file (written on the receiver by `wharf have`). Without either,
    /// the bundle carries the whole image.
    Bundle {
        /// The image's name in this store.
        name: String,
        /// The bundle file to write (a device or FIFO is written in place).
        #[arg(long, short)]
        output: PathBuf,
        /// An image of this store the receiver also holds (repeatable): its chunks are left
        /// out, and the bundle's deltas may refer to it.
        #[arg(long)]
        have: Vec<String>,
        /// The receiver's chunk list, from `wharf have -o FILE` run there.
        #[arg(long)]
        have_file: Option<PathBuf>,
        /// Show, per layer, what the bundle would carry; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        deltas: DeltaArgs,
    },
    /// Apply a bundle: store its chunks (each verified) and publish its image name.
    Unbundle {
        /// The bundle file (from `wharf bundle`).
        input: PathBuf,
    },
    /// Write the list of chunks this store holds, for a sender's `bundle --have-file`.
    Have {
        /// The file to write, to carry to the sender.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Build two versions of a small synthetic image (no Docker needed), add both to a scratch store, and prove the rebuild byte-identical.
    Demo {
        /// Keep the scratch store and tars in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

/// How hard ingest works to store gzip layers by content.
#[derive(clap::Args, Debug, Clone, Copy)]
struct GzipArgs {
    /// Store by content also the gzip layers whose compressor takes matches
    /// deep down its match finder's chains: klauspost/pgzip, which skopeo,
    /// podman and buildah use. Without it such layers are stored as they
    /// are (fast, but nothing in them is shared with other versions; `wharf
    /// info` says which). With it they dedup like any layer, but cost about
    /// 5 MB/s of content to add and again to extract on two cores: worth it
    /// for archives and slow links. zlib-made (gzip, pigz) and most Go-made
    /// (Docker, BuildKit) layers are stored by content either way. A store
    /// made with `wharf init --gzip-deep` does this on every add.
    #[arg(long)]
    gzip_deep: bool,
}

impl GzipArgs {
    /// `None` leaves the choice to the store's config.
    fn max_chain(self) -> Option<u32> {
        self.gzip_deep.then_some(wharf_format::gzip::DEEP_CHAIN)
    }
}

/// How chunks the receiver lacks may travel as deltas.
#[derive(clap::Args, Debug, Clone, Copy)]
struct DeltaArgs {
    /// Send every missing chunk whole. By default a chunk travels as a zstd delta against
    /// similar bytes the receiver already holds (the same file in the previous version of the
    /// layer, the same tar headers) whenever that is smaller; the receiver rebuilds it and
    /// checks its hash. Deltas cost CPU at both ends (the receiver about as much as the sender:
    /// it rebuilds each chunk and compresses it for its store): on links faster than about
    /// 230-330 Mbit/s (29-41 MB/s; both ends sharing two cores) a transfer without them usually finishes
    /// first (benches/RESULTS.md, break-even link).
    #[arg(long)]
    no_deltas: bool,
    /// zstd level for deltas of file contents: higher finds smaller deltas at more CPU on the
    /// sender (level 9: 4-10 % fewer bytes for about twice the CPU of both ends). Tar headers
    /// get their own settings below 16.
    #[arg(long, default_value_t = wharf_format::similar::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    delta_level: i32,
}

impl DeltaArgs {
    fn options(self) -> wharf_transport::send::DeltaOptions {
        wharf_transport::send::DeltaOptions {
            enabled: !self.no_deltas,
            level: self.delta_level,
            ..Default::default()
        }
    }
}

fn default_store() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("wharf");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/wharf")
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("wharf: error: {e:#}");
        std::process::exit(1);
    }
}

/// A store URL (`s3://bucket/prefix`) as a backend, or None for a directory.
fn object_backend(path: &std::path::Path) -> Result<Option<Arc<ObjectBackend>>> {
    match path.to_str() {
        Some(url) if wharf_objstore::is_object_url(url) => {
            Ok(Some(Arc::new(ObjectBackend::open_url(url)?)))
        }
        _ => Ok(None),
    }
}

fn open_store(path: &std::path::Path) -> Result<Arc<Store>> {
    Ok(Arc::new(match object_backend(path)? {
        Some(b) => Store::open_backend(b)?,
        None => Store::open(path)?,
    }))
}

/// "90s", "30m", "2h", "1d" or plain seconds.
fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 90s, 30m, 2h or 1d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n * mult))
}

fn run(cli: Cli) -> Result<()> {
    let store_path = cli.store.clone().unwrap_or_else(default_store);
    let show_progress = !cli.quiet && std::io::stderr().is_terminal();
    match cli.cmd {
        Cmd::Init {
            avg_chunk_kib,
            zstd_level,
            gzip_deep,
        } => {
            let avg = avg_chunk_kib
                .checked_mul(1024)
                .context("chunk size too large")?;
            let config = StoreConfig {
                chunking: ChunkParams {
                    min: avg / 4,
                    avg,
                    max: avg.saturating_mul(4),
                },
                zstd_level,
                gzip_max_chain: gzip_deep.then_some(wharf_format::gzip::DEEP_CHAIN),
                ..StoreConfig::default()
            };
            match object_backend(&store_path)? {
                Some(b) => {
                    let config = StoreConfig {
                        pack_target: wharf_objstore::DEFAULT_PACK_TARGET,
                        ..config
                    };
                    Store::init_backend(b, config)?;
                }
                None => {
                    Store::init(&store_path, config)?;
                }
            }
            if cli.json {
                out!("{}", serde_json::json!({"store": store_path}));
            } else {
                out!("created a wharf store at {}", store_path.display());
            }
        }
        Cmd::Add { input, name, gzip } => {
            let store = open_store(&store_path)?;
            let (mut reader, total): (Box<dyn Read + Send>, Option<u64>) = if input == "-" {
                (Box::new(std::io::stdin()), None)
            } else {
                let f = std::fs::File::open(&input).with_context(|| format!("open {input}"))?;
                let len = f.metadata().ok().map(|m| m.len());
                (Box::new(f), len)
            };
            let bar = progress::Bar::start(show_progress, total, "adding");
            let opts = AddOptions {
                progress: Some(bar.counter()),
                gzip_max_chain: gzip.max_chain(),
                ..AddOptions::default()
            };
            let rep = ingest::add(&store, &mut reader, &name, &opts);
            bar.finish();
            let rep = rep.with_context(|| format!("add {input} as {name:?}: nothing was named"))?;
            if cli.json {
                out!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                let pct = if rep.len > 0 {
                    100.0 * rep.new_bytes as f64 / rep.len as f64
                } else {
                    0.0
                };
                out!(
                    "{}: {} in, {} new ({pct:.1}%), {} on disk, {:.1} s",
                    rep.name,
                    HumanBytes(rep.len),
                    HumanBytes(rep.new_bytes),
                    HumanBytes(rep.stored_bytes),
                    rep.seconds
                );
            }
        }
        Cmd::Ls => {
            let store = open_store(&store_path)?;
            let stats = maintenance::image_stats(&store)?;
            if cli.json {
                out!("{}", serde_json::to_string_pretty(&stats)?);
            } else if stats.is_empty() {
                out!("no images in {}", store_path.display());
            } else {
                out!(
                    "{:<32} {:>12} {:>12} {:>7}  added",
                    "NAME",
                    "SIZE",
                    "UNIQUE",
                    "LAYERS"
                );
                for s in stats {
                    out!(
                        "{:<32} {:>12} {:>12} {:>7}  {}",
                        s.name,
                        HumanBytes(s.len).to_string(),
                        HumanBytes(s.unique_bytes).to_string(),
                        s.layers,
                        fmt_time(s.added)
                    );
                }
            }
        }
        Cmd::Info { name } => {
            let store = open_store(&store_path)?;
            let info = maintenance::info(&store, &name)?;
            if cli.json {
                out!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                out!(
                    "{}  {}  sha256:{}",
                    info.name,
                    HumanBytes(info.len),
                    info.sha256
                );
                out!("recipe {}  added {}", info.recipe, fmt_time(info.added));
                for l in &info.layers {
                    let share = if !l.same_layer_in.is_empty() {
                        format!("same layer in {}", l.same_layer_in.join(", "))
                    } else if l.chunk_bytes > 0 {
                        format!(
                            "{:.0}% of its chunk bytes shared with other images",
                            100.0 * l.shared_bytes as f64 / l.chunk_bytes as f64
                        )
                    } else {
                        String::new()
                    };
                    out!(
                        "  {:<60} {:>10} {:<4} sha256:{}…  {}",
                        l.path,
                        HumanBytes(l.len).to_string(),
                        l.kind,
                        &l.sha256[..12.min(l.sha256.len())],
                        share
                    );
                    if let Some(c) = &l.compression {
                        out!("      {}", describe_compression(c, l.len));
                    }
                }
            }
        }
        Cmd::Extract { name, output } => {
            let store = open_store(&store_path)?;
            let total = store.require_ref(&name)?.len;
            let bar = progress::Bar::start(show_progress, Some(total), "extracting");
            let res = if output == "-" {
                let stdout = std::io::stdout();
                let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout);
                extract::extract(&store, &name, &mut w, Some(bar.counter()))
            } else {
                extract::extract_to_file(
                    &store,
                    &name,
                    &PathBuf::from(&output),
                    Some(bar.counter()),
                )
            };
            bar.finish();
            let recipe = res.with_context(|| {
                if output == "-" {
                    format!("extract {name:?}: the tar written to stdout is incomplete or unverified; discard it")
                } else {
                    format!("extract {name:?}: {output} was not written")
                }
            })?;
            if output != "-" {
                if cli.json {
                    out!(
                        "{}",
                        serde_json::json!({"name": name, "output": output, "len": recipe.len, "sha256": recipe.sha256})
                    );
                } else {
                    eprintln!(
                        "{name}: {} written to {output}, sha256:{} verified",
                        HumanBytes(recipe.len),
                        recipe.sha256
                    );
                }
            }
        }
        Cmd::Verify { full } => {
            let store = open_store(&store_path)?;
            let rep = maintenance::verify(&store, full)?;
            if cli.json {
                out!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                for n in &rep.notes {
                    out!("note: {n}");
                }
                for e in &rep.errors {
                    out!("error: {e}");
                }
                out!(
                    "{} index file(s), {} pack(s), {} name(s){}: {}",
                    rep.indexes,
                    rep.packs,
                    rep.names,
                    if full {
                        format!(", {} chunks re-hashed", rep.chunks_checked)
                    } else {
                        String::new()
                    },
                    if rep.errors.is_empty() {
                        "ok"
                    } else {
                        "FAILED"
                    }
                );
            }
            if !rep.errors.is_empty() {
                bail!("the store has {} problem(s)", rep.errors.len());
            }
        }
        Cmd::Rm { names } => {
            let store = open_store(&store_path)?;
            for n in &names {
                store.remove_ref(n)?;
                if !cli.json {
                    out!("removed {n} (run `wharf gc` to free its space)");
                }
            }
            if cli.json {
                out!("{}", serde_json::json!({"removed": names}));
            }
        }
        Cmd::Gc { dry_run, grace } => {
            let store = open_store(&store_path)?;
            let rep = maintenance::gc_with_grace(&store, dry_run, grace)?;
            if cli.json {
                out!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                out!(
                    "{}{} freed: {} pack(s) deleted, {} rewritten, {} live chunks kept",
                    if dry_run { "would be " } else { "" },
                    HumanBytes(rep.bytes_freed),
                    rep.packs_deleted,
                    rep.packs_rewritten,
                    rep.live_chunks
                );
                if dry_run {
                    for p in &rep.deleted {
                        out!("would delete pack {p}");
                    }
                    for p in &rep.rewritten {
                        out!("would rewrite pack {p} (its live chunks move to a new pack)");
                    }
                }
                if rep.packs_too_young > 0 {
                    out!(
                        "{} pack(s) younger than the grace period ({}s) left alone (see --grace)",
                        rep.packs_too_young,
                        rep.grace_secs
                    );
                }
            }
        }
        Cmd::Save { images, name, gzip } => docker::save_cmd(
            &open_store(&store_path)?,
            &images,
            name.as_deref(),
            gzip.max_chain(),
            cli.json,
            show_progress,
        )?,
        Cmd::Load { name } => {
            docker::load_cmd(&open_store(&store_path)?, &name, cli.json, show_progress)?
        }
        Cmd::Demo { keep } => demo::run(keep, cli.json)?,
        Cmd::Push {
            name,
            dest,
            as_name,
            token_file,
            from_docker,
            gzip,
            dry_run,
            deltas,
        } => {
            let store = open_store(&store_path)?;
            if dry_run && from_docker {
                bail!("--dry-run with --from-docker: save the image first (`wharf save`), then dry-run the push");
            }
            if dry_run {
                return remote::push_dry_run(
                    &store,
                    &name,
                    &dest,
                    token_file.as_deref(),
                    deltas.options(),
                    cli.json,
                );
            }
            if from_docker {
                let rep = docker::save(
                    &store,
                    std::slice::from_ref(&name),
                    &name,
                    gzip.max_chain(),
                    show_progress,
                )?;
                if !cli.json {
                    eprintln!(
                        "{name}: saved from Docker, {} in, {} new",
                        HumanBytes(rep.len),
                        HumanBytes(rep.new_bytes)
                    );
                }
            }
            remote::push(
                &store,
                &name,
                &dest,
                (as_name.as_deref(), token_file.as_deref()),
                deltas.options(),
                cli.json,
                show_progress,
            )?
        }
        Cmd::Pull {
            src,
            name,
            as_name,
            token_file,
            load,
            seed,
            output,
            dry_run,
            deltas,
        } => {
            if dry_run {
                let store = open_store(&store_path)?;
                return remote::pull_dry_run(&store, &src, &name, token_file.as_deref(), cli.json);
            }
            // Without a store, a pull that writes a file works in a scratch one.
            let scratch;
            let no_store =
                object_backend(&store_path)?.is_none() && !store_path.join("config.json").exists();
            let store = if output.is_some() && no_store {
                scratch = tempfile::tempdir()?;
                Arc::new(Store::init(
                    &scratch.path().join("store"),
                    StoreConfig::default(),
                )?)
            } else {
                open_store(&store_path)?
            };
            let seeds = remote::add_seeds(&store, &seed, cli.json)?;
            let pulled = remote::pull(
                &store,
                &src,
                &name,
                (as_name.as_deref(), token_file.as_deref()),
                deltas.options(),
                cli.json && !load,
                show_progress,
            );
            remote::drop_seeds(&store, &seeds)?;
            pulled?;
            let local = as_name.as_deref().unwrap_or(&name);
            match output.as_deref() {
                Some("-") => {
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
                    extract::extract(&store, local, &mut w, None).context(
                        "the tar written to stdout is incomplete or unverified; discard it",
                    )?;
                }
                Some(path) => {
                    extract::extract_to_file(&store, local, &PathBuf::from(path), None)?;
                }
                None => {}
            }
            if load {
                docker::load_cmd(
                    &store,
                    as_name.as_deref().unwrap_or(&name),
                    cli.json,
                    show_progress,
                )?;
            }
        }
        Cmd::Serve {
            stdio: _,
            listen: Some(addr),
            push_token_file,
            read_token_file,
            read_only,
        } => remote::serve_http(
            &open_store(&store_path)?,
            &addr,
            push_token_file.as_deref().filter(|_| !read_only),
            read_token_file.as_deref(),
            cli.json,
        )?,
        Cmd::Serve {
            stdio: _,
            listen: None,
            read_only,
            ..
        } => remote::serve_stdio(&open_store(&store_path)?, read_only)?,
        Cmd::Bundle {
            name,
            output,
            have,
            have_file,
            dry_run,
            deltas,
        } => remote::bundle(
            &open_store(&store_path)?,
            &name,
            &output,
            (&have, have_file.as_deref()),
            deltas.options(),
            cli.json,
            dry_run,
        )?,
        Cmd::Unbundle { input } => remote::unbundle(&open_store(&store_path)?, &input, cli.json)?,
        Cmd::Have { output } => remote::have(&open_store(&store_path)?, &output, cli.json)?,
    }
    std::io::stdout().flush().ok();
    Ok(())
}

fn fmt_time(secs: u64) -> String {
    // UTC, without pulling in a date crate: days since the epoch to a civil date.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// One line on how a compressed layer is stored, for `wharf info`.
fn describe_compression(c: &wharf_format::recipe::Compression, len: u64) -> String {
    match (c.method.as_str(), c.recon_len) {
        ("preflate", Some(recon)) => format!(
            "{}: stored decompressed ({} of content in {} member(s)), rebuilt exactly with preflate from {} of reconstruction data ({:.2}% of the layer)",
            c.format,
            HumanBytes(c.plain_len.unwrap_or(0)),
            c.members.unwrap_or(0),
            HumanBytes(recon),
            100.0 * recon as f64 / len.max(1) as f64
        ),
        ("libzstd", Some(recon)) => format!(
            "{}: stored decompressed ({} of content in {} frame(s)), rebuilt exactly by libzstd ({}) from {} of reconstruction data",
            c.format,
            HumanBytes(c.plain_len.unwrap_or(0)),
            c.members.unwrap_or(0),
            c.params.as_deref().unwrap_or("?"),
            HumanBytes(recon),
        ),
        _ => format!(
            "{}: stored as it is, {}: {}",
            c.format,
            c.method,
            c.reason.as_deref().unwrap_or("no reason recorded")
        ),
    }
}
