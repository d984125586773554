//! The filesystem, free of FUSE: inodes, handles and the semantics of each operation.
//!
//! `fuse/` decodes kernel requests and calls these async methods; everything here can be tested
//! without a kernel. Inode numbers are assigned on first lookup of a (parent, name) pair and live
//! until the kernel forgets them (lookup counting), so a path keeps its number while in use; the
//! table of them is bounded in bytes (see `inodes`).
//!
//! LOCK ORDERING: `inodes` and `handles` are never held at the same time, and never across an
//! `.await`.

mod attr_ops;
mod error;
mod inodes;
mod lifecycle;
mod small_files;
mod write_ops;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

pub use attr_ops::{AttrChange, Caller};
pub use error::{FsError, FsResult};
pub use lifecycle::ShutdownReport;

use crate::cache::memory::MemoryCache;
use crate::cache::tiered::TieredCache;
use crate::memory::MemoryBudget;
use crate::meta::{Kind, Meta, Stat};
use crate::read::{ReadConfig, ReadContext, Reader};
use crate::store::{DynStore, Version};
use crate::write::{Journal, WriteConfig, WriteContext, WriteHandle};

pub const ROOT_INO: u64 = 1;

/// Settings of the filesystem view.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Key prefix of the mount root (`""` or ending with `/`).
    pub prefix: String,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// How long metadata (and the kernel's attribute and entry caches) may be reused.
    pub metadata_ttl: std::time::Duration,
    /// How long a path found absent is remembered as absent (`--negative-metadata-ttl`).
    pub negative_metadata_ttl: std::time::Duration,
    pub read_only: bool,
    pub read: ReadConfig,
    /// Staging and upload settings; `None` on a read-only mount.
    pub write: Option<WriteConfig>,
    /// The SOURCE URL, which names this mount's uploads in the crash journal.
    pub source: String,
    /// The node-shared disk tier (`--cache-dir`), if usable.
    pub disk_cache: Option<Arc<crate::cache::disk::DiskCache>>,
    /// Hand fully cached objects to the kernel (FUSE passthrough) when it allows.
    pub passthrough: bool,
    /// Write locks: where lock objects live (hidden from the listings of every mount) and, on a
    /// writable mount, whether and how writes take them.
    pub locks: crate::lock::LockConfig,
    /// Largest file fetched whole ahead of its open (`--small-file-prefetch`; 0: off).
    pub small_file_prefetch: u64,
    /// Largest listed file whose attributes are asked with a GET of its bytes where listings
    /// lack them (`--small-file-get`; 0: a HEAD).
    pub small_file_get: u64,
    /// Cap of the inode table in bytes (`--max-inode-memory`; see `inodes`).
    pub max_inode_bytes: u64,
}

/// Attributes of an inode, as the kernel sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    /// Permission bits (with set-user-ID, set-group-ID and sticky).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u32,
}

/// What an `open` or `create` asks for, from its flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// Open for writing (write access, `O_APPEND` or `O_TRUNC`).
    pub write: bool,
    /// `O_TRUNC`.
    pub truncate: bool,
    /// `O_APPEND`.
    pub append: bool,
    /// `O_EXCL` (meaningful with `create`).
    pub exclusive: bool,
}

impl OpenMode {
    pub const READ: OpenMode = OpenMode {
        write: false,
        truncate: false,
        append: false,
        exclusive: false,
    };

    pub fn from_flags(flags: i32) -> OpenMode {
        let truncate = flags & libc::O_TRUNC != 0;
        let append = flags & libc::O_APPEND != 0;
        OpenMode {
            write: flags & libc::O_ACCMODE != libc::O_RDONLY || truncate || append,
            truncate,
            append,
            exclusive: flags & libc::O_EXCL != 0,
        }
    }
}

/// One entry of `readdir`.
#[derive(Clone, Debug)]
pub struct DirEntryOut {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

/// What `open` hands back.
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    /// The kernel's page cache for this inode still holds this version's bytes.
    pub keep_cache: bool,
    /// The object is fully cached on local disk: this file holds exactly its bytes, verified,
    /// and the kernel may read it directly (FUSE passthrough).
    pub backing: Option<crate::cache::disk::SealedFile>,
    /// The object version a read handle is pinned to (empty for write handles).
    pub version: String,
}

use inodes::{InodeEdit, InodeTable};

/// Asks the kernel to drop the entries (parent inode, name) (see `inodes`).
pub type EntryDropper = Box<dyn Fn(Vec<(u64, Arc<str>)>) + Send + Sync>;

