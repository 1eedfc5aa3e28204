//! The engines that execute verified programs, and the boundary with their code: all of
//! the crate's `unsafe` that runs generated code or touches program memory is here and in
//! [`crate::memory`].
//!
//! - [`Mode::Checked`], the engine for every program from a user: nearfs's own translator
//!   to Cranelift ([`translate`]), with a bounds check on every access and a meter on every
//!   block, so that a verifier bug can at worst fail a run (docs/security.md).
//! - [`Mode::Interpreter`], rbpf's interpreter: the reference for debugging and the
//!   fuzzers' oracle.
//! - [`Mode::UncheckedJit`], rbpf's JIT, which checks nothing: kept only so that the
//!   benchmarks can show what the checks cost. Nothing in the daemon uses it.

mod checked;
mod code;
mod rbpf;
mod translate;

use crate::memory::{Addressing, Arena, Globals};
use crate::run::{Run, RunError};

pub(crate) use checked::Compiled;
pub(crate) use rbpf::Rbpf;

/// Which engine executes a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// nearfs's checked engine: Cranelift code that checks every access and counts
    /// instructions. The only engine for programs from users.
    Checked,
    /// rbpf's interpreter, for reference and debugging.
    Interpreter,
    /// rbpf's x86-64 JIT, which checks nothing; for measurement only.
    UncheckedJit,
}

impl Mode {
    /// How this engine's programs address memory.
    pub(crate) fn addressing(self) -> Addressing {
        match self {
            Mode::Checked => Addressing::Guest,
            Mode::Interpreter | Mode::UncheckedJit => Addressing::Host,
        }
    }
}

/// A program compiled for one engine.
pub(crate) enum Engine {
    Checked(Compiled),
    Rbpf {
        vm: Box<Rbpf>,
        /// Instructions each invocation is charged: the verified worst case.
        bound: u64,
    },
}

impl Engine {
    /// Runs one invocation over `arena`.
    pub(crate) fn invoke(
        &self,
        arena: &mut Arena,
        globals: &Globals,
        run: &mut Run<'_>,
    ) -> Result<u64, RunError> {
        match self {
            Engine::Checked(c) => c.invoke(arena, globals, run),
            Engine::Rbpf { vm, bound } => {
                if !run.charge(*bound) {
                    return Err(run.take_stop().expect("charge records why"));
                }
                vm.invoke(arena, globals, run)
            }
        }
    }
}
