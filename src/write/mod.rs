//! Write handles: every write lands in a staging file, sequential writes also stream into a
//! multipart upload while the application writes, and the object appears atomically on commit.
//!
//! ## Staging
//! A handle open for writing owns an unlinked temporary file in the staging directory (under the
//! cache dir). Every `write` goes there first, at its offset: the file is always the truth, so
//! any pattern works — random writes, appends to an existing object, overwrites, holes. The
//! bytes of an existing object are copied in on the first change (or read), not at open, so an
//! open for writing that changes nothing (`touch`) downloads nothing. Memory use is the
//! budget's, not the file's: the bytes live in the page cache and on disk.
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
//! ## When a handle commits
//! The old version of a file must stay in the bucket until its writer is done, and every
//! `close(2)` of any descriptor of the open file reaches us as a `FLUSH`. So:
//! - `fsync` commits at once.
//! - A `FLUSH` commits only changes made *by the file table that closes*, since the handle's last
//!   commit: data it wrote, identified by the FUSE lock owner the kernel attaches to each write
//!   and flush (one per open file table: the threads of a process share it, a forked child has
//!   its own; PIDs cannot tell them apart, they are 0 for callers in another PID namespace).
//!   Changes the kernel sends without an owner (an `ftruncate`, pages of a shared mapping)
//!   count for every flush. The bare effect of an open — `O_TRUNC`, or a new empty file — is
//!   never committed by a `FLUSH`.
//! - `release` (the last descriptor is gone) commits whatever is left, e.g. `: > f` or `touch
//!   new`.
//!
//! Two cases this is for. A shell redirect `cmd > f` opens `f` with `O_TRUNC`, `dup2`s it to
//! stdout and closes the first descriptor at once: that `FLUSH` carries no data, so the old `f`
//! stays until `cmd` exits and its close commits the new bytes (a daemon killed meanwhile leaves
//! the old version). A process that forks while writing (`subprocess`, a data loader) hands its
//! descriptors to the child; the child's exit flushes from a file table that wrote nothing, so a
//! half-written checkpoint is not published under the writer's feet.
//!
//! A commit publishes with a precondition — create-if-absent for a new file, the version seen
//! at open for an existing one — so a concurrent writer elsewhere is detected rather than
//! overwritten. If the request that makes the object appear fails in a way that leaves its fate
//! unknown (an answer lost and retried into `412`, a timeout), the bucket is asked: when it holds
//! exactly the staged bytes under a new version, the commit succeeded. Any other failure aborts
//! the upload (no partial object, no orphan upload), the writer gets `EIO` from
//! `close`/`fsync`, with a log line naming the path, and the handle never commits again: `EIO`
//! means the bytes will not appear later from this handle.
//!
//! ## Write locks
//! With locking on, a handle holds its path's write lock (see `lock/`) from open to release. Once
//! the lease is lost, writes fail with `EIO`, the upload in progress is aborted and the handle
//! never commits. Every commit is fenced: right before the request that makes the object appear
//! (`put` or `complete_upload`), the lease is renewed at the store, and that request is abandoned
//! if the lease is lost while it runs.
//!
//! ## Crashes
//! Each mount keeps a journal of its uploads in progress in the staging directory, named by a
//! random mount id (never a PID: pods sharing a cache dir each have their own PID namespace, and
//! PID 1 in all of them). The mount holds an OFD lock (`F_OFD_SETLK`) on its journal while it
//! lives; the kernel drops it when the process dies, however it dies. A mount that starts aborts
//! the uploads of every journal of its source whose lock it can take, and deletes the journal; a
//! running mount does the same when it starts an upload, at most once a minute, so the pod next
//! to one that died cleans up without a restart.
//! Journals are opened with `O_NOFOLLOW` and the staging directory must be the mount's own
//! (owner and mode checked) so that nobody else on the node can redirect them.

use std::collections::HashSet;
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
use crate::memory::MemoryBudget;
use crate::store::{
    DynStore, Part, Precondition, StoreError, StoreResult, Upload, UserMeta, Version,
};

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

