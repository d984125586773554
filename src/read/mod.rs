//! Per-handle reading of one object version: sequential detection, a growing prefetch window,
//! parallel ranged GETs, and the memory budget.
//!
//! ## Pinned versions
//! Every GET carries the version seen at open: if the object changes under an open handle the
//! store answers `PreconditionFailed` and the application gets `ESTALE`, never a mix of versions.
//!
//! ## Sequential reads and the prefetch window
//! A read that starts near where the previous one ended (within one part, since the kernel sends
//! readahead requests concurrently and slightly out of order) continues a *stream*. From the
//! second read of a stream on, the reader keeps fetches running ahead of the application: parts
//! of `part_size` bytes, aligned to part boundaries, each one ranged GET, up to `window` bytes
//! past the current read. The window starts at one part and doubles every time the stream enters a
//! new part, up to `concurrency` parts — so a model load quickly has `concurrency` GETs in flight,
//! while a short sequential read costs at most one extra part.
//!
//! ## Random reads
//! A read far from the previous one resets the stream: fetches that do not cover it are dropped
//! (their bytes return to the budget as soon as they land) and the window goes back to zero. The
//! read fetches only the blocks it touches ([`BLOCK_SIZE`], 1 MiB, alignment) — no runaway window
//! for mmap'd safetensors or shuffled datasets. Prefetching starts only once a stream has covered
//! a whole part, because one large random read arrives as several concurrent kernel requests that
//! look sequential.
//!
//! ## Seeking back
//! Every fetched block is offered to the memory tier, shared by all handles of the mount, and
//! every fetch first looks there: a seek back into data read recently does not fetch again.
//!
//! ## Memory
//! Prefetches take bytes from the prefetch pool of the global [`MemoryBudget`] only if
//! they are free (otherwise prefetching pauses); reads the application waits on take from the
//! demand pool, waiting if needed. Bytes stay reserved while a fetch is buffered for this handle
//! and are returned as soon as it is consumed or dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::cache::BLOCK_SIZE;
use crate::cache::tiered::TieredCache;
use crate::fs::{FsError, FsResult};
use crate::memory::{MemoryBudget, Reservation};
use crate::metrics;
use crate::store::{DynStore, StoreError, Version};

/// Read tuning, with the reasons for the defaults.
#[derive(Clone, Debug)]
pub struct ReadConfig {
    /// Bytes per prefetch GET. 8 MiB: a request to S3 costs ~20-30 ms before the first byte, so a
    /// part must take much longer than that to transfer (8 MiB at ~100 MB/s per connection is
    /// ~80 ms) for latency to stop mattering; larger parts only raise memory per request.
    pub part_size: u64,
    /// Most prefetch GETs in flight per stream. 8 parts of 8 MiB keep a 25 ms-latency link busy
    /// at over 2 GB/s (bandwidth-delay product ~ 64 MiB), and fit the default memory budget.
    pub concurrency: usize,
    /// The global budget for prefetch buffers and the memory tier (see [`crate::memory`]).
    pub max_memory: u64,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            part_size: crate::config::READ_PART_SIZE.value,
            concurrency: crate::config::READ_CONCURRENCY,
            max_memory: crate::config::MAX_MEMORY.value,
        }
    }
}

/// How the memory budget is split: (prefetch pool, demand pool, memory tier).
impl ReadConfig {
    pub fn split(&self) -> Result<(u64, u64, u64), String> {
        if self.part_size < BLOCK_SIZE || !self.part_size.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "--read-part-size must be a multiple of {} MiB",
                BLOCK_SIZE >> 20
            ));
        }
        if self.part_size > 1 << 30 {
            return Err("--read-part-size must be at most 1GiB".into());
        }
        if self.concurrency == 0 {
            return Err("--read-concurrency must be at least 1".into());
        }
        if self.max_memory < 2 * self.part_size {
            return Err(format!(
                "--max-memory must be at least two read parts ({} MiB)",
                (2 * self.part_size) >> 20
            ));
        }
        // Prefetch at most half the budget; demand gets up to 4 parts of the rest (enough for the
        // kernel's concurrent reads of a few random-access files), the memory tier the remainder.
        let prefetch = (self.concurrency as u64 * self.part_size).min(self.max_memory / 2);
        let prefetch = prefetch.max(self.part_size);
        let rest = self.max_memory - prefetch;
        let demand = (4 * self.part_size).min(rest / 2).max(BLOCK_SIZE * 2);
        let tier = rest.saturating_sub(demand);
        Ok((prefetch, demand, tier))
    }
}

