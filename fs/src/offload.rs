//! The offload ioctls: loading appcode into the daemon and running it over a file's own
//! extents (DESIGN.md, "The path of one offload call"; wire format in
//! `nearfs_client::abi`; who may do what in `docs/security.md`).
//!
//! Who may do what:
//! - any user may load programs (they are verified; loading is not a privilege) on any
//!   open file or directory of the mount, and list them; only the loader or root may
//!   unload one. Each user may hold `offload_programs` programs and `offload_bytes` bytes
//!   in the daemon (programs, unfinished uploads, logs and unread outputs together);
//! - a run needs an open handle of the file itself: readable always, writable and the
//!   write flag to let the program write. The caller's credentials (uid, gid, groups from
//!   /proc, as for every request) must allow the same access now. The file's owner can
//!   forbid offload with `user.nearfs.offload=off` (or allow only reading with `ro`); the
//!   mount can with `-o offload=off|ro`. Each user has at most `offload_runs` runs going;
//! - a run sees the extents of that file, its requested range only, under the file's own
//!   lock (`extents/src/state.rs`): shared for reading runs, exclusive for writing ones, so
//!   a read-modify-write is atomic against `write()` and other runs of that file, and
//!   other files are not held up. What it wrote is
//!   dropped from the kernel's page cache before the ioctl returns, if the kernel may hold
//!   pages of the file (see [`Offload::may_cache`]): the reply goes through the
//!   invalidation thread, because invalidating waits for page locks that an in-flight
//!   `write()` holds until a FUSE worker serves it.
//!
//! Verifying and compiling a program is done by loader threads, never by FUSE workers. A
//! run is done by the FUSE worker that received it while all but one FUSE worker are free
//! of runs (handing it over costs a lookup several µs), else by an offload worker, users
//! taking turns (`crate::workers`). Every job, and every ioctl, is panic-contained: a bug
//! costs its caller an EIO, never a thread.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use appcode::{Extent, Limits, Mode, Program, ProgramError, Request, RunError, World};
use dashmap::DashMap;
use extents::access::{MAY_READ, MAY_WRITE};
use extents::{BLOCK_SIZE, Creds, FileKind, Fs, FsError, Ino, OpenMode};
use nbd::{NbdDevice, NotAtTarget, RemoteProgram, RemoteWorld};
use nearfs_client::abi::{self, Fields, FieldsMut, RunShape, cmd, off, run_error};

use crate::errno::{Errno, errno};
use crate::fuse::{Notifier, Reply};
use crate::workers::{Job, Turn, Workers};

/// The name of the owner's policy attribute.
pub const POLICY_XATTR: &[u8] = b"user.nearfs.offload";
/// Largest object one may load.
const MAX_OBJECT: u64 = 16 << 20;
// A program's name, NUL-terminated, fits the ABI's name field.
const _: () = assert!(appcode::elf::MAX_NAME < abi::NAME_SIZE);
/// Unfinished uploads, rejection logs and unread outputs kept per user.
const MAX_PENDING_PER_USER: usize = 16;
/// Threads that verify and compile programs.
const LOADERS: usize = 2;
/// Loads one user may have being verified at once, and waiting.
const LOADS_PER_USER: u32 = 1;
const LOADS_WAITING: u32 = 4;
/// Runs one user may have waiting for a worker (`offload_runs` may be running).
const RUNS_WAITING: u32 = 64;
/// How long an upload, a log or an unread output is kept.
const PENDING_FOR: Duration = Duration::from_secs(60);
/// How often what was kept too long is looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Wall-clock limit of a writing run: it holds its file alone, so every read and write of
/// that file waits for it. Reading runs get appcode's default (10 s).
const WRITE_RUN_WALL: Duration = Duration::from_secs(1);

/// What the mount allows (`-o offload=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Off,
    ReadOnly,
    ReadWrite,
}

impl Policy {
    /// Its name in `-o offload=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::ReadOnly => "ro",
            Policy::ReadWrite => "rw",
        }
    }

    pub fn parse(name: &str) -> Option<Policy> {
        [Policy::Off, Policy::ReadOnly, Policy::ReadWrite]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

/// The mount's offload settings (`-o offload=,offload_runs=,offload_programs=,
/// offload_bytes=`) and how many workers run offload jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub policy: Policy,
    pub runs_per_user: u32,
    pub programs_per_user: u32,
    pub bytes_per_user: u64,
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::ReadWrite,
            runs_per_user: 4,
            programs_per_user: 64,
            bytes_per_user: 256 << 20,
            workers: 4,
        }
    }
}

/// Per-file counters, shown as `user.nearfs.stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileStats {
    pub runs: u64,
    pub failures: u64,
    pub hops: u64,
    pub device_bytes: u64,
    pub bytes_returned: u64,
    pub insns: u64,
    /// Runs executed at the storage target rather than in the daemon.
    pub remote_runs: u64,
    /// Writing runs whose reply waited for the kernel to drop the file's pages.
    pub invalidations: u64,
    /// Time the daemon spent on runs, from a RUN request's arrival here to the end of the run
    /// (access checks, waiting for a worker and the lock, reads and execution; not the FUSE
    /// crossing).
    pub run_ns: u64,
}

struct Loaded {
    program: Program,
    /// The program as the storage target gets it, on a mount over a target that runs
    /// appcode.
    remote: Option<Arc<RemoteProgram>>,
    /// Whether the target refused it (said once in the log).
    refused: std::sync::atomic::AtomicBool,
    owner: u32,
    /// What the owner is charged for it, until the last holder drops it.
    charge: Charge,
    load_time: Duration,
}

/// Something a user left in the daemon between ioctls.
enum Pending {
    Upload { bytes: Vec<u8> },
    Log { text: String },
    Output { bytes: Vec<u8>, at: usize },
}

