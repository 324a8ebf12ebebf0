//! gzip members stored by their decompressed content, rebuilt to the exact
//! compressed bytes.
//!
//! A gzip layer is a deflate stream of a tar. Chunking the compressed bytes
//! finds almost nothing in common between two versions (one changed byte
//! changes the rest of the stream), so `add` stores the *plaintext* (through
//! the same tar-aware walk as any layer) and, beside it, a *reconstruction
//! stream*: the gzip headers and trailers verbatim, and for each piece of each
//! deflate stream the corrections preflate-rs needs to regenerate the exact
//! deflate bytes from the plaintext. The encoding is specified in
//! `spec/FORMAT.md` §8.5.
//!
//! Every choice is checked when it is made: `add` keeps the decompressed form
//! only after rebuilding the compressed bytes from exactly what it stores and
//! comparing their SHA-256 with the original's. Otherwise (preflate cannot
//! model the compressor, the stream is truncated or corrupt, or the
//! reconstruction data would exceed a tenth of the compressed size) the
//! member is stored as plain chunks, as any other blob.
//!
//! Memory stays bounded whatever the layer's size: preflate is fed about
//! [`WINDOW`] compressed bytes at a time and keeps only a 32 KiB dictionary
//! between calls; the compressed member is spooled to a scratch file (the input
//! is a pipe and cannot be read twice), and so is the reconstruction data until
//! it is known to be worth keeping.

use crate::error::{Error, IoContext, Result};
use crate::skeleton::put_varint;
use preflate_rs::{
    DeflateTokenBlock, ExitCode, PieceEncoder, PreflateConfig, PreflateStreamProcessor,
    RecreateStreamProcessor, ResumeParameters,
};
use sha2::Digest;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Deepest hash-chain walk preflate models with `wharf add --gzip-deep`:
/// enough for klauspost/compress and pgzip (what `skopeo`, `podman` and
/// containers/image write), whose fast encoders take matches thousands of
/// hops down a full chain. Those streams cost about 5 MB/s of content to
/// analyse and again to rebuild on 2 cores, against 15–40 MB/s for zlib's
/// and Go's.
pub const DEEP_CHAIN: u32 = preflate_rs::MAX_CHAIN_ESTIMATE;
/// The default, stock preflate's model: zlib (gzip, pigz, Python) and Go's
/// compress/gzip at their usual levels fit in it; deeper streams are stored
/// as they are. Storing them by content saves bytes only where a link is
/// slow: on the corpus dep-bump pair made by skopeo, 23.5 MB instead of 33.4
/// MB for v2, for 42 s more to add and 52 s more to extract.
pub const FAST_CHAIN: u32 = 4096;

/// Magic at the start of every reconstruction stream.
pub const RECON_MAGIC: &[u8; 4] = b"WGZ1";
/// Record tags of the reconstruction stream.
pub const TAG_LIT: u8 = 0x01;
pub const TAG_START: u8 = 0x02;
pub const TAG_DEFLATE: u8 = 0x03;
/// Longest literal record.
pub const MAX_LIT: usize = 1 << 20;
/// Largest plaintext or correction length of one DEFLATE record; readers
/// reject larger ones (this bounds the memory a damaged stream can ask for).
pub const MAX_PIECE: u64 = 1 << 26;
/// The reconstruction stream may be at most this fraction (1/n) of the
/// compressed size; above it the member is stored as plain chunks.
pub const RECON_BUDGET_DIVISOR: u64 = 10;

/// Compressed bytes handed to preflate per call. Peak memory is a few times
/// the plaintext of one window (the plaintext, its tokens, the predictor's
/// hash chains), so this, not the layer size, bounds it.
const WINDOW: usize = 1 << 20;
/// Plaintext preflate may produce in one call. Deflate blocks of zlib and Go
/// hold at most 16,384 symbols (≤ 4.2 MB of plaintext); a block larger than
/// this makes the member fall back to plain chunks.
const PLAIN_LIMIT: usize = 16 << 20;
/// Largest window tried when one deflate block does not fit in [`WINDOW`].
const MAX_WINDOW: usize = 64 << 20;
/// Longest gzip header handled (FNAME, FCOMMENT and FEXTRA included).
const MAX_HEADER: usize = MAX_LIT;

/// Whether `b` starts a gzip member (ID1 ID2 CM=deflate).
pub fn is_gzip(b: &[u8]) -> bool {
    b.len() >= 3 && b[..3] == [0x1f, 0x8b, 0x08]
}

/// Whether `b` starts a zstd frame.
pub fn is_zstd(b: &[u8]) -> bool {
    b.len() >= 4 && b[..4] == [0x28, 0xb5, 0x2f, 0xfd]
}

