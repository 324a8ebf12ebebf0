//! The sending side shared by push (stream and HTTP) and bundles: which
//! images the receiver can serve as delta bases, and turning the chunks it
//! lacks into PUT and PUT_DELTA payloads.

use crate::frame::{encode_chunk, Kind, WireChunk};
use crate::session::{TransferReport, DELTAS_FAILED};
use crate::walk::{self, HasOracle};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;
use wharf_format::delta::{encode_frame, BaseResolver, DeltaChunk, SentIndex};
use wharf_format::extract::load_recipe;
use wharf_format::similar::DeltaPlanner;
use wharf_format::{ChunkId, Store};

/// Base images used per transfer. Each costs a walk of its tree, its
/// skeletons read once, and its chunk ids held in memory (about 100 bytes
/// a chunk: 250 MB for a 40 GB image of 16 KiB chunks); the newest of the
/// same repository is nearly always the best, the one before it the rest.
pub const MAX_BASE_IMAGES: usize = 2;
/// Chunks asked about to find out whether a push is being resumed.
const RESUME_SAMPLE: usize = 64;
/// Chunks encoded per parallel batch.
const ENCODE_BATCH: usize = 512;
/// Content chunks per delta frame, about: 4 MiB at the default 16 KiB
/// average, so that on a push of some tens of MB of changes both ends work
/// at once for most of it (see `encode_chunks`).
const GROUP_CHUNKS: usize = 256;

/// How a transfer treats deltas.
#[derive(Clone, Copy, Debug)]
pub struct DeltaOptions {
    pub enabled: bool,
    pub level: i32,
    /// Whether the receiver decodes header deltas (PROTOCOL.md §9.2.8): a
    /// transfer turns this off for a peer that did not say so.
    pub header_deltas: bool,
}

impl Default for DeltaOptions {
    fn default() -> Self {
        DeltaOptions {
            enabled: true,
            level: wharf_format::similar::DEFAULT_LEVEL,
            header_deltas: true,
        }
    }
}

impl DeltaOptions {
    /// These options for a receiver whose HELLO is `peer`.
    pub fn for_peer(self, peer: &crate::session::Hello) -> Self {
        DeltaOptions {
            enabled: self.enabled && peer.speaks_deltas(),
            header_deltas: self.header_deltas && peer.speaks_header_deltas(),
            ..self
        }
    }
}

impl DeltaOptions {
    /// Chunks go whole.
    pub fn none() -> Self {
        DeltaOptions {
            enabled: false,
            ..Default::default()
        }
    }
}

