//! The write side of the filesystem: create, write, commit, truncate, unlink, mkdir, rmdir,
//! rename. See `write/` for staging and commit, and the README for what is atomic.
//!
//! Renames: a file is renamed by a server-side copy (conditional on the target being what this
//! mount last saw: absent, or the version it knew) followed by a conditional delete of the source.
//! A directory is renamed object by object, which is **not atomic**: another client can see
//! both names, or a half-moved directory, while it runs, and a crash in the middle leaves the
//! objects split between the two names (nothing is lost: every object exists under one of them).
//!
//! Write locks (`lock/`): every operation that changes a file holds the lock of its full object
//! key while it acts: a handle open for writing (create, open for write, truncate) from open to
//! release, `unlink` for the delete, `rename` for both names, and a directory rename for every
//! object it moves and every new name, all taken before anything moves. A lock held by another
//! replica fails the operation with `EBUSY` (after `--lock-wait`). `mkdir` and `rmdir` take none:
//! they only create or delete empty directory markers, conditionally.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use super::{Attr, Fs, FsError, FsResult, Handle, Opened};
use crate::lock::Held;
use crate::meta::{Kind, Stat, check_name};
use crate::store::{Precondition, StoreError, Version};
use crate::write::{WriteContext, WriteHandle};

impl Fs {
    fn write_ctx(&self) -> FsResult<&Arc<WriteContext>> {
        if self.is_closing() {
            return Err(FsError::ShuttingDown);
        }
        self.write.as_ref().ok_or(FsError::ReadOnly)
    }

    /// Holds the write lock of the object `key`; `None` with locking off.
    async fn lock_key(&self, key: &str) -> FsResult<Option<Held>> {
        match self.write_ctx()?.locks.clone() {
            Some(locks) => Ok(Some(locks.acquire(key).await?)),
            None => Ok(None),
        }
    }

    /// Holds the write locks of all `keys`, or of none. Taken in key order, so that two mounts
    /// waiting (`--lock-wait`) for the same keys never wait for each other in a circle.
    async fn lock_keys(&self, keys: impl IntoIterator<Item = String>) -> FsResult<Vec<Held>> {
        let keys: std::collections::BTreeSet<String> = keys.into_iter().collect();
        let mut held = Vec::with_capacity(keys.len());
        for key in keys {
            match self.lock_key(&key).await {
                Ok(h) => held.extend(h),
                Err(e) => {
                    release(held).await;
                    return Err(e);
                }
            }
        }
        Ok(held)
    }

    /// The key a new entry `name` in directory `parent` would have, refusing names the bucket
    /// could not list back.
    fn child_path(&self, parent: u64, name: &str) -> FsResult<String> {
        let dir_key = self.dir_key(parent)?;
        if check_name(name).is_err() || self.meta.is_reserved(&dir_key, name) {
            return Err(FsError::InvalidName);
        }
        Ok(format!("{dir_key}{name}"))
    }

    /// The open write handle of the file (parent, name), if any.
    fn open_writer_of(&self, parent: u64, name: &str) -> Option<(Arc<WriteHandle>, u64)> {
        let ino = *self
            .inodes
            .lock()
            .unwrap()
            .by_name
            .get(&(parent, name.to_string()))?;
        let w = self.writing.lock().unwrap().get(&ino).cloned()?;
        Some((w, ino))
    }

    fn register_writer(&self, ino: u64, handle: Arc<WriteHandle>, pid: u32) -> u64 {
        self.writing.lock().unwrap().insert(ino, handle.clone());
        let fh = self.add_handle(Handle::Write(handle, ino));
        self.writer_process
            .lock()
            .unwrap()
            .insert(fh, process_of(pid));
        fh
    }

    /// Creates `name` in `parent` and opens it for writing. The object appears at the first
    /// commit (close or fsync).
    pub async fn create(&self, parent: u64, name: &str, pid: u32) -> FsResult<(Attr, u64)> {
        let ctx = self.write_ctx()?.clone();
        let path_key = self.child_path(parent, name)?;
        let lock = self.lock_key(&path_key).await?;
        if lock.is_some() {
            // The previous holder may have committed since this mount last looked.
            self.meta.invalidate(&path_key);
        }
        let base = match self.meta.resolve(&path_key).await? {
            Some(s) if s.kind == Kind::Dir => return Err(FsError::IsDir),
            Some(s) => s.version,
            None => None,
        };
        let handle = WriteHandle::open(ctx, path_key.clone(), base, None, lock).await?;
        let handle = Arc::new(handle);
        let stat = Stat {
            kind: Kind::File,
            size: 0,
            version: None,
            mtime: SystemTime::now(),
        };
        let attr = self.remember(parent, name, path_key, stat);
        let fh = self.register_writer(attr.ino, handle, pid);
        Ok((attr, fh))
    }

