//! Loads and stores: every access must lie in the region of its base pointer, the
//! context is read field by field (only `ctx->next` is writable), the stack is tracked
//! byte by byte (initialised or not) and slot by slot (spilled registers).
//!
//! Each access's region is recorded for the engine, which checks the access against that
//! region's bounds at run time whatever the verifier concluded ([`Target`]). With memory
//! checks turned off ([`Checks`](crate::verify::Checks), for tests only) an access the
//! verifier cannot place is accepted as reaching anywhere, and the engine alone decides.

use super::super::range::Range;
use super::super::state::State;
use super::super::value::{Link, Region, Slot, Value};
use super::{Env, ptr, read, scalar};
use crate::abi::{self, STACK_SIZE, ctx};
use crate::insn::{Insn, class, mem};
use crate::verify::{Reason, Target};

impl Env<'_> {
    pub fn region_size(&self, r: Region) -> i64 {
        (match r {
            Region::Ctx => ctx::SIZE,
            Region::Data => abi::WINDOW_SIZE,
            Region::Stack => STACK_SIZE,
            Region::Scratch => abi::SCRATCH_SIZE,
            Region::Arg => abi::ARG_SIZE,
            Region::Global(g) => self.globals.get(g.index()).copied().unwrap_or(0),
        }) as i64
    }

    /// Checks that `len` bytes at `base + off` lie in the base pointer's region.
    pub fn bounds(
        &self,
        base: Value,
        reg: u8,
        off: i64,
        len: Range,
    ) -> Result<(Region, i64, i64), Reason> {
        let Value::Ptr { region, off: o } = base else {
            return Err(match base {
                Value::Uninit => Reason::Uninit { reg },
                _ => Reason::NotPointer { reg },
            });
        };
        let size = self.region_size(region);
        let lo = o.smin.checked_add(off);
        let hi = o
            .smax
            .checked_add(off)
            .and_then(|h| h.checked_add(i64::try_from(len.umax).ok()?));
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo >= 0 && hi <= size => Ok((region, lo, hi)),
            _ => Err(Reason::OutOfBounds {
                region,
                lo: lo.unwrap_or(i64::MIN),
                hi: hi.unwrap_or(i64::MAX),
                size,
            }),
        }
    }

    /// Records that the access at `pc` reaches `region` (`None`: no region the verifier
    /// can name).
    fn reaches(&mut self, pc: usize, region: Option<Region>) {
        let t = &mut self.targets[pc];
        *t = match (*t, region) {
            (Target::Unreached, Some(r)) => Target::One(r),
            (Target::One(q), Some(r)) if q == r => Target::One(r),
            _ => Target::Many,
        };
    }
}

fn size_of(op: u8) -> i64 {
    match op & 0x18 {
        mem::B => 1,
        mem::H => 2,
        mem::W => 4,
        _ => 8,
    }
}

/// `ldx`: a load into `dst`.
pub(in crate::verify) fn load(
    env: &mut Env<'_>,
    state: &mut State,
    pc: usize,
    i: &Insn,
) -> Result<(), Reason> {
    let (v, link) = access(env, state, pc, i.src, i.off, size_of(i.op), None)?;
    state.set(i.dst, v);
    state.links[i.dst as usize] = link;
    Ok(())
}

/// `st` and `stx`: a store of an immediate or a register.
pub(in crate::verify) fn store(
    env: &mut Env<'_>,
    state: &mut State,
    pc: usize,
    i: &Insn,
) -> Result<(), Reason> {
    let size = size_of(i.op);
    let (v, link) = if i.class() == class::ST {
        let imm = i.imm as i64 as u64;
        let v = scalar(Range::konst(if size == 8 {
            imm
        } else {
            imm & ((1u64 << (8 * size)) - 1)
        }));
        (v, Link::NONE)
    } else {
        let v = read(state, i.src)?;
        (v, env.link_of(state, i.src))
    };
    access(env, state, pc, i.dst, i.off, size, Some((v, link)))?;
    Ok(())
}

