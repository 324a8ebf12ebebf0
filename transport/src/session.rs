//! Both ends of a session over a byte stream: the server loop and the
//! client's push and pull.

use crate::frame::{
    bit, bitmap, decode_entries, decode_ids, encode_ids, read_frame, write_frame, Kind,
};
use crate::send::{self, DeltaOptions};
use crate::walk;
use crate::{Error, Result, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::sync::Arc;
use wharf_format::delta::BaseResolver;
use wharf_format::similar::DeltaPlanner;
use wharf_format::store::{ChunkWriter, RefValue};
use wharf_format::{ChunkId, Store};

/// Ids per HAS or GET request, and requests kept in flight.
pub const BATCH_IDS: usize = 4096;
pub const GET_BATCH: usize = 1024;
/// A pull walks the image's tree one level per round; real trees are a
/// handful of levels deep.
pub const MAX_PULL_ROUNDS: usize = 32;
pub const IN_FLIGHT: usize = 4;
/// Bytes of chunks per PUT or CHUNKS frame.
pub const FRAME_BYTES: usize = 8 << 20;
/// A receiver publishes a pack every this many bytes, so an interrupted
/// transfer keeps nearly everything that arrived.
pub const RECEIVE_PACK_TARGET: u64 = 32 << 20;

#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub protocol: u64,
    pub software: String,
    /// "push", "pull" or "bundle" from a client; "server" from a server.
    pub role: String,
    #[serde(default)]
    pub read_only: bool,
    /// Optional message sets this side understands; "deltas" = PUT_DELTA,
    /// DELTA_BASES and GET_DELTA (PROTOCOL.md §9.2); "header-deltas" = it
    /// decodes header deltas in them (§9.2.8). Absent from older peers.
    #[serde(default)]
    pub features: Vec<String>,
}

impl Hello {
    pub fn speaks_deltas(&self) -> bool {
        self.features.iter().any(|f| f == "deltas")
    }

    pub fn speaks_header_deltas(&self) -> bool {
        self.speaks_deltas() && self.features.iter().any(|f| f == HEADER_DELTAS)
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct PublishMsg {
    pub name: String,
    pub recipe: ChunkId,
    pub len: u64,
}

/// What a transfer did, for reports and `--json`.
#[derive(Serialize, Debug, Default, Clone)]
pub struct TransferReport {
    pub name: String,
    pub image_bytes: u64,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub chunks_skipped: u64,
    pub layers_skipped: u64,
    /// Bytes of chunk payload moved: chunks as stored plus delta frames.
    pub payload_bytes: u64,
    /// Chunks sent as deltas, and the bytes of their frames.
    pub delta_chunks: u64,
    pub delta_bytes: u64,
    /// Uncompressed bytes of the chunks sent as deltas, and what they would
    /// have cost as stored.
    pub delta_raw_bytes: u64,
    pub delta_instead_of: u64,
    /// Every byte written to and read from the stream, framing included.
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub seconds: f64,
}

/// Counts bytes through a stream.
pub struct Counted<S> {
    pub inner: S,
    pub count: u64,
}

impl<S: Read> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn hello(role: &str, read_only: bool) -> Vec<u8> {
    serde_json::to_vec(&Hello {
        protocol: PROTOCOL_VERSION,
        software: format!("wharf {}", env!("CARGO_PKG_VERSION")),
        role: role.into(),
        read_only,
        features: vec!["deltas".into(), HEADER_DELTAS.into()],
    })
    .unwrap_or_default()
}

fn expect(r: &mut dyn Read, kind: Kind) -> Result<Vec<u8>> {
    match read_frame(r)? {
        Some(f) if f.kind == kind => Ok(f.payload),
        Some(f) if f.kind == Kind::Error => Err(Error::Remote(
            String::from_utf8_lossy(&f.payload).into_owned(),
        )),
        Some(f) => Err(Error::Protocol(format!(
            "expected {kind:?}, got {:?}",
            f.kind
        ))),
        None => Err(Error::Protocol(format!(
            "connection closed while waiting for {kind:?}"
        ))),
    }
}

/// The HELLO feature of a peer that decodes header deltas.
pub const HEADER_DELTAS: &str = "header-deltas";

pub(crate) fn check_hello(payload: &[u8]) -> Result<Hello> {
    let h: Hello =
        serde_json::from_slice(payload).map_err(|e| Error::Protocol(format!("bad HELLO: {e}")))?;
    if h.protocol != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "the other side speaks protocol version {}, this wharf speaks {PROTOCOL_VERSION}: upgrade the older one",
            h.protocol
        )));
    }
    Ok(h)
}

