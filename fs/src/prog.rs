//! `nearfs prog verify|disasm|run`: what a person writing appcode runs on an object file,
//! and the commands that load programs into a mount and run them there.

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
        match program::prepare(linked, &loaded, Default::default()) {
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

/// Opens a file (or directory) of a mount for offload requests.
fn open(path: &Path, write: bool) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// `nearfs prog load PATH PROG.o`: loads into the mount that holds PATH; prints the id.
pub fn load_object(path: &Path, object: &Path, name: Option<&str>) -> anyhow::Result<()> {
    let f = open(path, false)?;
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let id = nearfs_client::load(&f, &bytes, name)?;
    println!("{}", id.0);
    Ok(())
}

pub fn list(path: &Path) -> anyhow::Result<()> {
    let f = open(path, false)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>6}  {:<24} {:>6} {:>6} {:>12}",
        "id", "name", "owner", "insns", "worst case"
    )?;
    for p in nearfs_client::list(&f)? {
        writeln!(
            out,
            "{:>6}  {:<24} {:>6} {:>6} {:>12}",
            p.id.0, p.name, p.owner, p.insns, p.max_insns
        )?;
    }
    Ok(())
}

pub fn unload(path: &Path, id: u64) -> anyhow::Result<()> {
    let f = open(path, false)?;
    nearfs_client::unload(&f, nearfs_client::ProgId(id))?;
    Ok(())
}

/// Parses `--arg` words: `u64:N`, `u32:N`, `hex:HEX`, `str:TEXT`, `@FILE`; concatenated.
pub fn parse_arg(words: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut arg = Vec::new();
    for w in words {
        if let Some(p) = w.strip_prefix('@') {
            arg.extend(std::fs::read(p).with_context(|| format!("reading {p}"))?);
        } else if let Some(n) = w.strip_prefix("u64:") {
            arg.extend(parse_number(n)?.to_le_bytes());
        } else if let Some(n) = w.strip_prefix("u32:") {
            let v = u32::try_from(parse_number(n)?).context("u32 out of range")?;
            arg.extend(v.to_le_bytes());
        } else if let Some(h) = w.strip_prefix("hex:") {
            anyhow::ensure!(h.len() % 2 == 0, "hex: needs an even number of digits");
            for i in (0..h.len()).step_by(2) {
                arg.push(u8::from_str_radix(&h[i..i + 2], 16).context("hex: digits")?);
            }
        } else if let Some(s) = w.strip_prefix("str:") {
            arg.extend_from_slice(s.as_bytes());
        } else {
            anyhow::bail!("--arg {w:?}: use u64:N, u32:N, hex:HEX, str:TEXT or @FILE");
        }
    }
    Ok(arg)
}

fn parse_number(s: &str) -> anyhow::Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.with_context(|| format!("not a number: {s:?}"))
}

/// `--range OFF:LEN` (LEN may be `end`).
pub fn parse_range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (o, l) = s.split_once(':').context("--range OFF:LEN")?;
    let len = if l == "end" {
        nearfs_client::abi::RANGE_TO_END
    } else {
        parse_number(l)?
    };
    Ok((parse_number(o)?, len))
}

/// How `nearfs run` prints the program's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    Raw,
    Hex,
    U64,
}

/// What a run is given, by `nearfs run` in a mount and by `nearfs prog run` here.
#[derive(clap::Args)]
pub struct RunOpts {
    /// The program in an object with several.
    #[arg(long)]
    pub name: Option<String>,
    /// The file bytes the program may use, OFF:LEN (LEN may be `end`).
    #[arg(long, value_parser = parse_range, default_value = "0:end")]
    pub range: (u64, u64),
    /// Argument words, concatenated: u64:N, u32:N, hex:HEX, str:TEXT, @FILE.
    #[arg(long)]
    pub arg: Vec<String>,
    /// Let the program write the file (opened read-write).
    #[arg(long)]
    pub write: bool,
    #[arg(long, value_enum, default_value = "hex")]
    pub out: OutFormat,
}

