//! Numbers that cross a boundary, each with its own type.

use std::fmt;

/// Bytes per filesystem block. Fixed by format version 1.
pub const BLOCK_SIZE: u64 = 4096;

/// An inode number. 1 is the root directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ino(pub u64);

impl Ino {
    /// The root directory.
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A block number on the device (device byte offset = block × [`BLOCK_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevBlock(pub u64);

impl DevBlock {
    /// Byte offset of the block on the device. Block numbers come from the allocator and
    /// are bounded by the device size, so this cannot overflow for a valid block.
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

/// A block index inside a file (file byte offset = index × [`BLOCK_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileBlock(pub u64);

/// Largest file size: every block index of such a file, and every byte offset, fits u64
/// with room for `offset + len` arithmetic.
pub const MAX_FILE_SIZE: u64 = 1 << 60;

/// Number of blocks needed to hold `bytes`.
pub fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE)
}