fn repo_of(name: &str) -> &str {
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// Images of this store that could serve as bases for `target`, most
/// relevant first: the same repository before others, newer before older.
pub fn candidate_bases(store: &Store, target_name: &str, target: &ChunkId) -> Result<Vec<ChunkId>> {
    let repo = repo_of(target_name);
    let mut refs: Vec<(bool, u64, String, ChunkId)> = store
        .list_refs()?
        .into_iter()
        .filter(|(_, r)| r.recipe != *target)
        .map(|(n, r)| (repo_of(&n) != repo, u64::MAX - r.added, n, r.recipe))
        .collect();
    refs.sort();
    let mut out: Vec<ChunkId> = Vec::new();
    for (_, _, _, r) in refs {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out.truncate(MAX_BASE_IMAGES * 4);
    Ok(out)
}

/// Whether recipe `r` is an image this store holds whole: its root is a
/// complete layer of a published image (`complete`, from
/// `walk::complete_layers`).
pub fn held_whole(store: &Store, r: &ChunkId, complete: &HashSet<ChunkId>) -> bool {
    load_recipe(store, r).is_ok_and(|rec| complete.contains(&rec.root))
}

/// Of `candidates`, the images the receiver holds whole: their outer tar is
/// a complete layer there and it has their recipe chunk.
pub fn held_bases(
    store: &Store,
    candidates: &[ChunkId],
    has: &mut HasOracle<'_>,
) -> Result<Vec<ChunkId>> {
    let mut roots = Vec::new();
    let mut recipes = Vec::new();
    for c in candidates {
        if let Ok(r) = load_recipe(store, c) {
            roots.push(r.root);
            recipes.push(*c);
        }
    }
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    let whole = has(&roots, true)?;
    let chunk = has(&recipes, false)?;
    let mut out: Vec<ChunkId> = recipes
        .iter()
        .zip(whole.iter().zip(chunk))
        .filter(|(_, (w, c))| **w && *c)
        .map(|(r, _)| *r)
        .collect();
    out.truncate(MAX_BASE_IMAGES);
    Ok(out)
}

/// What the receiver lacks, decided in two levels (whole layers, then
/// chunks), skipping without asking everything in `bases`, which the
/// receiver holds whole.
pub struct Negotiated {
    /// Chunks to send, in tree order.
    pub missing: Vec<ChunkId>,
    pub total: u64,
    pub layers_skipped: u64,
}

/// What [`walk_image`] learns before the planner is needed: the chunks of
/// the image outside the layers the receiver holds.
pub struct Walked {
    /// The image's chunks outside held layers and outside the base images,
    /// in tree order.
    ids: Vec<ChunkId>,
    /// The image's distinct chunks outside held layers, known or not.
    total: u64,
    /// The image's chunks outside every layer (only walked for deltas).
    outside: HashSet<ChunkId>,
    layers_skipped: u64,
}

/// The first half of negotiating: walks the bases and the image and asks
/// the receiver which layers it holds whole. Needs no planner, so
/// [`prepare`] runs it while the planner is built.
pub fn walk_image(
    store: &Store,
    recipe: &ChunkId,
    bases: &[ChunkId],
    deltas: bool,
    has: &mut HasOracle<'_>,
) -> Result<Walked> {
    let known = walk::closure_of(store, bases)?;
    let rec = load_recipe(store, recipe)?;
    let layer_ids: Vec<ChunkId> = rec.layers.iter().map(|l| l.node).collect();
    let mut held = has(&layer_ids, true)?;
    for (h, l) in held.iter_mut().zip(&layer_ids) {
        *h |= known.contains(l);
    }
    let skip: HashSet<ChunkId> = layer_ids
        .iter()
        .zip(&held)
        .filter(|(_, h)| **h)
        .map(|(i, _)| *i)
        .collect();
    let (ids, total) = walk::image_chunks_beyond(store, recipe, &skip, &known)?;
    let all_layers: HashSet<ChunkId> = layer_ids.iter().copied().collect();
    let outside: HashSet<ChunkId> = match deltas {
        true => walk::image_chunks(store, recipe, &all_layers)?
            .into_iter()
            .collect(),
        false => HashSet::new(),
    };
    Ok(Walked {
        ids,
        total,
        outside,
        layers_skipped: skip.len() as u64,
    })
}

/// The second half of negotiating: sorts the walked chunks into those
/// the receiver is asked about and those assumed missing, and asks.
pub fn sort_missing(
    walked: Walked,
    planner: Option<&DeltaPlanner>,
    has: &mut HasOracle<'_>,
) -> Result<Negotiated> {
    let Walked {
        ids,
        total,
        outside,
        layers_skipped,
    } = walked;
    // Chunks of layers paired with a base layer that are not in any base
    // are new content: the receiver is most unlikely to hold them, and
    // asking would cost 32 bytes each where their deltas cost little more.
    // Outside the layers (the outer tar's own objects) everything is
    // asked: a receiver holding this very image under another name has them.
    // (Moved, not copied: on a first push of a multi-GB image `ids` is every
    // chunk of it.)
    let (assume, ask): (Vec<ChunkId>, Vec<ChunkId>) = match planner {
        None => (Vec::new(), ids),
        Some(p) => ids
            .into_iter()
            .partition(|i| !outside.contains(i) && p.knows(i)),
    };
    // Unless the receiver holds some of them already: an interrupted push
    // of this image. A sample spread evenly over them (a push sends in
    // this order, so what arrived is a prefix) tells, for 2 KiB; then all
    // are asked about, so a resumed push does not send them again.
    // (A push of a few chunks skips the sample: sending them again as
    // deltas costs less than asking.)
    let n = (assume.len() / 16).min(RESUME_SAMPLE);
    let sample: Vec<ChunkId> = match n {
        0 => Vec::new(),
        n => assume
            .iter()
            .step_by(assume.len() / n)
            .take(n)
            .copied()
            .collect(),
    };
    let (assume, ask) = if !sample.is_empty() && has(&sample, false)?.iter().any(|h| *h) {
        (Vec::new(), [ask, assume].concat())
    } else {
        (assume, ask)
    };
    let have = has(&ask, false)?;
    let mut missing = ask;
    let mut at = 0;
    missing.retain(|_| {
        at += 1;
        !have.get(at - 1).copied().unwrap_or(false)
    });
    missing.extend(assume);
    Ok(Negotiated {
        missing,
        total,
        layers_skipped,
    })
}

/// Images the receiver holds whole, most relevant first, and whether it is
/// known to hold their very recipe chunks (not only their trees).
#[derive(Clone, Debug, Default)]
pub struct Bases {
    pub images: Vec<ChunkId>,
    pub recipes_held: bool,
}

/// Everything a sender decides before the first chunk goes out.
pub struct PushPlan {
    pub recipe: ChunkId,
    pub len: u64,
    pub planner: Option<DeltaPlanner>,
    pub negotiated: Negotiated,
    /// The report, counts of what is skipped filled in.
    pub report: TransferReport,
}

/// Prepares sending image `name` (published as `as_name`): finds the base
/// images the receiver holds (unless `bases` are given, as for a bundle),
/// builds the planner when deltas are on, and negotiates what is missing.
pub fn prepare(
    store: &Arc<Store>,
    name: &str,
    as_name: &str,
    bases: Option<Bases>,
    deltas: DeltaOptions,
    has: &mut HasOracle<'_>,
) -> Result<PushPlan> {
    let r = store.require_ref(name)?;
    // Found with or without deltas: two questions about the images the
    // receiver holds whole spare asking about each of their chunks, which
    // costs 32 bytes apiece, ~5 % of a rebuild's new bytes.
    let bases = match bases {
        Some(b) => b,
        None => Bases {
            images: held_bases(store, &candidate_bases(store, name, &r.recipe)?, has)?,
            recipes_held: true,
        },
    };
    // The planner reads the base layers' skeletons and lists; the walk
    // reads the base trees and asks the receiver about layers. Neither
    // needs the other until chunks are sorted into asked and assumed, so
    // on a multi-GB image they run side by side.
    let t = std::time::Instant::now();
    let with_deltas = deltas.enabled && !bases.images.is_empty();
    let (planner, walked) = std::thread::scope(|s| {
        let planning = s.spawn(|| planner(store, &r.recipe, &bases, deltas));
        let walked = walk_image(store, &r.recipe, &bases.images, with_deltas, has);
        let planner = planning
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (planner, walked)
    });
    let planner = planner?;
    let negotiated = sort_missing(walked?, planner.as_ref(), has)?;
    if std::env::var_os("WHARF_DEBUG_DELTAS").is_some() {
        eprintln!(
            "delta-debug planned and negotiated in {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }
    let report = TransferReport {
        name: as_name.to_string(),
        image_bytes: r.len,
        layers_skipped: negotiated.layers_skipped,
        chunks_total: negotiated.total,
        chunks_skipped: negotiated.total - negotiated.missing.len() as u64,
        ..Default::default()
    };
    Ok(PushPlan {
        recipe: r.recipe,
        len: r.len,
        planner,
        negotiated,
        report,
    })
}

/// Runs `push` with `deltas`, and once more without them when the receiver
/// said some deltas could not be applied (a base it lacks after all): what
/// arrived is kept, so the second run sends only the rest.
pub fn with_fallback<T>(
    deltas: DeltaOptions,
    mut push: impl FnMut(DeltaOptions) -> Result<T>,
) -> Result<T> {
    match push(deltas) {
        Err(crate::Error::Remote(m)) if deltas.enabled && m.contains(DELTAS_FAILED) => {
            push(DeltaOptions {
                enabled: false,
                ..deltas
            })
        }
        other => other,
    }
}

/// A planner for `recipe` against `bases`, or none when deltas are off or
/// there is nothing to delta against.
pub fn planner(
    store: &Arc<Store>,
    recipe: &ChunkId,
    bases: &Bases,
    opts: DeltaOptions,
) -> Result<Option<DeltaPlanner>> {
    let Bases {
        images: bases,
        recipes_held,
    } = bases;
    if !opts.enabled || bases.is_empty() {
        return Ok(None);
    }
    let resolver = Arc::new(BaseResolver::new(store.clone()));
    let t = std::time::Instant::now();
    // Every base is skipped when negotiating (a bundle may name many);
    // deltas are made against the first few.
    let bases = &bases[..bases.len().min(MAX_BASE_IMAGES)];
    let mut p = DeltaPlanner::new(resolver, recipe, bases, opts.level)?
        .with_header_deltas(opts.header_deltas);
    if let (true, Some(first)) = (recipes_held, bases.first()) {
        p = p.with_recipe_base(recipe, first);
    }
    if std::env::var_os("WHARF_DEBUG_DELTAS").is_some() {
        eprintln!(
            "delta-debug planner built in {:.3} s: {:?}",
            t.elapsed().as_secs_f64(),
            p.stats
        );
    }
    Ok(Some(p))
}

/// Takes each payload ready to go, with the report so far.
pub type Emit<'a> = dyn FnMut(Kind, Vec<u8>, &TransferReport) -> Result<()> + 'a;

/// What goes on the wire for some chunks: one as stored, or several as
/// one delta.
pub enum Unit {
    /// Id, raw length, bytes as stored.
    Plain(ChunkId, u32, Vec<u8>),
    /// A delta and what its chunks would have cost as stored.
    Delta(DeltaChunk, u64),
}

/// A chunk as stored: its uncompressed length and compressed bytes.
type Stored = (u32, Vec<u8>);

/// Encodes `ids` in order, in parallel: runs of neighbouring chunks as one
/// delta, others each as a delta or as stored, whichever is smaller.
/// Objects may refer back to the chunks in `sent`.
pub fn encode_units(
    store: &Store,
    planner: Option<&DeltaPlanner>,
    ids: &[ChunkId],
    sent: &SentIndex,
) -> Result<Vec<Unit>> {
    let runs: Vec<std::ops::Range<usize>> = match planner {
        Some(p) => p.runs(ids),
        None => (0..ids.len()).map(|i| i..i + 1).collect(),
    };
    // All of them in one batch: on an object store, one round of coalesced
    // ranged reads instead of a request per chunk.
    let mut all: Vec<Option<(u32, Vec<u8>)>> =
        store.read_stored_many(ids)?.into_iter().map(Some).collect();
    let work: Vec<(std::ops::Range<usize>, Vec<Stored>)> = runs
        .into_iter()
        .map(|r| {
            let stored = all[r.clone()].iter_mut().filter_map(Option::take).collect();
            (r, stored)
        })
        .collect();
    let per_run: Vec<Result<Vec<Unit>>> = work
        .into_par_iter()
        .map(|(r, stored)| {
            let slice = &ids[r.clone()];
            if stored.len() != slice.len() {
                return Err(Error::Protocol(
                    "delta planner returned overlapping runs".into(),
                ));
            }
            let plain = |stored: Vec<(u32, Vec<u8>)>| -> Vec<Unit> {
                slice
                    .iter()
                    .zip(stored)
                    .map(|(id, (raw, st))| Unit::Plain(*id, raw, st))
                    .collect()
            };
            let Some(p) = planner.filter(|p| slice.iter().any(|i| p.knows(i))) else {
                return Ok(plain(stored));
            };
            let lens: Vec<usize> = stored.iter().map(|s| s.1.len()).collect();
            let parts = p.encode_run(slice, &lens, sent)?;
            let mut stored: Vec<Option<(u32, Vec<u8>)>> = stored.into_iter().map(Some).collect();
            let mut out = Vec::new();
            for (range, d) in parts {
                match d {
                    Some(d) => {
                        let instead: usize = lens[range].iter().sum();
                        out.push(Unit::Delta(d, instead as u64));
                    }
                    None => {
                        for i in range {
                            if let Some((raw, st)) = stored[i].take() {
                                out.push(Unit::Plain(slice[i], raw, st));
                            }
                        }
                    }
                }
            }
            Ok(out)
        })
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for r in per_run {
        out.extend(r?);
    }
    Ok(out)
}

/// Encodes `ids` (chunks the receiver lacks) as PUT payloads of chunks as
/// stored and PUT_DELTA payloads of deltas, each about `frame_bytes`, and
/// hands every payload to `emit` with the report so far.
pub fn encode_chunks(
    store: &Store,
    planner: Option<&DeltaPlanner>,
    ids: &[ChunkId],
    frame_bytes: usize,
    rep: &mut TransferReport,
    emit: &mut Emit<'_>,
) -> Result<()> {
    let mut out = Outgoing {
        plain: Vec::new(),
        deltas: Vec::new(),
        sent: SentIndex::default(),
        delta_bytes: 0,
        frame_bytes,
        debug: std::env::var_os("WHARF_DEBUG_DELTAS").is_some(),
    };
    if planner.is_none() && !out.debug {
        return encode_plain(store, ids, frame_bytes, rep, emit);
    }
    // Objects (nodes, list pieces) go after the chunks they name, so that
    // their deltas can name those sent before them in the same frame
    // instead of spelling their ids; and in waves, each after the objects
    // it names (a node after its lists' pieces, a piece after the pieces
    // below it), since a batch is encoded at once against what was sent
    // before it. The content goes in groups, each closed by the first wave
    // of objects that name it (the leaf pieces) and sent as a frame of its
    // own: the receiver rebuilds one frame while the next is encoded,
    // where one frame for the whole push kept each end waiting on the
    // other. The upper waves name few ids and follow the last group.
    let (objects, content): (Vec<ChunkId>, Vec<ChunkId>) = ids
        .iter()
        .partition(|id| planner.is_some_and(|p| p.is_object(id)));
    let mut waves = match planner {
        Some(p) if !objects.is_empty() => p.object_waves(&objects)?,
        _ => Vec::new(),
    };
    let groups = match planner {
        Some(p) if !waves.is_empty() => {
            let leaves = waves.remove(0);
            p.leaf_groups(&content, &leaves, GROUP_CHUNKS)?
        }
        _ => vec![(content.len(), Vec::new())],
    };
    let mut start = 0;
    let last_group = groups.len() - 1;
    for (g, (end, leaves)) in groups.into_iter().enumerate() {
        // Content may still be cut at `frame_bytes` (a frame has a size
        // limit; the leaves then spell the ids of what went before).
        for batch in content[start..end].chunks(ENCODE_BATCH) {
            for u in encode_units(store, planner, batch, &out.sent)? {
                out.add(u, planner, rep, emit, true)?;
            }
        }
        start = end;
        out.add_objects(store, planner, &leaves, rep, emit)?;
        if g < last_group {
            out.flush_deltas(rep, emit)?;
        }
    }
    for wave in &waves {
        out.add_objects(store, planner, wave, rep, emit)?;
    }
    if !out.plain.is_empty() {
        emit(Kind::Put, std::mem::take(&mut out.plain), rep)?;
    }
    out.flush_deltas(rep, emit)
}

/// [`encode_chunks`] without deltas: a chunk entry is byte for byte a pack
/// entry (PROTOCOL.md §9.1), so each PUT payload is read from the packs
/// straight into place, neighbours in one read, and nothing else is done
/// to it. Payloads end after the entry that reaches `frame_bytes`.
fn encode_plain(
    store: &Store,
    mut ids: &[ChunkId],
    frame_bytes: usize,
    rep: &mut TransferReport,
    emit: &mut Emit<'_>,
) -> Result<()> {
    let mut plain: Vec<u8> = Vec::new();
    while !ids.is_empty() {
        if plain.capacity() == 0 {
            plain.reserve(frame_bytes + (1 << 20));
        }
        let batch = &ids[..ids.len().min(ENCODE_BATCH)];
        let (n, stored) = store.read_entries_into(batch, &mut plain, frame_bytes)?;
        if n == 0 {
            return Err(Error::Protocol("no chunk fits a payload".into()));
        }
        rep.chunks_sent += n as u64;
        rep.payload_bytes += stored;
        ids = &ids[n..];
        if plain.len() >= frame_bytes {
            emit(Kind::Put, std::mem::take(&mut plain), rep)?;
        }
    }
    if !plain.is_empty() {
        emit(Kind::Put, plain, rep)?;
    }
    Ok(())
}

/// Payloads being filled.
struct Outgoing {
    plain: Vec<u8>,
    deltas: Vec<DeltaChunk>,
    /// The chunks of `deltas`, as the receiver will know them.
    sent: SentIndex,
    delta_bytes: usize,
    frame_bytes: usize,
    debug: bool,
}

impl Outgoing {
    fn flush_deltas(&mut self, rep: &mut TransferReport, emit: &mut Emit<'_>) -> Result<()> {
        if self.deltas.is_empty() {
            return Ok(());
        }
        let f = encode_frame(&std::mem::take(&mut self.deltas));
        self.sent = SentIndex::default();
        self.delta_bytes = 0;
        rep.delta_bytes += f.len() as u64;
        rep.payload_bytes += f.len() as u64;
        emit(Kind::PutDelta, f, rep)
    }

    /// Encodes and adds objects that may name chunks sent before them in
    /// the frame: never cut from those, unless the frame is full.
    fn add_objects(
        &mut self,
        store: &Store,
        planner: Option<&DeltaPlanner>,
        objects: &[ChunkId],
        rep: &mut TransferReport,
        emit: &mut Emit<'_>,
    ) -> Result<()> {
        for batch in objects.chunks(ENCODE_BATCH) {
            if self.delta_bytes >= self.frame_bytes {
                self.flush_deltas(rep, emit)?;
            }
            for u in encode_units(store, planner, batch, &self.sent)? {
                self.add(u, planner, rep, emit, false)?;
            }
        }
        Ok(())
    }

    /// Adds one unit; `may_cut`: whether the delta frame may be sent now
    /// (not while objects that refer back into it are added).
    fn add(
        &mut self,
        unit: Unit,
        planner: Option<&DeltaPlanner>,
        rep: &mut TransferReport,
        emit: &mut Emit<'_>,
        may_cut: bool,
    ) -> Result<()> {
        match unit {
            Unit::Delta(d, instead) => {
                if self.debug {
                    // Sizes on stderr, for studying what deltas cost.
                    let raw: u64 = d.targets.iter().map(|t| t.1 as u64).sum();
                    eprintln!(
                        "delta-debug {} raw {raw} stored {instead} delta {} chunks {}",
                        planner.map(|p| p.describe(&d.targets[0].0)).unwrap_or("-"),
                        d.delta.len(),
                        d.targets.len()
                    );
                }
                rep.chunks_sent += d.targets.len() as u64;
                rep.delta_chunks += d.targets.len() as u64;
                rep.delta_raw_bytes += d.targets.iter().map(|t| t.1 as u64).sum::<u64>();
                rep.delta_instead_of += instead;
                self.delta_bytes += d.delta.len() + 16 + 12 * d.targets.len();
                for (id, len) in &d.targets {
                    self.sent.push(*id, *len);
                }
                self.deltas.push(d);
            }
            Unit::Plain(id, raw_len, stored) => {
                if self.debug {
                    eprintln!(
                        "delta-debug {} raw {raw_len} stored {} delta -1 chunks 1",
                        planner.map(|p| p.describe(&id)).unwrap_or("-"),
                        stored.len()
                    );
                }
                rep.chunks_sent += 1;
                rep.payload_bytes += stored.len() as u64;
                encode_chunk(
                    &mut self.plain,
                    &WireChunk {
                        id,
                        raw_len,
                        stored,
                    },
                );
            }
        }
        if self.plain.len() >= self.frame_bytes {
            emit(Kind::Put, std::mem::take(&mut self.plain), rep)?;
        }
        if may_cut && self.delta_bytes >= self.frame_bytes {
            self.flush_deltas(rep, emit)?;
        }
        Ok(())
    }
}

/// What pushing `name` would send, with deltas priced when `deltas` allows.
pub fn plan(
    store: &Arc<Store>,
    name: &str,
    deltas: DeltaOptions,
    has: &mut HasOracle<'_>,
) -> Result<walk::Plan> {
    let r = store.require_ref(name)?;
    let bases = Bases {
        images: held_bases(store, &candidate_bases(store, name, &r.recipe)?, has)?,
        recipes_held: true,
    };
    let planner = planner(store, &r.recipe, &bases, deltas)?;
    walk::plan_push(store, name, &bases.images, planner.as_ref(), has)
}
