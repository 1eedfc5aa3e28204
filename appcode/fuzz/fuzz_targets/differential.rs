//! Verified programs compute the same on the checked engine and on rbpf's interpreter, the
//! reference.
//!
//! The input is turned into a program that verifies often: registers are initialised
//! from the input, then come ALU operations, loads from the window, scratch and stack,
//! stores to scratch and stack, forward jumps and helper calls, all on r0–r9 with
//! in-bounds offsets; most such programs are accepted, so both engines run them.
#![no_main]

use appcode::insn::{Insn, SRC_K, SRC_X, alu, class, jmp, mem};
use appcode::{Extent, Mode, Outcome, Program, Request, RunError, World};
use blockdev::{BlockDevice, MemDevice};
use libfuzzer_sys::fuzz_target;

const ALU_OPS: [u8; 13] = [
    alu::ADD, alu::SUB, alu::MUL, alu::DIV, alu::OR, alu::AND, alu::LSH, alu::RSH, alu::NEG,
    alu::MOD, alu::XOR, alu::MOV, alu::ARSH,
];
const JMP_OPS: [u8; 11] = [
    jmp::JEQ, jmp::JGT, jmp::JGE, jmp::JSET, jmp::JNE, jmp::JSGT, jmp::JSGE, jmp::JLT,
    jmp::JLE, jmp::JSLT, jmp::JSLE,
];
const SIZES: [u8; 4] = [mem::B, mem::H, mem::W, mem::DW];

