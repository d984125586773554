//! A local directory used as a bucket (`file:///path`): how a new user tries bucketfs with no
//! cloud account, and a real backend with honest preconditions.
//!
//! Mapping: the object key `a/b/c` is the file `ROOT/a/b/c`; a directory `ROOT/a/` is the common
//! prefix `a/`, and an *empty* directory is also the marker object `a/` (so `mkdir` is visible, as
//! on a bucket with marker objects; a non-empty directory is implied by its contents). Keys that cannot be paths (`a//b`, `.` or `..` segments) are `Invalid`.
//!
//! Versions are `inode.mtime-nanos.size` of the file: every write replaces the file by an atomic
//! `rename` of a fully written temporary file, so a new version is a new inode and a reader with
//! the old file open keeps reading the old bytes (which `get_range` pins by comparing the open
//! file's version).
//!
//! Attributes are the files' own: `head` reports a file's mode, owner and times as the user
//! metadata names of `store::attrs` (the s3fs names), and writing those names sets them on the
//! file (`chmod`, `lchown`, `utimensat`), so the directory stays a faithful copy that any other
//! program reads the same way. A symbolic link is a real symlink (its object body is the target,
//! as on a bucket); a FIFO, socket or device node a real one. bucketfs never follows a symlink
//! itself: a key whose path runs through a symlinked directory does not exist, so nothing under
//! the root can lead bucketfs outside it; the kernel follows the links it reads through a mount.
//!
//! Preconditions hold across processes: create-if-absent publishes with `link(2)`, which fails
//! atomically if the name exists; compare-and-replace and conditional delete run under an
//! exclusive `flock` on the root directory, which every mutating call of every bucketfs process
//! takes. Temporary files (`.bucketfs-tmp.*`) and multipart parts (under `.bucketfs/uploads/`) are
//! never listed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use nix::fcntl::{AT_FDCWD, Flock, FlockArg};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::rules;
use super::{
    ListPage, ObjectMeta, ObjectStore, Part, Precondition, StoreError, StoreResult, Upload,
    UserMeta, Version, attrs::FileAttrs, page_of,
};

const TMP_PREFIX: &str = ".bucketfs-tmp.";
const UPLOADS_DIR: &str = ".bucketfs/uploads";

#[derive(Debug)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// The sorted names of the directories listed last, most recent last (see [`Snapshot`]).
    snapshots: std::sync::Mutex<Vec<(PathBuf, Arc<Snapshot>)>>,
}

/// Makes temporary and upload names unique within the process (with the pid: across processes).
static COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Opens `root`, which must be an existing directory.
    pub fn new(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::BucketNotFound(format!(
                    "{} is not a directory",
                    root.display()
                )));
            }
            Err(_) => {
                return Err(StoreError::BucketNotFound(format!(
                    "directory {} does not exist",
                    root.display()
                )));
            }
        }
        Ok(LocalStore {
            inner: Arc::new(Inner {
                root,
                snapshots: Default::default(),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Transient(format!("local store task failed: {e}")))?
    }
}

fn io_err(what: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound(what.to_string()),
        io::ErrorKind::PermissionDenied => StoreError::Unauthorized(format!("{what}: {e}")),
        io::ErrorKind::AlreadyExists => StoreError::PreconditionFailed(what.to_string()),
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => StoreError::NotFound(what.to_string()),
        _ if e.raw_os_error() == Some(libc::EISDIR) => {
            StoreError::Conflict(format!("{what}: a directory has this name"))
        }
        _ if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
            StoreError::NameTooLong(what.to_string())
        }
        _ if e.raw_os_error() == Some(libc::EPERM) => {
            StoreError::Unauthorized(format!("{what}: {e}"))
        }
        _ if e.raw_os_error() == Some(libc::ENOSPC) => {
            StoreError::Invalid(format!("{what}: no space left on device"))
        }
        _ => StoreError::Transient(format!("{what}: {e}")),
    }
}

fn version_of(m: &fs::Metadata) -> Version {
    if m.is_dir() {
        return Version("dir".to_string());
    }
    let mtime = (m.mtime() as i128) * 1_000_000_000 + m.mtime_nsec() as i128;
    Version(format!("{:x}.{:x}.{:x}", m.ino(), mtime, m.size()))
}

