//! wharf's format crate: everything that touches the store's bytes.
//!
//! - [`chunker`]: content-defined chunking (FastCDC v2020) of streams pushed in pieces.
//! - [`tarhdr`], [`skeleton`]: walking tars without trusting them, and the
//!   skeleton encoding that keeps headers apart from contents.
//! - [`pack`], [`backend`], [`store`]: the pack store (compressed chunks in
//!   large immutable packs, sorted memory-mapped indexes, atomic refs).
//! - [`list`], [`recipe`]: how a stored byte stream is described.
//! - [`ingest`], [`extract`]: `add` and byte-identical rebuild.
//! - [`gzip`]: gzip layers stored by their plaintext and rebuilt exactly (preflate).
//! - [`zstdlayer`]: zstd layers likewise, rebuilt by recompressing with libzstd.
//! - [`delta`], [`similar`]: chunks sent as zstd deltas against bytes the
//!   receiver holds, and finding those bytes.
//! - [`maintenance`]: `verify`, `gc`, and per-image statistics.
//!
//! The byte layouts are specified in `spec/FORMAT.md` at the repository root.

pub mod backend;
pub mod chanread;
pub mod chunker;
pub mod delta;
pub mod error;
pub mod extract;
pub mod gzip;
pub mod hash;
pub mod hdrdelta;
pub mod ingest;
pub mod list;
pub mod maintenance;
pub mod pack;
pub mod recipe;
pub mod similar;
pub mod skeleton;
pub mod store;
pub mod synth;
pub mod tarhdr;
pub mod zstdlayer;

pub use error::{Error, Result};
pub use hash::ChunkId;
pub use store::Store;
