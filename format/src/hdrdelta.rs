//! Header deltas: tar skeleton bytes sent as references to the previous
//! version's headers, patched, instead of as a zstd delta of the bytes.
//!
//! A rebuilt image changes the mtime of every file, so every 512-byte tar
//! header differs from its previous version in its mtime and checksum
//! fields and nowhere else. A byte-level delta pays a few bytes for each
//! such header (zstd's optimal parser: about 5 bytes a header on the small
//! corpus's rebuild, and it indexes the whole base to find them), so its
//! size grows with the number of files.
//! Here each header that differs only in those two fields is a reference to
//! the old header, by its index among the base's headers, with a flag byte:
//! the new mtime is the previous reference's new mtime, or the old one moved
//! by the previous reference's shift, or (neither) sent in a column; the
//! checksum is recomputed in the old field's layout unless that differs;
//! the bytes before the header are the base's bytes before the old header,
//! or sent. A rebuild gives its files one new mtime or moves them all by
//! one shift, so the flags repeat and cost almost nothing: the size follows
//! what changed, not the number of files. Everything else (headers that
//! changed otherwise, records, padding) goes as *gaps*, compressed by zstd
//! with the base as prefix like any delta.
//!
//! Encoding (PROTOCOL.md §9.2.8): the magic `WHD1`, then one zstd frame,
//! compressed with the bases as prefix, of:
//!
//! ```text
//! varint n                        header references
//! n × varint zigzag(i − (j + 1))  index i of each old header among the base's
//!                                 headers; j: the previous reference's (−1 at first)
//! n × u8 flags                    1: mtime from the mtime column; 8: mtime as the
//!                                 previous reference's; 16: old mtime + the previous
//!                                 reference's shift; 2: checksum from the checksum
//!                                 column (else recomputed); 4: gap from the base
//! varint per reference without 4  the length of its gap
//! 12 bytes per flag 1             new mtime fields (header bytes 136..148)
//! 8 bytes per flag 2              checksum fields (header bytes 148..156)
//! the gaps                        target bytes not in a referenced header and not
//!                                 taken from the base, in order
//! ```
//!
//! The base's headers are found the same way on both sides
//! ([`find_headers`]): blocks with the ustar magic and a valid checksum, in
//! order, not overlapping.

use crate::delta::{get_varint as varint, take};
use crate::error::{Error, Result};
use crate::skeleton::put_varint;
use crate::tarhdr::{checksum_ok, checksum_sums};
use std::collections::HashMap;

/// First bytes of a header delta. No zstd frame starts with them (zstd's
/// magic is 28 B5 2F FD, skippable frames 5x 2A 4D 18), so a receiver tells
/// the two apart by their first four bytes.
pub const MAGIC: &[u8; 4] = b"WHD1";

const BLOCK: usize = 512;
const MTIME: std::ops::Range<usize> = 136..148;
const CHKSUM: std::ops::Range<usize> = 148..156;
/// The new mtime field is in the mtime column.
const FLAG_MTIME: u8 = 1;
/// The checksum field is in the checksum column (else it is recomputed).
const FLAG_CHKSUM: u8 = 2;
/// The gap before the header is the base's bytes between the previous old
/// header and this one (else it is in the gaps).
const FLAG_GAP_IN_BASE: u8 = 4;
/// The new mtime field is the previous reference's new mtime field.
const FLAG_MTIME_AS_LAST: u8 = 8;
/// The new mtime is the old one plus the previous reference's shift (new
/// minus old), written in the old field's layout.
const FLAG_MTIME_SHIFTED: u8 = 16;
const ALL_FLAGS: u8 =
    FLAG_MTIME | FLAG_CHKSUM | FLAG_GAP_IN_BASE | FLAG_MTIME_AS_LAST | FLAG_MTIME_SHIFTED;
/// zstd level for the references and gaps: they are small and already
/// stripped of what the headers repeat; the fast levels do as well on them.
const LEVEL: i32 = 3;