fn build(data: &[u8]) -> Vec<Insn> {
    let mut p = Vec::new();
    // r6 = scratch, r7 = window; r0-r5, r8, r9 start as numbers from the input.
    p.push(Insn::new(class::LDX | mem::MEM | mem::DW, 6, 1, 16, 0));
    p.push(Insn::new(class::LDX | mem::MEM | mem::DW, 7, 1, 0, 0));
    for (k, r) in [0u8, 1, 2, 3, 4, 5, 8, 9].iter().enumerate() {
        let imm = data.get(k * 4..k * 4 + 4).map_or(k as i32, |b| i32::from_le_bytes(b.try_into().unwrap()));
        p.push(Insn::new(class::ALU64 | alu::MOV | SRC_K, *r, 0, 0, imm));
    }
    let body = data.get(32..).unwrap_or(&[]);
    let regs = [0u8, 1, 2, 3, 4, 5, 8, 9];
    for (n, c) in body.chunks_exact(4).take(200).enumerate() {
        let (a, b, d, e) = (c[0], c[1], c[2], c[3]);
        let dst = regs[(b & 7) as usize];
        let src = regs[(b >> 4 & 7) as usize];
        let remaining = 200usize.saturating_sub(n) as i16;
        match a % 8 {
            0..=2 => {
                let op = ALU_OPS[(a as usize / 8) % ALU_OPS.len()];
                let cls = if d & 1 == 0 { class::ALU64 } else { class::ALU };
                let x = d & 2 != 0 && op != alu::NEG;
                let mut imm = i32::from(e as i8) * if d & 4 != 0 { 1 << 20 } else { 1 };
                if matches!(op, alu::DIV | alu::MOD) {
                    // Divisors are nonzero constants (the verifier refuses maybe-zero).
                    p.push(Insn::new(cls | op | SRC_K, dst, 0, 0, imm | 1));
                    continue;
                }
                if matches!(op, alu::LSH | alu::RSH | alu::ARSH) {
                    imm &= if cls == class::ALU64 { 63 } else { 31 };
                    p.push(Insn::new(cls | op | SRC_K, dst, 0, 0, imm));
                    continue;
                }
                let src_bit = if x { SRC_X } else { SRC_K };
                p.push(Insn::new(cls | op | src_bit, dst, if x { src } else { 0 }, 0, imm));
            }
            3 => {
                let bits = [16, 32, 64][(e % 3) as usize];
                let big = if d & 1 != 0 { SRC_X } else { SRC_K };
                p.push(Insn::new(class::ALU | alu::END | big, dst, 0, 0, bits));
            }
            4 => {
                // Load from the window (r7) or scratch (r6) at a constant offset.
                let size = SIZES[(d & 3) as usize];
                let base = if d & 4 != 0 { 6 } else { 7 };
                let off = (u16::from_le_bytes([e, d >> 3]) % 4088) as i16;
                p.push(Insn::new(class::LDX | mem::MEM | size, dst, base, off, 0));
            }
            5 => {
                // Store to scratch, then read it back through the stack.
                let size = SIZES[(d & 3) as usize];
                let off = (u16::from(e) * 8 % 4088) as i16;
                p.push(Insn::new(class::STX | mem::MEM | size, 6, src, off, 0));
                p.push(Insn::new(class::STX | mem::MEM | mem::DW, 10, src, -8 - 8 * (e % 8) as i16, 0));
                p.push(Insn::new(class::LDX | mem::MEM | mem::DW, dst, 10, -8 - 8 * (e % 8) as i16, 0));
            }
            6 => {
                let op = JMP_OPS[(a as usize / 8) % JMP_OPS.len()];
                let cls = if d & 1 == 0 { class::JMP } else { class::JMP32 };
                let skip = (i16::from(e) % 8).min(remaining.max(0));
                if d & 2 != 0 {
                    p.push(Insn::new(cls | op | SRC_X, dst, src, skip, 0));
                } else {
                    p.push(Insn::new(cls | op | SRC_K, dst, 0, skip, i32::from(e as i8) - 3));
                }
                // Pad so that every target is an instruction.
                for _ in 0..skip {
                    p.push(Insn::new(class::ALU64 | alu::ADD | SRC_K, dst, 0, 0, 1));
                }
            }
            _ => {
                // memcmp of window and scratch, or emit of scratch.
                let len = i32::from(e % 64);
                if d & 1 == 0 {
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_X, 1, 6, 0, 0));
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_K, 2, 0, 0, len));
                    p.push(Insn::new(class::JMP | jmp::CALL, 0, 0, 0, 3));
                } else {
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_X, 1, 7, 0, 0));
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_X, 2, 6, 0, 0));
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_K, 3, 0, 0, len));
                    p.push(Insn::new(class::JMP | jmp::CALL, 0, 0, 0, 4));
                }
                // r1-r5 are clobbered by the call.
                for r in 1..=5 {
                    p.push(Insn::new(class::ALU64 | alu::MOV | SRC_K, r, 0, 0, r as i32));
                }
            }
        }
    }
    p.push(Insn::new(class::JMP | jmp::EXIT, 0, 0, 0, 0));
    p
}

fuzz_target!(|data: &[u8]| {
    let prog = build(data);
    let verdict = Program::from_insns("diff", &prog, Mode::Checked);
    if std::env::var_os("DIFFERENTIAL_VERDICTS").is_some() {
        eprintln!("verdict: {}", if verdict.is_ok() { "accepted" } else { "rejected" });
    }
    let Ok(checked) = verdict else {
        return;
    };
    let interp = Program::from_insns("diff", &prog, Mode::Interpreter).expect("same verdict");
    let device = MemDevice::new(1 << 16);
    let window: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    device.write_at(&window, 4096).unwrap();
    let extents = [Extent { file_off: 0, dev_off: 4096, len: 8192, unwritten: false }];
    let world = || World { device: &device, extents: &extents, file_size: 8192, range: 0..8192, writable: false };
    let a = checked.run(world(), &Request::default());
    let b = interp.run(world(), &Request::default());
    // The instruction counts differ by design: executed on one, verified worst cases on
    // the other.
    let comparable = |r: &Result<Outcome, RunError>| {
        r.clone().map(|o| (o.result, o.output, o.costs.hops, o.costs.device_bytes, o.written))
    };
    assert_eq!(
        comparable(&a),
        comparable(&b),
        "the checked engine and the interpreter disagree on\n{}",
        appcode::disasm::listing(&prog)
    );
});
