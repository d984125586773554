//! Metadata: what a path is (file, directory, nothing), cached with a TTL, and the rule that
//! turns object keys into file names.
//!
//! ## Directories
//! A bucket has no directories, only keys. A directory exists at `d/` when any key starts with
//! `d/`: a marker object `d/` (as `mkdir` and many tools create) or any object below it (an
//! *implicit* directory).
//!
//! ## Keys that cannot be file names (the rule)
//! A listing entry is shown only if its name is a valid file name: not empty, not `.` or `..`,
//! at most 255 bytes, no NUL byte. Otherwise it is **skipped with one warning** per key:
//! - `a//b`: the empty segment makes `a/` contain an entry with an empty name: skipped, so
//!   nothing under `a//` is reachable through the mount;
//! - `a/./b`, `a/../b`: skipped the same way;
//! - a segment over 255 bytes: skipped (the kernel could not look it up);
//! - an object `a` next to a prefix `a/` (a file and a directory of one name): the **directory
//!   shadows the file**; the file is not shown, and a warning names it;
//! - `.bucketfs` at the bucket root: reserved for bucketfs' own objects (lock leases), never shown;
//!   nor is the directory of lock objects when `--lock-prefix` puts it elsewhere.
//!
//! ## Cache
//! `lookup` answers from the complete listing of the parent directory when one is fresh (had
//! less than `--metadata-ttl` ago; a name it lacks, less than `--negative-metadata-ttl` ago). In
//! a directory not listed yet, the lookup lists it: one LIST page, kept if it holds the whole
//! directory (a larger directory is remembered as such and its names asked one by one), shared
//! by concurrent lookups. What a listing cannot say is still asked: an S3 listing carries no user
//! metadata, so an object's kind (a symlink is an object with a mode) and attributes come from
//! its HEAD, and a directory's from its marker's HEAD. So the kernel never caches an attribute a
//! listing guessed. A listed file of at most `--small-file-get` bytes is asked with a GET of its
//! bytes instead ([`Meta::get_small_files`]): the response carries what a HEAD says, the bytes go
//! to the memory tier, and the read that usually follows a lookup costs no request of its own.
//! Concurrent questions about one path (lookups, opens, prefetches) share one request. Without a listing, `lookup` asks a HEAD of `key` and a one-key LIST of
//! `key/`, at once. Answers are kept: a positive one for `--metadata-ttl`, a negative one
//! ("nothing there") for the shorter `--negative-metadata-ttl`, since that is the answer a user
//! notices when it is stale. A listing with attributes (GCS, `file://`) refreshes the entries of
//! every child it saw, so `ls -l` costs one LIST, not one HEAD per file.

//! ## Changes this mount makes
//! A change through this mount (a write's commit, a rename, an unlink, a `chmod`) forgets what
//! is known of the path and of its directory's listing. A question about them already on its
//! way may come back after that with the store as it was before: it is asked again, and the old
//! answer is not kept, or the mount would show the old version of a file it just wrote for a
//! whole TTL. [`Changes`] tells: a count of changes per stripe of keys, read when the question
//! is sent and again after its answer is kept (a stripe shared by another key only costs that
//! answer its place in the cache, or one question more).

//! ## During an outage
//! Answers stay in the cache past their TTL (up to [`META_CACHE_BYTES`], counted in bytes, least
//! recently used first out), and so does each directory's last complete listing (up to
//! [`LISTINGS_BYTES`]). An entry past its TTL is asked for again; if the store does not answer
//! (it is found unreachable, by this request or any other; see `store::retry::StoreHealth`), the
//! last answer is served, and the log says so. While the store is unreachable a question waits at
//! most [`OUTAGE_PROBE`] before the last answer is served, so `ls` and `stat` of known paths keep
//! answering at once, and the first answer that comes back ends the outage.

mod listed;
mod listing;
mod packed;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::store::attrs::FileAttrs;
use crate::store::{DynStore, ObjectMeta, StoreError, StoreResult, UserMeta, Version};

pub use listing::{DirStream, LIST_PAGE, STREAM_BYTES, STREAMS_BYTES};
pub use packed::PackedStat;

/// Cap of the attribute cache, in bytes of keys and answers, [`LISTED_BYTES`] of them for what
/// listings brought in: 32 MiB, about 80k paths of a `file://` mount with their attributes.
pub const META_CACHE_BYTES: u64 = 32 << 20;

/// The share of [`META_CACHE_BYTES`] that holds what listings brought in, first in, first out
/// (see [`listed`]): 16 MiB, about 40k entries of a `file://` listing, so `ls -l` of any
/// directory finds each entry there, and a plain `ls` of a directory that size followed by a
/// `stat` of each entry does too.
pub const LISTED_BYTES: u64 = 16 << 20;

/// Cap of the last complete listings kept to answer `ls` during an outage: 16 MiB (a directory of
/// about 100k entries; a larger one is listed again, or fails with EIO while the store is down).
pub const LISTINGS_BYTES: u64 = 16 << 20;

/// While the store is unreachable, how long a question waits for it before the last answer is
/// served: long enough for a store that came back to answer, short enough for `ls` to feel live.
pub const OUTAGE_PROBE: Duration = Duration::from_millis(500);

/// Bytes an entry of `name` with `stat` holds in a cache (the strings, the struct, the map).
fn weight(name: &str, stat: Option<&Stat>) -> u64 {
    let version = stat
        .and_then(|s| s.version.as_ref())
        .map_or(0, |v| v.0.len());
    let user: usize = stat
        .and_then(|s| s.user.as_ref())
        .map_or(0, |u| u.iter().map(|(k, v)| k.len() + v.len() + 16).sum());
    (name.len() + version + user + std::mem::size_of::<Known>() + 32) as u64
}

