//! The structure pass: everything about a program that does not depend on values.

use super::{MAX_INSNS, Reason};
use crate::elf::DataRef;
use crate::helpers;
use crate::insn::{self, CALL_HELPER, Insn, Unsupported, class, jmp};

const FP: usize = super::state::FP;

/// What the structure pass found.
pub(super) struct Shape {
    /// Slots where a path may start: jump targets and the slots after conditional jumps.
    pub starts: Vec<bool>,
    /// Each slot's global reference, if it has one.
    pub refs: Vec<Option<DataRef>>,
}

/// Checks what does not depend on values: the instruction set, registers, jump targets,
/// `lddw` pairs, helper ids (in unreachable code too) and global references.
pub(super) fn check(insns: &[Insn], refs: &[DataRef]) -> Result<Shape, (usize, Reason)> {
    let n = insns.len();
    if n > MAX_INSNS {
        return Err((
            0,
            Reason::TooLarge {
                insns: n,
                limit: MAX_INSNS,
            },
        ));
    }
    let mut prune = vec![false; n];
    let mut second = vec![false; n];
    let mut pc = 0;
    while pc < n {
        let i = &insns[pc];
        insn::check_isa(i).map_err(|u| (pc, Reason::Unsupported(u)))?;
        if i.dst > 10 || i.src > 10 && i.class() != class::LD {
            return Err((pc, Reason::BadRegister(i.dst.max(i.src))));
        }
        let writes_dst = matches!(
            i.class(),
            class::ALU | class::ALU64 | class::LDX | class::LD
        );
        if writes_dst && i.dst as usize == FP {
            return Err((pc, Reason::FramePointerWrite));
        }
        if i.is_lddw() {
            if pc + 1 >= n || insns[pc + 1].op != 0 {
                return Err((pc, Reason::Unsupported(Unsupported::Invalid)));
            }
            second[pc + 1] = true;
            pc += 2;
            continue;
        }
        if matches!(i.class(), class::JMP | class::JMP32) {
            match i.op & 0xf0 {
                jmp::CALL if i.src != CALL_HELPER => return Err((pc, Reason::LocalCall)),
                // Unknown ids are refused in unreachable code too: what a program may call
                // should not depend on what the verifier happened to reach.
                jmp::CALL if helpers::by_id(i.imm).is_none() => {
                    return Err((pc, Reason::UnknownHelper(i.imm)));
                }
                jmp::CALL | jmp::EXIT => {}
                code => {
                    let t = pc as i64 + 1 + i64::from(i.off);
                    if t < 0 || t >= n as i64 {
                        return Err((pc, Reason::JumpOutside));
                    }
                    prune[t as usize] = true;
                    if code != jmp::JA && pc + 1 < n {
                        prune[pc + 1] = true;
                    }
                }
            }
        }
        pc += 1;
    }
    if let Some(t) = (0..n).find(|&t| prune[t] && second[t]) {
        return Err((t, Reason::JumpIntoLddw));
    }
    let mut by_slot = vec![None; n];
    for r in refs {
        match by_slot.get_mut(r.insn) {
            Some(slot @ None) if insns[r.insn].is_lddw() && !second[r.insn] => *slot = Some(*r),
            _ => return Err((r.insn, Reason::BadReference)),
        }
    }
    match insns.last() {
        Some(i) if i.op == class::JMP | jmp::EXIT || i.op == class::JMP | jmp::JA => Ok(Shape {
            starts: prune,
            refs: by_slot,
        }),
        _ => Err((n.saturating_sub(1), Reason::FallsOffEnd)),
    }
}