/// The words with which a receiver says some deltas failed: a pushing
/// client that reads them sends the rest again without deltas.
pub const DELTAS_FAILED: &str = "could not be applied";

/// What became of one delta a receiver was sent.
#[derive(Debug, Clone, Copy)]
pub enum DeltaOutcome {
    /// Rebuilt, verified, stored as this chunk.
    Stored(ChunkId),
    /// Not applied (base missing here, or the rebuild failed its check);
    /// the chunk is known only by its check prefix.
    Failed([u8; wharf_format::delta::CHECK_LEN]),
}

/// Reads chunks into the store: verifies each, and publishes names only
/// when complete. Shared by the server (push) and by `unbundle`.
pub struct Receiver {
    store: Arc<Store>,
    writer: Option<ChunkWriter>,
    resolver: Option<Arc<BaseResolver>>,
    pub received: u64,
    pub new_chunks: u64,
    /// Deltas that could not be applied (a base missing here, or corrupt),
    /// and the first reason: their chunks stay missing, so PUBLISH says so
    /// and the sender sends them whole.
    pub delta_failures: u64,
    pub first_delta_failure: Option<String>,
}

impl Receiver {
    pub fn new(store: Arc<Store>) -> Self {
        Receiver {
            store,
            writer: None,
            resolver: None,
            received: 0,
            new_chunks: 0,
            delta_failures: 0,
            first_delta_failure: None,
        }
    }

    /// Rebuilds the chunks of a PUT_DELTA payload from bases in this store,
    /// checks each against its hash, and stores it as an ordinary chunk.
    pub fn put_delta(&mut self, payload: &[u8]) -> Result<Vec<DeltaOutcome>> {
        let deltas = wharf_format::delta::decode_frame(payload)?;
        let resolver = self
            .resolver
            .get_or_insert_with(|| Arc::new(BaseResolver::new(self.store.clone())))
            .clone();
        if self.writer.is_none() {
            self.writer()?;
        }
        let Some(w) = self.writer.as_ref() else {
            return Err(Error::Protocol("no writer".into()));
        };
        let mut failures = Vec::new();
        let mut out = Vec::new();
        resolver.apply_frame(&deltas, &mut |d, r| {
            match r {
                Ok(chunks) => {
                    for (id, raw) in chunks {
                        w.put_with_id(id, &raw)?;
                        out.push(DeltaOutcome::Stored(id));
                    }
                }
                Err(e) => {
                    failures.push(e.to_string());
                    out.extend(d.targets.iter().map(|t| DeltaOutcome::Failed(t.0)));
                }
            }
            Ok(())
        })?;
        self.received += out.len() as u64;
        self.delta_failures += failures.len() as u64;
        if self.first_delta_failure.is_none() {
            self.first_delta_failure = failures.into_iter().next();
        }
        Ok(out)
    }

