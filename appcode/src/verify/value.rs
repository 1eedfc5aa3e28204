//! The verifier's abstract values: what a register or stack slot may hold at one point of
//! one path. Numbers are [`Range`]s; pointers are a region plus a range of byte offsets
//! into it, whose numeric value (an address) is never visible to the program.

use super::range::{Range, Thresholds};
use crate::elf::GlobalId;

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
    /// A read-only global section of the object.
    Global(GlobalId),
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

    /// The same kind of value with its range (number or offset) replaced by `r`.
    pub fn with_range(self, r: Range) -> Value {
        match self {
            Value::Scalar(_) => Value::Scalar(r),
            Value::Ptr { region, .. } => Value::Ptr { region, off: r },
            Value::Uninit => Value::Uninit,
        }
    }

    /// The value plus `by` (64-bit, wrapping).
    pub fn shifted(&self, by: i64) -> Value {
        let add = |r: &Range| super::transfer::alu::add_const(r, by);
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
        Some(match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(a.meet(b)?),
            (Value::Ptr { region, off: a }, Value::Ptr { region: q, off: b }) if region == q => {
                Value::Ptr {
                    region: *region,
                    off: a.meet(b)?,
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
