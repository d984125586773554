//! The sweep: the in-order fetch of a whole file whose index was read first (see the module
//! docs above, and [`super::format`] for how such a file is recognised).

use super::fetch::{Purpose, insert_sorted};
use super::plan::ReadState;
use super::{Reader, format};
use crate::cache::BLOCK_SIZE;
use crate::metrics;

/// The in-order fetch of a whole file whose index was read first (see [`format`]).
#[derive(Default)]
pub(super) enum Sweep {
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

impl Reader {
    /// After the first read at offset 0: a file whose index comes first is read whole, so the
    /// sweep starts right away, before the application has parsed the index.
    pub(super) fn decide_sweep(&self, first: &[u8]) {
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

    /// Keeps up to `concurrency` sweep fetches of one part each in flight, in file order, with
    /// bytes from the prefetch pool. When the pool is used up, the sweep lets go of its oldest
    /// fetched range that the reads have gone past (its unread bytes were skipped, or are read
    /// later from the memory tier or on demand) or pauses. A sweep whose fetches are dropped
    /// unread for more than the whole prefetch pool is not serving a load: it stops.
    pub(super) fn pump_sweep(&self, s: &mut ReadState) {
        let Sweep::On {
            mut next,
            mut wasted,
        } = s.sweep
        else {
            return;
        };
        let part = self.ctx.cfg.part_size;
        let give_up = self.ctx.cfg.split().0;
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
}