/// Length of the gzip member header at the start of `b` (RFC 1952 §2.3):
/// `Ok(Some(n))` when complete, `Ok(None)` when `b` is too short to tell,
/// `Err` when it is not a header this module handles.
pub fn header_len(b: &[u8]) -> std::result::Result<Option<usize>, String> {
    if b.len() < 10 {
        return Ok(None);
    }
    if !is_gzip(b) {
        return Err("not a gzip member header".into());
    }
    let flg = b[3];
    if flg & 0xe0 != 0 {
        return Err(format!(
            "gzip header has reserved flag bits set ({flg:#04x})"
        ));
    }
    let mut at = 10usize;
    if flg & 0x04 != 0 {
        // FEXTRA: XLEN, then XLEN bytes.
        let Some(x) = b.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + u16::from_le_bytes([x[0], x[1]]) as usize;
        if at > b.len() {
            return Ok(None);
        }
    }
    for flag in [0x08u8, 0x10] {
        // FNAME, FCOMMENT: zero-terminated.
        if flg & flag != 0 {
            match b[at.min(b.len())..].iter().position(|&c| c == 0) {
                Some(p) => at += p + 1,
                None => return Ok(None),
            }
        }
    }
    if flg & 0x02 != 0 {
        at += 2; // FHCRC
    }
    Ok((at <= b.len()).then_some(at))
}

/// What pass one found: either a plan to store the member decompressed, or
/// why it must be stored as plain chunks.
pub struct Analysis {
    pub outcome: std::result::Result<Plan, String>,
    /// Length of the whole member.
    pub len: u64,
}

/// How a member that preflate can model is laid out.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Offset and length of each member's deflate stream in the member bytes
    /// (of each zstd frame, when `zstd`).
    pub deflate: Vec<(u64, u64)>,
    /// The streams are zstd frames (`crate::zstdlayer`), not deflate.
    pub zstd: bool,
    /// Length of the reconstruction stream written.
    pub recon_len: u64,
    /// Total plaintext length (all members).
    pub plain_len: u64,
    /// Bytes after the last member, kept as literals.
    pub tail_len: u64,
}

/// Pass one over a member that starts with gzip magic: reads all of `input`
/// (copying every byte to `spool`), runs preflate over each member's deflate
/// stream, and writes the reconstruction stream to `recon`. Only I/O errors
/// are errors; anything about the data itself is a fallback reason.
pub fn analyze(
    input: &mut dyn Read,
    spool: &mut dyn Write,
    recon: &mut dyn Write,
    max_chain: u32,
) -> Result<Analysis> {
    let mut a = Analyzer {
        max_chain,
        input,
        spool,
        recon: RecordWriter { out: recon, len: 0 },
        buf: Vec::with_capacity(WINDOW * 2),
        pos: 0,
        consumed: 0,
        eof: false,
    };
    let outcome = a.run()?;
    // Whatever happened, the whole member must pass through (and be spooled).
    loop {
        a.consumed += a.buf.len() as u64;
        a.buf.clear();
        a.pos = 0;
        if !a.fill(WINDOW)? {
            break;
        }
    }
    Ok(Analysis {
        outcome,
        len: a.consumed,
    })
}

pub(crate) struct RecordWriter<'a> {
    pub(crate) out: &'a mut dyn Write,
    pub(crate) len: u64,
}

impl RecordWriter<'_> {
    pub(crate) fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).map_err(Error::Stream)?;
        self.len += b.len() as u64;
        Ok(())
    }

    pub(crate) fn lit(&mut self, mut b: &[u8]) -> Result<()> {
        while !b.is_empty() {
            let n = b.len().min(MAX_LIT);
            let mut h = vec![TAG_LIT];
            put_varint(&mut h, n as u64);
            self.put(&h)?;
            self.put(&b[..n])?;
            b = &b[n..];
        }
        Ok(())
    }

    fn deflate(&mut self, plain: u64, corrections: &[u8]) -> Result<()> {
        let mut h = vec![TAG_DEFLATE];
        put_varint(&mut h, plain);
        put_varint(&mut h, corrections.len() as u64);
        self.put(&h)?;
        self.put(corrections)
    }
}

struct Analyzer<'a> {
    /// Deepest hash-chain walk preflate may model ([`FAST_CHAIN`], [`DEEP_CHAIN`]).
    max_chain: u32,
    input: &'a mut dyn Read,
    spool: &'a mut dyn Write,
    recon: RecordWriter<'a>,
    /// Bytes read but not yet consumed start at `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// Member bytes before `buf[0]`.
    consumed: u64,
    eof: bool,
}

type Outcome = std::result::Result<Plan, String>;

