//! Directory listings paged in from the store as the kernel reads them.
//!
//! A [`DirStream`] belongs to one open directory handle. It asks the store for the next page
//! (`--list` pages of [`LIST_PAGE`] keys, the continuation token kept here) only when the
//! kernel's offset reaches the end of what was fetched, so `ls` of a huge directory starts
//! answering after one page, and each `readdir` call costs the entries it returns.
//!
//! ## Offsets
//! Entry `i` of the stream has offset `i` for ever (until `rewinddir`): the kernel may ask again
//! from any offset it was given (`telldir`/`seekdir`, or a reply that did not fit the caller's
//! buffer). The stream keeps the entries from the last offset asked for onwards, and those
//! before while they fit [`STREAM_BYTES`] (and all streams together [`STREAMS_BYTES`]); an
//! offset before what is kept (a `seekdir` far back) lists the directory again from its start
//! and walks to it. `rewinddir` ([`DirStream::rewind`]) lists again too: POSIX wants the
//! directory as it is now.
//!
//! ## Shadowing, one page at a time
//! A directory shadows a file of the same name (see the rules in [`super`]). Pages come in key
//! order, and the file `a` and the prefix `a/` are not adjacent in it: every key that starts
//! with `a` followed by a byte below `/` (`a-b`, `a.txt`, `a!`) sorts between them. So a file
//! is held back until the listing passes `name/`: dropped if that very prefix comes, shown as
//! soon as any later key does, or at the end. The files held back at once each extend the name
//! of the one before (they all sort below its `name/`), so there are at most as many as a name
//! has bytes. Entries are shown in the order they are settled, which is key order but for the
//! held-back files: `readdir` promises no order, and `ls` sorts.
//!
//! ## During an outage
//! A complete listing that fits [`super::LISTINGS_BYTES`] is kept after its last page. When the
//! first page of a new listing cannot be had because the store does not answer, that kept
//! listing is served instead (the whole stream then comes from it). A page after the first that
//! fails fails that `readdir` call (EIO); the next call asks again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{DirEntry, Listing, Meta, Stat, check_name, weight};
use crate::store::{ListPage, ObjectMeta, StoreResult};

/// Keys asked for per LIST request: the most S3 and GCS return in one page.
pub const LIST_PAGE: usize = 1000;

/// Bytes of fetched entries one open directory keeps behind the kernel's offset (for offsets
/// it may ask again): 8 MiB, about 80k entries; and a directory up to that size is listed once
/// whatever the kernel asks.
pub const STREAM_BYTES: u64 = 8 << 20;

/// The same, for all open directories together: beyond 64 MiB each keeps only what is ahead of
/// the kernel's offset (at most one page).
pub const STREAMS_BYTES: u64 = 64 << 20;

/// A listing of one directory in progress, for one open directory handle.
pub struct DirStream {
    meta: Arc<Meta>,
    dir_key: String,
    /// Entries at offsets `base..`, in the order they were settled.
    entries: VecDeque<DirEntry>,
    base: u64,
    /// Weight of `entries`, also counted in `Meta::stream_bytes`.
    bytes: u64,
    /// Where the listing is; `None` before its first page.
    progress: Option<Progress>,
    /// The kept listing being served instead of the store's, during an outage.
    served: Option<Arc<Listing>>,
    /// The count of the directory's changes when the listing started (see `super::Changes`):
    /// a listing older than a change of the directory keeps nothing of what it saw.
    since: u64,
}

/// How far a listing from the store has come.
#[derive(Default)]
struct Progress {
    /// The token of the next page; `None` once the last page is in.
    next: Option<String>,
    done: bool,
    /// Files whose name a directory listed later may still shadow, each a prefix of the next.
    held: Vec<DirEntry>,
    /// The last directory settled, so a prefix repeated by a store is shown once.
    last_dir: Option<String>,
}

/// A listing entry in key order, before the rules.
enum Item {
    Object(ObjectMeta),
    Prefix(String),
}

impl Item {
    fn key(&self) -> &str {
        match self {
            Item::Object(o) => &o.key,
            Item::Prefix(p) => p,
        }
    }
}

