//! Namespace and attribute operations with POSIX semantics.

use std::sync::atomic::Ordering;

use crate::access::{self, Creds, MAY_EXEC, MAY_READ, MAY_WRITE};
use crate::error::{FsError, Result};
use crate::filesystem::Fs;
use crate::format::{
    InodeAttrs, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, Timestamp,
};
use crate::state::{FIRST_COOKIE, Inode, State};
use crate::types::{BLOCK_SIZE, Ino};

/// Longest file name, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes.
pub const SYMLINK_MAX: usize = 4095;
/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65_000;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;

/// Kind of file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
    Symlink,
    NamedPipe,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// The kind encoded in `mode`'s type bits.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & S_IFMT {
            S_IFDIR => Self::Directory,
            S_IFREG => Self::RegularFile,
            S_IFLNK => Self::Symlink,
            S_IFIFO => Self::NamedPipe,
            S_IFSOCK => Self::Socket,
            S_IFCHR => Self::CharDevice,
            S_IFBLK => Self::BlockDevice,
            _ => return None,
        })
    }
}

/// Attributes of an inode, as `stat(2)` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Allocated space in 512-byte units.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
    pub generation: u64,
}

/// A time to set: the current time, or a given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Changes requested by setattr; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
    /// The change comes through an open handle (ftruncate): the handle's mode, checked
    /// when it was opened, replaces the write-permission check.
    pub via_handle: bool,
}

impl SetAttr {
    fn changes_anything(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.size.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
            || self.ctime.is_some()
    }
}

/// Flags of rename.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with `Exists` instead of replacing the target.
    pub noreplace: bool,
    /// Swap source and target, both of which must exist.
    pub exchange: bool,
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub read: bool,
    pub write: bool,
}

/// One directory entry returned by readdir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: FileKind,
    pub name: Vec<u8>,
    /// Pass this offset to continue after this entry.
    pub next: u64,
}

/// Filesystem usage, as `statfs(2)` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid("file name"));
    }
    Ok(())
}

