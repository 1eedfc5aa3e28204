//! Inlines bpf-to-bpf calls, so that what is verified and executed is one function.
//!
//! rbpf 0.4.1's JIT runs a called function with the caller's r10, so the two stack frames
//! overlap and a callee overwrites its caller's locals (DESIGN.md). Rather than trust either
//! engine with calls, every call is replaced by the callee's body: the callee's frame is placed
//! below the caller's, the callee-saved registers r6–r9 that it writes are spilled around it,
//! and its `exit`s jump to the instruction after the call — exactly what the ISA promises a
//! call does. Recursion and call chains whose frames exceed the stack are refused.

use std::fmt;

use crate::abi::STACK_SIZE;
use crate::elf::DataRef;
use crate::insn::{CALL_LOCAL, Insn, SRC_K, SRC_X, alu, class, jmp, mem};

const FP: u8 = 10;

/// Why a program's calls cannot be inlined.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InlineError {
    /// A call that does not land on the start of a function, or a jump out of its function.
    BadTarget { insn: usize },
    /// A function that calls itself, directly or not (`chain` lists the entry slots).
    Recursion { chain: Vec<usize> },
    /// The frames along a call chain need more than the stack.
    StackOverflow { insn: usize, bytes: usize },
    /// A called function that uses r10 other than to address its frame.
    FramePointer { insn: usize },
    /// The program grew past the instruction limit.
    TooLarge,
    /// Calls nested deeper than [`MAX_CALL_DEPTH`].
    TooDeep { insn: usize },
}

/// Most calls one path may nest (Linux allows 8 frames too).
pub const MAX_CALL_DEPTH: usize = 8;

impl fmt::Display for InlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InlineError::BadTarget { insn } => {
                write!(f, "insn {insn}: jump or call target outside its function")
            }
            InlineError::Recursion { chain } => write!(
                f,
                "recursion is not supported: functions at insns {chain:?} call each other"
            ),
            InlineError::StackOverflow { insn, bytes } => write!(
                f,
                "insn {insn}: the call chain needs {bytes} bytes of stack; the limit is {STACK_SIZE}"
            ),
            InlineError::FramePointer { insn } => write!(
                f,
                "insn {insn}: a called function may use r10 only to address its stack"
            ),
            InlineError::TooLarge => write!(f, "the program is too large once calls are inlined"),
            InlineError::TooDeep { insn } => write!(
                f,
                "insn {insn}: calls nest deeper than {MAX_CALL_DEPTH} functions"
            ),
        }
    }
}

impl std::error::Error for InlineError {}

/// A program without calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inlined {
    pub insns: Vec<Insn>,
    pub data_refs: Vec<DataRef>,
    /// For each slot, the slot of the linked program it came from.
    pub origin: Vec<usize>,
}

fn is_local_call(i: &Insn) -> bool {
    i.op == class::JMP | jmp::CALL && i.src == CALL_LOCAL
}

fn is_jump(i: &Insn) -> bool {
    matches!(i.class(), class::JMP | class::JMP32) && !matches!(i.op & 0xf0, jmp::CALL | jmp::EXIT)
}

/// Slot of the jump's or call's target, if it is one.
fn target(at: usize, i: &Insn) -> Option<i64> {
    if is_local_call(i) {
        Some(at as i64 + 1 + i64::from(i.imm))
    } else if is_jump(i) {
        Some(at as i64 + 1 + i64::from(i.off))
    } else {
        None
    }
}

/// Whether `i` writes register `r`.
fn writes(i: &Insn, r: u8) -> bool {
    match i.class() {
        class::ALU | class::ALU64 | class::LDX | class::LD => i.dst == r,
        _ => false,
    }
}

struct Program<'a> {
    insns: &'a [Insn],
    /// The global reference of each slot, if it has one.
    refs: Vec<Option<DataRef>>,
    /// Sorted function entry slots; function k spans `entries[k]..entries[k + 1]`.
    entries: Vec<usize>,
    /// Bytes of stack each function addresses through r10.
    frame: Vec<usize>,
    /// Which of r6–r9 (bit r - 6) each function, with its callees, writes.
    clobbers: Vec<u8>,
}

