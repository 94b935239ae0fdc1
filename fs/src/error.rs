//! The filesystem core's error type and its mapping to errno at the FUSE edge.

use crate::cache::CacheError;
use crate::store::StoreError;

/// Errors of filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// The name already exists.
    #[error("file exists")]
    Exists,
    /// A directory was expected.
    #[error("not a directory")]
    NotDir,
    /// A file was expected.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A path component is longer than 255 bytes.
    #[error("file name longer than 255 bytes")]
    NameTooLong,
    /// The request is malformed (bad name, unsupported flag combination).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The mount is read-only.
    #[error("read-only mount")]
    ReadOnly,
    /// Renaming a directory with stored content is not supported; `mv` copies instead.
    #[error("cannot rename a directory whose content is in the store")]
    CrossDevice,
    /// A ref was moved by another writer since this mount last saw it.
    #[error("ref {0} was changed by another writer")]
    RefConflict(String),
    /// A ref cannot be published because objects written before it failed to upload.
    #[error("objects written before ref {refname} are not in the store: {reason}")]
    Unpublished {
        /// The ref whose publication was refused.
        refname: String,
        /// Why the earlier upload failed.
        reason: String,
    },
    /// The operation is not supported by this filesystem.
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// Unknown file handle.
    #[error("bad file handle")]
    BadHandle,
    /// A store request failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The disk cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Local I/O failed.
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::CrossDevice => libc::EXDEV,
            // Not ESTALE: the kernel silently retries an ESTALE rename, which would then
            // succeed against the refreshed version and overwrite the other writer.
            FsError::RefConflict(_) => libc::EBUSY,
            FsError::Unpublished { .. } => libc::EIO,
            FsError::NotSupported(_) => libc::EPERM,
            FsError::BadHandle => libc::EBADF,
            FsError::Store(StoreError::NotFound(_)) => libc::ENOENT,
            FsError::Store(StoreError::Timeout { .. }) => libc::ETIMEDOUT,
            FsError::Store(_) => libc::EIO,
            FsError::Cache(_) => libc::EIO,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Whether this error is an expected answer (ENOENT on lookup) rather than a fault
    /// worth a warning in the log.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            FsError::NotFound | FsError::Exists | FsError::NotEmpty | FsError::NotSupported(_)
        )
    }
}
