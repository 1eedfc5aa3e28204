//! One run of a program: the world it may touch, its limits and costs, the helpers'
//! behaviour, and the loop of invocations that a chain makes.
//!
//! The runtime, not the program, performs every device access: each is translated through
//! the extents the caller handed over and confined to the run's file range (DESIGN.md,
//! invariant 1). Holes, unwritten extents and bytes past the file size read as zeros
//! (invariant 2). Writes are buffered and applied only when the run succeeds, so a failing
//! run changes nothing.

use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;

use crate::abi::{self, NO_NEXT, ctx, errno};
use crate::exec::Engine;

/// Where a stretch of the file lives on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub file_off: u64,
    pub dev_off: u64,
    pub len: u64,
    /// Allocated but never written: reads as zeros.
    pub unwritten: bool,
}

/// What a run may touch: one file's translated extents on one device.
#[derive(Clone, Debug)]
pub struct World<'a> {
    pub device: &'a dyn BlockDevice,
    /// Sorted by `file_off`, not overlapping.
    pub extents: &'a [Extent],
    pub file_size: u64,
    /// The file bytes the run may use.
    pub range: Range<u64>,
    /// Whether the run may write.
    pub writable: bool,
}

/// Per-run limits; exceeding one ends the run with its own [`RunError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Instructions, each invocation charged its verified worst case.
    pub insns: u64,
    /// Chain hops after the first invocation.
    pub hops: u64,
    pub device_bytes: u64,
    pub output_bytes: u64,
    pub wall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            insns: 1 << 32,
            hops: 1 << 20,
            device_bytes: 1 << 34,
            output_bytes: 64 << 20,
            wall: Duration::from_secs(10),
        }
    }
}

/// What a run used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Instructions charged: the verified worst case of each invocation.
    pub insns: u64,
    pub hops: u64,
    pub device_bytes: u64,
    pub output_bytes: u64,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// r0 of the last invocation.
    pub result: u64,
    pub output: Vec<u8>,
    pub costs: Costs,
    /// File ranges the run wrote (already applied to the device).
    pub written: Vec<Range<u64>>,
}

/// Why a run failed. Nothing it wrote was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunError {
    InsnLimit {
        limit: u64,
    },
    HopLimit {
        limit: u64,
    },
    DeviceBytesLimit {
        limit: u64,
    },
    OutputLimit {
        limit: u64,
    },
    Timeout {
        limit: Duration,
    },
    /// A chain hop to a file offset outside the run's range.
    OutOfRange {
        off: u64,
    },
    /// The argument blob is larger than `ARG_SIZE`.
    ArgTooLarge {
        len: usize,
    },
    /// The device failed.
    Io(String),
    /// The engine reported an error or a helper panicked (a bug in nearfs, not the program).
    Fault(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::InsnLimit { limit } => write!(f, "instruction limit ({limit}) reached"),
            RunError::HopLimit { limit } => write!(f, "hop limit ({limit}) reached"),
            RunError::DeviceBytesLimit { limit } => {
                write!(f, "device read limit ({limit} bytes) reached")
            }
            RunError::OutputLimit { limit } => write!(f, "output limit ({limit} bytes) reached"),
            RunError::Timeout { limit } => write!(f, "time limit ({limit:?}) reached"),
            RunError::OutOfRange { off } => {
                write!(f, "hop to file offset {off}, outside the run's range")
            }
            RunError::ArgTooLarge { len } => {
                write!(f, "argument of {len} bytes; the limit is {}", abi::ARG_SIZE)
            }
            RunError::Io(e) => write!(f, "device error: {e}"),
            RunError::Fault(e) => write!(f, "runtime fault: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// What the caller asks of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    pub arg: &'a [u8],
    pub limits: Limits,
}

/// The state helpers work on during a run.
pub(crate) struct Run<'a> {
    world: World<'a>,
    limits: Limits,
    deadline: Instant,
    costs: Costs,
    output: Vec<u8>,
    /// Buffered writes, in order: (file offset, bytes).
    writes: Vec<(u64, Vec<u8>)>,
    /// The first reason the run must fail, recorded by a helper.
    failed: Option<RunError>,
}

impl<'a> Run<'a> {
    fn fail(&mut self, e: RunError) -> i64 {
        self.failed.get_or_insert(e);
        -errno::ENOSPC
    }