fn time_of(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH
    }
}

/// A file's own attributes, as user metadata.
fn attrs_of(m: &fs::Metadata) -> FileAttrs {
    let ft = m.file_type();
    let device = {
        use std::os::unix::fs::FileTypeExt;
        ft.is_block_device() || ft.is_char_device()
    };
    FileAttrs {
        mode: Some(m.mode()),
        uid: Some(m.uid()),
        gid: Some(m.gid()),
        mtime: Some(time_of(m.mtime(), m.mtime_nsec())),
        atime: Some(time_of(m.atime(), m.atime_nsec())),
        ctime: Some(time_of(m.ctime(), m.ctime_nsec())),
        rdev: device.then_some(m.rdev() as u32),
    }
}

/// `m` is `lstat`'s answer: a symlink is an object of its own (its size is its target's length).
fn meta_of(key: String, m: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key,
        size: if m.is_dir() { 0 } else { m.size() },
        version: version_of(m),
        last_modified: time_of(m.mtime(), m.mtime_nsec()),
        user: Some(attrs_of(m).to_meta()),
    }
}

/// Sets the attributes `a` records on `path` itself (never on a symlink's target). The owner
/// goes first: `chown` clears set-user-ID bits that the mode may set again.
/// With `strict == false` (a new object), an owner this process may not give (it is not root)
/// is left as it is rather than failing the write.
fn apply_attrs(path: &Path, a: &FileAttrs, strict: bool) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    let mut uid = a.uid.filter(|u| *u != m.uid());
    let mut gid = a.gid.filter(|g| *g != m.gid());
    if uid.is_some() || gid.is_some() {
        match std::os::unix::fs::lchown(path, uid, gid) {
            Err(e) if !strict && e.raw_os_error() == Some(libc::EPERM) => (uid, gid) = (None, None),
            other => other?,
        }
    }
    if let Some(mode) = a.mode
        && !m.file_type().is_symlink()
        && (mode & 0o7777 != m.mode() & 0o7777 || uid.is_some() || gid.is_some())
    {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if a.mtime.is_some() || a.atime.is_some() {
        let spec = |t: Option<SystemTime>| match t {
            Some(t) => TimeSpec::from(t.duration_since(UNIX_EPOCH).unwrap_or_default()),
            None => TimeSpec::UTIME_OMIT,
        };
        utimensat(
            AT_FDCWD,
            path,
            &spec(a.atime),
            &spec(a.mtime),
            UtimensatFlags::NoFollowSymlink,
        )?;
    }
    Ok(())
}

/// Makes a FIFO, socket or device node at `path`.
fn make_node(path: &Path, mode: u32, rdev: u32) -> io::Result<()> {
    let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
    let perm = Mode::from_bits_truncate(mode & 0o7777);
    Ok(mknod(path, kind, perm, rdev.into())?)
}

/// Names the store itself uses inside the root; never listed as objects.
fn is_internal(name: &str) -> bool {
    name.starts_with(TMP_PREFIX)
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// An exclusive `flock` on the root directory, held for the life of the guard.
struct RootLock {
    /// The root, held open for the lock; closing it releases the flock.
    _dir: Flock<File>,
}

impl RootLock {
    fn take(root: &Path) -> StoreResult<RootLock> {
        let f = File::open(root).map_err(|e| io_err("lock store root", e))?;
        let locked = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("lock store root", e.into()))?;
        Ok(RootLock { _dir: locked })
    }
}