/// A load (`store` is `None`) or store of `size` bytes at `reg + off`.
fn access(
    env: &mut Env<'_>,
    state: &mut State,
    pc: usize,
    reg: u8,
    off: i16,
    size: i64,
    store: Option<(Value, Link)>,
) -> Result<(Value, Link), Reason> {
    let base = state.regs[reg as usize];
    let unchecked = !env.checks.memory;
    let placed = match env.bounds(base, reg, i64::from(off), Range::konst(size as u64)) {
        Ok((region, lo, hi)) => Some((region, lo, hi)),
        Err(e) if !unchecked || matches!(e, Reason::Uninit { .. }) => return Err(e),
        // Memory checks off: anywhere, for all the verifier knows; the engine checks.
        Err(_) => None,
    };
    let region = match (placed, base) {
        (Some((r, ..)), _) | (None, Value::Ptr { region: r, .. }) => Some(r),
        _ => None,
    };
    if let Some((v, _)) = store
        && matches!(v, Value::Ptr { .. })
        && region != Some(Region::Stack)
    {
        return Err(Reason::PointerLeak("storing a pointer outside the stack"));
    }
    env.reaches(pc, region);
    let Some((region, lo, hi)) = placed else {
        return Ok((scalar(Range::UNKNOWN), Link::NONE));
    };
    let exact = hi - lo == size;
    match region {
        Region::Ctx => {
            let field = if exact {
                ctx_field(lo, size, store.map(|(v, _)| v))
            } else {
                Err(Reason::CtxField { off: lo, size })
            };
            match field {
                Ok(v) => Ok((v, Link::NONE)),
                Err(_) if unchecked => Ok((scalar(Range::UNKNOWN), Link::NONE)),
                Err(e) => Err(e),
            }
        }
        Region::Stack => {
            env.stack_used = env.stack_used.max((STACK_SIZE as i64 - lo) as usize);
            match store {
                Some((v, link)) => {
                    stack_store(state, lo, hi, size, exact, v, link)?;
                    Ok((v, Link::NONE))
                }
                None => {
                    let (v, link) = stack_load(state, lo, hi, size, exact)?;
                    let (k, _) = State::locate(lo);
                    match state.slot(k) {
                        // A fill: the register and the slot stay linked, so a test on
                        // the register narrows the saved copy too.
                        Slot::Spill(w, l) if l.id == 0 && exact && size == 8 && lo % 8 == 0 => {
                            env.next_id += 1;
                            let link = Link {
                                id: env.next_id,
                                delta: 0,
                            };
                            state.set_slot(k, Slot::Spill(w, link));
                            Ok((v, link))
                        }
                        _ => Ok((v, link)),
                    }
                }
            }
        }
        _ if store.is_some() && region != Region::Scratch && !unchecked => {
            Err(Reason::ReadOnly { region })
        }
        _ => Ok((scalar(Range::width(size as u32)), Link::NONE)),
    }
}

fn ctx_field(off: i64, size: i64, store: Option<Value>) -> Result<Value, Reason> {
    let whole = size == 8 && off % 8 == 0;
    if off < i64::from(ctx::ARG_LEN) && !whole {
        // Part of a pointer field.
        return Err(Reason::CtxField { off, size });
    }
    let pointer = match off as i16 {
        ctx::DATA => Some(Region::Data),
        ctx::DATA_END => None,
        ctx::SCRATCH => Some(Region::Scratch),
        ctx::ARG => Some(Region::Arg),
        _ => {
            return match store {
                Some(Value::Scalar(_)) if whole && off as i16 == ctx::NEXT => Ok(Value::Uninit),
                Some(_) => Err(Reason::CtxField { off, size }),
                None if off as i16 == ctx::ARG_LEN && whole => {
                    Ok(scalar(Range::unsigned(0, abi::ARG_SIZE as u64).unwrap()))
                }
                None => Ok(scalar(Range::width(size as u32))),
            };
        }
    };
    if store.is_some() || !whole {
        return Err(Reason::CtxField { off, size });
    }
    Ok(match pointer {
        Some(region) => ptr(region, 0),
        None => ptr(Region::Data, abi::WINDOW_SIZE as i64),
    })
}

