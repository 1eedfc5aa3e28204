//! One run of a program: the world it may touch, its limits and costs, and what helpers do
//! to it. The loop of invocations that a chain makes is [`crate::Program::run`].
//!
//! The runtime, not the program, performs every device access: each is translated through
//! the extents the caller handed over and confined to the run's file range (DESIGN.md,
//! invariant 1). Holes, unwritten extents and bytes past the file size read as zeros
//! (invariant 2). Writes are buffered and applied only when the run succeeds, so a failing
//! run changes nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;

use crate::abi::{self, errno};

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
    /// Instructions executed, helpers charged by the work they do (see [`crate::helpers`]).
    pub insns: u64,
    /// Chain hops after the first invocation.
    pub hops: u64,
    pub device_bytes: u64,
    pub output_bytes: u64,
    /// Bytes of writes the run may buffer, each write counted as its length plus
    /// [`WRITE_OVERHEAD`]: bounds the memory they take and the work of applying them.
    pub write_bytes: u64,
    /// Wall-clock time, checked inside invocations too.
    pub wall: Duration,
}

/// What one buffered write costs against [`Limits::write_bytes`] beyond its bytes: a write
/// that touches no other is one device write when the run ends, so it costs at least a
/// sector's worth (at most 8192 of them under the default limit).
pub const WRITE_OVERHEAD: u64 = 512;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            insns: 1 << 32,
            hops: 1 << 20,
            device_bytes: 1 << 34,
            output_bytes: 64 << 20,
            write_bytes: 4 << 20,
            wall: Duration::from_secs(10),
        }
    }
}

/// What a run used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Instructions: counted as they execute on the checked engine (rbpf's engines charge
    /// each invocation its verified worst case), plus what helpers are charged.
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
    WriteLimit {
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
    /// The engine refused a memory access outside what the program may touch: `len` bytes
    /// at (guest) address `addr`, by the instruction at slot `insn`, or by a helper it
    /// called. Only a verifier bug (or its checks turned off) lets a program get here.
    Access {
        insn: Option<usize>,
        addr: u64,
        len: u64,
        write: bool,
    },
    /// Execution reached an instruction the verifier never reached.
    Unverified {
        insn: usize,
    },
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
            RunError::WriteLimit { limit } => {
                write!(f, "limit of buffered writes ({limit} bytes) reached")
            }
            RunError::Timeout { limit } => write!(f, "time limit ({limit:?}) reached"),
            RunError::OutOfRange { off } => {
                write!(f, "hop to file offset {off}, outside the run's range")
            }
            RunError::ArgTooLarge { len } => {
                write!(f, "argument of {len} bytes; the limit is {}", abi::ARG_SIZE)
            }
            RunError::Io(e) => write!(f, "device error: {e}"),
            RunError::Access {
                insn,
                addr,
                len,
                write,
            } => {
                let what = if *write { "write" } else { "read" };
                match insn {
                    Some(i) => write!(f, "insn {i}: ")?,
                    None => write!(f, "a helper: ")?,
                }
                write!(
                    f,
                    "{len}-byte {what} at {addr:#x} is outside the program's memory"
                )
            }
            RunError::Unverified { insn } => write!(
                f,
                "insn {insn}: reached an instruction the verifier never reached"
            ),
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

/// Instructions an engine may execute before it asks for more: between two requests it
/// runs for about a millisecond, so the wall clock is checked that often.
pub(crate) const SLICE: u64 = 1 << 20;

/// The state of one run that engines and helpers work on.
pub(crate) struct Run<'a> {
    world: World<'a>,
    limits: Limits,
    deadline: Instant,
    pub(crate) costs: Costs,
    output: Vec<u8>,
    writes: Writes,
    /// What they count against `limits.write_bytes`.
    write_bytes: u64,
    /// Most fuel one grant hands out ([`SLICE`]; less in tests).
    grants: u64,
    /// Fuel handed to the engine by the last [`Run::grant`], not yet accounted.
    slice: u64,
    /// The first reason the run must stop, recorded by a helper or by metering.
    stop: Option<RunError>,
}

