//! Write-behind: blocks fetched for a reader go to the disk tier from a queue, on a thread of
//! their own, so that the application is answered as soon as the bytes arrive, not after they
//! are on disk. A cold read with `--cache-dir` then runs at the speed of one without.
//!
//! ## Bounded, and never in the way
//! The queue holds at most [`QUEUE_BYTES`] (64 MiB; the block being written included). It is beside
//! `--max-memory`, not inside it: the queued blocks are the newest ones fetched, which are the
//! same allocations the memory tier and the reader hold at that moment (blocks are shared, never
//! copied), so the queue adds little memory of its own. A block that does not fit when offered
//! is **dropped** from the disk tier (`bucketfs_cache_write_dropped_blocks_total`): the read never
//! waits for the disk. A later read of it simply finds it missing and fetches it again.
//!
//! ## The claim travels with the block
//! A queued block keeps its fill claim (see [`super::disk`]) until it is written, so another
//! process wanting it waits for it (bounded by the claim wait) instead of fetching it too. A fetch
//! of this process that finds it claimed takes its bytes from the memory tier or from the queue
//! ([`WriteBehind::queued`]) instead: it neither waits for the disk nor reads the block back from
//! there and verifies it again (which cost a cold read with the cache on a read and a checksum
//! of most blocks a second time, since the prefetch window and the reads it runs ahead of ask for
//! overlapping ranges). A dropped block releases its claim at once: a waiter in another process
//! then finds neither the block nor a claim, and fetches it itself. Blocks are written as before
//! (data, then entry), so a crash with blocks still queued leaves them missing, never wrong;
//! seals are written only by a verification of the whole file, after `fdatasync`.
//!
//! ## When the disk is up to date
//! [`WriteBehind::settle`] waits until the queued blocks of one object are written: the read
//! path calls it when a handle is closed and before an open looks for a complete file, so that a
//! file read in full is found complete by the next open. [`WriteBehind::flush`] waits for all of
//! them (at shutdown). Both wait at most for the queue to drain, which is bounded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use super::BlockKey;
use super::disk::{DiskCache, FillGuard};
use crate::metrics;

/// Most bytes queued for the disk. 64 MiB is one default prefetch window (8 parts of 8 MiB): a
/// stream reading at full speed while the disk stalls for a moment (writeback, another process's
/// I/O) drops nothing. A dropped block costs another process waiting on its claim a fetch of
/// its own, so the queue is sized to make drops rare on a healthy disk, which writes 64 MiB in
/// well under the time the network takes to deliver it; only a disk much slower than the store
/// (a busy or network-backed cache volume) drops blocks.
pub const QUEUE_BYTES: u64 = 64 << 20;

/// The disk writer of one [`super::tiered::TieredCache`].
pub struct WriteBehind {
    shared: Arc<Shared>,
}

struct Shared {
    disk: Arc<DiskCache>,
    limit: u64,
    state: Mutex<State>,
    changed: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Bytes queued, with the block being written.
    bytes: u64,
    /// The block being written now, with its bytes.
    writing: Option<(BlockKey, Bytes)>,
    /// The writer stops taking blocks (a test's stand-in for a disk that does not keep up).
    paused: bool,
    /// The owner is gone: write what is queued, then stop.
    closed: bool,
}

struct Queued {
    key: BlockKey,
    size: u64,
    data: Bytes,
    /// Released once the block is on disk (or given up).
    _claim: FillGuard,
}

fn same_object(a: &BlockKey, b: &BlockKey) -> bool {
    a.key == b.key && a.version == b.version && a.store == b.store
}

impl WriteBehind {
    /// A writer for `disk` queueing at most `limit` bytes, with its thread.
    pub fn new(disk: Arc<DiskCache>, limit: u64) -> WriteBehind {
        let shared = Arc::new(Shared {
            disk,
            limit,
            state: Mutex::default(),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("bucketfs-cache-writer".into())
            .spawn(move || worker.run());
        if let Err(e) = spawned {
            // Without a writer every offer is dropped; reads go on.
            tracing::warn!(error = %e, "cannot start the disk cache writer; new blocks are not cached on disk");
            shared.state.lock().unwrap().closed = true;
        }
        WriteBehind { shared }
    }

    /// Queues `data`, block `key` of an object of `size` bytes, for the disk. Never waits: if
    /// the queue is full the block is dropped from the disk tier and its claim released at once.
    /// Returns whether it was queued.
    pub fn offer(&self, key: BlockKey, size: u64, data: Bytes, claim: FillGuard) -> bool {
        let len = data.len() as u64;
        let mut st = self.shared.state.lock().unwrap();
        if st.closed || st.bytes + len > self.shared.limit {
            drop(st);
            drop(claim);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::cache_write_dropped();
            return false;
        }
        st.bytes += len;
        metrics::cache_write_queue(st.bytes);
        st.queue.push_back(Queued {
            key,
            size,
            data,
            _claim: claim,
        });
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Blocks dropped since this writer started.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The bytes of `block` if it is queued or being written: a lookup in this process that
    /// finds the block claimed takes them from here instead of waiting for the disk and reading
    /// them back from it.
    pub fn queued(&self, block: &BlockKey) -> Option<Bytes> {
        let st = self.shared.state.lock().unwrap();
        if let Some((k, data)) = &st.writing
            && k == block
        {
            return Some(data.clone());
        }
        st.queue
            .iter()
            .find(|q| q.key == *block)
            .map(|q| q.data.clone())
    }

    /// Waits until no block of the object of `block` is queued or being written.
    pub fn settle(&self, block: &BlockKey) {
        self.wait_until(|st| {
            !st.queue.iter().any(|q| same_object(&q.key, block))
                && !st
                    .writing
                    .as_ref()
                    .is_some_and(|(w, _)| same_object(w, block))
        });
    }

    /// Waits until every queued block is written.
    pub fn flush(&self) {
        self.wait_until(|st| st.queue.is_empty() && st.writing.is_none());
    }

    fn wait_until(&self, done: impl Fn(&State) -> bool) {
        let mut st = self.shared.state.lock().unwrap();
        while !done(&st) {
            st = self.shared.changed.wait(st).unwrap();
        }
    }

    /// Stops (`true`) or restarts the writer, as a disk that does not keep up would.
    #[cfg(test)]
    pub fn pause(&self, paused: bool) {
        self.shared.state.lock().unwrap().paused = paused;
        self.shared.changed.notify_all();
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap();
        st.closed = true;
        st.paused = false;
        drop(st);
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn run(&self) {
        // Keeps the files of the object being written open from one block to the next.
        let mut disk = self.disk.writer();
        let mut st = self.state.lock().unwrap();
        loop {
            if !st.paused
                && let Some(q) = st.queue.pop_front()
            {
                st.writing = Some((q.key.clone(), q.data.clone()));
                drop(st);
                disk.put(&q.key, q.size, &q.data);
                let len = q.data.len() as u64;
                drop(q); // the claim goes once the block is on disk
                st = self.state.lock().unwrap();
                st.writing = None;
                st.bytes -= len;
                metrics::cache_write_queue(st.bytes);
                self.changed.notify_all();
                continue;
            }
            if st.closed && st.queue.is_empty() {
                return;
            }
            // Nothing to write: no file is held open while idle (an evicted object's space is
            // freed only once its files are closed).
            disk.close();
            st = self.changed.wait(st).unwrap();
        }
    }
}
