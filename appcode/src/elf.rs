//! Loading appcode from ELF objects made by `clang -O2 -g -target bpf -c` (any `-mcpu`).
//!
//! Each section named `nearfs/NAME` is one program, entered at its first instruction.
//! Functions in `.text` that a program calls are appended to it once, and every
//! bpf-to-bpf call is re-aimed at the linked stream. References to globals (`lddw` with an
//! `R_BPF_64_64` relocation into `.rodata*`, `.data*` or `.bss*`) are kept as [`DataRef`]s
//! to be bound to the program's copy of that section when it is instantiated.
//! Relocation semantics follow libbpf: a call to a section symbol targets slot
//! `symbol offset / 8 + imm + 1` of that section.

use std::collections::HashMap;
use std::fmt;

use object::elf::{R_BPF_64_32, R_BPF_64_64};
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
};

use crate::insn::{self, CALL_LOCAL, INSN_SIZE, Insn, class, jmp};

/// Prefix of program section names.
pub const PROGRAM_PREFIX: &str = "nearfs/";
/// Largest linked program, in instruction slots.
pub const MAX_INSNS: usize = 1 << 16;

/// Why an object cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// Not a readable ELF object (truncated, malformed).
    Malformed(String),
    /// An ELF object for another machine or byte order.
    NotBpf,
    /// No `nearfs/...` section.
    NoProgram,
    /// A code section whose size is not a whole number of instructions.
    Ragged { section: String },
    /// A linked program longer than [`MAX_INSNS`].
    TooLarge { section: String, insns: usize },
    /// A relocation nearfs does not know how to apply.
    BadRelocation {
        section: String,
        insn: usize,
        why: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Malformed(why) => write!(f, "not a readable ELF object: {why}"),
            LoadError::NotBpf => write!(
                f,
                "not a little-endian eBPF object (compile with clang -target bpf)"
            ),
            LoadError::NoProgram => write!(
                f,
                "no program: put appcode in a section named \"{PROGRAM_PREFIX}NAME\""
            ),
            LoadError::Ragged { section } => {
                write!(f, "{section}: size is not a multiple of 8 bytes")
            }
            LoadError::TooLarge { section, insns } => {
                write!(
                    f,
                    "{section}: {insns} instructions linked; the limit is {MAX_INSNS}"
                )
            }
            LoadError::BadRelocation { section, insn, why } => {
                write!(f, "{section}, insn {insn}: {why}")
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// A global section a program refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    /// Initial contents (zeros for `.bss`).
    pub bytes: Vec<u8>,
    /// `.data`/`.bss` are writable; `.rodata` is not.
    pub writable: bool,
}

/// An `lddw` that must load the address of `offset` bytes into region `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub insn: usize,
    pub region: usize,
    pub offset: u64,
}

/// One program, linked into a single instruction stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linked {
    /// NAME from the `nearfs/NAME` section.
    pub name: String,
    pub insns: Vec<Insn>,
    pub data_refs: Vec<DataRef>,
}

/// Everything an object holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub programs: Vec<Linked>,
    pub regions: Vec<Region>,
}

fn malformed(e: object::Error) -> LoadError {
    LoadError::Malformed(e.to_string())
}

/// A code section's instructions.
fn code(section: &object::Section<'_, '_>) -> Result<Vec<Insn>, LoadError> {
    let name = section.name().unwrap_or("?").to_string();
    let bytes = section.data().map_err(malformed)?;
    insn::decode(bytes).ok_or(LoadError::Ragged { section: name })
}

/// Loads every program of an ELF object.
pub fn load(elf: &[u8]) -> Result<Loaded, LoadError> {
    let file = object::File::parse(elf).map_err(malformed)?;
    if file.architecture() != object::Architecture::Bpf || !file.is_little_endian() {
        return Err(LoadError::NotBpf);
    }
    let mut loaded = Loaded::default();
    let mut region_of: HashMap<SectionIndex, usize> = HashMap::new();
    let text = file.section_by_name(".text").filter(|s| s.size() > 0);
    for section in file.sections() {
        let Some(name) = section
            .name()
            .ok()
            .and_then(|n| n.strip_prefix(PROGRAM_PREFIX))
        else {
            continue;
        };
        let mut linker = Linker {
            file: &file,
            loaded: &mut loaded,
            region_of: &mut region_of,
            data_refs: Vec::new(),
        };
        let mut insns = code(&section)?;
        let mut bases = vec![(section.index(), 0usize)];
        let calls_text = section.relocations().any(|(_, r)| {
            matches!(r.target(), RelocationTarget::Symbol(s) if file.symbol_by_index(s).ok().and_then(|s| s.section_index()) == text.as_ref().map(|t| t.index()))
        });
        if let Some(t) = text.as_ref().filter(|_| calls_text) {
            bases.push((t.index(), insns.len()));
            insns.extend(code(t)?);
        }
        if insns.len() > MAX_INSNS {
            return Err(LoadError::TooLarge {
                section: section.name().unwrap_or("?").into(),
                insns: insns.len(),
            });
        }
        for &(index, base) in &bases {
            let sec = file.section_by_index(index).map_err(malformed)?;
            linker.relocate(&sec, base, &bases, &mut insns)?;
        }
        let data_refs = linker.data_refs;
        loaded.programs.push(Linked {
            name: name.to_string(),
            insns,
            data_refs,
        });
    }
    if loaded.programs.is_empty() {
        return Err(LoadError::NoProgram);
    }
    Ok(loaded)
}

