//! Rewrites a program into an equivalent one that rbpf 0.4.1 executes exactly.
//!
//! rbpf's x86-64 JIT leaves the upper 32 bits of the destination after `mov32` and treats
//! `le16`/`le32` as no-ops; the eBPF semantics zero-extend (RFC 9669 §4.1, §4.2). Each
//! such instruction is expanded into a sequence that is exact on both engines, and every
//! jump and local call is re-aimed at the expanded program. (DESIGN.md lists the defects;
//! each has a regression test in `tests/conformance.rs` and below.)

use std::fmt;

use crate::insn::{CALL_LOCAL, Insn, SRC_K, alu, class, jmp};

/// A rewrite that cannot be expressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewriteError {
    /// After expansion the jump at this (original) slot no longer fits its 16-bit offset.
    JumpTooFar { insn: usize },
    /// A jump or call at this slot leaves the program.
    TargetOutside { insn: usize },
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewriteError::JumpTooFar { insn } => {
                write!(
                    f,
                    "insn {insn}: jump too far once the program is rewritten for execution"
                )
            }
            RewriteError::TargetOutside { insn } => {
                write!(f, "insn {insn}: jump target outside the program")
            }
        }
    }
}

impl std::error::Error for RewriteError {}

fn zero_extend_32(dst: u8) -> [Insn; 2] {
    [
        Insn::new(class::ALU64 | alu::LSH | SRC_K, dst, 0, 0, 32),
        Insn::new(class::ALU64 | alu::RSH | SRC_K, dst, 0, 0, 32),
    ]
}

/// The instructions that replace `i` (usually just `i`).
fn expand(i: &Insn) -> Vec<Insn> {
    let code = i.op & 0xf0;
    match i.class() {
        class::ALU if code == alu::MOV => [*i].into_iter().chain(zero_extend_32(i.dst)).collect(),
        // le on a little-endian machine: keep the low 16/32 bits.
        class::ALU if code == alu::END && i.op & 0x08 == 0 => match i.imm {
            16 => vec![Insn::new(
                class::ALU64 | alu::AND | SRC_K,
                i.dst,
                0,
                0,
                0xffff,
            )],
            32 => zero_extend_32(i.dst).to_vec(),
            _ => Vec::new(),
        },
        _ => vec![*i],
    }
}

/// Whether slot `i` holds a relative jump (offset in `off`) or a local call (in `imm`).
fn is_jump(i: &Insn) -> bool {
    let code = i.op & 0xf0;
    matches!(i.class(), class::JMP | class::JMP32) && code != jmp::EXIT && code != jmp::CALL
}

fn is_local_call(i: &Insn) -> bool {
    i.op == class::JMP | jmp::CALL && i.src == CALL_LOCAL
}

/// Rewrites `prog` for execution on rbpf.
pub fn for_rbpf(prog: &[Insn]) -> Result<Vec<Insn>, RewriteError> {
    // new_at[k]: where original slot k starts in the output (one past the end at k = len).
    let mut new_at = Vec::with_capacity(prog.len() + 1);
    let mut out = Vec::with_capacity(prog.len());
    let mut slot = 0;
    while slot < prog.len() {
        new_at.push(out.len());
        if prog[slot].is_lddw() && slot + 1 < prog.len() {
            new_at.push(out.len() + 1);
            out.extend_from_slice(&prog[slot..slot + 2]);
            slot += 2;
            continue;
        }
        out.extend(expand(&prog[slot]));
        slot += 1;
    }
    new_at.push(out.len());
    for (k, i) in prog.iter().enumerate() {
        let (is_call, rel) = if is_local_call(i) {
            (true, i64::from(i.imm))
        } else if is_jump(i) && !(k > 0 && prog[k - 1].is_lddw()) {
            (false, i64::from(i.off))
        } else {
            continue;
        };
        let target = usize::try_from(k as i64 + 1 + rel)
            .ok()
            .filter(|&t| t < prog.len());
        let target = target.ok_or(RewriteError::TargetOutside { insn: k })?;
        // Jumps and calls are never expanded: their new slot is new_at[k].
        let new_rel = new_at[target] as i64 - (new_at[k] as i64 + 1);
        let insn = &mut out[new_at[k]];
        if is_call {
            insn.imm = i32::try_from(new_rel).map_err(|_| RewriteError::JumpTooFar { insn: k })?;
        } else {
            insn.off = i16::try_from(new_rel).map_err(|_| RewriteError::JumpTooFar { insn: k })?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;

    #[test]
    fn mov32_and_le_are_expanded_and_jumps_reaimed() {
        let prog = assemble("jeq %r1, 0, +2\nmov32 %r0, -1\nle16 %r0\nle64 %r0\nexit").unwrap();
        let out = for_rbpf(&prog).unwrap();
        let text = assemble(
            "jeq %r1, 0, +4\nmov32 %r0, -1\nlsh %r0, 32\nrsh %r0, 32\nand %r0, 0xffff\nexit",
        )
        .unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn backward_jumps_lddw_and_local_calls_keep_their_targets() {
        let src = "f:\nmov32 %r0, 1\nlddw %r2, 0x100000000\njne %r0, 1, f\ncall local g\nexit\ng:\nle32 %r0\nexit";
        let out = for_rbpf(&assemble(src).unwrap()).unwrap();
        let want = "f:\nmov32 %r0, 1\nlsh %r0, 32\nrsh %r0, 32\nlddw %r2, 0x100000000\njne %r0, 1, f\n\
                    call local g\nexit\ng:\nlsh %r0, 32\nrsh %r0, 32\nexit";
        assert_eq!(out, assemble(want).unwrap());
    }

    #[test]
    fn targets_outside_the_program_are_refused() {
        let prog = assemble("ja +5\nexit").unwrap();
        assert_eq!(
            for_rbpf(&prog),
            Err(RewriteError::TargetOutside { insn: 0 })
        );
    }
}
