//! Content hashes: BLAKE3 names chunks and objects, SHA-256 is what Docker checks.

use std::fmt;

/// The BLAKE3 hash of a chunk's uncompressed bytes; the name of every object
/// in the store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; 32]);

/// Hash maps and sets of ids hash the first 8 bytes only: the id is already
/// a BLAKE3 hash, so those are as well mixed as all 32, and SipHash over 8
/// bytes costs a third of SipHash over 32 (it showed up at 3 % of a delta
/// push's CPU). Ids that share 8 bytes still compare unequal, so at worst
/// they share a bucket; making many of them would take 2^64 work apiece.
impl std::hash::Hash for ChunkId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix_u64());
    }
}

impl ChunkId {
    pub fn of(bytes: &[u8]) -> Self {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }

    /// The first 8 bytes as a number; used where a well-mixed integer of the
    /// hash is needed (list boundaries, fan-out tables).
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// Hex of a SHA-256 digest.
pub fn sha256_hex(h: sha2::Sha256) -> String {
    use sha2::Digest;
    hex::encode(h.finalize())
}