impl Pending {
    fn size(&self) -> u64 {
        (match self {
            Pending::Upload { bytes } | Pending::Output { bytes, .. } => bytes.len(),
            Pending::Log { text } => text.len(),
        }) as u64
    }
}

struct Held {
    owner: u32,
    since: Instant,
    what: Pending,
}

/// What one user holds in the daemon.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    programs: u32,
    bytes: u64,
    /// Things held between ioctls (uploads, logs, outputs).
    pending: usize,
}

/// What every user holds in the daemon, against the per-user limits.
struct Users {
    map: Mutex<BTreeMap<u32, Usage>>,
    programs: u32,
    bytes: u64,
}

impl Users {
    /// Changes user `uid`'s usage.
    fn usage<R>(&self, uid: u32, f: impl FnOnce(&mut Usage) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(uid).or_default())
    }

    /// Charges `bytes` to `uid`; EDQUOT if that would pass the per-user limit.
    fn charge(&self, uid: u32, bytes: u64) -> Result<(), Errno> {
        self.usage(uid, |u| {
            if u.bytes.saturating_add(bytes) > self.bytes {
                return Err(Errno::EDQUOT);
            }
            u.bytes += bytes;
            Ok(())
        })
    }

    fn refund(&self, uid: u32, bytes: u64) {
        self.usage(uid, |u| u.bytes = u.bytes.saturating_sub(bytes));
    }

    /// Charges one more thing held between ioctls, of `bytes`: EAGAIN past the count a
    /// user may hold, EDQUOT past its bytes; with `force`, charged past them.
    fn hold(&self, uid: u32, bytes: u64, force: bool) -> Result<(), Errno> {
        self.usage(uid, |u| {
            if !force && u.pending >= MAX_PENDING_PER_USER {
                return Err(Errno::EAGAIN);
            }
            if !force && u.bytes.saturating_add(bytes) > self.bytes {
                return Err(Errno::EDQUOT);
            }
            u.pending += 1;
            u.bytes = u.bytes.saturating_add(bytes);
            Ok(())
        })
    }

    /// Charges one more program of `bytes` to `uid`, or says what the user holds.
    fn admit(self: &Arc<Self>, uid: u32, bytes: u64) -> Result<Charge, Usage> {
        self.usage(uid, |u| {
            if u.programs >= self.programs || u.bytes.saturating_add(bytes) > self.bytes {
                return Err(*u);
            }
            u.programs += 1;
            u.bytes += bytes;
            Ok(())
        })?;
        Ok(Charge {
            users: self.clone(),
            uid,
            bytes,
            program: true,
        })
    }

    fn total(&self) -> u64 {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(|u| u.bytes).sum()
    }
}

/// What is charged to a user for something it holds, given back when this is dropped: an
/// upload being verified, or a loaded program (which runs may hold after it is unloaded,
/// and which counts until the last of them ends).
struct Charge {
    users: Arc<Users>,
    uid: u32,
    bytes: u64,
    program: bool,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let program = self.program;
        self.users.usage(self.uid, |u| {
            u.bytes = u.bytes.saturating_sub(self.bytes);
            if program {
                u.programs -= 1;
            }
        });
    }
}

/// The caller of one ioctl.
pub struct Caller {
    pub creds: Creds,
    pub ino: Ino,
    pub kind: FileKind,
    pub mode: OpenMode,
}

pub struct Offload {
    fs: Arc<Fs>,
    settings: Settings,
    limits: Limits,
    programs: DashMap<u64, Arc<Loaded>>,
    pending: DashMap<u64, Held>,
    next_id: AtomicU64,
    users: Arc<Users>,
    stats: DashMap<u64, FileStats>,
    /// When `expire` last looked.
    expired: Mutex<Instant>,
    invalidator: OnceLock<Invalidator>,
    /// Files the kernel may hold pages of: a read or write was served since the file's
    /// pages were last dropped (or the kernel forgot the inode).
    cached: DashMap<u64, ()>,
    /// Runs the FUSE workers hand over.
    runners: Workers,
    /// Verify and compile programs, apart from runs so that no user's runs delay loads.
    loaders: Workers,
    /// The NBD device of a mount over the network, where runs go when its target offers
    /// appcode.
    target: Option<Arc<NbdDevice>>,
}

/// Tells the kernel what a writing run changed: its page drops go through a thread of
/// their own (see the module comment), attribute drops are sent by the run's thread.
struct Invalidator {
    pages: Mutex<Sender<Invalidate>>,
    /// Jobs sent to the thread and not yet done. While there are any, every reply after a
    /// writing run goes through the thread too, in order: a run that finds no mark on its
    /// file may follow one whose drop of that file's pages has not happened yet.
    queued: Arc<AtomicU64>,
    notifier: Notifier,
}

/// A reply to send once a file's pages (or only its attributes) are dropped from the
/// kernel's caches.
struct Invalidate {
    ino: Ino,
    pages: bool,
    reply: Reply,
    bytes: Vec<u8>,
}

/// The reply to an ioctl, and whether a run wrote the file (its pages may be stale).
pub struct Answer {
    pub bytes: Vec<u8>,
    pub wrote: bool,
}

impl Answer {
    fn plain(bytes: Vec<u8>) -> Answer {
        Answer {
            bytes,
            wrote: false,
        }
    }
}

/// Drops a file's cached attributes, and with `pages` every page of it (offset 0, length
/// 0). Dropping pages waits for page locks (see the module comment); attributes alone
/// (a negative offset) wait for nothing.
fn drop_cached(n: &Notifier, ino: Ino, pages: bool) {
    let offset = if pages { 0 } else { -1 };
    if let Err(e) = n.inval_inode(ino.0, offset, 0) {
        tracing::warn!(error = %e, pages, "cache invalidation failed");
    }
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("settings", &self.settings)
            .field("programs", &self.programs.len())
            .finish()
    }
}

