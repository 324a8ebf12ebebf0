//! zstd layers stored by their decompressed content, rebuilt by compressing
//! it again with the parameters that made them.
//!
//! libzstd is deterministic: the same library version, level and frame
//! parameters give the same bytes from the same plaintext, whether the input
//! arrives in one piece or many (without flushes), and in multithreaded mode
//! (`nbWorkers > 0`) whatever the number of workers. So a frame made by
//! libzstd (the `zstd` CLI, the zstd crate, python-zstandard, ...) is
//! reproducible from its plaintext and a few parameters: the level, whether
//! it was compressed multithreaded, whether the size was pledged, and the
//! header flags (checksum, content size), which are read from the frame
//! header (RFC 8878 §3.1.1.1) rather than guessed.
//!
//! `add` finds the parameters by trying candidates in turn, compressing the
//! plaintext in streaming mode and comparing the output with the original as
//! it is produced: a wrong guess stops at its first differing byte, usually
//! in the first block. A frame is stored decompressed only when one candidate
//! reproduces every byte of it, and the whole member is rebuilt once more from
//! exactly what is stored before it is trusted (as for gzip, `ingest`). The
//! records are part of the gzip reconstruction stream (spec/FORMAT.md §8.5).

use crate::error::{Error, Result};
use crate::skeleton::put_varint;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use zstd::zstd_safe::{self, zstd_sys::ZSTD_EndDirective, CCtx, CParameter, InBuffer, OutBuffer};

/// Record tag of a zstd frame in the reconstruction stream.
pub const TAG_ZSTD: u8 = 0x04;
/// Flag bits of a ZSTD record.
pub const F_CHECKSUM: u8 = 0x01;
pub const F_CONTENT_SIZE: u8 = 0x02;
pub const F_PLEDGE: u8 = 0x04;
pub const F_MT: u8 = 0x08;
pub const F_ONE_SHOT: u8 = 0x10;
const F_KNOWN: u8 = F_CHECKSUM | F_CONTENT_SIZE | F_PLEDGE | F_MT | F_ONE_SHOT;
/// Largest frame plaintext compressed in one shot (`ZSTD_compress2`), which
/// holds the whole plaintext in memory; readers reject larger ones.
pub const MAX_ONE_SHOT: u64 = 32 << 20;

/// Levels tried, most common first. Levels 20–22 (`--ultra`) need windows
/// of up to 128 MiB and are left out to keep memory bounded.
const LEVELS: &[i32] = &[
    3, 1, 19, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, -1, -2, -3, -4, -5, -6, -7,
];
/// Lowest and highest level a reader accepts in a record.
pub const MIN_LEVEL: i32 = -131_072;
pub const MAX_LEVEL: i32 = 22;
/// A candidate that reproduced at least this many bytes before diverging is
/// taken to have the right level; only its multithreaded twin is tried next.
const NEAR: u64 = 32 << 10;
/// Candidates tried per member, all frames together, before giving up.
const MAX_TRIALS: usize = 200;
/// Candidates that may run past their first MiB of output per member
/// (each costs up to a full compression of its frame).
const MAX_DEEP_TRIALS: usize = 4;
const PIECE: usize = 1 << 20;

/// Whether `b` starts a skippable frame (magic 0x184D2A50–5F).
pub fn is_skippable(b: &[u8]) -> bool {
    b.len() >= 4 && b[0] & 0xf0 == 0x50 && b[1..4] == [0x2a, 0x4d, 0x18]
}

/// How to compress one frame again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub level: i32,
    /// `ZSTD_c_checksumFlag`.
    pub checksum: bool,
    /// `ZSTD_c_contentSizeFlag`.
    pub content_size: bool,
    /// The plaintext length was pledged before compressing.
    pub pledge: bool,
    /// Multithreaded mode (`ZSTD_c_nbWorkers` = 1).
    pub mt: bool,
    /// The whole plaintext in one call (`ZSTD_compress2`), which cuts blocks
    /// differently from streaming; implies a pledged size.
    pub one_shot: bool,
}

