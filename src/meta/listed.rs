//! What listings said lately about the entries they brought in, first in, first out.
//!
//! A listing with attributes (GCS, `file://`) tells what each child is, and the lookups that
//! follow it (`ls -l`: one per entry, right after the `readdir` reply that named it) are
//! answered from that. Kept in the attribute cache, the entries of a directory larger than that
//! cache each evicted another through the cache's bookkeeping (its queues, its deferred
//! maintenance): at a million entries that turnover cost the daemon about as much CPU per entry
//! as answering the lookup, and `ls -f` paid it too, for lookups it never made. So what a listing
//! brings in is kept here instead: a hash map and a queue in the order of insertion, capped in
//! bytes ([`super::LISTED_BYTES`], a share of [`super::META_CACHE_BYTES`]), where an entry
//! costs one insertion and, later, one removal, whatever the directory's size. A lookup asks the
//! attribute cache and this, and takes the newer answer; what the store says to a lookup itself
//! goes to the attribute cache as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::{Known, PackedStat};

/// Bytes a heap allocation costs besides what it holds (the allocator's header and rounding).
const ALLOC_OVERHEAD: usize = 16;

/// What a place in the queue costs: counted from its insertion to its removal, also when its
/// entry went away or was replaced before (then the place is stale, skipped when it comes out).
const QUEUE_SLOT: u64 = std::mem::size_of::<(Arc<str>, u64)>() as u64;

struct Slot {
    known: Known,
    /// Its place in the queue (older places of the same key are stale).
    seq: u64,
    weight: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<str>, Slot>,
    /// Keys in the order they came in, with their sequence numbers.
    queue: VecDeque<(Arc<str>, u64)>,
    next: u64,
    /// The weights of the entries in `map` and the places in `queue`.
    bytes: u64,
}

/// The entries listings brought in lately (see the module docs). INVARIANT: `bytes` stays at or
/// below the cap after every call.
pub(super) struct Listed {
    inner: Mutex<Inner>,
    cap: u64,
}

/// Bytes the entry of `key` saying `known` holds: the key (shared by the map and the queue), the
/// packed attributes, and its slot in the map (twice: a hash table is up to half empty).
fn weight(key: &str, known: &Known) -> u64 {
    let heap = [
        16 + key.len(),
        known.stat.as_ref().map_or(0, PackedStat::heap_bytes),
    ]
    .iter()
    .filter(|&&n| n > 0)
    .map(|n| n + ALLOC_OVERHEAD)
    .sum::<usize>();
    (heap + 2 * std::mem::size_of::<(Arc<str>, Slot)>()) as u64
}

impl Listed {
    pub fn new(cap: u64) -> Listed {
        Listed {
            inner: Mutex::default(),
            cap,
        }
    }

    /// Keeps what a listing said of `key` (replacing what was kept of it), and lets the oldest
    /// entries go while over the cap.
    pub fn insert(&self, key: &str, known: Known) {
        let w = weight(key, &known);
        if w + QUEUE_SLOT > self.cap {
            return;
        }
        let mut t = self.inner.lock().unwrap();
        let seq = t.next;
        t.next += 1;
        let key: Arc<str> = match t.map.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => key.into(),
        };
        if let Some(old) = t.map.insert(
            key.clone(),
            Slot {
                known,
                seq,
                weight: w,
            },
        ) {
            t.bytes -= old.weight;
        }
        t.bytes += w + QUEUE_SLOT;
        t.queue.push_back((key, seq));
        while t.bytes > self.cap {
            let Some((k, seq)) = t.queue.pop_front() else {
                break;
            };
            t.bytes -= QUEUE_SLOT;
            if t.map.get(&k).is_some_and(|s| s.seq == seq) {
                let gone = t.map.remove(&k).expect("just found");
                t.bytes -= gone.weight;
            }
        }
    }

    /// What was kept of `key`.
    pub fn get(&self, key: &str) -> Option<Known> {
        let t = self.inner.lock().unwrap();
        t.map.get(key).map(|s| s.known.clone())
    }

    /// Forgets `key` (its place in the queue goes when it comes out).
    pub fn remove(&self, key: &str) {
        let mut t = self.inner.lock().unwrap();
        if let Some(gone) = t.map.remove(key) {
            t.bytes -= gone.weight;
        }
    }

    /// (entries, bytes) kept.
    #[cfg(test)]
    pub fn usage(&self) -> (usize, u64) {
        let t = self.inner.lock().unwrap();
        (t.map.len(), t.bytes)
    }

    /// Places in the queue, stale ones included.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inner.lock().unwrap().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Stat;
    use tokio::time::Instant;

    fn known() -> Known {
        Known {
            stat: Some(PackedStat::pack(&Stat::dir())),
            seen: Instant::now(),
        }
    }

    #[test]
    fn oldest_out_first_within_the_cap() {
        let one = weight("d/f-000000", &known()) + QUEUE_SLOT;
        let l = Listed::new(100 * one);
        for n in 0..1000 {
            l.insert(&format!("d/f-{n:06}"), known());
            assert!(l.usage().1 <= 100 * one);
        }
        assert_eq!(l.usage().0, 100);
        assert!(l.get("d/f-000899").is_none());
        assert!(l.get("d/f-000900").is_some() && l.get("d/f-000999").is_some());
    }

    #[test]
    fn replaced_and_removed_entries_keep_the_queue_bounded() {
        let one = weight("d/f", &known()) + QUEUE_SLOT;
        let l = Listed::new(10 * one);
        // One key listed again and again, and one forgotten and listed again: the stale places
        // count until they come out, so the queue stays within the cap too.
        for _ in 0..1000 {
            l.insert("d/f", known());
            l.remove("d/g");
            l.insert("d/g", known());
        }
        assert!(l.queued() as u64 <= 10 * one / QUEUE_SLOT, "{}", l.queued());
        assert!(l.usage().1 <= 10 * one);
        assert!(l.get("d/f").is_some() && l.get("d/g").is_some());
        l.remove("d/f");
        assert!(l.get("d/f").is_none());
    }
}
