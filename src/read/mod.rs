//! Per-handle reading of one object version: sequential detection, a growing prefetch window,
//! parallel ranged GETs, and the memory budget.
//!
//! ## Files
//! `window.rs` follows sequential runs and keeps the prefetch window ahead of them; `sweep.rs`
//! fetches files read whole (recognised by `format.rs`); `plan.rs` decides which fetches serve a
//! read; `fetch.rs` starts fetches through the cache tiers and holds their bytes; `error.rs` is
//! what a read fails with.
//!
//! ## Pinned versions
//! Every GET carries the version seen at open: if the object changes under an open handle the
//! store answers `PreconditionFailed` and the application gets `ESTALE`, never a mix of versions.
//!
//! ## Sequential reads and the prefetch window
//! A read that starts near where the previous one ended (within one part, since the kernel sends
//! readahead requests concurrently and slightly out of order) continues a *stream*. So does a read
//! further ahead that falls inside the window's fetches: the kernel asks for a whole readahead
//! window (`--read-ahead`, 16 MiB by default, two parts) at once, and one of its requests may
//! reach the planner before those in between; the stream's end stays where it was until they
//! come, and the window is neither dropped nor pushed further by it. From the
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
//! once, instead of four GETs of two blocks each. The kernel sends those requests at once only
//! when the read fits the mount's readahead (`--read-ahead`, see `mount.rs`); at the kernel's
//! default of 128 KiB, the same `pread` arrives as a chain of 128 KiB windows, one round trip
//! after another.
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

mod error;
mod fetch;
mod format;
mod plan;
mod sweep;
#[cfg(test)]
mod tests;
mod window;

pub use error::{ReadError, ReadResult};

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::cache::BLOCK_SIZE;
use crate::cache::tiered::TieredCache;
use crate::memory::MemoryBudget;
use crate::store::{DynStore, StoreError, Version};
use plan::ReadState;
use sweep::Sweep;

// Fetched blocks are cut into buffers used again only if they have the store's pooled size.
const _: () = assert!(BLOCK_SIZE == crate::store::POOLED_BLOCK as u64);

/// Read tuning, with the reasons for the defaults.
#[derive(Clone, Debug)]
pub struct ReadConfig {
    /// Bytes per prefetch GET. 8 MiB: a request to S3 costs ~20-30 ms before the first byte, so a
    /// part must take much longer than that to transfer (8 MiB at ~100 MB/s per connection is
    /// ~80 ms) for latency to stop mattering; larger parts only raise memory per request.
    pub part_size: u64,
    /// Most prefetch GETs in flight per stream (see [`crate::config::READ_CONCURRENCY`]).
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

impl ReadConfig {
    /// How the memory budget is split: (prefetch pool, demand pool, memory tier). The options
    /// were checked by `config::check_read`.
    pub fn split(&self) -> (u64, u64, u64) {
        // Prefetch at most half the budget; demand gets up to 4 parts of the rest (enough for the
        // kernel's concurrent reads of a few random-access files), the memory tier the remainder.
        let prefetch = (self.concurrency as u64 * self.part_size).min(self.max_memory / 2);
        let prefetch = prefetch.max(self.part_size);
        let rest = self.max_memory.saturating_sub(prefetch);
        let demand = (4 * self.part_size).min(rest / 2).max(BLOCK_SIZE * 2);
        let tier = rest.saturating_sub(demand);
        (prefetch, demand, tier)
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
    pub async fn read(&self, offset: u64, len: u64) -> ReadResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let data = match self.read_once(offset, end).await {
            Err(ReadError::Store(e)) => {
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

    async fn read_once(&self, offset: u64, end: u64) -> ReadResult<Bytes> {
        let needed = self.plan(offset, end);
        let mut out: Option<BytesMut> = None;
        let mut single: Option<Bytes> = None;
        for fetch in needed {
            let part = fetch.await.map_err(|e| match e {
                StoreError::PreconditionFailed(_) | StoreError::NotFound(_) => ReadError::Stale,
                e => ReadError::Store(e),
            })?;
            let from = offset.max(part.start);
            let to = end.min(part.end());
            if from >= to {
                return Err(ReadError::Store(StoreError::Transient(format!(
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
            return Err(ReadError::Store(StoreError::Transient(format!(
                "{}: short read at {offset}",
                self.key
            ))));
        }
        Ok(data)
    }
}
