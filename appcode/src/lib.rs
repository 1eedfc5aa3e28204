//! The appcode runtime: eBPF programs that nearfs runs next to a file's data.
//!
//! This crate has no FUSE dependency, so that a storage server can reuse it. A program goes
//! load ([`elf`]) → inline calls ([`inline`]) → verify ([`verify`]) → sanitize and bind its
//! globals → compile ([`engine`]), then runs many times ([`Program::run`]) over one file's
//! translated extents ([`run`]), calling [`helpers`] on memory it may touch ([`memory`]).
//! Two lines of defence, each enough alone (DESIGN.md, docs/security.md): the verifier
//! rejects what it cannot prove safe, and the checked engine checks every access and counts
//! every instruction at run time. Besides: the instruction codec ([`insn`]), an assembler
//! and disassembler ([`asm`], [`disasm`]), the eBPF conformance vectors ([`vectors`]), and
//! the rewrites that make rbpf's engines exact ([`rewrite`]).

pub mod abi;
pub mod asm;
pub mod disasm;
pub mod elf;
mod engine;
pub mod helpers;
pub mod inline;
pub mod insn;
pub mod memory;
pub mod program;
pub mod rewrite;
pub mod run;
pub mod vectors;
pub mod verify;

pub use engine::Mode;
pub use program::{Options, Program, ProgramError};
pub use run::{Costs, Extent, Limits, Outcome, Request, RunError, World};