impl Analyzer<'_> {
    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads until at least `want` unconsumed bytes are buffered or the
    /// input ends; returns whether any unconsumed byte is buffered.
    fn fill(&mut self, want: usize) -> Result<bool> {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.consumed += self.pos as u64;
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while !self.eof && self.buf.len() - self.pos < want {
            let old = self.buf.len();
            let grow = (want - (old - self.pos)).max(256 << 10);
            self.buf.resize(old + grow, 0);
            let n = loop {
                match self.input.read(&mut self.buf[old..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e.into());
                    }
                }
            };
            self.buf.truncate(old + n);
            if n == 0 {
                self.eof = true;
            } else {
                self.spool
                    .write_all(&self.buf[old..old + n])
                    .map_err(Error::Stream)?;
            }
        }
        Ok(self.buf.len() > self.pos)
    }

    fn offset(&self) -> u64 {
        self.consumed + self.pos as u64
    }

    fn run(&mut self) -> Result<Outcome> {
        let mut plan = Plan {
            deflate: Vec::new(),
            zstd: false,
            recon_len: 0,
            plain_len: 0,
            tail_len: 0,
        };
        self.recon.put(RECON_MAGIC)?;
        loop {
            if !self.fill(18)? {
                break;
            }
            // A member header, or (after at least one member) the tail.
            let header = loop {
                match header_len(self.avail()) {
                    Ok(Some(n)) => break Ok(n),
                    Ok(None) if self.eof || self.avail().len() > MAX_HEADER => {
                        break Err("gzip header cut short".to_string())
                    }
                    Ok(None) => {
                        let want = self.avail().len() * 2;
                        self.fill(want)?;
                    }
                    Err(e) => break Err(e),
                }
            };
            let n = match header {
                Ok(n) => n,
                Err(e) if plan.deflate.is_empty() => return Ok(Err(e)),
                Err(_) => {
                    // Bytes after the last member that do not start another
                    // one (padding, garbage): kept as literals of exactly
                    // MAX_LIT bytes but the last, whatever the reads were.
                    while self.fill(MAX_LIT)? {
                        let n = self.avail().len().min(MAX_LIT);
                        if n < MAX_LIT && !self.eof {
                            continue;
                        }
                        let lit = self.avail()[..n].to_vec();
                        self.recon.lit(&lit)?;
                        plan.tail_len += n as u64;
                        self.pos += n;
                        if self.over_budget() {
                            return Ok(Err(self.budget_reason()));
                        }
                    }
                    break;
                }
            };
            let header = self.avail()[..n].to_vec();
            self.recon.lit(&header)?;
            self.pos += n;
            let start = self.offset();
            match self.deflate(&mut plan)? {
                Ok(()) => {}
                Err(e) => return Ok(Err(e)),
            }
            plan.deflate.push((start, self.offset() - start));
            self.fill(8)?;
            if self.avail().len() < 8 {
                return Ok(Err("gzip member cut short before its trailer".into()));
            }
            let trailer = self.avail()[..8].to_vec();
            self.recon.lit(&trailer)?;
            self.pos += 8;
        }
        plan.recon_len = self.recon.len;
        if self.over_budget_final() {
            return Ok(Err(self.budget_reason()));
        }
        Ok(Ok(plan))
    }

    /// Early abort: preflate is slow, so stop as soon as the data is clearly
    /// not worth it (with slack for the parameters at the start).
    fn over_budget(&self) -> bool {
        self.recon.len > self.offset() / RECON_BUDGET_DIVISOR + (64 << 10)
    }

    fn over_budget_final(&self) -> bool {
        self.recon.len > self.offset() / RECON_BUDGET_DIVISOR
    }

    fn budget_reason(&self) -> String {
        format!(
            "reconstruction data over budget ({} bytes for {} compressed bytes, limit 1/{RECON_BUDGET_DIVISOR})",
            self.recon.len,
            self.offset()
        )
    }

    /// One deflate stream, from `pos`, through preflate; writes its records.
    fn deflate(&mut self, plan: &mut Plan) -> Result<std::result::Result<(), String>> {
        self.recon.put(&[TAG_START])?;
        let config = PreflateConfig {
            plain_text_limit: PLAIN_LIMIT,
            // The caller rebuilds from what it stores and compares digests.
            verify_compression: false,
            max_chain_length: self.max_chain,
        };
        let mut p = PreflateStreamProcessor::new(&config);
        // Set after the first piece where later ones can be predicted each
        // from the plaintext before it, as they are rebuilt (`Rebuilder`):
        // on all cores, their records written in order.
        let mut resume: Option<ResumeParameters> = None;
        let mut predicting: VecDeque<(u64, PredictJob)> = VecDeque::new();
        let max_in_flight = pieces_at_once();
        let mut window = WINDOW;
        while !p.is_done() {
            self.fill(window)?;
            let take = self.avail().len().min(window);
            if take == 0 {
                return Ok(Err("deflate stream cut short".into()));
            }
            let slice = &self.buf[self.pos..self.pos + take];
            let res = catch_unwind(AssertUnwindSafe(|| match resume {
                Some(_) => p.parse_piece(slice).map(Piece::Parsed),
                None => p.decompress(slice).map(Piece::Predicted),
            }));
            let piece = match res {
                Err(_) => return Ok(Err("preflate panicked on this stream".into())),
                Ok(Ok(r)) if r.compressed_size() > 0 => r,
                Ok(Ok(_)) => return Ok(Err("preflate made no progress".into())),
                Ok(Err(e)) if e.exit_code() == ExitCode::ShortRead => {
                    // Not one whole block in the window: more input, or a
                    // larger window, or the stream is truncated.
                    if self.eof && take == self.avail().len() {
                        return Ok(Err("deflate stream cut short".into()));
                    }
                    if take == window {
                        if window >= MAX_WINDOW {
                            return Ok(Err(format!(
                                "a deflate block is longer than {MAX_WINDOW} bytes"
                            )));
                        }
                        window *= 2;
                    }
                    continue;
                }
                Ok(Err(e)) => return Ok(Err(self.preflate_reason(&e))),
            };
            let compressed_size = piece.compressed_size();
            let plain = match piece {
                Piece::Predicted(r) => {
                    let plain = p.plain_text().len() as u64;
                    if plain > MAX_PIECE || r.corrections.len() as u64 > MAX_PIECE {
                        return Ok(Err("a deflate piece is too large".into()));
                    }
                    self.recon.deflate(plain, &r.corrections)?;
                    resume = r.parameters.as_ref().and_then(ResumeParameters::of);
                    plain
                }
                Piece::Parsed(parsed) => {
                    let plain = parsed.plain_len() as u64;
                    if plain > MAX_PIECE {
                        return Ok(Err("a deflate piece is too large".into()));
                    }
                    while predicting.len() >= max_in_flight {
                        if let Err(why) = self.write_predicted(&mut predicting, true)? {
                            return Ok(Err(why));
                        }
                    }
                    let Some(params) = resume else {
                        return Ok(Err("deflate piece parsed before its parameters".into()));
                    };
                    let job = std::thread::Builder::new()
                        .name("wharf-preflate".into())
                        .spawn(move || {
                            catch_unwind(AssertUnwindSafe(|| parsed.predict(&params)))
                                .map_err(|_| "preflate panicked on this stream".to_string())
                                .and_then(|r| r.map_err(|e| format!("preflate: {e}")))
                        })
                        .map_err(Error::Stream)?;
                    predicting.push_back((plain, job));
                    if let Err(why) = self.write_predicted(&mut predicting, false)? {
                        return Ok(Err(why));
                    }
                    plain
                }
            };
            plan.plain_len += plain;
            self.pos += compressed_size;
            p.shrink_to_dictionary();
            window = WINDOW;
            if self.over_budget() {
                return Ok(Err(self.budget_reason()));
            }
        }
        while !predicting.is_empty() {
            if let Err(why) = self.write_predicted(&mut predicting, true)? {
                return Ok(Err(why));
            }
        }
        Ok(Ok(()))
    }

    /// Writes the DEFLATE records of pieces predicted on other threads, in
    /// order: those finished (`wait`: at least the oldest).
    fn write_predicted(
        &mut self,
        predicting: &mut VecDeque<(u64, PredictJob)>,
        mut wait: bool,
    ) -> Result<std::result::Result<(), String>> {
        while let Some((_, job)) = predicting.front() {
            if !wait && !job.is_finished() {
                break;
            }
            wait = false;
            let Some((plain, job)) = predicting.pop_front() else {
                break;
            };
            let corrections = match job.join() {
                Ok(Ok(c)) => c,
                Ok(Err(why)) => return Ok(Err(why)),
                Err(_) => return Ok(Err("preflate panicked on this stream".into())),
            };
            if corrections.len() as u64 > MAX_PIECE {
                return Ok(Err("a deflate piece is too large".into()));
            }
            self.recon.deflate(plain, &corrections)?;
        }
        Ok(Ok(()))
    }

    /// Why preflate could not model a stream, for `wharf info`.
    fn preflate_reason(&self, e: &preflate_rs::PreflateError) -> String {
        // The message ends with a source location on its own line.
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or_default();
        let hint = if self.max_chain < DEEP_CHAIN
            && (first.contains("max_chain") || first.contains("candidates"))
        {
            " (`wharf add --gzip-deep` models deeper match finders, slowly)"
        } else {
            ""
        };
        format!("preflate: {first}{hint}")
    }
}