    /// Opens an existing file for writing: truncated, or with its content staged for changes.
    pub(super) async fn open_write(&self, ino: u64, truncate: bool, pid: u32) -> FsResult<Opened> {
        let ctx = self.write_ctx()?.clone();
        let (key, kind) = self.inode_key(ino)?;
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let lock = self.lock_key(&key).await?;
        // A file created here and not yet committed has no object: it starts empty.
        let current = match self.meta.refresh_file(&key).await? {
            Some(s) if s.kind == Kind::File => s.version.map(|v| (v, s.size)),
            Some(_) => return Err(FsError::IsDir),
            None => None,
        };
        let base = current.as_ref().map(|(v, _)| v.clone());
        let existing = if truncate { None } else { current };
        let handle = Arc::new(WriteHandle::open(ctx, key, base, existing, lock).await?);
        if truncate {
            self.update_inode(ino, |i| {
                i.stat.size = 0;
                i.cached_version = None;
            });
        }
        let fh = self.register_writer(ino, handle, pid);
        Ok(Opened {
            fh,
            keep_cache: false,
            backing: None,
            version: String::new(),
        })
    }

    pub async fn write(&self, fh: u64, offset: u64, data: Bytes) -> FsResult<u32> {
        let handle = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Write(w, _)) => w.clone(),
            Some(_) => return Err(FsError::BadHandle),
            None => return Err(FsError::BadHandle),
        };
        Ok(handle.write(offset, data).await?)
    }

    /// `close` (flush): commit what the handle changed — unless the close comes from another
    /// process. A fork duplicates every descriptor and its exec closes them again, and each of
    /// those closes reaches us as a flush; committing then would publish a half-written file
    /// under the writer's feet. Such flushes are ignored; the writer's own close commits (and
    /// `release` commits whatever is left).
    pub async fn flush(&self, fh: u64, pid: u32) -> FsResult<()> {
        let opener = self.writer_process.lock().unwrap().get(&fh).copied();
        if let Some(opener) = opener
            && process_of(pid) != opener
        {
            return Ok(());
        }
        self.fsync(fh).await
    }

    /// `fsync`: commit what the handle changed.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let handle = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Write(w, ino)) => Some((w.clone(), *ino)),
            _ => None,
        };
        match handle {
            Some((w, ino)) => self.commit_handle(&w, ino).await,
            None => Ok(()),
        }
    }

    pub(super) async fn commit_handle(&self, w: &WriteHandle, ino: u64) -> FsResult<()> {
        let committed = w.commit().await?;
        if let Some(c) = committed {
            self.meta.invalidate(&c.key);
            self.update_inode(ino, |i| {
                i.stat = Stat {
                    kind: Kind::File,
                    size: c.size,
                    version: Some(c.version.clone()),
                    mtime: SystemTime::now(),
                };
                i.checked = Instant::now();
                // The kernel's pages may hold what was written; the next open starts clean.
                i.cached_version = None;
            });
        }
        Ok(())
    }

    pub(super) fn update_inode(&self, ino: u64, f: impl FnOnce(&mut super::Inode)) {
        if let Some(i) = self.inodes.lock().unwrap().by_ino.get_mut(&ino) {
            f(i);
        }
    }

    /// `setattr`: a size change truncates (through the open handle if there is one); mode,
    /// owner and times are accepted and ignored (a bucket keeps none of them).
    pub async fn setattr(&self, ino: u64, size: Option<u64>, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(size) = size {
            self.write_ctx()?;
            let open = fh.and_then(|fh| match self.handles.lock().unwrap().get(&fh) {
                Some(Handle::Write(w, _)) => Some(w.clone()),
                _ => None,
            });
            let open = open.or_else(|| self.writing.lock().unwrap().get(&ino).cloned());
            match open {
                Some(w) => w.truncate(size).await?,
                None => {
                    // truncate(2) on a path: stage, cut, commit at once.
                    let opened = self.open_write(ino, size == 0, std::process::id()).await?;
                    let w = match self.handles.lock().unwrap().get(&opened.fh) {
                        Some(Handle::Write(w, _)) => w.clone(),
                        _ => return Err(FsError::BadHandle),
                    };
                    let result = match w.truncate(size).await {
                        Ok(()) => self.commit_handle(&w, ino).await,
                        Err(e) => Err(e.into()),
                    };
                    self.release(opened.fh).await;
                    result?;
                }
            }
        } else if self.write.is_none() {
            return Err(FsError::ReadOnly);
        }
        self.getattr(ino).await
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.write_ctx()?;
        let path_key = self
            .child_path(parent, name)
            .map_err(|_| FsError::NotFound)?;
        match self.meta.refresh_file(&path_key).await? {
            None => return Err(FsError::NotFound),
            Some(s) if s.kind == Kind::Dir => return Err(FsError::IsDir),
            Some(_) => {}
        }
        let lock = self.lock_key(&path_key).await?;
        let deleted = self.store.delete(&path_key, Precondition::None).await;
        release(lock).await;
        deleted?;
        self.meta.invalidate(&path_key);
        self.forget_name(parent, name);
        Ok(())
    }

    /// Drops the (parent, name) -> inode link after the name went away; the inode itself lives
    /// until the kernel forgets it.
    fn forget_name(&self, parent: u64, name: &str) {
        let mut t = self.inodes.lock().unwrap();
        t.by_name.remove(&(parent, name.to_string()));
    }

    pub async fn mkdir(&self, parent: u64, name: &str) -> FsResult<Attr> {
        self.write_ctx()?;
        let path_key = self.child_path(parent, name)?;
        self.meta.invalidate(&path_key);
        if self.meta.resolve(&path_key).await?.is_some() {
            return Err(FsError::Exists);
        }
        let marker = format!("{path_key}/");
        match self
            .store
            .put(&marker, Bytes::new(), Precondition::IfAbsent)
            .await
        {
            Ok(_) | Err(StoreError::PreconditionFailed(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.meta.invalidate(&path_key);
        Ok(self.remember(parent, name, marker, Stat::dir()))
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.write_ctx()?;
        let path_key = self
            .child_path(parent, name)
            .map_err(|_| FsError::NotFound)?;
        self.meta.invalidate(&path_key);
        match self.meta.resolve(&path_key).await? {
            None => return Err(FsError::NotFound),
            Some(s) if s.kind == Kind::File => return Err(FsError::NotDir),
            Some(_) => {}
        }
        let marker = format!("{path_key}/");
        let children = self.store.list(&marker, Some("/"), None, 2).await?;
        let non_marker =
            children.objects.iter().any(|o| o.key != marker) || !children.prefixes.is_empty();
        if non_marker {
            return Err(FsError::NotEmpty);
        }
        self.store.delete(&marker, Precondition::None).await?;
        self.meta.invalidate(&path_key);
        self.forget_name(parent, name);
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        no_replace: bool,
    ) -> FsResult<()> {
        self.write_ctx()?;
        let src = self
            .child_path(parent, name)
            .map_err(|_| FsError::NotFound)?;
        let dst = self.child_path(new_parent, new_name)?;
        if src == dst {
            return Ok(());
        }
        let locks = self.lock_keys([src.clone(), dst.clone()]).await?;
        let dst_lock = locks.iter().find(|h| h.key() == dst);
        let result = async {
            // A file renamed while open for writing (temp-file-then-rename savers do this) is
            // committed first, so there is an object to move; the handle then follows the new
            // name.
            let open_writer = self.open_writer_of(parent, name);
            if let Some((w, ino)) = &open_writer {
                self.commit_handle(w, *ino).await?;
            }
            let src_stat = self
                .meta
                .refresh_file(&src)
                .await?
                .ok_or(FsError::NotFound)?;
            let dst_stat = self.meta.refresh_file(&dst).await?;
            if no_replace && dst_stat.is_some() {
                return Err(FsError::Exists);
            }
            match src_stat.kind {
                Kind::File => {
                    let pre = match &dst_stat {
                        None => Precondition::IfAbsent,
                        Some(s) if s.kind == Kind::Dir => return Err(FsError::IsDir),
                        Some(s) => Precondition::IfVersion(
                            s.version.clone().unwrap_or(Version(String::new())),
                        ),
                    };
                    let moved = self.store.copy(&src, &dst, pre).await?;
                    if let Some((w, _)) = &open_writer {
                        let old = w.rekey(dst.clone(), moved, dst_lock.map(Held::share)).await;
                        release(old).await;
                    }
                    let src_pre = match &src_stat.version {
                        Some(v) => Precondition::IfVersion(v.clone()),
                        None => Precondition::None,
                    };
                    self.store.delete(&src, src_pre).await?;
                }
                Kind::Dir => {
                    if let Some(d) = &dst_stat {
                        if d.kind == Kind::File {
                            return Err(FsError::NotDir);
                        }
                        let probe = self.store.list(&format!("{dst}/"), None, None, 2).await?;
                        if probe.objects.iter().any(|o| o.key != format!("{dst}/")) {
                            return Err(FsError::NotEmpty);
                        }
                    }
                    self.rename_dir(&format!("{src}/"), &format!("{dst}/"))
                        .await?;
                }
            }
            self.meta.invalidate(&src);
            self.meta.invalidate(&dst);
            self.move_inode(parent, name, new_parent, new_name, &src, &dst);
            Ok(())
        }
        .await;
        release(locks).await;
        result
    }

    /// Moves every object under `src` (a prefix ending in `/`) to `dst`, one by one.
    async fn rename_dir(&self, src: &str, dst: &str) -> FsResult<()> {
        let mut page = None;
        let mut keys = Vec::new();
        loop {
            let out = self.store.list(src, None, page, 1000).await?;
            keys.extend(out.objects.into_iter().map(|o| (o.key, o.version)));
            match out.next {
                Some(n) => page = Some(n),
                None => break,
            }
        }
        if keys.is_empty() {
            // An implicit directory with nothing in it cannot exist; a marker-less empty
            // directory only exists in this mount's memory.
            self.store
                .put(dst, Bytes::new(), Precondition::None)
                .await?;
            return Ok(());
        }
        let files = keys.iter().map(|(k, _)| k).filter(|k| !k.ends_with('/'));
        let locks = self
            .lock_keys(files.flat_map(|k| [k.clone(), format!("{dst}{}", &k[src.len()..])]))
            .await?;
        let moved = self.move_objects(src, dst, keys).await;
        release(locks).await;
        moved
    }

    /// The moves of `rename_dir`: every object of `keys` from `src` to `dst`, then the old
    /// directory markers.
    async fn move_objects(
        &self,
        src: &str,
        dst: &str,
        keys: Vec<(String, Version)>,
    ) -> FsResult<()> {
        // Every directory level seen under `src`: their (possibly implicit) markers go last,
        // deepest first, so nothing of the old name is left behind.
        let mut dirs = std::collections::BTreeSet::new();
        dirs.insert(src.to_string());
        for (key, version) in keys {
            let rest = &key[src.len()..];
            for (i, _) in rest.match_indices('/') {
                dirs.insert(format!("{src}{}", &rest[..=i]));
            }
            let target = format!("{dst}{rest}");
            if key.ends_with('/') {
                // A directory marker has no content: make a new one (some servers cannot copy
                // their directory entries).
                self.store
                    .put(&target, Bytes::new(), Precondition::None)
                    .await?;
            } else {
                self.store.copy(&key, &target, Precondition::None).await?;
            }
            self.store
                .delete(&key, Precondition::IfVersion(version))
                .await?;
        }
        for dir in dirs.iter().rev() {
            self.store.delete(dir, Precondition::None).await?;
        }
        Ok(())
    }

    /// Re-points the inode of (parent, name) at its new place, and the keys of everything below
    /// it for a directory.
    fn move_inode(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        src: &str,
        dst: &str,
    ) {
        let mut t = self.inodes.lock().unwrap();
        t.by_name.remove(&(new_parent, new_name.to_string()));
        if let Some(ino) = t.by_name.remove(&(parent, name.to_string())) {
            t.by_name.insert((new_parent, new_name.to_string()), ino);
            if let Some(i) = t.by_ino.get_mut(&ino) {
                i.parent = new_parent;
                i.name = new_name.to_string();
            }
        }
        let (src_dir, dst_dir) = (format!("{src}/"), format!("{dst}/"));
        for i in t.by_ino.values_mut() {
            if i.key == src {
                i.key = dst.to_string();
            } else if let Some(rest) = i.key.strip_prefix(&src_dir) {
                i.key = format!("{dst_dir}{rest}");
            }
        }
    }
}

/// Gives write locks back (`Held`, `Option<Held>` or a `Vec` of them).
async fn release(locks: impl IntoIterator<Item = Held>) {
    for held in locks {
        held.release().await;
    }
}

/// The process (thread group) of the thread `tid` that sent a request; FUSE reports thread ids,
/// and a file opened by one thread is often closed by another of the same process.
fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::{Fs, ROOT_INO};
    use crate::store::mem::{Fault, MemStore, Op};
    use crate::store::{ObjectStore, StoreError};
    use crate::write::WriteConfig;

    /// A writable mount of `mem` (as another replica would have), with locks on.
    fn replica(mem: &Arc<MemStore>, staging: &tempfile::TempDir, id: &str) -> Arc<Fs> {
        let mut cfg = super::super::tests::cfg(Duration::ZERO);
        cfg.read_only = false;
        cfg.write = Some(WriteConfig {
            part_size: 5 << 20,
            staging_dir: staging.path().to_path_buf(),
        });
        cfg.locks.replica = id.to_string();
        Fs::new(mem.clone(), cfg).unwrap()
    }

    fn bytes(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn every_write_of_a_path_holds_its_lock() {
        let mem = Arc::new(MemStore::new("b"));
        let staging = tempfile::tempdir().unwrap();
        let (a, b) = (replica(&mem, &staging, "a"), replica(&mem, &staging, "b"));
        mem.put("g", bytes("g"), crate::store::Precondition::None)
            .await
            .unwrap();
        let (_, fh) = a.create(ROOT_INO, "f", 0).await.unwrap();
        a.write(fh, 0, bytes("one")).await.unwrap();
        let busy = |r: Result<_, super::FsError>| assert_eq!(r.unwrap_err().errno(), libc::EBUSY);
        busy(b.create(ROOT_INO, "f", 0).await.map(|_| ()));
        // Committed once, the file exists for b, and is still a's to change.
        a.fsync(fh).await.unwrap();
        let f = b.lookup(ROOT_INO, "f").await.unwrap();
        busy(b.open(f.ino, true, false, 0).await.map(|_| ()));
        busy(b.setattr(f.ino, Some(0), None).await.map(|_| ()));
        busy(b.unlink(ROOT_INO, "f").await);
        busy(b.rename(ROOT_INO, "f", ROOT_INO, "h", false).await);
        busy(b.rename(ROOT_INO, "g", ROOT_INO, "f", false).await);
        // Reading takes no lock.
        let r = b.open(f.ino, false, false, 0).await.unwrap();
        assert_eq!(&b.read(r.fh, 0, 10).await.unwrap()[..], b"one");
        b.release(r.fh).await;
        a.release(fh).await;
        // Released with the last handle: b may write now, a may not.
        let w = b.open(f.ino, true, true, 0).await.unwrap();
        busy(a.unlink(ROOT_INO, "f").await);
        b.release(w.fh).await;
        a.unlink(ROOT_INO, "f").await.unwrap();
        let listed = mem.list(".bucketfs/locks/", None, None, 10).await.unwrap();
        assert!(listed.objects.is_empty(), "every lock released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_fails_writes_and_commits_nothing() {
        let mem = Arc::new(MemStore::new("b"));
        let staging = tempfile::tempdir().unwrap();
        let a = replica(&mem, &staging, "a");
        let (_, fh) = a.create(ROOT_INO, "f", 0).await.unwrap();
        a.write(fh, 0, bytes("one")).await.unwrap();
        mem.inject(
            Op::Put,
            Fault::Error(StoreError::Transient("unreachable".into())),
            1000,
        );
        tokio::time::sleep(crate::lock::DEFAULT_LEASE).await;
        mem.clear_faults();
        let err = a.write(fh, 3, bytes("two")).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(a.fsync(fh).await.unwrap_err().errno(), libc::EIO);
        a.release(fh).await;
        assert!(mem.head("f").await.is_err(), "nothing committed");
    }
}