/// Offsets of the ustar headers in `b`: blocks with the ustar magic and a
/// valid checksum, not overlapping, found by their magic.
fn find_headers(b: &[u8]) -> Vec<usize> {
    let finder = memchr::memmem::Finder::new(b"ustar");
    let mut out = Vec::new();
    let mut from = 257;
    while from < b.len() {
        let Some(i) = finder.find(&b[from..]) else {
            break;
        };
        let p = from + i - 257;
        if p + BLOCK <= b.len() && checksum_ok(&b[p..p + BLOCK]) {
            out.push(p);
            from = p + BLOCK + 257;
        } else {
            from += i + 1;
        }
    }
    out
}

/// What identifies a header's file: name, type and prefix fields.
type Key<'a> = (&'a [u8], u8, &'a [u8]);

fn key(h: &[u8]) -> Key<'_> {
    (&h[..100], h[156], &h[345..500])
}

/// An octal field's layout: leading spaces, digits, then the rest.
fn octal_layout(field: &[u8]) -> (usize, usize) {
    let lead = field.iter().take_while(|&&c| c == b' ').count();
    let digits = field[lead..]
        .iter()
        .take_while(|c| (b'0'..=b'7').contains(*c))
        .count();
    (lead, digits)
}

/// The number an octal field holds, if it holds one.
fn octal_value(field: &[u8]) -> Option<u64> {
    let (lead, digits) = octal_layout(field);
    let text = std::str::from_utf8(&field[lead..lead + digits]).ok()?;
    u64::from_str_radix(text, 8).ok()
}

/// `v` written as `style` writes its number: the same leading spaces, the
/// same count of octal digits, the same bytes after them. `None` when
/// `style` holds no digits or `v` needs more of them.
fn octal_like<const N: usize>(style: &[u8], v: u64) -> Option<[u8; N]> {
    let (lead, digits) = octal_layout(style);
    let text = format!("{v:0digits$o}");
    if digits == 0 || text.len() != digits || style.len() != N {
        return None;
    }
    let mut f = [0u8; N];
    f[..lead].fill(b' ');
    f[lead..lead + digits].copy_from_slice(text.as_bytes());
    f[lead + digits..].copy_from_slice(&style[lead + digits..]);
    Some(f)
}

/// The checksum field of `header` (whose own checksum field is ignored),
/// written as `style` writes its number.
fn checksum_like(style: &[u8], header: &[u8]) -> Option<[u8; 8]> {
    octal_like(style, checksum_sums(header).0)
}

/// How the previous reference's mtime changed, for predicting the next:
/// its new mtime field, and new minus old when both are octal numbers.
#[derive(Default)]
struct MtimeTrend {
    last: Option<[u8; 12]>,
    shift: Option<i64>,
}

impl MtimeTrend {
    /// The new mtime field the shift predicts for a header whose old one
    /// is `old`.
    fn shifted(&self, old: &[u8]) -> Option<[u8; 12]> {
        let v = octal_value(old)?.checked_add_signed(self.shift?)?;
        octal_like(old, v)
    }

