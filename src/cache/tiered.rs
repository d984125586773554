//! The tiered lookup: where each block of a read comes from. Memory tier first, then the
//! node-shared disk tier, then the store; what is fetched goes back to both tiers.
//!
//! This is one policy in one place, so the read path asks for a range of blocks and does not
//! know the tiers: [`TieredCache::look_up`] finds what the caches hold and claims, in the disk
//! tier, the blocks this process will fill (waiting, boundedly, for blocks another process is
//! filling right now: cross-process single-flight, see [`super::disk`]; a block another fetch of
//! this process is filling is taken from memory as soon as that fetch has it); then
//! [`TieredCache::fetch_missing`] fetches the rest with one ranged GET per run of missing
//! blocks. The two steps are apart so that a caller can take memory for the fetch only after the
//! wait: a reader waiting on another process's fill holds no memory.

use std::sync::Arc;

use bytes::Bytes;

use super::disk::{CLAIM_WAIT, Claim, DiskCache, FillGuard, Found};
use super::write_behind::{QUEUE_BYTES, WriteBehind};
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
    /// The disk tier's write-behind queue, with the disk tier.
    writer: Option<Arc<WriteBehind>>,
    /// Told whenever fetched blocks are in the memory tier and the queue: lookups waiting on
    /// this process's claims look again then.
    landed: Arc<Landed>,
}

/// Wakes lookups waiting on a claim of this process when the blocks of a fetch have landed
/// (see [`disk_lookup`]), instead of their looking again only every few milliseconds.
#[derive(Default)]
struct Landed {
    fetches: std::sync::Mutex<u64>,
    changed: std::sync::Condvar,
}

impl Landed {
    fn tell(&self) {
        *self.fetches.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    /// Waits up to `d` until `has()`, looking again whenever a fetch lands. Whether it has.
    fn wait_for(&self, d: std::time::Duration, has: impl Fn() -> bool) -> bool {
        let end = std::time::Instant::now() + d;
        let mut fetches = self.fetches.lock().unwrap();
        loop {
            if has() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= end {
                return false;
            }
            fetches = self.changed.wait_timeout(fetches, end - now).unwrap().0;
        }
    }
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
        Self::with_write_queue(store, memory, disk, QUEUE_BYTES)
    }

