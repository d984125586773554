//! File attributes and the special kinds of files: `chmod`, `chown`, `utimensat` (setattr),
//! the mode and owner of new files and directories, symlinks, FIFOs, sockets and device nodes,
//! and the refusal of hard links.
//!
//! Attributes live in the object's user metadata, in the names s3fs uses (`store::attrs`), so a
//! bucket stays usable by both tools. Changing them never sends the bytes again: the store
//! replaces the metadata in place, conditional on the version this mount saw (`set_meta`); while
//! a handle of the file has changes to commit, the new attributes go with that commit instead. A
//! directory's attributes live on its marker object (`d/`), written again (it is empty) on each
//! change; an implicit directory (no marker) gets one. The mount root of a whole bucket has no
//! key to hold attributes: changes to it last as long as the mount.
//!
//! Permission checks (who may `chmod` or `chown` what, and access by mode) are the kernel's,
//! with `default_permissions`, which `--allow-other` turns on.
//!
//! A symlink is an object whose body is the target; a FIFO, socket or device node an empty
//! object; both are marked by their `mode`. The kernel follows symlinks and serves FIFOs and
//! devices itself: bucketfs only stores them. A hard link cannot be expressed in a bucket (two
//! keys cannot share one object), so `link` fails with `EPERM`.

use std::time::SystemTime;

use bytes::Bytes;

use super::{Attr, Fs, FsError, FsResult, Handle};
use crate::meta::{Kind, Stat};
use crate::store::attrs::FileAttrs;
use crate::store::{Precondition, StoreError, UserMeta};

/// Who asks (the FUSE request's caller): owner of what it creates.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The attribute changes of one `setattr`.
#[derive(Clone, Debug, Default)]
pub struct AttrChange {
    pub size: Option<u64>,
    /// Permission bits (the file type cannot change).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

impl AttrChange {
    fn changes_metadata(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
    }

    /// `user` with these changes made at `now` (which becomes the change time).
    fn apply(&self, user: UserMeta, kind: Kind, now: SystemTime) -> UserMeta {
        let mut a = FileAttrs::from_meta(&user);
        if let Some(mode) = self.mode {
            let kind_bits = a.file_type().unwrap_or(kind.type_bits());
            a.mode = Some(kind_bits | (mode & 0o7777));
        }
        a.uid = self.uid.or(a.uid);
        a.gid = self.gid.or(a.gid);
        a.atime = self.atime.or(a.atime);
        a.mtime = self.mtime.or(a.mtime);
        a.ctime = Some(now);
        let mut user = user;
        a.write_to(&mut user);
        user
    }
}

/// The attributes of a new object of `kind` with permission bits `perm`, made by `caller` now.
fn new_attrs(kind: Kind, perm: u32, caller: Caller) -> FileAttrs {
    let now = SystemTime::now();
    FileAttrs {
        mode: Some(kind.type_bits() | (perm & 0o7777)),
        uid: Some(caller.uid),
        gid: Some(caller.gid),
        mtime: Some(now),
        atime: Some(now),
        ctime: Some(now),
        rdev: None,
    }
}

impl Fs {
    /// The user metadata of the object behind `ino` (its current store `stat`, or what this mount
    /// knows), with every attribute the kernel sees written out: an object without metadata
    /// gets the mount's defaults, as shown.
    pub(super) fn full_user_meta(&self, ino: u64, stat: Option<&Stat>) -> UserMeta {
        let stat = match stat {
            Some(s) => s.clone(),
            None => match self.inode_stat(ino) {
                Ok(s) => s,
                Err(_) => return UserMeta::new(),
            },
        };
        let shown = self.attr(ino, &stat);
        let mut user = stat.user.clone().unwrap_or_default();
        let mut a = FileAttrs::from_meta(&user);
        a.mode
            .get_or_insert(stat.kind.type_bits() | shown.perm as u32);
        a.uid.get_or_insert(shown.uid);
        a.gid.get_or_insert(shown.gid);
        a.mtime.get_or_insert(shown.mtime);
        a.write_to(&mut user);
        user
    }