/// Why a write failed (`fs::error` says which errno the application sees).
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

/// How a handle starts, relative to the object in the bucket.
#[derive(Clone, Debug)]
pub enum Opening {
    /// A new file: there is no object; the commit creates it (if still absent).
    New,
    /// A new file whose empty object an exclusive create has already committed, as `version`.
    Created(Version),
    /// `O_TRUNC` over the object `version`: starts empty and replaces it.
    Truncate(Version),
    /// The object `version` of `size` bytes, kept: its bytes are staged on the first change.
    Keep(Version, u64),
}

/// The multipart upload that sequential writes stream into.
struct StreamingUpload {
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
    /// Changed since the last commit (a new or truncated file counts, even with no write).
    dirty: bool,
    /// FUSE lock owners (file tables) that wrote since the last commit (see "When a handle
    /// commits").
    writers: HashSet<u64>,
    /// A change the kernel sent without a lock owner since the last commit.
    ownerless: bool,
    /// The size of the kept object whose bytes are not in the staging file yet. They are those
    /// of `key` at `base`: whatever moves `base` without a commit (a rename, a change of
    /// metadata in place) keeps the bytes.
    unstaged: Option<u64>,
    /// `O_APPEND`: every write goes to the end of the file as it is here.
    append: bool,
    stream: Option<StreamingUpload>,
    /// A write into data already sent: commit uploads the whole file.
    stream_broken: bool,
    /// A write or a commit failed: the handle never commits.
    failed: bool,
    /// The mount is shutting down and committed this handle: it takes no more changes.
    sealed: bool,
    /// The file was unlinked while open: its bytes go nowhere.
    unlinked: bool,
    /// The path's write lock (`None` with locking off).
    lock: Option<Held>,
    /// The user metadata (file attributes) the commit publishes; see `set_user_meta`.
    user: UserMeta,
    /// The times in `user` were set explicitly (`utimensat`) after the last write: the commit
    /// keeps them instead of stamping its own time.
    times_set: bool,
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
    /// `State::size`, readable without the state lock, which a write holds while it waits for an
    /// upload slot: `stat` of a file being written answers at once. Written under the lock.
    shown_size: AtomicU64,
}

/// What a successful commit produced.
#[derive(Clone, Debug)]
pub struct Committed {
    pub key: String,
    pub version: Version,
    pub size: u64,
    /// The user metadata published with it.
    pub user: UserMeta,
}

impl WriteHandle {
    /// A handle for `key`, starting as `opening` says; `append` for `O_APPEND`. `lock` is the
    /// path's write lock, held until [`WriteHandle::release_lock`].
    pub fn open(
        ctx: Arc<WriteContext>,
        key: String,
        opening: Opening,
        append: bool,
        lock: Option<Held>,
    ) -> Result<WriteHandle, WriteError> {
        let file = Arc::new(staging_file(&ctx.cfg.staging_dir)?);
        let (base, size, unstaged, dirty) = match opening {
            Opening::New => (None, 0, None, true),
            Opening::Created(v) => (Some(v), 0, None, false),
            Opening::Truncate(v) => (Some(v), 0, None, true),
            Opening::Keep(v, size) => (Some(v), size, (size > 0).then_some(size), false),
        };
        Ok(WriteHandle {
            ctx,
            file,
            state: tokio::sync::Mutex::new(State {
                key,
                size,
                contiguous: 0,
                base,
                dirty,
                writers: HashSet::new(),
                ownerless: false,
                unstaged,
                append,
                stream: None,
                // Only a file written from its first byte can stream.
                stream_broken: size > 0,
                failed: false,
                sealed: false,
                unlinked: false,
                lock,
                user: UserMeta::new(),
                times_set: false,
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_PART_UPLOADS)),
            shown_size: AtomicU64::new(size),
        })
    }

