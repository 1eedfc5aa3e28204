//! `nearfs prog verify|disasm`: what a person writing appcode runs on an object file.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use appcode::disasm;
use appcode::elf::{self, Linked, Loaded};
use appcode::inline;
use appcode::program::{self, ProgramError};

fn load(object: &Path) -> anyhow::Result<Loaded> {
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    elf::load(&bytes).with_context(|| format!("loading {}", object.display()))
}

fn selected<'l>(loaded: &'l Loaded, name: Option<&str>) -> anyhow::Result<Vec<&'l Linked>> {
    let chosen: Vec<&Linked> = loaded
        .programs
        .iter()
        .filter(|p| name.is_none_or(|n| p.name == n))
        .collect();
    if chosen.is_empty() {
        let have: Vec<&str> = loaded.programs.iter().map(|p| p.name.as_str()).collect();
        anyhow::bail!(
            "no program {:?}; the object has {have:?}",
            name.unwrap_or("")
        );
    }
    Ok(chosen)
}

/// Verifies each program (or the one named) and prints the verdict; `Ok(true)` if every
/// one was accepted.
pub fn verify(object: &Path, name: Option<&str>) -> anyhow::Result<bool> {
    let loaded = load(object)?;
    let mut out = std::io::stdout().lock();
    let mut all = true;
    for linked in selected(&loaded, name)? {
        let start = Instant::now();
        match program::prepare(linked, &loaded) {
            Ok(p) => {
                let v = &p.verified;
                writeln!(out, "{}: accepted", linked.name)?;
                writeln!(
                    out,
                    "  instructions  {} linked, {} once calls are inlined",
                    linked.insns.len(),
                    p.insns.len()
                )?;
                writeln!(
                    out,
                    "  worst case    {} instructions per invocation",
                    v.max_insns
                )?;
                writeln!(out, "  stack         {} bytes", v.stack)?;
                writeln!(
                    out,
                    "  verifier      {} instructions processed, {} states kept, {:.1} ms",
                    v.processed,
                    v.states,
                    start.elapsed().as_secs_f64() * 1e3
                )?;
            }
            Err(ProgramError::Rejected(d)) => {
                all = false;
                writeln!(out, "{}: rejected", linked.name)?;
                writeln!(out, "  {}", d.to_string().replace('\n', "\n  "))?;
            }
            Err(e) => {
                all = false;
                writeln!(out, "{}: rejected\n  {e}", linked.name)?;
            }
        }
    }
    Ok(all)
}

/// Prints each program's instruction stream as it is verified (calls inlined), with the
/// source lines it came from as comments; the output assembles back.
pub fn disasm(object: &Path, name: Option<&str>) -> anyhow::Result<()> {
    let loaded = load(object)?;
    let mut out = std::io::stdout().lock();
    for linked in selected(&loaded, name)? {
        writeln!(out, "# {}{}", elf::PROGRAM_PREFIX, linked.name)?;
        let (insns, origin) = match inline::inline(&linked.insns, &linked.data_refs) {
            Ok(i) => (i.insns, i.origin),
            Err(e) => {
                writeln!(out, "# not inlined: {e}")?;
                (linked.insns.clone(), (0..linked.insns.len()).collect())
            }
        };
        let mut last = None;
        let mut at = 0;
        while at < insns.len() {
            let line = origin.get(at).and_then(|&o| linked.line_of(o));
            // Line 0 marks code the compiler made up.
            if let Some(l) = line.filter(|l| l.line > 0 && Some((&l.file, l.line)) != last) {
                writeln!(out, "# {}:{}: {}", l.file, l.line, l.text.trim())?;
                last = Some((&l.file, l.line));
            }
            writeln!(out, "{:<44} # {at}", disasm::at(&insns, at))?;
            at += if insns[at].is_lddw() { 2 } else { 1 };
        }
    }
    Ok(())
}