    /// `setattr`: a size change truncates (see `write_ops`); mode, owner and times are kept in
    /// the object's metadata (see the module docs).
    pub async fn set_attrs(&self, ino: u64, ch: AttrChange, fh: Option<u64>) -> FsResult<Attr> {
        if ch.size.is_some() {
            let attr = self.setattr(ino, ch.size, fh).await?;
            if !ch.changes_metadata() {
                return Ok(attr);
            }
        } else if !ch.changes_metadata() {
            return self.getattr(ino).await;
        }
        self.write_ctx()?;
        let (key, kind) = self.inode_key(ino)?;
        if kind == Kind::Dir {
            self.set_dir_attrs(ino, &key, &ch).await?;
        } else {
            self.set_object_attrs(ino, &key, kind, &ch).await?;
        }
        self.getattr(ino).await
    }

    async fn set_dir_attrs(&self, ino: u64, marker: &str, ch: &AttrChange) -> FsResult<()> {
        let path_key = marker.strip_suffix('/').unwrap_or(marker);
        let stat = if marker.is_empty() {
            self.inode_stat(ino)?
        } else {
            self.meta.invalidate(path_key);
            self.meta
                .resolve(path_key)
                .await?
                .ok_or(FsError::NotFound)?
        };
        let user = ch.apply(
            self.full_user_meta(ino, Some(&stat)),
            Kind::Dir,
            SystemTime::now(),
        );
        if !marker.is_empty() {
            self.store
                .put_with(marker, Bytes::new(), Precondition::None, &user)
                .await?;
            self.meta.invalidate(path_key);
        }
        self.update_inode(ino, |i| i.stat.user = Some(user));
        Ok(())
    }

    async fn set_object_attrs(
        &self,
        ino: u64,
        key: &str,
        kind: Kind,
        ch: &AttrChange,
    ) -> FsResult<()> {
        let writer = self.writing.lock().unwrap().get(&ino).cloned();
        let times_set = ch.atime.is_some() || ch.mtime.is_some();
        // A concurrent change of the object fails the conditional update: start again from it.
        let mut attempts = 3;
        loop {
            attempts -= 1;
            let stat = self.meta.refresh_file(key).await?;
            if stat.is_none() && writer.is_none() {
                return Err(FsError::NotFound);
            }
            // While a handle is open for writing, this mount's view (which follows the handle's
            // pending attributes) is newer than the store's.
            let known = if writer.is_some() {
                None
            } else {
                stat.as_ref()
            };
            let user = ch.apply(self.full_user_meta(ino, known), kind, SystemTime::now());
            let pending = match &writer {
                Some(w) => w.set_user_meta(user.clone(), times_set).await,
                None => false,
            };
            let mut version = stat.as_ref().and_then(|s| s.version.clone());
            if !pending && let Some(current) = &version {
                match self.store.set_meta(key, current, &user).await {
                    Ok(v) => {
                        if let Some(w) = &writer {
                            w.rebase(v.clone()).await;
                        }
                        version = Some(v);
                    }
                    Err(StoreError::PreconditionFailed(_)) if attempts > 0 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            self.meta.invalidate(key);
            self.update_inode(ino, |i| {
                if let Some(s) = &stat {
                    i.stat = s.clone();
                }
                i.stat.user = Some(user);
                i.stat.version = version;
                i.checked = std::time::Instant::now();
            });
            return Ok(());
        }
    }

    /// `create`: a new file with permission bits `perm`, owned by `caller`, open for writing
    /// (an existing file that `create` keeps keeps its attributes).
    pub async fn create_as(
        &self,
        parent: u64,
        name: &str,
        mode: super::OpenMode,
        perm: u32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        let (attr, fh) = self.create(parent, name, mode).await?;
        self.expire_dir(parent);
        let writer = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Write(w, _)) => w.clone(),
            _ => return Ok((attr, fh)),
        };
        let stat = self.inode_stat(attr.ino)?;
        if stat.version.is_some() {
            writer
                .set_user_meta(self.full_user_meta(attr.ino, Some(&stat)), false)
                .await;
            return Ok((attr, fh));
        }
        let user = new_attrs(Kind::File, perm, caller).to_meta();
        if !writer.set_user_meta(user.clone(), false).await {
            // An exclusive create published the empty file at once: give it its attributes.
            let key = self.inode_key(attr.ino)?.0;
            if let Some(s) = self.meta.refresh_file(&key).await?
                && let Some(v) = s.version
            {
                let v = self.store.set_meta(&key, &v, &user).await?;
                writer.rebase(v).await;
                self.meta.invalidate(&key);
            }
        }
        self.update_inode(attr.ino, |i| i.stat.user = Some(user));
        Ok((self.attr(attr.ino, &self.inode_stat(attr.ino)?), fh))
    }

