//! The tiered lookup: where each block of a read comes from. Memory tier first, then the
//! node-shared disk tier, then the store; what is fetched goes back to both tiers.
//!
//! This is one policy in one place, so the read path asks for a range of blocks and does not
//! know the tiers: [`TieredCache::look_up`] finds what the caches hold and claims, in the disk
//! tier, the blocks this process will fill (waiting, boundedly, for blocks another process is
//! filling right now: cross-process single-flight, see [`super::disk`]); then
//! [`TieredCache::fetch_missing`] fetches the rest with one ranged GET per run of missing
//! blocks. The two steps are apart so that a caller can take memory for the fetch only after the
//! wait: a reader waiting on another process's fill holds no memory.

use std::sync::Arc;

use bytes::Bytes;

use super::disk::{CLAIM_WAIT, Claim, DiskCache, FillGuard};
use super::{BLOCK_SIZE, BlockCache, BlockKey};
use crate::metrics::{self, Tier};
use crate::store::{DynStore, StoreError, Version};

/// The block caches of a mount (or of `bucketfs warm`) in front of its store.
pub struct TieredCache {
    store: DynStore,
    /// Names the store in cache keys.
    store_id: Arc<str>,
    memory: Arc<dyn BlockCache>,
    /// The node-shared disk tier, if `--cache-dir` is set and usable.
    disk: Option<Arc<DiskCache>>,
}

/// What [`TieredCache::look_up`] found for a range: blocks in hand, and blocks to fetch (with
/// the disk claims this caller holds on them until they are written).
pub struct Lookup {
    range: BlockRange,
    sources: Vec<BlockSource>,
}

impl TieredCache {
    pub fn new(
        store: DynStore,
        memory: Arc<dyn BlockCache>,
        disk: Option<Arc<DiskCache>>,
    ) -> TieredCache {
        TieredCache {
            store_id: store.describe().into(),
            store,
            memory,
            disk,
        }
    }

    /// How the store is named in cache keys.
    pub fn store_id(&self) -> &Arc<str> {
        &self.store_id
    }

    /// The memory tier (shared by every handle of the mount).
    pub fn memory(&self) -> &Arc<dyn BlockCache> {
        &self.memory
    }

    /// The node-shared disk tier, if there is one.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Looks up the blocks of `start..end` (`start` on a block boundary) of one object version
    /// in the memory tier, then the disk tier. May wait, boundedly, for other processes filling
    /// the blocks.
    pub async fn look_up(
        &self,
        key: &Arc<str>,
        version: &Version,
        size: u64,
        start: u64,
        end: u64,
    ) -> Lookup {
        let range = BlockRange::new(self, key, version, size, start, end);
        let sources = range.look_up(self).await;
        Lookup { range, sources }
    }

    /// The bytes of the looked-up range, as whole blocks: those found, and the others fetched
    /// from the store (and offered to both tiers).
    pub async fn fetch_missing(&self, lookup: Lookup) -> Result<Vec<Bytes>, StoreError> {
        lookup.range.fetch_missing(self, lookup.sources).await
    }

    /// Brings `start..end` of an object version into the caches (what `bucketfs warm` does), and
    /// returns the number of bytes now cached.
    pub async fn fill(
        &self,
        key: &str,
        version: &Version,
        size: u64,
        start: u64,
        end: u64,
    ) -> Result<u64, StoreError> {
        let key: Arc<str> = key.into();
        let lookup = self.look_up(&key, version, size, start, end).await;
        let blocks = self.fetch_missing(lookup).await?;
        Ok(blocks.iter().map(|b| b.len() as u64).sum())
    }
}

/// Where one block of a fetch comes from.
enum BlockSource {
    /// Found in a cache.
    Have(Bytes),
    /// To fetch; with the disk claim when this caller fills the disk tier.
    Fetch(Option<FillGuard>),
}

/// The blocks of `start..end` (`start` on a block boundary) of one object version: looked up in
/// the memory tier, then the disk tier ([`BlockRange::look_up`]), and the rest fetched with one
/// ranged GET per run of missing blocks ([`BlockRange::fetch_missing`]). Blocks another process
/// is filling right now are waited for instead of fetched twice. Fetched blocks go to both tiers.
struct BlockRange {
    store_id: Arc<str>,
    key: Arc<str>,
    version: Version,
    version_id: Arc<str>,
    size: u64,
    end: u64,
    first: u64,
    last: u64,
}

impl BlockRange {
    fn new(
        tiers: &TieredCache,
        key: &Arc<str>,
        version: &Version,
        size: u64,
        start: u64,
        end: u64,
    ) -> BlockRange {
        debug_assert_eq!(start % BLOCK_SIZE, 0, "fetches start on block boundaries");
        BlockRange {
            store_id: tiers.store_id.clone(),
            key: key.clone(),
            version: version.clone(),
            version_id: version.0.as_str().into(),
            size,
            end,
            first: start / BLOCK_SIZE,
            last: (end - 1) / BLOCK_SIZE,
        }
    }

    fn block_key(&self, index: u64) -> BlockKey {
        BlockKey {
            store: self.store_id.clone(),
            key: self.key.clone(),
            version: self.version_id.clone(),
            index,
        }
    }

