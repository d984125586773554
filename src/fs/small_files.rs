//! Small-file prefetch: when an application opens the files of a directory one after another in
//! listing order (`cat dir/*`, a data loader walking a folder of images), the next small files
//! are fetched whole before they are asked for, so each open finds its bytes in memory instead of
//! waiting a round trip.
//!
//! ## When
//! An open of a file of at most `--small-file-prefetch` bytes, in a directory whose complete
//! listing the mount holds fresh (`meta::Meta::fresh_listing`: after an `ls`, a glob, or the LIST
//! a lookup made), that comes after the previous open in the same directory by at most
//! [`AHEAD`] entries of the listing (sorted by name, as `ls` and a glob sort). Then the next
//! [`AHEAD`] small files of the listing are fetched, [`IN_FLIGHT`] at a time; each file once.
//! An open of a file whose prefetch is fetching it waits for that GET rather than make its own;
//! one whose prefetch is still waiting for its turn calls it off and reads the file itself.
//!
//! Lookups that follow the listing the same way (`ls -l`, `find`, a loader that `stat`s each
//! file first) get the same help for attributes where the listing lacks them (S3): the names
//! ahead are asked with the question their lookups would ask (`Meta::resolve`: a HEAD, or a
//! small file's GET), which those lookups then share or find answered. A walk asks [`AHEAD`]
//! names ahead at first, then as many as it has looked up in order, up to [`LOOKUP_AHEAD`],
//! [`LOOKUPS_IN_FLIGHT`] at a time: like a readahead window, the look-ahead doubles each round
//! trip while the walk keeps to the listing, so `ls -l` of a large directory soon waits one round
//! trip per [`LOOKUPS_IN_FLIGHT`] files, and a `stat` of a few files asks little ahead. Their
//! budget is not the prefetch's: a walk's questions never hold up the prefetch of opens, nor the
//! other way round. Both are off with `--small-file-prefetch 0`.
//!
//! ## What, and where it goes
//! A prefetch asks what the open will ask (`Meta::resolve`, the same cached or shared answer: on
//! S3 the object's HEAD, since an S3 listing does not carry a file's kind and attributes, or for
//! a file of at most `--small-file-get` bytes the GET that brings its bytes with them; on GCS and
//! `file://` nothing, the listing does), then, unless that answer brought the bytes, GETs the
//! whole object pinned to that version, and puts it in the memory tier as the object's block 0,
//! keyed by its version, where the read path looks first ([`into_memory`] is where a lookup's
//! GET puts them too). So the prefetched bytes live inside `--max-memory` (the memory tier's share,
//! evicted like any block), an open that resolves to another version (the object changed and the
//! TTL ran out) never sees them, and nothing in the read path knows about prefetch. Objects over
//! one block are never prefetched.
//!
//! ## Cost
//! At most [`AHEAD`] files fetched that are never opened, per directory walked in order; one
//! GET per prefetched file (on S3 a file over `--small-file-get` also costs its HEAD), which the
//! open would have asked anyway. Asking ahead of lookups costs no question the lookups would not
//! ask, except the names asked that a walk that stops never looks up: per directory walked, as
//! many as it looked up in order or [`AHEAD`], whichever is more, and never over [`LOOKUP_AHEAD`]
//! (HEADs, or GETs of at most `--small-file-get` bytes each). It does not ask faster than the walk
//! looks up, only earlier: the questions in flight overlap their round trips. The bodies of those
//! in flight take at most [`LOOKUPS_IN_FLIGHT`] x `--small-file-get` bytes (4 MiB by default).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::cache::{BLOCK_SIZE, BlockKey};
use crate::meta::{Kind, Meta};
use crate::read::ReadContext;
use crate::store::Version;

/// Files fetched ahead of the last one opened: enough to hide a 25 ms round trip behind reads of
/// small files from the page cache, few enough that a walk that stops wastes little.
pub const AHEAD: usize = 16;

/// Prefetch GETs in flight at once, for the whole mount.
pub const IN_FLIGHT: usize = 8;

/// Most names asked ahead of the last one a walk of lookups looked up: twice
/// [`LOOKUPS_IN_FLIGHT`], so that while those are on their way the next ones are named, and a
/// walk that outruns the store finds a full budget of questions ahead of it.
pub const LOOKUP_AHEAD: usize = 128;