struct Linker<'a, 'd, 'f> {
    file: &'f object::File<'d>,
    loaded: &'a mut Loaded,
    region_of: &'a mut HashMap<SectionIndex, usize>,
    data_refs: Vec<DataRef>,
}

impl Linker<'_, '_, '_> {
    /// Applies the relocations of `sec`, whose instructions start at slot `base`.
    fn relocate(
        &mut self,
        sec: &object::Section<'_, '_>,
        base: usize,
        bases: &[(SectionIndex, usize)],
        insns: &mut [Insn],
    ) -> Result<(), LoadError> {
        let section = sec.name().unwrap_or("?").to_string();
        for (offset, rel) in sec.relocations() {
            let at = base + (offset / INSN_SIZE as u64) as usize;
            let bad = |why: String| LoadError::BadRelocation {
                section: section.clone(),
                insn: at - base,
                why,
            };
            if offset % INSN_SIZE as u64 != 0 || at >= insns.len() {
                return Err(bad("relocation is not at an instruction".into()));
            }
            let RelocationFlags::Elf { r_type } = rel.flags() else {
                return Err(bad("not an ELF relocation".into()));
            };
            let RelocationTarget::Symbol(sym) = rel.target() else {
                return Err(bad("relocation without a symbol".into()));
            };
            let sym = self.file.symbol_by_index(sym).map_err(malformed)?;
            let target_sec = sym.section_index().ok_or_else(|| {
                bad(format!(
                    "{:?} is not defined here",
                    sym.name().unwrap_or("?")
                ))
            })?;
            match r_type {
                R_BPF_64_32 => {
                    let call = insns[at];
                    if call.op != class::JMP | jmp::CALL || call.src != CALL_LOCAL {
                        return Err(bad(
                            "call relocation on something other than a bpf-to-bpf call".into(),
                        ));
                    }
                    let Some(&(_, target_base)) = bases.iter().find(|(i, _)| *i == target_sec)
                    else {
                        return Err(bad(
                            "call into a section that is not code of this program".into()
                        ));
                    };
                    let slot = (sym.address() / INSN_SIZE as u64) as i64 + i64::from(call.imm) + 1;
                    let target = target_base as i64 + slot;
                    if slot < 0 || target as usize >= insns.len() {
                        return Err(bad("call target outside its section".into()));
                    }
                    insns[at].imm = i32::try_from(target - (at as i64 + 1))
                        .map_err(|_| bad("call too far".into()))?;
                }
                R_BPF_64_64 => {
                    if !insns[at].is_lddw() || at + 1 >= insns.len() {
                        return Err(bad("data relocation on something other than lddw".into()));
                    }
                    let region = self.region(target_sec).map_err(&bad)?;
                    let addend = u64::from(insns[at].imm as u32);
                    let offset = sym.address() + addend;
                    if offset > self.loaded.regions[region].bytes.len() as u64 {
                        return Err(bad("reference past the end of its section".into()));
                    }
                    insns[at].imm = 0;
                    insns[at + 1].imm = 0;
                    self.data_refs.push(DataRef {
                        insn: at,
                        region,
                        offset,
                    });
                }
                other => return Err(bad(format!("relocation type {} is not supported", other.0))),
            }
        }
        Ok(())
    }

    /// The region for a data section, created on first use.
    fn region(&mut self, index: SectionIndex) -> Result<usize, String> {
        if let Some(&r) = self.region_of.get(&index) {
            return Ok(r);
        }
        let sec = self
            .file
            .section_by_index(index)
            .map_err(|e| e.to_string())?;
        let name = sec.name().map_err(|e| e.to_string())?.to_string();
        let writable = name.starts_with(".data") || name.starts_with(".bss");
        if !writable && !name.starts_with(".rodata") {
            return Err(format!(
                "reference into section {name:?}; globals must live in .rodata, .data or .bss"
            ));
        }
        let bytes = if name.starts_with(".bss") {
            vec![0; sec.size() as usize]
        } else {
            sec.data().map_err(|e| e.to_string())?.to_vec()
        };
        self.loaded.regions.push(Region {
            name,
            bytes,
            writable,
        });
        let r = self.loaded.regions.len() - 1;
        self.region_of.insert(index, r);
        Ok(r)
    }
}
