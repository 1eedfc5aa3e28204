//! The offload ioctls: loading appcode into the daemon and running it over a file's own
//! extents (DESIGN.md, "The path of one offload call"; wire format in
//! `nearfs_client::abi`).
//!
//! Who may do what:
//! - any user may load programs (they are verified; loading is not a privilege) on any
//!   open file or directory of the mount, and list them; only the loader or root may
//!   unload one;
//! - a run needs an open handle of the file itself: readable always, writable and the
//!   write flag to let the program write. The caller's credentials (uid, gid, groups from
//!   /proc, as for every request) must allow the same access now. The file's owner can
//!   forbid offload with `user.nearfs.offload=off` (or allow only reading with `ro`); the
//!   mount can with `-o offload=off|ro`. Each user has at most `offload_runs` runs going;
//! - a run sees the extents of that file, its requested range only, under the
//!   filesystem's lock: shared for reading runs, exclusive for writing ones, so a
//!   read-modify-write is atomic against `write()` and other runs. What it wrote is
//!   dropped from the kernel's page cache before the ioctl returns: the reply goes through
//!   the invalidation thread, never from a FUSE worker, because invalidating waits for
//!   page locks that an in-flight `write()` holds until a worker serves it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use appcode::{Extent, Limits, Mode, Program, ProgramError, Request, RunError, World};
use dashmap::DashMap;
use extents::{BLOCK_SIZE, Creds, FileKind, Fs, Ino, OpenMode};
use fuser::{Errno, INodeNo, Notifier, ReplyIoctl};
use nearfs_client::abi::{self, Fields, FieldsMut, cmd, off, run_error};

use crate::errno::errno;

/// The name of the owner's policy attribute.
pub const POLICY_XATTR: &[u8] = b"user.nearfs.offload";
/// Largest object one may load.
const MAX_OBJECT: u64 = 16 << 20;
/// Unfinished uploads, rejection logs and unread outputs kept per user.
const MAX_PENDING_PER_USER: usize = 16;
/// How long an upload, a log or an unread output is kept.
const PENDING_FOR: Duration = Duration::from_secs(60);
/// Wall-clock limit of a writing run: it holds the filesystem's exclusive lock, so every
/// other request waits for it. Reading runs get appcode's default (10 s).
const WRITE_RUN_WALL: Duration = Duration::from_secs(1);

/// What the mount allows (`-o offload=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Off,
    ReadOnly,
    ReadWrite,
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
    /// Time the daemon spent on runs, from a RUN request's arrival here to the end of the run
    /// (access checks, waiting for the lock, reads and execution; not the FUSE crossing).
    pub run_ns: u64,
}

struct Loaded {
    program: Program,
    owner: u32,
    verify_time: Duration,
}

/// Something a user left in the daemon between ioctls.
enum Pending {
    Upload { bytes: Vec<u8> },
    Log { text: String },
    Output { bytes: Vec<u8>, at: usize },
}

struct Held {
    owner: u32,
    since: Instant,
    what: Pending,
}

/// The caller of one ioctl.
pub struct Caller<'a> {
    pub creds: &'a Creds,
    pub ino: Ino,
    pub kind: FileKind,
    pub mode: OpenMode,
}

pub struct Offload {
    fs: Arc<Fs>,
    policy: Policy,
    runs_per_user: u32,
    mode: Mode,
    limits: Limits,
    programs: DashMap<u64, Arc<Loaded>>,
    pending: DashMap<u64, Held>,
    next_id: AtomicU64,
    running: Mutex<BTreeMap<u32, u32>>,
    stats: DashMap<u64, FileStats>,
    invalidator: OnceLock<Mutex<Sender<Invalidate>>>,
}

/// A reply to send once file ranges are dropped from the kernel's page cache.
struct Invalidate {
    ino: Ino,
    ranges: Vec<std::ops::Range<u64>>,
    reply: ReplyIoctl,
    bytes: Vec<u8>,
}

/// The reply to an ioctl, and the file ranges to invalidate before sending it.
pub struct Answer {
    pub bytes: Vec<u8>,
    pub written: Vec<std::ops::Range<u64>>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("policy", &self.policy)
            .field("programs", &self.programs.len())
            .finish()
    }
}

/// Counts a user's run while it goes.
struct RunSlot<'a> {
    running: &'a Mutex<BTreeMap<u32, u32>>,
    uid: u32,
}