/// Questions asked ahead of lookups in flight at once, for the whole mount: at a 25 ms round trip,
/// 64 answer about 2,500 names a second, about what a mount answers `stat`s at with no latency.
/// A HEAD or a GET of a small file asks the store little; and the walk's own pace, not this
/// number, sets how fast names are asked.
pub const LOOKUPS_IN_FLIGHT: usize = 64;

/// Where the last opens of each directory were, and which files are fetched or being fetched.
pub struct SmallFiles {
    meta: Arc<Meta>,
    read: Arc<ReadContext>,
    /// Largest object fetched ahead (`--small-file-prefetch`, at most one block); 0: off.
    limit: u64,
    /// Directory key -> position in its listing of the last file opened there.
    last_open: moka::sync::Cache<String, usize>,
    /// Directory key -> where its walk of lookups is.
    walks: moka::sync::Cache<String, Walk>,
    /// (key, version) of files fetched or being fetched ahead (each is fetched once).
    issued: moka::sync::Cache<(String, String), ()>,
    /// (key, version) of files fetched ahead, until their open.
    ready: moka::sync::Cache<(String, String), ()>,
    in_flight: Arc<Semaphore>,
    /// Questions asked ahead of lookups on their way ([`LOOKUPS_IN_FLIGHT`]).
    lookups_in_flight: Arc<Semaphore>,
    /// Key -> its prefetch, from when it is issued until it ends: so that an open and its
    /// prefetch never both GET the file (see [`SmallFiles::opened`]).
    fetches: Arc<std::sync::Mutex<std::collections::HashMap<String, Fetch>>>,
}

/// Where a walk of lookups of a directory is, in its listing.
#[derive(Clone, Copy)]
struct Walk {
    /// The position of the last name looked up.
    at: usize,
    /// Names looked up in listing order so far (the look-ahead grows with it).
    run: usize,
    /// The names before this position are asked already, from the listing had at `listing`.
    asked_to: usize,
    listing: tokio::time::Instant,
}

/// Where the prefetch of a file is.
enum Fetch {
    /// Waiting for its turn ([`IN_FLIGHT`]).
    Queued,
    /// Still waiting, but the file was opened meanwhile: its read fetches it, the prefetch not.
    Opened,
    /// Fetching; the semaphore is closed when it ends.
    Running(Arc<Semaphore>),
}

/// Ends a running prefetch (also one cut short): its entry goes, and opens waiting on it go on.
struct Ended {
    fetches: Arc<std::sync::Mutex<std::collections::HashMap<String, Fetch>>>,
    key: String,
    done: Arc<Semaphore>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let mut fetches = self.fetches.lock().unwrap();
        if matches!(fetches.get(&self.key), Some(Fetch::Running(d)) if Arc::ptr_eq(d, &self.done)) {
            fetches.remove(&self.key);
        }
        self.done.close();
    }
}

impl SmallFiles {
    pub fn new(meta: Arc<Meta>, read: Arc<ReadContext>, limit: u64) -> SmallFiles {
        SmallFiles {
            meta,
            read,
            limit: limit.min(BLOCK_SIZE),
            last_open: moka::sync::Cache::new(1024),
            walks: moka::sync::Cache::new(1024),
            issued: moka::sync::Cache::new(16 * 1024),
            ready: moka::sync::Cache::new(16 * 1024),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            lookups_in_flight: Arc::new(Semaphore::new(LOOKUPS_IN_FLIGHT)),
            fetches: Default::default(),
        }
    }

