//! FUSE over io_uring (Linux 6.14 and later, with `fuse.enable_uring=1`).
//!
//! The kernel keeps one request queue per possible CPU and puts each request on the
//! queue of the CPU its caller runs on. Each queue here has threads pinned to that CPU,
//! each with an io_uring of its own and entries registered on the queue: a
//! header buffer and a payload buffer the kernel copies a request into, and the daemon
//! writes the reply into before it commits it (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`,
//! which also asks for the next request). A caller and the thread that serves it share a
//! CPU, so a round trip is two context switches and no CPU has to be woken.
//!
//! An entry is held from the request until its reply, and a reply may come later from
//! another thread: an offload run's reply waits for the kernel to drop the file's pages,
//! which can wait for a `write()` whose request is still on its way. That request needs
//! a free entry on its queue. So a thread never waits with none: whenever all of its
//! ring's entries are held, it registers one more (up to [`MAX_ENTRIES`]).
//!
//! The layouts are the kernel's (`include/uapi/linux/fuse.h`, `io_uring.h`); how each is
//! used is in `docs/fuse.md`. FORGET, INTERRUPT and every request sent before all queues
//! are registered still come through `/dev/fuse`, which the session keeps serving.
//!
//! Ownership of an entry's buffers moves with its state: the kernel owns them from
//! submission until the completion that hands over a request; then the queue thread
//! copies the request out, and the [`Entry`] given to the reply owns them until it
//! commits. Nothing else touches them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::abi::op;
use super::{Handler, Sender, abi, dispatch};

/// Most entries one ring registers. Entries beyond the first are made only while replies
/// held elsewhere keep all the others (their buffers are mapped lazily).
pub const MAX_ENTRIES: usize = 256;

// io_uring (include/uapi/linux/io_uring.h).
const SETUP_SQE128: u32 = 1 << 10;
const SETUP_CQSIZE: u32 = 1 << 3;
const OP_URING_CMD: u8 = 46;
const ENTER_GETEVENTS: u32 = 1;
const OFF_SQ_RING: i64 = 0;
const OFF_CQ_RING: i64 = 0x800_0000;
const OFF_SQES: i64 = 0x1000_0000;
const FEAT_SINGLE_MMAP: u32 = 1;
const SQE_SIZE: usize = 128;
const CQE_SIZE: usize = 16;

// FUSE over io_uring (include/uapi/linux/fuse.h).
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in_out[128], op_in[128], ring_ent_in_out[32].
const HEADER_SIZE: usize = 288;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
/// Where the payload starts in an entry's memory: a page in, so that the request's
/// header and first argument can be put right before it (see [`Ring::request`]).
const PAYLOAD_AT: usize = 4096;

/// `struct io_uring_params`, 120 bytes.
#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: [u32; 10],
    cq_off: [u32; 10],
}

