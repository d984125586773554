//! The one place where errors become errnos (and log levels).

use crate::lock::LockError;
use crate::read::ReadError;
use crate::store::StoreError;
use crate::write::WriteError;

#[derive(thiserror::Error, Debug)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("the object changed or vanished since it was opened")]
    Stale,
    #[error("the mount is read-only")]
    ReadOnly,
    #[error("the mount is shutting down and takes no new writes")]
    ShuttingDown,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("unknown file handle")]
    BadHandle,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a valid name here")]
    InvalidName,
    #[error("file name too long")]
    NameTooLong,
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("{0}")]
    Write(#[from] WriteError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Lock(#[from] LockError),
}

impl From<ReadError> for FsError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Stale => FsError::Stale,
            ReadError::Store(e) => FsError::Store(e),
        }
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Stale => libc::ESTALE,
            FsError::ReadOnly | FsError::ShuttingDown => libc::EROFS,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::BadHandle => libc::EBADF,
            FsError::NotSupported(_) => libc::ENOTSUP,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::InvalidName => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Write(e) => match e {
                // A full disk or quota is the application's to see; other staging failures are I/O.
                WriteError::Staging(e) => match e.raw_os_error() {
                    Some(libc::ENOSPC) => libc::ENOSPC,
                    Some(libc::EDQUOT) => libc::EDQUOT,
                    _ => libc::EIO,
                },
                WriteError::Store(_) | WriteError::Failed => libc::EIO,
                WriteError::Lock(LockError::Busy { .. }) => libc::EBUSY,
                WriteError::Lock(_) => libc::EIO,
                WriteError::Sealed => libc::EROFS,
            },
            // Another replica writes this path.
            FsError::Lock(LockError::Busy { .. }) => libc::EBUSY,
            FsError::Lock(LockError::Lost { .. }) => libc::EIO,
            FsError::Store(e) | FsError::Lock(LockError::Store(e)) => match e {
                StoreError::NotFound(_) => libc::ENOENT,
                StoreError::PreconditionFailed(_) => libc::ESTALE,
                StoreError::Unauthorized(_) => libc::EACCES,
                StoreError::Conflict(_) => libc::EBUSY,
                StoreError::NameTooLong(_) => libc::ENAMETOOLONG,
                StoreError::BucketNotFound(_)
                | StoreError::Throttled(_)
                | StoreError::Transient(_)
                | StoreError::Invalid(_) => libc::EIO,
            },
        }
    }

    /// Whether the error says something is wrong beyond the application's own request, and so
    /// deserves a warning in the log (a missing file is an answer, not a problem).
    pub fn is_unexpected(&self) -> bool {
        match self {
            FsError::Store(e) => !matches!(e, StoreError::NotFound(_)),
            FsError::Write(_) => true,
            // A refusal is an answer (and the lock module logs its holder).
            FsError::Lock(e) => !matches!(e, LockError::Busy { .. }),
            _ => false,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_failed_at_the_store_is_eio_whatever_the_store_said() {
        for e in [
            StoreError::Unauthorized("no".into()),
            StoreError::PreconditionFailed("changed".into()),
            StoreError::NotFound("gone".into()),
            StoreError::Transient("down".into()),
        ] {
            assert_eq!(FsError::from(WriteError::Store(e)).errno(), libc::EIO);
        }
        assert_eq!(FsError::from(WriteError::Failed).errno(), libc::EIO);
        assert_eq!(FsError::from(WriteError::Sealed).errno(), libc::EROFS);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            FsError::from(WriteError::Staging(full)).errno(),
            libc::ENOSPC
        );
    }
}