impl Inner {
    /// The path of `key`, refusing keys that are not clean relative paths. A key whose path
    /// runs through a symlink (anything but its last segment) names no object: bucketfs never
    /// follows a link itself (see the module docs).
    fn path(&self, key: &str) -> StoreResult<PathBuf> {
        let trimmed = key.strip_suffix('/').unwrap_or(key);
        if trimmed.is_empty() {
            return Ok(self.root.clone());
        }
        let mut p = self.root.clone();
        let mut segments = trimmed.split('/').peekable();
        while let Some(seg) = segments.next() {
            if seg.is_empty() || seg == "." || seg == ".." || seg.contains('\0') {
                return Err(StoreError::Invalid(format!(
                    "key {key:?} cannot be stored in a local directory"
                )));
            }
            p.push(seg);
            let last = segments.peek().is_none() && !key.ends_with('/');
            if !last && fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(StoreError::NotFound(format!(
                    "{key}: its path runs through a symbolic link"
                )));
            }
        }
        Ok(p)
    }

    fn tmp_path(&self, dir: &Path) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{TMP_PREFIX}{}.{n}", std::process::id()))
    }

    fn current(&self, path: &Path) -> Option<fs::Metadata> {
        fs::symlink_metadata(path).ok()
    }

    /// Publishes the fully written `tmp` at `key` if `pre` holds. Consumes `tmp` either way.
    fn commit(&self, key: &str, tmp: &Path, pre: &Precondition) -> StoreResult<Version> {
        let result = self.commit_inner(key, tmp, pre);
        let _ = fs::remove_file(tmp);
        result
    }

    fn commit_inner(&self, key: &str, tmp: &Path, pre: &Precondition) -> StoreResult<Version> {
        let path = self.path(key)?;
        let _lock = RootLock::take(&self.root)?;
        match pre {
            Precondition::IfAbsent => {
                fs::hard_link(tmp, &path).map_err(|e| io_err(key, e))?;
            }
            Precondition::IfVersion(v) => {
                match self.current(&path) {
                    Some(m) if version_of(&m) == *v && !m.is_dir() => {}
                    _ => return Err(StoreError::PreconditionFailed(key.to_string())),
                }
                fs::rename(tmp, &path).map_err(|e| io_err(key, e))?;
            }
            Precondition::None => {
                fs::rename(tmp, &path).map_err(|e| io_err(key, e))?;
            }
        }
        let m = fs::symlink_metadata(&path).map_err(|e| io_err(key, e))?;
        Ok(version_of(&m))
    }

    /// A fresh temporary name next to `key`'s path (its directory created if need be).
    fn tmp_for(&self, key: &str) -> StoreResult<PathBuf> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::Invalid(format!("key {key:?} has no parent")))?;
        fs::create_dir_all(dir).map_err(|e| io_err(key, e))?;
        Ok(self.tmp_path(dir))
    }

    /// Makes the object to publish at `key` as a temporary file: a regular file filled by
    /// `write`, or, when `attrs` say so, a symlink to `link` or a FIFO, socket or device node;
    /// then gives it the attributes `attrs` record.
    fn stage(
        &self,
        key: &str,
        attrs: &FileAttrs,
        link: impl FnOnce() -> io::Result<Vec<u8>>,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> StoreResult<PathBuf> {
        let tmp = self.tmp_for(key)?;
        let result = (|| {
            match attrs.file_type() {
                Some(libc::S_IFLNK) => {
                    let target = link()?;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &tmp)?;
                }
                Some(t @ (libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK)) => {
                    make_node(&tmp, t | 0o600, attrs.rdev.unwrap_or(0))?;
                }
                _ => {
                    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                    write(&mut f)?;
                    f.sync_data()?;
                }
            }
            apply_attrs(&tmp, attrs, false)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(key, e));
        }
        Ok(tmp)
    }

    /// Sets `meta`'s attributes on the object `key` if it is still `version`.
    fn set_meta(&self, key: &str, version: &Version, meta: &UserMeta) -> StoreResult<Version> {
        let path = self.path(key)?;
        let _lock = RootLock::take(&self.root)?;
        match self.current(&path) {
            Some(m) if version_of(&m) == *version && m.is_dir() == key.ends_with('/') => {}
            _ => return Err(StoreError::PreconditionFailed(key.to_string())),
        }
        apply_attrs(&path, &FileAttrs::from_meta(meta), true).map_err(|e| io_err(key, e))?;
        let m = fs::symlink_metadata(&path).map_err(|e| io_err(key, e))?;
        Ok(version_of(&m))
    }

    fn put(
        &self,
        key: &str,
        body: &[u8],
        pre: &Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let attrs = FileAttrs::from_meta(meta);
        if key.ends_with('/') {
            // A directory marker.
            let path = self.path(key)?;
            let _lock = RootLock::take(&self.root)?;
            if *pre == Precondition::IfAbsent && fs::symlink_metadata(&path).is_ok() {
                return Err(StoreError::PreconditionFailed(key.to_string()));
            }
            fs::create_dir_all(&path).map_err(|e| io_err(key, e))?;
            apply_attrs(&path, &attrs, false).map_err(|e| io_err(key, e))?;
            return Ok(Version("dir".into()));
        }
        let tmp = self.stage(key, &attrs, || Ok(body.to_vec()), |f| f.write_all(body))?;
        self.commit(key, &tmp, pre)
    }

    fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let path = self.path(key)?;
        let m = fs::symlink_metadata(&path).map_err(|e| io_err(key, e))?;
        if m.is_dir() != key.ends_with('/') || key.is_empty() {
            return Err(StoreError::NotFound(key.to_string()));
        }
        Ok(meta_of(key.to_string(), &m))
    }

    fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let path = self.path(key)?;
        let linked = fs::symlink_metadata(&path).map_err(|e| io_err(key, e))?;
        if !linked.is_file() && !linked.is_dir() {
            // A symlink's body is its target; a FIFO, socket or device node has none.
            if let Some(v) = if_version
                && version_of(&linked) != *v
            {
                return Err(StoreError::PreconditionFailed(key.to_string()));
            }
            let body = match fs::read_link(&path) {
                Ok(target) => target.into_os_string().into_vec(),
                Err(_) => Vec::new(),
            };
            let start = (range.start as usize).min(body.len());
            let end = (range.end as usize).min(body.len());
            return Ok(Bytes::copy_from_slice(&body[start..end]));
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err(key, e))?;
        let m = f.metadata().map_err(|e| io_err(key, e))?;
        if m.is_dir() {
            return Err(StoreError::NotFound(key.to_string()));
        }
        if let Some(v) = if_version
            && version_of(&m) != *v
        {
            return Err(StoreError::PreconditionFailed(key.to_string()));
        }
        let range = rules::within(key, range, m.size())?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        f.read_exact_at(&mut buf, range.start)
            .map_err(|e| io_err(key, e))?;
        Ok(Bytes::from(buf))
    }

    /// Every object under the directory `dir` (key prefix `dir_key`), recursively, with a marker
    /// for each empty directory (one level is [`Inner::list_one_level`]).
    fn walk(&self, dir: &Path, dir_key: &str, name_filter: &str, out: &mut Vec<ObjectMeta>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(dir = %dir.display(), "skipping a file name that is not UTF-8");
                continue;
            };
            if !name.starts_with(name_filter) || is_internal(&name) {
                continue;
            }
            if format!("{dir_key}{name}") == UPLOADS_DIR {
                // Multipart parts in progress: not objects (other `.bucketfs/` keys, such as
                // lock objects, are).
                continue;
            }
            // The entry itself, never what a symlink points to.
            let Ok(m) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if m.is_dir() {
                let key = format!("{dir_key}{name}/");
                if is_empty_dir(&entry.path()) {
                    // Only an empty directory needs its marker to exist; a non-empty one is
                    // implied by its contents, as on a bucket.
                    out.push(meta_of(key.clone(), &m));
                } else {
                    self.walk(&entry.path(), &key, "", out);
                }
            } else {
                out.push(meta_of(format!("{dir_key}{name}"), &m));
            }
        }
    }

    fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let (dir_key, partial) = match prefix.rfind('/') {
            Some(i) => (&prefix[..=i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let dir = match self.path(dir_key) {
            Ok(d) => d,
            // A prefix that no path can hold (or one through a symlink) matches nothing.
            Err(StoreError::Invalid(_) | StoreError::NotFound(_)) => {
                return Ok(ListPage::default());
            }
            Err(e) => return Err(e),
        };
        if delimiter == Some("/") {
            return self.list_one_level(&dir, dir_key, partial, delimiter, page, max_keys);
        }
        // A delimiter other than "/" cannot use the directory shape; walk everything.
        let mut all = Vec::new();
        if partial.is_empty()
            && !dir_key.is_empty()
            && is_empty_dir(&dir)
            && let Ok(m) = fs::metadata(&dir)
        {
            all.push(meta_of(dir_key.to_string(), &m));
        }
        self.walk(&dir, dir_key, partial, &mut all);
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(page_of(all, prefix, delimiter, page, max_keys))
    }

    fn uploads_dir(&self, id: &str) -> PathBuf {
        self.root.join(UPLOADS_DIR).join(id)
    }

    fn delete(&self, key: &str, pre: &Precondition) -> StoreResult<()> {
        let path = self.path(key)?;
        let _lock = RootLock::take(&self.root)?;
        let current = self.current(&path);
        if let Some(v) = rules::delete_condition(pre)? {
            match &current {
                Some(m) if version_of(m) == *v => {}
                _ => return Err(StoreError::PreconditionFailed(key.to_string())),
            }
        }
        match current {
            None => Ok(()),
            Some(m) if m.is_dir() => {
                if !key.ends_with('/') {
                    return Ok(());
                }
                // A marker of a non-empty directory: the directory stays (implicitly).
                match fs::remove_dir(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
                    Err(e) => Err(io_err(key, e)),
                }
            }
            Some(_) => {
                if key.ends_with('/') {
                    return Ok(());
                }
                match fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_err(key, e)),
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.inner.root.display())
    }

    /// A path under the root must fit in `PATH_MAX` (4,096 bytes with its NUL).
    fn max_key_len(&self) -> usize {
        (libc::PATH_MAX as usize).saturating_sub(self.inner.root.as_os_str().len() + 2)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let key = key.to_string();
        self.blocking(move |s| s.head(&key)).await
    }

    async fn head_timed(&self, key: &str) -> StoreResult<(ObjectMeta, SystemTime)> {
        // The directory's clock is this machine's, read after the file's time was.
        let meta = self.head(key).await?;
        Ok((meta, SystemTime::now()))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_version: Option<&Version>,
    ) -> StoreResult<Bytes> {
        let key = key.to_string();
        let v = if_version.cloned();
        self.blocking(move |s| s.get_range(&key, range, v.as_ref()))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let prefix = prefix.to_string();
        let delimiter = delimiter.map(str::to_string);
        self.blocking(move |s| s.list(&prefix, delimiter.as_deref(), page, max_keys))
            .await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        pre: Precondition,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let key = key.to_string();
        let meta = meta.clone();
        self.blocking(move |s| s.put(&key, &body, &pre, &meta))
            .await
    }

    async fn start_upload_with(&self, key: &str, meta: &UserMeta) -> StoreResult<Upload> {
        let key = key.to_string();
        let meta = meta.clone();
        self.blocking(move |s| {
            s.path(&key)?;
            let id = format!(
                "{}.{}.{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            fs::create_dir_all(s.uploads_dir(&id)).map_err(|e| io_err(&key, e))?;
            Ok(Upload { key, id, meta })
        })
        .await
    }

    async fn upload_part(&self, upload: &Upload, number: u32, body: Bytes) -> StoreResult<Part> {
        let upload = upload.clone();
        self.blocking(move |s| {
            let dir = s.uploads_dir(&upload.id);
            if !dir.is_dir() {
                return Err(StoreError::NotFound(format!("upload {}", upload.id)));
            }
            let path = dir.join(format!("{number:08}"));
            fs::write(&path, &body).map_err(|e| io_err(&upload.key, e))?;
            Ok(Part {
                number,
                tag: format!("{number}"),
            })
        })
        .await
    }

    async fn complete_upload(
        &self,
        upload: &Upload,
        parts: Vec<Part>,
        pre: Precondition,
    ) -> StoreResult<Version> {
        let upload = upload.clone();
        self.blocking(move |s| {
            let dir = s.uploads_dir(&upload.id);
            if !dir.is_dir() {
                return Err(StoreError::NotFound(format!("upload {}", upload.id)));
            }
            let attrs = FileAttrs::from_meta(&upload.meta);
            let tmp = s.stage(
                &upload.key,
                &attrs,
                || Ok(Vec::new()),
                |f| {
                    for p in &parts {
                        let mut part = File::open(dir.join(format!("{:08}", p.number)))?;
                        io::copy(&mut part, f)?;
                    }
                    Ok(())
                },
            )?;
            let v = s.commit(&upload.key, &tmp, &pre)?;
            let _ = fs::remove_dir_all(&dir);
            Ok(v)
        })
        .await
    }

    async fn abort_upload(&self, upload: &Upload) -> StoreResult<()> {
        let id = upload.id.clone();
        self.blocking(move |s| {
            let _ = fs::remove_dir_all(s.uploads_dir(&id));
            Ok(())
        })
        .await
    }

    async fn copy(&self, src: &str, dst: &str, pre: Precondition) -> StoreResult<Version> {
        let (src, dst) = (src.to_string(), dst.to_string());
        self.blocking(move |s| {
            let src_path = s.path(&src)?;
            let m = fs::symlink_metadata(&src_path).map_err(|e| io_err(&src, e))?;
            if m.is_dir() {
                return Err(StoreError::NotFound(src.clone()));
            }
            // The copy is the same kind of file, with the same attributes (mode, owner, times).
            let attrs = attrs_of(&m);
            let link = || fs::read_link(&src_path).map(|t| t.into_os_string().into_vec());
            let tmp = s.stage(&dst, &attrs, link, |f| {
                let mut from = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&src_path)?;
                io::copy(&mut from, f).map(|_| ())
            })?;
            s.commit(&dst, &tmp, &pre)
        })
        .await
    }

    async fn set_meta(
        &self,
        key: &str,
        version: &Version,
        meta: &UserMeta,
    ) -> StoreResult<Version> {
        let (key, version, meta) = (key.to_string(), version.clone(), meta.clone());
        self.blocking(move |s| s.set_meta(&key, &version, &meta))
            .await
    }

    async fn delete(&self, key: &str, pre: Precondition) -> StoreResult<()> {
        let key = key.to_string();
        self.blocking(move |s| s.delete(&key, &pre)).await
    }
}

/// How many directories' sorted names a local store keeps between the pages of their listings.
const SNAPSHOTS: usize = 16;

/// The names of one directory, sorted in key order (a subdirectory's key ends with `/`), so
/// that each listing page is a binary search and a walk of that page only: listing a directory
/// of N entries costs one `read_dir` and sort, then O(page) per page, instead of reading the
/// whole directory for every page. Names are packed in one string (about 12 bytes of index per
/// entry besides the name).
#[derive(Debug)]
struct Snapshot {
    names: String,
    /// (start, length, is a directory) of each name in `names`, in key order.
    index: Vec<(u32, u32, bool)>,
    /// The directory's modification time when read: a change of it means entries changed.
    mtime: (i64, i64),
    /// When it was read.
    taken: SystemTime,
}

impl Snapshot {
    fn read(dir: &Path, dir_key: &str) -> Option<Snapshot> {
        let m = fs::metadata(dir).ok()?;
        let taken = SystemTime::now();
        let mut names = String::new();
        let mut index = Vec::new();
        for entry in fs::read_dir(dir).ok()?.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(dir = %dir.display(), "skipping a file name that is not UTF-8");
                continue;
            };
            if is_internal(&name) || format!("{dir_key}{name}") == UPLOADS_DIR {
                // Multipart parts in progress are not objects (other `.bucketfs/` keys, such
                // as lock objects, are).
                continue;
            }
            // The entry itself (d_type), never what a symlink points to.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            index.push((names.len() as u32, name.len() as u32, is_dir));
            names.push_str(&name);
        }
        fn key_of(names: &str, (start, len, dir): (u32, u32, bool)) -> impl Iterator<Item = u8> {
            let name = &names.as_bytes()[start as usize..(start + len) as usize];
            name.iter().copied().chain(dir.then_some(b'/'))
        }
        index.sort_unstable_by(|a, b| key_of(&names, *a).cmp(key_of(&names, *b)));
        Some(Snapshot {
            names,
            index,
            mtime: (m.mtime(), m.mtime_nsec()),
            taken,
        })
    }

    /// The key of entry `i` below `dir_key`.
    fn key(&self, dir_key: &str, i: usize) -> String {
        let (start, len, dir) = self.index[i];
        let name = &self.names[start as usize..(start + len) as usize];
        format!("{dir_key}{name}{}", if dir { "/" } else { "" })
    }

    /// Whether it still shows `dir` as it is: the modification time is the same, and was not
    /// so close to the reading that a change in the same clock tick could hide.
    fn current(&self, m: &fs::Metadata) -> bool {
        let mtime = time_of(m.mtime(), m.mtime_nsec());
        (m.mtime(), m.mtime_nsec()) == self.mtime
            && self
                .taken
                .duration_since(mtime)
                .is_ok_and(|d| d > Duration::from_secs(2))
    }
}

