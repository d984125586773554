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
//! `lookup` asks the store (a HEAD of `key` and a one-key LIST of `key/`, at once) and keeps the
//! answer, positive or negative, for `--metadata-ttl`. A directory listing refreshes the entries of
//! every child it saw, so `ls -l` costs one LIST, not one HEAD per file.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::store::{DynStore, StoreError, StoreResult, Version};

/// The name reserved at the bucket root for bucketfs' own objects.
pub const RESERVED_ROOT_NAME: &str = ".bucketfs";

/// Longest file name the kernel accepts.
const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What a path is, as last seen in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
    /// Object version, for files.
    pub version: Option<Version>,
    pub mtime: SystemTime,
}

impl Stat {
    pub fn dir() -> Stat {
        Stat {
            kind: Kind::Dir,
            size: 0,
            version: None,
            mtime: SystemTime::UNIX_EPOCH,
        }
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

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub stat: Stat,
}

/// The metadata cache and the listing logic over a store.
pub struct Meta {
    store: DynStore,
    /// Full path key (no trailing slash) -> what it is; `None` is a negative entry.
    cache: Option<moka::sync::Cache<String, Option<Stat>>>,
    /// Keys already warned about, so a listing repeated every second does not flood the log.
    warned: moka::sync::Cache<String, ()>,
    /// Whether the mount's root is the bucket root (where [`RESERVED_ROOT_NAME`] is hidden).
    at_bucket_root: bool,
    /// Where write-lock objects live (full key ending with `/`): hidden wherever it is.
    lock_prefix: String,
}

impl Meta {
    pub fn new(
        store: DynStore,
        ttl: Duration,
        at_bucket_root: bool,
        lock_prefix: &str,
    ) -> Arc<Meta> {
        let cache = (!ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(ttl)
                .build()
        });
        Arc::new(Meta {
            store,
            cache,
            warned: moka::sync::Cache::new(10_000),
            at_bucket_root,
            lock_prefix: lock_prefix.to_string(),
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
        if let Some(c) = &self.cache {
            c.invalidate(path_key);
        }
    }

    /// What `path_key` (a full key without trailing slash) is: a directory, a file, or nothing.
    pub async fn resolve(&self, path_key: &str) -> StoreResult<Option<Stat>> {
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(path_key)) {
            return Ok(hit);
        }
        let stat = self.resolve_uncached(path_key).await?;
        if let Some(c) = &self.cache {
            c.insert(path_key.to_string(), stat.clone());
        }
        Ok(stat)
    }

    async fn resolve_uncached(&self, path_key: &str) -> StoreResult<Option<Stat>> {
        let dir_prefix = format!("{path_key}/");
        let (head, list) = tokio::join!(
            self.store.head(path_key),
            self.store.list(&dir_prefix, Some("/"), None, 1)
        );
        let list = list?;
        if !list.objects.is_empty() || !list.prefixes.is_empty() {
            if head.is_ok() {
                self.warn_once(path_key, "a directory of the same name shadows it");
            }
            return Ok(Some(Stat::dir()));
        }
        match head {
            Ok(m) => Ok(Some(Stat {
                kind: Kind::File,
                size: m.size,
                version: Some(m.version),
                mtime: m.last_modified,
            })),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Re-reads a file's metadata from the store (ignoring the cache) and caches the answer.
    pub async fn refresh_file(&self, path_key: &str) -> StoreResult<Option<Stat>> {
        self.invalidate(path_key);
        self.resolve(path_key).await
    }

    /// Every visible entry of the directory `dir_key` (`""` or ending with `/`), sorted by name,
    /// following the rule in the module docs. Refreshes the cache for each child.
    pub async fn list_dir(&self, dir_key: &str) -> StoreResult<Vec<DirEntry>> {
        let mut files: Vec<DirEntry> = Vec::new();
        let mut dirs: Vec<String> = Vec::new();
        let mut page = None;
        loop {
            let out = self.store.list(dir_key, Some("/"), page, 1000).await?;
            for o in out.objects {
                let rest = &o.key[dir_key.len()..];
                if rest.is_empty() {
                    continue; // the directory's own marker object
                }
                match check_name(rest) {
                    Ok(name) if !self.is_reserved(dir_key, name) => files.push(DirEntry {
                        name: name.to_string(),
                        stat: Stat {
                            kind: Kind::File,
                            size: o.size,
                            version: Some(o.version),
                            mtime: o.last_modified,
                        },
                    }),
                    Ok(_) => {}
                    Err(why) => self.warn_once(&o.key, &format!("not a valid file name ({why:?})")),
                }
            }
            for p in out.prefixes {
                let rest = &p[dir_key.len()..p.len() - 1];
                match check_name(rest) {
                    Ok(name) if !self.is_reserved(dir_key, name) => dirs.push(name.to_string()),
                    Ok(_) => {}
                    Err(why) => self.warn_once(
                        &p,
                        &format!("prefix is not a valid directory name ({why:?})"),
                    ),
                }
            }
            match out.next {
                Some(next) => page = Some(next),
                None => break,
            }
        }
        dirs.sort();
        dirs.dedup();
        let mut entries: Vec<DirEntry> = Vec::with_capacity(files.len() + dirs.len());
        for f in files {
            if dirs.binary_search(&f.name).is_ok() {
                self.warn_once(
                    &format!("{dir_key}{}", f.name),
                    "a directory of the same name shadows it",
                );
            } else {
                entries.push(f);
            }
        }
        entries.extend(dirs.into_iter().map(|name| DirEntry {
            name,
            stat: Stat::dir(),
        }));
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(c) = &self.cache {
            for e in &entries {
                c.insert(format!("{dir_key}{}", e.name), Some(e.stat.clone()));
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::{MemStore, Op};
    use crate::store::{ObjectStore, Precondition};
    use bytes::Bytes;

    const LOCKS: &str = crate::lock::DEFAULT_PREFIX;

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
    async fn zero_ttl_disables_caching() {
        let s = store_with(&["f"]).await;
        let meta = Meta::new(s.clone(), Duration::ZERO, true, LOCKS);
        meta.resolve("f").await.unwrap();
        meta.resolve("f").await.unwrap();
        assert_eq!(s.calls(Op::Head), 2);
    }
}
