//! Programs: load → inline → verify → sanitize → bind globals → compile, then run many
//! times, each run a loop of invocations over the windows a chain asks for.

use std::cell::RefCell;
use std::fmt;

use crate::abi::{self, NO_NEXT, ctx};
use crate::disasm;
use crate::elf::{self, Linked, Loaded};
use crate::engine::{Compiled, Engine, Mode, Rbpf};
use crate::inline::{self, InlineError};
use crate::insn::{self, Insn};
use crate::memory::{Addressing, Area, Arena, Globals, guest};
use crate::rewrite::{self, RewriteError};
use crate::run::{Outcome, Request, Run, RunError, SLICE, World};
use crate::verify::{self, Budget, Checks, Rejection, Verified};

/// Why a program cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgramError {
    Elf(elf::LoadError),
    /// The object has no program of that name.
    NoSuchProgram {
        name: String,
        have: Vec<String>,
    },
    Inline(InlineError),
    /// A program that refers to a writable global.
    WritableGlobal {
        section: String,
    },
    /// The verifier's verdict, with where and why.
    Rejected(Box<Diagnostic>),
    Rewrite(RewriteError),
    /// The read-only globals are larger than `memory::MAX_GLOBALS` together.
    GlobalsTooLarge {
        bytes: usize,
    },
    /// The engine could not compile the verified program.
    Engine(String),
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::Elf(e) => write!(f, "{e}"),
            ProgramError::NoSuchProgram { name, have } => {
                write!(f, "no program {name:?} in the object (it has {have:?})")
            }
            ProgramError::Inline(e) => write!(f, "{e}"),
            ProgramError::WritableGlobal { section } => write!(
                f,
                "the program uses {section}, a writable global: runs of one program share its \
                 globals, so they must be const; keep per-run state in ctx->scratch"
            ),
            ProgramError::Rejected(d) => write!(f, "rejected: {d}"),
            ProgramError::Rewrite(e) => write!(f, "{e}"),
            ProgramError::GlobalsTooLarge { bytes } => write!(
                f,
                "{bytes} bytes of read-only globals; a program may have {}",
                crate::memory::MAX_GLOBALS
            ),
            ProgramError::Engine(e) => write!(f, "the engine refused the program: {e}"),
        }
    }
}

impl std::error::Error for ProgramError {}

/// A rejection explained: the instruction, its disassembly and, with `-g`, the C line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub rejection: Rejection,
    pub disasm: String,
    pub source: Option<elf::Line>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "insn {}: {}\n  {}",
            self.rejection.insn, self.disasm, self.rejection.reason
        )?;
        if let Some(l) = &self.source {
            write!(f, "\n  at {}:{}: {}", l.file, l.line, l.text.trim())?;
        }
        Ok(())
    }
}

/// How to build a program: the engine, and which verifier checks are in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// All on except in tests (see [`Checks`]).
    pub checks: Checks,
}

impl From<Mode> for Options {
    fn from(mode: Mode) -> Options {
        Options {
            mode,
            checks: Checks::default(),
        }
    }
}

/// A verified, compiled program, runnable concurrently from many threads.
pub struct Program {
    name: String,
    /// The stream that was verified (calls inlined, globals unbound).
    insns: Vec<Insn>,
    verified: Verified,
    mode: Mode,
    /// Read-only globals; compiled code refers to them.
    globals: Globals,
    engine: Engine,
    /// How long compiling for the engine took.
    compile_time: std::time::Duration,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("name", &self.name)
            .field("insns", &self.insns.len())
            .field("max_insns", &self.verified.max_insns)
            .field("mode", &self.mode)
            .finish()
    }
}

thread_local! {
    /// Each thread reuses one arena, so starting a run allocates nothing.
    static ARENA: RefCell<Arena> = RefCell::new(Arena::new());
}

impl Program {
    /// Loads program `name` (or the object's only program) from an ELF object.
    pub fn from_elf(
        object: &[u8],
        name: Option<&str>,
        options: impl Into<Options>,
    ) -> Result<Program, ProgramError> {
        let loaded = elf::load(object).map_err(ProgramError::Elf)?;
        let linked = pick(&loaded, name)?;
        Program::from_linked(linked, &loaded, options.into())
    }

    /// Loads a program from raw instructions (no globals, no line info).
    pub fn from_insns(
        name: &str,
        insns: &[Insn],
        options: impl Into<Options>,
    ) -> Result<Program, ProgramError> {
        let linked = Linked {
            name: name.to_string(),
            insns: insns.to_vec(),
            data_refs: Vec::new(),
            lines: Vec::new(),
        };
        Program::from_linked(&linked, &Loaded::default(), options.into())
    }

