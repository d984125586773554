//! The one place where errors become errnos (and log levels).

use crate::lock::LockError;
use crate::store::StoreError;

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
    Write(#[from] crate::write::WriteError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Lock(#[from] LockError),
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
            FsError::Write(e) => e.errno(),
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
