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
//! ## Seals: handing a file to the kernel unverified
//! FUSE passthrough lets the kernel read a fully cached object's data file itself, so those reads
//! are never checksummed. A data file is handed over only if it is provably the bytes that were
//! verified:
//! - the first time an object is found complete, every block is verified, the data file is made
//!   read-only (0400) and durable (`fdatasync`: a node crash cannot leave a sealed file of
//!   holes), and only then is the *seal* written into the meta file: the data file's identity as
//!   `fstat` reports it on the open descriptor (device, inode, size, mtime, ctime);
//! - every later open `fstat`s the very descriptor it hands to the kernel and compares it with
//!   the seal. Any change through the filesystem (a write in place, a truncate, a punched hole,
//!   another file renamed over it, a `touch`) moves ctime, the inode or the size, so a mismatch
//!   means "verify every block again": bad blocks are dropped and fetched again, and the file is
//!   sealed anew once it is whole. (ctime cannot be set by a user; kernels since 6.13 give a
//!   change right after an `fstat` a fine-grained ctime, so even a change within the same clock
//!   tick shows.)
//!
//! ## Many processes, no lock server
//! Filling a block takes an OFD write lock on its byte range of the data file (`F_OFD_SETLK`).
//! Whoever gets the lock re-checks the entry and fetches; the others wait for the range lock to
//! go and then find the block filled: the bucket is asked once per block per node. The kernel
//! drops a dead process's locks, so a crashed filler leaves the block to the next waiter.
//!
//! A process holds **one descriptor per object it is filling**, shared by all its claims on that
//! object (not one per claimed block), for as long as any claim on it is held (the
//! `bucketfs_cache_files_open` gauge). OFD locks of one open file description do not exclude
//! each other, so claims inside the process are kept apart by a table of the blocks it is
//! filling. Other descriptors are short-lived: the lookup of a fetch's blocks opens the meta and
//! data files once for all of them (a cold read looks up every block of a file, and opening the
//! files per block cost more syscalls than the fill itself) and closes them before it returns;
//! a wait on another process opens a probe of the data file. So a streaming handle, whatever the number of blocks its parallel GETs claim, holds at
//! most 1 + 3 x (fetches in flight, at most `--read-concurrency` + a few demand reads)
//! descriptors of the cache at once, and 1 while its GETs run. The disk writer adds the two
//! files of the object it is writing ([`BlockWriter`]), kept open from one block to the next
//! and closed when it has nothing to write.
//!
//! A waiter never waits without end: a claim still held after [`CLAIM_WAIT`] (its holder is
//! stopped, or stuck on a dead connection) is *taken over*: the waiter fetches the block and
//! writes it without the lock. That is safe because every filler of one object version writes
//! the same bytes, data before entry.
//!
//! ## Size cap and eviction
//! Each process measures the cache (allocated bytes of data files) after it fills and evicts
//! whole objects, least recently used first (a meta file's mtime is touched when a handle opens
//! it), down to 90% of `--cache-max-size`. Eviction unlinks files: a reader with them open keeps
//! reading its (now anonymous) files and is never cut off or handed other bytes.
//!
//! ## Full disks
//! A write that fails (disk full, read-only, permissions) turns the tier's writes off with one
//! warning; reads go on from the bucket and the blocks already cached. Writes are tried again
//! after a backoff (1 s, doubling with each failed retry up to a minute; writes that were already
//! under way when the pause began and fail too count as the same failure), so a disk that was
//! freed is used again; the `bucketfs_cache_disk_writable` gauge and
//! `bucketfs_cache_write_errors_total` show it. When
//! the filesystem is full (`ENOSPC`, `EDQUOT`) even below `--cache-max-size` — other data filled
//! it — the process first evicts its least recently used objects to make room.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use super::{BLOCK_SIZE, BlockKey};
use crate::metrics;

const LAYOUT: &str = "bucketfs-cache 1\n";
const MAGIC: &[u8; 8] = b"BFSCACHE";
/// Meta header: magic, object size, block size, a byte left from the first seal format, the
/// identity text, and the seal in the last [`SEAL`] bytes.
const HEADER: u64 = 4096;
const ENTRY: u64 = 16;
/// The seal: the data file's identity (7 x 8 bytes) and a check of it.
const SEAL: u64 = 64;
/// Bytes written between two eviction checks of this process.
const EVICT_EVERY: u64 = 64 << 20;
/// How long a reader waits for another process's claim on a block before taking it over. A
/// healthy filler holds a claim for one ranged GET (well under a second on a node's network, a
/// few seconds with retries); 10 s is past that, and short next to what a stalled model load
/// costs.
pub const CLAIM_WAIT: Duration = Duration::from_secs(10);
/// First and longest pause of the disk tier's writes after a write error.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

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