    /// `path_key` was looked up: if the lookups of its directory follow its listing (`ls -l`,
    /// `find`, a loader that `stat`s before it opens), asks ahead what the lookups of the next
    /// names will ask, where the listing does not say it (S3: a HEAD, or a small file's GET):
    /// [`AHEAD`] names at first, as many as the walk looked up in order later, up to
    /// [`LOOKUP_AHEAD`], [`LOOKUPS_IN_FLIGHT`] at a time, so they find their answers at hand.
    pub fn looked_up(&self, path_key: &str) {
        if self.limit == 0 {
            return;
        }
        let (dir, name) = crate::meta::split_key(path_key);
        let Some(listing) = self.meta.fresh_listing(dir) else {
            return;
        };
        let Some(at) = position(&listing, name) else {
            return;
        };
        let walk = match self.walks.get(dir) {
            Some(w) if follows(w.at, at) => Walk {
                at,
                run: w.run + 1,
                asked_to: if w.listing == listing.seen {
                    w.asked_to.max(at + 1)
                } else {
                    at + 1
                },
                listing: listing.seen,
            },
            _ => Walk {
                at,
                run: 1,
                asked_to: at + 1,
                listing: listing.seen,
            },
        };
        // A first lookup is no walk yet: nothing is asked ahead of it.
        let ahead = if walk.run > 1 {
            walk.run.clamp(AHEAD, LOOKUP_AHEAD)
        } else {
            0
        };
        let front = (at + 1 + ahead).min(listing.entries.len());
        let from = walk.asked_to.min(front);
        self.walks.insert(
            dir.to_string(),
            Walk {
                asked_to: walk.asked_to.max(front),
                ..walk
            },
        );
        for e in &listing.entries[from..front] {
            if e.stat.kind == Kind::Dir || e.stat.user.is_some() {
                continue;
            }
            let key = format!("{dir}{}", e.name);
            let (meta, permits) = (self.meta.clone(), self.lookups_in_flight.clone());
            tokio::spawn(async move {
                if let Ok(_permit) = permits.acquire_owned().await {
                    let _ = meta.resolve(&key).await;
                }
            });
        }
    }

    /// The fresh listing of `dir` and the position of `name` in it, if the opens there follow
    /// the listing (`name` is the next open of the walk, which it becomes).
    fn opened_in_order(&self, dir: &str, name: &str) -> Option<(Arc<crate::meta::Listing>, usize)> {
        let listing = self.meta.fresh_listing(dir)?;
        let at = position(&listing, name)?;
        let previous = self.last_open.get(dir);
        self.last_open.insert(dir.to_string(), at);
        previous
            .is_some_and(|p| follows(p, at))
            .then_some((listing, at))
    }

    /// `key` (of `size` bytes, at `version`) is being opened for reading: waits for its
    /// prefetch if one is fetching it (one GET, which the read would otherwise make again), or
    /// calls off one still waiting for its turn; counts a hit if it was fetched ahead; and
    /// fetches the next small files if the opens follow the listing.
    pub async fn opened(&self, key: &str, version: &str, size: u64) {
        if self.limit == 0 || size > self.limit {
            return;
        }
        let running = match self.fetches.lock().unwrap().get_mut(key) {
            Some(Fetch::Running(done)) => Some(done.clone()),
            Some(queued) => {
                *queued = Fetch::Opened;
                None
            }
            None => None,
        };
        if let Some(done) = running {
            // Closed when the prefetch ends.
            let _ = done.acquire().await;
        }
        let id = (key.to_string(), version.to_string());
        if self.ready.contains_key(&id) {
            self.ready.invalidate(&id);
            crate::metrics::small_file_prefetch("hit");
        }
        let (dir, name) = crate::meta::split_key(key);
        let Some((listing, at)) = self.opened_in_order(dir, name) else {
            return;
        };
        for e in listing.entries[at + 1..].iter().take(AHEAD) {
            if e.stat.kind != Kind::File || e.stat.size > self.limit || e.stat.size == 0 {
                continue;
            }
            let key = format!("{dir}{}", e.name);
            let listed = e
                .stat
                .version
                .as_ref()
                .map_or(String::new(), |v| v.0.clone());
            if self.issued.contains_key(&(key.clone(), listed.clone())) {
                continue;
            }
            self.issued.insert((key.clone(), listed), ());
            self.fetches
                .lock()
                .unwrap()
                .insert(key.clone(), Fetch::Queued);
            let (meta, read, permits) =
                (self.meta.clone(), self.read.clone(), self.in_flight.clone());
            let (ready, fetches) = (self.ready.clone(), self.fetches.clone());
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let done = Arc::new(Semaphore::new(0));
                {
                    let mut all = fetches.lock().unwrap();
                    if matches!(all.get(&key), Some(Fetch::Opened)) {
                        all.remove(&key);
                        return;
                    }
                    all.insert(key.clone(), Fetch::Running(done.clone()));
                }
                let _ended = Ended {
                    fetches,
                    key: key.clone(),
                    done,
                };
                if let Some(version) = fetch(&meta, &read, &key).await {
                    // Known by the version the open will resolve to.
                    ready.insert((key, version), ());
                    crate::metrics::small_file_prefetch("fetched");
                }
            });
        }
    }
}

