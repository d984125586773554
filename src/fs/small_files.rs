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
//!
//! ## What, and where it goes
//! A prefetch asks what the open will ask (`Meta::resolve`, the same cached answer: on S3 the
//! object's HEAD, since an S3 listing does not carry a file's kind and attributes; on GCS and
//! `file://` nothing, the listing does), then GETs the whole object pinned to that version, and
//! puts it in the memory tier as the object's block 0, keyed by its version, where the read path
//! looks first. So the prefetched bytes live inside `--max-memory` (the memory tier's share,
//! evicted like any block), an open that resolves to another version (the object changed and the
//! TTL ran out) never sees them, and nothing in the read path knows about prefetch. Objects over
//! one block are never prefetched.
//!
//! ## Cost
//! At most [`AHEAD`] files fetched that are never opened, per directory walked in order; on S3
//! one HEAD and one GET per prefetched file, on GCS and `file://` one GET.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::cache::{BLOCK_SIZE, BlockKey};
use crate::meta::{Kind, Meta};
use crate::read::ReadContext;

/// Files fetched ahead of the last one opened: enough to hide a 25 ms round trip behind reads of
/// small files from the page cache, few enough that a walk that stops wastes little.
pub const AHEAD: usize = 16;

/// Prefetch GETs in flight at once, for the whole mount.
pub const IN_FLIGHT: usize = 8;

/// Where the last opens of each directory were, and which files are fetched or being fetched.
pub struct SmallFiles {
    meta: Arc<Meta>,
    read: Arc<ReadContext>,
    /// Largest object fetched ahead (`--small-file-prefetch`, at most one block); 0: off.
    limit: u64,
    /// Directory key -> position in its listing of the last file opened there.
    last_open: moka::sync::Cache<String, usize>,
    /// (key, version) of files fetched or being fetched ahead (each is fetched once).
    issued: moka::sync::Cache<(String, String), ()>,
    /// (key, version) of files fetched ahead, until their open.
    ready: moka::sync::Cache<(String, String), ()>,
    in_flight: Arc<Semaphore>,
}

impl SmallFiles {
    pub fn new(meta: Arc<Meta>, read: Arc<ReadContext>, limit: u64) -> SmallFiles {
        SmallFiles {
            meta,
            read,
            limit: limit.min(BLOCK_SIZE),
            last_open: moka::sync::Cache::new(1024),
            issued: moka::sync::Cache::new(16 * 1024),
            ready: moka::sync::Cache::new(16 * 1024),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// `key` (of `size` bytes, at `version`) was opened for reading: counts a hit if it was
    /// fetched ahead, and fetches the next small files if the opens follow the listing.
    pub fn opened(&self, key: &str, version: &str, size: u64) {
        if self.limit == 0 || size > self.limit {
            return;
        }
        let id = (key.to_string(), version.to_string());
        if self.ready.contains_key(&id) {
            self.ready.invalidate(&id);
            crate::metrics::small_file_prefetch("hit");
        }
        let (dir, name) = crate::meta::split_key(key);
        let Some(listing) = self.meta.fresh_listing(dir) else {
            return;
        };
        let Ok(at) = listing
            .entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
        else {
            return;
        };
        let previous = self.last_open.get(dir);
        self.last_open.insert(dir.to_string(), at);
        if !previous.is_some_and(|p| p < at && at <= p + AHEAD) {
            return;
        }
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
            let (meta, read, permits) =
                (self.meta.clone(), self.read.clone(), self.in_flight.clone());
            let ready = self.ready.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
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

/// Fetches `key` whole at the version an open would resolve now, into the memory tier: the
/// version fetched, or `None` (gone, changed kind, too large, or a store error: the open will
/// ask again itself).
async fn fetch(meta: &Arc<Meta>, read: &ReadContext, key: &str) -> Option<String> {
    let stat = meta.resolve(key).await.ok()??;
    let version = stat.version.clone()?;
    if stat.kind != Kind::File || stat.size == 0 || stat.size > BLOCK_SIZE {
        return None;
    }
    let bytes = read
        .store
        .get_range(key, 0..stat.size, Some(&version))
        .await
        .ok()?;
    let block = BlockKey {
        store: read.tiers.store_id().clone(),
        key: key.into(),
        version: version.0.as_str().into(),
        index: 0,
    };
    read.tiers.memory().put(&block, bytes).await;
    Some(version.0)
}