impl<'a> Run<'a> {
    pub(crate) fn new(world: World<'a>, limits: Limits, grants: u64) -> Run<'a> {
        Run {
            world,
            limits,
            grants,
            deadline: Instant::now() + limits.wall,
            costs: Costs::default(),
            output: Vec::new(),
            writes: Writes::default(),
            write_bytes: 0,
            slice: 0,
            stop: None,
        }
    }

    /// Records why the run must stop (the first reason wins).
    pub(crate) fn stop(&mut self, e: RunError) {
        self.stop.get_or_insert(e);
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.is_some()
    }

    pub(crate) fn take_stop(&mut self) -> Option<RunError> {
        self.stop.take()
    }

    /// Fails the run if its time is up.
    pub(crate) fn check_clock(&mut self) -> bool {
        if Instant::now() > self.deadline {
            self.stop(RunError::Timeout {
                limit: self.limits.wall,
            });
            return false;
        }
        true
    }

    /// Adds `n` instructions to the run's count; `false` (and the run stops) past the limit.
    pub(crate) fn charge(&mut self, n: u64) -> bool {
        self.costs.insns = self.costs.insns.saturating_add(n);
        if self.costs.insns > self.limits.insns {
            self.stop(RunError::InsnLimit {
                limit: self.limits.insns,
            });
            return false;
        }
        true
    }

    /// Fuel for an engine that counts instructions: what it may execute before it must
    /// call [`Run::refuel`].
    pub(crate) fn grant(&mut self) -> i64 {
        self.slice = self
            .limits
            .insns
            .saturating_sub(self.costs.insns)
            .min(self.grants);
        self.slice as i64
    }

    /// Accounts for the fuel an engine used of its last grant; `fuel` is what it has left
    /// (negative when it overran, by at most the instructions between two checks).
    pub(crate) fn settle(&mut self, fuel: i64) -> bool {
        let used = (self.slice as i64).saturating_sub(fuel).max(0) as u64;
        self.slice = 0;
        self.charge(used)
    }

    /// Settles `fuel` and grants more if the instruction limit and the clock allow; `None`
    /// if the run must stop.
    pub(crate) fn refuel(&mut self, fuel: i64) -> Option<i64> {
        if !self.settle(fuel) || !self.check_clock() {
            return None;
        }
        match self.grant() {
            0 => {
                self.stop(RunError::InsnLimit {
                    limit: self.limits.insns,
                });
                None
            }
            g => Some(g),
        }
    }

    fn within(&self, off: u64, len: u64) -> bool {
        off >= self.world.range.start
            && off
                .checked_add(len)
                .is_some_and(|end| end <= self.world.range.end)
    }

    /// File bytes at `off` into `buf`, through the extents; zeros where there is no data
    /// and outside the run's range.
    pub(crate) fn fetch(&mut self, off: u64, buf: &mut [u8]) -> Result<(), RunError> {
        let end = off
            .saturating_add(buf.len() as u64)
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
        let buf_end = off.saturating_add(buf.len() as u64);
        for (w, bytes) in self.writes.over(off, buf_end) {
            let lo = w.max(off);
            let hi = (w + bytes.len() as u64).min(buf_end);
            buf[(lo - off) as usize..(hi - off) as usize]
                .copy_from_slice(&bytes[(lo - w) as usize..(hi - w) as usize]);
        }
        Ok(())
    }

    /// `nearfs_read`. `dst` is already zeroed: whatever this returns, the program's
    /// memory holds file bytes or zeros, never what was there before.
    pub(crate) fn read(&mut self, off: u64, dst: &mut [u8]) -> i64 {
        if !self.within(off, dst.len() as u64) {
            return -errno::ERANGE;
        }
        if !self.check_clock() {
            return -errno::ENOSPC;
        }
        match self.fetch(off, dst) {
            Ok(()) => 0,
            Err(e) => {
                let code = if matches!(e, RunError::Io(_)) {
                    errno::EIO
                } else {
                    errno::ENOSPC
                };
                dst.fill(0);
                self.stop(e);
                -code
            }
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

    /// `nearfs_write`.
    pub(crate) fn write(&mut self, off: u64, src: &[u8]) -> i64 {
        let len = src.len() as u64;
        if len == 0 {
            return -errno::EINVAL;
        }
        if !self.world.writable {
            return -errno::EPERM;
        }
        if !self.within(off, len) {
            return -errno::ERANGE;
        }
        if !self.allocated(off, len) {
            return -errno::EPERM;
        }
        self.write_bytes = self.write_bytes.saturating_add(len + WRITE_OVERHEAD);
        if self.write_bytes > self.limits.write_bytes {
            self.stop(RunError::WriteLimit {
                limit: self.limits.write_bytes,
            });
            return -errno::ENOSPC;
        }
        self.writes.insert(off, src.to_vec());
        0
    }

    /// `nearfs_emit`.
    pub(crate) fn emit(&mut self, src: &[u8]) -> i64 {
        if self.output.len() + src.len() > self.limits.output_bytes as usize {
            self.stop(RunError::OutputLimit {
                limit: self.limits.output_bytes,
            });
            return -errno::ENOSPC;
        }
        self.output.extend_from_slice(src);
        0
    }

    /// Ends a successful run: applies the buffered writes through the extents, one
    /// device write per stretch of adjacent bytes written and extent.
    pub(crate) fn finish(mut self, result: u64) -> Result<Outcome, RunError> {
        let stretches = std::mem::take(&mut self.writes).stretches();
        let mut written = Vec::with_capacity(stretches.len());
        for (off, bytes) in stretches {
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
        self.costs.output_bytes = self.output.len() as u64;
        Ok(Outcome {
            result,
            output: self.output,
            costs: self.costs,
            written,
        })
    }
}

/// A run's buffered writes as the file would hold them: pieces that do not overlap, by
/// file offset, each a stretch of the bytes of the write that last covered it. A write
/// trims or splits the pieces it covers without copying them, so that neither writing nor
/// reading through the buffer costs more than the bytes it moves and a logarithm.
#[derive(Default)]
struct Writes {
    /// File offset → piece starting there.
    pieces: BTreeMap<u64, Piece>,
    /// Each write's bytes, as written.
    bufs: Vec<Vec<u8>>,
}

#[derive(Clone, Copy)]
struct Piece {
    buf: usize,
    /// Where in its write's bytes the piece starts.
    at: u64,
    len: u64,
}

impl Piece {
    /// The part of this piece, which starts at file offset `start`, from file offset `from`.
    fn from(self, start: u64, from: u64) -> Piece {
        Piece {
            at: self.at + (from - start),
            len: self.len - (from - start),
            ..self
        }
    }
}

impl Writes {
    /// Buffers `bytes` (not empty) at file offset `off`, over what was written there.
    fn insert(&mut self, off: u64, bytes: Vec<u8>) {
        let end = off + bytes.len() as u64;
        // A piece from before `off` reaching into the write keeps its head, and its tail
        // past the write if it has one.
        if let Some((&start, &p)) = self.pieces.range(..off).next_back()
            && start + p.len > off
        {
            self.pieces.insert(
                start,
                Piece {
                    len: off - start,
                    ..p
                },
            );
            if start + p.len > end {
                self.pieces.insert(end, p.from(start, end));
            }
        }
        // Pieces starting inside the write keep only what lies past it.
        while let Some((&start, &p)) = self.pieces.range(off..end).next() {
            self.pieces.remove(&start);
            if start + p.len > end {
                self.pieces.insert(end, p.from(start, end));
            }
        }
        let buf = self.bufs.len();
        self.pieces.insert(
            off,
            Piece {
                buf,
                at: 0,
                len: end - off,
            },
        );
        self.bufs.push(bytes);
    }

    fn bytes(&self, p: &Piece) -> &[u8] {
        &self.bufs[p.buf][p.at as usize..(p.at + p.len) as usize]
    }

    /// The pieces overlapping `[off, end)`, in file order: (file offset, bytes).
    fn over(&self, off: u64, end: u64) -> impl Iterator<Item = (u64, &[u8])> {
        let before = self
            .pieces
            .range(..off)
            .next_back()
            .filter(|(start, p)| **start + p.len > off);
        before
            .into_iter()
            .chain(self.pieces.range(off..end))
            .map(|(&start, p)| (start, self.bytes(p)))
    }

    /// What was written, as stretches of adjacent bytes in file order.
    fn stretches(self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&start, p) in &self.pieces {
            match out.last_mut() {
                Some((at, bytes)) if *at + bytes.len() as u64 == start => {
                    bytes.extend_from_slice(self.bytes(p))
                }
                _ => out.push((start, self.bytes(p).to_vec())),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The buffer reads back, and applies, what the writes in order leave in a file.
        #[test]
        fn writes_read_back_as_a_file_would_hold_them(
            writes in prop::collection::vec((0u64..64, 1usize..24, any::<u8>()), 1..40),
            from in 0u64..80,
            len in 0u64..80,
        ) {
            let mut model: Vec<Option<u8>> = vec![None; 160];
            let mut buffer = Writes::default();
            for (k, &(off, n, fill)) in writes.iter().enumerate() {
                let bytes: Vec<u8> = (0..n).map(|i| fill.wrapping_add((k + i) as u8)).collect();
                for (i, &b) in bytes.iter().enumerate() {
                    model[off as usize + i] = Some(b);
                }
                buffer.insert(off, bytes);
            }
            let mut seen: Vec<Option<u8>> = vec![None; 160];
            for (at, bytes) in buffer.over(from, from + len) {
                prop_assert!(at < from + len && at + bytes.len() as u64 > from);
                for (i, &b) in bytes.iter().enumerate() {
                    seen[at as usize + i] = Some(b);
                }
            }
            let window = from as usize..(from + len) as usize;
            prop_assert_eq!(&seen[window.clone()], &model[window]);
            let mut applied: Vec<Option<u8>> = vec![None; 160];
            let stretches = buffer.stretches();
            for pair in stretches.windows(2) {
                prop_assert!(pair[0].0 + (pair[0].1.len() as u64) < pair[1].0, "adjacent stretches are one");
            }
            for (at, bytes) in stretches {
                for (i, &b) in bytes.iter().enumerate() {
                    applied[at as usize + i] = Some(b);
                }
            }
            prop_assert_eq!(applied, model);
        }
    }
}
