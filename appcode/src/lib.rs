//! The appcode runtime: eBPF programs that nearfs runs next to a file's data.
//!
//! This crate has no FUSE dependency, so that a storage server can reuse it. So far it
//! holds the instruction codec and ISA classification ([`insn`]) and an assembler for the
//! conformance-suite syntax ([`asm`]) with the suite's vectors ([`vectors`]); `tests/conformance.rs` measures rbpf 0.4.1 against
//! the public conformance vectors. Loading, verification, rewriting and execution come next
//! (see DESIGN.md, "rbpf 0.4.1 is not safe or exact on its own").

pub mod asm;
pub mod insn;
pub mod vectors;
