//! An assembler for the text syntax of the eBPF conformance suite (ubpf style):
//!
//! ```text
//! mov32 %r0, 0          # comment
//! ldxh %r0, [%r1+2]
//! jeq %r1, 0xb, done    # labels, or +N / -N slots
//! lock fetch add [%r10-8], %r1
//! call local func       # bpf-to-bpf call; `call N` calls helper N
//! done:
//! exit
//! ```
//!
//! It encodes every instruction of ISA v1–v4, including those nearfs refuses to run, so
//! that refusals can be tested; verifier test cases are written in it too.

use std::collections::HashMap;
use std::fmt;

use crate::insn::{CALL_HELPER, CALL_LOCAL, Insn, SRC_K, SRC_X, alu, class, jmp, mem};

/// A line that could not be assembled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsmError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for AsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for AsmError {}

/// A jump or call whose offset is filled in once all labels are known.
struct Fixup {
    slot: usize,
    line: usize,
    target: String,
    /// Store the relative target in `imm` (ja32, call local) rather than `off`.
    in_imm: bool,
}

/// Assembles `text` into instruction slots.
pub fn assemble(text: &str) -> Result<Vec<Insn>, AsmError> {
    let mut prog: Vec<Insn> = Vec::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    let mut fixups = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let err = |message: String| AsmError { line, message };
        let code = raw.split('#').next().unwrap_or("").trim();
        if code.is_empty() {
            continue;
        }
        if let Some(label) = code.strip_suffix(':') {
            if labels
                .insert(label.trim().to_string(), prog.len())
                .is_some()
            {
                return Err(err(format!("label {label:?} defined twice")));
            }
            continue;
        }
        let (mnemonic, rest) = code.split_once(char::is_whitespace).unwrap_or((code, ""));
        let ops: Vec<&str> = if rest.trim().is_empty() {
            Vec::new()
        } else {
            rest.split(',').map(str::trim).collect()
        };
        let slot = prog.len();
        let mut jump_to = |target: &str, in_imm: bool| {
            fixups.push(Fixup {
                slot,
                line,
                target: target.to_string(),
                in_imm,
            });
        };
        let insns = instruction(mnemonic, &ops, &mut jump_to).map_err(err)?;
        prog.extend(insns);
    }
    for f in fixups {
        let err = |message: String| AsmError {
            line: f.line,
            message,
        };
        let target = resolve(&f.target, f.slot, &prog, &labels).map_err(err)?;
        let rel = target as i64 - (f.slot as i64 + 1);
        if f.in_imm {
            prog[f.slot].imm = i32::try_from(rel).map_err(|_| err("jump too far".into()))?;
        } else {
            prog[f.slot].off =
                i16::try_from(rel).map_err(|_| err("jump too far for a 16-bit offset".into()))?;
        }
    }
    Ok(prog)
}

/// Slot index a jump target names: a label, `+N`/`-N` relative to the next slot, or
/// `exit` (without such a label: the first exit at or after the jump).
fn resolve(
    target: &str,
    slot: usize,
    prog: &[Insn],
    labels: &HashMap<String, usize>,
) -> Result<usize, String> {
    if let Some(&t) = labels.get(target) {
        return Ok(t);
    }
    if target.starts_with('+') || target.starts_with('-') {
        let rel: i64 = parse_int(target)?;
        let t = slot as i64 + 1 + rel;
        return usize::try_from(t)
            .map_err(|_| format!("jump target {target} is before the program"));
    }
    if target == "exit" {
        let exit = class::JMP | jmp::EXIT;
        return prog[slot..]
            .iter()
            .position(|i| i.op == exit)
            .map(|p| slot + p)
            .ok_or("no exit after this jump".into());
    }
    Err(format!("unknown label {target:?}"))
}

fn parse_int(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => body.parse::<u64>(),
    }
    .map_err(|_| format!("not a number: {s:?}"))?;
    Ok(if neg {
        (v as i64).wrapping_neg()
    } else {
        v as i64
    })
}

/// A 32-bit immediate: anything from i32::MIN to u32::MAX (taken modulo 2^32).
fn imm32(s: &str) -> Result<i32, String> {
    let v = parse_int(s)?;
    if v < i64::from(i32::MIN) || v > i64::from(u32::MAX) {
        return Err(format!("immediate {s} does not fit 32 bits"));
    }
    Ok(v as i32)
}

