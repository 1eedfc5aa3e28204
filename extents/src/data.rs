//! File data: reads, writes, truncation, fallocate and SEEK_DATA/SEEK_HOLE.
//!
//! Blocks that come newly into a file (holes being filled, unwritten extents being
//! written) are always written whole, with zeros around the caller's bytes, so that no
//! byte a block held for an earlier owner can ever be read through this file.
//!
//! Every operation here holds the file's I/O lock across its device I/O and takes the
//! table lock only to look or to change metadata, before or after that I/O (`state.rs`):
//! it plans under the table lock (fresh blocks are allocated then), does the I/O with
//! only the file's lock held, and applies the change under the table lock again. Fresh
//! blocks are mapped only after their bytes are written, so a commit in between captures
//! the file as it was.

use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use blockdev::AlignedBuf;

use crate::access::Creds;
use crate::alloc::{Allocator, Run};
use crate::error::{FsError, Result};
use crate::extent_map::{Backing, ExtentMap, Segment};
use crate::filesystem::Fs;
use crate::format::{Extent, S_IFMT, S_IFREG, Timestamp};
use crate::state::{Inode, IoLock, State};
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

/// Allocates fresh blocks for each hole among `segs` (none for the others), all or
/// nothing: NoSpace, with nothing allocated, unless every hole can be filled.
fn allocate_holes(
    segs: Vec<Segment>,
    map: &ExtentMap,
    alloc: &mut Allocator,
) -> Result<Vec<(Segment, Vec<Run>)>> {
    let need: u64 = segs
        .iter()
        .filter(|s| s.backing == Backing::Hole)
        .map(|s| s.len)
        .sum();
    if need > alloc.free_blocks() {
        return Err(FsError::NoSpace);
    }
    let mut plan = Vec::with_capacity(segs.len());
    // Each hole continues where the previous one's blocks ended, as it will in the map.
    let mut goal = None;
    for seg in segs {
        let runs = if seg.backing == Backing::Hole {
            let runs = alloc.allocate(seg.len, goal.or_else(|| map.goal_for(seg.file)));
            if runs.is_empty() {
                release_all(alloc, &plan);
                return Err(FsError::NoSpace);
            }
            goal = runs.last().map(|r| DevBlock(r.start.0 + r.len));
            runs
        } else {
            Vec::new()
        };
        plan.push((seg, runs));
    }
    Ok(plan)
}

/// Gives back the fresh blocks of a plan that was not applied: no metadata refers to
/// them, so they are free at once.
fn release_all(alloc: &mut Allocator, plan: &[(Segment, Vec<Run>)]) {
    for run in plan.iter().flat_map(|(_, runs)| runs) {
        let _ = alloc.release(*run);
    }
}

/// Maps fresh `runs` as the file's blocks from `file` on.
fn map_fresh(map: &mut ExtentMap, file: FileBlock, runs: &[Run], unwritten: bool) {
    let mut at = file.0;
    for run in runs {
        map.insert(Extent {
            file: FileBlock(at),
            dev: run.start,
            len: run.len,
            unwritten,
        });
        at += run.len;
    }
}

/// The device byte ranges holding the written bytes `[lo, hi)` of a file.
fn written_ranges(map: &ExtentMap, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    if lo >= hi {
        return Vec::new();
    }
    let first = lo / BLOCK_SIZE;
    map.segments(FileBlock(first), blocks_for(hi) - first)
        .iter()
        .filter_map(|seg| {
            let Backing::Written(dev) = seg.backing else {
                return None;
            };
            let (s, e) = seg_bytes(seg);
            let (a, b) = (s.max(lo), e.min(hi));
            Some((dev.byte_offset() + (a - s), b - a))
        })
        .collect()
}

/// Shares a file's I/O lock (see `state.rs`). The lock guards no data, so a panic of an
/// earlier holder does not matter.
pub(crate) fn shared(io: &IoLock) -> RwLockReadGuard<'_, ()> {
    io.read().unwrap_or_else(|e| e.into_inner())
}

/// Holds a file's I/O lock alone.
pub(crate) fn exclusive(io: &IoLock) -> RwLockWriteGuard<'_, ()> {
    io.write().unwrap_or_else(|e| e.into_inner())
}

