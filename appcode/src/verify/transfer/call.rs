//! Helper calls: each argument as the helper's prototype says ([`crate::helpers`]).
//!
//! A memory argument and its length must name bytes of one region; the helper writes only
//! the stack or scratch; stack bytes it reads must be initialised and hold no pointer. What
//! a writing helper is given counts as written from then on: every helper zeroes its
//! destination before it can fail, so that holds whatever the call returns.

use super::super::range::Range;
use super::super::state::State;
use super::super::value::{Region, Value};
use super::memory::{helper_writes_stack, stack_readable};
use super::{Env, scalar};
use crate::abi::STACK_SIZE;
use crate::helpers::{self, Arg};
use crate::verify::Reason;

/// A call of helper `id`.
pub(in crate::verify) fn step(env: &mut Env<'_>, state: &mut State, id: i32) -> Result<(), Reason> {
    let helper = helpers::by_id(id).ok_or(Reason::UnknownHelper(id))?;
    let bad = |arg: usize, why| Reason::HelperArg {
        helper: helper.name,
        arg,
        why,
    };
    for (k, kind) in helper.args.iter().enumerate() {
        let reg = k as u8 + 1;
        let v = match state.regs[reg as usize] {
            Value::Uninit => return Err(bad(k + 1, "not initialised")),
            v => v,
        };
        let (writes, len_arg) = match *kind {
            Arg::Scalar | Arg::Len => {
                if matches!(v, Value::Ptr { .. }) {
                    return Err(bad(
                        k + 1,
                        "a pointer where a number is expected (pointer leak)",
                    ));
                }
                continue;
            }
            Arg::ReadMem(l) => (false, l),
            Arg::WriteMem(l) => (true, l),
        };
        let len = match state.regs[len_arg as usize] {
            Value::Scalar(len) => len,
            _ if !env.checks.memory => Range::UNKNOWN,
            _ => {
                return Err(bad(
                    len_arg as usize,
                    "the length must be an initialised number",
                ));
            }
        };
        let (region, lo, hi) = match env.bounds(v, reg, 0, len) {
            Ok(p) => p,
            // Memory checks off: the helper checks the memory it is given.
            Err(_) if !env.checks.memory => continue,
            Err(_) => {
                return Err(bad(
                    k + 1,
                    "the memory it names (pointer and length) does not lie within one region; \
                     bound the length",
                ));
            }
        };
        match region {
            Region::Ctx if env.checks.memory => {
                return Err(bad(k + 1, "the context cannot be passed to helpers"));
            }
            Region::Stack => {
                env.stack_used = env.stack_used.max((STACK_SIZE as i64 - lo) as usize);
                if writes {
                    let definite = match v {
                        Value::Ptr { off, .. } if off.constant().is_some() => {
                            Some(lo + len.umin.min(STACK_SIZE as u64) as i64)
                        }
                        _ => None,
                    };
                    helper_writes_stack(state, lo, hi, definite).map_err(|_| {
                        bad(k + 1, "it would overwrite a pointer saved on the stack")
                    })?;
                } else if !stack_readable(state, lo, hi) {
                    return Err(bad(
                        k + 1,
                        "stack bytes not all initialised, or holding a pointer",
                    ));
                }
            }
            Region::Scratch => {}
            _ if writes && env.checks.memory => {
                return Err(bad(
                    k + 1,
                    "the helper writes here, and this memory is read-only",
                ));
            }
            _ => {}
        }
    }
    for r in 1..=5 {
        state.set(r, Value::Uninit);
    }
    state.set(0, scalar(Range::UNKNOWN));
    Ok(())
}
