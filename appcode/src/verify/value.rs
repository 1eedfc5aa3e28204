//! The verifier's abstract values: what a register or stack slot may hold at one point of
//! one path.
//!
//! Numbers are kept as an unsigned and a signed interval that refine each other (as the
//! Linux verifier's `umin/umax/smin/smax`). Pointers are a region plus an interval of byte
//! offsets into it; their numeric value (a host address) is never visible to the program.

use crate::insn::{SRC_X, alu, class};

/// A set of 64-bit values: those inside both intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub umin: u64,
    pub umax: u64,
    pub smin: i64,
    pub smax: i64,
}

impl Range {
    pub const UNKNOWN: Range = Range {
        umin: 0,
        umax: u64::MAX,
        smin: i64::MIN,
        smax: i64::MAX,
    };

    pub fn konst(v: u64) -> Range {
        Range {
            umin: v,
            umax: v,
            smin: v as i64,
            smax: v as i64,
        }
    }

    pub fn unsigned(umin: u64, umax: u64) -> Option<Range> {
        Range {
            umin,
            umax,
            ..Range::UNKNOWN
        }
        .sync()
    }

    pub fn signed(smin: i64, smax: i64) -> Option<Range> {
        Range {
            smin,
            smax,
            ..Range::UNKNOWN
        }
        .sync()
    }

    /// Values of `bytes` bytes, zero-extended.
    pub fn width(bytes: u32) -> Range {
        match bytes {
            8 => Range::UNKNOWN,
            n => Range::unsigned(0, (1u64 << (8 * n)) - 1).unwrap(),
        }
    }

    pub fn constant(&self) -> Option<u64> {
        (self.umin == self.umax).then_some(self.umin)
    }

    pub fn contains(&self, other: &Range) -> bool {
        self.umin <= other.umin
            && other.umax <= self.umax
            && self.smin <= other.smin
            && other.smax <= self.smax
    }

    /// Tightens each interval with what the other implies; `None` if no value is left.
    pub fn sync(mut self) -> Option<Range> {
        for _ in 0..2 {
            // Unsigned bounds on one side of the sign boundary are signed bounds too.
            if self.umax <= i64::MAX as u64 || self.umin > i64::MAX as u64 {
                self.smin = self.smin.max(self.umin as i64);
                self.smax = self.smax.min(self.umax as i64);
            }
            if self.smin >= 0 || self.smax < 0 {
                self.umin = self.umin.max(self.smin as u64);
                self.umax = self.umax.min(self.smax as u64);
            }
        }
        (self.umin <= self.umax && self.smin <= self.smax).then_some(self)
    }

    /// The low 32 bits, zero-extended: exact when every value fits.
    pub fn low32(&self) -> Range {
        if let Some(v) = self.constant() {
            Range::konst(v as u32 as u64)
        } else if self.umax <= u32::MAX as u64 {
            *self
        } else {
            Range::width(4)
        }
    }

    /// Whether the set may include zero.
    pub fn may_be_zero(&self) -> bool {
        self.umin == 0
    }

    pub fn union(&self, o: &Range) -> Range {
        Range {
            umin: self.umin.min(o.umin),
            umax: self.umax.max(o.umax),
            smin: self.smin.min(o.smin),
            smax: self.smax.max(o.smax),
        }
    }
}

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

/// Memory a pointer may point into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Region {
    /// The context struct.
    Ctx,
    /// The data window.
    Data,
    /// The stack (offsets 0..512; r10 is offset 512).
    Stack,
    /// The run's scratch memory.
    Scratch,
    /// The caller's argument blob.
    Arg,
    /// A read-only global section of the object (index into its regions).
    Global(u16),
}

/// What a register or spilled stack slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// Never written on this path.
    Uninit,
    Scalar(Range),
    Ptr {
        region: Region,
        off: Range,
    },
}

impl Value {
    /// Whether every concrete state `other` describes is described by `self`, as far as
    /// anything the program does next can tell.
    pub fn covers(&self, other: &Value) -> bool {
        match (self, other) {
            // The path from `self` never read it, so whatever `other` holds is not read.
            (Value::Uninit, Value::Ptr { .. }) => false,
            (Value::Uninit, _) => true,
            (Value::Scalar(a), Value::Scalar(b)) => a.contains(b),
            (Value::Ptr { region: r, off: a }, Value::Ptr { region: q, off: b }) => {
                r == q && a.contains(b)
            }
            _ => false,
        }
    }
}