impl Drop for RunSlot<'_> {
    fn drop(&mut self) {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = r.get_mut(&self.uid) {
            *n -= 1;
        }
    }
}

fn bad() -> Errno {
    Errno::EINVAL
}

impl Offload {
    pub fn new(fs: Arc<Fs>, policy: Policy, runs_per_user: u32) -> Offload {
        Offload {
            fs,
            policy,
            runs_per_user,
            mode: Mode::Checked,
            limits: Limits::default(),
            programs: DashMap::new(),
            pending: DashMap::new(),
            next_id: AtomicU64::new(1),
            running: Mutex::new(BTreeMap::new()),
            stats: DashMap::new(),
            invalidator: OnceLock::new(),
        }
    }

    /// Starts the thread that drops what runs wrote from the kernel's page cache and then
    /// replies. Without it (before the session exists) replies go out at once.
    pub fn set_notifier(&self, n: Notifier) -> std::io::Result<()> {
        let (tx, rx) = channel::<Invalidate>();
        std::thread::Builder::new()
            .name("nearfs-invalidate".into())
            .spawn(move || {
                for job in rx {
                    for r in &job.ranges {
                        let (at, len) = (r.start as i64, (r.end - r.start) as i64);
                        if let Err(e) = n.inval_inode(INodeNo(job.ino.0), at, len) {
                            tracing::warn!(error = %e, "page cache invalidation failed");
                        }
                    }
                    job.reply.ioctl(0, &job.bytes);
                }
            })?;
        let _ = self.invalidator.set(Mutex::new(tx));
        Ok(())
    }