    fn writer(&mut self) -> Result<&ChunkWriter> {
        if self.writer.is_none() {
            // Chunks rebuilt from deltas are compressed again at the store's
            // level, on every core: with one thread that was the slowest
            // stage of a delta push.
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2);
            self.writer = Some(ChunkWriter::with_pack_target(
                self.store.clone(),
                threads,
                RECEIVE_PACK_TARGET,
            )?);
        }
        self.writer
            .as_ref()
            .ok_or_else(|| Error::Protocol("no writer".into()))
    }

    /// Takes the chunks of a PUT or CHUNKS payload: checks its framing and
    /// queues it to be verified and stored while the caller reads the
    /// next. A bad chunk is reported by this call, a later one or `flush`
    /// (PROTOCOL.md §9.3: the chunks before it are kept).
    pub fn put(&mut self, payload: Vec<u8>) -> Result<()> {
        let entries = decode_entries(&payload)?;
        let n = entries.len() as u64;
        self.writer()?.put_received(payload, entries)?;
        self.received += n;
        Ok(())
    }

    /// Makes everything received durable and visible to lookups.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            let stats = w.finish()?;
            self.new_chunks += stats.get(|s| &s.chunks_new);
        }
        self.store.reload_index()?;
        Ok(())
    }

    /// Says how many deltas could not be applied here and why the first
    /// failed, in the words a sender recognises ([`DELTAS_FAILED`]).
    pub fn delta_failure(&self) -> Option<String> {
        self.first_delta_failure.as_ref().map(|why| {
            format!(
                "{} delta(s) {DELTAS_FAILED} here, the first because: {why}",
                self.delta_failures
            )
        })
    }

    pub fn publish(&mut self, msg: &PublishMsg) -> Result<()> {
        self.flush()?;
        let missing = walk::missing(&self.store, &msg.recipe)?;
        if !missing.is_empty() {
            let deltas = self
                .delta_failure()
                .map(|m| format!("; {m}"))
                .unwrap_or_default();
            return Err(Error::Protocol(format!(
                "cannot publish {:?}: {} chunk(s) of its recipe are missing here (first: {}){deltas}",
                msg.name,
                missing.len(),
                missing[0]
            )));
        }
        // The length a name records is the recipe's, not the sender's word.
        let recipe = wharf_format::extract::load_recipe(&self.store, &msg.recipe)?;
        if recipe.len != msg.len {
            return Err(Error::Protocol(format!(
                "cannot publish {:?}: PUBLISH says {} bytes, its recipe {}",
                msg.name, msg.len, recipe.len
            )));
        }
        self.store.set_ref(
            &msg.name,
            &RefValue {
                recipe: msg.recipe,
                added: wharf_format::ingest::now_secs(),
                len: recipe.len,
            },
        )?;
        Ok(())
    }
}

/// What one reply frame of a pull brought: chunks in all, and how many of
/// them came as deltas.
#[derive(Default)]
pub(crate) struct Taken {
    pub chunks: usize,
    pub deltas: usize,
}

/// Stores what one CHUNKS or PUT_DELTA frame of a pull's reply carries.
/// Every chunk must be one of `want` and is removed from it as it arrives
/// (a server answers only what was asked, each once); a delta that could
/// not be applied adds to `failed` the wanted ids its check prefix names,
/// to be asked for whole. PUT_DELTA is accepted only with `deltas`.
pub(crate) fn take_reply(
    receiver: &mut Receiver,
    f: crate::frame::Frame,
    deltas: bool,
    want: &mut HashSet<ChunkId>,
    failed: &mut Vec<ChunkId>,
) -> Result<Taken> {
    match f.kind {
        Kind::Chunks => {
            let chunks = decode_entries(&f.payload)?;
            if chunks.is_empty() {
                return Err(Error::Protocol(
                    "CHUNKS reply does not match the request".into(),
                ));
            }
            if !chunks.iter().all(|c| want.remove(&c.id)) {
                return Err(Error::Protocol(
                    "CHUNKS reply carries chunks that were not asked for".into(),
                ));
            }
            let n = chunks.len();
            receiver.put(f.payload)?;
            Ok(Taken {
                chunks: n,
                deltas: 0,
            })
        }
        Kind::PutDelta if deltas => {
            let outcomes = receiver.put_delta(&f.payload)?;
            if outcomes.is_empty() || outcomes.len() > want.len() {
                return Err(Error::Protocol(
                    "delta reply does not match the request".into(),
                ));
            }
            for o in &outcomes {
                match o {
                    DeltaOutcome::Stored(id) => {
                        if !want.remove(id) {
                            return Err(Error::Protocol(
                                "delta reply rebuilt a chunk that was not asked for".into(),
                            ));
                        }
                    }
                    DeltaOutcome::Failed(check) => {
                        failed.extend(want.iter().filter(|i| i.0[..check.len()] == check[..]));
                    }
                }
            }
            Ok(Taken {
                chunks: outcomes.len(),
                deltas: outcomes.len(),
            })
        }
        Kind::Error => Err(Error::Remote(
            String::from_utf8_lossy(&f.payload).into_owned(),
        )),
        k => Err(Error::Protocol(format!("expected CHUNKS, got {k:?}"))),
    }
}

