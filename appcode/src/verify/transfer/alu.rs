//! ALU instructions: numbers as RFC 9669 computes them, and what may be done to pointers.
//!
//! A pointer may only be moved by adding or subtracting a number (64-bit), and only while
//! its offset stays within ±[`MAX_OFFSET`]: then no address computed from it wraps, which
//! is what lets the jump transfer compare pointer offsets as plain integers.

use super::super::MAX_OFFSET;
use super::super::range::Range;
use super::super::state::State;
use super::super::value::{Link, Value};
use super::{Env, read, scalar};
use crate::insn::{Insn, SRC_X, alu, class};
use crate::verify::Reason;

/// The concrete result of an ALU instruction, as RFC 9669 defines it (division by zero
/// gives zero, modulo by zero leaves the dividend, shift amounts are masked).
pub fn alu_concrete(op: u8, dst: u64, src: u64, imm: i32) -> u64 {
    let is64 = op & 0x07 == class::ALU64;
    let (d, s) = if is64 {
        (dst, src)
    } else {
        (dst as u32 as u64, src as u32 as u64)
    };
    let mask = if is64 { 63 } else { 31 };
    let r = match op & 0xf0 {
        alu::ADD => d.wrapping_add(s),
        alu::SUB => d.wrapping_sub(s),
        alu::MUL => d.wrapping_mul(s),
        alu::DIV => d.checked_div(s).unwrap_or(0),
        alu::MOD => d.checked_rem(s).unwrap_or(d),
        alu::OR => d | s,
        alu::AND => d & s,
        alu::XOR => d ^ s,
        alu::LSH => d << (s & mask),
        alu::RSH => d >> (s & mask),
        alu::ARSH if is64 => ((d as i64) >> (s & mask)) as u64,
        alu::ARSH => ((d as u32 as i32) >> (s & mask)) as u32 as u64,
        alu::NEG => d.wrapping_neg(),
        alu::MOV => s,
        alu::END => {
            let big = op & SRC_X != 0;
            match (imm, big) {
                (16, false) => dst as u16 as u64,
                (32, false) => dst as u32 as u64,
                (16, true) => (dst as u16).swap_bytes() as u64,
                (32, true) => (dst as u32).swap_bytes() as u64,
                (_, true) => dst.swap_bytes(),
                _ => dst,
            }
        }
        _ => 0,
    };
    if is64 || op & 0xf0 == alu::END {
        r
    } else {
        r as u32 as u64
    }
}

/// The set of results of an ALU instruction over sets of operands (64-bit unless `is64`
/// is false, in which case operands and result are the low 32 bits).
pub fn alu_range(op: u8, d: Range, s: Range, imm: i32) -> Range {
    let is64 = op & 0x07 == class::ALU64;
    let code = op & 0xf0;
    if code == alu::END {
        return match d.constant() {
            Some(v) => Range::konst(alu_concrete(op, v, 0, imm)),
            None if imm == 64 && op & SRC_X == 0 => d,
            None if imm == 64 => Range::UNKNOWN,
            None if op & SRC_X == 0 && d.umax < 1u64 << imm => d,
            None => Range::width(imm as u32 / 8),
        };
    }
    let (d, s) = if is64 { (d, s) } else { (d.low32(), s.low32()) };
    if let (Some(a), Some(b)) = (d.constant(), s.constant()) {
        return Range::konst(alu_concrete(op, a, b, imm));
    }
    let full = if is64 {
        Range::UNKNOWN
    } else {
        Range::width(4)
    };
    let r = match code {
        alu::MOV => Some(s),
        alu::ADD => {
            let u = d.umax.checked_add(s.umax).map(|hi| (d.umin + s.umin, hi));
            let sg = d.smin.checked_add(s.smin).zip(d.smax.checked_add(s.smax));
            join_bounds(u, sg)
        }
        alu::SUB => {
            let u = (d.umin >= s.umax).then(|| (d.umin - s.umax, d.umax - s.umin));
            let sg = d.smin.checked_sub(s.smax).zip(d.smax.checked_sub(s.smin));
            join_bounds(u, sg)
        }
        alu::MUL => d
            .umax
            .checked_mul(s.umax)
            .and_then(|hi| Range::unsigned(d.umin * s.umin, hi)),
        // The verifier refuses divisors that may be zero before getting here.
        alu::DIV if s.umin > 0 => Range::unsigned(d.umin / s.umax, d.umax / s.umin),
        alu::MOD if s.umin > 0 => Range::unsigned(0, d.umax.min(s.umax - 1)),
        alu::AND => Range::unsigned(0, d.umax.min(s.umax)),
        alu::OR | alu::XOR => {
            let hi = d.umax.max(s.umax);
            let ones = u64::MAX.checked_shr(hi.leading_zeros()).unwrap_or(0);
            let lo = if code == alu::OR {
                d.umin.max(s.umin)
            } else {
                0
            };
            Range::unsigned(lo, ones)
        }
        alu::LSH => match s.constant() {
            Some(k) if k < 64 && d.umax.leading_zeros() as u64 >= k => {
                Range::unsigned(d.umin << k, d.umax << k)
            }
            _ => None,
        },
        alu::RSH if s.umax < if is64 { 64 } else { 32 } => {
            Range::unsigned(d.umin >> s.umax, d.umax >> s.umin)
        }
        alu::ARSH if is64 && s.umax < 64 => Range::signed(
            (d.smin >> s.umin).min(d.smin >> s.umax),
            (d.smax >> s.umin).max(d.smax >> s.umax),
        ),
        alu::NEG if is64 && d.smin != i64::MIN => Range::signed(-d.smax, -d.smin),
        _ => None,
    };
    match r {
        Some(r) if is64 || r.umax <= u32::MAX as u64 => r,
        _ => full,
    }
}

