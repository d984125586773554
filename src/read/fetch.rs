//! The fetches of a handle: ranges of whole blocks brought in through the cache tiers, with the
//! memory they are reserved from, and what a handle keeps of them.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

use super::Reader;
use crate::cache::BLOCK_SIZE;
use crate::memory::Reservation;
use crate::store::StoreError;

/// Bytes from `start` (a block boundary) on, as whole blocks, with the memory they are reserved
/// from.
pub(super) struct FetchedBlocks {
    pub(super) start: u64,
    blocks: Vec<Bytes>,
    _reservation: Reservation,
}

impl FetchedBlocks {
    pub(super) fn end(&self) -> u64 {
        self.start + self.blocks.iter().map(|b| b.len() as u64).sum::<u64>()
    }

    /// Appends the bytes of `from..to` (inside this part) to `out`, or, if they lie in one block,
    /// returns them without a copy.
    pub(super) fn copy_range(
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

pub(super) type FetchResult = Result<Arc<FetchedBlocks>, StoreError>;
pub(super) type FetchFuture = Shared<BoxFuture<'static, FetchResult>>;

/// Why the handle keeps a fetch, which decides when it lets go of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Ahead of a sequential run: dropped once the run is a part past it.
    Window,
    /// Part of the in-order sweep of a whole file: dropped once every byte of it was read.
    Sweep,
}

/// One ranged fetch running (or done) that the handle keeps for the reads to come.
pub(super) struct Fetch {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) result: FetchFuture,
    pub(super) purpose: Purpose,
    /// Bytes of it handed to reads so far.
    pub(super) served: u64,
}

impl Fetch {
    pub(super) fn covers(&self, pos: u64) -> bool {
        self.start <= pos && pos < self.end
    }
}

/// A fetch that only reads wait on (its bytes are reserved from the demand pool): held weakly, so
/// it lives exactly as long as a read waits for it, and the concurrent kernel requests a large
/// `pread` is split into share the blocks they have in common instead of fetching them twice.
pub(super) struct DemandFetch {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) result: WeakShared<BoxFuture<'static, FetchResult>>,
}

impl DemandFetch {
    pub(super) fn live(&self) -> Option<FetchFuture> {
        self.result.upgrade()
    }
}

impl Reader {
    /// Starts fetching `start..end` in the background (from the block cache where it can).
    pub(super) fn start_fetch(
        &self,
        start: u64,
        end: u64,
        reservation: Option<Reservation>,
    ) -> Fetch {
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
            Ok(Arc::new(FetchedBlocks {
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

pub(super) fn insert_sorted(fetches: &mut VecDeque<Fetch>, f: Fetch) {
    let at = fetches.partition_point(|x| x.start < f.start);
    fetches.insert(at, f);
}