enum Handle {
    /// A reader, and its inode.
    Read(Arc<Reader>, u64),
    Write(Arc<WriteHandle>, u64),
    /// A listing paged in as the kernel reads it, and the directory's inode.
    Dir(Arc<tokio::sync::Mutex<crate::meta::DirStream>>, u64),
}

pub struct Fs {
    store: DynStore,
    meta: Arc<Meta>,
    read: Arc<ReadContext>,
    /// `None` on a read-only mount.
    write: Option<Arc<WriteContext>>,
    /// The open write handle of each inode being written, so `stat` shows the size being written.
    writing: Mutex<HashMap<u64, Arc<WriteHandle>>>,
    cfg: FsConfig,
    inodes: Mutex<InodeTable>,
    /// How the kernel is asked to drop entries when the inode table is over its cap; without
    /// one (no kernel: unit tests) the table is not bounded.
    dropper: std::sync::OnceLock<EntryDropper>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Shown as the mtime of directories, which a bucket does not record.
    mounted_at: SystemTime,
    /// Shutdown has started: new writes are refused (see `lifecycle`).
    closing: AtomicBool,
    /// Fetches small files ahead of opens that follow a directory's listing.
    small_files: small_files::SmallFiles,
}

impl Fs {
    /// Builds the filesystem (its options were checked by `config`).
    pub fn new(store: DynStore, cfg: FsConfig) -> Arc<Fs> {
        let (prefetch, demand, mut tier) = cfg.read.split();
        // Uploads get their own pool, taken from the memory tier: two parts in flight.
        let upload = match (&cfg.write, cfg.read_only) {
            (Some(w), false) => (2 * w.part_size).min(tier).max(crate::cache::BLOCK_SIZE),
            _ => 0,
        };
        tier = tier.saturating_sub(upload);
        let budget = Arc::new(MemoryBudget::new(prefetch, demand).with_uploads(upload));
        let read = Arc::new(ReadContext {
            tiers: Arc::new(TieredCache::new(
                store.clone(),
                Arc::new(MemoryCache::new(tier)),
                cfg.disk_cache.clone(),
            )),
            store: store.clone(),
            budget: budget.clone(),
            cfg: cfg.read.clone(),
        });
        let write = match (&cfg.write, cfg.read_only) {
            (Some(w), false) => Some(Arc::new(WriteContext {
                store: store.clone(),
                budget,
                journal: Journal::new(&w.staging_dir, &cfg.source),
                cfg: w.clone(),
                locks: cfg
                    .locks
                    .enabled
                    .then(|| crate::lock::Locks::new(store.clone(), &cfg.locks)),
            })),
            _ => None,
        };
        let meta = Meta::with_ttls(
            store.clone(),
            cfg.metadata_ttl,
            cfg.negative_metadata_ttl,
            cfg.prefix.is_empty(),
            &cfg.locks.prefix,
        );
        let table = InodeTable::new(cfg.prefix.clone(), cfg.max_inode_bytes);
        meta.get_small_files(
            cfg.small_file_get.min(crate::cache::BLOCK_SIZE),
            small_files::into_memory(&read),
        );
        let small_files =
            small_files::SmallFiles::new(meta.clone(), read.clone(), cfg.small_file_prefetch);
        Arc::new(Fs {
            store,
            meta,
            read,
            small_files,
            write,
            writing: Mutex::new(HashMap::new()),
            cfg,
            inodes: Mutex::new(table),
            dropper: std::sync::OnceLock::new(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mounted_at: SystemTime::now(),
            closing: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Since when the store has not answered, during an outage.
    pub fn store_unreachable_since(&self) -> Option<tokio::time::Instant> {
        self.store.health().and_then(|h| h.unreachable_since())
    }

    /// What the kernel sees: the attributes the object's metadata records, and the mount's
    /// defaults for the ones it does not (`--file-mode`, `--dir-mode`, `--uid`, `--gid`; the
    /// store's modification time, or the mount time for a directory without a marker).
    fn attr(&self, ino: u64, stat: &Stat) -> Attr {
        let a = stat.attrs();
        let stored = match stat.kind {
            Kind::Dir if stat.mtime == SystemTime::UNIX_EPOCH => self.mounted_at,
            _ => stat.mtime,
        };
        let mtime = a.mtime.unwrap_or(stored);
        let default_perm = match stat.kind {
            Kind::Dir => self.cfg.dir_mode,
            Kind::Symlink => 0o777,
            _ => self.cfg.file_mode,
        };
        Attr {
            ino,
            kind: stat.kind,
            size: stat.size,
            mtime,
            atime: a.atime.unwrap_or(mtime),
            ctime: a.ctime.unwrap_or(stored.max(mtime)),
            perm: a.mode.map_or(default_perm, |m| (m & 0o7777) as u16),
            uid: a.uid.unwrap_or(self.cfg.uid),
            gid: a.gid.unwrap_or(self.cfg.gid),
            rdev: a.rdev.unwrap_or(0),
        }
    }

    /// (key, kind) of an inode.
    fn inode_key(&self, ino: u64) -> FsResult<(String, Kind)> {
        let t = self.inodes.lock().unwrap();
        let kind = t.get(ino).ok_or(FsError::NotFound)?.stat.kind();
        Ok((t.key(ino).ok_or(FsError::NotFound)?, kind))
    }

    fn dir_key(&self, ino: u64) -> FsResult<String> {
        match self.inode_key(ino)? {
            (key, Kind::Dir) => Ok(key),
            _ => Err(FsError::NotDir),
        }
    }

    /// Records that the kernel now holds a reference to (parent, name) with `stat`; over the
    /// table's cap, asks the kernel to drop the least recently used entries.
    fn remember(&self, parent: u64, name: &str, stat: Stat) -> Attr {
        let (ino, to_drop) = {
            let mut t = self.inodes.lock().unwrap();
            let ino = t.remember(parent, name, &stat);
            let to_drop = match self.dropper.get() {
                Some(_) => t.shed(),
                None => Vec::new(),
            };
            Self::report_inodes(&t);
            (ino, to_drop)
        };
        if !to_drop.is_empty() {
            crate::metrics::inodes_dropped(to_drop.len());
            (self.dropper.get().expect("checked"))(to_drop);
        }
        self.attr(ino, &stat)
    }

    /// Sets the inode table's gauges, under its lock: set after it, two updates could leave the
    /// bytes of one and the dropping bytes of the other.
    fn report_inodes(t: &InodeTable) {
        let (count, bytes) = t.usage();
        crate::metrics::inode_table(count, bytes, t.dropping_bytes());
    }

    /// Sets how the kernel is asked to drop entries (once; see `inodes`).
    pub fn set_entry_dropper(&self, dropper: EntryDropper) {
        let _ = self.dropper.set(dropper);
    }

    /// (inodes, bytes) the inode table holds.
    pub fn inode_usage(&self) -> (usize, u64) {
        self.inodes.lock().unwrap().usage()
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let dir_key = self.dir_key(parent)?;
        match crate::meta::check_name(name) {
            Err(crate::meta::Skip::TooLong) => return Err(FsError::NameTooLong),
            Err(_) => return Err(FsError::NotFound),
            Ok(_) if self.meta.is_reserved(&dir_key, name) => return Err(FsError::NotFound),
            Ok(_) => {}
        }
        let path_key = format!("{dir_key}{name}");
        if path_key.len() + 1 > self.store.max_key_len() {
            return Err(FsError::NameTooLong);
        }
        if let Some((w, ino)) = self.open_writer_of(parent, name) {
            // Being written here: this mount sees the file as written so far, even before its
            // first commit, and without asking the store.
            let mut stat = self.inode_stat(ino)?;
            stat.size = w.size().await;
            return Ok(self.remember(parent, name, stat));
        }
        let stat = self
            .meta
            .resolve(&path_key)
            .await?
            .ok_or(FsError::NotFound)?;
        if stat.kind != Kind::Dir {
            self.small_files.looked_up(&path_key);
        }
        Ok(self.remember(parent, name, stat))
    }

    /// Unties `ino` from its name: the next lookup of the name makes a new inode, while the
    /// kernel goes on using `ino` for the files it has open. For opens the kernel cannot serve
    /// on `ino` as it is tied now (see the passthrough rules in `fuse`).
    pub fn detach_name(&self, ino: u64) {
        self.inodes.lock().unwrap().detach(ino);
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        let mut t = self.inodes.lock().unwrap();
        t.forget(ino, nlookup);
        Self::report_inodes(&t);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let writer = self.writing.lock().unwrap().get(&ino).cloned();
        if let Some(w) = writer {
            // Being written here: this mount sees the file as written so far.
            let size = w.size().await;
            let mut stat = self.inode_stat(ino)?;
            stat.size = size;
            return Ok(self.attr(ino, &stat));
        }
        let (key, stat, fresh) = {
            let mut t = self.inodes.lock().unwrap();
            t.touch(ino);
            let i = t.get(ino).ok_or(FsError::NotFound)?;
            let (stat, fresh) = (i.stat.unpack(), i.checked.elapsed() < self.cfg.metadata_ttl);
            (t.key(ino).ok_or(FsError::NotFound)?, stat, fresh)
        };
        // The bucket root has no key of its own to ask about.
        if fresh
            || (stat.kind == Kind::Dir
                && key.trim_end_matches('/') == self.cfg.prefix.trim_end_matches('/'))
        {
            return Ok(self.attr(ino, &stat));
        }
        let stat = match self.meta.resolve(key.trim_end_matches('/')).await? {
            Some(s) if s.kind == stat.kind || (s.kind != Kind::Dir && stat.kind != Kind::Dir) => s,
            _ => return Err(FsError::NotFound),
        };
        self.update_inode(ino, |i| {
            i.stat = stat.clone();
            i.checked = Instant::now();
        });
        Ok(self.attr(ino, &stat))
    }

    /// Adds the handle `h` of the inode `ino`, which is not dropped while a handle is open.
    fn add_handle(&self, ino: u64, h: Handle) -> u64 {
        self.inodes.lock().unwrap().opened(ino);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    /// Removes the handle `fh`, and returns it.
    fn remove_handle(&self, fh: u64) -> Option<Handle> {
        let h = self.handles.lock().unwrap().remove(&fh)?;
        let ino = match &h {
            Handle::Read(_, ino) | Handle::Write(_, ino) | Handle::Dir(_, ino) => *ino,
        };
        self.inodes.lock().unwrap().closed(ino);
        Some(h)
    }

    /// Opens a file for reading, pinned to the version current now.
    pub async fn open(&self, ino: u64, mode: OpenMode) -> FsResult<Opened> {
        if mode.write {
            return self.open_write(ino, mode).await;
        }
        let (key, kind) = self.inode_key(ino)?;
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let stat = match self.meta.resolve(&key).await? {
            Some(s) if s.kind == Kind::File => s,
            _ => return Err(FsError::NotFound),
        };
        let version = stat
            .version
            .clone()
            .unwrap_or_else(|| Version(String::new()));
        let keep_cache = {
            let mut t = self.inodes.lock().unwrap();
            let i = t.get(ino).ok_or(FsError::NotFound)?;
            let keep = i.cached_version.as_ref() == Some(&version) && i.stat.size() == stat.size;
            t.update(ino, |i| {
                i.cached_version = Some(version.clone());
                i.stat = stat.clone();
                i.checked = Instant::now();
            });
            keep
        };
        let backing = match self.read.tiers.disk() {
            Some(disk) => {
                let disk = disk.clone();
                let tiers = self.read.tiers.clone();
                let (store, k, v, size) = (
                    self.read.tiers.store_id().clone(),
                    key.clone(),
                    version.clone(),
                    stat.size,
                );
                tokio::task::spawn_blocking(move || {
                    // Blocks this mount fetched are complete on disk once written.
                    tiers.settle(&k, &v);
                    let v = &v.0;
                    let id = crate::cache::disk::ObjectId {
                        store: &store,
                        key: &k,
                        version: v,
                    };
                    disk.touch(&id);
                    disk.complete_file(&id, size)
                })
                .await
                .unwrap_or(None)
            }
            None => None,
        };
        let pinned = version.0.clone();
        self.small_files.opened(&key, &pinned, stat.size).await;
        let reader = Reader::new(self.read.clone(), key, version, stat.size);
        let fh = self.add_handle(ino, Handle::Read(Arc::new(reader), ino));
        Ok(Opened {
            fh,
            keep_cache,
            backing,
            version: pinned,
        })
    }

    /// `close()` of a read handle: the blocks of its object still queued for the disk tier are
    /// written first (a wait bounded by the queue's size), so the next open, here or in another
    /// process, finds on disk what this handle read.
    pub(crate) async fn settle_read(&self, fh: u64) {
        let reader = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Read(r, _)) => r.clone(),
            _ => return,
        };
        if self.read.tiers.disk().is_some() {
            let tiers = self.read.tiers.clone();
            let _ = tokio::task::spawn_blocking(move || {
                tiers.settle(reader.key(), reader.version());
            })
            .await;
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<bytes::Bytes> {
        let handle = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Read(r, _)) => Ok(r.clone()),
            Some(Handle::Write(w, _)) => Err(w.clone()),
            _ => return Err(FsError::BadHandle),
        };
        match handle {
            Ok(reader) => self.bounded_read(&reader, offset, size).await,
            Err(writer) => Ok(writer.read(offset, size as u64).await?),
        }
    }

    /// A read of `reader` that gives up with EIO within the store's read deadline, and within
    /// [`crate::meta::OUTAGE_PROBE`] while the store is known not to answer: the kernel follows a
    /// failed readahead with a read of its own, which must not wait the whole deadline again.
    async fn bounded_read(
        &self,
        reader: &Reader,
        offset: u64,
        size: u32,
    ) -> FsResult<bytes::Bytes> {
        let read = reader.read(offset, size as u64);
        let Some(health) = self.store.health() else {
            return Ok(read.await?);
        };
        let bound = match health.unreachable_since() {
            Some(_) => crate::meta::OUTAGE_PROBE,
            None => health.read_deadline(),
        };
        match tokio::time::timeout(bound, read).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                crate::metrics::read_timeout();
                tracing::warn!(
                    key = %reader.key(),
                    offset,
                    ?bound,
                    "read failed with EIO: the store did not deliver the bytes in time"
                );
                Err(FsError::Store(crate::store::StoreError::Transient(
                    format!("no bytes within {bound:?}"),
                )))
            }
        }
    }

    /// Asks the store for one listing entry of the mount root, within `limit`: whether it
    /// answers (an answer also ends an outage, see `store::retry::StoreHealth`).
    pub async fn probe_store(&self, limit: std::time::Duration) -> bool {
        let ask = self.store.list(&self.cfg.prefix, Some("/"), None, 1);
        matches!(tokio::time::timeout(limit, ask).await, Ok(Ok(_)))
    }

    /// Closes a handle. A write handle still holding uncommitted changes (no `flush` was its
    /// writer's, or none came) commits them now; the result can only be logged. A handle whose
    /// commit failed before (`close` said `EIO`) commits nothing, ever.
    pub async fn release(&self, fh: u64) {
        let handle = self.remove_handle(fh);
        if let Some(Handle::Write(w, ino)) = handle {
            match self.commit_handle(&w, ino).await {
                Ok(()) => {}
                // Already reported, to the writer and in the log.
                Err(FsError::Write(crate::write::WriteError::Failed)) => w.discard().await,
                Err(e) => {
                    let key = w.key().await;
                    tracing::error!(%key, error = %e, "changes lost at close: the upload failed");
                    crate::metrics::upload_lost();
                    w.discard().await;
                }
            }
            {
                let mut writing = self.writing.lock().unwrap();
                if writing.get(&ino).is_some_and(|x| Arc::ptr_eq(x, &w)) {
                    writing.remove(&ino);
                }
            }
            w.release_lock().await;
        }
    }

    /// The entries of the directory `ino` changed: its attributes (a real directory's times)
    /// are asked for again at the next `getattr`.
    pub(super) fn expire_dir(&self, ino: u64) {
        let ttl = self.cfg.metadata_ttl + std::time::Duration::from_millis(1);
        let mut t = self.inodes.lock().unwrap();
        if let Some(key) = t.key(ino)
            && let Some(old) = Instant::now().checked_sub(ttl)
        {
            t.update(ino, |i| i.checked = old);
            self.meta.invalidate(key.trim_end_matches('/'));
        }
    }

    fn inode_stat(&self, ino: u64) -> FsResult<Stat> {
        let t = self.inodes.lock().unwrap();
        Ok(t.get(ino).ok_or(FsError::NotFound)?.stat.unpack())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let stream = self.meta.open_dir(&self.dir_key(ino)?);
        let stream = Arc::new(tokio::sync::Mutex::new(stream));
        Ok(self.add_handle(ino, Handle::Dir(stream, ino)))
    }

    /// Up to `max` entries of the open directory `fh` (without `.` and `..`) from the entry at
    /// `at`, the first being 0. The listing is paged in from the store as the offsets reach its
    /// end, and an offset keeps naming the same entry for the handle (see `meta::listing`).
    pub async fn readdir(&self, fh: u64, at: u64, max: usize) -> FsResult<Vec<DirEntryOut>> {
        let (stream, ino) = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Dir(stream, ino)) => (stream.clone(), *ino),
            _ => return Err(FsError::BadHandle),
        };
        let listed = stream.lock().await.entries_from(at, max).await?;
        let dir_key = self.dir_key(ino)?;
        let t = self.inodes.lock().unwrap();
        Ok(listed
            .into_iter()
            .map(|e| DirEntryOut {
                ino: t
                    .by_name(ino, &e.name)
                    .unwrap_or_else(|| synthetic_ino(&dir_key, &e.name)),
                kind: e.stat.kind,
                name: e.name,
            })
            .collect())
    }

    /// `rewinddir`: the next `readdir` of `fh` lists the directory again, as it is now.
    pub async fn rewinddir(&self, fh: u64) -> FsResult<()> {
        let stream = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Dir(stream, _)) => stream.clone(),
            _ => return Err(FsError::BadHandle),
        };
        stream.lock().await.rewind();
        Ok(())
    }

    /// The parent inode of a directory (for `..`).
    pub fn parent_of(&self, ino: u64) -> u64 {
        let t = self.inodes.lock().unwrap();
        t.get(ino).map(|i| i.parent).unwrap_or(ROOT_INO)
    }

    pub fn releasedir(&self, fh: u64) {
        self.remove_handle(fh);
    }
}