impl Program<'_> {
    fn function_of(&self, slot: usize) -> usize {
        self.entries.partition_point(|&e| e <= slot) - 1
    }

    fn span(&self, f: usize) -> std::ops::Range<usize> {
        self.entries[f]..self.entries.get(f + 1).copied().unwrap_or(self.insns.len())
    }

    fn callees(&self, f: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.span(f).filter_map(move |at| {
            let i = &self.insns[at];
            is_local_call(i).then(|| (at, self.function_of(target(at, i).unwrap() as usize)))
        })
    }
}

/// Bytes below r10 that a function addresses: direct `[r10 + off]` accesses and the
/// `r10 + k` addresses it computes (to pass a local to a callee or helper). A frame
/// address that is moved in any other way makes the whole stack the function's.
fn frame_bytes(insns: &[Insn]) -> usize {
    let mut deepest: i64 = 0;
    // Registers known to hold r10 + k, in straight-line order.
    let mut derived: [Option<i64>; 11] = [None; 11];
    for i in insns {
        if i.dst > FP || i.src > FP {
            // Not a register; the verifier refuses the program.
            continue;
        }
        match i.class() {
            class::LDX if i.src == FP => deepest = deepest.min(i64::from(i.off)),
            class::ST | class::STX if i.dst == FP => deepest = deepest.min(i64::from(i.off)),
            _ => {}
        }
        if i.op == class::ALU64 | alu::MOV | SRC_X && i.src == FP {
            derived[i.dst as usize] = Some(0);
            continue;
        }
        if let Some(k) = derived[i.dst as usize] {
            match i.op {
                op if op == class::ALU64 | alu::ADD | SRC_K => {
                    let k = k + i64::from(i.imm);
                    deepest = deepest.min(k);
                    derived[i.dst as usize] = Some(k);
                }
                op if op == class::ALU64 | alu::SUB | SRC_K => {
                    let k = k - i64::from(i.imm);
                    deepest = deepest.min(k);
                    derived[i.dst as usize] = Some(k);
                }
                _ if writes(i, i.dst) => {
                    if i.op == class::ALU64 | alu::MOV | SRC_X && derived[i.src as usize].is_some()
                    {
                        derived[i.dst as usize] = derived[i.src as usize];
                    } else if i.class() == class::ALU64 && !matches!(i.op & 0xf0, alu::MOV) {
                        // Arithmetic on a frame address we cannot follow.
                        return STACK_SIZE;
                    } else {
                        derived[i.dst as usize] = None;
                    }
                }
                _ => {}
            }
        } else if i.op == class::ALU64 | alu::MOV | SRC_X && derived[i.src as usize].is_some() {
            derived[i.dst as usize] = derived[i.src as usize];
        }
    }
    ((-deepest) as usize).div_ceil(8) * 8
}

/// Replaces every bpf-to-bpf call in `insns` by the body of the called function.
pub fn inline(insns: &[Insn], refs: &[DataRef]) -> Result<Inlined, InlineError> {
    let mut entries = vec![0];
    for (at, i) in insns.iter().enumerate() {
        if is_local_call(i) {
            let t = target(at, i).unwrap();
            if t <= 0 || t as usize >= insns.len() {
                return Err(InlineError::BadTarget { insn: at });
            }
            entries.push(t as usize);
        }
    }
    entries.sort_unstable();
    entries.dedup();
    let mut by_slot = vec![None; insns.len()];
    for r in refs {
        if let Some(slot) = by_slot.get_mut(r.insn) {
            *slot = Some(*r);
        }
    }
    let mut p = Program {
        insns,
        refs: by_slot,
        frame: Vec::new(),
        clobbers: Vec::new(),
        entries,
    };
    // Jumps stay inside their function; calls land on an entry.
    for f in 0..p.entries.len() {
        for at in p.span(f) {
            let i = &insns[at];
            if let Some(t) = target(at, i).filter(|_| is_jump(i))
                && (t < 0 || !p.span(f).contains(&(t as usize)))
            {
                return Err(InlineError::BadTarget { insn: at });
            }
        }
    }
    let order = post_order(&p)?;
    p.frame = (0..p.entries.len())
        .map(|f| frame_bytes(&insns[p.span(f)]))
        .collect();
    p.clobbers = vec![0; p.entries.len()];
    for &f in &order {
        let own = (6..=9u8)
            .filter(|&r| p.span(f).any(|at| writes(&insns[at], r)))
            .fold(0u8, |m, r| m | 1 << (r - 6));
        let callees = p.callees(f).fold(0, |m, (_, g)| m | p.clobbers[g]);
        p.clobbers[f] = own | callees;
    }
    let mut out = Inlined {
        insns: Vec::with_capacity(insns.len()),
        data_refs: Vec::new(),
        origin: Vec::with_capacity(insns.len()),
    };
    emit(&p, 0, 0, 0, &mut out)?;
    Ok(out)
}

