//! The on-device format, version 1. `docs/format.md` describes the same bytes in prose;
//! the two must change together, and `tests/fixtures/` holds an image every later version
//! must still mount.
//!
//! ```text
//! block 0                 superblock (this module)
//! blocks [1, 1 + M)       metadata region: a redb database (crate::meta)
//! blocks [D, total)       data region: file extents (crate::alloc)
//! ```

use crate::codec::{Reader, Truncated, Writer, get_u32, get_u64, put_u32, put_u64};
use crate::error::{FsError, Result};
use crate::types::{BLOCK_SIZE, DevBlock, FileBlock, blocks_for};

/// First eight bytes of every nearfs device.
pub const MAGIC: [u8; 8] = *b"NEARFS\0\x01";
/// The format this code writes; it mounts exactly this version.
pub const FORMAT_VERSION: u32 = 1;
/// Smallest device mkfs accepts: room for the metadata region and some data.
pub const MIN_DEVICE_BYTES: u64 = 16 << 20;

/// Where on the device the filesystem's uuid lies: bytes that name one filesystem and
/// never change after mkfs (a mount over the network checks them on every reconnect).
pub const UUID_BYTES: std::ops::Range<u64> = sb::UUID as u64..sb::UUID as u64 + 16;

/// Byte offsets of the superblock's fields (all little-endian).
mod sb {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const UUID: usize = 16;
    pub const BLOCK_SIZE: usize = 32;
    pub const TOTAL_BLOCKS: usize = 40;
    pub const META_START: usize = 48;
    pub const META_BLOCKS: usize = 56;
    pub const DATA_START: usize = 64;
    pub const DATA_BLOCKS: usize = 72;
    pub const CREATED: usize = 80;
    /// CRC-32 (IEEE) of bytes [0, CHECKSUM).
    pub const CHECKSUM: usize = 4092;
}

/// Geometry and identity of a formatted device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub total_blocks: u64,
    pub meta_start: DevBlock,
    pub meta_blocks: u64,
    pub data_start: DevBlock,
    pub data_blocks: u64,
    /// Seconds since the epoch at mkfs.
    pub created: u64,
}

impl Superblock {
    /// Lays out a device of `device_bytes`: the metadata region takes 1/32 of the device,
    /// at least 8 MiB and at most 1 GiB, after the superblock; the rest is data.
    pub fn layout(device_bytes: u64, uuid: [u8; 16], created: u64) -> Result<Self> {
        if device_bytes < MIN_DEVICE_BYTES {
            return Err(FsError::Invalid("device is smaller than 16 MiB"));
        }
        let total_blocks = device_bytes / BLOCK_SIZE;
        let meta_blocks = (total_blocks / 32).clamp((8 << 20) / BLOCK_SIZE, (1 << 30) / BLOCK_SIZE);
        let meta_start = DevBlock(1);
        let data_start = DevBlock(1 + meta_blocks);
        Ok(Self {
            uuid,
            total_blocks,
            meta_start,
            meta_blocks,
            data_start,
            data_blocks: total_blocks - data_start.0,
            created,
        })
    }