    fn from_linked(
        linked: &Linked,
        loaded: &Loaded,
        options: Options,
    ) -> Result<Program, ProgramError> {
        let prepared = prepare(linked, loaded, options.checks)?;
        let globals = Globals::new(loaded.regions.iter().map(|r| &r.bytes[..])).ok_or(
            ProgramError::GlobalsTooLarge {
                bytes: loaded.regions.iter().map(|r| r.bytes.len()).sum(),
            },
        )?;
        let mut code = verify::sanitize(&prepared.insns, &prepared.verified);
        for r in &prepared.data_refs {
            // A reference in code the verifier never reached is a trap now. (The verifier
            // saw every other one on an lddw with its second slot.)
            if !code.get(r.insn).is_some_and(Insn::is_lddw) || r.insn + 1 >= code.len() {
                continue;
            }
            let id = r.region.index();
            let start = match options.mode.addressing() {
                Addressing::Guest => globals.span(id).map(|s| s.start),
                Addressing::Host => globals
                    .offset(id)
                    .map(|o| globals.bytes().as_ptr() as u64 + o as u64),
            };
            let Some(start) = start else {
                return Err(ProgramError::Engine(format!("no global {id} to bind")));
            };
            let addr = start + r.offset;
            code[r.insn].imm = addr as u32 as i32;
            code[r.insn + 1].imm = (addr >> 32) as u32 as i32;
        }
        let compiling = std::time::Instant::now();
        let engine = match options.mode {
            Mode::Checked => Engine::Checked(
                Compiled::new(&code, &prepared.verified.targets, &globals)
                    .map_err(ProgramError::Engine)?,
            ),
            Mode::Interpreter | Mode::UncheckedJit => {
                let code = rewrite::for_rbpf(&code).map_err(ProgramError::Rewrite)?;
                let jit = options.mode == Mode::UncheckedJit;
                Engine::Rbpf {
                    vm: Box::new(
                        Rbpf::new(insn::encode(&code), jit, &globals)
                            .map_err(ProgramError::Engine)?,
                    ),
                    bound: prepared.verified.max_insns,
                }
            }
        };
        Ok(Program {
            name: linked.name.clone(),
            insns: prepared.insns,
            verified: prepared.verified,
            mode: options.mode,
            globals,
            engine,
            compile_time: compiling.elapsed(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instruction stream that was verified: calls inlined, global addresses unbound.
    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }

    pub fn verified(&self) -> &Verified {
        &self.verified
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How long compiling the verified program for its engine took.
    pub fn compile_time(&self) -> std::time::Duration {
        self.compile_time
    }

    /// Bytes the program holds: its instructions, what the verifier recorded, its globals
    /// and its compiled code.
    pub fn footprint(&self) -> usize {
        let code = match &self.engine {
            Engine::Checked(c) => c.code_size(),
            Engine::Rbpf { .. } => self.insns.len() * 8,
        };
        self.insns.len() * (8 + 1 + std::mem::size_of::<verify::Target>())
            + self.globals.bytes().len()
            + code
    }

    /// Runs the program over `world`: the first invocation with the window at the start of
    /// the range, then one per hop the program asks for.
    pub fn run(&self, world: World<'_>, req: &Request<'_>) -> Result<Outcome, RunError> {
        self.run_sliced(world, req, SLICE)
    }

    /// [`Program::run`], granting the engine at most `slice` instructions at a time.
    fn run_sliced(
        &self,
        world: World<'_>,
        req: &Request<'_>,
        slice: u64,
    ) -> Result<Outcome, RunError> {
        if req.arg.len() > abi::ARG_SIZE {
            return Err(RunError::ArgTooLarge { len: req.arg.len() });
        }
        let (range, file_size) = (world.range.clone(), world.file_size);
        let mut run = Run::new(world, req.limits, slice);
        ARENA.with(|arena| {
            let arena = &mut *arena.borrow_mut();
            // What the program sees as addresses: guest ones, or host ones on rbpf.
            let base = match self.mode.addressing() {
                Addressing::Guest => guest::CTX,
                Addressing::Host => arena.host() as u64,
            };
            let at = |area: Area| base + (area.span().start - guest::CTX);
            arena.area(Area::Scratch).fill(0);
            let arg = arena.area(Area::Arg);
            arg[..req.arg.len()].copy_from_slice(req.arg);
            arg[req.arg.len()..].fill(0);
            let mut off = range.start;
            loop {
                if !run.check_clock() {
                    return Err(run.take_stop().expect("a stopped run says why"));
                }
                run.fetch(off, arena.area(Area::Window))?;
                // The whole context is rewritten for every invocation and the stack is
                // zeroed: nothing one invocation left there reaches the next.
                arena.area(Area::Ctx).fill(0);
                arena.area(Area::Stack).fill(0);
                for (field, v) in [
                    (ctx::DATA, at(Area::Window)),
                    (ctx::DATA_END, at(Area::Window) + abi::WINDOW_SIZE as u64),
                    (ctx::SCRATCH, at(Area::Scratch)),
                    (ctx::ARG, at(Area::Arg)),
                    (ctx::ARG_LEN, req.arg.len() as u64),
                    (ctx::OFFSET, off),
                    (ctx::RANGE_START, range.start),
                    (ctx::RANGE_END, range.end),
                    (ctx::FILE_SIZE, file_size),
                    (ctx::HOP, run.costs.hops),
                    (ctx::NEXT, NO_NEXT),
                ] {
                    arena.set_ctx(field, v);
                }
                let r0 = self.engine.invoke(arena, &self.globals, &mut run)?;
                let next = arena.ctx(ctx::NEXT);
                if next == NO_NEXT {
                    return run.finish(r0);
                }
                if !range.contains(&next) {
                    return Err(RunError::OutOfRange { off: next });
                }
                run.costs.hops += 1;
                if run.costs.hops > req.limits.hops {
                    return Err(RunError::HopLimit {
                        limit: req.limits.hops,
                    });
                }
                off = next;
            }
        })
    }
}

/// Runs `insns` as the eBPF conformance suite does — r1 pointing at `mem`, which the
/// program may read and write, r2 holding its length — on the checked engine, *without the
/// verifier*: the engine's run-time checks are all that stand between the program and the
/// process, which is what this shows. Local calls are inlined first. `Ok(Err(_))` is a run
/// that failed, `Err(_)` a program that could not be built. For the suite's vectors
/// (`examples/conformance.rs`); nearfs runs no program from a user this way.
pub fn run_unverified(
    insns: &[Insn],
    mem: &[u8],
    limits: crate::Limits,
) -> Result<Result<u64, RunError>, ProgramError> {
    if mem.len() > abi::SCRATCH_SIZE {
        return Err(ProgramError::Engine(format!(
            "{} bytes of memory; at most {} fit",
            mem.len(),
            abi::SCRATCH_SIZE
        )));
    }
    let inlined = inline::inline(insns, &[]).map_err(ProgramError::Inline)?;
    let mov = |r: u8, v: u64| Insn::new(insn::class::ALU64 | insn::alu::MOV, r, 0, 0, v as i32);
    let code: Vec<Insn> = [mov(1, guest::SCRATCH), mov(2, mem.len() as u64)]
        .into_iter()
        .chain(inlined.insns)
        .collect();
    let globals = Globals::default();
    let targets = vec![verify::Target::Unreached; code.len()];
    let compiled = Compiled::new(&code, &targets, &globals).map_err(ProgramError::Engine)?;
    let device = blockdev::MemDevice::new(0);
    let world = World {
        device: &device,
        extents: &[],
        file_size: 0,
        range: 0..0,
        writable: false,
    };
    let mut run = Run::new(world, limits, SLICE);
    Ok(ARENA.with(|arena| {
        let arena = &mut *arena.borrow_mut();
        for area in Area::ALL {
            arena.area(area).fill(0);
        }
        arena.area(Area::Scratch)[..mem.len()].copy_from_slice(mem);
        compiled.invoke(arena, &globals, &mut run)
    }))
}

fn pick<'l>(loaded: &'l Loaded, name: Option<&str>) -> Result<&'l Linked, ProgramError> {
    let found = match name {
        Some(n) => loaded.programs.iter().find(|p| p.name == n),
        None if loaded.programs.len() == 1 => loaded.programs.first(),
        None => None,
    };
    found.ok_or_else(|| ProgramError::NoSuchProgram {
        name: name.unwrap_or("(unnamed)").to_string(),
        have: loaded.programs.iter().map(|p| p.name.clone()).collect(),
    })
}

/// A program ready to bind and compile: what `nearfs prog verify` reports on.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub insns: Vec<Insn>,
    pub data_refs: Vec<elf::DataRef>,
    /// For each slot, the slot of the linked program it came from.
    pub origin: Vec<usize>,
    pub verified: Verified,
}

/// Inlines and verifies one linked program.
pub fn prepare(linked: &Linked, loaded: &Loaded, checks: Checks) -> Result<Prepared, ProgramError> {
    if let Some(r) = linked
        .data_refs
        .iter()
        .filter_map(|r| loaded.regions.get(r.region.index()))
        .find(|r| r.writable)
    {
        return Err(ProgramError::WritableGlobal {
            section: r.name.clone(),
        });
    }
    let inlined = inline::inline(&linked.insns, &linked.data_refs).map_err(ProgramError::Inline)?;
    let sizes: Vec<usize> = loaded.regions.iter().map(|r| r.bytes.len()).collect();
    let verified = verify::verify(
        &inlined.insns,
        &inlined.data_refs,
        &verify::Globals { sizes: &sizes },
        Budget::default(),
        checks,
    )
    .map_err(|rejection| {
        let origin = inlined.origin.get(rejection.insn).copied();
        ProgramError::Rejected(Box::new(Diagnostic {
            disasm: disasm::at(&inlined.insns, rejection.insn),
            source: origin.and_then(|o| linked.line_of(o)).cloned(),
            rejection,
        }))
    })?;
    Ok(Prepared {
        insns: inlined.insns,
        data_refs: inlined.data_refs,
        origin: inlined.origin,
        verified,
    })
}

#[cfg(test)]
mod tests {
    use blockdev::{BlockDevice, MemDevice};