fn reg(s: &str) -> Result<u8, String> {
    let n = s
        .trim()
        .strip_prefix("%r")
        .ok_or_else(|| format!("expected a register, got {s:?}"))?;
    match n.parse::<u8>() {
        Ok(r) if r <= 10 => Ok(r),
        _ => Err(format!("no register {s:?}")),
    }
}

fn is_reg(s: &str) -> bool {
    s.trim().starts_with("%r")
}

/// Parses `[%rN]`, `[%rN+off]` or `[%rN-off]`.
fn memref(s: &str) -> Result<(u8, i16), String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("expected [%rN+off], got {s:?}"))?;
    let split = inner.find(['+', '-']);
    let (r, off) = match split {
        Some(i) => (&inner[..i], parse_int(&inner[i..])?),
        None => (inner, 0),
    };
    let off = i16::try_from(off).map_err(|_| format!("offset {off} does not fit 16 bits"))?;
    Ok((reg(r)?, off))
}

fn want(ops: &[&str], n: usize, mnemonic: &str) -> Result<(), String> {
    if ops.len() == n {
        Ok(())
    } else {
        Err(format!(
            "{mnemonic} takes {n} operand(s), got {}",
            ops.len()
        ))
    }
}

fn size_of(suffix: &str) -> Option<u8> {
    Some(match suffix {
        "b" => mem::B,
        "h" => mem::H,
        "w" => mem::W,
        "dw" => mem::DW,
        _ => return None,
    })
}

fn alu_code(name: &str) -> Option<(u8, i16)> {
    Some(match name {
        "add" => (alu::ADD, 0),
        "sub" => (alu::SUB, 0),
        "mul" => (alu::MUL, 0),
        "div" => (alu::DIV, 0),
        "sdiv" => (alu::DIV, 1),
        "or" => (alu::OR, 0),
        "and" => (alu::AND, 0),
        "lsh" => (alu::LSH, 0),
        "rsh" => (alu::RSH, 0),
        "neg" => (alu::NEG, 0),
        "mod" => (alu::MOD, 0),
        "smod" => (alu::MOD, 1),
        "xor" => (alu::XOR, 0),
        "mov" => (alu::MOV, 0),
        "arsh" => (alu::ARSH, 0),
        _ => return None,
    })
}

fn jmp_code(name: &str) -> Option<u8> {
    Some(match name {
        "jeq" => jmp::JEQ,
        "jgt" => jmp::JGT,
        "jge" => jmp::JGE,
        "jset" => jmp::JSET,
        "jne" => jmp::JNE,
        "jsgt" => jmp::JSGT,
        "jsge" => jmp::JSGE,
        "jlt" => jmp::JLT,
        "jle" => jmp::JLE,
        "jslt" => jmp::JSLT,
        "jsle" => jmp::JSLE,
        _ => return None,
    })
}

fn atomic_code(name: &str, fetch: bool) -> Option<i32> {
    let base = match name {
        "add" => i32::from(alu::ADD),
        "or" => i32::from(alu::OR),
        "and" => i32::from(alu::AND),
        "xor" => i32::from(alu::XOR),
        // Exchanges always fetch.
        "xchg" => return Some(0xe1),
        "cmpxchg" => return Some(0xf1),
        _ => return None,
    };
    Some(base | i32::from(fetch))
}

