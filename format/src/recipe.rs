//! Recipes: how to rebuild an image tar, byte for byte, from chunks.
//!
//! Every stored byte stream is a *node*: either `raw` (its bytes are one
//! chunked stream) or `tar` (a skeleton of header bytes interleaved with a
//! data stream of file contents and with child nodes, one per member whose
//! content is stored as its own node, typically a layer). Nodes are JSON,
//! stored as chunks and named by their BLAKE3 like any chunk, so identical
//! layers in two images are literally the same node. A *recipe* is the root
//! object a name points at: the outer tar's node plus the digests Docker
//! cares about.

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::list::StreamRef;
use serde::{Deserialize, Serialize};

/// Version written on `raw` and `tar` nodes (their ids stay what they were).
pub const NODE_VERSION: u64 = 1;
/// Version written on `gzip` nodes: version 2 is version 1 plus that kind, so
/// a reader that predates it reports a version to upgrade for, not damage.
pub const GZIP_NODE_VERSION: u64 = 2;
/// Version written on `gzip` nodes whose reconstruction stream holds ZSTD
/// records (zstd layers, spec/FORMAT.md §8.5): a reader that predates them
/// reports a version to upgrade for instead of an unknown record.
pub const ZSTD_NODE_VERSION: u64 = 3;
/// Highest node version this wharf reads.
pub const MAX_NODE_VERSION: u64 = ZSTD_NODE_VERSION;
pub const RECIPE_VERSION: u64 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub wharf_node: u64,
    /// Length of the bytes this node rebuilds.
    pub len: u64,
    /// SHA-256 of those bytes, hex.
    pub sha256: String,
    /// A chunk holding the BLAKE3 of each 1 MiB block of those bytes, written
    /// for layers: it lets a later add confirm that a layer arriving again is
    /// this one without chunking it again, and find where it first differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<ChunkId>,
    #[serde(flatten)]
    pub body: NodeBody,
}

/// Size of the blocks hashed into a node's block map.
pub const BLOCK_MAP_BLOCK: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NodeBody {
    Raw {
        data: StreamRef,
    },
    Tar {
        skeleton: StreamRef,
        data: StreamRef,
        children: Vec<ChunkId>,
    },
    /// A gzip stream stored by its plaintext (node `plain`, typically a
    /// `tar`) plus what preflate needs to regenerate the exact compressed
    /// bytes (`recon`, spec/FORMAT.md §8.5).
    Gzip {
        plain: ChunkId,
        recon: StreamRef,
        /// The pieces of its deflate streams were rebuilt each from the
        /// plaintext before it when `add` checked them, so extract may
        /// rebuild them in parallel (FORMAT.md §8.5). Absent (false) on
        /// nodes written before it existed: those are rebuilt one piece
        /// after another, as they were checked.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        independent: bool,
    },
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.body {
            NodeBody::Raw { .. } => "raw",
            NodeBody::Tar { .. } => "tar",
            NodeBody::Gzip { .. } => "gzip",
        }
    }

    /// The version a writer puts on a node with this body.
    pub fn version_for(body: &NodeBody) -> u64 {
        match body {
            NodeBody::Gzip { .. } => GZIP_NODE_VERSION,
            _ => NODE_VERSION,
        }
    }

    pub fn decode(bytes: &[u8], id: &ChunkId) -> Result<Node> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("node {id}: not valid JSON: {e}")))?;
        let version = v.get("wharf_node").and_then(|x| x.as_u64()).unwrap_or(0);
        let gzip = v.get("kind").and_then(|k| k.as_str()) == Some("gzip");
        if !(NODE_VERSION..=MAX_NODE_VERSION).contains(&version)
            || (gzip && version < GZIP_NODE_VERSION)
        {
            return Err(Error::UnsupportedVersion {
                path: format!("node {id}"),
                what: "node",
                found: version,
                supported: MAX_NODE_VERSION,
            });
        }
        serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("node {id}: {e}")))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One member of the outer tar stored as its own node (a layer, or any large blob).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Path of the member inside the outer tar.
    pub path: String,
    pub len: u64,
    pub sha256: String,
    pub node: ChunkId,
    /// "tar" when split into skeleton and data, "raw" when chunked as bytes,
    /// "gzip" when stored by its decompressed content (zstd layers too: the
    /// node kind is shared, see spec/FORMAT.md §8.5).
    pub kind: String,
    /// For a compressed member (found by its magic bytes): how it was
    /// stored and, when as plain chunks, why. Absent for other members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

/// How a compressed layer was stored, for `wharf info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// "gzip" or "zstd".
    pub format: String,
    /// "preflate" (gzip stored decompressed, rebuilt exactly), "libzstd"
    /// (zstd stored decompressed, rebuilt by recompressing with the
    /// parameters found) or "raw" (the compressed bytes stored as plain
    /// chunks).
    pub method: String,
    /// Bytes of the reconstruction stream (method "preflate").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recon_len: Option<u64>,
    /// Length of the decompressed content (method "preflate").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_len: Option<u64>,
    /// Number of gzip members or zstd frames (methods "preflate", "libzstd").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// The libzstd parameters found, e.g. "level 19, checksum" (method "libzstd").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// Why the compressed bytes were stored as they are (method "raw").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// gzip stored raw: the deepest match-finder chain the model was allowed
    /// (absent in recipes written before it was recorded: the stock 4,096).
    /// A later add allowed deeper models the layer again instead of reusing
    /// it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chain: Option<u32>,
}

impl Compression {
    /// A compressed member stored as plain chunks, and why.
    pub fn raw(format: &str, reason: &str) -> Compression {
        Compression {
            format: format.into(),
            method: "raw".into(),
            recon_len: None,
            plain_len: None,
            members: None,
            params: None,
            reason: Some(reason.into()),
            max_chain: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub wharf_recipe: u64,
    pub len: u64,
    pub sha256: String,
    pub blake3: String,
    /// The node of the whole tar.
    pub root: ChunkId,
    pub layers: Vec<LayerInfo>,
    /// Unix seconds when the image was added: written by wharf 0.1.0 before
    /// recipes were made reproducible; 0 and left out since, so the same tar
    /// gives the same recipe id in every store (the time lives in the ref).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl Recipe {
    pub fn decode(bytes: &[u8], id: &ChunkId) -> Result<Recipe> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("recipe {id}: not valid JSON: {e}")))?;
        let version = v.get("wharf_recipe").and_then(|x| x.as_u64()).unwrap_or(0);
        if version != RECIPE_VERSION {
            return Err(Error::UnsupportedVersion {
                path: format!("recipe {id}"),
                what: "recipe",
                found: version,
                supported: RECIPE_VERSION,
            });
        }
        serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("recipe {id}: {e}")))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