    pub(crate) fn fault_helper_panic(&mut self) {
        self.failed
            .get_or_insert(RunError::Fault("a helper panicked".into()));
    }

    fn within(&self, off: u64, len: u64) -> bool {
        off >= self.world.range.start
            && off
                .checked_add(len)
                .is_some_and(|end| end <= self.world.range.end)
    }

    /// File bytes at `off` into `buf`, through the extents; zeros where there is no data
    /// and outside the run's range.
    fn fetch(&mut self, off: u64, buf: &mut [u8]) -> Result<(), RunError> {
        let end = (off + buf.len() as u64)
            .min(self.world.file_size)
            .min(self.world.range.end);
        let extents = self.world.extents;
        let first = extents.partition_point(|e| e.file_off + e.len <= off);
        // Bytes of `buf` before `done` are filled; gaps between extents become zeros.
        let mut done = 0usize;
        for e in &extents[first..] {
            if e.file_off >= end {
                break;
            }
            let lo = e.file_off.max(off);
            let hi = (e.file_off + e.len).min(end);
            if lo >= hi || e.unwritten {
                continue;
            }
            let n = hi - lo;
            self.costs.device_bytes += n;
            if self.costs.device_bytes > self.limits.device_bytes {
                return Err(RunError::DeviceBytesLimit {
                    limit: self.limits.device_bytes,
                });
            }
            let (from, to) = ((lo - off) as usize, (hi - off) as usize);
            buf[done..from].fill(0);
            let dev = e.dev_off + (lo - e.file_off);
            self.world
                .device
                .read_at(&mut buf[from..to], dev)
                .map_err(|e| RunError::Io(e.to_string()))?;
            done = to;
        }
        buf[done..].fill(0);
        // This run's own writes are visible to it.
        for (w, bytes) in &self.writes {
            let lo = (*w).max(off);
            let hi = (w + bytes.len() as u64).min(off + buf.len() as u64);
            if lo < hi {
                buf[(lo - off) as usize..(hi - off) as usize]
                    .copy_from_slice(&bytes[(lo - w) as usize..(hi - w) as usize]);
            }
        }
        Ok(())
    }

    pub(crate) fn read(&mut self, off: u64, dst: &mut [u8]) -> i64 {
        if !self.within(off, dst.len() as u64) {
            return -errno::ERANGE;
        }
        match self.fetch(off, dst) {
            Ok(()) => 0,
            Err(e @ RunError::Io(_)) => {
                self.failed.get_or_insert(e);
                -errno::EIO
            }
            Err(e) => self.fail(e),
        }
    }

    /// Whether every byte of `[off, off + len)` is allocated, written file data.
    fn allocated(&self, off: u64, len: u64) -> bool {
        let end = off + len;
        if end > self.world.file_size {
            return false;
        }
        let mut at = off;
        let extents = self.world.extents;
        let first = extents.partition_point(|e| e.file_off + e.len <= off);
        for e in &extents[first..] {
            if at >= end {
                break;
            }
            if e.file_off > at || e.unwritten {
                return false;
            }
            at = e.file_off + e.len;
        }
        at >= end
    }

    pub(crate) fn write(&mut self, off: u64, src: &[u8]) -> i64 {
        let len = src.len() as u64;
        if !self.world.writable {
            return -errno::EPERM;
        }
        if !self.within(off, len) {
            return -errno::ERANGE;
        }
        if !self.allocated(off, len) {
            return -errno::EPERM;
        }
        self.writes.push((off, src.to_vec()));
        0
    }

    pub(crate) fn emit(&mut self, src: &[u8]) -> i64 {
        if self.output.len() + src.len() > self.limits.output_bytes as usize {
            return self.fail(RunError::OutputLimit {
                limit: self.limits.output_bytes,
            });
        }
        self.output.extend_from_slice(src);
        0
    }

