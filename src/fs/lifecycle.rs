//! What the sidecar asks of the filesystem besides requests: gauges for `/metrics`, and the
//! shutdown that finishes the writes in progress.
//!
//! ## Shutdown
//! [`Fs::shutdown`] runs on SIGTERM (and after an external unmount), while the mount still
//! serves requests:
//! 1. New writes are refused: opening a file for writing, creating, truncating, renaming,
//!    deleting and `mkdir` fail with `EROFS`. Handles already open keep writing.
//! 2. For up to half of the timeout, writers get to finish and close their files themselves;
//!    each close commits as usual. In a pod the application is usually stopping too, and a
//!    file closed by its writer is a complete file.
//! 3. Files still open for writing then are sealed (later writes to them fail with `EROFS`)
//!    and committed as they are, as an `fsync` would, all at once, until the deadline.
//! 4. Write locks are released.
//!
//! A file whose changes could not be committed (an upload error, or the deadline) is logged as
//! an error with its path; an unfinished multipart upload stays in the journal, and the next
//! mount of the same source aborts it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Fs, Handle};
use crate::write::WriteHandle;

/// How often step 2 looks whether the writers are done.
const POLL: Duration = Duration::from_millis(50);

/// What became of the files open for writing at shutdown.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Files committed in step 3 (still open when the grace period ended).
    pub committed: usize,
    /// Paths whose changes are not in the bucket.
    pub lost: Vec<String>,
}

impl Fs {
    /// Refreshes the gauges that describe the mount as a whole (called before each scrape; it
    /// may block on the disk cache's directory).
    pub fn publish_gauges(&self) {
        crate::metrics::memory(self.cfg.read.max_memory, self.read.budget.in_use());
        let writing = self
            .handles
            .lock()
            .unwrap()
            .values()
            .filter(|h| matches!(h, Handle::Write(..)))
            .count();
        crate::metrics::files_open_for_write(writing);
        if let Some(disk) = self.read.tiers.disk() {
            // A walk of the cache directory: the caller runs this off the async workers.
            crate::metrics::cache_size(crate::metrics::Tier::Disk, disk.used());
        }
    }

