//! Sequential runs and the prefetch window that runs ahead of them (see the module docs above).

use super::Reader;
use super::fetch::{Purpose, insert_sorted};
use super::plan::{MAX_FETCHES, ReadState};
use crate::cache::BLOCK_SIZE;
use crate::metrics;

/// The current run of sequential reads of a handle.
#[derive(Default)]
pub(super) struct SequentialRun {
    /// Where the run began.
    pub(super) start: u64,
    /// End of the furthest read of the run.
    pub(super) last_end: u64,
    /// Reads in the run.
    pub(super) reads: u32,
}

/// How far ahead of a sequential run the handle fetches.
#[derive(Default)]
pub(super) struct PrefetchWindow {
    /// Bytes to keep fetched ahead of the read position.
    pub(super) bytes: u64,
    /// End of the furthest fetch issued for the run.
    pub(super) frontier: u64,
}

impl Reader {
    /// Follows the sequential run with the read of `offset..end`: continues it (growing the
    /// window on entering a new part) or starts a new one. Returns whether the read continued
    /// the run.
    pub(super) fn follow_run(
        &self,
        s: &mut ReadState,
        offset: u64,
        end: u64,
        sweeping: bool,
    ) -> bool {
        let part = self.ctx.cfg.part_size;
        let run = &s.run;
        let near = offset + part >= run.last_end && offset <= run.last_end + part;
        // Further ahead, but inside the window's fetches: the kernel's readahead (`--read-ahead`,
        // 16 MiB by default) asks for that much at once, in concurrent requests that reach the
        // planner in an order of their own, so one of them may come more than a part before the
        // ones between. It is the run going on, not a seek: the window is kept, and the run's
        // end stays where it was, so those in between still follow the run.
        let ahead = !near
            && run.reads > 0
            && offset > run.last_end
            && s.fetches
                .iter()
                .any(|f| f.purpose == Purpose::Window && f.covers(offset));
        let run = &mut s.run;
        let sequential = (run.reads > 0 && near) || ahead || (run.reads == 0 && offset == 0);
        if ahead {
            run.reads += 1;
            return true;
        }
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
    pub(super) fn grow_window(&self, s: &mut ReadState, end: u64) {
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
}
