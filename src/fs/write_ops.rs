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

use super::{Attr, Fs, FsError, FsResult, Handle, OpenMode, Opened};
use crate::lock::{Held, LockError};
use crate::meta::{Kind, Stat, check_name};
use crate::store::{Precondition, StoreError, Version, list_all};
use crate::write::{Committed, Opening, WriteContext, WriteHandle};

impl Fs {
    pub(super) fn write_ctx(&self) -> FsResult<&Arc<WriteContext>> {
        if self.is_closing() {
            return Err(FsError::ShuttingDown);
        }
        self.write.as_ref().ok_or(FsError::ReadOnly)
    }

    /// Holds the write lock of the object `key`; `None` with locking off.
    pub(super) async fn lock_key(&self, key: &str) -> FsResult<Option<Held>> {
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
    pub(super) fn child_path(&self, parent: u64, name: &str) -> FsResult<String> {
        let dir_key = self.dir_key(parent)?;
        match check_name(name) {
            Err(crate::meta::Skip::TooLong) => return Err(FsError::NameTooLong),
            Err(_) => return Err(FsError::InvalidName),
            Ok(_) if self.meta.is_reserved(&dir_key, name) => return Err(FsError::InvalidName),
            Ok(_) => {}
        }
        // Room for a directory marker's `/` too.
        if dir_key.len() + name.len() + 1 > self.store.max_key_len() {
            return Err(FsError::NameTooLong);
        }
        Ok(format!("{dir_key}{name}"))
    }

    /// The open write handle of the file (parent, name), if any.
    pub(super) fn open_writer_of(
        &self,
        parent: u64,
        name: &str,
    ) -> Option<(Arc<WriteHandle>, u64)> {
        let ino = self.inodes.lock().unwrap().by_name(parent, name)?;
        let w = self.writing.lock().unwrap().get(&ino).cloned()?;
        Some((w, ino))
    }

    fn register_writer(&self, ino: u64, handle: Arc<WriteHandle>) -> u64 {
        self.writing.lock().unwrap().insert(ino, handle.clone());
        self.add_handle(ino, Handle::Write(handle, ino))
    }

    /// How a handle of `key` starts, from what the store holds now (a fresh `HEAD`, never a
    /// cached negative entry): `O_CREAT` without `O_TRUNC` keeps an object that exists, and an
    /// exclusive create is decided by an if-absent commit of the empty file. `locked`: this
    /// mount holds the path's write lock.
    async fn opening(
        &self,
        key: &str,
        mode: OpenMode,
        locked: bool,
    ) -> FsResult<(Opening, Option<Stat>)> {
        let current = match self.meta.refresh_file(key).await? {
            Some(_) if mode.exclusive => return Err(FsError::Exists),
            Some(s) if s.kind == Kind::Dir => return Err(FsError::IsDir),
            Some(s) => s.version.clone().map(|v| (v, s)),
            None => None,
        };
        let opening = match current {
            Some((v, _)) if mode.truncate => Opening::Truncate(v),
            Some((v, s)) => return Ok((Opening::Keep(v, s.size), Some(s))),
            None if mode.exclusive => {
                match self
                    .store
                    .put(key, Bytes::new(), Precondition::IfAbsent)
                    .await
                {
                    Ok(v) => {
                        self.meta.invalidate(key);
                        Opening::Created(v)
                    }
                    Err(StoreError::PreconditionFailed(_)) if locked => {
                        // Under our lock nobody else could create it since the HEAD: an empty
                        // object now is our own put, retried after its answer was lost.
                        match self.store.head(key).await {
                            Ok(m) if m.size == 0 => Opening::Created(m.version),
                            _ => return Err(FsError::Exists),
                        }
                    }
                    Err(StoreError::PreconditionFailed(_)) => return Err(FsError::Exists),
                    Err(e) => return Err(e.into()),
                }
            }
            None => Opening::New,
        };
        Ok((opening, None))
    }

    /// Creates `name` in `parent` (or opens the object that is already there, as `O_CREAT`
    /// without `O_EXCL` asks) and opens it for writing. A new file's object appears at its first
    /// commit, except with `O_EXCL`, which commits the empty file at once: of several mounts
    /// creating it exclusively, exactly one wins and the others get `EEXIST`.
    pub async fn create(&self, parent: u64, name: &str, mode: OpenMode) -> FsResult<(Attr, u64)> {
        let ctx = self.write_ctx()?.clone();
        let path_key = self.child_path(parent, name)?;
        let lock = match self.lock_key(&path_key).await {
            // Another replica is creating or writing it: for an exclusive create, it exists.
            Err(FsError::Lock(LockError::Busy { .. })) if mode.exclusive => {
                return Err(FsError::Exists);
            }
            other => other?,
        };
        let (opening, kept) = match self.opening(&path_key, mode, lock.is_some()).await {
            Ok(o) => o,
            Err(e) => {
                release(lock).await;
                return Err(e);
            }
        };
        let handle = WriteHandle::open(ctx, path_key.clone(), opening, mode.append, lock)?;
        let stat = kept.unwrap_or(Stat {
            kind: Kind::File,
            size: 0,
            version: None,
            mtime: SystemTime::now(),
            user: Some(Default::default()),
        });
        let attr = self.remember(parent, name, stat);
        let fh = self.register_writer(attr.ino, Arc::new(handle));
        Ok((attr, fh))
    }

    /// Opens an existing file for writing: truncated, or kept (staged on the first change).
    pub(super) async fn open_write(&self, ino: u64, mode: OpenMode) -> FsResult<Opened> {
        let ctx = self.write_ctx()?.clone();
        let (key, kind) = self.inode_key(ino)?;
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let lock = self.lock_key(&key).await?;
        // No object: created here and not committed yet (or deleted meanwhile): starts empty.
        let mode = OpenMode {
            exclusive: false,
            ..mode
        };
        let opening = match self.opening(&key, mode, lock.is_some()).await {
            Ok((o, _)) => o,
            Err(e) => {
                release(lock).await;
                return Err(e);
            }
        };
        let handle = WriteHandle::open(ctx, key.clone(), opening, mode.append, lock)?;
        // The new content keeps the file's attributes.
        let stat = self.meta.resolve(&key).await?;
        handle
            .set_user_meta(self.full_user_meta(ino, stat.as_ref()), false)
            .await;
        if mode.truncate {
            self.update_inode(ino, |i| {
                i.stat.size = 0;
                i.cached_version = None;
            });
        }
        let fh = self.register_writer(ino, Arc::new(handle));
        Ok(Opened {
            fh,
            keep_cache: false,
            backing: None,
            version: String::new(),
        })
    }

    /// A write through `fh` by the file table `owner` (the FUSE lock owner, when the kernel
    /// names one).
    pub async fn write(
        &self,
        fh: u64,
        offset: u64,
        data: Bytes,
        owner: Option<u64>,
    ) -> FsResult<u32> {
        Ok(self.write_handle(fh)?.0.write(offset, data, owner).await?)
    }

    fn write_handle(&self, fh: u64) -> FsResult<(Arc<WriteHandle>, u64)> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Write(w, ino)) => Ok((w.clone(), *ino)),
            _ => Err(FsError::BadHandle),
        }
    }

    /// `close` of a descriptor (`FLUSH`) by the file table `owner`: commits what that table
    /// wrote since the last commit, nothing else (see "When a handle commits" in `write/`).
    pub async fn flush(&self, fh: u64, owner: u64) -> FsResult<()> {
        let Ok((w, ino)) = self.write_handle(fh) else {
            self.settle_read(fh).await;
            return Ok(());
        };
        let committed = w.flush(owner).await?;
        self.committed(ino, committed);
        Ok(())
    }

    /// `fsync`: commit what the handle changed.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.write_handle(fh) {
            Ok((w, ino)) => self.commit_handle(&w, ino).await,
            Err(_) => Ok(()),
        }
    }

    pub(super) async fn commit_handle(&self, w: &WriteHandle, ino: u64) -> FsResult<()> {
        let committed = w.commit().await?;
        self.committed(ino, committed);
        Ok(())
    }

    /// Shows a commit's result to this mount.
    fn committed(&self, ino: u64, committed: Option<Committed>) {
        if let Some(c) = committed {
            self.meta.invalidate(&c.key);
            self.update_inode(ino, |i| {
                i.stat = Stat {
                    kind: Kind::File,
                    size: c.size,
                    version: Some(c.version.clone()),
                    mtime: SystemTime::now(),
                    user: Some(c.user.clone()),
                };
                i.checked = Instant::now();
                // The kernel's pages may hold what was written; the next open starts clean.
                i.cached_version = None;
            });
        }
    }

    pub(super) fn update_inode(&self, ino: u64, f: impl FnOnce(&mut super::InodeEdit)) {
        self.inodes.lock().unwrap().update(ino, f);
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
                    let mode = OpenMode {
                        write: true,
                        truncate: size == 0,
                        ..OpenMode::READ
                    };
                    let opened = self.open_write(ino, mode).await?;
                    let (w, _) = self.write_handle(opened.fh)?;
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

    /// Deletes a file. One still open for writing here is unlinked too: whatever it holds is
    /// never committed (as on a local filesystem, its bytes go away with the last descriptor),
    /// and a new file that has no object yet simply disappears.
    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.write_ctx()?;
        let path_key = self
            .child_path(parent, name)
            .map_err(|_| FsError::NotFound)?;
        let writer = self
            .open_writer_of(parent, name)
            .filter(|(_, ino)| self.inode_key(*ino).is_ok_and(|(k, _)| k == path_key));
        let exists = match self.meta.refresh_file(&path_key).await? {
            None if writer.is_none() => return Err(FsError::NotFound),
            Some(s) if s.kind == Kind::Dir => return Err(FsError::IsDir),
            found => found.is_some(),
        };
        let lock = self.lock_key(&path_key).await?;
        if let Some((w, _)) = &writer {
            w.unlink().await;
        }
        let deleted = match exists {
            true => self.store.delete(&path_key, Precondition::None).await,
            false => Ok(()),
        };
        release(lock).await;
        deleted?;
        self.meta.invalidate(&path_key);
        self.forget_name(parent, name);
        Ok(())
    }

    /// Drops the (parent, name) -> inode link after the name went away; the inode itself lives
    /// until the kernel forgets it.
    fn forget_name(&self, parent: u64, name: &str) {
        self.inodes.lock().unwrap().untie_name(parent, name);
        self.expire_dir(parent);
    }

    /// Creates the directory `name` in `parent`; its marker object carries `user` (attributes).
    pub async fn mkdir(
        &self,
        parent: u64,
        name: &str,
        user: &crate::store::UserMeta,
    ) -> FsResult<Attr> {
        self.write_ctx()?;
        let path_key = self.child_path(parent, name)?;
        self.meta.invalidate(&path_key);
        if self.meta.resolve(&path_key).await?.is_some() {
            return Err(FsError::Exists);
        }
        let marker = format!("{path_key}/");
        put_marker(self, &marker, user).await?;
        self.meta.invalidate(&path_key);
        let stat = Stat {
            mtime: SystemTime::now(),
            user: Some(user.clone()),
            ..Stat::dir()
        };
        Ok(self.remember(parent, name, stat))
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.write_ctx()?;
        let path_key = self
            .child_path(parent, name)
            .map_err(|_| FsError::NotFound)?;
        self.meta.invalidate(&path_key);
        match self.meta.resolve(&path_key).await? {
            None => return Err(FsError::NotFound),
            Some(s) if s.kind != Kind::Dir => return Err(FsError::NotDir),
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
                Kind::File
                | Kind::Symlink
                | Kind::Fifo
                | Kind::Socket
                | Kind::CharDevice
                | Kind::BlockDevice => {
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
                        if d.kind != Kind::Dir {
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
            self.move_inode(parent, name, new_parent, new_name);
            self.expire_dir(parent);
            self.expire_dir(new_parent);
            Ok(())
        }
        .await;
        release(locks).await;
        result
    }

    /// Files under the directory key `dir` (ending in `/`) open for writing here: (handle,
    /// key).
    fn open_writers_under(&self, dir: &str) -> Vec<(Arc<WriteHandle>, u64)> {
        let writing: Vec<(u64, Arc<WriteHandle>)> = self
            .writing
            .lock()
            .unwrap()
            .iter()
            .map(|(ino, w)| (*ino, w.clone()))
            .collect();
        let t = self.inodes.lock().unwrap();
        writing
            .into_iter()
            .filter(|(ino, _)| t.key(*ino).is_some_and(|k| k.starts_with(dir)))
            .map(|(ino, w)| (w, ino))
            .collect()
    }

    /// Moves every object under `src` (a prefix ending in `/`) to `dst`, one by one. Files open
    /// for writing under `src` are committed first, so that there is an object to move, and
    /// then follow their new names, as a single file's rename does.
    async fn rename_dir(&self, src: &str, dst: &str) -> FsResult<()> {
        let writers = self.open_writers_under(src);
        for (w, ino) in &writers {
            self.commit_handle(w, *ino).await?;
        }
        let keys: Vec<(String, Version)> = list_all(&*self.store, src)
            .await?
            .into_iter()
            .map(|o| (o.key, o.version))
            .collect();
        if keys.is_empty() {
            // An implicit directory with nothing in it cannot exist; a marker-less empty
            // directory only exists in this mount's memory.
            return put_marker(self, dst, &Default::default()).await;
        }
        let files = keys.iter().map(|(k, _)| k).filter(|k| !k.ends_with('/'));
        let locks = self
            .lock_keys(files.flat_map(|k| [k.clone(), format!("{dst}{}", &k[src.len()..])]))
            .await?;
        let result = self.move_objects(src, dst, keys).await;
        if let Ok(moved) = &result {
            for (w, _) in &writers {
                let key = w.key().await;
                let new_key = format!("{dst}{}", &key[src.len()..]);
                let Some(version) = moved.get(&new_key) else {
                    continue;
                };
                let lock = locks.iter().find(|h| h.key() == new_key).map(Held::share);
                let old = w.rekey(new_key, version.clone(), lock).await;
                release(old).await;
            }
        }
        release(locks).await;
        result.map(|_| ())
    }

    /// The moves of `rename_dir`: every object of `keys` from `src` to `dst`, then the old
    /// directory markers; returns the version of each file under its new name. A copy only
    /// lands where there is nothing (the target directory was checked empty: an object that
    /// appeared there meanwhile is another client's and is not overwritten), and a source is
    /// deleted only if it is still the version that was copied.
    async fn move_objects(
        &self,
        src: &str,
        dst: &str,
        keys: Vec<(String, Version)>,
    ) -> FsResult<std::collections::HashMap<String, Version>> {
        let mut moved = std::collections::HashMap::new();
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
                // their directory entries), with the old one's attributes.
                let user = match self.store.head(&key).await {
                    Ok(m) => m.user.unwrap_or_default(),
                    Err(_) => Default::default(),
                };
                put_marker(self, &target, &user).await?;
            } else {
                match self.store.copy(&key, &target, Precondition::IfAbsent).await {
                    Ok(v) => {
                        moved.insert(target, v);
                    }
                    Err(StoreError::PreconditionFailed(_)) => return Err(FsError::NotEmpty),
                    Err(e) => return Err(e.into()),
                }
            }
            self.store
                .delete(&key, Precondition::IfVersion(version))
                .await?;
        }
        for dir in dirs.iter().rev() {
            self.store.delete(dir, Precondition::None).await?;
        }
        Ok(moved)
    }

    /// Re-points the inode of (parent, name) at its new place; everything below a directory
    /// follows (keys are made from parents).
    fn move_inode(&self, parent: u64, name: &str, new_parent: u64, new_name: &str) {
        let mut t = self.inodes.lock().unwrap();
        t.rename(parent, name, new_parent, new_name);
    }
}

