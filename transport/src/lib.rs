//! wharf's transport: move images between stores sending only the chunks
//! the other side lacks.
//!
//! One protocol (spec/PROTOCOL.md) runs over any byte stream: the stdio of
//! `ssh host wharf serve --stdio`, a local child process, or a bundle file
//! written for a receiver that cannot be reached at all. A transfer decides
//! in two levels: first whole layers (a layer the receiver holds in a
//! published image costs one hash), then chunks, asked about in batches of
//! thousands of ids with several batches in flight. Chunks travel as they
//! are stored (already compressed), are verified by the receiver before
//! they are kept, and a name is published only once every chunk of its
//! recipe is present. Whatever arrived before an interruption stays, in
//! published packs, and is not sent again.

pub mod bundle;
pub mod frame;
pub mod http;
pub mod send;
pub mod session;
pub mod walk;

pub const PROTOCOL_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] wharf_format::Error),
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the other side says: {0}")]
    Remote(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