/// How many pieces of one deflate stream are analysed or rebuilt at once:
/// one per core, but no more than [`MAX_PIECES_AT_ONCE`].
fn pieces_at_once() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, MAX_PIECES_AT_ONCE)
}

/// A piece in flight holds its plaintext (about 4 MB for a 1 MiB window of
/// zlib -6 output, at most [`PLAIN_LIMIT`]) and its tokens (about as much
/// again): eight bound a layer's share of memory to ~100 MB on a machine of
/// any size, and keep eight cores busy.
const MAX_PIECES_AT_ONCE: usize = 8;

/// A piece of a deflate stream as preflate's analysis returned it.
enum Piece {
    /// Predicted in line (the first piece of a stream, or every piece of a
    /// stream that cannot be resumed).
    Predicted(preflate_rs::PreflateStreamChunkResult),
    /// Parsed, its prediction left to another thread.
    Parsed(preflate_rs::ParsedPiece),
}

impl Piece {
    fn compressed_size(&self) -> usize {
        match self {
            Piece::Predicted(r) => r.compressed_size,
            Piece::Parsed(p) => p.compressed_size,
        }
    }
}

type PredictJob = std::thread::JoinHandle<std::result::Result<Vec<u8>, String>>;

/// Regenerates compressed bytes from a reconstruction stream (`recon`) and
/// the plaintext, pushed in pieces of any size. Shared by extract and by the
/// check `add` makes before it trusts the decompressed form.
///
/// With `independent` pieces (a gzip node that says so, FORMAT.md §8.5), the
/// pieces of a deflate stream whose compressor adds every position to its
/// dictionary are rebuilt on one thread per core (at most eight), each from
/// the 32 KiB of plaintext before it
/// ([`preflate_rs::RecreateStreamProcessor::resume`]), and encoded in order:
/// preflate re-runs the compressor's match finder, which on one core is far
/// slower than the disk or the network.
pub struct Rebuilder<R: Read> {
    recon: R,
    /// The DEFLATE record being filled: plaintext wanted, corrections, plaintext so far.
    cur: Option<(u64, Vec<u8>, Vec<u8>)>,
    deflate: Option<RecreateStreamProcessor>,
    /// The ZSTD record being compressed (`crate::zstdlayer`).
    zstd: Option<crate::zstdlayer::FrameCompressor>,
    /// Plaintext consumed so far, for error messages.
    plain_seen: u64,
    /// Whether pieces may be rebuilt independently (see above).
    independent: bool,
    /// The deflate stream being rebuilt, in independent mode.
    stream: Option<StreamState>,
    /// Output not yet written, in order: pieces still being rebuilt hold
    /// back whatever comes after them.
    queue: VecDeque<Pending>,
    /// Encodes the pieces of the current stream at the head of the queue.
    encoder: PieceEncoder,
    /// Most pieces rebuilt at once.
    max_in_flight: usize,
    /// Pieces rebuilt from the plaintext before them, for tests and reports.
    resumed: u64,
}