/// Encodes one instruction (two slots for lddw).
fn instruction(
    m: &str,
    ops: &[&str],
    jump_to: &mut dyn FnMut(&str, bool),
) -> Result<Vec<Insn>, String> {
    let one = |i: Insn| Ok(vec![i]);
    // ALU, with "32" for the 32-bit class.
    let (base, is32) = match m.strip_suffix("32") {
        Some(b) if !b.starts_with("movsx") && !b.starts_with("lock") => (b, true),
        _ => (m, false),
    };
    if let Some((code, off)) = alu_code(base) {
        let cls = if is32 { class::ALU } else { class::ALU64 };
        if code == alu::NEG {
            want(ops, 1, m)?;
            return one(Insn::new(cls | code, reg(ops[0])?, 0, 0, 0));
        }
        want(ops, 2, m)?;
        let dst = reg(ops[0])?;
        return if is_reg(ops[1]) {
            one(Insn::new(cls | code | SRC_X, dst, reg(ops[1])?, off, 0))
        } else {
            one(Insn::new(cls | code | SRC_K, dst, 0, off, imm32(ops[1])?))
        };
    }
    if let Some(code) = jmp_code(base) {
        want(ops, 3, m)?;
        let cls = if is32 { class::JMP32 } else { class::JMP };
        let dst = reg(ops[0])?;
        jump_to(ops[2], false);
        return if is_reg(ops[1]) {
            one(Insn::new(cls | code | SRC_X, dst, reg(ops[1])?, 0, 0))
        } else {
            one(Insn::new(cls | code | SRC_K, dst, 0, 0, imm32(ops[1])?))
        };
    }
    if let Some(spec) = m.strip_prefix("movsx") {
        // movsx{8,16,32}{32,64}: sign-extend the low bits into a 32- or 64-bit register.
        let (from, cls) = match spec {
            "832" => (8, class::ALU),
            "1632" => (16, class::ALU),
            "864" => (8, class::ALU64),
            "1664" => (16, class::ALU64),
            "3264" => (32, class::ALU64),
            _ => return Err(format!("unknown instruction {m:?}")),
        };
        want(ops, 2, m)?;
        return one(Insn::new(
            cls | alu::MOV | SRC_X,
            reg(ops[0])?,
            reg(ops[1])?,
            from,
            0,
        ));
    }
    // `swap` is the conformance suite's other name for `bswap`.
    let ends = [
        ("le", class::ALU, SRC_K),
        ("be", class::ALU, SRC_X),
        ("bswap", class::ALU64, SRC_K),
        ("swap", class::ALU64, SRC_K),
    ];
    for (prefix, cls, src) in ends {
        if let Some(bits) = m.strip_prefix(prefix)
            && let Ok(bits @ (16 | 32 | 64)) = bits.parse::<i32>()
        {
            want(ops, 1, m)?;
            return one(Insn::new(cls | alu::END | src, reg(ops[0])?, 0, 0, bits));
        }
    }
    if let Some(size) = m.strip_prefix("ldxs").and_then(size_of) {
        want(ops, 2, m)?;
        let (src, off) = memref(ops[1])?;
        return one(Insn::new(
            class::LDX | mem::MEMSX | size,
            reg(ops[0])?,
            src,
            off,
            0,
        ));
    }
    if let Some(size) = m.strip_prefix("ldx").and_then(size_of) {
        want(ops, 2, m)?;
        let (src, off) = memref(ops[1])?;
        return one(Insn::new(
            class::LDX | mem::MEM | size,
            reg(ops[0])?,
            src,
            off,
            0,
        ));
    }
    if let Some(size) = m.strip_prefix("stx").and_then(size_of) {
        want(ops, 2, m)?;
        let (dst, off) = memref(ops[0])?;
        return one(Insn::new(
            class::STX | mem::MEM | size,
            dst,
            reg(ops[1])?,
            off,
            0,
        ));
    }
    if let Some(size) = m.strip_prefix("st").and_then(size_of) {
        want(ops, 2, m)?;
        let (dst, off) = memref(ops[0])?;
        return one(Insn::new(
            class::ST | mem::MEM | size,
            dst,
            0,
            off,
            imm32(ops[1])?,
        ));
    }
    match m {
        "lddw" => {
            want(ops, 2, m)?;
            let v = parse_int(ops[1])? as u64;
            Ok(vec![
                Insn::new(
                    class::LD | mem::IMM | mem::DW,
                    reg(ops[0])?,
                    0,
                    0,
                    v as u32 as i32,
                ),
                Insn::new(0, 0, 0, 0, (v >> 32) as u32 as i32),
            ])
        }
        "ja" => {
            want(ops, 1, m)?;
            jump_to(ops[0], false);
            one(Insn::new(class::JMP | jmp::JA, 0, 0, 0, 0))
        }
        "ja32" => {
            want(ops, 1, m)?;
            jump_to(ops[0], true);
            one(Insn::new(class::JMP32 | jmp::JA, 0, 0, 0, 0))
        }
        "exit" => {
            want(ops, 0, m)?;
            one(Insn::new(class::JMP | jmp::EXIT, 0, 0, 0, 0))
        }
        "call" => match ops {
            [target] if target.starts_with("local ") => {
                jump_to(target["local ".len()..].trim(), true);
                one(Insn::new(class::JMP | jmp::CALL, 0, CALL_LOCAL, 0, 0))
            }
            [r] if is_reg(r) => one(Insn::new(class::JMP | jmp::CALL | SRC_X, reg(r)?, 0, 0, 0)),
            [n] => one(Insn::new(
                class::JMP | jmp::CALL,
                0,
                CALL_HELPER,
                0,
                imm32(n)?,
            )),
            _ => Err("call takes a helper number, `local LABEL` or a register".into()),
        },
        "lock" => atomic(ops),
        _ => Err(format!("unknown instruction {m:?}")),
    }
}