    /// `mkdir` with permission bits `perm`, owned by `caller`.
    pub async fn mkdir_as(
        &self,
        parent: u64,
        name: &str,
        perm: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let user = new_attrs(Kind::Dir, perm, caller).to_meta();
        let attr = self.mkdir(parent, name, &user).await?;
        self.expire_dir(parent);
        Ok(attr)
    }

    /// `symlink`: an object at `name` whose body is `target`.
    pub async fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        let attrs = new_attrs(Kind::Symlink, 0o777, caller);
        self.make_object(parent, name, Bytes::copy_from_slice(target), attrs)
            .await
    }

    /// `mknod`: a regular file, FIFO, socket or device node (`mode` has the type bits).
    pub async fn mknod(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = Kind::of_object(Some(mode));
        if mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(FsError::InvalidName);
        }
        let mut attrs = new_attrs(kind, mode, caller);
        if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            attrs.rdev = Some(rdev);
        }
        self.make_object(parent, name, Bytes::new(), attrs).await
    }

    /// Creates the object `name` in `parent` with `body`, if nothing has that name.
    async fn make_object(
        &self,
        parent: u64,
        name: &str,
        body: Bytes,
        attrs: FileAttrs,
    ) -> FsResult<Attr> {
        self.write_ctx()?;
        let key = self.child_path(parent, name)?;
        self.meta.invalidate(&key);
        if self.meta.resolve(&key).await?.is_some() {
            return Err(FsError::Exists);
        }
        let user = attrs.to_meta();
        let size = body.len() as u64;
        let lock = self.lock_key(&key).await?;
        let put = self
            .store
            .put_with(&key, body, Precondition::IfAbsent, &user)
            .await;
        if let Some(held) = lock {
            held.release().await;
        }
        let version = match put {
            Ok(v) => v,
            Err(StoreError::PreconditionFailed(_)) => return Err(FsError::Exists),
            Err(e) => return Err(e.into()),
        };
        self.meta.invalidate(&key);
        let stat = Stat {
            kind: Kind::of_object(attrs.mode),
            size,
            version: Some(version),
            mtime: SystemTime::now(),
            user: Some(user),
        };
        self.expire_dir(parent);
        Ok(self.remember(parent, name, stat))
    }

    /// `readlink`: the body of a symlink object.
    pub async fn readlink(&self, ino: u64) -> FsResult<Bytes> {
        let (key, kind) = self.inode_key(ino)?;
        if kind != Kind::Symlink {
            return Err(FsError::InvalidName);
        }
        let size = self.inode_stat(ino)?.size;
        if size == 0 {
            return Ok(Bytes::new());
        }
        Ok(self.store.get_range(&key, 0..size, None).await?)
    }

    /// `link`: refused, a bucket cannot express a hard link (see the module docs).
    pub fn link(&self) -> FsResult<Attr> {
        Err(FsError::NotPermitted(
            "hard links cannot be stored in a bucket",
        ))
    }
}