/// How far an independently rebuilt deflate stream has got.
struct StreamState {
    /// Set by the first piece when the later ones can be rebuilt alone.
    resume: Option<ResumeParameters>,
    pieces: u64,
    /// The last 32 KiB of the stream's plaintext so far, and its length.
    window: Vec<u8>,
    pos: u64,
}

type PieceJob = std::thread::JoinHandle<std::result::Result<Vec<DeflateTokenBlock>, String>>;

enum Pending {
    Bytes(Vec<u8>),
    /// A new deflate stream starts: its bits start on a fresh byte.
    NewStream,
    Piece(PieceJob),
}

/// Plaintext a resumed piece needs from before it.
const RESUME_WINDOW: usize = 32 << 10;

impl<R: Read> Rebuilder<R> {
    /// Rebuilds one piece after another, as preflate writes them.
    pub fn new(recon: R) -> Result<Self> {
        Self::with_pieces(recon, false)
    }

    /// `independent`: what the gzip node says of its pieces.
    pub fn with_pieces(mut recon: R, independent: bool) -> Result<Self> {
        let mut magic = [0u8; 4];
        recon.read_exact(&mut magic).map_err(|_| {
            Error::Corrupt("gzip reconstruction stream shorter than its magic".into())
        })?;
        if &magic != RECON_MAGIC {
            return Err(Error::Corrupt(format!(
                "gzip reconstruction stream starts with {magic:02x?}, not WGZ1"
            )));
        }
        Ok(Rebuilder {
            recon,
            cur: None,
            deflate: None,
            zstd: None,
            plain_seen: 0,
            independent,
            stream: None,
            queue: VecDeque::new(),
            encoder: PieceEncoder::new(),
            max_in_flight: pieces_at_once(),
            resumed: 0,
        })
    }

    /// How many pieces were rebuilt from the plaintext before them rather
    /// than from the state the previous piece left.
    pub fn pieces_resumed(&self) -> u64 {
        self.resumed
    }

    /// Queues output behind the pieces still being rebuilt, and writes
    /// whatever is ready.
    fn emit(&mut self, p: Pending, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if self.queue.is_empty() {
            if let Pending::Bytes(b) = &p {
                return out(b);
            }
        }
        self.queue.push_back(p);
        self.drain(out, false)
    }

