//! File data: reads, writes, truncation, fallocate and SEEK_DATA/SEEK_HOLE.
//!
//! Blocks that come newly into a file (holes being filled, unwritten extents being
//! written) are always written whole, with zeros around the caller's bytes, so that no
//! byte a block held for an earlier owner can ever be read through this file.

use crate::access::Creds;
use crate::alloc::Allocator;
use crate::error::{FsError, Result};
use crate::extent_map::{Backing, ExtentMap, Segment};
use crate::filesystem::{Fs, Inode, State, lock_read, lock_write};
use crate::format::{Extent, S_IFMT, S_IFREG, Timestamp};
use crate::types::{BLOCK_SIZE, DevBlock, FileBlock, Ino, MAX_FILE_SIZE, blocks_for};

/// `fallocate(2)` mode bits nearfs supports.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// `lseek(2)` whence values handled by the filesystem.
pub const SEEK_DATA: u32 = 3;
pub const SEEK_HOLE: u32 = 4;

/// A piece of a device range together with the file bytes it corresponds to.
fn seg_bytes(seg: &Segment) -> (u64, u64) {
    (seg.file.0 * BLOCK_SIZE, (seg.file.0 + seg.len) * BLOCK_SIZE)
}

/// A file's data in place: see [`Fs::in_place`].
pub struct InPlace<'a> {
    pub device: &'a dyn blockdev::BlockDevice,
    /// In file order; blocks not covered are holes.
    pub extents: Vec<Extent>,
    /// The file's size in bytes.
    pub size: u64,
}

fn regular(i: &Inode) -> Result<()> {
    if i.is_dir() {
        return Err(FsError::IsDir);
    }
    if i.mode & S_IFMT != S_IFREG {
        return Err(FsError::Invalid("not a regular file"));
    }
    Ok(())
}

/// Fails with NoSpace unless the holes among `segs` can all be filled, so that an
/// operation either gets all its blocks or changes nothing.
fn ensure_space(segs: &[Segment], alloc: &Allocator) -> Result<()> {
    let need: u64 = segs
        .iter()
        .filter(|s| s.backing == Backing::Hole)
        .map(|s| s.len)
        .sum();
    if need > alloc.free_blocks() {
        Err(FsError::NoSpace)
    } else {
        Ok(())
    }
}

