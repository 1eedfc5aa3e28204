//! The FUSE adapter: turns kernel requests into calls on [`extents::Fs`].
//!
//! Nothing here decides filesystem semantics; it decodes each request's arguments
//! ([`crate::fuse::abi`]), picks credentials and open modes, and chooses errnos through
//! [`crate::errno::errno`].

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockdev::AlignedBuf;
use dashmap::DashMap;
use extents::format::Timestamp;
use extents::{Attr, Creds, FileKind, Fs, FsError, Ino, OpenMode, RenameFlags, SetAttr, TimeSet};

use crate::errno::{Errno, errno};
use crate::fuse::abi::{self, Args, Out, fattr, op};
use crate::fuse::{Handler, InitConfig, Reply, Request};
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
const FILE_OPEN_FLAGS: u32 = abi::FOPEN_KEEP_CACHE | abi::FOPEN_NOFLUSH;

/// What the daemon asks of the kernel at INIT: requests of up to 1 MiB, readdirplus,
/// lookups and creates in one directory at once, and io_uring queues when offered (and
/// the mount asks for them, `-o uring`).
pub const INIT: InitConfig = InitConfig {
    max_write: MAX_WRITE,
    max_readahead: MAX_WRITE,
    flags: abi::init::ASYNC_READ
        | abi::init::BIG_WRITES
        | abi::init::MAX_PAGES
        | abi::init::DO_READDIRPLUS
        | abi::init::READDIRPLUS_AUTO
        | abi::init::PARALLEL_DIROPS
        | abi::init::OVER_IO_URING,
    uring: true,
};

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

/// The filesystem as the kernel sees it.
#[derive(Debug)]
pub struct NearFs {
    fs: Arc<Fs>,
    offload: Arc<Offload>,
    handles: DashMap<u64, Handle>,
    next_handle: AtomicU64,
    /// How requests arrive (`io_uring` or `dev`), for `user.nearfs.fs`.
    transport: &'static str,
}

fn type_bits(k: FileKind) -> u32 {
    match k {
        FileKind::Directory => libc::S_IFDIR,
        FileKind::RegularFile => libc::S_IFREG,
        FileKind::Symlink => libc::S_IFLNK,
        FileKind::NamedPipe => libc::S_IFIFO,
        FileKind::Socket => libc::S_IFSOCK,
        FileKind::CharDevice => libc::S_IFCHR,
        FileKind::BlockDevice => libc::S_IFBLK,
    }
}

