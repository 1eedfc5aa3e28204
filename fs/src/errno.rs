//! The one place where filesystem errors become errno values for the kernel.

use extents::FsError;

/// An errno value as the kernel gets it back (positive; the reply negates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENXIO: Errno = Errno(libc::ENXIO);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EPROTO: Errno = Errno(libc::EPROTO);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const EDQUOT: Errno = Errno(libc::EDQUOT);
    /// No such extended attribute.
    pub const NO_XATTR: Errno = Errno(libc::ENODATA);
}

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