/// Functions callees first; refuses cycles.
fn post_order(p: &Program<'_>) -> Result<Vec<usize>, InlineError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; p.entries.len()];
    let mut order = Vec::new();
    // Explicit stack of (function, callees left to visit).
    let mut stack: Vec<(usize, Vec<usize>)> = Vec::new();
    for root in 0..p.entries.len() {
        if mark[root] != Mark::New {
            continue;
        }
        mark[root] = Mark::Open;
        stack.push((root, p.callees(root).map(|(_, g)| g).collect()));
        while let Some((f, rest)) = stack.last_mut() {
            let f = *f;
            match rest.pop() {
                Some(g) => match mark[g] {
                    Mark::New => {
                        mark[g] = Mark::Open;
                        stack.push((g, p.callees(g).map(|(_, h)| h).collect()));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|(h, _)| *h == g).unwrap_or(0);
                        let chain = stack[from..].iter().map(|(h, _)| p.entries[*h]).collect();
                        return Err(InlineError::Recursion { chain });
                    }
                    Mark::Done => {}
                },
                None => {
                    mark[f] = Mark::Done;
                    order.push(f);
                    stack.pop();
                }
            }
        }
    }
    Ok(order)
}

/// Appends function `f`, called `depth` calls deep, with its frame starting `base` bytes
/// below r10. (Recursive, so the depth is bounded first.)
fn emit(
    p: &Program<'_>,
    f: usize,
    base: usize,
    depth: usize,
    out: &mut Inlined,
) -> Result<(), InlineError> {
    let span = p.span(f);
    if depth > MAX_CALL_DEPTH {
        return Err(InlineError::TooDeep { insn: span.start });
    }
    let bytes = base + p.frame[f];
    // The verifier bounds the entry function's own accesses; here only frames pushed
    // below it by calls can overflow.
    if base > 0 && bytes > STACK_SIZE {
        return Err(InlineError::StackOverflow {
            insn: span.start,
            bytes,
        });
    }
    let shift = -(base as i64);
    let mut at_new = vec![0usize; span.len()];
    let mut jumps = Vec::new();
    let mut exits = Vec::new();
    let mut at = span.start;
    while at < span.end {
        let i = p.insns[at];
        at_new[at - span.start] = out.insns.len();
        let here = at;
        let push = move |out: &mut Inlined, insn: Insn| {
            out.insns.push(insn);
            out.origin.push(here);
        };
        if out.insns.len() > crate::elf::MAX_INSNS {
            return Err(InlineError::TooLarge);
        }
        if is_local_call(&i) {
            let g = p.function_of(target(at, &i).unwrap() as usize);
            let saved: Vec<u8> = (6..=9u8)
                .filter(|r| p.clobbers[g] & 1 << (r - 6) != 0)
                .collect();
            let save_at = |k: usize| -((bytes + 8 * (k + 1)) as i64) as i16;
            for (k, &r) in saved.iter().enumerate() {
                push(
                    out,
                    Insn::new(class::STX | mem::MEM | mem::DW, FP, r, save_at(k), 0),
                );
            }
            emit(p, g, bytes + 8 * saved.len(), depth + 1, out)?;
            for (k, &r) in saved.iter().enumerate() {
                push(
                    out,
                    Insn::new(class::LDX | mem::MEM | mem::DW, r, FP, save_at(k), 0),
                );
            }
            at += 1;
            continue;
        }
        let mut insn = i;
        if shift != 0 {
            let frame_access = match i.class() {
                class::LDX => i.src == FP,
                class::ST | class::STX => i.dst == FP,
                _ => false,
            };
            if frame_access {
                insn.off = i16::try_from(i64::from(i.off) + shift).map_err(|_| {
                    InlineError::StackOverflow {
                        insn: at,
                        bytes: STACK_SIZE + 1,
                    }
                })?;
            } else if i.op == class::ALU64 | alu::MOV | SRC_X && i.src == FP {
                push(out, insn);
                insn = Insn::new(class::ALU64 | alu::ADD | SRC_K, i.dst, 0, 0, shift as i32);
            } else if i.src == FP && i.op & SRC_X != 0 && i.class() != class::LDX
                || i.class() == class::STX && i.src == FP
            {
                return Err(InlineError::FramePointer { insn: at });
            }
        }
        if i.op == class::JMP | jmp::EXIT && f != 0 {
            exits.push(out.insns.len());
            push(out, Insn::new(class::JMP | jmp::JA, 0, 0, 0, 0));
        } else if is_jump(&i) {
            jumps.push((out.insns.len(), target(at, &i).unwrap() as usize));
            push(out, insn);
        } else {
            if let Some(r) = p.refs[at] {
                out.data_refs.push(DataRef {
                    insn: out.insns.len(),
                    ..r
                });
            }
            push(out, insn);
            if i.is_lddw() && at + 1 < span.end {
                at += 1;
                at_new[at - span.start] = out.insns.len();
                push(out, p.insns[at]);
            }
        }
        at += 1;
    }
    let end = out.insns.len();
    let aim = |out: &mut Inlined, from: usize, to: usize| -> Result<(), InlineError> {
        out.insns[from].off =
            i16::try_from(to as i64 - from as i64 - 1).map_err(|_| InlineError::TooLarge)?;
        Ok(())
    };
    for (from, old) in jumps {
        aim(out, from, at_new[old - span.start])?;
    }
    for from in exits {
        aim(out, from, end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;

    #[test]
    fn callee_frames_sit_below_the_caller_and_r6_to_r9_survive() {
        let prog = assemble(
            "mov %r6, 7
             stxdw [%r10-8], %r6
             call local f
             ldxdw %r1, [%r10-8]
             add %r0, %r1
             add %r0, %r6
             exit
             f:
             mov %r6, 100
             stxdw [%r10-8], %r6
             ldxdw %r0, [%r10-8]
             exit",
        )
        .unwrap();
        let out = inline(&prog, &[]).unwrap();
        assert!(!out.insns.iter().any(is_local_call));
        // The callee writes r6, so it is saved below the caller's 8-byte frame.
        assert!(out.insns.contains(&Insn::new(0x7b, FP, 6, -16, 0)));
        // The callee's own slot moved below the save area.
        assert!(out.insns.contains(&Insn::new(0x7b, FP, 6, -24, 0)));
        assert_eq!(out.origin.len(), out.insns.len());
    }

    #[test]
    fn recursion_and_deep_frames_are_refused() {
        let rec = assemble("call local f\nexit\nf:\ncall local f\nexit").unwrap();
        assert!(matches!(
            inline(&rec, &[]),
            Err(InlineError::Recursion { .. })
        ));
        let deep = assemble(
            "stdw [%r10-400], 0\ncall local f\nexit\nf:\nstdw [%r10-200], 0\nmov %r0, 0\nexit",
        )
        .unwrap();
        assert!(matches!(
            inline(&deep, &[]),
            Err(InlineError::StackOverflow { bytes: 600, .. })
        ));
    }
}
