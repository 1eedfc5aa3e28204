//! The nearfs filesystem core, independent of FUSE and BPF: the on-device format, the
//! transactional metadata store, inodes, directories, extent maps, the allocator, the
//! translation of file ranges into device extents, and access checks.
//!
//! [`Fs`] is the mounted filesystem; the FUSE daemon in `fs/` is a thin adapter over it,
//! and in-process tests drive it directly.

pub mod access;
pub mod alloc;
mod codec;
mod data;
pub mod error;
pub mod extent_map;
mod filesystem;
pub mod format;
pub mod fsck;
mod load;
pub mod meta;
mod ops;
mod state;
mod store;
pub mod types;
mod xattr;

pub use access::Creds;
pub use data::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, InPlace, SEEK_DATA, SEEK_HOLE,
};
pub use error::{FsError, Result};
pub use filesystem::{Fs, FsInfo, MkfsOptions, MountOptions, read_superblock};
pub use ops::{
    Attr, DirEntry, FileKind, LINK_MAX, NAME_MAX, OpenMode, RenameFlags, SYMLINK_MAX, SetAttr,
    StatFs, TimeSet,
};
pub use types::{BLOCK_SIZE, DevBlock, FileBlock, Ino};
pub use xattr::{OWNER_POLICIES, RESERVED_PREFIX, XATTR_CREATE, XATTR_REPLACE};
