//! Backward dataflow over a verified-shape program (no local calls; jump targets checked):
//! which registers are live, which are *demanded* (their value can still reach an
//! address, a helper's pointer or length, a divisor or a branch), and where control
//! flow merges. The verifier forgets what is not live or not demanded.

use crate::helpers::{self, Arg};
use crate::insn::{Insn, SRC_X, alu, class, jmp};

const FP: u8 = 10;

fn bit(r: u8) -> u16 {
    1 << r
}

pub struct Flow<'p> {
    insns: &'p [Insn],
    succ: Vec<Vec<usize>>,
}

impl<'p> Flow<'p> {
    pub fn new(insns: &'p [Insn]) -> Flow<'p> {
        let n = insns.len();
        let mut succ = vec![Vec::new(); n];
        let mut pc = 0;
        while pc < n {
            let i = &insns[pc];
            let next = pc + if i.is_lddw() { 2 } else { 1 };
            let target = (pc as i64 + 1 + i64::from(i.off)) as usize;
            let to: Vec<usize> = match (i.class(), i.op & 0xf0) {
                (class::JMP, jmp::EXIT) => vec![],
                (class::JMP, jmp::CALL) => vec![next],
                (class::JMP, jmp::JA) => vec![target],
                (class::JMP | class::JMP32, _) => vec![next, target],
                _ => vec![next],
            };
            succ[pc] = to.into_iter().filter(|&s| s < n).collect();
            pc = next;
        }
        Flow { insns, succ }
    }

    /// Slots entered by two or more edges (the entry counts as one).
    pub fn merges(&self) -> Vec<bool> {
        let mut preds = vec![0u32; self.insns.len()];
        if let Some(p) = preds.first_mut() {
            *p += 1;
        }
        for s in self.succ.iter().flatten() {
            preds[*s] += 1;
        }
        preds.into_iter().map(|p| p >= 2).collect()
    }

    /// Solves `in[pc] = f(pc, out[pc])`, `out[pc] = ∪ in[successors]`, for transfer
    /// functions that only ever add registers as `out` grows. With a work list each slot
    /// is revisited only when a successor's value grew, which it can at most 16 times, so
    /// the work is linear in the program — also for chains of backward jumps, which
    /// repeated sweeps would cross one step per sweep.
    fn backward(&self, f: impl Fn(&Insn, u16) -> u16) -> Vec<u16> {
        let n = self.insns.len();
        let mut preds = vec![Vec::new(); n];
        for (pc, succ) in self.succ.iter().enumerate() {
            for &s in succ {
                preds[s].push(pc);
            }
        }
        let mut inn = vec![0u16; n];
        let mut queued = vec![true; n];
        let mut work: Vec<usize> = (0..n).collect();
        while let Some(pc) = work.pop() {
            queued[pc] = false;
            let out = self.succ[pc].iter().fold(0, |m, &s| m | inn[s]);
            let v = f(&self.insns[pc], out);
            if v != inn[pc] {
                inn[pc] = v;
                for &p in &preds[pc] {
                    if !queued[p] {
                        queued[p] = true;
                        work.push(p);
                    }
                }
            }
        }
        inn
    }

    /// Registers read before they are written, from each slot on.
    pub fn live(&self) -> Vec<u16> {
        self.backward(|i, out| {
            let x = i.op & SRC_X != 0;
            match i.class() {
                class::ALU | class::ALU64 => {
                    let code = i.op & 0xf0;
                    let mut v = out & !bit(i.dst);
                    if code != alu::MOV {
                        v |= bit(i.dst);
                    }
                    if x && !matches!(code, alu::NEG | alu::END) {
                        v |= bit(i.src);
                    }
                    v
                }
                class::LDX => out & !bit(i.dst) | bit(i.src),
                class::ST => out | bit(i.dst),
                class::STX => out | bit(i.dst) | bit(i.src),
                class::LD => out & !bit(i.dst),
                _ => match i.op & 0xf0 {
                    jmp::CALL => {
                        let args = helpers::by_id(i.imm).map_or(5, |h| h.args.len()) as u8;
                        out & !0b11_1111 | (1..=args).fold(0, |m, r| m | bit(r))
                    }
                    jmp::EXIT => bit(0),
                    jmp::JA => out,
                    _ => out | bit(i.dst) | if x { bit(i.src) } else { 0 },
                },
            }
        })
    }

    /// Registers whose value can still reach an address, a helper's memory argument or
    /// length, a divisor, or a branch condition. A value stored outside the stack, or
    /// returned, is not demanded: nothing the program does next depends on it.
    pub fn demanded(&self) -> Vec<u16> {
        self.backward(|i, out| {
            let x = i.op & SRC_X != 0;
            let has = |r: u8| out & bit(r) != 0;
            match i.class() {
                class::ALU | class::ALU64 => {
                    let code = i.op & 0xf0;
                    let mut v = out;
                    if code == alu::MOV {
                        v &= !bit(i.dst);
                        if has(i.dst) && x {
                            v |= bit(i.src);
                        }
                    } else if x && (has(i.dst) || matches!(code, alu::DIV | alu::MOD)) {
                        v |= bit(i.src);
                    }
                    v
                }
                class::LDX => out & !bit(i.dst) | bit(i.src),
                class::ST => out | bit(i.dst),
                class::STX => out | bit(i.dst) | if i.dst == FP { bit(i.src) } else { 0 },
                class::LD => out & !bit(i.dst),
                _ => match i.op & 0xf0 {
                    jmp::CALL => {
                        let args: u16 = match helpers::by_id(i.imm) {
                            Some(p) => p
                                .args
                                .iter()
                                .enumerate()
                                .filter(|(_, a)| !matches!(a, Arg::Scalar))
                                .fold(0, |m, (k, _)| m | bit(k as u8 + 1)),
                            None => 0b11_1110,
                        };
                        out & !0b11_1111 | args
                    }
                    jmp::EXIT | jmp::JA => out,
                    _ => out | bit(i.dst) | if x { bit(i.src) } else { 0 },
                },
            }
        })
    }
}
