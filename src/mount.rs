//! Mounting and the mount's lifetime: serve FUSE until a signal or an external unmount, then
//! unmount cleanly.
//!
//! On SIGTERM or SIGINT the filesystem is unmounted; if files are still open (`EBUSY`), it is
//! detached lazily (`MNT_DETACH`) so the process can exit while the kernel finishes with the open
//! files. A second signal during shutdown exits at once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::fs::Fs;
use crate::fuse::FuseAdapter;

pub struct MountOptions {
    /// Shown as the filesystem "device" in `mount` / `df`.
    pub fs_name: String,
    pub read_only: bool,
    pub allow_other: bool,
}

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

    let adapter = FuseAdapter::new(fs, rt.handle().clone());
    let mut session = fuser::Session::new(adapter, mountpoint, &config)
        .map_err(|e| format!("cannot mount at {}: {e}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
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
        tokio::select! {
            r = &mut done_rx => {
                tracing::info!("unmounted externally");
                return match r {
                    Ok(Ok(())) | Err(_) => Ok(()),
                    Ok(Err(e)) => Err(format!("FUSE session failed: {e}")),
                };
            }
            _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
            _ = int.recv() => tracing::info!("SIGINT: unmounting"),
        }
        unmount(&mut unmounter, mountpoint);
        tokio::select! {
            _ = done_rx => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                tracing::warn!("FUSE session did not end within 10 s of the unmount; exiting");
            }
            _ = term.recv() => tracing::warn!("second signal: exiting now"),
            _ = int.recv() => tracing::warn!("second signal: exiting now"),
        }
        tracing::info!("unmounted");
        Ok(())
    })
}

/// Unmounts, falling back to a lazy detach when files are still open.
fn unmount(unmounter: &mut fuser::SessionUnmounter, mountpoint: &Path) {
    match unmounter.unmount() {
        Ok(()) => {}
        Err(e) => {
            tracing::info!(error = %e, "unmount refused (files still open?); detaching lazily");
            let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
                .expect("mount point paths have no NUL byte");
            // SAFETY: a valid NUL-terminated path.
            let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                tracing::error!(error = %err, "lazy unmount failed");
            }
        }
    }
}