/// What every reader of the mount shares.
pub struct ReadContext {
    pub store: DynStore,
    /// The memory and disk tiers in front of the store: every fetch goes through them.
    pub tiers: Arc<TieredCache>,
    pub budget: Arc<MemoryBudget>,
    pub cfg: ReadConfig,
}

/// Bytes from `start` (a block boundary) on, as whole blocks, with the memory they are leased
/// from.
struct Part {
    start: u64,
    blocks: Vec<Bytes>,
    _reservation: Reservation,
}

impl Part {
    fn end(&self) -> u64 {
        self.start + self.blocks.iter().map(|b| b.len() as u64).sum::<u64>()
    }

    /// Appends the bytes of `from..to` (inside this part) to `out`, or, if they lie in one block,
    /// returns them without a copy.
    fn copy_range(
        &self,
        from: u64,
        to: u64,
        out: &mut Option<BytesMut>,
        total: u64,
    ) -> Option<Bytes> {
        let first = ((from - self.start) / BLOCK_SIZE) as usize;
        let last = ((to - 1 - self.start) / BLOCK_SIZE) as usize;
        let within = |i: usize| {
            let block_start = self.start + i as u64 * BLOCK_SIZE;
            let a = from.max(block_start) - block_start;
            let b = to.min(block_start + self.blocks[i].len() as u64) - block_start;
            self.blocks[i].slice(a as usize..b as usize)
        };
        if first == last && out.is_none() && to - from == total {
            return Some(within(first));
        }
        let buf = out.get_or_insert_with(|| BytesMut::with_capacity(total as usize));
        for i in first..=last.min(self.blocks.len() - 1) {
            buf.extend_from_slice(&within(i));
        }
        None
    }
}

type FetchResult = Result<Arc<Part>, StoreError>;

/// One ranged fetch running (or done) for this handle.
struct Fetch {
    start: u64,
    end: u64,
    result: Shared<BoxFuture<'static, FetchResult>>,
}

impl Fetch {
    fn covers(&self, pos: u64) -> bool {
        self.start <= pos && pos < self.end
    }
}

/// Keep at most this many fetches per handle (prefetch window plus a few demand fetches).
const MAX_FETCHES: usize = 64;

#[derive(Default)]
struct Stream {
    /// Where the current stream began.
    start: u64,
    /// End of the furthest read of the current stream.
    last_end: u64,
    /// Reads in the current stream.
    reads: u32,
    /// Bytes to keep fetched ahead of the read position.
    window: u64,
    /// End of the furthest fetch issued for the stream.
    frontier: u64,
    fetches: VecDeque<Fetch>,
}

pub struct Reader {
    ctx: Arc<ReadContext>,
    key: Arc<str>,
    version: Version,
    size: u64,
    stream: Mutex<Stream>,
}

impl Reader {
    pub fn new(ctx: Arc<ReadContext>, key: String, version: Version, size: u64) -> Reader {
        Reader {
            ctx,
            key: key.into(),
            version,
            size,
            stream: Mutex::new(Stream::default()),
        }
    }

    /// The object key read.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current prefetch window in bytes (for tests and metrics).
    pub fn window(&self) -> u64 {
        self.stream.lock().unwrap().window
    }

