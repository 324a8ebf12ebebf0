//! Where a store's bytes live.
//!
//! The whole store is built from two things: immutable objects (packs and
//! index files, written once and never changed) and refs (small named values
//! replaced atomically). Keeping the storage behind this narrow interface is
//! what lets an object store (S3 and alike) serve as a backend later: every
//! operation here has a direct equivalent there (PUT of a finished object,
//! ranged GET, LIST by prefix, DELETE, conditional PUT for refs).

use crate::error::{Error, IoContext, Result};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Held while the store is locked; dropping it releases the lock.
pub type LockGuard = Box<dyn std::any::Any + Send>;

/// One ranged read: object name, offset, length.
pub type RangeRead<'a> = (&'a str, u64, usize);

/// The two families of immutable objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Pack,
    Index,
}

/// Storage for one store.
pub trait Backend: Send + Sync {
    /// A human-readable location, for messages.
    fn location(&self) -> String;
    /// A directory on local disk for files being built before `put_file`.
    fn scratch_dir(&self) -> &Path;
    /// Publishes a finished local file as an immutable object. Readers see the
    /// whole object or nothing; the source file is consumed.
    fn put_file(&self, kind: ObjectKind, name: &str, src: &Path) -> Result<()>;
    /// Reads `buf.len()` bytes at `offset` of an object.
    fn read_at(&self, kind: ObjectKind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// The size of an object in bytes.
    fn size(&self, kind: ObjectKind, name: &str) -> Result<u64>;
    /// Names of all objects of a kind, in no particular order.
    fn list(&self, kind: ObjectKind) -> Result<Vec<String>>;
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()>;
    /// A local path of the object, for memory-mapping: the object itself in
    /// a local directory, a cached copy for remote stores (index files only),
    /// None where the backend cannot provide one.
    fn local_path(&self, kind: ObjectKind, name: &str) -> Result<Option<PathBuf>>;
    /// The current value of a ref, if set.
    fn read_ref(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Sets (Some) or removes (None) a ref atomically: a reader sees the old
    /// or the new value, never a mix, whatever happens to the writer.
    fn write_ref(&self, name: &str, value: Option<&[u8]>) -> Result<()>;
    /// Names of all refs.
    fn list_refs(&self) -> Result<Vec<String>>;
    /// The store's settings (`config.json`), or None where no store exists.
    fn read_config(&self) -> Result<Option<Vec<u8>>>;
    /// Writes the settings of a new store; fails if a store is already there.
    fn create_config(&self, bytes: &[u8]) -> Result<()>;
    /// Takes the store's lock: shared for writers that only add, exclusive
    /// for gc, which must not delete what a concurrent writer is about to use.
    fn lock(&self, exclusive: bool) -> Result<LockGuard>;

    /// Reads many ranges at once. Backends with a per-request cost (object
    /// stores) coalesce neighbours and keep several requests in flight.
    fn read_ranges(&self, kind: ObjectKind, reads: &[RangeRead<'_>]) -> Result<Vec<Vec<u8>>> {
        reads
            .iter()
            .map(|(name, off, len)| {
                let mut buf = vec![0u8; *len];
                self.read_at(kind, name, *off, &mut buf)?;
                Ok(buf)
            })
            .collect()
    }
    /// Reads many ranges into `out`, back to back (`out` is exactly as long
    /// as the ranges together). By default through `read_ranges`; a local
    /// directory reads straight into `out`.
    fn read_ranges_into(
        &self,
        kind: ObjectKind,
        reads: &[RangeRead<'_>],
        out: &mut [u8],
    ) -> Result<()> {
        let mut at = 0;
        for b in self.read_ranges(kind, reads)? {
            let dst = out
                .get_mut(at..at + b.len())
                .ok_or_else(|| Error::Invalid("ranges longer than their buffer".into()))?;
            dst.copy_from_slice(&b);
            at += b.len();
        }
        Ok(())
    }
    /// How many chunks a sequential reader should ask for at once: more
    /// where each request costs a round trip.
    fn read_batch_hint(&self) -> usize {
        32
    }
    /// Finished packs a writer may have publishing while it fills the next
    /// (0: publish in line).
    fn upload_depth(&self) -> usize {
        0
    }
    /// How many such batches a sequential reader keeps in flight.
    fn read_depth(&self) -> usize {
        1
    }
    /// When an object was written, where the backend knows.
    fn modified(&self, _kind: ObjectKind, _name: &str) -> Result<Option<SystemTime>> {
        Ok(None)
    }
    /// How long gc leaves packs younger than this alone unless told
    /// otherwise. Zero where the lock alone keeps writers out (a local
    /// directory); an hour on shared object stores, where a writer that
    /// uploaded a pack but not yet its index must not lose it.
    fn default_gc_grace(&self) -> Duration {
        Duration::ZERO
    }
    /// Local files left by interrupted writers, safe to delete while the
    /// exclusive lock is held.
    fn leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.scratch_dir())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }
}

const CONFIG_FILE: &str = "config.json";
const LOCK_FILE: &str = "lock";

/// A store in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    scratch: PathBuf,
    open_files: Mutex<HashMap<(ObjectKind, String), Arc<File>>>,
}

const PACK_EXT: &str = "pack";
const INDEX_EXT: &str = "idx";

impl LocalBackend {
    /// Opens the directory layout under `root` (which must exist).
    pub fn open(root: &Path) -> Result<Self> {
        let scratch = root.join("tmp");
        for d in ["packs", "index", "refs", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx("create directory", &p)?;
        }
        Ok(LocalBackend {
            root: root.to_path_buf(),
            scratch,
            open_files: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, kind: ObjectKind, name: &str) -> PathBuf {
        match kind {
            // Packs fan out by the first two hex digits so no directory grows
            // past a few thousand entries on a large store.
            ObjectKind::Pack => {
                let shard = name.get(..2).unwrap_or("00");
                self.root
                    .join("packs")
                    .join(shard)
                    .join(format!("{name}.{PACK_EXT}"))
            }
            ObjectKind::Index => self.root.join("index").join(format!("{name}.{INDEX_EXT}")),
        }
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.root.join("refs").join(encode_ref_name(name))
    }

    fn file(&self, kind: ObjectKind, name: &str) -> Result<Arc<File>> {
        let key = (kind, name.to_string());
        let mut files = self
            .open_files
            .lock()
            .map_err(|_| Error::Corrupt("file cache lock poisoned".into()))?;
        if let Some(f) = files.get(&key) {
            return Ok(f.clone());
        }
        let path = self.object_path(kind, name);
        let f = Arc::new(File::open(&path).ctx("open", &path)?);
        // Bound the number of descriptors held open on a large store.
        if files.len() > 256 {
            files.clear();
        }
        files.insert(key, f.clone());
        Ok(f)
    }
}

/// A file in the store's scratch directory, deleted when dropped: a write
/// that fails (a full disk) leaves nothing behind to keep the disk full.
/// Once moved into the store ([`Backend::put_file`]) the path is gone and
/// the drop does nothing.
pub struct ScratchFile {
    pub path: PathBuf,
}

impl ScratchFile {
    pub fn create(dir: &Path, what: &str) -> Result<(ScratchFile, File)> {
        let path = dir.join(format!("{what}-{:016x}.tmp", rand::random::<u64>()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create scratch file", &path)?;
        Ok((ScratchFile { path }, f))
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the
/// whole new one: a temporary file in the same directory, fsync, rename, fsync
/// of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes).ctx("write", &tmp.0)?;
    tmp.1.sync_all().ctx("sync", &tmp.0)?;
    drop(tmp.1);
    fs::rename(&tmp.0, path).ctx("rename into place", path)?;
    sync_dir(dir)
}

fn tempfile_in(dir: &Path) -> Result<(PathBuf, File)> {
    for _ in 0..16 {
        let name = format!(".tmp-{:016x}", rand::random::<u64>());
        let p = dir.join(name);
        match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).ctx("create", &p),
        }
    }
    Err(Error::Invalid(format!(
        "could not create a temporary file in {}",
        dir.display()
    )))
}

/// Makes a rename or create in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("sync directory", dir)
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Publishing a pack waits for the disk (fsync of the pack, its
    /// directory, then its index): done in line, that wait stalled the whole
    /// pipeline behind it once per pack, about a third of a large receive.
    fn upload_depth(&self) -> usize {
        1
    }

    fn put_file(&self, kind: ObjectKind, name: &str, src: &Path) -> Result<()> {
        let dst = self.object_path(kind, name);
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).ctx("create directory", &dir)?;
            // The new shard directory's own entry must be durable before an
            // index can name a pack inside it.
            sync_dir(dir.parent().unwrap_or(&self.root))?;
        }
        File::open(src)
            .and_then(|f| f.sync_all())
            .ctx("sync", src)?;
        fs::rename(src, &dst).ctx("move into the store", &dst)?;
        sync_dir(&dir)
    }

    fn read_at(&self, kind: ObjectKind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file(kind, name)?;
        f.read_exact_at(buf, offset)
            .ctx("read", self.object_path(kind, name))
    }

    fn read_ranges_into(
        &self,
        kind: ObjectKind,
        reads: &[RangeRead<'_>],
        out: &mut [u8],
    ) -> Result<()> {
        let mut at = 0;
        for (name, offset, len) in reads {
            let dst = out
                .get_mut(at..at + len)
                .ok_or_else(|| Error::Invalid("ranges longer than their buffer".into()))?;
            self.read_at(kind, name, *offset, dst)?;
            at += len;
        }
        Ok(())
    }

    fn size(&self, kind: ObjectKind, name: &str) -> Result<u64> {
        let p = self.object_path(kind, name);
        Ok(fs::metadata(&p).ctx("stat", &p)?.len())
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<String>> {
        let (dirs, ext) = match kind {
            ObjectKind::Pack => {
                let base = self.root.join("packs");
                let mut dirs = Vec::new();
                for e in fs::read_dir(&base).ctx("list", &base)? {
                    let e = e.ctx("list", &base)?;
                    if e.file_type().ctx("stat", e.path())?.is_dir() {
                        dirs.push(e.path());
                    }
                }
                (dirs, PACK_EXT)
            }
            ObjectKind::Index => (vec![self.root.join("index")], INDEX_EXT),
        };
        let mut out = Vec::new();
        for d in dirs {
            for e in fs::read_dir(&d).ctx("list", &d)? {
                let e = e.ctx("list", &d)?;
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(stem) = name.strip_suffix(&format!(".{ext}")) {
                    if !stem.starts_with('.') {
                        out.push(stem.to_string());
                    }
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        if let Ok(mut files) = self.open_files.lock() {
            files.remove(&(kind, name.to_string()));
        }
        let p = self.object_path(kind, name);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("delete", &p),
        }
    }

    fn local_path(&self, kind: ObjectKind, name: &str) -> Result<Option<PathBuf>> {
        Ok(Some(self.object_path(kind, name)))
    }

    fn read_ref(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let p = self.ref_path(name);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read ref", &p),
        }
    }

    fn write_ref(&self, name: &str, value: Option<&[u8]>) -> Result<()> {
        let p = self.ref_path(name);
        match value {
            Some(v) => write_atomic(&p, v),
            None => match fs::remove_file(&p) {
                Ok(()) => sync_dir(&self.root.join("refs")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).ctx("remove ref", &p),
            },
        }
    }

    fn read_config(&self) -> Result<Option<Vec<u8>>> {
        let p = self.root.join(CONFIG_FILE);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read", &p),
        }
    }

    fn create_config(&self, bytes: &[u8]) -> Result<()> {
        let p = self.root.join(CONFIG_FILE);
        if p.exists() {
            return Err(Error::Invalid(format!(
                "{} already holds a wharf store",
                self.root.display()
            )));
        }
        write_atomic(&p, bytes)
    }

    fn lock(&self, exclusive: bool) -> Result<LockGuard> {
        let p = self.root.join(LOCK_FILE);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx("open", &p)?;
        if exclusive {
            f.lock().ctx("lock exclusively", &p)?;
        } else {
            f.lock_shared().ctx("lock", &p)?;
        }
        Ok(Box::new(f))
    }

    fn modified(&self, kind: ObjectKind, name: &str) -> Result<Option<SystemTime>> {
        let p = self.object_path(kind, name);
        Ok(fs::metadata(&p).and_then(|m| m.modified()).ok())
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(&self.scratch)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        // Atomic-write temporaries next to refs and the config.
        for dir in [self.root.clone(), self.root.join("refs")] {
            if let Ok(d) = fs::read_dir(&dir) {
                out.extend(
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                        .map(|e| e.path()),
                );
            }
        }
        out
    }

    fn list_refs(&self) -> Result<Vec<String>> {
        let d = self.root.join("refs");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).ctx("list", &d)? {
            let e = e.ctx("list", &d)?;
            if let Some(n) = e.file_name().to_str() {
                if n.starts_with('.') {
                    continue;
                }
                if let Some(name) = decode_ref_name(n) {
                    out.push(name);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Image names (`registry/repo:tag`) become file names by percent-encoding
/// every byte outside `[A-Za-z0-9._-]`; a leading dot is encoded too so that a
/// ref never looks like a temporary file.
pub fn encode_ref_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn decode_ref_name(file: &str) -> Option<String> {
    let bytes = file.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = file.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_round_trip() {
        for n in [
            "pytorch:v2",
            "ghcr.io/org/img:1.0",
            ".hidden",
            "a%b",
            "données",
        ] {
            let e = encode_ref_name(n);
            assert!(!e.contains('/') && !e.starts_with('.'), "{e}");
            assert_eq!(decode_ref_name(&e).as_deref(), Some(n));
        }
    }
}
