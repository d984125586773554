//! One global memory budget for read and upload buffers, held whatever the number of open files.
//!
//! The budget (`--max-memory`) is split four ways when the mount starts:
//! - the **memory tier** (a byte-weighted cache) gets what is left after the pools below;
//! - the **prefetch pool** holds bytes being fetched or fetched ahead and not yet read. Prefetch
//!   only ever *tries* to take from it: when it is exhausted, prefetching pauses (reads slow down),
//!   it never waits and never fails;
//! - the **demand pool** holds bytes an application is waiting for right now. Demand fetches wait
//!   for it; since every holder is a fetch in progress that releases its bytes as soon as the reply
//!   is built, waiting here always ends, whatever idle handles hold in the prefetch pool;
//! - the **upload pool** (writable mounts) holds the parts being uploaded and the bytes copied in
//!   to stage an existing object. Uploads wait for it, and only for it: a checkpoint upload on a
//!   slow link holds its parts for minutes, and reads of the same mount, cache hits or not, must
//!   not queue behind it; nor can many readers starve an upload.
//!
//! Bytes are reserved: a [`Reservation`] returns its bytes to the pool when dropped, so buffers that are
//! dropped for any reason (a read done, a handle closed, a seek) give their memory back. A request
//! larger than its whole pool is clamped to the pool (it waits for the pool to be empty), so no
//! request waits forever.
//!
//! Pools count in permits of [`PERMIT`] bytes: a semaphore hands out at most `u32::MAX` permits at
//! once, so one permit per byte would wrap at 4 GiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per permit: reservations are rounded up to whole permits (4 KiB, a page).
pub const PERMIT: u64 = 4096;

#[derive(Debug)]
struct Counters {
    in_use: AtomicU64,
    peak: AtomicU64,
}

/// One pool of bytes.
#[derive(Debug)]
struct Pool {
    sem: Arc<Semaphore>,
    /// Size of the pool, in permits.
    permits: u64,
}

impl Pool {
    fn new(bytes: u64) -> Pool {
        let permits = bytes.div_ceil(PERMIT).min(Semaphore::MAX_PERMITS as u64);
        Pool {
            sem: Arc::new(Semaphore::new(permits as usize)),
            permits,
        }
    }

    /// Permits for `bytes`, clamped to the whole pool (and to what one acquire can take).
    fn permits_for(&self, bytes: u64) -> u32 {
        let want = bytes.div_ceil(PERMIT).min(self.permits);
        u32::try_from(want).unwrap_or(u32::MAX)
    }

    fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        if bytes.div_ceil(PERMIT) > self.permits {
            return None;
        }
        self.sem
            .clone()
            .try_acquire_many_owned(self.permits_for(bytes))
            .ok()
    }

    async fn take(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_many_owned(self.permits_for(bytes))
            .await
            .expect("the budget's semaphores are never closed")
    }
}

#[derive(Debug)]
pub struct MemoryBudget {
    prefetch: Pool,
    demand: Pool,
    upload: Pool,
    counters: Arc<Counters>,
}

/// Bytes taken from a pool; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    counters: Arc<Counters>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.counters
            .in_use
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryBudget {
    /// A budget with these read pools and an upload pool as large as the demand pool (see
    /// [`MemoryBudget::with_uploads`]).
    pub fn new(prefetch_bytes: u64, demand_bytes: u64) -> MemoryBudget {
        MemoryBudget {
            prefetch: Pool::new(prefetch_bytes),
            demand: Pool::new(demand_bytes),
            upload: Pool::new(demand_bytes),
            counters: Arc::new(Counters {
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    /// The same budget with an upload pool of `upload_bytes`.
    pub fn with_uploads(self, upload_bytes: u64) -> MemoryBudget {
        MemoryBudget {
            upload: Pool::new(upload_bytes),
            ..self
        }
    }

    fn reserve(&self, permit: OwnedSemaphorePermit, bytes: u64) -> Reservation {
        let now = self.counters.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.counters.peak.fetch_max(now, Ordering::Relaxed);
        Reservation {
            _permit: permit,
            bytes,
            counters: self.counters.clone(),
        }
    }

    /// Bytes for a prefetch, if the pool has them now.
    pub fn try_prefetch(&self, bytes: u64) -> Option<Reservation> {
        let permit = self.prefetch.try_take(bytes)?;
        Some(self.reserve(permit, bytes))
    }

    /// Bytes for a read an application waits on; waits until the pool has them.
    pub async fn demand(&self, bytes: u64) -> Reservation {
        let permit = self.demand.take(bytes).await;
        self.reserve(permit, bytes)
    }

    /// Bytes for an upload (or for staging an existing object); waits until the pool has them.
    pub async fn upload(&self, bytes: u64) -> Reservation {
        let permit = self.upload.take(bytes).await;
        self.reserve(permit, bytes)
    }

    /// Bytes reserved right now, from every pool.
    pub fn in_use(&self) -> u64 {
        self.counters.in_use.load(Ordering::Relaxed)
    }

    /// Most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.counters.peak.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reservations_of_4_gib_and_more_neither_wrap_nor_wait_forever() {
        let budget = MemoryBudget::new(8 << 30, 6 << 30);
        // 4 GiB + 1 byte as u32 bytes would be 1 byte; here it is 4 GiB + a page.
        let big = budget.try_prefetch((4 << 30) + 1).unwrap();
        assert_eq!(budget.in_use(), (4 << 30) + 1);
        assert!(
            budget.try_prefetch(4 << 30).is_none(),
            "the pool is half used"
        );
        drop(big);
        // Larger than the whole pool: clamped to it, so it is granted once the pool is free.
        let all = tokio::time::timeout(Duration::from_secs(1), budget.demand(100 << 30))
            .await
            .expect("a reservation larger than the pool is clamped to it");
        assert_eq!(budget.in_use(), 100 << 30);
        drop(all);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn uploads_and_reads_draw_on_separate_pools() {
        let budget = MemoryBudget::new(1 << 20, 4 << 20).with_uploads(16 << 20);
        let _parts = budget.upload(16 << 20).await;
        // The upload pool is used up, the read pools are not.
        let read = tokio::time::timeout(Duration::from_secs(1), budget.demand(4 << 20)).await;
        assert!(read.is_ok(), "a read waited for an upload's memory");
        assert!(budget.try_prefetch(1 << 20).is_some());
        let more = tokio::time::timeout(Duration::from_millis(50), budget.upload(1)).await;
        assert!(more.is_err(), "the upload pool is used up");
    }
}
