//! Errors of the filesystem core. Which errno each becomes is decided at the FUSE boundary.

use std::fmt;
use std::io;

use crate::types::Ino;

/// What went wrong in a filesystem operation.
#[derive(Debug)]
#[non_exhaustive]
pub enum FsError {
    /// No such file, directory or attribute owner.
    NotFound,
    /// The name is taken.
    Exists,
    /// A path component is not a directory.
    NotDir,
    /// The operation does not apply to a directory.
    IsDir,
    /// The directory still has entries.
    NotEmpty,
    /// A name or symlink target is longer than the format allows.
    NameTooLong,
    /// The device has no free blocks (or the metadata region is full).
    NoSpace,
    /// The credentials lack a permission bit (EACCES).
    AccessDenied,
    /// The operation is reserved to the owner or to root (EPERM).
    NotPermitted,
    /// The mount is read-only.
    ReadOnly,
    /// An argument is out of range; the message says which.
    Invalid(&'static str),
    /// The result would exceed the maximum file size.
    FileTooBig,
    /// Too many hard links.
    TooManyLinks,
    /// No such extended attribute.
    NoAttribute,
    /// An attribute value is larger than the format allows.
    ValueTooLarge,
    /// A caller's buffer is too small for the answer.
    Range,
    /// The operation or flag is not supported.
    Unsupported(&'static str),
    /// The operation is not valid for this kind of file (e.g. readlink on a file).
    WrongKind,
    /// An offset lies past the end of data (SEEK_DATA) or of the file.
    NoData,
    /// The on-device structures are inconsistent.
    Corrupt { what: String },
    /// The metadata store failed.
    Store(String),
    /// The device failed.
    Io(io::Error),
    /// An inode vanished while in use: an internal inconsistency, reported, never panicked on.
    Dangling(Ino),
    /// An operation panicked while changing metadata; nothing more is changed or committed
    /// until the filesystem is mounted again, so its half-done change never persists.
    Halted,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::NotFound => write!(f, "no such file or directory"),
            FsError::Exists => write!(f, "file exists"),
            FsError::NotDir => write!(f, "not a directory"),
            FsError::IsDir => write!(f, "is a directory"),
            FsError::NotEmpty => write!(f, "directory not empty"),
            FsError::NameTooLong => write!(f, "name too long"),
            FsError::NoSpace => write!(f, "no space left on device"),
            FsError::AccessDenied => write!(f, "permission denied"),
            FsError::NotPermitted => write!(f, "operation not permitted"),
            FsError::ReadOnly => write!(f, "read-only filesystem"),
            FsError::Invalid(why) => write!(f, "invalid argument: {why}"),
            FsError::FileTooBig => write!(f, "file too large"),
            FsError::TooManyLinks => write!(f, "too many links"),
            FsError::NoAttribute => write!(f, "no such attribute"),
            FsError::ValueTooLarge => write!(f, "attribute value too large"),
            FsError::Range => write!(f, "result does not fit the buffer"),
            FsError::Unsupported(what) => write!(f, "not supported: {what}"),
            FsError::WrongKind => write!(f, "wrong kind of file for this operation"),
            FsError::NoData => write!(f, "no data past this offset"),
            FsError::Corrupt { what } => write!(f, "filesystem is corrupt: {what}"),
            FsError::Store(e) => write!(f, "metadata store: {e}"),
            FsError::Io(e) => write!(f, "device I/O: {e}"),
            FsError::Dangling(ino) => write!(f, "internal: inode {ino} is referenced but missing"),
            FsError::Halted => write!(
                f,
                "an operation failed midway; changes are refused until the filesystem is mounted again"
            ),
        }
    }
}

impl std::error::Error for FsError {}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}

macro_rules! from_store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for FsError {
            fn from(e: $t) -> Self {
                store_error(e.into())
            }
        }
    )*};
}
from_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Classifies a redb error: a full metadata region is ENOSPC, corruption is corruption.
fn store_error(e: redb::Error) -> FsError {
    match e {
        redb::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => FsError::NoSpace,
        redb::Error::Io(io) => FsError::Io(io),
        redb::Error::Corrupted(what) => FsError::Corrupt { what },
        other => FsError::Store(other.to_string()),
    }
}

/// Result of a filesystem operation.
pub type Result<T, E = FsError> = std::result::Result<T, E>;
