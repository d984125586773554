//! The thin FUSE adapter: decode a kernel request, call [`crate::fs::Fs`], reply or errno.
//!
//! Nothing else in the crate imports `fuser`. Each request becomes a task on the tokio runtime,
//! so a slow store call never blocks the threads reading `/dev/fuse` and many reads of one file
//! proceed in parallel (the kernel sends them asynchronously, `FUSE_ASYNC_READ`).
//!
//! Kernel settings, and why:
//! - max read size: fuser negotiates `max_pages` from its 16 MiB write limit; the kernel caps it
//!   at 256 pages, so each read request carries up to 1 MiB (instead of 128 KiB by default): 8x
//!   fewer round trips through the kernel for large sequential reads.
//! - readahead: `FUSE_INIT` can only lower the kernel's readahead (it offers its default,
//!   128 KiB, and keeps the smaller of that and the answer), so `init` leaves it as offered and
//!   the mount raises it afterwards through sysfs (`--read-ahead`, 16 MiB by default, needs root;
//!   see `mount.rs`): then a large `pread` reaches the daemon at once, as parallel 1 MiB
//!   requests, instead of as a chain of 128 KiB windows, and a page fault of an `mmap` brings
//!   that much around it. Our own prefetcher looks further ahead.
//! - keep-cache: an open of an unchanged object version keeps the kernel page cache, so a file
//!   read twice is served from memory the second time.
//! - attribute and entry TTLs: the `--metadata-ttl`, the same promise as our metadata cache.
//! - files open for writing are direct I/O (`FOPEN_DIRECT_IO`): only then does the kernel name
//!   the lock owner (the writer's file table) in each write, which the commit policy needs to
//!   tell the writer's `close` from a forked child's (see `write/`). Shared mappings of them
//!   still work where the kernel offers `FUSE_DIRECT_IO_ALLOW_MMAP` (Linux 6.6).
//! - names that are not UTF-8 are refused with `EINVAL` by every operation: an object key is
//!   UTF-8, so no such file can exist or be made.
//! - two threads read `/dev/fuse` (with cloned fds): enough to keep dispatch off the critical path
//!   on small machines; the work itself runs on the tokio runtime.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

mod notify;

pub use notify::drop_entries_through;

use crate::fs::{Attr, AttrChange, Caller, Fs, FsError, OpenMode, ROOT_INO};
use crate::meta::Kind;
use crate::metrics;

/// Entries asked of `fs` at a time for a `readdir` reply: as many as the smallest entries
/// (32 bytes) a 4 KiB reply holds, so a batch is seldom cut short by much.
const READDIR_BATCH: usize = 128;

/// Most entries in one `readdir` reply, however large the kernel's buffer (glibc sizes it by the
/// directory's `st_blksize`, 1 MiB here, which holds about 25k entries): each entry's attributes
/// were seen when its listing page came, and `ls -l` looks the entries up only after it got
/// them, so a reply of 25k took longer to look up than `--metadata-ttl` (5 s) on a busy machine,
/// and the last of them were asked of the store again. One listing page per reply keeps the
/// lookups close behind the listing.
const READDIR_REPLY_MAX: u64 = crate::meta::LIST_PAGE as u64;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    passthrough: Arc<Passthrough>,
}

