//! The helpers: one table of id, name, prototype, cost and function, which the verifier,
//! the dataflow pass and every engine read.
//!
//! A helper never trusts its arguments. Pointers are resolved through [`Memory`], which
//! checks the whole range against the areas the program may touch; a range outside them
//! stops the run with [`RunError::Access`] (only a verifier bug gets one past the
//! verifier). A helper that writes program memory zeroes the destination first, so that
//! whatever it returns, the bytes the verifier takes as written hold nothing from before.
//!
//! Each call is charged as instructions before it runs, in proportion to the bytes it may
//! touch: one instruction plus one per 8 bytes, the work of an eBPF loop that moved 8 bytes
//! per instruction. A program cannot make a helper do work it was not charged for.

use crate::abi::{errno, helper};
use crate::memory::Memory;
use crate::run::{Run, RunError};

/// What a helper argument must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// Any initialised number.
    Scalar,
    /// A pointer the helper reads `len` bytes from; `len` is argument number `.0` (1-based).
    ReadMem(u8),
    /// A pointer the helper writes `len` bytes to; `len` is argument number `.0`.
    WriteMem(u8),
    /// A byte count, bounded by the memory argument that names it.
    Len,
}

/// One helper.
pub struct Helper {
    pub id: i32,
    pub name: &'static str,
    pub args: &'static [Arg],
    /// Instructions a call with these arguments is charged, before it runs.
    pub cost: fn(&[u64; 5]) -> u64,
    call: fn(&mut Run<'_>, &mut Memory<'_>, &[u64; 5]) -> u64,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish()
    }
}

use Arg::*;

/// Every helper a program may call.
pub static HELPERS: [Helper; 5] = [
    Helper {
        id: helper::READ,
        name: "nearfs_read",
        args: &[Scalar, WriteMem(3), Len],
        cost: |a| per_byte(a[2]),
        call: read,
    },
    Helper {
        id: helper::WRITE,
        name: "nearfs_write",
        args: &[Scalar, ReadMem(3), Len],
        cost: |a| per_byte(a[2]),
        call: write,
    },
    Helper {
        id: helper::EMIT,
        name: "nearfs_emit",
        args: &[ReadMem(2), Len],
        cost: |a| per_byte(a[1]),
        call: emit,
    },
    Helper {
        id: helper::MEMCMP,
        name: "nearfs_memcmp",
        args: &[ReadMem(3), ReadMem(3), Len],
        cost: |a| per_byte(a[2].saturating_mul(2)),
        call: memcmp,
    },
    Helper {
        id: helper::MEMMEM,
        name: "nearfs_memmem",
        args: &[ReadMem(2), Len, Scalar, ReadMem(5), Len],
        cost: |a| per_byte(a[1].saturating_add(a[4])),
        call: memmem,
    },
];

/// The helper with this id.
pub fn by_id(id: i32) -> Option<&'static Helper> {
    HELPERS.iter().find(|h| h.id == id)
}

fn per_byte(bytes: u64) -> u64 {
    1 + bytes.div_ceil(8)
}

impl Helper {
    /// Calls the helper for a program. `Err` means the run must stop; the reason is recorded
    /// in `run`. Panics are caught here: they never unwind into engine code.
    pub(crate) fn call(&self, run: &mut Run<'_>, mem: &mut Memory<'_>, args: &[u64; 5]) -> u64 {
        let call = self.call;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(run, mem, args))) {
            Ok(v) => v,
            Err(_) => {
                run.stop(RunError::Fault(format!("helper {} panicked", self.name)));
                (-errno::EIO) as u64
            }
        }
    }
}

/// Stops the run for a memory argument outside the program's memory.
fn refused(run: &mut Run<'_>, addr: u64, len: u64, write: bool) -> u64 {
    run.stop(RunError::Access {
        insn: None,
        addr,
        len,
        write,
    });
    (-errno::EINVAL) as u64
}

fn read(run: &mut Run<'_>, mem: &mut Memory<'_>, a: &[u64; 5]) -> u64 {
    let (off, dst, len) = (a[0], a[1], a[2]);
    let Some(buf) = mem.write(dst, len) else {
        return refused(run, dst, len, true);
    };
    buf.fill(0);
    run.read(off, buf) as u64
}

fn write(run: &mut Run<'_>, mem: &mut Memory<'_>, a: &[u64; 5]) -> u64 {
    let (off, src, len) = (a[0], a[1], a[2]);
    match mem.read(src, len) {
        Some(bytes) => run.write(off, bytes) as u64,
        None => refused(run, src, len, false),
    }
}

fn emit(run: &mut Run<'_>, mem: &mut Memory<'_>, a: &[u64; 5]) -> u64 {
    let (src, len) = (a[0], a[1]);
    match mem.read(src, len) {
        Some(bytes) => run.emit(bytes) as u64,
        None => refused(run, src, len, false),
    }
}

fn memcmp(run: &mut Run<'_>, mem: &mut Memory<'_>, a: &[u64; 5]) -> u64 {
    let (x, y, len) = (a[0], a[1], a[2]);
    let Some(xs) = mem.read(x, len) else {
        return refused(run, x, len, false);
    };
    let Some(ys) = mem.read(y, len) else {
        return refused(run, y, len, false);
    };
    xs.cmp(ys) as i64 as u64
}

fn memmem(run: &mut Run<'_>, mem: &mut Memory<'_>, a: &[u64; 5]) -> u64 {
    let (hay, hay_len, start, needle, needle_len) = (a[0], a[1], a[2], a[3], a[4]);
    let Some(h) = mem.read(hay, hay_len) else {
        return refused(run, hay, hay_len, false);
    };
    let Some(n) = mem.read(needle, needle_len) else {
        return refused(run, needle, needle_len, false);
    };
    let Some(rest) = usize::try_from(start).ok().and_then(|s| h.get(s..)) else {
        return -1i64 as u64;
    };
    // memchr's finder is linear in the haystack whatever the needle, so the charge holds.
    match memchr::memmem::find(rest, n) {
        Some(at) => (start as usize + at) as u64,
        None => -1i64 as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_memory_arguments_name_their_lengths() {
        for (k, h) in HELPERS.iter().enumerate() {
            assert!(HELPERS[k + 1..].iter().all(|o| o.id != h.id), "{}", h.name);
            assert!(h.args.len() <= 5);
            for a in h.args {
                if let ReadMem(l) | WriteMem(l) = a {
                    assert_eq!(h.args.get(*l as usize - 1), Some(&Len), "{}", h.name);
                }
            }
        }
    }

    #[test]
    fn costs_grow_with_the_bytes_touched() {
        let memmem = by_id(helper::MEMMEM).unwrap();
        assert_eq!((memmem.cost)(&[0, 4096, 0, 0, 8]), 1 + 513);
        assert_eq!(
            (memmem.cost)(&[0, u64::MAX, 0, 0, u64::MAX]),
            1 + u64::MAX / 8 + 1
        );
        assert_eq!((by_id(helper::EMIT).unwrap().cost)(&[0, 0, 0, 0, 0]), 1);
    }
}