    /// The same, with at most `queue_bytes` queued for the disk (see [`super::write_behind`]).
    pub fn with_write_queue(
        store: DynStore,
        memory: Arc<dyn BlockCache>,
        disk: Option<Arc<DiskCache>>,
        queue_bytes: u64,
    ) -> TieredCache {
        TieredCache {
            store_id: store.describe().into(),
            store,
            memory,
            writer: disk
                .clone()
                .map(|d| Arc::new(WriteBehind::new(d, queue_bytes))),
            disk,
            landed: Arc::default(),
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
    /// from the store (and offered to both tiers; to the disk through the write-behind queue,
    /// so this does not wait for the disk).
    pub async fn fetch_missing(&self, lookup: Lookup) -> Result<Vec<Bytes>, StoreError> {
        let Lookup { range, sources } = lookup;
        range.fetch_missing(self, sources, DiskWrite::Behind).await
    }

    /// Waits until the blocks of an object version queued for the disk are written (blocking:
    /// call it off the async workers). Bounded by the queue's size.
    pub fn settle(&self, key: &str, version: &Version) {
        if let Some(w) = &self.writer {
            w.settle(&BlockKey {
                store: self.store_id.clone(),
                key: key.into(),
                version: version.0.as_str().into(),
                index: 0,
            });
        }
    }

    /// Seals a fully cached object version in the disk tier now (verifying it in full, see
    /// "Seals" in [`super::disk`]), so that the first open of it anywhere on the node hands it to
    /// the kernel without checking it again. For objects brought in by [`Self::fill`], which
    /// writes through to the disk. Whether it is complete and sealed.
    pub async fn seal(&self, key: &str, version: &Version, size: u64) -> bool {
        let Some(disk) = self.disk.clone() else {
            return false;
        };
        let (store, key, version) = (self.store_id.clone(), key.to_string(), version.0.clone());
        tokio::task::spawn_blocking(move || {
            let id = super::disk::ObjectId {
                store: &store,
                key: &key,
                version: &version,
            };
            disk.complete_file(&id, size).is_some()
        })
        .await
        .unwrap_or(false)
    }

    /// Waits until every block queued for the disk is written (blocking, as [`Self::settle`]).
    pub fn flush(&self) {
        if let Some(w) = &self.writer {
            w.flush();
        }
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
        let Lookup { range, sources } = self.look_up(&key, version, size, start, end).await;
        let blocks = range
            .fetch_missing(self, sources, DiskWrite::Through)
            .await?;
        Ok(blocks.iter().map(|b| b.len() as u64).sum())
    }
}

/// How fetched blocks reach the disk tier.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DiskWrite {
    /// Through the write-behind queue: the caller does not wait for the disk.
    Behind,
    /// Before the fetch returns (`bucketfs warm`, whose job is the disk).
    Through,
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
        write: DiskWrite,
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
            match (&tiers.disk, &tiers.writer, write) {
                _ if to_disk.is_empty() => {}
                (_, Some(writer), DiskWrite::Behind) => {
                    for (k, b, guard) in to_disk {
                        writer.offer(k, size, b, guard);
                    }
                }
                (Some(disk), _, _) => {
                    let disk = disk.clone();
                    // The claims (guards) are released once the blocks are on disk.
                    let _ = tokio::task::spawn_blocking(move || {
                        let mut disk = disk.writer();
                        for (k, b, _guard) in to_disk {
                            disk.put(&k, size, &b);
                        }
                    })
                    .await;
                }
                (None, _, _) => {}
            }
            tiers.landed.tell();
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
    let (disk, memory, writer) = (disk.clone(), tiers.memory.clone(), tiers.writer.clone());
    let landed = tiers.landed.clone();
    let found = tokio::task::spawn_blocking(move || {
        // A block claimed by another fetch of this process is in its hands as soon as that
        // fetch has it (the memory tier, or the write-behind queue when the tier let it go),
        // long before it is on disk and the claim goes: taken from there, it is neither waited
        // for until written nor read back from the disk and verified again.
        let in_hand = |k: &BlockKey| {
            memory
                .peek(k)
                .or_else(|| writer.as_ref().and_then(|w| w.queued(k)))
        };
        // One bound for the whole lookup, not per block: a stopped filler holding a part's worth
        // of claims costs the reader one CLAIM_WAIT, not one per block.
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        let mut said = false;
        // Every block at once first, up to the first one another filler holds; that one and
        // the blocks after it one by one, in order (see `DiskCache::look_up`).
        let mut first = disk.look_up(&wanted, size).into_iter();
        wanted
            .into_iter()
            .map(|k| {
                match first.next() {
                    Some(Found::Block(b)) => return (k, BlockSource::Have(b), Tier::Disk),
                    Some(Found::Claim(Claim::Mine(guard))) => {
                        return (k, BlockSource::Fetch(Some(guard)), Tier::Disk);
                    }
                    Some(Found::Nothing) => return (k, BlockSource::Fetch(None), Tier::Disk),
                    Some(Found::Claim(Claim::Theirs)) | None => {}
                }
                // Being filled by another, or after such a block: a few rounds of looking,
                // claiming, or waiting and looking again, until found, claimed, or taken over.
                for _ in 0..3 {
                    if let Some(b) = in_hand(&k) {
                        return (k, BlockSource::Have(b), Tier::Memory);
                    }
                    if let Some(b) = disk.get(&k, size) {
                        return (k, BlockSource::Have(b), Tier::Disk);
                    }
                    match disk.claim(&k, size) {
                        None => return (k, BlockSource::Fetch(None), Tier::Disk),
                        Some(Claim::Mine(guard)) => {
                            // Filled between our look and our claim?
                            if let Some(b) = in_hand(&k) {
                                return (k, BlockSource::Have(b), Tier::Memory);
                            }
                            if let Some(b) = disk.get(&k, size) {
                                return (k, BlockSource::Have(b), Tier::Disk);
                            }
                            return (k, BlockSource::Fetch(Some(guard)), Tier::Disk);
                        }
                        Some(Claim::Theirs) => {
                            let pause = |d| landed.wait_for(d, || in_hand(&k).is_some());
                            if !disk.wait_or(&k, size, deadline, &pause) {
                                if !std::mem::replace(&mut said, true) {
                                    tracing::info!(
                                    key = %k.key,
                                    block = k.index,
                                    "another process has held this block's fill claim for {}s; fetching it here",
                                    CLAIM_WAIT.as_secs()
                                    );
                                }
                                metrics::claim_taken_over();
                                let guard = disk.take_over(&k, size);
                                return (k, BlockSource::Fetch(guard), Tier::Disk);
                            }
                        }
                    }
                }
                (k, BlockSource::Fetch(None), Tier::Disk)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (k, src, tier) in found {
        let hit = match &src {
            BlockSource::Have(b) => Some(b.len() as u64),
            BlockSource::Fetch(_) => None,
        };
        metrics::cache_lookup(tier, hit);
        if let (BlockSource::Have(b), Tier::Disk) = (&src, tier) {
            tiers.memory.put(&k, b.clone()).await;
        }
        sources[(k.index - first) as usize] = src;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::disk::ObjectId;
    use crate::cache::memory::MemoryCache;
    use crate::store::mem::MemStore;
    use crate::store::{ObjectStore, Precondition};
    use std::os::unix::fs::{FileExt, PermissionsExt};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn dropped_metric() -> f64 {
        crate::metrics::render()
            .lines()
            .find_map(|l| l.strip_prefix("bucketfs_cache_write_dropped_blocks_total "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// A store holding `obj` as "m", and tiers in front of it with a memory tier of `tier`
    /// bytes and a disk tier in a fresh directory (kept alive by the returned guard).
    async fn tiers_over(
        obj: Bytes,
        tier: u64,
    ) -> (
        Arc<MemStore>,
        Version,
        tempfile::TempDir,
        Arc<DiskCache>,
        Arc<TieredCache>,
    ) {
        let mem = Arc::new(MemStore::new("b"));
        mem.put("m", obj, Precondition::None).await.unwrap();
        let version = mem.head("m").await.unwrap().version;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let tiers = Arc::new(TieredCache::new(
            mem.clone() as DynStore,
            Arc::new(MemoryCache::new(tier)),
            Some(disk.clone()),
        ));
        (mem, version, dir, disk, tiers)
    }

    /// A lookup waiting for a block another fetch holds holds no claim on the blocks after it,
    /// so a fetch of an overlapping range that needs them is not kept waiting in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_lookup_holds_no_claim_past_the_block_it_waits_for() {
        let size = 4 * MIB;
        let obj = Bytes::from(vec![3u8; size as usize]);
        let (_mem, version, _dir, disk, tiers) = tiers_over(obj, 0).await;
        let block = |index| BlockKey {
            store: tiers.store_id.clone(),
            key: "m".into(),
            version: version.0.as_str().into(),
            index,
        };
        let held = disk.claim(&block(1), size).unwrap();
        assert!(matches!(held, Claim::Mine(_)));
        let waiter = {
            let (tiers, version) = (tiers.clone(), version.clone());
            tokio::spawn(async move {
                let lookup = tiers.look_up(&"m".into(), &version, size, 0, size).await;
                tiers.fetch_missing(lookup).await.unwrap().concat()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(disk.claim(&block(2), size), Some(Claim::Mine(_))),
            "block 2 is free while the lookup waits for block 1"
        );
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("no wait for the claim wait to run out")
            .unwrap();
        assert!(got.iter().all(|&b| b == 3) && got.len() == size as usize);
    }

    /// A fetch that needs blocks another fetch of this process is bringing in takes them from
    /// that fetch's hands once it has them: from the memory tier, or, when the tier keeps
    /// nothing, from the write-behind queue. It neither waits for them to be on disk (the writer
    /// is stopped here, so their claims stay held: a wait would run until the claim wait is out
    /// and then fetch them again) nor asks the store twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_this_process_is_fetching_are_taken_from_its_hands_not_waited_for() {
        use crate::store::mem::{Fault, Op};
        let size = 4 * MIB;
        let obj = Bytes::from((0..size).map(|i| (i * 5 % 251) as u8).collect::<Vec<u8>>());
        for tier in [0, 64 * MIB] {
            let (mem, version, _dir, disk, tiers) = tiers_over(obj.clone(), tier).await;
            let writer = tiers.writer.clone().unwrap();
            writer.pause(true);
            mem.inject(Op::GetRange, Fault::Delay(Duration::from_millis(300)), 1);
            let read = |tiers: Arc<TieredCache>, version: Version| async move {
                let lookup = tiers.look_up(&"m".into(), &version, size, 0, size).await;
                tiers.fetch_missing(lookup).await.unwrap().concat()
            };
            let first = tokio::spawn(read(tiers.clone(), version.clone()));
            // The second lookup comes while the first fetch's GET runs, with its claims held.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let second = tokio::spawn(read(tiers.clone(), version.clone()));
            let wait = CLAIM_WAIT / 2;
            let (a, b) = tokio::time::timeout(wait, async {
                (first.await.unwrap(), second.await.unwrap())
            })
            .await
            .unwrap_or_else(|_| panic!("tier {tier}: the second read waited for the disk"));
            assert!(
                a == obj[..] && b == obj[..],
                "tier {tier}: the object's bytes"
            );
            assert_eq!(mem.calls(Op::GetRange), 1, "tier {tier}: one GET");
            let block = BlockKey {
                store: tiers.store_id.clone(),
                key: "m".into(),
                version: version.0.as_str().into(),
                index: 0,
            };
            assert!(
                matches!(disk.claim(&block, size), Some(Claim::Theirs)),
                "tier {tier}: the queued block keeps its claim"
            );
            writer.pause(false);
            tiers.flush();
            assert!(
                disk.get(&block, size).is_some(),
                "tier {tier}: then on disk"
            );
        }
    }

    /// The disk writer keeps the files of the object it writes open only while it has blocks
    /// to write: idle, it holds no descriptor in the cache, so an object evicted later frees its
    /// space at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_disk_writer_holds_no_cache_file_open() {
        let size = 8 * MIB;
        let obj = Bytes::from(vec![4u8; size as usize]);
        let (_mem, version, dir, disk, tiers) = tiers_over(obj, 0).await;
        let lookup = tiers.look_up(&"m".into(), &version, size, 0, size).await;
        tiers.fetch_missing(lookup).await.unwrap();
        tiers.flush();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let open_in_cache = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|p| p.starts_with(&root))
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open_in_cache() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open_in_cache(), 0, "descriptors left open in the cache");
        let id = ObjectId {
            store: &tiers.store_id,
            key: "m",
            version: &version.0,
        };
        assert!(disk.complete_file(&id, size).is_some(), "all written");
    }

    /// A disk writer that does not keep up (stopped here) never holds up a cold read: every read
    /// gets its bytes, blocks that do not fit the write queue are dropped from the disk tier with
    /// their claims released (so another filler fetches them instead of waiting), and a later
    /// fill completes the object, which then seals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_disk_writer_drops_blocks_and_never_holds_up_reads() {
        let size = 16 * MIB;
        let obj = Bytes::from((0..size).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
        let mem = Arc::new(MemStore::new("b"));
        mem.put("m", obj.clone(), Precondition::None).await.unwrap();
        let version = mem.head("m").await.unwrap().version;
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let tiers = TieredCache::with_write_queue(
            mem.clone() as DynStore,
            Arc::new(MemoryCache::new(0)),
            Some(disk.clone()),
            4 * MIB,
        );
        let writer = tiers.writer.as_ref().unwrap();
        writer.pause(true);
        let metric_before = dropped_metric();
        let key: Arc<str> = "m".into();
        for part in 0..4u64 {
            let (start, end) = (part * 4 * MIB, (part + 1) * 4 * MIB);
            let read = async {
                let lookup = tiers.look_up(&key, &version, size, start, end).await;
                tiers.fetch_missing(lookup).await.unwrap()
            };
            let blocks = tokio::time::timeout(Duration::from_secs(30), read)
                .await
                .expect("a read does not wait for the disk");
            assert!(
                blocks.concat() == obj[start as usize..end as usize],
                "part {part}"
            );
        }
        // The first 4 MiB fit the queue; the other 12 blocks were dropped.
        assert_eq!(writer.dropped(), 12);
        assert!(dropped_metric() - metric_before >= 12.0);
        let block = |index| BlockKey {
            store: tiers.store_id.clone(),
            key: key.clone(),
            version: version.0.as_str().into(),
            index,
        };
        assert!(
            matches!(disk.claim(&block(1), size), Some(Claim::Theirs)),
            "a queued block stays claimed until written"
        );
        assert!(
            matches!(disk.claim(&block(9), size), Some(Claim::Mine(_))),
            "a dropped block's claim is released"
        );
        assert!(disk.get(&block(1), size).is_none(), "not written yet");

        writer.pause(false);
        tiers.flush();
        for i in 0..16 {
            assert_eq!(disk.get(&block(i), size).is_some(), i < 4, "block {i}");
        }
        // Filled later, the object is whole and sealed, with the object's bytes.
        assert_eq!(
            tiers.fill("m", &version, size, 0, size).await.unwrap(),
            size
        );
        let id = ObjectId {
            store: &tiers.store_id,
            key: "m",
            version: &version.0,
        };
        let sealed = disk.complete_file(&id, size).expect("complete");
        let mode = sealed.file.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400, "sealed");
        let mut buf = vec![0u8; size as usize];
        sealed.file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == obj[..], "the cached file holds the object's bytes");
        assert_eq!(writer.dropped(), 12, "nothing dropped by the fill");
    }
}