/// Stripes of [`Changes`]: 8 KiB of counters.
const CHANGE_STRIPES: usize = 1024;

/// Changes this mount made, counted per stripe of keys (see the module docs).
struct Changes(Box<[AtomicU64]>);

impl Changes {
    fn new() -> Changes {
        Changes((0..CHANGE_STRIPES).map(|_| AtomicU64::new(0)).collect())
    }

    fn stripe(&self, key: &str) -> &AtomicU64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        &self.0[h as usize % CHANGE_STRIPES]
    }

    /// The count of `key`'s stripe, to compare with later.
    fn seen(&self, key: &str) -> u64 {
        self.stripe(key).load(Ordering::SeqCst)
    }

    /// Counts a change of `key`, before what is known of it is forgotten: an answer kept after
    /// this is then found out by [`Changes::seen`], one kept before is forgotten.
    fn count(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
    }
}

/// What the store last said about a path, and when. Packed: the cache holds up to 200k of them.
#[derive(Clone, Debug)]
struct Known {
    stat: Option<PackedStat>,
    seen: Instant,
}

/// Bytes a moka entry costs besides its key and value (its node, the key's `Arc`, its places in
/// the eviction queues), as measured with moka 0.12.
const CACHE_ENTRY_OVERHEAD: usize = 160;

impl Known {
    /// Bytes this entry of `key` holds in the attribute cache.
    fn weight(&self, key: &str) -> u32 {
        let heap = key.len() + self.stat.as_ref().map_or(0, PackedStat::heap_bytes);
        (heap + std::mem::size_of::<(String, Known)>() + CACHE_ENTRY_OVERHEAD)
            .try_into()
            .unwrap_or(u32::MAX)
    }
}

/// The name reserved at the bucket root for bucketfs' own objects.
pub const RESERVED_ROOT_NAME: &str = ".bucketfs";

/// Longest file name the kernel accepts.
const NAME_MAX: usize = 255;

/// What a path is. Everything but `Dir` is one object at the path's key; which kind of file it
/// is comes from the `mode` its metadata records (s3fs's convention, see `store::attrs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The kind of an object whose metadata records `mode` (a plain file without one).
    pub fn of_object(mode: Option<u32>) -> Kind {
        match mode.map(|m| m & libc::S_IFMT) {
            Some(libc::S_IFLNK) => Kind::Symlink,
            Some(libc::S_IFIFO) => Kind::Fifo,
            Some(libc::S_IFSOCK) => Kind::Socket,
            Some(libc::S_IFCHR) => Kind::CharDevice,
            Some(libc::S_IFBLK) => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
        }
    }
}

/// What a path is, as last seen in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
    /// Object version, for objects (not directories).
    pub version: Option<Version>,
    /// The object's last modification in the store.
    pub mtime: SystemTime,
    /// The user metadata of the object (of a directory: of its marker; empty for an implicit
    /// directory). `None` when not known yet (an S3 listing does not say): such a stat is never
    /// cached, so the next lookup asks the store.
    pub user: Option<UserMeta>,
}

impl Stat {
    /// A directory with no metadata of its own.
    pub fn dir() -> Stat {
        Stat {
            kind: Kind::Dir,
            size: 0,
            version: None,
            mtime: SystemTime::UNIX_EPOCH,
            user: Some(UserMeta::new()),
        }
    }

    /// A directory whose marker object is `marker`.
    pub fn dir_of(marker: &ObjectMeta) -> Stat {
        Stat {
            mtime: marker.last_modified,
            user: marker.user.clone(),
            ..Stat::dir()
        }
    }

    /// An object (file, symlink, FIFO, ...).
    pub fn object(m: ObjectMeta) -> Stat {
        let attrs = m
            .user
            .as_ref()
            .map(FileAttrs::from_meta)
            .unwrap_or_default();
        Stat {
            kind: Kind::of_object(attrs.mode),
            size: m.size,
            version: Some(m.version),
            mtime: m.last_modified,
            user: m.user,
        }
    }

    /// The file attributes the metadata records.
    pub fn attrs(&self) -> FileAttrs {
        self.user
            .as_ref()
            .map(FileAttrs::from_meta)
            .unwrap_or_default()
    }
}

/// Why a listing entry is not shown.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    Empty,
    Dots,
    TooLong,
    Nul,
}

/// Checks that `name` (one key segment) can be a file name.
pub fn check_name(name: &str) -> Result<&str, Skip> {
    if name.is_empty() {
        Err(Skip::Empty)
    } else if name == "." || name == ".." {
        Err(Skip::Dots)
    } else if name.len() > NAME_MAX {
        Err(Skip::TooLong)
    } else if name.contains('\0') {
        Err(Skip::Nul)
    } else {
        Ok(name)
    }
}

/// A complete listing of a directory, sorted by name, and when it was had.
pub struct Listing {
    pub entries: Vec<DirEntry>,
    pub seen: Instant,
}

impl Listing {
    /// The entry named `name`.
    pub fn entry(&self, name: &str) -> Option<&DirEntry> {
        let at = self
            .entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()?;
        Some(&self.entries[at])
    }
}