/// How a truncation treats the file's partial last block (see [`Fs::prepare_truncate`]).
/// A copy must be mapped or given back ([`Fs::truncate_locked`], [`Tail::release`]).
#[derive(Debug)]
#[must_use]
pub(crate) enum Tail {
    /// Nothing to map: the new size is on a block boundary, in a hole, or not smaller.
    Keep,
    /// A fresh block holding the bytes before the new size and zeros after, to map in
    /// place of the old one.
    Copy(Run),
}

impl Tail {
    /// Gives back a prepared copy that will not be mapped: nothing refers to it.
    pub(crate) fn release(self, alloc: &mut Allocator) {
        if let Tail::Copy(run) = self {
            let _ = alloc.release(run);
        }
    }
}

impl Fs {
    /// Reads up to `len` bytes at `offset`; short only at end of file.
    pub fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Vec<u8>> {
        let mut buf = AlignedBuf::new(0);
        let at = self.read_into(ino, offset, len, &mut buf)?;
        Ok(buf[at].to_vec())
    }

    /// [`Fs::read`] into `buf`, grown as needed, returning where in it the bytes are. The
    /// blocks they lie in are read whole into the aligned buffer, so that a device opened
    /// with O_DIRECT reads straight into it (no bounce buffer); a caller that keeps `buf`
    /// for its next read allocates nothing and faults no page in.
    pub fn read_into(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
        buf: &mut AlignedBuf,
    ) -> Result<std::ops::Range<usize>> {
        let io = self.table().io(ino)?;
        // Held across the device reads: the blocks read cannot be freed meanwhile.
        let _reading = shared(&io);
        let (segs, end) = {
            let st = self.table();
            let i = st.get(ino)?;
            regular(i)?;
            if offset >= i.size {
                return Ok(0..0);
            }
            let end = i.size.min(offset.saturating_add(u64::from(len)));
            let first = offset / BLOCK_SIZE;
            let segs = i
                .extents
                .segments(FileBlock(first), blocks_for(end) - first);
            (segs, end)
        };
        let first = offset / BLOCK_SIZE * BLOCK_SIZE;
        let need = (blocks_for(end) * BLOCK_SIZE - first) as usize;
        if buf.len() < need {
            *buf = AlignedBuf::new(need);
        }
        // A kept buffer holds an earlier read's bytes, maybe of another file: every byte
        // handed back is read here or zeroed here, whatever the segments cover.
        let mut done = first;
        for seg in segs {
            let (s, e) = seg_bytes(&seg);
            buf[(done - first) as usize..(s.max(done) - first) as usize].fill(0);
            let part = &mut buf[(s - first) as usize..(e - first) as usize];
            match seg.backing {
                Backing::Written(dev) => self.dev.read_at(part, dev.byte_offset())?,
                Backing::Unwritten(_) | Backing::Hole => part.fill(0),
            }
            done = done.max(e);
        }
        buf[(done - first) as usize..need].fill(0);
        Ok((offset - first) as usize..(end - first) as usize)
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
            let io = self.table().io(ino)?;
            let _writing = exclusive(&io);
            self.write_exclusive(cr, ino, offset, data)
        })
    }

    /// [`Fs::write`] with the file's I/O lock held exclusively.
    fn write_exclusive(&self, cr: &Creds, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset + data.len() as u64;
        let plan = {
            let mut st = self.table_mut()?;
            let State { inodes, alloc, .. } = &mut *st;
            let i = inodes.get(&ino.0).ok_or(FsError::NotFound)?;
            regular(i)?;
            let first = offset / BLOCK_SIZE;
            let segs = i
                .extents
                .segments(FileBlock(first), blocks_for(end) - first);
            allocate_holes(segs, &i.extents, alloc)?
        };
        let written = self.write_planned(&plan, offset, data);
        let mut st = self.table_mut()?;
        let State {
            inodes,
            alloc,
            dirty_inodes,
            ..
        } = &mut *st;
        let i = match (written, inodes.get_mut(&ino.0)) {
            (Ok(()), Some(i)) => i,
            (Err(e), _) => {
                release_all(alloc, &plan);
                return Err(e);
            }
            // Deleted meanwhile (possible only without an open handle): nothing to map.
            (Ok(()), None) => {
                release_all(alloc, &plan);
                return Err(FsError::NotFound);
            }
        };
        for (seg, runs) in &plan {
            match seg.backing {
                Backing::Written(_) => {}
                Backing::Unwritten(_) => i.extents.mark_written(seg.file, seg.len),
                Backing::Hole => map_fresh(&mut i.extents, seg.file, runs, false),
            }
        }
        dirty_inodes.insert(ino.0);
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

    /// The device writes of a planned write: over written blocks in place, into unwritten
    /// and fresh blocks whole.
    fn write_planned(&self, plan: &[(Segment, Vec<Run>)], offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        for (seg, runs) in plan {
            let (s, e) = seg_bytes(seg);
            let (lo, hi) = (s.max(offset), e.min(end));
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            match seg.backing {
                Backing::Written(dev) => self.dev.write_at(src, dev.byte_offset() + (lo - s))?,
                Backing::Unwritten(dev) => self.write_whole_blocks(dev, seg, lo, src)?,
                Backing::Hole => self.write_fresh(seg.file, runs, lo, src)?,
            }
        }
        Ok(())
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

    /// Writes `src` (file bytes from `lo`) whole into fresh `runs`, which are to hold the
    /// file's blocks from `file` on.
    fn write_fresh(&self, file: FileBlock, runs: &[Run], lo: u64, src: &[u8]) -> Result<()> {
        let src_end = lo + src.len() as u64;
        let mut at = file.0;
        for run in runs {
            let piece = Segment {
                file: FileBlock(at),
                len: run.len,
                backing: Backing::Hole,
            };
            let (s, e) = seg_bytes(&piece);
            let (plo, phi) = (s.max(lo), e.min(src_end));
            let (from, bytes) = if plo < phi {
                (plo, &src[(plo - lo) as usize..(phi - lo) as usize])
            } else {
                (s, &[][..])
            };
            self.write_whole_blocks(run.start, &piece, from, bytes)?;
            at += run.len;
        }
        Ok(())
    }

    /// The device work of truncating `ino` to `size`, done before the truncation is
    /// applied, with the file's I/O lock held exclusively.
    ///
    /// The tail of a partial last block is zeroed in a copy of that block, mapped in its
    /// place by [`Fs::truncate_locked`]: zeroing it where it is would destroy committed
    /// bytes before the truncation itself is committed, and a crash in between would show
    /// the old size with zeros inside it. Zeroing in place after applying it could let a
    /// commit make the new size durable before the zeros, and a crash then show the old
    /// bytes when the file grows again. So without a free block the truncation fails with
    /// `NoSpace`, having changed nothing (the caller commits pending frees and retries).
    pub(crate) fn prepare_truncate(&self, ino: Ino, size: u64) -> Result<Tail> {
        let tail = size % BLOCK_SIZE;
        let dev = {
            let st = self.table();
            let i = st.get(ino)?;
            if size >= i.size || tail == 0 {
                return Ok(Tail::Keep);
            }
            match i.extents.segments(FileBlock(size / BLOCK_SIZE), 1)[..] {
                [
                    Segment {
                        backing: Backing::Written(dev),
                        ..
                    },
                ] => dev,
                _ => return Ok(Tail::Keep),
            }
        };
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        self.dev
            .read_at(&mut block[..tail as usize], dev.byte_offset())?;
        let copy = self.table_mut()?.alloc.allocate(1, Some(dev));
        let [copy] = copy[..] else {
            return Err(FsError::NoSpace);
        };
        match self.dev.write_at(&block, copy.start.byte_offset()) {
            Ok(()) => Ok(Tail::Copy(copy)),
            Err(e) => {
                if let Ok(mut st) = self.table_mut() {
                    Tail::Copy(copy).release(&mut st.alloc);
                }
                Err(e.into())
            }
        }
    }

    /// Sets the size of a regular file, freeing blocks past the new end and mapping the
    /// prepared copy of a partial last block ([`Fs::prepare_truncate`]); a copy it cannot
    /// map is given back.
    pub(crate) fn truncate_locked(
        &self,
        st: &mut State,
        ino: Ino,
        size: u64,
        tail: Tail,
    ) -> Result<()> {
        let State {
            inodes,
            alloc,
            dirty_inodes,
            pending_free,
            ..
        } = st;
        let Some(i) = inodes.get_mut(&ino.0) else {
            tail.release(alloc);
            return Err(FsError::NotFound);
        };
        dirty_inodes.insert(ino.0);
        if size < i.size {
            pending_free
                .runs
                .extend(i.extents.remove(FileBlock(blocks_for(size)), u64::MAX));
        }
        match tail {
            Tail::Copy(copy) if size < i.size => {
                let last = FileBlock(size / BLOCK_SIZE);
                pending_free.runs.extend(i.extents.remove(last, 1));
                map_fresh(&mut i.extents, last, &[copy], false);
            }
            other => other.release(alloc),
        }
        i.size = size;
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
            let io = self.table().io(ino)?;
            let _writing = exclusive(&io);
            self.fallocate_exclusive(ino, offset, end, mode)
        })
    }

    /// [`Fs::fallocate`] with the file's I/O lock held exclusively.
    fn fallocate_exclusive(&self, ino: Ino, offset: u64, end: u64, mode: u32) -> Result<()> {
        let zeroing = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0;
        // Whole blocks inside the range are unmapped; partial edge blocks are zeroed in
        // place, first.
        let (full_lo, full_hi) = (blocks_for(offset), end / BLOCK_SIZE);
        let edges = {
            let st = self.table();
            let i = st.get(ino)?;
            regular(i)?;
            match (zeroing, full_lo < full_hi) {
                (false, _) => Vec::new(),
                (true, true) => [
                    written_ranges(&i.extents, offset, full_lo * BLOCK_SIZE),
                    written_ranges(&i.extents, full_hi * BLOCK_SIZE, end),
                ]
                .concat(),
                (true, false) => written_ranges(&i.extents, offset, end),
            }
        };
        for (at, len) in edges {
            self.dev.write_at(&vec![0u8; len as usize], at)?;
        }
        let mut st = self.table_mut()?;
        let State {
            inodes,
            alloc,
            dirty_inodes,
            pending_free,
            ..
        } = &mut *st;
        let i = inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
        dirty_inodes.insert(ino.0);
        let now = Timestamp::now();
        if zeroing {
            if full_lo < full_hi {
                pending_free
                    .runs
                    .extend(i.extents.remove(FileBlock(full_lo), full_hi - full_lo));
            }
            i.mtime = now;
            i.ctime = now;
        }
        if mode & FALLOC_FL_PUNCH_HOLE == 0 {
            let first = offset / BLOCK_SIZE;
            let segs = i
                .extents
                .segments(FileBlock(first), blocks_for(end) - first);
            for (seg, runs) in allocate_holes(segs, &i.extents, alloc)? {
                if seg.backing == Backing::Hole {
                    map_fresh(&mut i.extents, seg.file, &runs, true);
                }
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
        let st = self.table();
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
    /// returns: writers of the file wait, and with `exclusive` so do its readers, which
    /// makes a read-modify-write in `f` atomic with respect to `write()` and other such
    /// calls. Other files are not held up. `f` returns whether it wrote file bytes (only
    /// allowed when `exclusive`, and only within written extents); if so the file's mtime
    /// and ctime are updated.
    pub fn in_place<R>(
        &self,
        ino: Ino,
        exclusive: bool,
        f: impl FnOnce(&InPlace<'_>) -> (R, bool),
    ) -> Result<R> {
        if exclusive && self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        let io = self.table().io(ino)?;
        let (_writing, _reading);
        if exclusive {
            _writing = self::exclusive(&io);
        } else {
            _reading = shared(&io);
        }
        let (extents, size) = {
            let st = self.table();
            let i = st.get(ino)?;
            regular(i)?;
            (i.extents.extents(), i.size)
        };
        let (r, wrote) = f(&InPlace {
            device: self.dev.as_ref(),
            extents,
            size,
        });
        // The writes are made: `r` says so whatever happens to the times (a file deleted
        // meanwhile has none to update; a halted filesystem keeps no more changes).
        if wrote
            && exclusive
            && let Ok(mut st) = self.table_mut()
            && let Ok(i) = st.get_mut(ino)
        {
            let now = Timestamp::now();
            i.mtime = now;
            i.ctime = now;
        }
        Ok(r)
    }

    /// The extents of a file, in file order.
    pub fn extents(&self, ino: Ino) -> Result<Vec<Extent>> {
        let st = self.table();
        Ok(st.get(ino)?.extents.extents())
    }

    /// Makes `ino`'s data and metadata durable. nearfs commits the whole filesystem, which
    /// includes that file.
    pub fn fsync(&self, _ino: Ino) -> Result<()> {
        self.commit()
    }
}