    /// Sends an answer: at once, or after invalidating what the run wrote.
    pub fn reply(&self, ino: Ino, answer: Answer, reply: ReplyIoctl) {
        let Some(tx) = self
            .invalidator
            .get()
            .filter(|_| !answer.written.is_empty())
        else {
            return reply.ioctl(0, &answer.bytes);
        };
        let job = Invalidate {
            ino,
            ranges: answer.written,
            reply,
            bytes: answer.bytes,
        };
        let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
            job.reply.ioctl(0, &job.bytes);
        }
    }

    /// Handles one ioctl; the answer is the struct to copy back.
    pub fn ioctl(&self, caller: &Caller<'_>, command: u32, input: &[u8]) -> Result<Answer, Errno> {
        let size = match command {
            cmd::VERSION => cmd::VERSION_SIZE,
            cmd::LOAD => cmd::LOAD_SIZE,
            cmd::LOG => cmd::LOG_SIZE,
            cmd::UNLOAD => cmd::UNLOAD_SIZE,
            cmd::LIST => cmd::LIST_SIZE,
            cmd::RUN => cmd::RUN_SIZE,
            cmd::MORE => cmd::MORE_SIZE,
            _ => return Err(Errno::ENOTTY),
        };
        if input.len() != size {
            return Err(bad());
        }
        let mut b = input.to_vec();
        let mut written = Vec::new();
        if command == cmd::VERSION {
            b.put_u32(off::VERSION, abi::ABI_VERSION);
            return Ok(Answer { bytes: b, written });
        }
        if b.u32_at(off::VERSION) != abi::ABI_VERSION {
            return Err(Errno::EPROTO);
        }
        if self.policy == Policy::Off {
            return Err(Errno::EOPNOTSUPP);
        }
        self.expire();
        match command {
            cmd::LOAD => self.load(caller, &mut b)?,
            cmd::LOG => self.log(caller, &mut b)?,
            cmd::UNLOAD => self.unload(caller, &b)?,
            cmd::LIST => self.list(&mut b)?,
            cmd::RUN => written = self.run(caller, &mut b)?,
            _ => self.more(caller, &mut b)?,
        }
        Ok(Answer { bytes: b, written })
    }

    fn expire(&self) {
        self.pending.retain(|_, h| h.since.elapsed() < PENDING_FOR);
    }

    /// Keeps `what` for `owner`; the token to fetch it by.
    fn hold(&self, owner: u32, what: Pending) -> Result<u64, Errno> {
        let mine = self.pending.iter().filter(|h| h.owner == owner).count();
        if mine >= MAX_PENDING_PER_USER {
            return Err(Errno::EAGAIN);
        }
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

    fn load(&self, caller: &Caller<'_>, b: &mut [u8]) -> Result<(), Errno> {
        let uid = caller.creds.uid;
        let flags = b.u32_at(off::FLAGS);
        if flags & !abi::LOAD_LAST != 0 {
            return Err(bad());
        }
        let (session, at, len) = (
            b.u64_at(off::load::SESSION),
            b.u64_at(off::load::OFFSET),
            b.u32_at(off::load::LEN) as usize,
        );
        if len > abi::LOAD_CHUNK || at.saturating_add(len as u64) > MAX_OBJECT {
            return Err(if len > abi::LOAD_CHUNK {
                bad()
            } else {
                Errno::EFBIG
            });
        }
        let chunk = b[off::load::DATA..off::load::DATA + len].to_vec();
        let session = if session == 0 {
            if at != 0 {
                return Err(bad());
            }
            self.hold(uid, Pending::Upload { bytes: Vec::new() })?
        } else {
            session
        };
        let object = {
            let mut held = self.pending.get_mut(&session).ok_or(Errno::ENOENT)?;
            if held.owner != uid {
                return Err(Errno::ENOENT);
            }
            held.since = Instant::now();
            let Pending::Upload { bytes } = &mut held.what else {
                return Err(bad());
            };
            if at != bytes.len() as u64 {
                return Err(bad());
            }
            bytes.extend_from_slice(&chunk);
            if flags & abi::LOAD_LAST == 0 {
                b.put_u64(off::load::SESSION, session);
                return Ok(());
            }
            std::mem::take(bytes)
        };
        self.pending.remove(&session);
        let name = b.str_at(off::load::NAME, abi::NAME_SIZE);
        let name = (!name.is_empty()).then_some(name);
        let start = Instant::now();
        match Program::from_elf(&object, name.as_deref(), self.mode) {
            Ok(program) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id, name = program.name(), uid, "program loaded");
                self.programs.insert(
                    id,
                    Arc::new(Loaded {
                        program,
                        owner: uid,
                        verify_time: start.elapsed(),
                    }),
                );
                b.put_u64(off::load::PROG_ID, id);
                b.put_i32(off::load::STATUS, 0);
            }
            Err(e) => {
                let text = e.to_string();
                let status = match e {
                    ProgramError::Engine(_) => -libc::EIO,
                    _ => -libc::EINVAL,
                };
                let log_len = text.len() as u32;
                let token = self.hold(uid, Pending::Log { text })?;
                b.put_u64(off::load::SESSION, token);
                b.put_i32(off::load::STATUS, status);
                b.put_u32(off::load::LOG_LEN, log_len);
            }
        }
        Ok(())
    }

    fn log(&self, caller: &Caller<'_>, b: &mut [u8]) -> Result<(), Errno> {
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

    fn unload(&self, caller: &Caller<'_>, b: &[u8]) -> Result<(), Errno> {
        let id = b.u64_at(off::unload::PROG_ID);
        let owner = self.programs.get(&id).ok_or(Errno::ENOENT)?.owner;
        if owner != caller.creds.uid && !caller.creds.is_root() {
            return Err(Errno::EPERM);
        }
        // Runs holding the program keep it until they finish.
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
    fn allowed(&self, caller: &Caller<'_>, write: bool) -> Result<(), Errno> {
        match caller.kind {
            FileKind::RegularFile => {}
            FileKind::Directory => return Err(Errno::EISDIR),
            _ => return Err(bad()),
        }
        if !caller.mode.read || write && !caller.mode.write {
            return Err(Errno::EBADF);
        }
        if write && self.policy == Policy::ReadOnly {
            return Err(Errno::EROFS);
        }
        let mask = 4 | if write { 2 } else { 0 };
        self.fs
            .access(caller.creds, caller.ino, mask)
            .map_err(|e| errno(&e))?;
        match self.fs.getxattr(&Creds::root(), caller.ino, POLICY_XATTR) {
            Ok(v) if v == b"off" => Err(Errno::EPERM),
            Ok(v) if v == b"ro" && write => Err(Errno::EPERM),
            _ => Ok(()),
        }
    }

    /// Runs a program; returns the file ranges it wrote.
    fn run(&self, caller: &Caller<'_>, b: &mut [u8]) -> Result<Vec<std::ops::Range<u64>>, Errno> {
        let started = Instant::now();
        let flags = b.u32_at(off::FLAGS);
        if flags & !abi::RUN_WRITE != 0 {
            return Err(bad());
        }
        let write = flags & abi::RUN_WRITE != 0;
        self.allowed(caller, write)?;
        let loaded = self
            .programs
            .get(&b.u64_at(off::run::PROG_ID))
            .map(|p| p.clone())
            .ok_or(Errno::ENOENT)?;
        let arg_len = b.u32_at(off::run::ARG_LEN) as usize;
        if arg_len > abi::ARG_SIZE {
            return Err(Errno::E2BIG);
        }
        let start = b.u64_at(off::run::RANGE_OFF);
        let len = b.u64_at(off::run::RANGE_LEN);
        let uid = caller.creds.uid;
        let _slot = self.take_slot(uid)?;
        let arg = b[off::run::ARG..off::run::ARG + arg_len].to_vec();
        let mut limits = self.limits;
        if write {
            limits.wall = limits.wall.min(WRITE_RUN_WALL);
        }
        let req = Request { arg: &arg, limits };
        let outcome = self
            .fs
            .in_place(caller.ino, write, |data| {
                let end = if len == abi::RANGE_TO_END {
                    Some(data.size.max(start))
                } else {
                    start.checked_add(len)
                };
                let Some(end) = end else {
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
                let world = World {
                    device: data.device,
                    extents: &extents,
                    file_size: data.size,
                    range: start..end,
                    writable: write,
                };
                let r = loaded.program.run(world, &req);
                let wrote = matches!(&r, Ok(o) if !o.written.is_empty());
                (Ok(r), wrote)
            })
            .map_err(|e| errno(&e))??;
        let mut stats = self.stats.entry(caller.ino.0).or_default();
        stats.runs += 1;
        stats.run_ns += started.elapsed().as_nanos() as u64;
        match outcome {
            Ok(out) => {
                stats.hops += out.costs.hops;
                stats.device_bytes += out.costs.device_bytes;
                stats.insns += out.costs.insns;
                stats.bytes_returned += out.output.len() as u64;
                drop(stats);
                put_costs(b, &out.costs);
                b.put_u64(off::run::RESULT, out.result);
                b.put_i32(off::run::STATUS, 0);
                let first = out.output.len().min(abi::OUT_CHUNK);
                b[off::run::OUT..off::run::OUT + first].copy_from_slice(&out.output[..first]);
                b.put_u32(off::run::OUT_LEN, first as u32);
                if out.output.len() > first {
                    let token = self.hold(
                        uid,
                        Pending::Output {
                            bytes: out.output,
                            at: first,
                        },
                    )?;
                    b.put_u64(off::run::MORE, token);
                }
                Ok(out.written)
            }
            Err(e) => {
                stats.failures += 1;
                drop(stats);
                let (kind, errno) = classify(&e);
                tracing::debug!(error = %e, "run failed");
                b.put_i32(off::run::STATUS, -errno);
                b.put_u32(off::run::RUN_ERROR, kind);
                Ok(Vec::new())
            }
        }
    }

    fn take_slot(&self, uid: u32) -> Result<RunSlot<'_>, Errno> {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = r.entry(uid).or_default();
        if *n >= self.runs_per_user {
            return Err(Errno::EAGAIN);
        }
        *n += 1;
        Ok(RunSlot {
            running: &self.running,
            uid,
        })
    }

    fn more(&self, caller: &Caller<'_>, b: &mut [u8]) -> Result<(), Errno> {
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
            self.pending.remove(&token);
        }
        Ok(())
    }

    /// `user.nearfs.stats` of a file.
    pub fn file_stats(&self, ino: Ino) -> String {
        let s = self.stats.get(&ino.0).map(|s| *s).unwrap_or_default();
        format!(
            "runs={} failures={} hops={} device_bytes={} bytes_returned={} insns={} run_ns={}",
            s.runs, s.failures, s.hops, s.device_bytes, s.bytes_returned, s.insns, s.run_ns
        )
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
                "id={id} name={} owner={} insns={} max_insns={} verify_states={} verify_us={}",
                p.program.name(),
                p.owner,
                p.program.insns().len(),
                v.max_insns,
                v.states,
                p.verify_time.as_micros()
            );
        }
        out
    }
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
        RunError::Timeout { .. } => (run_error::TIMEOUT, libc::ETIME),
        RunError::OutOfRange { .. } => (run_error::OUT_OF_RANGE, libc::ERANGE),
        RunError::ArgTooLarge { .. } => (run_error::ARG, libc::E2BIG),
        RunError::Io(_) => (run_error::IO, libc::EIO),
        _ => (run_error::FAULT, libc::EFAULT),
    }
}
