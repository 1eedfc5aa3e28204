//! Disassembly in the assembler's syntax ([`crate::asm`]), so that what `nearfs prog
//! disasm` prints assembles back to the same instructions. Anything that is not an eBPF
//! instruction prints as `.insn` with its fields.

use crate::insn::{CALL_LOCAL, Insn, SRC_X, alu, class, jmp, mem};

fn alu_name(code: u8) -> Option<&'static str> {
    Some(match code {
        alu::ADD => "add",
        alu::SUB => "sub",
        alu::MUL => "mul",
        alu::DIV => "div",
        alu::OR => "or",
        alu::AND => "and",
        alu::LSH => "lsh",
        alu::RSH => "rsh",
        alu::NEG => "neg",
        alu::MOD => "mod",
        alu::XOR => "xor",
        alu::MOV => "mov",
        alu::ARSH => "arsh",
        _ => return None,
    })
}

fn jmp_name(code: u8) -> Option<&'static str> {
    Some(match code {
        jmp::JEQ => "jeq",
        jmp::JGT => "jgt",
        jmp::JGE => "jge",
        jmp::JSET => "jset",
        jmp::JNE => "jne",
        jmp::JSGT => "jsgt",
        jmp::JSGE => "jsge",
        jmp::JLT => "jlt",
        jmp::JLE => "jle",
        jmp::JSLT => "jslt",
        jmp::JSLE => "jsle",
        _ => return None,
    })
}

fn size_suffix(op: u8) -> &'static str {
    match op & 0x18 {
        mem::B => "b",
        mem::H => "h",
        mem::W => "w",
        _ => "dw",
    }
}

fn memref(r: u8, off: i16) -> String {
    match off {
        0 => format!("[%r{r}]"),
        o if o < 0 => format!("[%r{r}-{}]", -i32::from(o)),
        o => format!("[%r{r}+{o}]"),
    }
}

fn rel(n: i64) -> String {
    if n < 0 {
        format!("{n}")
    } else {
        format!("+{n}")
    }
}

/// One instruction; `next` is the following slot, needed for `lddw`.
pub fn insn(i: &Insn, next: Option<&Insn>) -> String {
    let raw = || {
        format!(
            ".insn op={:#04x} dst={} src={} off={} imm={}",
            i.op, i.dst, i.src, i.off, i.imm
        )
    };
    let x = i.op & SRC_X != 0;
    let code = i.op & 0xf0;
    match i.class() {
        class::ALU | class::ALU64 => {
            let w = if i.class() == class::ALU { "32" } else { "" };
            if code == alu::END {
                let kind = match (i.class(), x) {
                    (class::ALU, false) => "le",
                    (class::ALU, true) => "be",
                    _ => "bswap",
                };
                return format!("{kind}{} %r{}", i.imm, i.dst);
            }
            let Some(name) = alu_name(code) else {
                return raw();
            };
            let name = match (code, i.off) {
                (alu::DIV, 1) => "sdiv",
                (alu::MOD, 1) => "smod",
                _ => name,
            };
            if code == alu::NEG {
                format!("{name}{w} %r{}", i.dst)
            } else if x {
                format!("{name}{w} %r{}, %r{}", i.dst, i.src)
            } else {
                format!("{name}{w} %r{}, {}", i.dst, i.imm)
            }
        }
        class::JMP | class::JMP32 => {
            let w = if i.class() == class::JMP32 { "32" } else { "" };
            match code {
                jmp::JA => format!("ja {}", rel(i64::from(i.off))),
                jmp::EXIT => "exit".into(),
                jmp::CALL if i.src == CALL_LOCAL => format!("call local {}", rel(i64::from(i.imm))),
                jmp::CALL => format!("call {}", i.imm),
                _ => match jmp_name(code) {
                    Some(name) if x => {
                        format!(
                            "{name}{w} %r{}, %r{}, {}",
                            i.dst,
                            i.src,
                            rel(i64::from(i.off))
                        )
                    }
                    Some(name) => {
                        format!(
                            "{name}{w} %r{}, {}, {}",
                            i.dst,
                            i.imm,
                            rel(i64::from(i.off))
                        )
                    }
                    None => raw(),
                },
            }
        }
        class::LD if i.is_lddw() => {
            let hi = next.map_or(0, |n| n.imm as u32 as u64);
            format!("lddw %r{}, {:#x}", i.dst, hi << 32 | i.imm as u32 as u64)
        }
        class::LDX if i.op & 0xe0 == mem::MEM => format!(
            "ldx{} %r{}, {}",
            size_suffix(i.op),
            i.dst,
            memref(i.src, i.off)
        ),
        class::ST if i.op & 0xe0 == mem::MEM => {
            format!(
                "st{} {}, {}",
                size_suffix(i.op),
                memref(i.dst, i.off),
                i.imm
            )
        }
        class::STX if i.op & 0xe0 == mem::MEM => format!(
            "stx{} {}, %r{}",
            size_suffix(i.op),
            memref(i.dst, i.off),
            i.src
        ),
        _ => raw(),
    }
}

/// Slot `at` of `insns`.
pub fn at(insns: &[Insn], at: usize) -> String {
    match insns.get(at) {
        Some(i) => insn(i, insns.get(at + 1)),
        None => "(end of program)".into(),
    }
}

/// The whole stream, one instruction per line after its slot number.
pub fn listing(insns: &[Insn]) -> String {
    let mut out = String::new();
    let mut slot = 0;
    while slot < insns.len() {
        out.push_str(&format!("{slot:5}: {}\n", at(insns, slot)));
        slot += if insns[slot].is_lddw() { 2 } else { 1 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;
    use crate::insn::check_isa;
    use crate::vectors::{self, Vector};

    /// Every v1–v3 program of the conformance suite disassembles into text that
    /// assembles back to the same instructions.
    #[test]
    fn disassembly_assembles_back() {
        let dir = match vectors::dir() {
            Ok(d) => d,
            Err(why) => return println!("skipped: {why}"),
        };
        let files = vectors::files(&dir).expect("conformance vectors");
        let mut checked = 0;
        for f in files {
            let v = Vector::parse(&std::fs::read_to_string(&f).unwrap());
            let Ok(prog) = assemble(&v.asm) else { continue };
            if prog.iter().any(|i| check_isa(i).is_err() && i.op != 0) {
                continue;
            }
            let text: String = listing(&prog)
                .lines()
                .map(|l| l.split_once(": ").unwrap().1.to_string() + "\n")
                .collect();
            assert_eq!(
                assemble(&text).as_ref(),
                Ok(&prog),
                "{}:\n{text}",
                f.display()
            );
            checked += 1;
        }
        assert!(checked > 150, "only {checked} vectors checked");
    }
}