impl Params {
    pub fn flags(&self) -> u8 {
        (self.checksum as u8 * F_CHECKSUM)
            | (self.content_size as u8 * F_CONTENT_SIZE)
            | (self.pledge as u8 * F_PLEDGE)
            | (self.mt as u8 * F_MT)
            | (self.one_shot as u8 * F_ONE_SHOT)
    }

    pub fn from_flags(level: i32, flags: u8) -> std::result::Result<Params, String> {
        if flags & !F_KNOWN != 0 {
            return Err(format!("unknown ZSTD record flags {flags:#04x}"));
        }
        if !(MIN_LEVEL..=MAX_LEVEL).contains(&level) {
            return Err(format!("ZSTD record level {level} out of range"));
        }
        Ok(Params {
            level,
            checksum: flags & F_CHECKSUM != 0,
            content_size: flags & F_CONTENT_SIZE != 0,
            pledge: flags & F_PLEDGE != 0,
            mt: flags & F_MT != 0,
            one_shot: flags & F_ONE_SHOT != 0,
        })
    }

    /// What `wharf info` shows: `level 19, checksum, content size, multithreaded`.
    pub fn describe(&self) -> String {
        let mut s = format!("level {}", self.level);
        for (on, word) in [
            (self.checksum, "checksum"),
            (self.content_size, "content size"),
            (self.pledge && !self.content_size, "size pledged"),
            (self.mt, "multithreaded"),
            (self.one_shot, "one shot"),
        ] {
            if on {
                s.push_str(", ");
                s.push_str(word);
            }
        }
        s
    }

    /// The record (tag included) for a frame of `plain` plaintext bytes.
    pub fn record(&self, plain: u64) -> Vec<u8> {
        let mut r = vec![TAG_ZSTD];
        put_varint(&mut r, plain);
        put_varint(&mut r, zigzag(self.level));
        r.push(self.flags());
        put_varint(&mut r, zstd_safe::version_number() as u64);
        r
    }
}

pub fn zigzag(v: i32) -> u64 {
    ((v << 1) ^ (v >> 31)) as u32 as u64
}

pub fn unzigzag(v: u64) -> Option<i32> {
    let v = u32::try_from(v).ok()?;
    Some(((v >> 1) as i32) ^ -((v & 1) as i32))
}

/// Compresses one frame from plaintext pushed in pieces of any size.
pub struct FrameCompressor {
    cctx: CCtx<'static>,
    left: u64,
    buf: Vec<u8>,
    /// The plaintext of a one-shot frame, compressed at `finish`.
    whole: Option<Vec<u8>>,
}

fn zerr(what: &str, code: usize) -> Error {
    Error::Corrupt(format!(
        "zstd reconstruction: {what}: {}",
        zstd_safe::get_error_name(code)
    ))
}

impl FrameCompressor {
    pub fn new(p: &Params, plain_len: u64) -> Result<FrameCompressor> {
        let mut cctx = CCtx::try_create()
            .ok_or_else(|| Error::Corrupt("zstd: cannot create a context".into()))?;
        let set = |c: &mut CCtx, param| c.set_parameter(param).map_err(|e| zerr("parameter", e));
        set(&mut cctx, CParameter::CompressionLevel(p.level))?;
        set(&mut cctx, CParameter::ChecksumFlag(p.checksum))?;
        set(&mut cctx, CParameter::ContentSizeFlag(p.content_size))?;
        set(&mut cctx, CParameter::NbWorkers(p.mt as u32))?;
        if p.one_shot && plain_len > MAX_ONE_SHOT {
            return Err(Error::Corrupt(format!(
                "zstd reconstruction: one-shot frame of {plain_len} bytes"
            )));
        }
        if p.pledge && !p.one_shot {
            cctx.set_pledged_src_size(Some(plain_len))
                .map_err(|e| zerr("pledged size", e))?;
        }
        Ok(FrameCompressor {
            cctx,
            left: plain_len,
            buf: vec![0u8; 256 << 10],
            whole: p.one_shot.then(|| Vec::with_capacity(plain_len as usize)),
        })
    }

