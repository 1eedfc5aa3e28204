//! Jumps and exits: which way a conditional jump may go, and what each way tells about
//! its operands.
//!
//! Numbers are narrowed with the comparison's own semantics, 64- or 32-bit. Pointers may be
//! compared only with pointers into the same region; their offsets are compared as signed
//! integers, which is what the CPU's comparison of the two addresses (unsigned or signed)
//! decides when no address wraps: every region's addresses lie far from 0 and 2^63
//! ([`crate::memory`]) and every offset within ±[`MAX_OFFSET`] (the ALU transfer sees to
//! it). Offsets outside that band, which only a disabled check lets through, narrow nothing.

use super::super::MAX_OFFSET;
use super::super::range::Range;
use super::super::state::State;
use super::super::value::Value;
use super::{Env, Flow, read, scalar};
use crate::insn::{Insn, SRC_X, class, jmp};
use crate::verify::Reason;

/// One jump, exit or call.
pub(in crate::verify) fn step(
    env: &mut Env<'_>,
    state: &mut State,
    i: &Insn,
    pc: usize,
) -> Result<Flow, Reason> {
    let code = i.op & 0xf0;
    let target = (pc as i64 + 1 + i64::from(i.off)) as usize;
    match code {
        jmp::EXIT => {
            return match read(state, 0)? {
                Value::Ptr { .. } => Err(Reason::ReturnsPointer),
                _ => Ok(Flow::Exit),
            };
        }
        jmp::CALL => {
            super::call::step(env, state, i.imm)?;
            return Ok(Flow::Next(1));
        }
        jmp::JA => return Ok(Flow::Jump(target)),
        _ => {}
    }
    let is32 = i.class() == class::JMP32;
    let a = read(state, i.dst)?;
    let b = if i.op & SRC_X != 0 {
        read(state, i.src)?
    } else {
        let imm = i.imm as i64 as u64;
        scalar(Range::konst(if is32 { imm as u32 as u64 } else { imm }))
    };
    let cond = Cond::of(code);
    let mut ways = Vec::with_capacity(2);
    for (c, to) in [(cond, target), (cond.negate(), pc + 1)] {
        let narrowed = match (a, b) {
            (Value::Scalar(x), Value::Scalar(y)) if is32 => refine32(c, x, y),
            (Value::Scalar(x), Value::Scalar(y)) => refine(c, x, y),
            (Value::Ptr { region: r, off: x }, Value::Ptr { region: q, off: y })
                if r == q && !is32 && !matches!(c, Cond::Set | Cond::NotSet) =>
            {
                refine_offsets(c, x, y)
            }
            _ => return Err(Reason::PointerCompare),
        };
        let Some((x, y)) = narrowed else { continue };
        let mut s = state.clone();
        if !s.narrow(i.dst, a.with_range(x)) {
            continue;
        }
        if i.op & SRC_X != 0 && !s.narrow(i.src, b.with_range(y)) {
            continue;
        }
        ways.push((s, to));
    }
    Ok(Flow::Branch(ways))
}

/// `refine` for two pointers' offsets in one region: exact where no address can wrap,
/// nothing learnt otherwise.
pub fn refine_offsets(cond: Cond, a: Range, b: Range) -> Option<(Range, Range)> {
    if a.within(MAX_OFFSET) && b.within(MAX_OFFSET) {
        refine(cond.signed(), a, b)
    } else {
        Some((a, b))
    }
}

/// Conditions of conditional jumps, on the operands' values.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    Eq,
    Ne,
    Ugt,
    Uge,
    Ult,
    Ule,
    Sgt,
    Sge,
    Slt,
    Sle,
    Set,
    NotSet,
}

impl Cond {
    pub fn of(code: u8) -> Cond {
        match code {
            jmp::JEQ => Cond::Eq,
            jmp::JNE => Cond::Ne,
            jmp::JGT => Cond::Ugt,
            jmp::JGE => Cond::Uge,
            jmp::JLT => Cond::Ult,
            jmp::JLE => Cond::Ule,
            jmp::JSGT => Cond::Sgt,
            jmp::JSGE => Cond::Sge,
            jmp::JSLT => Cond::Slt,
            jmp::JSLE => Cond::Sle,
            _ => Cond::Set,
        }
    }