/// `nearfs run`: runs `program` (a loaded program's id, or an object file to load for this
/// run) `repeat` times over `file` in its mount; prints the last run's output on stdout, its
/// result and costs on stderr.
pub fn run(file: &Path, program: &str, a: &RunOpts, repeat: u32) -> anyhow::Result<()> {
    let arg = parse_arg(&a.arg)?;
    let f = open(file, a.write)?;
    let (prog, loaded_here) = match program.parse::<u64>() {
        Ok(id) => (nearfs_client::ProgId(id), false),
        Err(_) => {
            let bytes = std::fs::read(program).with_context(|| format!("reading {program}"))?;
            (nearfs_client::load(&f, &bytes, a.name.as_deref())?, true)
        }
    };
    let req = nearfs_client::Run::new(prog)
        .range(a.range.0, a.range.1)
        .arg(&arg)
        .write(a.write);
    let mut result = nearfs_client::run(&f, &req);
    for _ in 1..repeat {
        if result.is_err() {
            break;
        }
        result = nearfs_client::run(&f, &req);
    }
    if loaded_here {
        let _ = nearfs_client::unload(&f, prog);
    }
    let out = result?;
    let c = &out.costs;
    report(
        a.out,
        &out.output,
        out.result,
        [c.insns, c.hops, c.device_bytes, c.output_bytes],
    )
}

/// Prints a run's output on stdout in `format`, its result and costs (instructions, hops,
/// device bytes, output bytes) on stderr.
fn report(format: OutFormat, output: &[u8], result: u64, costs: [u64; 4]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match format {
        OutFormat::Raw => stdout.write_all(output)?,
        OutFormat::Hex => {
            for (i, line) in output.chunks(16).enumerate() {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(stdout, "{:08x}  {}", i * 16, hex.join(" "))?;
            }
        }
        OutFormat::U64 => {
            for w in output.chunks(8) {
                let mut b = [0u8; 8];
                b[..w.len()].copy_from_slice(w);
                writeln!(stdout, "{}", u64::from_le_bytes(b))?;
            }
        }
    }
    stdout.flush()?;
    let [insns, hops, device_bytes, output_bytes] = costs;
    eprintln!(
        "result={result} ({}) insns={insns} hops={hops} device_bytes={device_bytes} \
         output_bytes={output_bytes}",
        result as i64
    );
    Ok(())
}

/// Which engine `nearfs prog run` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    /// The checked engine, as the daemon runs every program.
    Checked,
    /// rbpf's interpreter, the reference.
    Interpreter,
}

/// `nearfs prog run`: verifies, compiles and runs a program in this process over an
/// ordinary file, as the daemon would over a file of a mount, without one: for writing and
/// debugging appcode. The file is one extent; with `write` the program's writes land in it.
pub fn run_local(object: &Path, file: &Path, a: &RunOpts, engine: EngineArg) -> anyhow::Result<()> {
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mode = match engine {
        EngineArg::Checked => appcode::Mode::Checked,
        EngineArg::Interpreter => appcode::Mode::Interpreter,
    };
    let program = appcode::Program::from_elf(&bytes, a.name.as_deref(), mode)
        .with_context(|| format!("loading {}", object.display()))?;
    let device = blockdev::FileDevice::open(
        file,
        blockdev::OpenOptions {
            direct: false,
            read_only: !a.write,
        },
    )
    .with_context(|| format!("opening {}", file.display()))?;
    let size = blockdev::BlockDevice::len(&device);
    let extents = [appcode::Extent {
        file_off: 0,
        dev_off: 0,
        len: size,
        unwritten: false,
    }];
    let (off, len) = a.range;
    let end = nearfs_client::abi::range_end(off, len, size).context("--range wraps")?;
    let world = appcode::World {
        device: &device,
        extents: &extents,
        file_size: size,
        range: off..end,
        writable: a.write,
    };
    let req = appcode::Request {
        arg: &parse_arg(&a.arg)?,
        limits: appcode::Limits::default(),
    };
    let out = program
        .run(world, &req)
        .map_err(|e| anyhow::anyhow!("the run failed: {e}"))?;
    if a.write {
        blockdev::BlockDevice::flush(&device)?;
    }
    let c = &out.costs;
    report(
        a.out,
        &out.output,
        out.result,
        [c.insns, c.hops, c.device_bytes, c.output_bytes],
    )
}