/// A file as `fstat` sees it: what any change to it through the filesystem moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of the open file `f` (`fstat` on its descriptor, not a path lookup).
    pub fn of(f: &File) -> io::Result<FileIdentity> {
        let m = f.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    fn encode(&self) -> [u8; SEAL as usize] {
        let mut b = [0u8; SEAL as usize];
        let fields = [
            self.dev,
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let check = xxh3_64(&b[..56]);
        b[56..].copy_from_slice(&check.to_le_bytes());
        b
    }

    fn decode(b: &[u8; SEAL as usize]) -> Option<FileIdentity> {
        let check = u64::from_le_bytes(b[56..].try_into().ok()?);
        if check != xxh3_64(&b[..56]) || b.iter().all(|&x| x == 0) {
            return None;
        }
        let f = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Some(FileIdentity {
            dev: f(0),
            ino: f(1),
            size: f(2),
            mtime: (f(3) as i64, f(4) as i64),
            ctime: (f(5) as i64, f(6) as i64),
        })
    }
}

/// The data file of a complete object, checked against its seal on this very descriptor.
#[derive(Debug)]
pub struct SealedFile {
    pub file: File,
    /// What the file was when it was handed out (see the module docs).
    pub identity: FileIdentity,
}

#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    max_size: u64,
    writes: Mutex<WriteState>,
    written_since_check: AtomicU64,
    claims: Arc<ClaimTable>,
}

/// Whether the tier's writes are on, and when to try again if not.
#[derive(Debug)]
struct WriteState {
    /// Writes are off until then (after a write error).
    off_until: Option<Instant>,
    /// The next pause if the retry fails too.
    backoff: Duration,
}

/// The claims of this process: which blocks it is filling, and the one descriptor per object
/// that holds their range locks.
#[derive(Debug, Default)]
struct ClaimTable {
    filling: Mutex<HashSet<(PathBuf, u64)>>,
    files: Mutex<HashMap<PathBuf, Weak<ClaimFile>>>,
}

/// An open data file holding this process's range locks on it; counted in
/// `bucketfs_cache_files_open`.
#[derive(Debug)]
struct ClaimFile(File);

impl Drop for ClaimFile {
    fn drop(&mut self) {
        metrics::cache_file_closed();
    }
}

/// Writes blocks, keeping the files of the object it wrote last open: the disk writer writes a
/// file's blocks one after another, and checking the object's header and opening its two files
/// again for each block cost three opens and a read of the header per 1 MiB written.
///
/// Files kept open are checked before each block: if either was unlinked since (evicted,
/// cleared, or a broken meta file replaced), the object is opened again, so blocks are not
/// written into files no one else sees. Whatever happens to the files in between, a block is
/// still written data first, entry last, and verified by every reader. The owner closes the
/// files when it has nothing to write ([`BlockWriter::close`]): an evicted object's disk space
/// is freed only once no one holds its files.
pub struct BlockWriter<'a> {
    disk: &'a DiskCache,
    open: Option<OpenObject>,
}

/// The files of one object version, open for writing its blocks.
struct OpenObject {
    block: BlockKey,
    obj: CachedObject,
    data: File,
    meta: File,
}

impl OpenObject {
    fn of(&self, key: &BlockKey, size: u64) -> bool {
        self.obj.size == size
            && self.block.key == key.key
            && self.block.version == key.version
            && self.block.store == key.store
    }

    /// Neither file was unlinked since it was opened.
    fn linked(&self) -> bool {
        [&self.meta, &self.data]
            .iter()
            .all(|f| f.metadata().is_ok_and(|m| m.nlink() > 0))
    }
}

impl BlockWriter<'_> {
    /// Stores a block (the caller holds its claim), as [`DiskCache::put`].
    pub fn put(&mut self, key: &BlockKey, size: u64, data: &[u8]) {
        let disk = self.disk;
        if !disk.writable() {
            self.open = None;
            return;
        }
        if !self
            .open
            .as_ref()
            .is_some_and(|o| o.of(key, size) && o.linked())
        {
            self.open = None;
            let Some(obj) = disk.object(&ObjectId::of(key), size, true) else {
                return;
            };
            let write = || OpenOptions::new().write(true).clone();
            match write()
                .open(&obj.data)
                .and_then(|d| Ok((d, write().open(&obj.meta)?)))
            {
                Ok((data, meta)) => {
                    self.open = Some(OpenObject {
                        block: key.clone(),
                        obj,
                        data,
                        meta,
                    })
                }
                Err(e) => {
                    disk.write_failed(&e, &obj.meta);
                    return;
                }
            }
        }
        let Some(o) = &self.open else {
            return;
        };
        if let Err(e) = o.obj.write_block(&o.data, &o.meta, key.index, data) {
            disk.write_failed(&e, &o.obj.meta);
            self.open = None;
            return;
        }
        disk.write_ok();
        let n = disk
            .written_since_check
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if n + data.len() as u64 >= EVICT_EVERY {
            disk.written_since_check.store(0, Ordering::Relaxed);
            disk.evict();
        }
    }

    /// Closes the files kept open.
    pub fn close(&mut self) {
        self.open = None;
    }
}

/// What [`DiskCache::look_up`] found for one block.
pub enum Found {
    /// The block, verified.
    Block(Bytes),
    /// Not cached; claimed for filling, by this caller or by another.
    Claim(Claim),
    /// Not cached, and not to be filled (writes are off or failed).
    Nothing,
}

