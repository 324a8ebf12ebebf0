//! Offline transfer: a bundle file carries the chunks a receiver lacks and
//! the names to publish, for a USB disk or scp; a have file tells the sender
//! what the receiver holds.

use crate::frame::{read_frame, write_frame, Kind};
use crate::send::{self, DeltaOptions};
use crate::session::{PublishMsg, Receiver, TransferReport, FRAME_BYTES};
use crate::walk;
use crate::{Error, Result};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::Arc;
use wharf_format::{ChunkId, Store};

pub const BUNDLE_MAGIC: &[u8; 8] = b"WHARFBD1";
/// The magic of a bundle that may hold PUT_DELTA frames: a reader that
/// predates deltas then says "not a wharf bundle it knows" up front instead
/// of failing on an unknown frame halfway through.
pub const BUNDLE_MAGIC_DELTAS: &[u8; 8] = b"WHARFBD2";
/// The magic of a bundle whose deltas may be header deltas (PROTOCOL.md
/// §9.2.8), for the same reason.
pub const BUNDLE_MAGIC_HEADER_DELTAS: &[u8; 8] = b"WHARFBD3";
pub const HAVE_MAGIC: &[u8; 8] = b"WHARFHV1";

/// Writes every chunk id in the store, sorted: what a sender may skip.
pub fn write_have(store: &Store, out: &mut dyn Write) -> Result<u64> {
    let mut ids: Vec<ChunkId> = Vec::new();
    for f in store.index_files() {
        ids.extend((0..f.len()).map(|i| f.entry(i).id));
    }
    ids.sort();
    ids.dedup();
    out.write_all(HAVE_MAGIC).map_err(Error::Io)?;
    for id in &ids {
        out.write_all(&id.0).map_err(Error::Io)?;
    }
    out.flush().map_err(Error::Io)?;
    Ok(ids.len() as u64)
}

pub fn read_have(input: &mut dyn Read) -> Result<HashSet<ChunkId>> {
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|_| Error::Protocol("not a wharf have file (too short)".into()))?;
    if &magic != HAVE_MAGIC {
        return Err(Error::Protocol("not a wharf have file (bad magic)".into()));
    }
    let mut out = HashSet::new();
    let mut rest = Vec::new();
    input.read_to_end(&mut rest).map_err(Error::Io)?;
    if !rest.len().is_multiple_of(32) {
        return Err(Error::Protocol(format!(
            "have file is truncated: {} bytes after the header is not a whole number of 32-byte ids",
            rest.len()
        )));
    }
    out.extend(rest.chunks_exact(32).map(|c| {
        let mut id = [0u8; 32];
        id.copy_from_slice(c);
        ChunkId(id)
    }));
    Ok(out)
}

/// Writes a bundle of image `name` without the chunks of the images in
/// `have_names` (held by this store) and without the ids in `have_ids`.
/// With `deltas` enabled, chunks go as deltas against the images in
/// `have_names`, or against images of this store whose every chunk is in
/// `have_ids`.
pub fn write_bundle(
    store: &Arc<Store>,
    name: &str,
    have_names: &[String],
    have_ids: &HashSet<ChunkId>,
    deltas: DeltaOptions,
    out: &mut dyn Write,
) -> Result<TransferReport> {
    let started = std::time::Instant::now();
    let bases = bundle_bases(store, name, have_names, have_ids)?;
    let mut plan = send::prepare(store, name, name, Some(bases), deltas, &mut |ids, whole| {
        Ok(ids.iter().map(|i| !whole && have_ids.contains(i)).collect())
    })?;
    let mut rep = std::mem::take(&mut plan.report);
    let (planner, neg) = (plan.planner, plan.negotiated);
    let mut out = crate::session::Counted {
        inner: out,
        count: 0,
    };
    let magic = match (&planner, deltas.header_deltas) {
        (Some(_), true) => BUNDLE_MAGIC_HEADER_DELTAS,
        (Some(_), false) => BUNDLE_MAGIC_DELTAS,
        (None, _) => BUNDLE_MAGIC,
    };
    out.write_all(magic).map_err(Error::Io)?;
    send::encode_chunks(
        store,
        planner.as_ref(),
        &neg.missing,
        FRAME_BYTES,
        &mut rep,
        &mut |kind, payload, _| write_frame(&mut out, kind, &payload),
    )?;
    let msg = PublishMsg {
        name: name.to_string(),
        recipe: plan.recipe,
        len: plan.len,
    };
    write_frame(
        &mut out,
        Kind::Publish,
        &serde_json::to_vec(&msg).unwrap_or_default(),
    )?;
    write_frame(&mut out, Kind::Bye, &[])?;
    out.flush().map_err(Error::Io)?;
    rep.wire_bytes_out = out.count;
    rep.seconds = started.elapsed().as_secs_f64();
    Ok(rep)
}

