//! The appcode runtime: eBPF programs that nearfs runs next to a file's data.
//!
//! This crate has no FUSE dependency, so that a storage server can reuse it. So far it
//! holds the instruction codec and ISA classification ([`insn`]), an assembler for the
//! conformance-suite syntax ([`asm`]) with the suite's vectors ([`vectors`]), the loader
//! and linker for clang's ELF objects ([`elf`]), and the rewrites that make rbpf 0.4.1's
//! interpreter and JIT exact ([`rewrite`]); `tests/conformance.rs` checks them against the
//! public conformance vectors. Verification, helpers, limits and the run API come next
//! (see DESIGN.md, "rbpf 0.4.1 is not safe or exact on its own").

pub mod asm;
pub mod elf;
pub mod insn;
pub mod rewrite;
pub mod vectors;
