//! Errors that say what went wrong and where.

use std::path::PathBuf;

/// Everything the format crate can fail with.
///
/// Each variant names the object involved (a path, a chunk, an image) so that a
/// user reading the message knows what to look at without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O errors are part of the message and deliberately not also a
    // `source`: `{:#}` (anyhow) prints every source after the message, and
    // users saw "No space left on device (os error 28)" twice.
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{0}")]
    Stream(std::io::Error),

    #[error("corrupt store: {0}")]
    Corrupt(String),

    #[error("chunk {chunk} is missing from the store{}", context_suffix(.context))]
    MissingChunk { chunk: String, context: String },

    #[error("no image named {0:?} in the store (see `wharf ls`)")]
    NoSuchName(String),

    #[error("no store at {0} (create one with `wharf init`)")]
    NoStore(PathBuf),

    #[error("{path} has {what} format version {found}, and this wharf reads version {supported}{}", newer_hint(*.found, *.supported))]
    UnsupportedVersion {
        path: String,
        what: &'static str,
        found: u64,
        supported: u64,
    },

    #[error("verification failed: {0}")]
    Verify(String),

    #[error("invalid argument: {0}")]
    Invalid(String),
}

fn newer_hint(found: u64, supported: u64) -> &'static str {
    if found > supported {
        " (it was written by a newer wharf: upgrade wharf to read it)"
    } else {
        " (the version field is missing or invalid)"
    }
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" ({context})")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the action and path to an `io::Error`, the way every I/O call in
/// this crate reports failure.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|cause| Error::Io {
            action,
            path: path.into(),
            cause,
        })
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        // An io::Error that carries one of our own errors (raised inside a
        // `Read` adapter) is unwrapped so the message is not lost.
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(ours) = inner.downcast::<Error>() {
                    return *ours;
                }
            }
            return Error::Corrupt("unreadable nested error".into());
        }
        Error::Stream(e)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        e.into_io()
    }
}

impl Error {
    /// Wraps this error into an `io::Error` so it can cross a `Read` boundary
    /// and be recovered intact by `From<io::Error>`.
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}
