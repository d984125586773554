//! Per-handle reading of one object version.
//!
//! Every read is a ranged GET pinned to the version seen at open: if the object changes under
//! an open handle, the store answers `PreconditionFailed` and the application gets `ESTALE`,
//! never a mix of two versions.

use bytes::Bytes;

use crate::fs::{FsError, FsResult};
use crate::store::{DynStore, StoreError, Version};

pub struct Reader {
    store: DynStore,
    key: String,
    version: Version,
    size: u64,
}

impl Reader {
    pub fn new(store: DynStore, key: String, version: Version, size: u64) -> Reader {
        Reader {
            store,
            key,
            version,
            size,
        }
    }

    /// Up to `len` bytes at `offset`; fewer only at the end of the object.
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        self.store
            .get_range(&self.key, offset..end, Some(&self.version))
            .await
            .map_err(|e| match e {
                StoreError::PreconditionFailed(_) | StoreError::NotFound(_) => FsError::Stale,
                e => FsError::Store(e),
            })
    }
}