/// Registers and saved slots with the same nonzero `id` hold values that differ by known
/// constants (`value = base + delta`, wrapping): copies, and copies moved by `+= k`. A
/// comparison that narrows one of them narrows them all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Link {
    pub id: u32,
    pub delta: i64,
}

impl Link {
    pub const NONE: Link = Link { id: 0, delta: 0 };

    /// Whether a state relying on `self` may stand for one whose value has link `other`.
    pub fn implied_by(&self, other: &Link) -> bool {
        self.id == 0 || self == other
    }
}

impl Value {
    /// The value plus `by` (64-bit, wrapping).
    pub fn shifted(&self, by: i64) -> Value {
        let add = |r: &Range| {
            alu_range(
                class::ALU64 | alu::ADD | SRC_X,
                *r,
                Range::konst(by as u64),
                0,
            )
        };
        match self {
            Value::Scalar(r) => Value::Scalar(add(r)),
            Value::Ptr { region, off } => Value::Ptr {
                region: *region,
                off: add(off),
            },
            Value::Uninit => Value::Uninit,
        }
    }

    /// Values in both; `None` if there are none.
    pub fn meet(&self, other: &Value) -> Option<Value> {
        let both = |a: &Range, b: &Range| {
            Range {
                umin: a.umin.max(b.umin),
                umax: a.umax.min(b.umax),
                smin: a.smin.max(b.smin),
                smax: a.smax.min(b.smax),
            }
            .sync()
        };
        Some(match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(both(a, b)?),
            (Value::Ptr { region, off: a }, Value::Ptr { region: q, off: b }) if region == q => {
                Value::Ptr {
                    region: *region,
                    off: both(a, b)?,
                }
            }
            _ => *self,
        })
    }

    /// Whether two values differ only in ranges that are not single constants: such
    /// states may be joined without losing what a loop counter says.
    pub fn same_shape(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Uninit, Value::Uninit) => true,
            (Value::Scalar(a), Value::Scalar(b)) => a.constant() == b.constant(),
            (Value::Ptr { region: r, off: a }, Value::Ptr { region: q, off: b }) => {
                r == q && a.constant() == b.constant()
            }
            _ => false,
        }
    }

    /// Whether two values are of one kind: both numbers, both pointers into one region,
    /// or both unset.
    pub fn same_kind(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Uninit, Value::Uninit) | (Value::Scalar(_), Value::Scalar(_)) => true,
            (Value::Ptr { region: r, .. }, Value::Ptr { region: q, .. }) => r == q,
            _ => false,
        }
    }

    /// A value covering both (of the same shape); with `widen`, bounds that `other`
    /// pushes past `self` move on to the next threshold.
    pub fn join(&self, other: &Value, widen: Option<&Thresholds>) -> Value {
        let join = |a: &Range, b: &Range| match widen {
            Some(t) => t.widen(a, b),
            None => a.union(b),
        };
        match (*self, *other) {
            (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(join(&a, &b)),
            (Value::Ptr { region, off: a }, Value::Ptr { off: b, .. }) => Value::Ptr {
                region,
                off: join(&a, &b),
            },
            (v, _) => v,
        }
    }
}

/// Bounds that widening jumps to: the program's constants and the powers of two, so that
/// a joined range grows in a few steps and stops at a limit the program tests.
pub struct Thresholds {
    unsigned: Vec<u64>,
    signed: Vec<i64>,
}

impl Thresholds {
    pub fn new(constants: impl IntoIterator<Item = u64>) -> Thresholds {
        let mut unsigned: Vec<u64> = constants
            .into_iter()
            .flat_map(|c| [c.wrapping_sub(1), c, c.wrapping_add(1)])
            .chain((0..64).flat_map(|k| [1u64 << k, (1u64 << k) - 1]))
            .chain([0, u64::MAX, i64::MAX as u64, 1 << 63])
            .collect();
        unsigned.sort_unstable();
        unsigned.dedup();
        let mut signed: Vec<i64> = unsigned
            .iter()
            .map(|&u| u as i64)
            .flat_map(|v| [v, v.wrapping_neg()])
            .chain([i64::MIN, i64::MAX])
            .collect();
        signed.sort_unstable();
        signed.dedup();
        Thresholds { unsigned, signed }
    }

