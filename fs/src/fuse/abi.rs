//! The kernel's FUSE wire format (`include/uapi/linux/fuse.h`), as far as nearfs speaks
//! it: opcodes, flags, the fixed structs of the requests it reads and the replies it
//! writes. Everything is little-endian and laid out as the kernel lays it out; decoding
//! never trusts a length it has not checked.

/// The protocol version nearfs speaks (7.38 is Linux 6.2's; nothing later is needed
/// except `FUSE_OVER_IO_URING`, which is a flag, not a version).
pub const MAJOR: u32 = 7;
pub const MINOR: u32 = 38;

pub const ROOT_ID: u64 = 1;

/// `fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
pub const IN_HEADER: usize = 40;
/// `fuse_out_header`: len, error, unique.
pub const OUT_HEADER: usize = 16;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// `fuse_init_in.flags` / `flags2` (the upper 32 bits) bits nearfs asks for.
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// `fuse_open_out.open_flags`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;

/// `fuse_setattr_in.valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
}

pub const IOCTL_UNRESTRICTED: u32 = 1 << 1;
pub const NOTIFY_INVAL_INODE: i32 = 2;
pub const NOTIFY_RETRIEVE: i32 = 5;
pub const RENAME_NOREPLACE: u32 = 1 << 0;
pub const RENAME_EXCHANGE: u32 = 1 << 1;
pub const RENAME_WHITEOUT: u32 = 1 << 2;

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
pub const DEV_IOC_CLONE: libc::c_ulong = (2 << 30) | (4 << 16) | (229 << 8);

/// The header of a request.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        let mut a = Args(b.get(..IN_HEADER)?);
        Some(InHeader {
            len: a.u32()?,
            opcode: a.u32()?,
            unique: a.u64()?,
            nodeid: a.u64()?,
            uid: a.u32()?,
            gid: a.u32()?,
            pid: a.u32()?,
        })
    }
}

/// The arguments after a request's header, read front to back. Every read checks that the
/// bytes are there; `None` means the request is malformed.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a>(pub &'a [u8]);

impl<'a> Args<'a> {
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }

    /// Skips `n` bytes (padding, fields nearfs does not use).
    pub fn skip(&mut self, n: usize) -> Option<()> {
        self.bytes(n).map(drop)
    }

    /// A NUL-terminated name, without its NUL.
    pub fn name(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&c| c == 0)?;
        let name = self.bytes(end)?;
        self.skip(1)?;
        Some(name)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A reply struct being written: fields appended in order, little-endian.
#[derive(Default, Debug)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn with_capacity(n: usize) -> Out {
        Out(Vec::with_capacity(n))
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// Pads to the next multiple of 8, as directory records are.
    pub fn align8(&mut self) -> &mut Self {
        let n = self.0.len().next_multiple_of(8) - self.0.len();
        self.zeros(n)
    }
}

/// `fuse_attr` (88 bytes): what the kernel caches of an inode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    /// (seconds, nanoseconds) since the epoch.
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Out {
    pub fn attr(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(a.atime.0 as u64)
            .u64(a.mtime.0 as u64)
            .u64(a.ctime.0 as u64);
        self.u32(a.atime.1).u32(a.mtime.1).u32(a.ctime.1);
        self.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
        self.u32(a.rdev).u32(a.blksize).u32(0)
    }

    /// `fuse_entry_out` (128 bytes): a name's inode, with how long name and attributes
    /// may be cached.
    pub fn entry(&mut self, a: &Attr, generation: u64, ttl: std::time::Duration) -> &mut Self {
        let (s, ns) = (ttl.as_secs(), ttl.subsec_nanos());
        self.u64(a.ino)
            .u64(generation)
            .u64(s)
            .u64(s)
            .u32(ns)
            .u32(ns);
        self.attr(a)
    }

    /// `fuse_attr_out` (104 bytes).
    pub fn attr_out(&mut self, a: &Attr, ttl: std::time::Duration) -> &mut Self {
        self.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
        self.attr(a)
    }

    /// `fuse_open_out` (16 bytes).
    pub fn open(&mut self, fh: u64, flags: u32) -> &mut Self {
        self.u64(fh).u32(flags).u32(0)
    }
}

/// The `st_mode` type bits for a directory entry's `type` field (`DT_*`, mode >> 12).
pub fn dirent_type(mode: u32) -> u32 {
    (mode & libc::S_IFMT) >> 12
}

/// Size of a `fuse_dirent` record with a name of `len` bytes.
pub fn dirent_size(len: usize) -> usize {
    (24 + len).next_multiple_of(8)
}

/// Size of a `fuse_direntplus` record with a name of `len` bytes.
pub fn direntplus_size(len: usize) -> usize {
    (128 + 24 + len).next_multiple_of(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_structs_have_the_kernels_sizes() {
        let a = Attr::default();
        assert_eq!(Out::default().attr(&a).0.len(), 88);
        let ttl = std::time::Duration::from_secs(1);
        assert_eq!(Out::default().entry(&a, 0, ttl).0.len(), 128);
        assert_eq!(Out::default().attr_out(&a, ttl).0.len(), 104);
        assert_eq!(Out::default().open(1, 2).0.len(), 16);
        assert_eq!(dirent_size(1), 32);
        assert_eq!(dirent_size(8), 32);
        assert_eq!(dirent_size(9), 40);
        assert_eq!(direntplus_size(1), 160);
    }

    #[test]
    fn args_refuse_what_is_not_there() {
        let mut a = Args(&[1, 0, 0, 0, b'x', 0, b'y']);
        assert_eq!(a.u32(), Some(1));
        assert_eq!(a.name(), Some(&b"x"[..]));
        // No NUL: not a name.
        assert_eq!(a.name(), None);
        assert_eq!(a.u64(), None);
        assert_eq!(a.rest(), b"y");
        assert!(InHeader::parse(&[0; IN_HEADER - 1]).is_none());
    }
}
