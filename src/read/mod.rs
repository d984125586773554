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
//! read fetches only the blocks it touches ([`BLOCK_SIZE`], 1 MiB, alignment), in one ranged GET
//! per gap between the fetches already running — no runaway window for shuffled datasets.
//! Prefetching starts only once a stream has covered a whole part, because one large random read
//! arrives as several concurrent kernel requests that look sequential. Those requests share the
//! blocks at their edges: a demand fetch is held (weakly) while reads wait on it, so a 4 MiB
//! `pread` split into four requests costs four GETs that together fetch each block it touches
//! once, instead of four GETs of two blocks each.
//!
//! ## Files read whole: the sweep
//! A model load reads the file's index first and then all of the data, through `mmap` page faults
//! that arrive as concurrent reads in the loader's order (see [`format`]). When the first read at
//! offset 0 shows such an index, the handle *sweeps* the file: parts of `part_size`, in file
//! order, `concurrency` GETs in flight, reserved from the prefetch pool, started right after the
//! index read and not reset by reads that jump around. A sweep part is let go once every byte of
//! it was read; when the pool is used up, the sweep waits for that, or drops a fetched part the
//! reads have gone a whole pool past. If it drops more than a pool's worth unread, the file is not
//! being read whole and the sweep stops (the window rules apply again).
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

mod format;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

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
type FetchFuture = Shared<BoxFuture<'static, FetchResult>>;

/// Why the handle keeps a fetch, which decides when it lets go of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// Ahead of a sequential run: dropped once the run is a part past it.
    Window,
    /// Part of the in-order sweep of a whole file: dropped once every byte of it was read.
    Sweep,
}

/// One ranged fetch running (or done) that the handle keeps for the reads to come.
struct Fetch {
    start: u64,
    end: u64,
    result: FetchFuture,
    purpose: Purpose,
    /// Bytes of it handed to reads so far.
    served: u64,
}

impl Fetch {
    fn covers(&self, pos: u64) -> bool {
        self.start <= pos && pos < self.end
    }
}

/// A fetch that only reads wait on (its bytes are reserved from the demand pool): held weakly, so
/// it lives exactly as long as a read waits for it, and the concurrent kernel requests a large
/// `pread` is split into share the blocks they have in common instead of fetching them twice.
struct DemandFetch {
    start: u64,
    end: u64,
    result: WeakShared<BoxFuture<'static, FetchResult>>,
}

impl DemandFetch {
    fn live(&self) -> Option<FetchFuture> {
        self.result.upgrade()
    }
}

/// Keep at most this many fetches per handle (prefetch window plus a few demand fetches).
const MAX_FETCHES: usize = 64;

/// The current run of sequential reads of a handle.
#[derive(Default)]
struct SequentialRun {
    /// Where the run began.
    start: u64,
    /// End of the furthest read of the run.
    last_end: u64,
    /// Reads in the run.
    reads: u32,
}

/// How far ahead of a sequential run the handle fetches.
#[derive(Default)]
struct PrefetchWindow {
    /// Bytes to keep fetched ahead of the read position.
    bytes: u64,
    /// End of the furthest fetch issued for the run.
    frontier: u64,
}

/// The in-order fetch of a whole file whose index was read first (see [`format`]).
#[derive(Default)]
enum Sweep {
    /// No read at offset 0 yet.
    #[default]
    Undecided,
    /// Not a file read whole, or a sweep that was given up.
    Off,
    On {
        /// Everything before this offset has been fetched (or is being fetched) once.
        next: u64,
        /// Bytes fetched by the sweep and dropped unread.
        wasted: u64,
    },
}

/// What a handle knows about its reads and keeps fetched for them.
#[derive(Default)]
struct ReadState {
    run: SequentialRun,
    window: PrefetchWindow,
    sweep: Sweep,
    /// End of the furthest read ever.
    furthest: u64,
    /// Window and sweep fetches, by start.
    fetches: VecDeque<Fetch>,
    /// Demand fetches some read still waits on.
    demand: Vec<DemandFetch>,
}

impl ReadState {
    /// A kept or demand fetch covering `pos`, counting what it serves up to `end`.
    fn cover(&mut self, pos: u64, end: u64) -> Option<(u64, FetchFuture)> {
        if let Some(f) = self.fetches.iter_mut().find(|f| f.covers(pos)) {
            f.served += f.end.min(end) - pos;
            return Some((f.end, f.result.clone()));
        }
        self.demand
            .iter()
            .filter(|d| d.start <= pos && pos < d.end)
            .find_map(|d| d.live().map(|r| (d.end, r)))
    }

