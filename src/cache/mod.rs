//! Block caches: where bytes already fetched from the store are kept for the next reader.
//!
//! Objects are cut into fixed-size blocks ([`BLOCK_SIZE`]); a block is identified by the store,
//! the object key, the object *version* and its index. Because the version is part of the key, a
//! changed object is simply a miss: stale bytes can never be served.
//!
//! The memory tier ([`memory::MemoryCache`], behind the small [`BlockCache`] trait) sits in
//! front of the node-shared disk tier ([`disk::DiskCache`]), which adds what a shared tier
//! needs beyond get/put: claims, so that processes fill each block once between them.
//! [`tiered::TieredCache`] is the one place that knows both tiers: the read path asks it for
//! blocks, and it falls through memory, disk and store.

pub mod disk;
pub mod memory;
pub mod tiered;
pub mod write_behind;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// Size of one cached block (stated in `config`, where read options are checked against it).
pub use crate::config::BLOCK_SIZE;

/// The identity of one block of one object version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The store (`s3://bucket`, `file:///dir`): two buckets may hold the same key.
    pub store: Arc<str>,
    pub key: Arc<str>,
    pub version: Arc<str>,
    /// Block number: the block covers `index * BLOCK_SIZE ..` up to `BLOCK_SIZE` bytes.
    pub index: u64,
}

#[async_trait]
pub trait BlockCache: Send + Sync {
    /// The block's bytes, if cached.
    async fn get(&self, key: &BlockKey) -> Option<Bytes>;
    /// The same without waiting and without counting a lookup, for a caller off the async
    /// workers that looks again while it waits on a claim (see [`tiered`]).
    fn peek(&self, key: &BlockKey) -> Option<Bytes>;
    /// Offers a block to the cache, which may keep it or not.
    async fn put(&self, key: &BlockKey, data: Bytes);
}