    /// Reads back what was written (a handle open read-write).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, WriteError> {
        let size = {
            let mut st = self.state.lock().await;
            self.stage(&mut st).await?;
            st.size
        };
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        Ok(read_staging(self.file.clone(), offset, end - offset).await?)
    }

    /// Copies the kept object's bytes into the staging file, once, before the first change.
    async fn stage(&self, st: &mut State) -> Result<(), WriteError> {
        let (Some(len), Some(version)) = (st.unstaged, st.base.clone()) else {
            return Ok(());
        };
        st.unstaged = None;
        if let Err(e) = copy_object_into(&self.ctx, &st.key, &version, len, &self.file).await {
            st.failed = true;
            tracing::error!(key = %st.key, error = %e, "cannot stage the file's content; it will not be committed");
            return Err(e);
        }
        Ok(())
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

    /// The file was unlinked while open: what it holds or will hold is never committed.
    pub async fn unlink(&self) {
        let mut st = self.state.lock().await;
        st.unlinked = true;
        self.abort_stream(&mut st).await;
    }

    /// Sets the user metadata (file attributes) the next commit publishes; unless `times_set`,
    /// the commit stamps its own time as the modification time. Returns whether the handle has
    /// changes to commit (then the metadata goes with them).
    pub async fn set_user_meta(&self, user: UserMeta, times_set: bool) -> bool {
        let mut st = self.state.lock().await;
        st.user = user;
        // Times set since the last write stay set (a `chmod` after `utimensat` keeps them).
        st.times_set |= times_set;
        st.dirty
    }

    /// The object's metadata was changed in place (the bytes are the same): later commits
    /// replace `version`.
    pub async fn rebase(&self, version: Version) {
        self.state.lock().await.base = Some(version);
    }

    /// What a commit publishes as user metadata now.
    fn user_meta_now(st: &State) -> UserMeta {
        let mut user = st.user.clone();
        if !st.times_set {
            crate::store::attrs::touch(&mut user, std::time::SystemTime::now());
        }
        user
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

    /// Whether the handle takes changes now; stages the kept bytes before the first one.
    async fn changeable(&self, st: &mut State) -> Result<(), WriteError> {
        if st.failed {
            return Err(WriteError::Failed);
        }
        if st.sealed {
            return Err(WriteError::Sealed);
        }
        self.check_lease(st).await?;
        self.stage(st).await
    }

    /// Records a change by `owner` (a FUSE lock owner, or `None`).
    fn changed_by(st: &mut State, owner: Option<u64>) {
        st.dirty = true;
        match owner {
            Some(o) => {
                st.writers.insert(o);
            }
            None => st.ownerless = true,
        }
    }

    /// Current logical size (what `stat` shows to this mount while writing); never waits.
    pub async fn size(&self) -> u64 {
        self.shown_size.load(Ordering::Relaxed)
    }

    /// Writes `data` at `offset` (at the end with `O_APPEND`), on behalf of the lock owner
    /// `owner`.
    pub async fn write(
        &self,
        offset: u64,
        data: Bytes,
        owner: Option<u64>,
    ) -> Result<u32, WriteError> {
        let mut st = self.state.lock().await;
        self.changeable(&mut st).await?;
        // The kernel's idea of the end may be older than what this handle holds.
        let offset = if st.append { st.size } else { offset };
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
        Self::changed_by(&mut st, owner);
        st.times_set = false;
        st.size = st.size.max(offset + len);
        self.shown_size.store(st.size, Ordering::Relaxed);
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
    async fn send_part(&self, stream: &mut StreamingUpload, len: u64) {
        let number = stream.parts.len() as u32 + 1;
        let handle = self
            .upload_part(&stream.upload, number, stream.sent, len)
            .await;
        stream.parts.push(handle);
        stream.sent += len;
    }

    /// The handle's multipart upload, started (and journaled) if there is none yet.
    async fn stream_of<'a>(
        &self,
        st: &'a mut State,
    ) -> Result<&'a mut StreamingUpload, WriteError> {
        if st.stream.is_none() {
            let user = Self::user_meta_now(st);
            let upload = self.ctx.store.start_upload_with(&st.key, &user).await?;
            self.ctx.journal.add(&upload);
            self.ctx.journal.sweep(&self.ctx.store);
            st.stream = Some(StreamingUpload {
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
            let _memory = ctx.budget.upload(len).await;
            let body = read_staging(file, offset, len)
                .await
                .map_err(|e| StoreError::Transient(format!("reading the staging file: {e}")))?;
            ctx.store.upload_part(&upload, number, body).await
        })
    }

    /// Sets the logical size (`ftruncate`; the kernel names no lock owner for it).
    pub async fn truncate(&self, size: u64) -> Result<(), WriteError> {
        let mut st = self.state.lock().await;
        self.changeable(&mut st).await?;
        self.file.set_len(size)?;
        if let Some(s) = &st.stream
            && size < s.sent
        {
            st.stream_broken = true;
        }
        st.size = size;
        self.shown_size.store(size, Ordering::Relaxed);
        st.contiguous = st.contiguous.min(size);
        Self::changed_by(&mut st, None);
        st.times_set = false;
        Ok(())
    }

    /// Refuses every later change (`write`, `truncate`), once the changes in progress are done:
    /// what the next commit publishes is final.
    pub async fn seal(&self) {
        self.state.lock().await.sealed = true;
    }

    /// `close(2)` of a descriptor by the file table `owner`: commits only that table's changes
    /// since the last commit (see "When a handle commits").
    pub async fn flush(&self, owner: u64) -> Result<Option<Committed>, WriteError> {
        let mut st = self.state.lock().await;
        if st.failed && !st.unlinked {
            return Err(WriteError::Failed);
        }
        if !(st.ownerless || st.writers.contains(&owner)) {
            return Ok(None);
        }
        self.commit_locked(&mut st).await
    }

    /// Publishes the staged content if it changed since the last commit (`fsync`, `release`).
    pub async fn commit(&self) -> Result<Option<Committed>, WriteError> {
        let mut st = self.state.lock().await;
        self.commit_locked(&mut st).await
    }

    async fn commit_locked(&self, st: &mut State) -> Result<Option<Committed>, WriteError> {
        if st.unlinked {
            self.abort_stream(st).await;
            return Ok(None);
        }
        if st.failed {
            self.abort_stream(st).await;
            return Err(WriteError::Failed);
        }
        if !st.dirty {
            return Ok(None);
        }
        let pre = match &st.base {
            None => Precondition::IfAbsent,
            Some(v) => Precondition::IfVersion(v.clone()),
        };
        let result = match self.publish(st, pre).await {
            Err(e) if outcome_unknown(&e) => match self.landed(st).await {
                Some(version) => {
                    tracing::info!(key = %st.key, error = %e, "the commit's answer was lost, but the bucket holds exactly these bytes: committed");
                    self.forget_stream(st);
                    Ok((version, st.user.clone()))
                }
                None => Err(e),
            },
            other => other,
        };
        crate::metrics::commit(result.is_ok());
        match result {
            Ok((version, user)) => {
                st.dirty = false;
                st.writers.clear();
                st.ownerless = false;
                st.base = Some(version.clone());
                // Later writes to this handle publish the whole file again.
                st.stream_broken = st.size > 0;
                Ok(Some(Committed {
                    key: st.key.clone(),
                    version,
                    size: st.size,
                    user,
                }))
            }
            Err(e) => {
                // `EIO` now means: never from this handle.
                st.failed = true;
                self.abort_stream(st).await;
                tracing::error!(key = %st.key, error = %e, "upload failed; the object was not changed");
                Err(e)
            }
        }
    }

    /// After a publishing request whose outcome is unknown: the version the bucket now holds,
    /// if it is a new one with exactly the staged bytes (so the request did land).
    async fn landed(&self, st: &State) -> Option<Version> {
        let meta = self.ctx.store.head(&st.key).await.ok()?;
        if Some(&meta.version) == st.base.as_ref() || meta.size != st.size {
            return None;
        }
        let part = self.ctx.cfg.part_size;
        let mut offset = 0;
        while offset < st.size {
            let end = (offset + part).min(st.size);
            let _memory = self.ctx.budget.upload(end - offset).await;
            let stored = self
                .ctx
                .store
                .get_range(&st.key, offset..end, Some(&meta.version))
                .await
                .ok()?;
            let staged = read_staging(self.file.clone(), offset, end - offset)
                .await
                .ok()?;
            if stored != staged {
                return None;
            }
            offset = end;
        }
        Some(meta.version)
    }

    /// Publishes the staged content; returns its version and the user metadata it carries.
    async fn publish(
        &self,
        st: &mut State,
        pre: Precondition,
    ) -> Result<(Version, UserMeta), WriteError> {
        let part = self.ctx.cfg.part_size;
        let size = st.size;
        if st.stream_broken {
            self.abort_stream(st).await;
        }
        if st.stream.is_none() && size <= part {
            let file = self.file.clone();
            let body = read_staging(file, 0, size).await?;
            let user = Self::user_meta_now(st);
            let put = self.ctx.store.put_with(&st.key, body, pre, &user);
            return Ok((fenced(st.lock.as_ref(), put).await?, user));
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
        self.forget_stream(st);
        Ok((version, upload.meta))
    }

    /// The stream's upload is complete: nothing to abort any more.
    fn forget_stream(&self, st: &mut State) {
        if let Some(stream) = st.stream.take() {
            self.ctx.journal.remove(&stream.upload);
        }
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

/// Whether a failed publish may have landed after all: an answer lost on the way (a timeout, a
/// dropped connection), or the symptoms of a retry of a request that had landed (`412` for the
/// precondition it then met itself, `404` for an upload it had completed).
fn outcome_unknown(e: &WriteError) -> bool {
    matches!(
        e,
        WriteError::Store(
            StoreError::PreconditionFailed(_)
                | StoreError::NotFound(_)
                | StoreError::Transient(_)
                | StoreError::Throttled(_)
        )
    )
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

/// An unlinked temporary file in `dir` (see [`prepare_staging_dir`]): it disappears with its
/// last descriptor, even on a crash.
fn staging_file(dir: &Path) -> io::Result<File> {
    tempfile::tempfile_in(dir)
}

/// Makes `dir` ready for staging files and journals: created (mode `0700`) if missing, and
/// refused unless it is a real directory (not a symlink) owned by this user and writable by
/// nobody else, and its parent is not open to others either (owned by this user or root, and
/// not writable by others unless sticky, like `/tmp`). So a default path that someone else
/// created first, or swapped for a symlink, is an error rather than a place our journals follow.
pub fn prepare_staging_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    let m = std::fs::symlink_metadata(dir)?;
    if !m.file_type().is_dir() {
        return refuse(format!("{} is not a directory (a symlink?)", dir.display()));
    }
    if m.uid() != me {
        return refuse(format!(
            "{} belongs to uid {}, not to this user ({me})",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!(
            "{} is writable by others (mode {:o}); make it 0700",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    if let Some(parent) = dir.parent() {
        let p = std::fs::metadata(parent)?;
        let open = p.mode() & 0o002 != 0 && p.mode() & 0o1000 == 0;
        if (p.uid() != me && p.uid() != 0) || open {
            return refuse(format!(
                "{} is not safe for staging: its owner (uid {}) or mode ({:o}) lets others replace {}",
                parent.display(),
                p.uid(),
                p.mode() & 0o7777,
                dir.display()
            ));
        }
    }
    Ok(())
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
        let _memory = ctx.budget.upload(end - offset).await;
        let data = ctx.store.get_range(key, offset..end, Some(version)).await?;
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        offset = end;
    }
    Ok(())
}

/// The uploads this mount has in progress, on disk, so that a later mount can abort them if
/// this one dies (see "Crashes" in the module docs).
///
/// File format: the mount's SOURCE on the first line, then one line per event, `+ ID KEY` when an
/// upload starts and `- ID` when it is done, tab-separated, with `\`, tab and newline escaped.
/// Lines are appended, so a crash mid-write loses at most the last (unfinished) line; the file is
/// cut back to its first line whenever no upload is left.
pub struct Journal {
    path: PathBuf,
    source: String,
    /// The open journal, under its final name, holding the OFD lock that says "alive"; `None` if
    /// it could not be created (logged: crash cleanup is then off for this mount).
    file: Option<File>,
    /// Uploads in progress: (key, id).
    entries: std::sync::Mutex<Vec<(String, String)>>,
    /// When this mount last looked for dead mounts' journals (see [`Journal::sweep_due`]).
    last_sweep: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a running mount looks for the journals of mounts that died (at most once per
/// interval, when it starts an upload): an orphan upload costs storage until aborted, a look
/// costs a directory read and one lock attempt per journal.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl Journal {
    /// A new journal in `dir`, for uploads to `source`, named by a random mount id and locked
    /// from the moment it has its name.
    pub fn new(dir: &Path, source: &str) -> Journal {
        let id = format!("{:016x}", rand::random::<u64>());
        let path = dir.join(format!("uploads-{id}.journal"));
        let file = match create_locked(&path, source) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot create the upload journal; uploads of a crashed daemon will not be cleaned up");
                None
            }
        };
        Journal {
            path,
            source: source.to_string(),
            file,
            entries: std::sync::Mutex::new(Vec::new()),
            last_sweep: std::sync::Mutex::new(None),
        }
    }

    /// Whether it is time to look for dead mounts' journals again; the first call says yes (a
    /// pod next to this one may have died since this mount started).
    fn sweep_due(&self) -> bool {
        let mut last = self.last_sweep.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < SWEEP_INTERVAL) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// Aborts, in the background, the uploads of mounts of the same source that died while
    /// this one runs (see [`Journal::recover`]), at most once per [`SWEEP_INTERVAL`].
    fn sweep(&self, store: &DynStore) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        if !self.sweep_due() {
            return;
        }
        let (dir, source, store) = (dir.to_path_buf(), self.source.clone(), store.clone());
        tokio::spawn(async move {
            let aborted = Journal::recover(&dir, &source, &store).await;
            if aborted > 0 {
                tracing::info!(aborted, "cleaned up uploads left by mounts that died");
            }
        });
    }

    /// The journal file (for tests and logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &str) {
        let Some(mut f) = self.file.as_ref() else {
            return;
        };
        if let Err(e) = io::Write::write_all(&mut f, line.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the upload journal");
        }
    }

    pub fn add(&self, upload: &Upload) {
        let mut e = self.entries.lock().unwrap();
        e.push((upload.key.clone(), upload.id.clone()));
        self.append(&format!(
            "+\t{}\t{}\n",
            escape(&upload.id),
            escape(&upload.key)
        ));
    }

    pub fn remove(&self, upload: &Upload) {
        let mut e = self.entries.lock().unwrap();
        e.retain(|(_, id)| *id != upload.id);
        if !e.is_empty() {
            self.append(&format!("-\t{}\n", escape(&upload.id)));
            return;
        }
        // Nothing in progress: back to the header alone (O_APPEND writes go to the new end).
        if let Some(f) = &self.file
            && let Err(err) = f.set_len(self.source.len() as u64 + 1)
        {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot compact the upload journal");
            self.append(&format!("-\t{}\n", escape(&upload.id)));
        }
    }

    /// Aborts the uploads listed in the journals in `dir` of mounts of `source` that are not
    /// alive (their lock can be taken), then deletes those journals; returns how many uploads
    /// were aborted. Journals of live mounts are left alone, and so are those of dead mounts of
    /// other sources that still list uploads.
    pub async fn recover(dir: &Path, source: &str, store: &DynStore) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut aborted = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            // Only journals named by a mount id: one named otherwise (a PID, from an older
            // bucketfs) says nothing by its lock, so its mount may well be alive.
            let id = name
                .strip_prefix("uploads-")
                .and_then(|n| n.strip_suffix(".journal"));
            if !id.is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
                continue;
            }
            let path = entry.path();
            // Holding the lock (while `orphan` lives) keeps other mounts from recovering it too.
            let Some((orphan, text)) = take_orphan(&path) else {
                continue;
            };
            let mut lines = text.lines();
            let ours = lines.next() == Some(source);
            let left = replay(lines);
            if !ours {
                // A dead mount of another source: its mount cleans its uploads, but a journal
                // with none left is litter anyone may sweep.
                if left.is_empty() {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let mut all_done = true;
            for (id, key) in left {
                let upload = Upload {
                    key,
                    id,
                    ..Default::default()
                };
                match store.abort_upload(&upload).await {
                    Ok(()) | Err(StoreError::NotFound(_)) => {
                        aborted += 1;
                        tracing::info!(key = %upload.key, "aborted the upload of a mount that died");
                    }
                    Err(e) => {
                        all_done = false;
                        tracing::warn!(key = %upload.key, error = %e, "cannot abort the upload of a mount that died");
                    }
                }
            }
            if all_done {
                let _ = std::fs::remove_file(&path);
            }
            drop(orphan);
        }
        aborted
    }
}

impl Drop for Journal {
    /// A mount that ends with no upload in progress leaves no journal behind.
    fn drop(&mut self) {
        if self.file.is_some() && self.entries.lock().unwrap().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the journal `path` (mode `0600`, never through a symlink), locked before it appears
/// under its name: a mount starting at that moment cannot take a new journal for an orphan.
fn create_locked(path: &Path, source: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("new");
    let file = std::fs::OpenOptions::new()
        .append(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let named = (|| {
        if !ofd_lock(&file)? {
            return Err(io::Error::other(
                "the new journal is locked by someone else",
            ));
        }
        io::Write::write_all(&mut &file, format!("{source}\n").as_bytes())?;
        // The lock is the inode's: it keeps holding under the final name.
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = named {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(file)
}

/// Opens the journal `path` and takes its lock if its mount is gone: the open journal (holding
/// the lock) and its text, or `None` if its mount is alive (or it is not a journal we can use).
fn take_orphan(path: &Path) -> Option<(File, String)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_file() || !ofd_lock(&file).ok()? {
        return None;
    }
    // Another mount may have recovered and deleted it between our open and our lock.
    let now = std::fs::symlink_metadata(path).ok()?;
    if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
        return None;
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut &file, &mut text).ok()?;
    Some((file, text))
}

/// Takes an exclusive OFD lock on all of `file` without waiting: `Ok(false)` if another open
/// file (another mount, in any PID namespace or container on this kernel) holds it. OFD locks
/// belong to the open file, not to a process: they survive `fork`, are not dropped by closing
/// another descriptor of the same file, and end when the process dies.
fn ofd_lock(file: &File) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{FcntlArg, fcntl};
    // The whole file (start 0, length 0 = to the end, whatever it grows to).
    let lock = libc::flock {
        l_type: libc::F_WRLCK as _,
        l_whence: libc::SEEK_SET as _,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match fcntl(file, FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The uploads still in progress after the events `lines`: (id, key), in start order.
fn replay<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    let mut open: Vec<(String, String)> = Vec::new();
    for line in lines {
        let mut fields = line.split('\t');
        match (fields.next(), fields.next(), fields.next()) {
            (Some("+"), Some(id), Some(key)) => open.push((unescape(id), unescape(key))),
            (Some("-"), Some(id), None) => {
                let id = unescape(id);
                open.retain(|(i, _)| *i != id);
            }
            // An unfinished last line, or garbage: nothing to act on.
            _ => {}
        }
    }
    open
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