/// Most candidate bases a DELTA_BASES message may offer.
pub const MAX_DELTA_BASES: usize = 64;

/// DELTA_BASES: the recipe being pulled, then the recipes the client holds.
pub(crate) fn encode_delta_bases(target: &ChunkId, cands: &[ChunkId]) -> Vec<u8> {
    let mut ids = vec![*target];
    ids.extend(cands.iter().take(MAX_DELTA_BASES).copied());
    encode_ids(&ids)
}

pub(crate) fn decode_delta_bases(payload: &[u8]) -> Result<(ChunkId, Vec<ChunkId>)> {
    let ids = decode_ids(payload)?;
    match ids.split_first() {
        Some((t, rest)) if rest.len() <= MAX_DELTA_BASES => Ok((*t, rest.to_vec())),
        _ => Err(Error::Protocol(format!(
            "DELTA_BASES with {} ids (1 target and at most {MAX_DELTA_BASES} bases)",
            ids.len()
        ))),
    }
}

/// The reply to HAS: one bit per id, set when the store holds that chunk.
/// Shared by the stream server and the HTTP server.
pub(crate) fn answer_has(store: &Store, payload: &[u8]) -> Result<Vec<u8>> {
    let ids = decode_ids(payload)?;
    Ok(bitmap(ids.iter().map(|i| store.contains(i))))
}

/// The reply to HAS_LAYERS against `complete` (from `walk::complete_layers`).
pub(crate) fn answer_has_layers(complete: &HashSet<ChunkId>, payload: &[u8]) -> Result<Vec<u8>> {
    let ids = decode_ids(payload)?;
    Ok(bitmap(ids.iter().map(|i| complete.contains(i))))
}

/// Chunks read from the store at once when answering GET: on an object
/// store, one round of coalesced ranged reads.
pub(crate) const READ_BATCH: usize = 64;

/// Appends chunks `ids`, as stored, to a CHUNKS payload; returns the bytes
/// of compressed chunk data it added.
pub(crate) fn encode_stored(store: &Store, ids: &[ChunkId], buf: &mut Vec<u8>) -> Result<u64> {
    // A chunk entry is byte for byte a pack entry (§9.1): read as it is.
    let (_, n) = store.read_entries_into(ids, buf, usize::MAX)?;
    Ok(n)
}

/// Serves one session on a byte stream until the client says BYE or
/// closes it. Writes (PUT, PUBLISH) are refused when `read_only`.
pub fn serve(
    store: Arc<Store>,
    input: &mut dyn Read,
    output: &mut dyn Write,
    read_only: bool,
) -> Result<()> {
    let _lock = store.lock(false)?;
    let first = match expect(input, Kind::Hello) {
        Ok(f) => f,
        Err(e) => {
            let _ = write_frame(output, Kind::Error, e.to_string().as_bytes());
            let _ = output.flush();
            return Err(e);
        }
    };
    let client = match check_hello(&first) {
        Ok(h) => h,
        Err(e) => {
            let _ = write_frame(output, Kind::Error, e.to_string().as_bytes());
            let _ = output.flush();
            return Err(e);
        }
    };
    write_frame(output, Kind::Hello, &hello("server", read_only))?;
    output.flush().map_err(Error::Io)?;
    let mut receiver = Receiver::new(store.clone());
    // Deltas this server makes for a pull are for the client to decode.
    let pull_deltas = DeltaOptions::default().for_peer(&client);
    let result = serve_loop(&store, input, output, read_only, &mut receiver, pull_deltas);
    // What arrived stays, even when the session broke off. Chunks are
    // verified behind the reading: a bad one may only show here, at the
    // end of the stream, and is answered like any other error.
    let flushed = receiver.flush();
    let result = result.and(flushed);
    if let Err(e) = &result {
        let _ = write_frame(output, Kind::Error, e.to_string().as_bytes());
        let _ = output.flush();
    }
    result
}

