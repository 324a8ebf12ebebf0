//! The protocol over HTTP: `wharf serve --listen` and push/pull to `http://`.
//!
//! Each message of the stream protocol becomes one stateless request (see
//! spec/PROTOCOL-HTTP.md): the bodies are the same payloads the stream
//! frames carry, so the encoders, decoders and the `Receiver` are shared
//! with `session.rs`. A PUT request's chunks are verified, written and
//! published (pack, then index) before the reply, so whatever a request
//! stored survives the interruption of any later one.
//!
//! The server is axum on tokio; store work runs on `spawn_blocking`. The
//! client is blocking (ureq, plain HTTP only: no TLS in this build), with a
//! few threads to keep several requests in flight.

use crate::frame::Kind;
use crate::frame::{bit, decode_entries, encode_ids, MAX_FRAME};
use crate::send::{self, DeltaOptions};
use crate::session::{
    answer_has, answer_has_layers, check_hello, encode_stored, hello, take_reply, Hello,
    PublishMsg, Receiver, TransferReport, BATCH_IDS, GET_BATCH, IN_FLIGHT, READ_BATCH,
};
use crate::{walk, Error, Result, PROTOCOL_VERSION};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use wharf_format::similar::DeltaPlanner;
use wharf_format::store::RefValue;
use wharf_format::{ChunkId, Store};

/// Largest request body the server reads (larger: 413), and the largest
/// reply body a client reads.
pub const MAX_BODY: usize = MAX_FRAME as usize;
/// Bytes of chunks a client puts in one PUT request. Each PUT becomes one
/// pack on the receiver, so this is large.
pub const PUT_BYTES: usize = 32 << 20;
/// PUT and PUT_DELTA bodies a server reads and stores at once; more wait
/// their turn unread. Each costs a few times its size while it is read,
/// checked and stored: with every client's 4 at once, a push of all-new
/// data peaked at 306 MB on the server.
pub const UPLOADS_AT_ONCE: usize = 2;
/// PUT and PUT_DELTA requests a client keeps in flight: two keep the
/// server's cores and the link busy, and each body held costs PUT_BYTES.
pub const UPLOADS_IN_FLIGHT: usize = 2;
/// A GET reply stops adding chunks past this many bytes; the client asks
/// again for the rest.
pub const GET_REPLY_BYTES: usize = 32 << 20;
/// Header a client may send; a server refuses a version it does not speak.
pub const VERSION_HEADER: &str = "wharf-protocol";

/// Reads a token file: one line, the trailing newline dropped. An empty
/// token, or one with control characters, is refused.
pub fn read_token_file(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("read token file {}: {e}", path.display()),
        ))
    })?;
    check_token(s.trim_end_matches(['\n', '\r']))
        .map_err(|e| Error::Protocol(format!("token file {}: {e}", path.display())))
}

/// A token as given (`$WHARF_TOKEN` or a file): non-empty, visible ASCII.
pub fn check_token(t: &str) -> Result<String> {
    if t.is_empty() {
        return Err(Error::Protocol("the token is empty".into()));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Protocol(
            "the token must be printable ASCII without spaces".into(),
        ));
    }
    Ok(t.to_string())
}

/// Who may do what. No push token: the server is read-only.
#[derive(Clone, Default)]
pub struct Tokens {
    pub push: Option<String>,
    pub read: Option<String>,
}

#[derive(Clone)]
struct Srv {
    store: Arc<Store>,
    tokens: Arc<Tokens>,
    /// Serializes finishing writers: each finish may merge index files.
    finish: Arc<Mutex<()>>,
    /// Upload bodies read and stored at once ([`UPLOADS_AT_ONCE`]).
    uploads: Arc<tokio::sync::Semaphore>,
    /// Delta planners of recent pulls, by (recipe, bases, whether the
    /// client decodes header deltas): the requests of
    /// one pull share one, since building it reads every paired skeleton.
    planners: Arc<Mutex<Vec<PlannerEntry>>>,
}

/// A cached planner, its key, and when it was last used.
type PlannerEntry = (
    (ChunkId, Vec<ChunkId>, bool),
    Arc<DeltaPlanner>,
    std::time::Instant,
);

