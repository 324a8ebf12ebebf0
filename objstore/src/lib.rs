//! wharf's store on an S3-compatible object store.
//!
//! One machine's disk stops being enough when a team shares images across
//! many build and GPU machines; this crate keeps a wharf store in a bucket
//! (AWS S3, MinIO, Ceph, Cloudflare R2, Garage) behind the same
//! [`Backend`] interface as a local directory, so `add`, `extract`, `push`,
//! `pull`, `verify` and `gc` work unchanged on `s3://bucket/prefix`.
//!
//! The mapping (spec/FORMAT.md §21 is the reference):
//! - packs and index files are immutable objects under `packs/` and
//!   `index/`, uploaded whole (multipart above [`MULTIPART_ABOVE`]); reads are
//!   ranged GETs, neighbours coalesced, several in flight;
//! - index files are cached on local disk, since every lookup maps them;
//! - a name (ref) is a series of small version objects under
//!   `refs/<hex of name>/`; the newest one wins, an empty one means deleted.
//!   Where the server honours `If-None-Match: *`, each version is created
//!   conditionally so two writers cannot both take the same number; elsewhere
//!   versions carry a timestamp and a random suffix, so no write ever
//!   replaces another's and no race loses a name;
//! - the store lock is a set of lock objects under `locks/`, refreshed while
//!   held: writers take shared ones, `gc` an exclusive one, and `gc` also
//!   leaves packs younger than a grace period alone.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use wharf_format::backend::{Backend, LockGuard, ObjectKind, RangeRead};
use wharf_format::{Error, Result};

/// Pack size for stores made in a bucket: smaller than a directory's 256 MiB
/// so that a writer's uploads start early and overlap its work (two packs
/// in flight), still few requests per GB (16 packs, 64 parts).
pub const DEFAULT_PACK_TARGET: u64 = 64 << 20;
/// Packs larger than this go up as multipart uploads, in parts of this size.
pub const MULTIPART_ABOVE: u64 = 32 << 20;
const PART_SIZE: usize = 16 << 20;
/// Parts of one upload in flight at once (each buffered in memory; with
/// two uploads running, 64 MiB).
const PART_CONCURRENCY: usize = 2;
/// Objects read at once by one `read_ranges` call.
const READ_CONCURRENCY: usize = 8;
/// A lock object not rewritten for this long belongs to a process that died.
pub const LOCK_STALE: Duration = Duration::from_secs(30 * 60);
const LOCK_REFRESH: Duration = Duration::from_secs(5 * 60);
/// gc's default grace period on object stores.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60 * 60);
const CONFIG_KEY: &str = "config.json";
/// What this crate learned about the server at `init` (conditional writes).
const SERVER_KEY: &str = "objstore.json";

/// Bytes read around a small read, and how many such windows are kept:
/// 16 MiB of memory at most.
const WINDOW: u64 = 1 << 20;
const WINDOWS_CACHED: usize = 16;

struct Window {
    key: ObjPath,
    start: u64,
    data: Bytes,
}

/// Counts of what went over the wire, for reports and benchmarks.
#[derive(Default, Debug)]
pub struct Stats {
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub lists: AtomicU64,
    pub heads: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_down: AtomicU64,
    pub bytes_up: AtomicU64,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "gets": g(&self.gets), "puts": g(&self.puts), "lists": g(&self.lists),
            "heads": g(&self.heads), "deletes": g(&self.deletes),
            "requests": g(&self.gets) + g(&self.puts) + g(&self.lists) + g(&self.heads) + g(&self.deletes),
            "bytes_down": g(&self.bytes_down), "bytes_up": g(&self.bytes_up),
        })
    }
}