fn join_bounds(u: Option<(u64, u64)>, s: Option<(i64, i64)>) -> Option<Range> {
    let (umin, umax) = u.unwrap_or((0, u64::MAX));
    let (smin, smax) = s.unwrap_or((i64::MIN, i64::MAX));
    Range {
        umin,
        umax,
        smin,
        smax,
    }
    .sync()
}

/// `r + by`, 64-bit, wrapping.
pub fn add_const(r: &Range, by: i64) -> Range {
    alu_range(
        class::ALU64 | alu::ADD | SRC_X,
        *r,
        Range::konst(by as u64),
        0,
    )
}

/// A pointer's offset moved by `s` (`code` is ADD or SUB); refused if it may leave
/// ±[`MAX_OFFSET`] (unless memory checks are off, in which case anything goes and the
/// engine's checks are all that stand).
fn moved(env: &Env<'_>, code: u8, off: Range, s: Range) -> Result<Range, Reason> {
    let out = alu_range(class::ALU64 | code | SRC_X, off, s, 0);
    if env.checks.memory && !out.within(MAX_OFFSET) {
        return Err(Reason::PointerOffset {
            smin: out.smin,
            smax: out.smax,
        });
    }
    Ok(out)
}

/// One ALU instruction.
pub(in crate::verify) fn step(
    env: &mut Env<'_>,
    state: &mut State,
    i: &Insn,
) -> Result<(), Reason> {
    let code = i.op & 0xf0;
    let is64 = i.class() == class::ALU64;
    let x = i.op & SRC_X != 0 && !matches!(code, alu::NEG | alu::END);
    let src = if x {
        read(state, i.src)?
    } else {
        scalar(Range::konst(i.imm as i64 as u64))
    };
    let dst = if code == alu::MOV {
        Value::Uninit
    } else {
        read(state, i.dst)?
    };
    if matches!(code, alu::DIV | alu::MOD)
        && let Value::Scalar(s) = src
    {
        let s = if is64 { s } else { s.low32() };
        if s.may_be_zero() {
            return Err(Reason::DivByZero);
        }
    }
    let out = match (dst, src) {
        (_, Value::Scalar(s)) if code == alu::MOV => scalar(if is64 { s } else { s.low32() }),
        (_, p @ Value::Ptr { .. }) if code == alu::MOV => {
            if !is64 {
                return Err(Reason::PointerLeak("truncating a pointer to 32 bits"));
            }
            p
        }
        (Value::Scalar(d), Value::Scalar(s)) => scalar(alu_range(i.op, d, s, i.imm)),
        (Value::Ptr { region, off }, Value::Scalar(s)) => {
            if !is64 || !matches!(code, alu::ADD | alu::SUB) {
                return Err(Reason::PointerArithmetic(
                    "only adding or subtracting a number (64-bit) keeps a pointer",
                ));
            }
            Value::Ptr {
                region,
                off: moved(env, code, off, s)?,
            }
        }
        (Value::Scalar(d), Value::Ptr { region, off }) => {
            if !is64 || code != alu::ADD {
                return Err(Reason::PointerArithmetic(
                    "a number minus a pointer, or 32-bit arithmetic on a pointer",
                ));
            }
            Value::Ptr {
                region,
                off: moved(env, alu::ADD, off, d)?,
            }
        }
        (Value::Ptr { region: r, off: a }, Value::Ptr { region: q, off: b }) => {
            if !is64 || code != alu::SUB || r != q {
                return Err(Reason::PointerArithmetic(
                    "two pointers can only be subtracted, and only within one region",
                ));
            }
            scalar(alu_range(class::ALU64 | alu::SUB | SRC_X, a, b, 0))
        }
        (Value::Uninit, _) | (_, Value::Uninit) => {
            unreachable!("uninitialised operands were refused")
        }
    };
    let before = state.links[i.dst as usize];
    state.set(i.dst, out);
    let by = match src {
        Value::Scalar(s) if is64 => s.constant().map(|c| c as i64),
        _ => None,
    };
    if code == alu::MOV && is64 && x {
        state.links[i.dst as usize] = env.link_of(state, i.src);
    } else if let (alu::ADD | alu::SUB, Some(c), true) = (code, by, before.id != 0) {
        let delta = if code == alu::ADD {
            before.delta.wrapping_add(c)
        } else {
            before.delta.wrapping_sub(c)
        };
        state.links[i.dst as usize] = Link { delta, ..before };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::super::range::arb;
    use super::super::super::value::Region;
    use super::*;
    use crate::verify::Checks;

    const CODES: [u8; 13] = [
        alu::ADD,
        alu::SUB,
        alu::MUL,
        alu::DIV,
        alu::OR,
        alu::AND,
        alu::LSH,
        alu::RSH,
        alu::NEG,
        alu::MOD,
        alu::XOR,
        alu::MOV,
        alu::ARSH,
    ];

    fn env() -> Env<'static> {
        Env {
            globals: &[],
            checks: Checks::default(),
            refs: Vec::new(),
            next_id: 0,
            stack_used: 0,
            targets: Vec::new(),
        }
    }

    fn state_with(r1: Value, r2: Value) -> State {
        let mut regs = [Value::Uninit; 11];
        regs[1] = r1;
        regs[2] = r2;
        State {
            regs,
            links: [Link::NONE; 11],
            stack: Vec::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Every ALU and ALU64 operation, register and immediate form.
        #[test]
        fn numbers_land_in_the_abstract_result(
            k in 0..CODES.len(),
            wide in any::<bool>(),
            (d, dv) in arb::range_with_value(),
            (s, sv) in arb::range_with_value(),
            imm in any::<i32>(),
        ) {
            let cls = if wide { class::ALU64 } else { class::ALU };
            for op in [cls | CODES[k] | SRC_X, cls | CODES[k]] {
                let (s, sv) = if op & SRC_X != 0 {
                    (s, sv)
                } else {
                    let c = i64::from(imm) as u64;
                    (Range::konst(c), c)
                };
                let r = alu_range(op, d, s, imm);
                let v = alu_concrete(op, dv, sv, imm);
                prop_assert!(r.has(v), "op {op:#x}: {dv:#x} ? {sv:#x} = {v:#x} outside {r:?}");
            }
        }

        #[test]
        fn byte_swaps_land_in_the_abstract_result(
            (d, dv) in arb::range_with_value(),
            w in 0..3usize,
            big in any::<bool>(),
        ) {
            let imm = [16, 32, 64][w];
            let op = class::ALU | alu::END | if big { SRC_X } else { 0 };
            let r = alu_range(op, d, Range::UNKNOWN, imm);
            prop_assert!(r.has(alu_concrete(op, dv, 0, imm)));
        }

        /// The state transfer: numbers as above; pointers move by the number and, when
        /// accepted, stay within ±MAX_OFFSET, where no address wraps.
        #[test]
        fn pointers_move_by_the_number_and_stay_bounded(
            (off, ov) in arb::range_with_value(),
            (s, sv) in arb::range_with_value(),
            sub in any::<bool>(),
        ) {
            let code = if sub { alu::SUB } else { alu::ADD };
            let i = Insn::new(class::ALU64 | code | SRC_X, 1, 2, 0, 0);
            let p = Value::Ptr { region: Region::Scratch, off };
            let mut state = state_with(p, Value::Scalar(s));
            let mut env = env();
            if step(&mut env, &mut state, &i).is_ok() {
                let Value::Ptr { region, off: out } = state.regs[1] else {
                    panic!("a pointer stays a pointer");
                };
                prop_assert_eq!(region, Region::Scratch);
                let v = if sub { ov.wrapping_sub(sv) } else { ov.wrapping_add(sv) };
                prop_assert!(out.has(v));
                prop_assert!(out.within(MAX_OFFSET));
            }
        }
    }

    #[test]
    fn a_pointer_plus_an_unbounded_number_is_refused() {
        let i = Insn::new(class::ALU64 | alu::ADD | SRC_X, 1, 2, 0, 0);
        let mut state = state_with(
            Value::Ptr {
                region: Region::Data,
                off: Range::konst(0),
            },
            Value::Scalar(Range::UNKNOWN),
        );
        let r = step(&mut env(), &mut state, &i);
        assert!(matches!(r, Err(Reason::PointerOffset { .. })), "{r:?}");
        // Bounded by 2^29, it is fine.
        state.regs[2] = Value::Scalar(Range::unsigned(0, MAX_OFFSET as u64).unwrap());
        assert!(step(&mut env(), &mut state, &i).is_ok());
    }
}