    /// Plaintext this frame still takes.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    pub fn push(&mut self, b: &[u8], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if b.len() as u64 > self.left {
            return Err(Error::Corrupt(
                "zstd reconstruction: more plaintext than the frame takes".into(),
            ));
        }
        self.left -= b.len() as u64;
        if let Some(w) = self.whole.as_mut() {
            w.extend_from_slice(b);
            return Ok(());
        }
        let mut inb = InBuffer::around(b);
        while inb.pos < b.len() {
            let mut o = OutBuffer::around(&mut self.buf[..]);
            self.cctx
                .compress_stream2(&mut o, &mut inb, ZSTD_EndDirective::ZSTD_e_continue)
                .map_err(|e| zerr("compress", e))?;
            let n = o.pos();
            if n > 0 {
                out(&self.buf[..n])?;
            }
        }
        Ok(())
    }

    pub fn finish(mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if self.left != 0 {
            return Err(Error::Corrupt(format!(
                "zstd reconstruction: frame ended {} plaintext bytes early",
                self.left
            )));
        }
        if let Some(w) = self.whole.take() {
            let mut dst = Vec::with_capacity(zstd_safe::compress_bound(w.len()));
            self.cctx
                .compress2(&mut dst, &w)
                .map_err(|e| zerr("compress", e))?;
            return out(&dst);
        }
        loop {
            let mut inb = InBuffer::around(&[][..]);
            let mut o = OutBuffer::around(&mut self.buf[..]);
            let more = self
                .cctx
                .compress_stream2(&mut o, &mut inb, ZSTD_EndDirective::ZSTD_e_end)
                .map_err(|e| zerr("compress", e))?;
            let n = o.pos();
            if n > 0 {
                out(&self.buf[..n])?;
            }
            if more == 0 {
                return Ok(());
            }
        }
    }
}

/// What the frame header (RFC 8878 §3.1.1.1) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub checksum: bool,
    pub content_size: Option<u64>,
    pub single_segment: bool,
    pub dict_id: u32,
    /// Header length, magic included.
    pub len: usize,
}

/// Parses the frame header at the start of `b`: `Ok(None)` when `b` is too
/// short, `Err` when it is not a frame header.
pub fn parse_header(b: &[u8]) -> std::result::Result<Option<FrameHeader>, String> {
    if b.len() < 5 {
        return Ok(None);
    }
    if !crate::gzip::is_zstd(b) {
        return Err("not a zstd frame".into());
    }
    let fhd = b[4];
    if fhd & 0x08 != 0 {
        return Err("zstd frame header has its reserved bit set".into());
    }
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0usize, 1, 2, 4][(fhd & 3) as usize];
    let fcs_len = match fhd >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut at = 5 + (!single_segment) as usize;
    let Some(d) = b.get(at..at + dict_len) else {
        return Ok(None);
    };
    let dict_id = d.iter().rev().fold(0u32, |acc, &x| (acc << 8) | x as u32);
    at += dict_len;
    let Some(f) = b.get(at..at + fcs_len) else {
        return Ok(None);
    };
    let mut fcs = f.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    if fcs_len == 2 {
        fcs += 256;
    }
    Ok(Some(FrameHeader {
        checksum: fhd & 0x04 != 0,
        content_size: (fcs_len > 0).then_some(fcs),
        single_segment,
        dict_id,
        len: at + fcs_len,
    }))
}

/// One frame of a member.
#[derive(Clone, Debug)]
pub struct Frame {
    pub off: u64,
    pub len: u64,
    pub plain_len: u64,
    pub header: FrameHeader,
}

/// A member every frame of which is reproducible.
#[derive(Clone, Debug)]
pub struct ZPlan {
    pub frames: Vec<(Frame, Params)>,
    /// Bytes after the last frame (kept as literals).
    pub tail_len: u64,
    pub plain_len: u64,
}