/// An inode number for a listed entry the kernel has not looked up yet. `readdir` numbers are
/// informational (`ls -i`); the kernel uses the number from `lookup` for everything else. The
/// high bit keeps them apart from assigned numbers.
fn synthetic_ino(dir_key: &str, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir_key.hash(&mut h);
    name.hash(&mut h);
    h.finish() | (1 << 63)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;
    use crate::store::{ObjectStore, Precondition};
    use bytes::Bytes;
    use std::time::Duration;

    /// The FUSE lock owner of the writing process in tests.
    pub(super) const OWNER: u64 = 7;
    /// `O_WRONLY | O_CREAT | O_TRUNC`, as `File::create` opens.
    pub(super) const CREATE: OpenMode = OpenMode {
        write: true,
        truncate: true,
        ..OpenMode::READ
    };
    pub(super) const TRUNCATE: OpenMode = CREATE;
    pub(super) const WRITE: OpenMode = OpenMode {
        write: true,
        ..OpenMode::READ
    };

    pub(super) fn cfg(ttl: Duration) -> FsConfig {
        FsConfig {
            prefix: String::new(),
            uid: 1,
            gid: 2,
            file_mode: 0o644,
            dir_mode: 0o755,
            metadata_ttl: ttl,
            negative_metadata_ttl: ttl,
            read_only: true,
            read: ReadConfig::default(),
            write: None,
            source: "mem://b".into(),
            disk_cache: None,
            passthrough: false,
            locks: crate::lock::LockConfig::default(),
            small_file_prefetch: 0,
            small_file_get: 0,
            max_inode_bytes: u64::MAX,
        }
    }

    async fn fs_with(keys: &[(&str, &'static [u8])], ttl: Duration) -> (Arc<MemStore>, Arc<Fs>) {
        let mem = Arc::new(MemStore::new("b"));
        for (k, v) in keys {
            mem.put(k, Bytes::from_static(v), Precondition::None)
                .await
                .unwrap();
        }
        let fs = Fs::new(mem.clone(), cfg(ttl));
        (mem, fs)
    }

    async fn ls(fs: &Fs, ino: u64) -> Vec<(String, Kind)> {
        let fh = fs.opendir(ino).unwrap();
        let mut out = Vec::new();
        loop {
            let more = fs.readdir(fh, out.len() as u64, 100).await.unwrap();
            if more.is_empty() {
                break;
            }
            out.extend(more.into_iter().map(|e| (e.name, e.kind)));
        }
        fs.releasedir(fh);
        out
    }

    #[tokio::test]
    async fn keys_that_are_not_file_names_are_skipped_or_shadowed() {
        let long = format!("a/{}", "n".repeat(256));
        let long: &'static str = Box::leak(long.into_boxed_str());
        let (_, fs) = fs_with(
            &[
                ("a//b", b"x"),
                ("a/./c", b"x"),
                ("a/../d", b"x"),
                ("a/ok", b"x"),
                (long, b"x"),
                ("shadow", b"file"),
                ("shadow/inner", b"x"),
                (".bucketfs/locks/l", b"x"),
            ],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            ls(&fs, ROOT_INO).await,
            vec![("a".into(), Kind::Dir), ("shadow".into(), Kind::Dir)]
        );
        let a = fs.lookup(ROOT_INO, "a").await.unwrap();
        assert_eq!(ls(&fs, a.ino).await, vec![("ok".into(), Kind::File)]);
        // Nothing reachable through an invalid name either.
        for name in ["", ".", ".."] {
            assert!(matches!(
                fs.lookup(a.ino, name).await,
                Err(FsError::NotFound)
            ));
        }
        let shadow = fs.lookup(ROOT_INO, "shadow").await.unwrap();
        assert_eq!(shadow.kind, Kind::Dir);
        assert!(matches!(
            fs.lookup(ROOT_INO, ".bucketfs").await,
            Err(FsError::NotFound)
        ));
    }

    #[tokio::test]
    async fn lookup_getattr_open_read() {
        let (_, fs) = fs_with(&[("d/f", b"hello world")], Duration::from_secs(5)).await;
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        assert_eq!((d.kind, d.perm, d.uid, d.gid), (Kind::Dir, 0o755, 1, 2));
        let f = fs.lookup(d.ino, "f").await.unwrap();
        assert_eq!((f.kind, f.size, f.perm), (Kind::File, 11, 0o644));
        assert_eq!(fs.getattr(f.ino).await.unwrap().size, 11);
        let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
        assert!(!o.keep_cache, "first open has nothing cached");
        assert_eq!(&fs.read(o.fh, 6, 100).await.unwrap()[..], b"world");
        assert_eq!(&fs.read(o.fh, 11, 10).await.unwrap()[..], b"");
        fs.release(o.fh).await;
        let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
        assert!(o.keep_cache, "same version: the page cache is still good");
        assert!(matches!(
            fs.open(
                f.ino,
                OpenMode {
                    write: true,
                    ..OpenMode::READ
                }
            )
            .await,
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            fs.open(d.ino, OpenMode::READ).await,
            Err(FsError::IsDir)
        ));
        assert!(matches!(fs.lookup(f.ino, "x").await, Err(FsError::NotDir)));
    }

    #[tokio::test]
    async fn reads_fail_stale_when_the_object_changes() {
        let (mem, fs) = fs_with(&[], Duration::ZERO).await;
        let v1 = Bytes::from(vec![1u8; 3 << 20]);
        mem.put("f", v1, Precondition::None).await.unwrap();
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
        assert_eq!(&fs.read(o.fh, 0, 4).await.unwrap()[..], &[1, 1, 1, 1]);
        mem.put("f", Bytes::from(vec![2u8; 3 << 20]), Precondition::None)
            .await
            .unwrap();
        // Bytes already fetched are the pinned version's: still served, never mixed.
        assert_eq!(&fs.read(o.fh, 0, 4).await.unwrap()[..], &[1, 1, 1, 1]);
        // Bytes not fetched yet cannot come from the pinned version any more.
        let err = fs.read(o.fh, 2 << 20, 4).await.unwrap_err();
        assert_eq!(err.errno(), libc::ESTALE);
        mem.delete("f", Precondition::None).await.unwrap();
        assert_eq!(
            fs.read(o.fh, (2 << 20) + 8, 4).await.unwrap_err().errno(),
            libc::ESTALE
        );
        // And a new open of the deleted file is ENOENT.
        assert!(matches!(
            fs.open(f.ino, OpenMode::READ).await,
            Err(FsError::NotFound)
        ));
    }

    #[tokio::test]
    async fn forgotten_inodes_are_dropped_and_renumbered() {
        let (_, fs) = fs_with(&[("f", b"x")], Duration::from_secs(5)).await;
        let a = fs.lookup(ROOT_INO, "f").await.unwrap();
        let b = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!(a.ino, b.ino, "one inode per path while it is known");
        fs.forget(a.ino, 2);
        assert!(matches!(fs.getattr(a.ino).await, Err(FsError::NotFound)));
        let c = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_ne!(c.ino, a.ino);
    }

    #[tokio::test]
    async fn store_errors_become_eio_or_eacces() {
        use crate::store::StoreError;
        use crate::store::mem::{Fault, Op};
        let (mem, fs) = fs_with(&[("f", b"x")], Duration::ZERO).await;
        mem.inject(
            Op::List,
            Fault::Error(StoreError::Transient("down".into())),
            1,
        );
        assert_eq!(
            fs.lookup(ROOT_INO, "f").await.unwrap_err().errno(),
            libc::EIO
        );
        mem.inject(
            Op::Head,
            Fault::Error(StoreError::Unauthorized("no".into())),
            1,
        );
        assert_eq!(
            fs.lookup(ROOT_INO, "f").await.unwrap_err().errno(),
            libc::EACCES
        );
    }

    #[tokio::test]
    async fn readdir_pages_the_listing_in_as_offsets_advance() {
        use crate::store::mem::Op;
        let (mem, fs) = fs_with(&[], Duration::from_secs(5)).await;
        for i in 0..2500 {
            mem.put(
                &format!("d/f{i:04}"),
                Bytes::from_static(b"x"),
                Precondition::None,
            )
            .await
            .unwrap();
        }
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        let fh = fs.opendir(d.ino).unwrap();
        let before = mem.calls(Op::List);
        let first = fs.readdir(fh, 0, 128).await.unwrap();
        assert_eq!(first.len(), 128);
        assert_eq!(
            mem.calls(Op::List) - before,
            1,
            "one page for the first call"
        );
        let mut names: Vec<String> = first.into_iter().map(|e| e.name).collect();
        loop {
            let more = fs.readdir(fh, names.len() as u64, 128).await.unwrap();
            if more.is_empty() {
                break;
            }
            names.extend(more.into_iter().map(|e| e.name));
        }
        let want: Vec<String> = (0..2500).map(|i| format!("f{i:04}")).collect();
        assert_eq!(names, want, "every entry once, in order");
        assert_eq!(mem.calls(Op::List) - before, 3, "one LIST per page of 1000");
        fs.releasedir(fh);
    }

    /// A mount with small-file prefetch of `objects` (all in `d/`), `d` listed: its attributes.
    async fn listed_with_prefetch(
        objects: impl Iterator<Item = (String, Bytes)>,
    ) -> (Arc<MemStore>, Arc<Fs>, Attr) {
        let mem = Arc::new(MemStore::new("b"));
        for (key, body) in objects {
            mem.put(&key, body, Precondition::None).await.unwrap();
        }
        let cfg = FsConfig {
            small_file_prefetch: 1024,
            ..cfg(Duration::from_secs(60))
        };
        let fs = Fs::new(mem.clone(), cfg);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        assert!(!ls(&fs, d.ino).await.is_empty());
        (mem, fs, d)
    }

    #[tokio::test]
    async fn small_files_opened_in_listing_order_are_fetched_ahead() {
        use crate::store::mem::Op;
        let bodies = (0..40).map(|i| (format!("d/f{i:02}"), Bytes::from(format!("file {i:02}"))));
        let (mem, fs, d) = listed_with_prefetch(bodies).await;
        let cat = |i: usize| {
            let fs = fs.clone();
            async move {
                let f = fs.lookup(d.ino, &format!("f{i:02}")).await.unwrap();
                let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
                let got = fs.read(o.fh, 0, 4096).await.unwrap();
                fs.release(o.fh).await;
                assert_eq!(&got[..], format!("file {i:02}").as_bytes());
            }
        };
        cat(0).await;
        cat(1).await;
        // The second open in order fetched the next ones; wait for them.
        let want = 2 + small_files::AHEAD as u64;
        for _ in 0..100 {
            if mem.calls(Op::GetRange) >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(mem.calls(Op::GetRange), want);
        let heads = mem.calls(Op::Head);
        for i in 2..2 + small_files::AHEAD {
            cat(i).await;
        }
        // Read from memory: no GET of their own (only the prefetches the later opens started),
        // and no HEAD (the listing carried the attributes).
        assert_eq!(mem.calls(Op::Head), heads);
        // The later opens fetched the next AHEAD files (f18 to f33), once each.
        for _ in 0..100 {
            if mem.calls(Op::GetRange) >= want + small_files::AHEAD as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(mem.calls(Op::GetRange), want + small_files::AHEAD as u64);
    }

    #[tokio::test]
    async fn a_file_changed_after_its_prefetch_is_read_at_its_new_version() {
        use crate::store::mem::Op;
        let bodies = (0..4).map(|i| (format!("d/f{i}"), Bytes::from_static(b"old")));
        let (mem, fs, d) = listed_with_prefetch(bodies).await;
        for i in 0..2 {
            let f = fs.lookup(d.ino, &format!("f{i}")).await.unwrap();
            let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
            fs.release(o.fh).await;
        }
        while mem.calls(Op::GetRange) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // f2 and f3 are fetched ahead at the old version; f2 changes, and its metadata is
        // asked for again (as when the TTL runs out).
        mem.put("d/f2", Bytes::from_static(b"new!"), Precondition::None)
            .await
            .unwrap();
        fs.meta.invalidate("d/f2");
        let f = fs.lookup(d.ino, "f2").await.unwrap();
        let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
        assert_eq!(&fs.read(o.fh, 0, 100).await.unwrap()[..], b"new!");
        // f3 did not change: its prefetched bytes serve it.
        let gets = mem.calls(Op::GetRange);
        let f = fs.lookup(d.ino, "f3").await.unwrap();
        let o = fs.open(f.ino, OpenMode::READ).await.unwrap();
        assert_eq!(&fs.read(o.fh, 0, 100).await.unwrap()[..], b"old");
        assert_eq!(mem.calls(Op::GetRange), gets);
    }
}