impl DirStream {
    pub(super) fn new(meta: Arc<Meta>, dir_key: &str) -> DirStream {
        DirStream {
            meta,
            dir_key: dir_key.to_string(),
            entries: VecDeque::new(),
            base: 0,
            bytes: 0,
            progress: None,
            served: None,
            since: 0,
        }
    }

    /// Up to `max` entries from offset `at` (fewer at the end of the directory), fetching the
    /// next pages from the store only if `at` is past what was fetched.
    pub async fn entries_from(&mut self, at: u64, max: usize) -> StoreResult<Vec<DirEntry>> {
        if let Some(last) = &self.served {
            let at = (at as usize).min(last.entries.len());
            return Ok(last.entries[at..].iter().take(max).cloned().collect());
        }
        if at < self.base {
            self.restart();
        }
        while at >= self.base + self.entries.len() as u64
            && !self.progress.as_ref().is_some_and(|p| p.done)
        {
            self.trim(at);
            self.fetch_page().await?;
            if let Some(last) = &self.served {
                let at = (at as usize).min(last.entries.len());
                return Ok(last.entries[at..].iter().take(max).cloned().collect());
            }
        }
        let from = (at.saturating_sub(self.base) as usize).min(self.entries.len());
        Ok(self.entries.range(from..).take(max).cloned().collect())
    }

    /// Bytes of entries this stream holds.
    pub fn held_bytes(&self) -> u64 {
        self.bytes
    }

    /// Fetches the first page: whether it held the whole directory (then kept, see
    /// [`Meta::fresh_listing`]).
    pub(super) async fn first_page_is_all(&mut self) -> StoreResult<bool> {
        self.fetch_page().await?;
        Ok(self.served.is_none() && self.progress.as_ref().is_some_and(|p| p.done))
    }

    /// Lists again from the start, at the next call, if anything was listed.
    pub fn rewind(&mut self) {
        if self.progress.is_some() || self.served.is_some() {
            self.restart();
        }
    }

    /// Lists again from the start.
    fn restart(&mut self) {
        self.drop_front(self.entries.len());
        self.base = 0;
        self.progress = None;
        self.served = None;
    }

    /// Forgets entries before `at` while more is kept than the caps allow.
    fn trim(&mut self, at: u64) {
        let total = self.meta.stream_bytes.load(Ordering::Relaxed);
        if self.bytes > STREAM_BYTES || total > STREAMS_BYTES {
            let n = (at.saturating_sub(self.base) as usize).min(self.entries.len());
            self.drop_front(n);
        }
    }

    fn drop_front(&mut self, n: usize) {
        let gone: u64 = self
            .entries
            .drain(..n)
            .map(|e| weight(&e.name, Some(&e.stat)))
            .sum();
        self.base += n as u64;
        self.bytes -= gone;
        self.meta.stream_bytes.fetch_sub(gone, Ordering::Relaxed);
    }

    async fn fetch_page(&mut self) -> StoreResult<()> {
        let meta = self.meta.clone();
        let first = self.progress.is_none();
        if first {
            self.since = meta.changes.seen(&self.dir_key);
        }
        // Entries this page settles come after these.
        let before = self.entries.len();
        let token = self.progress.as_ref().and_then(|p| p.next.clone());
        let page = meta.list_page_size();
        let asked = meta.store.list(&self.dir_key, Some("/"), token, page);
        let out: ListPage = match (first, meta.listings.get(&self.dir_key)) {
            (true, Some(last)) => match meta.unless_outage(asked).await {
                Some(answer) => answer?,
                None => {
                    meta.served_stale("listing", &self.dir_key);
                    self.served = Some(last);
                    return Ok(());
                }
            },
            _ => asked.await?,
        };
        let mut progress = self.progress.take().unwrap_or_default();
        let mut objects = out.objects.into_iter().peekable();
        let mut prefixes = out.prefixes.into_iter().peekable();
        loop {
            let item = match (objects.peek(), prefixes.peek()) {
                (Some(o), Some(p)) if o.key.as_str() < p.as_str() => {
                    Item::Object(objects.next().unwrap())
                }
                (Some(_), None) => Item::Object(objects.next().unwrap()),
                (_, Some(_)) => Item::Prefix(prefixes.next().unwrap()),
                (None, None) => break,
            };
            self.settle(&mut progress, item);
        }
        progress.next = out.next;
        if progress.next.is_none() {
            progress.done = true;
            for f in std::mem::take(&mut progress.held) {
                self.push(f);
            }
            self.keep_complete();
        }
        self.progress = Some(progress);
        if meta.changes.seen(&self.dir_key) != self.since {
            // What this page's entries told (`push`) is older than a change: forgotten.
            for e in self.entries.range(before..) {
                meta.forget_listed(&format!("{}{}", self.dir_key, e.name));
            }
            meta.listings.invalidate(&self.dir_key);
        }
        Ok(())
    }