    pub fn negate(self) -> Cond {
        match self {
            Cond::Eq => Cond::Ne,
            Cond::Ne => Cond::Eq,
            Cond::Ugt => Cond::Ule,
            Cond::Uge => Cond::Ult,
            Cond::Ult => Cond::Uge,
            Cond::Ule => Cond::Ugt,
            Cond::Sgt => Cond::Sle,
            Cond::Sge => Cond::Slt,
            Cond::Slt => Cond::Sge,
            Cond::Sle => Cond::Sgt,
            Cond::Set => Cond::NotSet,
            Cond::NotSet => Cond::Set,
        }
    }

    /// The same comparison on values known to lie in 0..=i64::MAX, as an unsigned one.
    pub fn unsigned(self) -> Cond {
        match self {
            Cond::Sgt => Cond::Ugt,
            Cond::Sge => Cond::Uge,
            Cond::Slt => Cond::Ult,
            Cond::Sle => Cond::Ule,
            c => c,
        }
    }

    /// The same comparison of pointer offsets, which are signed.
    pub fn signed(self) -> Cond {
        match self {
            Cond::Ugt => Cond::Sgt,
            Cond::Uge => Cond::Sge,
            Cond::Ult => Cond::Slt,
            Cond::Ule => Cond::Sle,
            c => c,
        }
    }
}

/// Narrows `a` and `b` to the values for which `a cond b` holds; `None` if none do.
pub fn refine(cond: Cond, mut a: Range, mut b: Range) -> Option<(Range, Range)> {
    match cond {
        Cond::Eq => {
            let both = Range {
                umin: a.umin.max(b.umin),
                umax: a.umax.min(b.umax),
                smin: a.smin.max(b.smin),
                smax: a.smax.min(b.smax),
            }
            .sync()?;
            return Some((both, both));
        }
        Cond::Ne => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x != y).then_some((a, b));
            }
            let (ka, kb) = (a.constant(), b.constant());
            for (v, k) in [(&mut a, kb), (&mut b, ka)] {
                if let Some(k) = k {
                    if v.umin == k {
                        v.umin = k.checked_add(1)?;
                    }
                    if v.umax == k {
                        v.umax = k.checked_sub(1)?;
                    }
                    if v.smin == k as i64 {
                        v.smin = (k as i64).checked_add(1)?;
                    }
                    if v.smax == k as i64 {
                        v.smax = (k as i64).checked_sub(1)?;
                    }
                }
            }
        }
        Cond::Ugt => {
            a.umin = a.umin.max(b.umin.checked_add(1)?);
            b.umax = b.umax.min(a.umax.checked_sub(1)?);
        }
        Cond::Uge => {
            a.umin = a.umin.max(b.umin);
            b.umax = b.umax.min(a.umax);
        }
        Cond::Ult => return refine(Cond::Ugt, b, a).map(|(b, a)| (a, b)),
        Cond::Ule => return refine(Cond::Uge, b, a).map(|(b, a)| (a, b)),
        Cond::Sgt => {
            a.smin = a.smin.max(b.smin.checked_add(1)?);
            b.smax = b.smax.min(a.smax.checked_sub(1)?);
        }
        Cond::Sge => {
            a.smin = a.smin.max(b.smin);
            b.smax = b.smax.min(a.smax);
        }
        Cond::Slt => return refine(Cond::Sgt, b, a).map(|(b, a)| (a, b)),
        Cond::Sle => return refine(Cond::Sge, b, a).map(|(b, a)| (a, b)),
        Cond::Set => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x & y != 0).then_some((a, b));
            }
            if a.umax == 0 || b.umax == 0 {
                return None;
            }
        }
        Cond::NotSet => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x & y == 0).then_some((a, b));
            }
        }
    }
    Some((a.sync()?, b.sync()?))
}