    /// The union of `old` and `new`, with each bound that `new` pushes out moved on to
    /// the next threshold.
    pub fn widen(&self, old: &Range, new: &Range) -> Range {
        fn up<T: Ord + Copy>(ts: &[T], x: T, max: T) -> T {
            ts.get(ts.partition_point(|&t| t < x))
                .copied()
                .unwrap_or(max)
        }
        fn down<T: Ord + Copy>(ts: &[T], x: T, min: T) -> T {
            ts.partition_point(|&t| t <= x)
                .checked_sub(1)
                .map_or(min, |i| ts[i])
        }
        let u = &self.unsigned;
        let s = &self.signed;
        let r = Range {
            umin: if new.umin < old.umin {
                down(u, new.umin, 0)
            } else {
                old.umin
            },
            umax: if new.umax > old.umax {
                up(u, new.umax, u64::MAX)
            } else {
                old.umax
            },
            smin: if new.smin < old.smin {
                down(s, new.smin, i64::MIN)
            } else {
                old.smin
            },
            smax: if new.smax > old.smax {
                up(s, new.smax, i64::MAX)
            } else {
                old.smax
            },
        };
        r.sync().unwrap_or(Range::UNKNOWN)
    }
}

/// One 8-byte stack slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Bit i set: byte i holds some number the program wrote.
    Bytes(u8),
    /// A whole register stored with an 8-byte aligned store, with the register's link, so
    /// that narrowing the register narrows the saved copy too.
    Spill(Value, Link),
}

impl Slot {
    pub const EMPTY: Slot = Slot::Bytes(0);

    pub fn covers(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::Bytes(m), Slot::Bytes(n)) => m & !n == 0,
            (Slot::Bytes(0), Slot::Spill(v, _)) => !matches!(v, Value::Ptr { .. }),
            (Slot::Bytes(_), Slot::Spill(Value::Scalar(_), _)) => true,
            (Slot::Spill(a, i), Slot::Spill(b, j)) => a.covers(b) && i.implied_by(j),
            _ => false,
        }
    }

    pub fn same_shape(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::Bytes(m), Slot::Bytes(n)) => m == n,
            (Slot::Spill(a, i), Slot::Spill(b, j)) => i == j && a.same_shape(b),
            _ => false,
        }
    }

    pub fn same_kind(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::Bytes(m), Slot::Bytes(n)) => m == n,
            (Slot::Spill(a, i), Slot::Spill(b, j)) => i == j && a.same_kind(b),
            _ => false,
        }
    }

    /// Whether every byte `lo..lo + len` of the slot holds a number.
    pub fn readable(&self, lo: usize, len: usize) -> bool {
        let want = (((1u16 << len) - 1) << lo) as u8;
        match self {
            Slot::Bytes(m) => m & want == want,
            Slot::Spill(Value::Scalar(_), _) => true,
            Slot::Spill(..) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insn::alu;

    fn concrete_in(op: u8, d: Range, s: Range, dv: u64, sv: u64) {
        let r = alu_range(op, d, s, 0);
        let v = alu_concrete(op, dv, sv, 0);
        assert!(
            r.umin <= v && v <= r.umax && r.smin <= v as i64 && v as i64 <= r.smax,
            "op {op:#x}: {dv} ? {sv} = {v} outside {r:?}"
        );
    }

    #[test]
    fn ranges_contain_every_concrete_result() {
        let samples: [u64; 9] = [
            0,
            1,
            7,
            255,
            4096,
            1 << 31,
            u32::MAX as u64,
            1 << 63,
            u64::MAX,
        ];
        let ops = [
            alu::ADD,
            alu::SUB,
            alu::MUL,
            alu::DIV,
            alu::MOD,
            alu::OR,
            alu::AND,
            alu::XOR,
            alu::LSH,
            alu::RSH,
            alu::ARSH,
            alu::NEG,
        ];
        for class in [class::ALU, class::ALU64] {
            for &code in &ops {
                let op = class | code | SRC_X;
                for &a in &samples {
                    for &b in &samples {
                        for &c in &samples {
                            for &e in &samples {
                                let (d, s) = (a.min(b), a.max(b));
                                let (t, u) = (c.min(e), c.max(e));
                                let dr = Range::unsigned(d, s).unwrap();
                                let sr = Range::unsigned(t, u).unwrap();
                                if matches!(code, alu::DIV | alu::MOD) && sr.may_be_zero() {
                                    continue;
                                }
                                for dv in [d, s] {
                                    for sv in [t, u] {
                                        concrete_in(op, dr, sr, dv, sv);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sync_moves_bounds_between_signed_and_unsigned() {
        let r = Range::signed(0, 10).unwrap();
        assert_eq!((r.umin, r.umax), (0, 10));
        let neg = Range::signed(-5, -1).unwrap();
        assert_eq!(neg.umin, (-5i64) as u64);
        assert!(Range::unsigned(5, 4).is_none());
    }
}