/// Planners kept by a server.
const PLANNERS_KEPT: usize = 4;
/// A planner unused this long is dropped: it holds maps the size of its
/// image's chunk list, and its pull is over.
const PLANNER_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// The body of a get-delta request: the number of base recipes (u32 LE),
/// the recipe pulled, the base recipes, then the chunk ids wanted.
pub(crate) fn encode_get_delta(target: &ChunkId, bases: &[ChunkId], ids: &[ChunkId]) -> Vec<u8> {
    let mut out = (bases.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&target.0);
    out.extend(encode_ids(bases));
    out.extend(encode_ids(ids));
    out
}

type GetDelta = (ChunkId, Vec<ChunkId>, Vec<ChunkId>);

fn decode_get_delta(b: &[u8]) -> Result<GetDelta> {
    let bad = || Error::Protocol("malformed get-delta request".into());
    let n = u32::from_le_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    if n > crate::session::MAX_DELTA_BASES {
        return Err(Error::Protocol(format!(
            "get-delta names {n} bases (at most {})",
            crate::session::MAX_DELTA_BASES
        )));
    }
    let head = 4 + 32 * (n + 1);
    let ids = crate::frame::decode_ids(b.get(4..head).ok_or_else(bad)?)?;
    let rest = crate::frame::decode_ids(b.get(head..).ok_or_else(bad)?)?;
    Ok((ids[0], ids[1..].to_vec(), rest))
}

/// The query by which a get-delta request says its client decodes header
/// deltas (an older server ignores it and sends zstd deltas only).
pub(crate) const HEADER_DELTAS_QUERY: &str = "header-deltas=1";

async fn h_get_delta(
    State(s): State<Srv>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let planners = s.planners.clone();
    let header_deltas = query.is_some_and(|q| q.split('&').any(|p| p == HEADER_DELTAS_QUERY));
    blocking(&s, move |store| {
        let (target, cands, ids) = decode_get_delta(&body).map_err(|e| match e {
            Error::Protocol(m) => ApiError(StatusCode::BAD_REQUEST, m),
            e => api(e),
        })?;
        for id in &ids {
            if !store.contains(id) {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("chunk {id} is not here"),
                ));
            }
        }
        // Keyed by what the client offered: the requests of one pull offer
        // the same, and which of it this store holds whole is worked out
        // (reading every published recipe) once, when the planner is built.
        let key = (target, cands.clone(), header_deltas);
        let cached = planners.lock().ok().and_then(|mut list| {
            list.retain(|(_, _, used)| used.elapsed() < PLANNER_IDLE);
            list.iter_mut()
                .find(|(k, _, _)| *k == key)
                .map(|(_, v, used)| {
                    *used = std::time::Instant::now();
                    v.clone()
                })
        });
        let planner = match cached {
            Some(p) => Some(p),
            None if store.contains(&target) => {
                let complete = walk::complete_layers(store).map_err(api)?;
                let mut bases: Vec<ChunkId> = cands
                    .into_iter()
                    .filter(|c| send::held_whole(store, c, &complete))
                    .collect();
                bases.truncate(send::MAX_BASE_IMAGES);
                // Deltas are an optimisation: a planner that cannot be
                // built leaves the reply plain rather than failing it.
                match send::planner(
                    store,
                    &target,
                    // The client offered recipes it holds.
                    &send::Bases {
                        images: bases.clone(),
                        recipes_held: true,
                    },
                    DeltaOptions {
                        header_deltas,
                        ..DeltaOptions::default()
                    },
                )
                .unwrap_or(None)
                {
                    Some(p) => {
                        let p = Arc::new(p);
                        if let Ok(mut list) = planners.lock() {
                            if list.len() >= PLANNERS_KEPT {
                                list.remove(0);
                            }
                            list.push((key, p.clone(), std::time::Instant::now()));
                        }
                        Some(p)
                    }
                    None => None,
                }
            }
            None => None,
        };
        // Framed like the stream protocol: CHUNKS and PUT_DELTA frames for
        // a prefix of the ids; the client asks again for the rest.
        let mut out = Vec::new();
        let mut rep = TransferReport::default();
        for part in ids.chunks(256) {
            if out.len() >= GET_REPLY_BYTES {
                break;
            }
            send::encode_chunks(
                store,
                planner.as_deref(),
                part,
                crate::session::FRAME_BYTES,
                &mut rep,
                &mut |kind, payload, _| {
                    let kind = if kind == Kind::Put {
                        Kind::Chunks
                    } else {
                        kind
                    };
                    crate::frame::write_frame(&mut out, kind, &payload)
                },
            )
            .map_err(api)?;
        }
        Ok(out)
    })
    .await
    .map(octets)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, self.1).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wharf\""),
            );
        }
        r
    }
}