fn bad() -> Errno {
    Errno::EINVAL
}

impl Offload {
    pub fn new(fs: Arc<Fs>, settings: Settings, target: Option<Arc<NbdDevice>>) -> Offload {
        if let Some(t) = &target {
            if t.offers_appcode() {
                tracing::info!(target = %t.url(), "appcode runs at the storage target");
            } else {
                tracing::info!(
                    target = %t.url(),
                    "the NBD server does not offer appcode; runs execute in the daemon over the remote device"
                );
            }
        }
        Offload {
            target,
            fs,
            settings,
            limits: Limits::default(),
            programs: DashMap::new(),
            pending: DashMap::new(),
            next_id: AtomicU64::new(1),
            users: Arc::new(Users {
                map: Mutex::new(BTreeMap::new()),
                programs: settings.programs_per_user,
                bytes: settings.bytes_per_user,
            }),
            stats: DashMap::new(),
            expired: Mutex::new(Instant::now()),
            invalidator: OnceLock::new(),
            cached: DashMap::new(),
            // Runs go on the FUSE worker that has them while all but one of the FUSE
            // workers are free of runs, else to the runners.
            runners: Workers::new(
                settings.workers,
                settings.runs_per_user,
                RUNS_WAITING,
                (settings.workers as u32).saturating_sub(1),
            ),
            loaders: Workers::new(LOADERS, LOADS_PER_USER, LOADS_WAITING, 0),
        }
    }