/// FUSE passthrough of fully cached objects (the kernel reads the cache file itself), and the
/// io mode of every open.
///
/// ## The kernel's rules (Linux >= 6.9, `fs/fuse/iomode.c`)
/// Each inode is, at any moment, in one io mode, set by the files open on it:
/// - *cached*: files opened through the daemon using the page cache. While one is open, a
///   passthrough open of the inode fails with `EIO`.
/// - *passthrough*: files opened with `FOPEN_PASSTHROUGH`. From the first such open until the last
///   one closes the inode is bound to **one** backing file, and every open of it must be a
///   passthrough open with that same backing file: another backing file fails (`EIO`), and so does
///   any open through the daemon, even with `FOPEN_DIRECT_IO` (`EIO`).
/// - `FOPEN_DIRECT_IO` opens use no page cache and enter no mode: they work next to cached files
///   (not next to a bound backing file). An `mmap` of such a file enters the cached mode.
/// - A mode ends when its last file is closed. The kernel drops it at `close(2)`, before the
///   `RELEASE` reaches us, so our view lags the kernel's only on the safe side.
/// - A registered backing id pins its file (also after the cache evicted it) until we close the
///   id; an open passthrough file holds its own reference, so the id is closed when the last
///   handle opened with it is released (`bucketfs_passthrough_backing_ids`).
///
/// ## What an open gets
/// A read open resolves to version `v`, perhaps with a sealed cache file `f` of it.
/// 1. The inode is bound to a backing file: if that is `v`'s and `f` is the same file (same
///    identity), the open shares it. Otherwise no answer on this inode is right (the bound file
///    holds other bytes, and nothing else is allowed): the name is untied from the inode
///    (`Fs::detach_name`) and the open answered `ESTALE`, on which the kernel retries the open
///    once with a fresh lookup, which yields a new inode free of the binding. Write opens while
///    bound go the same way (a write can never go to a cache file).
/// 2. Handles through the daemon are open: passthrough would fail, so through the daemon too.
///    If one of them is of another version (or a writer), the page cache is theirs, and this
///    open gets `FOPEN_DIRECT_IO`: two versions never share pages.
/// 3. Nothing open: passthrough to `f` if there is one, else through the daemon.
///
/// The page cache is kept at open (`FOPEN_KEEP_CACHE`) only if it can hold nothing but `v`'s
/// bytes: the last open that used it was at `v`, and no writer used it since.
/// (Limit: an `mmap` of a direct-I/O handle shares the page cache with the cached handles.)
struct Passthrough {
    enabled: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<PassthroughState>,
}

#[derive(Default)]
struct PassthroughState {
    /// How each open handle reads, and its inode.
    by_fh: HashMap<u64, (u64, HandleIo)>,
    inodes: HashMap<u64, InodeIo>,
}

/// How one handle's reads go.
enum HandleIo {
    Passthrough,
    /// Through the daemon and the page cache, at this version ("" for a writer).
    Cached(String),
    Direct,
}

/// What the kernel ties one inode to, as far as we know.
#[derive(Default)]
struct InodeIo {
    /// The backing file of the inode's passthrough handles, while any is open.
    bound: Option<Bound>,
    /// Handles open through the daemon with the page cache, by version ("" for writers).
    cached: HashMap<String, usize>,
    /// Handles open with `FOPEN_DIRECT_IO`.
    direct: usize,
    /// The version whose bytes the inode's page cache may hold; `None` if unknown (written).
    pages: Option<String>,
}

struct Bound {
    version: String,
    identity: crate::cache::disk::FileIdentity,
    id: BackingId,
    handles: usize,
}

impl Drop for Bound {
    fn drop(&mut self) {
        metrics::backing_id(false);
    }
}

/// How an open is to be answered.
enum OpenIo {
    Passthrough,
    Cached {
        keep: bool,
    },
    Direct,
    /// Not on this inode (see rule 1).
    Stale,
}

impl InodeIo {
    fn daemon_handles(&self) -> usize {
        self.cached.values().sum::<usize>() + self.direct
    }

    /// Rules 2 and 3 for a read at `version` through the daemon.
    fn daemon_io(&self, version: &str, keep: bool) -> OpenIo {
        if self.cached.keys().any(|v| v != version) {
            OpenIo::Direct
        } else {
            OpenIo::Cached {
                keep: keep && self.pages.as_deref() == Some(version),
            }
        }
    }
}

