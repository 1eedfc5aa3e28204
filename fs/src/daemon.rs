//! The FUSE adapter: turns kernel requests into calls on [`extents::Fs`].
//!
//! Nothing here decides filesystem semantics; it converts types, picks credentials and
//! open modes, and chooses errnos through [`crate::errno::errno`].

use std::cell::RefCell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockdev::AlignedBuf;
use dashmap::DashMap;
use extents::format::Timestamp;
use extents::{Attr, Creds, FileKind, Fs, FsError, Ino, OpenMode, RenameFlags, SetAttr, TimeSet};
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::errno::errno;
use crate::inspect;
use crate::offload::{Caller, Offload, POLICY_XATTR, Policy};

/// How long the kernel may cache attributes and entries. Every change goes through this
/// daemon, so the kernel's copies go stale only through another mount, which is refused.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel may send in one request.
const MAX_WRITE: u32 = 1 << 20;
/// How files are opened: the kernel keeps their pages across opens (a writing run drops
/// what it makes stale), and `close` sends no FLUSH, which would have nothing to do:
/// every write reaches the device before it is acknowledged.
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

thread_local! {
    /// Each FUSE worker's buffer for reads, kept between them: reads of up to `MAX_WRITE`
    /// (the kernel's largest), whole blocks around them, allocate nothing and fault no
    /// page in after the first.
    static READ_BUF: RefCell<AlignedBuf> =
        RefCell::new(AlignedBuf::new((MAX_WRITE + extents::BLOCK_SIZE as u32) as usize));
}

/// An open file or directory.
#[derive(Clone, Copy, Debug)]
struct Handle {
    ino: Ino,
    mode: OpenMode,
}

/// The filesystem as fuser sees it.
#[derive(Debug)]
pub struct NearFs {
    fs: Arc<Fs>,
    offload: Arc<Offload>,
    handles: DashMap<u64, Handle>,
    next_handle: AtomicU64,
}

fn ts_to_system(t: Timestamp) -> SystemTime {
    let nanos = Duration::new(t.secs.unsigned_abs(), 0);
    let base = if t.secs >= 0 {
        UNIX_EPOCH + nanos
    } else {
        UNIX_EPOCH - nanos
    };
    base + Duration::from_nanos(u64::from(t.nanos))
}

fn system_to_ts(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::NamedPipe => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: ts_to_system(a.atime),
        mtime: ts_to_system(a.mtime),
        ctime: ts_to_system(a.ctime),
        crtime: ts_to_system(a.crtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: extents::BLOCK_SIZE as u32,
        flags: 0,
    }
}

/// Supplementary groups of `pid`, as libfuse's fuse_req_getgroups reads them.
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Credentials of the process behind a request.
fn creds(req: &Request) -> Creds {
    let (uid, gid) = (req.uid(), req.gid());
    // Root passes every check that groups could decide, so skip reading /proc for it.
    let groups = if uid == 0 {
        Vec::new()
    } else {
        groups_of(req.pid())
    };
    Creds { uid, gid, groups }
}

fn entry(reply: ReplyEntry, r: extents::Result<Attr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &fuse_attr(&a), Generation(a.generation)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: extents::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(system_to_ts(t)),
    }
}

fn open_mode(flags: OpenFlags) -> OpenMode {
    match flags.acc_mode() {
        OpenAccMode::O_RDONLY => OpenMode {
            read: true,
            write: false,
        },
        OpenAccMode::O_WRONLY => OpenMode {
            read: false,
            write: true,
        },
        OpenAccMode::O_RDWR => OpenMode {
            read: true,
            write: true,
        },
    }
}

impl NearFs {
    pub fn new(fs: Arc<Fs>, offload: Arc<Offload>) -> Self {
        Self {
            fs,
            offload,
            handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
        }
    }

    fn add_handle(&self, ino: Ino, mode: OpenMode) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Handle { ino, mode });
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle, ino: INodeNo) -> Result<Handle, Errno> {
        match self.handles.get(&fh.0) {
            Some(h) if h.ino.0 == ino.0 => Ok(*h),
            _ => Err(Errno::EBADF),
        }
    }

    /// Feeds directory entries after `offset` to `add` until it reports the reply full.
    fn each_entry(
        &self,
        ino: Ino,
        mut offset: u64,
        mut add: impl FnMut(&extents::DirEntry) -> bool,
    ) -> extents::Result<()> {
        loop {
            let batch = self.fs.readdir(ino, offset, 128)?;
            if batch.is_empty() {
                return Ok(());
            }
            for e in &batch {
                if add(e) {
                    return Ok(());
                }
                offset = e.next;
            }
        }
    }

    fn kind_of(&self, ino: Ino) -> extents::Result<FileKind> {
        self.fs.getattr(ino).map(|a| a.kind)
    }
}