fn serve_loop(
    store: &Arc<Store>,
    input: &mut dyn Read,
    output: &mut dyn Write,
    read_only: bool,
    receiver: &mut Receiver,
    pull_deltas: DeltaOptions,
) -> Result<()> {
    let mut complete: Option<HashSet<ChunkId>> = None;
    // Set by DELTA_BASES for the GET_DELTA requests of a pull.
    let mut pull_planner: Option<DeltaPlanner> = None;
    loop {
        let Some(f) = read_frame(input)? else {
            return Ok(());
        };
        match f.kind {
            Kind::Bye => return Ok(()),
            Kind::Has => {
                write_frame(output, Kind::HasReply, &answer_has(store, &f.payload)?)?;
            }
            Kind::HasLayers => {
                let c = match &mut complete {
                    Some(c) => c,
                    None => complete.insert(walk::complete_layers(store)?),
                };
                write_frame(output, Kind::HasReply, &answer_has_layers(c, &f.payload)?)?;
            }
            Kind::GetRef => {
                let name = String::from_utf8_lossy(&f.payload).into_owned();
                match store.get_ref(&name)? {
                    Some(r) => write_frame(
                        output,
                        Kind::Ref,
                        &serde_json::to_vec(&r).unwrap_or_default(),
                    )?,
                    None => write_frame(
                        output,
                        Kind::Error,
                        format!("no image named {name:?} here").as_bytes(),
                    )?,
                }
            }
            Kind::Get => {
                let ids = decode_ids(&f.payload)?;
                let mut buf = Vec::new();
                for batch in ids.chunks(READ_BATCH) {
                    encode_stored(store, batch, &mut buf)?;
                    if buf.len() >= FRAME_BYTES {
                        write_frame(output, Kind::Chunks, &buf)?;
                        buf.clear();
                    }
                }
                if !buf.is_empty() {
                    write_frame(output, Kind::Chunks, &buf)?;
                }
            }
            Kind::DeltaBases => {
                let (target, cands) = decode_delta_bases(&f.payload)?;
                let c = match &mut complete {
                    Some(c) => c,
                    None => complete.insert(walk::complete_layers(store)?),
                };
                let usable: Vec<bool> = cands
                    .iter()
                    .map(|r| send::held_whole(store, r, c))
                    .collect();
                let mut bases: Vec<ChunkId> = cands
                    .iter()
                    .zip(&usable)
                    .filter(|(_, u)| **u)
                    .map(|(c, _)| *c)
                    .collect();
                bases.truncate(send::MAX_BASE_IMAGES);
                let chosen: HashSet<ChunkId> = bases.iter().copied().collect();
                // Deltas are an optimisation: a planner that cannot be built
                // leaves the pull plain rather than failing it.
                pull_planner = if store.contains(&target) {
                    send::planner(
                        store,
                        &target,
                        // The client offered recipes it holds.
                        &send::Bases {
                            images: bases.clone(),
                            recipes_held: true,
                        },
                        pull_deltas,
                    )
                    .unwrap_or(None)
                } else {
                    None
                };
                let used = cands
                    .iter()
                    .map(|c| pull_planner.is_some() && chosen.contains(c));
                write_frame(output, Kind::HasReply, &bitmap(used))?;
            }
            Kind::GetDelta => {
                let ids = decode_ids(&f.payload)?;
                let mut rep = TransferReport::default();
                send::encode_chunks(
                    store,
                    pull_planner.as_ref(),
                    &ids,
                    FRAME_BYTES,
                    &mut rep,
                    &mut |kind, payload, _| {
                        let kind = if kind == Kind::Put {
                            Kind::Chunks
                        } else {
                            kind
                        };
                        write_frame(output, kind, &payload)
                    },
                )?;
            }
            Kind::Put => {
                if read_only {
                    return Err(Error::Protocol("this server is read-only".into()));
                }
                receiver.put(f.payload)?;
            }
            Kind::PutDelta => {
                if read_only {
                    return Err(Error::Protocol("this server is read-only".into()));
                }
                receiver.put_delta(&f.payload)?;
            }
            Kind::Publish => {
                if read_only {
                    return Err(Error::Protocol("this server is read-only".into()));
                }
                let msg: PublishMsg = serde_json::from_slice(&f.payload)
                    .map_err(|e| Error::Protocol(format!("bad PUBLISH: {e}")))?;
                // An incomplete recipe is answered, not fatal: the client
                // may send what is missing and publish again.
                if let Err(e) = receiver.publish(&msg) {
                    match e {
                        Error::Protocol(m) if m.starts_with("cannot publish") => {
                            write_frame(output, Kind::Error, m.as_bytes())?;
                            output.flush().map_err(Error::Io)?;
                            continue;
                        }
                        e => return Err(e),
                    }
                }
                complete = None;
                write_frame(
                    output,
                    Kind::Ok,
                    &serde_json::to_vec(&serde_json::json!({"published": msg.name}))
                        .unwrap_or_default(),
                )?;
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} from a client"
                )))
            }
        }
        output.flush().map_err(Error::Io)?;
    }
}

