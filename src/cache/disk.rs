//! The disk tier: a block cache on local disk that every bucketfs process on a node can share at
//! once, and that survives restarts.
//!
//! ## Layout (`--cache-dir DIR`)
//! ```text
//! DIR/cache/LAYOUT                      "bucketfs-cache 1": the format version
//! DIR/cache/v1/objects/ab/<id>.data     the object's bytes, a sparse file of the object's size
//! DIR/cache/v1/objects/ab/<id>.meta     header + one 16-byte entry per block
//! ```
//! `<id>` is a hash of (store, key, version): a changed object is a different id, so stale bytes
//! are never served. Directories are created owner-only (0700). A `LAYOUT` that names another
//! version is reported and the disk tier stays off, instead of misreading a future format.
//!
//! ## Blocks and checksums
//! Block `i` lives at `i * BLOCK_SIZE` of the data file. Its meta entry holds its length and an
//! xxh3 checksum of its bytes, plus a check of the entry itself. A block is written data first,
//! entry last, so a process killed at any moment leaves either no entry (a miss) or an entry that
//! does not match torn bytes (a miss): nothing reads as valid but wrong. Every read verifies the
//! checksum; a bad block is dropped and fetched again, never returned.
//!
//! ## Many processes, no lock server
//! Filling a block takes an OFD write lock on its byte range of the data file (`F_OFD_SETLK`,
//! one open file description per claim, so two handles of one process exclude each other too).
//! Whoever gets the lock re-checks the entry and fetches; the others wait on the same range lock
//! and then find the block filled: the bucket is asked once per block per node. The kernel drops
//! a dead process's locks, so a crashed filler leaves the block to the next waiter.
//!
//! ## Size cap and eviction
//! Each process measures the cache (allocated bytes of data files) after it fills and evicts
//! whole objects, least recently used first (a meta file's mtime is touched when a handle opens
//! it), down to 90% of `--cache-max-size`. Eviction unlinks files: a reader with them open keeps
//! reading its (now anonymous) files and is never cut off or handed other bytes.
//!
//! ## Full disks
//! A write that fails (disk full, read-only, permissions) turns the tier's writes off with one
//! warning; reads go on from the bucket and the blocks already cached.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use super::{BLOCK_SIZE, BlockKey};

const LAYOUT: &str = "bucketfs-cache 1\n";
const MAGIC: &[u8; 8] = b"BFSCACHE";
/// Meta header: magic, object size, block size, sealed flag, then the identity text.
const HEADER: u64 = 4096;
const ENTRY: u64 = 16;
/// Bytes written between two eviction checks of this process.
const EVICT_EVERY: u64 = 64 << 20;

/// One object version in the cache.
pub struct CachedObject {
    data: PathBuf,
    meta: PathBuf,
    size: u64,
}

/// The identity of an object version: what [`BlockKey`] holds minus the block index.
#[derive(Clone, Debug)]
pub struct ObjectId<'a> {
    pub store: &'a str,
    pub key: &'a str,
    pub version: &'a str,
}

impl<'a> ObjectId<'a> {
    pub fn of(b: &'a BlockKey) -> ObjectId<'a> {
        ObjectId {
            store: &b.store,
            key: &b.key,
            version: &b.version,
        }
    }

    fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.store, self.key, self.version)
    }

    fn hash(&self) -> String {
        format!("{:032x}", xxh3_128(self.text().as_bytes()))
    }
}

#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    max_size: u64,
    writable: AtomicBool,
    written_since_check: AtomicU64,
}

/// A claim on filling one block.
pub enum Claim {
    /// This caller fills the block; the range lock is held until the guard drops.
    Mine(FillGuard),
    /// Another process or handle is filling it; [`DiskCache::wait`] until it is done.
    Theirs,
}

/// Holds the OFD range lock of a block being filled.
pub struct FillGuard {
    _file: File,
}

fn ofd_lock(file: &File, start: u64, len: u64, wait: bool) -> io::Result<bool> {
    // SAFETY: a zeroed flock is a valid value; fields set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl with a valid fd and a pointer to a live flock.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(err),
        }
    }
}

