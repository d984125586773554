//! One global memory budget for read buffers, held whatever the number of open files.
//!
//! The budget (`--max-memory`) is split three ways when the mount starts:
//! - the **memory tier** (a byte-weighted cache) gets what is left after the two pools below;
//! - the **prefetch pool** holds bytes being fetched or fetched ahead and not yet read. Prefetch
//!   only ever *tries* to take from it: when it is exhausted, prefetching pauses (reads slow down),
//!   it never waits and never fails;
//! - the **demand pool** holds bytes an application is waiting for right now. Demand fetches wait
//!   for it; since every holder is a fetch in progress that releases its bytes as soon as the reply
//!   is built, waiting here always ends, whatever idle handles hold in the prefetch pool.
//!
//! Bytes are leased: a [`Lease`] returns its bytes to the pool when dropped, so buffers that are
//! dropped for any reason (a read done, a handle closed, a seek) give their memory back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Counters {
    in_use: AtomicU64,
    peak: AtomicU64,
}

#[derive(Debug)]
pub struct MemoryBudget {
    prefetch: Arc<Semaphore>,
    demand: Arc<Semaphore>,
    /// Largest single demand lease: a larger request is clamped to the whole pool.
    demand_total: u64,
    counters: Arc<Counters>,
}

/// Bytes taken from a pool; given back on drop.
#[derive(Debug)]
pub struct Lease {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    counters: Arc<Counters>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.counters
            .in_use
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryBudget {
    pub fn new(prefetch_bytes: u64, demand_bytes: u64) -> MemoryBudget {
        MemoryBudget {
            prefetch: Arc::new(Semaphore::new(prefetch_bytes as usize)),
            demand: Arc::new(Semaphore::new(demand_bytes as usize)),
            demand_total: demand_bytes,
            counters: Arc::new(Counters {
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    fn lease(&self, permit: OwnedSemaphorePermit, bytes: u64) -> Lease {
        let now = self.counters.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.counters.peak.fetch_max(now, Ordering::Relaxed);
        Lease {
            _permit: permit,
            bytes,
            counters: self.counters.clone(),
        }
    }

    /// Bytes for a prefetch, if the pool has them now.
    pub fn try_prefetch(&self, bytes: u64) -> Option<Lease> {
        let permit = self
            .prefetch
            .clone()
            .try_acquire_many_owned(bytes as u32)
            .ok()?;
        Some(self.lease(permit, bytes))
    }

    /// Bytes for a read an application waits on; waits until the pool has them.
    pub async fn demand(&self, bytes: u64) -> Lease {
        let bytes = bytes.min(self.demand_total);
        let permit = self
            .demand
            .clone()
            .acquire_many_owned(bytes as u32)
            .await
            .expect("the budget's semaphores are never closed");
        self.lease(permit, bytes)
    }

    /// Bytes leased right now, from both pools.
    pub fn in_use(&self) -> u64 {
        self.counters.in_use.load(Ordering::Relaxed)
    }

    /// Most bytes ever leased at once.
    pub fn peak(&self) -> u64 {
        self.counters.peak.load(Ordering::Relaxed)
    }
}