/// Whether stack bytes `lo..hi` all hold numbers.
pub(super) fn stack_readable(state: &State, lo: i64, hi: i64) -> bool {
    (lo..hi).all(|o| {
        let (k, b) = State::locate(o);
        state.slot(k).readable(b, 1)
    })
}

fn stack_load(
    state: &State,
    lo: i64,
    hi: i64,
    size: i64,
    exact: bool,
) -> Result<(Value, Link), Reason> {
    let (k, b) = State::locate(lo);
    if exact && size == 8 && b == 0 {
        return match state.slot(k) {
            Slot::Spill(v, link) => Ok((v, link)),
            Slot::Bytes(0xff) => Ok((scalar(Range::UNKNOWN), Link::NONE)),
            _ => Err(Reason::UninitStack {
                off: lo - STACK_SIZE as i64,
                size,
            }),
        };
    }
    for o in lo..hi {
        let (k, b) = State::locate(o);
        match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            s if !s.readable(b, 1) => {
                return Err(Reason::UninitStack {
                    off: lo - STACK_SIZE as i64,
                    size,
                });
            }
            _ => {}
        }
    }
    Ok((scalar(Range::width(size as u32)), Link::NONE))
}

fn stack_store(
    state: &mut State,
    lo: i64,
    hi: i64,
    size: i64,
    exact: bool,
    v: Value,
    link: Link,
) -> Result<(), Reason> {
    let (k, b) = State::locate(lo);
    if exact && size == 8 && b == 0 {
        state.set_slot(k, Slot::Spill(v, link));
        return Ok(());
    }
    if matches!(v, Value::Ptr { .. }) {
        return Err(Reason::PointerLeak("storing part of a pointer"));
    }
    for o in lo..hi {
        let (k, b) = State::locate(o);
        let s = match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            Slot::Spill(..) => Slot::Bytes(0xff),
            // A store at an offset not known exactly initialises nothing for certain.
            Slot::Bytes(m) if exact => Slot::Bytes(m | 1 << b),
            s => s,
        };
        state.set_slot(k, s);
    }
    Ok(())
}

/// A helper writes somewhere in stack bytes `lo..hi`, certainly in `lo..definite`.
pub(super) fn helper_writes_stack(
    state: &mut State,
    lo: i64,
    hi: i64,
    definite: Option<i64>,
) -> Result<(), Reason> {
    for o in lo..hi {
        let (k, b) = State::locate(o);
        let s = match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            Slot::Spill(..) => Slot::Bytes(0xff),
            Slot::Bytes(m) if definite.is_some_and(|d| o < d) => Slot::Bytes(m | 1 << b),
            s => s,
        };
        state.set_slot(k, s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::super::range::arb;
    use super::*;
    use crate::verify::Checks;

    fn env() -> Env<'static> {
        Env {
            globals: &[16, 4096],
            checks: Checks::default(),
            refs: Vec::new(),
            next_id: 0,
            stack_used: 0,
            targets: Vec::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// An access the bounds check accepts lies inside its region for every concrete
        /// offset the pointer may have, whatever the instruction's offset and size.
        #[test]
        fn accepted_accesses_lie_inside_their_region(
            (off, v) in arb::range_with_value(),
            insn_off in any::<i16>(),
            (len, n) in arb::range_with_value(),
            k in 0..7usize,
        ) {
            let regions = [
                Region::Ctx,
                Region::Data,
                Region::Stack,
                Region::Scratch,
                Region::Arg,
                Region::Global(crate::elf::tests_support::global(0)),
                Region::Global(crate::elf::tests_support::global(1)),
            ];
            let region = regions[k];
            let env = env();
            let p = Value::Ptr { region, off };
            if let Ok((r, lo, hi)) = env.bounds(p, 1, i64::from(insn_off), len) {
                prop_assert_eq!(r, region);
                let start = (v as i64).checked_add(i64::from(insn_off));
                let end = start.and_then(|s| s.checked_add(i64::try_from(n).ok()?));
                prop_assert!(start.is_some_and(|s| s >= lo && s >= 0));
                prop_assert!(end.is_some_and(|e| e <= hi && e <= env.region_size(region)));
            }
        }
    }
}
