//! Deterministic synthesis of realistic `docker save` archives, without Docker.
//!
//! [`write_image`] writes a complete image archive for a small synthetic
//! "Python ML" image (three layers: a Debian-like base, a `pip install` layer
//! and an `app/` layer) in either the legacy (Docker <= 24) or the OCI
//! (Docker >= 25) `docker save` layout. Two versions exist: V2 rebuilds the pip
//! layer (new mtimes everywhere, one package bumped) and edits two app files;
//! the base layer is byte-identical between versions.
//!
//! The outer archive layout follows `/work/shared/corpus/build_corpus.py`
//! (which follows moby `image/tarexport/save.go`), and every tar header is
//! written the way Go's `archive/tar` writes it for moby: USTAR when the entry
//! fits (including the prefix/name split), otherwise a `PaxHeaders.0/...`
//! extended header first; numeric ids, empty user and group names, and only
//! the two end-of-archive zero blocks at the end.
//!
//! Everything is a pure function of the seed: no wall clock, no hash-map
//! iteration order.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

// ===========================================================================
// Public API
// ===========================================================================

/// Layout of the archive, as written by `docker save`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Docker <= 24: `<v1id>/{VERSION,json,layer.tar}`, `<imageid>.json`,
    /// `manifest.json`, `repositories`.
    Legacy,
    /// Docker >= 25: `blobs/sha256/*`, `index.json`, `manifest.json`,
    /// `oci-layout`, `repositories`.
    Oci,
}

/// Which version of the synthetic image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The first build.
    V1,
    /// Same base layer; pip layer rebuilt with one package bumped; `main.py`
    /// and the model config edited.
    V2,
}

/// Size knobs. `Scale::demo()` must give an image of roughly 40-60 MB total that
/// builds in well under a second in release mode; `Scale::tiny()` roughly 2-4 MB for unit tests.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Approximate number of regular files in the base layer.
    pub base_files: usize,
    /// Number of pip packages in the pip layer.
    pub pip_packages: usize,
    /// Python modules per pip package (each also gets a `.pyc`).
    pub files_per_package: usize,
    /// Mean size of an ordinary file, in bytes (binaries are larger, docs smaller).
    pub mean_file_size: usize,
    /// Size of the float16 payload of `app/model.safetensors`, in bytes.
    pub app_weights_size: usize,
}

impl Scale {
    /// About 46 MB per image (base 16 MB, pip 19 MB, app 10 MB); builds in
    /// about 0.2 s in release mode.
    pub fn demo() -> Self {
        Scale {
            base_files: 1600,
            pip_packages: 16,
            files_per_package: 48,
            mean_file_size: 7_500,
            app_weights_size: 10_000_000,
        }
    }

    /// About 3.6 MB per image.
    pub fn tiny() -> Self {
        Scale {
            base_files: 160,
            pip_packages: 4,
            files_per_package: 10,
            mean_file_size: 4_000,
            app_weights_size: 1_500_000,
        }
    }
}

/// Writes one complete `docker save`-style archive for `version` to `out`, deterministic for a given seed.
pub fn write_image(
    out: &mut dyn Write,
    layout: Layout,
    version: Version,
    scale: Scale,
    seed: u64,
) -> io::Result<()> {
    let img = build_image(version, scale, seed)?;
    let mut bw = io::BufWriter::with_capacity(1 << 20, out);
    match layout {
        Layout::Legacy => write_legacy(&mut bw, &img)?,
        Layout::Oci => write_oci(&mut bw, &img)?,
    }
    bw.flush()
}

// ===========================================================================
// Tar writer (Go archive/tar conventions, as moby uses them)
// ===========================================================================

const BLOCK: usize = 512;
const NAME_SIZE: usize = 100;
const PREFIX_SIZE: usize = 155;
static ZEROS: [u8; 2 * BLOCK] = [0; 2 * BLOCK];
const MAGIC_USTAR: (&[u8; 6], &[u8; 2]) = (b"ustar\0", b"00");
const MAGIC_GNU: (&[u8; 6], &[u8; 2]) = (b"ustar ", b" \0");

/// A small tar writer, also used by tests to build odd tars. Every method appends exact bytes.
pub struct TarWriter<W: Write> {
    w: W,
}

/// One header's worth of fields (uname and gname are always empty).
struct Hdr<'a> {
    name: &'a str,
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    linkname: &'a str,
}

impl<W: Write> TarWriter<W> {
    /// Writes to `w`; nothing is buffered or padded behind the caller's back.
    pub fn new(w: W) -> Self {
        TarWriter { w }
    }

    /// Regular file ('0'), with Go-style USTAR/PAX choice for the name.
    pub fn file(&mut self, path: &str, mode: u32, mtime: u64, data: &[u8]) -> io::Result<()> {
        let h = Hdr::new(path, b'0', mode, mtime).size(data.len());
        self.entry(&h, &[], false, data)
    }

    /// Directory ('5'); a trailing '/' is added to the name if missing.
    pub fn dir(&mut self, path: &str, mode: u32, mtime: u64) -> io::Result<()> {
        let name = dir_name(path);
        self.entry(&Hdr::new(&name, b'5', mode, mtime), &[], false, &[])
    }

    /// Symbolic link ('2'), mode 0777.
    pub fn symlink(&mut self, path: &str, target: &str, mtime: u64) -> io::Result<()> {
        let h = Hdr::new(path, b'2', 0o777, mtime).link(target);
        self.entry(&h, &[], false, &[])
    }

    /// Hard link ('1') to an earlier entry, mode 0644, size 0.
    pub fn hardlink(&mut self, path: &str, target: &str, mtime: u64) -> io::Result<()> {
        let h = Hdr::new(path, b'1', 0o644, mtime).link(target);
        self.entry(&h, &[], false, &[])
    }

    /// An overlay whiteout: regular empty file named `.wh.<name>` in dir, mode 0600 (pass the full path incl. `.wh.`).
    pub fn whiteout(&mut self, path: &str, mtime: u64) -> io::Result<()> {
        self.entry(&Hdr::new(path, b'0', 0o600, mtime), &[], false, &[])
    }

    /// GNU-style long name: a type 'L' entry named "././@LongLink" carrying the name + NUL, then the entry with a truncated name; type '0'.
    ///
    /// Both headers use the GNU magic (`"ustar  \0"`), as Go's `FormatGNU` does.
    /// The 'L' entry is written whatever the length of `path`.
    pub fn gnu_longname_file(
        &mut self,
        path: &str,
        mode: u32,
        mtime: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let mut long = path.as_bytes().to_vec();
        long.push(0);
        let blk = raw_header("././@LongLink", b'L', long.len() as u64, MAGIC_GNU);
        self.w.write_all(&blk)?;
        self.data(&long)?;
        let h = Hdr::new(path, b'0', mode, mtime).size(data.len());
        let mut blk = v7_block(&h, path.as_bytes(), b"", true);
        finish_block(&mut blk, MAGIC_GNU);
        self.w.write_all(&blk)?;
        self.data(data)
    }

    /// Force a PAX header (type 'x') with the given extra records (e.g. ("mtime","1700000000.123456789"), ("path", ...)) before a regular file.
    ///
    /// Records Go would need anyway (a long or non-ASCII `path`) are included;
    /// a given record overrides one of the same key; keys are sorted as Go does.
    pub fn pax_file(
        &mut self,
        path: &str,
        records: &[(&str, &str)],
        mode: u32,
        mtime: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let h = Hdr::new(path, b'0', mode, mtime).size(data.len());
        self.entry(&h, records, true, data)
    }

    /// Raw bytes appended as-is (for garbage, extra zero blocks, truncation tests).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// The two zero blocks of end-of-archive.
    pub fn finish(&mut self) -> io::Result<()> {
        self.w.write_all(&ZEROS)
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.w
    }

    /// Header (USTAR or PAX+USTAR) then data then zero padding to a block.
    fn entry(
        &mut self,
        h: &Hdr<'_>,
        extra: &[(&str, &str)],
        force_pax: bool,
        data: &[u8],
    ) -> io::Result<()> {
        let hdr = go_header(h, extra, force_pax);
        self.w.write_all(&hdr)?;
        self.data(data)
    }

    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.w.write_all(&ZEROS[..pad])
    }
}

impl<'a> Hdr<'a> {
    fn new(name: &'a str, typeflag: u8, mode: u32, mtime: u64) -> Self {
        Hdr {
            name,
            typeflag,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime,
            linkname: "",
        }
    }
    fn size(mut self, n: usize) -> Self {
        self.size = n as u64;
        self
    }
    fn link(mut self, target: &'a str) -> Self {
        self.linkname = target;
        self
    }
    fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

fn dir_name(path: &str) -> String {
    if path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    }
}

/// Go's `isASCII`: NUL counts as non-ASCII.
fn go_is_ascii(s: &str) -> bool {
    s.bytes().all(|b| b != 0 && b < 0x80)
}

/// Go's `toASCII`: drops every non-ASCII character and NUL.
fn go_to_ascii(s: &str) -> String {
    s.chars()
        .filter(|&c| (c as u32) < 0x80 && c != '\0')
        .collect()
}

fn fits_octal(n: usize, x: u64) -> bool {
    n >= 22 || x < (1u64 << ((n - 1) * 3))
}

/// Go's `formatter.formatString`, including the trailing-slash quirk.
fn fmt_str(field: &mut [u8], s: &[u8]) {
    let n = field.len();
    let k = s.len().min(n);
    field[..k].copy_from_slice(&s[..k]);
    if s.len() > n && field[n - 1] == b'/' {
        let t = s[..n].iter().rposition(|&c| c != b'/').map_or(0, |i| i + 1);
        field[t] = 0;
    }
}

/// Go's `formatter.formatOctal`: zero-padded to `len-1` digits, NUL-terminated.
fn fmt_octal(field: &mut [u8], x: u64) {
    let n = field.len();
    let x = if fits_octal(n, x) { x } else { 0 };
    let s = format!("{x:o}");
    let s = if n > s.len() + 1 {
        "0".repeat(n - s.len() - 1) + &s
    } else {
        s
    };
    fmt_str(field, s.as_bytes());
}

/// Go's `formatter.formatNumeric` (GNU format): octal if it fits, else base-256.
fn fmt_numeric(field: &mut [u8], x: u64) {
    if fits_octal(field.len(), x) {
        fmt_octal(field, x);
        return;
    }
    let mut v = x;
    for b in field.iter_mut().rev() {
        *b = v as u8;
        v >>= 8;
    }
    field[0] |= 0x80;
}

/// Go's `Writer.templateV7Plus` (no magic, no checksum yet).
fn v7_block(h: &Hdr<'_>, name: &[u8], link: &[u8], gnu: bool) -> [u8; BLOCK] {
    let num = if gnu { fmt_numeric } else { fmt_octal };
    let mut b = [0u8; BLOCK];
    b[156] = h.typeflag;
    fmt_str(&mut b[0..100], name);
    fmt_str(&mut b[157..257], link);
    num(&mut b[100..108], u64::from(h.mode));
    num(&mut b[108..116], h.uid);
    num(&mut b[116..124], h.gid);
    num(&mut b[124..136], h.size);
    num(&mut b[136..148], h.mtime);
    // uname [265..297] and gname [297..329] stay empty
    num(&mut b[329..337], 0);
    num(&mut b[337..345], 0);
    b
}

/// Sets magic/version and the checksum (6 octal digits, NUL, space).
fn finish_block(b: &mut [u8; BLOCK], magic: (&[u8; 6], &[u8; 2])) {
    b[257..263].copy_from_slice(magic.0);
    b[263..265].copy_from_slice(magic.1);
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|&c| u64::from(c)).sum();
    b[148..156].fill(0);
    fmt_octal(&mut b[148..155], sum);
    b[155] = b' ';
}

/// Go's `Writer.writeRawFile` header (for 'x' and 'L' entries).
fn raw_header(name: &str, typeflag: u8, size: u64, magic: (&[u8; 6], &[u8; 2])) -> [u8; BLOCK] {
    let mut name = go_to_ascii(name);
    name.truncate(NAME_SIZE);
    let name = name.trim_end_matches('/');
    let h = Hdr::new(name, typeflag, 0, 0).size(size as usize);
    let mut b = v7_block(&h, name.as_bytes(), b"", false);
    b[329..345].fill(0); // writeRawFile leaves devmajor/devminor unformatted
    finish_block(&mut b, magic);
    b
}

/// Go's `splitUSTARPath`.
fn split_ustar(name: &str) -> Option<(&str, &str)> {
    let mut length = name.len();
    if length <= NAME_SIZE || !go_is_ascii(name) {
        return None;
    }
    if length > PREFIX_SIZE + 1 {
        length = PREFIX_SIZE + 1;
    } else if name.as_bytes()[length - 1] == b'/' {
        length -= 1;
    }
    let i = name[..length].rfind('/')?;
    let nlen = name.len() - i - 1;
    if i == 0 || nlen > NAME_SIZE || nlen == 0 || i > PREFIX_SIZE {
        return None;
    }
    Some((&name[..i], &name[i + 1..]))
}

/// Go's `formatPAXRecord`: the length prefix counts itself.
fn pax_record(k: &str, v: &str) -> String {
    let body = format!(" {k}={v}\n");
    let mut n = body.len() + 1;
    while n.to_string().len() + body.len() != n {
        n = n.to_string().len() + body.len();
    }
    format!("{n}{body}")
}

/// Go's `path.Clean`.
fn go_clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for el in p.split('/') {
        match el {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            _ => parts.push(el),
        }
    }
    let s = parts.join("/");
    if rooted {
        format!("/{s}")
    } else if s.is_empty() {
        ".".to_string()
    } else {
        s
    }
}

/// `path.Join(path.Split(name)[0], "PaxHeaders.0", path.Split(name)[1])`.
fn pax_header_name(name: &str) -> String {
    let (dir, file) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let parts: Vec<&str> = [dir, "PaxHeaders.0", file]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    go_clean(&parts.join("/"))
}

/// The header bytes Go's `tar.Writer.WriteHeader` writes for a moby header
/// (`Format = FormatPAX`, whole-second mtime, no atime/ctime): USTAR when it
/// fits, else a PAX extended header then the main header.
fn go_header(h: &Hdr<'_>, extra: &[(&str, &str)], force_pax: bool) -> Vec<u8> {
    fn set(pax: &mut Vec<(String, String)>, k: &str, v: &str) {
        match pax.iter_mut().find(|(key, _)| key == k) {
            Some(e) => e.1 = v.to_string(),
            None => pax.push((k.to_string(), v.to_string())),
        }
    }
    let mut pax: Vec<(String, String)> = Vec::new();
    let mut ustar_ok = !force_pax;
    let split = split_ustar(h.name);
    if !go_is_ascii(h.name) || h.name.len() > NAME_SIZE {
        set(&mut pax, "path", h.name);
        if split.is_none() {
            ustar_ok = false;
        }
    }
    if !go_is_ascii(h.linkname) || h.linkname.len() > NAME_SIZE {
        set(&mut pax, "linkpath", h.linkname);
        ustar_ok = false;
    }
    for (k, v, width) in [
        ("uid", h.uid, 8),
        ("gid", h.gid, 8),
        ("size", h.size, 12),
        ("mtime", h.mtime, 12),
    ] {
        if !fits_octal(width, v) {
            set(&mut pax, k, &v.to_string());
            ustar_ok = false;
        }
    }
    for (k, v) in extra {
        set(&mut pax, k, v);
        ustar_ok = false;
    }
    let mut out = Vec::with_capacity(3 * BLOCK);
    if ustar_ok {
        let (prefix, name) = split.unwrap_or(("", h.name));
        let mut b = v7_block(h, name.as_bytes(), h.linkname.as_bytes(), false);
        fmt_str(&mut b[345..500], prefix.as_bytes());
        finish_block(&mut b, MAGIC_USTAR);
        out.extend_from_slice(&b);
        return out;
    }
    pax.sort_by(|a, b| a.0.cmp(&b.0));
    let data: String = pax.iter().map(|(k, v)| pax_record(k, v)).collect();
    let x = raw_header(
        &pax_header_name(h.name),
        b'x',
        data.len() as u64,
        MAGIC_USTAR,
    );
    out.extend_from_slice(&x);
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(&ZEROS[..(BLOCK - data.len() % BLOCK) % BLOCK]);
    let name = go_to_ascii(h.name);
    let link = go_to_ascii(h.linkname);
    let mut b = v7_block(h, name.as_bytes(), link.as_bytes(), false);
    finish_block(&mut b, MAGIC_USTAR);
    out.extend_from_slice(&b);
    out
}

