//! The abstract machine state on one path, and how states are compared, joined and
//! simplified at the points where paths meet.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::range::{Range, Thresholds};
use super::value::{Link, Slot, Value};
use crate::abi::STACK_SIZE;

const SLOTS: usize = STACK_SIZE / 8;

/// The multiply-rotate hash of rustc's FxHasher: states are hashed constantly and never
/// by an adversary who could choose collisions to any effect but slowness, so SipHash's
/// protection buys nothing here.
#[derive(Default)]
pub(super) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub(super) const FP: usize = 10;

/// The abstract machine state on one path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct State {
    pub regs: [Value; 11],
    /// How registers relate to each other (see [`Link`]).
    pub links: [Link; 11],
    /// Stack slots from the top (index 0 is r10-8..r10); missing slots are empty.
    pub stack: Vec<Slot>,
}

impl State {
    pub(super) fn slot(&self, k: usize) -> Slot {
        self.stack.get(k).copied().unwrap_or(Slot::EMPTY)
    }

    pub(super) fn set_slot(&mut self, k: usize, s: Slot) {
        if self.stack.len() <= k {
            self.stack.resize(k + 1, Slot::EMPTY);
        }
        self.stack[k] = s;
    }

    /// Slot index and byte within it of stack region offset `o` (0..512).
    pub(super) fn locate(o: i64) -> (usize, usize) {
        let o = o as usize;
        (SLOTS - 1 - o / 8, o % 8)
    }

    pub(super) fn set(&mut self, r: u8, v: Value) {
        self.regs[r as usize] = v;
        self.links[r as usize] = Link::NONE;
    }

    /// Narrows register `r` to `v`, and every register and slot linked to it likewise;
    /// `false` if that leaves one of them no value (the path is impossible).
    pub(super) fn narrow(&mut self, r: u8, v: Value) -> bool {
        let link = self.links[r as usize];
        let Some(v) = self.regs[r as usize].meet(&v) else {
            return false;
        };
        self.regs[r as usize] = v;
        if link.id == 0 {
            return true;
        }
        let moved =
            |other: &Link, old: &Value| old.meet(&v.shifted(other.delta.wrapping_sub(link.delta)));
        for k in 0..FP {
            if k != r as usize && self.links[k].id == link.id {
                match moved(&self.links[k], &self.regs[k]) {
                    Some(n) => self.regs[k] = n,
                    None => return false,
                }
            }
        }
        for slot in &mut self.stack {
            if let Slot::Spill(w, l) = slot
                && l.id == link.id
            {
                match moved(l, w) {
                    Some(n) => *w = n,
                    None => return false,
                }
            }
        }
        true
    }

    /// Whether the two states have the same links and stack layout, and registers and
    /// slots pairwise alike by `value` and `slot`.
    pub(super) fn alike(
        &self,
        other: &State,
        value: impl Fn(&Value, &Value) -> bool,
        slot: impl Fn(&Slot, &Slot) -> bool,
    ) -> bool {
        self.links == other.links
            && self.stack.len() == other.stack.len()
            && self.regs.iter().zip(&other.regs).all(|(a, b)| value(a, b))
            && self.stack.iter().zip(&other.stack).all(|(a, b)| slot(a, b))
    }

    /// Same constants everywhere; ranges may differ.
    pub(super) fn same_shape(&self, other: &State) -> bool {
        self.alike(other, Value::same_shape, Slot::same_shape)
    }

    /// As `same_shape`, but constants may differ too.
    pub(super) fn same_kinds(&self, other: &State) -> bool {
        self.alike(other, Value::same_kind, Slot::same_kind)
    }

    /// A hash equal for states of the same shape (`same_shape`).
    pub(super) fn shape_hash(&self) -> u64 {
        let mut h = FastHasher::default();
        self.links.hash(&mut h);
        let shape = |v: &Value| match v {
            Value::Uninit => (0u8, None),
            Value::Scalar(r) => (1, r.constant()),
            Value::Ptr { off, .. } => (2, off.constant()),
        };
        for v in &self.regs {
            shape(v).hash(&mut h);
        }
        for s in &self.stack {
            match s {
                Slot::Bytes(m) => (3u8, u64::from(*m), Link::NONE).hash(&mut h),
                Slot::Spill(v, l) => (shape(v), l).hash(&mut h),
            }
        }
        h.finish()
    }

    pub(super) fn join(&self, other: &State, t: Option<&Thresholds>) -> State {
        let mut out = self.clone();
        for (r, v) in out.regs.iter_mut().zip(&other.regs) {
            *r = r.join(v, t);
        }
        for (s, o) in out.stack.iter_mut().zip(&other.stack) {
            if let (Slot::Spill(a, _), Slot::Spill(b, _)) = (s, o) {
                *a = a.join(b, t);
            }
        }
        out
    }

    pub(super) fn covers(&self, other: &State) -> bool {
        // Canonical ids: a relation `self` relied on must hold in `other` too.
        self.links
            .iter()
            .zip(&other.links)
            .all(|(a, b)| a.implied_by(b))
            && self.regs.iter().zip(&other.regs).all(|(a, b)| a.covers(b))
            && (0..self.stack.len().max(other.stack.len()))
                .all(|k| self.slot(k).covers(&other.slot(k)))
    }

    /// Forgets what cannot matter from here on: registers that are not live become
    /// uninitialised, and numbers that will never reach an address, a length, a divisor
    /// or a branch become any number. Both only widen the state, so this is sound, and
    /// states that differed only there now prune each other.
    pub(super) fn canonical(&mut self, live: u16, demanded: u16) {
        for r in 0..FP {
            if live & 1 << r == 0 {
                self.regs[r] = Value::Uninit;
                self.links[r] = Link::NONE;
            } else if demanded & 1 << r == 0 && matches!(self.regs[r], Value::Scalar(_)) {
                self.regs[r] = Value::Scalar(Range::UNKNOWN);
                self.links[r] = Link::NONE;
            }
        }
        // Number ids by first appearance; an id on one register says nothing.
        let slot_ids = self.stack.iter().filter_map(|s| match s {
            Slot::Spill(_, l) => Some(l.id),
            Slot::Bytes(_) => None,
        });
        let mut map: Vec<(u32, u32, usize)> = Vec::new();
        for id in self.links[..FP].iter().map(|l| l.id).chain(slot_ids) {
            if id == 0 {
                continue;
            }
            match map.iter_mut().find(|(old, _, _)| *old == id) {
                Some(e) => e.2 += 1,
                None => map.push((id, map.len() as u32 + 1, 1)),
            }
        }
        let renumber = |link: &mut Link| {
            if let Some(&(_, new, n)) = map.iter().find(|(old, _, _)| *old == link.id) {
                *link = if n > 1 {
                    Link { id: new, ..*link }
                } else {
                    Link::NONE
                };
            }
        };
        for r in 0..FP {
            renumber(&mut self.links[r]);
        }
        for slot in &mut self.stack {
            if let Slot::Spill(_, l) = slot {
                renumber(l);
            }
        }
        while self.stack.last() == Some(&Slot::EMPTY) {
            self.stack.pop();
        }
    }

    /// Bytes the state takes, about.
    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of::<State>() + self.stack.len() * std::mem::size_of::<Slot>()
    }

    pub(super) fn hash64(&self) -> u64 {
        let mut h = FastHasher::default();
        self.hash(&mut h);
        h.finish()
    }
}