/// Images the receiver of a bundle holds whole: those named with --have,
/// and images of this store whose every chunk is in the have file.
fn bundle_bases(
    store: &Store,
    name: &str,
    have_names: &[String],
    have_ids: &HashSet<ChunkId>,
) -> Result<send::Bases> {
    let r = store.require_ref(name)?;
    let mut bases: Vec<ChunkId> = Vec::new();
    for h in have_names {
        bases.push(store.require_ref(h)?.recipe);
    }
    if !have_ids.is_empty() {
        for c in send::candidate_bases(store, name, &r.recipe)? {
            if bases.len() >= send::MAX_BASE_IMAGES || !have_ids.contains(&c) {
                continue;
            }
            if walk::image_chunks(store, &c, &HashSet::new())?
                .iter()
                .all(|i| have_ids.contains(i))
            {
                bases.push(c);
            }
        }
    }
    // A name says the receiver holds the image, not which recipe chunk it
    // has for it; a have file lists the recipe itself.
    let recipes_held = have_names.is_empty()
        || (!have_ids.is_empty() && bases.first().is_some_and(|b| have_ids.contains(b)));
    Ok(send::Bases {
        images: bases,
        recipes_held,
    })
}

/// Applies a bundle: stores its chunks (each verified) and publishes its
/// names once complete. Returns the names published.
pub fn read_bundle(store: &Arc<Store>, input: &mut dyn Read) -> Result<Vec<String>> {
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|_| Error::Protocol("not a wharf bundle (too short)".into()))?;
    let deltas_allowed = match &magic {
        m if m == BUNDLE_MAGIC => false,
        m if m == BUNDLE_MAGIC_DELTAS || m == BUNDLE_MAGIC_HEADER_DELTAS => true,
        m if m.starts_with(b"WHARFBD") => {
            return Err(Error::Protocol(format!(
                "a wharf bundle of a later version ({}): upgrade wharf to read it",
                String::from_utf8_lossy(m)
            )))
        }
        _ => return Err(Error::Protocol("not a wharf bundle (bad magic)".into())),
    };
    let _lock = store.lock(false)?;
    let mut receiver = Receiver::new(store.clone());
    let mut names = Vec::new();
    let res = (|| -> Result<()> {
        loop {
            let Some(f) = read_frame(input)? else {
                return Err(Error::Protocol(
                    "bundle ends before its last frame: truncated?".into(),
                ));
            };
            match f.kind {
                Kind::Put => receiver.put(f.payload)?,
                Kind::PutDelta if deltas_allowed => {
                    receiver.put_delta(&f.payload)?;
                }
                Kind::Publish => {
                    let msg: PublishMsg = serde_json::from_slice(&f.payload)
                        .map_err(|e| Error::Protocol(format!("bad PUBLISH: {e}")))?;
                    receiver.publish(&msg).map_err(|e| match e {
                        Error::Protocol(m) => Error::Protocol(format!(
                            "{m}; was the bundle made with --have of an image this store does not hold?"
                        )),
                        other => other,
                    })?;
                    names.push(msg.name);
                }
                Kind::Bye => return Ok(()),
                other => return Err(Error::Protocol(format!("unexpected {other:?} in a bundle"))),
            }
        }
    })();
    // Chunks that arrived are kept even if the bundle was cut short.
    let flushed = receiver.flush();
    res.and(flushed)?;
    Ok(names)
}

/// What a bundle of `name` would carry, per layer, without writing it.
pub fn plan_bundle(
    store: &Arc<Store>,
    name: &str,
    have_names: &[String],
    have_ids: &HashSet<ChunkId>,
    deltas: DeltaOptions,
) -> Result<crate::walk::Plan> {
    let r = store.require_ref(name)?;
    let bases = bundle_bases(store, name, have_names, have_ids)?;
    let planner = send::planner(store, &r.recipe, &bases, deltas)?;
    walk::plan_push(
        store,
        name,
        &bases.images,
        planner.as_ref(),
        &mut |ids, whole| Ok(ids.iter().map(|i| !whole && have_ids.contains(i)).collect()),
    )
}