    /// The superblock as the 4096 bytes stored in block 0.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE as usize];
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, sb::VERSION, FORMAT_VERSION);
        put_u32(&mut b, sb::FLAGS, 0);
        b[sb::UUID..sb::UUID + 16].copy_from_slice(&self.uuid);
        put_u32(&mut b, sb::BLOCK_SIZE, BLOCK_SIZE as u32);
        put_u64(&mut b, sb::TOTAL_BLOCKS, self.total_blocks);
        put_u64(&mut b, sb::META_START, self.meta_start.0);
        put_u64(&mut b, sb::META_BLOCKS, self.meta_blocks);
        put_u64(&mut b, sb::DATA_START, self.data_start.0);
        put_u64(&mut b, sb::DATA_BLOCKS, self.data_blocks);
        put_u64(&mut b, sb::CREATED, self.created);
        let crc = crc32fast::hash(&b[..sb::CHECKSUM]);
        put_u32(&mut b, sb::CHECKSUM, crc);
        b
    }

    /// Whether block 0 starts with the nearfs magic (whatever else is wrong with it).
    pub fn has_magic(block: &[u8]) -> bool {
        block.len() >= 8 && block[..8] == MAGIC
    }

    /// Parses and validates block 0 of a device of `device_bytes`.
    pub fn decode(b: &[u8], device_bytes: u64) -> Result<Self> {
        let corrupt = |what: String| FsError::Corrupt { what };
        if b.len() < BLOCK_SIZE as usize {
            return Err(corrupt("superblock is shorter than one block".into()));
        }
        if !Self::has_magic(b) {
            return Err(corrupt("no nearfs superblock (wrong magic)".into()));
        }
        let stored = get_u32(b, sb::CHECKSUM);
        let actual = crc32fast::hash(&b[..sb::CHECKSUM]);
        if stored != actual {
            return Err(corrupt(format!(
                "superblock checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
            )));
        }
        let version = get_u32(b, sb::VERSION);
        if version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {version}; this nearfs reads version {FORMAT_VERSION}"
            )));
        }
        let bs = get_u32(b, sb::BLOCK_SIZE);
        if u64::from(bs) != BLOCK_SIZE {
            return Err(corrupt(format!(
                "block size {bs}; format 1 uses {BLOCK_SIZE}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[sb::UUID..sb::UUID + 16]);
        let s = Self {
            uuid,
            total_blocks: get_u64(b, sb::TOTAL_BLOCKS),
            meta_start: DevBlock(get_u64(b, sb::META_START)),
            meta_blocks: get_u64(b, sb::META_BLOCKS),
            data_start: DevBlock(get_u64(b, sb::DATA_START)),
            data_blocks: get_u64(b, sb::DATA_BLOCKS),
            created: get_u64(b, sb::CREATED),
        };
        let device_blocks = device_bytes / BLOCK_SIZE;
        let consistent = s.meta_start.0 == 1
            && s.meta_blocks >= 2
            && s.meta_start.0.checked_add(s.meta_blocks) == Some(s.data_start.0)
            && s.data_start.0.checked_add(s.data_blocks) == Some(s.total_blocks);
        if !consistent {
            return Err(corrupt("superblock geometry is inconsistent".into()));
        }
        if s.total_blocks > device_blocks {
            return Err(corrupt(format!(
                "device holds {device_blocks} blocks but the filesystem needs {} (truncated image?)",
                s.total_blocks
            )));
        }
        Ok(s)
    }

    /// The UUID in its usual textual form.
    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// Whether `[start, start + len)` lies inside the data region.
    pub fn in_data_region(&self, start: DevBlock, len: u64) -> bool {
        start.0 >= self.data_start.0
            && start
                .0
                .checked_add(len)
                .is_some_and(|end| end <= self.total_blocks)
    }
}

/// File type bits of `mode`, as in `stat(2)`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;

/// A point in time as stored: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Self {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                Self {
                    secs: -(d.as_secs() as i64) - 1,
                    nanos: 1_000_000_000 - d.subsec_nanos(),
                }
            }
        }
    }
}

/// One extent: `len` blocks of a file starting at `file` stored from `dev` on.
/// An unwritten extent is allocated but reads as zeros (fallocate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub file: FileBlock,
    pub dev: DevBlock,
    pub len: u64,
    pub unwritten: bool,
}

/// The fixed attributes of an inode: what `stat(2)` shows, apart from allocated space.
/// The same value lives in memory, in the stored record, and is turned into an
/// [`crate::Attr`] in one place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
    pub generation: u64,
    /// Parent directory (directories only; 0 otherwise).
    pub parent: u64,
}

/// Everything stored about one inode, in one metadata record (see docs/format.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRecord {
    pub attrs: InodeAttrs,
    pub extents: Vec<Extent>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target (symlinks only).
    pub target: Vec<u8>,
}

/// Size of the fixed part of an inode record.
const INODE_HEADER: usize = 112;
const EXTENT_UNWRITTEN: u64 = 1;

impl InodeAttrs {
    /// A new inode's attributes: every time `now`, size 0.
    pub fn new(
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        generation: u64,
        parent: u64,
        now: Timestamp,
    ) -> Self {
        Self {
            mode,
            uid,
            gid,
            nlink,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            generation,
            parent,
        }
    }
}

