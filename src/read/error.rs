//! What a read can fail with; `fs/error.rs` turns it into an errno.

use crate::store::StoreError;

#[derive(thiserror::Error, Debug)]
pub enum ReadError {
    /// The object changed or vanished since the handle was opened (its reads are pinned).
    #[error("the object changed or vanished since it was opened")]
    Stale,
    /// The store did not deliver the bytes, even after its retries.
    #[error("{0}")]
    Store(#[from] StoreError),
}

pub type ReadResult<T> = Result<T, ReadError>;