/// The client end of a session.
pub struct Client<R: Read, W: Write> {
    pub input: Counted<R>,
    pub output: Counted<W>,
    pub server: Hello,
}

impl<R: Read, W: Write> Client<R, W> {
    pub fn connect(input: R, output: W, role: &str) -> Result<Self> {
        let mut input = Counted {
            inner: input,
            count: 0,
        };
        let mut output = Counted {
            inner: output,
            count: 0,
        };
        write_frame(&mut output, Kind::Hello, &hello(role, false))?;
        output.flush().map_err(Error::Io)?;
        let server = check_hello(&expect(&mut input, Kind::Hello)?)?;
        Ok(Client {
            input,
            output,
            server,
        })
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        write_frame(&mut self.output, kind, payload)
            .and_then(|()| self.output.flush().map_err(Error::Io))
            .map_err(|e| self.why_closed(e))
    }

    /// A server that fails (its disk is full, a chunk is bad) says why in an
    /// ERROR frame and hangs up; the client, busy writing chunks, sees only a
    /// broken pipe. Reports what the server said instead, when it said it
    /// (after at most a few replies still in flight).
    fn why_closed(&mut self, e: Error) -> Error {
        let hung_up = matches!(&e, Error::Io(io) if matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ));
        if hung_up {
            for _ in 0..=IN_FLIGHT {
                match read_frame(&mut self.input) {
                    Ok(Some(f)) if f.kind == Kind::Error => {
                        return Error::Remote(String::from_utf8_lossy(&f.payload).into_owned())
                    }
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
        e
    }

    /// Asks which of `ids` the server has (`layers`: as complete layers of
    /// published images), keeping several batches in flight.
    fn ask_has(&mut self, ids: &[ChunkId], layers: bool) -> Result<Vec<bool>> {
        let kind = if layers { Kind::HasLayers } else { Kind::Has };
        let mut out = Vec::with_capacity(ids.len());
        let mut batches = ids.chunks(BATCH_IDS);
        let mut waiting: VecDeque<usize> = VecDeque::new();
        loop {
            while waiting.len() < IN_FLIGHT {
                let Some(b) = batches.next() else { break };
                self.send(kind, &encode_ids(b))?;
                waiting.push_back(b.len());
            }
            let Some(n) = waiting.pop_front() else { break };
            let map = expect(&mut self.input, Kind::HasReply)?;
            out.extend((0..n).map(|i| bit(&map, i)));
        }
        Ok(out)
    }

    /// What pushing `name` would send, per layer, without sending it.
    pub fn plan_push(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        deltas: DeltaOptions,
    ) -> Result<walk::Plan> {
        let plan = send::plan(
            store,
            name,
            deltas.for_peer(&self.server),
            &mut |ids, layers| self.ask_has(ids, layers),
        )?;
        self.send(Kind::Bye, &[])?;
        Ok(plan)
    }

    /// Sends image `name` from `store` and publishes it on the server as
    /// `as_name`, with chunks as deltas where `deltas` allows. Should the
    /// server lack a base after all, the push goes on without deltas: what
    /// arrived is kept and only the rest is sent.
    pub fn push(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &dyn Fn(&TransferReport),
    ) -> Result<TransferReport> {
        if self.server.read_only {
            let _ = self.send(Kind::Bye, &[]);
            return Err(Error::Remote(
                "this server is read-only: it accepts pulls, not pushes".into(),
            ));
        }
        let started = std::time::Instant::now();
        let mut rep = send::with_fallback(deltas, |d| {
            self.push_once(store, name, as_name, d, progress)
        })?;
        self.send(Kind::Bye, &[])?;
        rep.wire_bytes_out = self.output.count;
        rep.wire_bytes_in = self.input.count;
        rep.seconds = started.elapsed().as_secs_f64();
        progress(&rep);
        Ok(rep)
    }

    fn push_once(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &dyn Fn(&TransferReport),
    ) -> Result<TransferReport> {
        let deltas = deltas.for_peer(&self.server);
        let mut plan = send::prepare(store, name, as_name, None, deltas, &mut |ids, layers| {
            self.ask_has(ids, layers)
        })?;
        let mut rep = std::mem::take(&mut plan.report);
        send::encode_chunks(
            store,
            plan.planner.as_ref(),
            &plan.negotiated.missing,
            FRAME_BYTES,
            &mut rep,
            &mut |kind, payload, rep| {
                self.send(kind, &payload)?;
                let mut snap = rep.clone();
                snap.wire_bytes_out = self.output.count;
                progress(&snap);
                Ok(())
            },
        )?;
        let msg = PublishMsg {
            name: as_name.to_string(),
            recipe: plan.recipe,
            len: plan.len,
        };
        self.send(Kind::Publish, &serde_json::to_vec(&msg).unwrap_or_default())?;
        expect(&mut self.input, Kind::Ok)?;
        Ok(rep)
    }

    /// Fetches image `name` from the server into `store` as `as_name`,
    /// with chunks as deltas against images this store holds when the
    /// server can make them.
    pub fn pull(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        progress: &dyn Fn(&TransferReport),
    ) -> Result<TransferReport> {
        self.pull_with(store, name, as_name, DeltaOptions::default(), progress)
    }

    /// [`Client::pull`] with explicit delta options.
    pub fn pull_with(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &dyn Fn(&TransferReport),
    ) -> Result<TransferReport> {
        let started = std::time::Instant::now();
        let (r, mut rep, mut receiver, _, _lock) =
            self.fetch_tree(store, name, as_name, deltas, false, progress)?;
        receiver.publish(&PublishMsg {
            name: as_name.to_string(),
            recipe: r.recipe,
            len: r.len,
        })?;
        self.send(Kind::Bye, &[])?;
        rep.wire_bytes_out = self.output.count;
        rep.wire_bytes_in = self.input.count;
        rep.seconds = started.elapsed().as_secs_f64();
        progress(&rep);
        Ok(rep)
    }

    /// What pulling `name` would fetch: the image's objects (recipe, nodes,
    /// lists: a fraction of a percent of it) are fetched to find out, and
    /// kept, so the pull that follows does not fetch them again; no name
    /// changes, and gc removes them if no pull follows.
    pub fn plan_pull(&mut self, store: &Arc<Store>, name: &str) -> Result<walk::Plan> {
        let (r, _, mut receiver, fetched, _lock) =
            self.fetch_tree(store, name, name, DeltaOptions::none(), true, &|_| {})?;
        receiver.flush()?;
        self.send(Kind::Bye, &[])?;
        walk::plan_pull(store, name, &r, &fetched)
    }

    /// Fetches what the store lacks of `name`'s tree, level by level: with
    /// `objects_only`, just what walking it needs. Returns the ref, the
    /// report so far, the receiver (to publish through), the ids fetched and
    /// the store lock, held until the caller is done.
    #[allow(clippy::type_complexity)]
    fn fetch_tree(
        &mut self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        objects_only: bool,
        progress: &dyn Fn(&TransferReport),
    ) -> Result<(
        RefValue,
        TransferReport,
        Receiver,
        HashSet<ChunkId>,
        wharf_format::store::StoreLock,
    )> {
        self.send(Kind::GetRef, name.as_bytes())?;
        let r: RefValue = serde_json::from_slice(&expect(&mut self.input, Kind::Ref)?)
            .map_err(|e| Error::Protocol(format!("bad REF: {e}")))?;
        let mut rep = TransferReport {
            name: as_name.to_string(),
            image_bytes: r.len,
            ..Default::default()
        };
        let lock = store.lock(false)?;
        let mut receiver = Receiver::new(store.clone());
        // Offer the server this store's images as bases; it answers which
        // it holds too and will make deltas against.
        let mut use_deltas = false;
        if deltas.enabled && self.server.speaks_deltas() {
            let cands = send::candidate_bases(store, name, &r.recipe)?;
            if !cands.is_empty() {
                self.send(Kind::DeltaBases, &encode_delta_bases(&r.recipe, &cands))?;
                let map = expect(&mut self.input, Kind::HasReply)?;
                use_deltas = (0..cands.len()).any(|i| bit(&map, i));
            }
        }
        // Chunks whose delta failed here are asked for whole next time.
        let mut whole_only: HashSet<ChunkId> = HashSet::new();
        // Walk down the tree: whatever is missing is fetched (objects needed
        // to walk further first), until nothing is missing.
        let mut rounds = 0usize;
        let mut fetched: HashSet<ChunkId> = HashSet::new();
        loop {
            receiver.flush()?;
            let missing = if objects_only {
                walk::missing_objects(store, &r.recipe)?
            } else {
                walk::missing(store, &r.recipe)?
            };
            if missing.is_empty() {
                break;
            }
            if objects_only {
                fetched.extend(missing.iter().copied());
            }
            rounds += 1;
            if rounds > MAX_PULL_ROUNDS {
                return Err(Error::Protocol(format!(
                    "{name}: the image's tree is deeper than {MAX_PULL_ROUNDS} levels; refusing to go on"
                )));
            }
            rep.chunks_total += missing.len() as u64;
            // One GET at a time: its reply can be megabytes, and a client
            // still writing requests while the server writes a reply could
            // block both on small pipes. Batches are large instead.
            for batch in missing.chunks(GET_BATCH) {
                let delta_ok = use_deltas && !batch.iter().any(|i| whole_only.contains(i));
                let kind = if delta_ok { Kind::GetDelta } else { Kind::Get };
                self.send(kind, &encode_ids(batch))?;
                let mut want: HashSet<ChunkId> = batch.iter().copied().collect();
                let mut left = batch.len();
                let mut failed = Vec::new();
                while left > 0 {
                    let f = read_frame(&mut self.input)?.ok_or_else(|| {
                        Error::Protocol("connection closed while waiting for CHUNKS".into())
                    })?;
                    let len = f.payload.len() as u64;
                    let got = take_reply(&mut receiver, f, delta_ok, &mut want, &mut failed)?;
                    rep.payload_bytes += len;
                    if got.deltas > 0 {
                        rep.delta_bytes += len;
                    }
                    rep.delta_chunks += got.deltas as u64;
                    rep.chunks_sent += got.chunks as u64;
                    left -= got.chunks;
                }
                whole_only.extend(failed);
                rep.wire_bytes_in = self.input.count;
                progress(&rep);
            }
        }
        Ok((r, rep, receiver, fetched, lock))
    }
}