/// Settings from the AWS shared files, for what the environment leaves
/// unset: credentials from `~/.aws/credentials` (or
/// `$AWS_SHARED_CREDENTIALS_FILE`), region and `endpoint_url` from
/// `~/.aws/config` (or `$AWS_CONFIG_FILE`), for the profile `$AWS_PROFILE`
/// (default `default`), as the AWS CLI reads them. A profile named in
/// `$AWS_PROFILE` that neither file has is an error; missing files are not.
pub fn profile_settings(
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<Vec<(AmazonS3ConfigKey, String)>> {
    let named = env("AWS_PROFILE");
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    let file = |var: &str, default: &str| -> Option<PathBuf> {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".aws").join(default)))
    };
    let load = |path: Option<PathBuf>| -> Result<Option<ini::Ini>> {
        match path {
            Some(p) if p.exists() => ini::Ini::load_from_file(&p)
                .map(Some)
                .map_err(|e| Error::Invalid(format!("{}: {e}", p.display()))),
            _ => Ok(None),
        }
    };
    let creds = load(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
    let config = load(file("AWS_CONFIG_FILE", "config"))?;
    let cred_section = creds
        .as_ref()
        .and_then(|c| c.section(Some(profile.as_str())));
    // In the config file every profile but the default is `[profile NAME]`.
    let config_section = config.as_ref().and_then(|c| {
        c.section(Some(format!("profile {profile}")))
            .or_else(|| c.section(Some(profile.as_str())))
    });
    if named.is_some() && cred_section.is_none() && config_section.is_none() {
        return Err(Error::Invalid(format!(
            "AWS_PROFILE={profile}: no such profile in ~/.aws/credentials or ~/.aws/config"
        )));
    }
    let mut out = Vec::new();
    let mut take =
        |section: Option<&ini::Properties>, key: &str, var: &[&str], k: AmazonS3ConfigKey| {
            if var.iter().any(|v| env(v).is_some()) {
                return;
            }
            if let Some(v) = section.and_then(|s| s.get(key)) {
                out.push((k, v.trim().to_string()));
            }
        };
    take(
        cred_section,
        "aws_access_key_id",
        &["AWS_ACCESS_KEY_ID"],
        AmazonS3ConfigKey::AccessKeyId,
    );
    take(
        cred_section,
        "aws_secret_access_key",
        &["AWS_SECRET_ACCESS_KEY"],
        AmazonS3ConfigKey::SecretAccessKey,
    );
    take(
        cred_section,
        "aws_session_token",
        &["AWS_SESSION_TOKEN"],
        AmazonS3ConfigKey::Token,
    );
    take(
        config_section,
        "region",
        &["AWS_REGION", "AWS_DEFAULT_REGION"],
        AmazonS3ConfigKey::Region,
    );
    take(
        config_section,
        "endpoint_url",
        &["AWS_ENDPOINT_URL", "AWS_ENDPOINT"],
        AmazonS3ConfigKey::Endpoint,
    );
    Ok(out)
}

/// True for the locations this crate opens.
pub fn is_object_url(location: &str) -> bool {
    location.starts_with("s3://")
}

/// A store in a bucket.
pub struct ObjectBackend {
    inner: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket: empty or ending in `/`.
    prefix: String,
    location: String,
    rt: tokio::runtime::Runtime,
    scratch: tempfile::TempDir,
    cache: PathBuf,
    conditional: OnceLock<bool>,
    /// Last-modified times of packs, from the latest listing.
    pack_times: Mutex<HashMap<String, SystemTime>>,
    /// Recently read pack windows, newest first (see `read_through_window`).
    windows: Mutex<VecDeque<Window>>,
    stats: Arc<Stats>,
}

fn backend_err(what: impl std::fmt::Display, e: object_store::Error) -> Error {
    Error::Stream(std::io::Error::other(format!("{what}: {e}")))
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

fn is_conflict(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
    )
}

/// Where wharf keeps local caches: $WHARF_CACHE, else $XDG_CACHE_HOME/wharf,
/// else ~/.cache/wharf.
fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("WHARF_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("wharf");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("wharf")
}