impl Passthrough {
    fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::info!(
                "FUSE passthrough is off ({why}); cached files are read through the daemon"
            );
        }
    }

    /// Whether a write open of `ino` must be sent back for a new inode (rule 1).
    fn write_is_stale(&self, ino: u64) -> bool {
        let st = self.state.lock().unwrap();
        st.inodes.get(&ino).is_some_and(|i| i.bound.is_some())
    }

    /// Records a write handle (from `open` or `create`): through the page cache, which from now
    /// on holds bytes of no known version.
    fn opened_for_write(&self, ino: u64, fh: u64) {
        let mut st = self.state.lock().unwrap();
        let i = st.inodes.entry(ino).or_default();
        *i.cached.entry(String::new()).or_default() += 1;
        i.pages = None;
        st.by_fh.insert(fh, (ino, HandleIo::Cached(String::new())));
        metrics::open("cached");
    }

    /// Answers a read open of `ino` at `version` (see the rules above), or gives the reply back
    /// if this inode cannot serve it: the caller unties the name, releases the handle and answers
    /// `ESTALE`, in that order.
    fn reply(
        &self,
        reply: ReplyOpen,
        ino: u64,
        fh: u64,
        keep_cache: bool,
        version: String,
        backing: Option<crate::cache::disk::SealedFile>,
    ) -> Result<(), ReplyOpen> {
        let enabled = self.enabled.load(Ordering::Relaxed);
        // The lock is held until the reply is sent, so the kernel sees our decisions in order.
        let mut st = self.state.lock().unwrap();
        let i = st.inodes.entry(ino).or_default();
        let io = match (&i.bound, &backing) {
            (Some(b), Some(f)) if b.version == version && b.identity == f.identity => {
                OpenIo::Passthrough
            }
            (Some(_), _) => OpenIo::Stale,
            (None, _) if i.daemon_handles() > 0 => i.daemon_io(&version, keep_cache),
            (None, Some(f)) if enabled => match reply.open_backing(&f.file) {
                Ok(id) => {
                    metrics::backing_id(true);
                    i.bound = Some(Bound {
                        version: version.clone(),
                        identity: f.identity,
                        id,
                        handles: 0,
                    });
                    OpenIo::Passthrough
                }
                Err(e) => {
                    self.disable(&format!("the kernel refused a backing file: {e}"));
                    i.daemon_io(&version, keep_cache)
                }
            },
            (None, _) => i.daemon_io(&version, keep_cache),
        };
        let flags = FopenFlags::empty();
        let (handle, label) = match io {
            OpenIo::Stale => return Err(reply),
            OpenIo::Passthrough => {
                let b = i.bound.as_mut().expect("bound for passthrough");
                b.handles += 1;
                // The page cache plays no part in passthrough reads.
                reply.opened_passthrough(FileHandle(fh), flags, &b.id);
                (HandleIo::Passthrough, "passthrough")
            }
            OpenIo::Direct => {
                i.direct += 1;
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                (HandleIo::Direct, "direct")
            }
            OpenIo::Cached { keep } => {
                *i.cached.entry(version.clone()).or_default() += 1;
                i.pages = Some(version.clone());
                let flags = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    flags
                };
                reply.opened(FileHandle(fh), flags);
                (HandleIo::Cached(version), "cached")
            }
        };
        st.by_fh.insert(fh, (ino, handle));
        metrics::open(label);
        Ok(())
    }

    /// The kernel dropped its inode (a `FORGET` comes only then), and its page cache with it:
    /// what we knew of the page cache goes too, so the state stays as large as what is open.
    fn forget(&self, ino: u64) {
        let mut st = self.state.lock().unwrap();
        if st
            .inodes
            .get(&ino)
            .is_some_and(|i| i.bound.is_none() && i.daemon_handles() == 0)
        {
            st.inodes.remove(&ino);
        }
    }

    fn release(&self, fh: u64) {
        let mut st = self.state.lock().unwrap();
        let Some((ino, handle)) = st.by_fh.remove(&fh) else {
            return;
        };
        let Some(i) = st.inodes.get_mut(&ino) else {
            return;
        };
        match handle {
            HandleIo::Passthrough => {
                if let Some(b) = &mut i.bound {
                    b.handles -= 1;
                    if b.handles == 0 {
                        i.bound = None; // closes the backing id
                    }
                }
            }
            HandleIo::Cached(v) => {
                if let Some(n) = i.cached.get_mut(&v) {
                    *n -= 1;
                    if *n == 0 {
                        i.cached.remove(&v);
                    }
                }
            }
            HandleIo::Direct => i.direct -= 1,
        }
        if i.bound.is_none() && i.daemon_handles() == 0 && i.pages.is_none() {
            st.inodes.remove(&ino);
        }
    }
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle) -> Self {
        let ttl = fs.config().metadata_ttl;
        let passthrough = Arc::new(Passthrough {
            enabled: std::sync::atomic::AtomicBool::new(fs.config().passthrough),
            state: Default::default(),
        });
        FuseAdapter {
            fs,
            rt,
            ttl,
            passthrough,
        }
    }

    /// Runs the request `op` as a task, timed for `/metrics` from decoding to reply.
    fn spawn<F>(&self, op: &'static str, f: impl FnOnce(Arc<Fs>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let start = Instant::now();
        let request = f(self.fs.clone());
        self.rt.spawn(async move {
            request.await;
            metrics::fuse_request(op, start.elapsed());
        });
    }

    /// [`Self::answer`] for a request about a name, which is decoded first (see [`named`]).
    fn answer_named<R: Answer, T, W>(
        &self,
        op: &'static str,
        name: &OsStr,
        reply: R,
        work: impl FnOnce(Arc<Fs>, String) -> W,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) where
        W: Future<Output = Result<T, FsError>> + Send + 'static,
    {
        if let Some((name, reply)) = named(name, reply) {
            self.answer(op, reply, |fs| work(fs, name), ok);
        }
    }

    /// Runs `work` as the task of request `op`: `ok` answers its result, an error is answered
    /// with its errno.
    fn answer<R: Answer, T, W>(
        &self,
        op: &'static str,
        reply: R,
        work: impl FnOnce(Arc<Fs>) -> W,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) where
        W: Future<Output = Result<T, FsError>> + Send + 'static,
    {
        self.spawn(op, |fs| {
            let work = work(fs);
            async move {
                match work.await {
                    Ok(v) => ok(reply, v),
                    Err(e) => reply.fail(errno(op, e)),
                }
            }
        });
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// The name of a request, if it is UTF-8 (see the module docs).
fn utf8_name(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

/// `name` as UTF-8 with the reply still to give, or `None` once `EINVAL` was answered.
fn named<R: Answer>(name: &OsStr, reply: R) -> Option<(String, R)> {
    match utf8_name(name) {
        Ok(n) => Some((n, reply)),
        Err(e) => {
            reply.fail(e);
            None
        }
    }
}

/// A reply that can carry an errno instead of its answer.
trait Answer: Send + 'static {
    fn fail(self, e: Errno);
}

macro_rules! answers {
    ($($reply:ty),*) => {
        $(impl Answer for $reply {
            fn fail(self, e: Errno) {
                self.error(e)
            }
        })*
    };
}
answers!(
    ReplyEmpty,
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyWrite,
    ReplyCreate
);

/// Answers a request that made an inode: its entry, valid for `ttl`.
fn entry(ttl: Duration) -> impl FnOnce(ReplyEntry, Attr) + Send + 'static {
    move |reply, a| reply.entry(&ttl, &file_attr(&a), Generation(0))
}