fn entry_check(index: u64, len: u32, sum: u64) -> u32 {
    let mut buf = [0u8; 20];
    buf[..8].copy_from_slice(&index.to_le_bytes());
    buf[8..12].copy_from_slice(&len.to_le_bytes());
    buf[12..].copy_from_slice(&sum.to_le_bytes());
    xxh3_64(&buf) as u32
}

impl DiskCache {
    /// Opens (creating it, owner-only) the cache under `dir`. Fails if the directory cannot be
    /// used or holds another layout version.
    pub fn open(dir: &Path, max_size: u64) -> io::Result<DiskCache> {
        let base = dir.join("cache");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)?;
        let layout = base.join("LAYOUT");
        match fs::read_to_string(&layout) {
            Ok(text) if text == LAYOUT => {}
            Ok(text) => {
                return Err(io::Error::other(format!(
                    "{} holds cache layout {:?}, this bucketfs reads {:?}; use another --cache-dir or clear it with `bucketfs cache clear`",
                    base.display(),
                    text.trim(),
                    LAYOUT.trim()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Create-if-absent: of several processes starting at once, one writes it.
                let tmp = base.join(format!("LAYOUT.{}", std::process::id()));
                fs::write(&tmp, LAYOUT)?;
                let _ = fs::hard_link(&tmp, &layout);
                let _ = fs::remove_file(&tmp);
                if fs::read_to_string(&layout)? != LAYOUT {
                    return Err(io::Error::other("cache layout file is not ours"));
                }
            }
            Err(e) => return Err(e),
        }
        let root = base.join("v1").join("objects");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(DiskCache {
            root,
            max_size,
            writable: AtomicBool::new(true),
            written_since_check: AtomicU64::new(0),
        })
    }

    fn paths(&self, id: &ObjectId<'_>) -> (PathBuf, PathBuf) {
        let h = id.hash();
        let dir = self.root.join(&h[..2]);
        (dir.join(format!("{h}.data")), dir.join(format!("{h}.meta")))
    }

    /// The cached object for `id` of `size` bytes, creating its files if `create`.
    pub fn object(&self, id: &ObjectId<'_>, size: u64, create: bool) -> Option<CachedObject> {
        let (data, meta) = self.paths(id);
        let obj = CachedObject { data, meta, size };
        if obj.header_ok(id) {
            return Some(obj);
        }
        if !create || !self.writable.load(Ordering::Relaxed) {
            return None;
        }
        match obj.create(id) {
            Ok(()) => Some(obj),
            Err(e) => {
                self.write_failed(&e);
                None
            }
        }
    }

    fn write_failed(&self, e: &io::Error) {
        if self.writable.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.root.display(),
                error = %e,
                "the disk cache cannot be written; reading on without caching new blocks"
            );
        }
    }

    /// A valid cached block, or `None` (a bad block is removed so it is fetched again).
    pub fn get(&self, key: &BlockKey, size: u64) -> Option<Bytes> {
        let obj = self.object(&ObjectId::of(key), size, false)?;
        obj.read_block(key.index)
    }