/// Input problems are the client's (400); anything else is the server's.
fn status_of(e: &Error) -> StatusCode {
    use wharf_format::Error as F;
    match e {
        Error::Protocol(_) => StatusCode::BAD_REQUEST,
        Error::Store(F::NoSuchName(_)) => StatusCode::NOT_FOUND,
        Error::Store(F::Invalid(_)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn api(e: Error) -> ApiError {
    ApiError(status_of(&e), e.to_string())
}

/// Runs store work off the async threads, under the store's shared lock
/// (so `wharf gc` waits for it), mapping errors to replies.
async fn blocking<T: Send + 'static>(
    s: &Srv,
    f: impl FnOnce(&Arc<Store>) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || {
        let _lock = store.lock(false).map_err(|e| api(e.into()))?;
        f(&store)
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        )
    })?
}

fn octets(b: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(b),
    )
        .into_response()
}

fn json(b: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], Bytes::from(b)).into_response()
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Checks the token (before any body is read) and the protocol version.
async fn gate(State(s): State<Srv>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != "/v1/hello" {
        let write = path == "/v1/put" || path == "/v1/put-delta" || path == "/v1/publish";
        // A push token also opens reads: a push asks what the server has.
        let (need, also) = if write {
            match &s.tokens.push {
                Some(t) => (Some(t), None),
                None => {
                    return ApiError(
                        StatusCode::FORBIDDEN,
                        "this server is read-only (it was started without --push-token-file)"
                            .into(),
                    )
                    .into_response()
                }
            }
        } else {
            (s.tokens.read.as_ref(), s.tokens.push.as_ref())
        };
        if let Some(t) = need {
            match bearer(req.headers()) {
                None => {
                    return ApiError(
                        StatusCode::UNAUTHORIZED,
                        "this request needs a token (Authorization: Bearer; the client reads $WHARF_TOKEN or --token-file)".into(),
                    )
                    .into_response()
                }
                Some(got)
                    if constant_time_eq::constant_time_eq(got.as_bytes(), t.as_bytes())
                        | also.is_some_and(|a| {
                            constant_time_eq::constant_time_eq(got.as_bytes(), a.as_bytes())
                        }) => {}
                Some(_) => {
                    return ApiError(StatusCode::FORBIDDEN, "wrong token".into()).into_response()
                }
            }
        }
    }
    if let Some(v) = req.headers().get(VERSION_HEADER) {
        if v.to_str().ok() != Some(PROTOCOL_VERSION.to_string().as_str()) {
            return ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "the client speaks protocol version {}, this server speaks {PROTOCOL_VERSION}: upgrade the older one",
                    String::from_utf8_lossy(v.as_bytes())
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn h_hello(State(s): State<Srv>) -> Response {
    json(hello("server", s.tokens.push.is_none()))
}

async fn h_has(State(s): State<Srv>, body: Bytes) -> Result<Response, ApiError> {
    blocking(&s, move |store| answer_has(store, &body).map_err(api))
        .await
        .map(octets)
}

async fn h_has_layers(State(s): State<Srv>, body: Bytes) -> Result<Response, ApiError> {
    blocking(&s, move |store| {
        // Another process may have published since: look again.
        store.reload_index().map_err(|e| api(e.into()))?;
        let complete = walk::complete_layers(store).map_err(api)?;
        answer_has_layers(&complete, &body).map_err(api)
    })
    .await
    .map(octets)
}

async fn h_ref(State(s): State<Srv>, Path(name): Path<String>) -> Result<Response, ApiError> {
    blocking(&s, move |store| {
        store.reload_index().map_err(|e| api(e.into()))?;
        match store.get_ref(&name).map_err(|e| api(e.into()))? {
            Some(r) => Ok(serde_json::to_vec(&r).unwrap_or_default()),
            None => Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no image named {name:?} here"),
            )),
        }
    })
    .await
    .map(json)
}

async fn h_get(State(s): State<Srv>, body: Bytes) -> Result<Response, ApiError> {
    blocking(&s, move |store| {
        let ids = crate::frame::decode_ids(&body).map_err(api)?;
        let mut buf = Vec::new();
        for batch in ids.chunks(READ_BATCH) {
            if buf.len() >= GET_REPLY_BYTES {
                break;
            }
            if let Some(id) = batch.iter().find(|id| !store.contains(id)) {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("chunk {id} is not here"),
                ));
            }
            encode_stored(store, batch, &mut buf).map_err(api)?;
        }
        Ok(buf)
    })
    .await
    .map(octets)
}

