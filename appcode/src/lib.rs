//! The appcode runtime: eBPF programs that nearfs runs next to a file's data.
//!
//! This crate has no FUSE dependency, so that a storage server can reuse it. So far it
//! holds the instruction codec and ISA classification ([`insn`]), an assembler for the
//! conformance-suite syntax ([`asm`]) with the suite's vectors ([`vectors`]), the loader
//! and linker for clang's ELF objects ([`elf`]), and the rewrites that make rbpf 0.4.1's
//! interpreter and JIT exact ([`rewrite`]); `tests/conformance.rs` checks them against the
//! public conformance vectors. Verification, helpers, limits and the run API come next
//! (see DESIGN.md, "rbpf 0.4.1 is not safe or exact on its own").

pub mod abi;
pub mod asm;
pub mod disasm;
pub mod elf;
mod exec;
pub mod inline;
pub mod insn;
pub mod program;
pub mod rewrite;
pub mod run;
pub mod vectors;
pub mod verify;

pub use exec::Mode;
pub use program::{Program, ProgramError};
pub use run::{Costs, Extent, Limits, Outcome, Request, RunError, World};