/// The directory key (`""` or ending with `/`) and the name of `path_key`.
pub fn split_key(path_key: &str) -> (&str, &str) {
    match path_key.rfind('/') {
        Some(i) => (&path_key[..=i], &path_key[i + 1..]),
        None => ("", path_key),
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub stat: Stat,
}

/// Questions to the store being asked now, by key, which concurrent askers of the same key
/// share: one request, one answer for all of them.
struct Flights<T> {
    asked: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::OnceCell<T>>>>,
}

impl<T: Clone> Flights<T> {
    fn new() -> Self {
        Flights {
            asked: Default::default(),
        }
    }

    /// The answer of `ask` for `key`, or of the same question already on its way.
    async fn share<F: Future<Output = T>>(&self, key: &str, ask: impl FnOnce() -> F) -> T {
        let flight = self
            .asked
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .clone();
        let answer = flight.get_or_init(ask).await.clone();
        self.forget_flight(key, &flight);
        answer
    }

    fn forget_flight(&self, key: &str, flight: &Arc<tokio::sync::OnceCell<T>>) {
        let mut asked = self.asked.lock().unwrap();
        if asked.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            asked.remove(key);
        }
    }

    /// Later askers of `key` ask again rather than share what is on its way.
    fn forget(&self, key: &str) {
        self.asked.lock().unwrap().remove(key);
    }
}

/// Where the bytes of the small files that a lookup read whole go (the memory tier), with the
/// version they are of.
pub type BodySink = Arc<
    dyn Fn(String, Version, bytes::Bytes) -> futures::future::BoxFuture<'static, ()> + Send + Sync,
>;

/// Small files whose attributes are asked with a GET of their bytes (see the module docs).
struct SmallGets {
    /// Largest size, as the listing shows it.
    max: u64,
    sink: BodySink,
}

/// The metadata cache and the listing logic over a store.
pub struct Meta {
    store: DynStore,
    /// How long an answer is used without asking again.
    ttl: Duration,
    /// The same for "nothing there" (`--negative-metadata-ttl`).
    negative_ttl: Duration,
    /// Full path key (no trailing slash) -> what it is; `None` is a negative entry. Kept past the
    /// TTL, for outages.
    cache: moka::sync::Cache<String, Known>,
    /// What listings said lately of the entries they brought in (see [`listed`]).
    listed: listed::Listed,
    /// Directory key -> its last complete listing, for outages.
    listings: moka::sync::Cache<String, Arc<Listing>>,
    /// Bytes of entries held by all open [`DirStream`]s (capped by [`STREAMS_BYTES`]).
    stream_bytes: AtomicU64,
    /// Keys asked for per LIST request ([`LIST_PAGE`]).
    list_page: AtomicUsize,
    /// Directories found larger than one page by a lookup, and when: their names are looked up
    /// one by one.
    large_dirs: moka::sync::Cache<String, Instant>,
    /// The LIST a lookup is waiting for, per directory, which concurrent lookups share.
    listing_flights: Flights<Option<Arc<Listing>>>,
    /// The question about a path on its way, per path key, which concurrent lookups, opens and
    /// small-file prefetches share.
    resolve_flights: Flights<StoreResult<Option<Stat>>>,
    /// Small listed files asked with a GET instead of a HEAD, when set.
    small_gets: std::sync::OnceLock<SmallGets>,
    /// Keys already warned about, so a listing repeated every second does not flood the log.
    warned: moka::sync::Cache<String, ()>,
    /// Paths served as last seen recently: one log line per path and minute.
    stale_warned: moka::sync::Cache<String, ()>,
    /// Whether the mount's root is the bucket root (where [`RESERVED_ROOT_NAME`] is hidden).
    at_bucket_root: bool,
    /// Where write-lock objects live (full key ending with `/`): hidden wherever it is.
    lock_prefix: String,
    /// Changes this mount made, so that answers older than them are not kept.
    changes: Changes,
}

impl Meta {
    pub fn new(
        store: DynStore,
        ttl: Duration,
        at_bucket_root: bool,
        lock_prefix: &str,
    ) -> Arc<Meta> {
        Meta::with_ttls(store, ttl, ttl, at_bucket_root, lock_prefix)
    }