impl ZPlan {
    /// `level 3, checksum` when every frame has the same parameters, else
    /// those of the first and how many differ.
    pub fn describe(&self) -> String {
        let Some((_, first)) = self.frames.first() else {
            return String::new();
        };
        let others = self.frames.iter().filter(|(_, p)| p != first).count();
        match others {
            0 => first.describe(),
            n => format!(
                "{} (and {n} frame(s) with other parameters)",
                first.describe()
            ),
        }
    }
}

/// Reads a spooled member from `off`, tracking the offset.
struct Spool {
    f: BufReader<File>,
}

impl Spool {
    fn open(path: &Path, off: u64) -> Result<Spool> {
        let mut f = File::open(path).map_err(Error::Stream)?;
        f.seek(SeekFrom::Start(off)).map_err(Error::Stream)?;
        Ok(Spool {
            f: BufReader::with_capacity(PIECE, f),
        })
    }
}

/// Pass one over a spooled member of `len` bytes that starts with zstd
/// magic: finds its frames and, for each, parameters that reproduce it.
/// Only I/O errors are errors; anything about the data is a fallback reason.
pub fn analyze(spool: &Path, len: u64) -> Result<std::result::Result<ZPlan, String>> {
    let frames = match scan(spool, len)? {
        Ok(f) => f,
        Err(why) => return Ok(Err(why)),
    };
    let end = frames.last().map(|f| f.off + f.len).unwrap_or(0);
    let mut trials = Trials::default();
    let mut plan = ZPlan {
        frames: Vec::new(),
        tail_len: len - end,
        plain_len: frames.iter().map(|f| f.plain_len).sum(),
    };
    let mut last: Option<Params> = None;
    for (i, frame) in frames.into_iter().enumerate() {
        match detect(spool, &frame, last, &mut trials)? {
            Ok(p) => {
                last = Some(p);
                plan.frames.push((frame, p));
            }
            Err(why) => {
                return Ok(Err(if i == 0 {
                    why
                } else {
                    format!("frame {}: {why}", i + 1)
                }))
            }
        }
    }
    Ok(Ok(plan))
}

/// Finds the frames: decodes each (discarding the output) to learn where it
/// ends and how much plaintext it holds.
fn scan(path: &Path, len: u64) -> Result<std::result::Result<Vec<Frame>, String>> {
    let mut f = File::open(path).map_err(Error::Stream)?;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; PIECE];
    let mut out = vec![0u8; PIECE];
    let mut off = 0u64;
    let mut dctx = zstd_safe::DCtx::try_create()
        .ok_or_else(|| Error::Invalid("zstd: cannot create a context".into()))?;
    while off < len {
        f.seek(SeekFrom::Start(off)).map_err(Error::Stream)?;
        let n = crate::ingest::read_full(&mut f, &mut buf[..18.min((len - off) as usize)])?;
        let head = &buf[..n];
        if !crate::gzip::is_zstd(head) {
            if frames.is_empty() {
                return Ok(Err("not a zstd frame".into()));
            }
            if is_skippable(head) {
                return Ok(Err(
                    "a skippable frame follows the zstd frames (not regenerated)".into(),
                ));
            }
            break; // the tail: bytes after the last frame
        }
        let header = match parse_header(head) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Err("zstd frame header cut short".into())),
            Err(e) => return Ok(Err(e)),
        };
        if header.dict_id != 0 {
            return Ok(Err(format!(
                "zstd frame uses dictionary {} (not regenerated)",
                header.dict_id
            )));
        }
        f.seek(SeekFrom::Start(off)).map_err(Error::Stream)?;
        dctx.reset(zstd_safe::ResetDirective::SessionOnly)
            .map_err(|e| Error::Invalid(zstd_safe::get_error_name(e).into()))?;
        let mut plain = 0u64;
        let mut pos = off;
        let done = 'frame: loop {
            let want = (len - pos).min(PIECE as u64) as usize;
            let n = crate::ingest::read_full(&mut f, &mut buf[..want])?;
            if n == 0 {
                break false;
            }
            let mut inb = InBuffer::around(&buf[..n]);
            loop {
                let mut o = OutBuffer::around(&mut out[..]);
                let r = dctx.decompress_stream(&mut o, &mut inb);
                plain += o.pos() as u64;
                match r {
                    Err(e) => {
                        return Ok(Err(format!(
                            "zstd frame at offset {off}: {}",
                            zstd_safe::get_error_name(e)
                        )))
                    }
                    Ok(0) => {
                        pos += inb.pos as u64;
                        break 'frame true;
                    }
                    Ok(_) if inb.pos == n && o.pos() < out.len() => break,
                    Ok(_) => {}
                }
            }
            pos += n as u64;
        };
        if !done {
            return Ok(Err("zstd frame cut short".into()));
        }
        if header.content_size.is_some_and(|c| c != plain) {
            return Ok(Err("zstd frame content size is wrong".into()));
        }
        frames.push(Frame {
            off,
            len: pos - off,
            plain_len: plain,
            header,
        });
        off = pos;
    }
    Ok(Ok(frames))
}