/// A claim on filling one block.
pub enum Claim {
    /// This caller fills the block; the claim is held until the guard drops.
    Mine(FillGuard),
    /// Another process or handle is filling it; [`DiskCache::wait`] until it is done.
    Theirs,
}

/// A claim on a block being filled: the range lock (none for a claim taken over from a stalled
/// filler) and the entry in this process's claim table.
#[derive(Debug)]
pub struct FillGuard {
    claims: Arc<ClaimTable>,
    block: (PathBuf, u64),
    /// The block's entry in the claim table is this guard's (a takeover may find it listed).
    listed: bool,
    locked: Option<Arc<ClaimFile>>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if let Some(f) = &self.locked {
            let start = self.block.1 * BLOCK_SIZE;
            let _ = ofd_lock(&f.0, libc::F_UNLCK, libc::F_OFD_SETLK, start, BLOCK_SIZE);
        }
        if self.listed {
            self.claims.filling.lock().unwrap().remove(&self.block);
        }
    }
}

/// `fcntl` with an OFD lock of type `kind` on `start..start+len`: `Ok(true)` when set (for
/// `F_OFD_GETLK`: when no other description holds a conflicting lock).
fn ofd_lock(file: &File, kind: i32, cmd: i32, start: u64, len: u64) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{FcntlArg, fcntl};
    let mut fl = libc::flock {
        l_type: kind as _,
        l_whence: libc::SEEK_SET as _,
        l_start: start as _,
        l_len: len as _,
        l_pid: 0,
    };
    loop {
        let arg = if cmd == libc::F_OFD_GETLK {
            FcntlArg::F_OFD_GETLK(&mut fl)
        } else {
            FcntlArg::F_OFD_SETLK(&fl)
        };
        match fcntl(file, arg) {
            Ok(_) => {
                return Ok(cmd != libc::F_OFD_GETLK || fl.l_type == libc::F_UNLCK as libc::c_short);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN | Errno::EACCES) => return Ok(false),
            Err(e) => return Err(e.into()),
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

/// A block's (length, checksum) from its meta entry, if the entry is whole and valid.
fn parse_entry(index: u64, e: &[u8]) -> Option<(u32, u64)> {
    let check = u32::from_le_bytes(e[0..4].try_into().ok()?);
    let len = u32::from_le_bytes(e[4..8].try_into().ok()?);
    let sum = u64::from_le_bytes(e[8..16].try_into().ok()?);
    (len != 0 && check == entry_check(index, len, sum)).then_some((len, sum))
}

/// Whether `e` says the filesystem (or the user's quota) is full.
fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
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
        metrics::cache_disk_writable(true);
        Ok(DiskCache {
            root,
            max_size,
            writes: Mutex::new(WriteState {
                off_until: None,
                backoff: BACKOFF_FIRST,
            }),
            written_since_check: AtomicU64::new(0),
            claims: Arc::default(),
        })
    }

    fn paths(&self, id: &ObjectId<'_>) -> (PathBuf, PathBuf) {
        let h = id.hash();
        let dir = self.root.join(&h[..2]);
        (dir.join(format!("{h}.data")), dir.join(format!("{h}.meta")))
    }

    /// Whether writes are on (or due to be tried again after an error).
    fn writable(&self) -> bool {
        let w = self.writes.lock().unwrap();
        w.off_until.is_none_or(|t| Instant::now() >= t)
    }

    /// How long until writes are tried again after an error (zero if they are on).
    pub fn writes_resume_in(&self) -> Duration {
        let w = self.writes.lock().unwrap();
        w.off_until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }

    /// The cached object for `id` of `size` bytes, creating its files if `create`.
    pub fn object(&self, id: &ObjectId<'_>, size: u64, create: bool) -> Option<CachedObject> {
        let (data, meta) = self.paths(id);
        let obj = CachedObject { data, meta, size };
        if obj.header_ok(id) {
            return Some(obj);
        }
        if !create || !self.writable() {
            return None;
        }
        match obj.create(id) {
            Ok(()) => {
                self.write_ok();
                Some(obj)
            }
            Err(e) => {
                self.write_failed(&e, &obj.meta);
                None
            }
        }
    }

    /// A write worked: if writes were off, they are on again.
    fn write_ok(&self) {
        let mut w = self.writes.lock().unwrap();
        if w.off_until.take().is_some() {
            w.backoff = BACKOFF_FIRST;
            metrics::cache_disk_writable(true);
            tracing::info!(dir = %self.root.display(), "the disk cache can be written again");
        }
    }

    /// A write failed: on a full filesystem make room first; writes pause for a growing backoff.
    /// `current` is the meta file of the object being written, which is not evicted for it.
    fn write_failed(&self, e: &io::Error, current: &Path) {
        metrics::cache_write_error();
        let mut w = self.writes.lock().unwrap();
        if w.off_until.is_some_and(|t| Instant::now() < t) {
            // Begun before the pause: one more report of the same failure, not a failed retry.
            // A burst of them neither stretches the pause to its maximum at once nor evicts
            // again for each.
            return;
        }
        let first = w.off_until.is_none();
        let pause = w.backoff;
        w.backoff = (w.backoff * 2).min(BACKOFF_MAX);
        w.off_until = Some(Instant::now() + pause);
        drop(w);
        metrics::cache_disk_writable(false);
        if is_full(e) {
            let freed = self.evict_to_make_room(current);
            tracing::debug!(
                freed,
                "disk cache filesystem full; evicted least recently used objects"
            );
        }
        if first {
            tracing::warn!(
                dir = %self.root.display(),
                error = %e,
                "the disk cache cannot be written; reading on without caching new blocks, trying again later"
            );
        } else {
            tracing::debug!(error = %e, retry_in = ?pause, "the disk cache still cannot be written");
        }
    }

    /// A valid cached block, or `None` (a bad block is removed so it is fetched again).
    pub fn get(&self, key: &BlockKey, size: u64) -> Option<Bytes> {
        let obj = self.object(&ObjectId::of(key), size, false)?;
        obj.read_block(key.index)
    }

    /// The descriptor this process fills `data` through, shared by its claims on it.
    fn claim_file(&self, data: &Path) -> Option<Arc<ClaimFile>> {
        let mut files = self.claims.files.lock().unwrap();
        if let Some(f) = files.get(data).and_then(Weak::upgrade) {
            return Some(f);
        }
        files.retain(|_, w| w.strong_count() > 0);
        let file = OpenOptions::new().read(true).write(true).open(data).ok()?;
        metrics::cache_file_opened();
        let f = Arc::new(ClaimFile(file));
        files.insert(data.to_path_buf(), Arc::downgrade(&f));
        Some(f)
    }

    /// Claims block `index` for filling (see the module docs).
    pub fn claim(&self, key: &BlockKey, size: u64) -> Option<Claim> {
        if !self.writable() {
            return None;
        }
        let obj = self.object(&ObjectId::of(key), size, true)?;
        self.claim_in(&obj, key.index)
    }

    /// Looks up blocks of one object version (every key in `keys` is of it) as [`Self::get`],
    /// then [`Self::claim`] and `get` again (filled between the look and the claim?) do for
    /// each, with the object's header checked and its files opened once for all of them, not
    /// once per block: a cold read asks for every block of a file.
    ///
    /// It stops after the first block that another filler holds (the answer is shorter than
    /// `keys` then): claims are taken in block order, and a caller waiting for one block must
    /// hold no claim on the blocks after it, or two fetches of overlapping ranges could each
    /// wait for a block the other holds until the claim wait runs out.
    pub fn look_up(&self, keys: &[BlockKey], size: u64) -> Vec<Found> {
        let Some(first) = keys.first() else {
            return Vec::new();
        };
        let id = ObjectId::of(first);
        let mut obj = self.object(&id, size, false);
        let mut meta = obj.as_ref().and_then(|o| File::open(&o.meta).ok());
        let data = OnceCell::new();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            debug_assert!(
                k.key == first.key && k.version == first.version && k.store == first.store
            );
            let read = |obj: &Option<CachedObject>, meta: &Option<File>| match (obj, meta) {
                (Some(o), Some(m)) => o.read_block_in(m, &data, k.index),
                _ => None,
            };
            if let Some(b) = read(&obj, &meta) {
                out.push(Found::Block(b));
                continue;
            }
            if !self.writable() {
                out.push(Found::Nothing);
                continue;
            }
            if obj.is_none() {
                obj = self.object(&id, size, true);
                meta = obj.as_ref().and_then(|o| File::open(&o.meta).ok());
            }
            let found = match obj.as_ref().and_then(|o| self.claim_in(o, k.index)) {
                Some(Claim::Mine(guard)) => match read(&obj, &meta) {
                    Some(b) => Found::Block(b),
                    None => Found::Claim(Claim::Mine(guard)),
                },
                Some(Claim::Theirs) => Found::Claim(Claim::Theirs),
                None => Found::Nothing,
            };
            let theirs = matches!(found, Found::Claim(Claim::Theirs));
            out.push(found);
            if theirs {
                break;
            }
        }
        out
    }

    /// [`Self::claim`] of block `index` of `obj`, whose header was checked.
    fn claim_in(&self, obj: &CachedObject, index: u64) -> Option<Claim> {
        let block = (obj.data.clone(), index);
        if !self.claims.filling.lock().unwrap().insert(block.clone()) {
            return Some(Claim::Theirs); // another handle of this process fills it
        }
        let mut guard = FillGuard {
            claims: self.claims.clone(),
            block,
            listed: true,
            locked: None,
        };
        let file = self.claim_file(&obj.data)?;
        let start = index * BLOCK_SIZE;
        match ofd_lock(&file.0, libc::F_WRLCK, libc::F_OFD_SETLK, start, BLOCK_SIZE) {
            Ok(true) => {
                guard.locked = Some(file);
                Some(Claim::Mine(guard))
            }
            Ok(false) => Some(Claim::Theirs),
            Err(_) => None,
        }
    }

    /// Waits until whoever fills block `index` is done (or died), or until `deadline`; the
    /// caller then looks again. Returns `false` if the claim was still held at the deadline.
    pub fn wait(&self, key: &BlockKey, size: u64, deadline: Instant) -> bool {
        let sleep = |d| {
            std::thread::sleep(d);
            false
        };
        self.wait_or(key, size, deadline, &sleep)
    }

    /// [`Self::wait`], with `pause(d)` in place of each sleep of `d` between two looks at the
    /// claim: it returns `true` (and this with it) as soon as the caller has what it waits for
    /// another way. A block another fetch of this process is filling is in memory as soon as
    /// that fetch has it, long before it is on disk and the claim goes.
    pub fn wait_or(
        &self,
        key: &BlockKey,
        size: u64,
        deadline: Instant,
        pause: &dyn Fn(Duration) -> bool,
    ) -> bool {
        let Some(obj) = self.object(&ObjectId::of(key), size, false) else {
            return true;
        };
        let block = (obj.data.clone(), key.index);
        let Ok(probe) = OpenOptions::new().read(true).write(true).open(&obj.data) else {
            return true;
        };
        let start = key.index * BLOCK_SIZE;
        let mut step = Duration::from_millis(1);
        loop {
            let ours = self.claims.filling.lock().unwrap().contains(&block);
            // GETLK on a description of our own reports other processes' locks only.
            let theirs = !ours
                && !ofd_lock(&probe, libc::F_WRLCK, libc::F_OFD_GETLK, start, BLOCK_SIZE)
                    .unwrap_or(true);
            if !ours && !theirs {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if pause(step.min(deadline - now)) {
                return true;
            }
            step = (step * 2).min(Duration::from_millis(20));
        }
    }

    /// Takes over the claim on a block whose filler stalled past [`CLAIM_WAIT`] (see the module
    /// docs): the caller fills it without the range lock.
    pub fn take_over(&self, key: &BlockKey, size: u64) -> Option<FillGuard> {
        let obj = self.object(&ObjectId::of(key), size, false)?;
        let block = (obj.data.clone(), key.index);
        let listed = self.claims.filling.lock().unwrap().insert(block.clone());
        Some(FillGuard {
            claims: self.claims.clone(),
            block,
            listed,
            locked: None,
        })
    }

    /// Stores a block (the caller holds its claim).
    pub fn put(&self, key: &BlockKey, size: u64, data: &[u8]) {
        self.writer().put(key, size, data);
    }

    /// A writer of blocks that keeps the files of the object it wrote last open for the next
    /// block of it (see [`BlockWriter`]).
    pub fn writer(&self) -> BlockWriter<'_> {
        BlockWriter {
            disk: self,
            open: None,
        }
    }

    /// Records a use of the object (for LRU eviction).
    pub fn touch(&self, id: &ObjectId<'_>) {
        let (_, meta) = self.paths(id);
        if let Ok(f) = File::options().write(true).open(meta) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// The data file of a fully cached object, provably the bytes that were verified (for
    /// kernel passthrough), or `None`. See "Seals" in the module docs.
    pub fn complete_file(&self, id: &ObjectId<'_>, size: u64) -> Option<SealedFile> {
        let obj = self.object(id, size, false)?;
        obj.sealed_file()
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

    /// Objects, least recently used first: (bytes on disk, meta, data).
    fn by_age(&self) -> Vec<(u64, PathBuf, PathBuf)> {
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
        objects.sort_by_key(|o| o.0);
        objects.into_iter().map(|(_, b, m, d)| (b, m, d)).collect()
    }

    /// Deletes an object's files: meta first, so a half-deleted object is a miss, never a wrong
    /// block. Readers with the files open (and the kernel, for a passthrough handle) keep
    /// reading them.
    fn remove(meta: &Path, data: &Path) {
        let _ = fs::remove_file(meta);
        let _ = fs::remove_file(data);
    }

    /// Deletes least recently used objects until the cache is under 90% of its cap.
    pub fn evict(&self) {
        let objects = self.by_age();
        let mut total: u64 = objects.iter().map(|o| o.0).sum();
        if total <= self.max_size {
            return;
        }
        let target = self.max_size / 10 * 9;
        for (bytes, meta, data) in objects {
            if total <= target {
                break;
            }
            Self::remove(&meta, &data);
            total = total.saturating_sub(bytes);
        }
    }

    /// On a full filesystem: deletes least recently used objects (not `current`) until a tenth
    /// of what the cache holds, and at least [`EVICT_EVERY`], is free again. Returns bytes freed.
    fn evict_to_make_room(&self, current: &Path) -> u64 {
        let objects = self.by_age();
        let total: u64 = objects.iter().map(|o| o.0).sum();
        let want = (total / 10).max(EVICT_EVERY);
        let mut freed = 0;
        for (bytes, meta, data) in objects {
            if freed >= want {
                break;
            }
            if meta == current {
                continue;
            }
            Self::remove(&meta, &data);
            freed += bytes;
        }
        freed
    }

    /// Removes every cached object.
    pub fn clear(&self) -> io::Result<u64> {
        let mut n = 0;
        for (meta, data) in self.files() {
            Self::remove(&meta, &data);
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
        h.push(0); // unused since seals record the file's identity, at offset 24
        h.extend_from_slice(id.text().as_bytes());
        h.truncate((HEADER - SEAL) as usize);
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
        // A name of this call's own: fills of one object start together (a warm's parallel
        // parts, a mount's prefetch), and two creators sharing one temporary file unlink it under
        // each other (`ENOENT`, which paused the tier's writes) or truncate the published meta.
        static CREATES: AtomicU64 = AtomicU64::new(0);
        let tmp = self.meta.with_extension(format!(
            "meta.{}.{}",
            std::process::id(),
            CREATES.fetch_add(1, Ordering::Relaxed)
        ));
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

    fn entry(&self, meta: &File, index: u64) -> Option<(u32, u64)> {
        let mut e = [0u8; ENTRY as usize];
        meta.read_exact_at(&mut e, HEADER + index * ENTRY).ok()?;
        parse_entry(index, &e)
    }

    fn expected_len(&self, index: u64) -> u64 {
        (self.size - index * BLOCK_SIZE).min(BLOCK_SIZE)
    }

    fn read_block(&self, index: u64) -> Option<Bytes> {
        let meta = File::open(&self.meta).ok()?;
        self.read_block_in(&meta, &OnceCell::new(), index)
    }

    /// [`Self::read_block`] with the object's files open: `meta`, and `data` opened at the first
    /// block that needs it (kept for the next ones).
    fn read_block_in(
        &self,
        meta: &File,
        data: &OnceCell<Option<File>>,
        index: u64,
    ) -> Option<Bytes> {
        if index >= self.blocks() {
            return None;
        }
        let (len, sum) = self.entry(meta, index)?;
        if len as u64 != self.expected_len(index) {
            return None;
        }
        let f = data.get_or_init(|| File::open(&self.data).ok()).as_ref()?;
        let mut buf = vec![0u8; len as usize];
        let ok = f.read_exact_at(&mut buf, index * BLOCK_SIZE).is_ok() && xxh3_64(&buf) == sum;
        if !ok {
            tracing::warn!(path = %self.data.display(), index, "cached block failed its checksum; fetching it again");
            self.clear_entry(index);
            return None;
        }
        Some(Bytes::from(buf))
    }

    /// Drops a bad block's entry, and the seal with it (the file is no longer whole).
    fn clear_entry(&self, index: u64) {
        if let Ok(f) = OpenOptions::new().write(true).open(&self.meta) {
            let _ = f.write_all_at(&[0u8; SEAL as usize], HEADER - SEAL);
            let _ = f.write_all_at(&[0u8; ENTRY as usize], HEADER + index * ENTRY);
        }
        // Writable again, so the block can be filled again.
        let _ = fs::set_permissions(&self.data, fs::Permissions::from_mode(0o600));
    }

    /// Writes block `index` into the object's open files: its bytes, then its entry.
    fn write_block(&self, file: &File, meta: &File, index: u64, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 != self.expected_len(index) {
            return Ok(()); // not a whole block: never cache partial blocks
        }
        let at = index * BLOCK_SIZE;
        // Allocated for the whole block at once: written into a hole, the filesystem reserves
        // its space page by page (a quarter of the write's CPU on ext4). Where it cannot
        // (no `fallocate`), the write still allocates it; a full disk fails the write.
        let _ = nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            at as i64,
            data.len() as i64,
        );
        file.write_all_at(data, at)?;
        let sum = xxh3_64(data);
        let len = data.len() as u32;
        let mut e = [0u8; ENTRY as usize];
        e[0..4].copy_from_slice(&entry_check(index, len, sum).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        e[8..16].copy_from_slice(&sum.to_le_bytes());
        meta.write_all_at(&e, HEADER + index * ENTRY)
    }

    fn seal(&self, meta: &File) -> Option<FileIdentity> {
        let mut b = [0u8; SEAL as usize];
        meta.read_exact_at(&mut b, HEADER - SEAL).ok()?;
        FileIdentity::decode(&b)
    }

    /// The data file if every block is present and it is the file that was verified (see
    /// "Seals" in the module docs).
    fn sealed_file(&self) -> Option<SealedFile> {
        let meta = File::open(&self.meta).ok()?;
        let data = File::open(&self.data).ok()?;
        let identity = FileIdentity::of(&data).ok()?;
        if identity.size != self.size {
            return None;
        }
        if self.seal(&meta) == Some(identity) {
            return Some(SealedFile {
                file: data,
                identity,
            });
        }
        // Not sealed yet, or changed since: verify it all, on this descriptor. Every entry
        // first (one read of the meta file), so an incomplete object costs no data reads.
        let mut table = vec![0u8; (self.blocks() * ENTRY) as usize];
        meta.read_exact_at(&mut table, HEADER).ok()?;
        let mut entries = Vec::with_capacity(self.blocks() as usize);
        for (index, e) in table.chunks_exact(ENTRY as usize).enumerate() {
            let index = index as u64;
            let (len, sum) = parse_entry(index, e)?;
            if len as u64 != self.expected_len(index) {
                return None;
            }
            entries.push(sum);
        }
        // Read-only from now on (which moves ctime), then the identity the checks are of.
        let _ = data.set_permissions(fs::Permissions::from_mode(0o400));
        let before = FileIdentity::of(&data).ok()?;
        metrics::cache_verification();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (index, sum) in entries.into_iter().enumerate() {
            let index = index as u64;
            let buf = &mut buf[..self.expected_len(index) as usize];
            if data.read_exact_at(buf, index * BLOCK_SIZE).is_err() || xxh3_64(buf) != sum {
                tracing::warn!(path = %self.data.display(), index, "cached block failed its checksum; fetching it again");
                self.clear_entry(index);
                return None;
            }
        }
        // Durable before sealed; and nothing changed while we read.
        data.sync_data().ok()?;
        let identity = FileIdentity::of(&data).ok()?;
        if identity != before {
            return None;
        }
        if let Ok(m) = OpenOptions::new().write(true).open(&self.meta) {
            let _ = m.write_all_at(&identity.encode(), HEADER - SEAL);
        }
        Some(SealedFile {
            file: data,
            identity,
        })
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

    /// A batch lookup answers for each block what `get`, then `claim`, would: cached blocks
    /// (verified: a corrupt one is a miss, claimed for filling), claims of this caller, blocks
    /// another filler holds; and nothing to fill while writes are off.
    #[test]
    fn a_batch_lookup_finds_claims_and_waits_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 4 * BLOCK_SIZE;
        let keys: Vec<BlockKey> = (0..4).map(key).collect();
        // Nothing cached yet: every block is this caller's to fill.
        let all = c.look_up(&keys, size);
        assert!(
            all.iter()
                .all(|f| matches!(f, Found::Claim(Claim::Mine(_))))
        );
        drop(all);
        c.put(&key(0), size, &vec![1u8; BLOCK_SIZE as usize]);
        c.put(&key(1), size, &vec![2u8; BLOCK_SIZE as usize]);
        let (data, _) = c.paths(&ObjectId::of(&key(0)));
        OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .write_all_at(b"x", BLOCK_SIZE + 7)
            .unwrap();
        let held = c.claim(&key(3), size).unwrap();
        let found = c.look_up(&keys, size);
        assert!(matches!(&found[0], Found::Block(b) if b.iter().all(|&x| x == 1)));
        assert!(
            matches!(found[1], Found::Claim(Claim::Mine(_))),
            "corrupt: a miss"
        );
        assert!(matches!(found[2], Found::Claim(Claim::Mine(_))));
        assert!(matches!(found[3], Found::Claim(Claim::Theirs)), "held");
        drop((found, held));
        // Nothing claimed past a block another holds.
        let held = c.claim(&key(1), size).unwrap();
        let found = c.look_up(&keys, size);
        assert_eq!(found.len(), 2, "stops at the held block");
        assert!(matches!(found[1], Found::Claim(Claim::Theirs)));
        drop((found, held));
        c.writes.lock().unwrap().off_until = Some(Instant::now() + Duration::from_secs(60));
        let off = c.look_up(&keys, size);
        assert!(matches!(off[0], Found::Block(_)));
        assert!(off[1..].iter().all(|f| matches!(f, Found::Nothing)));
    }

    /// A writer keeps an object's files open from one block to the next, but never writes into
    /// files that are gone: removed under it (evicted, cleared), the object is created again and
    /// the next block lands where readers look.
    #[test]
    fn a_writer_follows_an_object_whose_files_were_removed() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 3 * BLOCK_SIZE;
        let block = |i: u64| vec![i as u8 + 1; BLOCK_SIZE as usize];
        let mut w = c.writer();
        w.put(&key(0), size, &block(0));
        w.put(&key(1), size, &block(1));
        assert_eq!(c.get(&key(0), size).unwrap(), block(0));
        assert_eq!(c.get(&key(1), size).unwrap(), block(1));
        assert_eq!(c.clear().unwrap(), 1);
        w.put(&key(2), size, &block(2));
        assert_eq!(c.get(&key(2), size).unwrap(), block(2), "in the new files");
        assert!(c.get(&key(0), size).is_none(), "removed with the old ones");
        // Another object in between, then the first again.
        let mut other = key(0);
        other.key = Arc::from("other");
        w.put(&other, size, &block(5));
        w.put(&key(0), size, &block(0));
        assert_eq!(c.get(&other, size).unwrap(), block(5));
        assert_eq!(c.get(&key(0), size).unwrap(), block(0));
        // Written blocks take their space on disk; the rest of the file stays a hole.
        let used = c.stats().bytes;
        assert!(
            (3 * BLOCK_SIZE..4 * BLOCK_SIZE).contains(&used),
            "two blocks of the first object and one of the other: {used} bytes on disk"
        );
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
        assert_eq!(f.file.metadata().unwrap().len(), size);
        let mode = f.file.metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o400, "read-only once sealed");
        let again = c.complete_file(&id, size).unwrap();
        assert_eq!(
            again.identity, f.identity,
            "a sealed file is handed out as it is"
        );
    }

    /// Any change to a sealed data file through the filesystem is caught before it is handed
    /// out: bad blocks are dropped, and the file is whole (and sealed) again once refilled.
    #[test]
    fn a_changed_sealed_file_is_verified_again() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 3 * BLOCK_SIZE;
        let id_key = key(0);
        let id = ObjectId::of(&id_key);
        let fill = |c: &DiskCache| {
            for i in 0..3 {
                c.put(&key(i), size, &vec![i as u8 + 1; BLOCK_SIZE as usize]);
            }
        };
        fill(&c);
        let sealed = c.complete_file(&id, size).unwrap().identity;
        let (data, _) = c.paths(&id);
        type Change = fn(&File);
        let changes: [(&str, Change); 3] = [
            ("overwrite", |f| {
                f.write_all_at(&[9u8; 16], BLOCK_SIZE + 100).unwrap()
            }),
            ("truncate", |f| f.set_len(BLOCK_SIZE).unwrap()),
            ("punch", |f| {
                use nix::fcntl::{FallocateFlags, fallocate};
                let flags =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                fallocate(f, flags, BLOCK_SIZE as i64, 4096).unwrap();
            }),
        ];
        for (what, change) in changes {
            let f = OpenOptions::new().write(true).open(&data).unwrap();
            change(&f);
            drop(f);
            assert!(
                c.complete_file(&id, size).is_none(),
                "{what}: not handed out"
            );
            assert!(
                c.get(&key(1), size).is_none(),
                "{what}: the block is a miss"
            );
            fill(&c);
            let again = c.complete_file(&id, size).expect("whole again");
            assert_ne!(again.identity, sealed, "{what}");
            let mut buf = vec![0u8; size as usize];
            again.file.read_exact_at(&mut buf, 0).unwrap();
            assert!(
                buf[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize]
                    .iter()
                    .all(|&b| b == 2)
            );
        }
    }

    /// Many fills of one object starting at once in one process (`bucketfs warm`'s parallel
    /// parts, a mount's prefetch) all find its files, and none of them turns the tier's writes
    /// off: its files are created once, whoever comes first.
    #[test]
    fn concurrent_first_fills_of_an_object_all_find_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let size = 64 * BLOCK_SIZE;
        let threads = 16;
        for round in 0..200 {
            let start = Arc::new(std::sync::Barrier::new(threads));
            let fills: Vec<_> = (0..threads as u64)
                .map(|i| {
                    let (c, start) = (c.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut k = key(i);
                        k.key = Arc::from(format!("o{round}"));
                        start.wait();
                        c.claim(&k, size)
                            .is_some_and(|c| matches!(c, Claim::Mine(_)))
                    })
                })
                .collect();
            for (i, f) in fills.into_iter().enumerate() {
                assert!(f.join().unwrap(), "round {round}: block {i} claimed");
            }
            assert!(c.writable(), "round {round}: writes stay on");
        }
        // And the blocks go to disk.
        let mut k = key(3);
        k.key = Arc::from("o7");
        c.put(&k, size, &vec![9u8; BLOCK_SIZE as usize]);
        assert!(c.get(&k, size).is_some());
    }

    /// Writes that were under way when the tier paused, failing one after another, are one
    /// failure: the pause is the first backoff, not the longest; a failed retry doubles it.
    #[test]
    fn a_burst_of_write_errors_pauses_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let e = io::Error::from_raw_os_error(libc::EIO);
        for _ in 0..16 {
            c.write_failed(&e, Path::new("m"));
        }
        assert!(!c.writable());
        assert!(c.writes_resume_in() <= BACKOFF_FIRST);
        c.writes.lock().unwrap().off_until = Some(Instant::now());
        c.write_failed(&e, Path::new("m"));
        assert!(
            c.writes_resume_in() > BACKOFF_FIRST,
            "a failed retry waits longer"
        );
    }

    #[test]
    fn another_descriptions_lock_is_seen_by_a_probe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![0u8; 8192]).unwrap();
        let rw = || OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let (holder, probe) = (rw(), rw());
        assert!(ofd_lock(&holder, libc::F_WRLCK, libc::F_OFD_SETLK, 0, 4096).unwrap());
        assert!(!ofd_lock(&probe, libc::F_WRLCK, libc::F_OFD_GETLK, 0, 4096).unwrap());
        assert!(ofd_lock(&probe, libc::F_WRLCK, libc::F_OFD_GETLK, 4096, 4096).unwrap());
        assert!(ofd_lock(&holder, libc::F_UNLCK, libc::F_OFD_SETLK, 0, 4096).unwrap());
        assert!(ofd_lock(&probe, libc::F_WRLCK, libc::F_OFD_GETLK, 0, 4096).unwrap());
    }

    #[test]
    fn a_stalled_claim_is_waited_for_boundedly_then_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let size = 2 * BLOCK_SIZE;
        let held = c.claim(&key(0), size).unwrap();
        assert!(matches!(held, Claim::Mine(_)));
        let start = Instant::now();
        let deadline = start + Duration::from_millis(200);
        assert!(
            !c.wait(&key(0), size, deadline),
            "still held at the deadline"
        );
        assert!(start.elapsed() >= Duration::from_millis(200));
        let taken = c.take_over(&key(0), size).unwrap();
        c.put(&key(0), size, &vec![5u8; BLOCK_SIZE as usize]);
        drop(taken);
        drop(held);
        assert!(c.wait(&key(0), size, Instant::now()), "released");
        assert!(c.get(&key(0), size).is_some());
    }
}
