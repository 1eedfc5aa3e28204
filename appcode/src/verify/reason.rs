//! Why a program is rejected, in words that say how to fix it.

use std::fmt;

use super::MAX_OFFSET;
use super::value::Region;
use crate::insn::Unsupported;

/// Why a program was rejected, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Slot of the offending instruction.
    pub insn: usize,
    pub reason: Reason,
}

/// Why a program was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    Unsupported(Unsupported),
    /// More instruction slots than the verifier accepts.
    TooLarge {
        insns: usize,
        limit: usize,
    },
    BadRegister(u8),
    FramePointerWrite,
    JumpOutside,
    JumpIntoLddw,
    FallsOffEnd,
    LocalCall,
    /// A global reference on something other than an `lddw`, or two on one.
    BadReference,
    Uninit {
        reg: u8,
    },
    UninitStack {
        off: i64,
        size: i64,
    },
    NotPointer {
        reg: u8,
    },
    OutOfBounds {
        region: Region,
        lo: i64,
        hi: i64,
        size: i64,
    },
    ReadOnly {
        region: Region,
    },
    CtxField {
        off: i64,
        size: i64,
    },
    PointerLeak(&'static str),
    PointerArithmetic(&'static str),
    /// A pointer moved by a number that may take it more than [`MAX_OFFSET`] bytes away.
    PointerOffset {
        smin: i64,
        smax: i64,
    },
    PointerCompare,
    SpilledPointer,
    DivByZero,
    UnknownHelper(i32),
    HelperArg {
        helper: &'static str,
        arg: usize,
        why: &'static str,
    },
    ReturnsPointer,
    /// The path came back to `insn` in a state it had been in: nothing bounds the loop.
    Loop,
    /// Exploration exceeded its budget; `insn` is the jump target visited most often.
    TooComplex {
        processed: u64,
    },
    Timeout,
}

fn region_name(r: &Region) -> String {
    match r {
        Region::Ctx => "the context".into(),
        Region::Data => "the data window".into(),
        Region::Stack => "the stack".into(),
        Region::Scratch => "scratch memory".into(),
        Region::Arg => "the argument blob".into(),
        Region::Global(g) => format!("global section {}", g.index()),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Unsupported(u) => write!(f, "{u}"),
            Reason::TooLarge { insns, limit } => {
                write!(f, "{insns} instructions; the limit is {limit}")
            }
            Reason::BadRegister(r) => write!(f, "there is no register r{r}"),
            Reason::FramePointerWrite => write!(f, "r10, the frame pointer, is read-only"),
            Reason::JumpOutside => write!(f, "jump target outside the program"),
            Reason::JumpIntoLddw => write!(f, "jump into the middle of an lddw"),
            Reason::FallsOffEnd => write!(f, "execution can run past the last instruction"),
            Reason::LocalCall => write!(f, "bpf-to-bpf call left after inlining"),
            Reason::BadReference => write!(
                f,
                "a reference to a global on something other than one lddw"
            ),
            Reason::Uninit { reg } => write!(f, "r{reg} is read before it is written"),
            Reason::UninitStack { off, size } => write!(
                f,
                "reads {size} bytes of stack at r10{off:+} that were not all written"
            ),
            Reason::NotPointer { reg } => {
                write!(
                    f,
                    "r{reg} holds a number, not a pointer: it cannot be dereferenced"
                )
            }
            Reason::OutOfBounds {
                region,
                lo,
                hi,
                size,
            } => write!(
                f,
                "access to bytes [{lo}, {hi}) of {}, which has {size}; compare the offset with \
                 the end first (e.g. if (p + n > data_end) return 0;)",
                region_name(region)
            ),
            Reason::ReadOnly { region } => write!(f, "{} is read-only", region_name(region)),
            Reason::CtxField { off, size } => write!(
                f,
                "{size}-byte access at offset {off} of the context is not a permitted field access \
                 (fields are read whole, at a constant offset; only ctx->next is writable)"
            ),
            Reason::PointerLeak(what) => write!(f, "pointer leak: {what}"),
            Reason::PointerArithmetic(what) => write!(f, "pointer arithmetic: {what}"),
            Reason::PointerOffset { smin, smax } => write!(
                f,
                "pointer arithmetic: the pointer's offset may lie anywhere in [{smin}, {smax}]; \
                 an offset must stay within ±{MAX_OFFSET} — bound the number before adding it \
                 (e.g. if (i >= n) return 0;)"
            ),
            Reason::PointerCompare => write!(
                f,
                "pointers may be compared only with pointers into the same region"
            ),
            Reason::SpilledPointer => {
                write!(
                    f,
                    "part of a pointer saved on the stack is overwritten or read"
                )
            }
            Reason::DivByZero => write!(
                f,
                "the divisor may be zero; check it first (if (d == 0) ...)"
            ),
            Reason::UnknownHelper(id) => write!(f, "unknown helper {id} (see nearfs.h)"),
            Reason::HelperArg { helper, arg, why } => {
                write!(f, "argument {arg} of {helper}: {why}")
            }
            Reason::ReturnsPointer => write!(f, "pointer leak: r0 holds a pointer at exit"),
            Reason::Loop => write!(
                f,
                "loop without a bound the verifier can see: the program can come back here in a \
                 state it was already in. Give the loop a constant bound, e.g. \
                 for (int i = 0; i < 64 && cond; i++)"
            ),
            Reason::TooComplex { processed } => write!(
                f,
                "the verifier gave up after {processed} instructions, most of them in the loop \
                 starting here; give it a smaller constant bound or move the work into a helper"
            ),
            Reason::Timeout => write!(f, "the verifier ran out of time"),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "insn {}: {}", self.insn, self.reason)
    }
}

impl std::error::Error for Rejection {}