    use super::*;
    use crate::asm::assemble;
    use crate::run::{Extent, Limits};

    fn file() -> (MemDevice, Vec<Extent>) {
        let device = MemDevice::new(1 << 16);
        device.write_at(&[3u8; 8192], 4096).unwrap();
        let extents = vec![Extent {
            file_off: 0,
            dev_off: 4096,
            len: 8192,
            unwritten: false,
        }];
        (device, extents)
    }

    fn world<'a>(device: &'a MemDevice, extents: &'a [Extent]) -> World<'a> {
        World {
            device,
            extents,
            file_size: 8192,
            range: 0..8192,
            writable: false,
        }
    }

    /// A loop that sums the window's bytes with a helper call every 512 bytes, over two
    /// windows (one hop).
    const SUM: &str = "mov %r9, %r1
         ldxdw %r6, [%r1]
         mov %r7, 0
         mov %r8, 0
         l:
         mov %r2, %r6
         add %r2, %r8
         ldxb %r3, [%r2]
         add %r7, %r3
         mov %r4, %r8
         and %r4, 511
         jne %r4, 0, skip
         ldxdw %r1, [%r9+24]
         mov %r2, 8
         call 3
         skip:
         add %r8, 1
         jlt %r8, 4096, l
         mov %r0, %r7
         exit";