    /// Up to `len` bytes at `offset`; fewer only at the end of the object.
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        match self.read_once(offset, end).await {
            Err(FsError::Store(e)) => {
                // A fetch failed even after the store's retries (a prefetch may have failed long
                // before this read came). Forget failed fetches and try once more on demand, so
                // one bad moment is not remembered by the handle.
                tracing::debug!(key = %self.key, error = %e, "read failed; retrying once");
                self.stream
                    .lock()
                    .unwrap()
                    .fetches
                    .retain(|f| !matches!(f.result.peek(), Some(Err(_))));
                self.read_once(offset, end).await
            }
            other => other,
        }
    }

    async fn read_once(&self, offset: u64, end: u64) -> FsResult<Bytes> {
        let needed = self.plan(offset, end);
        let mut out: Option<BytesMut> = None;
        let mut single: Option<Bytes> = None;
        for fetch in needed {
            let part = fetch.await.map_err(|e| match e {
                StoreError::PreconditionFailed(_) | StoreError::NotFound(_) => FsError::Stale,
                e => FsError::Store(e),
            })?;
            let from = offset.max(part.start);
            let to = end.min(part.end());
            if from >= to {
                return Err(FsError::Store(StoreError::Transient(format!(
                    "{}: short read at {from}",
                    self.key
                ))));
            }
            if let Some(b) = part.copy_range(from, to, &mut out, end - offset) {
                single = Some(b);
            }
        }
        let data = match (single, out) {
            (Some(s), _) => s,
            (None, Some(o)) => o.freeze(),
            (None, None) => Bytes::new(),
        };
        if data.len() as u64 != end - offset {
            return Err(FsError::Store(StoreError::Transient(format!(
                "{}: short read at {offset}",
                self.key
            ))));
        }
        Ok(data)
    }

    /// Decides which fetches serve `offset..end` (starting the missing ones), updates the stream
    /// and schedules prefetches. Never waits: it only takes the handle's lock.
    fn plan(&self, offset: u64, end: u64) -> Vec<Shared<BoxFuture<'static, FetchResult>>> {
        let part = self.ctx.cfg.part_size;
        let mut s = self.stream.lock().unwrap();

        let sequential =
            (s.reads > 0 && offset + part >= s.last_end && offset <= s.last_end + part)
                || (s.reads == 0 && offset == 0);
        if sequential {
            // Entering a new part grows the window.
            if s.reads > 0 && end.div_ceil(part) > s.last_end.div_ceil(part) {
                s.window = (s.window * 2).clamp(part, part * self.ctx.cfg.concurrency as u64);
            }
            s.reads += 1;
            s.last_end = s.last_end.max(end);
        } else {
            s.reads = 1;
            s.window = 0;
            s.start = offset;
            s.last_end = end;
            s.frontier = 0;
            s.fetches.retain(|f| f.start < end && f.end > offset);
        }
        // Fetches wholly behind the stream are consumed (their blocks live on in the memory tier).
        let behind = offset.saturating_sub(part);
        s.fetches.retain(|f| f.end > behind);

        // Serve the read from this handle's fetches if they cover all of it; otherwise with one
        // demand fetch of its blocks (which takes what it can from the block cache). Demand
        // fetches belong to the read alone and are not kept: their bytes go back to the budget as
        // soon as the read has them, so an idle handle never sits on the demand pool.
        let mut needed = Vec::new();
        let mut pos = offset;
        while pos < end {
            match s.fetches.iter().find(|f| f.covers(pos)) {
                Some(f) => {
                    needed.push(f.result.clone());
                    pos = f.end;
                }
                None => {
                    needed.clear();
                    break;
                }
            }
        }
        if pos < end {
            let start = offset - offset % BLOCK_SIZE;
            let stop = end
                .div_ceil(BLOCK_SIZE)
                .saturating_mul(BLOCK_SIZE)
                .min(self.size);
            needed.push(self.start_fetch(start, stop, None).result);
        }

        // Prefetch once the stream has covered a whole part: a large random read (the kernel
        // splits a 4 MiB pread into concurrent 1 MiB requests, which look sequential) must not
        // start a window it will never use.
        if sequential && s.reads >= 2 && s.last_end - s.start >= part {
            if s.window == 0 {
                s.window = part;
            }
            // Fetches start on block boundaries (the block cache is keyed by block); the demand
            // fetch of this read already covers up to the end of its last block.
            let mut frontier = s.frontier.max(end.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
            while frontier < self.size && frontier < end + s.window && s.fetches.len() < MAX_FETCHES
            {
                let part_end = ((frontier / part) + 1) * part;
                let part_end = part_end.min(self.size);
                if s.fetches.iter().any(|f| f.covers(frontier)) {
                    frontier = part_end;
                    continue;
                }
                let Some(reservation) = self.ctx.budget.try_prefetch(part_end - frontier) else {
                    metrics::prefetch(None);
                    break; // budget exhausted: prefetching pauses, reads go on
                };
                metrics::prefetch(Some(part_end - frontier));
                let f = self.start_fetch(frontier, part_end, Some(reservation));
                frontier = f.end;
                insert_sorted(&mut s.fetches, f);
            }
            s.frontier = frontier;
        }
        while s.fetches.len() > MAX_FETCHES {
            s.fetches.pop_front();
        }
        needed
    }

    /// Starts fetching `start..end` in the background (from the block cache where it can).
    fn start_fetch(&self, start: u64, end: u64, reservation: Option<Reservation>) -> Fetch {
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let version = self.version.clone();
        let size = self.size;
        let task = tokio::spawn(async move {
            let lookup = ctx.tiers.look_up(&key, &version, size, start, end).await;
            // Reserved only now: a read waiting on another process's fill holds no memory.
            let reservation = match reservation {
                Some(l) => l,
                None => ctx.budget.demand(end - start).await,
            };
            let blocks = ctx.tiers.fetch_missing(lookup).await?;
            Ok(Arc::new(Part {
                start,
                blocks,
                _reservation: reservation,
            }))
        });
        let result = async move {
            task.await
                .unwrap_or_else(|e| Err(StoreError::Transient(format!("fetch task failed: {e}"))))
        }
        .boxed()
        .shared();
        Fetch { start, end, result }
    }
}