impl Fs {
    /// Reads up to `len` bytes at `offset`; short only at end of file.
    pub fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Vec<u8>> {
        // The shared lock is held across the device reads: blocks of this file cannot be
        // freed and handed to another file while they are being read.
        let st = lock_read(&self.state);
        let i = st.get(ino)?;
        regular(i)?;
        if offset >= i.size {
            return Ok(Vec::new());
        }
        let end = i.size.min(offset.saturating_add(u64::from(len)));
        let mut out = vec![0u8; (end - offset) as usize];
        let first = offset / BLOCK_SIZE;
        for seg in i
            .extents
            .segments(FileBlock(first), blocks_for(end) - first)
        {
            let Backing::Written(dev) = seg.backing else {
                continue;
            };
            let (s, e) = seg_bytes(&seg);
            let (lo, hi) = (s.max(offset), e.min(end));
            let buf = &mut out[(lo - offset) as usize..(hi - offset) as usize];
            self.dev.read_at(buf, dev.byte_offset() + (lo - s))?;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, allocating blocks as needed. All or nothing with
    /// respect to space: if the blocks are not there, nothing is written.
    pub fn write(&self, cr: &Creds, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::FileTooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        self.retry_on_space(|| {
            let mut st = lock_write(&self.state);
            self.write_locked(&mut st, cr, ino, offset, data)
        })
    }

    fn write_locked(
        &self,
        st: &mut State,
        cr: &Creds,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        let end = offset + data.len() as u64;
        let State {
            inodes,
            alloc,
            dirty_inodes,
            ..
        } = st;
        let i = inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
        regular(i)?;
        let first = offset / BLOCK_SIZE;
        let segs = i
            .extents
            .segments(FileBlock(first), blocks_for(end) - first);
        ensure_space(&segs, alloc)?;
        dirty_inodes.insert(ino.0);
        for seg in segs {
            let (s, e) = seg_bytes(&seg);
            let (lo, hi) = (s.max(offset), e.min(end));
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            match seg.backing {
                Backing::Written(dev) => self.dev.write_at(src, dev.byte_offset() + (lo - s))?,
                Backing::Unwritten(dev) => {
                    self.write_whole_blocks(dev, &seg, lo, src)?;
                    i.extents.mark_written(seg.file, seg.len);
                }
                Backing::Hole => self.fill_hole(&mut i.extents, alloc, &seg, lo, src, false)?,
            }
        }
        let now = Timestamp::now();
        i.size = i.size.max(end);
        i.mtime = now;
        i.ctime = now;
        // Writing drops set-user-ID, and set-group-ID where it means "setgid executable".
        if !cr.is_root() && i.mode & 0o4000 != 0 {
            i.mode &= !0o4000;
        }
        if !cr.is_root() && i.mode & 0o2010 == 0o2010 {
            i.mode &= !0o2000;
        }
        Ok(data.len())
    }

    /// Writes `src` (file bytes from `lo`) into the whole blocks of `seg` stored at `dev`,
    /// zero-filling the rest of those blocks.
    fn write_whole_blocks(&self, dev: DevBlock, seg: &Segment, lo: u64, src: &[u8]) -> Result<()> {
        let (s, e) = seg_bytes(seg);
        if lo == s && src.len() as u64 == e - s {
            return Ok(self.dev.write_at(src, dev.byte_offset())?);
        }
        let mut buf = vec![0u8; (e - s) as usize];
        let at = (lo - s) as usize;
        buf[at..at + src.len()].copy_from_slice(src);
        Ok(self.dev.write_at(&buf, dev.byte_offset())?)
    }

    /// Allocates blocks for a hole segment, writes them whole, and maps them — as
    /// unwritten extents with nothing written when `unwritten` is set (fallocate).
    fn fill_hole(
        &self,
        map: &mut ExtentMap,
        alloc: &mut Allocator,
        seg: &Segment,
        lo: u64,
        src: &[u8],
        unwritten: bool,
    ) -> Result<()> {
        let runs = alloc.allocate(seg.len, map.goal_for(seg.file));
        if runs.is_empty() {
            return Err(FsError::NoSpace);
        }
        let mut file = seg.file.0;
        let mut failed = None;
        for run in &runs {
            let piece = Segment {
                file: FileBlock(file),
                len: run.len,
                backing: Backing::Hole,
            };
            if failed.is_none() && !unwritten {
                let (s, e) = seg_bytes(&piece);
                let src_end = lo + src.len() as u64;
                let (plo, phi) = (s.max(lo), e.min(src_end));
                let (at, bytes) = if plo < phi {
                    (plo, &src[(plo - lo) as usize..(phi - lo) as usize])
                } else {
                    (s, &[][..])
                };
                if let Err(err) = self.write_whole_blocks(run.start, &piece, at, bytes) {
                    failed = Some(err);
                }
            }
            if failed.is_none() {
                map.insert(Extent {
                    file: FileBlock(file),
                    dev: run.start,
                    len: run.len,
                    unwritten,
                });
            } else {
                // Never referenced by any metadata: safe to reuse at once.
                let _ = alloc.release(*run);
            }
            file += run.len;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Sets the size of a regular file, freeing blocks past the new end and zeroing the
    /// tail of a partial last block (so that growing the file again reads zeros).
    ///
    /// The tail is zeroed in a copy of that block, mapped in its place: zeroing it where it
    /// is would destroy committed bytes before the truncation itself is committed, and a
    /// crash in between would show the old size with zeros inside it. Only on a full
    /// device does it fall back to zeroing in place.
    pub(crate) fn truncate_locked(&self, st: &mut State, ino: Ino, size: u64) -> Result<()> {
        let State {
            inodes,
            alloc,
            dirty_inodes,
            pending_free,
            ..
        } = st;
        let i = inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
        dirty_inodes.insert(ino.0);
        if size >= i.size {
            i.size = size;
            return Ok(());
        }
        pending_free.extend(i.extents.remove(FileBlock(blocks_for(size)), u64::MAX));
        let tail = (size % BLOCK_SIZE) as usize;
        let last = FileBlock(size / BLOCK_SIZE);
        if tail != 0
            && let [seg] = i.extents.segments(last, 1)[..]
            && let Backing::Written(dev) = seg.backing
        {
            let mut block = vec![0u8; BLOCK_SIZE as usize];
            self.dev.read_at(&mut block[..tail], dev.byte_offset())?;
            match alloc.allocate(1, Some(dev))[..] {
                [copy] => {
                    if let Err(e) = self.dev.write_at(&block, copy.start.byte_offset()) {
                        let _ = alloc.release(copy);
                        return Err(e.into());
                    }
                    pending_free.extend(i.extents.remove(last, 1));
                    i.extents.insert(Extent {
                        file: last,
                        dev: copy.start,
                        len: 1,
                        unwritten: false,
                    });
                }
                _ => self
                    .dev
                    .write_at(&block[tail..], dev.byte_offset() + tail as u64)?,
            }
        }
        i.size = size;
        Ok(())
    }

    /// Zeros `[lo, hi)` of the file in place where it is written (edges of a punched range).
    fn zero_in_place(&self, map: &ExtentMap, lo: u64, hi: u64) -> Result<()> {
        if lo >= hi {
            return Ok(());
        }
        let first = lo / BLOCK_SIZE;
        for seg in map.segments(FileBlock(first), blocks_for(hi) - first) {
            if let Backing::Written(dev) = seg.backing {
                let (s, e) = seg_bytes(&seg);
                let (a, b) = (s.max(lo), e.min(hi));
                self.dev
                    .write_at(&vec![0u8; (b - a) as usize], dev.byte_offset() + (a - s))?;
            }
        }
        Ok(())
    }

    /// fallocate(2): preallocate (mode 0 or KEEP_SIZE), PUNCH_HOLE, or ZERO_RANGE.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: u32) -> Result<()> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        let supported = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(FsError::Unsupported("fallocate mode"));
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(FsError::Unsupported("PUNCH_HOLE requires KEEP_SIZE"));
        }
        if len == 0 {
            return Err(FsError::Invalid("fallocate length is zero"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        self.retry_on_space(|| {
            let mut st = lock_write(&self.state);
            self.fallocate_locked(&mut st, ino, offset, end, mode)
        })
    }

    fn fallocate_locked(
        &self,
        st: &mut State,
        ino: Ino,
        offset: u64,
        end: u64,
        mode: u32,
    ) -> Result<()> {
        let State {
            inodes,
            alloc,
            dirty_inodes,
            pending_free,
            ..
        } = st;
        let i = inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
        regular(i)?;
        dirty_inodes.insert(ino.0);
        let now = Timestamp::now();
        // Whole blocks inside the range; partial edge blocks are zeroed in place.
        let (full_lo, full_hi) = (blocks_for(offset), end / BLOCK_SIZE);
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            if full_lo < full_hi {
                self.zero_in_place(&i.extents, offset, full_lo * BLOCK_SIZE)?;
                self.zero_in_place(&i.extents, full_hi * BLOCK_SIZE, end)?;
                pending_free.extend(i.extents.remove(FileBlock(full_lo), full_hi - full_lo));
            } else {
                self.zero_in_place(&i.extents, offset, end)?;
            }
            i.mtime = now;
            i.ctime = now;
        }
        if mode & FALLOC_FL_PUNCH_HOLE == 0 {
            let first = offset / BLOCK_SIZE;
            let segs = i
                .extents
                .segments(FileBlock(first), blocks_for(end) - first);
            ensure_space(&segs, alloc)?;
            for seg in segs.iter().filter(|s| s.backing == Backing::Hole) {
                self.fill_hole(
                    &mut i.extents,
                    alloc,
                    seg,
                    seg.file.0 * BLOCK_SIZE,
                    &[],
                    true,
                )?;
            }
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end > i.size {
                i.size = end;
                i.mtime = now;
            }
            i.ctime = now;
        }
        Ok(())
    }

    /// lseek(2) with SEEK_DATA or SEEK_HOLE. Unwritten extents count as holes.
    pub fn lseek(&self, ino: Ino, offset: u64, whence: u32) -> Result<u64> {
        let st = lock_read(&self.state);
        let i = st.get(ino)?;
        regular(i)?;
        if offset >= i.size {
            return Err(FsError::NoData);
        }
        let blk = FileBlock(offset / BLOCK_SIZE);
        match whence {
            SEEK_DATA => {
                let at = i.extents.next_data(blk).ok_or(FsError::NoData)?;
                let pos = offset.max(at.0 * BLOCK_SIZE);
                if pos >= i.size {
                    Err(FsError::NoData)
                } else {
                    Ok(pos)
                }
            }
            SEEK_HOLE => Ok(offset
                .max(i.extents.next_hole(blk).0 * BLOCK_SIZE)
                .min(i.size)),
            _ => Err(FsError::Invalid("whence")),
        }
    }

    /// Calls `f` with a regular file's data where it lies on the device, for code that
    /// works on it in place (offload). The file's extents stay as they are until `f`
    /// returns: writers wait, and with `exclusive` so does everyone else, which makes a
    /// read-modify-write in `f` atomic with respect to `write()` and other such calls.
    /// `f` returns whether it wrote file bytes (only allowed when `exclusive`, and only
    /// within written extents); if so the file's mtime and ctime are updated.
    pub fn in_place<R>(
        &self,
        ino: Ino,
        exclusive: bool,
        f: impl FnOnce(&InPlace<'_>) -> (R, bool),
    ) -> Result<R> {
        if exclusive {
            if self.opts.read_only {
                return Err(FsError::ReadOnly);
            }
            let mut st = lock_write(&self.state);
            let (r, wrote) = {
                let i = st.get(ino)?;
                regular(i)?;
                f(&InPlace {
                    device: self.dev.as_ref(),
                    extents: i.extents.extents(),
                    size: i.size,
                })
            };
            if wrote {
                let now = Timestamp::now();
                let i = st.inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
                i.mtime = now;
                i.ctime = now;
                st.dirty_inodes.insert(ino.0);
            }
            Ok(r)
        } else {
            let st = lock_read(&self.state);
            let i = st.get(ino)?;
            regular(i)?;
            let (r, _) = f(&InPlace {
                device: self.dev.as_ref(),
                extents: i.extents.extents(),
                size: i.size,
            });
            Ok(r)
        }
    }

    /// The extents of a file, in file order.
    pub fn extents(&self, ino: Ino) -> Result<Vec<Extent>> {
        let st = lock_read(&self.state);
        Ok(st.get(ino)?.extents.extents())
    }

    /// Makes `ino`'s data and metadata durable. nearfs commits the whole filesystem, which
    /// includes that file.
    pub fn fsync(&self, _ino: Ino) -> Result<()> {
        self.commit()
    }
}
