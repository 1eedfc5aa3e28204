//! The one place where filesystem errors become errno values for the kernel.

use extents::FsError;
use fuser::Errno;

/// The errno for `e`. Anything that is not the caller's fault is logged and becomes EIO.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::AccessDenied => Errno::EACCES,
        FsError::NotPermitted => Errno::EPERM,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Invalid(_) | FsError::WrongKind => Errno::EINVAL,
        FsError::FileTooBig => Errno::EFBIG,
        FsError::TooManyLinks => Errno::EMLINK,
        FsError::NoAttribute => Errno::NO_XATTR,
        FsError::ValueTooLarge => Errno::E2BIG,
        FsError::Range => Errno::ERANGE,
        FsError::Unsupported(_) => Errno::EOPNOTSUPP,
        FsError::NoData => Errno::ENXIO,
        FsError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => Errno::ENOSPC,
        other => {
            tracing::error!(error = %other, "internal error");
            Errno::EIO
        }
    }
}