/// Waits for an upload slot, then reads the whole body (at most
/// [`MAX_BODY`]) into one buffer sized by its Content-Length, so it is
/// held once, not once in pieces and again joined; the slot is held until
/// the returned permit is dropped.
async fn upload_body(
    s: &Srv,
    mut body: axum::body::Body,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Vec<u8>), ApiError> {
    use http_body_util::BodyExt;
    let permit = s.uploads.clone().acquire_owned().await.map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        )
    })?;
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let hint = axum::body::HttpBody::size_hint(&body);
    if hint.lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(hint.exact().unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("request body unreadable: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok((permit, out))
}

async fn h_put(State(s): State<Srv>, body: axum::body::Body) -> Result<Response, ApiError> {
    let (_slot, body) = upload_body(&s, body).await?;
    let finish = s.finish.clone();
    blocking(&s, move |store| {
        let bad = |e: Error| match e {
            // A chunk that does not decompress to its hash is the client's fault.
            Error::Store(e @ wharf_format::Error::Verify(_)) => {
                ApiError(StatusCode::BAD_REQUEST, e.to_string())
            }
            e => api(e),
        };
        // Decoding checks every entry's framing before anything is stored.
        // An empty PUT stores nothing: clients send one to check their token
        // before streaming chunks.
        if decode_entries(&body).map_err(api)?.is_empty() {
            return Ok(br#"{"received":0,"new":0}"#.to_vec());
        }
        let mut r = Receiver::new(store.clone());
        r.put(body).map_err(bad)?;
        finish_put(&finish, r, bad)
    })
    .await
    .map(json)
}

/// Publishes what one PUT or PUT_DELTA request stored (one writer finishing
/// at a time), and the reply: counts, or 409 naming deltas that failed
/// (the chunks that could be rebuilt are stored all the same; the client
/// sends the others whole).
fn finish_put(
    finish: &Mutex<()>,
    mut r: Receiver,
    bad: impl Fn(Error) -> ApiError,
) -> Result<Vec<u8>, ApiError> {
    let _one = finish.lock().map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "writer lock poisoned".into(),
        )
    })?;
    r.flush().map_err(bad)?;
    if let Some(m) = r.delta_failure() {
        return Err(ApiError(StatusCode::CONFLICT, m));
    }
    Ok(serde_json::to_vec(&serde_json::json!({
        "received": r.received,
        "new": r.new_chunks,
    }))
    .unwrap_or_default())
}

async fn h_put_delta(State(s): State<Srv>, body: axum::body::Body) -> Result<Response, ApiError> {
    let (_slot, body) = upload_body(&s, body).await?;
    let finish = s.finish.clone();
    blocking(&s, move |store| {
        let mut r = Receiver::new(store.clone());
        r.put_delta(&body).map_err(|e| match e {
            Error::Store(e @ wharf_format::Error::Corrupt(_)) => {
                ApiError(StatusCode::BAD_REQUEST, e.to_string())
            }
            e => api(e),
        })?;
        finish_put(&finish, r, api)
    })
    .await
    .map(json)
}

async fn h_publish(State(s): State<Srv>, body: Bytes) -> Result<Response, ApiError> {
    blocking(&s, move |store| {
        let msg: PublishMsg = serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad PUBLISH: {e}")))?;
        let mut r = Receiver::new(store.clone());
        r.publish(&msg).map_err(|e| match e {
            // The recipe is not complete here: push the missing chunks first.
            Error::Protocol(m) => ApiError(StatusCode::CONFLICT, m),
            e => api(e),
        })?;
        Ok(serde_json::to_vec(&serde_json::json!({"published": msg.name})).unwrap_or_default())
    })
    .await
    .map(json)
}