/// The one conversion from an inode to what `stat(2)` shows.
pub(crate) fn attr_of(ino: Ino, i: &Inode) -> Attr {
    let a = &i.attrs;
    Attr {
        ino,
        kind: FileKind::from_mode(a.mode).unwrap_or(FileKind::RegularFile),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        blocks: i.extents.allocated_blocks() * (BLOCK_SIZE / 512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.crtime,
        rdev: a.rdev,
        generation: a.generation,
    }
}

fn require(cond: bool, err: FsError) -> Result<()> {
    if cond { Ok(()) } else { Err(err) }
}

fn may(cr: &Creds, i: &Inode, want: u32) -> Result<()> {
    require(access::permits(cr, i.owner(), want), FsError::AccessDenied)
}

fn may_delete(cr: &Creds, dir: &Inode, victim: &Inode) -> Result<()> {
    access::may_delete(cr, dir.owner(), victim.owner()).map_err(|eacces| {
        if eacces {
            FsError::AccessDenied
        } else {
            FsError::NotPermitted
        }
    })
}

/// Updates a directory's mtime and ctime after its entries changed.
fn touch_dir(st: &mut State, dir: Ino, now: Timestamp) -> Result<()> {
    let d = st.get_mut(dir)?;
    d.mtime = now;
    d.ctime = now;
    Ok(())
}

/// What a setattr may change, checked before anything is: the attributes it sets (mode
/// with the set-ID bits it keeps, owner, group).
struct Allowed {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Checks `req` against `i` for `cr`, so that a refused request changes nothing.
fn setattr_allowed(cr: &Creds, i: &Inode, req: &SetAttr) -> Result<Allowed> {
    let owner = access::is_owner(cr, i.owner());
    let mut mode = i.mode;
    if let Some(m) = req.mode {
        require(owner, FsError::NotPermitted)?;
        mode = (i.mode & S_IFMT) | (m & 0o7777);
        let gid = req.gid.unwrap_or(i.gid);
        if !cr.is_root() && !cr.in_group(gid) {
            mode &= !S_ISGID;
        }
    }
    let (uid, gid) = (req.uid.unwrap_or(i.uid), req.gid.unwrap_or(i.gid));
    if req.uid.is_some() || req.gid.is_some() {
        if !cr.is_root() {
            require(cr.uid == i.uid, FsError::NotPermitted)?;
            require(uid == i.uid, FsError::NotPermitted)?;
            require(gid == i.gid || cr.in_group(gid), FsError::NotPermitted)?;
        }
        if !i.is_dir() {
            mode &= !S_ISUID;
            if mode & 0o010 != 0 {
                mode &= !S_ISGID;
            }
        }
    }
    if let Some(size) = req.size {
        require(!i.is_dir(), FsError::IsDir)?;
        require(
            i.mode & S_IFMT == S_IFREG,
            FsError::Invalid("truncate of a special file"),
        )?;
        require(size <= crate::types::MAX_FILE_SIZE, FsError::FileTooBig)?;
        if !req.via_handle {
            may(cr, i, MAY_WRITE)?;
        }
    }
    for t in [req.atime, req.mtime].into_iter().flatten() {
        match t {
            TimeSet::At(_) => require(owner, FsError::NotPermitted)?,
            TimeSet::Now => {
                if !owner {
                    may(cr, i, MAY_WRITE)?;
                }
            }
        }
    }
    Ok(Allowed { mode, uid, gid })
}

/// Sets what `req` asks of `ino` (apart from the size, which truncation sets), as
/// [`setattr_allowed`] allowed it.
fn apply_setattr(st: &mut State, ino: Ino, req: &SetAttr, allowed: Allowed) -> Result<Attr> {
    let now = Timestamp::now();
    let i = st.get_mut(ino)?;
    i.mode = allowed.mode;
    i.uid = allowed.uid;
    i.gid = allowed.gid;
    let resolve = |t: TimeSet| match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    };
    if let Some(t) = req.atime {
        i.atime = resolve(t);
    }
    if let Some(t) = req.mtime {
        i.mtime = resolve(t);
    }
    if req.size.is_some() && req.mtime.is_none() {
        i.mtime = now;
    }
    if req.changes_anything() {
        i.ctime = req.ctime.unwrap_or(now);
    }
    Ok(attr_of(ino, i))
}

impl Fs {
    fn writable(&self) -> Result<()> {
        require(!self.opts.read_only, FsError::ReadOnly)
    }

    /// Attributes for an entry reply; counts a kernel reference when those are tracked.
    fn entry(&self, st: &State, ino: Ino) -> Result<Attr> {
        let i = st.get(ino)?;
        if self.opts.kernel_refs {
            i.refs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(attr_of(ino, i))
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, cr: &Creds, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let st = self.table();
        let p = st.get(parent)?;
        let dir = p.dir.as_ref().ok_or(FsError::NotDir)?;
        may(cr, p, MAY_EXEC)?;
        let child = match name {
            b"." => parent,
            b".." => Ino(p.parent),
            _ => Ino(dir.entries.get(name).ok_or(FsError::NotFound)?.0),
        };
        self.entry(&st, child)
    }

    /// Whether the kernel holds references to `ino` (never, when they are not counted).
    pub fn referenced_by_kernel(&self, ino: Ino) -> bool {
        self.table()
            .inodes
            .get(&ino.0)
            .is_some_and(|i| i.refs.load(Ordering::Relaxed) > 0)
    }

    /// Drops `n` kernel references to `ino` (FUSE forget).
    pub fn forget(&self, ino: Ino, n: u64) {
        let (unreferenced, unlinked) = {
            let st = self.table();
            let Some(i) = st.inodes.get(&ino.0) else {
                return;
            };
            let before = i
                .refs
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(n))
                })
                .unwrap_or(0);
            (before <= n, i.nlink == 0)
        };
        if unreferenced
            && unlinked
            && let Ok(mut st) = self.table_mut()
        {
            st.reap(ino);
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let st = self.table();
        Ok(attr_of(ino, st.get(ino)?))
    }

    /// Checks `mask` (MAY_* bits; 0 only checks existence) for `cr`.
    pub fn access(&self, cr: &Creds, ino: Ino, mask: u32) -> Result<()> {
        let st = self.table();
        let i = st.get(ino)?;
        if mask & MAY_WRITE != 0 && self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        may(cr, i, mask)
    }

    /// Creates an inode of any kind named `name` in `parent`.
    fn make(
        &self,
        cr: &Creds,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: &[u8],
    ) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        let kind = FileKind::from_mode(mode).ok_or(FsError::Invalid("file type"))?;
        if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) && !cr.is_root() {
            return Err(FsError::NotPermitted);
        }
        let now = Timestamp::now();
        let mut st = self.table_mut()?;
        let p = st.get(parent)?;
        let dir = p.dir.as_ref().ok_or(FsError::NotDir)?;
        may(cr, p, MAY_WRITE | MAY_EXEC)?;
        require(!dir.entries.contains_key(name), FsError::Exists)?;
        if p.nlink == 0 {
            return Err(FsError::NotFound); // a removed directory takes no new entries
        }
        let is_dir = kind == FileKind::Directory;
        if is_dir && p.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let setgid_parent = p.mode & S_ISGID != 0;
        let gid = if setgid_parent { p.gid } else { cr.gid };
        let mut mode = mode;
        if setgid_parent && is_dir {
            mode |= S_ISGID;
        } else if mode & S_ISGID != 0 && !cr.is_root() && !cr.in_group(gid) {
            mode &= !S_ISGID;
        }
        let ino = Ino(st.next_ino);
        st.next_ino += 1;
        let generation = st.next_generation;
        st.next_generation += 1;
        let mut attrs = InodeAttrs::new(
            mode,
            cr.uid,
            gid,
            if is_dir { 2 } else { 1 },
            generation,
            if is_dir { parent.0 } else { 0 },
            now,
        );
        attrs.size = target.len() as u64;
        attrs.rdev = rdev;
        let inode = Inode::new(attrs, target.to_vec());
        st.inodes.insert(ino.0, inode);
        st.dirty_inodes.insert(ino.0);
        st.add_entry(parent, name, ino)?;
        if is_dir {
            st.get_mut(parent)?.nlink += 1;
        }
        touch_dir(&mut st, parent, now)?;
        self.entry(&st, ino)
    }

    /// Creates a regular file, FIFO, socket or device node. `mode` carries the type bits
    /// (none means a regular file) and the permission bits after the umask.
    pub fn mknod(
        &self,
        cr: &Creds,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let mode = if mode & S_IFMT == 0 {
            mode | S_IFREG
        } else {
            mode
        };
        if FileKind::from_mode(mode) == Some(FileKind::Directory) {
            return Err(FsError::Invalid("mknod cannot make directories"));
        }
        self.retry_on_space(|| self.make(cr, parent, name, mode, rdev, b""))
    }

    /// Creates and opens a regular file.
    pub fn create(&self, cr: &Creds, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        let attr = self.mknod(cr, parent, name, S_IFREG | (mode & 0o7777), 0)?;
        let mut st = self.table_mut()?;
        st.inodes
            .get_mut(&attr.ino.0)
            .ok_or(FsError::Dangling(attr.ino))?
            .open += 1;
        Ok(attr)
    }

    /// Creates a directory.
    pub fn mkdir(&self, cr: &Creds, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        self.make(cr, parent, name, S_IFDIR | (mode & 0o7777), 0, b"")
    }

    /// Creates a symbolic link to `target`.
    pub fn symlink(&self, cr: &Creds, parent: Ino, name: &[u8], target: &[u8]) -> Result<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        if target.is_empty() || target.contains(&0) {
            return Err(FsError::NotFound);
        }
        self.make(cr, parent, name, S_IFLNK | 0o777, 0, target)
    }

    /// Target of a symbolic link.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let st = self.table();
        let i = st.get(ino)?;
        require(i.mode & S_IFMT == S_IFLNK, FsError::WrongKind)?;
        Ok(i.target.clone())
    }

    /// Adds a hard link `newparent/newname` to `ino`.
    pub fn link(&self, cr: &Creds, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Attr> {
        self.writable()?;
        check_name(newname)?;
        let now = Timestamp::now();
        let mut st = self.table_mut()?;
        let i = st.get(ino)?;
        require(!i.is_dir(), FsError::NotPermitted)?;
        require(i.nlink > 0, FsError::NotFound)?;
        require(i.nlink < LINK_MAX, FsError::TooManyLinks)?;
        let p = st.get(newparent)?;
        let dir = p.dir.as_ref().ok_or(FsError::NotDir)?;
        may(cr, p, MAY_WRITE | MAY_EXEC)?;
        require(!dir.entries.contains_key(newname), FsError::Exists)?;
        st.add_entry(newparent, newname, ino)?;
        let i = st.get_mut(ino)?;
        i.nlink += 1;
        i.ctime = now;
        touch_dir(&mut st, newparent, now)?;
        self.entry(&st, ino)
    }

    /// Removes a non-directory entry.
    pub fn unlink(&self, cr: &Creds, parent: Ino, name: &[u8]) -> Result<()> {
        self.writable()?;
        let now = Timestamp::now();
        let mut st = self.table_mut()?;
        let p = st.get(parent)?;
        let child = st.child(parent, name)?;
        let c = st.get(child)?;
        require(!c.is_dir(), FsError::IsDir)?;
        may_delete(cr, p, c)?;
        st.remove_entry(parent, name)?;
        let c = st.get_mut(child)?;
        c.nlink = c.nlink.saturating_sub(1);
        c.ctime = now;
        touch_dir(&mut st, parent, now)?;
        st.reap(child);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, cr: &Creds, parent: Ino, name: &[u8]) -> Result<()> {
        self.writable()?;
        match name {
            b"." => return Err(FsError::Invalid("rmdir of \".\"")),
            b".." => return Err(FsError::NotEmpty),
            _ => {}
        }
        let now = Timestamp::now();
        let mut st = self.table_mut()?;
        let p = st.get(parent)?;
        let child = st.child(parent, name)?;
        let c = st.get(child)?;
        let cdir = c.dir.as_ref().ok_or(FsError::NotDir)?;
        require(cdir.entries.is_empty(), FsError::NotEmpty)?;
        may_delete(cr, p, c)?;
        st.remove_entry(parent, name)?;
        let c = st.get_mut(child)?;
        c.nlink = 0;
        c.ctime = now;
        let p = st.get_mut(parent)?;
        p.nlink = p.nlink.saturating_sub(1);
        touch_dir(&mut st, parent, now)?;
        st.reap(child);
        Ok(())
    }

    /// Whether `ino` is `ancestor` or lies below it.
    fn is_within(st: &State, mut ino: Ino, ancestor: Ino) -> bool {
        // Parent links form a tree rooted at ROOT; the bound guards against a damaged one.
        for _ in 0..=st.inodes.len() {
            if ino == ancestor {
                return true;
            }
            if ino == Ino::ROOT {
                return false;
            }
            match st.inodes.get(&ino.0) {
                Some(i) => ino = Ino(i.parent),
                None => return false,
            }
        }
        false
    }

    /// Renames `parent/name` to `newparent/newname` (rename(2) and renameat2(2) flags).
    pub fn rename(
        &self,
        cr: &Creds,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        self.writable()?;
        check_name(newname)?;
        if name == b"." || name == b".." {
            return Err(FsError::Invalid("rename of \".\" or \"..\""));
        }
        if flags.noreplace && flags.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        let now = Timestamp::now();
        let mut st = self.table_mut()?;
        let p = st.get(parent)?;
        let src = st.child(parent, name)?;
        let np = st.get(newparent)?;
        let dst = np
            .dir
            .as_ref()
            .ok_or(FsError::NotDir)?
            .entries
            .get(newname)
            .map(|e| Ino(e.0));
        may(cr, p, MAY_WRITE | MAY_EXEC)?;
        may(cr, np, MAY_WRITE | MAY_EXEC)?;
        let s = st.get(src)?;
        may_delete(cr, p, s)?;
        let src_dir = s.is_dir();
        if flags.exchange && dst.is_none() {
            return Err(FsError::NotFound);
        }
        if flags.noreplace && dst.is_some() {
            return Err(FsError::Exists);
        }
        if dst == Some(src) {
            return Ok(());
        }
        if src_dir && parent != newparent {
            require(
                !Self::is_within(&st, newparent, src),
                FsError::Invalid("directory into itself"),
            )?;
            may(cr, s, MAY_WRITE)?; // its ".." changes
        }
        let mut dst_dir = false;
        if let Some(d) = dst {
            let di = st.get(d)?;
            dst_dir = di.is_dir();
            may_delete(cr, np, di)?;
            if flags.exchange {
                if dst_dir && parent != newparent {
                    require(
                        !Self::is_within(&st, parent, d),
                        FsError::Invalid("directory into itself"),
                    )?;
                    may(cr, di, MAY_WRITE)?;
                }
            } else if src_dir {
                let dd = di.dir.as_ref().ok_or(FsError::NotDir)?;
                require(dd.entries.is_empty(), FsError::NotEmpty)?;
            } else {
                require(!dst_dir, FsError::IsDir)?;
            }
        }

        st.remove_entry(parent, name)?;
        if let Some(d) = dst {
            st.remove_entry(newparent, newname)?;
            if flags.exchange {
                st.add_entry(parent, name, d)?;
                if dst_dir && parent != newparent {
                    st.get_mut(d)?.parent = parent.0;
                    st.get_mut(parent)?.nlink += 1;
                    let np = st.get_mut(newparent)?;
                    np.nlink = np.nlink.saturating_sub(1);
                }
            } else {
                let di = st.get_mut(d)?;
                di.nlink = if dst_dir {
                    0
                } else {
                    di.nlink.saturating_sub(1)
                };
                if dst_dir {
                    let np = st.get_mut(newparent)?;
                    np.nlink = np.nlink.saturating_sub(1);
                }
            }
            st.get_mut(d)?.ctime = now;
        }
        st.add_entry(newparent, newname, src)?;
        if src_dir && parent != newparent {
            st.get_mut(src)?.parent = newparent.0;
            let p = st.get_mut(parent)?;
            p.nlink = p.nlink.saturating_sub(1);
            st.get_mut(newparent)?.nlink += 1;
        }
        st.get_mut(src)?.ctime = now;
        touch_dir(&mut st, parent, now)?;
        touch_dir(&mut st, newparent, now)?;
        if let Some(d) = dst
            && !flags.exchange
        {
            st.reap(d);
        }
        Ok(())
    }

    /// Changes attributes, enforcing who may change what.
    pub fn setattr(&self, cr: &Creds, ino: Ino, req: SetAttr) -> Result<Attr> {
        if req.changes_anything() {
            self.writable()?;
        }
        let Some(size) = req.size else {
            let mut st = self.table_mut()?;
            let allowed = setattr_allowed(cr, st.get(ino)?, &req)?;
            return apply_setattr(&mut st, ino, &req, allowed);
        };
        self.retry_on_space(|| self.resize(cr, ino, &req, size))
    }

    /// [`Fs::setattr`] with a size: the device work is done first, with only the file held.
    fn resize(&self, cr: &Creds, ino: Ino, req: &SetAttr, size: u64) -> Result<Attr> {
        let io = self.table().io(ino)?;
        let _writing = crate::data::exclusive(&io);
        setattr_allowed(cr, self.table().get(ino)?, req)?;
        let tail = self.prepare_truncate(ino, size)?;
        let mut st = self.table_mut()?;
        // Checked again under the lock that applies it; the prepared copy is mapped or
        // given back under it too, whatever the outcome.
        let allowed = match st.get(ino).and_then(|i| setattr_allowed(cr, i, req)) {
            Ok(allowed) => allowed,
            Err(e) => {
                tail.release(&mut st.alloc);
                return Err(e);
            }
        };
        self.truncate_locked(&mut st, ino, size, tail)?;
        apply_setattr(&mut st, ino, req, allowed)
    }

    /// Checks that `cr` may open `ino` with `mode` and counts the open handle.
    pub fn open(&self, cr: &Creds, ino: Ino, mode: OpenMode) -> Result<Attr> {
        let mut st = self.table_mut()?;
        let i = st.inodes.get_mut(&ino.0).ok_or(FsError::NotFound)?;
        if mode.write {
            require(!i.is_dir(), FsError::IsDir)?;
            require(!self.opts.read_only, FsError::ReadOnly)?;
        }
        let want = if mode.read { MAY_READ } else { 0 } | if mode.write { MAY_WRITE } else { 0 };
        may(cr, i, want)?;
        i.open += 1;
        Ok(attr_of(ino, i))
    }

    /// Drops an open handle; an unlinked file is freed with its last handle.
    pub fn release(&self, ino: Ino) {
        let Ok(mut st) = self.table_mut() else {
            return;
        };
        if let Some(i) = st.inodes.get_mut(&ino.0) {
            i.open = i.open.saturating_sub(1);
        }
        st.reap(ino);
    }

    /// Checks that `cr` may list directory `ino`.
    pub fn opendir(&self, cr: &Creds, ino: Ino) -> Result<()> {
        let st = self.table();
        let i = st.get(ino)?;
        require(i.is_dir(), FsError::NotDir)?;
        may(cr, i, MAY_READ)
    }

    /// Up to `max` entries of directory `ino` after `offset` (0 starts at the beginning;
    /// then each entry's `next`). "." and ".." come first. Entries added or removed during
    /// a listing do not make it skip or repeat others.
    pub fn readdir(&self, ino: Ino, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let st = self.table();
        let i = st.get(ino)?;
        let dir = i.dir.as_ref().ok_or(FsError::NotDir)?;
        let mut out = Vec::new();
        let dots = [(b".".as_slice(), ino), (b"..".as_slice(), Ino(i.parent))];
        for (cookie, (name, target)) in dots.into_iter().enumerate() {
            if offset <= cookie as u64 && out.len() < max {
                out.push(DirEntry {
                    ino: target,
                    kind: FileKind::Directory,
                    name: name.to_vec(),
                    next: cookie as u64 + 1,
                });
            }
        }
        for (&cookie, name) in dir.order.range(offset.max(FIRST_COOKIE)..) {
            if out.len() >= max {
                break;
            }
            let child = dir
                .entries
                .get(name)
                .map(|e| Ino(e.0))
                .ok_or(FsError::Dangling(ino))?;
            let ci = st.get(child).map_err(|_| FsError::Dangling(child))?;
            out.push(DirEntry {
                ino: child,
                kind: FileKind::from_mode(ci.mode).unwrap_or(FileKind::RegularFile),
                name: name.clone(),
                next: cookie + 1,
            });
        }
        Ok(out)
    }

    /// Counts one kernel reference to `ino`: an entry the kernel now holds (readdirplus).
    pub fn remember(&self, ino: Ino) {
        if self.opts.kernel_refs
            && let Some(i) = self.table().inodes.get(&ino.0)
        {
            i.refs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Usage figures.
    pub fn statfs(&self) -> StatFs {
        let st = self.table();
        let free = st.alloc.free_blocks() + st.pending_free.blocks();
        StatFs {
            blocks: self.sb.data_blocks,
            bfree: free,
            bavail: free,
            files: st.inodes.len() as u64 + (1 << 32),
            ffree: 1 << 32,
            bsize: BLOCK_SIZE as u32,
            namelen: NAME_MAX as u32,
        }
    }
}