#[derive(Default)]
struct Trials {
    all: usize,
    deep: usize,
}

enum Trial {
    Match,
    /// Bytes of the frame reproduced before the first difference.
    Diverged(u64),
}

/// Finds parameters that reproduce `frame`, or why none do.
fn detect(
    spool: &Path,
    frame: &Frame,
    last: Option<Params>,
    trials: &mut Trials,
) -> Result<std::result::Result<Params, String>> {
    let h = &frame.header;
    // (pledge, content size flag) the header allows: a size in the header
    // means it was pledged; none, that it was not, or was with the flag off.
    let sizes: &[(bool, bool)] = if h.content_size.is_some() {
        &[(true, true)]
    } else {
        &[(false, false), (true, false)]
    };
    let mut candidates: Vec<Params> = last.into_iter().collect();
    for &level in LEVELS {
        for &(pledge, content_size) in sizes {
            let p = Params {
                level,
                checksum: h.checksum,
                content_size,
                pledge,
                mt: false,
                one_shot: false,
            };
            if Some(p) != last {
                candidates.push(p);
            }
        }
    }
    // Multithreaded mode (the zstd CLI's default) cuts the input into jobs
    // and can differ from the first block on; a wrong guess costs a job (2–8
    // MiB of plaintext at these levels), so only the CLI's usual levels are
    // tried blind. Others are found by their single-threaded twin (`NEAR`).
    for level in [3, 1] {
        for &(pledge, content_size) in sizes {
            candidates.push(Params {
                level,
                checksum: h.checksum,
                content_size,
                pledge,
                mt: true,
                one_shot: false,
            });
        }
    }
    let mut best: Option<(Params, u64)> = None;
    let mut i = 0;
    while i < candidates.len() {
        let p = candidates[i];
        i += 1;
        if trials.all >= MAX_TRIALS || trials.deep >= MAX_DEEP_TRIALS {
            break;
        }
        trials.all += 1;
        match trial(spool, frame, &p)? {
            Trial::Match => return Ok(Ok(p)),
            Trial::Diverged(at) => {
                if at >= PIECE as u64 {
                    trials.deep += 1;
                }
                if best.is_none_or(|(_, b)| at > b) {
                    best = Some((p, at));
                }
                if at >= NEAR && !p.mt && !p.one_shot {
                    // The level is right, the mode is not: the multithreaded
                    // and one-shot twins next, and nothing else after them.
                    candidates.truncate(i);
                    candidates.push(Params { mt: true, ..p });
                    if p.pledge && frame.plain_len <= MAX_ONE_SHOT {
                        candidates.push(Params {
                            one_shot: true,
                            ..p
                        });
                    }
                } else if at >= NEAR && i >= candidates.len() {
                    break;
                }
            }
        }
    }
    Ok(Err(match best {
        Some((p, at)) if at >= NEAR => format!(
            "no libzstd parameters reproduce this frame ({} matches its first {at} of {} bytes)",
            p.describe(),
            frame.len
        ),
        _ if trials.all >= MAX_TRIALS || trials.deep >= MAX_DEEP_TRIALS => {
            "no libzstd parameters reproduce this frame (detection budget spent)".into()
        }
        _ => "no libzstd parameters reproduce this frame (not made by libzstd, or with options wharf does not try)".into(),
    }))
}