    #[test]
    fn an_engine_that_yields_resumes_where_it_stopped_and_counts_exactly() {
        let (device, extents) = file();
        let p = Program::from_insns("sum", &assemble(SUM).unwrap(), Mode::Checked).unwrap();
        let req = Request::default();
        let whole = p.run(world(&device, &extents), &req).unwrap();
        assert_eq!(whole.result, 3 * 4096);
        assert_eq!(whole.output.len(), 8 * 8);
        for slice in [1, 7, 64, 1000] {
            let sliced = p.run_sliced(world(&device, &extents), &req, slice).unwrap();
            assert_eq!(sliced, whole, "slices of {slice}");
        }
        // Every iteration's path is known to the verifier here, so the instructions
        // executed are its worst case exactly; each emit of 8 bytes is charged 2 more.
        assert_eq!(whole.costs.insns, p.verified().max_insns + 8 * 2);
    }

    #[test]
    fn the_instruction_limit_stops_a_run_inside_an_invocation() {
        let (device, extents) = file();
        let p = Program::from_insns("sum", &assemble(SUM).unwrap(), Mode::Checked).unwrap();
        for limit in [1, 100, 10_000] {
            let req = Request {
                arg: &[],
                limits: Limits {
                    insns: limit,
                    ..Limits::default()
                },
            };
            for slice in [3, SLICE] {
                let r = p.run_sliced(world(&device, &extents), &req, slice);
                assert_eq!(r, Err(RunError::InsnLimit { limit }), "{limit} by {slice}");
            }
        }
    }
}