// ===========================================================================
// Small helpers: rng, hashing, encodings, JSON, time
// ===========================================================================

/// An independent, deterministic stream per (seed, purpose).
fn rng_for(seed: u64, tag: &str) -> StdRng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(tag.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    StdRng::seed_from_u64(u64::from_le_bytes(b))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn b64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut s = String::with_capacity(data.len() * 4 / 3 + 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            s.push(alphabet[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
        if pad {
            for _ in c.len()..3 {
                s.push('=');
            }
        }
    }
    s
}

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A JSON value that keeps its key order, serialized like Go's `json.Marshal`.
#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn js(s: impl Into<String>) -> J {
    J::Str(s.into())
}

fn jo(pairs: Vec<(&str, J)>) -> J {
    J::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn jstrs(xs: &[&str]) -> J {
    J::Arr(xs.iter().map(|s| js(*s)).collect())
}

fn go_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn go_json_into(j: &J, out: &mut String) {
    match j {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(n) => {
            let _ = write!(out, "{n}");
        }
        J::Str(s) => go_json_str(s, out),
        J::Arr(xs) => {
            out.push('[');
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json_into(x, out);
            }
            out.push(']');
        }
        J::Obj(kv) => {
            out.push('{');
            for (i, (k, v)) in kv.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json_str(k, out);
                out.push(':');
                go_json_into(v, out);
            }
            out.push('}');
        }
    }
}

fn go_json(j: &J) -> Vec<u8> {
    let mut s = String::new();
    go_json_into(j, &mut s);
    s.into_bytes()
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = (if z >= 0 { z } else { z - 146_096 }) / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Go's `time.RFC3339Nano` in UTC.
fn rfc3339(sec: u64, nsec: u32) -> String {
    let (y, mo, d) = civil_from_days((sec / 86_400) as i64);
    let r = sec % 86_400;
    let mut s = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        r / 3600,
        r / 60 % 60,
        r % 60
    );
    if nsec != 0 {
        let f = format!("{nsec:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

// ===========================================================================
// Layer model: a set of entries, serialized in filepath.Walk order
// ===========================================================================

#[derive(Clone, Debug)]
enum Body {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Hardlink(String),
    /// Deleted path; written as `.wh.<name>` at the deleted name's position.
    Whiteout,
}

#[derive(Clone, Debug)]
struct Node {
    path: String,
    body: Body,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
}

impl Tree {
    fn has(&self, p: &str) -> bool {
        self.index.contains_key(p)
    }

    fn get(&self, p: &str) -> Option<&Node> {
        self.index.get(p).map(|&i| &self.nodes[i])
    }

    fn put(&mut self, n: Node) {
        match self.index.get(&n.path) {
            Some(&i) => self.nodes[i] = n,
            None => {
                self.index.insert(n.path.clone(), self.nodes.len());
                self.nodes.push(n);
            }
        }
    }

    /// `p` and its ancestors as directories (0755) where missing.
    fn mkdirs(&mut self, p: &str, mtime: u64) {
        let mut from = 0;
        loop {
            let next = p[from..].find('/').map(|i| from + i);
            let a = next.map_or(p, |i| &p[..i]);
            if !a.is_empty() && !self.has(a) {
                self.put(Node::new(a, Body::Dir, 0o755, mtime));
            }
            match next {
                Some(i) => from = i + 1,
                None => break,
            }
        }
    }

    fn dir(&mut self, p: &str, mode: u32, mtime: u64) {
        self.mkdirs(p, mtime);
        self.put(Node::new(p, Body::Dir, mode, mtime));
    }

    fn parents(&mut self, p: &str, mtime: u64) {
        if let Some(i) = p.rfind('/') {
            self.mkdirs(&p[..i], mtime);
        }
    }

    fn file(&mut self, p: &str, mode: u32, mtime: u64, data: Vec<u8>) {
        self.parents(p, mtime);
        self.put(Node::new(p, Body::File(data), mode, mtime));
    }

    fn symlink(&mut self, p: &str, target: &str, mtime: u64) {
        self.parents(p, mtime);
        self.put(Node::new(
            p,
            Body::Symlink(target.to_string()),
            0o777,
            mtime,
        ));
    }

    fn data_len(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match &n.body {
                Body::File(d) => d.len() + BLOCK + BLOCK,
                _ => BLOCK,
            })
            .sum()
    }
}

impl Node {
    fn new(p: &str, body: Body, mode: u32, mtime: u64) -> Self {
        Node {
            path: p.to_string(),
            body,
            mode,
            uid: 0,
            gid: 0,
            mtime,
        }
    }
}

/// Sorting by path components gives `filepath.Walk` order: each directory
/// before its contents, siblings sorted by name bytes.
fn walk_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Serialize a layer like moby's archiver: Go tar headers, walk order, two zero blocks.
fn layer_tar(tree: &Tree) -> io::Result<Vec<u8>> {
    let mut order: Vec<&Node> = tree.nodes.iter().collect();
    order.sort_by(|a, b| walk_cmp(&a.path, &b.path));
    let mut tw = TarWriter::new(Vec::with_capacity(tree.data_len() + 2 * BLOCK));
    for n in order {
        let base = Hdr::new(&n.path, b'0', n.mode, n.mtime).owner(n.uid, n.gid);
        match &n.body {
            Body::Dir => {
                let name = dir_name(&n.path);
                let h = Hdr {
                    name: &name,
                    typeflag: b'5',
                    ..base
                };
                tw.entry(&h, &[], false, &[])?;
            }
            Body::File(d) => tw.entry(&base.size(d.len()), &[], false, d)?,
            Body::Symlink(t) => {
                let h = Hdr {
                    typeflag: b'2',
                    ..base
                }
                .link(t);
                tw.entry(&h, &[], false, &[])?;
            }
            Body::Hardlink(t) => {
                let h = Hdr {
                    typeflag: b'1',
                    ..base
                }
                .link(t);
                tw.entry(&h, &[], false, &[])?;
            }
            Body::Whiteout => {
                let name = match n.path.rfind('/') {
                    Some(i) => format!("{}.wh.{}", &n.path[..=i], &n.path[i + 1..]),
                    None => format!(".wh.{}", n.path),
                };
                tw.entry(&Hdr::new(&name, b'0', 0o600, n.mtime), &[], false, &[])?;
            }
        }
    }
    tw.finish()?;
    Ok(tw.into_inner())
}

/// overlay2 copy-up: parents of the layer's paths appear with the lower
/// layer's metadata; a directory whose direct children changed gets `t`.
fn copy_up_parents(layer: &mut Tree, lower: &Tree, t: u64) {
    let mut changed: HashSet<String> = HashSet::new();
    for n in &layer.nodes {
        if let Some(i) = n.path.rfind('/') {
            if !lower.has(&n.path) || matches!(n.body, Body::Whiteout) {
                changed.insert(n.path[..i].to_string());
            }
        }
    }
    let paths: Vec<String> = layer.nodes.iter().map(|n| n.path.clone()).collect();
    for p in &paths {
        for (i, _) in p.match_indices('/') {
            let a = &p[..i];
            if layer.get(a).is_some_and(|n| matches!(n.body, Body::Dir)) {
                continue;
            }
            match lower.get(a) {
                Some(l) if matches!(l.body, Body::Dir) => {
                    let mut n = l.clone();
                    if changed.contains(a) {
                        n.mtime = t;
                    }
                    layer.put(n);
                }
                _ => layer.put(Node::new(a, Body::Dir, 0o755, t)),
            }
        }
    }
}

// ===========================================================================
// Content generators
// ===========================================================================

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "by", "this", "be",
    "are", "or", "from", "file", "default", "system", "package", "data", "value", "user", "set",
    "use", "not", "if", "it", "can", "configuration", "option", "may", "will", "an", "which",
    "all", "debian", "license", "software", "program", "version", "any", "under", "copy", "source",
    "free", "without", "distribute", "modify", "terms", "general", "public", "warranty", "see",
    "more", "details", "path", "directory", "enable", "disable", "server", "client", "network",
    "address", "buffer", "memory", "cache", "error", "warning", "output", "input", "format",
    "string", "number", "list", "table", "index", "key", "name", "type", "mode", "time", "size",
    "length", "limit", "max", "min", "none", "local", "remote", "host", "port", "service",
    "daemon", "process", "thread", "signal", "handler", "module", "library", "python", "perl",
    "shell", "command", "argument", "return", "function", "class", "object", "method", "instance",
    "attribute", "parameter", "variable", "constant", "global", "static", "dynamic", "shared",
    "linker", "loader", "symbol", "section", "header", "entry", "record", "field", "column", "row",
    "query", "result", "status", "state", "current", "previous", "next", "first", "last", "new",
    "old", "start", "stop", "begin", "end", "open", "close", "read", "write", "create", "delete",
    "update", "insert", "remove", "check", "verify", "test", "build", "install", "upgrade",
    "depend", "require", "provide", "conflict", "replace", "suggest", "recommend", "priority",
    "optional", "important", "standard", "essential", "security", "release", "stable", "testing",
    "unstable", "main", "contrib", "archive", "mirror", "repository", "keyring", "signature",
    "certificate", "authority", "trust", "encoding", "locale", "language", "character", "unicode",
    "utf", "ascii", "byte", "bit", "word", "line", "page", "block", "device", "disk", "partition",
    "mount", "kernel", "boot", "init", "login", "password", "group", "owner", "permission",
    "access", "executable", "binary", "text", "manual", "documentation", "example", "usage",
    "note", "copyright", "author", "maintainer", "contributor", "project", "foundation",
    "institute", "university", "company", "gnu", "gpl", "lgpl", "bsd", "mit", "apache", "notice",
    "included", "provided", "implied", "merchantability", "fitness", "particular", "purpose",
    "liability", "damages", "event", "shall", "holders", "tensor", "array", "matrix", "vector",
    "frame", "series", "dtype", "shape", "axis", "batch", "token", "encoder", "decoder", "layer",
    "weight", "gradient", "sample", "window", "offset", "stride", "chunk", "stream", "codec",
    "parse", "render", "session", "request", "response", "timeout", "retry", "pool", "proxy",
    "cookie",
];

/// Word index with a Zipf-like skew (small indices are common).
fn word(rng: &mut StdRng) -> &'static str {
    let u: f64 = rng.gen();
    WORDS[((u * u * WORDS.len() as f64) as usize).min(WORDS.len() - 1)]
}

fn ident(rng: &mut StdRng) -> String {
    format!("{}_{}", word(rng), word(rng))
}

fn cap(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn sentence(rng: &mut StdRng, out: &mut String, n: std::ops::Range<usize>) {
    let k = rng.gen_range(n);
    for i in 0..k {
        let w = word(rng);
        if i == 0 {
            out.push_str(&cap(w));
        } else {
            out.push(' ');
            out.push_str(w);
        }
    }
    out.push('.');
}

/// Exponential-ish size around `mean`, capped at 12x.
fn sample_size(rng: &mut StdRng, mean: f64) -> usize {
    let u: f64 = rng.gen_range(1e-9..1.0);
    (-u.ln() * mean).min(mean * 12.0) as usize
}

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.gen_range(0..xs.len())]
}

/// Prose wrapped at 72 columns, exactly `size` bytes.
fn prose(rng: &mut StdRng, size: usize) -> String {
    let mut s = String::with_capacity(size + 128);
    let mut col = 0;
    while s.len() < size {
        let k = rng.gen_range(6..18);
        for i in 0..k {
            let w = word(rng);
            if col + w.len() + 1 > 72 {
                s.push('\n');
                col = 0;
            } else if col > 0 {
                s.push(' ');
                col += 1;
            }
            if i == 0 {
                s.push_str(&cap(w));
            } else {
                s.push_str(w);
            }
            col += w.len();
        }
        s.push('.');
        col += 1;
        if rng.gen_ratio(1, 6) {
            s.push_str("\n\n");
            col = 0;
        }
    }
    s.truncate(size);
    s.push('\n');
    s
}

/// Config-file-like text (comments, sections, key = value).
fn conf_text(rng: &mut StdRng, size: usize) -> String {
    let mut s = String::with_capacity(size + 128);
    while s.len() < size {
        match rng.gen_range(0..10) {
            0..=2 => {
                s.push_str("# ");
                sentence(rng, &mut s, 5..12);
                s.push('\n');
            }
            3 => s.push('\n'),
            4 => {
                let _ = writeln!(s, "\n[{}]", word(rng));
            }
            _ => {
                let k = ident(rng);
                let _ = match rng.gen_range(0..5) {
                    0 => writeln!(s, "{k} = {}", rng.gen_range(0..4096)),
                    1 => writeln!(s, "{k} = /usr/lib/{}/{}", word(rng), word(rng)),
                    2 => writeln!(s, "{k} = {}", if rng.gen_bool(0.5) { "yes" } else { "no" }),
                    _ => writeln!(s, "{k} = {}", word(rng)),
                };
            }
        }
    }
    s
}

const PY_IMPORTS: &[&str] = &[
    "import os",
    "import sys",
    "import re",
    "import json",
    "import logging",
    "import functools",
    "import itertools",
    "import warnings",
    "import math",
    "from collections import defaultdict",
    "from dataclasses import dataclass, field",
    "from typing import Any, Dict, Iterable, List, Optional, Tuple",
];