    /// Applies the rules of [`super`] to the next item in key order.
    fn settle(&mut self, progress: &mut Progress, item: Item) {
        let meta = self.meta.clone();
        let rest = item.key()[self.dir_key.len()..].to_string();
        // Files held back until the listing passed their `name/`.
        while let Some(held) = progress.held.last() {
            let shadow = held.name.bytes().chain(std::iter::once(b'/'));
            match rest.bytes().cmp(shadow) {
                std::cmp::Ordering::Less => break,
                std::cmp::Ordering::Equal => {
                    let f = progress.held.pop().unwrap();
                    meta.warn_once(
                        &format!("{}{}", self.dir_key, f.name),
                        "a directory of the same name shadows it",
                    );
                    break;
                }
                std::cmp::Ordering::Greater => {
                    let f = progress.held.pop().unwrap();
                    self.push(f);
                }
            }
        }
        match item {
            Item::Object(o) => {
                if rest.is_empty() {
                    return; // the directory's own marker object
                }
                match check_name(&rest) {
                    Ok(name) if !meta.is_reserved(&self.dir_key, name) => {
                        progress.held.push(DirEntry {
                            name: name.to_string(),
                            stat: Stat::object(o),
                        })
                    }
                    Ok(_) => {}
                    Err(why) => meta.warn_once(&o.key, &format!("not a valid file name ({why:?})")),
                }
            }
            Item::Prefix(p) => {
                let rest = &rest[..rest.len().saturating_sub(1)];
                match check_name(rest) {
                    Ok(name)
                        if !meta.is_reserved(&self.dir_key, name)
                            && progress.last_dir.as_deref() != Some(name) =>
                    {
                        progress.last_dir = Some(name.to_string());
                        self.push(DirEntry {
                            name: name.to_string(),
                            // A directory's own metadata is its marker's, which a listing of
                            // its parent does not show.
                            stat: Stat {
                                user: None,
                                ..Stat::dir()
                            },
                        });
                    }
                    Ok(_) => {}
                    Err(why) => meta.warn_once(
                        &p,
                        &format!("prefix is not a valid directory name ({why:?})"),
                    ),
                }
            }
        }
    }

    /// Shows `e` at the next offset; what the listing says of a file with its metadata also
    /// answers the next lookup of it.
    fn push(&mut self, e: DirEntry) {
        if e.stat.user.is_some() {
            self.meta
                .remember_listed(&format!("{}{}", self.dir_key, e.name), &e.stat);
        }
        let w = weight(&e.name, Some(&e.stat));
        self.bytes += w;
        self.meta.stream_bytes.fetch_add(w, Ordering::Relaxed);
        self.entries.push_back(e);
    }

    /// Keeps the listing just completed, if nothing of it was forgotten, for outages.
    fn keep_complete(&self) {
        if self.base != 0 || self.bytes > super::LISTINGS_BYTES {
            return;
        }
        let mut entries: Vec<DirEntry> = self.entries.iter().cloned().collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        self.meta.listings.insert(
            self.dir_key.clone(),
            Arc::new(Listing {
                entries,
                seen: Instant::now(),
            }),
        );
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        self.meta
            .stream_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