/// Whether the position `at` continues a walk whose last was `previous`: after it, by at most
/// [`AHEAD`] entries (a walk may skip what it does not want, a directory say).
fn follows(previous: usize, at: usize) -> bool {
    previous < at && at <= previous + AHEAD
}

/// The position of `name` in `listing`.
fn position(listing: &crate::meta::Listing, name: &str) -> Option<usize> {
    listing
        .entries
        .binary_search_by(|e| e.name.as_str().cmp(name))
        .ok()
}

/// Fetches `key` whole at the version an open would resolve now, into the memory tier: the
/// version fetched, or `None` (gone, changed kind, too large, or a store error: the open will
/// ask again itself). Asking what the open will ask may have brought the bytes already (the GET
/// of a small file that answers its attributes): then nothing more is fetched.
async fn fetch(meta: &Arc<Meta>, read: &ReadContext, key: &str) -> Option<String> {
    let stat = meta.resolve(key).await.ok()??;
    let version = stat.version.clone()?;
    if stat.kind != Kind::File || stat.size == 0 || stat.size > BLOCK_SIZE {
        return None;
    }
    let block = first_block(read, key, &version);
    if read.tiers.memory().get(&block).await.is_some() {
        return Some(version.0);
    }
    let bytes = read
        .store
        .get_range(key, 0..stat.size, Some(&version))
        .await
        .ok()?;
    read.tiers.memory().put(&block, bytes).await;
    Some(version.0)
}

/// The cache key of the one block of a small file at `version`, where the read path looks first.
fn first_block(read: &ReadContext, key: &str, version: &Version) -> BlockKey {
    BlockKey {
        store: read.tiers.store_id().clone(),
        key: key.into(),
        version: version.0.as_str().into(),
        index: 0,
    }
}

