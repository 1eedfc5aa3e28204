//! Transfer functions: what one instruction does to an abstract state. One module per
//! instruction class, each a small function of (state, instruction) with property tests
//! that random concrete values inside the abstract inputs land inside the abstract output.

pub mod alu;
pub mod call;
pub mod jump;
pub mod memory;

use super::range::Range;
use super::state::{FP, State};
use super::value::{Link, Region, Value};
use super::{Checks, Reason, Target};
use crate::elf::DataRef;
use crate::insn::{Insn, class};

/// Where control goes after one instruction.
pub(super) enum Flow {
    Next(usize),
    Jump(usize),
    Branch(Vec<(State, usize)>),
    Exit,
}

/// What transfer functions need besides the state, and the bookkeeping they feed.
pub(super) struct Env<'p> {
    /// Sizes of the read-only globals, by global id.
    pub globals: &'p [usize],
    pub checks: Checks,
    /// The global reference (if any) of each slot.
    pub refs: Vec<Option<DataRef>>,
    /// Last link id handed out.
    pub next_id: u32,
    /// Bytes of stack the program uses.
    pub stack_used: usize,
    /// What each slot's memory access was seen to reach.
    pub targets: Vec<Target>,
}

pub(super) fn scalar(r: Range) -> Value {
    Value::Scalar(r)
}

pub(super) fn ptr(region: Region, off: i64) -> Value {
    Value::Ptr {
        region,
        off: Range::konst(off as u64),
    }
}

/// Register `r`'s value, which must have been written.
pub(super) fn read(state: &State, r: u8) -> Result<Value, Reason> {
    match state.regs[r as usize] {
        Value::Uninit => Err(Reason::Uninit { reg: r }),
        v => Ok(v),
    }
}

impl Env<'_> {
    /// The link of register `r`, giving it a fresh id if it has none. r10 never changes,
    /// so it needs none.
    pub fn link_of(&mut self, state: &mut State, r: u8) -> Link {
        if r as usize == FP {
            return Link::NONE;
        }
        if state.links[r as usize].id == 0 {
            self.next_id += 1;
            state.links[r as usize] = Link {
                id: self.next_id,
                delta: 0,
            };
        }
        state.links[r as usize]
    }
}

/// Runs the instruction at `pc` on `state`.
pub(super) fn step(
    env: &mut Env<'_>,
    insns: &[Insn],
    state: &mut State,
    pc: usize,
) -> Result<Flow, Reason> {
    let i = insns[pc];
    match i.class() {
        class::ALU | class::ALU64 => {
            alu::step(env, state, &i)?;
            Ok(Flow::Next(1))
        }
        class::LD => {
            let v = match env.refs[pc] {
                Some(r) => Value::Ptr {
                    region: Region::Global(r.region),
                    off: Range::konst(r.offset),
                },
                None => {
                    let hi = insns[pc + 1].imm as u32 as u64;
                    scalar(Range::konst(hi << 32 | i.imm as u32 as u64))
                }
            };
            state.set(i.dst, v);
            Ok(Flow::Next(2))
        }
        class::LDX => {
            memory::load(env, state, pc, &i)?;
            Ok(Flow::Next(1))
        }
        class::ST | class::STX => {
            memory::store(env, state, pc, &i)?;
            Ok(Flow::Next(1))
        }
        _ => jump::step(env, state, &i, pc),
    }
}
