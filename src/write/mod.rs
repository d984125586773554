//! Write handles: every write lands in a staging file, sequential writes also stream into a
//! multipart upload while the application writes, and the object appears atomically on commit.
//!
//! ## Staging
//! A handle open for writing owns an unlinked temporary file in the staging directory (under the
//! cache dir). Every `write` goes there first, at its offset: the file is always the truth, so
//! any pattern works — random writes, appends to an existing object (its bytes are copied into
//! the staging file at open), overwrites, holes. Memory use is the budget's, not the file's: the
//! bytes live in the page cache and on disk.
//!
//! ## Streaming
//! A file written from scratch (`create`, `O_TRUNC`) whose writes arrive in order starts a
//! multipart upload: each time the contiguous written prefix passes a part boundary, that part
//! is read back from the staging file (still in the page cache) and uploaded in the background,
//! at most [`MAX_PART_UPLOADS`] at a time (a writer that gets ahead waits). By `close` most of a
//! large checkpoint is already in the bucket, so committing costs the last part and the
//! completion. A write into a part already sent breaks the stream: the upload is aborted and the
//! whole staging file is uploaded at commit.
//!
//! ## Commit
//! `flush` (every `close`) and `fsync` commit if anything changed: upload what is left, then
//! complete with a precondition — create-if-absent for a new file, the version seen at open for
//! an existing one — so a concurrent writer elsewhere is detected rather than overwritten. Until
//! then readers see the previous version. Any failure aborts the upload (no partial object, no
//! orphan upload) and the writer gets `EIO` from `close`/`fsync`, with a log line naming the path.
//!
//! ## Write locks
//! With locking on, a handle holds its path's write lock (see `lock/`) from open to release. Once
//! the lease is lost, writes fail with `EIO`, the upload in progress is aborted and the handle
//! never commits. Every commit is fenced: right before the request that makes the object appear
//! (`put` or `complete_upload`), the lease is renewed at the store, and that request is abandoned
//! if the lease is lost while it runs.
//!
//! ## Crashes
//! Uploads in progress are listed in a journal file per process in the staging directory; a
//! mount that starts finds the journals of dead processes and aborts their uploads.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::lock::{Held, LockError, Locks};
use crate::read::budget::MemoryBudget;
use crate::store::{DynStore, Part, Precondition, StoreError, StoreResult, Upload, Version};

/// Part uploads in flight per handle: enough to overlap upload with writing; more only raises
/// memory (each holds one part).
pub const MAX_PART_UPLOADS: usize = 4;

/// Write tuning.
#[derive(Clone, Debug)]
pub struct WriteConfig {
    /// Bytes per uploaded part. 16 MiB: S3 allows 10,000 parts, so streamed files can reach
    /// 160 GB; each part in flight holds this much memory.
    pub part_size: u64,
    /// Where staging files and upload journals live.
    pub staging_dir: PathBuf,
}

