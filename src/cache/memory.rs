//! The memory tier: a byte-weighted LRU/LFU cache (moka) of blocks shared by every handle of
//! the mount. It serves seeks back into recently read data and several handles reading one file.
//!
//! Blocks are kept as given, without a copy: readers hand in blocks that own their allocation
//! (see `ObjectStore::get_blocks`), so the weight of an entry is the memory it keeps alive.

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlockCache, BlockKey};
use crate::metrics::{self, Tier};

pub struct MemoryCache {
    blocks: moka::sync::Cache<BlockKey, Bytes>,
}

impl MemoryCache {
    /// A cache holding at most about `capacity` bytes.
    pub fn new(capacity: u64) -> MemoryCache {
        MemoryCache {
            blocks: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_k: &BlockKey, v: &Bytes| v.len().try_into().unwrap_or(u32::MAX))
                .build(),
        }
    }

    /// Bytes held now (after pending evictions are applied).
    pub fn weighted_size(&self) -> u64 {
        self.blocks.run_pending_tasks();
        self.blocks.weighted_size()
    }
}

#[async_trait]
impl BlockCache for MemoryCache {
    async fn get(&self, key: &BlockKey) -> Option<Bytes> {
        let found = self.blocks.get(key);
        metrics::cache_lookup(Tier::Memory, found.as_ref().map(|b| b.len() as u64));
        found
    }

    async fn put(&self, key: &BlockKey, data: Bytes) {
        self.blocks.insert(key.clone(), data);
        // Applying the pending insert and evictions costs little next to the 1 MiB block.
        metrics::cache_size(Tier::Memory, self.weighted_size());
    }
}