/// Makes the empty directory marker `marker` unless there is one already.
async fn put_marker(fs: &Fs, marker: &str, user: &crate::store::UserMeta) -> FsResult<()> {
    match fs
        .store
        .put_with(marker, Bytes::new(), Precondition::IfAbsent, user)
        .await
    {
        Ok(_) | Err(StoreError::PreconditionFailed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Gives write locks back (`Held`, `Option<Held>` or a `Vec` of them).
async fn release(locks: impl IntoIterator<Item = Held>) {
    for held in locks {
        held.release().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::tests::{CREATE, OWNER, TRUNCATE, WRITE};
    use super::super::{Fs, OpenMode, ROOT_INO};
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
        Fs::new(mem.clone(), cfg)
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
        let (_, fh) = a.create(ROOT_INO, "f", CREATE).await.unwrap();
        a.write(fh, 0, bytes("one"), Some(OWNER)).await.unwrap();
        let busy = |r: Result<_, super::FsError>| assert_eq!(r.unwrap_err().errno(), libc::EBUSY);
        busy(b.create(ROOT_INO, "f", CREATE).await.map(|_| ()));
        // Committed once, the file exists for b, and is still a's to change.
        a.fsync(fh).await.unwrap();
        let f = b.lookup(ROOT_INO, "f").await.unwrap();
        busy(b.open(f.ino, WRITE).await.map(|_| ()));
        busy(b.setattr(f.ino, Some(0), None).await.map(|_| ()));
        busy(b.unlink(ROOT_INO, "f").await);
        busy(b.rename(ROOT_INO, "f", ROOT_INO, "h", false).await);
        busy(b.rename(ROOT_INO, "g", ROOT_INO, "f", false).await);
        // Reading takes no lock.
        let r = b.open(f.ino, OpenMode::READ).await.unwrap();
        assert_eq!(&b.read(r.fh, 0, 10).await.unwrap()[..], b"one");
        b.release(r.fh).await;
        a.release(fh).await;
        // Released with the last handle: b may write now, a may not.
        let w = b.open(f.ino, TRUNCATE).await.unwrap();
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
        let (_, fh) = a.create(ROOT_INO, "f", CREATE).await.unwrap();
        a.write(fh, 0, bytes("one"), Some(OWNER)).await.unwrap();
        mem.inject(
            Op::Put,
            Fault::Error(StoreError::Transient("unreachable".into())),
            1000,
        );
        tokio::time::sleep(crate::lock::DEFAULT_LEASE).await;
        mem.clear_faults();
        let err = a.write(fh, 3, bytes("two"), Some(OWNER)).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(a.fsync(fh).await.unwrap_err().errno(), libc::EIO);
        a.release(fh).await;
        assert!(mem.head("f").await.is_err(), "nothing committed");
    }

    /// A file that appears in the target directory while a directory rename runs is another
    /// client's: the move's copy onto it fails (`ENOTEMPTY`) instead of overwriting it.
    #[tokio::test]
    async fn a_directory_rename_never_copies_over_an_object_that_appeared() {
        let mem = Arc::new(MemStore::new("b"));
        let staging = tempfile::tempdir().unwrap();
        let a = replica(&mem, &staging, "a");
        mem.put("d1/f", bytes("mine"), crate::store::Precondition::None)
            .await
            .unwrap();
        a.lookup(ROOT_INO, "d1").await.unwrap();
        mem.inject(Op::Copy, Fault::Delay(Duration::from_millis(300)), 1);
        let rename = {
            let a = a.clone();
            tokio::spawn(async move { a.rename(ROOT_INO, "d1", ROOT_INO, "d2", false).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        mem.put("d2/f", bytes("theirs"), crate::store::Precondition::None)
            .await
            .unwrap();
        let err = rename.await.unwrap().unwrap_err();
        assert_eq!(err.errno(), libc::ENOTEMPTY);
        let kept = mem.get_range("d2/f", 0..10, None).await.unwrap();
        assert_eq!(&kept[..], b"theirs");
        let source = mem.get_range("d1/f", 0..10, None).await.unwrap();
        assert_eq!(&source[..], b"mine", "nothing lost");
    }

    /// An exclusive create whose put landed but whose answer was lost, retried into `412`: under
    /// the path's lock that object is our own, so the create wins instead of failing `EEXIST`.
    #[tokio::test]
    async fn an_exclusive_create_whose_answer_was_lost_still_wins() {
        let mem = Arc::new(MemStore::new("b"));
        let staging = tempfile::tempdir().unwrap();
        let a = replica(&mem, &staging, "a");
        let exclusive = OpenMode {
            exclusive: true,
            ..CREATE
        };
        // The first put is the lock object's; the answer of the second, the file's, is lost.
        mem.inject(Op::Put, Fault::Delay(Duration::ZERO), 1);
        mem.inject(
            Op::Put,
            Fault::AnswerLost(StoreError::PreconditionFailed("y".into())),
            1,
        );
        let (_, fh) = a.create(ROOT_INO, "y", exclusive).await.unwrap();
        a.release(fh).await;
        assert_eq!(mem.head("y").await.unwrap().size, 0);
        let err = a.create(ROOT_INO, "y", exclusive).await.unwrap_err();
        assert_eq!(err.errno(), libc::EEXIST, "and then it exists");
    }
}