impl Filesystem for NearFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.commit() {
            tracing::error!(error = %e, "final commit failed");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(
            reply,
            self.fs.lookup(&creds(req), Ino(parent.0), name.as_bytes()),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(Ino(ino.0), nlookup);
        self.offload.forget(Ino(ino.0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(Ino(ino.0)) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let via_handle = match fh.map(|fh| self.handle(fh, ino)) {
            Some(Ok(h)) => {
                if size.is_some() && !h.mode.write {
                    return reply.error(Errno::EBADF);
                }
                true
            }
            Some(Err(e)) => return reply.error(e),
            None => false,
        };
        let req_attr = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(system_to_ts),
            via_handle,
        };
        match self.fs.setattr(&creds(req), Ino(ino.0), req_attr) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(Ino(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.fs
                .mknod(&creds(req), Ino(parent.0), name.as_bytes(), mode, rdev),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.fs
                .mkdir(&creds(req), Ino(parent.0), name.as_bytes(), mode),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.fs.unlink(&creds(req), Ino(parent.0), name.as_bytes()),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.fs.rmdir(&creds(req), Ino(parent.0), name.as_bytes()),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes();
        entry(
            reply,
            self.fs
                .symlink(&creds(req), Ino(parent.0), link_name.as_bytes(), target),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let flags = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        let r = self.fs.rename(
            &creds(req),
            Ino(parent.0),
            name.as_bytes(),
            Ino(newparent.0),
            newname.as_bytes(),
            flags,
        );
        empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.fs.link(
                &creds(req),
                Ino(ino.0),
                Ino(newparent.0),
                newname.as_bytes(),
            ),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = open_mode(flags);
        match self.fs.open(&creds(req), Ino(ino.0), mode) {
            Ok(_) => reply.opened(self.add_handle(Ino(ino.0), mode), FILE_OPEN_FLAGS),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.handle(fh, ino) {
            Ok(h) if h.mode.read => {}
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        self.offload.may_cache(Ino(ino.0));
        READ_BUF.with_borrow_mut(
            |buf| match self.fs.read_into(Ino(ino.0), offset, size, buf) {
                Ok(at) => reply.data(&buf[at]),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.handle(fh, ino) {
            Ok(h) if h.mode.write => {}
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        // Only "is it root" matters for a write (clearing set-user-ID); skip /proc.
        let cr = Creds::user(req.uid(), req.gid());
        self.offload.may_cache(Ino(ino.0));
        match self.fs.write(&cr, Ino(ino.0), offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the device before they are acknowledged; nothing is buffered here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.handles.remove(&fh.0).is_some() {
            self.fs.release(Ino(ino.0));
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsync(Ino(ino.0)));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(&creds(req), Ino(ino.0)) {
            Ok(()) => {
                let fh = self.add_handle(
                    Ino(ino.0),
                    OpenMode {
                        read: true,
                        write: false,
                    },
                );
                reply.opened(fh, FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.each_entry(Ino(ino.0), offset, |e| {
            reply.add(
                INodeNo(e.ino.0),
                e.next,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.each_entry(Ino(ino.0), offset, |e| {
            // An entry removed since the listing began is skipped.
            let Ok(attr) = self.fs.getattr(e.ino) else {
                return false;
            };
            let name = OsStr::from_bytes(&e.name);
            let generation = Generation(attr.generation);
            let full = reply.add(
                INodeNo(e.ino.0),
                e.next,
                name,
                &TTL,
                &fuse_attr(&attr),
                generation,
            );
            // Entries other than "." and ".." count as lookups, but only once they fit.
            if !full && e.name != b"." && e.name != b".." {
                self.fs.remember(e.ino);
            }
            full
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.commit());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        // The owner's offload policy is one of its words, or it would not mean one thing
        // to everyone who reads it.
        if name.as_bytes() == POLICY_XATTR
            && std::str::from_utf8(value)
                .ok()
                .and_then(Policy::parse)
                .is_none()
        {
            return reply.error(Errno::EINVAL);
        }
        let r = self.fs.setxattr(
            &creds(req),
            Ino(ino.0),
            name.as_bytes(),
            value,
            flags as u32,
        );
        empty(reply, r);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = Ino(ino.0);
        let value = match self.kind_of(ino) {
            Err(e) => Err(e),
            Ok(kind) => match inspect::view(
                &self.fs,
                &self.offload,
                &creds(req),
                ino,
                kind,
                name.as_bytes(),
            ) {
                Some(v) => v,
                None => self.fs.getxattr(&creds(req), ino, name.as_bytes()),
            },
        };
        xattr_reply(reply, value, size);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = Ino(ino.0);
        let names = self.kind_of(ino).and_then(|kind| {
            let mut out = Vec::new();
            for n in inspect::names_for(ino, kind) {
                out.extend_from_slice(n.as_bytes());
                out.push(0);
            }
            for n in self.fs.listxattr(&creds(req), ino)? {
                out.extend_from_slice(&n);
                out.push(0);
            }
            Ok(out)
        });
        xattr_reply(reply, names, size);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.fs
                .removexattr(&creds(req), Ino(ino.0), name.as_bytes()),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        empty(
            reply,
            self.fs.access(&creds(req), Ino(ino.0), mask.bits() as u32),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let open = open_mode(OpenFlags(flags));
        if open.write && self.fs.is_read_only() {
            return reply.error(Errno::EROFS);
        }
        match self
            .fs
            .create(&creds(req), Ino(parent.0), name.as_bytes(), mode)
        {
            Ok(a) => {
                let fh = self.add_handle(a.ino, open);
                reply.created(
                    &TTL,
                    &fuse_attr(&a),
                    Generation(a.generation),
                    fh,
                    FILE_OPEN_FLAGS,
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.handle(fh, ino) {
            Ok(h) if h.mode.write => {}
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        empty(
            reply,
            self.fs.fallocate(Ino(ino.0), offset, length, mode as u32),
        );
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let h = match self.handle(fh, ino) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let kind = match self.kind_of(h.ino) {
            Ok(k) => k,
            Err(e) => return reply.error(errno(&e)),
        };
        let caller = Caller {
            creds: creds(req),
            ino: h.ino,
            kind,
            mode: h.mode,
        };
        self.offload.ioctl(caller, cmd, in_data, out_size, reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        match self.fs.lseek(Ino(ino.0), offset, whence as u32) {
            Ok(pos) => reply.offset(pos as i64),
            Err(FsError::Invalid(_)) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Answers a getxattr/listxattr: the size when asked for it, ERANGE when it does not fit.
fn xattr_reply(reply: ReplyXattr, value: extents::Result<Vec<u8>>, size: u32) {
    match value {
        Err(e) => reply.error(errno(&e)),
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
    }
}