/// Why a write failed, in terms of the errno the application sees.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("staging file: {0}")]
    Staging(#[from] io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the handle failed earlier; nothing will be committed")]
    Failed,
    #[error("{0}")]
    Lock(#[from] LockError),
    #[error("the mount is shutting down; this file takes no more changes")]
    Sealed,
}

impl WriteError {
    pub fn errno(&self) -> i32 {
        match self {
            WriteError::Staging(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                _ => libc::EIO,
            },
            WriteError::Store(_) | WriteError::Failed => libc::EIO,
            WriteError::Lock(LockError::Busy { .. }) => libc::EBUSY,
            WriteError::Lock(_) => libc::EIO,
            WriteError::Sealed => libc::EROFS,
        }
    }
}

/// The upload of a stream of sequential writes.
struct Stream {
    upload: Upload,
    /// Parts started, in order.
    parts: Vec<JoinHandle<StoreResult<Part>>>,
    /// Bytes `0..sent` are in started parts.
    sent: u64,
}

struct State {
    /// The object key the commit publishes to (changes if the open file is renamed).
    key: String,
    /// Logical size of the file.
    size: u64,
    /// Bytes `0..contiguous` were written in order (for streaming).
    contiguous: u64,
    /// What the commit must find in the bucket: `None` = nothing (create), else that version.
    base: Option<Version>,
    /// Changed since the last commit.
    dirty: bool,
    stream: Option<Stream>,
    /// A write into data already sent: commit uploads the whole file.
    stream_broken: bool,
    /// A staging write failed: the handle never commits.
    failed: bool,
    /// The mount is shutting down and committed this handle: it takes no more changes.
    sealed: bool,
    /// The path's write lock (`None` with locking off).
    lock: Option<Held>,
}

/// Everything write handles share.
pub struct WriteContext {
    pub store: DynStore,
    pub budget: Arc<MemoryBudget>,
    pub cfg: WriteConfig,
    pub journal: Journal,
    /// The write-lock manager; `None` with locking off (`--no-locks`).
    pub locks: Option<Arc<Locks>>,
}

pub struct WriteHandle {
    ctx: Arc<WriteContext>,
    file: Arc<File>,
    state: tokio::sync::Mutex<State>,
    /// One permit per part upload allowed in flight.
    slots: Arc<tokio::sync::Semaphore>,
}

/// What a successful commit produced.
#[derive(Clone, Debug)]
pub struct Committed {
    pub key: String,
    pub version: Version,
    pub size: u64,
}

impl WriteHandle {
    /// A handle for `key`. `existing` is the current object (its version and size) when the file
    /// is opened without truncation: its bytes are copied into the staging file first. `lock`
    /// is the path's write lock, held until [`WriteHandle::release_lock`].
    pub async fn open(
        ctx: Arc<WriteContext>,
        key: String,
        base: Option<Version>,
        existing: Option<(Version, u64)>,
        lock: Option<Held>,
    ) -> Result<WriteHandle, WriteError> {
        let file = Arc::new(staging_file(&ctx.cfg.staging_dir)?);
        let mut size = 0;
        if let Some((version, len)) = existing {
            copy_object_into(&ctx, &key, &version, len, &file).await?;
            size = len;
        }
        let fresh = size == 0;
        Ok(WriteHandle {
            ctx,
            file,
            state: tokio::sync::Mutex::new(State {
                key,
                size,
                contiguous: 0,
                base,
                // A new or truncated file is a change even if nothing is written.
                dirty: fresh,
                stream: None,
                stream_broken: !fresh,
                failed: false,
                sealed: false,
                lock,
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_PART_UPLOADS)),
        })
    }

    /// Reads back what was written (a handle open read-write).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, WriteError> {
        let size = self.state.lock().await.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        Ok(read_staging(self.file.clone(), offset, end - offset).await?)
    }

    /// The key the handle publishes to.
    pub async fn key(&self) -> String {
        self.state.lock().await.key.clone()
    }

    /// Points a committed handle at a new key (its file was renamed while open): later changes
    /// publish there, replacing `base`, under `lock` (the new key's). Returns the old key's lock.
    pub async fn rekey(&self, key: String, base: Version, lock: Option<Held>) -> Option<Held> {
        let mut st = self.state.lock().await;
        st.key = key;
        st.base = Some(base);
        std::mem::replace(&mut st.lock, lock)
    }

    /// Gives the path's write lock back (the handle is closed).
    pub async fn release_lock(&self) {
        let held = self.state.lock().await.lock.take();
        if let Some(held) = held {
            held.release().await;
        }
    }

    /// Fails once the handle's lease is lost: the upload in progress is aborted and the handle
    /// will never commit.
    async fn check_lease(&self, st: &mut State) -> Result<(), WriteError> {
        let Some(Err(e)) = st.lock.as_ref().map(Held::check) else {
            return Ok(());
        };
        st.failed = true;
        self.abort_stream(st).await;
        Err(e.into())
    }

    /// Current logical size (what `stat` shows to this mount while writing).
    pub async fn size(&self) -> u64 {
        self.state.lock().await.size
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<u32, WriteError> {
        let mut st = self.state.lock().await;
        if st.failed {
            return Err(WriteError::Failed);
        }
        if st.sealed {
            return Err(WriteError::Sealed);
        }
        self.check_lease(&mut st).await?;
        let len = data.len() as u64;
        let file = self.file.clone();
        let res = tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = res {
            st.failed = true;
            tracing::error!(key = %st.key, error = %e, "write to the staging file failed; the file will not be committed");
            return Err(e.into());
        }
        st.dirty = true;
        st.size = st.size.max(offset + len);
        if let Some(stream) = &st.stream
            && offset < stream.sent
        {
            st.stream_broken = true;
        }
        if offset <= st.contiguous {
            st.contiguous = st.contiguous.max(offset + len);
        }
        if !st.stream_broken {
            self.stream_parts(&mut st).await?;
        }
        Ok(len as u32)
    }

    /// Starts uploads for every complete part of the contiguous prefix not sent yet.
    async fn stream_parts(&self, st: &mut State) -> Result<(), WriteError> {
        let part = self.ctx.cfg.part_size;
        loop {
            let sent = st.stream.as_ref().map_or(0, |s| s.sent);
            if st.contiguous < sent + part {
                return Ok(());
            }
            let stream = self.stream_of(st).await?;
            self.send_part(stream, part).await;
        }
    }

    /// Starts uploading the next `len` bytes of the stream as its next part; waits while
    /// MAX_PART_UPLOADS parts are in flight (backpressure).
    async fn send_part(&self, stream: &mut Stream, len: u64) {
        let number = stream.parts.len() as u32 + 1;
        let handle = self
            .upload_part(&stream.upload, number, stream.sent, len)
            .await;
        stream.parts.push(handle);
        stream.sent += len;
    }

    /// The handle's multipart upload, started (and journaled) if there is none yet.
    async fn stream_of<'a>(&self, st: &'a mut State) -> Result<&'a mut Stream, WriteError> {
        if st.stream.is_none() {
            let upload = self.ctx.store.start_upload(&st.key).await?;
            self.ctx.journal.add(&upload);
            st.stream = Some(Stream {
                upload,
                parts: Vec::new(),
                sent: 0,
            });
        }
        Ok(st.stream.as_mut().expect("just set"))
    }

    /// Starts uploading `len` bytes at `offset` of the staging file as part `number`, once one
    /// of the handle's upload slots is free.
    async fn upload_part(
        &self,
        upload: &Upload,
        number: u32,
        offset: u64,
        len: u64,
    ) -> JoinHandle<StoreResult<Part>> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the upload slots are never closed");
        let ctx = self.ctx.clone();
        let upload = upload.clone();
        let file = self.file.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _in_flight = crate::metrics::part_upload_started();
            let _lease = ctx.budget.demand(len).await;
            let body = read_staging(file, offset, len)
                .await
                .map_err(|e| StoreError::Transient(format!("reading the staging file: {e}")))?;
            ctx.store.upload_part(&upload, number, body).await
        })
    }

    /// Sets the logical size (`ftruncate`).
    pub async fn truncate(&self, size: u64) -> Result<(), WriteError> {
        let mut st = self.state.lock().await;
        if st.sealed {
            return Err(WriteError::Sealed);
        }
        self.check_lease(&mut st).await?;
        self.file.set_len(size)?;
        if let Some(s) = &st.stream
            && size < s.sent
        {
            st.stream_broken = true;
        }
        st.size = size;
        st.contiguous = st.contiguous.min(size);
        st.dirty = true;
        Ok(())
    }

    /// Refuses every later change (`write`, `truncate`), once the changes in progress are done:
    /// what the next commit publishes is final.
    pub async fn seal(&self) {
        self.state.lock().await.sealed = true;
    }

    /// Publishes the staged content if it changed since the last commit.
    pub async fn commit(&self) -> Result<Option<Committed>, WriteError> {
        let mut st = self.state.lock().await;
        if st.failed {
            self.abort_stream(&mut st).await;
            return Err(WriteError::Failed);
        }
        if !st.dirty {
            return Ok(None);
        }
        let pre = match &st.base {
            None => Precondition::IfAbsent,
            Some(v) => Precondition::IfVersion(v.clone()),
        };
        let result = self.publish(&mut st, pre).await;
        crate::metrics::commit(result.is_ok());
        match result {
            Ok(version) => {
                st.dirty = false;
                st.base = Some(version.clone());
                // Later writes to this handle publish the whole file again.
                st.stream_broken = true;
                Ok(Some(Committed {
                    key: st.key.clone(),
                    version,
                    size: st.size,
                }))
            }
            Err(e) => {
                self.abort_stream(&mut st).await;
                tracing::error!(key = %st.key, error = %e, "upload failed; the object was not changed");
                Err(e)
            }
        }
    }

    async fn publish(&self, st: &mut State, pre: Precondition) -> Result<Version, WriteError> {
        let part = self.ctx.cfg.part_size;
        let size = st.size;
        if st.stream_broken {
            self.abort_stream(st).await;
        }
        if st.stream.is_none() && size <= part {
            let file = self.file.clone();
            let body = read_staging(file, 0, size).await?;
            let put = self.ctx.store.put(&st.key, body, pre);
            return fenced(st.lock.as_ref(), put).await;
        }
        let stream = self.stream_of(st).await?;
        while stream.sent < size {
            let len = part.min(size - stream.sent);
            self.send_part(stream, len).await;
        }
        let mut parts = Vec::with_capacity(stream.parts.len());
        for handle in stream.parts.drain(..) {
            parts.push(
                handle
                    .await
                    .map_err(|e| StoreError::Transient(e.to_string()))??,
            );
        }
        let upload = stream.upload.clone();
        let complete = self.ctx.store.complete_upload(&upload, parts, pre);
        let version = fenced(st.lock.as_ref(), complete).await?;
        self.ctx.journal.remove(&upload);
        st.stream = None;
        Ok(version)
    }

    async fn abort_stream(&self, st: &mut State) {
        if let Some(mut stream) = st.stream.take() {
            for p in stream.parts.drain(..) {
                let _ = p.await;
            }
            if let Err(e) = self.ctx.store.abort_upload(&stream.upload).await {
                tracing::warn!(key = %st.key, error = %e, "could not abort an upload; it stays in the journal");
                return;
            }
            self.ctx.journal.remove(&stream.upload);
        }
    }

    /// Gives up without committing (the handle is closing after a failure).
    pub async fn discard(&self) {
        let mut st = self.state.lock().await;
        self.abort_stream(&mut st).await;
    }
}