/// Answers a request that changed nothing the kernel holds.
fn done(reply: ReplyEmpty, (): ()) {
    reply.ok()
}

/// How an open file for writing is handed to the kernel (see the module docs).
const WRITE_OPEN: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

/// Turns an fs error into the errno the application sees, logging the unexpected ones.
fn errno(op: &'static str, e: FsError) -> Errno {
    metrics::fuse_error(op);
    if e.is_unexpected() {
        tracing::warn!(op, error = %e, "request failed");
    } else {
        tracing::debug!(op, error = %e, "request failed");
    }
    Errno::from_i32(e.errno())
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Enough concurrent background (readahead, async read) requests to keep parallel ranged
        // GETs busy; the kernel default of 12 throttles large sequential reads.
        let _ = config.set_max_background(64);
        // O_TRUNC arrives with the open instead of as a separate truncate: an overwrite starts
        // empty instead of staging the old object first.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_PARALLEL_DIROPS | fuser::InitFlags::FUSE_ATOMIC_O_TRUNC,
        );
        // Lets applications map files open for writing (direct I/O) with MAP_SHARED.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        if self.passthrough.enabled.load(Ordering::Relaxed) {
            // Passthrough needs Linux >= 6.9 and CAP_SYS_ADMIN. Stack depth 2 lets the cache
            // file live on an overlay filesystem (a container's root).
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !ok {
                self.passthrough.disable("the kernel does not offer it");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let work = move |fs: Arc<Fs>, name: String| async move { fs.lookup(parent.0, &name).await };
        self.answer_named("lookup", name, reply, work, entry(self.ttl));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.passthrough.forget(ino.0);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        let work = |fs: Arc<Fs>| async move { fs.getattr(ino.0).await };
        self.answer("getattr", reply, work, move |reply, a| {
            reply.attr(&ttl, &file_attr(&a))
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = OpenMode::from_flags(flags.0);
        let passthrough = self.passthrough.clone();
        if mode.write && passthrough.write_is_stale(ino.0) {
            // Rule 1 of the passthrough rules: a new inode for the writer.
            self.fs.detach_name(ino.0);
            metrics::open("stale");
            reply.error(Errno::ESTALE);
            return;
        }
        self.spawn("open", |fs| async move {
            match fs.open(ino.0, mode).await {
                Ok(o) if mode.write => {
                    passthrough.opened_for_write(ino.0, o.fh);
                    reply.opened(FileHandle(o.fh), WRITE_OPEN)
                }
                Ok(o) => {
                    let answer =
                        passthrough.reply(reply, ino.0, o.fh, o.keep_cache, o.version, o.backing);
                    if let Err(reply) = answer {
                        // Rule 1: the kernel's retry must find the name untied already.
                        fs.detach_name(ino.0);
                        fs.release(o.fh).await;
                        metrics::open("stale");
                        reply.error(Errno::ESTALE);
                    }
                }
                Err(e) => reply.error(errno("open", e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let work = |fs: Arc<Fs>| async move { fs.read(fh.0, offset, size).await };
        self.answer("read", reply, work, |reply, data| {
            metrics::fuse_read(data.len() as u64);
            reply.data(&data)
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(fh.0);
        self.spawn("release", |fs| async move {
            fs.release(fh.0).await;
            reply.ok();
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        perm: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let ttl = self.ttl;
        let who = caller(req);
        let passthrough = self.passthrough.clone();
        let mode = OpenMode {
            write: true,
            ..OpenMode::from_flags(flags)
        };
        let work = move |fs: Arc<Fs>, name: String| async move {
            fs.create_as(parent.0, &name, mode, perm & !umask, who)
                .await
        };
        self.answer_named("create", name, reply, work, move |reply, (a, fh)| {
            passthrough.opened_for_write(a.ino, fh);
            let attr = file_attr(&a);
            reply.created(&ttl, &attr, Generation(0), FileHandle(fh), WRITE_OPEN)
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = bytes::Bytes::copy_from_slice(data);
        let owner = lock_owner.map(|o| o.0);
        let work = move |fs: Arc<Fs>| async move { fs.write(fh.0, offset, data, owner).await };
        self.answer("write", reply, work, |reply, n| {
            metrics::fuse_write(n as u64);
            reply.written(n)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let work = |fs: Arc<Fs>| async move { fs.fsync(fh.0).await };
        self.answer("fsync", reply, work, done);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.ttl;
        let change = AttrChange {
            size,
            mode,
            uid,
            gid,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        let work =
            move |fs: Arc<Fs>| async move { fs.set_attrs(ino.0, change, fh.map(|f| f.0)).await };
        self.answer("setattr", reply, work, move |reply, a| {
            reply.attr(&ttl, &file_attr(&a))
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let work = move |fs: Arc<Fs>, name: String| async move { fs.unlink(parent.0, &name).await };
        self.answer_named("unlink", name, reply, work, done);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let work = move |fs: Arc<Fs>, name: String| async move {
            fs.mkdir_as(parent.0, &name, mode & !umask, who).await
        };
        self.answer_named("mkdir", name, reply, work, entry(self.ttl));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let mode = (mode & libc::S_IFMT) | (mode & !umask & 0o7777);
        let work = move |fs: Arc<Fs>, name: String| async move {
            fs.mknod(parent.0, &name, mode, rdev, who).await
        };
        self.answer_named("mknod", name, reply, work, entry(self.ttl));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        use std::os::unix::ffi::OsStrExt;
        let who = caller(req);
        let target = target.as_os_str().as_bytes().to_vec();
        let work = move |fs: Arc<Fs>, name: String| async move {
            fs.symlink(parent.0, &name, &target, who).await
        };
        self.answer_named("symlink", link_name, reply, work, entry(self.ttl));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let work = |fs: Arc<Fs>| async move { fs.readlink(ino.0).await };
        self.answer("readlink", reply, work, |reply, target| reply.data(&target));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.fs.link() {
            reply.error(errno("link", e));
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let work = move |fs: Arc<Fs>, name: String| async move { fs.rmdir(parent.0, &name).await };
        self.answer_named("rmdir", name, reply, work, done);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = match (utf8_name(name), utf8_name(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let work = move |fs: Arc<Fs>| async move {
            fs.rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await
        };
        self.answer("rename", reply, work, done);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", |fs| async move {
            let parent = if ino.0 == ROOT_INO {
                ROOT_INO
            } else {
                fs.parent_of(ino.0)
            };
            // Offsets: 1 is ".", 2 is "..", 3 + i is entry i; each entry carries the offset of
            // the one after it, as the kernel expects. Entries come in batches from the offset
            // asked for until the reply is full or holds `READDIR_REPLY_MAX`: a call costs what
            // it returns. Offset 0 is the first call or `rewinddir`: the directory as it is now.
            if offset == 0
                && let Err(e) = fs.rewinddir(fh.0).await
            {
                return reply.error(errno("readdir", e));
            }
            let mut next = offset;
            for (at, (ino, name)) in [(ino.0, "."), (parent, "..")].into_iter().enumerate() {
                if at as u64 >= next {
                    if reply.add(INodeNo(ino), at as u64 + 1, file_type(Kind::Dir), name) {
                        return reply.ok();
                    }
                    next = at as u64 + 1;
                }
            }
            loop {
                let room = READDIR_REPLY_MAX.saturating_sub(next - offset) as usize;
                if room == 0 {
                    break;
                }
                let batch = match fs.readdir(fh.0, next - 2, READDIR_BATCH.min(room)).await {
                    Ok(b) => b,
                    // What was added stays good; the kernel asks again from the next offset.
                    Err(_) if next > offset => break,
                    Err(e) => return reply.error(errno("readdir", e)),
                };
                if batch.is_empty() {
                    break;
                }
                for e in batch {
                    if reply.add(INodeNo(e.ino), next + 1, file_type(e.kind), &e.name) {
                        return reply.ok();
                    }
                    next += 1;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close(2): commit what this file table wrote, and tell the application if that
        // failed.
        let work = |fs: Arc<Fs>| async move { fs.flush(fh.0, lock_owner.0).await };
        self.answer("flush", reply, work, done);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS tells the kernel once that there are no extended attributes; it stops asking.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks, when wanted, are the kernel's (`default_permissions` with
        // `--allow-other`); everything that can be looked up is accessible.
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No ioctls (terminals ask TCGETS of every file they write to).
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A bucket has no fixed size; report a large, constant capacity so tools that check free
        // space (installers, `df`) do not refuse to write.
        const BLOCKS: u64 = 1 << 40;
        reply.statfs(BLOCKS, BLOCKS, BLOCKS, 1 << 32, 1 << 32, 4096, 255, 4096);
    }
}