    fn update(&mut self, old: &[u8], new: &[u8]) {
        let mut f = [0u8; 12];
        f.copy_from_slice(new);
        self.last = Some(f);
        self.shift = octal_value(new)
            .zip(octal_value(old))
            .and_then(|(n, o)| (n as i64).checked_sub(o as i64));
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// `target` as a header delta against `base`, or `None` when no header of
/// it can refer to one of `base`.
pub fn encode(base: &[u8], target: &[u8]) -> Result<Option<Vec<u8>>> {
    let olds = find_headers(base);
    let mut by_key: HashMap<Key, Vec<usize>> = HashMap::new();
    for (i, &o) in olds.iter().enumerate() {
        by_key.entry(key(&base[o..o + BLOCK])).or_default().push(i);
    }
    if by_key.is_empty() {
        return Ok(None);
    }
    let (mut codes, mut flags, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mtimes, mut sums, mut gap_bytes) = (Vec::new(), Vec::new(), Vec::new());
    // Target bytes consumed; base bytes up to the end of the last old
    // header used, and its index.
    let (mut pos, mut base_end, mut prev) = (0usize, 0usize, -1i64);
    let mut trend = MtimeTrend::default();
    for p in find_headers(target) {
        let new = &target[p..p + BLOCK];
        let Some(cands) = by_key.get(&key(new)) else {
            continue;
        };
        // Streams keep their order: the first old header at or after the
        // end of the last one used, else the first of that name.
        let at = cands.partition_point(|&i| olds[i] < base_end);
        let Some(&i) = cands.get(at).or(cands.first()) else {
            continue;
        };
        let o = olds[i];
        let old = &base[o..o + BLOCK];
        if old[..MTIME.start] != new[..MTIME.start] || old[CHKSUM.end..] != new[CHKSUM.end..] {
            continue;
        }
        let mut patched = [0u8; BLOCK];
        patched.copy_from_slice(old);
        patched[MTIME].copy_from_slice(&new[MTIME]);
        let mut flag = 0;
        if old[MTIME] != new[MTIME] {
            // A rebuild gives its files one new mtime, or moves them all by
            // about the same time: most headers are then predicted.
            if trend.last.is_some_and(|l| l[..] == new[MTIME]) {
                flag |= FLAG_MTIME_AS_LAST;
            } else if trend
                .shifted(&old[MTIME])
                .is_some_and(|f| f[..] == new[MTIME])
            {
                flag |= FLAG_MTIME_SHIFTED;
            } else {
                flag |= FLAG_MTIME;
                mtimes.extend_from_slice(&new[MTIME]);
            }
        }
        trend.update(&old[MTIME], &new[MTIME]);
        if checksum_like(&old[CHKSUM], &patched)
            .as_ref()
            .map(|f| &f[..])
            != Some(&new[CHKSUM])
        {
            flag |= FLAG_CHKSUM;
            sums.extend_from_slice(&new[CHKSUM]);
        }
        let gap = &target[pos..p];
        if o >= base_end && &base[base_end..o] == gap {
            flag |= FLAG_GAP_IN_BASE;
        } else {
            gaps.push(gap.len() as u64);
            gap_bytes.extend_from_slice(gap);
        }
        codes.push(zigzag(i as i64 - (prev + 1)));
        flags.push(flag);
        pos = p + BLOCK;
        base_end = o + BLOCK;
        prev = i as i64;
    }
    if flags.is_empty() {
        return Ok(None);
    }
    gap_bytes.extend_from_slice(&target[pos..]);
    let mut r = Vec::with_capacity(gap_bytes.len() + mtimes.len() + sums.len() + 8 * flags.len());
    put_varint(&mut r, flags.len() as u64);
    for c in codes {
        put_varint(&mut r, c);
    }
    r.extend_from_slice(&flags);
    for g in gaps {
        put_varint(&mut r, g);
    }
    r.extend_from_slice(&mtimes);
    r.extend_from_slice(&sums);
    r.extend_from_slice(&gap_bytes);
    let z = crate::delta::encode_data(base, &r, LEVEL)?;
    let mut out = Vec::with_capacity(MAGIC.len() + z.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&z);
    Ok(Some(out))
}

fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!("header delta: {what}"))
}