/// The HTTP API over `store`.
pub fn router(store: Arc<Store>, tokens: Tokens) -> Router {
    let s = Srv {
        store,
        tokens: Arc::new(tokens),
        finish: Arc::new(Mutex::new(())),
        uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS_AT_ONCE)),
        planners: Arc::new(Mutex::new(Vec::new())),
    };
    Router::new()
        .route("/v1/hello", get(h_hello))
        .route("/v1/has", post(h_has))
        .route("/v1/has-layers", post(h_has_layers))
        .route("/v1/ref/{*name}", get(h_ref))
        .route("/v1/get", post(h_get))
        .route("/v1/put", post(h_put))
        .route("/v1/put-delta", post(h_put_delta))
        .route("/v1/get-delta", post(h_get_delta))
        .route("/v1/publish", post(h_publish))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such wharf endpoint (this server speaks /v1/...)".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(s.clone(), gate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(s)
}

/// Serves `store` on `addr` until the process ends; `on_listen` is told the
/// bound address (useful with port 0) once connections are accepted.
pub fn serve(
    store: Arc<Store>,
    addr: &str,
    tokens: Tokens,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .map_err(Error::Io)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("listen on {addr}: {e}"),
            ))
        })?;
        on_listen(listener.local_addr().map_err(Error::Io)?);
        axum::serve(listener, router(store, tokens))
            .await
            .map_err(Error::Io)
    })
}

/// Starts a server on a background thread and returns its address.
pub fn spawn(store: Arc<Store>, addr: &str, tokens: Tokens) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = addr.to_string();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        if let Err(e) = serve(store, &addr, tokens, |a| {
            let _ = tx.send(Ok(a));
        }) {
            let _ = tx2.send(Err(e));
        }
    });
    rx.recv()
        .map_err(|_| Error::Protocol("the server thread stopped".into()))?
}

/// The client end: every request is independent, so it can be shared by
/// the threads that keep several in flight.
pub struct HttpClient {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    pub server: Hello,
    /// Bytes of chunks per PUT request (tests make it small).
    pub put_bytes: usize,
    pub in_flight: usize,
    /// Request and response body bytes; HTTP headers are not counted.
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
}