    /// `ttl` bounds how long what a path is (file or directory) is used without asking again,
    /// `negative_ttl` how long "nothing there" is.
    pub fn with_ttls(
        store: DynStore,
        ttl: Duration,
        negative_ttl: Duration,
        at_bucket_root: bool,
        lock_prefix: &str,
    ) -> Arc<Meta> {
        // Least recently used out, with no admission filter: moka's default (TinyLFU) refuses a
        // new entry while the cache is full of entries asked for more often, so past its cap
        // every entry a listing brings in (`ls -l` of a large directory) was refused and its
        // lookup asked the store again.
        let cache = moka::sync::Cache::builder()
            .max_capacity(META_CACHE_BYTES - LISTED_BYTES)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|k: &String, v: &Known| v.weight(k))
            .build();
        let listings = moka::sync::Cache::builder()
            .max_capacity(LISTINGS_BYTES)
            .weigher(|k: &String, v: &Arc<Listing>| {
                let bytes: u64 = v
                    .entries
                    .iter()
                    .map(|e| weight(&e.name, Some(&e.stat)))
                    .sum();
                (bytes + k.len() as u64).try_into().unwrap_or(u32::MAX)
            })
            .build();
        Arc::new(Meta {
            store,
            ttl,
            negative_ttl,
            cache,
            listed: listed::Listed::new(LISTED_BYTES),
            listings,
            stream_bytes: AtomicU64::new(0),
            list_page: AtomicUsize::new(LIST_PAGE),
            large_dirs: moka::sync::Cache::new(10_000),
            listing_flights: Flights::new(),
            resolve_flights: Flights::new(),
            small_gets: std::sync::OnceLock::new(),
            warned: moka::sync::Cache::new(10_000),
            stale_warned: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            at_bucket_root,
            lock_prefix: lock_prefix.to_string(),
            changes: Changes::new(),
        })
    }

    fn warn_once(&self, key: &str, why: &str) {
        if !self.warned.contains_key(key) {
            self.warned.insert(key.to_string(), ());
            tracing::warn!(key, "object not shown: {why}");
        }
    }

    /// Whether `name` in the directory `dir_key` is hidden by the reserved-name rule.
    pub fn is_reserved(&self, dir_key: &str, name: &str) -> bool {
        let lock_dir = self
            .lock_prefix
            .strip_prefix(dir_key)
            .and_then(|rest| rest.strip_suffix('/'));
        (self.at_bucket_root && dir_key.is_empty() && name == RESERVED_ROOT_NAME)
            || lock_dir == Some(name)
    }

    /// Forgets what is known about `path_key`, e.g. after this mount changed it.
    pub fn invalidate(&self, path_key: &str) {
        let (dir, _) = split_key(path_key);
        self.changes.count(path_key);
        self.changes.count(dir);
        self.forget_listed(path_key);
        self.resolve_flights.forget(path_key);
        self.listings.invalidate(dir);
    }

    /// What `known` says, if it is younger than the TTL of its kind of answer.
    fn fresh(&self, known: &Known) -> Option<Option<Stat>> {
        let ttl = match known.stat {
            Some(_) => self.ttl,
            None => self.negative_ttl,
        };
        (known.seen.elapsed() < ttl).then(|| known.stat.as_ref().map(PackedStat::unpack))
    }

    fn remember(&self, path_key: String, stat: Option<Stat>) {
        let known = Known {
            stat: stat.as_ref().map(PackedStat::pack),
            seen: Instant::now(),
        };
        self.cache.insert(path_key, known);
    }

    /// Keeps what a listing said of the entry `path_key` (see [`listed`]).
    fn remember_listed(&self, path_key: &str, stat: &Stat) {
        let known = Known {
            stat: Some(PackedStat::pack(stat)),
            seen: Instant::now(),
        };
        self.listed.insert(path_key, known);
    }

    /// The newer of what the attribute cache and the recent listings say of `path_key`.
    fn known(&self, path_key: &str) -> Option<Known> {
        match (self.cache.get(path_key), self.listed.get(path_key)) {
            (Some(a), Some(b)) if b.seen > a.seen => Some(b),
            (a, b) => a.or(b),
        }
    }

    /// Forgets what the attribute cache and the recent listings say of `path_key` (a change
    /// overtook a listing; [`Meta::invalidate`] also counts the change).
    fn forget_listed(&self, path_key: &str) {
        self.cache.invalidate(path_key);
        self.listed.remove(path_key);
    }

    /// Runs `asked`, unless the store turns out not to answer: `None` then, and the caller
    /// serves what it saw last. Without a way to tell (a store that is not watched), waits.
    async fn unless_outage<T>(
        &self,
        asked: impl Future<Output = StoreResult<T>>,
    ) -> Option<StoreResult<T>> {
        let Some(health) = self.store.health() else {
            return Some(asked.await);
        };
        let answer = if health.unreachable_since().is_some() {
            tokio::time::timeout(OUTAGE_PROBE, asked).await.ok()
        } else {
            tokio::select! {
                r = asked => Some(r),
                _ = health.until_unreachable() => None,
            }
        };
        match answer {
            Some(Err(e)) if e.is_retryable() => None,
            other => other,
        }
    }

    fn served_stale(&self, what: &'static str, key: &str) {
        crate::metrics::stale_metadata(what);
        if !self.stale_warned.contains_key(key) {
            self.stale_warned.insert(key.to_string(), ());
            tracing::warn!(
                key,
                what,
                "the store does not answer: serving what it said last"
            );
        }
    }

    /// What the last complete listing of its directory said about `path_key`, if one is kept
    /// and names it (listings do not carry every attribute, so this serves outages only).
    fn in_last_listing(&self, path_key: &str) -> Option<Stat> {
        let (dir, name) = split_key(path_key);
        Some(self.listings.get(dir)?.entry(name)?.stat.clone())
    }

    /// The complete listing of the directory `dir_key` had less than `--metadata-ttl` ago.
    pub fn fresh_listing(&self, dir_key: &str) -> Option<Arc<Listing>> {
        self.listings
            .get(dir_key)
            .filter(|l| l.seen.elapsed() < self.ttl)
    }

    /// A fresh complete listing of `dir_key` to answer lookups from: the one kept, or one LIST
    /// page of the directory now, if the whole directory fits in it (one request instead of a
    /// HEAD and a LIST per name looked up). A larger directory is remembered as such for the
    /// TTL, and its names are asked for one by one. Concurrent lookups share the one LIST.
    async fn listing_of(self: &Arc<Self>, dir_key: &str) -> Option<Arc<Listing>> {
        if self.ttl.is_zero() {
            return None;
        }
        if let Some(l) = self.fresh_listing(dir_key) {
            return Some(l);
        }
        if self
            .large_dirs
            .get(dir_key)
            .is_some_and(|at| at.elapsed() < self.ttl)
        {
            return None;
        }
        self.listing_flights
            .share(dir_key, || async {
                let mut stream = self.open_dir(dir_key);
                match stream.first_page_is_all().await {
                    Ok(true) => self.fresh_listing(dir_key),
                    Ok(false) => {
                        self.large_dirs.insert(dir_key.to_string(), Instant::now());
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
    }

    /// From now on, a listed file of at most `max` bytes, on a store whose listings lack
    /// attributes but whose GETs carry them (S3), has its attributes asked with one GET of its
    /// bytes instead of a HEAD; the bytes go to `sink`. Set once; `max` 0 leaves HEADs.
    pub fn get_small_files(&self, max: u64, sink: BodySink) {
        if max > 0 && self.store.get_carries_meta() {
            let _ = self.small_gets.set(SmallGets { max, sink });
        }
    }

    /// The metadata of the listed object `path_key` (listed with `size` bytes): its HEAD, or for
    /// a small file a GET whose bytes go to the sink (see [`Meta::get_small_files`]).
    async fn object_meta(&self, path_key: &str, size: u64) -> StoreResult<ObjectMeta> {
        let Some(small) = self.small_gets.get().filter(|g| size > 0 && size <= g.max) else {
            return self.store.head(path_key).await;
        };
        let (meta, body) = self.store.get_with_meta(path_key, small.max).await?;
        if let Some(body) = body
            && Stat::object(meta.clone()).kind == Kind::File
        {
            crate::metrics::small_file_prefetch("read_at_lookup");
            (small.sink)(path_key.to_string(), meta.version.clone(), body).await;
        }
        Ok(meta)
    }

    /// What `path_key` (a full key without trailing slash) is: a directory, a file, or nothing.
    /// Never an answer older than a change this mount made to it before the answer came: one
    /// that a change overtook on its way is asked again.
    pub async fn resolve(self: &Arc<Self>, path_key: &str) -> StoreResult<Option<Stat>> {
        let mut attempts = 3;
        loop {
            attempts -= 1;
            let since = self.changes.seen(path_key);
            let stat = self.resolve_once(path_key).await?;
            if attempts == 0 || self.changes.seen(path_key) == since {
                return Ok(stat);
            }
        }
    }

    async fn resolve_once(self: &Arc<Self>, path_key: &str) -> StoreResult<Option<Stat>> {
        let known = self.known(path_key);
        if let Some(fresh) = known.as_ref().and_then(|k| self.fresh(k)) {
            return Ok(fresh);
        }
        // The answer is kept before the flight ends, so no question comes between the two and
        // asks the store again; and a flight that starts just after another ended (this asker
        // found the cache empty while that one was on its way) finds its answer there.
        let asked = self.resolve_flights.share(path_key, || async {
            if let Some(fresh) = self.known(path_key).and_then(|k| self.fresh(&k)) {
                return Ok(fresh);
            }
            let since = self.changes.seen(path_key);
            let stat = self.resolve_uncached(path_key).await?;
            self.remember(path_key.to_string(), stat.clone());
            if self.changes.seen(path_key) != since {
                self.cache.invalidate(path_key);
            }
            Ok(stat)
        });
        let last_seen = match known {
            Some(k) => Some(k.stat.as_ref().map(PackedStat::unpack)),
            None => self.in_last_listing(path_key).map(Some),
        };
        let stat = match last_seen {
            None => asked.await?,
            Some(last) => match self.unless_outage(asked).await {
                Some(answer) => answer?,
                None => {
                    self.served_stale("attr", path_key);
                    return Ok(last);
                }
            },
        };
        Ok(stat)
    }

    async fn resolve_uncached(self: &Arc<Self>, path_key: &str) -> StoreResult<Option<Stat>> {
        let dir_prefix = format!("{path_key}/");
        let (dir, name) = split_key(path_key);
        if let Some(listing) = self.listing_of(dir).await {
            match listing.entry(name) {
                // Absence from a listing holds as long as a negative answer does.
                None if listing.seen.elapsed() < self.negative_ttl => return Ok(None),
                None => {}
                // A directory's own metadata is its marker's: one HEAD, nothing else to ask.
                Some(e) if e.stat.kind == Kind::Dir => {
                    return match self.store.head(&dir_prefix).await {
                        Ok(m) => Ok(Some(Stat::dir_of(&m))),
                        Err(StoreError::NotFound(_)) => Ok(Some(Stat::dir())),
                        Err(e) => Err(e),
                    };
                }
                Some(e) if e.stat.user.is_some() => return Ok(Some(e.stat.clone())),
                // An S3 listing does not say what kind of file an object is, nor its
                // attributes: the object's HEAD does, or the GET of a small file (and no LIST
                // is needed: no directory).
                Some(e) => {
                    return match self.object_meta(path_key, e.stat.size).await {
                        Ok(m) => Ok(Some(Stat::object(m))),
                        Err(StoreError::NotFound(_)) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
            }
        }
        let (head, list) = tokio::join!(
            self.store.head(path_key),
            self.store.list(&dir_prefix, Some("/"), None, 1)
        );
        let list = list?;
        if !list.objects.is_empty() || !list.prefixes.is_empty() {
            if head.is_ok() {
                self.warn_once(path_key, "a directory of the same name shadows it");
            }
            // The marker, if any, holds the directory's own metadata; a listing shows it first
            // but may not carry its metadata (S3), or not show it (a local directory with
            // entries), so only a listed marker with metadata saves asking.
            let marker = match list.objects.first() {
                Some(m) if m.key == dir_prefix && m.user.is_some() => Some(m.clone()),
                _ => match self.store.head(&dir_prefix).await {
                    Ok(m) => Some(m),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                },
            };
            return Ok(Some(marker.as_ref().map_or_else(Stat::dir, Stat::dir_of)));
        }
        match head {
            Ok(m) => Ok(Some(Stat::object(m))),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Re-reads a file's metadata from the store (ignoring the cache) and caches the answer.
    pub async fn refresh_file(self: &Arc<Self>, path_key: &str) -> StoreResult<Option<Stat>> {
        self.invalidate(path_key);
        self.resolve(path_key).await
    }

    /// A listing of the directory `dir_key` (`""` or ending with `/`), paged in from the store
    /// as it is read (see [`listing`]).
    pub fn open_dir(self: &Arc<Self>, dir_key: &str) -> DirStream {
        DirStream::new(self.clone(), dir_key)
    }

    /// Every visible entry of the directory `dir_key`, sorted by name, following the rules in
    /// the module docs. During an outage, the last complete listing of the directory, if kept.
    pub async fn list_dir(self: &Arc<Self>, dir_key: &str) -> StoreResult<Vec<DirEntry>> {
        let mut stream = self.open_dir(dir_key);
        let mut all = Vec::new();
        loop {
            let more = stream.entries_from(all.len() as u64, LIST_PAGE).await?;
            if more.is_empty() {
                break;
            }
            all.extend(more);
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Keys asked for per LIST request.
    pub fn list_page_size(&self) -> usize {
        self.list_page.load(Ordering::Relaxed)
    }

    /// Sets the keys asked for per LIST request (tests list many pages with few keys).
    pub fn set_list_page_size(&self, keys: usize) {
        self.list_page.store(keys.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::{MemStore, Op};
    use crate::store::{ObjectStore, Precondition};
    use bytes::Bytes;

    const LOCKS: &str = crate::config::LOCK_PREFIX;

    async fn store_with(keys: &[&str]) -> Arc<MemStore> {
        let s = Arc::new(MemStore::new("b"));
        for k in keys {
            s.put(k, Bytes::from_static(b"x"), Precondition::None)
                .await
                .unwrap();
        }
        s
    }

    fn names(entries: &[DirEntry]) -> Vec<(&str, Kind)> {
        entries
            .iter()
            .map(|e| (e.name.as_str(), e.stat.kind))
            .collect()
    }

    #[tokio::test]
    async fn lists_files_implicit_dirs_and_markers() {
        let s = store_with(&["a.txt", "d/x", "m/", "d/y/z"]).await;
        let meta = Meta::new(s, Duration::from_secs(60), true, LOCKS);
        let root = meta.list_dir("").await.unwrap();
        assert_eq!(
            names(&root),
            vec![("a.txt", Kind::File), ("d", Kind::Dir), ("m", Kind::Dir)]
        );
        assert_eq!(names(&meta.list_dir("m/").await.unwrap()), vec![]);
        assert_eq!(
            names(&meta.list_dir("d/").await.unwrap()),
            vec![("x", Kind::File), ("y", Kind::Dir)]
        );
    }

    #[tokio::test]
    async fn skips_keys_that_cannot_be_file_names() {
        let long = format!("long/{}", "n".repeat(256));
        let ok = format!("long/{}", "n".repeat(255));
        let s = store_with(&[
            "a//b",
            "a/./c",
            "a/../d",
            "a/ok",
            &long,
            &ok,
            "shadow",
            "shadow/inner",
            ".bucketfs/locks/x",
        ])
        .await;
        let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
        assert_eq!(
            names(&meta.list_dir("a/").await.unwrap()),
            vec![("ok", Kind::File)]
        );
        let long_entries = meta.list_dir("long/").await.unwrap();
        assert_eq!(long_entries.len(), 1);
        assert_eq!(long_entries[0].name.len(), 255);
        let root = meta.list_dir("").await.unwrap();
        assert_eq!(
            names(&root),
            vec![("a", Kind::Dir), ("long", Kind::Dir), ("shadow", Kind::Dir)]
        );
        // Lookup agrees with the listing: the directory shadows the file.
        assert_eq!(
            meta.resolve("shadow").await.unwrap().unwrap().kind,
            Kind::Dir
        );
    }

    #[tokio::test]
    async fn reserved_name_is_shown_below_the_bucket_root() {
        let s = store_with(&["p/.bucketfs"]).await;
        let meta = Meta::new(s, Duration::from_secs(60), false, LOCKS);
        assert_eq!(
            names(&meta.list_dir("p/").await.unwrap()),
            vec![(".bucketfs", Kind::File)]
        );
    }

    #[tokio::test]
    async fn a_lock_prefix_elsewhere_is_hidden_too() {
        let s = store_with(&["a/locks/x", "a/locksmith", "a/b", "locks"]).await;
        let meta = Meta::new(s, Duration::from_secs(60), true, "a/locks/");
        assert_eq!(
            names(&meta.list_dir("a/").await.unwrap()),
            vec![("b", Kind::File), ("locksmith", Kind::File)]
        );
        assert_eq!(names(&meta.list_dir("").await.unwrap()).len(), 2);
        assert!(meta.is_reserved("a/", "locks") && !meta.is_reserved("", "locks"));
    }

    #[tokio::test]
    async fn caches_positive_and_negative_answers_until_invalidated() {
        let s = store_with(&["f"]).await;
        let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
        assert_eq!(meta.resolve("f").await.unwrap().unwrap().kind, Kind::File);
        assert_eq!(meta.resolve("missing").await.unwrap(), None);
        let heads = s.calls(Op::Head);
        assert_eq!(meta.resolve("f").await.unwrap().unwrap().size, 1);
        assert_eq!(meta.resolve("missing").await.unwrap(), None);
        assert_eq!(s.calls(Op::Head), heads, "answers come from the cache");
        s.put("missing", Bytes::from_static(b"now"), Precondition::None)
            .await
            .unwrap();
        meta.invalidate("missing");
        assert_eq!(meta.resolve("missing").await.unwrap().unwrap().size, 3);
    }

    #[tokio::test]
    async fn negative_answers_have_their_own_ttl() {
        let s = store_with(&["f"]).await;
        let meta = Meta::with_ttls(
            s.clone(),
            Duration::from_secs(60),
            Duration::ZERO,
            true,
            LOCKS,
        );
        assert_eq!(meta.resolve("missing").await.unwrap(), None);
        s.put("missing", Bytes::from_static(b"now"), Precondition::None)
            .await
            .unwrap();
        // Absence is not remembered: the file written meanwhile is found, no invalidation.
        assert_eq!(meta.resolve("missing").await.unwrap().unwrap().size, 3);
        let heads = s.calls(Op::Head);
        meta.resolve("missing").await.unwrap();
        assert_eq!(
            s.calls(Op::Head),
            heads,
            "positive answers are still cached"
        );
    }

    /// What a listing brings in does not go through the attribute cache, where each entry of a
    /// directory larger than the cache evicted another (and the answers lookups had put there):
    /// the lookups that follow the listing are answered all the same, without the store.
    #[tokio::test]
    async fn a_listing_leaves_the_attribute_cache_to_lookups() {
        let keys: Vec<String> = (0..3000).map(|n| format!("d/f{n:05}")).collect();
        let mut all: Vec<&str> = keys.iter().map(String::as_str).collect();
        all.push("e/g");
        let s = store_with(&all).await;
        let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
        assert!(meta.resolve("e/g").await.unwrap().is_some());
        assert_eq!(meta.list_dir("d/").await.unwrap().len(), 3000);
        meta.cache.run_pending_tasks();
        assert_eq!(meta.cache.entry_count(), 1, "only the lookup's answer");
        assert!(meta.cache.contains_key("e/g"));
        let asked = (s.calls(Op::Head), s.calls(Op::List));
        for k in &keys {
            assert_eq!(meta.resolve(k).await.unwrap().unwrap().kind, Kind::File);
        }
        assert_eq!((s.calls(Op::Head), s.calls(Op::List)), asked);
        // A change this mount makes forgets what the listing said.
        s.put("d/f00007", Bytes::from_static(b"four"), Precondition::None)
            .await
            .unwrap();
        meta.invalidate("d/f00007");
        assert_eq!(meta.resolve("d/f00007").await.unwrap().unwrap().size, 4);
    }

    #[tokio::test]
    async fn zero_ttl_disables_caching() {
        let s = store_with(&["f"]).await;
        let meta = Meta::new(s.clone(), Duration::ZERO, true, LOCKS);
        meta.resolve("f").await.unwrap();
        meta.resolve("f").await.unwrap();
        assert_eq!(s.calls(Op::Head), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn known_metadata_is_served_while_the_store_does_not_answer() {
        use crate::store::mem::Fault;
        use crate::store::retry::{RetryPolicy, Retrying};
        let mem = store_with(&["a/f", "a/g"]).await;
        let policy = RetryPolicy {
            metadata_timeout: Duration::from_secs(1),
            read_deadline: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let store: DynStore = Arc::new(Retrying::new(mem.clone(), policy));
        let meta = Meta::new(store, Duration::from_secs(1), true, LOCKS);
        assert_eq!(meta.list_dir("a/").await.unwrap().len(), 2);
        assert!(meta.resolve("a/f").await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        mem.inject(Op::Head, Fault::Hang, 1000);
        mem.inject(Op::List, Fault::Hang, 1000);
        // Past the TTL: asked again, and answered as last seen once the store is found down,
        // long before the read deadline.
        let start = tokio::time::Instant::now();
        let f = meta.resolve("a/f").await.unwrap().unwrap();
        assert_eq!((f.kind, f.size), (Kind::File, 1));
        assert!(start.elapsed() <= Duration::from_millis(1050));
        let start = tokio::time::Instant::now();
        assert_eq!(names(&meta.list_dir("a/").await.unwrap()).len(), 2);
        assert!(
            start.elapsed() <= OUTAGE_PROBE + Duration::from_millis(50),
            "{:?}",
            start.elapsed()
        );
        // What was never seen cannot be served.
        assert!(meta.resolve("a/nothing").await.is_err());
        // The store back, answers are fresh again.
        mem.clear_faults();
        mem.put("a/f", Bytes::from_static(b"xyz"), Precondition::None)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(meta.resolve("a/f").await.unwrap().unwrap().size, 3);
    }

    /// A file this mount changes while a question about it (a HEAD, as on S3, or the LIST of
    /// its directory, as on GCS) is on its way, answered as the store was before the change: neither
    /// that question nor the next is answered from that.
    #[tokio::test(start_paused = true)]
    async fn an_answer_older_than_a_change_is_neither_kept_nor_given() {
        use crate::store::mem::Fault;
        for (op, bare) in [(Op::Head, true), (Op::List, false)] {
            let s = store_with(&["d/f", "d/g"]).await;
            s.list_without_metadata(bare);
            let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
            if op == Op::Head {
                // The directory listed first, so the question about the file is its HEAD.
                assert_eq!(meta.list_dir("d/").await.unwrap().len(), 2);
            }
            // Every answer takes a second, the one asked before the change too.
            s.inject(op, Fault::LateAnswer(Duration::from_secs(1)), 2);
            let asking = tokio::spawn({
                let meta = meta.clone();
                async move { meta.resolve("d/f").await }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let new = s
                .put("d/f", Bytes::from_static(b"new!"), Precondition::None)
                .await
                .unwrap();
            meta.invalidate("d/f");
            // The old answer came at 1 s: a question asked after it is not answered from it.
            tokio::time::sleep(Duration::from_millis(1400)).await;
            let now = meta.resolve("d/f").await.unwrap().unwrap();
            assert_eq!((now.size, now.version), (4, Some(new)), "{op:?}");
            // Nor is the question that was on its way: it asked again.
            let first = asking.await.unwrap().unwrap().unwrap();
            assert_eq!(first.size, 4, "{op:?}");
        }
    }

    /// The listing of `dir` as one page of everything would show it (the rules applied to the
    /// whole listing at once), sorted by name.
    fn reference(keys: &[&str], dir: &str) -> Vec<(String, Kind)> {
        let mut files = std::collections::BTreeSet::new();
        let mut dirs = std::collections::BTreeSet::new();
        for k in keys {
            let Some(rest) = k.strip_prefix(dir) else {
                continue;
            };
            match rest.find('/') {
                Some(i) if check_name(&rest[..i]).is_ok() => {
                    dirs.insert(rest[..i].to_string());
                }
                None if check_name(rest).is_ok() => {
                    files.insert(rest.to_string());
                }
                _ => {}
            }
        }
        let mut out: Vec<(String, Kind)> = files
            .into_iter()
            .filter(|f| !dirs.contains(f))
            .map(|f| (f, Kind::File))
            .chain(dirs.iter().map(|d| (d.clone(), Kind::Dir)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[tokio::test]
    async fn shadowing_holds_across_pages_of_any_size() {
        // `a` and `a/` are far apart in key order: `a!`, `a-b`, `a.txt` sort between them,
        // and `a-b` is itself shadowed by `a-b/`, which also comes before `a/`.
        let keys = [
            "a", "a!", "a-b", "a-b-c", "a-b/x", "a.txt", "a/x", "a/y/z", "a0", "b", "b/", "c",
            "d-", "d/",
        ];
        let want = reference(&keys, "");
        assert!(
            want.contains(&("a".into(), Kind::Dir)) && want.contains(&("a-b-c".into(), Kind::File))
        );
        let s = store_with(&keys).await;
        for page in 1..=keys.len() + 1 {
            let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
            meta.set_list_page_size(page);
            let got: Vec<(String, Kind)> = meta
                .list_dir("")
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.name, e.stat.kind))
                .collect();
            assert_eq!(got, want, "page size {page}");
        }
    }

    #[tokio::test]
    async fn a_listing_is_fetched_page_by_page_as_offsets_reach_its_end() {
        let keys: Vec<String> = (0..250).map(|i| format!("d/f{i:04}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let s = store_with(&refs).await;
        let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
        meta.set_list_page_size(100);
        let mut stream = meta.open_dir("d/");
        let before = s.calls(Op::List);
        let first = stream.entries_from(0, 10).await.unwrap();
        assert_eq!(first[0].name, "f0000");
        assert_eq!(
            s.calls(Op::List) - before,
            1,
            "the first readdir asks for one page"
        );
        // Offsets inside what was fetched cost nothing. (The page's last file waits for the
        // next page, which could hold a directory of its name.)
        assert_eq!(stream.entries_from(90, 10).await.unwrap().len(), 9);
        assert_eq!(s.calls(Op::List) - before, 1);
        // Reaching the end of the first page fetches the second, and only it.
        assert_eq!(stream.entries_from(100, 10).await.unwrap()[0].name, "f0100");
        assert_eq!(s.calls(Op::List) - before, 2);
        // Back to an offset already given: the same entry.
        assert_eq!(stream.entries_from(5, 1).await.unwrap()[0].name, "f0005");
        let mut names = Vec::new();
        loop {
            let more = stream.entries_from(names.len() as u64, 64).await.unwrap();
            if more.is_empty() {
                break;
            }
            names.extend(more.into_iter().map(|e| e.name));
        }
        assert_eq!(names.len(), 250);
        assert_eq!(s.calls(Op::List) - before, 3);
        assert!(stream.entries_from(250, 10).await.unwrap().is_empty());
        assert_eq!(s.calls(Op::List) - before, 3, "the end is known");
    }

    #[tokio::test]
    async fn memory_of_a_stream_stays_bounded_and_early_offsets_list_again() {
        let keys: Vec<String> = (0..30_000)
            .map(|i| format!("{}{i:05}", "n".repeat(200)))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let s = store_with(&refs).await;
        let meta = Meta::new(s.clone(), Duration::from_secs(60), true, LOCKS);
        let mut stream = meta.open_dir("");
        let one = weight(
            &keys[0],
            Some(&Stat::object(s.head(&keys[0]).await.unwrap())),
        );
        let mut at = 0u64;
        let mut seen = 0;
        loop {
            let more = stream.entries_from(at, 50).await.unwrap();
            if more.is_empty() {
                break;
            }
            assert_eq!(more[0].name, keys[at as usize]);
            at += more.len() as u64;
            seen += more.len();
            assert!(
                stream.held_bytes() <= STREAM_BYTES + LIST_PAGE as u64 * one,
                "{}",
                stream.held_bytes()
            );
            assert_eq!(
                meta.stream_bytes.load(Ordering::Relaxed),
                stream.held_bytes()
            );
        }
        assert_eq!(seen, keys.len());
        let lists = s.calls(Op::List);
        // More than a stream keeps: offset 0 lists again, from the first page.
        assert!(keys.len() as u64 * one > STREAM_BYTES);
        assert_eq!(stream.entries_from(0, 1).await.unwrap()[0].name, keys[0]);
        assert_eq!(s.calls(Op::List), lists + 1);
        drop(stream);
        assert_eq!(meta.stream_bytes.load(Ordering::Relaxed), 0);
    }
}