    /// Starts the thread that drops what runs wrote from the kernel's page cache and then
    /// replies. Without it (before the session exists) replies go out at once.
    pub fn set_notifier(&self, notifier: Notifier) -> std::io::Result<()> {
        let (tx, rx) = channel::<Invalidate>();
        let (n, queued) = (notifier.clone(), Arc::new(AtomicU64::new(0)));
        let done = queued.clone();
        std::thread::Builder::new()
            .name("nearfs-invalidate".into())
            .spawn(move || {
                for job in rx {
                    // Counted done however it ends, or every later reply would queue.
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        drop_cached(&n, job.ino, job.pages);
                        job.reply.ioctl(&job.bytes);
                    }));
                    done.fetch_sub(1, Ordering::Release);
                }
            })?;
        let _ = self.invalidator.set(Invalidator {
            pages: Mutex::new(tx),
            queued,
            notifier,
        });
        Ok(())
    }

    /// Notes that the kernel may fill its page cache of `ino` from the read or write about
    /// to be served. Called before the filesystem serves it: a writing run that ends after
    /// this point finds the mark and drops the pages; one that ended before it wrote what
    /// this read will see. Every read and write counts, O_DIRECT ones too, because the
    /// kernel reads pages for mmap with the flags of the file it maps.
    pub fn may_cache(&self, ino: Ino) {
        if !self.cached.contains_key(&ino.0) {
            self.cached.insert(ino.0, ());
        }
    }

    /// Sends an answer: at once, or, after a run that wrote a file the kernel may hold
    /// pages of, once all of them are dropped. All, not only those the run wrote: the mark
    /// is cleared here, and the next run will not look at the pages this one left. A run
    /// that wrote a file the kernel holds no pages of still changed its times, which the
    /// kernel may have cached: those are dropped here, before the reply.
    fn reply(&self, ino: Ino, answer: Answer, reply: Reply) {
        let Some(inv) = self.invalidator.get().filter(|_| answer.wrote) else {
            return reply.ioctl(&answer.bytes);
        };
        // Taking the mark, deciding and queueing are one step under the queue's lock: a
        // reply that finds no mark and nothing queued cannot overtake a drop another reply
        // is about to queue.
        let tx = inv.pages.lock().unwrap_or_else(|p| p.into_inner());
        let pages = self.cached.remove(&ino.0).is_some();
        if !pages && inv.queued.load(Ordering::Acquire) == 0 {
            drop(tx);
            // Attributes only: that waits for no page lock, so it may be done from here.
            drop_cached(&inv.notifier, ino, false);
            return reply.ioctl(&answer.bytes);
        }
        if pages {
            self.stats.entry(ino.0).or_default().invalidations += 1;
        }
        let job = Invalidate {
            ino,
            pages,
            reply,
            bytes: answer.bytes,
        };
        inv.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
            // The thread is gone: drop what can be dropped from here.
            inv.queued.fetch_sub(1, Ordering::Release);
            drop(tx);
            drop_cached(&inv.notifier, ino, false);
            job.reply.ioctl(&job.bytes);
        }
    }

    /// Replies with `result` (an answer or an errno).
    fn answer(&self, ino: Ino, result: Result<Answer, Errno>, reply: Reply) {
        match result {
            Ok(a) => self.reply(ino, a, reply),
            Err(e) => reply.error(e),
        }
    }

    /// Queues `work` for an offload worker, which replies with what it returns (EIO if it
    /// panics); EAGAIN at once if the user has too many jobs of this kind waiting.
    fn submit(self: &Arc<Self>, ino: Ino, later: Later, reply: Reply) {
        let me = self.clone();
        let Later { uid, kind, work } = later;
        let job: Job = Box::new(move |turn| {
            if turn == Turn::Refused {
                tracing::debug!(uid, ?kind, "offload queue full");
                return reply.error(Errno::EAGAIN);
            }
            let result = catch_unwind(AssertUnwindSafe(|| work(&me))).unwrap_or_else(|_| {
                tracing::error!("an offload job panicked; its caller gets EIO");
                Err(Errno::EIO)
            });
            me.answer(ino, result, reply);
        });
        match kind {
            Kind::Load => self.loaders.submit(uid, job),
            Kind::Run => self.runners.submit(uid, job),
        }
    }

    /// Handles one ioctl and replies, now or from a worker.
    pub fn ioctl(
        self: &Arc<Self>,
        caller: Caller,
        command: u32,
        input: &[u8],
        out_size: u32,
        reply: Reply,
    ) {
        let ino = caller.ino;
        let handled = catch_unwind(AssertUnwindSafe(|| {
            self.dispatch(caller, command, input, out_size)
        }));
        match handled {
            Ok(Dispatch::Now(result)) => self.answer(ino, result, reply),
            Ok(Dispatch::Later(later)) => self.submit(ino, later, reply),
            Err(_) => {
                tracing::error!(command, "an offload ioctl panicked; its caller gets EIO");
                // A writing run may have applied some of its writes: the next one drops
                // whatever pages the kernel holds of the file.
                self.may_cache(ino);
                reply.error(Errno::EIO);
            }
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        caller: Caller,
        command: u32,
        input: &[u8],
        out_size: u32,
    ) -> Dispatch {
        // Each struct's size, and its fixed fields only the daemon fills: they start at
        // zero, so that a reply never hands back what the caller left in them.
        let (size, outputs) = match command {
            cmd::VERSION => (cmd::VERSION_SIZE, 0..0),
            cmd::LOAD => (cmd::LOAD_SIZE, off::load::STATUS..off::load::NAME),
            cmd::LOG => (cmd::LOG_SIZE, off::log::LEN..off::log::TEXT),
            cmd::UNLOAD => (cmd::UNLOAD_SIZE, 0..0),
            cmd::LIST => (cmd::LIST_SIZE, off::list::NEXT..off::list::ENTRIES),
            cmd::RUN | cmd::RUN_SMALL => {
                let shape = RunShape::of(command).expect("a RUN command");
                (shape.size, off::run::OUT_LEN..off::run::ARG)
            }
            cmd::MORE => (cmd::MORE_SIZE, off::more::LEN..off::more::OUT),
            _ => return Dispatch::Now(Err(Errno::ENOTTY)),
        };
        if input.len() != size || out_size as usize != size {
            return Dispatch::Now(Err(bad()));
        }
        let mut b = input.to_vec();
        b[outputs].fill(0);
        let version = b.u32_at(off::VERSION);
        if command == cmd::VERSION {
            // Clients of version 1 were told `version` is an output, and may leave anything
            // in it: what is not a version this daemon speaks gets version 1's answer (a
            // newer client finds the rest in `flags`).
            let agreed = if abi::VERSIONS & 1u32.checked_shl(version).unwrap_or(0) != 0 {
                version
            } else {
                1
            };
            b.put_u32(off::VERSION, agreed);
            b.put_u32(off::FLAGS, abi::VERSIONS);
            return Dispatch::Now(Ok(Answer::plain(b)));
        }
        let since = RunShape::of(command).map_or(1, |s| s.since);
        if !(since..=abi::ABI_VERSION).contains(&version) {
            return Dispatch::Now(Err(Errno::EPROTO));
        }
        if self.settings.policy == Policy::Off {
            return Dispatch::Now(Err(Errno::EOPNOTSUPP));
        }
        self.expire();
        let now = |r: Result<(), Errno>, b: Vec<u8>| Dispatch::Now(r.map(|()| Answer::plain(b)));
        match command {
            cmd::LOAD => self.load(&caller, b),
            cmd::RUN | cmd::RUN_SMALL => {
                let shape = RunShape::of(command).expect("a RUN command");
                self.run(caller, b, shape)
            }
            cmd::LOG => {
                let r = self.log(&caller, &mut b);
                now(r, b)
            }
            cmd::UNLOAD => {
                let r = self.unload(&caller, &b);
                now(r, b)
            }
            cmd::LIST => {
                let r = self.list(&mut b);
                now(r, b)
            }
            _ => {
                let r = self.more(&caller, &mut b);
                now(r, b)
            }
        }
    }

    /// Drops what users left longer than `PENDING_FOR`; looks at most once a second.
    fn expire(&self) {
        {
            let Ok(mut last) = self.expired.try_lock() else {
                return;
            };
            if last.elapsed() < EXPIRE_EVERY {
                return;
            }
            *last = Instant::now();
        }
        let old: Vec<u64> = self
            .pending
            .iter()
            .filter(|h| h.since.elapsed() >= PENDING_FOR)
            .map(|h| *h.key())
            .collect();
        for token in old {
            self.release(token);
        }
    }

    /// Drops what a user left under `token`, refunding its bytes.
    fn release(&self, token: u64) {
        if let Some(held) = self.take(token) {
            self.users.refund(held.owner, held.what.size());
        }
    }

    /// Takes what a user left under `token`; its bytes stay charged.
    fn take(&self, token: u64) -> Option<Held> {
        let (_, held) = self.pending.remove(&token)?;
        self.users
            .usage(held.owner, |u| u.pending = u.pending.saturating_sub(1));
        Some(held)
    }

    /// Keeps `what` for `owner` (see [`Users::hold`]); the token to fetch it by.
    fn hold(&self, owner: u32, what: Pending, force: bool) -> Result<u64, Errno> {
        self.users.hold(owner, what.size(), force)?;
        let token = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(
            token,
            Held {
                owner,
                since: Instant::now(),
                what,
            },
        );
        Ok(token)
    }

    /// A LOAD chunk; the last one is verified and compiled by a worker.
    fn load(self: &Arc<Self>, caller: &Caller, mut b: Vec<u8>) -> Dispatch {
        let uid = caller.creds.uid;
        let mut session = b.u64_at(off::load::SESSION);
        let taken = (|| {
            let flags = b.u32_at(off::FLAGS);
            if flags & !abi::LOAD_LAST != 0 {
                return Err(bad());
            }
            let (at, len) = (
                b.u64_at(off::load::OFFSET),
                b.u32_at(off::load::LEN) as usize,
            );
            if len > abi::LOAD_CHUNK {
                return Err(bad());
            }
            if at.saturating_add(len as u64) > MAX_OBJECT {
                return Err(Errno::EFBIG);
            }
            let last = flags & abi::LOAD_LAST != 0;
            // A last chunk needs room for one more program: ask before anything.
            if last && self.users.usage(uid, |u| u.programs) >= self.settings.programs_per_user {
                return Err(Errno::EDQUOT);
            }
            if session == 0 {
                if at != 0 {
                    return Err(bad());
                }
                session = self.hold(uid, Pending::Upload { bytes: Vec::new() }, false)?;
            }
            {
                let mut held = self
                    .pending
                    .get_mut(&session)
                    .filter(|h| h.owner == uid)
                    .ok_or(Errno::ENOENT)?;
                let Pending::Upload { bytes } = &mut held.what else {
                    return Err(bad());
                };
                if at != bytes.len() as u64 {
                    return Err(bad());
                }
                self.users.charge(uid, len as u64)?;
                bytes.extend_from_slice(&b[off::load::DATA..off::load::DATA + len]);
                held.since = Instant::now();
            }
            Ok(last)
        })();
        let last = match taken {
            Ok(last) => last,
            Err(e) => {
                // An upload that went wrong is over: its bytes stop counting now, not
                // when it would expire.
                let ours = self
                    .pending
                    .get(&session)
                    .is_some_and(|h| h.owner == uid && matches!(h.what, Pending::Upload { .. }));
                if ours {
                    self.release(session);
                }
                return Dispatch::Now(Err(e));
            }
        };
        if !last {
            b.put_u64(off::load::SESSION, session);
            return Dispatch::Now(Ok(Answer::plain(b)));
        }
        // The object stays charged to the user until the program is built, or the job is
        // refused.
        let object = match self.take(session).map(|h| h.what) {
            Some(Pending::Upload { bytes }) => bytes,
            _ => return Dispatch::Now(Err(Errno::ENOENT)),
        };
        let charge = Charge {
            users: self.users.clone(),
            uid,
            bytes: object.len() as u64,
            program: false,
        };
        let name = b.str_at(off::load::NAME, abi::NAME_SIZE);
        Dispatch::Later(Later {
            uid,
            kind: Kind::Load,
            work: Box::new(move |me: &Arc<Offload>| {
                me.verify(uid, (object, charge), &name, &mut b)
                    .map(|()| Answer::plain(b))
            }),
        })
    }

    /// Verifies and compiles `object` for `uid` (on a worker) and fills in the LOAD reply.
    /// The object's bytes, charged to the user since they were uploaded, are given back
    /// once the program is built.
    fn verify(
        &self,
        uid: u32,
        object: (Vec<u8>, Charge),
        name: &str,
        b: &mut [u8],
    ) -> Result<(), Errno> {
        let name = (!name.is_empty()).then_some(name);
        let start = Instant::now();
        let loaded = Program::from_elf(&object.0, name, Mode::Checked);
        let load_time = start.elapsed();
        // The target verifies and compiles the object itself, from these bytes.
        let for_target = self
            .target
            .as_ref()
            .filter(|t| t.offers_appcode())
            .is_some();
        let (object, uploaded) = object;
        drop(uploaded);
        let object = for_target.then_some(object);
        let refused = |me: &Self, b: &mut [u8], text: String, status: i32| {
            let log_len = text.len() as u32;
            let token = me.hold(uid, Pending::Log { text }, false)?;
            b.put_u64(off::load::SESSION, token);
            b.put_i32(off::load::STATUS, status);
            b.put_u32(off::load::LOG_LEN, log_len);
            Ok(())
        };
        let program = match loaded {
            Ok(p) => p,
            Err(e) => {
                let status = match e {
                    ProgramError::Engine(_) => -libc::EIO,
                    _ => -libc::EINVAL,
                };
                return refused(self, b, e.to_string(), status);
            }
        };
        let remote = object.map(|o| RemoteProgram::new(program.name(), o));
        let bytes = (program.footprint() + remote.as_ref().map_or(0, |r| r.object_len())) as u64;
        let charge = match self.users.admit(uid, bytes) {
            Ok(c) => c,
            Err(held) => {
                let text = format!(
                    "{}: accepted, but it does not fit: it holds {bytes} bytes, and uid {uid} holds \
                 {} programs and {} bytes of the {} and {} allowed on this mount \
                 (offload_programs=, offload_bytes=); unload some first",
                    program.name(),
                    held.programs,
                    held.bytes,
                    self.settings.programs_per_user,
                    self.settings.bytes_per_user
                );
                return refused(self, b, text, -libc::EDQUOT);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(id, name = program.name(), uid, bytes, "program loaded");
        self.programs.insert(
            id,
            Arc::new(Loaded {
                program,
                remote,
                refused: Default::default(),
                owner: uid,
                charge,
                load_time,
            }),
        );
        b.put_u64(off::load::PROG_ID, id);
        b.put_i32(off::load::STATUS, 0);
        Ok(())
    }

    fn log(&self, caller: &Caller, b: &mut [u8]) -> Result<(), Errno> {
        let held = self
            .pending
            .get(&b.u64_at(off::log::SESSION))
            .filter(|h| h.owner == caller.creds.uid)
            .ok_or(Errno::ENOENT)?;
        let Pending::Log { text } = &held.what else {
            return Err(Errno::ENOENT);
        };
        let from = (b.u64_at(off::log::OFFSET) as usize).min(text.len());
        let piece = &text.as_bytes()[from..(from + abi::LOG_CHUNK).min(text.len())];
        b[off::log::TEXT..off::log::TEXT + piece.len()].copy_from_slice(piece);
        b.put_u32(off::log::LEN, piece.len() as u32);
        b.put_u32(off::log::TOTAL, text.len() as u32);
        Ok(())
    }

    fn unload(&self, caller: &Caller, b: &[u8]) -> Result<(), Errno> {
        let id = b.u64_at(off::unload::PROG_ID);
        let owner = self.programs.get(&id).ok_or(Errno::ENOENT)?.owner;
        if owner != caller.creds.uid && !caller.creds.is_root() {
            return Err(Errno::EPERM);
        }
        // Runs holding the program keep it, and its charge, until they finish.
        self.programs.remove(&id);
        Ok(())
    }

    fn list(&self, b: &mut [u8]) -> Result<(), Errno> {
        let cursor = b.u64_at(off::list::CURSOR);
        let mut ids: Vec<u64> = self
            .programs
            .iter()
            .map(|p| *p.key())
            .filter(|&id| id >= cursor)
            .collect();
        ids.sort_unstable();
        let mut count = 0;
        for &id in ids.iter().take(abi::LIST_ENTRIES) {
            let Some(p) = self.programs.get(&id) else {
                continue;
            };
            let e =
                &mut b[off::list::ENTRIES + count * cmd::LIST_ENTRY_SIZE..][..cmd::LIST_ENTRY_SIZE];
            e.put_u64(off::list::E_ID, id);
            e.put_u32(off::list::E_OWNER, p.owner);
            e.put_u32(off::list::E_INSNS, p.program.insns().len() as u32);
            e.put_u64(off::list::E_MAX_INSNS, p.program.verified().max_insns);
            e.put_str(off::list::E_NAME, abi::NAME_SIZE, p.program.name());
            count += 1;
        }
        b.put_u32(off::list::COUNT, count as u32);
        let next = ids.get(abi::LIST_ENTRIES).copied().unwrap_or(0);
        b.put_u64(off::list::NEXT, next);
        Ok(())
    }

    /// May this caller run offload on its file, reading (and writing)?
    fn allowed(&self, caller: &Caller, write: bool) -> Result<(), Errno> {
        match caller.kind {
            FileKind::RegularFile => {}
            FileKind::Directory => return Err(Errno::EISDIR),
            _ => return Err(bad()),
        }
        if !caller.mode.read || write && !caller.mode.write {
            return Err(Errno::EBADF);
        }
        if write && self.settings.policy == Policy::ReadOnly {
            return Err(Errno::EROFS);
        }
        let mask = MAY_READ | if write { MAY_WRITE } else { 0 };
        self.fs
            .access(&caller.creds, caller.ino, mask)
            .map_err(|e| errno(&e))?;
        // The owner's policy; a value that is not one (set before values were checked)
        // forbids, as does failing to read it.
        let policy = match self.fs.getxattr(&Creds::root(), caller.ino, POLICY_XATTR) {
            Ok(v) => std::str::from_utf8(&v).ok().and_then(Policy::parse),
            Err(FsError::NoAttribute) => Some(Policy::ReadWrite),
            Err(_) => None,
        };
        match policy {
            Some(Policy::ReadWrite) => Ok(()),
            Some(Policy::ReadOnly) if !write => Ok(()),
            _ => Err(Errno::EPERM),
        }
    }

    /// A RUN, in a struct of `shape`: checked here; run here if the runners give room
    /// ([`Workers::here`]), else queued for one.
    fn run(self: &Arc<Self>, caller: Caller, b: Vec<u8>, shape: RunShape) -> Dispatch {
        let started = Instant::now();
        let checked = (|| {
            let flags = b.u32_at(off::FLAGS);
            if flags & !abi::RUN_WRITE != 0 {
                return Err(bad());
            }
            let write = flags & abi::RUN_WRITE != 0;
            let loaded = self
                .programs
                .get(&b.u64_at(off::run::PROG_ID))
                .map(|p| p.clone())
                .ok_or(Errno::ENOENT)?;
            if b.u32_at(off::run::ARG_LEN) as usize > shape.arg {
                return Err(Errno::E2BIG);
            }
            Ok((write, loaded))
        })();
        let (write, loaded) = match checked {
            Ok(c) => c,
            Err(e) => return Dispatch::Now(Err(e)),
        };
        if let Some(_here) = self.runners.here(caller.creds.uid) {
            let mut b = b;
            let answer = self
                .execute(&caller, &loaded, write, started, shape, &mut b)
                .map(|wrote| Answer { bytes: b, wrote });
            return Dispatch::Now(answer);
        }
        Dispatch::Later(Later {
            uid: caller.creds.uid,
            kind: Kind::Run,
            work: Box::new(move |me: &Arc<Offload>| {
                let mut b = b;
                let wrote = me.execute(&caller, &loaded, write, started, shape, &mut b)?;
                Ok(Answer { bytes: b, wrote })
            }),
        })
    }

    /// Runs a program (on this thread); returns whether it wrote the file.
    fn execute(
        &self,
        caller: &Caller,
        loaded: &Loaded,
        write: bool,
        started: Instant,
        shape: RunShape,
        b: &mut [u8],
    ) -> Result<bool, Errno> {
        // Checked when the run starts, not when it was asked for: a queued run may wait
        // while the owner forbids offload or the mode changes.
        self.allowed(caller, write)?;
        let arg_len = b.u32_at(off::run::ARG_LEN) as usize;
        let start = b.u64_at(off::run::RANGE_OFF);
        let len = b.u64_at(off::run::RANGE_LEN);
        let uid = caller.creds.uid;
        let arg = b[off::run::ARG..off::run::ARG + arg_len].to_vec();
        let mut limits = self.limits;
        if write {
            limits.wall = limits.wall.min(WRITE_RUN_WALL);
        }
        // Output that does not fit one reply is held until fetched: it must fit the user's
        // bytes, so the run is not allowed to make more than is left now (see below for
        // runs at once).
        let room = self
            .settings
            .bytes_per_user
            .saturating_sub(self.users.usage(uid, |u| u.bytes));
        limits.output_bytes = limits.output_bytes.min(room.max(shape.out as u64));
        let req = Request { arg: &arg, limits };
        let outcome = self
            .fs
            .in_place(caller.ino, write, |data| {
                let Some(end) = abi::range_end(start, len, data.size) else {
                    return (Err(Errno::EOVERFLOW), false);
                };
                let extents: Vec<Extent> = data
                    .extents
                    .iter()
                    .map(|e| Extent {
                        file_off: e.file.0 * BLOCK_SIZE,
                        dev_off: e.dev.0 * BLOCK_SIZE,
                        len: e.len * BLOCK_SIZE,
                        unwritten: e.unwritten,
                    })
                    .collect();
                let (r, remote) =
                    self.run_somewhere(loaded, &extents, data, start..end, write, &req);
                // A device error while applying writes may leave some applied.
                let wrote = match &r {
                    Ok(o) => !o.written.is_empty(),
                    Err(RunError::Io(_)) => write,
                    Err(_) => false,
                };
                (Ok((r, remote, wrote)), wrote)
            })
            .map_err(|e| errno(&e))??;
        let (outcome, remote, wrote) = outcome;
        // Output past the first reply is held until fetched, charged to the user now. Runs
        // at once each saw the room left before any of them ended: a reading run whose
        // output no longer fits fails (it changed nothing); a writing run's is kept past
        // the limits, as its writes are applied. A user has at most `offload_runs` runs
        // going, so that passes the limits by as many outputs at most.
        let outcome = outcome.and_then(|mut out| {
            let len = out.output.len();
            let first = len.min(shape.out);
            let at = shape.out_at();
            b[at..at + first].copy_from_slice(&out.output[..first]);
            if len == first {
                return Ok((out, len, 0));
            }
            let rest = Pending::Output {
                bytes: std::mem::take(&mut out.output),
                at: first,
            };
            match self.hold(uid, rest, write) {
                Ok(token) => Ok((out, len, token)),
                Err(_) => Err(RunError::OutputLimit {
                    limit: self.settings.bytes_per_user,
                }),
            }
        });
        let mut stats = self.stats.entry(caller.ino.0).or_default();
        stats.runs += 1;
        stats.remote_runs += u64::from(remote);
        stats.run_ns += started.elapsed().as_nanos() as u64;
        match outcome {
            Ok((out, len, more)) => {
                // Costs a target reported are its word: counters saturate.
                stats.hops = stats.hops.saturating_add(out.costs.hops);
                stats.device_bytes = stats.device_bytes.saturating_add(out.costs.device_bytes);
                stats.insns = stats.insns.saturating_add(out.costs.insns);
                stats.bytes_returned += len as u64;
                drop(stats);
                put_costs(b, &out.costs);
                b.put_u64(off::run::RESULT, out.result);
                b.put_i32(off::run::STATUS, 0);
                b.put_u32(off::run::OUT_LEN, len.min(shape.out) as u32);
                b.put_u64(off::run::MORE, more);
                Ok(wrote)
            }
            Err(e) => {
                stats.failures += 1;
                drop(stats);
                let (kind, errno) = classify(&e);
                match kind {
                    run_error::ACCESS | run_error::FAULT => {
                        tracing::warn!(error = %e, uid, "run stopped by the engine")
                    }
                    _ => tracing::debug!(error = %e, "run failed"),
                }
                b.put_i32(off::run::STATUS, -errno);
                b.put_u32(off::run::RUN_ERROR, kind);
                // What a failed write may have reached is dropped from the page cache too.
                Ok(wrote)
            }
        }
    }

    /// Runs a program at the storage target when there is one that runs appcode, else
    /// here; says which. A program the target refuses runs here, and the daemon says so
    /// once.
    fn run_somewhere(
        &self,
        loaded: &Loaded,
        extents: &[Extent],
        data: &extents::InPlace<'_>,
        range: std::ops::Range<u64>,
        write: bool,
        req: &Request<'_>,
    ) -> (Result<appcode::Outcome, RunError>, bool) {
        if let (Some(target), Some(program)) = (&self.target, &loaded.remote) {
            let world = RemoteWorld {
                extents,
                file_size: data.size,
                range: range.clone(),
                writable: write,
            };
            match target.run(program, world, req) {
                Ok(r) => return (r, true),
                Err(NotAtTarget::Refused(why)) => {
                    if !loaded.refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            program = loaded.program.name(),
                            why,
                            "the target refused the program; it runs in the daemon"
                        );
                    }
                }
                Err(NotAtTarget::Unsupported) => {}
            }
        }
        let world = World {
            device: data.device,
            extents,
            file_size: data.size,
            range,
            writable: write,
        };
        (loaded.program.run(world, req), false)
    }

    fn more(&self, caller: &Caller, b: &mut [u8]) -> Result<(), Errno> {
        let token = b.u64_at(off::more::TOKEN);
        let mut held = self
            .pending
            .get_mut(&token)
            .filter(|h| h.owner == caller.creds.uid)
            .ok_or(Errno::ENOENT)?;
        let Pending::Output { bytes, at } = &mut held.what else {
            return Err(Errno::ENOENT);
        };
        let n = (bytes.len() - *at).min(abi::OUT_CHUNK);
        b[off::more::OUT..off::more::OUT + n].copy_from_slice(&bytes[*at..*at + n]);
        *at += n;
        let left = bytes.len() - *at;
        b.put_u32(off::more::LEN, n as u32);
        b.put_u32(off::more::LEFT, left.min(u32::MAX as usize) as u32);
        drop(held);
        if left == 0 {
            self.release(token);
        }
        Ok(())
    }

    /// The kernel forgot `ino`: if that was its end, its counters go too.
    /// The kernel dropped references to `ino`.
    pub fn forget(&self, ino: Ino) {
        // An evicted inode's pages went with it. A FORGET can arrive after a new lookup
        // and reads of the same inode, which hold a reference: then the mark stays. The
        // lookup counts its reference before a read can set the mark, and the count is
        // looked at under the mark's lock.
        self.cached
            .remove_if(&ino.0, |_, _| !self.fs.referenced_by_kernel(ino));
        if self.stats.contains_key(&ino.0) && self.fs.getattr(ino).is_err() {
            self.stats.remove(&ino.0);
        }
    }

    /// `user.nearfs.stats` of a file.
    pub fn file_stats(&self, ino: Ino) -> String {
        let s = self.stats.get(&ino.0).map(|s| *s).unwrap_or_default();
        format!(
            "runs={} failures={} hops={} device_bytes={} bytes_returned={} insns={} \
             remote_runs={} invalidations={} run_ns={}",
            s.runs,
            s.failures,
            s.hops,
            s.device_bytes,
            s.bytes_returned,
            s.insns,
            s.remote_runs,
            s.invalidations,
            s.run_ns
        )
    }

    /// The offload part of `user.nearfs.fs`: the mount's settings and what is held.
    pub fn facts(&self) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let held = self.users.total();
        let mut facts = vec![
            ("offload", s.policy.as_str().to_string()),
            ("offload_engine", "checked".to_string()),
            ("offload_runs", s.runs_per_user.to_string()),
            ("offload_programs", s.programs_per_user.to_string()),
            ("offload_bytes", s.bytes_per_user.to_string()),
            ("offload_workers", s.workers.to_string()),
            ("programs_loaded", self.programs.len().to_string()),
            ("offload_bytes_held", held.to_string()),
        ];
        if let Some(t) = &self.target {
            let c = t.counters();
            let (sent, received) = (
                c.sent.load(Ordering::Relaxed),
                c.received.load(Ordering::Relaxed),
            );
            facts.extend([
                ("device", t.url().to_string()),
                (
                    "target_offload",
                    if t.offers_appcode() { "yes" } else { "no" }.to_string(),
                ),
                (
                    "nbd_requests",
                    c.requests.load(Ordering::Relaxed).to_string(),
                ),
                ("nbd_bytes", (sent + received).to_string()),
                ("nbd_bytes_sent", sent.to_string()),
                ("nbd_bytes_received", received.to_string()),
                (
                    "nbd_connects",
                    c.connects.load(Ordering::Relaxed).to_string(),
                ),
            ]);
        }
        facts
    }

    /// `user.nearfs.programs` on the root: the loaded programs.
    pub fn programs(&self) -> String {
        let mut ids: Vec<u64> = self.programs.iter().map(|p| *p.key()).collect();
        ids.sort_unstable();
        let mut out = String::new();
        for id in ids {
            let Some(p) = self.programs.get(&id) else {
                continue;
            };
            let v = p.program.verified();
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(
                out,
                "id={id} name={} owner={} insns={} max_insns={} verify_states={} load_us={} \
                 compile_us={} bytes={}",
                p.program.name(),
                p.owner,
                p.program.insns().len(),
                v.max_insns,
                v.states,
                p.load_time.as_micros(),
                p.program.compile_time().as_micros(),
                p.charge.bytes
            );
        }
        out
    }
}