/// Runs `publish`, the request that makes an object appear, under the write lock `lock`: the
/// fence renews the lease first, and the request is abandoned if the lease ends while it runs.
async fn fenced<T>(
    lock: Option<&Held>,
    publish: impl Future<Output = StoreResult<T>>,
) -> Result<T, WriteError> {
    let Some(held) = lock else {
        return Ok(publish.await?);
    };
    held.fence().await?;
    tokio::select! {
        biased;
        result = publish => Ok(result?),
        lost = held.ended() => {
            tracing::error!(
                key = held.key(),
                error = %lost,
                "commit abandoned: the write lock was lost while it ran (a request already sent \
                 may still land)"
            );
            Err(lost.into())
        }
    }
}

/// `len` bytes at `offset` of the staging file.
async fn read_staging(file: Arc<File>, offset: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map(|_| Bytes::from(buf))
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// An unlinked temporary file in `dir`: it disappears with its last descriptor, even on a crash.
fn staging_file(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    tempfile::tempfile_in(dir)
}

/// Copies `len` bytes of the object's `version` into `file`, part by part.
async fn copy_object_into(
    ctx: &WriteContext,
    key: &str,
    version: &Version,
    len: u64,
    file: &Arc<File>,
) -> Result<(), WriteError> {
    let part = ctx.cfg.part_size;
    let mut offset = 0;
    while offset < len {
        let end = (offset + part).min(len);
        let _lease = ctx.budget.demand(end - offset).await;
        let data = ctx.store.get_range(key, offset..end, Some(version)).await?;
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        offset = end;
    }
    Ok(())
}

/// The uploads this process has in progress, on disk, so that a later process can abort them
/// if this one dies.
pub struct Journal {
    path: PathBuf,
    source: String,
    entries: std::sync::Mutex<Vec<(String, String)>>,
}

static JOURNAL_WRITES: AtomicU64 = AtomicU64::new(0);

impl Journal {
    /// This process's journal in `dir`, for uploads to `source`.
    pub fn new(dir: &Path, source: &str) -> Journal {
        Journal {
            path: dir.join(format!("uploads-{}.journal", std::process::id())),
            source: source.to_string(),
            entries: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn save(&self, entries: &[(String, String)]) {
        let mut text = format!("{}\n", self.source);
        for (key, id) in entries {
            text.push_str(&format!("{id}\t{key}\n"));
        }
        let n = JOURNAL_WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = self.path.with_extension(format!("tmp{n}"));
        let result = std::fs::create_dir_all(self.path.parent().unwrap_or(Path::new(".")))
            .and_then(|_| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the upload journal");
        }
    }

    pub fn add(&self, upload: &Upload) {
        let mut e = self.entries.lock().unwrap();
        e.push((upload.key.clone(), upload.id.clone()));
        self.save(&e);
    }

    pub fn remove(&self, upload: &Upload) {
        let mut e = self.entries.lock().unwrap();
        e.retain(|(_, id)| *id != upload.id);
        if e.is_empty() {
            let _ = std::fs::remove_file(&self.path);
        } else {
            self.save(&e);
        }
    }

    /// Aborts the uploads of dead processes' journals for the same source; returns how many.
    pub async fn recover(dir: &Path, source: &str, store: &DynStore) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut aborted = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("uploads-")
                .and_then(|n| n.strip_suffix(".journal"))
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let mut lines = text.lines();
            if lines.next() != Some(source) {
                continue;
            }
            let mut all_done = true;
            for line in lines {
                let Some((id, key)) = line.split_once('\t') else {
                    continue;
                };
                let upload = Upload {
                    key: key.to_string(),
                    id: id.to_string(),
                    ..Default::default()
                };
                match store.abort_upload(&upload).await {
                    Ok(()) => {
                        aborted += 1;
                        tracing::info!(key, "aborted the upload of a process that died");
                    }
                    Err(e) => {
                        all_done = false;
                        tracing::warn!(key, error = %e, "cannot abort a dead process's upload");
                    }
                }
            }
            if all_done {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        aborted
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