fn fuse_attr(a: &Attr) -> abi::Attr {
    let t = |t: Timestamp| (t.secs, t.nanos);
    abi::Attr {
        ino: a.ino.0,
        size: a.size,
        blocks: a.blocks,
        atime: t(a.atime),
        mtime: t(a.mtime),
        ctime: t(a.ctime),
        mode: type_bits(a.kind) | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: extents::BLOCK_SIZE as u32,
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
    let (uid, gid) = (req.header.uid, req.header.gid);
    // Root passes every check that groups could decide, so skip reading /proc for it.
    let groups = if uid == 0 {
        Vec::new()
    } else {
        groups_of(req.header.pid)
    };
    Creds { uid, gid, groups }
}

fn entry(reply: Reply, r: extents::Result<Attr>) {
    match r {
        Ok(a) => reply.data(&[&Out::default().entry(&fuse_attr(&a), a.generation, TTL).0]),
        Err(e) => reply.error(errno(&e)),
    }
}

fn attr(reply: Reply, r: extents::Result<Attr>) {
    match r {
        Ok(a) => reply.data(&[&Out::default().attr_out(&fuse_attr(&a), TTL).0]),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: Reply, r: extents::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn open_mode(flags: u32) -> OpenMode {
    match flags as i32 & libc::O_ACCMODE {
        libc::O_WRONLY => OpenMode {
            read: false,
            write: true,
        },
        libc::O_RDWR => OpenMode {
            read: true,
            write: true,
        },
        _ => OpenMode {
            read: true,
            write: false,
        },
    }
}

/// A time from a setattr request: `now` if its NOW bit is set, the given one if its own
/// bit is, else none.
fn time_set(valid: u32, set: u32, now: u32, secs: u64, nanos: u32) -> Option<TimeSet> {
    if valid & now != 0 {
        Some(TimeSet::Now)
    } else if valid & set != 0 {
        Some(TimeSet::At(Timestamp {
            secs: secs as i64,
            nanos,
        }))
    } else {
        None
    }
}

/// Decodes a request's arguments with `$e` (which may use `?` on each field); a request
/// without them is malformed and answered EINVAL.
macro_rules! args {
    ($reply:expr, $e:expr) => {
        match decode(|| $e) {
            Some(v) => v,
            None => return $reply.error(Errno::EINVAL),
        }
    };
}

/// Runs a decoder (a closure, so that it may use `?`).
fn decode<T>(f: impl FnOnce() -> Option<T>) -> Option<T> {
    f()
}

impl NearFs {
    pub fn new(fs: Arc<Fs>, offload: Arc<Offload>, over_uring: bool) -> Self {
        Self {
            fs,
            offload,
            handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
            transport: if over_uring { "io_uring" } else { "dev" },
        }
    }

    fn add_handle(&self, ino: Ino, mode: OpenMode) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Handle { ino, mode });
        fh
    }

    fn handle(&self, fh: u64, ino: Ino) -> Result<Handle, Errno> {
        match self.handles.get(&fh) {
            Some(h) if h.ino == ino => Ok(*h),
            _ => Err(Errno::EBADF),
        }
    }

    /// The handle `fh` of `ino`, if it was opened for writing.
    fn writable(&self, fh: u64, ino: Ino) -> Result<Handle, Errno> {
        match self.handle(fh, ino)? {
            h if h.mode.write => Ok(h),
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

    fn forget(&self, ino: Ino, nlookup: u64) {
        self.fs.forget(ino, nlookup);
        self.offload.forget(ino);
    }

    fn setattr(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let (fh, mut set) = args!(reply, {
            let valid = a.u32()?;
            a.skip(4)?;
            let (fh, size) = (a.u64()?, a.u64()?);
            a.skip(8)?; // lock_owner
            let (atime, mtime, ctime) = (a.u64()?, a.u64()?, a.u64()?);
            let (atime_ns, mtime_ns, ctime_ns) = (a.u32()?, a.u32()?, a.u32()?);
            let mode = a.u32()?;
            a.skip(4)?;
            let (uid, gid) = (a.u32()?, a.u32()?);
            let has = |bit: u32| valid & bit != 0;
            let set = SetAttr {
                mode: has(fattr::MODE).then_some(mode),
                uid: has(fattr::UID).then_some(uid),
                gid: has(fattr::GID).then_some(gid),
                size: has(fattr::SIZE).then_some(size),
                atime: time_set(valid, fattr::ATIME, fattr::ATIME_NOW, atime, atime_ns),
                mtime: time_set(valid, fattr::MTIME, fattr::MTIME_NOW, mtime, mtime_ns),
                ctime: has(fattr::CTIME).then_some(Timestamp {
                    secs: ctime as i64,
                    nanos: ctime_ns,
                }),
                via_handle: false,
            };
            Some((has(fattr::FH).then_some(fh), set))
        });
        if let Some(fh) = fh {
            match self.handle(fh, ino) {
                Ok(h) if set.size.is_some() && !h.mode.write => return reply.error(Errno::EBADF),
                Ok(_) => set.via_handle = true,
                Err(e) => return reply.error(e),
            }
        }
        attr(reply, self.fs.setattr(&creds(req), ino, set));
    }

    fn read(&self, ino: Ino, mut a: Args, reply: Reply) {
        let (fh, offset, size) = args!(reply, Some((a.u64()?, a.u64()?, a.u32()?)));
        // No larger than INIT allowed: the size decides what the read buffer grows to.
        if size > MAX_WRITE {
            return reply.error(Errno::EINVAL);
        }
        match self.handle(fh, ino) {
            Ok(h) if h.mode.read => {}
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        self.offload.may_cache(ino);
        READ_BUF.with_borrow_mut(|buf| match self.fs.read_into(ino, offset, size, buf) {
            Ok(at) => reply.data(&[&buf[at]]),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn write(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let (fh, offset, data) = args!(reply, {
            let (fh, offset, size) = (a.u64()?, a.u64()?, a.u32()?);
            a.skip(20)?; // write_flags, lock_owner, flags, padding
            Some((fh, offset, a.bytes(size as usize)?))
        });
        if let Err(e) = self.writable(fh, ino) {
            return reply.error(e);
        }
        // Only "is it root" matters for a write (clearing set-user-ID); skip /proc.
        let cr = Creds::user(req.header.uid, req.header.gid);
        self.offload.may_cache(ino);
        match self.fs.write(&cr, ino, offset, data) {
            Ok(n) => reply.data(&[&Out::default().u32(n as u32).u32(0).0]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(&self, req: &Request, parent: Ino, mut a: Args, reply: Reply) {
        let (flags, mode, name) = args!(reply, {
            let (flags, mode) = (a.u32()?, a.u32()?);
            a.skip(8)?; // umask (the kernel applied it), open_flags
            Some((flags, mode, a.name()?))
        });
        let open = open_mode(flags);
        if open.write && self.fs.is_read_only() {
            return reply.error(Errno::EROFS);
        }
        match self.fs.create(&creds(req), parent, name, mode) {
            Ok(at) => {
                let fh = self.add_handle(at.ino, open);
                let mut o = Out::with_capacity(144);
                o.entry(&fuse_attr(&at), at.generation, TTL)
                    .open(fh, FILE_OPEN_FLAGS);
                reply.data(&[&o.0]);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: Ino,
        newdir: Ino,
        flags: u32,
        mut a: Args,
        reply: Reply,
    ) {
        if flags & abi::RENAME_WHITEOUT != 0 {
            return reply.error(Errno::EINVAL);
        }
        let flags = RenameFlags {
            noreplace: flags & abi::RENAME_NOREPLACE != 0,
            exchange: flags & abi::RENAME_EXCHANGE != 0,
        };
        let (name, newname) = args!(reply, Some((a.name()?, a.name()?)));
        empty(
            reply,
            self.fs
                .rename(&creds(req), parent, name, newdir, newname, flags),
        );
    }

    fn readdir(&self, ino: Ino, mut a: Args, plus: bool, reply: Reply) {
        let (_fh, offset, size) = args!(reply, Some((a.u64()?, a.u64()?, a.u32()?)));
        // The size is what the reply buffer is made for.
        if size > MAX_WRITE {
            return reply.error(Errno::EINVAL);
        }
        let mut out = Out::with_capacity(size as usize);
        let r = self.each_entry(ino, offset, |e| {
            let kind = abi::dirent_type(type_bits(e.kind));
            if !plus {
                if out.0.len() + abi::dirent_size(e.name.len()) > size as usize {
                    return true;
                }
                out.u64(e.ino.0)
                    .u64(e.next)
                    .u32(e.name.len() as u32)
                    .u32(kind);
                out.bytes(&e.name).align8();
                return false;
            }
            // An entry removed since the listing began is skipped.
            let Ok(at) = self.fs.getattr(e.ino) else {
                return false;
            };
            if out.0.len() + abi::direntplus_size(e.name.len()) > size as usize {
                return true;
            }
            out.entry(&fuse_attr(&at), at.generation, TTL);
            out.u64(e.ino.0)
                .u64(e.next)
                .u32(e.name.len() as u32)
                .u32(kind);
            out.bytes(&e.name).align8();
            // Entries other than "." and ".." count as lookups, but only once they fit.
            if e.name != b"." && e.name != b".." {
                self.fs.remember(e.ino);
            }
            false
        });
        match r {
            Ok(()) => reply.data(&[&out.0]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let (size, flags) = args!(reply, Some((a.u32()?, a.u32()?)));
        let (name, value) = args!(reply, Some((a.name()?, a.bytes(size as usize)?)));
        // The owner's offload policy is one of its words, or it would not mean one thing
        // to everyone who reads it.
        if name == POLICY_XATTR
            && std::str::from_utf8(value)
                .ok()
                .and_then(Policy::parse)
                .is_none()
        {
            return reply.error(Errno::EINVAL);
        }
        empty(
            reply,
            self.fs.setxattr(&creds(req), ino, name, value, flags),
        );
    }

    fn getxattr(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let (size, name) = args!(reply, {
            let size = a.u32()?;
            a.skip(4)?;
            Some((size, a.name()?))
        });
        let value = self.kind_of(ino).and_then(|kind| {
            let cr = creds(req);
            match inspect::view(
                &self.fs,
                &self.offload,
                self.transport,
                &cr,
                ino,
                kind,
                name,
            ) {
                Some(v) => v,
                None => self.fs.getxattr(&cr, ino, name),
            }
        });
        xattr_reply(reply, value, size);
    }

    fn listxattr(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let size = args!(reply, a.u32());
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

    fn ioctl(&self, req: &Request, ino: Ino, mut a: Args, reply: Reply) {
        let (fh, flags, cmd, in_size, out_size) = args!(reply, {
            let (fh, flags, cmd) = (a.u64()?, a.u32()?, a.u32()?);
            a.skip(8)?; // arg: the caller's pointer
            Some((fh, flags, cmd, a.u32()?, a.u32()?))
        });
        // Only CUSE sends unrestricted ioctls; nearfs's are all restricted.
        if flags & abi::IOCTL_UNRESTRICTED != 0 {
            return reply.error(Errno::ENOSYS);
        }
        let input = args!(reply, a.bytes(in_size as usize));
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
        self.offload.ioctl(caller, cmd, input, out_size, reply);
    }
}

impl Handler for NearFs {
    fn handle(&self, req: Request<'_>, reply: Reply) {
        let ino = Ino(req.header.nodeid);
        let mut a = req.args;
        match req.header.opcode {
            op::LOOKUP => {
                let name = args!(reply, a.name());
                entry(reply, self.fs.lookup(&creds(&req), ino, name));
            }
            op::FORGET => {
                if let Some(n) = a.u64() {
                    self.forget(ino, n);
                }
            }
            op::BATCH_FORGET => {
                let count = a.u32().unwrap_or(0);
                let _ = a.skip(4);
                for _ in 0..count {
                    let (Some(ino), Some(n)) = (a.u64(), a.u64()) else {
                        break;
                    };
                    self.forget(Ino(ino), n);
                }
            }
            op::GETATTR => attr(reply, self.fs.getattr(ino)),
            op::SETATTR => self.setattr(&req, ino, a, reply),
            op::READLINK => match self.fs.readlink(ino) {
                Ok(t) => reply.data(&[&t]),
                Err(e) => reply.error(errno(&e)),
            },
            op::SYMLINK => {
                let (name, target) = args!(reply, Some((a.name()?, a.name()?)));
                entry(reply, self.fs.symlink(&creds(&req), ino, name, target));
            }
            op::MKNOD => {
                let (mode, rdev, name) = args!(reply, {
                    let (mode, rdev) = (a.u32()?, a.u32()?);
                    a.skip(8)?; // umask (the kernel applied it), padding
                    Some((mode, rdev, a.name()?))
                });
                entry(reply, self.fs.mknod(&creds(&req), ino, name, mode, rdev));
            }
            op::MKDIR => {
                let (mode, name) = args!(reply, {
                    let mode = a.u32()?;
                    a.skip(4)?; // umask
                    Some((mode, a.name()?))
                });
                entry(reply, self.fs.mkdir(&creds(&req), ino, name, mode));
            }
            op::UNLINK => {
                let name = args!(reply, a.name());
                empty(reply, self.fs.unlink(&creds(&req), ino, name));
            }
            op::RMDIR => {
                let name = args!(reply, a.name());
                empty(reply, self.fs.rmdir(&creds(&req), ino, name));
            }
            op::RENAME => {
                let newdir = args!(reply, a.u64());
                self.rename(&req, ino, Ino(newdir), 0, a, reply);
            }
            op::RENAME2 => {
                let (newdir, flags) = args!(reply, {
                    let v = (a.u64()?, a.u32()?);
                    a.skip(4)?;
                    Some(v)
                });
                self.rename(&req, ino, Ino(newdir), flags, a, reply);
            }
            op::LINK => {
                let (old, name) = args!(reply, Some((a.u64()?, a.name()?)));
                entry(reply, self.fs.link(&creds(&req), Ino(old), ino, name));
            }
            op::OPEN => {
                let mode = open_mode(args!(reply, a.u32()));
                match self.fs.open(&creds(&req), ino, mode) {
                    Ok(_) => {
                        let fh = self.add_handle(ino, mode);
                        reply.data(&[&Out::default().open(fh, FILE_OPEN_FLAGS).0]);
                    }
                    Err(e) => reply.error(errno(&e)),
                }
            }
            op::READ => self.read(ino, a, reply),
            op::WRITE => self.write(&req, ino, a, reply),
            op::STATFS => {
                let s = self.fs.statfs();
                let mut o = Out::with_capacity(80);
                o.u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail)
                    .u64(s.files)
                    .u64(s.ffree);
                o.u32(s.bsize).u32(s.namelen).u32(s.bsize).zeros(28);
                reply.data(&[&o.0]);
            }
            op::RELEASE => {
                let fh = args!(reply, a.u64());
                if self.handles.remove(&fh).is_some() {
                    self.fs.release(ino);
                }
                reply.ok();
            }
            op::RELEASEDIR => {
                let fh = args!(reply, a.u64());
                self.handles.remove(&fh);
                reply.ok();
            }
            op::FSYNC => empty(reply, self.fs.fsync(ino)),
            op::FSYNCDIR => empty(reply, self.fs.commit()),
            // Writes reach the device before they are acknowledged; nothing is buffered here.
            op::FLUSH => reply.ok(),
            op::SETXATTR => self.setxattr(&req, ino, a, reply),
            op::GETXATTR => self.getxattr(&req, ino, a, reply),
            op::LISTXATTR => self.listxattr(&req, ino, a, reply),
            op::REMOVEXATTR => {
                let name = args!(reply, a.name());
                empty(reply, self.fs.removexattr(&creds(&req), ino, name));
            }
            op::OPENDIR => match self.fs.opendir(&creds(&req), ino) {
                Ok(()) => {
                    let read_only = OpenMode {
                        read: true,
                        write: false,
                    };
                    let fh = self.add_handle(ino, read_only);
                    reply.data(&[&Out::default().open(fh, 0).0]);
                }
                Err(e) => reply.error(errno(&e)),
            },
            op::READDIR => self.readdir(ino, a, false, reply),
            op::READDIRPLUS => self.readdir(ino, a, true, reply),
            op::ACCESS => {
                let mask = args!(reply, a.u32());
                empty(reply, self.fs.access(&creds(&req), ino, mask));
            }
            op::CREATE => self.create(&req, ino, a, reply),
            op::FALLOCATE => {
                let (fh, offset, len, mode) =
                    args!(reply, Some((a.u64()?, a.u64()?, a.u64()?, a.u32()?)));
                if let Err(e) = self.writable(fh, ino) {
                    return reply.error(e);
                }
                empty(reply, self.fs.fallocate(ino, offset, len, mode));
            }
            op::IOCTL => self.ioctl(&req, ino, a, reply),
            op::LSEEK => {
                let (offset, whence) = args!(reply, {
                    a.skip(8)?; // fh
                    Some((a.u64()?, a.u32()?))
                });
                if (offset as i64) < 0 {
                    return reply.error(Errno::EINVAL);
                }
                match self.fs.lseek(ino, offset, whence) {
                    Ok(pos) => reply.data(&[&pos.to_le_bytes()]),
                    Err(FsError::Invalid(_)) => reply.error(Errno::EINVAL),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            op::DESTROY => {
                if let Err(e) = self.fs.commit() {
                    tracing::error!(error = %e, "final commit failed");
                }
                reply.ok();
            }
            op::INTERRUPT => {}
            _ => reply.error(Errno::ENOSYS),
        }
    }
}

/// Answers a getxattr/listxattr: the size when asked for it, ERANGE when it does not fit.
fn xattr_reply(reply: Reply, value: extents::Result<Vec<u8>>, size: u32) {
    match value {
        Err(e) => reply.error(errno(&e)),
        Ok(v) if size == 0 => reply.data(&[&Out::default().u32(v.len() as u32).u32(0).0]),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&[&v]),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    use blockdev::{BlockDevice, MemDevice};
    use extents::{MkfsOptions, MountOptions};

    use super::*;
    use crate::fuse::abi::InHeader;
    use crate::offload::Settings;

    fn daemon() -> (Arc<Fs>, NearFs) {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        Fs::mkfs(dev.clone(), MkfsOptions::default()).unwrap();
        let opts = MountOptions {
            read_only: false,
            kernel_refs: true,
        };
        let fs = Arc::new(Fs::mount(dev, opts).unwrap());
        let offload = Arc::new(Offload::new(fs.clone(), Settings::default(), None));
        (fs.clone(), NearFs::new(fs, offload, false))
    }

    /// Sends one request as the kernel would and returns the reply's error and body.
    fn ask(d: &NearFs, opcode: u32, nodeid: u64, args: &[u8]) -> (i32, Vec<u8>) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and ours.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let header = InHeader {
            len: (abi::IN_HEADER + args.len()) as u32,
            opcode,
            unique: 2,
            nodeid,
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        };
        let req = Request {
            header,
            args: Args(args),
        };
        // Read while the reply is written: a large one does not fit in the pipe.
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            File::from(r).read_to_end(&mut out).unwrap();
            out
        });
        Handler::handle(d, req, Reply::to_file(2, File::from(w)));
        let out = reader.join().unwrap();
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        (error, out[abi::OUT_HEADER..].to_vec())
    }

    #[test]
    fn sizes_and_lengths_in_requests_are_checked_before_they_are_used() {
        let (fs, d) = daemon();
        // A sparse 8 GiB file, opened for reading.
        let big = fs
            .create(&Creds::root(), Ino(abi::ROOT_ID), b"big", 0o644)
            .unwrap();
        let grow = SetAttr {
            size: Some(8 << 30),
            ..SetAttr::default()
        };
        fs.setattr(&Creds::root(), big.ino, grow).unwrap();
        let (e, body) = ask(&d, op::OPEN, big.ino.0, &[0; 8]);
        assert_eq!(e, 0);
        let fh = u64::from_le_bytes(body[..8].try_into().unwrap());

        // A read or a listing larger than INIT allowed would size a 4 GiB buffer.
        let mut read = Out::default();
        read.u64(fh).u64(0).u32(u32::MAX).zeros(20);
        assert_eq!(ask(&d, op::READ, big.ino.0, &read.0).0, -libc::EINVAL);
        let mut list = Out::default();
        list.u64(0).u64(0).u32(u32::MAX).zeros(20);
        assert_eq!(ask(&d, op::READDIR, abi::ROOT_ID, &list.0).0, -libc::EINVAL);
        // The largest allowed read works.
        let mut read = Out::default();
        read.u64(fh).u64(0).u32(MAX_WRITE).zeros(20);
        let (e, body) = ask(&d, op::READ, big.ino.0, &read.0);
        assert_eq!((e, body.len()), (0, MAX_WRITE as usize));

        // Lengths that claim more than the request carries.
        let mut write = Out::default();
        write.u64(fh).u64(0).u32(100).zeros(20).bytes(b"short");
        assert_eq!(ask(&d, op::WRITE, big.ino.0, &write.0).0, -libc::EINVAL);
        let mut setx = Out::default();
        setx.u32(1000).u32(0).bytes(b"user.x\0v");
        assert_eq!(ask(&d, op::SETXATTR, big.ino.0, &setx.0).0, -libc::EINVAL);
        let mut ioctl = Out::default();
        ioctl.u64(fh).u32(0).u32(0).u64(0).u32(1 << 20).u32(0);
        assert_eq!(ask(&d, op::IOCTL, big.ino.0, &ioctl.0).0, -libc::EINVAL);
        // A name without its NUL, and no arguments at all.
        assert_eq!(ask(&d, op::LOOKUP, abi::ROOT_ID, b"big").0, -libc::EINVAL);
        assert_eq!(ask(&d, op::SETATTR, big.ino.0, &[]).0, -libc::EINVAL);
        assert_eq!(
            ask(&d, op::RENAME, abi::ROOT_ID, &[1, 0, 0]).0,
            -libc::EINVAL
        );
        // An opcode nearfs does not know.
        assert_eq!(ask(&d, 4000, abi::ROOT_ID, &[]).0, -libc::ENOSYS);
        // A batch of forgets that claims more entries than it has: no reply, no panic,
        // and the file is still there.
        let mut forget = Out::default();
        forget.u32(u32::MAX).u32(0).u64(big.ino.0).u64(1);
        let req = Request {
            header: InHeader {
                len: (abi::IN_HEADER + forget.0.len()) as u32,
                opcode: op::BATCH_FORGET,
                unique: 0,
                nodeid: 0,
                uid: 0,
                gid: 0,
                pid: 0,
            },
            args: Args(&forget.0),
        };
        Handler::handle(&d, req, Reply::none());
        assert!(fs.getattr(big.ino).is_ok());
    }
}