/// Compresses the frame's plaintext with `p`, comparing as it goes.
fn trial(spool: &Path, frame: &Frame, p: &Params) -> Result<Trial> {
    let src = Spool::open(spool, frame.off)?;
    let mut plain = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
        256 << 10,
        src.f.into_inner().take(frame.len),
    ))
    .map_err(Error::Stream)?
    .single_frame();
    let mut orig = Spool::open(spool, frame.off)?.f.take(frame.len);
    let mut c = FrameCompressor::new(p, frame.plain_len)?;
    let mut matched = 0u64;
    let mut cmp = vec![0u8; 256 << 10];
    let mut buf = vec![0u8; PIECE];
    let mut diverged = false;
    let mut compare = |b: &[u8]| -> Result<()> {
        if diverged {
            return Ok(());
        }
        let mut b = b;
        while !b.is_empty() {
            let n = b.len().min(cmp.len());
            let got = crate::ingest::read_full(&mut orig, &mut cmp[..n])?;
            let same = cmp[..got]
                .iter()
                .zip(&b[..got])
                .position(|(x, y)| x != y)
                .unwrap_or(got);
            matched += same as u64;
            if same < n {
                diverged = true;
                // Stop the compressor: nothing after this is worth making.
                return Err(Error::Invalid("diverged".into()));
            }
            b = &b[n..];
        }
        Ok(())
    };
    let mut fed = 0u64;
    let res = (|| -> Result<()> {
        loop {
            let n = crate::ingest::read_full(&mut plain, &mut buf)?;
            if n == 0 {
                break;
            }
            fed += n as u64;
            if fed > frame.plain_len {
                return Err(Error::Invalid("diverged".into()));
            }
            c.push(&buf[..n], &mut compare)?;
        }
        c.finish(&mut compare)
    })();
    if diverged {
        return Ok(Trial::Diverged(matched));
    }
    match res {
        // Every byte produced matched; it is a match only if the original
        // has nothing more.
        Ok(()) if matched == frame.len => Ok(Trial::Match),
        // A decoding or disk error counts as a miss: the fallback reads the
        // spool again and reports a real I/O error there.
        Ok(()) | Err(_) => Ok(Trial::Diverged(matched)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips() {
        for l in [MIN_LEVEL, -7, -1, 0, 1, 3, 19, MAX_LEVEL] {
            assert_eq!(unzigzag(zigzag(l)), Some(l));
        }
        assert_eq!((zigzag(3), zigzag(-1)), (6, 1));
        assert_eq!(unzigzag(1 << 40), None);
    }

    #[test]
    fn flags_and_levels_are_checked() {
        let p = Params::from_flags(19, F_CHECKSUM | F_MT).unwrap();
        assert!(p.checksum && p.mt && !p.pledge && !p.content_size && !p.one_shot);
        assert_eq!(p.flags(), F_CHECKSUM | F_MT);
        assert!(Params::from_flags(3, 0x20).is_err());
        assert!(Params::from_flags(23, 0).is_err());
        assert!(Params::from_flags(MIN_LEVEL - 1, 0).is_err());
    }

    #[test]
    fn frame_headers() {
        // Single segment, 1-byte content size 200, checksum.
        let h = parse_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x24, 200])
            .unwrap()
            .unwrap();
        assert_eq!((h.checksum, h.content_size, h.len), (true, Some(200), 6));
        // Window descriptor, 2-byte content size (+256), 1-byte dictionary id.
        let h = parse_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x41, 0x58, 7, 1, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.dict_id, h.content_size, h.len), (7, Some(257), 9));
        assert_eq!(
            parse_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x41, 0x58]),
            Ok(None)
        );
        assert!(parse_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x08, 0x58]).is_err());
        assert!(is_skippable(&[0x5e, 0x2a, 0x4d, 0x18]));
        assert!(!is_skippable(&[0x28, 0xb5, 0x2f, 0xfd]));
    }
}