impl Inner {
    /// The sorted names of `dir`: the kept ones while they are current, and for the next pages
    /// of a listing (`continuing`) as long as the directory did not change since; read again
    /// otherwise.
    fn snapshot(&self, dir: &Path, dir_key: &str, continuing: bool) -> Option<Arc<Snapshot>> {
        let m = fs::metadata(dir).ok()?;
        let mut kept = self.snapshots.lock().unwrap();
        if let Some(at) = kept.iter().position(|(p, _)| p == dir) {
            let (_, s) = &kept[at];
            if s.current(&m) || (continuing && (m.mtime(), m.mtime_nsec()) == s.mtime) {
                let s = s.clone();
                let entry = kept.remove(at);
                kept.push(entry);
                return Some(s);
            }
            kept.remove(at);
        }
        drop(kept);
        let s = Arc::new(Snapshot::read(dir, dir_key)?);
        let mut kept = self.snapshots.lock().unwrap();
        kept.retain(|(p, _)| p != dir);
        if kept.len() >= SNAPSHOTS {
            kept.remove(0);
        }
        kept.push((dir.to_path_buf(), s.clone()));
        Some(s)
    }

    /// One page of the directory `dir` (key `dir_key`), names starting with `partial`, one level
    /// (a subdirectory is its marker `name/`, which rolls up into a common prefix): a binary
    /// search for where the page starts, then an `lstat` per entry of the page.
    fn list_one_level(
        &self,
        dir: &Path,
        dir_key: &str,
        partial: &str,
        delimiter: Option<&str>,
        page: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let prefix = format!("{dir_key}{partial}");
        let Some(snap) = self.snapshot(dir, dir_key, page.is_some()) else {
            return Ok(ListPage::default());
        };
        let mut marker = Vec::new();
        if partial.is_empty()
            && !dir_key.is_empty()
            && snap.index.is_empty()
            && let Ok(m) = fs::metadata(dir)
        {
            marker.push(meta_of(dir_key.to_string(), &m));
        }
        // The first entry at or after both the prefix and the token.
        let from = match &page {
            Some(token) if token.as_str() > prefix.as_str() => token.as_str(),
            _ => prefix.as_str(),
        };
        let start = partition(&snap, dir_key, from);
        let entries = (start..snap.index.len())
            .map(|i| snap.key(dir_key, i))
            .take_while(|key| key.starts_with(&prefix))
            .filter_map(|key| {
                let path = dir.join(key[dir_key.len()..].trim_end_matches('/'));
                // Gone since the snapshot: not listed.
                fs::symlink_metadata(path).ok().map(|m| meta_of(key, &m))
            });
        Ok(page_of(
            marker.into_iter().chain(entries),
            &prefix,
            delimiter,
            page,
            max_keys,
        ))
    }
}

/// Index of the first entry of `snap` whose key is not below `from`.
fn partition(snap: &Snapshot, dir_key: &str, from: &str) -> usize {
    snap.index.partition_point(|&(start, len, dir)| {
        let name = &snap.names.as_bytes()[start as usize..(start + len) as usize];
        let key = dir_key
            .bytes()
            .chain(name.iter().copied())
            .chain(dir.then_some(b'/'));
        key.lt(from.bytes())
    })
}