    /// Claims block `index` for filling (see the module docs).
    pub fn claim(&self, key: &BlockKey, size: u64) -> Option<Claim> {
        if !self.writable.load(Ordering::Relaxed) {
            return None;
        }
        let obj = self.object(&ObjectId::of(key), size, true)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&obj.data)
            .ok()?;
        match ofd_lock(&file, key.index * BLOCK_SIZE, BLOCK_SIZE, false) {
            Ok(true) => Some(Claim::Mine(FillGuard { _file: file })),
            Ok(false) => Some(Claim::Theirs),
            Err(_) => None,
        }
    }

    /// Blocks until whoever fills block `index` is done (or died); the caller then looks again.
    pub fn wait(&self, key: &BlockKey, size: u64) {
        let Some(obj) = self.object(&ObjectId::of(key), size, false) else {
            return;
        };
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(&obj.data) {
            let _ = ofd_lock(&file, key.index * BLOCK_SIZE, BLOCK_SIZE, true);
        }
    }

    /// Stores a block (the caller holds its claim).
    pub fn put(&self, key: &BlockKey, size: u64, data: &[u8]) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let Some(obj) = self.object(&ObjectId::of(key), size, true) else {
            return;
        };
        if let Err(e) = obj.write_block(key.index, data) {
            self.write_failed(&e);
            return;
        }
        let n = self
            .written_since_check
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if n + data.len() as u64 >= EVICT_EVERY {
            self.written_since_check.store(0, Ordering::Relaxed);
            self.evict();
        }
    }

    /// Records a use of the object (for LRU eviction).
    pub fn touch(&self, id: &ObjectId<'_>) {
        let (_, meta) = self.paths(id);
        if let Ok(f) = File::options().write(true).open(meta) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// The data file of a fully cached, verified object (for kernel passthrough), or `None`.
    pub fn complete_file(&self, id: &ObjectId<'_>, size: u64) -> Option<File> {
        let obj = self.object(id, size, false)?;
        obj.sealed_file(self)
    }

    /// Every object in the cache: (identity text, size, bytes on disk, complete).
    pub fn stats(&self) -> CacheStats {
        let mut s = CacheStats::default();
        for (meta, data) in self.files() {
            s.objects += 1;
            s.bytes += fs::metadata(&data).map(|m| m.blocks() * 512).unwrap_or(0);
            s.meta_bytes += fs::metadata(&meta).map(|m| m.len()).unwrap_or(0);
        }
        s
    }

    fn files(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(&self.root) else {
            return out;
        };
        for d in dirs.flatten() {
            let Ok(entries) = fs::read_dir(d.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "meta") {
                    out.push((p.clone(), p.with_extension("data")));
                }
            }
        }
        out
    }

    /// Bytes the cache holds on disk now.
    pub fn used(&self) -> u64 {
        let s = self.stats();
        s.bytes + s.meta_bytes
    }

    /// Deletes least recently used objects until the cache is under 90% of its cap.
    pub fn evict(&self) {
        let mut objects: Vec<(SystemTime, u64, PathBuf, PathBuf)> = self
            .files()
            .into_iter()
            .map(|(meta, data)| {
                let used = fs::metadata(&meta)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let bytes = fs::metadata(&data).map(|m| m.blocks() * 512).unwrap_or(0)
                    + fs::metadata(&meta).map(|m| m.len()).unwrap_or(0);
                (used, bytes, meta, data)
            })
            .collect();
        let mut total: u64 = objects.iter().map(|o| o.1).sum();
        if total <= self.max_size {
            return;
        }
        let target = self.max_size / 10 * 9;
        objects.sort_by_key(|o| o.0);
        for (_, bytes, meta, data) in objects {
            if total <= target {
                break;
            }
            // Meta first: a half-deleted object is a miss, never a wrong block.
            let _ = fs::remove_file(&meta);
            let _ = fs::remove_file(&data);
            total = total.saturating_sub(bytes);
        }
        self.writable.store(true, Ordering::Relaxed);
    }

    /// Removes every cached object.
    pub fn clear(&self) -> io::Result<u64> {
        let mut n = 0;
        for (meta, data) in self.files() {
            let _ = fs::remove_file(&meta);
            let _ = fs::remove_file(&data);
            n += 1;
        }
        Ok(n)
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub objects: u64,
    pub bytes: u64,
    pub meta_bytes: u64,
}

impl CachedObject {
    fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    fn header(&self, id: &ObjectId<'_>) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.size.to_le_bytes());
        h.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        h.push(0); // sealed flag, at offset 24
        h.extend_from_slice(id.text().as_bytes());
        h.truncate(HEADER as usize);
        h
    }

    fn header_ok(&self, id: &ObjectId<'_>) -> bool {
        let want = self.header(id);
        let Ok(f) = File::open(&self.meta) else {
            return false;
        };
        let mut got = vec![0u8; want.len()];
        if f.read_exact_at(&mut got, 0).is_err() {
            return false;
        }
        got[24] = 0;
        got == want
    }

