//! Buffers of whole blocks, used again once their block is dropped.
//!
//! A cold read cuts every response body into 1 MiB blocks ([`super::BlockBuilder`]). A freshly
//! allocated 1 MiB buffer is fresh memory: the allocator maps it (or takes back what it returned
//! to the kernel when an earlier block was freed), and the first write to each of its 256 pages
//! faults and has the kernel zero the page, only for the body's bytes to overwrite it. Profiled
//! during a cold `dd` of a 1 GiB file, those faults were 15% of the daemon's CPU, as much as the
//! copy of the bytes itself. A block's bytes live in the memory tier and in the fetches of the
//! handles until the last of them lets go (mostly when the tier evicts the block for a newer one,
//! at the rate blocks arrive); its buffer then comes back here, already mapped, and the next
//! block is cut into it.
//!
//! A buffer the pool has none for yet is mapped in one call (`MADV_POPULATE_WRITE`) before the
//! body is copied into it: a fresh daemon still touches its whole working set once (the prefetch
//! window and the memory tier, ~200 MiB by default), and mapping 1 MiB at once took half the time
//! of 256 faults on this kind of machine (a VM). Kernels before 5.14 refuse the call, and then the
//! pages fault in as before.
//!
//! The pool keeps at most [`BlockPool::MAX_IDLE`] buffers (32 MiB) idle, outside the memory
//! budget: blocks are let go in bursts (a fetch of a part, the tier's evictions), and with 16 a
//! cold 1 GiB `dd` still took 217-360 new buffers where its working set is ~190. Only buffers of exactly [`BLOCK`] bytes are kept, the blocks every read
//! is cut into; shorter blocks (an object's tail, a small object read whole) are allocated to
//! their size, so a small file never holds a whole block's memory.

use std::sync::{Mutex, OnceLock};

use bytes::Bytes;

/// The block size whose buffers are pooled: the block cache's (`cache::BLOCK_SIZE`).
pub(crate) const BLOCK: usize = 1 << 20;

/// Idle buffers of [`BLOCK`] bytes.
pub(crate) struct BlockPool {
    /// GUARDED_BY the mutex; INVARIANT: every buffer has a capacity of exactly `BLOCK` and a
    /// length of 0, and there are at most `MAX_IDLE` of them.
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BlockPool {
    /// Most buffers kept idle: 32 MiB.
    pub(crate) const MAX_IDLE: usize = 32;

    /// The pool every backend's blocks come from.
    pub(crate) fn global() -> &'static BlockPool {
        static POOL: OnceLock<BlockPool> = OnceLock::new();
        POOL.get_or_init(BlockPool::new)
    }

    pub(crate) fn new() -> BlockPool {
        BlockPool {
            idle: Mutex::new(Vec::with_capacity(Self::MAX_IDLE)),
        }
    }

    /// An empty buffer with room for exactly one block: one that was used before if there is
    /// one.
    pub(crate) fn take(&'static self) -> PooledBuf {
        let reused = self.idle.lock().unwrap().pop();
        crate::metrics::block_buffer(reused.is_some());
        PooledBuf {
            buf: reused.unwrap_or_else(fresh),
            pool: self,
        }
    }

    /// Buffers idle now (for tests).
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != BLOCK {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < Self::MAX_IDLE {
            idle.push(buf);
        }
    }
}

/// A new buffer of [`BLOCK`] bytes, its pages mapped (see the module docs).
fn fresh() -> Vec<u8> {
    let buf: Vec<u8> = Vec::with_capacity(BLOCK);
    populate(&buf);
    buf
}

/// Maps the whole pages of `buf`'s capacity writable in one call; whether the kernel did.
fn populate(buf: &Vec<u8>) -> bool {
    let (start, end) = whole_pages(buf);
    // SAFETY: the pages of `start..end` lie inside the allocation `buf` owns; populating them
    // maps them writable without changing a byte. A refusal (an older kernel) only leaves the
    // pages to fault in on first write.
    end > start
        && unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        } == 0
}

/// The addresses of the first and past the last whole page of `buf`'s capacity.
fn whole_pages(buf: &Vec<u8>) -> (usize, usize) {
    let page = page_size();
    let at = buf.as_ptr() as usize;
    (
        at.next_multiple_of(page),
        (at + buf.capacity()) / page * page,
    )
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

/// A block's buffer that goes back to its pool when the last [`Bytes`] of it is dropped.
pub(crate) struct PooledBuf {
    buf: Vec<u8>,
    pool: &'static BlockPool,
}

impl PooledBuf {
    /// Bytes the buffer still has room for.
    pub(crate) fn room(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Appends `bytes` (at most [`Self::room`] of them: the buffer never grows).
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.room());
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes written, without a copy; the buffer returns to the pool with the last clone.
    pub(crate) fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static BlockPool {
        Box::leak(Box::new(BlockPool::new()))
    }

    #[test]
    fn a_dropped_block_lends_its_buffer_to_the_next() {
        let pool = pool();
        let mut b = pool.take();
        b.extend(&[7u8; 1000]);
        let block = b.freeze();
        let clone = block.clone();
        let at = block.as_ptr();
        assert_eq!(&block[..], &[7u8; 1000][..]);
        drop(block);
        assert_eq!(pool.idle(), 0, "a clone still holds the bytes");
        drop(clone);
        assert_eq!(pool.idle(), 1);
        let next = pool.take();
        assert_eq!(next.len(), 0);
        assert_eq!(next.room(), BLOCK);
        assert_eq!(next.buf.as_ptr(), at, "the same memory again");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_new_buffer_is_mapped_before_the_first_write() {
        let buf = fresh();
        assert_eq!((buf.len(), buf.capacity()), (0, BLOCK));
        let (start, end) = whole_pages(&buf);
        let pages = (end - start) / page_size();
        assert!(pages >= BLOCK / page_size() - 1);
        if !populate(&buf) {
            return; // a kernel before 5.14: the pages fault in on first write
        }
        let mut resident = vec![0u8; pages];
        // SAFETY: `start..end` is page aligned and inside `buf`; `resident` has a byte per page.
        let rc = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                end - start,
                resident.as_mut_ptr().cast(),
            )
        };
        assert_eq!(rc, 0);
        assert!(resident.iter().all(|r| r & 1 == 1), "every page mapped");
    }

    #[test]
    fn the_pool_keeps_at_most_its_idle_limit() {
        let pool = pool();
        let bufs: Vec<PooledBuf> = (0..BlockPool::MAX_IDLE + 3).map(|_| pool.take()).collect();
        drop(bufs);
        assert_eq!(pool.idle(), BlockPool::MAX_IDLE);
    }

    #[test]
    fn a_slice_keeps_the_buffer_out_of_the_pool() {
        let pool = pool();
        let mut b = pool.take();
        b.extend(b"header and tail");
        let tail = b.freeze().slice(11..);
        assert_eq!(&tail[..], b"tail");
        assert_eq!(pool.idle(), 0);
        drop(tail);
        assert_eq!(pool.idle(), 1);
    }
}