fn encode_path(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HttpClient {
    /// Connects to `base` (`http://host:port`), checks the protocol version.
    pub fn connect(base: &str, token: Option<String>) -> Result<Self> {
        if base.starts_with("https://") {
            return Err(Error::Protocol(format!(
                "{base}: this wharf is built without TLS; use http:// (behind a TLS proxy or a tunnel) or ssh://"
            )));
        }
        if !base.starts_with("http://") {
            return Err(Error::Protocol(format!(
                "{base}: expected http://host:port"
            )));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(std::time::Duration::from_secs(15)))
            .max_idle_connections_per_host(IN_FLIGHT * 2)
            .build();
        let mut c = HttpClient {
            agent: ureq::Agent::new_with_config(config),
            base: base.trim_end_matches('/').to_string(),
            token,
            server: Hello {
                protocol: 0,
                software: String::new(),
                role: String::new(),
                read_only: true,
                features: Vec::new(),
            },
            put_bytes: PUT_BYTES,
            in_flight: IN_FLIGHT,
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        };
        c.server = check_hello(&c.request("/v1/hello", None)?)?;
        Ok(c)
    }

    /// Request and response body bytes so far (headers not counted).
    pub fn wire_bytes(&self) -> (u64, u64) {
        (
            self.bytes_out.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
        )
    }

    /// GET `path`, or POST `body` to it; the reply body, or the server's
    /// message as an error.
    fn request(&self, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let version = PROTOCOL_VERSION.to_string();
        let res = match body {
            None => {
                let mut r = self.agent.get(&url).header(VERSION_HEADER, &version);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Some(b) => {
                self.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
                let mut r = self
                    .agent
                    .post(&url)
                    .header(VERSION_HEADER, &version)
                    .header("Content-Type", "application/octet-stream");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(b)
            }
        };
        let mut res = res.map_err(|e| Error::Io(std::io::Error::other(format!("{url}: {e}"))))?;
        let status = res.status();
        let out = res
            .body_mut()
            .with_config()
            .limit(MAX_BODY as u64)
            .read_to_vec()
            .map_err(|e| Error::Io(std::io::Error::other(format!("{url}: reply: {e}"))))?;
        self.bytes_in.fetch_add(out.len() as u64, Ordering::Relaxed);
        if !status.is_success() {
            return Err(Error::Remote(format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&out).trim()
            )));
        }
        Ok(out)
    }

    fn ask_has(&self, ids: &[ChunkId], layers: bool) -> Result<Vec<bool>> {
        let path = if layers { "/v1/has-layers" } else { "/v1/has" };
        let batches: Vec<&[ChunkId]> = ids.chunks(BATCH_IDS).collect();
        let maps = parallel(&batches, self.in_flight, |b| {
            let map = self.request(path, Some(&encode_ids(b)))?;
            if map.len() != b.len().div_ceil(8) {
                return Err(Error::Protocol(
                    "HAS reply does not match the request".into(),
                ));
            }
            Ok((0..b.len()).map(|i| bit(&map, i)).collect::<Vec<bool>>())
        })?;
        Ok(maps.into_iter().flatten().collect())
    }

    /// What pushing `name` would send, per layer, without sending it.
    pub fn plan_push(
        &self,
        store: &Arc<Store>,
        name: &str,
        deltas: DeltaOptions,
    ) -> Result<crate::walk::Plan> {
        send::plan(
            store,
            name,
            deltas.for_peer(&self.server),
            &mut |ids, layers| self.ask_has(ids, layers),
        )
    }

    /// Sends image `name` from `store` and publishes it on the server as
    /// `as_name`, with chunks as deltas where `deltas` allows; should the
    /// server lack a base after all, the rest goes without deltas.
    pub fn push(
        &self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &(dyn Fn(&TransferReport) + Sync),
    ) -> Result<TransferReport> {
        send::with_fallback(deltas, |d| {
            self.push_once(store, name, as_name, d, progress)
        })
    }

    fn push_once(
        &self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &(dyn Fn(&TransferReport) + Sync),
    ) -> Result<TransferReport> {
        let started = std::time::Instant::now();
        let deltas = deltas.for_peer(&self.server);
        let with_wire = |g: &TransferReport| -> TransferReport {
            let mut g = g.clone();
            let (o, i) = self.wire_bytes();
            g.wire_bytes_out = o;
            g.wire_bytes_in = i;
            g.seconds = started.elapsed().as_secs_f64();
            g
        };
        // A refused token is reported now, not as a broken pipe mid-upload.
        self.request("/v1/put", Some(&[]))?;
        let mut plan = send::prepare(store, name, as_name, None, deltas, &mut |ids, layers| {
            self.ask_has(ids, layers)
        })?;
        let mut rep = std::mem::take(&mut plan.report);
        let (planner, neg) = (plan.planner, plan.negotiated);
        let latest = Mutex::new(rep.clone());
        // Bodies are built here and sent by UPLOADS_IN_FLIGHT threads, handed
        // over without a queue: each body held costs PUT_BYTES.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Kind, Vec<u8>)>(0);
        let rx = Mutex::new(rx);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let produced: Result<()> = std::thread::scope(|s| {
            for _ in 0..self.in_flight.clamp(1, UPLOADS_IN_FLIGHT) {
                s.spawn(|| loop {
                    let body = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok((kind, body)) = body else { return };
                    // After a failure, bodies are drained unsent until the
                    // producer stops: a sender blocked on a full channel with
                    // no one receiving would wait forever.
                    if failed.load(Ordering::Relaxed) {
                        continue;
                    }
                    let path = if kind == Kind::PutDelta {
                        "/v1/put-delta"
                    } else {
                        "/v1/put"
                    };
                    match self.request(path, Some(&body)) {
                        Ok(_) => {
                            if let Ok(g) = latest.lock() {
                                progress(&with_wire(&g));
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                        }
                    }
                });
            }
            let result = send::encode_chunks(
                store,
                planner.as_ref(),
                &neg.missing,
                self.put_bytes,
                &mut rep,
                &mut |kind, body, rep| {
                    if let Ok(mut g) = latest.lock() {
                        *g = rep.clone();
                    }
                    if failed.load(Ordering::Relaxed) || tx.send((kind, body)).is_err() {
                        return Err(Error::Protocol("upload stopped".into()));
                    }
                    Ok(())
                },
            );
            drop(tx);
            result
        });
        if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        produced?;
        let msg = PublishMsg {
            name: as_name.to_string(),
            recipe: plan.recipe,
            len: plan.len,
        };
        self.request(
            "/v1/publish",
            Some(&serde_json::to_vec(&msg).unwrap_or_default()),
        )?;
        let out = with_wire(&rep);
        progress(&out);
        Ok(out)
    }

    /// Fetches image `name` from the server into `store` as `as_name`.
    pub fn pull(
        &self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        progress: &(dyn Fn(&TransferReport) + Sync),
    ) -> Result<TransferReport> {
        self.pull_with(store, name, as_name, DeltaOptions::default(), progress)
    }

    /// [`HttpClient::pull`] with explicit delta options: with deltas, this
    /// store's images are offered as bases with every request.
    pub fn pull_with(
        &self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        progress: &(dyn Fn(&TransferReport) + Sync),
    ) -> Result<TransferReport> {
        let started = std::time::Instant::now();
        let (r, mut rep, mut receiver, _, _lock) =
            self.fetch_tree(store, name, as_name, deltas, false, progress)?;
        receiver.publish(&PublishMsg {
            name: as_name.to_string(),
            recipe: r.recipe,
            len: r.len,
        })?;
        (rep.wire_bytes_out, rep.wire_bytes_in) = self.wire_bytes();
        rep.seconds = started.elapsed().as_secs_f64();
        progress(&rep);
        Ok(rep)
    }

    /// What pulling `name` would fetch; see [`Client::plan_pull`](crate::session::Client::plan_pull).
    pub fn plan_pull(&self, store: &Arc<Store>, name: &str) -> Result<walk::Plan> {
        let (r, _, mut receiver, fetched, _lock) =
            self.fetch_tree(store, name, name, DeltaOptions::none(), true, &|_| {})?;
        receiver.flush()?;
        walk::plan_pull(store, name, &r, &fetched)
    }

    /// Fetches what the store lacks of `name`'s tree (with `objects_only`,
    /// just what walking it needs); see the stream client's.
    #[allow(clippy::type_complexity)]
    fn fetch_tree(
        &self,
        store: &Arc<Store>,
        name: &str,
        as_name: &str,
        deltas: DeltaOptions,
        objects_only: bool,
        progress: &(dyn Fn(&TransferReport) + Sync),
    ) -> Result<(
        RefValue,
        TransferReport,
        Receiver,
        HashSet<ChunkId>,
        wharf_format::store::StoreLock,
    )> {
        let r: RefValue =
            serde_json::from_slice(&self.request(&format!("/v1/ref/{}", encode_path(name)), None)?)
                .map_err(|e| Error::Protocol(format!("bad REF: {e}")))?;
        let mut rep = TransferReport {
            name: as_name.to_string(),
            image_bytes: r.len,
            ..Default::default()
        };
        let lock = store.lock(false)?;
        let bases = if deltas.enabled && self.server.speaks_deltas() {
            let mut c = send::candidate_bases(store, name, &r.recipe)?;
            c.truncate(crate::session::MAX_DELTA_BASES);
            c
        } else {
            Vec::new()
        };
        let receiver = Mutex::new(Receiver::new(store.clone()));
        let lock_receiver = || {
            receiver
                .lock()
                .map_err(|_| Error::Protocol("receiver lock poisoned".into()))
        };
        let got_chunks = AtomicU64::new(0);
        let got_bytes = AtomicU64::new(0);
        let got_deltas = AtomicU64::new(0);
        let got_delta_bytes = AtomicU64::new(0);
        // Chunks whose delta failed here are asked for whole next time.
        let whole_only: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());
        // Walk down the tree: whatever is missing is fetched (objects needed
        // to walk further first), until nothing is missing. A reply may hold
        // only part of a batch; every round must bring at least one chunk.
        let mut fetched: HashSet<ChunkId> = HashSet::new();
        loop {
            lock_receiver()?.flush()?;
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
            let before = got_chunks.load(Ordering::Relaxed);
            let batches: Vec<&[ChunkId]> = missing.chunks(GET_BATCH).collect();
            let seen = AtomicUsize::new(0);
            parallel(&batches, self.in_flight, |b| {
                let asked: HashSet<&ChunkId> = b.iter().collect();
                let plain_only = whole_only
                    .lock()
                    .map(|w| b.iter().any(|i| w.contains(i)))
                    .unwrap_or(true);
                if bases.is_empty() || plain_only {
                    let payload = self.request("/v1/get", Some(&encode_ids(b)))?;
                    let chunks = decode_entries(&payload)?;
                    if chunks.is_empty() || chunks.iter().any(|c| !asked.contains(&c.id)) {
                        return Err(Error::Protocol(
                            "GET reply does not match the request".into(),
                        ));
                    }
                    let (n, len) = (chunks.len() as u64, payload.len() as u64);
                    lock_receiver()?.put(payload)?;
                    got_chunks.fetch_add(n, Ordering::Relaxed);
                    got_bytes.fetch_add(len, Ordering::Relaxed);
                } else {
                    let body = encode_get_delta(&r.recipe, &bases, b);
                    let reply =
                        self.request(&format!("/v1/get-delta?{HEADER_DELTAS_QUERY}"), Some(&body))?;
                    let mut rd: &[u8] = &reply;
                    let mut want: HashSet<ChunkId> = b.iter().copied().collect();
                    let mut failed = Vec::new();
                    let mut n = 0usize;
                    while let Some(f) = crate::frame::read_frame(&mut rd)? {
                        let len = f.payload.len() as u64;
                        let got =
                            take_reply(&mut *lock_receiver()?, f, true, &mut want, &mut failed)?;
                        n += got.chunks;
                        if got.deltas > 0 {
                            got_deltas.fetch_add(got.deltas as u64, Ordering::Relaxed);
                            got_delta_bytes.fetch_add(len, Ordering::Relaxed);
                        }
                        got_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    if let Ok(mut w) = whole_only.lock() {
                        w.extend(failed);
                    }
                    if n == 0 || n > b.len() {
                        return Err(Error::Protocol(
                            "get-delta reply does not match the request".into(),
                        ));
                    }
                    got_chunks.fetch_add(n as u64, Ordering::Relaxed);
                }
                if seen.fetch_add(1, Ordering::Relaxed) % 4 == 3 {
                    let mut p = rep.clone();
                    p.chunks_sent = got_chunks.load(Ordering::Relaxed);
                    p.payload_bytes = got_bytes.load(Ordering::Relaxed);
                    (p.wire_bytes_out, p.wire_bytes_in) = self.wire_bytes();
                    progress(&p);
                }
                Ok(())
            })?;
            rep.chunks_total += missing.len() as u64;
            if got_chunks.load(Ordering::Relaxed) == before {
                return Err(Error::Protocol("the server sent no chunks".into()));
            }
        }
        let receiver = receiver
            .into_inner()
            .map_err(|_| Error::Protocol("receiver lock poisoned".into()))?;
        rep.chunks_sent = got_chunks.load(Ordering::Relaxed);
        rep.payload_bytes = got_bytes.load(Ordering::Relaxed);
        rep.delta_chunks = got_deltas.load(Ordering::Relaxed);
        rep.delta_bytes = got_delta_bytes.load(Ordering::Relaxed);
        Ok((r, rep, receiver, fetched, lock))
    }
}

/// Runs `f` on every job with `n` threads; results in job order; stops
/// handing out jobs after the first error, which it returns.
fn parallel<J: Sync, R: Send>(
    jobs: &[J],
    n: usize,
    f: impl Fn(&J) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..n.clamp(1, jobs.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs.len() || failed.load(Ordering::Relaxed) {
                    return;
                }
                match f(&jobs[i]) {
                    Ok(r) => {
                        if let Ok(mut v) = results.lock() {
                            v[i] = Some(r);
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut x) = failure.lock() {
                            x.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    results
        .into_inner()
        .map_err(|_| Error::Protocol("a worker thread panicked".into()))?
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Protocol("a request was not answered".into())))
        .collect()
}
