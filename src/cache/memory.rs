//! The memory tier: a byte-weighted LRU cache (moka) of blocks shared by every handle of the
//! mount. It serves seeks back into recently read data and several handles reading one file.
//!
//! LRU, not moka's default TinyLFU: TinyLFU admits a new entry into a full cache only if its key
//! was seen more often than the entry it would evict, and a block just fetched has been seen
//! once. It then refused most fresh blocks, so a reader that takes a block in several small
//! reads (the kernel's 128 KiB readahead windows) fetched the same block again for each of them
//! (3x the bytes read by random 4 MiB `pread`s). What is read next is what was fetched last.
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
                .eviction_policy(moka::policy::EvictionPolicy::lru())
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

    fn peek(&self, key: &BlockKey) -> Option<Bytes> {
        self.blocks.get(key)
    }

    async fn put(&self, key: &BlockKey, data: Bytes) {
        self.blocks.insert(key.clone(), data);
        // Applying the pending insert and evictions costs little next to the 1 MiB block.
        metrics::cache_size(Tier::Memory, self.weighted_size());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u64) -> BlockKey {
        BlockKey {
            store: "s".into(),
            key: "k".into(),
            version: "v".into(),
            index,
        }
    }

    /// A full tier keeps the block put last (the next small read of it is a hit), and lets go of
    /// the least recently used, even one read often long ago.
    #[tokio::test]
    async fn a_full_tier_keeps_what_was_put_last() {
        let block = Bytes::from(vec![7u8; 1 << 20]);
        let tier = MemoryCache::new(4 << 20);
        for _ in 0..8 {
            tier.put(&key(0), block.clone()).await;
            assert!(tier.get(&key(0)).await.is_some());
        }
        for index in 1..64 {
            tier.put(&key(index), block.clone()).await;
            assert!(
                tier.get(&key(index)).await.is_some(),
                "block {index} was refused"
            );
        }
        assert!(tier.get(&key(0)).await.is_none());
        assert!(tier.weighted_size() <= 4 << 20);
    }
}