    /// Whether [`Fs::shutdown`] has started: new writes are refused.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Stops accepting writes and finishes the ones in progress within `timeout` (see the module
    /// docs). Requests keep being served meanwhile; unmounting is the caller's next step.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.closing.store(true, Ordering::Relaxed);
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let grace_end = start + timeout / 2;
        while !self.write_handles().is_empty() && tokio::time::Instant::now() < grace_end {
            tokio::time::sleep(POLL).await;
        }
        let open = self.write_handles();
        let mut report = ShutdownReport::default();
        if !open.is_empty() {
            tracing::warn!(
                files = open.len(),
                "committing files still open for writing; later writes to them fail"
            );
        }
        let commits = open.into_iter().map(|(w, ino)| async move {
            let path = self
                .inode_key(ino)
                .map(|(key, _)| key)
                .unwrap_or_default();
            let result = tokio::time::timeout_at(deadline, async {
                w.seal().await;
                self.commit_handle(&w, ino).await
            })
            .await;
            let error = match result {
                Ok(Ok(())) => return Ok(path),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("not finished within the shutdown timeout ({timeout:?})"),
            };
            crate::metrics::upload_lost();
            tracing::error!(%path, %error, "upload lost at shutdown: the file's changes are not in the bucket");
            Err(path)
        });
        for result in futures::future::join_all(commits).await {
            match result {
                Ok(_) => report.committed += 1,
                Err(path) => report.lost.push(path),
            }
        }
        self.release_locks().await;
        // Blocks fetched for readers and still queued for the disk tier are written.
        let tiers = self.read.tiers.clone();
        let _ = tokio::task::spawn_blocking(move || tiers.flush()).await;
        report
    }

    /// Every write handle still open or still committing at close (release), once each.
    fn write_handles(&self) -> Vec<(Arc<WriteHandle>, u64)> {
        let mut all: Vec<(Arc<WriteHandle>, u64)> = self
            .handles
            .lock()
            .unwrap()
            .values()
            .filter_map(|h| match h {
                Handle::Write(w, ino) => Some((w.clone(), *ino)),
                _ => None,
            })
            .collect();
        for (ino, w) in self.writing.lock().unwrap().iter() {
            if !all.iter().any(|(x, _)| Arc::ptr_eq(x, w)) {
                all.push((w.clone(), *ino));
            }
        }
        all
    }

    /// Step 4: gives back every write lock this mount holds.
    async fn release_locks(&self) {
        if let Some(locks) = self.write.as_ref().and_then(|w| w.locks.as_ref()) {
            locks.release_all().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{CREATE, OWNER};
    use super::super::{Fs, FsConfig, ROOT_INO};
    use crate::read::ReadConfig;
    use crate::store::ObjectStore;
    use crate::store::mem::MemStore;
    use crate::write::WriteConfig;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    async fn write_fs() -> (Arc<MemStore>, Arc<Fs>, tempfile::TempDir) {
        let mem = Arc::new(MemStore::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let cfg = FsConfig {
            prefix: String::new(),
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            metadata_ttl: Duration::ZERO,
            negative_metadata_ttl: Duration::ZERO,
            read_only: false,
            read: ReadConfig::default(),
            write: Some(WriteConfig {
                part_size: 5 << 20,
                staging_dir: dir.path().to_path_buf(),
            }),
            source: "mem://b".into(),
            disk_cache: None,
            passthrough: false,
            locks: crate::lock::LockConfig::default(),
            small_file_prefetch: 0,
            small_file_get: 0,
            max_inode_bytes: u64::MAX,
        };
        let fs = Fs::new(mem.clone(), cfg);
        (mem, fs, dir)
    }

    #[tokio::test]
    async fn shutdown_refuses_new_writes_and_commits_open_files() {
        let (mem, fs, _dir) = write_fs().await;
        let (_, fh) = fs.create(ROOT_INO, "open.bin", CREATE).await.unwrap();
        fs.write(fh, 0, Bytes::from_static(b"written so far"), Some(OWNER))
            .await
            .unwrap();
        let report = fs.shutdown(Duration::from_millis(200)).await;
        assert_eq!(report.committed, 1);
        assert!(report.lost.is_empty());
        let stored = mem.get_range("open.bin", 0..100, None).await.unwrap();
        assert_eq!(&stored[..], b"written so far");
        // The sealed handle refuses more bytes; new files are refused.
        let late = fs
            .write(fh, 14, Bytes::from_static(b"late"), Some(OWNER))
            .await;
        assert_eq!(late.unwrap_err().errno(), libc::EROFS);
        let new = fs.create(ROOT_INO, "new.bin", CREATE).await;
        assert_eq!(new.unwrap_err().errno(), libc::EROFS);
        fs.release(fh).await;
        let stored = mem.get_range("open.bin", 0..100, None).await.unwrap();
        assert_eq!(&stored[..], b"written so far", "nothing after the seal");
    }

    #[tokio::test]
    async fn writers_that_close_during_the_grace_period_commit_themselves() {
        let (mem, fs, _dir) = write_fs().await;
        let (_, fh) = fs.create(ROOT_INO, "closing.bin", CREATE).await.unwrap();
        fs.write(fh, 0, Bytes::from_static(b"part one, "), Some(OWNER))
            .await
            .unwrap();
        let shutdown = {
            let fs = fs.clone();
            tokio::spawn(async move { fs.shutdown(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Still writable: the writer finishes and closes on its own.
        fs.write(fh, 10, Bytes::from_static(b"part two"), Some(OWNER))
            .await
            .unwrap();
        fs.flush(fh, OWNER).await.unwrap();
        fs.release(fh).await;
        let report = tokio::time::timeout(Duration::from_secs(2), shutdown)
            .await
            .expect("shutdown ends as soon as the writers are done")
            .unwrap();
        assert_eq!(report.committed, 0);
        assert!(report.lost.is_empty());
        let stored = mem.get_range("closing.bin", 0..100, None).await.unwrap();
        assert_eq!(&stored[..], b"part one, part two");
    }

    #[tokio::test]
    async fn a_failed_commit_at_shutdown_is_reported_lost() {
        use crate::store::StoreError;
        use crate::store::mem::{Fault, Op};
        let (mem, fs, _dir) = write_fs().await;
        let (_, fh) = fs.create(ROOT_INO, "doomed.bin", CREATE).await.unwrap();
        fs.write(fh, 0, Bytes::from_static(b"x"), Some(OWNER))
            .await
            .unwrap();
        mem.inject(
            Op::Put,
            Fault::Error(StoreError::Unauthorized("no".into())),
            1,
        );
        let report = fs.shutdown(Duration::from_millis(100)).await;
        assert_eq!(report.lost, vec!["doomed.bin".to_string()]);
    }
}
