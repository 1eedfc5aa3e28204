//! Rewrites a program into an equivalent one that rbpf 0.4.1 executes exactly.
//!
//! - rbpf's x86-64 JIT leaves the upper 32 bits of the destination after `mov32 reg` and treats
//!   `le16`/`le32` as no-ops; eBPF zero-extends (RFC 9669 §4.1, §4.2).
//! - rbpf's interpreter compares a 64-bit register with an immediate zero-extended, for
//!   `jeq jne jgt jge jlt jle`; eBPF sign-extends it. A negative immediate C lies in the top
//!   2^31 values, so each unsigned compare equals one or two *signed* compares, which both
//!   engines get right: `jgt d, C` is "d < 0 and d > C", both signed.
//!
//! Each such instruction is expanded into a sequence exact on both engines, and every jump
//! and local call is re-aimed at the expanded program. A trap ([`crate::verify::sanitize`])
//! becomes a call that records its slot, then an exit. (DESIGN.md lists the defects; each
//! has a regression test in `tests/conformance.rs` and below.)

use std::fmt;

use crate::insn::{CALL_LOCAL, Insn, SRC_K, SRC_X, alu, class, jmp};
use crate::verify::TRAP_HELPER;

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

/// One instruction of an expansion: `aimed` ones jump to the original's target, the others
/// keep their offset (a fixed skip inside the expansion, or no jump at all).
#[derive(Clone, Copy)]
struct Out {
    insn: Insn,
    aimed: bool,
}

fn plain(insn: Insn) -> Out {
    Out { insn, aimed: false }
}

/// `op dst, imm` jumping to the original target.
fn aimed(op: u8, dst: u8, imm: i32) -> Out {
    Out {
        insn: Insn::new(class::JMP | op | SRC_K, dst, 0, 0, imm),
        aimed: true,
    }
}

/// "if dst >= 0 (signed), skip the next instruction".
fn skip_if_nonnegative(dst: u8) -> Out {
    plain(Insn::new(class::JMP | jmp::JSGE | SRC_K, dst, 0, 1, 0))
}

/// The instructions that replace `i`, at `slot` (usually just `i`, aimed if it jumps).
fn expand(i: &Insn, slot: usize) -> Vec<Out> {
    let code = i.op & 0xf0;
    let (d, imm) = (i.dst, i.imm);
    let same = || {
        vec![Out {
            insn: *i,
            aimed: is_jump(i) || is_local_call(i),
        }]
    };
    if i.op == class::JMP | jmp::CALL && i.imm == TRAP_HELPER {
        // Code the verifier never reached: the trap records the slot, and the invocation
        // ends there.
        return vec![
            plain(Insn::new(
                class::ALU64 | alu::MOV | SRC_K,
                1,
                0,
                0,
                slot as i32,
            )),
            plain(*i),
            plain(Insn::new(class::JMP | jmp::EXIT, 0, 0, 0, 0)),
        ];
    }
    match i.class() {
        // `mov32 reg, imm` is a 32-bit mov on x86, which zero-extends; only the register
        // form is emitted as a 64-bit mov.
        class::ALU if code == alu::MOV && i.op & SRC_X != 0 => [plain(*i)]
            .into_iter()
            .chain(zero_extend_32(d).map(plain))
            .collect(),
        // le on a little-endian machine: keep the low 16/32 bits.
        class::ALU if code == alu::END && i.op & SRC_X == 0 => match imm {
            16 => vec![plain(Insn::new(
                class::ALU64 | alu::AND | SRC_K,
                d,
                0,
                0,
                0xffff,
            ))],
            32 => zero_extend_32(d).map(plain).to_vec(),
            _ => Vec::new(),
        },
        // Unsigned 64-bit compares with a negative immediate, as signed compares.
        class::JMP if i.op & SRC_X == 0 && imm < 0 => match code {
            jmp::JEQ => vec![
                plain(Insn::new(class::JMP | jmp::JSGT | SRC_K, d, 0, 1, imm)),
                aimed(jmp::JSGE, d, imm),
            ],
            jmp::JNE => vec![aimed(jmp::JSGT, d, imm), aimed(jmp::JSLT, d, imm)],
            jmp::JGT => vec![skip_if_nonnegative(d), aimed(jmp::JSGT, d, imm)],
            jmp::JGE => vec![skip_if_nonnegative(d), aimed(jmp::JSGE, d, imm)],
            jmp::JLT => vec![aimed(jmp::JSGE, d, 0), aimed(jmp::JSLT, d, imm)],
            jmp::JLE => vec![aimed(jmp::JSGE, d, 0), aimed(jmp::JSLE, d, imm)],
            _ => same(),
        },
        _ => same(),
    }
}