impl ObjectBackend {
    /// Opens `s3://bucket[/prefix]`. Credentials, region and endpoint come
    /// from the usual variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` for servers other
    /// than AWS); an `http://` endpoint is allowed as given.
    pub fn open_url(url: &str) -> Result<ObjectBackend> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| Error::Invalid(format!("{url}: expected s3://bucket[/prefix]")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Invalid(format!(
                "{url}: no bucket name (expected s3://bucket[/prefix])"
            )));
        }
        // object_store signs with ring here (see Cargo.toml); rustls needs
        // to be told, once per process. A second install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let profile = profile_settings(&env, home.as_deref())?;
        let mut endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
        let mut region_set = env("AWS_REGION").is_some() || env("AWS_DEFAULT_REGION").is_some();
        for (key, value) in profile {
            match key {
                AmazonS3ConfigKey::Endpoint => endpoint = Some(value.clone()),
                AmazonS3ConfigKey::Region => region_set = true,
                _ => {}
            }
            b = b.with_config(key, value);
        }
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        if !region_set {
            b = b.with_region("us-east-1");
        }
        let b = b
            .with_client_options(
                // Set here, not on the builder: client options given later
                // replace the builder's own allow-http setting.
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_timeout(Duration::from_secs(120))
                    .with_connect_timeout(Duration::from_secs(10)),
            )
            .with_retry(RetryConfig {
                max_retries: 10,
                retry_timeout: Duration::from_secs(300),
                ..Default::default()
            });
        let store = b
            .build()
            .map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
        ObjectBackend::new(Arc::new(store), prefix, url)
    }

    /// A store on any object_store implementation, under `prefix`.
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: &str, location: &str) -> Result<ObjectBackend> {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wharf-s3")
            .enable_all()
            .build()
            .map_err(Error::Stream)?;
        let root = cache_root();
        let key = blake3::hash(location.as_bytes()).to_hex();
        let cache = root
            .join("objstore")
            .join(&key.as_str()[..16])
            .join("index");
        std::fs::create_dir_all(&cache).map_err(Error::Stream)?;
        let parent = cache.parent().unwrap_or(&root).to_path_buf();
        remove_old_scratch(&parent);
        let scratch = tempfile::Builder::new()
            .prefix(".scratch-")
            .tempdir_in(&parent)
            .map_err(Error::Stream)?;
        Ok(ObjectBackend {
            inner,
            prefix,
            location: location.to_string(),
            rt,
            scratch,
            cache,
            conditional: OnceLock::new(),
            pack_times: Mutex::new(HashMap::new()),
            windows: Mutex::new(VecDeque::new()),
            stats: Arc::new(Stats::default()),
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn key(&self, rel: &str) -> ObjPath {
        ObjPath::from(format!("{}{rel}", self.prefix))
    }

    fn object_key(&self, kind: ObjectKind, name: &str) -> ObjPath {
        match kind {
            ObjectKind::Pack => {
                let shard = name.get(..2).unwrap_or("00");
                self.key(&format!("packs/{shard}/{name}.pack"))
            }
            ObjectKind::Index => self.key(&format!("index/{name}.idx")),
        }
    }

    /// Runs a future to completion on this backend's runtime. From inside
    /// another runtime (the HTTP server's), a plain thread does the waiting,
    /// since tokio refuses to block a runtime thread on another runtime.
    fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| match s.spawn(|| self.rt.block_on(f)).join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
        } else {
            self.rt.block_on(f)
        }
    }

    async fn get_bytes(&self, key: &ObjPath) -> std::result::Result<Bytes, object_store::Error> {
        Stats::add(&self.stats.gets, 1);
        let b = self.inner.get(key).await?.bytes().await?;
        Stats::add(&self.stats.bytes_down, b.len() as u64);
        Ok(b)
    }

    async fn put_bytes(
        &self,
        key: &ObjPath,
        bytes: Bytes,
        create: bool,
    ) -> std::result::Result<(), object_store::Error> {
        Stats::add(&self.stats.puts, 1);
        Stats::add(&self.stats.bytes_up, bytes.len() as u64);
        let opts = PutOptions {
            mode: if create {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..Default::default()
        };
        self.inner
            .put_opts(key, PutPayload::from(bytes), opts)
            .await
            .map(|_| ())
    }

    async fn list_all(
        &self,
        rel: &str,
    ) -> std::result::Result<Vec<object_store::ObjectMeta>, object_store::Error> {
        Stats::add(&self.stats.lists, 1);
        let prefix = self.key(rel);
        self.inner.list(Some(&prefix)).try_collect().await
    }

    /// The part of a listed key after this store's prefix and `rel`.
    fn relative<'a>(&self, full: &'a str, rel: &str) -> Option<&'a str> {
        full.strip_prefix(self.prefix.as_str())?.strip_prefix(rel)
    }

    /// Whether the server refuses a second `If-None-Match: *` write: probed
    /// once at `init` and recorded in the store. A store without the record
    /// (made by an older writer) counts as not conditional; a failure to read
    /// it is an error, not a guess, since writers must agree on the scheme.
    fn conditional(&self) -> Result<bool> {
        if let Some(c) = self.conditional.get() {
            return Ok(*c);
        }
        let key = self.key(SERVER_KEY);
        let c = match self.run(self.get_bytes(&key)) {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v.get("conditional_put").and_then(|c| c.as_bool()))
                .unwrap_or(false),
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(backend_err(format!("read {key}"), e)),
        };
        Ok(*self.conditional.get_or_init(|| c))
    }

    async fn probe_conditional(&self) -> std::result::Result<bool, object_store::Error> {
        let probe = self.key(&format!(".probe-{:016x}", rand::random::<u64>()));
        self.put_bytes(&probe, Bytes::from_static(b"1"), true)
            .await?;
        let second = self.put_bytes(&probe, Bytes::from_static(b"2"), true).await;
        Stats::add(&self.stats.deletes, 1);
        let _ = self.inner.delete(&probe).await;
        match second {
            Ok(()) => Ok(false),
            Err(e) if is_conflict(&e) => Ok(true),
            Err(object_store::Error::NotImplemented { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Small single reads (recipes, nodes, list pieces: what walking an
    /// image's tree reads, one after another) go through a cache of pack
    /// windows around them, since a writer puts an image's metadata near
    /// each other and every request costs a round trip (tens of ms).
    fn read_through_window(&self, key: &ObjPath, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if let Ok(mut ws) = self.windows.lock() {
            if let Some(i) = ws.iter().position(|w| {
                w.key == *key && w.start <= offset && end <= w.start + w.data.len() as u64
            }) {
                let w = ws.remove(i).expect("index from position");
                let from = (offset - w.start) as usize;
                buf.copy_from_slice(&w.data[from..from + buf.len()]);
                ws.push_front(w);
                return Ok(());
            }
        }
        let start = offset.saturating_sub(WINDOW / 2);
        // A range past the object's end comes back cut at the end.
        let opts = GetOptions {
            range: Some(GetRange::Bounded(start..start + WINDOW)),
            ..Default::default()
        };
        let data = self
            .run(async {
                Stats::add(&self.stats.gets, 1);
                self.inner.get_opts(key, opts).await?.bytes().await
            })
            .map_err(|e| backend_err(format!("read {key} at {offset}"), e))?;
        Stats::add(&self.stats.bytes_down, data.len() as u64);
        if start + (data.len() as u64) < end {
            return Err(Error::Corrupt(format!(
                "{key}: asked for {} bytes at {offset}, the object ends at {}",
                buf.len(),
                start + data.len() as u64
            )));
        }
        let from = (offset - start) as usize;
        buf.copy_from_slice(&data[from..from + buf.len()]);
        if let Ok(mut ws) = self.windows.lock() {
            ws.push_front(Window {
                key: key.clone(),
                start,
                data,
            });
            ws.truncate(WINDOWS_CACHED);
        }
        Ok(())
    }

    fn ref_dir(name: &str) -> String {
        format!("refs/{}/", hex::encode(name.as_bytes()))
    }

    /// Versions of one ref, oldest first: (version key, size).
    async fn ref_versions(
        &self,
        name: &str,
    ) -> std::result::Result<Vec<(String, u64)>, object_store::Error> {
        let dir = Self::ref_dir(name);
        let mut v: Vec<(String, u64)> = self
            .list_all(&dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rel = self.relative(m.location.as_ref(), &dir)?.to_string();
                valid_version(&rel).then_some((rel, m.size))
            })
            .collect();
        v.sort();
        Ok(v)
    }
}

/// A ref version key: 16 hex digits of sequence number, then (where the
/// server lacks conditional writes) `-` 16 hex digits of nanoseconds since
/// the epoch and `-` 16 random hex digits. Keys sort in version order.
fn valid_version(key: &str) -> bool {
    let parts: Vec<&str> = key.split('-').collect();
    (parts.len() == 1 || parts.len() == 3)
        && parts
            .iter()
            .all(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn version_seq(key: &str) -> u64 {
    u64::from_str_radix(key.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

impl Backend for ObjectBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    fn put_file(&self, kind: ObjectKind, name: &str, src: &Path) -> Result<()> {
        let key = self.object_key(kind, name);
        let size = std::fs::metadata(src).map_err(Error::Stream)?.len();
        let res: Result<()> = self.run(async {
            if size <= MULTIPART_ABOVE {
                let bytes = std::fs::read(src).map_err(Error::Stream)?;
                return self
                    .put_bytes(&key, Bytes::from(bytes), false)
                    .await
                    .map_err(|e| backend_err(format!("upload {key}"), e));
            }
            // Creating the upload and completing it are requests too.
            Stats::add(&self.stats.puts, 2);
            let upload = self
                .inner
                .put_multipart(&key)
                .await
                .map_err(|e| backend_err(format!("start upload of {key}"), e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut f = std::fs::File::open(src).map_err(Error::Stream)?;
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = read_full(&mut f, &mut buf).map_err(Error::Stream)?;
                if n == 0 {
                    break;
                }
                if let Err(e) = w.wait_for_capacity(PART_CONCURRENCY).await {
                    let _ = w.abort().await;
                    return Err(backend_err(format!("upload {key}"), e));
                }
                Stats::add(&self.stats.puts, 1);
                Stats::add(&self.stats.bytes_up, n as u64);
                w.write(&buf[..n]);
            }
            w.finish()
                .await
                .map(|_| ())
                .map_err(|e| backend_err(format!("finish upload of {key}"), e))
        });
        res?;
        if kind == ObjectKind::Index {
            // The index is needed locally right away (it is mapped): keep
            // the file as the cached copy instead of downloading it again.
            if std::fs::rename(src, self.cache.join(format!("{name}.idx"))).is_ok() {
                return Ok(());
            }
        }
        let _ = std::fs::remove_file(src);
        Ok(())
    }

    fn read_at(&self, kind: ObjectKind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let key = self.object_key(kind, name);
        let len = buf.len() as u64;
        if kind == ObjectKind::Pack && len <= WINDOW / 4 {
            return self.read_through_window(&key, offset, buf);
        }
        let b = self
            .run(async {
                Stats::add(&self.stats.gets, 1);
                self.inner.get_range(&key, offset..offset + len).await
            })
            .map_err(|e| backend_err(format!("read {key} at {offset}"), e))?;
        Stats::add(&self.stats.bytes_down, b.len() as u64);
        if b.len() != buf.len() {
            return Err(Error::Corrupt(format!(
                "{key}: asked for {len} bytes at {offset}, got {}",
                b.len()
            )));
        }
        buf.copy_from_slice(&b);
        Ok(())
    }

    fn read_ranges(&self, kind: ObjectKind, reads: &[RangeRead<'_>]) -> Result<Vec<Vec<u8>>> {
        // Per object, its ranges (object_store coalesces neighbours into one
        // GET and keeps several in flight); several objects at once.
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (name, _, _)) in reads.iter().enumerate() {
            groups.entry(name).or_default().push(i);
        }
        let jobs: Vec<(ObjPath, Vec<usize>, Vec<std::ops::Range<u64>>)> = groups
            .into_iter()
            .map(|(name, idxs)| {
                let ranges = idxs
                    .iter()
                    .map(|&i| reads[i].1..reads[i].1 + reads[i].2 as u64)
                    .collect();
                (self.object_key(kind, name), idxs, ranges)
            })
            .collect();
        let stats = &self.stats;
        let inner = &self.inner;
        let futs: Vec<_> = jobs
            .into_iter()
            .map(|(key, idxs, ranges)| async move {
                Stats::add(&stats.gets, coalesced_requests(&ranges));
                inner
                    .get_ranges(&key, &ranges)
                    .await
                    .map(|b| (idxs, b))
                    .map_err(|e| backend_err(format!("read {key}"), e))
            })
            .collect();
        let results: Vec<(Vec<usize>, Vec<Bytes>)> = self.run(
            futures::stream::iter(futs)
                .buffer_unordered(READ_CONCURRENCY)
                .try_collect(),
        )?;
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); reads.len()];
        for (idxs, bufs) in results {
            for (i, b) in idxs.into_iter().zip(bufs) {
                Stats::add(&self.stats.bytes_down, b.len() as u64);
                if b.len() != reads[i].2 {
                    return Err(Error::Corrupt(format!(
                        "{}: asked for {} bytes at {}, got {}",
                        reads[i].0,
                        reads[i].2,
                        reads[i].1,
                        b.len()
                    )));
                }
                out[i] = b.to_vec();
            }
        }
        Ok(out)
    }

    fn read_batch_hint(&self) -> usize {
        256
    }

    fn read_depth(&self) -> usize {
        4
    }

    fn upload_depth(&self) -> usize {
        2
    }

    fn size(&self, kind: ObjectKind, name: &str) -> Result<u64> {
        let key = self.object_key(kind, name);
        Stats::add(&self.stats.heads, 1);
        self.run(self.inner.head(&key))
            .map(|m| m.size)
            .map_err(|e| backend_err(format!("stat {key}"), e))
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<String>> {
        let (dir, ext) = match kind {
            ObjectKind::Pack => ("packs/", ".pack"),
            ObjectKind::Index => ("index/", ".idx"),
        };
        let metas = self
            .run(self.list_all(dir))
            .map_err(|e| backend_err(format!("list {}{dir}", self.location), e))?;
        let mut out = Vec::new();
        let mut times = HashMap::new();
        for m in metas {
            let Some(rel) = self.relative(m.location.as_ref(), dir) else {
                continue;
            };
            let file = rel.rsplit('/').next().unwrap_or(rel);
            if let Some(stem) = file.strip_suffix(ext) {
                out.push(stem.to_string());
                times.insert(stem.to_string(), m.last_modified.into());
            }
        }
        match kind {
            ObjectKind::Pack => {
                if let Ok(mut t) = self.pack_times.lock() {
                    *t = times;
                }
            }
            ObjectKind::Index => {
                // Cached copies of merged-away index files are dead weight.
                if let Ok(d) = std::fs::read_dir(&self.cache) {
                    for e in d.flatten() {
                        let n = e.file_name().to_string_lossy().to_string();
                        if let Some(stem) = n.strip_suffix(".idx") {
                            if !times.contains_key(stem) {
                                let _ = std::fs::remove_file(e.path());
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let key = self.object_key(kind, name);
        Stats::add(&self.stats.deletes, 1);
        match self.run(self.inner.delete(&key)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend_err(format!("delete {key}"), e)),
        }
    }

    fn local_path(&self, kind: ObjectKind, name: &str) -> Result<Option<PathBuf>> {
        if kind != ObjectKind::Index {
            return Ok(None);
        }
        let path = self.cache.join(format!("{name}.idx"));
        if path.exists() {
            return Ok(Some(path));
        }
        let key = self.object_key(kind, name);
        let bytes = match self.run(self.get_bytes(&key)) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => {
                // Merged away by a concurrent writer: reported as a missing
                // file, which the index loader knows to retry.
                return Err(Error::Io {
                    action: "download",
                    path: PathBuf::from(key.to_string()),
                    cause: std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()),
                });
            }
            Err(e) => return Err(backend_err(format!("download {key}"), e)),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.cache).map_err(Error::Stream)?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(Error::Stream)?;
        tmp.persist(&path).map_err(|e| Error::Stream(e.error))?;
        Ok(Some(path))
    }

    fn read_ref(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let dir = Self::ref_dir(name);
        // A version can be pruned between the listing and the read when a
        // newer one was written meanwhile: list again.
        for _ in 0..5 {
            let res: std::result::Result<Option<Vec<u8>>, object_store::Error> = self.run(async {
                let versions = self.ref_versions(name).await?;
                let Some((latest, size)) = versions.last() else {
                    return Ok(None);
                };
                if *size == 0 {
                    return Ok(None);
                }
                let b = self.get_bytes(&self.key(&format!("{dir}{latest}"))).await?;
                Ok(Some(b.to_vec()))
            });
            match res {
                Ok(v) => return Ok(v),
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(backend_err(format!("read name {name:?}"), e)),
            }
        }
        Err(Error::Corrupt(format!(
            "name {name:?} kept changing while being read; try again"
        )))
    }

    fn write_ref(&self, name: &str, value: Option<&[u8]>) -> Result<()> {
        let dir = Self::ref_dir(name);
        let conditional = self.conditional()?;
        let body = Bytes::copy_from_slice(value.unwrap_or(&[]));
        let res: std::result::Result<(), object_store::Error> = self.run(async {
            for _ in 0..32 {
                let versions = self.ref_versions(name).await?;
                let seq = versions
                    .last()
                    .map(|(k, _)| version_seq(k) + 1)
                    .unwrap_or(1);
                let version = if conditional {
                    format!("{seq:016x}")
                } else {
                    let nanos = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    format!("{seq:016x}-{nanos:016x}-{:016x}", rand::random::<u64>())
                };
                match self
                    .put_bytes(
                        &self.key(&format!("{dir}{version}")),
                        body.clone(),
                        conditional,
                    )
                    .await
                {
                    Ok(()) => {}
                    // Another writer took this number first: theirs is
                    // older, ours goes after it.
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e),
                }
                // Keep ours and the one it replaced (a reader may be about to
                // fetch it); older ones go.
                let keep_from = versions.len().saturating_sub(1);
                for (old, _) in &versions[..keep_from] {
                    Stats::add(&self.stats.deletes, 1);
                    match self.inner.delete(&self.key(&format!("{dir}{old}"))).await {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                return Ok(());
            }
            Err(object_store::Error::Generic {
                store: "wharf",
                source: "too many concurrent writers of this name".into(),
            })
        });
        res.map_err(|e| backend_err(format!("set name {name:?}"), e))
    }

    fn list_refs(&self) -> Result<Vec<String>> {
        let metas = self
            .run(self.list_all("refs/"))
            .map_err(|e| backend_err(format!("list {}refs/", self.location), e))?;
        let mut latest: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for m in metas {
            let Some(rel) = self.relative(m.location.as_ref(), "refs/") else {
                continue;
            };
            let Some((dir, version)) = rel.split_once('/') else {
                continue;
            };
            if !valid_version(version) {
                continue;
            }
            let slot = latest.entry(dir.to_string()).or_default();
            if version > slot.0.as_str() {
                *slot = (version.to_string(), m.size);
            }
        }
        let mut out: Vec<String> = latest
            .into_iter()
            .filter(|(_, (_, size))| *size > 0)
            .filter_map(|(dir, _)| {
                let bytes = hex::decode(dir).ok()?;
                String::from_utf8(bytes).ok()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn read_config(&self) -> Result<Option<Vec<u8>>> {
        let key = self.key(CONFIG_KEY);
        match self.run(self.get_bytes(&key)) {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend_err(
                format!("read {}/{CONFIG_KEY}", self.location),
                e,
            )),
        }
    }

    fn create_config(&self, bytes: &[u8]) -> Result<()> {
        let res: std::result::Result<bool, object_store::Error> = self.run(async {
            let conditional = self.probe_conditional().await?;
            let server = serde_json::json!({ "conditional_put": conditional });
            self.put_bytes(
                &self.key(SERVER_KEY),
                Bytes::from(server.to_string().into_bytes()),
                false,
            )
            .await?;
            self.put_bytes(
                &self.key(CONFIG_KEY),
                Bytes::copy_from_slice(bytes),
                conditional,
            )
            .await?;
            Ok(conditional)
        });
        match res {
            Ok(c) => {
                let _ = self.conditional.set(c);
                Ok(())
            }
            Err(e) if is_conflict(&e) => Err(Error::Invalid(format!(
                "{} already holds a wharf store",
                self.location
            ))),
            Err(e) => Err(backend_err(
                format!("create a store at {}", self.location),
                e,
            )),
        }
    }

    fn lock(&self, exclusive: bool) -> Result<LockGuard> {
        let id = format!(
            "{}-{:016x}",
            if exclusive { "x" } else { "s" },
            rand::random::<u64>()
        );
        let key = self.key(&format!("locks/{id}"));
        let body = Bytes::from(
            serde_json::json!({
                "exclusive": exclusive,
                "host": std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim(),
                "pid": std::process::id(),
            })
            .to_string()
            .into_bytes(),
        );
        let res: std::result::Result<Option<String>, object_store::Error> = self.run(async {
            match self.put_bytes(&key, body.clone(), false).await {
                Ok(()) => {}
                // Read-only credentials (a deploy machine that only pulls and
                // extracts) cannot write a lock object. A reader goes on
                // without one: should gc rewrite a pack under it, its read
                // fails (a missing object), it never returns wrong bytes.
                Err(object_store::Error::PermissionDenied { .. })
                | Err(object_store::Error::Unauthenticated { .. })
                    if !exclusive =>
                {
                    return Ok(Some(String::new()));
                }
                Err(e) => return Err(e),
            }
            let locks = self.list_all("locks/").await?;
            // The server's clock, read off our own lock, judges staleness:
            // clients' clocks may disagree with it and with each other.
            let now = locks
                .iter()
                .find(|m| m.location == key)
                .map(|m| m.last_modified)
                .unwrap_or_else(|| SystemTime::now().into());
            let mut blocking = Vec::new();
            for m in &locks {
                let Some(other) = self.relative(m.location.as_ref(), "locks/") else {
                    continue;
                };
                if other == id
                    || now
                        .signed_duration_since(m.last_modified)
                        .to_std()
                        .is_ok_and(|age| age > LOCK_STALE)
                {
                    continue;
                }
                if exclusive || other.starts_with("x-") {
                    blocking.push(other.to_string());
                }
            }
            if blocking.is_empty() {
                return Ok(None);
            }
            Stats::add(&self.stats.deletes, 1);
            let _ = self.inner.delete(&key).await;
            Ok(Some(blocking.join(", ")))
        });
        match res {
            Ok(None) => {}
            Ok(Some(others)) if others.is_empty() => return Ok(Box::new(())),
            Ok(Some(others)) => {
                return Err(Error::Invalid(if exclusive {
                    format!(
                        "{} is in use by other wharf processes (locks {others}); gc runs only \
                         when nothing else writes. Try again when they finish (a lock not \
                         refreshed for {} min is ignored)",
                        self.location,
                        LOCK_STALE.as_secs() / 60
                    )
                } else {
                    format!(
                        "gc is running on {} (lock {others}); try again when it finishes",
                        self.location
                    )
                }))
            }
            Err(e) => return Err(backend_err(format!("lock {}", self.location), e)),
        }
        Ok(Box::new(HeldLock::start(
            self.inner.clone(),
            self.rt.handle().clone(),
            key,
            body,
            self.stats.clone(),
        )))
    }

    fn modified(&self, kind: ObjectKind, name: &str) -> Result<Option<SystemTime>> {
        if kind == ObjectKind::Pack {
            if let Some(t) = self
                .pack_times
                .lock()
                .ok()
                .and_then(|t| t.get(name).copied())
            {
                return Ok(Some(t));
            }
        }
        let key = self.object_key(kind, name);
        Stats::add(&self.stats.heads, 1);
        match self.run(self.inner.head(&key)) {
            Ok(m) => Ok(Some(m.last_modified.into())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend_err(format!("stat {key}"), e)),
        }
    }

    fn default_gc_grace(&self) -> Duration {
        DEFAULT_GRACE
    }
}

impl Drop for ObjectBackend {
    fn drop(&mut self) {
        // Benchmarks read request counts here ($WHARF_S3_STATS names a file
        // that gets one JSON line per process).
        if let Some(p) = std::env::var_os("WHARF_S3_STATS") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = std::io::Write::write_all(
                    &mut f,
                    format!("{}\n", self.stats.to_json()).as_bytes(),
                );
            }
        }
    }
}

/// Scratch directories of processes that died (a live writer touches its
/// own as it writes packs): untouched for a day means abandoned.
fn remove_old_scratch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(24 * 3600));
        if old && e.file_name().to_string_lossy().starts_with(".scratch-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Coalesced GETs object_store makes for these ranges (its default 1 MiB
/// gap), for the request count.
fn coalesced_requests(ranges: &[std::ops::Range<u64>]) -> u64 {
    let mut sorted: Vec<&std::ops::Range<u64>> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.start);
    let mut n = 0;
    let mut end: Option<u64> = None;
    for r in sorted {
        match end {
            Some(e) if r.start <= e + (1 << 20) => end = Some(e.max(r.end)),
            _ => {
                n += 1;
                end = Some(r.end);
            }
        }
    }
    n
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A lock object, rewritten every few minutes so others know its holder is
/// alive, and deleted when dropped.
struct HeldLock {
    stats: Arc<Stats>,
    inner: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Handle,
    key: ObjPath,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl HeldLock {
    fn start(
        inner: Arc<dyn ObjectStore>,
        rt: tokio::runtime::Handle,
        key: ObjPath,
        body: Bytes,
        stats: Arc<Stats>,
    ) -> HeldLock {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, i, h, k) = (stop.clone(), inner.clone(), rt.clone(), key.clone());
        let refresher = std::thread::Builder::new()
            .name("wharf-lock".into())
            .spawn(move || {
                let (m, cv) = &*s;
                let Ok(mut stopped) = m.lock() else { return };
                loop {
                    // Checked before each wait: the owner may have let go
                    // before this thread first took the mutex.
                    if *stopped {
                        return;
                    }
                    match cv.wait_timeout(stopped, LOCK_REFRESH) {
                        Ok((g, _)) => stopped = g,
                        Err(_) => return,
                    }
                    if *stopped {
                        return;
                    }
                    let _ = h.block_on(i.put(&k, PutPayload::from(body.clone())));
                }
            })
            .ok();
        HeldLock {
            stats,
            inner,
            rt,
            key,
            stop,
            refresher,
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Ok(mut s) = self.stop.0.lock() {
            *s = true;
        }
        self.stop.1.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let (inner, key) = (self.inner.clone(), self.key.clone());
        Stats::add(&self.stats.deletes, 1);
        // Dropped possibly inside another runtime: wait from a plain thread.
        let rt = self.rt.clone();
        let _ =
            std::thread::spawn(move || rt.block_on(async move { inner.delete(&key).await })).join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) {
        std::fs::create_dir_all(dir.join(".aws")).expect("mkdir");
        std::fs::write(
            dir.join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n\n\
             [team]\naws_access_key_id=AKTEAM\naws_secret_access_key=steam\naws_session_token=tok\n",
        )
        .expect("write");
        std::fs::write(
            dir.join(".aws/config"),
            "[default]\nregion = eu-west-1\n\n[profile team]\nregion = garage\n\
             endpoint_url = http://127.0.0.1:3900\n",
        )
        .expect("write");
    }

    fn get(v: &[(AmazonS3ConfigKey, String)], k: AmazonS3ConfigKey) -> Option<&str> {
        v.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn profiles_fill_in_what_the_environment_leaves_unset() {
        let d = tempfile::tempdir().expect("tempdir");
        files(d.path());
        let none = |_: &str| None;
        let v = profile_settings(&none, Some(d.path())).expect("default profile");
        assert_eq!(get(&v, AmazonS3ConfigKey::AccessKeyId), Some("AKDEFAULT"));
        assert_eq!(get(&v, AmazonS3ConfigKey::Region), Some("eu-west-1"));
        assert_eq!(get(&v, AmazonS3ConfigKey::Endpoint), None);

        let team = |k: &str| (k == "AWS_PROFILE").then(|| "team".to_string());
        let v = profile_settings(&team, Some(d.path())).expect("team profile");
        assert_eq!(get(&v, AmazonS3ConfigKey::AccessKeyId), Some("AKTEAM"));
        assert_eq!(get(&v, AmazonS3ConfigKey::Token), Some("tok"));
        assert_eq!(get(&v, AmazonS3ConfigKey::Region), Some("garage"));
        assert_eq!(
            get(&v, AmazonS3ConfigKey::Endpoint),
            Some("http://127.0.0.1:3900")
        );

        // The environment wins over the files.
        let env = |k: &str| match k {
            "AWS_PROFILE" => Some("team".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("AKENV".to_string()),
            "AWS_REGION" => Some("us-west-2".to_string()),
            _ => None,
        };
        let v = profile_settings(&env, Some(d.path())).expect("team profile");
        assert_eq!(get(&v, AmazonS3ConfigKey::AccessKeyId), None);
        assert_eq!(get(&v, AmazonS3ConfigKey::Region), None);
        assert_eq!(get(&v, AmazonS3ConfigKey::SecretAccessKey), Some("steam"));

        let missing = |k: &str| (k == "AWS_PROFILE").then(|| "nope".to_string());
        let err = profile_settings(&missing, Some(d.path())).expect_err("unknown profile");
        assert!(err.to_string().contains("nope"), "{err}");
        // No files at all: nothing to add, no error.
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(profile_settings(&none, Some(empty.path()))
            .expect("ok")
            .is_empty());
    }
}
