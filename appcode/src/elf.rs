//! Loading appcode from ELF objects made by `clang -O2 -g -target bpf -c` (any `-mcpu`).
//!
//! Each section named `nearfs/NAME` is one program, entered at its first instruction.
//! Functions in `.text` that a program calls are appended to it once, and every
//! bpf-to-bpf call is re-aimed at the linked stream. References to globals (`lddw` with an
//! `R_BPF_64_64` relocation into `.rodata*`, `.data*` or `.bss*`) are kept as [`DataRef`]s
//! to be bound to the program's copy of that section when it is instantiated.
//! Relocation semantics follow libbpf: a call to a section symbol targets slot
//! `symbol offset / 8 + imm + 1` of that section.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use object::elf::{R_BPF_64_32, R_BPF_64_64};
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
};

use crate::insn::{self, CALL_LOCAL, INSN_SIZE, Insn, class, jmp};

/// Prefix of program section names.
pub const PROGRAM_PREFIX: &str = "nearfs/";
/// Largest linked program, in instruction slots.
pub const MAX_INSNS: usize = 1 << 16;
/// Most sections an object may have.
pub const MAX_SECTIONS: usize = 1024;
/// Most global sections (`.rodata*`) the programs of one object may refer to.
pub const MAX_GLOBALS: usize = 64;
/// Most programs one object may hold.
pub const MAX_PROGRAMS: usize = 64;
/// Longest program name (`nearfs/NAME`), as the ioctls carry it with its NUL.
pub const MAX_NAME: usize = 63;
/// Most BTF line records read from one object (and most record groups), bytes kept of
/// each string they name, and of all those strings together (past it, the object has no
/// line info): line info only improves messages, so a hostile object gets a little of it.
const MAX_LINES: usize = 1 << 16;
const LINE_TEXT: usize = 256;
const LINE_STRINGS: usize = 4 << 20;

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
    /// More sections than [`MAX_SECTIONS`].
    TooManySections { sections: usize },
    /// More programs than [`MAX_PROGRAMS`].
    TooManyPrograms,
    /// A program name that is empty, longer than [`MAX_NAME`], given twice, or with
    /// other characters than letters, digits, `_`, `.` and `-`.
    BadName { name: String },
    /// References to more global sections than [`MAX_GLOBALS`].
    TooManyGlobals,
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
            LoadError::TooManySections { sections } => write!(
                f,
                "{sections} sections; an object may have at most {MAX_SECTIONS}"
            ),
            LoadError::TooManyPrograms => {
                write!(f, "more than {MAX_PROGRAMS} programs in one object")
            }
            LoadError::BadName { name } => write!(
                f,
                "program name {name:?}: names are 1 to {MAX_NAME} letters, digits, '_', '.' \
                 or '-', each name once"
            ),
            LoadError::TooManyGlobals => write!(
                f,
                "references to more than {MAX_GLOBALS} global sections; merge the constants"
            ),
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

/// Which global section of an object: an index into [`Loaded::regions`], carried unchanged
/// from loading through verification to binding (only the loader makes one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalId(usize);

impl GlobalId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Global ids for the crate's own tests.
#[cfg(test)]
pub(crate) mod tests_support {
    pub fn global(index: usize) -> super::GlobalId {
        super::GlobalId(index)
    }
}

/// An `lddw` that must load the address of `offset` bytes into region `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub insn: usize,
    pub region: GlobalId,
    pub offset: u64,
}

/// A line of C source, from the object's BTF line info (`clang -g`). The strings are
/// shared among the records that name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub file: Arc<str>,
    pub line: u32,
    pub text: Arc<str>,
}

/// One program, linked into a single instruction stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linked {
    /// NAME from the `nearfs/NAME` section.
    pub name: String,
    pub insns: Vec<Insn>,
    pub data_refs: Vec<DataRef>,
    /// Source lines by the slot where their code starts, sorted by slot.
    pub lines: Vec<(usize, Line)>,
}