/// A memory mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: RawFd, offset: i64, len: usize) -> io::Result<Map> {
        let (prot, flags) = (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
        );
        let (flags, fd) = if fd < 0 {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
        } else {
            (flags, fd)
        };
        // SAFETY: a fresh mapping; the kernel checks fd, offset and length.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A pointer `off` bytes in, as `T`.
    fn at<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + size_of::<T>() <= self.len);
        // SAFETY: off is within the mapping (every caller's offset comes from the kernel's
        // ring layout or this module's own, both inside the length mapped).
        unsafe { self.ptr.add(off).cast() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The submission side of a ring: taken under a lock by whoever submits.
struct Submit {
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_array: *mut u32,
    sqes: Map,
}

/// One io_uring with its registered entries.
struct Ring {
    fd: OwnedFd,
    /// The /dev/fuse descriptor the commands go to.
    dev: RawFd,
    qid: u16,
    submit: Mutex<Submit>,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const u8,
    /// The SQ and CQ rings (one mapping, or two).
    _rings: Vec<Map>,
    /// The entries made so far, in order (only the ring's thread makes them).
    entries: Box<[OnceLock<Slot>]>,
    /// Entries made, and of those, entries registered with the kernel and not yet
    /// holding a request.
    made: AtomicUsize,
    armed: AtomicUsize,
    payload: usize,
    /// The thread that serves this ring, the only one that submits to it.
    owner: OnceLock<std::thread::ThreadId>,
    /// Entries answered by other threads, to be committed by the owner: (index,
    /// commit id). An eventfd wakes the owner for them.
    outbox: Mutex<Vec<(usize, u64)>>,
    wake: OwnedFd,
    /// Where the owner's pending read of `wake` puts the count.
    wake_count: Box<AtomicU64>,
}

/// How often a submission is tried before it is left queued for the next.
const SUBMIT_TRIES: u32 = 1000;

/// The `user_data` of the completion of a read of the wake-up eventfd.
const WAKE: u64 = u64::MAX;
const OP_READ: u8 = 22;

/// An entry's memory (header at 0, payload at `PAYLOAD_AT`) and the iovecs handed to
/// REGISTER, which the kernel may read again later.
struct Slot {
    map: Map,
    iovecs: Box<[libc::iovec; 2]>,
}

// SAFETY: the raw pointers point into mappings the Ring owns. The submission side is used
// only under its mutex; the completion side only by the queue's own thread; an entry's
// memory only by its owner of the moment (see the module comment).
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

fn setup(entries: u32, params: &mut Params) -> io::Result<OwnedFd> {
    // SAFETY: io_uring_setup reads and writes the params struct, which is valid.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, params as *mut Params) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Ring {
    fn new(dev: RawFd, qid: u16, payload: usize) -> io::Result<Ring> {
        // A completion per entry at most: the CQ has room for all of them.
        let mut p = Params {
            flags: SETUP_SQE128 | SETUP_CQSIZE,
            cq_entries: 2 * MAX_ENTRIES as u32,
            ..Params::default()
        };
        let fd = setup(4, &mut p)?;
        let raw = fd.as_raw_fd();
        let (sq, cq) = (&p.sq_off, &p.cq_off);
        // sq_off: head, tail, ring_mask, ring_entries, flags, dropped, array.
        // cq_off: head, tail, ring_mask, ring_entries, overflow, cqes.
        let sq_len = sq[6] as usize + p.sq_entries as usize * 4;
        let cq_len = cq[5] as usize + p.cq_entries as usize * CQE_SIZE;
        let mut rings = Vec::new();
        let sq_map = if p.features & FEAT_SINGLE_MMAP != 0 {
            Map::new(raw, OFF_SQ_RING, sq_len.max(cq_len))?
        } else {
            let m = Map::new(raw, OFF_SQ_RING, sq_len)?;
            rings.push(Map::new(raw, OFF_CQ_RING, cq_len)?);
            m
        };
        let cq_map = rings.last().unwrap_or(&sq_map);
        // SAFETY: the masks are u32s inside the rings, written by the kernel at setup.
        let (sq_mask, cq_mask) = unsafe {
            (
                *sq_map.at::<u32>(sq[2] as usize),
                *cq_map.at::<u32>(cq[2] as usize),
            )
        };
        let (cq_head, cq_tail, cqes) = (
            cq_map.at(cq[0] as usize),
            cq_map.at(cq[1] as usize),
            cq_map.at(cq[5] as usize),
        );
        let submit = Submit {
            sq_head: sq_map.at(sq[0] as usize),
            sq_tail: sq_map.at(sq[1] as usize),
            sq_mask,
            sq_array: sq_map.at(sq[6] as usize),
            sqes: Map::new(raw, OFF_SQES, p.sq_entries as usize * SQE_SIZE)?,
        };
        rings.insert(0, sq_map);
        // SAFETY: eventfd takes no pointers.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ring {
            fd,
            dev,
            qid,
            submit: Mutex::new(submit),
            cq_head,
            cq_tail,
            cq_mask,
            cqes,
            _rings: rings,
            entries: (0..MAX_ENTRIES).map(|_| OnceLock::new()).collect(),
            made: AtomicUsize::new(0),
            armed: AtomicUsize::new(0),
            payload,
            owner: OnceLock::new(),
            outbox: Mutex::new(Vec::new()),
            // SAFETY: a fresh descriptor, ours alone.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
            wake_count: Box::new(AtomicU64::new(0)),
        })
    }

    /// The memory of entry `index`, which exists.
    fn slot(&self, index: usize) -> &Map {
        &self.entries[index]
            .get()
            .expect("an entry that was made")
            .map
    }

    /// Makes one more entry and registers it. Called by the ring's thread only.
    fn add_entry(&self) -> io::Result<()> {
        let index = self.made.load(Ordering::Relaxed);
        if index >= MAX_ENTRIES {
            return Err(io::Error::other("the ring has all the entries it may have"));
        }
        let map = Map::new(-1, 0, PAYLOAD_AT + self.payload)?;
        let iovecs = Box::new([
            libc::iovec {
                iov_base: map.ptr.cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: map.at::<u8>(PAYLOAD_AT).cast(),
                iov_len: self.payload,
            },
        ]);
        let _ = self.entries[index].set(Slot { map, iovecs });
        self.made.store(index + 1, Ordering::Relaxed);
        self.arm(index, CMD_REGISTER, 0)
    }

    /// Hands entry `index` to the kernel, counted as armed until a request arrives in it.
    fn arm(&self, index: usize, cmd_op: u32, commit_id: u64) -> io::Result<()> {
        self.armed.fetch_add(1, Ordering::AcqRel);
        let r = self.command(index, cmd_op, commit_id);
        if r.is_err() {
            self.armed.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }

    /// Writes a retrieve notification for nothing (root, zero bytes): the kernel answers
    /// it with a `FUSE_NOTIFY_REPLY` request on this thread's queue (see [`unstick`]).
    fn kick(&self) -> io::Result<()> {
        // Kernel request ids are counted up from 0 in steps of 2; these never meet them,
        // and are even too (the kernel reads the lowest bit as "an interrupt").
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = (1 << 63) | NEXT.fetch_add(2, Ordering::Relaxed);
        // The reply lands on the queue of the CPU this runs on: make sure it is ours.
        // SAFETY: sched_getcpu takes no arguments.
        if unsafe { libc::sched_getcpu() } != i32::from(self.qid) {
            pin_to(self.qid as usize);
        }
        let mut m = abi::Out::with_capacity(48);
        m.u32(48).i32(abi::NOTIFY_RETRIEVE).u64(0);
        m.u64(unique).u64(abi::ROOT_ID).u64(0).u32(0).u32(0);
        // SAFETY: writes m's bytes, which live across the call.
        let n = unsafe { libc::write(self.dev, m.0.as_ptr().cast(), m.0.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Queues one FUSE command for entry `index` and submits it.
    fn command(&self, index: usize, cmd_op: u32, commit_id: u64) -> io::Result<()> {
        let mut b = [0u8; SQE_SIZE];
        b[0] = OP_URING_CMD;
        b[4..8].copy_from_slice(&self.dev.to_le_bytes());
        b[8..12].copy_from_slice(&cmd_op.to_le_bytes());
        if cmd_op == CMD_REGISTER {
            let iov = self.entries[index]
                .get()
                .map_or(0, |s| s.iovecs.as_ptr() as u64);
            b[16..24].copy_from_slice(&iov.to_le_bytes());
            b[24..28].copy_from_slice(&2u32.to_le_bytes());
        }
        b[32..40].copy_from_slice(&(index as u64).to_le_bytes());
        // struct fuse_uring_cmd_req at 48: flags, commit_id, qid.
        b[56..64].copy_from_slice(&commit_id.to_le_bytes());
        b[64..66].copy_from_slice(&self.qid.to_le_bytes());
        self.submit_sqe(&b)
    }

    /// Asks for the next wake-up: a read of the eventfd, completing as `WAKE`.
    fn await_wake(&self) -> io::Result<()> {
        let mut b = [0u8; SQE_SIZE];
        b[0] = OP_READ;
        b[4..8].copy_from_slice(&self.wake.as_raw_fd().to_le_bytes());
        let buf = &*self.wake_count as *const AtomicU64 as u64;
        b[16..24].copy_from_slice(&buf.to_le_bytes());
        b[24..28].copy_from_slice(&8u32.to_le_bytes());
        b[32..40].copy_from_slice(&WAKE.to_le_bytes());
        self.submit_sqe(&b)
    }

    /// Commits entry `index`: at once on the owner's thread; from any other, through
    /// the outbox, because the kernel hands the entry its next request in the context
    /// of the thread that submitted the commit, and only the owner is sure to come back
    /// for it (another thread may be about to block for long, even in the kernel).
    fn commit(&self, index: usize, commit_id: u64) -> io::Result<()> {
        if self.owner.get() == Some(&std::thread::current().id()) {
            return self.arm(index, CMD_COMMIT_AND_FETCH, commit_id);
        }
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((index, commit_id));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to our eventfd.
        if unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Commits what other threads answered (on the owner's thread).
    fn drain_outbox(&self) {
        let answered = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        for (index, commit_id) in answered {
            if let Err(e) = self.arm(index, CMD_COMMIT_AND_FETCH, commit_id) {
                tracing::warn!(error = %e, qid = self.qid, "cannot commit a FUSE io_uring entry");
            }
        }
    }

    /// Puts one SQE on the ring and submits it, with any an earlier call left queued.
    /// Once on the ring an SQE is the kernel's: if submitting fails, it goes with the
    /// next submission, so callers may count it as submitted.
    fn submit_sqe(&self, b: &[u8; SQE_SIZE]) -> io::Result<()> {
        let s = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: sq_tail points into the SQ ring; only this lock's holder moves it. The
        // kernel moves the head as it consumes SQEs.
        let (head, tail) = unsafe {
            (
                (*s.sq_head).load(Ordering::Acquire),
                (*s.sq_tail).load(Ordering::Relaxed),
            )
        };
        if tail.wrapping_sub(head) > s.sq_mask {
            return Err(io::Error::other("the submission queue is full"));
        }
        let slot = (tail & s.sq_mask) as usize;
        let sqe = s.sqes.at::<u8>(slot * SQE_SIZE);
        // SAFETY: the slot is ours until the tail moves past it; array has sq_mask+1 u32s.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), sqe, SQE_SIZE);
            *s.sq_array.add(slot) = slot as u32;
            (*s.sq_tail).store(tail.wrapping_add(1), Ordering::Release);
        }
        let queued = tail.wrapping_add(1).wrapping_sub(head);
        for _ in 0..SUBMIT_TRIES {
            // SAFETY: io_uring_enter on our ring; no arguments point anywhere.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    queued,
                    0u32,
                    0u32,
                    std::ptr::null::<u8>(),
                    0usize,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // Out of resources for a moment: the SQEs stay queued; try again shortly.
                Some(libc::EAGAIN | libc::EBUSY) => std::thread::sleep(Duration::from_millis(1)),
                _ => break,
            }
        }
        tracing::warn!(
            qid = self.qid,
            "io_uring_enter keeps failing; commands stay queued for the next submission"
        );
        Ok(())
    }

    /// Waits for the next completion: (entry index, result).
    fn next(&self) -> io::Result<(usize, i32)> {
        loop {
            // SAFETY: the CQ head is moved only by this queue's thread, the tail by the kernel.
            let (head, tail) = unsafe {
                (
                    (*self.cq_head).load(Ordering::Relaxed),
                    (*self.cq_tail).load(Ordering::Acquire),
                )
            };
            if head != tail {
                let off = (head & self.cq_mask) as usize * CQE_SIZE;
                // SAFETY: a CQE the kernel published (tail read with Acquire above).
                let (user_data, res) = unsafe {
                    let cqe = self.cqes.add(off);
                    (
                        std::ptr::read_unaligned(cqe.cast::<u64>()),
                        std::ptr::read_unaligned(cqe.add(8).cast::<i32>()),
                    )
                };
                // SAFETY: as above; releasing the slot to the kernel.
                unsafe { (*self.cq_head).store(head.wrapping_add(1), Ordering::Release) };
                return Ok((user_data as usize, res));
            }
            // SAFETY: io_uring_enter on our ring, waiting for one completion.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    0u32,
                    1u32,
                    ENTER_GETEVENTS,
                    std::ptr::null::<u8>(),
                    0usize,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }

    /// Copies the request now in entry `index` into `buf` as `/dev/fuse` would have given
    /// it (header, first argument, payload) and returns its opcode; `None` if the
    /// kernel's lengths do not add up.
    fn request(&self, index: usize, buf: &mut Vec<u8>) -> Option<u32> {
        let m = self.slot(index);
        // SAFETY: the entry is ours (its completion arrived); the header is HEADER_SIZE bytes.
        let header = unsafe { std::slice::from_raw_parts(m.ptr, HEADER_SIZE) };
        let h = abi::InHeader::parse(header)?;
        let payload =
            u32::from_le_bytes(header[ENT_IN_OUT + 16..ENT_IN_OUT + 20].try_into().ok()?) as usize;
        let op_in = (h.len as usize).checked_sub(abi::IN_HEADER + payload)?;
        if op_in > ENT_IN_OUT - OP_IN || payload > self.payload {
            return None;
        }
        buf.clear();
        buf.extend_from_slice(&header[..abi::IN_HEADER]);
        buf.extend_from_slice(&header[OP_IN..OP_IN + op_in]);
        // SAFETY: the kernel wrote `payload` bytes at PAYLOAD_AT, within the mapping.
        buf.extend_from_slice(unsafe {
            std::slice::from_raw_parts(m.at::<u8>(PAYLOAD_AT), payload)
        });
        Some(h.opcode)
    }
}

/// A request's entry, owned by its reply until committed. Dropped uncommitted, it
/// commits an EIO answer, so that the entry is not lost to its queue.
pub struct Entry {
    ring: Arc<Ring>,
    index: usize,
    commit_id: u64,
    committed: bool,
}

impl Entry {
    /// Writes the reply into the entry and commits it, which also re-arms the entry for
    /// the next request.
    pub fn commit(mut self, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.ring.payload {
            // None of the daemon's replies is larger than max_write; answer EIO rather
            // than overrun the buffer.
            return self.fail();
        }
        self.write_and_commit(header, parts)
    }

    /// Commits an EIO answer.
    fn fail(&mut self) -> io::Result<()> {
        let mut e = abi::Out::default();
        e.u32(abi::OUT_HEADER as u32)
            .i32(-libc::EIO)
            .u64(self.commit_id);
        self.write_and_commit(&e.0, &[])
    }

    fn write_and_commit(&mut self, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
        self.committed = true;
        let m = self.ring.slot(self.index);
        let mut at = PAYLOAD_AT;
        // SAFETY: the entry is ours until the commit below; every copy stays inside the
        // mapping (the length was checked against the payload size).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), m.ptr, header.len());
            for p in parts {
                std::ptr::copy_nonoverlapping(p.as_ptr(), m.at::<u8>(at), p.len());
                at += p.len();
            }
            let sz = (at - PAYLOAD_AT) as u32;
            std::ptr::copy_nonoverlapping(
                sz.to_le_bytes().as_ptr(),
                m.at::<u8>(ENT_IN_OUT + 16),
                4,
            );
        }
        self.ring.commit(self.index, self.commit_id)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = self.fail()
        {
            tracing::warn!(error = %e, "cannot commit a FUSE io_uring entry");
        }
    }
}

/// The queue threads.
pub struct Rings {
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How long [`Rings::stop`] waits for the queue threads after unmount.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl Rings {
    /// Waits a moment for the queue threads, which end once the kernel has torn down
    /// their entries. One still stuck is left behind (the process is about to exit).
    pub fn stop(self) {
        let until = Instant::now() + STOP_WAIT;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// The CPUs of a kernel CPU list file (`0-3,6`).
fn cpu_list(path: &str) -> io::Result<Vec<usize>> {
    let list = std::fs::read_to_string(path)?;
    let mut cpus = Vec::new();
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (usize, usize) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        if b < a || b >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("bad CPU list in {path}")));
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// The kernel's number of queues: one per possible CPU.
pub fn possible_cpus() -> io::Result<usize> {
    Ok(cpu_list("/sys/devices/system/cpu/possible")?.len())
}

/// Rings made before the INIT reply (so that a failure can still leave io_uring out of
/// it) and started after it.
pub struct Prepared {
    rings: Vec<Arc<Ring>>,
}

/// Makes `per_queue` rings for each possible CPU, for requests of up to `max_write`.
pub fn prepare(dev: &File, max_write: u32, per_queue: usize) -> io::Result<Prepared> {
    // The kernel's payload size: max(8 KiB, max_write, max_pages pages).
    let payload = (max_write as usize)
        .max(8192)
        .next_multiple_of(super::page_size() as usize);
    // Each queue's thread must be able to run on its CPU: a request made there is served
    // only by it, and the thread's kick reaches the queue of the CPU it runs on.
    let queues = possible_cpus()?;
    let allowed = allowed_cpus()?;
    if let Some(cpu) = cpu_list("/sys/devices/system/cpu/online")?
        .into_iter()
        .find(|c| *c < queues && !allowed.contains(c))
    {
        return Err(io::Error::other(format!(
            "the daemon may not run on CPU {cpu}, so it could not serve that CPU's queue"
        )));
    }
    let mut rings = Vec::new();
    for qid in 0..queues {
        for _ in 0..per_queue.max(1) {
            let qid = u16::try_from(qid).map_err(io::Error::other)?;
            rings.push(Arc::new(Ring::new(dev.as_raw_fd(), qid, payload)?));
        }
    }
    Ok(Prepared { rings })
}

impl Prepared {
    /// Starts a thread per ring, pinned to its queue's CPU, that registers the ring's
    /// entries and serves what arrives in them.
    pub fn start(self, handler: Arc<dyn Handler>) -> io::Result<Rings> {
        let mut threads = Vec::new();
        for (i, ring) in self.rings.into_iter().enumerate() {
            let handler = handler.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fuse-q{}-{i}", ring.qid))
                    .spawn(move || serve(ring, &*handler))?,
            );
        }
        Ok(Rings { threads })
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    if cpu >= libc::CPU_SETSIZE as usize {
        tracing::warn!(
            cpu,
            "cannot pin a FUSE queue thread to a CPU past the set's size"
        );
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu is within its size).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %io::Error::last_os_error(), "cannot pin a FUSE queue thread");
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it; CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Stops the mount after a queue thread has failed: the kernel would wait for it forever
/// and every caller on its CPU with it. SIGTERM takes the path of `umount`: the mount is
/// taken down and everything is committed.
fn give_up(qid: u16, why: &str) {
    tracing::error!(qid, why, "a FUSE io_uring queue cannot go on; unmounting");
    // SAFETY: kill with our own pid and a signal the daemon waits for.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// A queue thread: registers an entry, then serves requests and commits what other
/// threads answered, until the kernel has torn down every entry at unmount.
fn serve(ring: Arc<Ring>, handler: &dyn Handler) {
    pin_to(ring.qid as usize);
    let _ = ring.owner.set(std::thread::current().id());
    if let Err(e) = ring.await_wake() {
        return give_up(
            ring.qid,
            &format!("cannot wait on its wake-up eventfd: {e}"),
        );
    }
    if let Err(e) = ring.add_entry() {
        return give_up(ring.qid, &format!("cannot register an entry: {e}"));
    }
    // Entries not yet torn down.
    let mut live = 1;
    let mut buf = Vec::new();
    while live > 0 {
        let (index, res) = match ring.next() {
            Ok(c) => c,
            Err(e) => return give_up(ring.qid, &format!("cannot wait for completions: {e}")),
        };
        if index as u64 == WAKE {
            ring.drain_outbox();
            if let Err(e) = ring.await_wake() {
                return give_up(
                    ring.qid,
                    &format!("cannot wait on its wake-up eventfd: {e}"),
                );
            }
            continue;
        }
        if index >= ring.made.load(Ordering::Relaxed) {
            continue;
        }
        ring.armed.fetch_sub(1, Ordering::AcqRel);
        match -res {
            0 => {}
            // REGISTER before the kernel had taken the INIT reply in: again.
            libc::EAGAIN | libc::EINTR => {
                if let Err(e) = ring.arm(index, CMD_REGISTER, 0) {
                    tracing::error!(error = %e, "cannot register a FUSE io_uring entry");
                    live -= 1;
                }
                continue;
            }
            // Unmounted or aborted: this entry is done.
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED => {
                live -= 1;
                continue;
            }
            e => {
                tracing::error!(error = %io::Error::from_raw_os_error(e), qid = ring.qid, "FUSE io_uring entry failed");
                live -= 1;
                // The ring must not be left with no entry for its queue.
                if ring.armed.load(Ordering::Acquire) == 0 {
                    unstick(&ring, &mut live);
                }
                continue;
            }
        }
        // SAFETY: the entry was just handed over; its header's ent_in_out is in bounds.
        let commit_id =
            unsafe { std::ptr::read_unaligned(ring.slot(index).at::<u64>(ENT_IN_OUT + 8)) };
        let entry = Entry {
            ring: ring.clone(),
            index,
            commit_id,
            committed: false,
        };
        match ring.request(index, &mut buf) {
            // A kick's answer (see below): nothing to do but hand the entry back.
            Some(op::NOTIFY_REPLY) => {
                let mut ok = abi::Out::default();
                ok.u32(abi::OUT_HEADER as u32).i32(0).u64(commit_id);
                let mut entry = entry;
                if let Err(e) = entry.write_and_commit(&ok.0, &[]) {
                    tracing::warn!(error = %e, "cannot commit a FUSE io_uring entry");
                }
            }
            Some(_) => dispatch(&buf, handler, || Sender::Ring(entry)),
            // Dropping the entry answers EIO.
            None => tracing::error!(qid = ring.qid, "a malformed FUSE request over io_uring"),
        }
        if ring.armed.load(Ordering::Acquire) == 0 {
            unstick(&ring, &mut live);
        }
    }
}

/// Called when every entry of `ring` is held by a reply still to come. Requests that
/// arrived meanwhile found no entry and wait in the kernel's queue, and the kernel hands
/// a queued request only to an entry being committed, never to one newly registered; and
/// those replies may wait for exactly such a request (a page drop waits for a `write()`).
/// So: register one more entry, then make the kernel send a request that takes it
/// directly, a `FUSE_NOTIFY_REPLY` to a retrieve notification written from this thread,
/// which is pinned to the queue's CPU. Committing the answer to it hands the entry the
/// oldest queued request, and each of those, answered, hands on the next.
fn unstick(ring: &Ring, live: &mut usize) {
    match ring.add_entry() {
        Ok(()) => *live += 1,
        Err(e) => {
            tracing::warn!(error = %e, qid = ring.qid, "cannot add a FUSE io_uring entry");
            return;
        }
    }
    if let Err(e) = ring.kick() {
        tracing::warn!(error = %e, qid = ring.qid, "cannot wake a FUSE io_uring queue");
    }
}