impl InodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let a = &self.attrs;
        let mut w = Writer::with_capacity(INODE_HEADER + self.extents.len() * 32);
        w.u32(a.mode);
        w.u32(a.uid);
        w.u32(a.gid);
        w.u32(a.nlink);
        w.u64(a.size);
        for t in [a.atime, a.mtime, a.ctime, a.crtime] {
            w.i64(t.secs);
            w.u32(t.nanos);
        }
        w.u32(a.rdev);
        w.u32(0); // flags, reserved
        w.u64(a.generation);
        w.u64(a.parent);
        w.u32(self.extents.len() as u32);
        w.u32(self.xattrs.len() as u32);
        w.u32(self.target.len() as u32);
        w.u32(0); // reserved
        for e in &self.extents {
            w.u64(e.file.0);
            w.u64(e.dev.0);
            w.u64(e.len);
            w.u64(if e.unwritten { EXTENT_UNWRITTEN } else { 0 });
        }
        for (name, value) in &self.xattrs {
            w.u16(name.len() as u16);
            w.u32(value.len() as u32);
            w.bytes(name);
            w.bytes(value);
        }
        w.bytes(&self.target);
        w.finish()
    }

    pub fn decode(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let mode = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let nlink = r.u32()?;
        let size = r.u64()?;
        let mut times = [Timestamp::default(); 4];
        for t in &mut times {
            *t = Timestamp {
                secs: r.i64()?,
                nanos: r.u32()?,
            };
        }
        let rdev = r.u32()?;
        let _flags = r.u32()?;
        let generation = r.u64()?;
        let parent = r.u64()?;
        let n_extents = r.u32()? as usize;
        let n_xattrs = r.u32()? as usize;
        let target_len = r.u32()? as usize;
        let _reserved = r.u32()?;
        // Counts come from the device: never trust them for an allocation size.
        let mut extents = Vec::with_capacity(n_extents.min(b.len() / 32));
        for _ in 0..n_extents {
            let file = FileBlock(r.u64()?);
            let dev = DevBlock(r.u64()?);
            let len = r.u64()?;
            let flags = r.u64()?;
            extents.push(Extent {
                file,
                dev,
                len,
                unwritten: flags & EXTENT_UNWRITTEN != 0,
            });
        }
        let mut xattrs = Vec::with_capacity(n_xattrs.min(b.len() / 6));
        for _ in 0..n_xattrs {
            let nl = r.u16()? as usize;
            let vl = r.u32()? as usize;
            let name = r.bytes(nl)?.to_vec();
            let value = r.bytes(vl)?.to_vec();
            xattrs.push((name, value));
        }
        let target = r.bytes(target_len)?.to_vec();
        if !r.is_empty() {
            return Err(Truncated);
        }
        let [atime, mtime, ctime, crtime] = times;
        Ok(Self {
            attrs: InodeAttrs {
                mode,
                uid,
                gid,
                nlink,
                size,
                atime,
                mtime,
                ctime,
                crtime,
                rdev,
                generation,
                parent,
            },
            extents,
            xattrs,
            target,
        })
    }

    /// A new, empty directory (two links: its entry and its own ".").
    pub fn empty_dir(
        perm: u32,
        uid: u32,
        gid: u32,
        parent: u64,
        generation: u64,
        now: Timestamp,
    ) -> Self {
        Self {
            attrs: InodeAttrs::new(S_IFDIR | perm, uid, gid, 2, generation, parent, now),
            extents: Vec::new(),
            xattrs: Vec::new(),
            target: Vec::new(),
        }
    }

    /// Blocks the file's size spans.
    pub fn size_blocks(&self) -> u64 {
        blocks_for(self.attrs.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock::layout(64 << 20, [7; 16], 1234).unwrap();
        let mut bytes = sb.encode();
        assert_eq!(Superblock::decode(&bytes, 64 << 20).unwrap(), sb);
        assert!(matches!(
            Superblock::decode(&bytes, 32 << 20),
            Err(FsError::Corrupt { .. })
        ));
        bytes[100] ^= 1;
        let err = Superblock::decode(&bytes, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum"), "{err}");
        bytes[0] = b'X';
        let err = Superblock::decode(&bytes, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn layout_reserves_metadata_and_rejects_tiny_devices() {
        assert!(Superblock::layout(1 << 20, [0; 16], 0).is_err());
        let sb = Superblock::layout(4 << 30, [0; 16], 0).unwrap();
        assert_eq!(sb.meta_blocks, (4u64 << 30) / 32 / BLOCK_SIZE);
        assert_eq!(sb.data_start.0 + sb.data_blocks, sb.total_blocks);
    }

    #[test]
    fn inode_record_round_trips_and_rejects_truncation() {
        let rec = InodeRecord {
            attrs: InodeAttrs {
                mode: S_IFREG | 0o644,
                uid: 1000,
                gid: 100,
                nlink: 1,
                size: 12345,
                atime: Timestamp { secs: 1, nanos: 2 },
                mtime: Timestamp { secs: -3, nanos: 4 },
                ctime: Timestamp { secs: 5, nanos: 6 },
                crtime: Timestamp { secs: 7, nanos: 8 },
                rdev: 0,
                generation: 9,
                parent: 0,
            },
            extents: vec![Extent {
                file: FileBlock(0),
                dev: DevBlock(300),
                len: 4,
                unwritten: true,
            }],
            xattrs: vec![(b"user.a".to_vec(), b"value".to_vec())],
            target: vec![],
        };
        let bytes = rec.encode();
        assert_eq!(InodeRecord::decode(&bytes).unwrap(), rec);
        for cut in 0..bytes.len() {
            assert!(
                InodeRecord::decode(&bytes[..cut]).is_err(),
                "accepted a cut at {cut}"
            );
        }
    }
}