/// `lock [fetch] OP[32] [%rN+off], %rM`; the mnemonic's words arrive in the first operand.
fn atomic(ops: &[&str]) -> Result<Vec<Insn>, String> {
    want(ops, 2, "lock")?;
    let mut words: Vec<&str> = ops[0].split_whitespace().collect();
    let target = words.pop().ok_or("lock needs an operation")?;
    let fetch = words.first() == Some(&"fetch");
    let op = words.last().ok_or("lock needs an operation")?;
    let (name, size) = match op.strip_suffix("32") {
        Some(n) => (n, mem::W),
        None => (*op, mem::DW),
    };
    let imm = atomic_code(name, fetch).ok_or_else(|| format!("unknown atomic operation {op:?}"))?;
    let (dst, off) = memref(target)?;
    Ok(vec![Insn::new(
        class::STX | mem::ATOMIC | size,
        dst,
        reg(ops[1])?,
        off,
        imm,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_each_form() {
        let p = assemble(
            "mov32 %r0, 0\n\
             lddw %r1, 0x1122334455667788\n\
             ldxh %r2, [%r1-2]\n\
             stw [%r10-4], -1\n\
             stxdw [%r10+8], %r2\n\
             jne32 %r0, 0xffffffff, out # comment\n\
             neg %r3\n\
             be16 %r3\n\
             call 7\n\
             lock fetch add32 [%r10-4], %r1\n\
             out:\n\
             exit",
        )
        .unwrap();
        assert_eq!(p.len(), 12);
        assert_eq!(p[0], Insn::new(0xb4, 0, 0, 0, 0));
        assert_eq!(
            (p[1].imm as u32, p[2].imm as u32),
            (0x5566_7788, 0x1122_3344)
        );
        assert_eq!(p[3], Insn::new(0x69, 2, 1, -2, 0));
        assert_eq!(p[4], Insn::new(0x62, 10, 0, -4, -1));
        assert_eq!(p[5], Insn::new(0x7b, 10, 2, 8, 0));
        assert_eq!(
            p[6],
            Insn::new(0x56, 0, 0, 4, -1),
            "jumps over 4 slots to the exit"
        );
        assert_eq!(p[8], Insn::new(0xdc, 3, 0, 0, 16));
        assert_eq!(p[9], Insn::new(0x85, 0, 0, 0, 7));
        assert_eq!(p[10], Insn::new(0xc3, 10, 1, -4, 0x01));
    }

    #[test]
    fn local_calls_and_ja32_put_the_target_in_imm() {
        let p = assemble("call local f\nexit\nf:\nja32 +0\nexit").unwrap();
        assert_eq!((p[0].src, p[0].imm), (CALL_LOCAL, 1));
        assert_eq!(p[2].imm, 0);
    }

    #[test]
    fn mistakes_name_their_line() {
        assert_eq!(assemble("exit\nmov %r11, 1").unwrap_err().line, 2);
        assert!(
            assemble("ja nowhere")
                .unwrap_err()
                .message
                .contains("unknown label")
        );
        assert!(
            assemble("frob %r0")
                .unwrap_err()
                .message
                .contains("unknown instruction")
        );
        assert!(assemble("mov32 %r0, 0x100000000").is_err());
        assert!(assemble("a:\na:\nexit").is_err());
    }
}