    /// Where each block comes from: a cache, or a fetch (with the disk claim if this caller
    /// fills the disk tier). May wait, boundedly, for other processes filling the blocks.
    async fn look_up(&self, tiers: &TieredCache) -> Vec<BlockSource> {
        let mut sources = Vec::with_capacity((self.last - self.first + 1) as usize);
        for index in self.first..=self.last {
            sources.push(match tiers.memory.get(&self.block_key(index)).await {
                Some(b) => BlockSource::Have(b),
                None => BlockSource::Fetch(None),
            });
        }
        if let Some(disk) = &tiers.disk {
            disk_lookup(
                tiers,
                disk,
                &|i| self.block_key(i),
                self.first,
                self.size,
                &mut sources,
            )
            .await;
        }
        sources
    }

    async fn fetch_missing(
        &self,
        tiers: &TieredCache,
        mut sources: Vec<BlockSource>,
    ) -> Result<Vec<Bytes>, StoreError> {
        let (key, first, end, size) = (&self.key, self.first, self.end, self.size);
        let mut i = 0usize;
        while i < sources.len() {
            if matches!(sources[i], BlockSource::Have(_)) {
                i += 1;
                continue;
            }
            let run_start = i;
            while i < sources.len() && matches!(sources[i], BlockSource::Fetch(_)) {
                i += 1;
            }
            let from = (first + run_start as u64) * BLOCK_SIZE;
            let to = ((first + i as u64) * BLOCK_SIZE).min(end);
            let fetched = tiers
                .store
                .get_blocks(key, from..to, Some(&self.version), BLOCK_SIZE)
                .await?;
            let got: u64 = fetched.iter().map(|b| b.len() as u64).sum();
            metrics::bytes_served(Tier::Bucket, got);
            if got != to - from || fetched.len() != i - run_start {
                return Err(StoreError::Transient(format!(
                    "{key}: asked for {} bytes at {from}, got {got}",
                    to - from
                )));
            }
            let mut to_disk = Vec::new();
            for (n, b) in fetched.into_iter().enumerate() {
                let index = first + (run_start + n) as u64;
                tiers.memory.put(&self.block_key(index), b.clone()).await;
                if let BlockSource::Fetch(Some(guard)) =
                    std::mem::replace(&mut sources[run_start + n], BlockSource::Have(b.clone()))
                {
                    to_disk.push((self.block_key(index), b, guard));
                }
            }
            if let (Some(disk), false) = (&tiers.disk, to_disk.is_empty()) {
                let disk = disk.clone();
                // The claims (guards) are released once the blocks are on disk.
                let _ = tokio::task::spawn_blocking(move || {
                    for (k, b, _guard) in to_disk {
                        disk.put(&k, size, &b);
                    }
                })
                .await;
            }
        }
        Ok(sources
            .into_iter()
            .filter_map(|s| match s {
                BlockSource::Have(b) => Some(b),
                BlockSource::Fetch(_) => None,
            })
            .collect())
    }
}

/// Fills `sources` from the disk tier: cached blocks become `Have`; missing ones are claimed for
/// filling, or waited for while another process fills them.
async fn disk_lookup(
    tiers: &TieredCache,
    disk: &Arc<DiskCache>,
    block_key: &impl Fn(u64) -> BlockKey,
    first: u64,
    size: u64,
    sources: &mut [BlockSource],
) {
    let wanted: Vec<BlockKey> = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, BlockSource::Fetch(_)))
        .map(|(n, _)| block_key(first + n as u64))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let disk = disk.clone();
    let found = tokio::task::spawn_blocking(move || {
        // One bound for the whole lookup, not per block: a stopped filler holding a part's worth
        // of claims costs the reader one CLAIM_WAIT, not one per block.
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        let mut said = false;
        wanted
            .into_iter()
            .map(|k| {
                // A few rounds: found, claimed, or waited for and looked at again.
                for _ in 0..3 {
                    if let Some(b) = disk.get(&k, size) {
                        return (k, BlockSource::Have(b));
                    }
                    match disk.claim(&k, size) {
                        None => return (k, BlockSource::Fetch(None)),
                        Some(Claim::Mine(guard)) => {
                            // Filled between our look and our claim?
                            if let Some(b) = disk.get(&k, size) {
                                return (k, BlockSource::Have(b));
                            }
                            return (k, BlockSource::Fetch(Some(guard)));
                        }
                        Some(Claim::Theirs) => {
                            if !disk.wait(&k, size, deadline) {
                                if !std::mem::replace(&mut said, true) {
                                    tracing::info!(
                                    key = %k.key,
                                    block = k.index,
                                    "another process has held this block's fill claim for {}s; fetching it here",
                                    CLAIM_WAIT.as_secs()
                                    );
                                }
                                metrics::claim_taken_over();
                                return (k.clone(), BlockSource::Fetch(disk.take_over(&k, size)));
                            }
                        }
                    }
                }
                (k, BlockSource::Fetch(None))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (k, src) in found {
        let hit = match &src {
            BlockSource::Have(b) => Some(b.len() as u64),
            BlockSource::Fetch(_) => None,
        };
        metrics::cache_lookup(Tier::Disk, hit);
        if let BlockSource::Have(b) = &src {
            tiers.memory.put(&k, b.clone()).await;
        }
        sources[(k.index - first) as usize] = src;
    }
}