    /// The start of the first fetch (kept or demand) after `pos`, if any.
    fn next_start(&self, pos: u64) -> Option<u64> {
        let kept = self.fetches.iter().map(|f| f.start);
        let demand = self.demand.iter().map(|d| d.start);
        kept.chain(demand).filter(|&s| s > pos).min()
    }
}

pub struct Reader {
    ctx: Arc<ReadContext>,
    key: Arc<str>,
    version: Version,
    size: u64,
    state: Mutex<ReadState>,
}

impl Reader {
    pub fn new(ctx: Arc<ReadContext>, key: String, version: Version, size: u64) -> Reader {
        Reader {
            ctx,
            key: key.into(),
            version,
            size,
            state: Mutex::new(ReadState::default()),
        }
    }

    /// The object key read.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The object version read.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The current prefetch window in bytes (for tests and metrics).
    pub fn window(&self) -> u64 {
        self.state.lock().unwrap().window.bytes
    }

    /// Whether the handle is fetching the whole file in order (for tests).
    pub fn sweeping(&self) -> bool {
        matches!(self.state.lock().unwrap().sweep, Sweep::On { .. })
    }

    /// Up to `len` bytes at `offset`; fewer only at the end of the object.
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let data = match self.read_once(offset, end).await {
            Err(FsError::Store(e)) => {
                // A fetch failed even after the store's retries (a prefetch may have failed long
                // before this read came). Forget failed fetches and try once more on demand, so
                // one bad moment is not remembered by the handle.
                tracing::debug!(key = %self.key, error = %e, "read failed; retrying once");
                {
                    let mut s = self.state.lock().unwrap();
                    s.fetches
                        .retain(|f| !matches!(f.result.peek(), Some(Err(_))));
                    s.demand
                        .retain(|d| d.live().is_some_and(|r| !matches!(r.peek(), Some(Err(_)))));
                }
                self.read_once(offset, end).await
            }
            other => other,
        }?;
        if offset == 0 {
            self.decide_sweep(&data);
        }
        Ok(data)
    }

    /// After the first read at offset 0: a file whose index comes first is read whole, so the
    /// sweep starts right away, before the application has parsed the index.
    fn decide_sweep(&self, first: &[u8]) {
        let mut s = self.state.lock().unwrap();
        if !matches!(s.sweep, Sweep::Undecided) {
            return;
        }
        // A file of a part or two is fetched whole by its first reads anyway.
        let worth = self.size > 2 * self.ctx.cfg.part_size;
        match format::index_first(first, self.size) {
            Some(f) if worth => {
                tracing::debug!(key = %self.key, format = ?f, "index read first: fetching the whole file in order");
                let next = (first.len() as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                s.sweep = Sweep::On { next, wasted: 0 };
                // Reads before this one (a zip's central directory at the end) are the index's.
                s.furthest = first.len() as u64;
                self.pump_sweep(&mut s);
            }
            _ => s.sweep = Sweep::Off,
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

    /// Decides which fetches serve `offset..end` (starting the missing ones), updates the read
    /// state and schedules prefetches. Never waits: it only takes the handle's lock.
    fn plan(&self, offset: u64, end: u64) -> Vec<FetchFuture> {
        let mut s = self.state.lock().unwrap();
        s.furthest = s.furthest.max(end);
        s.demand.retain(|d| d.live().is_some());
        let sweeping = matches!(s.sweep, Sweep::On { .. });
        let sequential = self.follow_run(&mut s, offset, end, sweeping);
        if sweeping {
            // Before the read looks for its bytes: the range the sweep fetches next may be it.
            self.pump_sweep(&mut s);
        }

        // Serve the read from the fetches that cover it, and fetch what none covers on demand:
        // only its blocks, one ranged GET per gap. Demand fetches belong to the reads alone and
        // are not kept: their bytes go back to the budget as soon as the reads have them, so an
        // idle handle never sits on the demand pool.
        let mut needed = Vec::new();
        let mut pos = offset;
        while pos < end {
            if let Some((covered_to, result)) = s.cover(pos, end) {
                needed.push(result);
                pos = covered_to;
                continue;
            }
            let gap_end = s.next_start(pos).map_or(end, |n| n.min(end));
            let start = pos - pos % BLOCK_SIZE;
            let stop = gap_end
                .div_ceil(BLOCK_SIZE)
                .saturating_mul(BLOCK_SIZE)
                .min(self.size);
            let f = self.start_fetch(start, stop, None);
            if let Some(weak) = f.result.downgrade() {
                s.demand.push(DemandFetch {
                    start,
                    end: stop,
                    result: weak,
                });
            }
            needed.push(f.result);
            pos = stop;
        }
        // Sweep fetches are let go once every byte of them was read.
        s.fetches
            .retain(|f| f.purpose != Purpose::Sweep || f.served < f.end - f.start);

        if !sweeping && sequential {
            self.grow_window(&mut s, end);
        }
        while s.fetches.len() > MAX_FETCHES {
            s.fetches.pop_front();
        }
        needed
    }

    /// Follows the sequential run with the read of `offset..end`: continues it (growing the
    /// window on entering a new part) or starts a new one. Returns whether the read continued
    /// the run.
    fn follow_run(&self, s: &mut ReadState, offset: u64, end: u64, sweeping: bool) -> bool {
        let part = self.ctx.cfg.part_size;
        let run = &mut s.run;
        let sequential =
            (run.reads > 0 && offset + part >= run.last_end && offset <= run.last_end + part)
                || (run.reads == 0 && offset == 0);
        if sequential {
            // Entering a new part grows the window.
            if run.reads > 0 && end.div_ceil(part) > run.last_end.div_ceil(part) {
                s.window.bytes =
                    (s.window.bytes * 2).clamp(part, part * self.ctx.cfg.concurrency as u64);
            }
            run.reads += 1;
            run.last_end = run.last_end.max(end);
        } else {
            *run = SequentialRun {
                start: offset,
                last_end: end,
                reads: 1,
            };
            s.window = PrefetchWindow::default();
            if !sweeping {
                // A seek drops the window's fetches that do not cover the read. The sweep's are
                // the file's, whatever order the application reads it in.
                s.fetches
                    .retain(|f| f.purpose == Purpose::Sweep || (f.start < end && f.end > offset));
            }
        }
        // Window fetches wholly behind the read are consumed (their blocks live on in the
        // memory tier).
        let behind = offset.saturating_sub(part);
        s.fetches
            .retain(|f| f.purpose == Purpose::Sweep || f.end > behind);
        sequential
    }

    /// Keeps the window's fetches running ahead of a sequential run.
    fn grow_window(&self, s: &mut ReadState, end: u64) {
        let part = self.ctx.cfg.part_size;
        // Prefetch once the run has covered a whole part: a large random read (the kernel
        // splits a 4 MiB pread into concurrent 1 MiB requests, which look sequential) must not
        // start a window it will never use.
        if s.run.reads < 2 || s.run.last_end - s.run.start < part {
            return;
        }
        if s.window.bytes == 0 {
            s.window.bytes = part;
        }
        // Fetches start on block boundaries (the block cache is keyed by block); the demand
        // fetch of this read already covers up to the end of its last block.
        let mut frontier = s.window.frontier.max(end.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
        while frontier < self.size
            && frontier < end + s.window.bytes
            && s.fetches.len() < MAX_FETCHES
        {
            let part_end = (((frontier / part) + 1) * part).min(self.size);
            if let Some(f) = s.fetches.iter().find(|f| f.covers(frontier)) {
                frontier = f.end.max(part_end);
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
        s.window.frontier = frontier;
    }

    /// Keeps up to `concurrency` sweep fetches of one part each in flight, in file order, with
    /// bytes from the prefetch pool. When the pool is used up, the sweep lets go of its oldest
    /// fetched range that the reads have gone past (its unread bytes were skipped, or are read
    /// later from the memory tier or on demand) or pauses. A sweep whose fetches are dropped
    /// unread for more than the whole prefetch pool is not serving a load: it stops.
    fn pump_sweep(&self, s: &mut ReadState) {
        let Sweep::On {
            mut next,
            mut wasted,
        } = s.sweep
        else {
            return;
        };
        let part = self.ctx.cfg.part_size;
        let give_up = self
            .ctx
            .cfg
            .split()
            .map_or(part, |(prefetch, _, _)| prefetch);
        let running = |s: &ReadState| {
            s.fetches
                .iter()
                .filter(|f| f.purpose == Purpose::Sweep && f.result.peek().is_none())
                .count()
        };
        while next < self.size && running(s) < self.ctx.cfg.concurrency {
            // One part, cut short where a fetch already running takes over.
            if let Some(f) = s.fetches.iter().find(|f| f.covers(next)) {
                next = f.end;
                continue;
            }
            if let Some(d) = s.demand.iter().find(|d| d.start <= next && next < d.end) {
                next = d.end;
                continue;
            }
            let mut stop = (((next / part) + 1) * part).min(self.size);
            if let Some(n) = s.next_start(next) {
                stop = stop.min(n);
            }
            let Some(reservation) = self.ctx.budget.try_prefetch(stop - next) else {
                // Gone past: a whole pool behind the furthest read, where no reader of a load
                // that keeps up with the sweep lingers.
                let passed = s.fetches.iter().position(|f| {
                    f.purpose == Purpose::Sweep
                        && f.end + give_up <= s.furthest
                        && f.result.peek().is_some()
                });
                match passed.and_then(|i| s.fetches.remove(i)) {
                    Some(f) => {
                        wasted += (f.end - f.start).saturating_sub(f.served);
                        if wasted > give_up {
                            tracing::debug!(key = %self.key, wasted, "reads skip most of the sweep: stopping it");
                            s.sweep = Sweep::Off;
                            s.fetches.retain(|f| f.purpose != Purpose::Sweep);
                            return;
                        }
                        continue;
                    }
                    None => {
                        metrics::prefetch(None);
                        break; // budget exhausted: the sweep pauses, reads go on
                    }
                }
            };
            metrics::prefetch(Some(stop - next));
            let mut f = self.start_fetch(next, stop, Some(reservation));
            f.purpose = Purpose::Sweep;
            next = stop;
            insert_sorted(&mut s.fetches, f);
        }
        s.sweep = Sweep::On { next, wasted };
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
        Fetch {
            start,
            end,
            result,
            purpose: Purpose::Window,
            served: 0,
        }
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

    /// A safetensors file of `data` bytes of tensors: the 8-byte length, the JSON header, the
    /// tensor bytes.
    fn safetensors(data: usize, seed: u8) -> Bytes {
        let json =
            format!(r#"{{"w":{{"dtype":"U8","shape":[{data}],"data_offsets":[0,{data}]}}}}"#);
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(&data_bytes(data, seed));
        Bytes::from(v)
    }

    fn data_bytes(len: usize, seed: u8) -> Vec<u8> {
        data(len, seed).to_vec()
    }

    /// Every range of `ranges` is disjoint from the others, and together they are `0..size`.
    fn assert_fetched_once(mut ranges: Vec<std::ops::Range<u64>>, size: u64) {
        ranges.sort_by_key(|r| r.start);
        let mut pos = 0;
        for r in &ranges {
            assert_eq!(
                r.start, pos,
                "a gap or a byte fetched twice at {pos}: {ranges:?}"
            );
            pos = r.end;
        }
        assert_eq!(pos, size, "{ranges:?}");
    }

    #[tokio::test]
    async fn a_safetensors_load_is_fetched_once_in_order_in_large_ranges() {
        let obj = safetensors(96 << 20, 6);
        let size = obj.len() as u64;
        // A prefetch pool of 4 parts of 8 MiB.
        let config = cfg(8 * MIB, 4, 80 * MIB);
        let (prefetch, demand, _) = config.split().unwrap();
        assert_eq!(prefetch, 32 * MIB);
        let s = setup(&[("m.safetensors", obj.clone())], config).await;
        let r = reader(&s, "m.safetensors").await;
        // The loader reads the header (the first fault of its mmap brings a megabyte)...
        let header = r.read(0, MIB).await.unwrap();
        assert_eq!(header, obj.slice(..MIB as usize));
        assert!(r.sweeping(), "a safetensors header starts the sweep");
        // ...then copies the tensors out of its mmap: 1 MiB page-fault reads from several
        // threads, 16 at a time, in an order that looks random within 16 MiB.
        let mut offsets: Vec<u64> = (1..size.div_ceil(MIB)).map(|i| i * MIB).collect();
        for (n, chunk) in offsets.chunks_mut(16).enumerate() {
            chunk.reverse();
            let turn = n % 7 % chunk.len();
            chunk.rotate_left(turn);
        }
        let r = &r;
        for batch in offsets.chunks(16) {
            let reads = batch
                .iter()
                .map(|&off| async move { (off, r.read(off, MIB).await) });
            for (off, got) in futures::future::join_all(reads).await {
                let end = (off + MIB).min(size);
                assert_eq!(
                    got.unwrap(),
                    obj.slice(off as usize..end as usize),
                    "at {off}"
                );
            }
        }
        let ranges = s.mem.ranges_read();
        // The header's block on demand, then the sweep: whole parts in file order, each byte
        // fetched once, never more than the prefetch and demand pools in memory.
        assert_eq!(ranges[0], 0..MIB);
        assert!(
            ranges.windows(2).all(|w| w[0].end <= w[1].start),
            "in file order: {ranges:?}"
        );
        assert!(
            ranges[1..ranges.len() - 1]
                .iter()
                .all(|r| r.end - r.start >= 7 * MIB),
            "large ranges: {ranges:?}"
        );
        assert_eq!(ranges.len() as u64, size.div_ceil(8 * MIB) + 1);
        assert_fetched_once(ranges, size);
        assert!(
            s.ctx.budget.peak() <= prefetch + demand,
            "{}",
            s.ctx.budget.peak()
        );
        assert_eq!(s.ctx.budget.in_use(), 0, "every range read was let go");
    }

    #[tokio::test]
    async fn reads_that_skip_most_of_a_model_stop_its_sweep() {
        let obj = safetensors(160 << 20, 7);
        let size = obj.len() as u64;
        let config = cfg(8 * MIB, 4, 80 * MIB);
        let (prefetch, _, _) = config.split().unwrap();
        let s = setup(&[("m.safetensors", obj.clone())], config).await;
        let r = reader(&s, "m.safetensors").await;
        r.read(0, 4096).await.unwrap();
        assert!(r.sweeping());
        // Small reads far apart, back and forth: not a load of the whole file.
        for i in 0..40u64 {
            let off = (i * 37 * MIB + 4096 * i) % (size - 4096);
            let got = r.read(off, 4096).await.unwrap();
            assert_eq!(got, obj.slice(off as usize..off as usize + 4096));
        }
        assert!(!r.sweeping(), "the sweep stopped");
        let fetched: u64 = s.mem.ranges_read().iter().map(|r| r.end - r.start).sum();
        // What the reads asked for (a block or two each), and at most the prefetch pool twice
        // over before the sweep gave up.
        assert!(
            fetched <= 41 * 2 * MIB + 2 * prefetch + 8 * MIB,
            "{} MiB fetched",
            fetched >> 20
        );
    }

    #[tokio::test]
    async fn a_large_random_pread_is_one_get_per_kernel_request() {
        let obj = data(64 << 20, 8);
        let s = setup(&[("m", obj.clone())], cfg(8 * MIB, 8, 160 * MIB)).await;
        let r = reader(&s, "m").await;
        let mut gets = 0;
        for base in [40 * MIB + (12 << 10), 8 * MIB, 50 * MIB + 4096] {
            // A 4 MiB pread through the page cache arrives as four concurrent 1 MiB requests.
            let reads = (0..4u64).map(|i| r.read(base + i * MIB, MIB));
            let got = futures::future::join_all(reads).await;
            for (i, got) in got.into_iter().enumerate() {
                let off = (base + i as u64 * MIB) as usize;
                assert_eq!(got.unwrap(), obj.slice(off..off + MIB as usize));
            }
            let ranges = s.mem.ranges_read();
            assert_eq!(ranges.len() - gets, 4, "one GET per request: {ranges:?}");
            // Together the blocks the pread touches, each fetched once.
            let first = base - base % BLOCK_SIZE;
            let last = (base + 4 * MIB).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
            let mut new: Vec<_> = ranges[gets..]
                .iter()
                .map(|r| r.start - first..r.end - first)
                .collect();
            new.sort_by_key(|r| r.start);
            assert_fetched_once(new, last - first);
            gets = ranges.len();
        }
        // The same pread in one request (a file open with direct I/O) is one GET.
        r.read(20 * MIB + 4096, 4 * MIB).await.unwrap();
        let last: Vec<_> = s.mem.ranges_read().drain(gets..).collect();
        assert_eq!(
            last,
            vec![20 * MIB..25 * MIB],
            "one GET of the blocks it touches"
        );
        assert_eq!(r.window(), 0);
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