/// What a worker does for an ioctl; what it returns is the reply.
type Work = Box<dyn FnOnce(&Arc<Offload>) -> Result<Answer, Errno> + Send>;

/// Work for an offload worker, for user `uid`.
struct Later {
    uid: u32,
    kind: Kind,
    work: Work,
}

/// Which workers a job waits for: loads and runs never wait for each other.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Load,
    Run,
}

/// What to do with an ioctl: reply now, or on a worker.
enum Dispatch {
    Now(Result<Answer, Errno>),
    Later(Later),
}

fn put_costs(b: &mut [u8], c: &appcode::Costs) {
    b.put_u64(off::run::INSNS, c.insns);
    b.put_u64(off::run::HOPS, c.hops);
    b.put_u64(off::run::DEVICE_BYTES, c.device_bytes);
    b.put_u64(off::run::OUTPUT_BYTES, c.output_bytes);
}

/// The ABI's code and an errno for a failed run.
fn classify(e: &RunError) -> (u32, i32) {
    match e {
        RunError::InsnLimit { .. } => (run_error::INSNS, libc::EDQUOT),
        RunError::HopLimit { .. } => (run_error::HOPS, libc::EDQUOT),
        RunError::DeviceBytesLimit { .. } => (run_error::DEVICE_BYTES, libc::EDQUOT),
        RunError::OutputLimit { .. } => (run_error::OUTPUT_BYTES, libc::E2BIG),
        RunError::WriteLimit { .. } => (run_error::WRITE_BYTES, libc::EDQUOT),
        RunError::Timeout { .. } => (run_error::TIMEOUT, libc::ETIME),
        RunError::OutOfRange { .. } => (run_error::OUT_OF_RANGE, libc::ERANGE),
        RunError::ArgTooLarge { .. } => (run_error::ARG, libc::E2BIG),
        RunError::Io(_) => (run_error::IO, libc::EIO),
        RunError::Access { .. } => (run_error::ACCESS, libc::EFAULT),
        _ => (run_error::FAULT, libc::EFAULT),
    }
}