    /// Writes queued output in order; `wait`: until the queue is empty,
    /// else only what is ready.
    fn drain(&mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>, wait: bool) -> Result<()> {
        while let Some(front) = self.queue.front() {
            if let Pending::Piece(h) = front {
                if !wait && !h.is_finished() {
                    return Ok(());
                }
            }
            match self.queue.pop_front() {
                Some(Pending::Bytes(b)) => out(&b)?,
                Some(Pending::NewStream) => self.encoder = PieceEncoder::new(),
                Some(Pending::Piece(h)) => {
                    let blocks = h
                        .join()
                        .unwrap_or_else(|_| Err("preflate panicked".into()))
                        .map_err(|e| Error::Corrupt(format!("gzip reconstruction: {e}")))?;
                    let bytes = self.encoder.encode(&blocks).map_err(|e| {
                        Error::Corrupt(format!("gzip reconstruction: preflate: {e}"))
                    })?;
                    out(&bytes)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.queue
            .iter()
            .filter(|p| matches!(p, Pending::Piece(_)))
            .count()
    }

    /// Starts rebuilding a piece on its own thread, once fewer than
    /// `max_in_flight` are.
    fn spawn_piece(
        &mut self,
        job: impl FnOnce() -> preflate_rs::Result<Vec<DeflateTokenBlock>> + Send + 'static,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        while self.in_flight() >= self.max_in_flight {
            // The oldest piece is the one the output waits for.
            let Some(i) = self
                .queue
                .iter()
                .position(|p| matches!(p, Pending::Piece(_)))
            else {
                break;
            };
            let mut rest = self.queue.split_off(i + 1);
            self.drain(out, true)?;
            self.queue.append(&mut rest);
        }
        let h = std::thread::Builder::new()
            .name("wharf-preflate".into())
            .spawn(move || {
                catch_unwind(AssertUnwindSafe(job))
                    .map_err(|_| "preflate panicked".to_string())
                    .and_then(|r| r.map_err(|e| format!("preflate: {e}")))
            })
            .map_err(Error::Stream)?;
        self.emit(Pending::Piece(h), out)
    }

    /// Feeds plaintext; compressed bytes come out through `out`.
    pub fn push(&mut self, mut b: &[u8], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        while !b.is_empty() {
            if let Some(z) = self.zstd.as_mut() {
                let take = (z.remaining().min(b.len() as u64)) as usize;
                z.push(&b[..take], out)?;
                b = &b[take..];
                self.plain_seen += take as u64;
                if z.remaining() == 0 {
                    if let Some(z) = self.zstd.take() {
                        z.finish(out)?;
                    }
                }
                continue;
            }
            if self.cur.is_none() && !self.advance(out)? {
                return Err(Error::Corrupt(format!(
                    "gzip plaintext is longer than its reconstruction data ({} bytes used)",
                    self.plain_seen
                )));
            }
            let Some((want, _, plain)) = self.cur.as_mut() else {
                continue;
            };
            let take = ((*want - plain.len() as u64) as usize).min(b.len());
            plain.extend_from_slice(&b[..take]);
            b = &b[take..];
            self.plain_seen += take as u64;
            if plain.len() as u64 == *want {
                self.flush(out)?;
            }
        }
        Ok(())
    }

    /// Emits the records after the last plaintext byte (trailer, tail) and
    /// checks that plaintext and reconstruction data ended together.
    pub fn finish(mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let ended = self.cur.is_none() && self.zstd.is_none() && !self.advance(out)?;
        self.drain(out, true)?;
        if !ended {
            return Err(Error::Corrupt(format!(
                "gzip plaintext ended after {} bytes, before its reconstruction data",
                self.plain_seen
            )));
        }
        Ok(())
    }

    /// Recompresses the completed DEFLATE record.
    fn flush(&mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let Some((_, corrections, plain)) = self.cur.take() else {
            return Ok(());
        };
        if self.deflate.is_none() {
            return Err(Error::Corrupt(
                "gzip reconstruction: DEFLATE record before any START".into(),
            ));
        }
        if let Some(st) = self.stream.as_mut() {
            let first = st.pieces == 0;
            if first {
                // Unreadable parameters are left to the one-by-one path,
                // which reports them.
                st.resume = ResumeParameters::of_first_piece(&corrections)
                    .ok()
                    .flatten();
            }
            st.pieces += 1;
            if let Some(params) = st.resume {
                self.resumed += u64::from(!first);
                let (window, pos) = (st.window.clone(), st.pos);
                st.pos += plain.len() as u64;
                let keep = RESUME_WINDOW
                    .saturating_sub(plain.len())
                    .min(st.window.len());
                st.window.drain(..st.window.len() - keep);
                st.window
                    .extend_from_slice(&plain[plain.len().saturating_sub(RESUME_WINDOW)..]);
                return self.spawn_piece(
                    move || {
                        let mut p = if first {
                            RecreateStreamProcessor::new()
                        } else {
                            RecreateStreamProcessor::resume(&params, &window, pos)?
                        };
                        p.recreate_tokens(&plain, &corrections)
                    },
                    out,
                );
            }
            // Not resumable: one by one below, as this stream began.
            self.stream = None;
        }
        let Some(d) = self.deflate.as_mut() else {
            return Err(Error::Corrupt(
                "gzip reconstruction: DEFLATE record before any START".into(),
            ));
        };
        let res = catch_unwind(AssertUnwindSafe(|| {
            d.recompress(&mut Cursor::new(&plain), &corrections)
        }));
        match res {
            Ok(Ok((bytes, _))) => self.emit(Pending::Bytes(bytes), out),
            Ok(Err(e)) => Err(Error::Corrupt(format!(
                "gzip reconstruction: preflate: {e}"
            ))),
            Err(_) => {
                self.deflate = None;
                Err(Error::Corrupt(
                    "gzip reconstruction: preflate panicked".into(),
                ))
            }
        }
    }

    /// Processes records up to the next DEFLATE record that needs plaintext;
    /// false at the end of the stream.
    fn advance(&mut self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<bool> {
        loop {
            let mut tag = [0u8; 1];
            if read_some(&mut self.recon, &mut tag)? == 0 {
                return Ok(false);
            }
            match tag[0] {
                TAG_LIT => {
                    let n = self.varint()?;
                    if n == 0 || n > MAX_LIT as u64 {
                        return Err(Error::Corrupt(format!(
                            "gzip reconstruction: literal of {n} bytes"
                        )));
                    }
                    let mut b = vec![0u8; n as usize];
                    self.exact(&mut b)?;
                    self.emit(Pending::Bytes(b), out)?;
                }
                TAG_START => {
                    self.deflate = Some(RecreateStreamProcessor::new());
                    if self.independent {
                        self.emit(Pending::NewStream, out)?;
                        self.stream = Some(StreamState {
                            resume: None,
                            pieces: 0,
                            window: Vec::new(),
                            pos: 0,
                        });
                    }
                }
                TAG_DEFLATE => {
                    let plain = self.varint()?;
                    let c = self.varint()?;
                    if plain > MAX_PIECE || c > MAX_PIECE {
                        return Err(Error::Corrupt(format!(
                            "gzip reconstruction: DEFLATE record of {plain}/{c} bytes"
                        )));
                    }
                    let mut corrections = vec![0u8; c as usize];
                    self.exact(&mut corrections)?;
                    self.cur = Some((plain, corrections, Vec::with_capacity(plain as usize)));
                    if plain > 0 {
                        return Ok(true);
                    }
                    self.flush(out)?;
                }
                crate::zstdlayer::TAG_ZSTD => {
                    let plain = self.varint()?;
                    let level = crate::zstdlayer::unzigzag(self.varint()?);
                    let mut flags = [0u8; 1];
                    self.exact(&mut flags)?;
                    let _libzstd_version = self.varint()?;
                    let params = level
                        .ok_or_else(|| "ZSTD record level out of range".to_string())
                        .and_then(|l| crate::zstdlayer::Params::from_flags(l, flags[0]))
                        .map_err(|e| Error::Corrupt(format!("zstd reconstruction: {e}")))?;
                    // zstd frames write straight to `out`: nothing may be
                    // waiting before them.
                    self.drain(out, true)?;
                    let z = crate::zstdlayer::FrameCompressor::new(&params, plain)?;
                    if plain > 0 {
                        self.zstd = Some(z);
                        return Ok(true);
                    }
                    z.finish(out)?;
                }
                t => {
                    return Err(Error::Corrupt(format!(
                        "gzip reconstruction: unknown record tag {t:#04x}"
                    )))
                }
            }
        }
    }

    fn exact(&mut self, b: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < b.len() {
            let n = read_some(&mut self.recon, &mut b[got..])?;
            if n == 0 {
                return Err(Error::Corrupt(
                    "gzip reconstruction stream ends inside a record".into(),
                ));
            }
            got += n;
        }
        Ok(())
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            self.exact(&mut b)?;
            v |= ((b[0] & 0x7f) as u64) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Corrupt(
            "gzip reconstruction: number too long".into(),
        ))
    }
}

fn read_some(r: &mut dyn Read, b: &mut [u8]) -> Result<usize> {
    loop {
        match r.read(b) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Pass two: the plaintext of every member of a spooled gzip, in order, as a
/// `Read`. Every byte read is also pushed through a [`Rebuilder`] fed from
/// the reconstruction stream, whose output is hashed: once the reader is
/// exhausted, [`PlainReader::rebuilt`] says what the stored form rebuilds to.
pub struct PlainReader {
    spool: PathBuf,
    deflate: std::vec::IntoIter<(u64, u64)>,
    zstd: bool,
    cur: Option<Box<dyn Read>>,
    rebuilder: Option<Rebuilder<BufReader<File>>>,
    sha: sha2::Sha256,
    rebuilt_len: u64,
    done: bool,
    /// Why reading failed (bad deflate data, a reconstruction that does not
    /// hold): the caller falls back to plain chunks instead of failing.
    pub failure: Option<String>,
}

impl PlainReader {
    /// `independent`: rebuild with [`Rebuilder::with_pieces`].
    pub fn new(spool: &Path, recon: &Path, plan: &Plan, independent: bool) -> Result<PlainReader> {
        let r = File::open(recon).ctx("open", recon)?;
        Ok(PlainReader {
            spool: spool.to_path_buf(),
            deflate: plan.deflate.clone().into_iter(),
            zstd: plan.zstd,
            cur: None,
            rebuilder: Some(Rebuilder::with_pieces(
                BufReader::with_capacity(1 << 20, r),
                independent,
            )?),
            sha: sha2::Sha256::new(),
            rebuilt_len: 0,
            done: false,
            failure: None,
        })
    }

    /// Length and SHA-256 of the compressed bytes rebuilt from the plaintext
    /// read and the reconstruction stream; call after reading to the end.
    pub fn rebuilt(self) -> Result<(u64, String)> {
        if !self.done {
            return Err(Error::Invalid("gzip plaintext not read to the end".into()));
        }
        Ok((self.rebuilt_len, crate::hash::sha256_hex(self.sha)))
    }

    fn next_member(&mut self) -> Result<bool> {
        let Some((off, len)) = self.deflate.next() else {
            return Ok(false);
        };
        let mut f = File::open(&self.spool).ctx("open", &self.spool)?;
        f.seek(SeekFrom::Start(off)).ctx("seek", &self.spool)?;
        let input = BufReader::with_capacity(256 << 10, f.take(len));
        self.cur = Some(if self.zstd {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(input)
                    .map_err(Error::Stream)?
                    .single_frame(),
            )
        } else {
            Box::new(flate2::bufread::DeflateDecoder::new(input))
        });
        Ok(true)
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = match self.cur.as_mut() {
                Some(d) => d.read(buf).map_err(Error::Stream)?,
                None => 0,
            };
            if n > 0 {
                let (sha, len) = (&mut self.sha, &mut self.rebuilt_len);
                if let Some(rb) = self.rebuilder.as_mut() {
                    rb.push(&buf[..n], &mut |b| hash_out(sha, len, b))?;
                }
                return Ok(n);
            }
            if !self.next_member()? {
                let (sha, len) = (&mut self.sha, &mut self.rebuilt_len);
                if let Some(rb) = self.rebuilder.take() {
                    rb.finish(&mut |b| hash_out(sha, len, b))?;
                }
                self.done = true;
                return Ok(0);
            }
        }
    }
}

fn hash_out(sha: &mut sha2::Sha256, len: &mut u64, b: &[u8]) -> Result<()> {
    sha.update(b);
    *len += b.len() as u64;
    Ok(())
}

impl Read for PlainReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_inner(buf).map_err(|e| {
            self.failure = Some(e.to_string());
            e.into_io()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        let plain = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        assert_eq!(header_len(&plain), Ok(Some(10)));
        assert_eq!(header_len(&plain[..9]), Ok(None));
        let mut named = plain.to_vec();
        named[3] = 0x08 | 0x04 | 0x02;
        named.extend_from_slice(&[2, 0, b'a', b'b']); // FEXTRA
        named.extend_from_slice(b"name\0");
        assert_eq!(header_len(&named), Ok(None)); // FHCRC missing
        named.extend_from_slice(&[0, 0]);
        assert_eq!(header_len(&named), Ok(Some(named.len())));
        let mut reserved = plain;
        reserved[3] = 0x20;
        assert!(header_len(&reserved).is_err());
        assert!(header_len(&[0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3]).is_err());
    }

    #[test]
    fn rebuilder_rejects_damage() {
        assert!(Rebuilder::new(Cursor::new(b"WGZ2".to_vec())).is_err());
        let mut rb = Rebuilder::new(Cursor::new(b"WGZ1\x09".to_vec())).unwrap();
        assert!(rb.push(b"x", &mut |_| Ok(())).is_err());
        // A literal, then nothing: plaintext left over is an error.
        let mut rb = Rebuilder::new(Cursor::new(b"WGZ1\x01\x02hi".to_vec())).unwrap();
        let mut got = Vec::new();
        assert!(rb
            .push(b"x", &mut |b| {
                got.extend_from_slice(b);
                Ok(())
            })
            .is_err());
        assert_eq!(got, b"hi");
        // A DEFLATE record before START.
        let rb = Rebuilder::new(Cursor::new(b"WGZ1\x03\x00\x00".to_vec())).unwrap();
        assert!(rb.finish(&mut |_| Ok(())).is_err());
    }
}