fn py_func(rng: &mut StdRng, s: &mut String, ind: &str, method: bool) {
    let name = ident(rng);
    let a = word(rng);
    let b = format!("{}_{}", word(rng), rng.gen_range(0..10));
    let lim = rng.gen_range(1..256);
    let me = if method { "self, " } else { "" };
    let _ = writeln!(s, "\n{ind}def {name}({me}{a}, {b}=None, *, limit={lim}):");
    let _ = write!(s, "{ind}    \"\"\"");
    sentence(rng, s, 4..12);
    if rng.gen_bool(0.5) {
        let _ = write!(s, "\n\n{ind}    ");
        sentence(rng, s, 8..16);
        let _ = write!(s, "\n{ind}    ");
    }
    s.push_str("\"\"\"\n");
    let v = word(rng);
    for _ in 0..rng.gen_range(2..7) {
        match rng.gen_range(0..8) {
            0 => {
                let _ = write!(
                    s,
                    "{ind}    if {b} is None:\n{ind}        {b} = {a}.get(\"{}\", {})\n",
                    word(rng),
                    rng.gen_range(0..100)
                );
            }
            1 => {
                let it = word(rng);
                let _ = write!(
                    s,
                    "{ind}    for {it} in {a}:\n{ind}        if {it} > limit:\n{ind}            break\n{ind}        {b} += {it}\n"
                );
            }
            2 => {
                let _ = writeln!(s, "{ind}    {v} = {}({a}, {b})", ident(rng));
            }
            3 => {
                let _ = write!(s, "{ind}    log.debug(\"");
                sentence(rng, s, 3..8);
                let _ = writeln!(s, " %s\", {a})");
            }
            4 => {
                let _ = write!(
                    s,
                    "{ind}    try:\n{ind}        {v} = {a}[{}]\n{ind}    except (KeyError, IndexError):\n{ind}        raise ValueError(\"",
                    rng.gen_range(0..16)
                );
                sentence(rng, s, 3..8);
                s.push_str("\") from None\n");
            }
            5 => {
                let _ = write!(s, "{ind}    # ");
                sentence(rng, s, 5..12);
                s.push('\n');
            }
            6 => {
                let it = word(rng);
                let _ = writeln!(
                    s,
                    "{ind}    {v} = [{it} * {:.4} for {it} in {a} if {it}]",
                    rng.gen::<f64>()
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "{ind}    {v} = {a}.{}({b}, {}={})",
                    ident(rng),
                    word(rng),
                    rng.gen_range(0..1000)
                );
            }
        }
    }
    let _ = writeln!(s, "{ind}    return {v}");
}

/// Python source of roughly `size` bytes.
fn python_src(rng: &mut StdRng, size: usize, title: &str) -> String {
    let mut s = String::with_capacity(size + 1024);
    let _ = write!(s, "\"\"\"{title}: ");
    sentence(rng, &mut s, 6..14);
    s.push_str("\"\"\"\n\n");
    let skip = rng.gen_range(0..PY_IMPORTS.len() / 2);
    for imp in PY_IMPORTS
        .iter()
        .skip(skip)
        .step_by(1 + rng.gen_range(0..2))
    {
        s.push_str(imp);
        s.push('\n');
    }
    s.push_str("\nlog = logging.getLogger(__name__)\n");
    while s.len() < size {
        match rng.gen_range(0..10) {
            0..=5 => py_func(rng, &mut s, "", false),
            6..=7 => {
                let _ = write!(s, "\n\nclass {}(object):\n    \"\"\"", cap(&ident(rng)));
                sentence(rng, &mut s, 5..12);
                s.push_str("\"\"\"\n");
                for _ in 0..rng.gen_range(1..4) {
                    py_func(rng, &mut s, "    ", true);
                }
            }
            _ => {
                s.push('\n');
                for _ in 0..rng.gen_range(1..5) {
                    let _ = writeln!(
                        s,
                        "{} = {}",
                        ident(rng).to_uppercase(),
                        rng.gen_range(0..65536)
                    );
                }
            }
        }
    }
    s
}

fn perl_src(rng: &mut StdRng, size: usize) -> String {
    let mut s = String::with_capacity(size + 512);
    let _ = write!(
        s,
        "package {}::{};\n\nuse strict;\nuse warnings;\n\nour $VERSION = '{}.{:02}';\n",
        cap(word(rng)),
        cap(word(rng)),
        rng.gen_range(0..3),
        rng.gen_range(0..100)
    );
    while s.len() < size {
        let (f, v, a) = (ident(rng), word(rng), word(rng));
        let _ = write!(
            s,
            "\nsub {f} {{\n    my ($self, @{a}) = @_;\n    my ${v} = $self->{{{v}}} // '{}';\n    # ",
            word(rng)
        );
        sentence(rng, &mut s, 5..12);
        let _ = write!(
            s,
            "\n    for my $x (@{a}) {{\n        ${v} .= sprintf(\"%s-%d\", $x, {});\n    }}\n    return ${v};\n}}\n",
            rng.gen_range(0..1000)
        );
    }
    s.push_str("\n1;\n__END__\n\n=head1 NAME\n\n");
    s
}

/// x86-64-ish instruction snippets, most common first.
struct Isa {
    snips: Vec<Vec<u8>>,
}

fn make_isa() -> Isa {
    const COMMON: &[&[u8]] = &[
        &[0x48, 0x89, 0xc7],
        &[0x48, 0x8b, 0x45, 0xf8],
        &[0x31, 0xc0],
        &[0xc3],
        &[0x55],
        &[0x48, 0x89, 0xe5],
        &[0x5d],
        &[0x48, 0x85, 0xc0],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x48, 0x83, 0xec, 0x08],
        &[0x48, 0x83, 0xc4, 0x08],
        &[0x41, 0x54],
        &[0x41, 0x5c],
        &[0x53],
        &[0x5b],
        &[0x89, 0xc6],
        &[0x48, 0x8d, 0x3d],
        &[0x0f, 0xb6, 0x07],
        &[0x66, 0x90],
        &[0x4c, 0x89, 0xe7],
    ];
    const OPS: &[u8] = &[
        0x89, 0x8b, 0x01, 0x29, 0x31, 0x39, 0x85, 0x8d, 0x83, 0xc7, 0x0f, 0xff, 0x63, 0xc1, 0x3b,
        0x09, 0x21, 0x80, 0xf7, 0x88, 0x8a,
    ];
    const PFX: &[u8] = &[0x48, 0x48, 0x48, 0x4c, 0x49, 0x41, 0x66, 0x44];
    let mut r = rng_for(0x15a, "isa");
    let mut snips: Vec<Vec<u8>> = COMMON.iter().map(|s| s.to_vec()).collect();
    while snips.len() < 384 {
        let mut s = Vec::with_capacity(6);
        if r.gen_bool(0.6) {
            s.push(*pick(&mut r, PFX));
        }
        let op = *pick(&mut r, OPS);
        s.push(op);
        if op == 0x0f {
            s.push(*pick(
                &mut r,
                &[0xb6, 0xb7, 0x1f, 0x84, 0x85, 0x94, 0x95, 0xaf],
            ));
        }
        let modrm: u8 = r.gen();
        s.push(modrm);
        if modrm >> 6 == 1 {
            s.push(*pick(
                &mut r,
                &[0xf8, 0xf0, 0xe8, 0x08, 0x10, 0x18, 0x20, 0x28],
            ));
        }
        if matches!(op, 0x83 | 0x80 | 0xc1) {
            s.push(r.gen_range(0..64));
        }
        snips.push(s);
    }
    Isa { snips }
}

fn gen_code(rng: &mut StdRng, isa: &Isa, out: &mut Vec<u8>, len: usize) {
    let start = out.len();
    let end = start + len;
    let n = isa.snips.len() as u64;
    while out.len() < end {
        let r = rng.next_u32();
        if r & 0x3 == 0 && out.len() > start + 4096 {
            // a repeated idiom: copy a recent fragment
            let back = (r >> 3) as usize % 4000 + 64;
            let from = out.len() - back;
            let k = 8 + (r >> 20) as usize % 32;
            out.extend_from_within(from..from + k);
            continue;
        }
        let u = u64::from(r & 0xffff);
        let idx = ((((((u * u) >> 16) * u) >> 16) * n) >> 16) as usize;
        out.extend_from_slice(&isa.snips[idx]);
        let sel = (r >> 16) & 0xff;
        if sel < 14 {
            // call to one of a few hundred functions: targets repeat
            let d = rng.next_u32() & 0x1ff;
            out.extend_from_slice(&[0xe8, (d as u8) << 4, 0x10 + (d >> 8) as u8, 0, 0]);
        } else if sel < 26 {
            let d = rng.next_u32();
            out.extend_from_slice(&[d as u8 & 0xf8, (d >> 8) as u8 & 0x0f, 0, 0]);
        } else if sel < 60 {
            out.push(0x74 | ((r >> 24) & 1) as u8);
            out.push((r >> 25) as u8);
        }
    }
    out.truncate(end);
}

/// An ELF-shaped binary: header, program headers, symbol tables, code,
/// strings, pointer tables, section headers. Compresses roughly like real ones.
fn elf(rng: &mut StdRng, isa: &Isa, size: usize) -> Vec<u8> {
    fn p16(b: &mut Vec<u8>, x: u16) {
        b.extend_from_slice(&x.to_le_bytes());
    }
    fn p32(b: &mut Vec<u8>, x: u32) {
        b.extend_from_slice(&x.to_le_bytes());
    }
    fn p64(b: &mut Vec<u8>, x: u64) {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let mut b = Vec::with_capacity(size + 256);
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let nsh = 28u16;
    p16(&mut b, 3);
    p16(&mut b, 0x3e);
    p32(&mut b, 1);
    p64(&mut b, 0x1000 + u64::from(rng.gen_range(0u32..0x4000)) * 16);
    p64(&mut b, 64);
    p64(&mut b, size.saturating_sub(usize::from(nsh) * 64) as u64);
    p32(&mut b, 0);
    for x in [64u16, 56, 11, 64, nsh, nsh - 1] {
        p16(&mut b, x);
    }
    let sz = size as u64;
    for (i, ty) in [
        6u32,
        3,
        1,
        1,
        1,
        1,
        2,
        4,
        0x6474_e550,
        0x6474_e551,
        0x6474_e552,
    ]
    .iter()
    .enumerate()
    {
        let off = (sz * i as u64 / 11) & !0xfff;
        p32(&mut b, *ty);
        p32(&mut b, if i == 3 { 5 } else { 4 });
        p64(&mut b, off);
        p64(&mut b, off);
        p64(&mut b, off);
        p64(&mut b, sz / 11);
        p64(&mut b, sz / 11 + if i == 5 { 0x40 } else { 0 });
        p64(&mut b, if (2..=5).contains(&i) { 0x1000 } else { 8 });
    }
    let rest = size.saturating_sub(b.len()) as f64;
    // .dynsym
    let nsym = (rest * 0.06 / 24.0) as usize;
    let mut name_off = 1u32;
    let mut addr = 0x4000u64 + u64::from(rng.gen_range(0u32..256)) * 16;
    for _ in 0..nsym {
        p32(&mut b, name_off);
        name_off += rng.gen_range(6..28);
        b.push(if rng.gen_bool(0.8) { 0x12 } else { 0x11 });
        b.push(0);
        p16(&mut b, if rng.gen_bool(0.3) { 0 } else { 14 });
        addr += u64::from(rng.gen_range(1u32..64)) * 16;
        p64(&mut b, addr);
        p64(&mut b, u64::from(rng.gen_range(0u32..600)));
    }
    // .dynstr
    let end = b.len() + (rest * 0.06) as usize;
    b.push(0);
    while b.len() < end {
        let s = match rng.gen_range(0..6) {
            0 => format!("GLIBC_2.{}", rng.gen_range(2..38)),
            1 => format!("_ZN{}{}E", rng.gen_range(3..20), ident(rng)),
            _ => ident(rng),
        };
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    // .rela.dyn
    let end = b.len() + (rest * 0.08) as usize;
    let mut r_off = 0x20_0000u64 + u64::from(rng.gen_range(0u32..256)) * 8;
    while b.len() < end {
        r_off += if rng.gen_ratio(1, 8) {
            u64::from(rng.gen_range(2u32..64)) * 8
        } else {
            8
        };
        p64(&mut b, r_off);
        if rng.gen_ratio(1, 5) {
            p64(&mut b, (u64::from(rng.gen_range(1u32..512)) << 32) | 6);
            p64(&mut b, 0);
        } else {
            p64(&mut b, 8);
            p64(&mut b, 0x4000 + u64::from(rng.gen_range(0u32..0x2000)) * 16);
        }
    }
    // .text
    let pad = (16 - b.len() % 16) % 16;
    b.resize(b.len() + pad, 0);
    gen_code(rng, isa, &mut b, (rest * 0.44) as usize);
    // .eh_frame
    let end = b.len() + (rest * 0.08) as usize;
    let mut cie = 0x18u32;
    while b.len() < end {
        let len = *pick(rng, &[0x14u32, 0x1c, 0x24, 0x2c, 0x44]);
        p32(&mut b, len);
        cie += len + 4;
        p32(&mut b, cie);
        p32(&mut b, 0u32.wrapping_sub(rng.gen_range(0x100..0x8_0000)));
        p32(&mut b, rng.gen_range(1..0x40) * 16);
        b.push(0);
        for _ in 0..(len - 13) {
            b.push(*pick(
                rng,
                &[
                    0x41, 0x0e, 0x10, 0x86, 0x02, 0x43, 0x0d, 0x06, 0x0c, 0x07, 0x08, 0x00, 0x00,
                ],
            ));
        }
    }
    // .rodata
    let end = b.len() + (rest * 0.14) as usize;
    while b.len() < end {
        let mut s = String::new();
        match rng.gen_range(0..5) {
            0 => {
                let _ = writeln!(s, "%s: {} %s (%d)", word(rng));
            }
            1 => {
                for _ in 0..rng.gen_range(2..8) {
                    p32(&mut b, rng.gen_range(0..512));
                }
            }
            _ => sentence(rng, &mut s, 2..7),
        }
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    // .data / .got
    let end = b.len() + (rest * 0.12) as usize;
    let mut ptr = 0x20_0000u64 + u64::from(rng.gen_range(0u32..4096)) * 8;
    while b.len() < end {
        if rng.gen_bool(0.15) {
            p64(&mut b, 0);
        } else {
            ptr += u64::from(rng.gen_range(1u32..40)) * 8;
            p64(&mut b, ptr);
        }
    }
    // section headers
    b.resize(
        size.saturating_sub(usize::from(nsh) * 64)
            .max(b.len().min(size)),
        0,
    );
    let mut off = 0x318u64;
    for i in 0..nsh {
        p32(&mut b, u32::from(i) * 9 + 1);
        p32(
            &mut b,
            *pick(rng, &[1, 3, 8, 11, 6, 7, 14, 15, 0x6fff_fff6]),
        );
        p64(&mut b, *pick(rng, &[0, 2, 3, 6, 0x30]));
        p64(&mut b, off);
        p64(&mut b, off);
        let len = u64::from(rng.gen_range(0x18u32..0x2000));
        p64(&mut b, len);
        p32(&mut b, rng.gen_range(0..8));
        p32(&mut b, rng.gen_range(0..4));
        p64(&mut b, *pick(rng, &[1, 8, 16, 32, 4096]));
        p64(&mut b, *pick(rng, &[0, 0, 0, 8, 24]));
        off += len;
    }
    b.resize(size, 0);
    b
}

/// A gzip-compressed-looking file (incompressible body).
fn gz_like(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size.max(10)];
    rng.fill_bytes(&mut b);
    b[..10].copy_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
    b
}

fn pem(rng: &mut StdRng, size: usize) -> String {
    let mut s = String::with_capacity(size + 2048);
    while s.len() < size {
        let mut der = vec![0u8; rng.gen_range(800..1500)];
        rng.fill_bytes(&mut der);
        der[..4].copy_from_slice(&[0x30, 0x82, 0x05, 0x1f]);
        s.push_str("-----BEGIN CERTIFICATE-----\n");
        let enc = b64(&der, B64_STD, true);
        for line in enc.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(line).unwrap_or(""));
            s.push('\n');
        }
        s.push_str("-----END CERTIFICATE-----\n");
    }
    s
}