    fn create(&self, id: &ObjectId<'_>) -> io::Result<()> {
        let dir = self.meta.parent().expect("objects live in a subdirectory");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // The data file first, at its full (sparse) size; then the meta file, published by
        // link(2) so that concurrent creators agree on one.
        let data = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.data)?;
        if data.metadata()?.len() != self.size {
            data.set_len(self.size)?;
        }
        let tmp = self
            .meta
            .with_extension(format!("meta.{}", std::process::id()));
        let result = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all_at(&self.header(id), 0)?;
            f.set_len(HEADER + self.blocks() * ENTRY)?;
            match fs::hard_link(&tmp, &self.meta) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if self.header_ok(id) {
                        Ok(())
                    } else {
                        // A broken leftover (crash while creating, or a hash clash): replace it.
                        fs::rename(&tmp, &self.meta)
                    }
                }
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn entry(&self, index: u64) -> Option<(u32, u64)> {
        let f = File::open(&self.meta).ok()?;
        let mut e = [0u8; ENTRY as usize];
        f.read_exact_at(&mut e, HEADER + index * ENTRY).ok()?;
        let check = u32::from_le_bytes(e[0..4].try_into().ok()?);
        let len = u32::from_le_bytes(e[4..8].try_into().ok()?);
        let sum = u64::from_le_bytes(e[8..16].try_into().ok()?);
        (len != 0 && check == entry_check(index, len, sum)).then_some((len, sum))
    }

    fn expected_len(&self, index: u64) -> u64 {
        (self.size - index * BLOCK_SIZE).min(BLOCK_SIZE)
    }

    fn read_block(&self, index: u64) -> Option<Bytes> {
        if index >= self.blocks() {
            return None;
        }
        let (len, sum) = self.entry(index)?;
        if len as u64 != self.expected_len(index) {
            return None;
        }
        let f = File::open(&self.data).ok()?;
        let mut buf = vec![0u8; len as usize];
        let ok = f.read_exact_at(&mut buf, index * BLOCK_SIZE).is_ok() && xxh3_64(&buf) == sum;
        if !ok {
            tracing::warn!(path = %self.data.display(), index, "cached block failed its checksum; fetching it again");
            self.clear_entry(index);
            return None;
        }
        Some(Bytes::from(buf))
    }

    fn clear_entry(&self, index: u64) {
        if let Ok(f) = OpenOptions::new().write(true).open(&self.meta) {
            let _ = f.write_all_at(&[0u8; ENTRY as usize], HEADER + index * ENTRY);
            let _ = f.write_all_at(&[0], 24);
        }
    }

    fn write_block(&self, index: u64, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 != self.expected_len(index) {
            return Ok(()); // not a whole block: never cache partial blocks
        }
        let f = OpenOptions::new().write(true).open(&self.data)?;
        f.write_all_at(data, index * BLOCK_SIZE)?;
        let sum = xxh3_64(data);
        let len = data.len() as u32;
        let mut e = [0u8; ENTRY as usize];
        e[0..4].copy_from_slice(&entry_check(index, len, sum).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        e[8..16].copy_from_slice(&sum.to_le_bytes());
        let m = OpenOptions::new().write(true).open(&self.meta)?;
        m.write_all_at(&e, HEADER + index * ENTRY)
    }

    /// The data file if every block is present; verified in full the first time (then sealed,
    /// and later opens only check the file's size).
    fn sealed_file(&self, cache: &DiskCache) -> Option<File> {
        let meta = File::open(&self.meta).ok()?;
        let mut flag = [0u8; 1];
        meta.read_exact_at(&mut flag, 24).ok()?;
        let data = File::open(&self.data).ok()?;
        if data.metadata().ok()?.len() != self.size {
            return None;
        }
        if flag[0] == 1 {
            return Some(data);
        }
        for index in 0..self.blocks() {
            let (len, sum) = self.entry(index)?;
            if len as u64 != self.expected_len(index) {
                return None;
            }
            let mut buf = vec![0u8; len as usize];
            if data.read_exact_at(&mut buf, index * BLOCK_SIZE).is_err() || xxh3_64(&buf) != sum {
                self.clear_entry(index);
                return None;
            }
        }
        if cache.writable.load(Ordering::Relaxed)
            && let Ok(m) = OpenOptions::new().write(true).open(&self.meta)
        {
            let _ = m.write_all_at(&[1], 24);
        }
        Some(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(index: u64) -> BlockKey {
        BlockKey {
            store: Arc::from("mem://b"),
            key: Arc::from("k"),
            version: Arc::from("v1"),
            index,
        }
    }

    #[test]
    fn blocks_round_trip_and_bad_blocks_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = BLOCK_SIZE + 10;
        let b0 = vec![7u8; BLOCK_SIZE as usize];
        assert!(c.get(&key(0), size).is_none());
        c.put(&key(0), size, &b0);
        c.put(&key(1), size, &[1u8; 10]);
        assert_eq!(c.get(&key(0), size).unwrap(), b0);
        assert_eq!(&c.get(&key(1), size).unwrap()[..], &[1u8; 10]);
        // Another version of the object is another object.
        let mut other = key(0);
        other.version = Arc::from("v2");
        assert!(c.get(&other, size).is_none());
        // Corrupt the data: a miss, not wrong bytes.
        let (data, _) = c.paths(&ObjectId::of(&key(0)));
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(b"x", 5).unwrap();
        assert!(c.get(&key(0), size).is_none());
        // Truncate the data file: a miss.
        f.set_len(3).unwrap();
        assert!(c.get(&key(1), size).is_none());
    }

    #[test]
    fn layout_of_another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DiskCache::open(dir.path(), 1 << 30).unwrap();
        fs::write(dir.path().join("cache/LAYOUT"), "bucketfs-cache 2\n").unwrap();
        let err = DiskCache::open(dir.path(), 1 << 30).err().unwrap();
        assert!(err.to_string().contains("layout"), "{err}");
        let mode = fs::metadata(dir.path().join("cache")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn claims_exclude_each_other_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 4 * BLOCK_SIZE;
        let first = c.claim(&key(2), size).unwrap();
        assert!(matches!(first, Claim::Mine(_)));
        assert!(matches!(c.claim(&key(2), size).unwrap(), Claim::Theirs));
        assert!(matches!(c.claim(&key(3), size).unwrap(), Claim::Mine(_)));
        drop(first);
        assert!(matches!(c.claim(&key(2), size).unwrap(), Claim::Mine(_)));
    }

    #[test]
    fn eviction_keeps_the_cap_and_spares_recent_objects() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 5 * BLOCK_SIZE).unwrap();
        let block = vec![3u8; BLOCK_SIZE as usize];
        for obj in 0..4u64 {
            let mut k = key(0);
            k.key = Arc::from(format!("o{obj}"));
            for i in 0..2 {
                k.index = i;
                c.put(&k, 2 * BLOCK_SIZE, &block);
            }
            // Distinct access times, oldest first.
            std::thread::sleep(std::time::Duration::from_millis(20));
            c.touch(&ObjectId::of(&k));
        }
        c.evict();
        assert!(c.used() <= 5 * BLOCK_SIZE, "used {}", c.used());
        let mut newest = key(1);
        newest.key = Arc::from("o3");
        assert!(
            c.get(&newest, 2 * BLOCK_SIZE).is_some(),
            "the most recent object stays"
        );
        let mut oldest = key(1);
        oldest.key = Arc::from("o0");
        assert!(
            c.get(&oldest, 2 * BLOCK_SIZE).is_none(),
            "the oldest goes first"
        );
    }

    #[test]
    fn complete_objects_are_sealed_for_passthrough() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 2 * BLOCK_SIZE;
        let id_key = key(0);
        let id = ObjectId::of(&id_key);
        c.put(&key(0), size, &vec![1u8; BLOCK_SIZE as usize]);
        assert!(c.complete_file(&id, size).is_none(), "one block missing");
        c.put(&key(1), size, &vec![2u8; BLOCK_SIZE as usize]);
        let f = c.complete_file(&id, size).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
    }
}
