//! Mounting and the mount's lifetime: check the mount point, serve FUSE until a signal or an
//! external unmount, then shut down cleanly.
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
//!
//! ## The kernel's readahead (`--read-ahead`)
//! Buffered reads reach the daemon as the kernel's readahead requests, never larger than the
//! mount's readahead (`ra_pages` of its backing device info, 128 KiB by default). A FUSE daemon
//! cannot raise it in `FUSE_INIT` (the kernel offers its default and takes the smaller of that
//! and the answer), so at 128 KiB a 4 MiB `pread` at a random offset becomes a ramp of 128 KiB
//! windows, one round trip after another. Root can raise it afterwards, in
//! `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb` of the mount's device. It is written once the mount
//! answers its first `stat` (so `FUSE_INIT` is done and cannot lower it again) and before the
//! mount is reported ready: a file's readahead state is set when it is opened, so every reader
//! started after readiness gets the new value. Without root (a laptop) the mount goes on with
//! the kernel's value and says so in the log.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
    /// `--read-ahead`: the kernel's readahead of the mount in bytes (0: leave the kernel's).
    pub read_ahead: u64,
    /// Told when the mount answers and when it goes away (`/readyz`), if served.
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
    // Bounds the inode table (see `fs::inodes`).
    crate::fuse::drop_entries_through(&fs, session.notifier())
        .map_err(|e| format!("cannot start the FUSE notification thread: {e}"))?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");

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
            std::fs::metadata(root).map(|m| (m.ino(), m.dev()))
        }));
        let mut unanswered = None;
        let ended_externally = loop {
            tokio::select! {
                r = async { answered.as_mut().expect("checked by the guard").await },
                    if answered.is_some() =>
                {
                    answered = None;
                    match r {
                        Ok(Ok((ino, dev))) if ino == crate::fs::ROOT_INO => {
                            tracing::info!("the mount answers");
                            if opts.read_ahead > 0 {
                                set_read_ahead(dev, opts.read_ahead);
                            }
                            if let Some(h) = &opts.health {
                                h.set_mounted(true);
                            }
                            if let Some(ready) = opts.on_ready {
                                ready();
                            }
                        }
                        other => {
                            let why = match other {
                                Ok(Ok((ino, _))) => format!("its root has inode {ino}, not the mount's"),
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
                // The kernel ends the connection of a filesystem gone from every namespace (the
                // last file of a lazy unmount closed) by aborting it: a reader thread blocked in
                // `read` then gets ECONNABORTED where the library expects ENODEV. The same end.
                Ok(Err(e)) if e.raw_os_error() != Some(libc::ECONNABORTED) => {
                    Err(format!("FUSE session failed: {e}"))
                }
                Ok(_) | Err(_) => lost,
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

/// Where the kernel keeps the readahead (in KiB) of the filesystem on device `dev`: a FUSE
/// mount's backing device info is named after its anonymous device number.
pub fn read_ahead_path(dev: u64) -> PathBuf {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    PathBuf::from(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
}

/// Sets the kernel's readahead of the mount on `dev` to `bytes` (see the module docs); a mount
/// that cannot (not root, `/sys` read-only) goes on with the kernel's value.
fn set_read_ahead(dev: u64, bytes: u64) {
    let path = read_ahead_path(dev);
    let kib = bytes / 1024;
    match std::fs::write(&path, format!("{kib}\n")) {
        Ok(()) => tracing::info!(
            read_ahead_kib = kib,
            "set the kernel readahead of the mount"
        ),
        Err(e) => {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            tracing::warn!(
                path = %path.display(),
                error = %e,
                kernel_read_ahead_kib = current.trim(),
                "cannot set the kernel readahead of the mount (needs root and a writable /sys): \
                 large and random reads are slower; --read-ahead 0 leaves the kernel's value \
                 without this warning"
            );
        }
    }
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
    if let Err(err) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        tracing::error!(error = %err, "lazy unmount failed");
    }
}

/// Refuses mount points that cannot work, before anything is mounted; the canonical path of
/// one that can. The message says what to do.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!("mount point {shown} is not a directory"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "mount point {shown} does not exist; create it with: mkdir -p {shown}"
            ));
        }
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32) => {
            return Err(format!(
                "mount point {shown} is a dead FUSE mount; clear it with: fusermount3 -u {shown}"
            ));
        }
        Err(e) => return Err(format!("mount point {shown}: {e}")),
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("mount point {shown}: {e}"))?;
    if is_mount_point(&canonical) {
        return Err(format!(
            "{shown} is already a mount point; unmount it first (umount {shown})"
        ));
    }
    Ok(canonical)
}

/// Whether `path` (canonical) is listed in this process's mount table.
fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == wanted)
    })
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\"), r"/trailing\");
    }
}