/// Whether slot `i` holds a relative jump (offset in `off`).
fn is_jump(i: &Insn) -> bool {
    let code = i.op & 0xf0;
    matches!(i.class(), class::JMP | class::JMP32) && code != jmp::EXIT && code != jmp::CALL
}

/// Whether slot `i` holds a bpf-to-bpf call (relative target in `imm`).
fn is_local_call(i: &Insn) -> bool {
    i.op == class::JMP | jmp::CALL && i.src == CALL_LOCAL
}

/// Rewrites `prog` for execution on rbpf.
pub fn for_rbpf(prog: &[Insn]) -> Result<Vec<Insn>, RewriteError> {
    // new_at[k]: where original slot k starts in the output (one past the end at k = len).
    let mut new_at = Vec::with_capacity(prog.len() + 1);
    // (output slot, original slot) of every instruction to aim at its original's target.
    let mut to_aim = Vec::new();
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
        for o in expand(&prog[slot], slot) {
            if o.aimed {
                to_aim.push((out.len(), slot));
            }
            out.push(o.insn);
        }
        slot += 1;
    }
    new_at.push(out.len());
    for (at, k) in to_aim {
        let orig = &prog[k];
        let call = is_local_call(orig);
        let rel = if call {
            i64::from(orig.imm)
        } else {
            i64::from(orig.off)
        };
        let target = usize::try_from(k as i64 + 1 + rel)
            .ok()
            .filter(|&t| t < prog.len());
        let target = target.ok_or(RewriteError::TargetOutside { insn: k })?;
        let new_rel = new_at[target] as i64 - (at as i64 + 1);
        let too_far = || RewriteError::JumpTooFar { insn: k };
        if call {
            out[at].imm = i32::try_from(new_rel).map_err(|_| too_far())?;
        } else {
            out[at].off = i16::try_from(new_rel).map_err(|_| too_far())?;
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
        let prog =
            assemble("jeq %r1, 0, +3\nmov32 %r0, %r2\nmov32 %r3, -1\nle16 %r0\nle64 %r0\nexit")
                .unwrap();
        let out = for_rbpf(&prog).unwrap();
        // mov32 of an immediate is exact on both engines and stays as it is.
        let text = assemble(
            "jeq %r1, 0, +5\nmov32 %r0, %r2\nlsh %r0, 32\nrsh %r0, 32\nmov32 %r3, -1\nand %r0, 0xffff\nexit",
        )
        .unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn backward_jumps_lddw_and_local_calls_keep_their_targets() {
        let src = "f:\nmov32 %r0, %r1\nlddw %r2, 0x100000000\njne %r0, 1, f\ncall local g\nexit\ng:\nle32 %r0\nexit";
        let out = for_rbpf(&assemble(src).unwrap()).unwrap();
        let want = "f:\nmov32 %r0, %r1\nlsh %r0, 32\nrsh %r0, 32\nlddw %r2, 0x100000000\njne %r0, 1, f\n\
                    call local g\nexit\ng:\nlsh %r0, 32\nrsh %r0, 32\nexit";
        assert_eq!(out, assemble(want).unwrap());
    }

    #[test]
    fn unsigned_compares_with_negative_immediates_become_signed_ones() {
        let src = "jeq %r1, -2, t\njne %r1, -2, t\njgt %r1, -2, t\njle %r1, -2, t\njeq %r1, 2, t\nt:\nexit";
        let out = for_rbpf(&assemble(src).unwrap()).unwrap();
        let want = "jsgt %r1, -2, +1\njsge %r1, -2, t\njsgt %r1, -2, t\njslt %r1, -2, t\n\
                    jsge %r1, 0, +1\njsgt %r1, -2, t\njsge %r1, 0, t\njsle %r1, -2, t\n\
                    jeq %r1, 2, t\nt:\nexit";
        assert_eq!(out, assemble(want).unwrap());
    }

    /// The signed forms decide exactly as an unsigned compare with the sign-extended
    /// immediate, for values around every boundary.
    #[test]
    fn signed_forms_agree_with_the_unsigned_semantics() {
        let values = [
            0u64,
            1,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
            u64::MAX,
            u64::MAX - 1,
            u64::MAX - 2,
            0xffff_ffff_8000_0000,
            0xffff_ffff_7fff_ffff,
            0xffff_ffff_ffff_fc18,
        ];
        for imm in [-1i64, -2, i64::from(i32::MIN), -1000] {
            let c = imm as u64;
            for v in values {
                let s = v as i64;
                // jeq/jne: "not above and not below" is equality, as signed values too.
                assert_eq!(v == c, s == imm);
                assert_eq!(v != c, s != imm);
                assert_eq!(v > c, s < 0 && s > imm);
                assert_eq!(v >= c, s < 0 && s >= imm);
                assert_eq!(v < c, s >= 0 || s < imm);
                assert_eq!(v <= c, s >= 0 || s <= imm);
            }
        }
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
