//! One regression test per rbpf 0.4.1 defect (DESIGN.md, and the helper-stack one found
//! here), each through the real path: load, verify, rewrite, compile, run on every engine:
//! the checked one, and rbpf's interpreter and JIT with the rewrites that make them exact.
//! Each program computes something the unfixed engine gets wrong (or crashes on).

mod common;

use appcode::asm::assemble;
use appcode::{Mode, Program, Request};
use common::TestFile;

const ENGINES: [Mode; 3] = [Mode::Checked, Mode::Interpreter, Mode::UncheckedJit];

fn run_all(text: &str) -> [u64; 3] {
    let file = TestFile::new(&[0u8; 4096]);
    let insns = assemble(text).unwrap();
    ENGINES.map(|mode| {
        let p = Program::from_insns("defect", &insns, mode).unwrap_or_else(|e| panic!("{e}"));
        p.run(file.world(false), &Request::default())
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"))
            .result
    })
}

#[test]
fn mov32_zero_extends_on_the_jit() {
    // rbpf's JIT left the upper half of r0 in place.
    let r = run_all("lddw %r0, 0xdeadbeef00000007\nmov32 %r0, %r0\nexit");
    assert_eq!(r, [7; 3]);
}

#[test]
fn le16_and_le32_truncate_on_the_jit() {
    // rbpf's JIT treated le16/le32 as no-ops.
    let r = run_all("lddw %r0, 0x1122334455667788\nle16 %r0\nexit");
    assert_eq!(r, [0x7788; 3]);
    let r = run_all("lddw %r0, 0x1122334455667788\nle32 %r0\nexit");
    assert_eq!(r, [0x5566_7788; 3]);
}

#[test]
fn compares_with_negative_immediates_sign_extend_in_the_interpreter() {
    // rbpf's interpreter compared against the zero-extended immediate.
    let r = run_all("lddw %r1, 0xfffffffffffffffe\nmov %r0, 1\njeq %r1, -2, +1\nmov %r0, 0\nexit");
    assert_eq!(r, [1; 3]);
    let r = run_all("mov %r1, 5\nmov %r0, 1\njgt %r1, -1, +1\nmov %r0, 0\nexit");
    assert_eq!(r, [0; 3], "5 > 2^64 - 1 is false");
}

#[test]
fn called_functions_do_not_overwrite_their_callers_stack() {
    // rbpf's JIT ran the callee with the caller's r10: the callee's [r10-8] was the
    // caller's. Inlining gives each function its own frame.
    let r = run_all(
        "stdw [%r10-8], 40
         call local f
         ldxdw %r1, [%r10-8]
         add %r0, %r1
         exit
         f:
         stdw [%r10-8], 2
         ldxdw %r0, [%r10-8]
         exit",
    );
    assert_eq!(r, [42; 3]);
}

#[test]
fn callee_saved_registers_survive_calls() {
    let r = run_all(
        "mov %r6, 40
         call local f
         add %r0, %r6
         exit
         f:
         mov %r6, 1
         mov %r0, %r6
         add %r0, 1
         exit",
    );
    assert_eq!(r, [42; 3]);
}

#[test]
fn helpers_called_from_jit_code_run_on_an_aligned_stack() {
    // rbpf's JIT entered helpers with the stack 8 bytes off 16-byte alignment, which
    // crashed helpers that copy with SSE (emit growing its output here).
    let file = TestFile::new(&[1u8; 64 * 1024]);
    let insns = assemble(
        "ldxdw %r6, [%r1+40]
         add %r6, 4096
         ldxdw %r7, [%r1+56]
         jge %r6, %r7, +1
         stxdw [%r1+80], %r6
         ldxdw %r1, [%r1]
         mov %r2, 4096
         call 3
         exit",
    )
    .unwrap();
    for mode in ENGINES {
        let p = Program::from_insns("emit_all", &insns, mode).unwrap();
        let out = p.run(file.world(false), &Request::default()).unwrap();
        assert_eq!(out.output, vec![1u8; 64 * 1024], "{mode:?}");
    }
}

#[test]
fn v4_instructions_and_atomics_are_refused_not_miscomputed() {
    for text in [
        "mov %r0, -7\nsdiv %r0, 2\nexit",
        "mov %r0, -7\nsmod %r0, 2\nexit",
        "mov %r1, -1\nmovsx832 %r0, %r1\nexit",
        "mov %r0, 1\nbswap16 %r0\nexit",
        "stdw [%r10-8], 0\nmov %r1, 1\nlock add [%r10-8], %r1\nmov %r0, 0\nexit",
    ] {
        let insns = assemble(text).unwrap();
        let e = Program::from_insns("v4", &insns, Mode::Checked).unwrap_err();
        assert!(format!("{e:?}").contains("Unsupported"), "{text}: {e}");
    }
}

#[test]
fn accesses_are_checked_whole_not_by_their_first_byte() {
    // rbpf's interpreter checked only an access's first byte; its JIT checked nothing.
    let insns = assemble("ldxdw %r2, [%r1]\nldxdw %r0, [%r2+4089]\nexit").unwrap();
    let e = Program::from_insns("straddle", &insns, Mode::Interpreter).unwrap_err();
    assert!(format!("{e:?}").contains("OutOfBounds"), "{e}");
}

#[test]
fn loops_cannot_run_without_a_budget() {
    // rbpf has no instruction budget; the verifier bounds every invocation.
    let insns = assemble("mov %r0, 0\nl:\nadd %r0, 1\njlt %r0, 100, l\nexit").unwrap();
    let p = Program::from_insns("count", &insns, Mode::Checked).unwrap();
    assert_eq!(p.verified().max_insns, 1 + 2 * 100 + 1);
    let insns = assemble("mov %r0, 0\nl:\nadd %r0, 1\nja l").unwrap();
    assert!(Program::from_insns("forever", &insns, Mode::Checked).is_err());
}
