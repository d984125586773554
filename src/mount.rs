//! Mounting and the mount's lifetime: serve FUSE until a signal or an external unmount, then
//! shut down cleanly.
//!
//! On SIGTERM or SIGINT:
//! 1. `/readyz` turns unready;
//! 2. the filesystem finishes its writes ([`Fs::shutdown`]: new writes refused, writers given
//!    time to close, files still open committed, locks released), all within
//!    `--shutdown-timeout`;
//! 3. the filesystem is unmounted; if files are still open (`EBUSY`), it is detached lazily
//!    (`MNT_DETACH`), open files are served for up to [`READER_GRACE`] more (never past the
//!    timeout), and the process exits; those files then fail with `ENOTCONN`.
//!
//! The exit is clean (`Ok`) unless a file's changes were lost. A second signal at any point
//! detaches the mount lazily and exits at once with an error: uploads not finished then are
//! lost (the next mount aborts their multipart uploads).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::fs::Fs;
use crate::fuse::FuseAdapter;
use crate::http::Health;

pub struct MountOptions {
    /// Shown as the filesystem "device" in `mount` / `df`.
    pub fs_name: String,
    pub read_only: bool,
    pub allow_other: bool,
    /// Bound on the whole shutdown, uploads included (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
    /// Told when the mount exists and when it goes away (`/readyz`), if served.
    pub health: Option<Arc<Health>>,
    /// Called once the mount answers a `stat` of its root (a background mount's parent then
    /// returns).
    pub on_ready: Option<fn()>,
}

/// How long files still open after the unmount keep being served before the process exits: a
/// reader that is itself stopping gets to finish, one that never closes (a log tailer in another
/// container) does not hold the pod.
pub const READER_GRACE: Duration = Duration::from_secs(5);

/// Threads reading `/dev/fuse` (see `fuse/` for why two).
const FUSE_THREADS: usize = 2;

/// Mounts `fs` at `mountpoint` and serves it until a signal or an external unmount.
pub fn serve(
    fs: Arc<Fs>,
    rt: &tokio::runtime::Runtime,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(), String> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(opts.fs_name.clone()),
        fuser::MountOption::Subtype("bucketfs".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
        if opts.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
        // With other users allowed in, the kernel must enforce the permission bits.
        config
            .mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;

    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());
    let mut session = fuser::Session::new(adapter, mountpoint, &config)
        .map_err(|e| format!("cannot mount at {}: {e}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    if let Some(h) = &opts.health {
        h.set_mounted(true);
    }

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = done_tx.send(session.run());
        })
        .map_err(|e| format!("cannot start the FUSE session: {e}"))?;

    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| e.to_string())?;
        let mut done_rx = done_rx;
        // The mount is ready once the kernel hands a stat of its root to this daemon.
        let root = mountpoint.to_path_buf();
        let mut answered = Some(tokio::task::spawn_blocking(move || {
            std::fs::metadata(root).map(|m| m.ino())
        }));
        let mut unanswered = None;
        let ended_externally = loop {
            tokio::select! {
                r = async { answered.as_mut().expect("checked by the guard").await },
                    if answered.is_some() =>
                {
                    answered = None;
                    match r {
                        Ok(Ok(ino)) if ino == crate::fs::ROOT_INO => {
                            tracing::info!("the mount answers");
                            if let Some(ready) = opts.on_ready {
                                ready();
                            }
                        }
                        other => {
                            let why = match other {
                                Ok(Ok(ino)) => format!("its root has inode {ino}, not the mount's"),
                                Ok(Err(e)) => e.to_string(),
                                Err(e) => e.to_string(),
                            };
                            tracing::error!(error = %why, "the mount does not answer a stat of its root");
                            unanswered = Some(why);
                            break None;
                        }
                    }
                }
                r = &mut done_rx => {
                    tracing::info!("unmounted externally; finishing uploads");
                    break Some(r);
                }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break None; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break None; }
            }
        };
        if let Some(h) = &opts.health {
            h.set_mounted(false);
        }
        let deadline = tokio::time::Instant::now() + opts.shutdown_timeout;
        let report = tokio::select! {
            r = fs.shutdown(opts.shutdown_timeout) => r,
            _ = term.recv() => return exit_now(mountpoint),
            _ = int.recv() => return exit_now(mountpoint),
        };
        let lost = match report.lost.len() {
            0 if unanswered.is_some() => Err(format!(
                "the mount at {} does not answer: {}",
                mountpoint.display(),
                unanswered.unwrap_or_default()
            )),
            0 => Ok(()),
            n => Err(format!(
                "the changes to {n} file(s) were lost at shutdown (see the log): {}",
                report.lost.join(", ")
            )),
        };
        if let Some(r) = ended_externally {
            return match r {
                Ok(Err(e)) => Err(format!("FUSE session failed: {e}")),
                Ok(Ok(())) | Err(_) => lost,
            };
        }
        unmount(&mut unmounter, mountpoint);
        let grace = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(READER_GRACE);
        tokio::select! {
            _ = done_rx => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("files are still open after the unmount; exiting (they now fail with ENOTCONN)");
            }
            _ = term.recv() => tracing::warn!("second signal: exiting now"),
            _ = int.recv() => tracing::warn!("second signal: exiting now"),
        }
        tracing::info!("unmounted");
        lost
    })
}

/// The second signal: detach the mount and give up on what is still running.
fn exit_now(mountpoint: &Path) -> Result<(), String> {
    tracing::warn!("second signal: detaching the mount and exiting now");
    detach_lazily(mountpoint);
    Err(
        "stopped by a second signal before the shutdown finished; unfinished uploads are lost"
            .into(),
    )
}

/// Unmounts, falling back to a lazy detach when files are still open.
fn unmount(unmounter: &mut fuser::SessionUnmounter, mountpoint: &Path) {
    match unmounter.unmount() {
        Ok(()) => {}
        Err(e) => {
            tracing::info!(error = %e, "unmount refused (files still open?); detaching lazily");
            detach_lazily(mountpoint);
        }
    }
}

/// `umount -l`: the mount disappears from the tree now, and goes away once no file is open.
fn detach_lazily(mountpoint: &Path) {
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .expect("mount point paths have no NUL byte");
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        tracing::error!(error = %err, "lazy unmount failed");
    }
}