    /// Applies the buffered writes through the extents.
    fn apply(&mut self) -> Result<Vec<Range<u64>>, RunError> {
        let mut written = Vec::new();
        for (off, bytes) in std::mem::take(&mut self.writes) {
            let end = off + bytes.len() as u64;
            let extents = self.world.extents;
            let first = extents.partition_point(|e| e.file_off + e.len <= off);
            for e in &extents[first..] {
                if e.file_off >= end {
                    break;
                }
                let lo = e.file_off.max(off);
                let hi = (e.file_off + e.len).min(end);
                let src = &bytes[(lo - off) as usize..(hi - off) as usize];
                self.world
                    .device
                    .write_at(src, e.dev_off + (lo - e.file_off))
                    .map_err(|e| RunError::Io(e.to_string()))?;
            }
            written.push(off..end);
        }
        Ok(written)
    }
}

/// Memory a run gives its program: the context, then the window, scratch and argument.
const CTX_AREA: usize = 128;
const WINDOW_AT: usize = CTX_AREA;
const SCRATCH_AT: usize = WINDOW_AT + abi::WINDOW_SIZE;
const ARG_AT: usize = SCRATCH_AT + abi::SCRATCH_SIZE;
const MEM_SIZE: usize = ARG_AT + abi::ARG_SIZE;

thread_local! {
    /// Each thread reuses one run memory, so starting a run allocates nothing.
    static MEMORY: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MEM_SIZE]);
}

fn put(mem: &mut [u8], field: i16, v: u64) {
    let at = field as usize;
    mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Runs `engine`, whose invocations each execute at most `bound` instructions.
pub(crate) fn run(
    engine: &Engine,
    bound: u64,
    world: World<'_>,
    req: &Request<'_>,
) -> Result<Outcome, RunError> {
    if req.arg.len() > abi::ARG_SIZE {
        return Err(RunError::ArgTooLarge { len: req.arg.len() });
    }
    let limits = req.limits;
    let (range, file_size) = (world.range.clone(), world.file_size);
    let mut run = Run {
        world,
        limits,
        deadline: Instant::now() + limits.wall,
        costs: Costs::default(),
        output: Vec::new(),
        writes: Vec::new(),
        failed: None,
    };
    MEMORY.with(|m| {
        let mut mem = m.borrow_mut();
        let mem = &mut mem[..];
        let base = mem.as_ptr() as u64;
        mem[..CTX_AREA].fill(0);
        mem[SCRATCH_AT..ARG_AT].fill(0);
        mem[ARG_AT..ARG_AT + req.arg.len()].copy_from_slice(req.arg);
        mem[ARG_AT + req.arg.len()..].fill(0);
        put(mem, ctx::DATA, base + WINDOW_AT as u64);
        put(mem, ctx::DATA_END, base + SCRATCH_AT as u64);
        put(mem, ctx::SCRATCH, base + SCRATCH_AT as u64);
        put(mem, ctx::ARG, base + ARG_AT as u64);
        put(mem, ctx::ARG_LEN, req.arg.len() as u64);
        put(mem, ctx::RANGE_START, range.start);
        put(mem, ctx::RANGE_END, range.end);
        put(mem, ctx::FILE_SIZE, file_size);
        let mut off = range.start;
        loop {
            if Instant::now() > run.deadline {
                return Err(RunError::Timeout { limit: limits.wall });
            }
            run.costs.insns = run.costs.insns.saturating_add(bound);
            if run.costs.insns > limits.insns {
                return Err(RunError::InsnLimit {
                    limit: limits.insns,
                });
            }
            run.fetch(off, &mut mem[WINDOW_AT..SCRATCH_AT])?;
            put(mem, ctx::OFFSET, off);
            put(mem, ctx::HOP, run.costs.hops);
            put(mem, ctx::NEXT, NO_NEXT);
            let r0 = engine.invoke(mem, &mut run).map_err(RunError::Fault)?;
            if let Some(e) = run.failed.take() {
                return Err(e);
            }
            let next = u64::from_le_bytes(mem[ctx::NEXT as usize..][..8].try_into().unwrap());
            if next == NO_NEXT {
                let written = run.apply()?;
                run.costs.output_bytes = run.output.len() as u64;
                return Ok(Outcome {
                    result: r0,
                    output: std::mem::take(&mut run.output),
                    costs: run.costs,
                    written,
                });
            }
            if !range.contains(&next) {
                return Err(RunError::OutOfRange { off: next });
            }
            run.costs.hops += 1;
            if run.costs.hops > limits.hops {
                return Err(RunError::HopLimit { limit: limits.hops });
            }
            off = next;
        }
    })
}