/// Rebuilds the `raw_len` bytes a header delta (`body`: what follows
/// [`MAGIC`]) encodes against `base`.
pub fn decode(base: &[u8], body: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    // A reference costs at least 2 bytes and stands for 512: the decoded
    // form is never much longer than the chunk.
    let r = crate::delta::decode_at_most(base, body, raw_len + raw_len / 64 + 64)?;
    let mut pos = 0;
    let n = varint(&r, &mut pos)? as usize;
    if n > raw_len / BLOCK {
        return Err(corrupt("more headers than the chunk can hold"));
    }
    let mut codes = Vec::with_capacity(n);
    for _ in 0..n {
        codes.push(unzigzag(varint(&r, &mut pos)?));
    }
    let flags = take(&r, &mut pos, n)?;
    if flags.iter().any(|f| f & !ALL_FLAGS != 0) {
        return Err(corrupt("unknown flag"));
    }
    let count = |bit: u8| flags.iter().filter(|&&f| f & bit != 0).count();
    let mut gaps = Vec::with_capacity(n);
    for _ in 0..n - count(FLAG_GAP_IN_BASE) {
        gaps.push(usize::try_from(varint(&r, &mut pos)?).map_err(|_| corrupt("gap too long"))?);
    }
    let mut gaps = gaps.into_iter();
    let mut mtimes = take(&r, &mut pos, count(FLAG_MTIME) * MTIME.len())?.chunks_exact(MTIME.len());
    let mut sums =
        take(&r, &mut pos, count(FLAG_CHKSUM) * CHKSUM.len())?.chunks_exact(CHKSUM.len());
    let gap_bytes = &r[pos..];
    let olds = find_headers(base);
    let mut out = Vec::with_capacity(raw_len);
    let (mut g, mut base_end, mut prev) = (0usize, 0usize, -1i64);
    let mut trend = MtimeTrend::default();
    for (&code, &flag) in codes.iter().zip(flags) {
        let i = (prev + 1)
            .checked_add(code)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < olds.len())
            .ok_or_else(|| corrupt("refers to a header its base does not have"))?;
        let o = olds[i];
        if flag & FLAG_GAP_IN_BASE != 0 {
            let gap = base
                .get(base_end..o)
                .ok_or_else(|| corrupt("gap in base runs backwards"))?;
            out.extend_from_slice(gap);
        } else {
            let len = gaps.next().ok_or_else(|| corrupt("gaps run out"))?;
            out.extend_from_slice(take(gap_bytes, &mut g, len)?);
        }
        let old = &base[o..o + BLOCK];
        let mut h = [0u8; BLOCK];
        h.copy_from_slice(old);
        let mtime: Option<[u8; 12]> =
            match flag & (FLAG_MTIME | FLAG_MTIME_AS_LAST | FLAG_MTIME_SHIFTED) {
                0 => None,
                FLAG_MTIME => {
                    let f = mtimes.next().ok_or_else(|| corrupt("mtimes run out"))?;
                    let mut a = [0u8; 12];
                    a.copy_from_slice(f);
                    Some(a)
                }
                FLAG_MTIME_AS_LAST => Some(trend.last.ok_or_else(|| corrupt("no mtime before"))?),
                FLAG_MTIME_SHIFTED => Some(
                    trend
                        .shifted(&old[MTIME])
                        .ok_or_else(|| corrupt("mtime cannot be shifted"))?,
                ),
                _ => return Err(corrupt("two mtime flags")),
            };
        if let Some(m) = mtime {
            h[MTIME].copy_from_slice(&m);
        }
        trend.update(&old[MTIME], &h[MTIME]);
        if flag & FLAG_CHKSUM != 0 {
            h[CHKSUM].copy_from_slice(sums.next().ok_or_else(|| corrupt("checksums run out"))?);
        } else {
            let f = checksum_like(&old[CHKSUM], &h)
                .ok_or_else(|| corrupt("old header's checksum field has no number"))?;
            h[CHKSUM].copy_from_slice(&f);
        }
        out.extend_from_slice(&h);
        if out.len() > raw_len {
            return Err(corrupt("longer than announced"));
        }
        base_end = o + BLOCK;
        prev = i as i64;
    }
    out.extend_from_slice(&gap_bytes[g..]);
    if out.len() != raw_len {
        return Err(Error::Corrupt(format!(
            "header delta rebuilt {} bytes where {raw_len} were announced",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::TarWriter;

    /// A tar of `n` files whose headers carry `mtime`, each file's content
    /// `size` bytes.
    fn tar(n: usize, mtime: u64, size: usize) -> Vec<u8> {
        let mut t = TarWriter::new(Vec::new());
        for i in 0..n {
            t.file(
                &format!("usr/lib/python3/m{i}.pyc"),
                0o644,
                mtime,
                &vec![b'x'; size],
            )
            .expect("tar");
        }
        t.finish().expect("tar");
        t.into_inner()
    }

    /// `target` as a header delta against `base`, checked to decode back to
    /// exactly `target`.
    fn round_trip(base: &[u8], target: &[u8]) -> Vec<u8> {
        let d = encode(base, target)
            .expect("encode")
            .expect("headers match");
        assert!(d.starts_with(MAGIC));
        let back = crate::delta::decode(base, &d, target.len()).expect("decode");
        assert!(back == target, "rebuilt bytes differ");
        d
    }

    #[test]
    fn new_mtimes_cost_almost_nothing_per_header() {
        let base = tar(200, 1_700_000_000, 10);
        let target = tar(200, 1_700_086_400, 10);
        assert_eq!(base.len(), target.len());
        let d = round_trip(&base, &target);
        // 200 headers changed; zstd's own delta of the same bytes is the bar.
        let plain = crate::delta::encode_headers(&base, &target).expect("zstd");
        assert!(
            d.len() * 4 < plain.len(),
            "header delta {} bytes, zstd delta {}",
            d.len(),
            plain.len()
        );
    }

    /// Files keep their mtimes' spread and all move by the same time, as
    /// when a build runs again later: the shift predicts every header.
    #[test]
    fn mtimes_moved_by_one_shift_cost_almost_nothing_per_header() {
        let build = |t: u64| {
            let mut w = TarWriter::new(Vec::new());
            for i in 0..300u64 {
                let jitter = (i * 7919) % 97;
                w.file(&format!("app/f{i}.py"), 0o644, t + jitter, &[b'z'; 40])
                    .expect("tar");
            }
            w.finish().expect("tar");
            w.into_inner()
        };
        let (base, target) = (build(1_650_000_000), build(1_650_003_600));
        let d = round_trip(&base, &target);
        // 300 headers, each with a new mtime and checksum.
        assert!(d.len() < 150, "{} bytes for 300 shifted headers", d.len());
    }

    #[test]
    fn headers_that_changed_otherwise_and_new_files_go_as_gaps() {
        let base = tar(50, 1_700_000_000, 10);
        let mut t = TarWriter::new(Vec::new());
        for i in 0..60 {
            // A new size for every fifth file, new files past the 50th.
            let size = if i % 5 == 0 { 700 } else { 10 };
            t.file(
                &format!("usr/lib/python3/m{i}.pyc"),
                0o644,
                1_700_000_999,
                &vec![b'y'; size],
            )
            .expect("tar");
        }
        t.finish().expect("tar");
        let target = t.into_inner();
        round_trip(&base, &target);
    }

    #[test]
    fn chunks_cut_anywhere_round_trip() {
        // Skeleton chunks start and end mid-header: partial headers are gaps.
        let base = tar(100, 1_600_000_000, 3);
        let target = tar(100, 1_600_000_060, 3);
        for (a, b) in [
            (0, 10_000),
            (77, 20_000),
            (300, target.len()),
            (5_000, 5_600),
        ] {
            let t = &target[a..b.min(target.len())];
            let bs = &base[a.saturating_sub(900)..];
            match encode(bs, t).expect("encode") {
                Some(d) => {
                    let back = crate::delta::decode(bs, &d, t.len()).expect("decode");
                    assert!(back == t, "slice {a}..{b} rebuilt wrong");
                }
                None => assert!(t.len() < 2 * BLOCK, "no header found in {a}..{b}"),
            }
        }
    }

    #[test]
    fn a_checksum_written_in_another_style_is_sent_and_kept() {
        let base = tar(20, 1_700_000_000, 1);
        let mut target = tar(20, 1_700_000_500, 1);
        // Rewrite the first header's checksum as 7 digits and a NUL
        // (valid, but not the style of its old version).
        let sum = checksum_sums(&target[..BLOCK]).0;
        target[CHKSUM].copy_from_slice(format!("{sum:07o}\0").as_bytes());
        assert!(checksum_ok(&target[..BLOCK]));
        round_trip(&base, &target);
    }

    #[test]
    fn corrupt_header_deltas_are_errors_not_panics() {
        let base = tar(30, 1_700_000_000, 5);
        let target = tar(30, 1_700_000_001, 5);
        let d = encode(&base, &target).expect("encode").expect("match");
        // Cut anywhere, or decoded against another base or length: an
        // error or wrong bytes (which the receiver's BLAKE3 check rejects),
        // never a panic.
        for cut in [4, 5, d.len() / 2, d.len() - 1] {
            let _ = crate::delta::decode(&base, &d[..cut], target.len());
        }
        let _ = crate::delta::decode(&base[..1000], &d, target.len());
        let _ = crate::delta::decode(&base, &d, target.len() + 1);
        assert!(crate::delta::decode(&base, &d, target.len() - 1).is_err());
        // A hand-made body whose reference points past the base.
        let mut r = Vec::new();
        put_varint(&mut r, 1);
        put_varint(&mut r, zigzag(1 << 40));
        r.push(0);
        put_varint(&mut r, 0);
        let mut bad = MAGIC.to_vec();
        bad.extend(zstd::bulk::compress(&r, 3).expect("zstd"));
        let e = crate::delta::decode(&base, &bad, 1024).expect_err("must fail");
        assert!(e.to_string().contains("does not have"), "{e}");
    }
}
