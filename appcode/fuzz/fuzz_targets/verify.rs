//! Any instruction stream: inlining and verifying must return within the verifier's
//! budget, and whatever is accepted must also compile.
#![no_main]

use appcode::{Mode, Program, insn};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(insns) = insn::decode(&data[..data.len() / 8 * 8]) else {
        return;
    };
    // Accepted programs are compiled for the interpreter only: this target checks the
    // verifier, `differential` checks execution.
    let _ = Program::from_insns("fuzz", &insns, Mode::Interpreter);
});