/// GNU gettext `.mo`-shaped catalog.
fn mo_file(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let n = (size / 90).max(1) as u32;
    let mut b = Vec::with_capacity(size + 256);
    for x in [0x9504_12de_u32, 0, n, 28, 28 + 8 * n, 0, 28 + 16 * n] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let mut off = 28 + 16 * n;
    for _ in 0..2 * n {
        let len = rng.gen_range(8u32..60);
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        off += len + 1;
    }
    while b.len() < size {
        let mut s = String::new();
        sentence(rng, &mut s, 2..9);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b.truncate(size.max(28));
    b
}

/// A CPython 3.11 `.pyc`: 16-byte header (magic, flags, source mtime, source
/// size) then marshal-like bytes derived line by line from the source, so a
/// local source edit gives a local `.pyc` change.
fn pyc(src: &[u8], mtime: u64) -> Vec<u8> {
    const OPS: &[u8] = &[
        0x97, 0x64, 0x64, 0x65, 0x7c, 0x7c, 0x7d, 0xab, 0x53, 0x01, 0x6a, 0x74, 0x02, 0x5a, 0x6c,
        0x6d, 0x84, 0x72, 0x73, 0x78,
    ];
    let mut out = Vec::with_capacity(src.len() * 3 / 4 + 64);
    out.extend_from_slice(&[0xa7, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0]);
    out.extend_from_slice(&(mtime as u32).to_le_bytes());
    out.extend_from_slice(&(src.len() as u32).to_le_bytes());
    out.extend_from_slice(&[
        0xe3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0, 0, 0xf3,
    ]);
    for line in src.split(|&c| c == b'\n') {
        let mut h = fnv1a(line) | 1;
        let text = line.trim_ascii();
        if text.starts_with(b"#") {
            continue; // comments are not compiled
        }
        for _ in 0..line.len() / 8 {
            h = xorshift(h);
            let k = (h % 64) as usize;
            out.push(OPS[(k * k / 64) % OPS.len()]);
            out.push((h >> 20) as u8 & 0x07);
        }
        if text.starts_with(b"\"\"\"") || text.starts_with(b"log.") || text.starts_with(b"raise") {
            // docstrings and message strings are constants
            out.push(0xf5);
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(text);
        }
        for tok in text.split(|c| !c.is_ascii_alphanumeric() && *c != b'_') {
            h = xorshift(h);
            if tok.len() >= 3 && tok.len() < 64 && h.is_multiple_of(2) {
                out.push(0xda);
                out.push(tok.len() as u8);
                out.extend_from_slice(tok);
            }
        }
    }
    out.extend_from_slice(&[0x4e, 0x29, 0x00, 0x72, 0x01, 0x00, 0x00, 0x00]);
    out
}

// ===========================================================================
// Times
// ===========================================================================

struct Times {
    epoch0: u64,
    t_base: u64,
    t_pip: u64,
    created: u64,
    created_ns: u32,
    save: u64,
    /// mtime of the app files edited in V2.
    app_edit: u64,
}

fn day_time(seed: u64, epoch0: u64, day: u64, salt: &str) -> (u64, u32) {
    let mut r = rng_for(seed, &format!("time:{salt}:{day}"));
    let t = epoch0 + day * 86_400 + 9 * 3600 + r.gen_range(0..8 * 3600);
    (t, r.gen_range(0..1_000_000_000))
}

fn times(seed: u64, version: Version, npkgs: usize) -> Times {
    let epoch0 = 1_718_000_000 + rng_for(seed, "epoch").gen_range(0..60u64) * 86_400;
    let t_base = day_time(seed, epoch0, 0, "base").0;
    let (day, t_pip) = match version {
        Version::V1 => (0, t_base + 100),
        Version::V2 => (3, day_time(seed, epoch0, 3, "pip").0),
    };
    let created = t_pip + 40 + 7 * npkgs as u64 + 6;
    let (_, created_ns) = day_time(seed, epoch0, day, "ns");
    let save = created + 600 + rng_for(seed, &format!("save:{day}")).gen_range(0..7200);
    let app_edit = day_time(seed, epoch0, 3, "pip").0 - 1800;
    Times {
        epoch0,
        t_base,
        t_pip,
        created,
        created_ns,
        save,
        app_edit,
    }
}

// ===========================================================================
// Layer 1: Debian-like base
// ===========================================================================

const DEB_PKGS: &[(&str, &str)] = &[
    ("adduser", "3.134"),
    ("apt", "2.6.1"),
    ("base-files", "12.4+deb12u6"),
    ("base-passwd", "3.6.1"),
    ("bash", "5.2.15-2+b7"),
    ("bsdutils", "1:2.38.1-5+deb12u1"),
    ("ca-certificates", "20230311"),
    ("coreutils", "9.1-1"),
    ("dash", "0.5.12-2"),
    ("debconf", "1.5.82"),
    ("debian-archive-keyring", "2023.3+deb12u1"),
    ("debianutils", "5.7-0.5~deb12u1"),
    ("diffutils", "1:3.8-4"),
    ("dpkg", "1.21.22"),
    ("findutils", "4.9.0-4"),
    ("gcc-12-base", "12.2.0-14"),
    ("gpgv", "2.2.40-1.1"),
    ("grep", "3.8-5"),
    ("gzip", "1.12-1"),
    ("hostname", "3.23+nmu1"),
    ("init-system-helpers", "1.65.2"),
    ("libacl1", "2.3.1-3"),
    ("libapt-pkg6.0", "2.6.1"),
    ("libattr1", "1:2.5.1-4"),
    ("libaudit1", "1:3.0.9-1"),
    ("libblkid1", "2.38.1-5+deb12u1"),
    ("libbz2-1.0", "1.0.8-5+b1"),
    ("libc-bin", "2.36-9+deb12u7"),
    ("libc6", "2.36-9+deb12u7"),
    ("libcap-ng0", "0.8.3-1+b3"),
    ("libcap2", "1:2.66-4"),
    ("libcrypt1", "1:4.4.33-2"),
    ("libdb5.3", "5.3.28+dfsg2-1"),
    ("libexpat1", "2.5.0-1"),
    ("libffi8", "3.4.4-1"),
    ("libgcc-s1", "12.2.0-14"),
    ("libgcrypt20", "1.10.1-3"),
    ("libgmp10", "2:6.2.1+dfsg1-1.1"),
    ("libgnutls30", "3.7.9-2+deb12u3"),
    ("liblz4-1", "1.9.4-1"),
    ("liblzma5", "5.4.1-0.2"),
    ("libmd0", "1.0.4-2"),
    ("libmount1", "2.38.1-5+deb12u1"),
    ("libncursesw6", "6.4-4"),
    ("libpam-modules", "1.5.2-6+deb12u1"),
    ("libpam0g", "1.5.2-6+deb12u1"),
    ("libpcre2-8-0", "10.42-1"),
    ("libpython3.11-minimal", "3.11.2-6"),
    ("libpython3.11-stdlib", "3.11.2-6"),
    ("libreadline8", "8.2-1.3"),
    ("libselinux1", "3.4-1+b6"),
    ("libsqlite3-0", "3.40.1-2"),
    ("libssl3", "3.0.13-1~deb12u1"),
    ("libstdc++6", "12.2.0-14"),
    ("libsystemd0", "252.26-1~deb12u2"),
    ("libtinfo6", "6.4-4"),
    ("libuuid1", "2.38.1-5+deb12u1"),
    ("libzstd1", "1.5.4+dfsg2-5"),
    ("login", "1:4.13+dfsg1-1+b1"),
    ("mawk", "1.3.4.20200120-3.1"),
    ("media-types", "10.0.0"),
    ("mount", "2.38.1-5+deb12u1"),
    ("ncurses-base", "6.4-4"),
    ("openssl", "3.0.13-1~deb12u1"),
    ("passwd", "1:4.13+dfsg1-1+b1"),
    ("perl-base", "5.36.0-7+deb12u1"),
    ("python3", "3.11.2-1+b1"),
    ("python3-pip", "23.0.1+dfsg-1"),
    ("python3-pkg-resources", "66.1.1-1"),
    ("python3-setuptools", "66.1.1-1"),
    ("python3.11", "3.11.2-6"),
    ("python3.11-minimal", "3.11.2-6"),
    ("readline-common", "8.2-1.3"),
    ("sed", "4.9-1"),
    ("sysvinit-utils", "3.06-4"),
    ("tar", "1.34+dfsg-1.2+deb12u1"),
    ("util-linux", "2.38.1-5+deb12u1"),
    ("zlib1g", "1:1.2.13.dfsg-1"),
];

#[rustfmt::skip]
const BIN_NAMES: &[&str] = &[
    "ls", "cat", "cp", "mv", "rm", "mkdir", "chmod", "chown", "date", "dd", "df", "du", "echo",
    "env", "false", "true", "grep", "sed", "tar", "gzip", "head", "tail", "sort", "uniq", "wc",
    "tr", "cut", "find", "xargs", "touch", "stat", "sleep", "id", "whoami", "uname", "mktemp",
    "readlink", "realpath", "basename", "dirname", "tee", "test", "expr", "seq", "yes", "nproc",
    "base64", "md5sum", "sha256sum", "apt", "apt-get", "apt-cache", "apt-config", "apt-mark",
    "dpkg", "dpkg-query", "dpkg-deb", "dpkg-split", "bash", "dash", "mawk", "diff", "cmp", "gpgv",
    "login", "openssl", "hostname", "more", "tic", "infocmp", "lsblk", "getopt", "logger",
    "script", "setsid", "flock", "nice", "timeout", "od", "split", "csplit",
];

#[rustfmt::skip]
const SBIN_NAMES: &[&str] = &[
    "ldconfig", "start-stop-daemon", "useradd", "userdel", "usermod", "groupadd", "chpasswd",
    "agetty", "blkid", "losetup", "pivot_root", "switch_root", "sulogin", "zic", "iconvconfig",
    "nologin", "installkernel", "pam_timestamp_check", "killall5", "fsck", "runuser", "newusers",
];

#[rustfmt::skip]
const LIB_NAMES: &[&str] = &[
    "acl", "apt-pkg", "attr", "audit", "blkid", "bz2", "cap-ng", "cap", "crypt", "db-5.3", "expat",
    "ffi", "gcc_s", "gcrypt", "gmp", "gnutls", "lz4", "lzma", "md", "mount", "ncursesw", "pam",
    "pcre2-8", "readline", "selinux", "sqlite3", "ssl", "crypto", "stdc++", "systemd", "tinfo",
    "uuid", "zstd", "z", "hogweed", "nettle", "p11-kit", "tasn1", "unistring", "idn2",
];

const PY_DIRS: &[&str] = &[
    "usr/lib/python3.11",
    "usr/lib/python3.11/asyncio",
    "usr/lib/python3.11/email",
    "usr/lib/python3.11/email/mime",
    "usr/lib/python3.11/encodings",
    "usr/lib/python3.11/http",
    "usr/lib/python3.11/importlib",
    "usr/lib/python3.11/json",
    "usr/lib/python3.11/logging",
    "usr/lib/python3.11/multiprocessing",
    "usr/lib/python3.11/unittest",
    "usr/lib/python3.11/urllib",
    "usr/lib/python3.11/xml/dom",
    "usr/lib/python3.11/xml/etree",
    "usr/lib/python3.11/concurrent/futures",
    "usr/lib/python3/dist-packages/pip/_internal",
    "usr/lib/python3/dist-packages/pip/_internal/commands",
    "usr/lib/python3/dist-packages/pip/_vendor/rich",
    "usr/lib/python3/dist-packages/setuptools",
    "usr/lib/python3/dist-packages/pkg_resources",
];

const PERL_DIRS: &[&str] = &[
    "usr/share/perl/5.36.0",
    "usr/share/perl/5.36.0/File",
    "usr/share/perl/5.36.0/Text",
    "usr/share/perl/5.36.0/Getopt",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/perl-base/File",
    "usr/share/perl5/Debconf",
    "usr/share/perl5/Debconf/Element",
];

#[rustfmt::skip]
const LANGS: &[&str] = &[
    "de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "pl", "nl", "sv", "cs",
];

const CERT_NAMES: &[&str] = &[
    "ACCVRAIZ1",
    "AC_RAIZ_FNMT-RCM",
    "Actalis_Authentication_Root_CA",
    "Baltimore_CyberTrust_Root",
    "Certum_Trusted_Network_CA",
    "DigiCert_Global_Root_G2",
    "GlobalSign_Root_CA",
    "Hellenic_Academic_and_Research_Institutions_ECC_RootCA_2015",
    "ISRG_Root_X1",
    "NetLock_Arany_=Class_Gold=_Főtanúsítvány",
    "TUBITAK_Kamu_SM_SSL_Kok_Sertifikasi_-_Surum_1",
    "USERTrust_RSA_Certification_Authority",
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nbin:x:2:2:bin:/bin:/usr/sbin/nologin\nsys:x:3:3:sys:/dev:/usr/sbin/nologin\nsync:x:4:65534:sync:/bin:/bin/sync\ngames:x:5:60:games:/usr/games:/usr/sbin/nologin\nman:x:6:12:man:/var/cache/man:/usr/sbin/nologin\nlp:x:7:7:lp:/var/spool/lpd:/usr/sbin/nologin\nmail:x:8:8:mail:/var/mail:/usr/sbin/nologin\nnews:x:9:9:news:/var/spool/news:/usr/sbin/nologin\nuucp:x:10:10:uucp:/var/spool/uucp:/usr/sbin/nologin\nproxy:x:13:13:proxy:/bin:/usr/sbin/nologin\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nbackup:x:34:34:backup:/var/backups:/usr/sbin/nologin\nlist:x:38:38:Mailing List Manager:/var/list:/usr/sbin/nologin\nirc:x:39:39:ircd:/run/ircd:/usr/sbin/nologin\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

const GROUP: &str = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\nlp:x:7:\nmail:x:8:\nnews:x:9:\nuucp:x:10:\nman:x:12:\nproxy:x:13:\nkmem:x:15:\ndialout:x:20:\nfax:x:21:\nvoice:x:22:\ncdrom:x:24:\nfloppy:x:25:\ntape:x:26:\nsudo:x:27:\naudio:x:29:\ndip:x:30:\nwww-data:x:33:\nbackup:x:34:\noperator:x:37:\nlist:x:38:\nirc:x:39:\nsrc:x:40:\nshadow:x:42:\nutmp:x:43:\nvideo:x:44:\nsasl:x:45:\nplugdev:x:46:\nstaff:x:50:\ngames:x:60:\nusers:x:100:\nnogroup:x:65534:\n";

/// `mk()` until it is a path not in `tree`, then with a counter appended.
fn uniq(tree: &Tree, rng: &mut StdRng, mk: &dyn Fn(&mut StdRng) -> String) -> String {
    let mut p = mk(rng);
    let mut k = 2;
    while tree.has(&p) {
        p = match p.rfind('.') {
            Some(i) if p[i..].len() <= 4 && !p[i..].contains('/') => {
                format!("{}{k}{}", &p[..i], &p[i..])
            }
            _ => format!("{p}{k}"),
        };
        k += 1;
    }
    p
}

/// The base layer. Depends only on the seed and the scale, never on the version.
fn base_layer(seed: u64, scale: &Scale, isa: &Isa, tm: &Times) -> Tree {
    let mut rng = rng_for(seed, "base");
    let t = tm.t_base;
    let mean = scale.mean_file_size.max(64) as f64;
    let mut tree = Tree::default();

    let npk = (scale.base_files / 25).clamp(6, DEB_PKGS.len());
    let pkgs = &DEB_PKGS[..npk];
    let pkg_mt: Vec<u64> = (0..npk)
        .map(|_| tm.epoch0 - rng.gen_range(30..700u64) * 86_400 + rng.gen_range(0..86_400))
        .collect();
    let mut owned: Vec<Vec<String>> = vec![Vec::new(); npk];

    // Root skeleton (merged /usr).
    for (p, mode) in [
        ("boot", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("media", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("run/lock", 0o1777),
        ("srv", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr/bin", 0o755),
        ("usr/games", 0o755),
        ("usr/include", 0o755),
        ("usr/lib64", 0o755),
        ("usr/libexec", 0o755),
        ("usr/local/bin", 0o755),
        ("usr/local/etc", 0o755),
        ("usr/local/games", 0o755),
        ("usr/local/include", 0o755),
        ("usr/local/lib/python3.11/dist-packages", 0o2775),
        ("usr/local/sbin", 0o755),
        ("usr/local/share/man", 0o755),
        ("usr/local/src", 0o755),
        ("usr/sbin", 0o755),
        ("usr/share/doc", 0o755),
        ("usr/share/man/man1", 0o755),
        ("usr/share/man/man5", 0o755),
        ("usr/share/man/man8", 0o755),
        ("usr/src", 0o755),
        ("var/backups", 0o755),
        ("var/cache/apt/archives/partial", 0o700),
        ("var/lib/apt/lists/partial", 0o700),
        ("var/lib/dpkg/info", 0o755),
        ("var/lib/dpkg/triggers", 0o755),
        ("var/lib/dpkg/updates", 0o755),
        ("var/lib/misc", 0o755),
        ("var/log/apt", 0o755),
        ("var/opt", 0o755),
        ("var/spool", 0o755),
        ("var/tmp", 0o1777),
    ] {
        tree.dir(p, mode, t);
    }
    for (p, gid, mode) in [
        ("var/local", 50, 0o2775),
        ("var/mail", 8, 0o2775),
        ("usr/local/lib/python3.11/dist-packages", 50, 0o2775),
    ] {
        tree.dir(p, mode, t);
        if let Some(&i) = tree.index.get(p) {
            tree.nodes[i].gid = gid;
        }
    }
    for p in [
        "var/cache/apt/archives/partial",
        "var/lib/apt/lists/partial",
    ] {
        if let Some(&i) = tree.index.get(p) {
            tree.nodes[i].uid = 42;
        }
    }
    for (p, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
        ("var/lock", "/run/lock"),
        ("var/run", "/run"),
        (
            "usr/lib64/ld-linux-x86-64.so.2",
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        ("etc/os-release", "../usr/lib/os-release"),
        ("usr/bin/python3", "python3.11"),
        ("usr/bin/awk", "/etc/alternatives/awk"),
        ("etc/alternatives/awk", "/usr/bin/mawk"),
        ("usr/bin/pager", "/etc/alternatives/pager"),
        ("etc/alternatives/pager", "/usr/bin/more"),
        ("usr/bin/rbash", "bash"),
        ("usr/bin/sh", "dash"),
    ] {
        tree.symlink(p, target, t);
    }

    // /etc, generated at build time.
    let text = |tree: &mut Tree, p: &str, mode: u32, s: String| {
        tree.file(p, mode, t, s.into_bytes());
    };
    text(&mut tree, "etc/passwd", 0o644, PASSWD.to_string());
    text(&mut tree, "etc/passwd-", 0o644, PASSWD.to_string());
    text(&mut tree, "etc/group", 0o644, GROUP.to_string());
    text(&mut tree, "etc/group-", 0o644, GROUP.to_string());
    let shadow: String = PASSWD
        .lines()
        .map(|l| {
            let u = l.split(':').next().unwrap_or("");
            format!("{u}:*:19880:0:99999:7:::\n")
        })
        .collect();
    let gshadow: String = GROUP
        .lines()
        .map(|l| format!("{}:*::\n", l.split(':').next().unwrap_or("")))
        .collect();
    for (p, s) in [
        ("etc/shadow", &shadow),
        ("etc/shadow-", &shadow),
        ("etc/gshadow", &gshadow),
        ("etc/gshadow-", &gshadow),
    ] {
        tree.file(p, 0o640, t, s.clone().into_bytes());
        if let Some(&i) = tree.index.get(p) {
            tree.nodes[i].gid = 42;
        }
    }
    text(&mut tree, "etc/debian_version", 0o644, "12.6\n".into());
    text(
        &mut tree,
        "etc/issue",
        0o644,
        "Debian GNU/Linux 12 \\n \\l\n\n".into(),
    );
    text(
        &mut tree,
        "etc/issue.net",
        0o644,
        "Debian GNU/Linux 12\n".into(),
    );
    text(&mut tree, "usr/lib/os-release", 0o644, "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\nHOME_URL=\"https://www.debian.org/\"\nSUPPORT_URL=\"https://www.debian.org/support\"\nBUG_REPORT_URL=\"https://bugs.debian.org/\"\n".into());
    text(&mut tree, "etc/shells", 0o644, "# /etc/shells: valid login shells\n/bin/sh\n/usr/bin/sh\n/bin/bash\n/usr/bin/bash\n/bin/rbash\n/usr/bin/rbash\n/bin/dash\n/usr/bin/dash\n".into());
    text(
        &mut tree,
        "etc/fstab",
        0o644,
        "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n".into(),
    );
    text(
        &mut tree,
        "etc/ld.so.conf",
        0o644,
        "include /etc/ld.so.conf.d/*.conf\n\n".into(),
    );
    text(
        &mut tree,
        "etc/ld.so.conf.d/libc.conf",
        0o644,
        "# libc default configuration\n/usr/local/lib\n".into(),
    );
    text(&mut tree, "etc/ld.so.conf.d/x86_64-linux-gnu.conf", 0o644, "# Multiarch support\n/usr/local/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n".into());
    text(&mut tree, "etc/apt/sources.list.d/debian.sources", 0o644, "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n".into());
    text(&mut tree, "etc/apt/apt.conf.d/docker-clean", 0o644, "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };\nAPT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };\nDir::Cache::pkgcache \"\";\nDir::Cache::srcpkgcache \"\";\n".into());
    text(
        &mut tree,
        "etc/apt/apt.conf.d/docker-no-languages",
        0o644,
        "Acquire::Languages \"none\";\n".into(),
    );
    text(
        &mut tree,
        "etc/apt/apt.conf.d/docker-gzip-indexes",
        0o644,
        "Acquire::GzipIndexes \"true\";\n".into(),
    );
    text(&mut tree, "etc/python3.11/sitecustomize.py", 0o644, "# install the apport exception handler if available\ntry:\n    import apport_python_hook\nexcept ImportError:\n    pass\nelse:\n    apport_python_hook.install()\n".into());
    for f in [
        "etc/bash.bashrc",
        "etc/profile",
        "etc/login.defs",
        "etc/adduser.conf",
        "etc/deluser.conf",
        "etc/nsswitch.conf",
        "etc/host.conf",
        "etc/gai.conf",
        "etc/xattr.conf",
        "etc/mke2fs.conf",
        "etc/debconf.conf",
        "etc/default/useradd",
        "etc/default/nss",
        "etc/pam.d/common-account",
        "etc/pam.d/common-auth",
        "etc/pam.d/common-password",
        "etc/pam.d/common-session",
        "etc/pam.d/login",
        "etc/pam.d/other",
        "etc/pam.d/passwd",
        "etc/pam.d/su",
        "etc/pam.d/runuser",
        "etc/security/access.conf",
        "etc/security/limits.conf",
        "etc/security/namespace.conf",
        "etc/security/pam_env.conf",
        "etc/security/time.conf",
        "etc/security/faillock.conf",
        "etc/logrotate.d/apt",
        "etc/logrotate.d/dpkg",
        "etc/skel/.bashrc",
        "etc/skel/.profile",
        "etc/skel/.bash_logout",
        "root/.bashrc",
        "root/.profile",
        "etc/update-motd.d/10-uname",
        "etc/cron.daily/apt-compat",
        "etc/cron.daily/dpkg",
    ] {
        let size = sample_size(&mut rng, mean * 0.4).max(40);
        let mode = if f.contains("cron.daily") || f.contains("motd.d") {
            0o755
        } else {
            0o644
        };
        let body = if mode == 0o755 {
            format!("#!/bin/sh\n{}", conf_text(&mut rng, size))
        } else {
            conf_text(&mut rng, size)
        };
        tree.file(f, mode, t, body.into_bytes());
    }
    text(&mut tree, "etc/motd", 0o644, prose(&mut rng, 280));
    let mut ldcache = b"glibc-ld.so.cache1.1".to_vec();
    ldcache.extend(elf(&mut rng, isa, (mean * 2.0) as usize).iter().skip(64));
    tree.file("etc/ld.so.cache", 0o644, t, ldcache);
    tree.file("etc/mime.types", 0o644, pkg_mt[0], {
        let mut s = String::from("# MIME type mappings\n\n");
        while s.len() < (mean * 3.0) as usize {
            let _ = writeln!(
                s,
                "{}/{}\t\t\t\t{}",
                pick(
                    &mut rng,
                    &["application", "text", "image", "audio", "video"]
                ),
                word(&mut rng),
                word(&mut rng)
            );
        }
        s.into_bytes()
    });
    for (p, mode, gid) in [
        ("etc/.pwd.lock", 0o600, 0),
        ("etc/environment", 0o644, 0),
        ("etc/subuid", 0o644, 0),
        ("etc/subgid", 0o644, 0),
        ("var/lib/dpkg/lock", 0o640, 0),
        ("var/lib/dpkg/lock-frontend", 0o640, 0),
        ("var/lib/dpkg/triggers/Lock", 0o600, 0),
        ("var/lib/dpkg/available", 0o644, 0),
        ("var/lib/apt/lists/lock", 0o640, 0),
        ("var/cache/apt/archives/lock", 0o640, 0),
        ("var/log/lastlog", 0o664, 43),
        ("var/log/faillog", 0o644, 0),
        ("var/log/btmp", 0o660, 43),
        ("var/log/wtmp", 0o664, 43),
    ] {
        tree.file(p, mode, t, Vec::new());
        if let Some(&i) = tree.index.get(p) {
            tree.nodes[i].gid = gid;
        }
    }

    // Special binaries: a big interpreter, a hardlink pair, setuid/setgid.
    let owner_of = |name: &str| pkgs.iter().position(|(n, _)| *n == name).unwrap_or(0);
    let add_owned = |tree: &mut Tree,
                     owned: &mut Vec<Vec<String>>,
                     owner: usize,
                     p: &str,
                     mode: u32,
                     data: Vec<u8>| {
        tree.file(p, mode, pkg_mt[owner], data);
        owned[owner].push(p.to_string());
    };
    let py = owner_of("python3.11-minimal");
    let size = (mean * 14.0) as usize;
    let d = elf(&mut rng, isa, size);
    add_owned(&mut tree, &mut owned, py, "usr/bin/python3.11", 0o755, d);
    let perl = owner_of("perl-base");
    let d = elf(&mut rng, isa, (mean * 8.0) as usize);
    add_owned(&mut tree, &mut owned, perl, "usr/bin/perl", 0o755, d);
    tree.put(Node::new(
        "usr/bin/perl5.36.0",
        Body::Hardlink("usr/bin/perl".to_string()),
        0o755,
        pkg_mt[perl],
    ));
    owned[perl].push("usr/bin/perl5.36.0".to_string());
    let libc = owner_of("libc6");
    let d = elf(&mut rng, isa, (mean * 20.0) as usize);
    add_owned(
        &mut tree,
        &mut owned,
        libc,
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        0o755,
        d,
    );
    let d = elf(&mut rng, isa, (mean * 3.0) as usize);
    add_owned(
        &mut tree,
        &mut owned,
        libc,
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        0o755,
        d,
    );
    for (p, mode, gid) in [
        ("usr/bin/passwd", 0o4755, 0),
        ("usr/bin/su", 0o4755, 0),
        ("usr/bin/chfn", 0o4755, 0),
        ("usr/bin/chsh", 0o4755, 0),
        ("usr/bin/gpasswd", 0o4755, 0),
        ("usr/bin/newgrp", 0o4755, 0),
        ("usr/bin/mount", 0o4755, 0),
        ("usr/bin/umount", 0o4755, 0),
        ("usr/bin/chage", 0o2755, 42),
        ("usr/bin/expiry", 0o2755, 42),
        ("usr/sbin/unix_chkpwd", 0o2755, 42),
    ] {
        let o = rng.gen_range(0..npk);
        let size = sample_size(&mut rng, mean * 2.0).max(512);
        let d = elf(&mut rng, isa, size);
        add_owned(&mut tree, &mut owned, o, p, mode, d);
        if let Some(&i) = tree.index.get(p) {
            tree.nodes[i].gid = gid;
        }
    }

    // CA certificates: files, two symlinks each, and the bundle.
    let ncert = (scale.base_files / 40).clamp(3, 140);
    let ca = owner_of("ca-certificates");
    let mut bundle = String::new();
    let mut conf = String::from("# This file lists certificates that you wish to use or to ignore to be\n# installed in /etc/ssl/certs.\n");
    for i in 0..ncert {
        let name = match CERT_NAMES.get(i) {
            Some(n) => n.to_string(),
            None => format!(
                "{}_{}_Root_CA_{}",
                cap(word(&mut rng)),
                cap(word(&mut rng)),
                i
            ),
        };
        let size = rng.gen_range(1200..2200);
        let body = pem(&mut rng, size);
        bundle.push_str(&body);
        let crt = format!("usr/share/ca-certificates/mozilla/{name}.crt");
        let _ = writeln!(conf, "mozilla/{name}.crt");
        add_owned(&mut tree, &mut owned, ca, &crt, 0o644, body.into_bytes());
        tree.symlink(&format!("etc/ssl/certs/{name}.pem"), &format!("/{crt}"), t);
        let h = &sha256_hex(name.as_bytes())[..8];
        tree.symlink(&format!("etc/ssl/certs/{h}.0"), &format!("{name}.pem"), t);
    }
    tree.file(
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        t,
        bundle.into_bytes(),
    );
    tree.file("etc/ca-certificates.conf", 0o644, t, conf.into_bytes());

    // Per-package docs.
    for (i, (name, _)) in pkgs.iter().enumerate() {
        let d = format!("usr/share/doc/{name}");
        tree.dir(&d, 0o755, pkg_mt[i]);
        let mut cp = format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: {name}\n\nFiles: *\nCopyright: {} {} {}\nLicense: GPL-2+\n\n",
            rng.gen_range(1990..2023),
            cap(word(&mut rng)),
            cap(word(&mut rng))
        );
        // The license boilerplate is shared by every package, as in Debian.
        cp.push_str(&prose(&mut rng_for(seed, "gpl"), (mean * 0.8) as usize));
        let size = sample_size(&mut rng, mean * 0.3);
        cp.push_str(&prose(&mut rng, size));
        add_owned(
            &mut tree,
            &mut owned,
            i,
            &format!("{d}/copyright"),
            0o644,
            cp.into_bytes(),
        );
        let size = sample_size(&mut rng, mean * 0.4).max(64);
        let gz = gz_like(&mut rng, size);
        add_owned(
            &mut tree,
            &mut owned,
            i,
            &format!("{d}/changelog.Debian.gz"),
            0o644,
            gz,
        );
    }

    // The bulk, by category.
    let fixed = tree
        .nodes
        .iter()
        .filter(|n| matches!(n.body, Body::File(_)))
        .count()
        + 2 * npk
        + 3;
    let r = scale.base_files.saturating_sub(fixed).max(20);
    let (n_py, n_pyc, n_bin, n_lib, n_dyn, n_man, n_mo) = (
        r * 28 / 100,
        r * 20 / 100,
        r * 10 / 100,
        r * 10 / 100,
        r * 4 / 100,
        r * 10 / 100,
        r * 6 / 100,
    );
    let n_perl = r - n_py - n_pyc - n_bin - n_lib - n_dyn - n_man - n_mo;
    let mut bin_names: Vec<String> = Vec::new();
    let (mut nb, mut ns) = (0, 0);
    for i in 0..n_bin {
        let (dir, pool, k) = if i % 4 == 3 {
            ns += 1;
            ("usr/sbin", SBIN_NAMES, ns - 1)
        } else {
            nb += 1;
            ("usr/bin", BIN_NAMES, nb - 1)
        };
        let p = uniq(&tree, &mut rng, &|r: &mut StdRng| match pool.get(k) {
            Some(n) => format!("{dir}/{n}"),
            None => format!("{dir}/{}-{}", word(r), word(r)),
        });
        bin_names.push(p.rsplit('/').next().unwrap_or("x").to_string());
        let o = rng.gen_range(0..npk);
        let size = sample_size(&mut rng, mean * 2.5).max(256);
        let d = elf(&mut rng, isa, size);
        add_owned(&mut tree, &mut owned, o, &p, 0o755, d);
    }
    for i in 0..n_lib {
        let stem = match LIB_NAMES.get(i) {
            Some(n) => n.to_string(),
            None => format!("{}{}", word(&mut rng), word(&mut rng)),
        };
        let maj = rng.gen_range(0..12);
        let p = uniq(&tree, &mut rng, &|r: &mut StdRng| {
            format!(
                "usr/lib/x86_64-linux-gnu/lib{stem}.so.{maj}.{}.{}",
                r.gen_range(0..40),
                r.gen_range(0..9)
            )
        });
        let o = rng.gen_range(0..npk);
        let size = sample_size(&mut rng, mean * 4.0).max(512);
        let d = elf(&mut rng, isa, size);
        add_owned(&mut tree, &mut owned, o, &p, 0o644, d);
        let link = format!("usr/lib/x86_64-linux-gnu/lib{stem}.so.{maj}");
        if !tree.has(&link) {
            let target = p.rsplit('/').next().unwrap_or("").to_string();
            tree.symlink(&link, &target, pkg_mt[o]);
            owned[o].push(link);
        }
    }
    for _ in 0..n_dyn {
        let p = uniq(&tree, &mut rng, &|r: &mut StdRng| {
            format!(
                "usr/lib/python3.11/lib-dynload/_{}.cpython-311-x86_64-linux-gnu.so",
                word(r)
            )
        });
        let o = owner_of("libpython3.11-stdlib");
        let size = sample_size(&mut rng, mean * 1.5).max(256);
        let d = elf(&mut rng, isa, size);
        add_owned(&mut tree, &mut owned, o, &p, 0o644, d);
    }
    let pyo = owner_of("libpython3.11-stdlib");
    for i in 0..n_py {
        let dir = *pick(&mut rng, PY_DIRS);
        let p = uniq(&tree, &mut rng, &|r: &mut StdRng| {
            format!("{dir}/{}.py", ident(r))
        });
        let size = sample_size(&mut rng, mean * 1.3);
        let stem = p
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".py")
            .to_string();
        let src = python_src(&mut rng, size, &stem).into_bytes();
        if i < n_pyc {
            let c = format!("{dir}/__pycache__/{stem}.cpython-311.pyc");
            tree.file(&c, 0o644, t, pyc(&src, pkg_mt[pyo]));
        }
        add_owned(&mut tree, &mut owned, pyo, &p, 0o644, src);
    }
    for i in 0..n_man {
        let (sec, name) = match bin_names.get(i) {
            Some(b) => ("1", b.clone()),
            None => (
                *pick(&mut rng, &["1", "5", "8"]),
                word(&mut rng).to_string(),
            ),
        };
        let lang = if rng.gen_ratio(1, 5) {
            format!("{}/", pick(&mut rng, LANGS))
        } else {
            String::new()
        };
        let p = uniq(&tree, &mut rng, &|_: &mut StdRng| {
            format!("usr/share/man/{lang}man{sec}/{name}.{sec}.gz")
        });
        let o = rng.gen_range(0..npk);
        let size = sample_size(&mut rng, mean * 0.3).max(40);
        let d = gz_like(&mut rng, size);
        add_owned(&mut tree, &mut owned, o, &p, 0o644, d);
    }
    for _ in 0..n_mo {
        let o = rng.gen_range(0..npk);
        let lang = *pick(&mut rng, LANGS);
        let p = uniq(&tree, &mut rng, &|_: &mut StdRng| {
            format!("usr/share/locale/{lang}/LC_MESSAGES/{}.mo", pkgs[o].0)
        });
        let size = sample_size(&mut rng, mean * 0.6).max(64);
        let d = mo_file(&mut rng, size);
        add_owned(&mut tree, &mut owned, o, &p, 0o644, d);
    }
    for _ in 0..n_perl {
        let dir = *pick(&mut rng, PERL_DIRS);
        let p = uniq(&tree, &mut rng, &|r: &mut StdRng| {
            format!("{dir}/{}.pm", cap(word(r)))
        });
        let size = sample_size(&mut rng, mean);
        let src = perl_src(&mut rng, size).into_bytes();
        add_owned(&mut tree, &mut owned, perl, &p, 0o644, src);
    }

    // dpkg database, generated at build time.
    let mut status = String::new();
    let mut log = String::new();
    for (i, (name, ver)) in pkgs.iter().enumerate() {
        let mut files = owned[i].clone();
        files.sort();
        let mut dirs: Vec<String> = Vec::new();
        for f in &files {
            for (j, _) in f.match_indices('/') {
                dirs.push(f[..j].to_string());
            }
        }
        dirs.sort();
        dirs.dedup();
        let mut list = String::from("/.\n");
        let mut all: Vec<&String> = dirs.iter().chain(files.iter()).collect();
        all.sort_by(|a, b| walk_cmp(a, b));
        for p in all {
            let _ = writeln!(list, "/{p}");
        }
        tree.file(
            &format!("var/lib/dpkg/info/{name}.list"),
            0o644,
            t,
            list.into_bytes(),
        );
        let mut sums = String::new();
        for f in &files {
            if let Some(Body::File(d)) = tree.get(f).map(|n| &n.body) {
                let _ = writeln!(sums, "{}  {f}", &sha256_hex(d)[..32]);
            }
        }
        tree.file(
            &format!("var/lib/dpkg/info/{name}.md5sums"),
            0o644,
            t,
            sums.into_bytes(),
        );
        if i % 3 == 0 {
            let size = sample_size(&mut rng, mean * 0.3).max(60);
            let body = format!("#!/bin/sh\nset -e\n{}", conf_text(&mut rng, size));
            tree.file(
                &format!("var/lib/dpkg/info/{name}.postinst"),
                0o755,
                t,
                body.into_bytes(),
            );
        }
        let _ = write!(
            status,
            "Package: {name}\nStatus: install ok installed\nPriority: {}\nSection: {}\nInstalled-Size: {}\nMaintainer: {} {} <{}@packages.debian.org>\nArchitecture: amd64\nVersion: {ver}\nDescription: ",
            pick(&mut rng, &["required", "important", "optional", "standard"]),
            pick(&mut rng, &["admin", "libs", "utils", "python", "perl", "shells", "interpreters"]),
            rng.gen_range(20..20_000),
            cap(word(&mut rng)),
            cap(word(&mut rng)),
            name
        );
        let size = rng.gen_range(120..600);
        for line in prose(&mut rng, size).lines() {
            let _ = writeln!(status, " {}", if line.is_empty() { "." } else { line });
        }
        status.push('\n');
        let _ = writeln!(
            log,
            "{} status installed {name}:amd64 {ver}",
            rfc3339(t - 60 + i as u64, 0)
                .replace('T', " ")
                .trim_end_matches('Z')
        );
    }
    tree.file("var/lib/dpkg/status", 0o644, t, status.clone().into_bytes());
    tree.file("var/lib/dpkg/status-old", 0o644, t, status.into_bytes());
    tree.file("var/log/dpkg.log", 0o644, t, log.into_bytes());
    let size = (mean * 4.0) as usize;
    tree.file(
        "var/cache/debconf/templates.dat",
        0o644,
        t,
        conf_text(&mut rng, size).into_bytes(),
    );
    let size = (mean * 0.6) as usize;
    tree.file(
        "var/cache/debconf/config.dat",
        0o644,
        t,
        conf_text(&mut rng, size).into_bytes(),
    );

    tree
}

// ===========================================================================
// Layer 2: pip install
// ===========================================================================

const SITE: &str = "usr/local/lib/python3.11/dist-packages";

/// (distribution name, import name, version, native extension modules, console script)
const PIP_PKGS: &[(&str, &str, &str, bool, Option<&str>)] = &[
    ("numpy", "numpy", "1.26.4", true, Some("f2py")),
    ("pandas", "pandas", "2.2.2", true, None),
    ("PyYAML", "yaml", "6.0.1", true, None),
    ("requests", "requests", "2.32.3", false, None),
    ("certifi", "certifi", "2024.7.4", false, None),
    (
        "charset_normalizer",
        "charset_normalizer",
        "3.3.2",
        true,
        Some("normalizer"),
    ),
    ("idna", "idna", "3.7", false, None),
    ("urllib3", "urllib3", "2.2.2", false, None),
    ("python_dateutil", "dateutil", "2.9.0.post0", false, None),
    ("pytz", "pytz", "2024.1", false, None),
    ("six", "six.py", "1.16.0", false, None),
    ("tqdm", "tqdm", "4.66.4", false, Some("tqdm")),
    ("packaging", "packaging", "24.1", false, None),
    ("filelock", "filelock", "3.15.4", false, None),
    (
        "typing_extensions",
        "typing_extensions.py",
        "4.12.2",
        false,
        None,
    ),
    ("safetensors", "safetensors", "0.4.3", true, None),
    ("regex", "regex", "2024.5.15", true, None),
    ("Jinja2", "jinja2", "3.1.4", false, None),
    ("MarkupSafe", "markupsafe", "2.1.5", true, None),
    ("fsspec", "fsspec", "2024.6.1", false, None),
    (
        "huggingface_hub",
        "huggingface_hub",
        "0.23.4",
        false,
        Some("huggingface-cli"),
    ),
    ("tokenizers", "tokenizers", "0.19.1", true, None),
];

#[rustfmt::skip]
const SUBPKGS: &[&str] = &[
    "core", "io", "util", "_libs", "api", "compat", "internals", "errors", "arrays", "linalg",
    "random", "formats", "plotting", "tseries", "contrib", "cli", "utils", "_vendor", "backends",
    "testing",
];

struct PipSpec {
    dist: String,
    import: String,
    version: String,
    native: bool,
    script: Option<String>,
}

fn pip_specs(n: usize) -> Vec<PipSpec> {
    (0..n)
        .map(|i| match PIP_PKGS.get(i) {
            Some(&(d, imp, v, native, script)) => PipSpec {
                dist: d.to_string(),
                import: imp.to_string(),
                version: v.to_string(),
                native,
                script: script.map(str::to_string),
            },
            None => PipSpec {
                dist: format!("wharfpkg{i}"),
                import: format!("wharfpkg{i}"),
                version: "1.2.0".to_string(),
                native: i % 3 == 0,
                script: None,
            },
        })
        .collect()
}

/// The package that V2 bumps.
fn bumped_index(n: usize) -> usize {
    1.min(n.saturating_sub(1))
}

/// "2.2.2" -> "2.2.3", "2.9.0.post0" -> "2.9.0.post1".
fn bump_version(v: &str) -> String {
    let b = v.as_bytes();
    let end = b.iter().rposition(u8::is_ascii_digit).map_or(0, |i| i + 1);
    let start = b[..end]
        .iter()
        .rposition(|c| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let n: u64 = v[start..end].parse().unwrap_or(0);
    format!("{}{}{}", &v[..start], n + 1, &v[end..])
}

struct PipFile {
    rel: String,
    mode: u32,
    data: Vec<u8>,
}

/// All files of one installed package, relative to `SITE` (scripts start
/// with `../../../bin/`). Content depends on the seed and the package only,
/// except the version-carrying files and, when `bumped`, a few local edits.
fn gen_package(
    seed: u64,
    spec: &PipSpec,
    version: &str,
    bumped: bool,
    scale: &Scale,
    isa: &Isa,
    t: u64,
) -> Vec<PipFile> {
    let mut rng = rng_for(seed, &format!("pip:{}", spec.dist));
    let mean = scale.mean_file_size.max(64) as f64;
    let mut srcs: Vec<(String, String)> = Vec::new();
    let mut other: Vec<PipFile> = Vec::new();
    let single = spec.import.ends_with(".py");
    let imp = spec.import.trim_end_matches(".py").to_string();
    let mut top_level = vec![imp.clone()];
    if single {
        let size = sample_size(&mut rng, mean * 1.2 * scale.files_per_package as f64 / 4.0);
        srcs.push((spec.import.clone(), python_src(&mut rng, size, &imp)));
    } else {
        let nsub = (scale.files_per_package / 8).min(SUBPKGS.len());
        let mut dirs = vec![imp.clone()];
        let mut subs: Vec<&str> = SUBPKGS.to_vec();
        for _ in 0..nsub {
            let s = subs.remove(rng.gen_range(0..subs.len()));
            dirs.push(format!("{imp}/{s}"));
        }
        let size = sample_size(&mut rng, mean * 0.6);
        srcs.push((
            format!("{imp}/__init__.py"),
            python_src(&mut rng, size, &imp),
        ));
        srcs.push((format!("{imp}/_version.py"), String::new()));
        for d in &dirs[1..] {
            let body = if rng.gen_bool(0.4) {
                String::new()
            } else {
                let size = sample_size(&mut rng, mean * 0.3);
                python_src(&mut rng, size, d)
            };
            srcs.push((format!("{d}/__init__.py"), body));
        }
        let mut used: HashSet<String> = srcs.iter().map(|s| s.0.clone()).collect();
        while srcs.len() < scale.files_per_package.max(3) {
            let d = pick(&mut rng, &dirs).clone();
            let p = format!("{d}/{}.py", ident(&mut rng));
            if !used.insert(p.clone()) {
                continue;
            }
            let size = sample_size(&mut rng, mean * 1.2);
            let stem = p.rsplit('/').next().unwrap_or("").to_string();
            srcs.push((p, python_src(&mut rng, size, &stem)));
        }
        if spec.native {
            let n = (scale.files_per_package / 6).max(2);
            for _ in 0..n {
                let d = pick(&mut rng, &dirs).clone();
                let p = format!("{d}/_{}.cpython-311-x86_64-linux-gnu.so", ident(&mut rng));
                let size = sample_size(&mut rng, mean * 20.0).max(1024);
                other.push(PipFile {
                    rel: p,
                    mode: 0o755,
                    data: elf(&mut rng, isa, size),
                });
            }
        }
        if spec.dist == "numpy" {
            let p = format!(
                "{imp}.libs/libopenblas64_p-r0-{}.3.23.dev.so",
                &sha256_hex(&seed.to_le_bytes())[..8]
            );
            let size = (mean * 6.0) as usize * scale.files_per_package;
            other.push(PipFile {
                rel: p,
                mode: 0o755,
                data: elf(&mut rng, isa, size),
            });
            top_level.push(format!("{imp}.libs"));
        }
        if spec.dist == "certifi" {
            let size = (mean * 25.0) as usize;
            other.push(PipFile {
                rel: format!("{imp}/cacert.pem"),
                mode: 0o644,
                data: pem(&mut rng, size).into_bytes(),
            });
        }
        if rng.gen_bool(0.5) {
            other.push(PipFile {
                rel: format!("{imp}/py.typed"),
                mode: 0o644,
                data: Vec::new(),
            });
        }
    }
    let size = sample_size(&mut rng, mean * 0.8).max(200);
    let license = prose(&mut rng, size);
    let mut summary = String::new();
    sentence(&mut rng, &mut summary, 5..12);
    let author = format!("{} {}", cap(word(&mut rng)), cap(word(&mut rng)));
    let size = sample_size(&mut rng, mean).max(300);
    let readme = prose(&mut rng, size);

    // Version-dependent content, after every draw from `rng`.
    if let Some(v) = srcs.iter_mut().find(|s| s.0.ends_with("/_version.py")) {
        let parts: Vec<&str> = version.split('.').collect();
        v.1 = format!(
            "# file generated by setuptools_scm\n# don't change, don't track in version control\n__version__ = version = '{version}'\n__version_tuple__ = version_tuple = ({})\n",
            parts
                .iter()
                .map(|p| if p.parse::<u64>().is_ok() { p.to_string() } else { format!("'{p}'") })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if bumped {
        let mut er = rng_for(seed, &format!("bump:{}", spec.dist));
        let cands: Vec<usize> = (0..srcs.len())
            .filter(|&i| srcs[i].1.len() > 200 && !srcs[i].0.ends_with("/_version.py"))
            .collect();
        for _ in 0..2.min(cands.len()) {
            let i = *pick(&mut er, &cands);
            let mut lines: Vec<String> = srcs[i].1.lines().map(str::to_string).collect();
            for _ in 0..3 {
                let k = er.gen_range(0..lines.len());
                lines[k].push_str("  # noqa: PLR0912");
            }
            let k = er.gen_range(0..lines.len());
            lines.insert(k, format!("# Changed in {version}: handle empty input."));
            srcs[i].1 = lines.join("\n") + "\n";
        }
        if let Some(so) = other.iter_mut().find(|f| f.rel.ends_with(".so")) {
            for _ in 0..4 {
                let off = er.gen_range(0..so.data.len().saturating_sub(16).max(1));
                let end = (off + 16).min(so.data.len());
                er.fill_bytes(&mut so.data[off..end]);
            }
        }
    }

    let mut files: Vec<PipFile> = Vec::new();
    let mut record: Vec<String> = Vec::new();
    for (rel, src) in &srcs {
        let data = src.clone().into_bytes();
        let (dir, file) = match rel.rfind('/') {
            Some(i) => (&rel[..=i], &rel[i + 1..]),
            None => ("", rel.as_str()),
        };
        let stem = file.trim_end_matches(".py");
        let c = format!("{dir}__pycache__/{stem}.cpython-311.pyc");
        record.push(format!("{c},,"));
        files.push(PipFile {
            rel: c,
            mode: 0o644,
            data: pyc(&data, t),
        });
        files.push(PipFile {
            rel: rel.clone(),
            mode: 0o644,
            data,
        });
    }
    files.append(&mut other);
    let di = format!("{}-{version}.dist-info", spec.dist);
    let mut meta = format!(
        "Metadata-Version: 2.1\nName: {}\nVersion: {version}\nSummary: {summary}\nHome-page: https://github.com/{}/{}\nAuthor: {author}\nLicense: BSD-3-Clause\nClassifier: Development Status :: 5 - Production/Stable\nClassifier: Intended Audience :: Developers\nClassifier: License :: OSI Approved :: BSD License\nClassifier: Programming Language :: Python :: 3\nClassifier: Programming Language :: Python :: 3.11\nRequires-Python: >=3.9\nDescription-Content-Type: text/markdown\nLicense-File: LICENSE\n\n# {}\n\n",
        spec.dist,
        imp,
        spec.dist,
        spec.dist
    );
    meta.push_str(&readme);
    let tag = if spec.native {
        "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64"
    } else {
        "py3-none-any"
    };
    let wheel = format!(
        "Wheel-Version: 1.0\nGenerator: bdist_wheel (0.43.0)\nRoot-Is-Purelib: {}\nTag: {tag}\n\n",
        !spec.native
    );
    let mut dist_files = vec![
        ("INSTALLER", b"pip\n".to_vec()),
        ("LICENSE", license.into_bytes()),
        ("METADATA", meta.into_bytes()),
        ("REQUESTED", Vec::new()),
        ("WHEEL", wheel.into_bytes()),
        ("top_level.txt", (top_level.join("\n") + "\n").into_bytes()),
    ];
    if let Some(s) = &spec.script {
        let ep = format!("[console_scripts]\n{s} = {imp}.__main__:main\n");
        dist_files.push(("entry_points.txt", ep.into_bytes()));
        let body = format!(
            "#!/usr/bin/python3\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom {imp}.__main__ import main\nif __name__ == '__main__':\n    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit(main())\n"
        );
        files.push(PipFile {
            rel: format!("../../../bin/{s}"),
            mode: 0o755,
            data: body.into_bytes(),
        });
    }
    for (name, data) in dist_files {
        files.push(PipFile {
            rel: format!("{di}/{name}"),
            mode: 0o644,
            data,
        });
    }
    for f in &files {
        if !f.rel.ends_with(".pyc") {
            let h = b64(&Sha256::digest(&f.data), B64_URL, false);
            record.push(format!("{},sha256={h},{}", f.rel, f.data.len()));
        }
    }
    record.push(format!("{di}/RECORD,,"));
    record.sort();
    files.push(PipFile {
        rel: format!("{di}/RECORD"),
        mode: 0o644,
        data: (record.join("\n") + "\n").into_bytes(),
    });
    files
}

fn pip_layer(
    seed: u64,
    specs: &[PipSpec],
    version: Version,
    scale: &Scale,
    isa: &Isa,
    base: &Tree,
    t: u64,
) -> Tree {
    let mut tree = Tree::default();
    let bi = bumped_index(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let bumped = version == Version::V2 && i == bi;
        let ver = if bumped {
            bump_version(&spec.version)
        } else {
            spec.version.clone()
        };
        for f in gen_package(seed, spec, &ver, bumped, scale, isa, t) {
            let path = match f.rel.strip_prefix("../../../") {
                Some(r) => format!("usr/local/{r}"),
                None => format!("{SITE}/{}", f.rel),
            };
            tree.put(Node::new(&path, Body::File(f.data), f.mode, t));
        }
    }
    // `rm -rf /usr/share/doc/* /usr/share/man/*`
    for n in &base.nodes {
        if let Some(i) = n.path.rfind('/') {
            if matches!(&n.path[..i], "usr/share/doc" | "usr/share/man") {
                tree.put(Node::new(&n.path, Body::Whiteout, 0o600, t));
            }
        }
    }
    copy_up_parents(&mut tree, base, t);
    tree
}

// ===========================================================================
// Layer 3: app
// ===========================================================================

const LONG_NAME: &str = "test_inference_matches_reference_output_for_batch_size_32_and_sequence_length_512_with_fp16_autocast_enabled.json";

/// safetensors-like: u64 header length, JSON header, float16-like payload
/// whose high bytes have a skewed exponent distribution.
fn weights(seed: u64, n: usize) -> Vec<u8> {
    let n = n / 2 * 2;
    let mut table = [0u8; 256];
    for (b, e) in table.iter_mut().enumerate() {
        let r = b & 0x7f;
        let k = match r {
            0..=63 => 0,
            64..=95 => 1,
            96..=111 => 2,
            112..=119 => 3,
            120..=123 => 4,
            124..=125 => 5,
            _ => 6,
        };
        *e = ((b & 0x80) | ((10 - k) << 2) | (b & 0x03)) as u8;
    }
    let mut hdr = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let per = (n / 24 / 2 * 2).max(2);
    let (mut off, mut i) = (0, 0);
    while off < n {
        let sz = per.min(n - off);
        let shape = if (sz / 2).is_multiple_of(256) {
            format!("[{},256]", sz / 2 / 256)
        } else {
            format!("[{}]", sz / 2)
        };
        let _ = write!(
            hdr,
            ",\"encoder.layers.{}.{}.weight\":{{\"dtype\":\"F16\",\"shape\":{shape},\"data_offsets\":[{off},{}]}}",
            i / 4,
            ["attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"][i % 4],
            off + sz
        );
        off += sz;
        i += 1;
    }
    hdr.push('}');
    while hdr.len() % 8 != 0 {
        hdr.push(' ');
    }
    let mut out = Vec::with_capacity(8 + hdr.len() + n);
    out.extend_from_slice(&(hdr.len() as u64).to_le_bytes());
    out.extend_from_slice(hdr.as_bytes());
    let start = out.len();
    out.resize(start + n, 0);
    rng_for(seed, "weights").fill_bytes(&mut out[start..]);
    for hi in out[start..].iter_mut().skip(1).step_by(2) {
        *hi = table[*hi as usize];
    }
    out
}

fn model_config(version: Version) -> String {
    let (dropout, maxpos) = match version {
        Version::V1 => ("0.1", 512),
        Version::V2 => ("0.05", 1024),
    };
    let labels: Vec<String> = (0..8).map(|i| format!("    \"LABEL_{i}\": {i}")).collect();
    format!(
        "{{\n  \"architectures\": [\n    \"WharfEncoderForSequenceClassification\"\n  ],\n  \"classifier_dropout\": {dropout},\n  \"hidden_size\": 256,\n  \"intermediate_size\": 1024,\n  \"label2id\": {{\n{}\n  }},\n  \"learning_rate\": 0.0003,\n  \"max_position_embeddings\": {maxpos},\n  \"num_attention_heads\": 8,\n  \"num_hidden_layers\": 6,\n  \"torch_dtype\": \"float16\",\n  \"vocab_size\": 32000\n}}\n",
        labels.join(",\n")
    )
}

fn app_layer(seed: u64, version: Version, scale: &Scale, specs: &[PipSpec], tm: &Times) -> Tree {
    let mut files: Vec<(&str, u32, Vec<u8>)> = Vec::new();
    for m in [
        "main.py",
        "server.py",
        "model.py",
        "tokenizer.py",
        "utils/__init__.py",
        "utils/data.py",
        "utils/metrics.py",
        "utils/legacy.py",
        "scripts/export_onnx.py",
    ] {
        let mut r = rng_for(seed, &format!("app:{m}"));
        let size = if m.ends_with("__init__.py") {
            300
        } else {
            3500
        };
        let mut src = python_src(&mut r, size, m);
        if m == "main.py" && version == Version::V2 {
            src = src.replacen(
                "log = logging.getLogger(__name__)",
                "log = logging.getLogger(__name__)\nDEFAULT_BATCH = 32  # tuned in rev 2\n",
                1,
            );
            src.push_str("\n\ndef healthcheck() -> Dict[str, Any]:\n    return {\"ok\": True, \"batch\": DEFAULT_BATCH}\n");
        }
        let mode = if m.starts_with("scripts/") {
            0o755
        } else {
            0o644
        };
        files.push((m, mode, src.into_bytes()));
    }
    let reqs: String = std::iter::once("# pinned by the image's pip layer\n".to_string())
        .chain(specs.iter().map(|s| format!("{}\n", s.dist)))
        .collect();
    files.push(("requirements.txt", 0o644, reqs.into_bytes()));
    files.push((
        "config/model_config.json",
        0o644,
        model_config(version).into_bytes(),
    ));
    files.push((
        "model.safetensors",
        0o644,
        weights(seed, scale.app_weights_size),
    ));
    let mut r = rng_for(seed, "app:snapshot");
    let vals: Vec<String> = (0..64).map(|_| format!("{:.6}", r.gen::<f64>())).collect();
    let long = format!("tests/snapshots/{LONG_NAME}");
    files.push((
        long.as_str(),
        0o644,
        format!("{{\"expected\": [{}]}}", vals.join(", ")).into_bytes(),
    ));
    files.push((
        "données.txt",
        0o644,
        "Données d'exemple pour le modèle : « déjà vu », naïveté, façade.\n"
            .as_bytes()
            .to_vec(),
    ));

    let mtime_of = |rel: &str| {
        let mut r = rng_for(seed, &format!("mt:{rel}"));
        tm.epoch0 - r.gen_range(3..90u64) * 86_400 + r.gen_range(0..86_400)
    };
    let dir_mt = files
        .iter()
        .map(|f| mtime_of(f.0))
        .max()
        .unwrap_or(tm.epoch0);
    let mut tree = Tree::default();
    tree.dir("app", 0o755, dir_mt);
    for (rel, mode, data) in files {
        let mt = if version == Version::V2 && matches!(rel, "main.py" | "config/model_config.json")
        {
            tm.app_edit
        } else {
            mtime_of(rel)
        };
        let p = format!("app/{rel}");
        tree.parents(&p, dir_mt);
        tree.put(Node::new(&p, Body::File(data), mode, mt));
    }
    tree
}

// ===========================================================================
// Image: config, v1 JSONs, outer layouts
// ===========================================================================

struct Image {
    layers: Vec<Vec<u8>>,
    /// Hex sha256 of each layer tar.
    diff_ids: Vec<String>,
    config: Vec<u8>,
    config_hex: String,
    /// (v1 id, legacy V1Image JSON) per layer.
    v1: Vec<(String, Vec<u8>)>,
    created: u64,
    save: u64,
    tag: &'static str,
}

const REPO: &str = "wharf-demo";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// moby `api/types/container.Config`, in Go field order.
fn container_config(
    env: Option<&[&str]>,
    cmd: Option<&[&str]>,
    workdir: &str,
    image: &str,
    labels: Option<J>,
) -> J {
    jo(vec![
        ("Hostname", js("")),
        ("Domainname", js("")),
        ("User", js("")),
        ("AttachStdin", J::Bool(false)),
        ("AttachStdout", J::Bool(false)),
        ("AttachStderr", J::Bool(false)),
        ("Tty", J::Bool(false)),
        ("OpenStdin", J::Bool(false)),
        ("StdinOnce", J::Bool(false)),
        ("Env", env.map_or(J::Null, jstrs)),
        ("Cmd", cmd.map_or(J::Null, jstrs)),
        ("Image", js(image)),
        ("Volumes", J::Null),
        ("WorkingDir", js(workdir)),
        ("Entrypoint", J::Null),
        ("OnBuild", J::Null),
        ("Labels", labels.unwrap_or(J::Null)),
    ])
}

fn build_image(version: Version, scale: Scale, seed: u64) -> io::Result<Image> {
    let specs = pip_specs(scale.pip_packages);
    let tm = times(seed, version, specs.len());
    let isa = make_isa();
    // The base layer uses the V1 times whatever the version.
    let tm1 = times(seed, Version::V1, specs.len());
    let base = base_layer(seed, &scale, &isa, &tm1);
    let pip = pip_layer(seed, &specs, version, &scale, &isa, &base, tm.t_pip);
    let app = app_layer(seed, version, &scale, &specs, &tm);
    let layers = vec![layer_tar(&base)?, layer_tar(&pip)?, layer_tar(&app)?];
    drop((base, pip, app));
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_hex(l)).collect();

    let tag = match version {
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    let bi = bumped_index(specs.len());
    let pins: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = if version == Version::V2 && i == bi {
                bump_version(&s.version)
            } else {
                s.version.clone()
            };
            format!("{}=={v}", s.dist)
        })
        .collect();
    let env: &[&str] = &[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONUNBUFFERED=1",
        "PIP_NO_CACHE_DIR=1",
    ];
    let labels = || {
        jo(vec![
            (
                "org.opencontainers.image.source",
                js("https://example.invalid/wharf-demo"),
            ),
            ("org.opencontainers.image.version", js(tag)),
        ])
    };
    let parent_img = format!(
        "sha256:{}",
        sha256_hex(format!("{seed}:{tag}:parent").as_bytes())
    );
    let created = rfc3339(tm.created, tm.created_ns);
    let hist = |t: u64, by: String, empty: bool| {
        let mut v = vec![("created", js(rfc3339(t, 0))), ("created_by", js(by))];
        if empty {
            v.push(("empty_layer", J::Bool(true)));
        }
        jo(v)
    };
    let mut history = vec![
        hist(
            tm1.t_base,
            format!(
                "/bin/sh -c #(nop) ADD file:{} in / ",
                sha256_hex(format!("{seed}:rootfs").as_bytes())
            ),
            false,
        ),
        hist(tm1.t_base, "/bin/sh -c #(nop)  CMD [\"bash\"]".into(), true),
        hist(
            tm.t_pip - 2,
            "/bin/sh -c #(nop)  ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1".into(),
            true,
        ),
        hist(
            tm.t_pip + 30,
            format!(
                "/bin/sh -c pip install --break-system-packages --no-cache-dir {} && rm -rf /usr/share/doc/* /usr/share/man/*",
                pins.join(" ")
            ),
            false,
        ),
        hist(
            tm.created - 1,
            format!("/bin/sh -c #(nop) COPY dir:{} in /app/ ", diff_ids[2]),
            false,
        ),
        hist(tm.created - 1, "/bin/sh -c #(nop) WORKDIR /app".into(), true),
    ];
    history.push(jo(vec![
        ("created", js(created.clone())),
        (
            "created_by",
            js("/bin/sh -c #(nop)  CMD [\"python3\" \"main.py\"]"),
        ),
        ("empty_layer", J::Bool(true)),
    ]));
    let cfg_config = container_config(
        Some(env),
        Some(&["python3", "main.py"]),
        "/app",
        &parent_img,
        Some(labels()),
    );
    let container = sha256_hex(format!("{seed}:{tag}:container").as_bytes());
    let cfg_cc = container_config(
        Some(env),
        Some(&["/bin/sh", "-c", "#(nop) ", "CMD [\"python3\" \"main.py\"]"]),
        "/app",
        &parent_img,
        Some(labels()),
    );
    let config = jo(vec![
        ("architecture", js("amd64")),
        ("config", cfg_config.clone()),
        ("container", js(container.clone())),
        ("container_config", cfg_cc.clone()),
        ("created", js(created.clone())),
        ("docker_version", js("24.0.7")),
        ("history", J::Arr(history)),
        ("os", js("linux")),
        (
            "rootfs",
            jo(vec![
                ("type", js("layers")),
                (
                    "diff_ids",
                    J::Arr(diff_ids.iter().map(|d| js(format!("sha256:{d}"))).collect()),
                ),
            ]),
        ),
    ]);
    let config = go_json(&config);
    let config_hex = sha256_hex(&config);

    // moby image/tarexport: legacy V1Image JSON per layer and v1 IDs.
    let zero_cc = container_config(None, None, "", "", None);
    let mut chain: Vec<String> = Vec::new();
    let mut v1: Vec<(String, Vec<u8>)> = Vec::new();
    let mut parent = String::new();
    for (i, d) in diff_ids.iter().enumerate() {
        let c = match chain.last() {
            None => format!("sha256:{d}"),
            Some(p) => format!(
                "sha256:{}",
                sha256_hex(format!("{p} sha256:{d}").as_bytes())
            ),
        };
        chain.push(c.clone());
        let last = i + 1 == diff_ids.len();
        let img: Vec<(&str, J)> = if last {
            vec![
                ("created", js(created.clone())),
                ("container", js(container.clone())),
                ("container_config", cfg_cc.clone()),
                ("docker_version", js("24.0.7")),
                ("config", cfg_config.clone()),
                ("architecture", js("amd64")),
                ("os", js("linux")),
            ]
        } else {
            vec![
                ("created", js("1970-01-01T00:00:00Z")),
                ("container_config", zero_cc.clone()),
            ]
        };
        let mut idmap: Vec<(&str, J)> = img.clone();
        idmap.push(("layer_id", js(c)));
        if !parent.is_empty() {
            idmap.push(("parent", js(format!("sha256:{parent}"))));
        }
        idmap.sort_by(|a, b| a.0.cmp(b.0));
        let id = sha256_hex(&go_json(&jo(idmap)));
        let mut ordered: Vec<(&str, J)> = vec![("id", js(id.clone()))];
        if !parent.is_empty() {
            ordered.push(("parent", js(parent.clone())));
        }
        for (k, v) in img {
            if k != "os" {
                ordered.push((k, v));
            }
        }
        ordered.push(("os", js("linux")));
        v1.push((id.clone(), go_json(&jo(ordered))));
        parent = id;
    }
    Ok(Image {
        layers,
        diff_ids,
        config,
        config_hex,
        v1,
        created: tm.created,
        save: tm.save,
        tag,
    })
}

enum Item<'a> {
    Dir(u64),
    Data(&'a [u8], u64),
}

/// Items in `filepath.Walk` order of the export directory.
fn emit(out: &mut dyn Write, mut items: Vec<(String, Item<'_>)>) -> io::Result<()> {
    items.sort_by(|a, b| walk_cmp(&a.0, &b.0));
    let mut tw = TarWriter::new(out);
    for (name, it) in &items {
        match it {
            Item::Dir(mt) => tw.dir(name, 0o755, *mt)?,
            Item::Data(d, mt) => tw.file(name, 0o644, *mt, d)?,
        }
    }
    tw.finish()
}

fn repo_tag(img: &Image) -> String {
    format!("{REPO}:{}", img.tag)
}

/// Docker <= 24 `docker save` (graphdriver store).
fn write_legacy(out: &mut dyn Write, img: &Image) -> io::Result<()> {
    let c = img.created;
    let mut items: Vec<(String, Item<'_>)> = vec![(
        format!("{}.json", img.config_hex),
        Item::Data(&img.config, c),
    )];
    for ((id, json), layer) in img.v1.iter().zip(&img.layers) {
        items.push((id.clone(), Item::Dir(c)));
        items.push((format!("{id}/VERSION"), Item::Data(b"1.0", c)));
        items.push((format!("{id}/json"), Item::Data(json, c)));
        items.push((format!("{id}/layer.tar"), Item::Data(layer, c)));
    }
    let manifest = J::Arr(vec![jo(vec![
        ("Config", js(format!("{}.json", img.config_hex))),
        ("RepoTags", J::Arr(vec![js(repo_tag(img))])),
        (
            "Layers",
            J::Arr(
                img.v1
                    .iter()
                    .map(|(id, _)| js(format!("{id}/layer.tar")))
                    .collect(),
            ),
        ),
    ])]);
    let mut manifest = go_json(&manifest);
    manifest.push(b'\n');
    let last = img.v1.last().map_or("", |v| v.0.as_str());
    let mut repos = go_json(&jo(vec![(REPO, jo(vec![(img.tag, js(last))]))]));
    repos.push(b'\n');
    items.push(("manifest.json".into(), Item::Data(&manifest, 0)));
    items.push(("repositories".into(), Item::Data(&repos, 0)));
    emit(out, items)
}

/// Docker >= 25 `docker save`: OCI layout plus `manifest.json` and `repositories`.
fn write_oci(out: &mut dyn Write, img: &Image) -> io::Result<()> {
    let (c, s) = (img.created, img.save);
    let plat = || jo(vec![("architecture", js("amd64")), ("os", js("linux"))]);
    let mut items: Vec<(String, Item<'_>)> = vec![
        ("blobs".into(), Item::Dir(c)),
        ("blobs/sha256".into(), Item::Dir(s)),
    ];
    for (_, json) in &img.v1 {
        items.push((
            format!("blobs/sha256/{}", sha256_hex(json)),
            Item::Data(json, c),
        ));
    }
    for (d, l) in img.diff_ids.iter().zip(&img.layers) {
        items.push((format!("blobs/sha256/{d}"), Item::Data(l, c)));
    }
    items.push((
        format!("blobs/sha256/{}", img.config_hex),
        Item::Data(&img.config, c),
    ));
    let layer_desc = |d: &str, l: &[u8]| {
        jo(vec![
            ("mediaType", js(MT_LAYER)),
            ("digest", js(format!("sha256:{d}"))),
            ("size", J::Int(l.len() as i64)),
        ])
    };
    let m = jo(vec![
        ("schemaVersion", J::Int(2)),
        ("mediaType", js(MT_MANIFEST)),
        (
            "config",
            jo(vec![
                ("mediaType", js(MT_CONFIG)),
                ("digest", js(format!("sha256:{}", img.config_hex))),
                ("size", J::Int(img.config.len() as i64)),
                ("platform", plat()),
            ]),
        ),
        (
            "layers",
            J::Arr(
                img.diff_ids
                    .iter()
                    .zip(&img.layers)
                    .map(|(d, l)| layer_desc(d, l))
                    .collect(),
            ),
        ),
    ]);
    let mb = go_json(&m);
    let mdig = sha256_hex(&mb);
    items.push((format!("blobs/sha256/{mdig}"), Item::Data(&mb, 0)));
    let mut srcs: Vec<(String, J)> = img
        .diff_ids
        .iter()
        .zip(&img.layers)
        .map(|(d, l)| {
            (
                format!("sha256:{d}"),
                jo(vec![
                    ("mediaType", js(MT_LAYER)),
                    ("size", J::Int(l.len() as i64)),
                    ("digest", js(format!("sha256:{d}"))),
                ]),
            )
        })
        .collect();
    srcs.sort_by(|a, b| a.0.cmp(&b.0));
    srcs.dedup_by(|a, b| a.0 == b.0);
    let manifest = J::Arr(vec![jo(vec![
        ("Config", js(format!("blobs/sha256/{}", img.config_hex))),
        ("RepoTags", J::Arr(vec![js(repo_tag(img))])),
        (
            "Layers",
            J::Arr(
                img.diff_ids
                    .iter()
                    .map(|d| js(format!("blobs/sha256/{d}")))
                    .collect(),
            ),
        ),
        ("LayerSources", J::Obj(srcs)),
    ])]);
    let mut manifest = go_json(&manifest);
    manifest.push(b'\n');
    let last = img.diff_ids.last().map_or("", String::as_str);
    let mut repos = go_json(&jo(vec![(REPO, jo(vec![(img.tag, js(last))]))]));
    repos.push(b'\n');
    let index = go_json(&jo(vec![
        ("schemaVersion", J::Int(2)),
        ("mediaType", js(MT_INDEX)),
        (
            "manifests",
            J::Arr(vec![jo(vec![
                ("mediaType", js(MT_MANIFEST)),
                ("digest", js(format!("sha256:{mdig}"))),
                ("size", J::Int(mb.len() as i64)),
                (
                    "annotations",
                    jo(vec![
                        (
                            "io.containerd.image.name",
                            js(format!("docker.io/library/{}", repo_tag(img))),
                        ),
                        ("org.opencontainers.image.ref.name", js(img.tag)),
                    ]),
                ),
                ("platform", plat()),
            ])]),
        ),
    ]));
    items.push(("manifest.json".into(), Item::Data(&manifest, 0)));
    items.push(("repositories".into(), Item::Data(&repos, 0)));
    items.push((
        "oci-layout".into(),
        Item::Data(b"{\"imageLayoutVersion\": \"1.0.0\"}", 0),
    ));
    items.push(("index.json".into(), Item::Data(&index, s)));
    emit(out, items)
}

// ===========================================================================
// Tests
// ===========================================================================

#[cfg(test)]
mod tests {
    use super::*;

    fn image_bytes(layout: Layout, version: Version, seed: u64) -> Vec<u8> {
        let mut v = Vec::new();
        write_image(&mut v, layout, version, Scale::tiny(), seed).unwrap();
        v
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = image_bytes(Layout::Oci, Version::V1, 7);
        let b = image_bytes(Layout::Oci, Version::V1, 7);
        assert_eq!(a, b);
        assert_eq!(a.len() % BLOCK, 0);
        assert!(a[a.len() - 2 * BLOCK..].iter().all(|&x| x == 0));
        let c = image_bytes(Layout::Oci, Version::V1, 8);
        assert_ne!(Sha256::digest(&a), Sha256::digest(&c));
    }

    #[test]
    fn base_shared_pip_and_app_differ() {
        let v1 = build_image(Version::V1, Scale::tiny(), 3).unwrap();
        let v2 = build_image(Version::V2, Scale::tiny(), 3).unwrap();
        assert_eq!(v1.diff_ids[0], v2.diff_ids[0]);
        assert_ne!(v1.diff_ids[1], v2.diff_ids[1]);
        assert_ne!(v1.diff_ids[2], v2.diff_ids[2]);
        assert_eq!(v1.diff_ids[0], sha256_hex(&v1.layers[0]));
        assert_eq!(v1.config_hex, sha256_hex(&v1.config));
        let size = (2..=3).map(|s| image_bytes(Layout::Legacy, Version::V1, s).len());
        for n in size {
            assert!(
                (1_500_000..6_000_000).contains(&n),
                "tiny image is {n} bytes"
            );
        }
    }

    #[test]
    fn go_header_choices() {
        // Fits: one USTAR block.
        assert_eq!(
            go_header(&Hdr::new("a/b", b'0', 0o644, 1), &[], false).len(),
            BLOCK
        );
        // Long but splittable: still one block, with a prefix.
        let long = format!("{}/{}", "d".repeat(60), "f".repeat(60));
        let h = go_header(&Hdr::new(&long, b'0', 0o644, 1), &[], false);
        assert_eq!(h.len(), BLOCK);
        assert_eq!(&h[345..405], "d".repeat(60).as_bytes());
        assert_eq!(&h[100..108], b"0000644\0");
        // Non-ASCII: PAX header first.
        let h = go_header(&Hdr::new("app/données.txt", b'0', 0o644, 1), &[], false);
        assert_eq!(h.len(), 3 * BLOCK);
        assert_eq!(h[156], b'x');
        assert!(h.starts_with(b"app/PaxHeaders.0/donnes.txt\0"));
        let rec = pax_record("path", "app/données.txt");
        assert_eq!(rec, "25 path=app/données.txt\n");
        assert_eq!(rec.len(), 25);
        assert!(h[BLOCK..].starts_with(rec.as_bytes()));
        // 98 bytes of body: "100" would make 101, so the prefix is 101.
        assert!(pax_record("k", &"v".repeat(94)).starts_with("101 k=v"));
        assert_eq!(pax_record("k", &"v".repeat(94)).len(), 101);
    }
}
