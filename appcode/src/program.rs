//! Programs: load → inline → verify → bind globals → rewrite → compile, then run many times.

use std::fmt;

use crate::disasm;
use crate::elf::{self, Linked, Loaded};
use crate::exec::{Engine, Mode};
use crate::inline::{self, InlineError};
use crate::insn::{self, Insn};
use crate::rewrite::{self, RewriteError};
use crate::run::{self, Outcome, Request, RunError, World};
use crate::verify::{self, Budget, Globals, Rejection, Verified};

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
    /// rbpf refused the verified program (a bug in nearfs).
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

/// A verified, compiled program, runnable concurrently from many threads.
pub struct Program {
    name: String,
    /// The stream that was verified (calls inlined, globals unbound).
    insns: Vec<Insn>,
    verified: Verified,
    mode: Mode,
    /// Read-only globals; the compiled code holds their addresses.
    _globals: Vec<Box<[u8]>>,
    engine: Engine,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("name", &self.name)
            .field("insns", &self.insns.len())
            .field("verified", &self.verified)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Program {
    /// Loads program `name` (or the object's only program) from an ELF object.
    pub fn from_elf(
        object: &[u8],
        name: Option<&str>,
        mode: Mode,
    ) -> Result<Program, ProgramError> {
        let loaded = elf::load(object).map_err(ProgramError::Elf)?;
        let linked = pick(&loaded, name)?;
        Program::from_linked(linked, &loaded, mode)
    }

    /// Loads a program from raw instructions (no globals, no line info).
    pub fn from_insns(name: &str, insns: &[Insn], mode: Mode) -> Result<Program, ProgramError> {
        let linked = Linked {
            name: name.to_string(),
            insns: insns.to_vec(),
            data_refs: Vec::new(),
            lines: Vec::new(),
        };
        Program::from_linked(&linked, &Loaded::default(), mode)
    }

    fn from_linked(linked: &Linked, loaded: &Loaded, mode: Mode) -> Result<Program, ProgramError> {
        let prepared = prepare(linked, loaded)?;
        let globals: Vec<Box<[u8]>> = loaded
            .regions
            .iter()
            .map(|r| r.bytes.clone().into_boxed_slice())
            .collect();
        let mut bound = prepared.insns.clone();
        for r in &prepared.data_refs {
            let addr = globals[r.region].as_ptr() as u64 + r.offset;
            bound[r.insn].imm = addr as u32 as i32;
            bound[r.insn + 1].imm = (addr >> 32) as u32 as i32;
        }
        let code = rewrite::for_rbpf(&bound).map_err(ProgramError::Rewrite)?;
        let readable: Vec<_> = globals
            .iter()
            .map(|g| g.as_ptr() as u64..g.as_ptr() as u64 + g.len() as u64)
            .collect();
        let engine =
            Engine::new(insn::encode(&code), mode, &readable).map_err(ProgramError::Engine)?;
        Ok(Program {
            name: linked.name.clone(),
            insns: prepared.insns,
            verified: prepared.verified,
            mode,
            _globals: globals,
            engine,
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

    /// Runs the program over `world`.
    pub fn run(&self, world: World<'_>, req: &Request<'_>) -> Result<Outcome, RunError> {
        run::run(&self.engine, self.verified.max_insns, world, req)
    }
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
pub fn prepare(linked: &Linked, loaded: &Loaded) -> Result<Prepared, ProgramError> {
    if let Some(r) = linked
        .data_refs
        .iter()
        .map(|r| &loaded.regions[r.region])
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
        &Globals { sizes: &sizes },
        Budget::default(),
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
