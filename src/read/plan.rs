//! The planner: which fetches serve a read, which are started on demand, and what the handle
//! keeps for the reads to come.

use std::collections::VecDeque;

use super::Reader;
use super::fetch::{DemandFetch, Fetch, FetchFuture, Purpose};
use super::sweep::Sweep;
use super::window::{PrefetchWindow, SequentialRun};
use crate::cache::BLOCK_SIZE;

/// Keep at most this many fetches per handle (prefetch window plus a few demand fetches).
pub(super) const MAX_FETCHES: usize = 64;

/// What a handle knows about its reads and keeps fetched for them.
#[derive(Default)]
pub(super) struct ReadState {
    pub(super) run: SequentialRun,
    pub(super) window: PrefetchWindow,
    pub(super) sweep: Sweep,
    /// End of the furthest read ever.
    pub(super) furthest: u64,
    /// Window and sweep fetches, by start.
    pub(super) fetches: VecDeque<Fetch>,
    /// Demand fetches some read still waits on.
    pub(super) demand: Vec<DemandFetch>,
}

impl ReadState {
    /// A kept or demand fetch covering `pos`, counting what it serves up to `end`.
    pub(super) fn cover(&mut self, pos: u64, end: u64) -> Option<(u64, FetchFuture)> {
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
    pub(super) fn next_start(&self, pos: u64) -> Option<u64> {
        let kept = self.fetches.iter().map(|f| f.start);
        let demand = self.demand.iter().map(|d| d.start);
        kept.chain(demand).filter(|&s| s > pos).min()
    }
}

impl Reader {
    /// Decides which fetches serve `offset..end` (starting the missing ones), updates the read
    /// state and schedules prefetches. Never waits: it only takes the handle's lock.
    pub(super) fn plan(&self, offset: u64, end: u64) -> Vec<FetchFuture> {
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
            // From the run's end: a read planned ahead of it (see `follow_run`) does not push
            // the window further.
            let run_end = s.run.last_end;
            self.grow_window(&mut s, run_end);
        }
        while s.fetches.len() > MAX_FETCHES {
            s.fetches.pop_front();
        }
        needed
    }
}