impl Linked {
    /// The source line slot `at` was compiled from, if the object says.
    pub fn line_of(&self, at: usize) -> Option<&Line> {
        let i = self.lines.partition_point(|(s, _)| *s <= at);
        i.checked_sub(1).map(|i| &self.lines[i].1)
    }
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
    if section.size() / INSN_SIZE as u64 > MAX_INSNS as u64 {
        return Err(LoadError::TooLarge {
            section: name,
            insns: (section.size() / INSN_SIZE as u64) as usize,
        });
    }
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
    let sections = file.sections().count();
    if sections > MAX_SECTIONS {
        return Err(LoadError::TooManySections { sections });
    }
    let mut region_of: HashMap<SectionIndex, GlobalId> = HashMap::new();
    let line_info = btf_lines(&file).unwrap_or_default();
    let mut lines_kept = 0;
    let text = file.section_by_name(".text").filter(|s| s.size() > 0);
    for section in file.sections() {
        let Some(name) = section
            .name()
            .ok()
            .and_then(|n| n.strip_prefix(PROGRAM_PREFIX))
        else {
            continue;
        };
        // Names are shown to other users (listings, `user.nearfs.programs`): they must not
        // be able to pass for something else there.
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name.chars().all(plain)
            || loaded.programs.iter().any(|p| p.name == name)
        {
            return Err(LoadError::BadName {
                name: name.chars().take(MAX_NAME).collect(),
            });
        }
        if loaded.programs.len() == MAX_PROGRAMS {
            return Err(LoadError::TooManyPrograms);
        }
        let mut linker = Linker {
            file: &file,
            loaded: &mut loaded,
            region_of: &mut region_of,
            data_refs: Vec::new(),
            relocated: HashSet::new(),
        };
        let mut insns = code(&section)?;
        let mut bases = vec![(section.index(), 0usize)];
        // One relocation per instruction (checked as they are applied): more are never
        // looked at, however many relocation sections name this one.
        let calls_text = section.relocations().take(insns.len() + 1).any(|(_, r)| {
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
        // Records inside their section only, and MAX_LINES in all: `.text`'s are copied
        // into every program that calls it.
        let mut lines = Vec::new();
        for &(index, base) in &bases {
            let sec = file.section_by_index(index).map_err(malformed)?;
            let recs = sec.name().ok().and_then(|n| line_info.get(n));
            for (off, line) in recs.into_iter().flatten() {
                if u64::from(*off) >= sec.size() || lines_kept == MAX_LINES {
                    continue;
                }
                lines_kept += 1;
                lines.push((base + *off as usize / INSN_SIZE, line.clone()));
            }
        }
        lines.sort_by_key(|(slot, _)| *slot);
        loaded.programs.push(Linked {
            name: name.to_string(),
            insns,
            data_refs,
            lines,
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
    region_of: &'a mut HashMap<SectionIndex, GlobalId>,
    data_refs: Vec<DataRef>,
    /// Slots already relocated: one relocation per instruction.
    relocated: HashSet<usize>,
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
            if !self.relocated.insert(at) {
                return Err(bad("two relocations on one instruction".into()));
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
                    if !self.region_of.contains_key(&target_sec)
                        && self.loaded.regions.len() >= MAX_GLOBALS
                    {
                        return Err(LoadError::TooManyGlobals);
                    }
                    let region = self.region(target_sec).map_err(&bad)?;
                    let addend = u64::from(insns[at].imm as u32);
                    let offset = sym.address().checked_add(addend);
                    let size = self.loaded.regions[region.index()].bytes.len() as u64;
                    let Some(offset) = offset.filter(|&o| o <= size) else {
                        return Err(bad("reference past the end of its section".into()));
                    };
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
    fn region(&mut self, index: SectionIndex) -> Result<GlobalId, String> {
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
        let held: u64 = self
            .loaded
            .regions
            .iter()
            .map(|r| r.bytes.len() as u64)
            .sum();
        if held.saturating_add(sec.size()) > crate::memory::MAX_GLOBALS as u64 {
            return Err(format!(
                "section {name:?} has {} bytes; globals may have {} in all",
                sec.size(),
                crate::memory::MAX_GLOBALS
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
        let r = GlobalId(self.loaded.regions.len() - 1);
        self.region_of.insert(index, r);
        Ok(r)
    }
}

/// BTF line info: for each code section, (byte offset, line) records. `None` if the
/// object has none or it is malformed; line info only ever improves messages.
fn btf_lines(file: &object::File<'_>) -> Option<HashMap<String, Vec<(u32, Line)>>> {
    let btf = file.section_by_name(".BTF")?.data().ok()?;
    let ext = file.section_by_name(".BTF.ext")?.data().ok()?;
    parse_lines(btf, ext)
}

/// Line info from the `.BTF` and `.BTF.ext` sections' bytes.
fn parse_lines(btf: &[u8], ext: &[u8]) -> Option<HashMap<String, Vec<(u32, Line)>>> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    // struct btf_header: magic u16, version u8, flags u8, hdr_len, type_off, type_len,
    // str_off, str_len (u32 each).
    if btf.get(0..2)? != [0x9f, 0xeb] || ext.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let strings_at = u32_at(btf, 4)? as usize + u32_at(btf, 16)? as usize;
    let strings = btf.get(strings_at..strings_at + u32_at(btf, 20)? as usize)?;
    // Each string is read once (records share them) and at most LINE_TEXT bytes of it: a
    // hostile object cannot make this copy more than its records times that.
    let mut seen: HashMap<u32, Arc<str>> = HashMap::new();
    let mut kept = 0;
    let mut string = |off: u32| -> Option<Arc<str>> {
        if let Some(s) = seen.get(&off) {
            return Some(s.clone());
        }
        let s = strings.get(off as usize..)?;
        let s = &s[..s.len().min(LINE_TEXT)];
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        kept += end;
        if kept > LINE_STRINGS {
            return None;
        }
        let text: Arc<str> = String::from_utf8_lossy(&s[..end]).into();
        seen.insert(off, text.clone());
        Some(text)
    };
    // struct btf_ext_header: magic, version, flags, hdr_len, func_info_off, func_info_len,
    // line_info_off, line_info_len.
    let at = u32_at(ext, 4)? as usize + u32_at(ext, 16)? as usize;
    let info = ext.get(at..at + u32_at(ext, 20)? as usize)?;
    let rec_size = u32_at(info, 0)? as usize;
    if rec_size < 16 {
        return None;
    }
    let mut out: HashMap<String, Vec<(u32, Line)>> = HashMap::new();
    let mut records = 0;
    let mut pos = 4;
    let mut groups = 0;
    while pos < info.len() {
        groups += 1;
        if groups > MAX_LINES {
            return Some(out);
        }
        let section = string(u32_at(info, pos)?)?.to_string();
        let count = u32_at(info, pos + 4)? as usize;
        pos += 8;
        for _ in 0..count {
            records += 1;
            if records > MAX_LINES {
                return Some(out);
            }
            let rec = info.get(pos..pos + rec_size)?;
            let line = Line {
                file: string(u32_at(rec, 4)?)?,
                line: u32_at(rec, 12)? >> 10,
                text: string(u32_at(rec, 8)?)?,
            };
            out.entry(section.clone())
                .or_default()
                .push((u32_at(rec, 0)?, line));
            pos += rec_size;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.BTF` of nothing but a string table, and a `.BTF.ext` of `count` line records
    /// of section `strings[0]` all naming string offset `at`.
    fn sections(strings: &[u8], count: u32, at: u32) -> (Vec<u8>, Vec<u8>) {
        let mut btf = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 0, 0, strings.len() as u32] {
            btf.extend(v.to_le_bytes());
        }
        btf.extend_from_slice(strings);
        let mut ext = vec![0x9f, 0xeb, 1, 0];
        let info_len = 4 + 8 + 16 * count;
        for v in [32u32, 0, 0, 0, info_len, 0, 0] {
            ext.extend(v.to_le_bytes());
        }
        ext.extend(16u32.to_le_bytes());
        ext.extend(0u32.to_le_bytes());
        ext.extend(count.to_le_bytes());
        for k in 0..count {
            for v in [8 * k, at, at, 7 << 10] {
                ext.extend(v.to_le_bytes());
            }
        }
        (btf, ext)
    }

    #[test]
    fn line_info_costs_at_most_its_caps_whatever_the_object_says() {
        // One 1 MiB string named by 100,000 records: kept once, and only its start.
        let mut strings = b"x\0".to_vec();
        strings.extend(std::iter::repeat_n(b'A', 1 << 20));
        strings.push(0);
        let (btf, ext) = sections(&strings, 100_000, 2);
        let lines = parse_lines(&btf, &ext).unwrap();
        let recs = &lines["x"];
        assert_eq!(recs.len(), MAX_LINES);
        assert_eq!(recs[0].1.text.len(), LINE_TEXT);
        assert!(
            recs.iter()
                .all(|(_, l)| Arc::ptr_eq(&l.text, &recs[0].1.text))
        );
        assert_eq!(recs[5].1.line, 7);
    }

    #[test]
    fn empty_groups_and_distinct_strings_are_capped_too() {
        // 300,000 groups of no records, each naming another 255-byte string.
        let mut strings = Vec::new();
        for k in 0..300_000u32 {
            strings.extend(format!("{k:0>255}").bytes());
            strings.push(0);
        }
        let mut btf = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 0, 0, strings.len() as u32] {
            btf.extend(v.to_le_bytes());
        }
        btf.extend_from_slice(&strings);
        let mut ext = vec![0x9f, 0xeb, 1, 0];
        for v in [32u32, 0, 0, 0, 4 + 8 * 300_000, 0, 0] {
            ext.extend(v.to_le_bytes());
        }
        ext.extend(16u32.to_le_bytes());
        for k in 0..300_000u32 {
            ext.extend((256 * k).to_le_bytes());
            ext.extend(0u32.to_le_bytes());
        }
        // 65,536 groups of 255 bytes pass the 4 MiB of strings: no line info at all.
        assert_eq!(parse_lines(&btf, &ext), None);
    }
}