fn insert_sorted(fetches: &mut VecDeque<Fetch>, f: Fetch) {
    let at = fetches.partition_point(|x| x.start < f.start);
    fetches.insert(at, f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::store::mem::{Fault, MemStore, Op};
    use crate::store::retry::{RetryPolicy, Retrying};
    use crate::store::{ObjectStore, Precondition};
    use proptest::prelude::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn data(len: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
                .collect::<Vec<u8>>(),
        )
    }

    struct Setup {
        mem: Arc<MemStore>,
        ctx: Arc<ReadContext>,
        tier: Arc<MemoryCache>,
    }

    async fn setup(objects: &[(&str, Bytes)], cfg: ReadConfig) -> Setup {
        let mem = Arc::new(MemStore::new("b"));
        for (k, v) in objects {
            mem.put(k, v.clone(), Precondition::None).await.unwrap();
        }
        let fast = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            attempt_timeout: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let store: DynStore = Arc::new(Retrying::new(mem.clone(), fast));
        let (prefetch, demand, tier_bytes) = cfg.split().unwrap();
        let tier = Arc::new(MemoryCache::new(tier_bytes));
        let ctx = Arc::new(ReadContext {
            tiers: Arc::new(TieredCache::new(store.clone(), tier.clone(), None)),
            store,
            budget: Arc::new(MemoryBudget::new(prefetch, demand)),
            cfg,
        });
        Setup { mem, ctx, tier }
    }

    async fn reader(s: &Setup, key: &str) -> Reader {
        let m = s.mem.head(key).await.unwrap();
        Reader::new(s.ctx.clone(), key.to_string(), m.version, m.size)
    }

    fn cfg(part: u64, concurrency: usize, max_memory: u64) -> ReadConfig {
        ReadConfig {
            part_size: part,
            concurrency,
            max_memory,
        }
    }

    #[tokio::test]
    async fn window_grows_on_sequential_reads_and_resets_on_seek() {
        let obj = data(96 << 20, 1);
        let s = setup(&[("m", obj.clone())], cfg(4 * MIB, 4, 64 * MIB)).await;
        let r = reader(&s, "m").await;
        let mut windows = Vec::new();
        for i in 0..24u64 {
            let got = r.read(i * MIB, MIB).await.unwrap();
            assert_eq!(got, obj.slice((i * MIB) as usize..((i + 1) * MIB) as usize));
            windows.push(r.window());
        }
        assert_eq!(windows[0], 0, "no prefetch after a single read");
        assert!(windows.windows(2).all(|w| w[0] <= w[1]), "{windows:?}");
        assert_eq!(
            *windows.last().unwrap(),
            16 * MIB,
            "grows to concurrency x part"
        );
        // Sequential: the first part block by block on demand, then one GET per part (up to
        // the window ahead of the last read); nothing fetched twice.
        let gets = s.mem.calls(Op::GetRange);
        assert!(
            gets <= 4 + 24 / 4 + 4,
            "{gets} GETs for 24 MiB read in 4 MiB parts"
        );

        // A seek far away resets the window; the stream then grows again.
        r.read(80 * MIB + 5, 4096).await.unwrap();
        assert_eq!(r.window(), 0);
        for i in 0..4u64 {
            r.read(80 * MIB + 4096 + i * MIB, MIB).await.unwrap();
        }
        assert!(r.window() >= 4 * MIB);
    }

    #[tokio::test]
    async fn seeking_back_into_the_window_does_not_refetch() {
        let obj = data(32 << 20, 2);
        let s = setup(&[("m", obj.clone())], cfg(4 * MIB, 4, 64 * MIB)).await;
        let r = reader(&s, "m").await;
        for i in 0..12u64 {
            r.read(i * MIB, MIB).await.unwrap();
        }
        let gets = s.mem.calls(Op::GetRange);
        for off in [2 * MIB + 17, 9 * MIB, 0] {
            let got = r.read(off, 64 << 10).await.unwrap();
            assert_eq!(got, obj.slice(off as usize..(off + (64 << 10)) as usize));
        }
        assert_eq!(s.mem.calls(Op::GetRange), gets, "served from fetched data");
    }

    #[tokio::test]
    async fn random_reads_fetch_only_the_blocks_they_touch() {
        let obj = data(64 << 20, 3);
        let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
        let r = reader(&s, "m").await;
        for off in [40 * MIB + 100, 7 * MIB, 63 * MIB, 20 * MIB + MIB - 10] {
            let got = r.read(off, 4096).await.unwrap();
            let end = (off + 4096).min(64 * MIB);
            assert_eq!(got, obj.slice(off as usize..end as usize));
            assert_eq!(r.window(), 0);
        }
        // 3 reads inside one block, one straddling two blocks: 4 GETs, 5 blocks.
        assert_eq!(s.mem.calls(Op::GetRange), 4);
        assert!(s.ctx.budget.peak() <= 2 * MIB);
    }

    #[tokio::test]
    async fn a_large_random_read_starts_no_window() {
        let obj = data(64 << 20, 5);
        let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
        let r = reader(&s, "m").await;
        for base in [40 * MIB, 8 * MIB, 50 * MIB] {
            // A 4 MiB pread arrives as four concurrent 1 MiB kernel requests.
            let reads = (0..4u64).map(|i| r.read(base + i * MIB, MIB));
            for (i, got) in futures::future::join_all(reads)
                .await
                .into_iter()
                .enumerate()
            {
                let off = (base + i as u64 * MIB) as usize;
                assert_eq!(got.unwrap(), obj.slice(off..off + MIB as usize));
            }
            assert_eq!(r.window(), 0, "no prefetch for a 4 MiB random read");
        }
        assert!(
            s.mem.calls(Op::GetRange) <= 12,
            "only the blocks read were fetched"
        );
    }

    #[tokio::test]
    async fn the_budget_holds_under_many_concurrent_readers() {
        let objects: Vec<(String, Bytes)> = (0..24)
            .map(|i| (format!("o{i}"), data(24 << 20, i as u8)))
            .collect();
        let refs: Vec<(&str, Bytes)> = objects
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let config = cfg(4 * MIB, 8, 24 * MIB);
        let (prefetch, demand, tier) = config.split().unwrap();
        let s = Arc::new(setup(&refs, config).await);
        s.mem
            .inject(Op::GetRange, Fault::Delay(Duration::from_millis(2)), 10_000);
        let mut tasks = Vec::new();
        for (k, v) in objects.clone() {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let r = reader(&s, &k).await;
                let mut pos = 0u64;
                while pos < v.len() as u64 {
                    let got = r.read(pos, 512 << 10).await.unwrap();
                    assert_eq!(got, v.slice(pos as usize..pos as usize + got.len()));
                    pos += got.len() as u64;
                }
            }));
        }
        // An idle handle holding prefetched data must not stall the others.
        let idle = reader(&s, "o0").await;
        idle.read(0, MIB).await.unwrap();
        idle.read(MIB, MIB).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
            .await
            .expect("readers finished");
        assert!(
            s.ctx.budget.peak() <= prefetch + demand,
            "peak {}",
            s.ctx.budget.peak()
        );
        assert!(s.tier.weighted_size() <= tier);
        drop(idle);
    }

    #[tokio::test]
    async fn failed_prefetch_is_retried_on_demand() {
        let obj = data(16 << 20, 4);
        let s = setup(&[("m", obj.clone())], cfg(2 * MIB, 2, 32 * MIB)).await;
        let r = reader(&s, "m").await;
        r.read(0, MIB).await.unwrap();
        // Every attempt of the next GETs fails (more than the retry policy's 4 attempts).
        s.mem.inject(
            Op::GetRange,
            Fault::Error(StoreError::Transient("flaky".into())),
            8,
        );
        let mut pos = MIB;
        while pos < 16 * MIB {
            match r.read(pos, MIB).await {
                Ok(got) => {
                    assert_eq!(got, obj.slice(pos as usize..(pos + MIB) as usize));
                    pos += MIB;
                }
                Err(e) => {
                    // Out of retries: EIO now, and the next read tries again.
                    assert_eq!(e.errno(), libc::EIO);
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Read(u64, u64),
        Sequential(u64, u64, u32),
    }

    fn step(size: u64) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..size + 10, 1..3 * MIB).prop_map(|(o, l)| Step::Read(o, l)),
            (0..size, 1..(2 * MIB), 1..12u32).prop_map(|(o, l, n)| Step::Sequential(o, l, n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Whatever the read pattern, and with slow and failing parts injected, every read returns
        /// exactly the object's bytes. At most 3 failures are injected in all, fewer than the
        /// retry policy's 4 attempts, so no request can run out of tries (more would make EIO a
        /// correct answer; `failed_prefetch_is_retried_on_demand` covers that case).
        #[test]
        fn every_read_pattern_returns_the_right_bytes(
            steps in proptest::collection::vec(step(20 << 20), 1..24),
            faults in proptest::collection::vec((0u8..3, 1usize..2), 0..4),
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let size = 20u64 << 20;
                let obj = data(size as usize, 9);
                let s = setup(&[("m", obj.clone())], cfg(2 * MIB, 4, 24 * MIB)).await;
                for (kind, n) in faults {
                    let fault = match kind {
                        0 => Fault::Delay(Duration::from_millis(5)),
                        1 => Fault::Error(StoreError::Transient("injected".into())),
                        _ => Fault::Error(StoreError::Throttled("injected".into())),
                    };
                    s.mem.inject(Op::GetRange, fault, n);
                }
                let r = reader(&s, "m").await;
                let check = |off: u64, len: u64, got: Bytes| {
                    let end = (off + len).min(size);
                    let want = if off < size { obj.slice(off as usize..end as usize) } else { Bytes::new() };
                    assert_eq!(got.len(), want.len(), "length at {off}+{len}");
                    assert!(got == want, "bytes at {off}+{len}");
                };
                for st in steps {
                    match st {
                        Step::Read(o, l) => check(o, l, r.read(o, l).await.unwrap()),
                        Step::Sequential(o, l, n) => {
                            // Concurrent, as the kernel's readahead sends them.
                            let reads = (0..n as u64).map(|i| {
                                let r = &r;
                                async move { (o + i * l, r.read(o + i * l, l).await.unwrap()) }
                            });
                            for (off, got) in futures::future::join_all(reads).await {
                                check(off, l, got);
                            }
                        }
                    }
                }
            });
        }
    }
}
