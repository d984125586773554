//! Notifications to the kernel: asking it to drop directory entries, so that it forgets their
//! inodes and the inode table stays within its cap (see `fs::inodes`).
//!
//! They go out from a thread of their own: the kernel takes the parent directory's lock to drop
//! an entry, which a lookup in that directory holds while it waits for this daemon's answer; the
//! threads answering requests and the tokio workers must never wait for that lock.

use std::ffi::OsStr;
use std::sync::Arc;

use fuser::{INodeNo, Notifier};

use crate::fs::Fs;

/// Has `fs` ask the kernel through `notifier` to drop the entries its inode table sheds.
pub fn drop_entries_through(fs: &Fs, notifier: Notifier) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<(u64, Arc<str>)>>();
    std::thread::Builder::new()
        .name("fuse-notify".into())
        .spawn(move || {
            for batch in rx {
                for (parent, name) in batch {
                    match notifier.inval_entry(INodeNo(parent), OsStr::new(&*name)) {
                        Ok(()) => {}
                        // Unmounted: nobody to tell any more.
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::ENODEV | libc::ENOTCONN | libc::EBADF)
                            ) =>
                        {
                            return;
                        }
                        Err(e) => tracing::debug!(parent, %name, error = %e, "entry not dropped"),
                    }
                }
            }
        })?;
    fs.set_entry_dropper(Box::new(move |batch| {
        let _ = tx.send(batch);
    }));
    Ok(())
}