/// Where a lookup puts the bytes of a small file that the GET answering its attributes brought
/// (`meta::Meta::get_small_files`): the memory tier, as the file's block 0 at that version, so
/// the read that follows finds them like prefetched ones.
pub fn into_memory(read: &Arc<ReadContext>) -> crate::meta::BodySink {
    let read = read.clone();
    Arc::new(move |key: String, version: Version, bytes: Bytes| {
        let read = read.clone();
        Box::pin(async move {
            let block = first_block(&read, &key, &version);
            read.tiers.memory().put(&block, bytes).await;
        })
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;

    use super::super::tests::cfg;
    use super::super::{Fs, FsConfig, OpenMode, ROOT_INO};
    use crate::store::attrs::FileAttrs;
    use crate::store::mem::{MemStore, Op};
    use crate::store::{ObjectStore, Precondition};

    const N: usize = 12;

    /// A store whose listings carry no attributes (as S3's), with `N` small files in `d/`, the
    /// fourth of them `chmod 600`ed with an mtime of its own, and one large file `d/z`.
    async fn s3_like() -> std::sync::Arc<MemStore> {
        let mem = std::sync::Arc::new(MemStore::new("b"));
        mem.list_without_metadata(true);
        for i in 0..N {
            let attrs = FileAttrs {
                mode: (i == 3).then_some(libc::S_IFREG | 0o600),
                mtime: (i == 3).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30)),
                ..FileAttrs::default()
            };
            let body = Bytes::from(format!("file {i:02}"));
            mem.put_with(
                &format!("d/f{i:02}"),
                body,
                Precondition::None,
                &attrs.to_meta(),
            )
            .await
            .unwrap();
        }
        let big = Bytes::from(vec![7u8; 5000]);
        mem.put("d/z", big, Precondition::None).await.unwrap();
        mem
    }

    fn fs_over(mem: &std::sync::Arc<MemStore>, prefetch: u64) -> std::sync::Arc<Fs> {
        let cfg = FsConfig {
            small_file_prefetch: prefetch,
            small_file_get: 1024,
            ..cfg(Duration::from_secs(60))
        };
        Fs::new(mem.clone(), cfg)
    }

    /// `cat d/f{i}`: lookup, open, read, release; the bytes and the attributes the kernel gets.
    async fn cat(fs: &Fs, dir: u64, name: &str) -> (Bytes, super::super::Attr) {
        let attr = fs.lookup(dir, name).await.unwrap();
        let o = fs.open(attr.ino, OpenMode::READ).await.unwrap();
        let got = fs.read(o.fh, 0, 1 << 16).await.unwrap();
        fs.release(o.fh).await;
        (got, attr)
    }

    fn requests(mem: &MemStore) -> u64 {
        [Op::Head, Op::GetRange, Op::List]
            .into_iter()
            .map(|op| mem.calls(op))
            .sum()
    }

    #[tokio::test]
    async fn a_small_file_is_looked_up_and_read_with_one_get() {
        for prefetch in [0, 1024] {
            let mem = s3_like().await;
            let fs = fs_over(&mem, prefetch);
            let d = fs.lookup(ROOT_INO, "d").await.unwrap().ino;
            let before = (mem.calls(Op::Head), mem.calls(Op::GetRange));
            let start = requests(&mem);
            for i in 0..N {
                let (got, attr) = cat(&fs, d, &format!("f{i:02}")).await;
                assert_eq!(&got[..], format!("file {i:02}").as_bytes());
                assert_eq!(attr.size, 7);
                let (perm, secs) = if i == 3 { (0o600, 1 << 30) } else { (0o644, 0) };
                assert_eq!(attr.perm, perm, "prefetch {prefetch}, f{i:02}");
                if secs > 0 {
                    assert_eq!(
                        attr.mtime,
                        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
                    );
                }
                // The attributes the kernel asks again are the lookup's.
                assert_eq!(fs.getattr(attr.ino).await.unwrap(), attr);
            }
            // The large file: its HEAD (asked ahead by the lookups in order, with prefetch).
            assert_eq!(fs.lookup(d, "z").await.unwrap().size, 5000);
            // Let prefetches started by the last opens finish: they find every file fetched.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let heads = mem.calls(Op::Head) - before.0;
            assert_eq!(heads, 1, "prefetch {prefetch}: z's HEAD only");
            let gets = mem.calls(Op::GetRange) - before.1;
            assert_eq!(
                gets, N as u64,
                "prefetch {prefetch}: one GET per small file"
            );
            assert_eq!(requests(&mem) - start, N as u64 + 2, "and the LIST of d/");
        }
    }

    #[tokio::test]
    async fn concurrent_cats_of_one_directory_share_each_get() {
        let mem = s3_like().await;
        let fs = fs_over(&mem, 1024);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap().ino;
        // Slow GETs: a lookup comes while another one's GET of the same file is on its way.
        let slow = crate::store::mem::Fault::Delay(Duration::from_millis(20));
        mem.inject(Op::GetRange, slow, 100);
        let gets = mem.calls(Op::GetRange);
        let mut tasks = Vec::new();
        for t in 0..4 {
            let fs = fs.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..N).step_by(2) {
                    let (got, _) = cat(&fs, d, &format!("f{i:02}")).await;
                    assert_eq!(&got[..], format!("file {i:02}").as_bytes());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(fs.lookup(d, "z").await.unwrap().size, 5000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(mem.calls(Op::GetRange) - gets, N as u64);
        assert_eq!(
            mem.calls(Op::Head),
            2,
            "the HEADs of the marker d/ and of z only"
        );
    }

    #[tokio::test]
    async fn lookups_in_listing_order_ask_the_next_names_ahead() {
        let mem = s3_like().await;
        let fs = fs_over(&mem, 1024);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap().ino;
        let (heads, gets) = (mem.calls(Op::Head), mem.calls(Op::GetRange));
        fs.lookup(d, "f00").await.unwrap();
        fs.lookup(d, "f01").await.unwrap();
        // The second lookup in order asked for the next names (f02.. and z), once each.
        let asked = || (mem.calls(Op::Head) - heads, mem.calls(Op::GetRange) - gets);
        for _ in 0..100 {
            if asked() == (1, N as u64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(asked(), (1, N as u64));
        // Their lookups and reads (`ls -l`, then `cat`) ask nothing more.
        for i in 2..N {
            let (got, attr) = cat(&fs, d, &format!("f{i:02}")).await;
            assert_eq!(&got[..], format!("file {i:02}").as_bytes());
            assert_eq!(attr.perm, if i == 3 { 0o600 } else { 0o644 });
        }
        assert_eq!(fs.lookup(d, "z").await.unwrap().size, 5000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(asked(), (1, N as u64));
    }

    #[tokio::test]
    async fn a_larger_file_is_asked_with_a_head_and_stat_alone_costs_one_request() {
        let mem = s3_like().await;
        let fs = fs_over(&mem, 0);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap().ino;
        let (heads, gets) = (mem.calls(Op::Head), mem.calls(Op::GetRange));
        // Over --small-file-get: a HEAD, and the read a GET.
        let (got, attr) = cat(&fs, d, "z").await;
        assert_eq!((got.len(), attr.size), (5000, 5000));
        assert_eq!(
            (mem.calls(Op::Head) - heads, mem.calls(Op::GetRange) - gets),
            (1, 1)
        );
        // A small file only stat'ed costs its one GET; read later, nothing more.
        let attr = fs.lookup(d, "f05").await.unwrap();
        assert_eq!(mem.calls(Op::GetRange) - gets, 2);
        let o = fs.open(attr.ino, OpenMode::READ).await.unwrap();
        assert_eq!(&fs.read(o.fh, 0, 100).await.unwrap()[..], b"file 05");
        assert_eq!(mem.calls(Op::GetRange) - gets, 2);
        assert_eq!(mem.calls(Op::Head) - heads, 1);
    }

    /// An S3-like store with `n` files of `size` bytes in `dir/`, named `g000`...
    async fn dir_of(dir: &str, n: usize, size: usize) -> std::sync::Arc<MemStore> {
        let mem = std::sync::Arc::new(MemStore::new("b"));
        mem.list_without_metadata(true);
        let files = (0..n).map(|i| (format!("{dir}/g{i:03}"), Bytes::from(vec![b'x'; size])));
        put_all(&mem, files).await;
        mem
    }

    async fn put_all(mem: &MemStore, files: impl IntoIterator<Item = (String, Bytes)>) {
        for (key, body) in files {
            mem.put(&key, body, Precondition::None).await.unwrap();
        }
    }

    /// `count()` once it reached `want` (or a second went by) and nothing more came.
    async fn settled(count: impl Fn() -> u64, want: u64) -> u64 {
        for _ in 0..100 {
            if count() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        count()
    }

    #[tokio::test]
    async fn a_stat_walk_asks_further_ahead_the_further_it_goes() {
        use super::{AHEAD, LOOKUP_AHEAD};
        let mem = dir_of("d", 300, 7).await;
        // One file chmod'ed: asked ahead, its lookup still gets the object's own attributes.
        let attrs = FileAttrs {
            mode: Some(libc::S_IFREG | 0o600),
            ..FileAttrs::default()
        };
        let body = Bytes::from_static(b"chmoded");
        mem.put_with("d/g100", body, Precondition::None, &attrs.to_meta())
            .await
            .unwrap();
        let fs = fs_over(&mem, 1024);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap().ino;
        let (heads, gets) = (mem.calls(Op::Head), mem.calls(Op::GetRange));
        let asked = || mem.calls(Op::GetRange) - gets;
        let walk = |from: usize, to: usize| {
            let fs = fs.clone();
            async move {
                for i in from..to {
                    let attr = fs.lookup(d, &format!("g{i:03}")).await.unwrap();
                    assert_eq!(attr.perm, if i == 100 { 0o600 } else { 0o644 }, "g{i:03}");
                }
            }
        };
        // A stat of two files in order asks AHEAD names ahead.
        walk(0, 2).await;
        assert_eq!(settled(asked, 2 + AHEAD as u64).await, 2 + AHEAD as u64);
        // After 64 names in order, as many as it looked up: g000 to g127, each once.
        walk(2, 64).await;
        assert_eq!(settled(asked, 128).await, 128);
        // After 150, LOOKUP_AHEAD at most: to g277, not the whole directory.
        walk(64, 150).await;
        let want = (150 + LOOKUP_AHEAD) as u64;
        assert_eq!(settled(asked, want).await, want);
        // The rest of the walk asks the rest, each once, and no HEAD (all small files).
        walk(150, 300).await;
        assert_eq!(settled(asked, 300).await, 300);
        assert_eq!(mem.calls(Op::Head), heads);
    }

    #[tokio::test]
    async fn a_stat_walk_does_not_hold_up_the_prefetch_of_opens() {
        use super::{AHEAD, LOOKUPS_IN_FLIGHT};
        // Files over --small-file-get in a/ (a HEAD each), small ones in b/.
        let mem = dir_of("a", 300, 2000).await;
        let files = (0..20).map(|i| (format!("b/f{i:02}"), Bytes::from(format!("file {i:02}"))));
        put_all(&mem, files).await;
        let fs = fs_over(&mem, 1024);
        let a = fs.lookup(ROOT_INO, "a").await.unwrap().ino;
        let b = fs.lookup(ROOT_INO, "b").await.unwrap().ino;
        let heads = mem.calls(Op::Head);
        let walk = |from: usize, to: usize| {
            let fs = fs.clone();
            async move {
                for i in from..to {
                    fs.lookup(a, &format!("g{i:03}")).await.unwrap();
                }
            }
        };
        walk(0, 64).await;
        assert_eq!(settled(|| mem.calls(Op::Head) - heads, 128).await, 128);
        // The next questions of the walk never come back: as many as it may ask at once hang.
        let hung = LOOKUPS_IN_FLIGHT as u64;
        mem.inject(Op::Head, crate::store::mem::Fault::Hang, hung as usize);
        walk(64, 128).await;
        let asked = settled(|| mem.calls(Op::Head) - heads, 128 + hung).await;
        assert_eq!(
            asked,
            128 + hung,
            "LOOKUPS_IN_FLIGHT questions on their way"
        );
        // Meanwhile `cat b/*`: the second open in order fetches the next AHEAD files ahead.
        let gets = mem.calls(Op::GetRange);
        for i in 0..2 {
            let (got, _) = cat(&fs, b, &format!("f{i:02}")).await;
            assert_eq!(&got[..], format!("file {i:02}").as_bytes());
        }
        let want = 2 + AHEAD as u64;
        let fetched = settled(|| mem.calls(Op::GetRange) - gets, want).await;
        assert_eq!(fetched, want, "the prefetch has a budget of its own");
    }

    #[tokio::test]
    async fn the_prefetch_of_opens_does_not_hold_up_a_stat_walk() {
        use super::IN_FLIGHT;
        // Files over --small-file-get in both directories (a HEAD each): b/ is read with `cat`,
        // a/ walked with `stat`.
        let mem = dir_of("a", 300, 2000).await;
        let files = (0..20).map(|i| (format!("b/f{i:02}"), Bytes::from(vec![b'y'; 2000])));
        put_all(&mem, files).await;
        let fs = fs_over(&mem, 4096);
        let a = fs.lookup(ROOT_INO, "a").await.unwrap().ino;
        let b = fs.lookup(ROOT_INO, "b").await.unwrap().ino;
        let (got, _) = cat(&fs, b, "f00").await;
        assert_eq!(got.len(), 2000);
        // The prefetch's GETs never come back: as many as it may have on their way hang.
        let gets = mem.calls(Op::GetRange);
        mem.inject(Op::GetRange, crate::store::mem::Fault::Hang, IN_FLIGHT);
        let attr = fs.lookup(b, "f01").await.unwrap();
        let o = fs.open(attr.ino, OpenMode::READ).await.unwrap();
        fs.release(o.fh).await;
        let hung = IN_FLIGHT as u64;
        let fetching = settled(|| mem.calls(Op::GetRange) - gets, hung).await;
        assert_eq!(fetching, hung, "IN_FLIGHT prefetch GETs on their way");
        // Meanwhile `ls -l a`: after 64 names in order, the walk has asked 128.
        let heads = settled(|| mem.calls(Op::Head), 0).await;
        for i in 0..64 {
            fs.lookup(a, &format!("g{i:03}")).await.unwrap();
        }
        let asked = settled(|| mem.calls(Op::Head) - heads, 128).await;
        assert_eq!(asked, 128, "the walk has a budget of its own");
    }
}