/// `refine` for a 32-bit comparison: exact when both sides fit in 31 bits; otherwise only
/// constants are decided and nothing is narrowed.
pub fn refine32(cond: Cond, a: Range, b: Range) -> Option<(Range, Range)> {
    let small = |r: &Range| r.umax <= i32::MAX as u64;
    if small(&a) && small(&b) {
        return refine(cond.unsigned(), a, b);
    }
    let (a32, b32) = (a.low32(), b.low32());
    if let (Some(x), Some(y)) = (a32.constant(), b32.constant()) {
        return cond.holds(x, y, 32).then_some((a, b));
    }
    Some((a, b))
}

impl Cond {
    /// Whether `a cond b` holds, for `width`-bit operands (32 or 64): what the CPU decides.
    pub fn holds(self, a: u64, b: u64, width: u32) -> bool {
        let (a, b) = if width == 32 {
            (a as u32 as u64, b as u32 as u64)
        } else {
            (a, b)
        };
        let (sa, sb) = if width == 32 {
            (a as u32 as i32 as i64, b as u32 as i32 as i64)
        } else {
            (a as i64, b as i64)
        };
        match self {
            Cond::Eq => a == b,
            Cond::Ne => a != b,
            Cond::Ugt => a > b,
            Cond::Uge => a >= b,
            Cond::Ult => a < b,
            Cond::Ule => a <= b,
            Cond::Sgt => sa > sb,
            Cond::Sge => sa >= sb,
            Cond::Slt => sa < sb,
            Cond::Sle => sa <= sb,
            Cond::Set => a & b != 0,
            Cond::NotSet => a & b == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::super::range::arb;
    use super::*;
    use crate::memory::guest;

    const CODES: [u8; 11] = [
        jmp::JEQ,
        jmp::JGT,
        jmp::JGE,
        jmp::JSET,
        jmp::JNE,
        jmp::JSGT,
        jmp::JSGE,
        jmp::JLT,
        jmp::JLE,
        jmp::JSLT,
        jmp::JSLE,
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whichever way concrete operands go, that way is kept and still holds them.
        #[test]
        fn refinements_keep_every_concrete_pair(
            k in 0..CODES.len(),
            (a, x) in arb::range_with_value(),
            (b, y) in arb::range_with_value(),
        ) {
            for cond in [Cond::of(CODES[k]), Cond::of(CODES[k]).negate()] {
                if cond.holds(x, y, 64) {
                    let r = refine(cond, a, b);
                    prop_assert!(r.is_some_and(|(a, b)| a.has(x) && b.has(y)), "{r:?}");
                }
                if cond.holds(x, y, 32) {
                    let r = refine32(cond, a, b);
                    prop_assert!(r.is_some_and(|(a, b)| a.has(x) && b.has(y)), "{r:?}");
                }
            }
        }

        /// Pointer compares: the CPU compares addresses (guest base + offset), unsigned for
        /// JGT/JGE/JLT/JLE and signed for the S-forms; the refinement of the offsets keeps
        /// every pair of offsets whose addresses take that way.
        #[test]
        fn pointer_refinements_agree_with_address_compares(
            k in 0..CODES.len(),
            (a, x) in arb::range_with_value(),
            (b, y) in arb::range_with_value(),
            base in prop_oneof![Just(guest::WINDOW), Just(guest::STACK), Just(guest::GLOBALS)],
        ) {
            for cond in [Cond::of(CODES[k]), Cond::of(CODES[k]).negate()] {
                if matches!(cond, Cond::Set | Cond::NotSet) {
                    continue;
                }
                let (px, py) = (base.wrapping_add(x), base.wrapping_add(y));
                if cond.holds(px, py, 64) {
                    let r = refine_offsets(cond, a, b);
                    prop_assert!(r.is_some_and(|(a, b)| a.has(x) && b.has(y)), "{r:?}");
                }
            }
        }
    }
}
